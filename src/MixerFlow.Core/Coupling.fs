namespace MixerFlow.Core

open System
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core.Ops

/// How an affine coupling bounds its scale (keeps the inverse from dividing by ~0).
type ScaleBound =
    /// log s = c * tanh(h / c): |log s| < c; s = 1 at h = 0.
    | SoftClamp of float
    /// Glow's sigmoid(h + 2), divided by sigmoid(2) so that h = 0 is the identity: s in (0, 1.14).
    | Sigmoid

/// Coupling layers (Dinh et al. 2015, NICE; Dinh et al. 2017, RealNVP): the event is split along
/// its first axis by a Partition; the conditioning part passes unchanged and, through the
/// conditioner, sets the parameters of an elementwise bijection of the other part. The Jacobian
/// is block-triangular, so log|det| is the sum of the elementwise log-derivatives.
[<AbstractClass>]
type Coupling(name: string, eventShape: int64[], partition: Partition, paramsPerElement: int64,
              conditioner: ConditionerFactory) as this =
    inherit Bijector(name, eventShape, eventShape)
    do
        if eventShape.Length = 0 || eventShape.[0] <> int64 partition.Size then
            invalidArg "partition"
                (sprintf "%s: partition covers %d slices but the event shape is %s" name partition.Size (Shapes.show eventShape))
        if isNull (box conditioner) then nullArg "conditioner"
    let rest = eventShape.[1..]
    let nA = int64 partition.Conditioning.Length
    let nB = int64 partition.Transformed.Length
    let conditioningIndex = torch.tensor(partition.Conditioning)
    let transformedIndex = torch.tensor(partition.Transformed)
    let mergeIndex = torch.tensor(inversePermutation (Array.append partition.Conditioning partition.Transformed))
    // Vector events flatten the conditioning part; image events keep [C, H, W] for a conv net.
    let net = conditioner.Invoke(nA, paramsPerElement * nB)
    do
        this.register_buffer("conditioningIndex", conditioningIndex)
        this.register_buffer("transformedIndex", transformedIndex)
        this.register_buffer("mergeIndex", mergeIndex)
        this.register_module("net", net)

    member _.Partition = partition
    member _.Conditioner = net

    /// Parameters for the transformed part: [B, paramsPerElement, nB, rest...].
    member _.Parameters(xa: Tensor) =
        let h = net.call(xa)
        h.reshape(Array.append [| xa.shape.[0]; paramsPerElement; nB |] rest)

    /// Elementwise bijection of xb given params h ([B, k, nB, rest...]); returns the output and
    /// the elementwise log-derivatives (same shape as xb).
    abstract Elementwise: xb: Tensor * h: Tensor * inverse: bool -> Tensor * Tensor

    member private this.Run(x: Tensor, inverse: bool) =
        this.CheckShape(x, eventShape, "input")
        let xa = x.index_select(1L, conditioningIndex)
        let xb = x.index_select(1L, transformedIndex)
        let yb, logDeriv = this.Elementwise(xb, this.Parameters xa, inverse)
        Transformed(torch.cat([| xa; yb |], 1L).index_select(1L, mergeIndex), sumPerSample logDeriv)

    override this.Forward(x) = this.Run(x, false)
    override this.Inverse(y) = this.Run(y, true)

    interface IJacobianStructure with
        member _.StructureDescription = "conditioning slices pass unchanged: their rows of dy/dx are identity rows"
        member _.ExpectedJacobian() =
            let n = int (Shapes.numel eventShape)
            let per = int (Shapes.numel rest)
            let j = Array2D.create n n Double.NaN
            for c in partition.Conditioning do
                for p in 0 .. per - 1 do
                    let r = int c * per + p
                    for col in 0 .. n - 1 do j.[r, col] <- if col = r then 1.0 else 0.0
            j

/// Affine coupling (RealNVP): y_b = x_b * s(x_a) + t(x_a), with a bounded scale.
type AffineCoupling(eventShape: int64[], partition: Partition, conditioner: ConditionerFactory, scaleBound: ScaleBound) =
    inherit Coupling("AffineCoupling", eventShape, partition, 2L, conditioner)
    new(eventShape, partition, conditioner) = AffineCoupling(eventShape, partition, conditioner, SoftClamp 2.0)
    member _.ScaleBound = scaleBound
    override _.Elementwise(xb, h, inverse) =
        let shift = h.select(1L, 0L)
        let raw = h.select(1L, 1L)
        let logScale =
            match scaleBound with
            | SoftClamp c -> (raw / scalar c).tanh() * scalar c
            | Sigmoid -> torch.nn.functional.logsigmoid(raw + scalar 2.0) - scalar (-Math.Log(1.0 + Math.Exp(-2.0)))
        if not inverse then xb * logScale.exp() + shift, logScale
        else (xb - shift) * logScale.neg().exp(), logScale.neg()

/// Additive coupling (NICE): y_b = x_b + t(x_a); volume preserving, log|det| = 0.
type AdditiveCoupling(eventShape: int64[], partition: Partition, conditioner: ConditionerFactory) =
    inherit Coupling("AdditiveCoupling", eventShape, partition, 1L, conditioner)
    override _.Elementwise(xb, h, inverse) =
        let shift = h.select(1L, 0L)
        (if inverse then xb - shift else xb + shift), torch.zeros_like(xb)

/// Rational-quadratic spline coupling (Durkan et al. 2019): each transformed element goes
/// through a monotonic spline with `bins` bins on [-bound, bound] and identity tails.
type SplineCoupling(eventShape: int64[], partition: Partition, conditioner: ConditionerFactory, bins: int, bound: float) =
    inherit Coupling("SplineCoupling", eventShape, partition, int64 (3 * bins - 1), conditioner)
    do
        if bins < 2 then invalidArg "bins" (sprintf "SplineCoupling needs at least 2 bins, got %d" bins)
        if not (bound > 0.0) then invalidArg "bound" (sprintf "SplineCoupling needs bound > 0, got %g" bound)
    new(eventShape, partition, conditioner) = SplineCoupling(eventShape, partition, conditioner, 8, 3.0)
    member _.Bins = bins
    member _.Bound = bound
    member private _.Split(h: Tensor) =
        // [B, 3K-1, nB, rest...] -> [B, nB, rest..., 3K-1]
        let p = h.movedim([| 1L |], [| -1L |])
        p.narrow(-1L, 0L, int64 bins), p.narrow(-1L, int64 bins, int64 bins), p.narrow(-1L, int64 (2 * bins), int64 (bins - 1))
    override this.Elementwise(xb, h, inverse) =
        let uw, uh, ud = this.Split h
        Spline.apply xb uw uh ud bound inverse
    /// Knot positions on the input side for the transformed part of x: [B, nB, rest..., K+1].
    /// Used by the edge-case checks to place inputs exactly on bin boundaries.
    member this.InputKnots(x: Tensor) =
        let xa = x.index_select(1L, this.get_buffer("conditioningIndex"))
        let uw, _, _ = this.Split(this.Parameters xa)
        fst (Spline.knots uw bound Spline.minBinWidth)
