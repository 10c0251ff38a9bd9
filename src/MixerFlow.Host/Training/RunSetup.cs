using System.Text.Json;
using MixerFlow.Host.Distributed;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>
/// The settings every rank trains under, resolved once: rank 0 checks the run folder (a fresh run
/// needs an empty one; a resumed one continues under its settings.json on as many ranks as it was
/// started with) and hands the result to the others; then threads, device and seed are set.
/// </summary>
/// <param name="Settings">The resolved settings (with <see cref="TrainingSettings.Ranks"/> set).</param>
/// <param name="RunPath">The run folder.</param>
/// <param name="ResumeFrom">The checkpoint a resumed run continues from; null for a fresh run.</param>
/// <param name="Device">This rank's device.</param>
internal sealed record RunSetup(TrainingSettings Settings, string RunPath, string? ResumeFrom, Device Device)
{
    /// <summary>Resolves <paramref name="given"/> on every rank of <paramref name="ranks"/>.</summary>
    public static RunSetup Resolve(TrainingSettings given, ICommunicator ranks)
    {
        var (s, runPath) = ranks.IsRoot ? OnRoot(given, ranks) : (given, "");
        // Every rank continues under rank 0's resolved settings and run folder (one process: itself).
        var received = ranks.ShareFromRoot(ranks.IsRoot
            ? () => JsonSerializer.SerializeToUtf8Bytes(new[] { runPath, s.ToJson(), s.Resume ? "resume" : "" })
            : null);
        if (received is not null)
        {
            var shared = JsonSerializer.Deserialize<string[]>(received)!;
            runPath = shared[0];
            s = TrainingSettings.FromJson(shared[1]) with
            {
                Model = given.Model, RunFolder = runPath, Resume = shared[2] == "resume", Given = null, ExtendSteps = 0,
            };
        }
        // Device and threads may change on resume: read them from the resolved settings, once.
        int threads = s.Threads > 0 ? s.Threads : s.Device == "cpu" ? ranks.DefaultThreads : 0;
        if (threads > 0) set_num_threads(threads);
        var device = ranks.DeviceFor(Trainer.ParseDevice(s.Device));
        manual_seed(s.Seed);
        return new RunSetup(s, runPath, s.Resume ? Path.Combine(runPath, RunFolder.LastCheckpoint) : null, device);
    }

    /// <summary>
    /// Rank 0's part: a fresh run starts in a new or empty folder; a resumed one continues under the
    /// settings it was started with (settings.json), which given settings may not contradict.
    /// </summary>
    static (TrainingSettings, string) OnRoot(TrainingSettings s, ICommunicator ranks)
    {
        string runPath = s.RunFolder ?? Path.Combine("runs", $"{s.Model.Name}-{DateTime.Now:yyyyMMdd-HHmmss}");
        if (!s.Resume) RunFolder.CheckFresh(runPath);
        else
        {
            s = s.ForResume(RunFolder.ReadSettings(runPath));
            if (s.Ranks != ranks.Size)
                throw new UserError($"resume {runPath}: the run was trained on {s.Ranks} process(es) at batch {s.BatchSize} each " +
                                    $"(global batch {s.GlobalBatchSize}), now started on {ranks.Size}; resume with mpiexec -n {s.Ranks} " +
                                    "so that the global batch, the data order and the schedule stay the same");
        }
        return (s with { Ranks = ranks.Size }, runPath);
    }
}
