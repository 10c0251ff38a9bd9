namespace MixerFlow.Core

open System
open System.IO
open TorchSharp

/// An exponential moving average of the parameters an <see cref="Adam"/> trains (Polyak averaging,
/// as the "EMA of weights" of image models): after each optimiser step, <see cref="Update"/> sets
/// average = decay x average + (1 - decay) x parameters, one operation on the optimiser's flat
/// parameter buffer (<see cref="Adam.ParameterBuffer"/>). The first update copies the parameters,
/// so what the first step set (ActNorm's data-dependent initialisation) is in the average from the
/// start. Only parameters are averaged: buffers (ActNorm's initialised flag, batch norm's running
/// statistics) are the model's own, used as they are beside the averaged parameters.
///
/// The parameters keep the trained values, which the optimiser goes on updating;
/// <see cref="Apply"/> swaps the averaged values in (for an evaluation, a checkpoint, pictures) until
/// it is disposed. <see cref="SaveState"/> and <see cref="LoadState"/> write and read what a resumed
/// run needs to continue both: the update count and the trained values (the averaged values are the
/// model's tensors in a checkpoint saved while they are applied).
///
/// <param name="optimizer">The optimiser whose parameters are averaged.</param>
/// <param name="decay">The weight of the old average at each update, in (0, 1): about 1 / (1 - decay) steps are averaged.</param>
[<Sealed>]
type WeightAverage(optimizer: Adam, decay: float) =
    do
        if isNull (box optimizer) then nullArg "optimizer"
        if not (decay > 0.0 && decay < 1.0) then invalidArg "decay" (sprintf "must lie in (0, 1), got %g" decay)
    let keep (t: torch.Tensor) = t.DetachFromDisposeScope()
    let first = optimizer.ParameterBuffer()
    let average = keep (torch.zeros_like first)
    /// The trained values while the averaged ones are applied.
    let trained = keep (torch.zeros_like first)
    let mutable updates = 0L
    let mutable applied = false
    let mutable disposed = false
    let check () = if disposed then raise (ObjectDisposedException "WeightAverage")
    let checkNotApplied what = if applied then invalidOp (sprintf "WeightAverage.%s: the averaged values are applied; dispose what Apply returned first" what)
    let restore () =
        if applied then
            use _noGrad = torch.no_grad()
            optimizer.ParameterBuffer().copy_(trained) |> ignore
            applied <- false

    /// The weight of the old average at each update.
    member _.Decay = decay

    /// Updates made so far (0: no average yet; <see cref="Apply"/> then changes nothing).
    member _.Updates = updates

    /// Whether the averaged values are in the parameters now (between <see cref="Apply"/> and its disposal).
    member _.IsApplied = applied

    /// Averages in the parameters as they are now: call it after each optimiser step.
    member _.Update() =
        check ()
        checkNotApplied "Update"
        use _noGrad = torch.no_grad()
        let p = optimizer.ParameterBuffer()
        if updates = 0L then average.copy_(p) |> ignore
        else average.mul_(Scalars.Of decay).add_(p, Scalars.Of(1.0 - decay)) |> ignore
        updates <- updates + 1L

    /// The averaged values, flat in the optimiser's parameter order, as a new tensor (before the
    /// first update: the parameters' own values).
    member _.Values() : torch.Tensor =
        check ()
        use _noGrad = torch.no_grad()
        if updates = 0L then (if applied then trained else optimizer.ParameterBuffer()).clone()
        else average.clone()

    /// Puts the averaged values into the parameters until the result is disposed, which puts the
    /// trained values back (nothing happens before the first update). Not nested.
    member _.Apply() : IDisposable =
        check ()
        checkNotApplied "Apply"
        if updates > 0L then
            use _noGrad = torch.no_grad()
            let p = optimizer.ParameterBuffer()
            trained.copy_(p) |> ignore
            p.copy_(average) |> ignore
            applied <- true
        { new IDisposable with member _.Dispose() = restore () }

    /// Puts the averaged values into the parameters for good (the end of training): the trained
    /// values are dropped, and the average goes on from the parameters as they are then.
    member _.Assign() =
        check ()
        checkNotApplied "Assign"
        if updates > 0L then
            use _noGrad = torch.no_grad()
            optimizer.ParameterBuffer().copy_(average) |> ignore

    /// Writes the update count, the decay and the trained values (not the averaged ones: a
    /// checkpoint holds those as the model's tensors). Call it while the averaged values are not applied.
    member _.SaveState(writer: BinaryWriter) =
        if isNull writer then nullArg "writer"
        check ()
        checkNotApplied "SaveState"
        writer.Write "WeightAverage"
        writer.Write updates
        writer.Write decay
        use _noGrad = torch.no_grad()
        use onCpu = optimizer.ParameterBuffer().cpu()
        TensorExtensionMethods.Save(onCpu, writer)

    /// Reads what <see cref="SaveState"/> wrote, into parameters that hold the averaged values (a
    /// checkpoint's model tensors just loaded): those become the average, the trained values read
    /// become the parameters, and the count continues. The decay stays this average's own.
    /// Throws InvalidDataException when the state does not fit the parameters.
    member _.LoadState(reader: BinaryReader) =
        if isNull reader then nullArg "reader"
        check ()
        checkNotApplied "LoadState"
        let name = reader.ReadString()
        if name <> "WeightAverage" then raise (InvalidDataException(sprintf "weight average: a section named '%s', expected 'WeightAverage'" name))
        let count = reader.ReadInt64()
        if count < 0L then raise (InvalidDataException(sprintf "weight average: %d updates" count))
        reader.ReadDouble() |> ignore // the decay it was saved with
        use _noGrad = torch.no_grad()
        let p = optimizer.ParameterBuffer()
        use onCpu = torch.zeros_like(p, device = torch.CPU)
        TensorExtensionMethods.Load(onCpu, reader) |> ignore
        average.copy_(p) |> ignore
        p.copy_(onCpu) |> ignore
        updates <- count

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                restore ()
                disposed <- true
                average.Dispose()
                trained.Dispose()
