/// The hand-written spline coupling step (Training/SplineStep.fs) against autograd on Spline.fs:
/// forward, log-det and every gradient at random parameters, in float64 and float32, with inputs
/// inside the interval and in both tails; every group of the spline's parameters (widths, heights,
/// inner derivatives) and every conditioner weight gets a nonzero gradient equal to autograd's
/// (an earlier version trained no derivative at the knots), and a gradient with the derivatives'
/// part zeroed is caught.
module MixerFlow.Properties.SplineHandGradientTests

open System
open Xunit
open TorchSharp
open MixerFlow.Core
open MixerFlow.Core.Ops
open MixerFlow.Checks

let private between (r: Random) lo hi = int64 (r.Next(lo, hi + 1))

/// Spline couplings with halves (either way round, odd sizes too; 8 or 16 values, whose halves
/// fill whole vectors of the fused CPU loops), a perceptron of 1 or 2 hidden layers, 2 to 8 bins on
/// [-B, B] with B in 1..3.
let private splineCoupling (r: Random) : Bijector =
    let d = if r.Next 2 = 0 then between r 2 7 else 8L * between r 1 2
    let partition = if r.Next 2 = 0 then Partition.Halves d else (Partition.Halves d).Swapped
    new Coupling([| d |], partition, Conditioners.Mlp(between r 4 10, r.Next(1, 3)), RationalQuadratic(r.Next(2, 9), float (between r 1 3))) :> Bijector

/// Wider than the interval: both tails are exercised.
let private wide = Func<Bijector, int64, Tensor>(fun b n -> torch.randn(batchShape n b.InputShape) * scalar 2.5)
let private spec = BijectorSpec("spline-coupling-by-hand", Func<Random, Bijector>(splineCoupling), wide)

/// Runs f with the fused CPU loops on or off (tensor operations, as on other devices).
let private withKernels (fused: bool) (f: unit -> unit) =
    let saved = HandKernels.Enabled
    HandKernels.Enabled <- fused
    try f () finally HandKernels.Enabled <- saved

[<Theory>]
[<InlineData("float64", true)>]
[<InlineData("float32", true)>]
[<InlineData("float64", false)>]
[<InlineData("float32", false)>]
let ``spline couplings by hand: the taped pass and every gradient equal autograd's at random parameters`` (dtype: string, fused: bool) =
    withKernels fused (fun () ->
        let o = (if dtype = "float64" then CheckOptions.Float64 else CheckOptions.Float32).WithCases(8).WithParameterNoise(0.5)
        let r = PropertyChecks.run spec CheckKind.HandGradient o
        Assert.True(r.Applicable, r.Message)
        Assert.True(r.Passed, r.Message)
        Assert.True(r.WorstError > 0.0, "nothing was compared: " + r.Message))

/// Transformed values of randomCoupling's layers: 8, whole vectors of the fused CPU loops.
let private half = 8L

/// A float64 spline coupling with random parameters (the conditioner's last layer is zero at
/// initialisation: the identity), and a batch that reaches every bin and both tails.
let private randomCoupling (seed: int64) (bins: int) =
    torch.manual_seed seed |> ignore
    let d = 2L * half
    let c = new Coupling([| d |], Partition.Halves d, Conditioners.Mlp(12L, 1), RationalQuadratic(bins, 2.0))
    moveTo torch.float64 (torch.Device "cpu") c
    using (torch.no_grad()) (fun _ ->
        for p in c.parameters() do p.add_(torch.randn_like(p), scalar 0.7) |> ignore)
    let x = torch.randn([| 256L; d |], dtype = torch.float64) * scalar 1.5
    c, x

/// Each parameter's gradient of L = sum(w y) + c sum(log-det): autograd's, and the plan's.
let private gradients (c: Coupling) (x: Tensor) =
    let w = torch.randn([| x.shape.[0]; x.shape.[1] |], dtype = torch.float64)
    let weight = 0.75
    c.zero_grad()
    let r = c.Forward x
    ((r.Value * w).sum() +. r.LogDet.sum().mul(scalar weight)).backward()
    let expected = [ for struct (n, p) in c.named_parameters() -> n, p.grad.clone() ]
    c.zero_grad()
    let plan = HandGradientPlan.Make(c, x)
    try
        Assert.Empty(plan.Islands)
        Assert.Equal("spline coupling", plan.Parts.[0].Rule)
        use _ = torch.no_grad()
        let logDet = torch.zeros([| x.shape.[0] |], dtype = torch.float64)
        let struct (_, tape) = plan.Forward(x, logDet)
        plan.Backward(tape, w, weight, false) |> ignore
    finally plan.Release()
    let got = [ for struct (n, p) in c.named_parameters() -> n, p.grad.clone() ]
    expected, got

/// What is wrong with the hand-written gradients (null: nothing): for every parameter, and for
/// the last layer's rows of widths, heights and derivatives apart, a nonzero gradient equal to
/// autograd's (relative 1e-9).
let private problems (bins: int) (nB: int64) (expected: (string * Tensor) list) (got: (string * Tensor) list) : string =
    let k = int64 bins
    let groups (name: string) (g: Tensor) =
        if name.EndsWith "weight" && g.shape.[0] = (3L * k - 1L) * nB || name.EndsWith "bias" && g.shape.[0] = (3L * k - 1L) * nB then
            [ name + " (widths)", g.narrow(0L, 0L, k * nB)
              name + " (heights)", g.narrow(0L, k * nB, k * nB)
              name + " (derivatives)", g.narrow(0L, 2L * k * nB, (k - 1L) * nB) ]
        else [ name, g ]
    let found =
        [ for (name, e), (_, g) in List.zip expected got do
            for (label, ge), (_, gg) in List.zip (groups name e) (groups name g) do
                let scale = ge.abs().max().item<float>()
                let err = (gg - ge).abs().max().item<float>() / (1.0 + scale)
                if scale < 1e-6 then yield sprintf "%s: autograd's gradient is zero" label
                elif gg.abs().max().item<float>() < 1e-6 then yield sprintf "%s: the hand-written gradient is zero" label
                elif err > 1e-9 then yield sprintf "%s: differs from autograd's by %g" label err ]
    if found.IsEmpty then null else String.Join("; ", found)

[<Theory>]
[<InlineData(2, true)>]
[<InlineData(5, true)>]
[<InlineData(8, true)>]
[<InlineData(2, false)>]
[<InlineData(5, false)>]
[<InlineData(8, false)>]
let ``every spline parameter (widths, heights, derivatives at the knots, conditioner weights) gets a nonzero gradient equal to autograd's`` (bins: int, fused: bool) =
    use _ = torch.NewDisposeScope()
    withKernels fused (fun () ->
        let c, x = randomCoupling (int64 (40 + bins)) bins
        let expected, got = gradients c x
        Assert.Equal(4, expected.Length)
        let problem = problems bins half expected got
        Assert.True(isNull problem, problem))

[<Fact>]
let ``a spline gradient whose knot derivatives never train is caught`` () =
    use _ = torch.NewDisposeScope()
    let bins = 6
    let c, x = randomCoupling 47L bins
    let expected, got = gradients c x
    // The earlier fault: no gradient reaches the inner derivatives (the last layer's rows after
    // the widths and heights).
    let broken =
        got |> List.map (fun (n, g) ->
            let g = g.clone()
            if g.shape.[0] = (3L * int64 bins - 1L) * half then g.narrow(0L, 2L * int64 bins * half, (int64 bins - 1L) * half).zero_() |> ignore
            n, g)
    let problem = problems bins half expected broken
    Assert.False(isNull problem, "the zeroed derivatives' gradient was not caught")
    Assert.Contains("(derivatives): the hand-written gradient is zero", problem)
    Assert.DoesNotContain("(widths)", problem)
    Assert.True(isNull (problems bins half expected got))
