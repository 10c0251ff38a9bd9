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
