namespace MixerFlow.Core

open System
open System.Collections.Generic
open System.Runtime.InteropServices
open TorchSharp

/// One report of <see cref="Fitting.Fit"/>: after every `EvaluateEvery` steps and after the last.
[<Sealed>]
type FitProgress internal (step: int, totalSteps: int, trainingNll: float, heldOutNll: float, bestHeldOutNll: float, skippedSteps: int) =
    /// Optimiser steps taken so far (skipped steps included).
    member _.Step = step
    /// The steps asked for.
    member _.TotalSteps = totalSteps
    /// Mean negative log-likelihood (nats per sample) of the finite training batches since the last report.
    member _.TrainingNll = trainingNll
    /// Negative log-likelihood of the held-out data (nats per sample) now; NaN without held-out data.
    member _.HeldOutNll = heldOutNll
    /// The lowest held-out NLL so far, the initial one included; NaN without held-out data.
    member _.BestHeldOutNll = bestHeldOutNll
    /// Steps skipped so far because their loss or gradient was not finite.
    member _.SkippedSteps = skippedSteps
    override _.ToString() =
        let heldOut = if Double.IsNaN heldOutNll then "" else sprintf ", held-out NLL %.4f (best %.4f)" heldOutNll bestHeldOutNll
        sprintf "step %d/%d: training NLL %.4f%s" step totalSteps trainingNll heldOut

/// What <see cref="Fitting.Fit"/> did. The flow itself holds the fitted parameters.
[<Sealed>]
type FitResult internal (steps: int, skippedSteps: int, stoppedEarly: bool, initialHeldOutNll: float,
                         bestHeldOutNll: float, bestStep: int, restoredBest: bool, history: IReadOnlyList<FitProgress>) =
    /// Optimiser steps taken (skipped steps included); fewer than asked when stopped early.
    member _.Steps = steps
    /// Steps skipped because their loss or gradient was not finite (the parameters stayed as they were).
    member _.SkippedSteps = skippedSteps
    /// Whether early stopping ended the fit before the steps asked for.
    member _.StoppedEarly = stoppedEarly
    /// Held-out NLL (nats per sample) before the first step; NaN without held-out data.
    member _.InitialHeldOutNll = initialHeldOutNll
    /// The lowest held-out NLL seen (the initial one included); NaN without held-out data.
    member _.BestHeldOutNll = bestHeldOutNll
    /// The step after which the best held-out NLL was measured (0: before training).
    member _.BestStep = bestStep
    /// Whether the flow holds the parameters and buffers of <see cref="BestStep"/> at the end (held-out
    /// data and RestoreBest): set back to them, unless the last step was the best.
    member _.RestoredBest = restoredBest
    /// Every report, in order.
    member _.History = history

/// The values a <see cref="FitOptions"/> holds; each `With...` copies them with one changed.
type internal FitSettings =
    { Steps: int; BatchSize: int; LearningRate: float; MaxGradientNorm: float; Seed: int
      HeldOut: torch.Tensor; HeldOutContext: torch.Tensor; EvaluateEvery: int; Patience: int
      RestoreBest: bool; Progress: Action<FitProgress> }

/// The settings of <see cref="Fitting.Fit"/>: immutable; each `With...` returns a changed copy
/// (`FitOptions.Default.WithSteps(2000).WithHeldOut(heldOut).WithPatience(5)`).
[<Sealed; AllowNullLiteral>]
type FitOptions private (s: FitSettings) =
    static let check name ok (value: obj) expected =
        if not ok then invalidArg name (sprintf "%s must be %s, got %O" name expected value)
    static let defaults =
        FitOptions({ Steps = 1000; BatchSize = 256; LearningRate = 1e-3; MaxGradientNorm = 10.0; Seed = 0
                     HeldOut = null; HeldOutContext = null; EvaluateEvery = 100; Patience = Int32.MaxValue
                     RestoreBest = true; Progress = null })

    /// 1000 steps of batch 256, learning rate 1e-3, gradient norm clipped at 10, seed 0, no held-out data,
    /// a report every 100 steps, no early stopping, no progress callback.
    static member Default = defaults

    /// Optimiser steps to take (at most; early stopping may end sooner).
    member _.Steps = s.Steps
    /// Samples per step (at most the number of samples); the data are shuffled each pass.
    member _.BatchSize = s.BatchSize
    /// Adam's learning rate (constant).
    member _.LearningRate = s.LearningRate
    /// The largest global gradient norm kept; larger gradients are scaled down. Infinity: no clipping.
    member _.MaxGradientNorm = s.MaxGradientNorm
    /// Seed of the batch order.
    member _.Seed = s.Seed
    /// Held-out data [M, eventShape...], or null.
    member _.HeldOut = s.HeldOut
    /// The held-out data's context [M, contextFeatures] for a conditional flow, or null.
    member _.HeldOutContext = s.HeldOutContext
    /// Steps between reports (and held-out evaluations).
    member _.EvaluateEvery = s.EvaluateEvery
    /// Held-out evaluations in a row without improvement tolerated; the next one stops the fit.
    /// Int32.MaxValue (the default): never stop early.
    member _.Patience = s.Patience
    /// With held-out data: set the flow back to its best parameters (and buffers) at the end.
    member _.RestoreBest = s.RestoreBest
    /// Called with each report on the fitting thread, or null.
    member _.Progress = s.Progress

    /// A copy with <see cref="Steps"/> changed.
    /// <param name="value">At least 1.</param>
    member _.WithSteps(value: int) =
        check "steps" (value >= 1) value "at least 1"
        FitOptions({ s with Steps = value })
    /// A copy with <see cref="BatchSize"/> changed.
    /// <param name="value">At least 1.</param>
    member _.WithBatchSize(value: int) =
        check "batchSize" (value >= 1) value "at least 1"
        FitOptions({ s with BatchSize = value })
    /// A copy with <see cref="LearningRate"/> changed.
    /// <param name="value">A positive finite number.</param>
    member _.WithLearningRate(value: float) =
        check "learningRate" (value > 0.0 && Double.IsFinite value) value "a positive finite number"
        FitOptions({ s with LearningRate = value })
    /// A copy with <see cref="MaxGradientNorm"/> changed.
    /// <param name="value">Positive; Double.PositiveInfinity turns clipping off.</param>
    member _.WithMaxGradientNorm(value: float) =
        check "maxGradientNorm" (value > 0.0) value "positive"
        FitOptions({ s with MaxGradientNorm = value })
    /// A copy with <see cref="Seed"/> changed.
    /// <param name="value">Any seed.</param>
    member _.WithSeed(value: int) =
        FitOptions({ s with Seed = value })
    /// A copy with held-out data for an unconditional flow (null: none).
    /// <param name="data">[M, eventShape...].</param>
    member this.WithHeldOut(data: torch.Tensor) = this.WithHeldOut(data, null)
    /// A copy with held-out data and its context for a conditional flow.
    /// <param name="data">[M, eventShape...], or null: none.</param>
    /// <param name="context">[M, contextFeatures], or null for an unconditional flow.</param>
    member _.WithHeldOut(data: torch.Tensor, context: torch.Tensor) =
        check "context" (isNull context || not (isNull data)) "a context" "null without held-out data"
        FitOptions({ s with HeldOut = data; HeldOutContext = context })
    /// A copy with <see cref="EvaluateEvery"/> changed.
    /// <param name="value">At least 1.</param>
    member _.WithEvaluateEvery(value: int) =
        check "evaluateEvery" (value >= 1) value "at least 1"
        FitOptions({ s with EvaluateEvery = value })
    /// A copy with <see cref="Patience"/> changed (it needs held-out data to act).
    /// <param name="value">At least 0: 0 stops at the first evaluation without improvement.</param>
    member _.WithPatience(value: int) =
        check "patience" (value >= 0) value "at least 0"
        FitOptions({ s with Patience = value })
    /// A copy with <see cref="RestoreBest"/> changed.
    /// <param name="value">Whether to restore the best parameters at the end.</param>
    member _.WithRestoreBest(value: bool) =
        FitOptions({ s with RestoreBest = value })
    /// A copy that calls `callback` with each report (null: none). In F#, a lambda will do:
    /// `options.WithProgress(fun p -> printfn "%O" p)`.
    /// <param name="callback">Called on the fitting thread.</param>
    member _.WithProgress(callback: Action<FitProgress>) =
        FitOptions({ s with Progress = callback })
    /// A copy that reports to `progress` (null: none). `Progress&lt;T&gt;` posts its reports to the
    /// thread pool or the captured synchronisation context, so they may arrive after Fit has returned.
    /// <param name="progress">The receiver of the reports.</param>
    member this.WithProgress(progress: IProgress<FitProgress>) =
        this.WithProgress(if isNull progress then null else Action<FitProgress>(fun p -> progress.Report p))

/// The parameters and buffers of a module, copied aside, to be put back later.
[<Sealed>]
type internal StateSnapshot(m: torch.nn.Module) =
    let saved = Dictionary<string, torch.Tensor>()
    /// Copies the module's current state over the saved one.
    member _.Take() =
        use _noGrad = torch.no_grad()
        for KeyValue(name, t) in m.state_dict() do
            match saved.TryGetValue name with
            | true, s -> s.copy_(t) |> ignore
            | _ -> saved.[name] <- t.detach().clone().DetachFromDisposeScope()
    /// Writes the saved state back into the module's tensors, in place.
    member _.Restore() =
        use _noGrad = torch.no_grad()
        for KeyValue(name, t) in m.state_dict() do
            t.copy_(saved.[name]) |> ignore
    interface IDisposable with
        member _.Dispose() =
            for t in saved.Values do t.Dispose()
            saved.Clear()

/// The best held-out score so far, the step it was measured after, and a snapshot of the
/// parameters then; counts the evaluations without improvement since.
[<Sealed>]
type internal BestKeeper(snapshot: StateSnapshot, initial: float, patience: int, active: bool) =
    let mutable nll = initial
    let mutable step = 0
    let mutable worse = 0
    do if active then snapshot.Take()
    /// The best score (NaN without held-out data).
    member _.Nll = nll
    /// The step after which it was measured (0: before training).
    member _.Step = step
    /// Records the score after `at`; true when the patience has run out. A NaN score is never
    /// an improvement.
    member _.Record(at: int, score: float) : bool =
        if not active then false
        elif score < nll || (Double.IsNaN nll && Double.IsFinite score) then
            nll <- score
            step <- at
            worse <- 0
            snapshot.Take()
            false
        else
            worse <- worse + 1
            worse > patience

/// Shuffled batch indices: each pass over n samples is a fresh permutation (seeded); a pass ends
/// when fewer than a batch remain.
[<Sealed>]
type internal BatchOrder(n: int, batch: int, seed: int) =
    let random = Random(seed)
    let order = Array.init n int64
    let mutable position = n
    /// The next batch's row indices.
    member _.Next() : int64[] =
        if position + batch > n then
            random.Shuffle order
            position <- 0
        let rows = Array.sub order position batch
        position <- position + batch
        rows

/// Maximum-likelihood fitting of a <see cref="Flow"/> with the safe training step: a dispose scope
/// per step (no TorchSharp tensor is left to the finaliser mid-training), MixerFlow's
/// <see cref="Adam"/> (no temporary Scalars), gradient-norm clipping, and steps with a non-finite
/// loss or gradient skipped. Optionally scores held-out data every few steps, stops early when it
/// no longer improves, and restores the best parameters.
[<AbstractClass; Sealed>]
type Fitting =
    static member private Rows(what: string, t: torch.Tensor, flow: Flow) =
        if isNull t then 0L
        else
            let event = flow.EventShape
            if t.dim() <> int64 event.Length + 1L || t.shape.[1..] <> event then
                invalidArg what (sprintf "%s must have shape %s (rows, then the flow's event shape), got %s"
                                    what (Shapes.show (Array.append [| -1L |] event) |> fun s -> s.Replace("-1", "rows")) (Shapes.show t.shape))
            t.shape.[0]

    static member private CheckContext(what: string, context: torch.Tensor, rows: int64, flow: Flow) =
        if flow.ContextFeatures > 0L && isNull context then
            invalidArg what (sprintf "the flow is conditional: %s needs [%d, %d]" what rows flow.ContextFeatures)
        if not (isNull context) && (context.dim() <> 2L || context.shape.[0] <> rows || context.shape.[1] <> flow.ContextFeatures) then
            invalidArg what (sprintf "%s must have shape [%d, %d], got %s" what rows flow.ContextFeatures (Shapes.show context.shape))

    /// Mean negative log-likelihood of `data` (nats per sample), in eval mode, without gradients.
    static member private Score(flow: Flow, data: torch.Tensor, context: torch.Tensor, batch: int64, device: torch.Device) : float =
        use _noGrad = torch.no_grad()
        let training = flow.training
        flow.eval()
        try
            let n = data.shape.[0]
            let mutable total = 0.0
            let mutable start = 0L
            while start < n do
                use _scope = torch.NewDisposeScope()
                let rows = min batch (n - start)
                let x = data.narrow(0L, start, rows).``to``(device)
                let c = if isNull context then null else context.narrow(0L, start, rows).``to``(device)
                total <- total - flow.LogProb(x, c).to_type(torch.ScalarType.Float64).sum().item<float>()
                start <- start + rows
            total / float n
        finally
            flow.train(training)

    /// One training step in its own dispose scope: the batch's loss, or NaN when the step was
    /// skipped (a loss or gradient that is not finite leaves the parameters as they were).
    static member private Step(flow: Flow, adam: Adam, data: torch.Tensor, context: torch.Tensor, rows: int64[],
                               maxGradientNorm: float, device: torch.Device) : float =
        use _scope = torch.NewDisposeScope()
        let index = torch.tensor(rows, device = data.device)
        let x = data.index_select(0L, index).``to``(device)
        let c = if isNull context then null else context.index_select(0L, index.``to``(context.device)).``to``(device)
        let loss = flow.LogProb(x, c).mean().neg()
        let value = loss.to_type(torch.ScalarType.Float64).item<float>()
        if not (Double.IsFinite value) then nan
        else
            adam.ZeroGrad()
            loss.backward()
            if Double.IsFinite(adam.ClipGradientNorm maxGradientNorm) then
                adam.Step()
                value
            else nan

    /// Fits an unconditional flow to `data` by maximum likelihood (see the overload with a context).
    /// <param name="flow">The flow; its parameters are changed in place.</param>
    /// <param name="data">Training data [N, eventShape...], on any device (batches move to the flow's).</param>
    /// <param name="options">The settings; <see cref="FitOptions.Default"/> when null.</param>
    static member Fit(flow: Flow, data: torch.Tensor, [<Optional; DefaultParameterValue(null: FitOptions)>] options: FitOptions) : FitResult =
        Fitting.Fit(flow, data, null, options)

    /// Fits a flow to `data` (with its context for a conditional flow) by maximum likelihood with
    /// Adam: shuffled batches, one dispose scope per step, gradient-norm clipping, non-finite steps
    /// skipped. With held-out data in the options it scores them before training and every
    /// `EvaluateEvery` steps, keeps a copy of the best parameters, stops after `Patience`
    /// evaluations in a row without improvement, and by default restores the best at the end.
    /// The flow's train/eval mode is as it was before. Runs on the calling thread.
    /// <param name="flow">The flow; its parameters are changed in place.</param>
    /// <param name="data">Training data [N, eventShape...], on any device (batches move to the flow's).</param>
    /// <param name="context">[N, contextFeatures] for a conditional flow, row i for data row i; null otherwise.</param>
    /// <param name="options">The settings; <see cref="FitOptions.Default"/> when null.</param>
    static member Fit(flow: Flow, data: torch.Tensor, context: torch.Tensor, options: FitOptions) : FitResult =
        if isNull (box flow) then nullArg "flow"
        if isNull data then nullArg "data"
        let o = if isNull options then FitOptions.Default else options
        let n = Fitting.Rows("data", data, flow)
        if n < 1L then invalidArg "data" "data must hold at least one sample"
        Fitting.CheckContext("context", context, n, flow)
        let heldOutRows = Fitting.Rows("heldOut", o.HeldOut, flow)
        if not (isNull o.HeldOut) then Fitting.CheckContext("heldOutContext", o.HeldOutContext, heldOutRows, flow)
        let parameters = flow.parameters() |> Seq.toArray
        if parameters.Length = 0 then invalidArg "flow" "the flow has no parameters to fit"
        let device = parameters.[0].device
        let batch = int (min (int64 o.BatchSize) n)
        let training = flow.training
        flow.train()
        use adam = new Adam(parameters, o.LearningRate)
        use snapshot = new StateSnapshot(flow)
        try
            Fitting.Loop(flow, adam, snapshot, data, context, o, BatchOrder(int n, batch, o.Seed), device)
        finally
            flow.train(training)

    static member private Loop(flow: Flow, adam: Adam, snapshot: StateSnapshot, data, context, o: FitOptions, order: BatchOrder, device) =
        let hasHeldOut = not (isNull o.HeldOut)
        let score () = if hasHeldOut then Fitting.Score(flow, o.HeldOut, o.HeldOutContext, int64 (max o.BatchSize 1024), device) else nan
        let initial = score ()
        let best = BestKeeper(snapshot, initial, o.Patience, hasHeldOut)
        let history = List<FitProgress>()
        let mutable step, skipped, sum, finite, stop = 0, 0, 0.0, 0, false
        while step < o.Steps && not stop do
            let loss = Fitting.Step(flow, adam, data, context, order.Next(), o.MaxGradientNorm, device)
            step <- step + 1
            if Double.IsNaN loss then skipped <- skipped + 1
            else
                sum <- sum + loss
                finite <- finite + 1
            if step % o.EvaluateEvery = 0 || step = o.Steps then
                let heldOut = score ()
                stop <- best.Record(step, heldOut) && step < o.Steps
                let report = FitProgress(step, o.Steps, (if finite > 0 then sum / float finite else nan), heldOut, best.Nll, skipped)
                history.Add report
                if not (isNull o.Progress) then o.Progress.Invoke report
                sum <- 0.0
                finite <- 0
        if hasHeldOut && o.RestoreBest && best.Step <> step then snapshot.Restore()
        FitResult(step, skipped, stop, initial, best.Nll, best.Step, hasHeldOut && o.RestoreBest, history)
