namespace MixerFlow.Core

open System
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core.Ops

/// The tensors of a spline coupling's hand-written pass for one batch layout (rows of `samples`
/// samples, dtype, device), kept in a Workspace. The conditioner's last layer is computed
/// transposed, parameter-major: OutT [Q nB, rows] with Q = 3K - 1, so that each of the spline's
/// unnormalised parameters is a contiguous plane of E = nB rows values (P [Q, E]; element
/// e = b rows + r), and every step of the spline is an operation on whole planes: K widths, K
/// heights, K - 1 inner derivatives.
[<Sealed; AllowNullLiteral>]
type internal SplinePass(ws: Workspace, widths: int64[], features: int64, nB: int64,
                         conditioningStart: int64, transformedStart: int64, map: RationalQuadratic) =
    let rows = ws.Rows
    let k = int64 map.Bins
    let q = 3L * k - 1L
    let e = nB * rows
    let bound = map.Bound
    let hidden = [| for i in 0 .. widths.Length - 2 -> ws.Empty [| rows; widths.[i] |] |]
    let outT = ws.Empty [| q * nB; rows |]
    let dOutT = ws.Empty [| q * nB; rows |]
    let p = ws.Keep(outT.view(q, e))
    let dp = ws.Keep(dOutT.view(q, e))
    /// [1, L_0, ..., L_(K-1)] with L_j = [j < bin] (L_(K-1) = 0): the planes 1..K-1 are written by
    /// each pass, the first and the last are constant.
    let lower = ws.Empty [| k + 1L; e |]
    let y = ws.Empty [| rows; features |]
    let dx = ws.Empty [| rows; features |]
    let xb = ws.Empty [| nB; rows |]
    let gy = ws.Empty [| nB; rows |]
    let column (values: float[]) =
        use cpu = torch.tensor(values)
        ws.Empty([| int64 values.Length; 1L |]).copy_(cpu.view(-1L, 1L))
    /// The inner width knots from the widths' softmax s: X_i = -B + 2B (m i + (1 - m K) (s_0 + ...
    /// + s_(i-1))) for i = 1..K-1, the constant terms times s_0 + ... + s_(K-1) = 1 (Spline.knots).
    let innerKnots =
        let n = int k
        let m = Spline.minBinWidth
        let values =
            Array.init ((n - 1) * n) (fun c ->
                let i, j = c / n + 1, c % n
                2.0 * bound * m * float i - bound + (if j < i then 2.0 * bound * (1.0 - m * float n) else 0.0))
        use cpu = torch.tensor(values)
        ws.Empty([| k - 1L; k |]).copy_(cpu.view(k - 1L, k))
    let conditioningPart (t: Tensor) = ws.Keep(t.narrow(1L, conditioningStart, features - nB))
    let transformedPart (t: Tensor) = ws.Keep(t.narrow(1L, transformedStart, nB))
    do
        lower.select(0L, 0L).fill_(Scalars.One) |> ignore
        lower.select(0L, k).zero_() |> ignore
    member val Widths = widths
    member val Hidden = hidden
    member val HiddenT = hidden |> Array.map (fun h -> ws.Keep(h.t()))
    member val OutT = outT
    member val DOutT = dOutT
    member val DOutTT = ws.Keep(dOutT.t())
    /// Raw widths and heights [2, K, E], made their softmax in place.
    member val P2 = ws.Keep(p.narrow(0L, 0L, 2L * k).view(2L, k, e))
    /// Raw inner derivatives [K-1, E].
    member val PUd = ws.Keep(p.narrow(0L, 2L * k, k - 1L))
    member val DP2 = ws.Keep(dp.narrow(0L, 0L, 2L * k).view(2L, k, e))
    member val DPUd = ws.Keep(dp.narrow(0L, 2L * k, k - 1L))
    member val SoftW = ws.Keep(p.narrow(0L, 0L, k))
    member val Max = ws.Empty [| 2L; 1L; e |]
    member val InnerKnots = innerKnots
    member val Lower = lower
    member val LowerInner = ws.Keep(lower.narrow(0L, 1L, k - 1L))
    /// [L_0, ..., L_(K-1)] and [1, L_0, ..., L_(K-2)]: the one-hot of the bin is their difference.
    member val L = ws.Keep(lower.narrow(0L, 1L, k))
    member val LShifted = ws.Keep(lower.narrow(0L, 0L, k))
    /// Widths, heights: 2B (1 - m K), the scale of the softmax in a bin's size, and 2B m, its floor.
    member val Scale = column [| 2.0 * bound * (1.0 - Spline.minBinWidth * float k); 2.0 * bound * (1.0 - Spline.minBinHeight * float k) |]
    member val Floor = column [| 2.0 * bound * Spline.minBinWidth; 2.0 * bound * Spline.minBinHeight |]
    /// theta, 1 - theta from theta: [0, 1] + [1, -1] theta.
    member val Zero1 = column [| 0.0; 1.0 |]
    member val OneMinus1 = column [| 1.0; -1.0 |]
    member val Xb = xb
    member val XbFlat = ws.Keep(xb.view(e))
    member val Xc = ws.Empty [| e |]
    /// dL/d(softmax) coefficients of L and of the one-hot, widths and heights: [2, 2, E].
    member val Coefficients = ws.Empty [| 2L; 2L; e |]
    member val Gy = gy
    member val GyFlat = ws.Keep(gy.view(e))
    member val RowLd = ws.Empty [| rows |]
    member val OnesNB = ws.Ones nB
    member val OnesPerSample = ws.Ones ws.RowsPerSample
    member val OnesRows = ws.Ones rows
    /// The conditioner's output and its gradient row-major [rows, Q nB] (the same memory as OutT,
    /// DOutT), for the fused loops; what the forward loop keeps for the backward one; the bias's gradient.
    member val OutRows = ws.Keep(outT.view(rows, q * nB))
    member val DOutRows = ws.Keep(dOutT.view(rows, q * nB))
    member val DOutRowsT = ws.Keep(dOutT.view(rows, q * nB).t())
    member val Saved = ws.Empty [| 4L; e |]
    member val DBias = ws.Empty [| q * nB |]
    member val Y = y
    member val Ya = conditioningPart y
    member val Yb = transformedPart y
    member val Dx = dx
    member val Dxa = conditioningPart dx
    member val Dxb = transformedPart dx
    member _.Bins = k
    member _.Elements = e
    /// The fused loops' constants and pointers (the workspace's tensors stay where they are).
    member this.Constants : SplineConstants =
        { Bins = int k; Bound = bound
          FloorW = 2.0 * bound * Spline.minBinWidth; ScaleW = 2.0 * bound * (1.0 - Spline.minBinWidth * float k)
          FloorH = 2.0 * bound * Spline.minBinHeight; ScaleH = 2.0 * bound * (1.0 - Spline.minBinHeight * float k) }
    /// The fused loops' addresses: x_b (and dL/dy_b) as they lie, y_b and dL/dx_b into Y and Dx.
    /// <param name="x">The batch (unit stride along its rows).</param>
    /// <param name="bias">The conditioner's last bias.</param>
    /// <param name="dy">dL/dy (unit stride along its rows), or null in the forward pass.</param>
    member this.Rows(x: Tensor, bias: Tensor, dy: Tensor) : SplineRows =
        let size = nativeint (x.element_size())
        let column (t: Tensor) = TensorNative.dataPtr t + nativeint transformedStart * size
        { Rows = int rows; Width = int nB; Params = TensorNative.dataPtr outT; Bias = TensorNative.dataPtr bias
          X = column x; XStride = int (x.stride(0))
          Y = (if isNull dy then column y else column dy); YStride = (if isNull dy then int features else int (dy.stride(0)))
          RowLogDet = TensorNative.dataPtr this.RowLd; Saved = TensorNative.dataPtr this.Saved
          Dx = column dx; DxStride = int features; DParams = TensorNative.dataPtr dOutT; DBias = TensorNative.dataPtr this.DBias }

/// What a spline coupling's backward pass needs of its taped forward pass: the masks' products
/// with the softmax, the bin's quantities and the rational quadratic's intermediates, [E] each
/// (or [2, E]: widths and heights, or the knots above and below).
[<Sealed>]
type internal SplineTape(pass: SplinePass, generation: int64, xa: Tensor) =
    member _.Pass = pass
    member _.Generation = generation
    member _.Xa = xa
    member val Used = false with get, set
    /// Whether the fused CPU loops ran the pass (SplineKernel) rather than tensor operations, and
    /// the batch they read (again in the backward pass).
    member val Fused = false with get, set
    member val X : Tensor = null with get, set
    /// Whether x lies in [-B, B] (bool), and the same as 0 or 1 in the pass's dtype.
    member val Inside : Tensor = null with get, set
    member val InsideF : Tensor = null with get, set
    /// softmax * L and softmax * one-hot [2, K, E], and their sums over the bins [2, E].
    member val ProdL : Tensor = null with get, set
    member val ProdO : Tensor = null with get, set
    member val SumL : Tensor = null with get, set
    member val SumO : Tensor = null with get, set
    /// The one-hot's planes 0..K-2 and 1..K-1 [2, K-1, E] (the raw derivatives above and below the bin).
    member val OneHotPair : Tensor = null with get, set
    member val Wk : Tensor = null with get, set
    member val Hk : Tensor = null with get, set
    member val S : Tensor = null with get, set
    /// [theta, 1 - theta], their squares and product.
    member val Th2 : Tensor = null with get, set
    member val Sq2 : Tensor = null with get, set
    member val T1t : Tensor = null with get, set
    /// The derivatives at the knots above and below the bin [d_(k+1), d_k], and softplus' of their raw values.
    member val D2 : Tensor = null with get, set
    member val Sig2 : Tensor = null with get, set
    /// d_k + d_(k+1) - 2 s.
    member val Qv : Tensor = null with get, set
    member val Dn : Tensor = null with get, set
    member val N : Tensor = null with get, set
    member val R : Tensor = null with get, set
    member val A : Tensor = null with get, set
    member val Dydx : Tensor = null with get, set

/// The spline's maths on planes (Spline.apply, forward direction) and its backward pass, for
/// SplineCouplingStep. Knots and bins without a cumulative sum, a gather or a scatter: the inner
/// width knots are one small product with the softmax, the masks L_j = [j < bin] one comparison
/// with x, and the bin's quantities sums of the softmax (or raw derivatives) times L or the
/// one-hot; the backward pass is the same masks times per-element coefficients.
module internal SplinePlanes =
    /// y_b (transposed) and the log-det's row sums into the pass's tensors; fills the tape.
    /// The softmax of widths and heights in place of their raw values (P2).
    let softmax (p: SplinePass) =
        p.P2.amax([| 1L |], true, p.Max) |> ignore
        let soft = p.P2.sub_(p.Max).exp_()
        soft.div_(soft.sum(1L, true, Nullable())) |> ignore

    /// The log-det's per-sample sums of the elementwise log|dy/dx| [E].
    let addLogDet (p: SplinePass) (ld: Tensor) (logDet: Tensor) =
        p.RowLd.addmv_(ld.view(p.Xb.shape.[0], -1L).t(), p.OnesNB, 0.0f, 1.0f) |> ignore
        logDet.addmv_(p.RowLd.view(logDet.shape.[0], -1L), p.OnesPerSample, 1.0f, 1.0f) |> ignore

    /// y_b (transposed) and the log-det's row sums into the pass's tensors, after softmax and with
    /// x_b in Xb; fills the tape.
    let forward (p: SplinePass) (logDet: Tensor) (bound: float) (t: SplineTape) =
        let e = p.Elements
        let k = p.Bins
        let soft = p.P2
        // L_j = [X_(j+1) <= x], x clamped into [-B, B]; the one-hot of the bin; the sums.
        let xc = p.Xc.copy_(p.XbFlat).clamp_(scalar -bound, scalar bound)
        p.LowerInner.addmm_(p.InnerKnots, p.SoftW, 0.0f, 1.0f).sub_(xc).le_(Scalars.Of 0.0) |> ignore
        let oneHot = p.LShifted.sub(p.L)
        let prodL = soft.mul(p.L)
        let prodO = soft.mul(oneHot)
        let sumL, sumO = prodL.sum(1L, false, Nullable()), prodO.sum(1L, false, Nullable())
        let bin = p.L.sum(0L, false, Nullable())
        // Knot k and bin size of widths and heights: -B + 2B (m k + (1 - m K) sumL), 2B (m + (1 - m K) sumO).
        let knot = sumL.mul(p.Scale).addcmul_(p.Floor, bin, Scalars.One).sub_(scalar bound)
        let size = torch.addcmul(p.Floor, sumO, p.Scale, Scalars.One)
        let wk, hk = size.select(0L, 0L), size.select(0L, 1L)
        let theta = xc.sub(knot.select(0L, 0L)).div_(wk)
        let th2 = torch.addcmul(p.Zero1, p.OneMinus1, theta, Scalars.One)
        let s = hk.div(wk)
        // Raw derivatives above and below the bin (0 past either end: softplus(c) + min = 1 there).
        let pair = oneHot.as_strided([| 2L; k - 1L; e |], [| e; e; 1L |], oneHot.storage_offset())
        let shifted = pair.mul(p.PUd).sum(1L, false, Nullable()).add_(scalar Spline.derivativeShift, Scalars.One)
        let sig2 = shifted.sigmoid()
        let d2 = torch.nn.functional.logsigmoid(shifted.neg_()).neg_().add_(scalar Spline.minDerivative, Scalars.One)
        let dk1, dk = d2.select(0L, 0L), d2.select(0L, 1L)
        let sq2 = th2.mul(th2)
        let t1t = th2.select(0L, 0L).mul(th2.select(0L, 1L))
        let n = sq2.select(0L, 0L).mul(s).addcmul_(dk, t1t, Scalars.One)
        let qv = d2.sum(0L, false, Nullable()).add_(s, scalar -2.0)
        let dn = torch.addcmul(s, qv, t1t, Scalars.One)
        let r = n.div(dn)
        let yIn = torch.addcmul(knot.select(0L, 1L), hk, r, Scalars.One)
        let a = sq2.select(0L, 0L).mul(dk1).addcmul_(s, t1t, scalar 2.0).addcmul_(dk, sq2.select(0L, 1L), Scalars.One)
        let dydx = s.div(dn)
        dydx.mul_(dydx).mul_(a) |> ignore
        let inside = xc.eq(p.XbFlat)
        let insideF = inside.to_type(xc.dtype)
        let ld = dydx.log().mul_(insideF)
        p.Yb.copy_(torch.where(inside, yIn, p.XbFlat).view(p.Xb.shape.[0], -1L).t()) |> ignore
        addLogDet p ld logDet
        t.Inside <- inside; t.InsideF <- insideF; t.ProdL <- prodL; t.ProdO <- prodO; t.SumL <- sumL; t.SumO <- sumO
        t.OneHotPair <- pair; t.Wk <- wk; t.Hk <- hk; t.S <- s; t.Th2 <- th2; t.Sq2 <- sq2; t.T1t <- t1t
        t.D2 <- d2; t.Sig2 <- sig2; t.Qv <- qv; t.Dn <- dn; t.N <- n; t.R <- r; t.A <- a; t.Dydx <- dydx

    /// dL/d(raw parameters) into DOutT's spline planes; returns dL/dx_b [E].
    /// <param name="c">dL/dlogdet.</param>
    /// <param name="c2">2 dL/dlogdet.</param>
    let backward (t: SplineTape) (c: Scalar) (c2: Scalar) =
        let p = t.Pass
        let e = p.Elements
        let gy = p.GyFlat
        let invDn = t.Dn.reciprocal()
        let invA = t.A.reciprocal()
        let ghd = gy.mul(t.Hk).mul_(invDn).mul_(invDn)
        let theta, omt = t.Th2.select(0L, 0L), t.Th2.select(0L, 1L)
        let dk1, dk = t.D2.select(0L, 0L), t.D2.select(0L, 1L)
        let om2t = omt.sub(theta)
        // G_theta = gy wk dy/dx + gl dld/dtheta, dld/dtheta = 2 ((dk1 theta - dk (1 - theta) + s (1 - 2 theta)) / A - Q (1 - 2 theta) / Dn).
        let ldTheta = theta.mul(dk1).addcmul_(dk, omt, scalar -1.0).addcmul_(t.S, om2t, Scalars.One).mul_(invA)
        ldTheta.addcmul_(t.Qv.mul(om2t), invDn, scalar -1.0) |> ignore
        let gTheta = gy.mul(t.Wk).mul_(t.Dydx).add_(ldTheta, c2)
        // G_s = gy hk dR/ds + gl dld/ds: dR/ds = (theta^2 Dn - N (1 - 2 t1t)) / Dn^2, dld/ds = 2 (1/s + t1t/A - (1 - 2 t1t)/Dn).
        let o2 = t.T1t.mul(scalar -2.0).add_(Scalars.One, Scalars.One)
        let gS = t.Sq2.select(0L, 0L).mul(t.Dn).addcmul_(t.N, o2, scalar -1.0).mul_(ghd)
        gS.add_(t.S.reciprocal().addcmul_(t.T1t, invA, Scalars.One).addcmul_(o2, invDn, scalar -1.0), c2) |> ignore
        // Raw derivatives above and below: (gy hk dR/dd + gl dld/dd) softplus', dR/d[dk1, dk] = t1t [-N, Dn - N] / Dn^2,
        // dld/d[dk1, dk] = [theta^2, (1 - theta)^2] / A - 2 t1t / Dn; into their planes through the one-hot.
        let gd = t.N.expand(2L, e).neg()
        gd.select(0L, 1L).add_(t.Dn, Scalars.One) |> ignore
        gd.mul_(ghd.mul(t.T1t)).add_(t.Sq2.mul(invA).add_(t.T1t.mul(invDn), scalar -2.0), c).mul_(t.Sig2).mul_(t.InsideF) |> ignore
        p.DPUd.copy_(t.OneHotPair.select(0L, 0L)).mul_(gd.select(0L, 0L)).addcmul_(t.OneHotPair.select(0L, 1L), gd.select(0L, 1L), Scalars.One) |> ignore
        // Coefficients of L and of the one-hot: widths (x_k, w_k) -Scale [G_theta, theta G_theta + s G_s] / w_k,
        // heights (y_k, h_k) Scale [gy, gy R + G_s / w_k].
        let invW = t.Wk.reciprocal()
        let gThetaW = gTheta.mul_(invW)
        let coefL, coefO = p.Coefficients.select(0L, 0L), p.Coefficients.select(0L, 1L)
        coefL.select(0L, 0L).copy_(gThetaW).neg_() |> ignore
        coefL.select(0L, 1L).copy_(gy) |> ignore
        coefO.select(0L, 0L).copy_(t.S).mul_(gS).mul_(invW).addcmul_(theta, gThetaW, Scalars.One).neg_() |> ignore
        coefO.select(0L, 1L).copy_(gy).mul_(t.R).addcmul_(gS, invW, Scalars.One) |> ignore
        p.Coefficients.mul_(p.Scale).mul_(t.InsideF) |> ignore
        // Through the softmax: s (L coefL + onehot coefO - sum over the bins of the same).
        let total = t.SumL.mul(coefL).addcmul_(t.SumO, coefO, Scalars.One).neg_()
        p.DP2.copy_(p.P2).mul_(total.unsqueeze(1L)).addcmul_(t.ProdL, coefL.unsqueeze(1L), Scalars.One)
            .addcmul_(t.ProdO, coefO.unsqueeze(1L), Scalars.One) |> ignore
        // dL/dx_b: the spline's slope inside, the identity outside.
        torch.where(t.Inside, gThetaW, gy)

/// A rational-quadratic spline coupling (Spline.fs: K bins on [-B, B], identity tails) with a
/// perceptron conditioner by hand. Forward: the conditioner's last layer parameter-major, then the
/// spline on planes (SplinePlanes); backward: the spline's closed-form partial derivatives through
/// the same masks, then the perceptron's products with each weight's gradient accumulated in
/// place. Y, dL/dx and the planes are tensors the step keeps from pass to pass (a Workspace): a
/// tape serves one backward pass.
[<Sealed>]
type internal SplineCouplingStep(coupling: Coupling) =
    let eventShape = coupling.InputShape
    let struct (nA, nB) = coupling.Counts
    let struct (conditioningStart, transformedStart) = coupling.Starts
    let layers = coupling.PerceptronLayers
    let last = layers.[layers.Length - 1]
    let map = coupling.Map :?> RationalQuadratic
    let workspace = Workspace()
    let mutable pass : SplinePass = null
    let inputViews = ViewCache()
    let gradViews = ViewCache()

    /// The conditioner: hidden layers row-major; the last one row-major without its bias for the
    /// fused loops (which add it), else transposed into OutT with it.
    let conditioner (p: SplinePass) (xa: Tensor) (fused: bool) =
        for i in 0 .. layers.Length - 2 do
            let l = layers.[i]
            let input = if i = 0 then xa else p.Hidden.[i - 1]
            p.Hidden.[i].copy_(l.bias).addmm_(input, HandGradients.transposeOf l.weight, 1.0f, 1.0f).relu_() |> ignore
        if fused then
            let input = if layers.Length = 1 then xa else p.Hidden.[layers.Length - 2]
            p.OutRows.addmm_(input, HandGradients.transposeOf last.weight, 0.0f, 1.0f) |> ignore
        else
            let inputT = if layers.Length = 1 then xa.t() else p.HiddenT.[layers.Length - 2]
            p.OutT.copy_(last.bias.unsqueeze(1L)).addmm_(last.weight, inputT, 1.0f, 1.0f) |> ignore

    /// The perceptron's backward pass from dL/d(its output), [Q nB, rows] and [rows, Q nB] views of
    /// it (the layout the pass took), each gradient added in place; the fused loops summed the bias's.
    let conditionerBackward (p: SplinePass) (xa: Tensor) (dya: Tensor) (inputGradient: bool) (fused: bool) =
        let depth = layers.Length
        let lastInput = if depth = 1 then xa else p.Hidden.[depth - 2]
        let dOutQR, dOutRQ = if fused then p.DOutRowsT, p.DOutRows else p.DOutT, p.DOutTT
        (HandGradients.gradOf last.weight).addmm_(dOutQR, lastInput, 1.0f, 1.0f) |> ignore
        if fused then (HandGradients.gradOf last.bias).add_(p.DBias, Scalars.One) |> ignore
        else (HandGradients.gradOf last.bias).addmv_(p.DOutT, p.OnesRows, 1.0f, 1.0f) |> ignore
        if depth = 1 then
            if inputGradient then p.Dxa.copy_(dya).addmm_(dOutRQ, last.weight, 1.0f, 1.0f) |> ignore
        else
            // Through the last ReLU: times its output's sign, in place of that output.
            let product = workspace.Scratch(1, p.Widths.[depth - 2]).addmm_(dOutRQ, last.weight, 0.0f, 1.0f)
            let mutable dOut = lastInput.sign_().mul_(product)
            let mutable dOutT = p.HiddenT.[depth - 2]
            for i in depth - 2 .. -1 .. 0 do
                let l = layers.[i]
                let input = if i = 0 then xa else p.Hidden.[i - 1]
                (HandGradients.gradOf l.weight).addmm_(dOutT, input, 1.0f, 1.0f) |> ignore
                (HandGradients.gradOf l.bias).addmv_(dOutT, p.OnesRows, 1.0f, 1.0f) |> ignore
                if i > 0 then
                    let product = workspace.Scratch(1, p.Widths.[i - 1]).addmm_(dOut, l.weight, 0.0f, 1.0f)
                    dOut <- input.sign_().mul_(product)
                    dOutT <- p.HiddenT.[i - 1]
                elif inputGradient then
                    p.Dxa.copy_(dya).addmm_(dOut, l.weight, 1.0f, 1.0f) |> ignore

    /// Why the step cannot run this coupling (null: it can).
    static member Refusal(c: Coupling, x: Tensor) : string =
        if not (x.is_floating_point()) then "the batch is not floating point"
        elif c.ContextFeatures <> 0L then "a conditional coupling"
        elif c.Map.GetType() <> typeof<RationalQuadratic> then sprintf "its map is %s, not the rational-quadratic spline" c.Map.Name
        else CouplingSteps.structureRefusal c

    interface IHandStep with
        member _.Forward(x, logDet) =
            coupling.CheckShape(x, eventShape, "input")
            if not (workspace.Begin(x, logDet)) || isNull pass then
                use _normal = torch.inference_mode(false)
                pass <- SplinePass(workspace, layers |> Array.map (fun l -> l.weight.shape.[0]), eventShape.[0], nB,
                                   conditioningStart, transformedStart, map)
            let p = pass
            let v = inputViews.Of(x, fun x -> [| x.narrow(1L, conditioningStart, nA); x.narrow(1L, transformedStart, nB).t() |])
            let xa, xbT = v.[0], v.[1]
            let fused = SplineKernel.applies x nB && last.bias.is_contiguous()
            conditioner p xa fused
            let tape = SplineTape(p, workspace.Generation, xa)
            tape.Fused <- fused
            if fused then
                tape.X <- x
                if x.dtype = torch.float32 then SplineKernel.forward<float32> p.Constants (p.Rows(x, last.bias, null))
                else SplineKernel.forward<float> p.Constants (p.Rows(x, last.bias, null))
                logDet.addmv_(p.RowLd.view(logDet.shape.[0], -1L), p.OnesPerSample, 1.0f, 1.0f) |> ignore
            else
                SplinePlanes.softmax p
                p.Xb.copy_(xbT) |> ignore
                SplinePlanes.forward p logDet map.Bound tape
            p.Ya.copy_(xa) |> ignore
            struct (p.Y, box tape)
        member _.Backward(tape, dy, logDetGradient, inputGradient) =
            let tape = tape :?> SplineTape
            workspace.CheckTape(tape.Generation, tape.Used, coupling.Name)
            tape.Used <- true
            let p = tape.Pass
            let v = gradViews.Of(dy, fun g -> [| g.narrow(1L, conditioningStart, nA); g.narrow(1L, transformedStart, nB).t() |])
            let dya, dybT = v.[0], v.[1]
            if tape.Fused then
                // dL/dx_b goes straight into Dx.
                let g = if dy.stride(1) = 1L then dy else dy.contiguous()
                if g.dtype = torch.float32 then SplineKernel.backward<float32> p.Constants (p.Rows(tape.X, last.bias, g)) logDetGradient
                else SplineKernel.backward<float> p.Constants (p.Rows(tape.X, last.bias, g)) logDetGradient
            else
                p.Gy.copy_(dybT) |> ignore
                let c = Scalar.op_Implicit logDetGradient
                let c2 = Scalar.op_Implicit (2.0 * logDetGradient)
                let dxb =
                    try SplinePlanes.backward tape c c2
                    finally
                        c.Dispose()
                        c2.Dispose()
                if inputGradient then p.Dxb.copy_(dxb.view(nB, -1L).t()) |> ignore
            conditionerBackward p tape.Xa dya inputGradient tape.Fused
            if inputGradient then p.Dx else null
        member _.Release() =
            workspace.Clear()
            inputViews.Clear()
            gradViews.Clear()
            pass <- null
