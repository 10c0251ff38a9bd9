namespace MixerFlow.Core

open System
open TorchSharp
open MixerFlow.Core.Ops

/// MixerFlow's weight sharing. RowWise applies one vector bijector over D features to every
/// row of a [P, D] matrix (channel mixing: each patch); ColumnWise applies one over P entries
/// to every column (patch mixing: each channel). Rows (columns) are folded into the batch, so
/// the same parameters serve all of them; the log-dets of the rows (columns) add up.
type RowWise(rows: int64, inner: Bijector) as this =
    inherit Bijector("RowWise(" + inner.Name + ")", [| rows; inner.InputSize |], [| rows; inner.InputSize |])
    do
        if inner.InputShape.Length <> 1 || inner.OutputShape <> inner.InputShape then
            invalidArg "inner" (sprintf "RowWise needs a bijector of vectors to vectors of the same length, got %O" inner)
    let inner = inner
    do this.register_module("inner", inner)
    member _.Inner = inner
    member private this.Run(x: Tensor, inverse: bool) =
        this.CheckShape(x, this.InputShape, "input")
        let b = x.shape.[0]
        let flat = x.reshape(b * rows, inner.InputSize)
        let r = if inverse then inner.Inverse flat else inner.Forward flat
        Transformed(r.Value.reshape(x.shape), r.LogDet.reshape(b, rows).sum(1L))
    override this.Forward(x) = this.Run(x, false)
    override this.Inverse(y) = this.Run(y, true)
    override _.Traits = inner.Traits

/// See RowWise: one vector bijector over P entries applied to every column of [P, D].
type ColumnWise(columns: int64, inner: Bijector) as this =
    inherit Bijector("ColumnWise(" + inner.Name + ")", [| inner.InputSize; columns |], [| inner.InputSize; columns |])
    do
        if inner.InputShape.Length <> 1 || inner.OutputShape <> inner.InputShape then
            invalidArg "inner" (sprintf "ColumnWise needs a bijector of vectors to vectors of the same length, got %O" inner)
    let inner = inner
    do this.register_module("inner", inner)
    member _.Inner = inner
    member private this.Run(x: Tensor, inverse: bool) =
        this.CheckShape(x, this.InputShape, "input")
        let b = x.shape.[0]
        let p = inner.InputSize
        let flat = x.transpose(1L, 2L).reshape(b * columns, p)
        let r = if inverse then inner.Inverse flat else inner.Forward flat
        Transformed(r.Value.reshape(b, columns, p).transpose(1L, 2L).contiguous(), r.LogDet.reshape(b, columns).sum(1L))
    override this.Forward(x) = this.Run(x, false)
    override this.Inverse(y) = this.Run(y, true)
    override _.Traits = inner.Traits
