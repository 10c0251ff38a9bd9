namespace MixerFlow.Core

open System
open System.Runtime.InteropServices
open TorchSharp
open MixerFlow.Core.Ops

/// Samples with their log density under the flow. Deconstructs in C# as
/// `var (x, logProb) = flow.SampleWithLogProb(n)`.
[<Struct>]
type FlowSample(value: Tensor, logProb: Tensor) =
    /// The samples [n, eventShape...].
    member _.Value = value
    /// log p(x) per sample [n].
    member _.LogProb = logProb
    member _.Deconstruct([<Out>] v: byref<Tensor>, [<Out>] l: byref<Tensor>) =
        v <- value
        l <- logProb

/// A normalising flow as a distribution (Rezende & Mohamed 2015; Papamakarios et al. 2021):
/// `transform` maps data x to latent z (its Forward), and
/// log p(x) = log p_base(z) + log|det dz/dx|. Sampling draws z from the base and applies the
/// transform's inverse. Registered submodules: `transform`, `base`.
///
/// Conditional flows (transform.ContextFeatures > 0) take a context [B, contextFeatures]:
/// LogProb(x, context) pairs row i of x with row i of the context; Sample(n, context) draws
/// n samples per context row, grouped by row: the result has context.shape[0] * n rows and
/// rows i*n .. i*n + n - 1 belong to context row i (as for context.repeat_interleave(n, 0)).
/// <param name="transform">Data to latent; its output shape is the base's event shape.</param>
/// <param name="baseDistribution">The latent distribution.</param>
type Flow(transform: Bijector, baseDistribution: BaseDistribution) as this =
    inherit torch.nn.Module("Flow")
    do
        if isNull (box transform) then nullArg "transform"
        if isNull (box baseDistribution) then nullArg "baseDistribution"
        if transform.OutputShape <> baseDistribution.EventShape then
            invalidArg "baseDistribution"
                (sprintf "Flow: the transform outputs %s but the base distribution has event shape %s"
                    (Shapes.show transform.OutputShape) (Shapes.show baseDistribution.EventShape))
    // Registered under the constructor arguments' names, which are also their fields' names
    // (TorchSharp registers Module fields by reflection too; other names would save them twice).
    do
        this.register_module("transform", transform)
        this.register_module("baseDistribution", baseDistribution)

    /// A flow with a standard normal base.
    /// <param name="transform">Data to latent.</param>
    new(transform: Bijector) = new Flow(transform, new StandardNormal(transform.OutputShape))

    member _.Transform = transform
    member _.Base = baseDistribution
    member _.EventShape = transform.InputShape
    member _.ContextFeatures = transform.ContextFeatures

    member private _.Expand(context: Tensor, n: int64) =
        if isNull context then
            if transform.ContextFeatures > 0L then
                invalidArg "context" (sprintf "this flow is conditional: it needs a context of %d features" transform.ContextFeatures)
            null
        else
            if context.dim() <> 2L || context.shape.[1] <> transform.ContextFeatures then
                invalidArg "context"
                    (sprintf "Flow expects a context of shape [rows, %d], got %s" transform.ContextFeatures (Shapes.show context.shape))
            context.repeat_interleave(n, 0L)

    /// Base draws z for n samples per context row (n in all without a context) and their
    /// pass through the transform's inverse: shared by Sample and SampleWithLogProb.
    member private this.Draw(n: int64, context: Tensor, temperature: float) : struct (Tensor * Transformed) =
        let c = this.Expand(context, n)
        let rows = if isNull c then n else c.shape.[0]
        let z = baseDistribution.Sample(rows, temperature)
        struct (z, (if isNull c then transform.Inverse z else transform.Inverse(z, c)))

    /// log p(x | context) per sample: [B, eventShape...], [B, contextFeatures] -> [B].
    /// <param name="x">Data [B, eventShape...].</param>
    /// <param name="context">[B, contextFeatures], or null for an unconditional flow.</param>
    member _.LogProb(x: Tensor, context: Tensor) : Tensor =
        if transform.ContextFeatures > 0L && isNull context then
            invalidArg "context" (sprintf "this flow is conditional: it needs a context of %d features" transform.ContextFeatures)
        let r = if isNull context then transform.Forward x else transform.Forward(x, context)
        // log p_base(z) joins the transform's log-det pieces: added in place to their sum.
        r.Total(baseDistribution.LogProb r.Value)
    /// log p(x) per sample: [B, eventShape...] -> [B].
    /// <param name="x">Data [B, eventShape...].</param>
    member this.LogProb(x: Tensor) : Tensor = this.LogProb(x, null)

    /// Samples with their log density, reparameterised: gradients flow from both into the
    /// parameters of the transform and the base (no no_grad). The log density is the flow's
    /// own (at temperature 1), whatever the temperature of the draw.
    /// <param name="n">Samples per context row (or in all, without a context).</param>
    /// <param name="context">[rows, contextFeatures], or null for an unconditional flow.</param>
    /// <param name="temperature">Scales the base's spread; 1 samples the flow itself.</param>
    member this.SampleWithLogProb(n: int64, context: Tensor,
                                  [<Optional; DefaultParameterValue(1.0)>] temperature: float) : FlowSample =
        let struct (z, r) = this.Draw(n, context, temperature)
        // log p(x) = log p_base(z) - log|det dx/dz|.
        FlowSample(r.Value, baseDistribution.LogProb z - r.LogDet)
    /// Samples with their log density, reparameterised (see the overload with a context).
    /// <param name="n">How many samples.</param>
    /// <param name="temperature">Scales the base's spread; 1 samples the flow itself.</param>
    member this.SampleWithLogProb(n: int64, [<Optional; DefaultParameterValue(1.0)>] temperature: float) : FlowSample =
        this.SampleWithLogProb(n, null, temperature)

    /// Samples without gradients (under no_grad); see SampleWithLogProb for differentiable ones.
    /// <param name="n">Samples per context row.</param>
    /// <param name="context">[rows, contextFeatures]; the result has rows * n samples, grouped by row.</param>
    /// <param name="temperature">Scales the base's spread; 1 samples the flow itself.</param>
    member this.Sample(n: int64, context: Tensor, [<Optional; DefaultParameterValue(1.0)>] temperature: float) : Tensor =
        use _ = torch.no_grad()
        let struct (_, r) = this.Draw(n, context, temperature)
        r.Value
    /// n samples [n, eventShape...] without gradients.
    /// <param name="n">How many samples.</param>
    /// <param name="temperature">Scales the base's spread; 1 samples the flow itself.</param>
    member this.Sample(n: int64, [<Optional; DefaultParameterValue(1.0)>] temperature: float) : Tensor =
        this.Sample(n, null, temperature)

/// A forward pass taken for <see cref="HandGradient"/>: log p(x) per sample, and the tape of its
/// backward pass.
[<Sealed>]
type HandGradientPass internal (transform: IHandGradient, z: Tensor, tape: obj, logProb: Tensor) =
    /// log p(x) per sample, [B]: an inference tensor (no autograd history; see HandGradient.Forward).
    member _.LogProb = logProb
    /// Adds to every parameter's <c>grad</c> the gradient of sum_b weight * log p(x_b) (for the mean
    /// bits per dimension over B samples of D dimensions, weight = -1 / (B D ln 2)).
    /// A pass's backward runs once, before the flow's next hand-written forward pass: its parts
    /// keep their activations in tensors that the next pass overwrites (see HandGradient.Release);
    /// a spent pass is refused (InvalidOperationException).
    /// <param name="weight">The loss's derivative with respect to each sample's log p(x).</param>
    member _.Backward(weight: float) =
        // Inference mode: no autograd bookkeeping at all on the way through LibTorch's dispatcher.
        use _inference = torch.inference_mode(true)
        // d(weight log N(z; 0, I))/dz = -weight z; each sample's log|det| enters log p with weight 1.
        let negWeight = Scalar.op_Implicit(-weight)
        let dz = try z.mul(negWeight) finally negWeight.Dispose()
        transform.BackwardTaped(tape, dz, weight, false) |> ignore

/// Gradients of a flow's log-likelihood without autograd: every bijector of the transform supplies
/// its own backward pass (<see cref="IHandGradient"/>). MixerFlow's parts (dequantisation, logit,
/// patchify, shifts, row- and column-wise liftings, affine couplings with a soft-clamped scale and a
/// perceptron conditioner, ActNorm) all do; a flow with any other part, a context or a base other than the
/// standard normal is not supported, and training then takes autograd's path. The results equal
/// autograd's up to float rounding (the property tests compare them at random parameters).
[<AbstractClass; Sealed>]
type HandGradient =
    /// Whether training uses hand-written gradients where a flow supports them: true unless the
    /// environment variable MIXERFLOW_HAND_GRADIENTS is 0 (the opt-out, read once).
    static member val Enabled =
        Environment.GetEnvironmentVariable "MIXERFLOW_HAND_GRADIENTS" <> "0" with get, set
    /// Whether <see cref="Forward"/> can take this flow and batch.
    /// <param name="flow">The flow.</param>
    /// <param name="x">The batch.</param>
    static member Supports(flow: Flow, x: Tensor) =
        not (isNull (box flow)) && not (isNull x) && flow.ContextFeatures = 0L
        && flow.Base.GetType() = typeof<StandardNormal> && HandGradients.supported flow.Transform x
    /// Why <see cref="Forward"/> cannot take this flow and batch, in a phrase that names the parts
    /// at fault; null when it can.
    /// <param name="flow">The flow.</param>
    /// <param name="x">The batch.</param>
    static member WhyNot(flow: Flow, x: Tensor) : string =
        if isNull (box flow) then "there is no flow"
        elif isNull x then "there is no batch"
        elif flow.ContextFeatures <> 0L then "the flow is conditional (hand-written gradients take no context)"
        elif flow.Base.GetType() <> typeof<StandardNormal> then
            sprintf "its base distribution is %s, not the standard normal" (flow.Base.GetType().Name)
        elif HandGradients.supported flow.Transform x then null
        else
            let missing =
                flow.Transform.modules()
                |> Seq.choose (fun m -> match box m with
                                        | :? Bijector as b when not (box b :? IHandGradient) -> Some (b.GetType().Name)
                                        | _ -> None)
                |> Seq.distinct |> List.ofSeq
            if missing.IsEmpty then
                "a part's hand-written backward does not take this flow or batch (an elementwise map other than a " +
                "soft-clamped affine one, a conditioner other than a perceptron, frozen parameters or a batch " +
                "that is not floating point)"
            else sprintf "these parts have no hand-written backward: %s" (String.Join(", ", missing))
    /// log p(x) per sample without autograd (under LibTorch's inference mode), with the tape for
    /// <see cref="HandGradientPass.Backward"/>.
    /// <param name="flow">A flow that <see cref="Supports"/> x.</param>
    /// <param name="x">The batch.</param>
    static member Forward(flow: Flow, x: Tensor) : HandGradientPass =
        if not (HandGradient.Supports(flow, x)) then
            invalidArg "flow" "HandGradient: this flow has a part without a hand-written backward (see HandGradient.Supports)"
        // Inference mode rather than no_grad: LibTorch's dispatcher then skips its autograd layer
        // for every operation (a fashion-mnist step 14.5 -> 14.1 ms). The results are inference
        // tensors: read them, compute with them, but they cannot be trained through.
        use _inference = torch.inference_mode(true)
        let transform = flow.Transform :> obj :?> IHandGradient
        let logDet = torch.zeros([| x.shape.[0] |], dtype = x.dtype, device = x.device)
        let struct (z, tape) = transform.ForwardTaped(x, logDet)
        HandGradientPass(transform, z, tape, logDet.add_(standardNormalLogProb z, Scalars.One))
    /// Frees the tensors that hand-written passes keep from one step to the next. The couplings
    /// write their activations and gradients in place into tensors they keep (about one training
    /// step's activations at the last batch size), so that a step allocates none; after training,
    /// this hands that memory back, with the temporaries the couplings share on the calling
    /// thread. A later pass makes them again. Passes taken before it cannot run their backward any
    /// more.
    /// <param name="model">A flow, a bijector or any module holding them.</param>
    static member Release(model: torch.nn.Module) =
        if isNull (box model) then nullArg "model"
        for m in Seq.append [ model ] (model.modules()) do
            match box m with
            | :? IKeepsWorkspace as k -> k.ReleaseWorkspace()
            | _ -> ()
        Workspace.ClearScratch()


/// Ready-made flows over vectors of `features` values (after zuko's `flows`), each a Flow with a
/// standard normal base. `context` > 0 makes a conditional flow (context [B, context]).
/// Conditioner networks are MLPs with `depth` hidden layers of `hidden` ReLU units.
[<AbstractClass; Sealed>]
type Flows =
    /// Couplings that transform the two halves in turn, with an optional mixing layer between them.
    static member private AlternatingCouplings(features: int64, transforms: int, mlp: ConditionerFactory,
                                               map: unit -> ElementwiseMap, context: int64, between: unit -> Bijector option) =
        let halves = Partition.Halves features
        let layers =
            [ for i in 0 .. transforms - 1 do
                if i > 0 then yield! Option.toList (between ())
                yield new Coupling([| features |], (if i % 2 = 0 then halves else halves.Swapped), mlp, map (), context) :> Bijector ]
        new Flow(new Chain(layers))

    static member private Check(what: string, features: int64, transforms: int, minFeatures: int64) =
        if features < minFeatures then
            invalidArg "features" (sprintf "%s needs at least %d features, got %d" what minFeatures features)
        if transforms < 1 then invalidArg "transforms" (sprintf "%s needs at least 1 transform, got %d" what transforms)

    /// RealNVP (Dinh et al. 2017): affine couplings (log-scale soft-clamped to +-2) that
    /// transform the two halves of the features in turn.
    /// <param name="features">Features per sample (at least 2).</param>
    /// <param name="transforms">Coupling layers.</param>
    /// <param name="hidden">Hidden units per conditioner layer.</param>
    /// <param name="depth">Hidden layers per conditioner.</param>
    /// <param name="context">Context features (0: unconditional).</param>
    static member RealNVP(features: int64,
                          [<Optional; DefaultParameterValue(4)>] transforms: int,
                          [<Optional; DefaultParameterValue(64L)>] hidden: int64,
                          [<Optional; DefaultParameterValue(2)>] depth: int,
                          [<Optional; DefaultParameterValue(0L)>] context: int64) : Flow =
        Flows.Check("RealNVP", features, transforms, 2L)
        Flows.AlternatingCouplings(features, transforms, Conditioners.Mlp(hidden, depth), (fun () -> Affine()), context, (fun () -> None))

    /// Masked autoregressive flow (Papamakarios et al. 2017): affine MAF layers with the
    /// feature order reversed between them.
    /// <param name="features">Features per sample.</param>
    /// <param name="transforms">Autoregressive layers.</param>
    /// <param name="hidden">Hidden units per MADE layer.</param>
    /// <param name="depth">Hidden MADE layers.</param>
    /// <param name="context">Context features (0: unconditional).</param>
    static member MAF(features: int64,
                      [<Optional; DefaultParameterValue(3)>] transforms: int,
                      [<Optional; DefaultParameterValue(64L)>] hidden: int64,
                      [<Optional; DefaultParameterValue(2)>] depth: int,
                      [<Optional; DefaultParameterValue(0L)>] context: int64) : Flow =
        Flows.Check("MAF", features, transforms, 1L)
        let layers =
            [ for i in 0 .. transforms - 1 do
                if i > 0 then yield Permutation.Reverse [| features |] :> Bijector
                yield new MaskedAutoregressive(features, hidden, depth, Affine(), context) :> Bijector ]
        new Flow(new Chain(layers))

    /// Neural spline flow (Durkan et al. 2019), coupling version: rational-quadratic spline
    /// couplings on alternating halves with an LU-parametrised linear map between layers.
    /// <param name="features">Features per sample (at least 2).</param>
    /// <param name="transforms">Coupling layers.</param>
    /// <param name="bins">Spline bins.</param>
    /// <param name="bound">The splines act on [-bound, bound]; identity outside.</param>
    /// <param name="hidden">Hidden units per conditioner layer.</param>
    /// <param name="depth">Hidden layers per conditioner.</param>
    /// <param name="context">Context features (0: unconditional).</param>
    static member NSF(features: int64,
                      [<Optional; DefaultParameterValue(3)>] transforms: int,
                      [<Optional; DefaultParameterValue(8)>] bins: int,
                      [<Optional; DefaultParameterValue(5.0)>] bound: float,
                      [<Optional; DefaultParameterValue(64L)>] hidden: int64,
                      [<Optional; DefaultParameterValue(2)>] depth: int,
                      [<Optional; DefaultParameterValue(0L)>] context: int64) : Flow =
        Flows.Check("NSF", features, transforms, 2L)
        Flows.AlternatingCouplings(features, transforms, Conditioners.Mlp(hidden, depth), (fun () -> RationalQuadratic(bins, bound)),
                                   context, (fun () -> Some(LULinear.Vector features :> Bijector)))
