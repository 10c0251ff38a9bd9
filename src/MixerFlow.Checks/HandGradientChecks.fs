namespace MixerFlow.Checks

open System
open TorchSharp
open MixerFlow.Core
open MixerFlow.Core.Ops
open MixerFlow.Checks.CheckEvaluations

/// The hand-written gradient check (j): a bijector's plan (HandGradientPlan, its parts' rules and
/// autograd islands) against autograd.
module internal HandGradientChecks =
    /// Why the check does not apply to this bijector at x (null: it does): every part would run
    /// as an autograd island, and so compare autograd with itself.
    let refusal (b: Bijector) (x: Tensor) : string =
        let plan = HandGradientPlan.Make(b, x)
        try
            if plan.Parts |> Seq.forall (fun p -> p.IsIsland) then
                "no hand-written rule runs it (" + String.Join("; ", plan.Islands |> Seq.map (fun p -> p.AutogradReason)) + ")"
            else null
        finally plan.Release()

    /// The plan's forward pass gives Forward's output and log-det, and its backward autograd's
    /// gradients of L = sum(w * y) + c * sum(log-det) for random weights w and a random c, for the
    /// input and for every parameter (in training mode: ActNorm initialises first, as Forward would).
    let evaluate (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (b: Bijector) =
        b.train()
        let x = sample spec b (int64 case.Batch) o
        // A first pass initialises data-dependent layers (ActNorm) from the batch.
        using (torch.no_grad()) (fun _ -> b.Forward x |> ignore)
        match refusal b x with
        | null ->
            let xr = x.detach().clone().requires_grad_(true)
            let r = seeded case.Seed (fun () -> b.Forward xr)
            let w, c = seeded (case.Seed + 1) (fun () -> torch.randn_like(r.Value), 0.5 + Random(case.Seed).NextDouble())
            let ps = b.named_parameters() |> Seq.toList
            b.zero_grad()
            let loss = (r.Value * w).sum() +. r.LogDet.sum().mul(scalar c)
            loss.backward()
            let expected = [ for struct (n, p) in ps -> n, (if isNull p.grad then torch.zeros_like(p) else p.grad.clone()) ]
            let expectedInput = xr.grad.clone()
            b.zero_grad()
            let plan = HandGradientPlan.Make(b, x)
            let struct (y, logDet, dx) =
                try
                    use _ = torch.no_grad()
                    let logDet = torch.zeros([| x.shape.[0] |], dtype = x.dtype, device = x.device)
                    let struct (y, tape) = seeded case.Seed (fun () -> plan.Forward(x, logDet))
                    // Copies: the plan's steps keep y and dL/dx in tensors that Release frees.
                    let dx = plan.Backward(tape, w, c, true)
                    struct (y.clone(), logDet, dx.clone())
                finally plan.Release()
            let got = [ for struct (n, p) in ps -> n, (if isNull p.grad then torch.zeros_like(p) else p.grad.clone()) ]
            b.zero_grad()
            let tol = if o.DType = torch.float64 then 1e-9 else 1e-3
            combine
                ([ compare "taped forward" tol y r.Value
                   compare "taped log-det" tol logDet r.LogDet
                   compare "dL/dx" tol dx expectedInput ]
                 @ List.map2 (fun (n, g) (_, e) -> compare ("dL/d" + n) tol g e) got expected)
        | _ -> { Error = 0.0; Passed = true; Detail = "the hand-written backward does not apply to this input" }
