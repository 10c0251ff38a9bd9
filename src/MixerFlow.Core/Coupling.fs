namespace MixerFlow.Core

open System
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core.Ops

/// Coupling layer (Dinh et al. 2015, NICE; Dinh et al. 2017, RealNVP): the event is split along
/// its first axis by a Partition; the conditioning part passes unchanged and, through the
/// conditioner, sets the parameters of an elementwise map of the other part. The Jacobian is
/// block-triangular, so log|det| is the sum of the elementwise log-derivatives.
/// A conditional coupling (contextFeatures > 0, vector events only) feeds [x_a, context] to the
/// conditioner. Registered names: `net`, `conditioningIndex`, `transformedIndex`, `mergeIndex`.
/// <param name="name">The layer's name.</param>
/// <param name="eventShape">[features] or [channels, H, W]; the partition splits the first axis.</param>
/// <param name="partition">Which slices condition and which are transformed.</param>
/// <param name="conditioner">Builds the network (input slices + context features -> parameters).</param>
/// <param name="map">The elementwise map of the transformed part.</param>
/// <param name="contextFeatures">Context features per sample; 0 for an unconditional layer.</param>
type Coupling(name: string, eventShape: int64[], partition: Partition, conditioner: ConditionerFactory,
              map: ElementwiseMap, contextFeatures: int64) as this =
    inherit Bijector(name, eventShape, eventShape)
    do
        if eventShape.Length = 0 || eventShape.[0] <> int64 partition.Size then
            invalidArg "partition"
                (sprintf "%s: partition covers %d slices but the event shape is %s" name partition.Size (Shapes.show eventShape))
        if isNull (box conditioner) then nullArg "conditioner"
        if isNull (box map) then nullArg "map"
        if contextFeatures < 0L then invalidArg "contextFeatures" (sprintf "%s: contextFeatures must be >= 0, got %d" name contextFeatures)
        if contextFeatures > 0L && eventShape.Length <> 1 then
            invalidArg "contextFeatures" (sprintf "%s: a context is supported for vector events only, got event shape %s" name (Shapes.show eventShape))
    let rest = eventShape.[1..]
    let nA = int64 partition.Conditioning.Length
    let nB = int64 partition.Transformed.Length
    let k = map.ParamsPerElement
    let conditioningIndex = torch.tensor(partition.Conditioning)
    let transformedIndex = torch.tensor(partition.Transformed)
    let mergeIndex = torch.tensor(inversePermutation (Array.append partition.Conditioning partition.Transformed))
    // Vector events flatten the conditioning part; image events keep [C, H, W] for a conv net.
    let net = conditioner.Invoke(nA + contextFeatures, k * nB)
    /// The first index of `idx` if it is a run of consecutive indices, else -1.
    let runStart (idx: int64[]) =
        if idx |> Array.mapi (fun i v -> v - int64 i) |> Array.forall (fun d -> d = idx.[0]) then idx.[0] else -1L
    // Halves (the usual partition): slices and one cat instead of three index_select copies.
    let conditioningStart = runStart partition.Conditioning
    let transformedStart = runStart partition.Transformed
    let contiguous = conditioningStart >= 0L && transformedStart >= 0L
    // Affine itself (not a subclass, which may override Forward/Inverse) takes its parameters as slices.
    let isAffine = map.GetType() = typeof<Affine>
    /// (conditioning part, transformed part) of a batch split by halves: one split, not two narrows
    /// (its backward is one cat of the two gradients, where each narrow's would fill a zero tensor
    /// of the whole input and the two would then be added).
    let halves (t: Tensor) =
        if conditioningStart = 0L then let p = t.split([| nA; nB |], 1L) in p.[0], p.[1]
        else let p = t.split([| nB; nA |], 1L) in p.[1], p.[0]
    /// The batch from its two parts, in the partition's order (halves).
    let joined (a: Tensor) (b: Tensor) =
        if conditioningStart = 0L then torch.cat([| a; b |], 1L) else torch.cat([| b; a |], 1L)
    /// The conditioner's Linear layers if it is a perceptron (Linear, ReLU, ..., Linear, with
    /// biases), else null.
    let perceptronLayers : Linear[] =
        match net with
        | :? ReluNetwork as r when r.Layers.Count % 2 = 1 ->
            let ls = Seq.toArray r.Layers
            let linears = [| for i in 0 .. 2 .. ls.Length - 1 -> match ls.[i] with :? Linear as l when not (isNull l.bias) -> l | _ -> null |]
            let relus = [| for i in 1 .. 2 .. ls.Length - 1 -> ls.[i] :? ReLU |]
            if Array.forall (isNull >> not) linears && Array.forall id relus then linears else null
        | _ -> null
    do
        this.register_buffer("conditioningIndex", conditioningIndex)
        this.register_buffer("transformedIndex", transformedIndex)
        this.register_buffer("mergeIndex", mergeIndex)
        this.register_module("net", net)

    /// A coupling layer named after its map ("Coupling(Affine)", ...).
    /// <param name="eventShape">[features] or [channels, H, W].</param>
    /// <param name="partition">Which slices condition and which are transformed.</param>
    /// <param name="conditioner">Builds the conditioner network.</param>
    /// <param name="map">The elementwise map of the transformed part.</param>
    /// <param name="contextFeatures">Context features per sample (default 0: unconditional).</param>
    new(eventShape: int64[], partition: Partition, conditioner: ConditionerFactory, map: ElementwiseMap,
        [<Optional; DefaultParameterValue(0L)>] contextFeatures: int64) =
        new Coupling("Coupling(" + (if isNull (box map) then "null" else map.Name) + ")",
                 eventShape, partition, conditioner, map, contextFeatures)

    member _.Partition = partition
    member _.Conditioner = net
    member _.Map = map
    override _.ContextFeatures = contextFeatures

    /// Parameters for the transformed part: [B, ParamsPerElement, nB, rest...].
    /// <param name="xa">The conditioning part [B, nA, rest...].</param>
    /// <param name="context">[B, contextFeatures], or null for an unconditional layer.</param>
    member this.Parameters(xa: Tensor, context: Tensor) =
        this.NetOutput(xa, context).reshape(Array.append [| xa.shape.[0]; k; nB |] rest)
    /// Parameters of an unconditional layer.
    member this.Parameters(xa: Tensor) = this.Parameters(xa, null)

    /// The conditioner's output [B, ParamsPerElement * nB, rest...]: parameter j of the map is
    /// the slice j * nB .. (j + 1) * nB - 1 along dimension 1.
    member private this.NetOutput(xa: Tensor, context: Tensor) : Tensor =
        let input =
            if contextFeatures = 0L then xa
            elif isNull context then
                invalidArg "context" (sprintf "%s is conditional: it needs a context of %d features (Forward(x, context))" this.Name contextFeatures)
            else
                if context.dim() <> 2L || context.shape.[0] <> xa.shape.[0] || context.shape.[1] <> contextFeatures then
                    invalidArg "context"
                        (sprintf "%s expects a context of shape [%d, %d], got %s" this.Name xa.shape.[0] contextFeatures (Shapes.show context.shape))
                torch.cat([| xa; context |], 1L)
        net.call(input)

    member private this.Run(x: Tensor, context: Tensor, inverse: bool) =
        this.CheckShape(x, eventShape, "input")
        let xa, xb =
            if contiguous then halves x
            else x.index_select(1L, conditioningIndex), x.index_select(1L, transformedIndex)
        let struct (yb, logDeriv) =
            if isAffine then
                // The affine map's two parameters as slices of the network's output (no reshape).
                let out = this.NetOutput(xa, context)
                let affine = map :?> Affine
                let parts = out.split([| nB; nB |], 1L)
                let shift, rawLogScale = parts.[0], parts.[1]
                if inverse then affine.InverseParts(xb, shift, rawLogScale) else affine.ForwardParts(xb, shift, rawLogScale)
            else
                let h = this.Parameters(xa, context)
                if inverse then map.Inverse(xb, h) else map.Forward(xb, h)
        let y =
            if not contiguous then torch.cat([| xa; yb |], 1L).index_select(1L, mergeIndex)
            else joined xa yb
        Transformed.Elementwise(y, logDeriv)

    override this.Forward(x: Tensor) = this.Run(x, null, false)
    override this.Inverse(y: Tensor) = this.Run(y, null, true)
    override this.Forward(x: Tensor, context: Tensor) = this.Run(x, context, false)
    override this.Inverse(y: Tensor, context: Tensor) = this.Run(y, context, true)

    /// The conditioning and transformed slices' counts (nA, nB).
    member internal _.Counts = struct (nA, nB)
    /// The first slice of each half when both are runs of consecutive slices (else -1).
    member internal _.Starts = struct (conditioningStart, transformedStart)
    /// Whether the map is Affine itself (not a subclass).
    member internal _.IsAffine = isAffine
    /// The conditioner's Linear layers if it is a perceptron (Linear, ReLU, ..., Linear, with
    /// biases), else null.
    member internal _.PerceptronLayers = perceptronLayers

    interface IJacobianStructure with
        member _.StructureDescription = "conditioning slices pass unchanged: their rows of dy/dx are identity rows"
        member _.ExpectedJacobian() =
            let n = int (Shapes.numel eventShape)
            let per = int (Shapes.numel rest)
            let j = Array2D.create n n Double.NaN
            for c in partition.Conditioning do
                for p in 0 .. per - 1 do
                    let r = int c * per + p
                    for col in 0 .. n - 1 do j.[r, col] <- if col = r then 1.0 else 0.0
            j

/// Affine coupling (RealNVP): y_b = x_b * s(x_a) + t(x_a), with a bounded scale (an Affine map).
type AffineCoupling(eventShape: int64[], partition: Partition, conditioner: ConditionerFactory, scaleBound: ScaleBound) =
    inherit Coupling("AffineCoupling", eventShape, partition, conditioner, Affine(scaleBound), 0L)
    /// With the scale bound ScaleBound.SoftClamp 2.
    new(eventShape, partition, conditioner) = new AffineCoupling(eventShape, partition, conditioner, ScaleBound.SoftClamp 2.0)
    member _.ScaleBound = scaleBound

/// Additive coupling (NICE): y_b = x_b + t(x_a); volume preserving, log|det| = 0.
type AdditiveCoupling(eventShape: int64[], partition: Partition, conditioner: ConditionerFactory) =
    inherit Coupling("AdditiveCoupling", eventShape, partition, conditioner, Additive(), 0L)

/// Rational-quadratic spline coupling (Durkan et al. 2019): each transformed element goes
/// through a monotonic spline with `bins` bins on [-bound, bound] and identity tails.
type SplineCoupling(eventShape: int64[], partition: Partition, conditioner: ConditionerFactory, bins: int, bound: float) =
    inherit Coupling("SplineCoupling", eventShape, partition, conditioner, RationalQuadratic(bins, bound), 0L)
    /// 8 bins on [-3, 3].
    new(eventShape, partition, conditioner) = new SplineCoupling(eventShape, partition, conditioner, 8, 3.0)
    member _.Bins = bins
    member _.Bound = bound
    /// Knot positions on the input side for the transformed part of x: [B, nB, rest..., K+1].
    /// Used by the edge-case checks to place inputs exactly on bin boundaries.
    member this.InputKnots(x: Tensor) =
        let xa = x.index_select(1L, this.get_buffer("conditioningIndex"))
        (this.Map :?> RationalQuadratic).InputKnots(this.Parameters xa)
