/// The checks on deep flows (the defaults must pass correct ones in float32 and float64) and on
/// given, trained instances (BijectorChecks.RunOn).
module MixerFlow.Properties.DeepFlowTests

open System
open Xunit
open TorchSharp
open MixerFlow.Core
open MixerFlow.Core.Ops
open MixerFlow.Checks
open MixerFlow.Properties

/// `blocks` blocks of ActNorm, AffineCoupling, LULinear and SplineCoupling on vectors [d],
/// d = 4..8, the coupling halves alternating from block to block.
let deepFlow (blocks: int) (r: Random) : Bijector =
    let d = int64 (r.Next(4, 9))
    let halves i = if i % 2 = 0 then Partition.Halves d else (Partition.Halves d).Swapped
    new Chain(
        [ for i in 0 .. blocks - 1 do
            yield new ActNorm([| d |]) :> Bijector
            yield new AffineCoupling([| d |], halves i, Conditioners.Mlp(8L, 1))
            yield LULinear.Vector d
            yield new SplineCoupling([| d |], (halves i).Swapped, Conditioners.Mlp(8L, 1)) ])

let tenBlocks = BijectorSpec("10-block-flow", Func<Random, Bijector>(deepFlow 10))

// The default noise and tolerances; 3 cases instead of 12 keep the 40 layers' checks to seconds.
[<Fact>]
let ``a correct 10-block flow passes every check with the float32 defaults`` () =
    BijectorChecks.AssertAll(tenBlocks, CheckOptions.Float32.WithCases(3))

[<Fact>]
let ``a correct 10-block flow passes every check with the float64 defaults`` () =
    BijectorChecks.AssertAll(tenBlocks, CheckOptions.Float64.WithCases(3))

[<Fact>]
let ``the default noise is sigma over the square root of the number of blocks`` () =
    use _ = torch.NewDisposeScope()
    let flow = deepFlow 10 (Random 0)
    Assert.Equal(40, (PropertyChecks.leafBijectors flow).Length)
    Assert.Equal(0.2 / sqrt 40.0, PropertyChecks.noiseSigma CheckOptions.Float32 flow, 12)
    Assert.Equal(0.2, PropertyChecks.noiseSigma (CheckOptions.Float32.WithParameterNoise(0.2, NoiseScaling.Absolute)) flow)
    // A single bijector gets the full sigma, as before the option existed.
    Assert.Equal(0.2, PropertyChecks.noiseSigma CheckOptions.Float64 (LULinear.Vector 4L))
    Assert.Throws<ArgumentException>(fun () -> CheckOptions.Float64.WithParameterNoise(-1.0) |> ignore) |> ignore

/// A small vector flow trained for a few Adam steps on correlated, shifted Gaussian data, and a
/// factory for untrained instances of the same architecture.
let private trainedFlow () =
    torch.manual_seed(7L) |> ignore
    let d = 4L
    let build () : Bijector =
        new Chain(
            [ new ActNorm([| d |]) :> Bijector
              new AffineCoupling([| d |], Partition.Halves d, Conditioners.Mlp(16L, 2))
              LULinear.Vector d
              new SplineCoupling([| d |], (Partition.Halves d).Swapped, Conditioners.Mlp(16L, 2)) ])
    let flow = build ()
    let mixing = torch.randn(d, d)
    let draw (n: int64) = torch.randn(n, d).matmul(mixing) + scalar 1.5
    let data = draw 512L
    use opt = new Adam(flow.parameters(), 5e-3)
    flow.train()
    for _ in 1 .. 60 do
        use _ = torch.NewDisposeScope()
        opt.ZeroGrad()
        let r = flow.Forward data
        let loss = (standardNormalLogProb r.Value + r.LogDet).mean().neg()
        loss.backward()
        opt.Step()
    flow.eval()
    flow, build, Func<int64, Tensor>(draw)

let private snapshot (b: Bijector) = [ for p in b.parameters() -> p.detach().clone() ]
let private unchanged (before: Tensor list) (b: Bijector) =
    // 28 entries: 3 ActNorm, 9 per coupling (3 index buffers, 3 linear layers), 7 LULinear.
    Assert.Equal(28, b.state_dict().Count)
    let after = [ for p in b.parameters() -> p.detach() ]
    Assert.Equal(before.Length, after.Length)
    for x, y in List.zip before after do
        Assert.Equal(x.dtype, y.dtype)
        Assert.True(x.eq(y).all().item<bool>(), "RunOn changed a parameter")

[<Fact>]
let ``RunOn checks a trained flow as it is, and leaves it as it was`` () =
    let flow, _, draw = trainedFlow ()
    let before = snapshot flow
    let results = BijectorChecks.RunOn(flow, CheckOptions.Float32.WithCases(4), draw)
    for r in results do
        if r.Applicable then Assert.True(r.Passed, sprintf "(%c) %A: %s" r.Letter r.Check r.Message)
    let saveLoad = results |> Seq.find (fun r -> r.Check = CheckKind.SaveLoad)
    Assert.False(saveLoad.Applicable)
    Assert.Contains("factory", saveLoad.Message)
    Assert.True((results |> Seq.find (fun r -> r.Check = CheckKind.Structure)).Applicable |> not, "a Chain declares no structure")
    unchanged before flow
    Assert.False(flow.training)

[<Fact>]
let ``RunOn in float64 with a factory runs the Jacobian and save and load checks, and converts back`` () =
    let flow, build, _ = trainedFlow ()
    let before = snapshot flow
    let results = BijectorChecks.RunOn(flow, CheckOptions.Float64.WithCases(4), freshInstance = Func<Bijector>(build))
    for kind in [ CheckKind.Inverse; CheckKind.LogDet; CheckKind.InverseLogDet; CheckKind.Chain; CheckKind.Independence; CheckKind.Gradients; CheckKind.SaveLoad ] do
        let r = results |> Seq.find (fun r -> r.Check = kind)
        Assert.True(r.Applicable, sprintf "%A: %s" kind r.Message)
        Assert.True(r.Passed, sprintf "%A: %s" kind r.Message)
    unchanged before flow

[<Fact>]
let ``RunOn rejects a broken instance with a shrunk counterexample`` () =
    let offset = new Broken.FaultyAffine(3L, "offset")
    let r = BijectorChecks.RunOn(offset, CheckOptions.Float64.WithCases(5)) |> Seq.find (fun r -> r.Check = CheckKind.LogDet)
    Assert.False(r.Passed)
    Assert.Contains("Falsifiable", r.Message)
    Assert.Contains("seed=", r.Message)
    let sloppy = new Broken.FaultyAffine(3L, "sloppy-inverse")
    let e = Assert.ThrowsAny<exn>(fun () -> BijectorChecks.AssertOn(sloppy, CheckOptions.Float64.WithCases(5)))
    Assert.Contains("Inverse", e.Message)

/// Glow's invertible 1x1 convolution inverts with W^-1 solved once (c x c) and one product: its
/// inverse is contiguous NCHW (solves on the batch left it column-major, a channels-last image whose
/// convolutions took LibTorch's slower path), W W^-1 = I, and the round trip returns the input,
/// at random parameters.
[<FsCheck.Xunit.Property(MaxTest = 25, Replay = "(424242,171717)")>]
let ``Conv1x1's inverse is W^-1 as one contiguous product`` (c: FsCheck.PositiveInt) (h: FsCheck.PositiveInt) (w: FsCheck.PositiveInt) (seed: int) =
    let c, h, w = int64 (min c.Get 12), int64 (min h.Get 5), int64 (min w.Get 5)
    torch.manual_seed(int64 seed) |> ignore
    use m = (LULinear.Conv1x1(c, h, w)).``to``(torch.ScalarType.Float64)
    using (torch.no_grad()) (fun _ ->
        for p in m.parameters() do p.add_(torch.randn_like(p).mul(scalar 0.3)) |> ignore)
    let x = torch.randn([| 3L; c; h; w |], dtype = torch.ScalarType.Float64)
    let y = m.Forward(x).Value
    let back = m.Inverse(y).Value
    let identity = m.Weight.matmul(m.InverseWeight)
    let eyeError = (identity - torch.eye(c, dtype = torch.ScalarType.Float64)).abs().max().item<float>()
    let roundTrip = (back - x).abs().max().item<float>()
    (back.is_contiguous() && eyeError < 1e-9 && roundTrip < 1e-9)
    |> FsCheck.FSharp.Prop.label (sprintf "c=%d h=%d w=%d: contiguous %b, |W W^-1 - I| %g, round trip %g" c h w (back.is_contiguous()) eyeError roundTrip)
