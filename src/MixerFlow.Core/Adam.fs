namespace MixerFlow.Core

open System
open System.IO
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules

/// Adam (Kingma & Ba 2015) for training flows, over flat buffers and free of TorchSharp's Scalar race.
///
/// **Flat buffers.** At construction the parameters are moved into one contiguous buffer (each
/// parameter becomes a view of it, in place: references to the parameters stay valid) and their
/// gradients into another, so that a step is six tensor operations whatever the number of
/// parameters, instead of several per parameter, and <see cref="ClipGradientNorm"/> is two. The
/// parameters must share one dtype and device. Whenever a parameter or gradient no longer lives in
/// the buffer (something replaced it: `set_`, `grad = ...`, a zero_grad that set it to none) the
/// next step notices it (one address comparison per parameter) and moves it back, so the update
/// stays right. A parameter that does not require a gradient, or whose gradient is none, is left
/// alone and its step is not counted, as in torch.optim.Adam (such steps go parameter by parameter).
/// A parameter that takes no part in a step's loss has a zero gradient after <see cref="ZeroGrad"/>,
/// not none, so Adam's running averages still move it: the one difference from torch.optim.Adam.
///
/// **Scalars.** `torch.optim.Adam.step` passes its per-step coefficients to native code as temporary
/// Scalars that nothing keeps alive, so a garbage collection on any thread during the update can free
/// one mid-op (see <see cref="Scalars"/>). Here constants come from the Scalar cache and the
/// per-step step size and bias correction are Scalars held by `use` until the update returns.
///
/// It does the same update as `torch.optim.Adam` (no weight decay, no AMSGrad). Its state is saved
/// in TorchSharp Adam's binary format (`save_state_dict`), so checkpoints written with either load
/// into the other.
///
/// <param name="parameters">The parameters to train (one group; one dtype and device).</param>
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
    do
        if ps |> Array.exists isNull then invalidArg "parameters" "contains null"
        if ps.Length > 1 then
            let d0, dev0 = ps.[0].dtype, ps.[0].device.ToString()
            match ps |> Array.tryFindIndex (fun p -> p.dtype <> d0 || p.device.ToString() <> dev0) with
            | Some i ->
                invalidArg "parameters"
                    (sprintf "parameters must share one dtype and device: parameter 0 is %O on %s, parameter %d is %O on %s"
                        d0 dev0 i ps.[i].dtype (ps.[i].device.ToString()))
            | None -> ()
    let shapes = ps |> Array.map (fun p -> p.shape)
    let sizes = ps |> Array.map (fun p -> p.numel())
    let offsets = Array.scan (+) 0L sizes
    let total = offsets.[ps.Length]
    let keep (t: torch.Tensor) = t.DetachFromDisposeScope()
    let flatOf (like: torch.Tensor) = keep (torch.zeros(total, dtype = like.dtype, device = like.device))
    let flatParam, flatGrad, expAvg, expAvgSq =
        if ps.Length = 0 then null, null, null, null
        else flatOf ps.[0], flatOf ps.[0], flatOf ps.[0], flatOf ps.[0]
    let viewsOf (flat: torch.Tensor) =
        Array.init ps.Length (fun i -> keep (flat.narrow(0L, offsets.[i], sizes.[i]).view(shapes.[i])))
    let paramViews = if ps.Length = 0 then [||] else viewsOf flatParam
    let gradViews = if ps.Length = 0 then [||] else viewsOf flatGrad
    let expAvgViews = if ps.Length = 0 then [||] else viewsOf expAvg
    let expAvgSqViews = if ps.Length = 0 then [||] else viewsOf expAvgSq
    let paramPtrs = paramViews |> Array.map TensorNative.dataPtr
    let gradPtrs = gradViews |> Array.map TensorNative.dataPtr
    let steps : int64[] = Array.zeroCreate ps.Length
    let hasGrad : bool[] = Array.zeroCreate ps.Length
    let initialLearningRate = learningRate
    let mutable lr = learningRate
    let mutable disposed = false

    /// Moves parameter i into the flat buffer (its values kept) if it is not there.
    let linkParameter i =
        let p = ps.[i]
        if TensorNative.dataPtr p <> paramPtrs.[i] then
            use _noGrad = torch.no_grad()
            paramViews.[i].copy_(p) |> ignore
            p.set_(paramViews.[i]) |> ignore

    /// Makes the gradients live in the flat buffer; hasGrad.[i] says which parameters have one.
    let syncGradients () =
        for i in 0 .. ps.Length - 1 do
            let p = ps.[i]
            linkParameter i
            let g = if p.requires_grad then TensorNative.gradPtr p else 0n
            if g = 0n then
                hasGrad.[i] <- false
            else
                hasGrad.[i] <- true
                if g <> gradPtrs.[i] then
                    // Replaced by someone else: take its values and put the view back.
                    use _noGrad = torch.no_grad()
                    use given = p.grad
                    gradViews.[i].copy_(given) |> ignore
                    p.grad <- gradViews.[i]

    do
        use _noGrad = torch.no_grad()
        for i in 0 .. ps.Length - 1 do
            let p = ps.[i]
            paramViews.[i].copy_(p) |> ignore
            p.set_(paramViews.[i]) |> ignore
            // Gradients already there are kept; the others start at zero.
            if p.requires_grad then
                let g = p.grad
                if not (isNull g) then
                    gradViews.[i].copy_(g) |> ignore
                    g.Dispose()
                p.grad <- gradViews.[i]

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

    /// Sets the gradients to zero (one operation on the flat buffer); every parameter that requires
    /// a gradient gets its view of the buffer back as its gradient.
    member _.ZeroGrad() =
        if disposed then raise (ObjectDisposedException "Adam")
        if ps.Length > 0 then
            flatGrad.zero_() |> ignore
            for i in 0 .. ps.Length - 1 do
                if ps.[i].requires_grad then ps.[i].grad <- gradViews.[i]

    /// Scales the gradients so that their global 2-norm is at most `maxNorm` (the rule of
    /// torch.nn.utils.clip_grad_norm_: multiplied by maxNorm / (norm + 1e-6) when that is below 1)
    /// and returns the norm before scaling; NaN or infinity when a gradient is not finite.
    /// <param name="maxNorm">The largest norm kept.</param>
    member _.ClipGradientNorm(maxNorm: float) : float =
        if disposed then raise (ObjectDisposedException "Adam")
        if not (maxNorm > 0.0) then invalidArg "maxNorm" (sprintf "must be positive, got %g" maxNorm)
        if ps.Length = 0 then 0.0
        else
            use _noGrad = torch.no_grad()
            syncGradients ()
            // Parameters without a gradient have zeros in the buffer: they add nothing to the norm.
            let norm =
                use n = flatGrad.norm()
                // Read in its own dtype where item can (float32 widens exactly), else as float64.
                if n.dtype = torch.ScalarType.Float64 then n.item<float>()
                elif n.dtype = torch.ScalarType.Float32 then float (n.item<float32>())
                else
                    use d = n.to_type(torch.ScalarType.Float64)
                    d.item<float>()
            let coefficient = maxNorm / (norm + 1e-6)
            if Double.IsFinite norm && coefficient < 1.0 then
                // Referenced until the native call has returned, then freed.
                let c = Scalar.op_Implicit coefficient
                try flatGrad.mul_(c) |> ignore
                finally c.Dispose()
            norm

    /// The gradients as one flat buffer, in parameter order (zeros for parameters without a
    /// gradient), with every gradient linked into it first. Changing it in place changes the
    /// gradients that <see cref="ClipGradientNorm"/> and <see cref="Step"/> use: data-parallel
    /// training averages it over the ranks with one allreduce. Owned by the optimiser: do not dispose it.
    member _.GradientBuffer() : torch.Tensor =
        if disposed then raise (ObjectDisposedException "Adam")
        if ps.Length = 0 then torch.zeros([| 0L |])
        else
            syncGradients ()
            flatGrad

    /// The parameters as one flat buffer, in parameter order, with every parameter linked into it
    /// first: each parameter is a view of it, so changing it in place changes the parameters (a
    /// `WeightAverage` reads it after every step and swaps its averaged values in for
    /// evaluation). Owned by the optimiser: do not dispose it.
    member _.ParameterBuffer() : torch.Tensor =
        if disposed then raise (ObjectDisposedException "Adam")
        if ps.Length = 0 then torch.zeros([| 0L |])
        else
            for i in 0 .. ps.Length - 1 do linkParameter i
            flatParam

    /// One Adam update of every parameter that has a gradient.
    member this.Step() =
        if disposed then raise (ObjectDisposedException "Adam")
        use _noGrad = torch.no_grad()
        use _scope = torch.NewDisposeScope()
        syncGradients ()
        let oneMinusBeta1 = Scalars.Of(1.0 - beta1)
        let oneMinusBeta2 = Scalars.Of(1.0 - beta2)
        let all = ps.Length > 0 && Array.forall id hasGrad && Array.forall (fun n -> n = steps.[0]) steps
        let update (p: torch.Tensor) (grad: torch.Tensor) (m: torch.Tensor) (v: torch.Tensor) (step: int64) =
            let biasCorrection1 = 1.0 - Math.Pow(beta1, float step)
            let biasCorrection2 = 1.0 - Math.Pow(beta2, float step)
            m.mul_(Scalars.Of beta1).add_(grad, oneMinusBeta1) |> ignore
            v.mul_(Scalars.Of beta2).addcmul_(grad, grad, oneMinusBeta2) |> ignore
            // Per-step values: referenced until the native calls below have returned, then freed.
            let sqrtBiasCorrection2 = Scalar.op_Implicit(Math.Sqrt biasCorrection2)
            let negativeStepSize = Scalar.op_Implicit(-lr / biasCorrection1)
            try
                let denominator = v.sqrt().div_(sqrtBiasCorrection2).add_(Scalars.Of eps, Scalars.One)
                p.addcdiv_(m, denominator, negativeStepSize) |> ignore
            finally
                sqrtBiasCorrection2.Dispose()
                negativeStepSize.Dispose()
        if all then
            // The usual case: one update of the whole buffer.
            for i in 0 .. steps.Length - 1 do steps.[i] <- steps.[i] + 1L
            update flatParam flatGrad expAvg expAvgSq steps.[0]
        else
            for i in 0 .. ps.Length - 1 do
                if hasGrad.[i] then
                    steps.[i] <- steps.[i] + 1L
                    update paramViews.[i] gradViews.[i] expAvgViews.[i] expAvgSqViews.[i] steps.[i]
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
            TensorExtensionMethods.Save(expAvgViews.[i], writer)
            TensorExtensionMethods.Save(expAvgSqViews.[i], writer)
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
            TensorExtensionMethods.Load(expAvgViews.[i], reader)
            TensorExtensionMethods.Load(expAvgSqViews.[i], reader)
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
                // The parameters keep their storage (the flat buffer) through their own views.
                for t in Array.concat [ gradViews; expAvgViews; expAvgSqViews ] do t.Dispose()
                for t in [ flatGrad; expAvg; expAvgSq ] do if not (isNull t) then t.Dispose()
