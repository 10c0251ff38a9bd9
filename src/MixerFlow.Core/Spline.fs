namespace MixerFlow.Core

open System
open System.Runtime.InteropServices
open TorchSharp
open MixerFlow.Core.Ops

/// A spline's knot positions [..., K+1] and bin sizes [..., K]; deconstructs in C# as
/// `var (positions, sizes) = Spline.Knots(...)`.
[<Struct; NoEquality; NoComparison>]
type SplineKnots =
    { /// Knot positions [..., K+1], from -bound to +bound.
      Positions: Tensor
      /// Bin sizes [..., K].
      Sizes: Tensor }
    /// C# deconstruction into (positions, sizes).
    member this.Deconstruct([<Out>] positions: byref<Tensor>, [<Out>] sizes: byref<Tensor>) =
        positions <- this.Positions
        sizes <- this.Sizes

/// A spline's output and elementwise log|dy/dx|; deconstructs in C# as
/// `var (y, logDerivative) = Spline.Apply(...)`.
[<Struct; NoEquality; NoComparison>]
type SplineOutput =
    { /// The output, shaped as the input.
      Output: Tensor
      /// log|dy/dx| elementwise, shaped as the input.
      LogDerivative: Tensor }
    /// C# deconstruction into (output, logDerivative).
    member this.Deconstruct([<Out>] output: byref<Tensor>, [<Out>] logDerivative: byref<Tensor>) =
        output <- this.Output
        logDerivative <- this.LogDerivative

/// Monotonic rational-quadratic splines (Durkan, Bekasov, Murray & Papamakarios 2019, "Neural
/// Spline Flows", section 3.1 and appendix A; the formulas follow their reference code).
/// K bins on [-bound, bound], identity (linear tails) outside; the derivative at both ends is 1.
module Spline =
    /// Minimum bin width, as a fraction of 2 * bound.
    [<CompiledName("MinBinWidth")>]
    let minBinWidth = 1e-3
    /// Minimum bin height, as a fraction of 2 * bound.
    [<CompiledName("MinBinHeight")>]
    let minBinHeight = 1e-3
    /// Minimum derivative at a knot.
    [<CompiledName("MinDerivative")>]
    let minDerivative = 1e-3

    /// Knot positions [..., K+1] and bin sizes [..., K] from unnormalised widths [..., K].
    [<CompiledName("Knots")>]
    let knots (unnormalised: Tensor, bound: float, minSize: float) : SplineKnots =
        let k = unnormalised.shape.[int (unnormalised.dim() - 1L)]
        let w = addScalar (unnormalised.softmax(-1L) * scalar (1.0 - minSize * float k)) minSize
        let cum = w.cumsum(-1L) * scalar (2.0 * bound) - scalar bound
        let zero = torch.full_like(cum.narrow(-1L, 0L, 1L), scalar -bound)
        // Pin the last knot exactly at +bound, as the reference code does.
        let cum = torch.cat([| zero; cum.narrow(-1L, 0L, k - 1L); torch.full_like(zero, scalar bound) |], -1L)
        { Positions = cum; Sizes = cum.narrow(-1L, 1L, k) - cum.narrow(-1L, 0L, k) }

    /// The shift c with softplus(c) + minDerivative = 1: zero unnormalised values give inner
    /// derivatives of exactly 1, so that zero parameters (equal widths and heights) make the
    /// spline the identity, as in nflows and zuko.
    [<CompiledName("DerivativeShift")>]
    let derivativeShift = Math.Log(Math.Exp(1.0 - minDerivative) - 1.0)

    /// Derivatives at the K+1 knots from K-1 unnormalised inner values u:
    /// softplus(u + c) + minDerivative with c = <see cref="derivativeShift"/>; 1 at both ends.
    [<CompiledName("Derivatives")>]
    let derivatives (unnormalised: Tensor) =
        let inner = addScalar (softplus (addScalar unnormalised derivativeShift)) minDerivative
        let one = torch.ones_like(inner.narrow(-1L, 0L, 1L))
        torch.cat([| one; inner; one |], -1L)

    let private gather (t: Tensor) (idx: Tensor) = t.gather(-1L, idx).squeeze(-1L)

    /// Applies the spline elementwise. x: [...]; widths, heights: [..., K]; derivs: [..., K-1].
    /// Returns the output and log|dy/dx| elementwise. `inverse` solves the quadratic of the
    /// reference code's appendix A for the inverse.
    [<CompiledName("Apply")>]
    let apply (x: Tensor, uw: Tensor, uh: Tensor, ud: Tensor, bound: float, inverse: bool) : SplineOutput =
        let inside = x.ge(scalar -bound).logical_and(x.le(scalar bound))
        // Spline branch on clamped inputs, so that the unused branch of `where` stays finite.
        let xc = x.clamp(scalar -bound, scalar bound)
        let { Positions = cumw; Sizes = w } = knots (uw, bound, minBinWidth)
        let { Positions = cumh; Sizes = h } = knots (uh, bound, minBinHeight)
        let d = derivatives ud
        let k = w.shape.[int (w.dim() - 1L)]
        let locations = if inverse then cumh else cumw
        // Bin index: number of knots at or below x, minus one, clamped to [0, K-1].
        let idx = (xc.unsqueeze(-1L).ge(locations)).sum(-1L, keepdim = true).sub(scalar 1.0).clamp(scalar 0.0, scalar (float (k - 1L))).to_type(torch.int64)
        let xk = gather cumw idx
        let wk = gather w idx
        let yk = gather cumh idx
        let hk = gather h idx
        let delta = hk / wk
        let dk = gather d idx
        let dk1 = gather (d.narrow(-1L, 1L, k)) idx
        let y, logDeriv =
            if not inverse then
                let theta = (xc - xk) / wk
                let t1t = theta * (scalarMinus 1.0 theta)
                let numerator = hk * (delta * theta.pow(scalar 2.0) +. dk * t1t)
                let denominator = delta +. (dk +. dk1 - delta * scalar 2.0) * t1t
                let y = yk +. numerator / denominator
                let dnum = delta.pow(scalar 2.0) * (dk1 * theta.pow(scalar 2.0) +. delta * t1t * scalar 2.0 +. dk * (scalarMinus 1.0 theta).pow(scalar 2.0))
                y, dnum.log() - denominator.log() * scalar 2.0
            else
                let dy = xc - yk
                let a = dy * (dk +. dk1 - delta * scalar 2.0) +. hk * (delta - dk)
                let b = hk * dk - dy * (dk +. dk1 - delta * scalar 2.0)
                let c = delta.neg() * dy
                let disc = (b.pow(scalar 2.0) - a * c * scalar 4.0).clamp_min(scalar 0.0)
                let root = (c * scalar 2.0) / (b.neg() - disc.sqrt())
                let x = root * wk +. xk
                let t1t = root * (scalarMinus 1.0 root)
                let denominator = delta +. (dk +. dk1 - delta * scalar 2.0) * t1t
                let dnum = delta.pow(scalar 2.0) * (dk1 * root.pow(scalar 2.0) +. delta * t1t * scalar 2.0 +. dk * (scalarMinus 1.0 root).pow(scalar 2.0))
                x, (dnum.log() - denominator.log() * scalar 2.0).neg()
        { Output = torch.where(inside, y, x); LogDerivative = torch.where(inside, logDeriv, torch.zeros_like(logDeriv)) }
