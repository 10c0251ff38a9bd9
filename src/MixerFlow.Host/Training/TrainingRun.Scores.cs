using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>
/// The scores of <see cref="TrainingRun.Train"/>'s evaluations: the held-out (test) split and, where
/// the run holds training images out (<see cref="TrainingSettings.ValidationImages"/>), the validation
/// set, which alone then chooses best.ckpt; with a weight average, of the averaged parameters.
/// </summary>
internal sealed partial class TrainingRun
{
    /// <summary>
    /// One evaluation's scores: held-out, and validation where the run has a validation set.
    /// <see cref="Choosing"/> is the one best.ckpt is chosen by: never the held-out score beside a validation one.
    /// </summary>
    internal readonly record struct Scores((double Bpd, double StdErr) HeldOut, (double Bpd, double StdErr)? Validation)
    {
        /// <summary>The score that chooses best.ckpt: validation where there is one, else held-out.</summary>
        public (double Bpd, double StdErr) Choosing => Validation ?? HeldOut;

        /// <summary>The observer's report of this evaluation at <paramref name="step"/>.</summary>
        public EvaluationReport Report(long step, int epoch, bool best) =>
            new(step, epoch, Choosing.Bpd, Choosing.StdErr, best)
            {
                Split = Validation is null ? "held-out" : "validation",
                HeldOutBitsPerDim = Validation is null ? null : HeldOut.Bpd,
            };
    }

    /// <summary>
    /// What the summary reports: the last model's scores (held-out; validation, where there is one)
    /// and best.ckpt's (its held-out score, its validation score, its step).
    /// </summary>
    readonly record struct FinalScores((double Bpd, double StdErr) HeldOut, (double Bpd, double StdErr) BestHeldOut,
                                       (double Bpd, double StdErr) Validation, double BestValidation, long BestStep);

    static readonly (double, double) NoScore = (double.NaN, double.NaN);

    /// <summary>Scores the held-out split and the validation set, if any.</summary>
    Scores Evaluate() => new(Score(data.HeldOut), data.Validation is null ? null : Score(data.Validation));

    /// <summary>Mean bits/dim of <paramref name="images"/> with its standard error, of the averaged parameters where the run averages them.</summary>
    (double Bpd, double StdErr) Score(ImageDataset images)
    {
        using (start.Average?.Apply())
            return Evaluation.BitsPerDim(model, images, Evaluation.DefaultBatchSize, run.Device, communicator: ranks);
    }

    /// <summary>
    /// The scores at the end. The last step ends an epoch, so its evaluation is the last model's;
    /// a run stopped early reports its last evaluation, if any. With a validation set, best.ckpt is
    /// scored on the held-out split once more at the end (it may be from before a resume).
    /// </summary>
    FinalScores FinalScoresOf(bool stoppedEarly)
    {
        var last = lastScores ?? (stoppedEarly ? new Scores(NoScore, data.Validation is null ? null : NoScore) : Evaluate());
        if (data.Validation is null)
            return new FinalScores(last.HeldOut, (Math.Min(best, last.HeldOut.Bpd), double.NaN), NoScore, double.NaN, -1);
        var (bestHeldOut, bestStep) = stoppedEarly ? (NoScore, -1L) : ScoreBestOnHeldOut();
        return new FinalScores(last.HeldOut, bestHeldOut, last.Validation!.Value, double.IsFinite(best) ? best : double.NaN, bestStep);
    }

    /// <summary>
    /// best.ckpt (the writer's file, handed to every rank) scored on the held-out split, and its step:
    /// its model tensors, which are the averaged parameters where the run averages them. None without a best.ckpt.
    /// </summary>
    ((double Bpd, double StdErr) Score, long Step) ScoreBestOnHeldOut()
    {
        var bytes = output.ShareBest(ranks);
        if (bytes.Length == 0) return (NoScore, -1);
        using var bestModel = new ImageFlow(model.Config);
        bestModel.MoveTo(run.Device, float32);
        var header = Checkpoint.LoadInto(bytes, RunFolder.BestCheckpoint, bestModel, null);
        return (Evaluation.BitsPerDim(bestModel, data.HeldOut, Evaluation.DefaultBatchSize, run.Device, communicator: ranks), header.Step);
    }
}
