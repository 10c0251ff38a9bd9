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
