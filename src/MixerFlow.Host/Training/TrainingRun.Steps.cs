using System.Diagnostics;
using MixerFlow.Core;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>The parts of <see cref="TrainingRun.Train"/>'s loop: a step, its accounting, an epoch's end and the run's end.</summary>
internal sealed partial class TrainingRun
{
    int[] order = [];
    int orderEpoch = -1;
    string gradientPath = "";
    double lastTrainBpd = double.NaN, runningBpd = double.NaN, imagesPerSecond;
    Scores? lastScores;
    readonly Stopwatch throughput = Stopwatch.StartNew();
    long imagesSinceReport, stepsTimed;

    /// <summary>The step's global batch: its slice of the epoch's order (<see cref="Trainer.EpochOrder"/>).</summary>
    int[] GlobalBatch(int epoch)
    {
        if (epoch != orderEpoch) (order, orderEpoch) = (Trainer.EpochOrder(data.Train.Count, s.Seed, epoch), epoch);
        int inEpoch = (int)(step % stepsPerEpoch);
        return order.AsSpan(inEpoch * s.GlobalBatchSize, Math.Min(s.GlobalBatchSize, order.Length)).ToArray();
    }

    /// <summary>
    /// One guarded step on this rank's share of the global batch, with its share of the
    /// dequantisation noise one process would draw for the whole batch (the same generator state,
    /// shape and dtype as its rand_like of the batch): seeded by seed and step. A kept step updates
    /// the weight average, if any.
    /// </summary>
    StepOutcome TakeStep(int[] batch, double lr)
    {
        long stepNow = step;
        manual_seed(s.Seed * 1_000_003L + step);
        using var scope = NewDisposeScope();
        var cfg = model.Config;
        var noise = rand([batch.Length, cfg.Channels, cfg.Height, cfg.Width], dtype: float32, device: run.Device);
        var (first, count) = ranks.ShareOf(batch.Length);
        // ActNorm's data-dependent initialisation sees the whole first global batch, as one process would.
        if (count < batch.Length && start.Resumed is null && step == 0)
            InitialiseActNormOnGlobalBatch(model, data.Train.Batch(batch).to(run.Device), noise);
        model.Dequantize.Noise = noise.narrow(0, first, count);
        try
        {
            var mine = data.Train.Batch(batch.AsSpan(first, count)).to(run.Device);
            var outcome = trainingStep.Take(mine, lr, loss => observer.TransformLoss(stepNow, loss), guard.Judge);
            if (outcome.Kept) start.Average?.Update();
            return outcome;
        }
        finally { model.Dequantize.Noise = null!; }
    }

    void ReportGradientPath()
    {
        if (trainingStep.GradientPathDescription == gradientPath) return;
        gradientPath = trainingStep.GradientPathDescription;
        report.OnMessage($"gradients: {gradientPath}");
    }

    /// <summary>
    /// Back to last.ckpt at half the learning rate: the writer reloads it and hands the restored
    /// state to the other ranks.
    /// </summary>
    void RollBack()
    {
        drops.CheckRollbackLeft(step);
        if (!output.HasLast)
            throw new UserError($"{s.RollbackAfter} bad steps in a row and no checkpoint to roll back to ({output.Last} is missing); lower the learning rate (now {s.LearningRate})");
        long restored = output.LoadLast(model, start.Optimizer, start.Average);
        var received = ranks.ShareFromRoot(() => Checkpoint.ToBytes(model, restored, 0, 0, start.Optimizer, start.Average));
        step = received is null ? restored : Checkpoint.LoadInto(received, "rank 0's restored state", model, start.Optimizer, start.Average).Step;
        guard.ForgetAfter(step);
        drops.RolledBack();
        report.OnMessage($"rolled back to step {step} ({output.Last}); learning rate now x{drops.LearningRateScale}");
    }

    /// <summary>Counts a kept step's images (the global batch: images/s of all ranks together) and its loss.</summary>
    void Count(int images, double bitsPerDim)
    {
        imagesSinceReport += images;
        lastTrainBpd = bitsPerDim;
        runningBpd = double.IsNaN(runningBpd) ? bitsPerDim : 0.95 * runningBpd + 0.05 * bitsPerDim;
    }

    /// <summary>Training throughput since the last report (held-out evaluation excluded), to metrics.csv and the observer.</summary>
    void ReportProgress(int epoch, double lr)
    {
        imagesPerSecond = imagesSinceReport / Math.Max(1e-9, throughput.Elapsed.TotalSeconds);
        imagesSinceReport = 0;
        throughput.Restart();
        output.Record(step, epoch, runningBpd, null, lr, imagesPerSecond, drops.Dropped);
        report.OnProgress(new StepReport(step, budget.ReportedTotal(step, stepsTimed), epoch, runningBpd, lr, imagesPerSecond, drops.Dropped));
    }

    /// <summary>
    /// The epoch's evaluation (held-out, or validation where the run holds images out), best and last
    /// checkpoints, and the epoch's pictures.
    /// </summary>
    void EndEpoch(int epoch, double lr)
    {
        var scores = Evaluate();
        lastScores = scores;
        output.Record(step, epoch, runningBpd, scores.HeldOut, lr, imagesPerSecond, drops.Dropped, scores.Validation);
        var (score, se) = scores.Choosing;
        bool isBest = double.IsFinite(score) && score < best;
        report.OnEvaluation(scores.Report(step, epoch, isBest));
        if (isBest)
        {
            best = score;
            output.SaveBest(model, step, epoch, best, start.Optimizer, start.Average);
        }
        SaveLast(epoch);
        using (start.Average?.Apply()) output.SaveEpochPictures(model, (int)Math.Ceiling(step / (double)stepsPerEpoch));
        // The evaluation's and the pictures' buffers, freed: back to the system, not left resident
        // for the rest of the run (malloc keeps freed memory; see HugePages).
        HugePages.ReleaseFreedMemory();
        throughput.Restart();
    }

    /// <summary>
    /// The final pictures, scores and summary.json; then, with a weight average, the model keeps the
    /// averaged parameters (<see cref="Trainer.Model"/>: what was evaluated and saved).
    /// </summary>
    TrainSummary Finish(bool stoppedEarly)
    {
        // The tensors the hand-written passes kept from step to step (a training step's activations).
        HandGradient.Release(model);
        drops.CheckSomeKept(step);
        if (!stoppedEarly)
            using (start.Average?.Apply()) output.SaveFinalPictures(model, data.HeldOut, s.Seed);
        var summary = Summarise(stoppedEarly, FinalScoresOf(stoppedEarly));
        if (!stoppedEarly) output.SaveSummary(summary);
        report.OnMessage($"held-out bits/dim: {summary.HeldOutBpd:0.0000} +- {summary.HeldOutStdErr:0.0000} ({data.HeldOut.Count} images); " +
                         (data.Validation is null ? "" : $"best.ckpt (step {summary.BestStep}, validation {summary.BestValidationBpd:0.0000}): " +
                                                         $"held-out {summary.BestHeldOutBpd:0.0000} +- {summary.BestHeldOutStdErr:0.0000}; ") +
                         $"{step} steps, {summary.WallSeconds:0} s ({budget.UsedSeconds:0} s in training steps), {imagesPerSecond:0} images/s, {drops.Dropped} dropped steps; run folder {summary.RunFolder}");
        start.Average?.Assign();
        return summary;
    }

    TrainSummary Summarise(bool stoppedEarly, FinalScores f) =>
        new(model.Config.Name, model.ParameterCount, step, (int)Math.Ceiling(step / (double)stepsPerEpoch),
            lastTrainBpd, f.HeldOut.Bpd, f.HeldOut.StdErr, f.BestHeldOut.Bpd, imagesPerSecond, wall.Elapsed.TotalSeconds,
            drops.Dropped, drops.Rollbacks, data.Description, output.Path, stoppedEarly, gradientPath, budget.UsedSeconds,
            data.Validation?.Count ?? 0, f.Validation.Bpd, f.BestValidation, f.BestStep, f.BestHeldOut.StdErr);

    /// <summary>
    /// ActNorm's data-dependent initialisation on the whole global batch with its noise, as one
    /// process at the global batch would do it in its first step: a forward pass without gradient.
    /// The pass changes nothing else: other buffers (batch norm's running statistics) are put back.
    /// </summary>
    static void InitialiseActNormOnGlobalBatch(ImageFlow model, Tensor global, Tensor noise)
    {
        if (!model.modules().OfType<ActNorm>().Any(a => !a.IsInitialized)) return;
        var others = new BufferSnapshot(model.named_buffers().Where(b => !b.name.EndsWith("initialized") && b.buffer.is_floating_point()).Select(b => b.buffer));
        using (no_grad())
        {
            model.Dequantize.Noise = noise;
            try { model.BitsPerDim(global); }
            finally { model.Dequantize.Noise = null!; }
        }
        others.Restore();
    }
}
