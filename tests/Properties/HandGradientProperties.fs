/// The hand-written gradient plans (HandGradientPlan: per-type rules, autograd islands) against
/// autograd, on MixerFlow's own structure at random parameters: the check (j) in every case, and the
/// flow-level driver (HandGradient.Forward and Backward) against the flow's LogProb and autograd's
/// gradients, also with a part that no rule takes.
module MixerFlow.Properties.HandGradientProperties

open System
open Xunit
open TorchSharp
open MixerFlow.Core
open MixerFlow.Core.Ops
open MixerFlow.Checks

/// MixerFlow's structure from Core parts, with shapes drawn from r: a logit, then `layers` layers
/// of patchify, row-wise couplings, ActNorm, column-wise couplings, ActNorm, unpatchify and a shift.
let mixerFlow (layers: int) (r: Random) : Bijector =
    let c = int64 (r.Next(1, 3))
    let size = 2L
    let h, w = size * int64 (r.Next(2, 4)), size * int64 (r.Next(2, 4))
    let image = [| c; h; w |]
    let geometry = PatchGeometry(image, PatchStrategy.Square, size)
    let p, d = geometry.Patches, geometry.Features
    let vector (n: int64) =
        let mlp = Conditioners.Mlp(int64 (r.Next(4, 9)), r.Next(1, 3))
        new Chain([ new Coupling([| n |], Partition.Halves n, mlp, Affine()) :> Bijector
                    new Coupling([| n |], (Partition.Halves n).Swapped, mlp, Affine()) ]) :> Bijector
    new Chain(
        [ yield new Logit(image) :> Bijector
          for l in 0 .. layers - 1 do
              yield new Patchify(geometry)
              yield new RowWise(p, vector d)
              yield new ActNorm([| p; d |])
              yield new ColumnWise(d, vector p)
              yield new ActNorm([| p; d |])
              yield new Inverted(new Patchify(geometry))
              let struct (dy, dx) = geometry.ShiftAfter l
              yield new Shift(image, dy, dx) ])

/// n images of a structure's input shape with pixels in (0.05, 0.95), inside the logit's domain.
let private pixels (n: int64) (shape: int64[]) =
    torch.rand(batchShape n shape).mul_(scalar 0.9).add_(scalar 0.05, Scalars.One)

let private unitInterval = Func<Bijector, int64, Tensor>(fun b n -> pixels n b.InputShape)
let private spec = BijectorSpec("mixerflow-structure", Func<Random, Bijector>(mixerFlow 2), unitInterval)

[<Theory>]
[<InlineData("float64")>]
[<InlineData("float32")>]
let ``MixerFlow's structure: the taped pass and hand gradients equal autograd's at random parameters`` (dtype: string) =
    let o = (if dtype = "float64" then CheckOptions.Float64 else CheckOptions.Float32).WithCases(6)
    let r = PropertyChecks.run spec CheckKind.HandGradient o
    Assert.True(r.Applicable)
    Assert.True(r.Passed, r.Message)
    // The comparison ran (it did not fall back to "does not apply").
    Assert.True(r.WorstError > 0.0, "nothing was compared: " + r.Message)

/// The plan's islands: each part's name and the reason.
let private islands (b: Bijector) (x: Tensor) =
    let plan = HandGradientPlan.Make(b, x)
    try [ for p in plan.Islands -> p.Part, p.AutogradReason ] finally plan.Release()

[<Fact>]
let ``a rule runs every part of MixerFlow's structure; an additive coupling, a sigmoid bound, alternating halves or a frozen parameter run as autograd islands, with the reason`` () =
    use _ = torch.NewDisposeScope()
    let flow = mixerFlow 2 (Random 3)
    let x = torch.rand(batchShape 2L flow.InputShape)
    Assert.Empty(islands flow x)
    let v = torch.randn(2L, 4L)
    let additive = new AdditiveCoupling([| 4L |], Partition.Halves 4L, Conditioners.Mlp(8L, 1))
    let part, reason = List.exactlyOne (islands additive v)
    Assert.Equal(additive.Name, part)
    Assert.Contains("its map is Additive, not the affine or the rational-quadratic spline one", reason)
    // A spline coupling runs by hand; with alternating halves it does not.
    Assert.Empty(islands (new SplineCoupling([| 4L |], Partition.Halves 4L, Conditioners.Mlp(8L, 1))) v)
    Assert.Contains("consecutive", snd (List.exactlyOne (islands (new SplineCoupling([| 4L |], Partition.Alternating 4L, Conditioners.Mlp(8L, 1))) v)))
    let sigmoid = new AffineCoupling([| 4L |], Partition.Halves 4L, Conditioners.Mlp(8L, 1), ScaleBound.Sigmoid)
    Assert.Contains("sigmoid", snd (List.exactlyOne (islands sigmoid v)))
    let alternating = new AffineCoupling([| 4L |], Partition.Alternating 4L, Conditioners.Mlp(8L, 1))
    Assert.Contains("consecutive", snd (List.exactlyOne (islands alternating v)))
    // A frozen parameter (autograd gives it no gradient) sends its part to an island.
    let frozen = flow.parameters() |> Seq.head
    frozen.requires_grad <- false
    Assert.Contains("frozen", snd (List.exactlyOne (islands flow x)))
    frozen.requires_grad <- true
    Assert.Empty(islands flow x)

/// How far the hand-written pass is from autograd at the flow's current parameters.
type private HandErrors =
    { /// The largest |log p - LogProb| over the batch.
      LogProb: float
      /// The same relative to 1 + max |LogProb|.
      RelativeLogProb: float
      /// The largest relative difference of a parameter's gradient of the mean bits per dimension.
      Gradient: float }

/// Autograd's gradients of the mean bits per dimension and the hand-written ones, at the flow's
/// current parameters; the pass (spent) and the errors.
let private handAgainstAutograd (flow: Flow) (body: Bijector) (x: Tensor) =
    let dims = float (Array.fold (*) 1L body.InputShape)
    let b = float x.shape.[0]
    flow.zero_grad()
    flow.LogProb(x).neg().div(scalar (dims * Math.Log 2.0)).mean().backward()
    let expected = [ for p in flow.parameters() -> p.grad.clone() ]
    flow.zero_grad()
    let pass = HandGradient.Forward(flow, x)
    let reference = flow.LogProb(x).detach()
    let logProbError = (pass.LogProb - reference).abs().max().item<float>()
    pass.Backward(-1.0 / (b * dims * Math.Log 2.0))
    let got = [ for p in flow.parameters() -> p.grad.clone() ]
    Assert.True(expected |> List.exists (fun g -> g.abs().max().item<float>() > 1e-6), "autograd's gradients are all zero")
    let gradientError =
        List.zip expected got
        |> List.map (fun (e, g) -> (g - e).abs().max().item<float>() / (1.0 + e.abs().max().item<float>()))
        |> List.max
    pass,
    { LogProb = logProbError
      RelativeLogProb = logProbError / (1.0 + reference.abs().max().item<float>())
      Gradient = gradientError }

/// A float64 MixerFlow structure in training mode, initialised (ActNorm) from a batch of 4 and
/// moved away from the identity the couplings start at; that batch, and a function that moves
/// the parameters again.
let private trainedFlow (seed: int) =
    let body = mixerFlow 2 (Random seed)
    let flow = new Flow(body)
    flow.train()
    let x = pixels 4L body.InputShape
    body.Forward x |> ignore
    let move () = using (torch.no_grad()) (fun _ -> for p in flow.parameters() do p.add_(torch.randn_like(p).mul_(scalar 0.3), Scalars.One) |> ignore)
    move ()
    flow, body, x, move

let private inFloat64 (f: unit -> unit) =
    let saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try f () finally torch.set_default_dtype(saved)

[<Fact>]
let ``HandGradient on a flow: log p equals LogProb and the gradients equal autograd's of the mean bits per dimension`` () =
    use _ = torch.NewDisposeScope()
    torch.manual_seed(11L) |> ignore
    inFloat64 (fun () ->
        let flow, body, x, _ = trainedFlow 5
        Assert.True(HandGradient.Supports(flow, x))
        let _, err = handAgainstAutograd flow body x
        Assert.True(err.LogProb < 1e-9, "log p differs from LogProb")
        Assert.True(err.Gradient < 1e-9, sprintf "gradient differs by %g" err.Gradient))

[<Fact>]
let ``HandGradient leaves a flow whose parameters lie mostly in parts without a rule to autograd, and says which`` () =
    use _ = torch.NewDisposeScope()
    let flow = new Flow(new Chain([ new ActNorm([| 4L |]) :> Bijector; LULinear.Vector 4L ]))
    let x = torch.randn(3L, 4L)
    flow.train()
    flow.LogProb(x) |> ignore
    Assert.False(HandGradient.Supports(flow, x))
    let e = Assert.Throws<ArgumentException>(fun () -> HandGradient.Forward(flow, x) |> ignore)
    Assert.Contains("no hand-written rule for LULinear", e.Message)
    Assert.Contains("most parameters", HandGradient.WhyNot(flow, x))

[<Fact>]
let ``consecutive hand-written passes reuse the couplings' tensors and stay exact: new parameters each pass, a batch of another size between`` () =
    use _ = torch.NewDisposeScope()
    torch.manual_seed(21L) |> ignore
    inFloat64 (fun () ->
        let flow, body, _, move = trainedFlow 8
        for n in [ 4L; 4L; 3L; 4L; 4L ] do
            let _, err = handAgainstAutograd flow body (pixels n body.InputShape)
            let worst = max err.RelativeLogProb err.Gradient
            Assert.True(worst < 1e-9, sprintf "batch of %d: hand-written results differ from autograd's by %g" n worst)
            move ())

[<Fact>]
let ``a hand-written pass runs its backward once, before the next pass; Release frees the kept tensors and the next pass is exact again`` () =
    use _ = torch.NewDisposeScope()
    torch.manual_seed(22L) |> ignore
    inFloat64 (fun () ->
        let flow, body, _, _ = trainedFlow 9
        let x = pixels 3L body.InputShape
        let pass, err = handAgainstAutograd flow body x
        let worst = max err.RelativeLogProb err.Gradient
        Assert.True(worst < 1e-9, sprintf "differs by %g" worst)
        let again = Assert.Throws<InvalidOperationException>(fun () -> pass.Backward(-1.0))
        Assert.Contains("tape is spent", again.Message)
        // A backward after the next forward pass would read that pass's activations: refused.
        let first = HandGradient.Forward(flow, x)
        let second = HandGradient.Forward(flow, x)
        Assert.Throws<InvalidOperationException>(fun () -> first.Backward(-1.0)) |> ignore
        second.Backward(-1.0)
        // Release: the pass before it cannot run its backward; a new one is exact.
        let before = HandGradient.Forward(flow, x)
        HandGradient.Release flow
        Assert.Throws<InvalidOperationException>(fun () -> before.Backward(-1.0)) |> ignore
        let _, err = handAgainstAutograd flow body x
        let worst = max err.RelativeLogProb err.Gradient
        Assert.True(worst < 1e-9, sprintf "after Release: differs by %g" worst))
