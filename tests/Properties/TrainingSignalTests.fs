/// Whether training can move what it should: every elementwise helper's autograd derivative
/// against central differences (at 0, at clamp and tail boundaries, on knots, at random points),
/// spline couplings that start as the identity, and a few training steps from the real
/// initialisation that move every trainable parameter of every catalogue bijector and leave no
/// row of a layer's weight identically zero. A broken twin (the softplus whose autograd
/// derivative is 0 at 0) proves the derivative check catches a dead gradient.
module MixerFlow.Properties.TrainingSignalTests

open System
open Xunit
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core
open MixerFlow.Checks

let private f64 (values: float[]) = torch.tensor(values, dtype = torch.float64)

/// The largest gap between f's autograd gradient (of sum(f(v))) and central differences, over
/// every coordinate of v; the gradient of an elementwise f is its derivative.
let private gradientGap (f: Tensor -> Tensor) (v: float[]) =
    let x = (f64 v).requires_grad_(true)
    let autograd = torch.autograd.grad([| f(x).sum() |], [| x |]).[0].data<float>().ToArray()
    let h = 1e-6
    let at (i: int) (d: float) =
        use _ = torch.no_grad()
        let moved = Array.copy v
        moved.[i] <- moved.[i] + d
        f(f64 moved).sum().item<float>()
    [| for i in 0 .. v.Length - 1 ->
        let numeric = (at i h - at i -h) / (2.0 * h)
        abs (autograd.[i] - numeric) / (1.0 + abs numeric) |]
    |> Array.max

/// Points where piecewise formulas meet (0) and where exp/log1p change regime, plus random ones.
let private points (seed: int) =
    let r = Random seed
    Array.append [| 0.0; 1e-9; -1e-9; 1.0; -1.0; 15.0; -15.0; 30.0; -30.0 |] (Array.init 16 (fun _ -> 8.0 * (r.NextDouble() - 0.5)))

/// Core's softplus before its fix: the same values, but relu'(0) = sign(0) = 0 makes its autograd
/// derivative 0 at exactly 0 instead of 1/2.
let private brokenSoftplus (x: Tensor) = x.relu().add(x.abs().neg().exp().log1p(), Scalars.One)

[<Fact>]
let ``softplus's autograd derivative is sigmoid's, at 0 too`` () =
    Assert.True(gradientGap Ops.softplus (points 1) < 1e-6)
    let x = (f64 [| 0.0 |]).requires_grad_(true)
    let g = torch.autograd.grad([| (Ops.softplus x).sum() |], [| x |]).[0].item<float>()
    Assert.Equal(0.5, g, 12)

[<Fact>]
let ``the derivative check catches the softplus that is dead at 0`` () =
    Assert.True(gradientGap brokenSoftplus (points 1) > 0.3)

[<Fact>]
let ``the scale bounds' autograd derivatives match central differences`` () =
    for bound in [ ScaleBound.SoftClamp 2.0; ScaleBound.SoftClamp 0.5; ScaleBound.Sigmoid ] do
        let gap = gradientGap (fun t -> bound.LogScale t) (Array.append (points 2) [| -2.0; 2.0 |])
        Assert.True(gap < 1e-6, sprintf "%O: %g" bound gap)

[<Fact>]
let ``the logit's and the affine and additive maps' autograd derivatives match central differences`` () =
    // Logit: output and log-derivative, on [0, 1] with both ends, in both directions.
    let logit = new Logit([| 1L |], 0.05)
    let unit = [| 0.0; 1.0; 1e-9; 1.0 - 1e-9; 0.5; 0.25; 0.9 |]
    let forward (x: Tensor) = let r = logit.Forward(x.unsqueeze(1L)) in r.Value.squeeze(1L).add(r.LogDet, Scalars.One)
    let inverse (y: Tensor) = let r = logit.Inverse(y.unsqueeze(1L)) in r.Value.squeeze(1L).add(r.LogDet, Scalars.One)
    Assert.True(gradientGap forward unit < 1e-6)
    Assert.True(gradientGap inverse (points 4) < 1e-6)
    // The coupling maps in x and in their parameters (h = shift, raw log-scale), both directions.
    for map in [ Affine() :> ElementwiseMap; Affine(ScaleBound.Sigmoid); Additive() ] do
        let k = int map.ParamsPerElement
        let xs = points 5
        let h0 = Array.init (xs.Length * k) (fun i -> if i % 3 = 0 then 0.0 else 0.7 * sin (float i))
        let h = (f64 h0).reshape(int64 xs.Length, int64 k)
        for inverse in [ false; true ] do
            let run (x: Tensor) (hh: Tensor) =
                let struct (y, ld) = if inverse then map.Inverse(x, hh) else map.Forward(x, hh)
                y.add(ld, Scalars.One)
            Assert.True(gradientGap (fun x -> run x h) xs < 1e-6, sprintf "%O in x, inverse %b" map inverse)
            let inParameters (flat: Tensor) = run (f64 xs) (flat.reshape(int64 xs.Length, int64 k))
            Assert.True(gradientGap inParameters h0 < 1e-6, sprintf "%O in h, inverse %b" map inverse)

/// Spline parameters: random, or all zero (what a zero-initialised conditioner gives).
let private splineParameters (bins: int) (n: int) (scale: float) (seed: int64) =
    torch.manual_seed seed |> ignore
    torch.randn([| int64 n; int64 (3 * bins - 1) |], dtype = torch.float64).mul(Ops.scalar scale)

/// Inputs on every knot, on and just beside +-bound, far in both tails, 0 and random.
let private splineInputs (spline: RationalQuadratic) (h: Tensor) (inverse: bool) =
    let struct (uw, uh, _) = spline.Split h
    let knots = (Spline.knots ((if inverse then uh else uw), spline.Bound, Spline.minBinWidth)).Positions
    let b = spline.Bound
    let special = [| -b; b; -b - 1e-4; b + 1e-4; -b + 1e-4; b - 1e-4; 0.0; -50.0; 50.0 |]
    let r = Random 3
    [| yield! knots.[0].data<float>().ToArray()
       yield! special
       for _ in 1 .. 12 -> 2.5 * b * (r.NextDouble() - 0.5) |]

[<Fact>]
let ``the spline's derivative in its input matches central differences on knots, boundaries and tails`` () =
    for bins, bound in [ (4, 3.0); (7, 1.0) ] do
        let spline = RationalQuadratic(bins, bound)
        for scale in [ 0.0; 1.0 ] do
            for inverse in [ false; true ] do
                let h1 = splineParameters bins 1 scale 5L
                let xs = splineInputs spline h1 inverse
                let h = h1.expand(int64 xs.Length, -1L)
                let apply (x: Tensor) =
                    let struct (y, _) = if inverse then spline.Inverse(x, h) else spline.Forward(x, h)
                    y
                let gap = gradientGap apply xs
                // Central differences straddling a knot err by about h times the jump in f''.
                Assert.True(gap < 1e-4, sprintf "bins %d, bound %g, scale %g, inverse %b: %g" bins bound scale inverse gap)

[<Fact>]
let ``the spline's gradients in its parameters match central differences, from zero parameters too`` () =
    let bins, bound = 5, 2.0
    let spline = RationalQuadratic(bins, bound)
    let xs = f64 [| -1.7; -0.6; 0.0; 0.35; 1.2; 1.9 |]
    for scale in [ 0.0; 0.7 ] do
        for inverse in [ false; true ] do
            let h0 = splineParameters bins 1 scale 7L
            // Output and log-derivative, weighted so that no gradient cancels by symmetry.
            let objective (flat: Tensor) =
                let h = flat.reshape(1L, -1L).expand(xs.shape.[0], -1L)
                let struct (y, logDeriv) = if inverse then spline.Inverse(xs, h) else spline.Forward(xs, h)
                (y.mul(f64 [| 0.3; -1.1; 0.7; 1.3; -0.4; 0.9 |]).add(logDeriv, Scalars.One)).unsqueeze(0L)
            let gap = gradientGap (fun t -> objective t) (h0.reshape(-1L).data<float>().ToArray())
            Assert.True(gap < 1e-5, sprintf "scale %g, inverse %b: %g" scale inverse gap)
            // The knot derivatives' parameters (the last K - 1) get a gradient at zero parameters.
            let flat = h0.reshape(-1L).requires_grad_(true)
            let g = torch.autograd.grad([| (objective flat).sum() |], [| flat |]).[0]
            let derivativeGradients = g.narrow(0L, int64 (2 * bins), int64 (bins - 1)).abs().max().item<float>()
            Assert.True(derivativeGradients > 1e-4, sprintf "scale %g, inverse %b: derivative parameters' gradient %g" scale inverse derivativeGradients)

[<Fact>]
let ``zero spline parameters are the identity, in both directions`` () =
    let spline = RationalQuadratic(6, 2.0)
    let x = torch.randn([| 50L |], dtype = torch.float64).mul(Ops.scalar 2.0)
    let h = torch.zeros([| 50L; 17L |], dtype = torch.float64)
    for inverse in [ false; true ] do
        let struct (y, logDeriv) = if inverse then spline.Inverse(x, h) else spline.Forward(x, h)
        Assert.True(y.sub(x).abs().max().item<float>() < 1e-12)
        Assert.True(logDeriv.abs().max().item<float>() < 1e-12)

[<Fact>]
let ``a new spline coupling and a new spline MAF are the identity`` () =
    torch.manual_seed 11L |> ignore
    let layers : Bijector list =
        [ new SplineCoupling([| 6L |], Partition.Halves 6L, Conditioners.Mlp(16L, 2), 5, 3.0)
          Catalogue.splineMaf.Build.Invoke(Random 4) ]
    for layer in layers do
        Ops.moveTo torch.float64 torch.CPU layer
        let x = torch.randn(Ops.batchShape 32L layer.InputShape, dtype = torch.float64).mul(Ops.scalar 2.0)
        let r = layer.Forward x
        Assert.True(r.Value.sub(x).abs().max().item<float>() < 1e-12, layer.Name)
        Assert.True(r.LogDet.abs().max().item<float>() < 1e-12, layer.Name)

/// Every Linear and Conv2d weight below m, with the path of the module that holds it.
let private layerWeights (m: torch.nn.Module) =
    [ for struct (name, sub) in m.named_modules() do
        match sub with
        | :? Linear as l -> yield name, l.weight :> Tensor
        | :? Conv2d as c -> yield name, c.weight :> Tensor
        | _ -> () ]

let private zeroRows (w: Tensor) =
    use _ = torch.no_grad()
    w.reshape(w.shape.[0], -1L).abs().sum(1L).eq(Ops.scalar 0.0).sum().item<int64>()

/// A few Adam steps of maximum likelihood from the bijector's own initialisation (float64).
let private train (b: Bijector) (sample: Tensor) (steps: int) =
    let flow = new Flow(b, new StandardNormal(b.OutputShape))
    use adam = new Adam(flow.parameters(), 1e-2)
    for _ in 1 .. steps do
        use _ = torch.NewDisposeScope()
        let loss = flow.LogProb(sample).mean().neg()
        adam.ZeroGrad()
        loss.backward()
        adam.Step()

[<Fact>]
let ``a few training steps move every parameter of every catalogue bijector and leave no weight row zero`` () =
    for spec in Catalogue.all do
        for seed in 0 .. 2 do
            torch.manual_seed(int64 (100 + seed)) |> ignore
            let b = spec.Build.Invoke(Random seed)
            Ops.moveTo torch.float64 torch.CPU b
            // The strictly triangular LU factors of a 1x1 matrix have no free entry.
            let free (name: string) (p: Tensor) = not ((name.EndsWith "lower" || name.EndsWith "upper") && p.numel() = 1L)
            let trainable = [ for struct (name, p) in b.named_parameters() do if p.requires_grad && free name p then yield name, p ]
            let before = trainable |> List.map (fun (_, p) -> p.detach().clone())
            let sample = spec.SampleInput.Invoke(b, 64L).to_type(torch.float64)
            if not trainable.IsEmpty then train b sample 6
            for (name, p), initial in List.zip trainable before do
                use _ = torch.no_grad()
                Assert.True(p.sub(initial).abs().max().item<float>() > 0.0,
                            sprintf "%s (seed %d): parameter %s did not move in 6 steps" spec.Name seed name)
            for name, w in layerWeights b do
                Assert.True(zeroRows w = 0L, sprintf "%s (seed %d): %s.weight has %d rows that are still zero" spec.Name seed name (zeroRows w))
