namespace MixerFlow.Core

#nowarn "9"

open System
open System.Numerics
open System.Runtime.CompilerServices
open Microsoft.FSharp.NativeInterop
open TorchSharp

/// Switches for the fused CPU loops of hand-written steps.
[<AbstractClass; Sealed>]
type HandKernels private () =
    static let mutable enabled = true
    /// Whether hand-written steps run their fused CPU loops where they have one (spline couplings on
    /// float32 or float64 CPU batches); false runs the same maths as tensor operations, as on other
    /// devices. Default true.
    static member Enabled with get () = enabled and set (v: bool) = enabled <- v

/// The constants of a rational-quadratic spline in a fused loop.
[<Struct>]
type internal SplineConstants =
    { Bins: int
      Bound: float
      /// 2B m and 2B (1 - m K) for widths, then heights: a bin's size is floor + scale * softmax.
      FloorW: float
      ScaleW: float
      FloorH: float
      ScaleH: float }

/// Pointers (addresses of contiguous tensors' first elements) of one fused pass over E elements.
[<Struct>]
type internal SplineBuffers =
    { /// Elements (the planes' length).
      Elements: int
      /// Softmax of widths then heights [2K, E].
      Soft: nativeint
      /// Raw inner derivatives [K-1, E].
      Raw: nativeint
      /// The inputs [E].
      X: nativeint
      /// Forward: outputs [E]; backward: dL/dy [E].
      Y: nativeint
      /// Forward: log|dy/dx| [E]; backward: dL/dx [E].
      LogDerivative: nativeint
      /// The derivatives at the bin's knots and softplus' of their raw values [4, E]: written by
      /// the forward loop, read by the backward one.
      Saved: nativeint
      /// Backward: dL/d(softmax) [2K, E] and dL/d(raw derivatives) [K-1, E].
      DSoft: nativeint
      DRaw: nativeint }

/// The spline of Spline.apply (forward direction) and its backward pass, fused into one loop over
/// the elements, Vector<'T>.Count elements at a time (float32 or float64), on softmax planes that
/// tensor operations computed: no intermediate tensor, the bin's quantities selected in registers
/// as the knots are accumulated. The last vector overlaps the one before when E is not a multiple
/// of the lanes (each element's results are written, never accumulated, so twice is the same).
/// The same maths as SplinePlanes, which runs it as tensor operations on other devices.
module internal SplineKernel =
    let private isSingle<'T> () = Type.op_Equality(typeof<'T>, typeof<float32>)
    let private constant<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (v: float) : Vector<'T> =
        if isSingle<'T> () then Vector.As<float32, 'T>(Vector<float32>(float32 v)) else Vector.As<float, 'T>(Vector<float>(v))
    let private exp<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (v: Vector<'T>) : Vector<'T> =
        if isSingle<'T> () then Vector.As<float32, 'T>(Vector.Exp(Vector.As<'T, float32> v)) else Vector.As<float, 'T>(Vector.Exp(Vector.As<'T, float> v))
    let private log<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (v: Vector<'T>) : Vector<'T> =
        if isSingle<'T> () then Vector.As<float32, 'T>(Vector.Log(Vector.As<'T, float32> v)) else Vector.As<float, 'T>(Vector.Log(Vector.As<'T, float> v))
    let inline private load<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (baseAddress: nativeint) (index: int) : Vector<'T> =
        Unsafe.ReadUnaligned<Vector<'T>>(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (baseAddress + nativeint index * nativeint sizeof<'T>)))
    let inline private store<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (baseAddress: nativeint) (index: int) (v: Vector<'T>) =
        Unsafe.WriteUnaligned<Vector<'T>>(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (baseAddress + nativeint index * nativeint sizeof<'T>)), v)

    /// The bin of x (clamped) and its quantities, accumulated over the knots: the bin (as a value),
    /// the softmax sums below it and at it, widths and heights.
    [<Struct; NoEquality; NoComparison>]
    type private Bin<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> =
        { K: Vector<'T>; BelowW: Vector<'T>; AtW: Vector<'T>; BelowH: Vector<'T>; AtH: Vector<'T>
          /// The raw derivatives of the knots below and above the bin (0 where there is none).
          RawLow: Vector<'T>; RawHigh: Vector<'T> }

    let private bin<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType>
            (c: SplineConstants) (b: SplineBuffers) (i: int) (xc: Vector<'T>) : Bin<'T> =
        let e = b.Elements
        let k = c.Bins
        let negB, floorW, scaleW = constant<'T> -c.Bound, constant<'T> c.FloorW, constant<'T> c.ScaleW
        let mutable cumW, cumH = Vector<'T>.Zero, Vector<'T>.Zero
        let mutable prevW, prevH = load<'T> b.Soft i, load<'T> b.Soft (k * e + i)
        let mutable r = { K = Vector<'T>.Zero; BelowW = Vector<'T>.Zero; AtW = prevW; BelowH = Vector<'T>.Zero; AtH = prevH
                          RawLow = Vector<'T>.Zero; RawHigh = load<'T> b.Raw i }
        for j in 1 .. k - 1 do
            cumW <- cumW + prevW
            cumH <- cumH + prevH
            prevW <- load<'T> b.Soft (j * e + i)
            prevH <- load<'T> b.Soft ((k + j) * e + i)
            let jv = constant<'T> (float j)
            // Knot j of the widths: x at or above it puts the bin at j or above.
            let m = Vector.GreaterThanOrEqual(xc, negB + floorW * jv + scaleW * cumW)
            r <- { K = Vector.ConditionalSelect(m, jv, r.K)
                   BelowW = Vector.ConditionalSelect(m, cumW, r.BelowW); AtW = Vector.ConditionalSelect(m, prevW, r.AtW)
                   BelowH = Vector.ConditionalSelect(m, cumH, r.BelowH); AtH = Vector.ConditionalSelect(m, prevH, r.AtH)
                   RawLow = Vector.ConditionalSelect(m, load<'T> b.Raw ((j - 1) * e + i), r.RawLow)
                   RawHigh = Vector.ConditionalSelect(m, (if j < k - 1 then load<'T> b.Raw (j * e + i) else Vector<'T>.Zero), r.RawHigh) }
        r

    /// softplus(u + shift) + min and softplus' (the sigmoid); 1 and 0 where `atEnd` is set.
    let private derivative<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (raw: Vector<'T>) (atEnd: Vector<'T>) =
        let one = Vector<'T>.One
        let u = raw + constant<'T> Spline.derivativeShift
        let ex = exp<'T> (-Vector.Abs u)
        let softplus = Vector.Max(u, Vector<'T>.Zero) + log<'T> (one + ex)
        let sigmoid = Vector.ConditionalSelect(Vector.GreaterThanOrEqual(u, Vector<'T>.Zero), one, ex) / (one + ex)
        struct (Vector.ConditionalSelect(atEnd, one, softplus + constant<'T> Spline.minDerivative),
                Vector.ConditionalSelect(atEnd, Vector<'T>.Zero, sigmoid))

    /// The rational quadratic's intermediates in bin r at x (clamped).
    [<Struct; NoEquality; NoComparison>]
    type private Rq<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> =
        { Wk: Vector<'T>; Hk: Vector<'T>; Xk: Vector<'T>; Yk: Vector<'T>; Theta: Vector<'T>; S: Vector<'T>; T1t: Vector<'T>
          N: Vector<'T>; Qv: Vector<'T>; Dn: Vector<'T>; R: Vector<'T>; A: Vector<'T>; Dydx: Vector<'T> }

    let private rq<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType>
            (c: SplineConstants) (r: Bin<'T>) (xc: Vector<'T>) (dk: Vector<'T>) (dk1: Vector<'T>) : Rq<'T> =
        let negB = constant<'T> -c.Bound
        let wk = constant<'T> c.FloorW + constant<'T> c.ScaleW * r.AtW
        let hk = constant<'T> c.FloorH + constant<'T> c.ScaleH * r.AtH
        let xk = negB + constant<'T> c.FloorW * r.K + constant<'T> c.ScaleW * r.BelowW
        let yk = negB + constant<'T> c.FloorH * r.K + constant<'T> c.ScaleH * r.BelowH
        let theta = (xc - xk) / wk
        let omt = Vector<'T>.One - theta
        let t1t = theta * omt
        let s = hk / wk
        let n = s * theta * theta + dk * t1t
        let qv = dk + dk1 - s - s
        let dn = s + qv * t1t
        let a = dk1 * theta * theta + (s + s) * t1t + dk * omt * omt
        let q = s / dn
        { Wk = wk; Hk = hk; Xk = xk; Yk = yk; Theta = theta; S = s; T1t = t1t; N = n; Qv = qv; Dn = dn
          R = n / dn; A = a; Dydx = q * q * a }

    /// The forward pass: y and log|dy/dx| (identity and 0 outside [-B, B]); the bin's derivatives
    /// and their softplus' into Saved.
    let forward<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (c: SplineConstants) (b: SplineBuffers) =
        let e = b.Elements
        let lanes = Vector<'T>.Count
        let bound = constant<'T> c.Bound
        let last = constant<'T> (float (c.Bins - 1))
        let mutable i = 0
        while i < e do
            let i' = min i (e - lanes)
            let x = load<'T> b.X i'
            let xc = Vector.Min(Vector.Max(x, -bound), bound)
            let inside = Vector.Equals(x, xc)
            let r = bin c b i' xc
            let struct (dk, sigK) = derivative<'T> r.RawLow (Vector.Equals(r.K, Vector<'T>.Zero))
            let struct (dk1, sigK1) = derivative<'T> r.RawHigh (Vector.Equals(r.K, last))
            let q = rq c r xc dk dk1
            store b.Y i' (Vector.ConditionalSelect(inside, q.Yk + q.Hk * q.R, x))
            store b.LogDerivative i' (Vector.ConditionalSelect(inside, log<'T> q.Dydx, Vector<'T>.Zero))
            store b.Saved i' dk
            store b.Saved (e + i') dk1
            store b.Saved (2 * e + i') sigK
            store b.Saved (3 * e + i') sigK1
            i <- i + lanes

    /// The backward pass from dL/dy (in Y) and dL/dlogdet (gl): dL/d(softmax) into DSoft,
    /// dL/d(raw derivatives) into DRaw, dL/dx into LogDerivative.
    let backward<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (c: SplineConstants) (b: SplineBuffers) (gl: float) =
        let e = b.Elements
        let k = c.Bins
        let lanes = Vector<'T>.Count
        let bound = constant<'T> c.Bound
        let one = Vector<'T>.One
        let two = constant<'T> 2.0
        let c1, c2 = constant<'T> gl, constant<'T> (2.0 * gl)
        let mutable i = 0
        while i < e do
            let i' = min i (e - lanes)
            let x = load<'T> b.X i'
            let gy = load<'T> b.Y i'
            let xc = Vector.Min(Vector.Max(x, -bound), bound)
            let inside = Vector.Equals(x, xc)
            let r = bin c b i' xc
            let dk, dk1 = load<'T> b.Saved i', load<'T> b.Saved (e + i')
            let q = rq c r xc dk dk1
            let theta, omt = q.Theta, one - q.Theta
            let invDn, invA = one / q.Dn, one / q.A
            let ghd = gy * q.Hk * invDn * invDn
            let om2t = omt - theta
            // As SplinePlanes.backward: G_theta, G_s, and the derivatives' gradients.
            let ldTheta = (dk1 * theta - dk * omt + q.S * om2t) * invA - q.Qv * om2t * invDn
            let gTheta = gy * q.Wk * q.Dydx + c2 * ldTheta
            let o2 = one - two * q.T1t
            let gS = (theta * theta * q.Dn - q.N * o2) * ghd + c2 * (one / q.S + q.T1t * invA - o2 * invDn)
            let twoT = two * q.T1t * invDn
            let zero = Vector<'T>.Zero
            let gdk1 = Vector.ConditionalSelect(inside, ((zero - q.N) * ghd * q.T1t + c1 * (theta * theta * invA - twoT)) * load<'T> b.Saved (3 * e + i'), zero)
            let gdk = Vector.ConditionalSelect(inside, ((q.Dn - q.N) * ghd * q.T1t + c1 * (omt * omt * invA - twoT)) * load<'T> b.Saved (2 * e + i'), zero)
            let invW = one / q.Wk
            let gThetaW = gTheta * invW
            let scaleW, scaleH = constant<'T> c.ScaleW, constant<'T> c.ScaleH
            let lW = Vector.ConditionalSelect(inside, zero - scaleW * gThetaW, zero)
            let oW = Vector.ConditionalSelect(inside, zero - scaleW * (q.S * gS * invW + theta * gThetaW), zero)
            let lH = Vector.ConditionalSelect(inside, scaleH * gy, zero)
            let oH = Vector.ConditionalSelect(inside, scaleH * (gy * q.R + gS * invW), zero)
            let totalW = r.BelowW * lW + r.AtW * oW
            let totalH = r.BelowH * lH + r.AtH * oH
            // Through the softmax: s_j (L_j l + [j = bin] o - total), L_j = [j < bin].
            for j in 0 .. k - 1 do
                let jv = constant<'T> (float j)
                let below, at = Vector.GreaterThan(r.K, jv), Vector.Equals(r.K, jv)
                let termW = Vector.ConditionalSelect(below, lW, Vector.ConditionalSelect(at, oW, zero)) - totalW
                let termH = Vector.ConditionalSelect(below, lH, Vector.ConditionalSelect(at, oH, zero)) - totalH
                store b.DSoft (j * e + i') (load<'T> b.Soft (j * e + i') * termW)
                store b.DSoft ((k + j) * e + i') (load<'T> b.Soft ((k + j) * e + i') * termH)
            // Raw derivative j belongs to knot j + 1: the bin's lower knot when bin = j + 1, its upper when bin = j.
            for j in 0 .. k - 2 do
                let jv = constant<'T> (float j)
                let v = Vector.ConditionalSelect(Vector.Equals(r.K, jv + one), gdk, zero) + Vector.ConditionalSelect(Vector.Equals(r.K, jv), gdk1, zero)
                store b.DRaw (j * e + i') v
            store b.LogDerivative i' (Vector.ConditionalSelect(inside, gThetaW, gy))
            i <- i + lanes

    /// Whether the fused loops can run on x's pass (a CPU batch of float32 or float64 whose E
    /// elements fill at least one vector).
    let applies (x: Tensor) (elements: int64) =
        HandKernels.Enabled && x.device_type = DeviceType.CPU
        && (x.dtype = torch.float32 && elements >= int64 Vector<float32>.Count
            || x.dtype = torch.float64 && elements >= int64 Vector<float>.Count)
