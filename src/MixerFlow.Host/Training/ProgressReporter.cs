using Spectre.Console;

namespace MixerFlow.Host.Training;

/// <summary>
/// Progress of a long run: a live status line (step, bits/dim, images/s, ETA) on a terminal,
/// plain log lines every few seconds when output is redirected.
/// </summary>
public sealed class ProgressReporter
{
    readonly TextWriter log;
    readonly long total;
    readonly long start;
    readonly bool live;
    readonly DateTime started = DateTime.UtcNow;
    DateTime lastLine = DateTime.MinValue;

    public ProgressReporter(TextWriter log, long total, long start)
    {
        this.log = log;
        this.total = total;
        this.start = start;
        live = ReferenceEquals(log, Console.Out) && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Ansi;
    }

    string Text(long step, double bpd, double imagesPerSecond)
    {
        double done = (step - start) / (double)Math.Max(1, total - start);
        var elapsed = DateTime.UtcNow - started;
        var eta = done > 0 ? TimeSpan.FromSeconds(elapsed.TotalSeconds * (1 - done) / done) : TimeSpan.Zero;
        int width = 30, filled = (int)(width * step / (double)Math.Max(1, total));
        return $"[{new string('#', filled)}{new string('.', width - filled)}] step {step}/{total}  {bpd:0.000} bits/dim  {imagesPerSecond:0} img/s  ETA {(int)eta.TotalMinutes:00}:{eta.Seconds:00}";
    }

    public void Report(long step, double bpd, double imagesPerSecond)
    {
        if (live)
        {
            Console.Write("\r" + Text(step, bpd, imagesPerSecond).PadRight(Console.WindowWidth > 0 ? Math.Min(Console.WindowWidth - 1, 110) : 110));
        }
        else if ((DateTime.UtcNow - lastLine).TotalSeconds >= 5 || step == total)
        {
            log.WriteLine(Text(step, bpd, imagesPerSecond));
            lastLine = DateTime.UtcNow;
        }
    }

    public void Line(string text)
    {
        if (live) Console.WriteLine();
        log.WriteLine(text);
    }

    public void Done()
    {
        if (live) Console.WriteLine();
    }
}
