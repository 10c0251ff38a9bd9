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
