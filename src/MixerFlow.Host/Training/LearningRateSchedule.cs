namespace MixerFlow.Host.Training;

/// <summary>
/// Linear warmup to <see cref="Peak"/> over <see cref="WarmupSteps"/> steps, then a cosine decay to
/// <see cref="FinalFraction"/> of the peak at <see cref="TotalSteps"/>:
/// lr(s) = peak * min(1, (s + 1) / warmup) * (f + (1 - f) (1 + cos(pi s / total)) / 2).
/// </summary>
public sealed record LearningRateSchedule(double Peak, long TotalSteps, int WarmupSteps = 100, double FinalFraction = 0.1)
{
    /// <summary>The learning rate at step <paramref name="step"/> (0-based).</summary>
    public double At(long step) => At(step, step / (double)Math.Max(1, TotalSteps));

    /// <summary>
    /// The learning rate at step <paramref name="step"/> (which sets the warmup) with the cosine at
    /// <paramref name="progress"/> (clamped to [0, 1]) instead of step / total: a run under a time
    /// budget passes the fraction of its budget spent.
    /// </summary>
    public double At(long step, double progress)
    {
        double warm = WarmupSteps <= 0 ? 1.0 : Math.Min(1.0, (step + 1) / (double)WarmupSteps);
        progress = Math.Clamp(progress, 0, 1);
        return Peak * warm * (FinalFraction + (1 - FinalFraction) * 0.5 * (1 + Math.Cos(Math.PI * progress)));
    }
}
