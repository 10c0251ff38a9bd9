namespace MixerFlow.Checks

open System
open System.IO
open System.Runtime.InteropServices
open TorchSharp
open FsCheck
open FsCheck.FSharp
open MixerFlow.Core
open MixerFlow.Core.Ops
open MixerFlow.Checks.Format

/// The evaluations behind the checks, one case each (PropertyChecks runs them as properties).
module internal CheckEvaluations =
    let private shape (t: Tensor) = showShape t.shape

    /// Worst relative error (unit floor) between two tensors, with where it is.
    let internal compare (label: string) (tol: float) (got: Tensor) (expected: Tensor) : Evaluation =
        use _ = torch.NewDisposeScope()
        let g = got.detach().to_type(torch.float64).cpu()
        let e = expected.detach().to_type(torch.float64).cpu()
        if g.shape <> e.shape then
            { Error = infinity; Passed = false; Detail = sprintf "%s: shape %s, expected %s" label (shape g) (shape e) }
        else
            let err = (g - e).abs() / (addScalar (e.abs()) 1.0)
            let err = torch.where(g.isfinite().logical_and(e.isfinite()), err, torch.full_like(err, scalar infinity))
            let flat = err.reshape(-1L)
            if flat.numel() = 0L then { Error = 0.0; Passed = true; Detail = label + ": empty" } else
            let i = flat.argmax().item<int64>()
            let worst = flat.[i].item<float>()
            let per = if g.dim() <= 1L then 1L else g.numel() / g.shape.[0]
            let gv = g.reshape(-1L).[i].item<float>()
            let ev = e.reshape(-1L).[i].item<float>()
            let ok = worst <= tol
            { Error = worst
              Passed = ok
              Detail =
                sprintf "%s: worst at sample %d, element %d: got %.17g, expected %.17g, error %.3g (tolerance %.1g)"
                    label (i / per) (i % per) gv ev worst tol }

    let internal combine (evals: Evaluation list) =
        match evals with
        | [] -> { Error = 0.0; Passed = true; Detail = "nothing to compare" }
        | _ ->
            let worst = evals |> List.maxBy (fun e -> e.Error)
            let failed = evals |> List.filter (fun e -> not e.Passed)
            { Error = worst.Error
              Passed = failed.IsEmpty
              Detail = (if failed.IsEmpty then [ worst ] else failed) |> List.map (fun e -> e.Detail) |> String.concat "; " }

    let internal fail detail = { Error = infinity; Passed = false; Detail = detail }
    let internal finite (label: string) (t: Tensor) =
        let bad = t.isfinite().logical_not().sum().item<int64>()
        if bad = 0L then { Error = 0.0; Passed = true; Detail = label + ": finite" }
        else fail (sprintf "%s: %d non-finite values (shape %s)" label bad (shape t))

    /// Runs `f` with the torch generator seeded, so that stochastic bijectors (dequantisation)
    /// draw the same noise in calls that are compared.
    let internal seeded (seed: int) (f: unit -> 'a) =
        torch.manual_seed(int64 seed) |> ignore
        f ()

    let internal sample (spec: BijectorSpec) (b: Bijector) (n: int64) (o: CheckOptions) =
        spec.SampleInput.Invoke(b, n).to_type(o.DType).``to``(o.Device)

    let rec private bijectorsBelow (m: torch.nn.Module) : Bijector list =
        [ for c in m.children() do
            match c with
            | :? Bijector as b -> yield b
            | other -> yield! bijectorsBelow other ]

    /// `b` and every bijector inside it (parts of chains, inner bijectors of wrappers), outermost first.
    let rec allBijectors (b: Bijector) : Bijector list = b :: (bijectorsBelow b |> List.collect allBijectors)

    /// The leaf bijectors of `b` (those that hold no other bijector): the flow's depth in blocks.
    let rec leafBijectors (b: Bijector) : Bijector list =
        match bijectorsBelow b with
        | [] -> [ b ]
        | inner -> inner |> List.collect leafBijectors

    /// The standard deviation of the parameter noise for `b` under `o` (see NoiseScaling).
    let noiseSigma (o: CheckOptions) (b: Bijector) =
        match o.NoiseScaling with
        | NoiseScaling.PerBlock -> o.ParameterNoise / sqrt (float (leafBijectors b).Length)
        | _ -> o.ParameterNoise

    let private perturb (sigma: float) (b: torch.nn.Module) =
        if sigma > 0.0 then
            using (torch.no_grad()) (fun _ ->
                for p in b.parameters() do p.add_(torch.randn_like(p), scalar sigma) |> ignore)

    /// Builds the case's bijector with randomised parameters: a few training-mode passes
    /// (data-dependent initialisation of ActNorm, running statistics of batch norm), then
    /// Gaussian noise on every parameter (o.ParameterNoise, scaled by o.NoiseScaling); left in
    /// evaluation mode.
    let instantiate (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (initSeed: int) : Bijector =
        torch.manual_seed(int64 initSeed) |> ignore
        let b = spec.Build.Invoke(Random(case.Seed))
        moveTo o.DType o.Device b
        torch.manual_seed(int64 (initSeed + 1)) |> ignore
        b.train()
        using (torch.no_grad()) (fun _ ->
            for _ in 1 .. 3 do b.Forward(sample spec b 16L o) |> ignore)
        perturb (noiseSigma o b) b
        b.eval()
        b

    let internal roundTrip (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (b: Bijector) =
        use _ = torch.no_grad()
        let tol = Tolerances.roundTrip o.DType
        let x = sample spec b (int64 case.Batch) o
        let back = b.Inverse((b.Forward x).Value).Value
        let first = compare "inverse(forward(x)) vs x" tol back x
        if b.Traits.Surjective then first
        else
            let y = (b.Forward(sample spec b (int64 case.Batch) o)).Value
            combine [ first; compare "forward(inverse(y)) vs y" tol (b.Forward((b.Inverse y).Value).Value) y ]

    /// The full Jacobian d out / d inp per sample, [B, n, n], one output element at a time.
    /// Valid when samples are independent (check (f)).
    let jacobian (f: Tensor -> Tensor) (inp: Tensor) =
        let x = inp.detach().clone().requires_grad_(true)
        let out = (f x).flatten(1L)
        let n = out.shape.[1]
        let rows =
            [| for j in 0L .. n - 1L ->
                let g = torch.autograd.grad([| out.select(1L, j).sum() |], [| x |], retain_graph = true, allow_unused = true)
                if isNull g.[0] then torch.zeros_like(x).flatten(1L) else g.[0].flatten(1L) |]
        torch.stack(rows, 1L)

    let internal logDet (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (b: Bijector) =
        let x = sample spec b (int64 case.Batch) o
        let fwdJ = jacobian (fun x -> (b.Forward x).Value) x
        let _, fwdRef = torch.linalg.slogdet(fwdJ).ToTuple()
        let fwd = using (torch.no_grad()) (fun _ -> b.Forward x)
        let forwardEval = compare "forward log-det vs log|det J|" Tolerances.jacobian fwd.LogDet fwdRef
        if b.Traits.Surjective then forwardEval
        else
            let y = fwd.Value.detach()
            let invJ = jacobian (fun y -> (b.Inverse y).Value) y
            let _, invRef = torch.linalg.slogdet(invJ).ToTuple()
            let inv = using (torch.no_grad()) (fun _ -> b.Inverse y)
            combine [ forwardEval; compare "inverse log-det vs log|det J_inv|" Tolerances.jacobian inv.LogDet invRef ]

    let internal inverseLogDet (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (b: Bijector) =
        use _ = torch.no_grad()
        let x = sample spec b (int64 case.Batch) o
        let fwd = b.Forward x
        let inv = b.Inverse fwd.Value
        compare "inverse log-det at f(x) vs -forward log-det at x" (Tolerances.logDet o.DType) inv.LogDet (fwd.LogDet.neg())

    let internal chain (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (b: Bijector) =
        use _ = torch.no_grad()
        let tol = Tolerances.logDet o.DType
        let x = sample spec b (int64 case.Batch) o
        // A randomised ActNorm after the bijector, initialised on its outputs.
        let tail = new ActNorm(b.OutputShape)
        moveTo o.DType o.Device tail
        tail.InitializeFrom((b.Forward x).Value)
        // As much noise as one of the bijector's own blocks gets.
        perturb (noiseSigma o b) tail
        let c = new Chain([ new Delegating(b) :> Bijector; tail ])
        c.eval()
        let whole = seeded case.Seed (fun () -> c.Forward x)
        let first = seeded case.Seed (fun () -> b.Forward x)
        let second = tail.Forward first.Value
        let y = whole.Value
        let cInv = c.Inverse y
        let tInv = tail.Inverse y
        let bInv = b.Inverse tInv.Value
        let viaInverted = (new Inverted(c)).Forward y
        combine
            [ compare "chain output vs parts applied in turn" tol whole.Value second.Value
              compare "chain log-det vs sum of parts" tol whole.LogDet (first.LogDet +. second.LogDet)
              compare "chain inverse vs reversed inverses" tol cInv.Value bInv.Value
              compare "chain inverse log-det vs sum of parts" tol cInv.LogDet (tInv.LogDet +. bInv.LogDet)
              compare "Inverted(chain).Forward vs chain.Inverse" 0.0 viaInverted.Value cInv.Value ]

    let internal edges (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (b: Bijector) =
        use _ = torch.no_grad()
        let tol = Tolerances.roundTrip o.DType
        let onInputs =
            if isNull (box spec.EdgeInputs) then []
            else
                let x = spec.EdgeInputs.Invoke(b).to_type(o.DType).``to``(o.Device)
                let fwd = b.Forward x
                let back = b.Inverse fwd.Value
                [ finite "forward at edge inputs" fwd.Value
                  finite "forward log-det at edge inputs" fwd.LogDet
                  finite "inverse of edge outputs" back.Value
                  compare "inverse(forward(edge x)) vs edge x" tol back.Value x ]
        let onOutputs =
            if isNull (box spec.EdgeOutputs) then []
            else
                let y = spec.EdgeOutputs.Invoke(b).to_type(o.DType).``to``(o.Device)
                let inv = b.Inverse y
                [ finite "inverse at edge outputs" inv.Value
                  finite "inverse log-det at edge outputs" inv.LogDet ]
        combine (onInputs @ onOutputs)

    let internal independence (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (b: Bijector) =
        use _ = torch.no_grad()
        let tol = Tolerances.independence o.DType
        let n = int64 case.Batch
        // `replacement` is a fresh sample in f's domain that takes sample 0's place.
        let check (label: string) (f: Tensor -> Transformed) (x: Tensor) (replacement: Tensor) (alone: bool) =
            let r = seeded case.Seed (fun () -> f x)
            let x2 = x.clone()
            x2.[0L] <- replacement.[0L]
            let r2 = seeded case.Seed (fun () -> f x2)
            let rest (t: Tensor) = t.narrow(0L, 1L, n - 1L)
            let changed =
                [ compare (label + ": other samples' outputs after changing sample 0") tol (rest r2.Value) (rest r.Value)
                  compare (label + ": other samples' log-dets after changing sample 0") tol (rest r2.LogDet) (rest r.LogDet) ]
            let single =
                if not alone then []
                else
                    [ for i in 0L .. n - 1L do
                        let ri = f (x.narrow(0L, i, 1L))
                        yield compare (sprintf "%s: sample %d alone vs in the batch" label i) tol ri.Value (r.Value.narrow(0L, i, 1L))
                        yield compare (sprintf "%s: log-det of sample %d alone vs in the batch" label i) tol ri.LogDet (r.LogDet.narrow(0L, i, 1L)) ]
            changed @ single
        let x = sample spec b n o
        let surj = b.Traits.Surjective
        // Dequantisation noise is drawn for the whole batch, so "alone" is not comparable.
        let fwd = check "forward" b.Forward x (sample spec b 1L o) (not surj)
        let inv =
            if surj then []
            else check "inverse" b.Inverse ((b.Forward x).Value) ((b.Forward(sample spec b 1L o)).Value) true
        combine (fwd @ inv)

    let internal structure (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (b: Bijector) =
        match box b with
        | :? IJacobianStructure as s ->
            let expected = s.ExpectedJacobian()
            let x = sample spec b (int64 case.Batch) o
            let j = (jacobian (fun x -> (b.Forward x).Value) x).to_type(torch.float64).cpu()
            let m = torch.tensor(expected, dtype = torch.float64)
            let pinned = m.isnan().logical_not()
            let diff = torch.where(pinned, (j - m).abs(), torch.zeros_like(j))
            let flat = diff.reshape(-1L)
            let i = flat.argmax().item<int64>()
            let worst = flat.[i].item<float>()
            let n = int64 (Array2D.length1 expected)
            let within = i % (n * n)
            { Error = worst
              Passed = worst <= Tolerances.structure
              Detail =
                sprintf "Jacobian structure (%s): worst at sample %d, entry (%d, %d): got %.17g, expected %g"
                    s.StructureDescription (i / (n * n)) (within / n) (within % n)
                    (j.reshape(-1L).[i].item<float>()) (m.reshape(-1L).[within].item<float>()) }
        | _ -> { Error = 0.0; Passed = true; Detail = "no structure declared" }

    let internal gradients (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (b: Bijector) =
        b.train()
        // A larger batch than the other checks, so that every region (spline bins as well as
        // tails) is visited and every parameter has a chance to matter.
        let x = sample spec b 32L o
        let r = b.Forward x
        let nll = (standardNormalLogProb r.Value +. r.LogDet).mean().neg()
        let ps = b.named_parameters() |> Seq.toList
        if ps.IsEmpty then { Error = 0.0; Passed = true; Detail = "no learnable parameters" }
        else
            nll.backward()
            let missing =
                [ for struct (name, p) in ps do
                    let g = p.grad
                    if isNull g || g.abs().sum().to_type(torch.float64).item<float>() = 0.0 || not (g.isfinite().all().item<bool>()) then yield name ]
            b.zero_grad()
            if missing.IsEmpty then { Error = 0.0; Passed = true; Detail = sprintf "%d parameters receive finite, non-zero gradients" ps.Length }
            else fail (sprintf "parameters without a (finite, non-zero) gradient: %s" (String.Join(", ", missing)))

    let internal saveLoad (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (b: Bijector) =
        let path = Path.Combine(Path.GetTempPath(), sprintf "mixerflow-check-%s.dat" (Guid.NewGuid().ToString("N")))
        try
            b.save(path) |> ignore
            // A fresh instance of the same shapes, initialised from another seed, then loaded.
            torch.manual_seed(int64 (case.Seed + 7919)) |> ignore
            let fresh = spec.Build.Invoke(Random(case.Seed))
            moveTo o.DType o.Device fresh
            fresh.load(path) |> ignore
            fresh.eval()
            use _ = torch.no_grad()
            let x = sample spec b (int64 case.Batch) o
            let r1 = seeded case.Seed (fun () -> b.Forward x)
            let r2 = seeded case.Seed (fun () -> fresh.Forward x)
            let i1 = b.Inverse r1.Value
            let i2 = fresh.Inverse r1.Value
            let state (m: torch.nn.Module) =
                [ for struct (n, t) in m.named_buffers() -> n, t ] @ [ for struct (n, t) in m.named_parameters() -> n, (t :> Tensor) ]
            let stateEvals =
                List.zip (state b) (state fresh)
                |> List.map (fun ((n1, t1), (_, t2)) -> compare ("loaded " + n1) Tolerances.saveLoad (t2.to_type(torch.float64)) (t1.to_type(torch.float64)))
            combine
                ([ compare "forward after load" Tolerances.saveLoad r2.Value r1.Value
                   compare "forward log-det after load" Tolerances.saveLoad r2.LogDet r1.LogDet
                   compare "inverse after load" Tolerances.saveLoad i2.Value i1.Value ] @ stateEvals)
        finally
            if File.Exists path then File.Delete path
