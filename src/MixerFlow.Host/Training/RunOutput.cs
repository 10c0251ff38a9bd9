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
    public static RunOutput Open(RunSetup run, ICommunicator ranks, ImageFlow model, Checkpoint.Header? resumed, ITrainingObserver report)
    {
        if (!ranks.IsWriter) return new RunOutput(null, null, run.RunPath, false, null);
        var runLock = RunFolder.Lock(run.RunPath);
        try
        {
            var folder = new RunFolder(run.RunPath);
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

    /// <summary>Saves last.ckpt.</summary>
    public void SaveLast(ImageFlow model, long step, int epoch, double best, Adam adam) =>
        folder?.SaveCheckpoint(RunFolder.LastCheckpoint, model, step, epoch, best, adam);

    /// <summary>Saves best.ckpt.</summary>
    public void SaveBest(ImageFlow model, long step, int epoch, double best, Adam adam) =>
        folder?.SaveCheckpoint(RunFolder.BestCheckpoint, model, step, epoch, best, adam);

    /// <summary>A row of metrics.csv.</summary>
    public void Record(long step, int epoch, double? trainBpd, (double Bpd, double StdErr)? heldOut, double? lr, double? imagesPerSecond, int dropped) =>
        folder?.Record(step, epoch, trainBpd, heldOut, lr, imagesPerSecond, dropped);

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

    /// <summary>Reloads last.ckpt into the model and optimiser (the writer); the step it holds, 0 elsewhere.</summary>
    public long LoadLast(ImageFlow model, Adam adam) => folder is not null ? Checkpoint.LoadInto(folder.Last, model, adam).Step : 0;

    public void Dispose()
    {
        epochNoise?.Dispose();
        runLock?.Dispose();
    }
}
