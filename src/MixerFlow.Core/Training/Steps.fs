namespace MixerFlow.Core

open System
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core.Ops

/// What the hand-written coupling steps (affine, spline) share.
module internal CouplingSteps =
    /// Why a coupling's structure keeps it from a hand-written step (null: it does not): halves
    /// that are runs of consecutive slices, vector events, a float perceptron conditioner whose
    /// parameters all take a gradient.
    let structureRefusal (c: Coupling) : string =
        let struct (a, b) = c.Starts
        if a < 0L || b < 0L then "its partition's halves are not runs of consecutive slices"
        elif c.InputShape.Length <> 1 then "its events are not vectors"
        elif isNull c.PerceptronLayers then "its conditioner is not a perceptron (Linear, ReLU, ..., Linear with biases)"
        elif (c.Conditioner :?> ReluNetwork).ComputeType.HasValue then "its conditioner computes in a reduced type"
        // Frozen parameters get no gradient from autograd; this backward would give them one.
        elif not (c.PerceptronLayers |> Array.forall (fun l -> l.weight.requires_grad && l.bias.requires_grad)) then
            "a frozen parameter (autograd gives it no gradient)"
        else null

/// The tensors of an affine coupling's hand-written pass for one batch layout (rows of
/// `samples` samples, dtype, device), kept in a Workspace: the ReLU outputs (overwritten by their
/// gradients in the backward pass), the conditioner's output [shift | raw], the clamp's slope,
/// exp(s), y, dL/dx and dL/d(conditioner output), with the views of them that the pass uses.
[<Sealed; AllowNullLiteral>]
type internal AffinePass(ws: Workspace, widths: int64[], features: int64, nB: int64,
                         conditioningStart: int64, transformedStart: int64) =
    let rows = ws.Rows
    let hidden = [| for i in 0 .. widths.Length - 2 -> ws.Empty [| rows; widths.[i] |] |]
    let hiddenT = hidden |> Array.map (fun h -> ws.Keep(h.t()))
    let out = ws.Empty [| rows; 2L * nB |]
    let scale = ws.Empty [| rows; nB |]
    let y = ws.Empty [| rows; features |]
    let dx = ws.Empty [| rows; features |]
    let dOut = ws.Empty [| rows; 2L * nB |]
    let conditioningPart (t: Tensor) = ws.Keep(t.narrow(1L, conditioningStart, features - nB))
    let transformedPart (t: Tensor) = ws.Keep(t.narrow(1L, transformedStart, nB))
    /// Each Linear's output width.
    member val Widths = widths
    member val Hidden = hidden
    member val HiddenT = hiddenT
    member val Out = out
    member val Shift = ws.Keep(out.narrow(1L, 0L, nB))
    member val Raw = ws.Keep(out.narrow(1L, nB, nB))
    member val Scale = scale
    /// tanh(raw / c), then the clamp's slope 1 - tanh^2.
    member val Slope = ws.Empty [| rows; nB |]
    /// exp(s)'s tensor read as [samples, rows per sample * nB] (s while the log-det is taken).
    member val ScaleBySample = ws.Keep(scale.view(ws.Samples, -1L))
    member val OnesLogDet = ws.Ones(ws.RowsPerSample * nB)
    member val OnesRows = ws.Ones rows
    member val Y = y
    member val Ya = conditioningPart y
    member val Yb = transformedPart y
    member val Dx = dx
    member val Dxa = conditioningPart dx
    member val Dxb = transformedPart dx
    member val DOut = dOut
    member val DOutT = ws.Keep(dOut.t())
    member val DShift = ws.Keep(dOut.narrow(1L, 0L, nB))
    member val DRaw = ws.Keep(dOut.narrow(1L, nB, nB))

/// What an affine coupling's backward pass needs of its taped forward pass.
[<Sealed>]
type internal AffineTape(pass: AffinePass, generation: int64, xa: Tensor, xb: Tensor) =
    member _.Pass = pass
    member _.Generation = generation
    member _.Xa = xa
    member _.Xb = xb
    member val Used = false with get, set

/// An affine coupling with a soft-clamped scale and a perceptron conditioner by hand:
/// forward y_b = x_b * exp(s) + t, s = c tanh(r / c), (t, r) = net(x_a); backward
/// dx_b = dy_b exp(s), dt = dy_b, dr = (dx_b x_b + dL/dlogdet) (1 - tanh^2), then the
/// perceptron's products, each weight gradient accumulated in place (addmm_). Every result is
/// written in place into tensors the step keeps from pass to pass (a Workspace): a pass makes
/// no new tensor once the first has made them, and a tape serves one backward pass.
[<Sealed>]
type internal AffineCouplingStep(coupling: Coupling) =
    let eventShape = coupling.InputShape
    let struct (nA, nB) = coupling.Counts
    let struct (conditioningStart, transformedStart) = coupling.Starts
    let layers = coupling.PerceptronLayers
    let limit = scalar (coupling.Map :?> Affine).ScaleBound.Limit
    let workspace = Workspace()
    let mutable pass : AffinePass = null
    let inputViews = ViewCache()
    let gradViews = ViewCache()

    /// Why the step cannot run this coupling (null: it can).
    static member Refusal(c: Coupling, x: Tensor) : string =
        if not (x.is_floating_point()) then "the batch is not floating point"
        elif c.ContextFeatures <> 0L then "a conditional coupling"
        elif not c.IsAffine then sprintf "its map is %s, not the affine one" c.Map.Name
        elif (c.Map :?> Affine).ScaleBound.IsSigmoid then "its scale is bounded by a sigmoid, not soft-clamped"
        else CouplingSteps.structureRefusal c

    interface IHandStep with
        member _.Forward(x, logDet) =
            coupling.CheckShape(x, eventShape, "input")
            if not (workspace.Begin(x, logDet)) || isNull pass then
                use _normal = torch.inference_mode(false)
                pass <- AffinePass(workspace, layers |> Array.map (fun l -> l.weight.shape.[0]),
                                   eventShape.[0], nB, conditioningStart, transformedStart)
            let p = pass
            let v = inputViews.Of(x, fun x -> [| x.narrow(1L, conditioningStart, nA); x.narrow(1L, transformedStart, nB) |])
            let xa, xb = v.[0], v.[1]
            for i in 0 .. layers.Length - 1 do
                let l = layers.[i]
                let input = if i = 0 then xa else p.Hidden.[i - 1]
                let target = if i < layers.Length - 1 then p.Hidden.[i] else p.Out
                target.copy_(l.bias).addmm_(input, HandGradients.transposeOf l.weight, 1.0f, 1.0f) |> ignore
                if i < layers.Length - 1 then target.relu_() |> ignore
            // The elementwise work runs on contiguous tensors: LibTorch runs an op with a strided
            // operand (a half of a row) row by row, about three times slower here, so each half
            // is read or written once. t = tanh(raw / c); s = c t into Scale, its rows' sums into logDet.
            let t = p.Slope.copy_(p.Raw).div_(limit).tanh_()
            p.Scale.copy_(t).mul_(limit) |> ignore
            logDet.addmv_(p.ScaleBySample, p.OnesLogDet, 1.0f, 1.0f) |> ignore
            p.Scale.exp_() |> ignore
            // t becomes ds/draw = 1 - t^2, all the backward needs of it.
            t.mul_(t).neg_().add_(Scalars.One, Scalars.One) |> ignore
            p.Yb.copy_(p.Shift).addcmul_(xb, p.Scale, Scalars.One) |> ignore
            p.Ya.copy_(xa) |> ignore
            struct (p.Y, box (AffineTape(p, workspace.Generation, xa, xb)))
        member _.Backward(tape, dy, logDetGradient, inputGradient) =
            let tape = tape :?> AffineTape
            workspace.CheckTape(tape.Generation, tape.Used, coupling.Name)
            tape.Used <- true
            let p = tape.Pass
            let v = gradViews.Of(dy, fun g -> [| g.narrow(1L, conditioningStart, nA); g.narrow(1L, transformedStart, nB) |])
            let dya, dyb = v.[0], v.[1]
            // dx_b = dy_b exp(s), on a contiguous temporary (see the forward pass), then into dx.
            let dxb = workspace.Scratch(0, nB).copy_(dyb).mul_(p.Scale)
            p.Dxb.copy_(dxb) |> ignore
            p.DShift.copy_(dyb) |> ignore
            // dL/dr = (dL/ds) (1 - tanh^2), dL/ds = dy_b x_b exp(s) + dL/dlogdet.
            let c = Scalar.op_Implicit logDetGradient
            try p.DRaw.copy_(dxb.mul_(tape.Xb).add_(c, Scalars.One).mul_(p.Slope)) |> ignore
            finally c.Dispose()
            let mutable dOut = p.DOut
            let mutable dOutT = p.DOutT
            for i in layers.Length - 1 .. -1 .. 0 do
                let l = layers.[i]
                let input = if i = 0 then tape.Xa else p.Hidden.[i - 1]
                (HandGradients.gradOf l.weight).addmm_(dOutT, input, 1.0f, 1.0f) |> ignore
                (HandGradients.gradOf l.bias).addmv_(dOutT, p.OnesRows, 1.0f, 1.0f) |> ignore
                if i > 0 then
                    // Through the ReLU: times its output's sign (0 where it is 0, else 1), in place
                    // of that output, which nothing needs any more. (LibTorch's masked_fill_ runs a
                    // scalar loop, far slower here.)
                    let product = workspace.Scratch(1, p.Widths.[i - 1]).addmm_(dOut, l.weight, 0.0f, 1.0f)
                    dOut <- input.sign_().mul_(product)
                    dOutT <- p.HiddenT.[i - 1]
                elif inputGradient then
                    p.Dxa.copy_(dya).addmm_(dOut, l.weight, 1.0f, 1.0f) |> ignore
            if inputGradient then p.Dx else null
        member _.Release() =
            workspace.Clear()
            inputViews.Clear()
            gradViews.Clear()
            pass <- null

/// ActNorm by hand (a first pass in training mode initialises the parameters from its batch, as
/// Forward does): dx = dy exp(logScale), dL/dbias = the sum of dx over the shared positions and
/// samples, dL/dlogScale = the sum of dy * y plus dL/dlogdet for each of the rows' positions. y, dx
/// and the temporaries are tensors the step keeps from pass to pass (a Workspace): a tape serves
/// one backward pass.
[<Sealed>]
type internal ActNormStep(norm: ActNorm) =
    let eventShape = norm.InputShape
    let dims = norm.SharedDims
    let positions = norm.Positions
    let workspace = Workspace()
    let mutable pass : Tensor[] = null
    /// Why the step cannot run this layer (null: it can).
    static member Refusal(a: ActNorm, x: Tensor) : string =
        if not (x.is_floating_point()) then "the batch is not floating point"
        // Frozen parameters get no gradient from autograd; this backward would give them one.
        elif not (a.Bias.requires_grad && a.LogScale.requires_grad) then "a frozen parameter (autograd gives it no gradient)"
        else null
    interface IHandStep with
        member _.Forward(x, logDet) =
            norm.CheckShape(x, eventShape, "input")
            if norm.training && not norm.IsInitialized then norm.InitializeFrom x
            if not (workspace.Begin(x, logDet)) || isNull pass then
                let shape = Array.append [| workspace.Rows |] eventShape
                pass <- [| workspace.Empty norm.ParameterShape; workspace.Empty shape; workspace.Empty shape; workspace.Empty shape |]
            let scale, y = pass.[0], pass.[1]
            scale.copy_(norm.LogScale).exp_() |> ignore
            y.copy_(x).add_(norm.Bias, Scalars.One).mul_(scale) |> ignore
            let perSample = Scalar.op_Implicit(positions * float workspace.RowsPerSample)
            try logDet.add_(norm.LogScale.sum(), perSample) |> ignore
            finally perSample.Dispose()
            struct (y, box struct (pass, workspace.Generation))
        member _.Backward(tape, dy, logDetGradient, inputGradient) =
            let struct (taped, generation) = tape :?> struct (Tensor[] * int64)
            workspace.CheckTape(generation, false, norm.Name)
            let scale, y, dx, product = taped.[0], taped.[1], taped.[2], taped.[3]
            dx.copy_(dy).mul_(scale) |> ignore
            (let g = HandGradients.gradOf norm.Bias in g.add_(dx.sum(dims, keepdim = true), Scalars.One) |> ignore)
            let perRow = Scalar.op_Implicit(logDetGradient * positions * float workspace.Rows)
            (let g = HandGradients.gradOf norm.LogScale
             try g.add_(product.copy_(dy).mul_(y).sum(dims, keepdim = true), Scalars.One).add_(perRow, Scalars.One) |> ignore
             finally perRow.Dispose())
            if inputGradient then dx else null
        member _.Release() =
            workspace.Clear()
            pass <- null

/// Uniform dequantisation by hand: the forward pass as it is (noise included); dL/dx = dL/dy / levels.
[<Sealed>]
type internal DequantizeStep(d: Dequantize) =
    interface IHandStep with
        member _.Forward(x, logDet) =
            let y = d.Dequantized x
            let perSample = Scalar.op_Implicit(-d.LogLevels * float (HandGradients.rowsPerSample x logDet))
            try logDet.add_(perSample, Scalars.One) |> ignore
            finally perSample.Dispose()
            struct (y, null)
        member _.Backward(_tape, dy, _logDetGradient, inputGradient) =
            if inputGradient then dy.div(scalar (float d.Levels)) else null
        member _.Release() = ()

/// The logit by hand. With p = alpha + (1 - 2 alpha) x: dy/dx = (1 - 2 alpha) / (p (1 - p)) and
/// d(log|dy/dx|)/dx = (1 - 2 alpha) (2 p - 1) / (p (1 - p)), so
/// dL/dx = (1 - 2 alpha) (dL/dy + dL/dlogdet (2 p - 1)) / (p (1 - p)).
[<Sealed>]
type internal LogitStep(logit: Logit) =
    let alpha = logit.Alpha
    let eventShape = logit.InputShape
    interface IHandStep with
        member _.Forward(x, logDet) =
            logit.CheckShape(x, eventShape, "input")
            let p = (x * scalar (1.0 - 2.0 * alpha)).add_(scalar alpha, Scalars.One)
            let logP = p.log()
            let log1mP = p.neg().add_(Scalars.One, Scalars.One).log()
            let y = logP - log1mP
            let ld = logP.add_(log1mP, Scalars.One).neg_().add_(scalar (Math.Log(1.0 - 2.0 * alpha)), Scalars.One)
            HandGradients.addRowSums logDet ld
            struct (y, box p)
        member _.Backward(tape, dy, logDetGradient, inputGradient) =
            if not inputGradient then null
            else
                let p = tape :?> Tensor
                let c = Scalar.op_Implicit logDetGradient
                // (2 p - 1) c + dy, times (1 - 2 alpha), over p (1 - p).
                let numerator =
                    try p.mul(scalar 2.0).add_(scalar -1.0, Scalars.One).mul_(c).add_(dy, Scalars.One).mul_(scalar (1.0 - 2.0 * alpha))
                    finally c.Dispose()
                numerator.div_(p.mul(p.neg().add_(Scalars.One, Scalars.One)))
        member _.Release() = ()
