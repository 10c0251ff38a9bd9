namespace MixerFlow.Core

open System
open TorchSharp
open MixerFlow.Core.Ops

/// A run of consecutive permutations (MixerFlow's unpatchify, shift and patchify between layers,
/// or one of them alone) as one gather along the flattened sample; its backward is the inverse
/// gather of dL/dy.
/// <param name="first">The run's first part (its input shape and shape check).</param>
/// <param name="outputShape">The run's last part's output shape.</param>
/// <param name="gather">Output value k takes flat input value gather.[k].</param>
[<Sealed>]
type internal PermutationRunStep(first: Bijector, outputShape: int64[], gather: int64[]) =
    let inputShape = first.InputShape
    // The gather (variant 0), the same for a [B, P, D] input that is a transposed view read as it
    // lies (1), and the inverse permutation (2), on each device.
    let indices = DeviceTensors<int>()
    let index (variant: int) (x: Tensor) : Tensor =
        let made =
            indices.Get(variant, x, fun device ->
                let values =
                    match variant with
                    | 0 -> gather
                    | 1 -> Shapes.transposedPositions inputShape.[0] inputShape.[1] gather
                    | _ -> inversePermutation gather
                [| torch.tensor(values, device = device) |])
        made.[0]
    interface IHandStep with
        member _.Forward(h, _logDet) =
            first.CheckShape(h, inputShape, "input")
            let b = h.shape.[0]
            // A [B, P, D] input that is a transposed view is read as it lies.
            let struct (flat, transposed) =
                if inputShape.Length = 2 then Shapes.flatAsLaid h else struct (h.reshape(b, -1L), false)
            struct (flat.index_select(1L, index (if transposed then 1 else 0) h).view(Array.append [| b |] outputShape), null)
        member _.Backward(_tape, g, _logDetGradient, inputGradient) =
            if not inputGradient then null
            else
                let b = g.shape.[0]
                g.reshape(b, -1L).index_select(1L, index 2 g).view(Array.append [| b |] inputShape)
        member _.Release() = indices.Clear()

/// RowWise / ColumnWise by hand: rows folded into the batch as in the forward pass; dL/dy folded
/// the same way for the inner step's backward, and its dL/dx unfolded.
[<Sealed>]
type internal LiftedStep(lifted: Lifted, inner: IHandStep) =
    let inputShape = lifted.InputShape
    interface IHandStep with
        member _.Forward(x, logDet) =
            lifted.CheckShape(x, inputShape, "input")
            let struct (y, tape) = inner.Forward(lifted.Fold x, logDet)
            struct (lifted.Unfold(x.shape.[0], y), tape)
        member _.Backward(tape, dy, logDetGradient, inputGradient) =
            let dx = inner.Backward(tape, lifted.Fold dy, logDetGradient, inputGradient)
            if isNull dx then null
            else
                // Columns: copied back to [B, P, D] order, so that the steps before (a normalisation,
                // a row-wise flow) take it as it lies instead of each working on a transposed view.
                let dx = lifted.Unfold(dy.shape.[0], dx)
                if lifted.AlongRows then dx else dx.contiguous()
        member _.Release() = inner.Release()

/// Partial by hand: the inner step on the first slices of the axis (copied contiguous, as the
/// forward pass's first fold would), the rest passed through; dL/dy split the same way, the inner
/// step's dL/dx joined with the passed-through slices' dL/dy.
[<Sealed>]
type internal PartialStep(partial: Partial, inner: IHandStep) =
    let inputShape = partial.InputShape
    let dim = int64 partial.Axis + 1L
    let count = partial.Count
    let rest = inputShape.[partial.Axis] - count
    interface IHandStep with
        member _.Forward(x, logDet) =
            partial.CheckShape(x, inputShape, "input")
            let struct (head, tape) = inner.Forward(x.narrow(dim, 0L, count).contiguous(), logDet)
            struct (torch.cat([| head; x.narrow(dim, count, rest) |], dim), tape)
        member _.Backward(tape, dy, logDetGradient, inputGradient) =
            let dx = inner.Backward(tape, dy.narrow(dim, 0L, count), logDetGradient, inputGradient)
            if isNull dx then null
            else torch.cat([| dx; dy.narrow(dim, count, rest) |], dim)
        member _.Release() = inner.Release()

/// A chain by hand: its steps in order (a step covers one part or a run of permutations), each
/// step's temporaries freed as soon as its backward is done.
/// <param name="steps">The steps in order.</param>
/// <param name="starts">The first part each step covers.</param>
/// <param name="firstWithParameters">The first part with a parameter that takes a gradient: the
/// steps before it need no backward unless dL/dx is wanted.</param>
[<Sealed>]
type internal ChainStep(steps: IHandStep[], starts: int[], firstWithParameters: int) =
    interface IHandStep with
        member _.Forward(x, logDet) =
            let tapes = Array.zeroCreate<obj> steps.Length
            let mutable h = x
            for s in 0 .. steps.Length - 1 do
                let struct (y, tape) = steps.[s].Forward(h, logDet)
                tapes.[s] <- tape
                h <- y
            struct (h, box tapes)
        member _.Backward(tape, dy, logDetGradient, inputGradient) =
            let tapes = tape :?> obj[]
            let mutable g = dy
            let mutable s = steps.Length - 1
            while s >= 0 && (inputGradient || starts.[s] >= firstWithParameters) do
                let wanted = inputGradient || starts.[s] > firstWithParameters
                // Each step's temporaries are freed as soon as it is done, and so is the gradient
                // it was handed (unless it is the chain's own): memory is reused while in cache and
                // the backward pass does not pile up a step's worth of gradients.
                let dx =
                    use scope = torch.NewDisposeScope()
                    let dx = steps.[s].Backward(tapes.[s], g, logDetGradient, wanted)
                    if isNull dx || obj.ReferenceEquals(dx, g) then dx else scope.MoveToOuter(dx)
                if not (obj.ReferenceEquals(g, dy)) && not (obj.ReferenceEquals(g, dx)) && not (Workspace.Owns g) then g.Dispose()
                g <- dx
                s <- s - 1
            if inputGradient then g else null
        member _.Release() = for s in steps do s.Release()

/// What an autograd island's backward needs: the detached input it made a leaf of, the part's
/// output and log-det with their autograd history.
[<Sealed>]
type internal IslandTape(leaf: Tensor, y: Tensor, logDet: Tensor) =
    member _.Leaf = leaf
    member _.Y = y
    member _.LogDet = logDet
    member val Used = false with get, set

/// A part without a hand-written rule inside a hand-written pass: its own forward pass under
/// autograd on a detached copy of its input that requires a gradient, and a backward pass of
/// autograd from (dL/dy, dL/dlogdet), which adds its parameters' gradients to their <c>grad</c>
/// and gives dL/dx. The parts around it stay on their hand-written steps.
[<Sealed>]
type internal AutogradIsland(part: Bijector) =
    interface IHandStep with
        member _.Forward(x, logDet) =
            let struct (leaf, y, ld) =
                // A normal tensor (the input may be an inference tensor) that autograd can record from.
                use _normal = torch.inference_mode(false)
                use _grad = torch.enable_grad()
                let leaf = x.detach().clone().requires_grad_(true)
                let r = part.Forward leaf
                struct (leaf, r.Value, r.LogDet)
            let rows = HandGradients.rowsPerSample x logDet
            let value = ld.detach()
            let perSample = if rows = 1L then value else value.reshape(logDet.shape.[0], -1L).sum(1L)
            logDet.add_(perSample, Scalars.One) |> ignore
            struct (y.detach(), box (IslandTape(leaf, y, ld)))
        member _.Backward(tape, dy, logDetGradient, inputGradient) =
            let tape = tape :?> IslandTape
            if tape.Used then
                invalidOp (sprintf "%s: this tape is spent (a tape serves one backward pass, before the part's next forward pass)" part.Name)
            tape.Used <- true
            use _normal = torch.inference_mode(false)
            // dL/dy as a normal tensor: autograd may keep it as a parameter's gradient.
            let dyNormal = dy.clone()
            if tape.LogDet.requires_grad then
                let ld = tape.LogDet
                let dLogDet = torch.tensor(logDetGradient, dtype = ld.dtype, device = ld.device).expand_as(ld).contiguous()
                torch.autograd.backward([| tape.Y; tape.LogDet |], [| dyNormal; dLogDet |])
            else torch.autograd.backward([| tape.Y |], [| dyNormal |])
            if inputGradient then tape.Leaf.grad else null
        member _.Release() = ()
