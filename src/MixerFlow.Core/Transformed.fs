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
