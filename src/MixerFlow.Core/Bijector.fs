namespace MixerFlow.Core

open System
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules

type Tensor = torch.Tensor

module internal Shapes =
    let show (s: int64 seq) = "[" + String.Join(", ", s) + "]"
    let numel (s: int64[]) = Array.fold (*) 1L s
    /// Sum over every dimension but the first, in one reduction: [B, ...] -> [B].
    let sumPerSample (t: Tensor) : Tensor =
        match t.dim() with
        | 1L -> t
        | 2L -> t.sum(1L)
        | d -> t.sum(Array.init (int d - 1) (fun i -> int64 (i + 1)), false, Nullable())
    /// A batch of [P, D] matrices flattened per sample as it lies in memory, without a copy where
    /// it can be: a transposed view of a contiguous [B, D, P] (what ColumnWise returns) in its
    /// [D, P] order (true), anything else in row-major [P, D] order (false).
    let flatAsLaid (m: Tensor) : struct (Tensor * bool) =
        let b = m.shape.[0]
        let featuresFirst = m.transpose(1L, 2L)
        if featuresFirst.is_contiguous() then struct (featuresFirst.reshape(b, -1L), true)
        else struct (m.reshape(b, -1L), false)
    /// Positions k = p D + d of a [P, D] matrix (row-major) as positions in its [D, P] transposed
    /// layout: what a gather reads from flatAsLaid's transposed case.
    let transposedPositions (p: int64) (d: int64) (positions: int64[]) =
        positions |> Array.map (fun k -> (k % d) * p + k / d)

/// TorchSharp Scalars for constants, each created once and kept for the life of the process.
///
/// TorchSharp hands Scalars to native code as raw handles without keeping the managed object
/// alive, and it creates temporary ones behind many overloads (the `alpha = 1` of `a + b` and of
/// `t + scalar`, every implicit `double -> Scalar` conversion, `square()`, `softplus`, the
/// coefficients inside `torch.optim.Adam.step`). A collection on any thread during the native
/// call can finalize such a temporary and free its value while the op reads it ("Expected false
/// to be true ... toFloat/toDouble, c10/core/Scalar.h"). MixerFlow's own code therefore never
/// creates a temporary Scalar: constants come from this cache, values that change every call
/// are created with `use`/`using` (which keeps them alive until the call returns), and an IL
/// scan in the tests refuses any call into a TorchSharp overload that creates one.
[<AbstractClass; Sealed>]
type Scalars private () =
    static let cache = System.Collections.Concurrent.ConcurrentDictionary<float, Scalar>()
    /// The Scalar for `value` (a float64 Scalar; it does not change a float32 tensor's dtype).
    /// Meant for constants: every distinct value stays in memory for the process's life.
    static member Of(value: float) : Scalar =
        match cache.TryGetValue value with
        | true, s -> s
        // Two threads may both create one; the loser is never handed out.
        | _ -> cache.GetOrAdd(value, Scalar.op_Implicit value)
    /// The Scalar 1, the `alpha` of a plain addition.
    static member One : Scalar = Scalars.Of 1.0

/// The result of pushing a batch through a bijector: the transformed batch and log|det J|
/// per sample (shape [batch]). Deconstructs in C# as `var (y, logDet) = b.Forward(x)`.
/// The log-det is kept in pieces and added up only when <see cref="LogDet"/> is read, so that a
/// chain of many steps adds its log-dets with a few tensor operations instead of several per
/// step: a volume-preserving step (<see cref="VolumePreserving"/>) has none; an elementwise map
/// (<see cref="Elementwise"/>) keeps its unsummed log-derivatives, and all of them are summed in
/// one reduction; a step with the same log-det for every sample (<see cref="Constant"/>) keeps
/// one value. Chains, liftings and Partial pass the pieces on without reading them.
[<Sealed; AllowNullLiteral>]
type Transformed private (value: Tensor, perSample: Tensor list, terms: Tensor list, constants: Tensor list) =
    let mutable logDet : Tensor = null
    /// The transformed batch and its log|det J| per sample.
    new(value: Tensor, logDet: Tensor) =
        if isNull logDet then nullArg "logDet"
        Transformed(value, [ logDet ], [], [])
    /// A step whose log|det J| is 0 for every sample (a permutation, a reshape).
    static member VolumePreserving(value: Tensor) = Transformed(value, [], [], [])
    /// A step whose log|det J| is the sum of elementwise log-derivatives: logDerivatives has the
    /// batch's first dimension and log|det J| of sample i is the sum of logDerivatives[i, ...].
    /// The sum is taken when the log-det is read, together with those of the other steps.
    static member Elementwise(value: Tensor, logDerivatives: Tensor) =
        if isNull logDerivatives then nullArg "logDerivatives"
        if logDerivatives.dim() < 1L || logDerivatives.shape.[0] <> value.shape.[0] then
            invalidArg "logDerivatives"
                (sprintf "Transformed.Elementwise: log-derivatives of shape %s for a batch of %d"
                    (Shapes.show logDerivatives.shape) value.shape.[0])
        Transformed(value, [], [ logDerivatives ], [])
    /// A step whose log|det J| is the same for every sample: logDet is one value (a tensor of
    /// shape []), made a [batch] tensor only when read.
    static member Constant(value: Tensor, logDet: Tensor) =
        if isNull logDet then nullArg "logDet"
        if logDet.dim() <> 0L then
            invalidArg "logDet" (sprintf "Transformed.Constant: the log-det must be one value (shape []), got %s" (Shapes.show logDet.shape))
        Transformed(value, [], [], [ logDet ])
    member _.Value = value
    /// True for a <see cref="VolumePreserving"/> step: <see cref="LogDet"/> is zeros.
    member _.IsVolumePreserving = perSample.IsEmpty && terms.IsEmpty && constants.IsEmpty
    /// log|det J| per sample, [batch] (zeros of the value's dtype and device for a volume-preserving step).
    member this.LogDet =
        if isNull logDet then logDet <- this.Sum null
        logDet
    member this.Deconstruct([<Out>] v: byref<Tensor>, [<Out>] l: byref<Tensor>) =
        v <- value
        l <- this.LogDet

    /// The pieces, for Chain, Lifted and Partial: [batch] log-dets, unsummed log-derivatives whose
    /// first dimension is the batch or a whole multiple of it (each sample's rows consecutive, as
    /// Lifted folds rows into the batch), and values that hold for every sample.
    member internal _.PerSample = perSample
    member internal _.Terms = terms
    member internal _.Constants = constants
    /// The value and every log-det piece.
    member internal _.Tensors : Tensor list = value :: perSample @ terms @ constants
    /// The same log-det pieces with another value (Partial: the batch is the same).
    member internal _.WithValue(v: Tensor) = Transformed(v, perSample, terms, constants)
    /// Pieces gathered by a chain (or a lifting) from its parts'.
    static member internal OfPieces(value: Tensor, perSample: Tensor list, terms: Tensor list, constants: Tensor list) =
        Transformed(value, perSample, terms, constants)

    /// extra + log|det J| per sample ([batch]; extra may be null): all the unsummed
    /// log-derivatives in one reduction, then the [batch] pieces and the constants added to the
    /// fresh result in place.
    member internal this.Total(extra: Tensor) : Tensor =
        if not (isNull logDet) then (if isNull extra then logDet else extra.add(logDet, Scalars.One))
        else this.Sum extra

    member private _.Sum(extra: Tensor) : Tensor =
        let b = value.shape.[0]
        // A running total and whether this method made it (then it is added to in place).
        let add (struct (total: Tensor, fresh: bool)) (t: Tensor) =
            if isNull total then struct (t, false)
            elif fresh then struct (total.add_(t, Scalars.One), true)
            else struct (total.add(t, Scalars.One), true)
        let summed =
            match terms with
            | [] -> struct (null, false)
            // An empty batch has nothing to add (and its pieces cannot be regrouped per sample).
            | _ when b = 0L -> struct (torch.zeros([| 0L |], dtype = value.dtype, device = value.device), true)
            | [ t ] when t.shape.[0] = b -> struct (Shapes.sumPerSample t, t.dim() > 1L)
            | _ ->
                // Log-derivatives that differ only in their second dimension side by side (one
                // cat), each group as [batch, n], then one sum over all of them.
                let columns =
                    terms
                    |> List.groupBy (fun t -> t.shape.[0], t.dim(), (if t.dim() > 2L then List.ofArray t.shape.[2..] else []))
                    |> List.map (fun ((n, dims, _), ts) ->
                        let joined =
                            match ts with
                            | [ t ] -> t
                            | _ when dims = 1L -> torch.stack(List.toArray ts, 1L)
                            | _ -> torch.cat(List.toArray ts, 1L)
                        if n = b && joined.dim() = 2L then joined else joined.reshape(b, -1L))
                let all = match columns with [ c ] -> c | _ -> torch.cat(List.toArray columns, 1L)
                struct (all.sum(1L), true)
        let acc = List.fold add summed perSample
        let acc = if isNull extra then acc else add acc extra
        let struct (total, _) =
            match constants with
            | [] -> acc
            | first :: rest ->
                let struct (t, _) = acc
                if isNull t then
                    // Only constants: their sum (one value) for every sample.
                    let struct (c, _) = List.fold add (struct (first, false)) rest
                    struct (c.expand(b), false)
                else List.fold add acc constants
        if isNull total then torch.zeros([| b |], dtype = value.dtype, device = value.device)
        else total

/// What the generic checks need to know about a bijector beyond forward and inverse.
type BijectorTraits =
    { /// A surjection rather than a bijection (uniform dequantisation): inverse(forward(x)) = x
      /// holds on the discrete data, the inverse is a rounding with no useful Jacobian.
      Surjective: bool
      /// Samples interact in training mode (batch normalisation uses batch statistics).
      BatchCoupledInTraining: bool }
    static member Bijective = { Surjective = false; BatchCoupledInTraining = false }

/// Known zeros and ones of the Jacobian dy/dx (flattened per sample, row = output element):
/// NaN where the entry is free. Couplings pin the rows of their conditioning half to the
/// identity; autoregressive maps pin the upper triangle to zero.
type IJacobianStructure =
    abstract ExpectedJacobian: unit -> float[,]
    abstract StructureDescription: string

/// A forward pass whose gradients are written by hand instead of recorded by autograd: the pass
/// keeps what its backward needs (a tape), and the backward adds the parameters' gradients to
/// their <c>grad</c> and returns the input's. A training step on a flow whose every part supports
/// it (see <see cref="HandGradient"/>) then runs no autograd graph at all: no node per operation,
/// no saved-tensor bookkeeping, and backward formulas that fuse what autograd would do op by op
/// (a coupling's clamp, scale and log-det in a few operations; weight gradients accumulated in
/// place into the optimiser's buffer). Each implementation is checked against autograd at random
/// parameters (the property tests' hand-gradient check).
type IHandGradient =
    /// Whether <see cref="ForwardTaped"/> can run on this input (every part supports it, no context,
    /// a floating-point input).
    /// <param name="x">The batch the pass would take.</param>
    abstract HandGradientSupported: x: Tensor -> bool
    /// The forward map without autograd (run it under <c>no_grad</c> or inference mode, as
    /// <see cref="HandGradient"/> does): returns y and a tape for
    /// <see cref="BackwardTaped"/>, and adds every sample's log|det dy/dx| in place to
    /// <paramref name="logDet"/>.
    /// <param name="x">A batch whose rows are logDet's samples or a whole multiple of them (a
    /// lifted flow's rows: each sample's rows consecutive).</param>
    /// <param name="logDet">[samples], added to in place.</param>
    abstract ForwardTaped: x: Tensor * logDet: Tensor -> struct (Tensor * obj)
    /// The backward pass of the taped forward: given dL/dy and dL/d(log|det|) (the same for every
    /// sample), adds dL/d(parameter) to each parameter's <c>grad</c> and returns dL/dx, or null
    /// when <paramref name="inputGradient"/> is false. A tape serves one backward pass, taken
    /// before the part's next taped forward pass: an implementation may keep y, dL/dx and its
    /// activations in tensors that it overwrites from pass to pass (a coupling does), and refuses a
    /// spent tape. The y and dL/dx it hands out may be such tensors: read them, do not dispose them.
    /// <param name="tape">What ForwardTaped returned with y.</param>
    /// <param name="dy">dL/dy, y's shape (any layout).</param>
    /// <param name="logDetGradient">dL/d(log|det|) of each sample.</param>
    /// <param name="inputGradient">Whether dL/dx is wanted.</param>
    abstract BackwardTaped: tape: obj * dy: Tensor * logDetGradient: float * inputGradient: bool -> Tensor

/// The inverse map with a hand-written backward (see <see cref="IHandGradient"/>), for a bijector
/// used inverted (<see cref="Inverted"/>): the same members for y -> x.
type IHandGradientInverse =
    /// Whether <see cref="InverseTaped"/> can run on this input.
    /// <param name="y">The batch the pass would take.</param>
    abstract InverseHandGradientSupported: y: Tensor -> bool
    /// The inverse map without autograd: x and a tape; each sample's log|det dx/dy| added to logDet.
    /// <param name="y">A batch of outputs.</param>
    /// <param name="logDet">[samples], added to in place.</param>
    abstract InverseTaped: y: Tensor * logDet: Tensor -> struct (Tensor * obj)
    /// The backward pass of the taped inverse: dL/dy from dL/dx (null unless inputGradient).
    /// <param name="tape">What InverseTaped returned.</param>
    /// <param name="dx">dL/dx.</param>
    /// <param name="logDetGradient">dL/d(log|det|) of each sample.</param>
    /// <param name="inputGradient">Whether dL/dy is wanted.</param>
    abstract InverseBackwardTaped: tape: obj * dx: Tensor * logDetGradient: float * inputGradient: bool -> Tensor

/// A bijector that permutes each sample's values (patchify, a cyclic shift, and their inverses):
/// a chain's hand-written pass runs a run of them as one gather along the flattened sample.
type IFlatPermutation =
    /// Gather.[k] is the input value (flat, in row-major order of the input shape) that output
    /// value k takes; null where this instance is not a permutation after all (an inverse of
    /// something else).
    abstract Gather: int64[]

/// Helpers for <see cref="IHandGradient"/> implementations.
module internal HandGradients =
    /// Whether the bijector has a hand-written backward that supports x.
    let supported (b: obj) (x: Tensor) =
        match b with
        | :? IHandGradient as h when h.HandGradientSupported x -> true
        | _ -> false
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

/// Tensors that a hand-written pass (see <see cref="IHandGradient"/>) keeps from one training step
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

/// A part that keeps tensors from one hand-written pass to the next (see Workspace).
type internal IKeepsWorkspace =
    /// Frees them (the next pass makes them again).
    abstract ReleaseWorkspace: unit -> unit

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

/// Constant tensors (index tables) made on first use for each key and device, and freed with
/// their owner (<see cref="Clear"/> from its Dispose); not Tensor fields, which TorchSharp would
/// register as buffers. Looked up by the device's type and index, with no Device object or string
/// per call.
[<Sealed>]
type internal DeviceTensors<'Key when 'Key : equality>() =
    let made = System.Collections.Concurrent.ConcurrentDictionary<struct ('Key * DeviceType * int), Tensor[]>()
    /// The tensors for key on like's device: make's, made there the first time. They are made as
    /// normal tensors even under inference mode (a hand-written pass): an autograd pass that
    /// uses them later must be able to save them for its backward.
    member _.Get(key: 'Key, like: Tensor, make: torch.Device -> Tensor[]) : Tensor[] =
        let k = struct (key, like.device_type, like.device_index)
        match made.TryGetValue k with
        | true, kept -> kept
        | _ ->
            let fresh =
                use _normal = torch.inference_mode(false)
                make (torch.Device(like.device_type, like.device_index)) |> Array.map (fun t -> t.DetachFromDisposeScope())
            let kept = made.GetOrAdd(k, fresh)
            // Two threads may both make them; the loser's are freed, never handed out.
            if not (obj.ReferenceEquals(kept, fresh)) then for t in fresh do t.Dispose()
            kept
    /// Frees them all.
    member _.Clear() =
        for kept in made.Values do
            for t in kept do t.Dispose()
        made.Clear()

/// An invertible, differentiable map with learnable parameters, batch-first.
/// Forward: x -> (y, log|det dy/dx|); Inverse: y -> (x, log|det dx/dy|), both per sample.
/// InputShape and OutputShape are the shapes of one sample (without the batch dimension).
/// Conditional bijectors also take a context [batch, contextFeatures] (one row per sample):
/// the overloads Forward(x, context) / Inverse(y, context) ignore it by default, and
/// wrappers (Chain, Inverted, RowWise, ColumnWise, Partial) pass it on to their parts.
/// A subclass registers its parameters and buffers (register_parameter / register_buffer)
/// under the same name as the field that holds them, so that `to(device | dtype)` updates
/// the field too.
[<AbstractClass>]
type Bijector(name: string, inputShape: int64[], outputShape: int64[]) =
    // The native check runs before the base constructor, TorchSharp's first chance to fail; it
    // sets nothing (the process's switches are the application's: MixerFlow.Core.Runtime).
    inherit torch.nn.Module(NativeRuntime.Checked name)
    do
        if Shapes.numel inputShape <> Shapes.numel outputShape then
            invalidArg "outputShape"
                (sprintf "%s: input %s and output %s hold different numbers of elements; a bijection cannot change the dimension"
                    name (Shapes.show inputShape) (Shapes.show outputShape))

    member _.Name = name
    member _.InputShape = Array.copy inputShape
    member _.OutputShape = Array.copy outputShape
    member _.InputSize = Shapes.numel inputShape
    /// The forward map x -> y with log|det dy/dx| per sample.
    /// <param name="x">A batch [batch, InputShape...].</param>
    abstract Forward: x: Tensor -> Transformed
    /// The inverse map y -> x with log|det dx/dy| per sample.
    /// <param name="y">A batch [batch, OutputShape...].</param>
    abstract Inverse: y: Tensor -> Transformed
    /// The forward map given a context; the default ignores the context.
    /// <param name="x">A batch [batch, InputShape...].</param>
    /// <param name="context">[batch, contextFeatures], or null for none.</param>
    abstract Forward: x: Tensor * context: Tensor -> Transformed
    default this.Forward(x: Tensor, _context: Tensor) : Transformed = this.Forward x
    /// The inverse map given a context; the default ignores the context.
    /// <param name="y">A batch [batch, OutputShape...].</param>
    /// <param name="context">[batch, contextFeatures], or null for none.</param>
    abstract Inverse: y: Tensor * context: Tensor -> Transformed
    default this.Inverse(y: Tensor, _context: Tensor) : Transformed = this.Inverse y
    /// Context features a conditional bijector needs per sample; 0 for an unconditional one.
    abstract ContextFeatures: int64
    default _.ContextFeatures = 0L
    abstract Traits: BijectorTraits
    default _.Traits = BijectorTraits.Bijective

    /// Throws a clear error unless `t` is a batch of samples of `shape`.
    member this.CheckShape(t: Tensor, shape: int64[], what: string) =
        let s = t.shape
        if s.Length <> shape.Length + 1 || s.[1..] <> shape then
            invalidArg what
                (sprintf "%s expects %s of shape [batch, %s], got %s"
                    this.Name what (String.Join(", ", shape)) (Shapes.show s))

    override this.ToString() =
        sprintf "%s %s -> %s" this.Name (Shapes.show inputShape) (Shapes.show outputShape)

/// Opt-in: runs TorchSharp work with garbage collection held off (a no-GC region). MixerFlow's
/// own code no longer needs it (it creates no temporary Scalars, see <see cref="Scalars"/>);
/// it remains for code of one's own that calls TorchSharp overloads which do create them.
/// Entering a region forces a full blocking collection, which costs more than a small training
/// step, and allocations on other threads can exhaust its budget and end it early.
[<AbstractClass; Sealed>]
type NativeSafety =
    /// Managed allocation allowed inside one region. If it is exceeded, the runtime collects and
    /// leaves the region (the unguarded behaviour), nothing fails.
    static member Budget = 32L * 1024L * 1024L

    static member Run<'T>(work: Func<'T>) : 'T =
        // Nested regions are not allowed: an inner call just runs inside the outer region.
        let started =
            System.Runtime.GCSettings.LatencyMode <> System.Runtime.GCLatencyMode.NoGCRegion
            && (try GC.TryStartNoGCRegion(NativeSafety.Budget) with :? InvalidOperationException -> false)
        try work.Invoke()
        finally
            if started && System.Runtime.GCSettings.LatencyMode = System.Runtime.GCLatencyMode.NoGCRegion then
                GC.EndNoGCRegion()

    static member Run(work: Action) : unit =
        NativeSafety.Run(Func<int>(fun () -> work.Invoke(); 0)) |> ignore

/// Helpers shared by the bijector implementations (F#: camelCase; .NET names PascalCase,
/// e.g. `Ops.MoveTo(dtype, device, module)` from C#).
module Ops =
    /// A TorchSharp Scalar for a constant, cached for the life of the process
    /// (<see cref="Scalars"/>): never a temporary that the GC could free mid-op.
    [<CompiledName("Scalar")>]
    let scalar (v: float) : Scalar = Scalars.Of v
    /// a + b for tensors, with a cached alpha (TorchSharp's `a + b` creates a temporary one).
    [<CompiledName("Add")>]
    let add (a: Tensor) (b: Tensor) : Tensor = a.add(b, Scalars.One)
    /// a + b for tensors (F# operator form of <c>add</c>).
    let inline ( +. ) (a: Tensor) (b: Tensor) : Tensor = a.add(b, Scalars.One)
    /// t + c for a constant c, with cached Scalars.
    [<CompiledName("AddScalar")>]
    let addScalar (t: Tensor) (c: float) : Tensor = t.add(Scalars.Of c, Scalars.One)
    /// c - t for a constant c, with cached Scalars.
    [<CompiledName("ScalarMinus")>]
    let scalarMinus (c: float) (t: Tensor) : Tensor = t.neg().add(Scalars.Of c, Scalars.One)
    /// log(1 + exp(x)) = -logsigmoid(-x), computed stably without TorchSharp's softplus (which
    /// creates temporary Scalars for beta and threshold). Its derivative is sigmoid(x) everywhere,
    /// 1/2 at x = 0: the form max(x, 0) + log1p(exp(-|x|)) has the same values but an autograd
    /// derivative of 0 at exactly 0 (relu'(0) = sign(0) = 0), which freezes a zero-initialised layer.
    [<CompiledName("Softplus")>]
    let softplus (x: Tensor) : Tensor =
        // Negated in place: logsigmoid's backward reads its input, not its output.
        torch.nn.functional.logsigmoid(x.neg()).neg_()
    /// Sum over every dimension but the batch dimension: [B, ...] -> [B].
    [<CompiledName("SumPerSample")>]
    let sumPerSample (t: Tensor) : Tensor = Shapes.sumPerSample t
    /// sum * factor in place on a fresh sum of log-scales (its backward does not read it); the
    /// sum itself for 1: the constant log-det of a scaling repeated at `factor` positions.
    let internal scaledSum (sum: Tensor) (factor: float) : Tensor =
        if factor = 1.0 then sum
        elif factor = -1.0 then sum.neg_()
        else sum.mul_(scalar factor)
    /// A per-sample log-det that is the same constant for every sample of `like`'s batch (a
    /// broadcast view of `value`: read it, do not write into it).
    [<CompiledName("ConstantLogDet")>]
    let constantLogDet (like: Tensor) (value: Tensor) : Tensor =
        value.expand(like.shape.[0])
    [<CompiledName("ZeroLogDet")>]
    let zeroLogDet (like: Tensor) : Tensor =
        torch.zeros([| like.shape.[0] |], dtype = like.dtype, device = like.device)
    [<CompiledName("BatchShape")>]
    let batchShape (batch: int64) (shape: int64[]) = Array.append [| batch |] shape
    /// The inverse of a permutation given as an index array.
    [<CompiledName("InversePermutation")>]
    let inversePermutation (perm: int64[]) =
        let inv = Array.zeroCreate perm.Length
        perm |> Array.iteri (fun i p -> inv.[int p] <- int64 i)
        inv
    /// Standard normal log density per sample (sum over event elements).
    [<CompiledName("StandardNormalLogProb")>]
    let standardNormalLogProb (z: Tensor) : Tensor =
        // (z^2 + log 2 pi) * -1/2, the last two in place on the fresh square.
        sumPerSample (z.mul(z).add_(scalar (Math.Log(2.0 * Math.PI)), Scalars.One).mul_(scalar -0.5))
    /// Moves a module's parameters and buffers to a dtype and a device.
    [<CompiledName("MoveTo")>]
    let moveTo (dtype: torch.ScalarType) (device: torch.Device) (m: 'M when 'M :> torch.nn.Module) : unit =
        TorchSharp.ModuleExtensionMethods.``to``(m, dtype) |> ignore
        TorchSharp.ModuleExtensionMethods.``to``(m, device) |> ignore

/// A step of a chain's hand-written pass: one part, or a run of consecutive permutations
/// (parts first..last) as one gather.
type internal HandStep =
    | Part of int
    | PermutationRun of first: int * last: int * gather: int64[]

/// A chain of bijectors applied left to right: log-det = sum of the parts' log-dets;
/// the inverse applies the parts' inverses in reverse order.
type Chain private (partArray: Bijector[], _dummy: unit) as this =
    inherit Bijector("Chain", partArray.[0].InputShape, partArray.[partArray.Length - 1].OutputShape)
    // Fields carry the names they are registered under: TorchSharp also registers Module fields by
    // reflection, and a shadowed constructor argument's field (`parts@209`) would save every
    // tensor below it twice.
    let parts = new ModuleList<Bijector>(partArray)
    do this.register_module("parts", parts)
    // The hand-written pass's steps and its runs' index tensors (made on first use; not Tensor
    // fields, which TorchSharp would register as buffers).
    let mutable handSteps : HandStep[] = null
    // The first part with parameters: a structural fact once the hand path runs (its parts refuse
    // frozen parameters), so found once, not by walking the parameters on every backward pass.
    let firstWithParameters =
        lazy (match Seq.tryFindIndex HandGradients.hasParameters parts with
              | Some i -> i
              | None -> parts.Count)
    let runIndices = DeviceTensors<struct (int * int)>()

    new(parts: Bijector seq) =
        let arr = Seq.toArray parts
        if arr.Length = 0 then invalidArg "parts" "Chain needs at least one bijector"
        for i in 1 .. arr.Length - 1 do
            if arr.[i - 1].OutputShape <> arr.[i].InputShape then
                invalidArg "parts"
                    (sprintf "Chain: part %d (%s) outputs %s but part %d (%s) expects %s"
                        (i - 1) arr.[i - 1].Name (Shapes.show arr.[i - 1].OutputShape)
                        i arr.[i].Name (Shapes.show arr.[i].InputShape))
        new Chain(arr, ())

    /// The parts in order.
    member _.Parts : System.Collections.Generic.IReadOnlyList<Bijector> =
        (Seq.toArray parts :> System.Collections.Generic.IReadOnlyList<Bijector>)
    member _.Count = parts.Count

    override this.Forward(x: Tensor) = this.Forward(x, null)
    override this.Inverse(y: Tensor) = this.Inverse(y, null)

    /// The parts' log-det pieces gathered, not added: Transformed adds them up when its log-det is read.
    /// Without gradients (evaluation, sampling) nothing else holds a part's temporaries: each part
    /// runs in a dispose scope of its own, what it returns moves out of it, and the input it was
    /// given is freed once it is done with (unless it is the chain's own input or is returned), so
    /// that memory is reused while still in cache instead of piling up until the caller's scope ends.
    static member private Run(parts: seq<Bijector>, x: Tensor, step: Bijector -> Tensor -> Transformed) =
        let freeEarly = not (torch.is_grad_enabled())
        let mutable h = x
        let perSample = ResizeArray<Tensor list>()
        let terms = ResizeArray<Tensor list>()
        let constants = ResizeArray<Tensor list>()
        for p in parts do
            let r =
                if not freeEarly then step p h
                else
                    use scope = torch.NewDisposeScope()
                    let r = step p h
                    // Only what this scope made moves (a returned input or parameter is left alone).
                    for t in r.Tensors do scope.MoveToOuter(t) |> ignore
                    r
            if freeEarly && not (obj.ReferenceEquals(h, x)) && not (List.exists (fun t -> obj.ReferenceEquals(t, h)) r.Tensors) then
                h.Dispose()
            h <- r.Value
            perSample.Add r.PerSample
            terms.Add r.Terms
            constants.Add r.Constants
        Transformed.OfPieces(h, List.concat perSample, List.concat terms, List.concat constants)

    override _.Forward(x: Tensor, context: Tensor) =
        Chain.Run(parts, x, (fun p h -> if isNull context then p.Forward h else p.Forward(h, context)))

    override _.Inverse(y: Tensor, context: Tensor) =
        Chain.Run(Seq.rev parts, y, (fun p h -> if isNull context then p.Inverse h else p.Inverse(h, context)))

    override _.ContextFeatures = parts |> Seq.map (fun p -> p.ContextFeatures) |> Seq.fold max 0L

    override _.Traits =
        { Surjective = parts |> Seq.exists (fun p -> p.Traits.Surjective)
          BatchCoupledInTraining = parts |> Seq.exists (fun p -> p.Traits.BatchCoupledInTraining) }

    /// The hand-written pass's steps: consecutive permutations (MixerFlow's unpatchify, shift and
    /// patchify between layers) composed into one gather, each other part on its own.
    member private _.HandSteps : HandStep[] =
        match handSteps with
        | null ->
            let gathers = parts |> Seq.map (fun p -> match box p with :? IFlatPermutation as f -> f.Gather | _ -> null) |> Seq.toArray
            let steps = ResizeArray<HandStep>()
            let mutable i = 0
            while i < parts.Count do
                let mutable j = i
                if not (isNull gathers.[i]) then
                    while j + 1 < parts.Count && not (isNull gathers.[j + 1]) do j <- j + 1
                if j > i then
                    // Output k of the run takes input gather.[k]: each part's gather read through the last.
                    let mutable gather = gathers.[i]
                    for p in i + 1 .. j do
                        let g = gathers.[p]
                        gather <- Array.map (fun k -> gather.[int k]) g
                    steps.Add(PermutationRun(i, j, gather))
                else steps.Add(Part i)
                i <- j + 1
            handSteps <- steps.ToArray()
            handSteps
        | made -> made

    /// A run's index tensor on x's device: the gather itself (variant 0), the same for a [B, P, D]
    /// input that is a transposed view read as it lies (1), or the inverse permutation (2).
    member private _.RunIndex(step: int, variant: int, gather: int64[], inputShape: int64[], x: Tensor) : Tensor =
        let made =
            runIndices.Get(struct (step, variant), x, fun device ->
                let values =
                    match variant with
                    | 0 -> gather
                    | 1 -> Shapes.transposedPositions inputShape.[0] inputShape.[1] gather
                    | _ -> Ops.inversePermutation gather
                [| torch.tensor(values, device = device) |])
        made.[0]

    override _.Dispose(disposing: bool) =
        if disposing then
            runIndices.Clear()
        base.Dispose(disposing)

    interface IHandGradient with
        member _.HandGradientSupported x = parts |> Seq.forall (fun p -> HandGradients.supported p x)
        member this.ForwardTaped(x, logDet) =
            let steps = this.HandSteps
            let tapes = Array.zeroCreate<obj> steps.Length
            let mutable h = x
            for s in 0 .. steps.Length - 1 do
                match steps.[s] with
                | Part i ->
                    let struct (y, tape) = (parts.[i] :> obj :?> IHandGradient).ForwardTaped(h, logDet)
                    tapes.[s] <- tape
                    h <- y
                | PermutationRun (first, last, gather) ->
                    parts.[first].CheckShape(h, parts.[first].InputShape, "input")
                    let b = h.shape.[0]
                    let inputShape = parts.[first].InputShape
                    // A [B, P, D] input that is a transposed view is read as it lies.
                    let struct (flat, transposed) =
                        if inputShape.Length = 2 then Shapes.flatAsLaid h else struct (h.reshape(b, -1L), false)
                    let index = this.RunIndex(s, (if transposed then 1 else 0), gather, inputShape, h)
                    h <- flat.index_select(1L, index).view(Array.append [| b |] parts.[last].OutputShape)
            struct (h, box tapes)
        member this.BackwardTaped(tape, dy, logDetGradient, inputGradient) =
            let tapes = tape :?> obj[]
            let steps = this.HandSteps
            let first = firstWithParameters.Force()
            let mutable g = dy
            let mutable s = steps.Length - 1
            let startOf step = match step with Part i -> i | PermutationRun (i, _, _) -> i
            // Parts before the first with parameters need no backward unless dL/dx is wanted.
            while s >= 0 && (inputGradient || startOf steps.[s] >= first) do
                let wanted = inputGradient || startOf steps.[s] > first
                // Each part's temporaries are freed as soon as it is done, and so is the gradient
                // it was handed (unless it is the chain's own): memory is reused while in cache and
                // the backward pass does not pile up a step's worth of gradients.
                let dx =
                    use scope = torch.NewDisposeScope()
                    let dx =
                        match steps.[s] with
                        | Part i -> (parts.[i] :> obj :?> IHandGradient).BackwardTaped(tapes.[s], g, logDetGradient, wanted)
                        | PermutationRun (i, _, gather) ->
                            if not wanted then null
                            else
                                let b = g.shape.[0]
                                let index = this.RunIndex(s, 2, gather, parts.[i].InputShape, g)
                                g.reshape(b, -1L).index_select(1L, index).view(Array.append [| b |] parts.[i].InputShape)
                    if isNull dx || obj.ReferenceEquals(dx, g) then dx else scope.MoveToOuter(dx)
                if not (obj.ReferenceEquals(g, dy)) && not (obj.ReferenceEquals(g, dx)) && not (Workspace.Owns g) then g.Dispose()
                g <- dx
                s <- s - 1
            if inputGradient then g else null

/// The inverse of a bijector as a bijector: forward and inverse swapped.
type Inverted(inner: Bijector) as this =
    inherit Bijector("Inverse(" + inner.Name + ")", inner.OutputShape, inner.InputShape)
    do this.register_module("inner", inner)
    member _.Inner = inner
    override _.Forward(y: Tensor) = inner.Inverse y
    override _.Inverse(x: Tensor) = inner.Forward x
    override _.Forward(y: Tensor, context: Tensor) = inner.Inverse(y, context)
    override _.Inverse(x: Tensor, context: Tensor) = inner.Forward(x, context)
    override _.ContextFeatures = inner.ContextFeatures
    override _.Traits = inner.Traits
    interface IFlatPermutation with
        member _.Gather =
            match box inner with
            | :? IFlatPermutation as p ->
                match p.Gather with
                | null -> null
                | gather -> Ops.inversePermutation gather
            | _ -> null
    interface IHandGradient with
        member _.HandGradientSupported y =
            match box inner with
            | :? IHandGradientInverse as h -> h.InverseHandGradientSupported y
            | _ -> false
        member _.ForwardTaped(y, logDet) = (box inner :?> IHandGradientInverse).InverseTaped(y, logDet)
        member _.BackwardTaped(tape, dx, logDetGradient, inputGradient) =
            (box inner :?> IHandGradientInverse).InverseBackwardTaped(tape, dx, logDetGradient, inputGradient)

/// A conditional bijector with its context fixed: one context row [contextFeatures] used for
/// every sample, kept as the buffer `context` (saved with the model, moved by `to`). Makes a
/// conditional bijector an ordinary one, e.g. to check it or to sample at one condition.
/// <param name="inner">A conditional bijector.</param>
/// <param name="contextRow">The context, [contextFeatures] or [1, contextFeatures] (copied).</param>
type FixedContext(inner: Bijector, contextRow: Tensor) as this =
    inherit Bijector("FixedContext(" + inner.Name + ")", inner.InputShape, inner.OutputShape)
    do
        if isNull contextRow then nullArg "contextRow"
        if contextRow.numel() <> inner.ContextFeatures then
            invalidArg "contextRow"
                (sprintf "FixedContext: %s needs %d context features, got a tensor of shape %s"
                    inner.Name inner.ContextFeatures (Shapes.show contextRow.shape))
    // The field must carry the buffer's name: `to(dtype)` replaces the buffer and updates the
    // field of that name (a field shadowing a constructor argument gets another name).
    let context = contextRow.detach().reshape(1L, -1L).clone()
    do
        this.register_module("inner", inner)
        this.register_buffer("context", context)
    member _.Inner = inner
    /// The fixed context, [1, contextFeatures].
    member _.Context = context
    member private _.Rows(t: Tensor) = context.expand(t.shape.[0], -1L)
    override this.Forward(x: Tensor) = inner.Forward(x, this.Rows x)
    override this.Inverse(y: Tensor) = inner.Inverse(y, this.Rows y)
    override _.Traits = inner.Traits
