namespace MixerFlow.Core

open System
open TorchSharp
open TorchSharp.Modules

/// Helpers for hand-written steps (<see cref="IHandStep"/>).
module internal HandGradients =
    /// Each parameter's gradient handle from the last backward pass, with its data's address.
    let private gradients = System.Runtime.CompilerServices.ConditionalWeakTable<Parameter, struct (Tensor * nativeint) ref>()
    /// A parameter's gradient, to add to in place (a zero gradient is given to it first where it
    /// has none). The handle is kept and handed out again while the gradient's data is where it
    /// was (one native address comparison, no new managed Tensor per pass: the optimiser's flat
    /// buffer keeps each gradient in place from step to step); the caller must not dispose it.
    let gradOf (p: Parameter) : Tensor =
        let current = TensorNative.gradPtr p
        let cell = gradients.GetValue(p, fun _ -> ref (struct (null, 0n)))
        let struct (kept, address) = cell.Value
        if current <> 0n && current = address && not (isNull kept) && not kept.IsInvalid then kept
        else
            let g =
                match p.grad with
                | null ->
                    // A normal tensor even under inference mode: the optimiser updates it in place later.
                    use _normal = torch.inference_mode(false)
                    let fresh = torch.zeros_like(p)
                    p.grad <- fresh
                    fresh
                | g -> g
            // Kept beyond the caller's dispose scope.
            let g = g.DetachFromDisposeScope()
            cell.Value <- struct (g, TensorNative.dataPtr g)
            g
    let private transposes = System.Runtime.CompilerServices.ConditionalWeakTable<Parameter, struct (Tensor * nativeint) ref>()
    /// A matrix parameter's transpose (a view, no gradient), kept and handed out again while the
    /// parameter's data is where it was (one native address comparison per call); the caller must
    /// not dispose it.
    let transposeOf (p: Parameter) : Tensor =
        let current = TensorNative.dataPtr p
        let cell = transposes.GetValue(p, fun _ -> ref (struct (null, 0n)))
        let struct (kept, address) = cell.Value
        if current = address && not (isNull kept) && not kept.IsInvalid then kept
        else
            let t =
                use _normal = torch.inference_mode(false)
                use _noGrad = torch.no_grad()
                p.t().DetachFromDisposeScope()
            if not (isNull kept) then kept.Dispose()
            cell.Value <- struct (t, current)
            t
    /// How many of a batch's rows belong to each of a log-det's samples.
    let rowsPer (rows: int64) (samples: int64) =
        if samples = 0L || rows % samples <> 0L then
            invalidArg "logDet" (sprintf "a log-det of %d samples for a batch of %d rows" samples rows)
        rows / samples
    /// How many of x's rows belong to each of logDet's samples.
    let rowsPerSample (x: Tensor) (logDet: Tensor) = rowsPer x.shape.[0] logDet.shape.[0]
    /// Adds per-row sums of `values` ([rows, ...], contiguous) to logDet [samples] in place.
    let addRowSums (logDet: Tensor) (values: Tensor) =
        logDet.add_(values.view(logDet.shape.[0], -1L).sum(1L), Scalars.One) |> ignore
    /// Whether a module holds any parameter that requires a gradient.
    let hasParameters (m: torch.nn.Module) = m.parameters() |> Seq.exists (fun p -> p.requires_grad)

/// Tensors that a hand-written step (see <see cref="IHandStep"/>) keeps from one training step
/// to the next: its activations, gradients and views of them are written in place into the same
/// tensors every step, so that a step allocates no memory for them and creates no managed Tensor
/// for them, where a pass of out-of-place operations creates one for every intermediate result.
/// The tensors fit one batch layout (rows, samples, dtype, device); a pass over another frees them
/// and makes new ones. A tensor handed out from a workspace (a part's output, or the gradient of its
/// input) belongs to it: the receiver reads it but must not dispose it (<see cref="Workspace.Owns"/>),
/// and the part's next pass overwrites it. Not thread-safe: one pass at a time per part, as for
/// training itself.
[<Sealed; AllowNullLiteral>]
type internal Workspace() =
    static let owned = System.Runtime.CompilerServices.ConditionalWeakTable<Tensor, obj>()
    static let mark = obj ()
    [<ThreadStatic; DefaultValue>]
    static val mutable private scratch : System.Collections.Generic.Dictionary<struct (int * int64 * int64 * torch.ScalarType * DeviceType * int), Tensor>
    let kept = ResizeArray<Tensor>()
    let mutable rows = -1L
    let mutable samples = -1L
    let mutable dtype = torch.ScalarType.Float32
    let mutable deviceType = DeviceType.CPU
    let mutable deviceIndex = -1
    let mutable generation = 0L
    /// Whether t belongs to a workspace: whoever is handed it must not dispose it.
    static member Owns(t: Tensor) = not (isNull t) && fst (owned.TryGetValue t)
    /// Takes t out of every dispose scope and marks it owned (see Owns); the caller frees it.
    static member Own(t: Tensor) : Tensor =
        let t = t.DetachFromDisposeScope()
        owned.AddOrUpdate(t, mark)
        t
    /// Frees a tensor that Own took.
    static member Free(t: Tensor) =
        owned.Remove t |> ignore
        t.Dispose()
    /// A new tensor of the pass's dtype and device (a normal tensor even under inference mode:
    /// passes outside inference mode write into it too).
    let empty (shape: int64[]) =
        use _normal = torch.inference_mode(false)
        torch.empty(shape, dtype = dtype, device = torch.Device(deviceType, deviceIndex))
    /// Counts the passes and the frees: a tape records the count of its pass and is stale once
    /// another pass began or the tensors were freed (<see cref="CheckTape"/>).
    member _.Generation = generation
    /// Refuses (InvalidOperationException) a tape that is spent: already used (<paramref name="used"/>),
    /// or of a pass before the latest one or before the tensors were freed, whose tensors that
    /// pass or the free has overwritten.
    /// <param name="tapeGeneration">The <see cref="Generation"/> the tape's pass recorded.</param>
    /// <param name="used">Whether the tape has served its backward pass already.</param>
    /// <param name="owner">The part's name, for the message.</param>
    member _.CheckTape(tapeGeneration: int64, used: bool, owner: string) =
        if used || tapeGeneration <> generation then
            invalidOp (sprintf "%s: this tape is spent (a tape serves one backward pass, before the layer's next taped forward pass)" owner)
    /// The rows of the pass that the kept tensors fit (-1 when none are kept).
    member _.Rows = rows
    /// The samples of that pass (its log-det's length).
    member _.Samples = samples
    /// How many of the pass's rows belong to each sample (checked by Begin).
    member _.RowsPerSample = rows / samples
    /// Starts a pass over x (rows of logDet's samples, a whole number of rows per sample, else
    /// ArgumentException): true when the tensors kept for the last pass fit it (the same rows,
    /// samples, dtype and device), else they are freed (false) and the caller makes new ones with
    /// <see cref="Empty"/> and <see cref="Keep"/>.
    member this.Begin(x: Tensor, logDet: Tensor) =
        generation <- generation + 1L
        let r, s, dt, devT, devI = x.shape.[0], logDet.shape.[0], x.dtype, x.device_type, x.device_index
        if r = rows && s = samples && dt = dtype && devT = deviceType && devI = deviceIndex && kept.Count > 0 then true
        else
            HandGradients.rowsPer r s |> ignore
            this.Clear()
            rows <- r; samples <- s; dtype <- dt; deviceType <- devT; deviceIndex <- devI
            false
    /// Takes t for the workspace: owned, freed with it.
    member _.Keep(t: Tensor) : Tensor =
        let t = Workspace.Own t
        kept.Add t
        t
    /// A new tensor of the pass's dtype and device, kept (a normal tensor even under inference mode:
    /// passes outside inference mode write into it too).
    member this.Empty(shape: int64[]) : Tensor = this.Keep(empty shape)
    /// A new tensor of another dtype (indices, say) on the pass's device, kept.
    member this.Empty(shape: int64[], ofType: torch.ScalarType) : Tensor =
        use _normal = torch.inference_mode(false)
        this.Keep(torch.empty(shape, dtype = ofType, device = torch.Device(deviceType, deviceIndex)))
    /// Ones [n] of the pass's dtype and device, kept: addmv_ with them sums a matrix's rows or
    /// columns into a tensor in place.
    member this.Ones(n: int64) : Tensor = this.Empty([| n |]).fill_(Scalars.One)
    /// A [rows, width] tensor of the pass's layout for temporaries that live within one part's
    /// backward step: one per shape for all parts on this thread, instead of one per part.
    /// <param name="slot">Which of the step's temporaries of this shape (0, 1, ...).</param>
    /// <param name="width">Columns.</param>
    member _.Scratch(slot: int, width: int64) : Tensor =
        if isNull Workspace.scratch then
            Workspace.scratch <- System.Collections.Generic.Dictionary<_, _>()
        let key = struct (slot, rows, width, dtype, deviceType, deviceIndex)
        match Workspace.scratch.TryGetValue key with
        | true, t when not t.IsInvalid -> t
        | _ ->
            let t = Workspace.Own(empty [| rows; width |])
            Workspace.scratch.[key] <- t
            t
    /// Frees the shared temporaries of this thread (<see cref="Scratch"/>).
    static member ClearScratch() =
        if not (isNull Workspace.scratch) then
            for t in Workspace.scratch.Values do Workspace.Free t
            Workspace.scratch.Clear()
    /// Frees every kept tensor (tapes taken before are spent).
    member _.Clear() =
        for t in kept do Workspace.Free t
        kept.Clear()
        rows <- -1L
        generation <- generation + 1L

/// Views a part makes of its input (or of the gradient it is handed), kept while that input is the
/// same workspace tensor (the output of a part before it, which keeps it from step to step), made
/// afresh otherwise.
[<Sealed>]
type internal ViewCache() =
    let mutable source : Tensor = null
    let mutable views : Tensor[] = null
    /// The views make(x) of x: the kept ones when x is the workspace tensor they were made of.
    member this.Of(x: Tensor, make: Tensor -> Tensor[]) : Tensor[] =
        if obj.ReferenceEquals(x, source) && not x.IsInvalid then views
        elif Workspace.Owns x then
            let made =
                use _normal = torch.inference_mode(false)
                make x |> Array.map Workspace.Own
            this.Clear()
            source <- x
            views <- made
            made
        else make x
    /// Frees the kept views.
    member _.Clear() =
        if not (isNull views) then for v in views do Workspace.Free v
        source <- null
        views <- null
