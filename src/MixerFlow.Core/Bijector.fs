namespace MixerFlow.Core

open System
open TorchSharp
open TorchSharp.Modules

/// What the generic checks need to know about a bijector beyond forward and inverse.
type BijectorTraits =
    { /// A surjection rather than a bijection (uniform dequantisation): inverse(forward(x)) = x
      /// holds on the discrete data, the inverse is a rounding with no useful Jacobian.
      Surjective: bool
      /// Samples interact in training mode (batch normalisation uses batch statistics).
      BatchCoupledInTraining: bool
      /// The forward log-det is a term of a variational bound rather than log|det J|: variational
      /// dequantisation adds -log q(u | x) of the noise it drew. It is not compared with the
      /// Jacobian, and the inverse's log-det (a rounding's) is not its negative.
      VariationalLogDet: bool }
    static member Bijective = { Surjective = false; BatchCoupledInTraining = false; VariationalLogDet = false }

/// Known zeros and ones of the Jacobian dy/dx (flattened per sample, row = output element):
/// NaN where the entry is free. Couplings pin the rows of their conditioning half to the
/// identity; autoregressive maps pin the upper triangle to zero.
type IJacobianStructure =
    abstract ExpectedJacobian: unit -> float[,]
    abstract StructureDescription: string

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

/// A chain of bijectors applied left to right: log-det = sum of the parts' log-dets;
/// the inverse applies the parts' inverses in reverse order.
type Chain private (partArray: Bijector[], _dummy: unit) as this =
    inherit Bijector("Chain", partArray.[0].InputShape, partArray.[partArray.Length - 1].OutputShape)
    // Fields carry the names they are registered under: TorchSharp also registers Module fields by
    // reflection, and a shadowed constructor argument's field (`parts@209`) would save every
    // tensor below it twice.
    let parts = new ModuleList<Bijector>(partArray)
    do this.register_module("parts", parts)

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
          BatchCoupledInTraining = parts |> Seq.exists (fun p -> p.Traits.BatchCoupledInTraining)
          VariationalLogDet = parts |> Seq.exists (fun p -> p.Traits.VariationalLogDet) }

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
