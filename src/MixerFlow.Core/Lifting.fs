namespace MixerFlow.Core

open System
open TorchSharp
open MixerFlow.Core.Ops

/// MixerFlow's weight sharing. RowWise applies one vector bijector over D features to every
/// row of a [P, D] matrix (channel mixing: each patch); ColumnWise applies one over P entries
/// to every column (patch mixing: each channel). Rows (columns) are folded into the batch, so
/// the same parameters serve all of them; the log-dets of the rows (columns) add up.
[<AbstractClass>]
type Lifted(name: string, copies: int64, inner: Bijector, alongRows: bool) as this =
    inherit Bijector(name + "(" + inner.Name + ")",
                     (if alongRows then [| copies; inner.InputSize |] else [| inner.InputSize; copies |]),
                     (if alongRows then [| copies; inner.InputSize |] else [| inner.InputSize; copies |]))
    do
        if inner.InputShape.Length <> 1 || inner.OutputShape <> inner.InputShape then
            invalidArg "inner" (sprintf "%s needs a bijector of vectors to vectors of the same length, got %O" name inner)
    do this.register_module("inner", inner)
    /// [B, P, D] -> [B * copies, inner size]: columns are made rows by a transpose; then every
    /// row is one more batch element.
    let fold (x: Tensor) =
        let rowsFirst = if alongRows then x else x.transpose(1L, 2L)
        rowsFirst.reshape(x.shape.[0] * copies, inner.InputSize)
    /// [B * copies, inner size] -> [B, P, D]; columns as a transposed view.
    let unfold (b: int64) (y: Tensor) =
        let y = y.reshape(b, copies, inner.InputSize)
        if alongRows then y else y.transpose(1L, 2L)
    member _.Inner = inner
    member private this.Run(x: Tensor, context: Tensor, inverse: bool) =
        this.CheckShape(x, this.InputShape, "input")
        let b = x.shape.[0]
        let flat = fold x
        // Each sample's context row serves all of its rows (columns).
        let r =
            if isNull context then (if inverse then inner.Inverse flat else inner.Forward flat)
            else
                let c = context.repeat_interleave(copies, 0L)
                if inverse then inner.Inverse(flat, c) else inner.Forward(flat, c)
        // A column-wise result is left as a transposed view: what comes next reads it as it is (a
        // copy would add a tensor).
        let y = unfold b r.Value
        // The inner log-dets are per row: a sample's rows are consecutive in the folded batch, so
        // [b * copies, ...] pieces stay unsummed (Transformed sums them per sample when read);
        // a per-row log-det [b * copies] becomes one of them; a constant one counts once per row.
        let constants = r.Constants |> List.map (fun c -> c.mul(scalar (float copies)))
        Transformed.OfPieces(y, [], r.Terms @ r.PerSample, constants)
    override this.Forward(x: Tensor) = this.Run(x, null, false)
    override this.Inverse(y: Tensor) = this.Run(y, null, true)
    override this.Forward(x: Tensor, context: Tensor) = this.Run(x, context, false)
    override this.Inverse(y: Tensor, context: Tensor) = this.Run(y, context, true)
    override _.ContextFeatures = inner.ContextFeatures
    override _.Traits = inner.Traits
    /// How many rows (columns) share the inner bijector.
    member internal _.Copies = copies
    /// Whether the inner bijector runs along rows (RowWise) or columns (ColumnWise).
    member internal _.AlongRows = alongRows
    /// [B, P, D] -> [B * copies, inner size], as the forward pass folds it.
    member internal _.Fold(x: Tensor) = fold x
    /// [B * copies, inner size] -> [B, P, D] (columns as a transposed view).
    member internal _.Unfold(b: int64, y: Tensor) = unfold b y

/// See ColumnWise: one vector bijector over D features applied to every row of [P, D].
type RowWise(rows: int64, inner: Bijector) =
    inherit Lifted("RowWise", rows, inner, true)

/// See RowWise: one vector bijector over P entries applied to every column of [P, D].
type ColumnWise(columns: int64, inner: Bijector) =
    inherit Lifted("ColumnWise", columns, inner, false)

/// Applies a shape-preserving bijector to the first `count` slices of one event axis and leaves
/// the rest alone (log-det of the slices only). Glow's multi-scale structure: after a split, the
/// next level works on the channels that stay (axis 0); multi-scale MixerFlow's next layers work on
/// the columns of its patches x features matrix that stay (axis 1).
type Partial(eventShape: int64[], axis: int, count: int64, inner: Bijector) as this =
    inherit Bijector("Partial(" + inner.Name + ")", eventShape, eventShape)
    do
        if axis < 0 || axis >= eventShape.Length then
            invalidArg "axis" (sprintf "Partial: axis %d must lie in 0..%d for event shape %s" axis (eventShape.Length - 1) (Shapes.show eventShape))
        if count < 1L || count >= eventShape.[axis] then
            invalidArg "count" (sprintf "Partial: count %d must lie in 1..%d for axis %d of event shape %s" count (eventShape.[axis] - 1L) axis (Shapes.show eventShape))
        let expected = Array.copy eventShape
        expected.[axis] <- count
        if inner.InputShape <> expected || inner.OutputShape <> expected then
            invalidArg "inner" (sprintf "Partial: inner bijector must map %s to itself, got %O" (Shapes.show expected) inner)
    do this.register_module("inner", inner)
    let dim = int64 axis + 1L
    /// Along the first event axis (Glow's split).
    new(eventShape: int64[], count: int64, inner: Bijector) = new Partial(eventShape, 0, count, inner)
    member _.Inner = inner
    /// The event axis whose first Count slices the inner bijector takes.
    member _.Axis = axis
    /// How many slices of the axis the inner bijector takes.
    member _.Count = count
    member private this.Run(x: Tensor, context: Tensor, inverse: bool) =
        this.CheckShape(x, eventShape, "input")
        let head = x.narrow(dim, 0L, count)
        let tail = x.narrow(dim, count, eventShape.[axis] - count)
        let r =
            if isNull context then (if inverse then inner.Inverse head else inner.Forward head)
            elif inverse then inner.Inverse(head, context) else inner.Forward(head, context)
        r.WithValue(torch.cat([| r.Value; tail |], dim))
    override this.Forward(x: Tensor) = this.Run(x, null, false)
    override this.Inverse(y: Tensor) = this.Run(y, null, true)
    override this.Forward(x: Tensor, context: Tensor) = this.Run(x, context, false)
    override this.Inverse(y: Tensor, context: Tensor) = this.Run(y, context, true)
    override _.ContextFeatures = inner.ContextFeatures
    override _.Traits = inner.Traits
