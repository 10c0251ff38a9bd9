using MixerFlow.Host.Distributed;

namespace MixerFlow.Host.Training;

/// <summary>
/// A run's budget: its total steps and, where <see cref="TrainingSettings.MaxSeconds"/> is set, its
/// seconds of training steps. Only the steps are timed (<see cref="Time"/>: the batch, the forward and
/// backward passes, the optimiser step); held-out evaluations, checkpoints and pictures are not
/// counted, so the budget buys the same training whatever the evaluation schedule. The schedule's
/// progress is the larger of the step fraction and the time fraction, so the cosine reaches its
/// end as the first of the two budgets is spent.
/// </summary>
internal sealed class TrainingBudget
{
    readonly TimeProvider clock;

    /// <param name="maxSeconds">Seconds of training steps; 0 for none.</param>
    /// <param name="totalSteps">Steps; <see cref="long.MaxValue"/> for a run bounded by time alone.</param>
    /// <param name="usedSeconds">Seconds already spent (a resumed run's).</param>
    /// <param name="clock">Where the time comes from (a fake one in tests).</param>
    public TrainingBudget(double maxSeconds, long totalSteps, double usedSeconds, TimeProvider clock)
    {
        (MaxSeconds, TotalSteps, UsedSeconds, this.clock) = (maxSeconds, totalSteps, usedSeconds, clock);
    }

    /// <summary>Seconds of training steps the run may take; 0 for none.</summary>
    public double MaxSeconds { get; }

    /// <summary>Steps the run may take (<see cref="long.MaxValue"/>: bounded by time alone).</summary>
    public long TotalSteps { get; }

    /// <summary>Seconds spent in training steps so far (a resumed run's earlier ones included).</summary>
    public double UsedSeconds { get; private set; }

    /// <summary>Whether the time budget is spent (never without one).</summary>
    public bool TimeSpent => MaxSeconds > 0 && UsedSeconds >= MaxSeconds;

    /// <summary>Runs <paramref name="step"/> and counts its time.</summary>
    public T Time<T>(Func<T> step)
    {
        long started = clock.GetTimestamp();
        try { return step(); }
        finally { UsedSeconds += clock.GetElapsedTime(started).TotalSeconds; }
    }

    /// <summary>
    /// Every rank takes rank 0's seconds (one allreduce of one number; nothing without a time
    /// budget): the schedule and the stop then agree on every rank whatever their clocks say.
    /// </summary>
    public void Agree(ICommunicator ranks)
    {
        if (MaxSeconds <= 0 || ranks.Size == 1) return;
        var used = new[] { ranks.IsRoot ? UsedSeconds : 0.0 };
        ranks.AllReduceSum(used);
        UsedSeconds = used[0];
    }

    /// <summary>How far the run is through its budget at <paramref name="step"/>, in [0, 1]: the schedule's progress.</summary>
    public double Progress(long step)
    {
        double steps = TotalSteps == long.MaxValue ? 0 : step / (double)Math.Max(1, TotalSteps);
        double time = MaxSeconds > 0 ? UsedSeconds / MaxSeconds : 0;
        return Math.Clamp(Math.Max(steps, time), 0, 1);
    }

    /// <summary>
    /// The total steps to report: <see cref="TotalSteps"/>, or for a run bounded by time an estimate
    /// from the time per step so far (at least <paramref name="step"/>).
    /// </summary>
    public long ReportedTotal(long step, long stepsTimed)
    {
        if (MaxSeconds <= 0 || stepsTimed <= 0 || UsedSeconds <= 0) return TotalSteps == long.MaxValue ? step : TotalSteps;
        double estimate = step + (MaxSeconds - UsedSeconds) / (UsedSeconds / stepsTimed);
        return Math.Max(step, Math.Min(TotalSteps, (long)Math.Ceiling(Math.Min(estimate, long.MaxValue / 2.0))));
    }
}
