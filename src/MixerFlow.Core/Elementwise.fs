namespace MixerFlow.Core

open System
open TorchSharp
open MixerFlow.Core.Ops

/// How an affine map bounds its log-scale, so that the inverse never divides by ~0.
/// Build one with `ScaleBound.SoftClamp(2.0)` or `ScaleBound.Sigmoid` (F# and C# alike).
[<Sealed; AllowNullLiteral>]
type ScaleBound private (limit: float) =
    /// The limit c of a soft clamp; NaN for Glow's sigmoid.
    member _.Limit = limit
    member _.IsSigmoid = Double.IsNaN limit
    /// log s = c * tanh(h / c): |log s| < c; s = 1 at h = 0.
    /// <param name="limit">c > 0, the bound on |log s|.</param>
    static member SoftClamp(limit: float) =
        if not (limit > 0.0) then invalidArg "limit" (sprintf "ScaleBound.SoftClamp needs a limit > 0, got %g" limit)
        ScaleBound(limit)
    /// Glow's sigmoid(h + 2), divided by sigmoid(2) so that h = 0 is the identity: s in (0, 1.14).
    static member Sigmoid = ScaleBound(Double.NaN)
    /// The bounded log-scale from the unconstrained value h (the one place this is written).
    /// <param name="raw">Unconstrained values h, any shape.</param>
    member _.LogScale(raw: Tensor) : Tensor =
        if Double.IsNaN limit then
            // The constant is added in place: logsigmoid's backward needs its input, not its output.
            torch.nn.functional.logsigmoid(addScalar raw 2.0).add_(scalar (Math.Log(1.0 + Math.Exp(-2.0))), Scalars.One)
        else
            // tanh in place on the fresh quotient (division by a constant keeps nothing for its
            // backward); the product is a new tensor, since tanh's backward reads its output.
            raw.div(scalar limit).tanh_().mul(scalar limit)
    override _.Equals(o) =
        match o with
        | :? ScaleBound as b -> b.Limit.Equals(limit)
        | _ -> false
    override _.GetHashCode() = limit.GetHashCode()
    override _.ToString() = if Double.IsNaN limit then "Sigmoid" else sprintf "SoftClamp %g" limit

/// A family of elementwise monotonic bijections y = f(x; h), each element with its own
/// parameters h, handed to coupling and autoregressive layers (zuko's `univariate`, nflows'
/// transforms). h holds ParamsPerElement unconstrained values per element, laid out
/// [B, ParamsPerElement, ...] where x is [B, ...]. Both directions return the output and the
/// elementwise log|derivative| (shape of x) of the direction taken.
[<AbstractClass>]
type ElementwiseMap(name: string, paramsPerElement: int64) =
    /// A short name, used in the names of the layers that take the map.
    member _.Name = name
    /// Unconstrained parameters per transformed element.
    member _.ParamsPerElement = paramsPerElement
    /// y = f(x; h) and log|dy/dx| elementwise.
    /// <param name="x">Inputs [B, ...].</param>
    /// <param name="h">Parameters [B, ParamsPerElement, ...].</param>
    abstract Forward: x: Tensor * h: Tensor -> struct (Tensor * Tensor)
    /// x = f^-1(y; h) and log|dx/dy| elementwise.
    /// <param name="y">Outputs [B, ...].</param>
    /// <param name="h">Parameters [B, ParamsPerElement, ...].</param>
    abstract Inverse: y: Tensor * h: Tensor -> struct (Tensor * Tensor)
    override _.ToString() = name

/// y = x * s + t with a bounded scale: h = (t, unconstrained log s). Default bound SoftClamp 2.
type Affine(scaleBound: ScaleBound) =
    inherit ElementwiseMap("Affine", 2L)
    do if isNull scaleBound then nullArg "scaleBound"
    new() = Affine(ScaleBound.SoftClamp 2.0)
    member _.ScaleBound = scaleBound
    /// y = x * s + t with the parameters given apart (each of x's shape): what Forward does with
    /// h[:, 0] and h[:, 1]. Couplings call it with slices of their network's output.
    /// <param name="x">Inputs [B, ...].</param>
    /// <param name="shift">t [B, ...].</param>
    /// <param name="rawLogScale">The unconstrained log-scale [B, ...].</param>
    member _.ForwardParts(x: Tensor, shift: Tensor, rawLogScale: Tensor) =
        let logScale = scaleBound.LogScale rawLogScale
        // The shift is added in place: the product's backward needs its inputs, not its output.
        struct (x.mul(logScale.exp()).add_(shift, Scalars.One), logScale)
    /// x = (y - t) / s with the parameters given apart: what Inverse does with h[:, 0] and h[:, 1].
    /// <param name="y">Outputs [B, ...].</param>
    /// <param name="shift">t [B, ...].</param>
    /// <param name="rawLogScale">The unconstrained log-scale [B, ...].</param>
    member _.InverseParts(y: Tensor, shift: Tensor, rawLogScale: Tensor) =
        let negLogScale = scaleBound.LogScale(rawLogScale).neg()
        struct ((y - shift) * negLogScale.exp(), negLogScale)
    override this.Forward(x, h) = this.ForwardParts(x, h.select(1L, 0L), h.select(1L, 1L))
    override this.Inverse(y, h) = this.InverseParts(y, h.select(1L, 0L), h.select(1L, 1L))

/// y = x + t (NICE): volume preserving, log|dy/dx| = 0; h = (t).
type Additive() =
    inherit ElementwiseMap("Additive", 1L)
    override _.Forward(x, h) = struct (x +. h.select(1L, 0L), torch.zeros_like(x))
    override _.Inverse(y, h) = struct (y - h.select(1L, 0L), torch.zeros_like(y))

/// Monotonic rational-quadratic spline (Durkan et al. 2019) with `bins` bins on
/// [-bound, bound] and identity tails; h = (K widths, K heights, K-1 inner derivatives),
/// 3K - 1 values, all unconstrained.
type RationalQuadratic(bins: int, bound: float) =
    inherit ElementwiseMap("RationalQuadratic", int64 (3 * bins - 1))
    do
        if bins < 2 then invalidArg "bins" (sprintf "RationalQuadratic needs at least 2 bins, got %d" bins)
        if not (bound > 0.0) then invalidArg "bound" (sprintf "RationalQuadratic needs bound > 0, got %g" bound)
    /// 8 bins on [-3, 3].
    new() = RationalQuadratic(8, 3.0)
    member _.Bins = bins
    member _.Bound = bound
    /// [B, 3K-1, ...] -> widths, heights [B, ..., K] and derivatives [B, ..., K-1].
    member _.Split(h: Tensor) =
        let p = h.movedim([| 1L |], [| -1L |])
        struct (p.narrow(-1L, 0L, int64 bins), p.narrow(-1L, int64 bins, int64 bins),
                p.narrow(-1L, int64 (2 * bins), int64 (bins - 1)))
    /// Knot positions on the input side, [B, ..., K+1], for parameters h [B, 3K-1, ...].
    member this.InputKnots(h: Tensor) =
        let struct (uw, _, _) = this.Split h
        (Spline.knots (uw, bound, Spline.minBinWidth)).Positions
    member private this.Apply(x: Tensor, h: Tensor, inverse: bool) =
        let struct (uw, uh, ud) = this.Split h
        let r = Spline.apply (x, uw, uh, ud, bound, inverse)
        struct (r.Output, r.LogDerivative)
    override this.Forward(x, h) = this.Apply(x, h, false)
    override this.Inverse(y, h) = this.Apply(y, h, true)
