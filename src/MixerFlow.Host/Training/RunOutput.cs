using System.Text.Json;
using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Distributed;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>
/// What a run writes, on the rank that writes (<see cref="ICommunicator.IsWriter"/>): the locked
/// <see cref="RunFolder"/>, its checkpoints, metrics, pictures and summary. On the other ranks every
/// member does nothing, so the loop calls them alike on every rank.
/// </summary>
internal sealed class RunOutput : IDisposable
{
    readonly RunFolder? folder;
    readonly IDisposable? runLock;
    readonly string runPath;
    readonly bool pictures;
    readonly Tensor? epochNoise;

    RunOutput(RunFolder? folder, IDisposable? runLock, string runPath, bool pictures, Tensor? epochNoise)
    {
        (this.folder, this.runLock, this.runPath, this.pictures, this.epochNoise) = (folder, runLock, runPath, pictures, epochNoise);
    }

    /// <summary>The run folder's path.</summary>
    public string Path => folder?.Path ?? runPath;

    /// <summary>last.ckpt's path.</summary>
    public string Last => System.IO.Path.Combine(runPath, RunFolder.LastCheckpoint);

    /// <summary>
    /// Locks and opens the run folder (one process per folder: a second <c>train</c> on it is
    /// refused with the holder's PID), removes temporary files of interrupted writes and, for a
    /// resumed run, the metrics after its step. Under MPI the writer alone holds the folder.
    /// </summary>
    public static RunOutput Open(RunSetup run, ICommunicator ranks, ImageFlow model, Checkpoint.Header? resumed, ITrainingObserver report,
                                 PixelPermutation? permutation = null)
    {
        if (!ranks.IsWriter) return new RunOutput(null, null, run.RunPath, false, null);
        var runLock = RunFolder.Lock(run.RunPath);
        try
        {
            var folder = new RunFolder(run.RunPath, validation: run.Settings.ValidationImages > 0) { PixelPermutation = permutation };
            foreach (var name in folder.RemoveStaleTemps())
                report.OnMessage($"removed {name}, the temporary file of an interrupted write");
            if (resumed is not null)
            {
                report.OnMessage($"resuming {run.ResumeFrom} at step {resumed.Step}");
                folder.ReadCurves(resumed.Step); // checks the rows before any is dropped
                int trimmed = folder.TrimMetrics(resumed.Step);
                if (trimmed > 0) report.OnMessage($"metrics.csv: dropped {trimmed} rows after step {resumed.Step}");
            }
            return new RunOutput(folder, runLock, run.RunPath, run.Settings.Pictures, run.Settings.Pictures ? EpochNoise(model, run) : null);
        }
        catch
        {
            runLock.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The base noise decoded after every epoch (samples/epoch-NNN.png): a generator of its own, so
    /// the training's random stream is untouched.
    /// </summary>
    static Tensor EpochNoise(ImageFlow model, RunSetup run)
    {
        using var generator = new Generator((ulong)run.Settings.Seed + 0x5A3D1E);
        return randn(Ops.BatchShape(36, model.Transform.OutputShape), generator: generator).to(run.Device);
    }

    /// <summary>config.json (with the run's "training" object) and settings.json, for <paramref name="totalSteps"/>.</summary>
    public void WriteSettings(ModelConfig config, TrainingSettings s, long totalSteps)
    {
        folder?.WriteConfig(config, s with { Steps = totalSteps });
        folder?.WriteSettings(s with { Steps = totalSteps, Resume = false, ExtendSteps = 0, Given = null });
    }

    /// <summary>Whether last.ckpt, the rollback target, exists (true on the ranks that do not write).</summary>
    public bool HasLast => folder is null || File.Exists(folder.Last);

    /// <summary>Saves last.ckpt (with the weight average's state, where the run averages its weights).</summary>
    public void SaveLast(ImageFlow model, long step, int epoch, double best, Adam adam, WeightAverage? average) =>
        folder?.SaveCheckpoint(RunFolder.LastCheckpoint, model, step, epoch, best, adam, average);

    /// <summary>The file beside last.ckpt holding the seconds of training steps up to its step (runs with a time budget).</summary>
    public const string BudgetFile = "budget.json";

    /// <summary>budget.json: the seconds of training steps spent up to <paramref name="step"/> (last.ckpt's).</summary>
    public void SaveUsedSeconds(long step, double seconds)
    {
        if (folder is null) return;
        Files.AtomicFile.WriteAllText(System.IO.Path.Combine(folder.Path, BudgetFile),
            JsonSerializer.Serialize(new UsedSeconds(step, seconds), Json));
    }

    /// <summary>
    /// The seconds of training steps a run with a time budget spent up to <paramref name="step"/>, read
    /// from its budget.json; a <see cref="UserError"/> when the file is missing, damaged or of another
    /// step: the run cannot then continue with the budget it has left.
    /// </summary>
    public static double ReadUsedSeconds(string runPath, long step, double maxSeconds)
    {
        var path = System.IO.Path.Combine(runPath, BudgetFile);
        string Refuse(string why) =>
            $"resume {runPath}: the run has a time budget of {maxSeconds} s of training steps, but {path} {why}; " +
            "the seconds left are unknown, so it cannot continue (train it afresh in a new folder)";
        if (!File.Exists(path)) throw new UserError(Refuse("is missing"));
        UsedSeconds? used;
        try { used = JsonSerializer.Deserialize<UsedSeconds>(Files.InputFile.ReadAllText(path, Files.InputFile.TextLimit, "a run's budget.json"), Json); }
        catch (JsonException e) { throw new UserError(Refuse($"is damaged ({e.Message.Split(" Path:")[0]})"), e); }
        if (used is null || !(used.Seconds >= 0)) throw new UserError(Refuse("holds no seconds"));
        if (used.Step != step) throw new UserError(Refuse($"is at step {used.Step}, last.ckpt at step {step}"));
        return used.Seconds;
    }

    sealed record UsedSeconds(long Step, double Seconds);

    static readonly JsonSerializerOptions Json = new() { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase };

    /// <summary>Saves best.ckpt.</summary>
    public void SaveBest(ImageFlow model, long step, int epoch, double best, Adam adam, WeightAverage? average) =>
        folder?.SaveCheckpoint(RunFolder.BestCheckpoint, model, step, epoch, best, adam, average);

    /// <summary>
    /// best.ckpt's bytes on every rank (the writer reads them and hands them on): empty where there
    /// is none (no evaluation was ever finite).
    /// </summary>
    public byte[] ShareBest(ICommunicator ranks)
    {
        byte[]? mine = null;
        if (ranks.IsRoot)
            mine = folder is not null && File.Exists(folder.Best) ? Checkpoint.ReadBytes(folder.Best) : [];
        return ranks.Broadcast(mine);
    }

    /// <summary>A row of metrics.csv.</summary>
    public void Record(long step, int epoch, double? trainBpd, (double Bpd, double StdErr)? heldOut, double? lr, double? imagesPerSecond, int dropped,
                       (double Bpd, double StdErr)? validation = null) =>
        folder?.Record(step, epoch, trainBpd, heldOut, lr, imagesPerSecond, dropped, validation);

    /// <summary>The training curve and the epoch's sample grid, where pictures are on.</summary>
    public void SaveEpochPictures(ImageFlow model, int epoch)
    {
        if (folder is null || !pictures) return;
        folder.SaveCurve($"{model.Config.Name}: bits/dim");
        folder.SaveEpochSamples(model, epochNoise!, epoch);
    }

    /// <summary>Samples and reconstructions at the end of the run, where pictures are on.</summary>
    public void SaveFinalPictures(ImageFlow model, ImageDataset heldOut, int seed)
    {
        if (pictures) folder?.SavePictures(model, heldOut, seed);
    }

    /// <summary>summary.json.</summary>
    public void SaveSummary(TrainSummary summary) => folder?.SaveSummary(summary);

    /// <summary>Reloads last.ckpt into the model, optimiser and weight average (the writer); the step it holds, 0 elsewhere.</summary>
    public long LoadLast(ImageFlow model, Adam adam, WeightAverage? average) =>
        folder is not null ? Checkpoint.LoadInto(folder.Last, model, adam, average).Step : 0;

    public void Dispose()
    {
        epochNoise?.Dispose();
        runLock?.Dispose();
    }
}
