/// Deliberately broken bijectors: each gets one thing wrong, and the checks must say so.
module MixerFlow.Properties.Broken

open System
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core
open MixerFlow.Checks
open MixerFlow.Core.Ops

/// A correct elementwise affine map y = x * exp(s) + t, with the defects switched on by flags.
type FaultyAffine(dim: int64, fault: string) as this =
    inherit Bijector("Faulty(" + fault + ")", [| dim |], [| dim |])
    let logScale = new Parameter(torch.randn(dim) * scalar 0.5)
    let shift = new Parameter(torch.randn(dim))
    let unused = new Parameter(torch.randn(dim))
    do
        this.register_parameter("logScale", logScale)
        this.register_parameter("shift", shift)
        if fault = "unused-parameter" then this.register_parameter("unused", unused)
    override this.Forward(x) =
        let y = x * logScale.exp() + shift
        let ld = constantLogDet x (logScale.sum())
        let y =
            match fault with
            // Mixes samples: each output depends on the batch mean.
            | "batch-mixing" -> y + x.mean([| 0L |], keepdim = true) * scalar 0.1
            // Touches an element a coupling should leave alone, through another one.
            | "leaky-structure" -> torch.cat([| y.narrow(1L, 0L, 1L) + x.narrow(1L, dim - 1L, 1L) * scalar 0.01; y.narrow(1L, 1L, dim - 1L) |], 1L)
            | _ -> y
        let ld =
            match fault with
            | "wrong-sign" -> ld.neg()
            | "offset" -> ld + scalar 0.1
            | _ -> ld
        Transformed(y, ld)
    override this.Inverse(y) =
        let x = (y - shift) * logScale.neg().exp()
        let x = if fault = "sloppy-inverse" then x * scalar (1.0 + 1e-3) else x
        Transformed(x, constantLogDet y (logScale.sum().neg()))
    member internal _.LogScale = logScale
    member internal _.Shift = shift
    member _.Fault = fault
    interface IJacobianStructure with
        member _.StructureDescription = "claims element 0 passes unchanged"
        member _.ExpectedJacobian() =
            let n = int dim
            let j = Array2D.create n n Double.NaN
            if fault = "leaky-structure" then
                for c in 0 .. n - 1 do j.[0, c] <- if c = 0 then 1.0 else 0.0
            j

/// FaultyAffine's hand-written step: right for the healthy map, and for "hand-gradient" it forgets
/// the log-det's share of dL/dlogScale (the mistake that is easiest to make).
type FaultyStep(b: FaultyAffine) =
    interface IHandStep with
        member _.Forward(x, logDet) =
            let r = b.Forward x
            logDet.add_(r.LogDet, Scalars.One) |> ignore
            struct (r.Value, box x)
        member _.Backward(tape, dy, logDetGradient, inputGradient) =
            let x = tape :?> Tensor
            let scale = b.LogScale.exp()
            use g = b.Shift.grad
            (if isNull g then b.Shift.grad <- dy.sum(0L) else g.add_(dy.sum(0L), Scalars.One) |> ignore)
            let dLogScale = (dy * x * scale).sum(0L)
            let dLogScale =
                if b.Fault = "hand-gradient" then dLogScale
                else
                    use perSample = Scalar.op_Implicit(logDetGradient * float x.shape.[0])
                    dLogScale.add_(perSample, Scalars.One)
            use g = b.LogScale.grad
            (if isNull g then b.LogScale.grad <- dLogScale else g.add_(dLogScale, Scalars.One) |> ignore)
            if inputGradient then dy * scale else null
        member _.Release() = ()

/// FaultyAffine's rule, registered on first use (a test bijector: no other type is touched).
let private registration =
    lazy (HandRules.Register<FaultyAffine>("faulty affine", null, Func<FaultyAffine, HandPlanner, IHandStep>(fun b _ -> FaultyStep b :> IHandStep)))
/// Registers FaultyAffine's rule once.
let registerRule () = registration.Force()

/// A Partial (correct maths) whose hand-written step forgets the passed-through slices' dL/dy:
/// its dL/dx holds zeros there, the mistake a split's backward is easiest to make.
type ForgetfulPartial(eventShape: int64[], axis: int, count: int64, inner: Bijector) =
    inherit Partial(eventShape, axis, count, inner)

/// ForgetfulPartial's step: the inner step on the first slices, zeros for the rest's gradient.
type ForgetfulPartialStep(p: ForgetfulPartial, inner: IHandStep) =
    let dim = int64 p.Axis + 1L
    interface IHandStep with
        member _.Forward(x, logDet) =
            let struct (head, tape) = inner.Forward(x.narrow(dim, 0L, p.Count).contiguous(), logDet)
            struct (torch.cat([| head; x.narrow(dim, p.Count, x.shape.[int dim] - p.Count) |], dim), tape)
        member _.Backward(tape, dy, logDetGradient, inputGradient) =
            let dx = inner.Backward(tape, dy.narrow(dim, 0L, p.Count), logDetGradient, inputGradient)
            if isNull dx then null
            else torch.cat([| dx; torch.zeros_like(dy.narrow(dim, p.Count, dy.shape.[int dim] - p.Count)) |], dim)
        member _.Release() = inner.Release()

let private partialRegistration =
    lazy (HandRules.Register<ForgetfulPartial>("forgetful partial", null,
            Func<ForgetfulPartial, HandPlanner, IHandStep>(fun p planner -> ForgetfulPartialStep(p, planner.Compile p.Inner) :> IHandStep)))

/// A Partial along the columns of a matrix [p, d] with an affine coupling of each row's first k
/// values inside: the correct one, or (forgetful) the one whose hand-written step drops the rest's gradient.
let partialSpec (forgetful: bool) =
    partialRegistration.Force()
    BijectorSpec((if forgetful then "broken-partial-step" else "partial-step"), Func<Random, Bijector>(fun r ->
        let p, d = int64 (r.Next(2, 4)), int64 (r.Next(4, 7))
        let k = d / 2L
        let inner = new RowWise(p, new AffineCoupling([| k |], Partition.Halves k, Conditioners.Mlp(6L, 1)))
        if forgetful then new ForgetfulPartial([| p; d |], 1, k, inner) :> Bijector
        else new Partial([| p; d |], 1, k, inner) :> Bijector))

/// A bijector whose save/load loses a buffer: the offset is a plain field, not registered.
type ForgetfulShift(dim: int64) =
    inherit Bijector("ForgetfulShift", [| dim |], [| dim |])
    let offset = torch.randn(dim)
    override _.Forward(x) = Transformed(x + offset, zeroLogDet x)
    override _.Inverse(y) = Transformed(y - offset, zeroLogDet y)

let spec fault =
    registerRule ()
    BijectorSpec("broken-" + fault, Func<Random, Bijector>(fun r -> new FaultyAffine(int64 (r.Next(2, 6)), fault)))
let forgetful = BijectorSpec("broken-forgetful", Func<Random, Bijector>(fun r -> new ForgetfulShift(int64 (r.Next(2, 6)))))
