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

/// The addresses (of first elements) and row strides, in elements, of one fused pass over a
/// coupling's rows: each row holds Width transformed elements and their Q = 3K - 1 parameters.
[<Struct>]
type internal SplineRows =
    { Rows: int
      /// Transformed elements per row (nB), a multiple of the lanes.
      Width: int
      /// The conditioner's output without its bias [rows, Q Width] (parameter j of element b at
      /// j Width + b: widths, heights, inner derivatives), and the bias [Q Width]. The forward
      /// loop leaves the softmax of the widths and heights in their place, for the backward loop.
      Params: nativeint
      Bias: nativeint
      /// x_b: row 0's first transformed value, and the row stride.
      X: nativeint
      XStride: int
      /// Forward: y_b; backward: dL/dy_b (as X).
      Y: nativeint
      YStride: int
      /// Forward: each row's sum of log|dy/dx| [rows].
      RowLogDet: nativeint
      /// What the forward loop keeps for the backward one [rows, 4 Width]: the derivatives at the
      /// bin's lower and upper knots and softplus' of their raw values.
      Saved: nativeint
      /// Backward: dL/dx_b (as X); dL/d(conditioner output) [rows, Q Width]; its sum over the rows
      /// (the bias's gradient) [Q Width].
      Dx: nativeint
      DxStride: int
      DParams: nativeint
      DBias: nativeint }

/// The spline of Spline.apply (forward direction) and its backward pass fused into one loop over
/// a coupling's rows, Vector<'T>.Count elements at a time (float32 or float64), reading the
/// conditioner's output as it lies (row-major, bias added here): softmax, knots and the bin's
/// quantities in registers, no intermediate tensor. The forward loop leaves the softmax in place of
/// the raw widths and heights; the backward loop reads it and writes every parameter's gradient. The same maths as SplinePlanes,
/// which runs it as tensor operations (other devices, other layouts).
module internal SplineKernel =
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private isSingle<'T> () = Type.op_Equality(typeof<'T>, typeof<float32>)
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private constant<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (v: float) : Vector<'T> =
        if isSingle<'T> () then Vector.As<float32, 'T>(Vector<float32>(float32 v)) else Vector.As<float, 'T>(Vector<float>(v))
    /// exp for float32 (Cephes' expf: a polynomial on [-ln2/2, ln2/2] times 2^n; inputs clamped
    /// to [-87.3, 88], within 2 ulp there).
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private expSingle (v: Vector<float32>) : Vector<float32> =
        let x = Vector.MaxNative(Vector.MinNative(v, Vector<float32>(88.0f)), Vector<float32>(-87.3365478515625f))
        let fx = Vector.Floor(x * Vector<float32>(1.44269504088896341f) + Vector<float32>(0.5f))
        let x = Vector.FusedMultiplyAdd(fx, Vector<float32>(2.12194440e-4f), Vector.FusedMultiplyAdd(fx, Vector<float32>(-0.693359375f), x))
        let inline fma (a: Vector<float32>) (c: float32) = Vector.FusedMultiplyAdd(a, x, Vector<float32>(c))
        let p = fma (fma (fma (fma (fma (Vector<float32>(1.9875691500e-4f)) 1.3981999507e-3f) 8.3334519073e-3f) 4.1665795894e-2f) 1.6666665459e-1f) 5.0000001201e-1f
        let y = Vector.FusedMultiplyAdd(p, x * x, x + Vector<float32>.One)
        y * Vector.As<int, float32>(Vector.ShiftLeft(Vector.ConvertToInt32Native fx + Vector<int>(127), 23))
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private exp<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (v: Vector<'T>) : Vector<'T> =
        if isSingle<'T> () then Vector.As<float32, 'T>(expSingle (Vector.As<'T, float32> v)) else Vector.As<float, 'T>(Vector.Exp(Vector.As<'T, float> v))
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private log<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (v: Vector<'T>) : Vector<'T> =
        if isSingle<'T> () then Vector.As<float32, 'T>(Vector.Log(Vector.As<'T, float32> v)) else Vector.As<float, 'T>(Vector.Log(Vector.As<'T, float> v))
    let inline private load<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (baseAddress: nativeint) (index: int) : Vector<'T> =
        Unsafe.ReadUnaligned<Vector<'T>>(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (baseAddress + nativeint index * nativeint sizeof<'T>)))
    let inline private store<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (baseAddress: nativeint) (index: int) (v: Vector<'T>) =
        Unsafe.WriteUnaligned<Vector<'T>>(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (baseAddress + nativeint index * nativeint sizeof<'T>)), v)

    /// Parameter j of the elements b0.. of a row (with its bias).
    let inline private parameter<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (b: SplineRows) (row: int) (j: int) (b0: int) =
        load<'T> b.Params (row + j * b.Width + b0) + load<'T> b.Bias (j * b.Width + b0)

    /// The softmax of the widths (soft.[0..K-1]) and of the heights (soft.[K..2K-1]).
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private softmax<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType>
            (k: int) (b: SplineRows) (row: int) (b0: int) (soft: Vector<'T>[]) =
        for part in 0 .. 1 do
            let first = part * k
            let mutable largest = parameter<'T> b row first b0
            soft.[first] <- largest
            for j in first + 1 .. first + k - 1 do
                let v = parameter<'T> b row j b0
                soft.[j] <- v
                largest <- Vector.MaxNative(largest, v)
            let mutable total = Vector<'T>.Zero
            for j in first .. first + k - 1 do
                let v = exp<'T> (soft.[j] - largest)
                soft.[j] <- v
                total <- total + v
            let inverse = Vector<'T>.One / total
            for j in first .. first + k - 1 do soft.[j] <- soft.[j] * inverse

    /// The bin of x (clamped) and its quantities, accumulated over the knots.
    [<Struct; NoEquality; NoComparison>]
    type private Bin<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> =
        { /// The bin, as a value.
          K: Vector<'T>
          /// The softmax's sum below the bin and its value at the bin, widths and heights.
          BelowW: Vector<'T>; AtW: Vector<'T>; BelowH: Vector<'T>; AtH: Vector<'T>
          /// The raw derivatives of the bin's lower and upper knots (0 where it is an end).
          RawLow: Vector<'T>; RawHigh: Vector<'T> }

    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private bin<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType>
            (c: SplineConstants) (b: SplineRows) (row: int) (b0: int) (soft: Vector<'T>[]) (xc: Vector<'T>) (raw: bool) : Bin<'T> =
        let k = c.Bins
        let negB, floorW, scaleW = constant<'T> -c.Bound, constant<'T> c.FloorW, constant<'T> c.ScaleW
        let zero = Vector<'T>.Zero
        let mutable cumW, cumH = zero, zero
        let mutable r = { K = zero; BelowW = zero; AtW = soft.[0]; BelowH = zero; AtH = soft.[k]
                          RawLow = zero; RawHigh = (if raw then parameter<'T> b row (2 * k) b0 else zero) }
        for j in 1 .. k - 1 do
            cumW <- cumW + soft.[j - 1]
            cumH <- cumH + soft.[k + j - 1]
            let jv = constant<'T> (float j)
            // Knot j of the widths: x at or above it puts the bin at j or above.
            let m = Vector.GreaterThanOrEqual(xc, negB + floorW * jv + scaleW * cumW)
            r <- { K = Vector.ConditionalSelect(m, jv, r.K)
                   BelowW = Vector.ConditionalSelect(m, cumW, r.BelowW); AtW = Vector.ConditionalSelect(m, soft.[j], r.AtW)
                   BelowH = Vector.ConditionalSelect(m, cumH, r.BelowH); AtH = Vector.ConditionalSelect(m, soft.[k + j], r.AtH)
                   RawLow = (if raw then Vector.ConditionalSelect(m, parameter<'T> b row (2 * k + j - 1) b0, r.RawLow) else zero)
                   RawHigh = (if raw then Vector.ConditionalSelect(m, (if j < k - 1 then parameter<'T> b row (2 * k + j) b0 else zero), r.RawHigh) else zero) }
        r

    /// softplus(u + shift) + min and softplus' (the sigmoid); 1 and 0 where `atEnd` is set.
    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private derivative<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (raw: Vector<'T>) (atEnd: Vector<'T>) =
        let one = Vector<'T>.One
        let u = raw + constant<'T> Spline.derivativeShift
        let ex = exp<'T> (-Vector.Abs u)
        let softplus = Vector.MaxNative(u, Vector<'T>.Zero) + log<'T> (one + ex)
        let sigmoid = Vector.ConditionalSelect(Vector.GreaterThanOrEqual(u, Vector<'T>.Zero), one, ex) / (one + ex)
        struct (Vector.ConditionalSelect(atEnd, one, softplus + constant<'T> Spline.minDerivative),
                Vector.ConditionalSelect(atEnd, Vector<'T>.Zero, sigmoid))

    /// The rational quadratic's intermediates in the bin at x (clamped).
    [<Struct; NoEquality; NoComparison>]
    type private Rq<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> =
        { Wk: Vector<'T>; Hk: Vector<'T>; Yk: Vector<'T>; Theta: Vector<'T>; S: Vector<'T>; T1t: Vector<'T>
          N: Vector<'T>; Qv: Vector<'T>; Dn: Vector<'T>; R: Vector<'T>; A: Vector<'T>; Dydx: Vector<'T> }

    [<MethodImpl(MethodImplOptions.AggressiveInlining)>]
    let private rq<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType>
            (c: SplineConstants) (r: Bin<'T>) (xc: Vector<'T>) (dk: Vector<'T>) (dk1: Vector<'T>) : Rq<'T> =
        let negB = constant<'T> -c.Bound
        let wk = constant<'T> c.FloorW + constant<'T> c.ScaleW * r.AtW
        let hk = constant<'T> c.FloorH + constant<'T> c.ScaleH * r.AtH
        // The same expression as the bin's knot comparison: theta >= 0.
        let xk = negB + constant<'T> c.FloorW * r.K + constant<'T> c.ScaleW * r.BelowW
        let theta = (xc - xk) / wk
        let omt = Vector<'T>.One - theta
        let t1t = theta * omt
        let s = hk / wk
        let n = s * theta * theta + dk * t1t
        let qv = dk + dk1 - s - s
        let dn = s + qv * t1t
        let a = dk1 * theta * theta + (s + s) * t1t + dk * omt * omt
        let q = s / dn
        { Wk = wk; Hk = hk; Yk = negB + constant<'T> c.FloorH * r.K + constant<'T> c.ScaleH * r.BelowH
          Theta = theta; S = s; T1t = t1t; N = n; Qv = qv; Dn = dn; R = n / dn; A = a; Dydx = q * q * a }

    /// The forward pass: y_b (x_b outside [-B, B]), each row's log|det| (0 outside), and Saved.
    let forward<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (c: SplineConstants) (b: SplineRows) =
        let k = c.Bins
        let lanes = Vector<'T>.Count
        let q = (3 * k - 1) * b.Width
        let soft = Array.zeroCreate<Vector<'T>> (2 * k)
        let bound = constant<'T> c.Bound
        let lastBin = constant<'T> (float (k - 1))
        for r in 0 .. b.Rows - 1 do
            let row = r * q
            let mutable rowSum = Vector<'T>.Zero
            let mutable b0 = 0
            while b0 < b.Width do
                softmax<'T> k b row b0 soft
                // The softmax in place of the raw widths and heights, for the backward loop.
                for j in 0 .. 2 * k - 1 do store b.Params (row + j * b.Width + b0) soft.[j]
                let x = load<'T> b.X (r * b.XStride + b0)
                let xc = Vector.MinNative(Vector.MaxNative(x, -bound), bound)
                let inside = Vector.Equals(x, xc)
                let bn = bin<'T> c b row b0 soft xc true
                let struct (dk, sigK) = derivative<'T> bn.RawLow (Vector.Equals(bn.K, Vector<'T>.Zero))
                let struct (dk1, sigK1) = derivative<'T> bn.RawHigh (Vector.Equals(bn.K, lastBin))
                let v = rq<'T> c bn xc dk dk1
                store b.Y (r * b.YStride + b0) (Vector.ConditionalSelect(inside, v.Yk + v.Hk * v.R, x))
                rowSum <- rowSum + Vector.ConditionalSelect(inside, log<'T> v.Dydx, Vector<'T>.Zero)
                let saved = r * 4 * b.Width + b0
                store b.Saved saved dk
                store b.Saved (saved + b.Width) dk1
                store b.Saved (saved + 2 * b.Width) sigK
                store b.Saved (saved + 3 * b.Width) sigK1
                b0 <- b0 + lanes
            Unsafe.Write<'T>(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> (b.RowLogDet + nativeint r * nativeint sizeof<'T>)), Vector.Sum rowSum)

    /// The backward pass from dL/dy_b (in Y) and dL/dlogdet (gl): every parameter's gradient into
    /// DParams and their sums over the rows into DBias, dL/dx_b into Dx.
    let backward<'T when 'T : struct and 'T : (new : unit -> 'T) and 'T :> ValueType> (c: SplineConstants) (b: SplineRows) (gl: float) =
        let k = c.Bins
        let lanes = Vector<'T>.Count
        let q = (3 * k - 1) * b.Width
        let soft = Array.zeroCreate<Vector<'T>> (2 * k)
        let dBias = Array.zeroCreate<Vector<'T>> (q / lanes)
        let bound = constant<'T> c.Bound
        let one, zero, two = Vector<'T>.One, Vector<'T>.Zero, constant<'T> 2.0
        let c1, c2 = constant<'T> gl, constant<'T> (2.0 * gl)
        let scaleW, scaleH = constant<'T> c.ScaleW, constant<'T> c.ScaleH
        for r in 0 .. b.Rows - 1 do
            let row = r * q
            let mutable b0 = 0
            while b0 < b.Width do
                for j in 0 .. 2 * k - 1 do soft.[j] <- load<'T> b.Params (row + j * b.Width + b0)
                let x = load<'T> b.X (r * b.XStride + b0)
                let gy = load<'T> b.Y (r * b.YStride + b0)
                let xc = Vector.MinNative(Vector.MaxNative(x, -bound), bound)
                let inside = Vector.Equals(x, xc)
                let bn = bin<'T> c b row b0 soft xc false
                let saved = r * 4 * b.Width + b0
                let dk, dk1 = load<'T> b.Saved saved, load<'T> b.Saved (saved + b.Width)
                let v = rq<'T> c bn xc dk dk1
                let theta, omt = v.Theta, one - v.Theta
                let invDn, invA = one / v.Dn, one / v.A
                let ghd = gy * v.Hk * invDn * invDn
                let om2t = omt - theta
                // As SplinePlanes.backward: G_theta, G_s, the derivatives' gradients, the knots' coefficients.
                let gTheta = gy * v.Wk * v.Dydx + c2 * ((dk1 * theta - dk * omt + v.S * om2t) * invA - v.Qv * om2t * invDn)
                let o2 = one - two * v.T1t
                let gS = (theta * theta * v.Dn - v.N * o2) * ghd + c2 * (one / v.S + v.T1t * invA - o2 * invDn)
                let twoT = two * v.T1t * invDn
                let gdk1 = Vector.ConditionalSelect(inside, ((zero - v.N) * ghd * v.T1t + c1 * (theta * theta * invA - twoT)) * load<'T> b.Saved (saved + 3 * b.Width), zero)
                let gdk = Vector.ConditionalSelect(inside, ((v.Dn - v.N) * ghd * v.T1t + c1 * (omt * omt * invA - twoT)) * load<'T> b.Saved (saved + 2 * b.Width), zero)
                let invW = one / v.Wk
                let gThetaW = gTheta * invW
                let lW = Vector.ConditionalSelect(inside, zero - scaleW * gThetaW, zero)
                let oW = Vector.ConditionalSelect(inside, zero - scaleW * (v.S * gS * invW + theta * gThetaW), zero)
                let lH = Vector.ConditionalSelect(inside, scaleH * gy, zero)
                let oH = Vector.ConditionalSelect(inside, scaleH * (gy * v.R + gS * invW), zero)
                let totalW = bn.BelowW * lW + bn.AtW * oW
                let totalH = bn.BelowH * lH + bn.AtH * oH
                // Through the softmax: s_j (L_j l + [j = bin] o - total), L_j = [j < bin]; raw
                // derivative j belongs to knot j + 1: the bin's lower knot when bin = j + 1, its upper when bin = j.
                for j in 0 .. 3 * k - 2 do
                    let g =
                        if j < 2 * k then
                            let jv = constant<'T> (float (j % k))
                            let below, at = Vector.GreaterThan(bn.K, jv), Vector.Equals(bn.K, jv)
                            if j < k then soft.[j] * (Vector.ConditionalSelect(below, lW, Vector.ConditionalSelect(at, oW, zero)) - totalW)
                            else soft.[j] * (Vector.ConditionalSelect(below, lH, Vector.ConditionalSelect(at, oH, zero)) - totalH)
                        else
                            let jv = constant<'T> (float (j - 2 * k))
                            Vector.ConditionalSelect(Vector.Equals(bn.K, jv + one), gdk, zero) + Vector.ConditionalSelect(Vector.Equals(bn.K, jv), gdk1, zero)
                    store b.DParams (row + j * b.Width + b0) g
                    let slot = (j * b.Width + b0) / lanes
                    dBias.[slot] <- dBias.[slot] + g
                store b.Dx (r * b.DxStride + b0) (Vector.ConditionalSelect(inside, gThetaW, gy))
                b0 <- b0 + lanes
        for slot in 0 .. dBias.Length - 1 do store b.DBias (slot * lanes) dBias.[slot]

    /// Whether the fused loops can run a pass: a CPU batch of float32 or float64 whose transformed
    /// elements per row fill whole vectors.
    let applies (x: Tensor) (width: int64) =
        HandKernels.Enabled && x.device_type = DeviceType.CPU && x.stride(1) = 1L
        && (x.dtype = torch.float32 && width % int64 Vector<float32>.Count = 0L
            || x.dtype = torch.float64 && width % int64 Vector<float>.Count = 0L)
