/// Kolmogorov-Arnold conditioners (Kan.fs, Conditioners.Kan): the vectorised B-spline basis
/// against a direct scalar Cox-de Boor recursion, the KAN layer against a per-edge loop, and a new
/// coupling with a KAN conditioner as the identity.
module MixerFlow.Properties.KanTests

open System
open Xunit
open FsCheck
open FsCheck.FSharp
open FsCheck.Xunit
open TorchSharp
open MixerFlow.Core

/// B_(i,p)(x) by the Cox-de Boor recursion on the knots t, one point at a time.
let rec private coxDeBoor (t: float[]) (i: int) (p: int) (x: float) : float =
    if p = 0 then (if t.[i] <= x && x < t.[i + 1] then 1.0 else 0.0)
    else
        (x - t.[i]) / (t.[i + p] - t.[i]) * coxDeBoor t i (p - 1) x
        + (t.[i + p + 1] - x) / (t.[i + p + 1] - t.[i + 1]) * coxDeBoor t (i + 1) (p - 1) x

/// The knots of a uniform grid, computed here: intervals on [-range, range], order more each side.
let private knotsOf intervals order (range: float) =
    let h = 2.0 * range / float intervals
    Array.init (intervals + 2 * order + 1) (fun m -> -range + float (m - order) * h)

/// Random points over and beyond the extended grid, every knot, and points far outside.
let private points (r: Random) (knots: float[]) (range: float) =
    let span = knots.[knots.Length - 1] - knots.[0]
    Array.concat
        [ Array.init 40 (fun _ -> knots.[0] - 0.25 * span + 1.5 * span * r.NextDouble())
          knots
          [| -1e3; 1e3; -range; range; 0.0 |] ]

let private gridOf (r: Random) =
    let intervals, order, range = r.Next(1, 9), r.Next(0, 5), 0.5 + 4.0 * r.NextDouble()
    BSplineGrid(intervals, order, range)

[<Property(MaxTest = 30)>]
let ``the B-spline basis equals the scalar Cox-de Boor recursion everywhere`` (seed: PositiveInt) =
    let r = Random(seed.Get)
    let grid = gridOf r
    let t = knotsOf grid.Intervals grid.Order grid.Range
    Assert.Equal<float[]>(t, grid.Knots)
    let xs = points r t grid.Range
    use _ = torch.NewDisposeScope()
    let basis = grid.Basis(torch.tensor(xs, dtype = torch.float64).view(-1L, 1L), grid.KnotTensor())
    Assert.Equal<int64[]>([| int64 xs.Length; 1L; int64 grid.Count |], basis.shape)
    let got = basis.reshape(-1L).data<float>().ToArray()
    for n in 0 .. xs.Length - 1 do
        for k in 0 .. grid.Count - 1 do
            let expected = coxDeBoor t k grid.Order xs.[n]
            let g = got.[n * grid.Count + k]
            Assert.True(abs (g - expected) < 1e-12, sprintf "B_%d(%g) = %g, Cox-de Boor gives %g (grid %d, order %d, range %g)" k xs.[n] g expected grid.Intervals grid.Order grid.Range)

[<Property(MaxTest = 30)>]
let ``the basis sums to one inside the grid and is zero far outside`` (seed: PositiveInt) =
    let r = Random(seed.Get)
    let grid = gridOf r
    use _ = torch.NewDisposeScope()
    let inside = torch.rand(200L, dtype = torch.float64).mul(Ops.scalar (2.0 * grid.Range)).add(Ops.scalar -grid.Range, Scalars.One)
    let sums = grid.Basis(inside, grid.KnotTensor()).sum(-1L)
    Assert.True((sums - Ops.scalar 1.0).abs().max().item<float>() < 1e-12, sprintf "sums %s" (sums.ToString(TorchSharp.TensorStringStyle.Julia)))
    let outside = torch.tensor([| -1e3; 1e3; grid.Knots.[grid.Knots.Length - 1] + 1e-9 |], dtype = torch.float64)
    Assert.Equal(0.0, grid.Basis(outside, grid.KnotTensor()).abs().max().item<float>())

/// phi_ij summed over inputs for each output, one edge at a time.
let private perEdge (layer: KanLayer) (x: float[,]) =
    let f (t: Tensor) = t.to_type(torch.float64).contiguous().data<float>().ToArray()
    let bw, ws, c, bias = f layer.BaseWeight, f layer.SplineScale, f layer.Coefficients, f layer.Bias
    let inputs, outputs, count = int layer.Inputs, int layer.Outputs, layer.Grid.Count
    let t = knotsOf layer.Grid.Intervals layer.Grid.Order layer.Grid.Range
    let silu v = v / (1.0 + exp -v)
    Array2D.init (Array2D.length1 x) outputs (fun n j ->
        let mutable s = bias.[j]
        for i in 0 .. inputs - 1 do
            let v = x.[n, i]
            let mutable spline = 0.0
            for k in 0 .. count - 1 do spline <- spline + c.[(j * inputs + i) * count + k] * coxDeBoor t k layer.Grid.Order v
            s <- s + bw.[j * inputs + i] * silu v + ws.[j * inputs + i] * spline
        s)

[<Property(MaxTest = 15)>]
let ``a KAN layer's output is the sum of its edge functions`` (seed: PositiveInt) =
    let r = Random(seed.Get)
    torch.manual_seed(int64 seed.Get) |> ignore
    let inputs, outputs = int64 (r.Next(1, 6)), int64 (r.Next(1, 6))
    use layer = new KanLayer(inputs, outputs, BSplineGrid(r.Next(1, 7), 3, 1.0 + 2.0 * r.NextDouble()))
    Ops.moveTo torch.float64 torch.CPU layer
    use _ = torch.NewDisposeScope()
    using (torch.no_grad()) (fun _ -> for p in layer.parameters() do p.normal_(0.0, 0.5) |> ignore)
    let x = torch.randn(7L, inputs, dtype = torch.float64).mul(Ops.scalar 3.0)
    let got = using (torch.no_grad()) (fun _ -> layer.call(x))
    let xs = Array2D.init 7 (int inputs) (fun n i -> x.[int64 n, int64 i].item<float>())
    let expected = perEdge layer xs
    for n in 0 .. 6 do
        for j in 0 .. int outputs - 1 do
            let g = got.[int64 n, int64 j].item<float>()
            Assert.True(abs (g - expected.[n, j]) < 1e-10, sprintf "output [%d, %d] = %g, per edge %g" n j g expected.[n, j])

[<Fact>]
let ``a KAN layer keeps leading dimensions`` () =
    use layer = new KanLayer(3L, 2L, BSplineGrid(5, 3, 3.0))
    use _ = torch.NewDisposeScope()
    let x = torch.randn(4L, 5L, 3L)
    let y = layer.call(x)
    Assert.Equal<int64[]>([| 4L; 5L; 2L |], y.shape)
    Assert.True(torch.allclose(y.reshape(20L, 2L), layer.call(x.reshape(20L, 3L))))

[<Theory>]
[<InlineData("affine")>]
[<InlineData("spline")>]
[<InlineData("additive")>]
let ``a new coupling with a KAN conditioner is the identity`` (map: string) =
    torch.manual_seed(5L) |> ignore
    let d = 7L
    let m : ElementwiseMap =
        match map with
        | "affine" -> Affine()
        | "spline" -> RationalQuadratic(6, 3.0)
        | _ -> Additive()
    use b = new Coupling([| d |], Partition.Halves d, Conditioners.Kan(6L, 2), m)
    use _ = torch.NewDisposeScope()
    let x = torch.randn(16L, d).mul(Ops.scalar 2.0)
    let y = using (torch.no_grad()) (fun _ -> b.Forward x)
    Assert.True((y.Value - x).abs().max().item<float32>() < 1e-5f, "y differs from x")
    Assert.True(y.LogDet.abs().max().item<float32>() < 1e-5f, "log-det is not 0")

[<Fact>]
let ``Conditioners.Kan refuses a width, depth or grid out of range`` () =
    Assert.Throws<ArgumentException>(fun () -> Conditioners.Kan(0L, 1) |> ignore) |> ignore
    Assert.Throws<ArgumentException>(fun () -> Conditioners.Kan(4L, 0) |> ignore) |> ignore
    Assert.Throws<ArgumentException>(fun () -> Conditioners.Kan(4L, 1, 0, 3.0) |> ignore) |> ignore
    Assert.Throws<ArgumentException>(fun () -> Conditioners.Kan(4L, 1, 5, 0.0) |> ignore) |> ignore

[<Fact>]
let ``KanParameterCount counts the network's parameters`` () =
    for (inF, outF, width, depth, intervals) in [ (3L, 8L, 5L, 1, 5); (4L, 2L, 3L, 2, 2); (1L, 1L, 1L, 3, 7) ] do
        use net = Conditioners.Kan(width, depth, intervals, 3.0).Invoke(inF, outF)
        let counted = net.parameters() |> Seq.sumBy (fun p -> p.numel())
        Assert.Equal(counted, Conditioners.KanParameterCount(inF, outF, width, depth, intervals))
        use mlp = Conditioners.Mlp(width, depth).Invoke(inF, outF)
        Assert.Equal(mlp.parameters() |> Seq.sumBy (fun p -> p.numel()), Conditioners.MlpParameterCount(inF, outF, width, depth))
