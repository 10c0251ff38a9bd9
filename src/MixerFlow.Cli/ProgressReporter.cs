using MixerFlow.Host.Training;
using Spectre.Console;

namespace MixerFlow.Cli;

/// <summary>
/// Progress of a training run on the command line: a live status line (step, bits/dim, images/s,
/// ETA) on a terminal, plain log lines every few seconds when output is redirected.
/// </summary>
public sealed class ProgressReporter : ITrainingObserver
{
    readonly TextWriter log;
    readonly bool live;
    readonly TextObserver plain;
    DateTime started = DateTime.UtcNow;
    long start;

    public ProgressReporter(TextWriter log)
    {
        this.log = log;
        plain = new TextObserver(log);
        live = ReferenceEquals(log, Console.Out) && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Ansi;
    }

    public void OnStart(string runFolder, string model, long parameters, string data, long fromStep, long totalSteps)
    {
        start = fromStep;
        started = DateTime.UtcNow;
        ((ITrainingObserver)plain).OnStart(runFolder, model, parameters, data, fromStep, totalSteps);
    }

    static string Bar(long step, long total, int width = 30)
    {
        int filled = (int)(width * step / (double)Math.Max(1, total));
        return $"[{new string('#', filled)}{new string('.', width - filled)}]";
    }

    public void OnProgress(StepReport r)
    {
        if (!live) { ((ITrainingObserver)plain).OnProgress(r); return; }
        double done = (r.Step - start) / (double)Math.Max(1, r.TotalSteps - start);
        var elapsed = DateTime.UtcNow - started;
        var eta = done > 0 ? TimeSpan.FromSeconds(elapsed.TotalSeconds * (1 - done) / done) : TimeSpan.Zero;
        var text = $"{Bar(r.Step, r.TotalSteps)} step {r.Step}/{r.TotalSteps}  {r.TrainBitsPerDim:0.000} bits/dim  {r.ImagesPerSecond:0} img/s  ETA {(int)eta.TotalMinutes:00}:{eta.Seconds:00}";
        int width = Console.WindowWidth > 0 ? Math.Min(Console.WindowWidth - 1, 110) : 110;
        Console.Write("\r" + text.PadRight(width));
        if (r.Step == r.TotalSteps) Console.WriteLine();
    }

    public void OnEvaluation(EvaluationReport r)
    {
        if (live) Console.WriteLine();
        ((ITrainingObserver)plain).OnEvaluation(r);
    }

    public void OnMessage(string text)
    {
        if (live) Console.WriteLine();
        log.WriteLine(text);
    }
}
