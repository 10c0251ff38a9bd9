namespace MixerFlow.Core

open System
open TorchSharp
open MixerFlow.Core.Ops

/// B-splines of one order on a uniform grid: `intervals` intervals on [-range, range], extended by
/// `order` knots on each side, so that intervals + order basis functions B_0 .. B_(n-1) cover
/// [-range, range] and sum to 1 there (a partition of unity); every basis function is 0 outside
/// [-range - order h, range + order h] (h = 2 range / intervals). Knot m lies at
/// -range + (m - order) h, for m = 0 .. intervals + 2 order.
[<Sealed>]
type BSplineGrid(intervals: int, order: int, range: float) =
    do
        if intervals < 1 then invalidArg "intervals" (sprintf "a B-spline grid needs at least 1 interval, got %d" intervals)
        if order < 0 then invalidArg "order" (sprintf "a B-spline order must be >= 0, got %d" order)
        if not (range > 0.0 && Double.IsFinite range) then invalidArg "range" (sprintf "a B-spline grid needs a finite range > 0, got %g" range)
    let step = 2.0 * range / float intervals
    let knots = Array.init (intervals + 2 * order + 1) (fun m -> -range + float (m - order) * step)
    /// Intervals on [-range, range].
    member _.Intervals = intervals
    /// The spline order (3: cubic).
    member _.Order = order
    /// The half-width of the grid's interval [-range, range].
    member _.Range = range
    /// The spacing of the knots.
    member _.Step = step
    /// The number of basis functions: intervals + order.
    member _.Count = intervals + order
    /// The knots, intervals + 2 order + 1 of them, in increasing order.
    member _.Knots = Array.copy knots
    /// The knots as a tensor (float64 on the CPU; move it where the inputs are).
    member _.KnotTensor() = torch.tensor(knots, dtype = torch.float64)

    /// The basis functions at every element of `x`: [..., Count] for x [...], by the Cox-de Boor
    /// recursion from order 0 (the indicator of [t_m, t_(m+1))), one order per step over the whole
    /// batch, with tensor operations that autograd differentiates.
    /// <param name="x">Points, any shape.</param>
    /// <param name="knots">KnotTensor() in x's dtype and on its device.</param>
    member _.Basis(x: Tensor, knots: Tensor) : Tensor =
        if knots.dim() <> 1L then invalidArg "knots" "the knots must be a vector"
        let n = knots.shape.[0]
        if n <> int64 (intervals + 2 * order + 1) then
            invalidArg "knots" (sprintf "the grid has %d knots, got %d" (intervals + 2 * order + 1) n)
        let xe = x.unsqueeze(-1L)
        let mutable b =
            xe.ge(knots.narrow(0L, 0L, n - 1L)).logical_and(xe.lt(knots.narrow(0L, 1L, n - 1L))).to_type(x.dtype)
        if order > 0 then
            // x - t_m for every knot m: [..., n].
            let d = xe.add(knots.neg(), Scalars.One)
            for p in 1 .. order do
                // B_(i,p) = ((x - t_i) B_(i,p-1) - (x - t_(i+p+1)) B_(i+1,p-1)) / (p h) on a uniform grid.
                let m = n - 1L - int64 p
                let left = d.narrow(-1L, 0L, m).mul(b.narrow(-1L, 0L, m))
                let right = d.narrow(-1L, int64 p + 1L, m).mul(b.narrow(-1L, 1L, m))
                b <- left.add_(right, scalar -1.0).mul_(scalar (1.0 / (float p * step)))
        b

/// One Kolmogorov-Arnold layer (Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks"): every edge
/// i -> j carries a learnable univariate function
/// phi_ij(x) = baseWeight_ji silu(x) + splineScale_ji sum_k coefficients_jik B_k(x), with B_k the
/// B-splines of `grid`, and output_j = bias_j + sum_i phi_ij(x_i). Inputs are [N, inputs] (or
/// [..., inputs]: the leading dimensions are flattened and restored). Registered names:
/// `baseWeight` [outputs, inputs], `splineScale` [outputs, inputs], `coefficients`
/// [outputs, inputs, grid.Count] and `bias` [outputs]; the knots are constants made for each
/// dtype and device on first use.
/// Initialised as a hidden layer: base weights uniform in +-1/sqrt(inputs) (a Linear's), spline
/// scales 1, coefficients normal with standard deviation 0.1/sqrt(inputs), bias 0; or, with
/// `zeroOutput`, with every output 0 (base weights, coefficients and bias 0) and spline scales 1,
/// so that the coefficients still receive a gradient.
type KanLayer(inputs: int64, outputs: int64, grid: BSplineGrid, zeroOutput: bool) as this =
    inherit torch.nn.Module<Tensor, Tensor>("KanLayer")
    do
        if inputs < 1L || outputs < 1L then
            invalidArg "inputs" (sprintf "a KAN layer needs inputs >= 1 and outputs >= 1, got %d and %d" inputs outputs)
        if isNull (box grid) then nullArg "grid"
        let count = int64 grid.Count
        let bound = 1.0 / sqrt (float inputs)
        let baseWeight, coefficients =
            if zeroOutput then torch.zeros(outputs, inputs), torch.zeros(outputs, inputs, count)
            else
                torch.rand(outputs, inputs).mul_(scalar (2.0 * bound)).add_(scalar -bound, Scalars.One),
                torch.randn(outputs, inputs, count).mul_(scalar (0.1 * bound))
        this.register_parameter("baseWeight", torch.nn.Parameter(baseWeight))
        this.register_parameter("splineScale", torch.nn.Parameter(torch.ones(outputs, inputs)))
        this.register_parameter("coefficients", torch.nn.Parameter(coefficients))
        this.register_parameter("bias", torch.nn.Parameter(torch.zeros(outputs)))
    // The grid's knots in each dtype on each device, made from the float64 values on first use.
    let knotTensors = DeviceTensors<torch.ScalarType>()
    let knotsFor (x: Tensor) =
        (knotTensors.Get(x.dtype, x, fun device -> [| grid.KnotTensor().``to``(x.dtype, device) |])).[0]
    /// A hidden layer (random initialisation).
    new(inputs, outputs, grid) = new KanLayer(inputs, outputs, grid, false)
    /// The grid of the spline parts.
    member _.Grid = grid
    /// Input features.
    member _.Inputs = inputs
    /// Output features.
    member _.Outputs = outputs
    /// The base (silu) weights [outputs, inputs].
    member this.BaseWeight : Tensor = this.get_parameter("baseWeight")
    /// The spline scales w_s [outputs, inputs].
    member this.SplineScale : Tensor = this.get_parameter("splineScale")
    /// The spline coefficients [outputs, inputs, grid.Count].
    member this.Coefficients : Tensor = this.get_parameter("coefficients")
    /// The output bias [outputs].
    member this.Bias : Tensor = this.get_parameter("bias")
    /// Parameters of a layer of this shape: (grid.Count + 2) per edge and one bias per output.
    static member ParameterCount(inputs: int64, outputs: int64, grid: BSplineGrid) =
        inputs * outputs * (int64 grid.Count + 2L) + outputs
    override this.forward(x) =
        if x.dim() < 1L || x.shape.[int (x.dim() - 1L)] <> inputs then
            invalidArg "x" (sprintf "KanLayer expects [..., %d], got %s" inputs (Shapes.show x.shape))
        let flat = if x.dim() = 2L then x else x.reshape(-1L, inputs)
        let knots = knotsFor flat
        let count = int64 grid.Count
        let basis = grid.Basis(flat, knots).reshape(flat.shape.[0], inputs * count)
        let weights = this.Coefficients.mul(this.SplineScale.unsqueeze(-1L)).reshape(outputs, inputs * count)
        let baseTerm = torch.nn.functional.linear(torch.nn.functional.silu(flat), this.BaseWeight, this.Bias)
        // In place on linear's fresh output: its backward does not read it.
        let y = baseTerm.add_(torch.nn.functional.linear(basis, weights), Scalars.One)
        if x.dim() = 2L then y
        else
            let shape = Array.copy x.shape
            shape.[shape.Length - 1] <- outputs
            y.reshape(shape)
    override _.Dispose(disposing: bool) =
        if disposing then knotTensors.Clear()
        base.Dispose(disposing)

/// KAN layers applied in order, registered as "0", "1", ... (the network of Conditioners.Kan).
type KanNetwork(layers: KanLayer[]) as this =
    inherit torch.nn.Module<Tensor, Tensor>("KanNetwork")
    do
        if isNull layers || layers.Length = 0 then invalidArg "layers" "a KAN network needs at least one layer"
        layers |> Array.iteri (fun i l -> this.register_module(string i, l))
    /// The layers in order.
    member _.Layers : Collections.Generic.IReadOnlyList<KanLayer> = layers :> _
    override _.forward(x) =
        let mutable h = x
        for l in layers do h <- l.call(h)
        h
