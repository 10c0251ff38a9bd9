namespace MixerFlow.Host.Training;

/// <summary>
/// Tells a loss that explodes against the recent history of kept steps from ordinary noise:
/// a loss above <c>median + Factor * max(|median|, 1)</c> of the last <see cref="Window"/> kept
/// losses (once <see cref="MinimumHistory"/> are known) is divergent. A diverging run's bits/dim
/// jumps by orders of magnitude within a few steps (tiny preset at learning rate 0.3 or 0.9: from
/// about 10 to 1e4 in one step, then to 1e9 and beyond); normal training, its fast initial fall
/// included, stays within 4x the median (measured on the tiny and fashion-mnist presets).
/// </summary>
public sealed class DivergenceGuard
{
    /// <summary>Kept losses the median is taken over.</summary>
    public const int Window = 50;
    /// <summary>Kept losses needed before any loss is judged (the first steps of a run are erratic).</summary>
    public const int MinimumHistory = 10;
    /// <summary>How far above the median, in units of max(|median|, 1), a loss counts as divergent.</summary>
    public const double Factor = 10.0;

    readonly List<(long Step, double Loss)> kept = [];

    /// <summary>Kept losses remembered (at most <see cref="Window"/>).</summary>
    public int Count => kept.Count;

    /// <summary>Why <paramref name="loss"/> counts as divergent, or null when it does not.</summary>
    public string? Judge(double loss)
    {
        if (kept.Count < MinimumHistory || !double.IsFinite(loss)) return null;
        double median = Median();
        double limit = median + Factor * Math.Max(Math.Abs(median), 1.0);
        return loss > limit
            ? $"divergent loss {loss:G4} bits/dim (recent median {median:0.###}, limit {limit:0.###})"
            : null;
    }

    /// <summary>Remembers the loss of a kept step.</summary>
    public void Keep(long step, double loss)
    {
        kept.Add((step, loss));
        if (kept.Count > Window) kept.RemoveAt(0);
    }

    /// <summary>Forgets the losses of steps after <paramref name="step"/> (after a rollback to it).</summary>
    public void ForgetAfter(long step) => kept.RemoveAll(k => k.Step > step);

    double Median()
    {
        var sorted = kept.Select(k => k.Loss).Order().ToArray();
        int n = sorted.Length;
        return n % 2 == 1 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
    }
}

/// <summary>
/// The count of kept and dropped steps and the rollback rule: <see cref="TrainingSettings.RollbackAfter"/>
/// dropped steps in a row call for a rollback to the last checkpoint at half the learning rate; a run
/// that needs more than <see cref="TrainingSettings.MaxRollbacks"/> ends with a <see cref="TrainingDivergedException"/>.
/// </summary>
internal sealed class DroppedSteps(TrainingSettings settings, string model)
{
    int consecutive;

    /// <summary>Steps dropped so far.</summary>
    public int Dropped { get; private set; }
    /// <summary>Steps kept so far (in this process).</summary>
    public int Kept { get; private set; }
    /// <summary>Rollbacks made so far.</summary>
    public int Rollbacks { get; private set; }
    /// <summary>The factor on the scheduled learning rate: halved by every rollback.</summary>
    public double LearningRateScale { get; private set; } = 1.0;
    /// <summary>Why the last dropped step was dropped.</summary>
    public string? LastReason { get; private set; }

    /// <summary>Counts a kept step.</summary>
    public void Keep()
    {
        consecutive = 0;
        Kept++;
    }

    /// <summary>Counts a dropped step; true when it calls for a rollback (<see cref="CheckRollbackLeft"/>, then <see cref="RolledBack"/>).</summary>
    public bool Drop(string reason)
    {
        Dropped++;
        consecutive++;
        LastReason = reason;
        return consecutive >= settings.RollbackAfter;
    }

    /// <summary>Throws the run's end when it has made every rollback it may (at <paramref name="step"/>).</summary>
    public void CheckRollbackLeft(long step)
    {
        if (Rollbacks < settings.MaxRollbacks) return;
        throw Kept == 0 ? NoStepKept(step) : new TrainingDivergedException(
            $"training diverged: {settings.RollbackAfter} steps in a row dropped at step {step} (last: {LastReason}) " +
            $"after {Rollbacks} rollbacks, each halving the learning rate; nothing after the last checkpoint was kept " +
            $"and no summary was written; train again with a lower --lr than {settings.LearningRate}", step, Rollbacks);
    }

    /// <summary>Counts a rollback: the learning rate halves.</summary>
    public void RolledBack()
    {
        LearningRateScale *= 0.5;
        Rollbacks++;
        consecutive = 0;
    }

    /// <summary>Throws when every step taken was dropped.</summary>
    public void CheckSomeKept(long step)
    {
        if (Kept == 0 && Dropped > 0) throw NoStepKept(step);
    }

    /// <summary>A run in which every step was dropped: the losses were not finite from the start, which the learning rate does not explain.</summary>
    TrainingDivergedException NoStepKept(long step) =>
        new($"no step was kept: all {Dropped} steps taken were dropped (last: {LastReason}){(Rollbacks > 0 ? $", {Rollbacks} rollbacks at lower learning rates included" : "")}; " +
            $"losses that are not finite from the first step point at the model configuration '{model}' (for example an extreme " +
            "splineBound or alpha) or at the data, not at the learning rate; nothing was trained and no summary was written", step, Rollbacks);
}
