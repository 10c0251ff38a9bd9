namespace MixerFlow.Core

open System
open System.IO
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules

/// Adam (Kingma & Ba 2015) for training flows, free of TorchSharp's Scalar race.
///
/// `torch.optim.Adam.step` passes its per-step coefficients to native code as temporary Scalars
/// that nothing keeps alive, so a garbage collection on any thread during the update can free
/// one mid-op (see <see cref="Scalars"/>). This optimiser does the same update as
/// `torch.optim.Adam` (no weight decay, no AMSGrad): constants come from the Scalar cache and
/// the per-step step size and bias correction are Scalars held by `use` until the update
/// returns. Its state is saved in TorchSharp Adam's binary format (`save_state_dict`), so
/// checkpoints written with either load into the other.
///
/// <param name="parameters">The parameters to train (one group).</param>
/// <param name="learningRate">The learning rate; <see cref="LearningRate"/> changes it between steps.</param>
/// <param name="beta1">Decay of the gradient's running mean (default 0.9).</param>
/// <param name="beta2">Decay of the squared gradient's running mean (default 0.999).</param>
/// <param name="eps">Added to the denominator (default 1e-8).</param>
[<Sealed>]
type Adam(parameters: Parameter seq, learningRate: float, [<Optional; DefaultParameterValue(0.9)>] beta1: float,
          [<Optional; DefaultParameterValue(0.999)>] beta2: float, [<Optional; DefaultParameterValue(1e-8)>] eps: float) =
    do
        if isNull parameters then nullArg "parameters"
        let positive name (v: float) = if not (v > 0.0) || Double.IsInfinity v then invalidArg name (sprintf "must be a positive finite number, got %g" v)
        positive "learningRate" learningRate
        positive "eps" eps
        if not (beta1 >= 0.0 && beta1 < 1.0) then invalidArg "beta1" (sprintf "must be in [0, 1), got %g" beta1)
        if not (beta2 >= 0.0 && beta2 < 1.0) then invalidArg "beta2" (sprintf "must be in [0, 1), got %g" beta2)
    let ps = Seq.toArray parameters
    let zerosLike (p: Parameter) = torch.zeros_like(p).DetachFromDisposeScope()
    let expAvg = ps |> Array.map zerosLike
    let expAvgSq = ps |> Array.map zerosLike
    let steps : int64[] = Array.zeroCreate ps.Length
    let initialLearningRate = learningRate
    let mutable lr = learningRate
    let mutable disposed = false

    /// The parameters, in the order of the saved state.
    member _.Parameters : Collections.Generic.IReadOnlyList<Parameter> = ps :> _
    /// The learning rate of the next <see cref="Step"/>.
    member _.LearningRate
        with get () = lr
        and set (v: float) =
            if not (v >= 0.0) || Double.IsInfinity v then invalidArg "value" (sprintf "learning rate must be a finite number >= 0, got %g" v)
            lr <- v
    member _.Beta1 = beta1
    member _.Beta2 = beta2
    member _.Eps = eps
    /// Steps taken by each parameter (those without a gradient at a step are not counted).
    member _.StepCounts : Collections.Generic.IReadOnlyList<int64> = steps :> _

    /// Clears the gradients (sets them to none, as PyTorch's default `zero_grad` does).
    member _.ZeroGrad() =
        // Setting is enough: reading `grad` first would create a handle per parameter.
        for p in ps do p.grad <- null

    /// One Adam update of every parameter that has a gradient.
    member this.Step() =
        if disposed then raise (ObjectDisposedException "Adam")
        use _noGrad = torch.no_grad()
        use _scope = torch.NewDisposeScope()
        let oneMinusBeta1 = Scalars.Of(1.0 - beta1)
        let oneMinusBeta2 = Scalars.Of(1.0 - beta2)
        for i in 0 .. ps.Length - 1 do
            let p = ps.[i]
            let grad = p.grad
            if not (isNull grad) then
                steps.[i] <- steps.[i] + 1L
                let biasCorrection1 = 1.0 - Math.Pow(beta1, float steps.[i])
                let biasCorrection2 = 1.0 - Math.Pow(beta2, float steps.[i])
                expAvg.[i].mul_(Scalars.Of beta1).add_(grad, oneMinusBeta1) |> ignore
                expAvgSq.[i].mul_(Scalars.Of beta2).addcmul_(grad, grad, oneMinusBeta2) |> ignore
                // Per-step values: referenced until the native calls below have returned, then freed.
                let sqrtBiasCorrection2 = Scalar.op_Implicit(Math.Sqrt biasCorrection2)
                let negativeStepSize = Scalar.op_Implicit(-lr / biasCorrection1)
                try
                    let denominator = expAvgSq.[i].sqrt().div_(sqrtBiasCorrection2).add_(Scalars.Of eps, Scalars.One)
                    p.addcdiv_(expAvg.[i], denominator, negativeStepSize) |> ignore
                finally
                    sqrtBiasCorrection2.Dispose()
                    negativeStepSize.Dispose()
        GC.KeepAlive this

    /// Writes the state in TorchSharp Adam's `save_state_dict` format.
    member _.SaveState(writer: BinaryWriter) =
        if isNull writer then nullArg "writer"
        writer.Write "Adam"
        writer.Write 1uy // LEB128 1: one parameter group
        Adam.WriteLeb128(writer, int64 ps.Length)
        writer.Write initialLearningRate
        writer.Write lr
        writer.Write beta1
        writer.Write beta2
        writer.Write eps
        writer.Write 0.0 // weight decay
        writer.Write false // amsgrad
        writer.Write false // maximize
        for i in 0 .. ps.Length - 1 do
            writer.Write steps.[i]
            TensorExtensionMethods.Save(expAvg.[i], writer)
            TensorExtensionMethods.Save(expAvgSq.[i], writer)
            writer.Write false // no AMSGrad maximum

    /// Reads state written by <see cref="SaveState"/> or by TorchSharp Adam's `save_state_dict`
    /// for the same parameters. Throws InvalidDataException when it does not fit.
    member _.LoadState(reader: BinaryReader) =
        if isNull reader then nullArg "reader"
        let fail (what: string) = raise (InvalidDataException("optimiser state: " + what))
        let name = reader.ReadString()
        if name <> "Adam" then fail (sprintf "written by the optimiser '%s', expected 'Adam'" name)
        let groups = Adam.ReadLeb128 reader
        let states = Adam.ReadLeb128 reader
        if groups <> 1L then fail (sprintf "%d parameter groups, expected 1" groups)
        if states <> int64 ps.Length then fail (sprintf "%d parameters, the model has %d" states ps.Length)
        reader.ReadDouble() |> ignore // initial learning rate
        lr <- reader.ReadDouble()
        reader.ReadDouble() |> ignore // beta1
        reader.ReadDouble() |> ignore // beta2
        reader.ReadDouble() |> ignore // eps
        let weightDecay = reader.ReadDouble()
        let amsgrad = reader.ReadBoolean()
        reader.ReadBoolean() |> ignore // maximize
        if weightDecay <> 0.0 || amsgrad then fail "weight decay or AMSGrad, which this Adam does not do"
        for i in 0 .. ps.Length - 1 do
            steps.[i] <- reader.ReadInt64()
            TensorExtensionMethods.Load(expAvg.[i], reader)
            TensorExtensionMethods.Load(expAvgSq.[i], reader)
            if reader.ReadBoolean() then fail "an AMSGrad maximum, which this Adam does not keep"

    static member private WriteLeb128(writer: BinaryWriter, value: int64) =
        let mutable v = value
        let mutable go = true
        while go do
            let b = byte (v &&& 0x7fL)
            v <- v >>> 7
            if v = 0L then
                writer.Write b
                go <- false
            else writer.Write(b ||| 0x80uy)

    static member private ReadLeb128(reader: BinaryReader) : int64 =
        let mutable result = 0L
        let mutable shift = 0
        let mutable go = true
        while go do
            let b = int64 (reader.ReadByte())
            if shift > 56 then raise (InvalidDataException "optimiser state: a count that does not fit")
            result <- result + ((b &&& 0x7fL) <<< shift)
            shift <- shift + 7
            go <- (b &&& 0x80L) <> 0L
        result

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                for t in Array.append expAvg expAvgSq do t.Dispose()
