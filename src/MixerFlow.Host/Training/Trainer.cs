using System.Diagnostics;
using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>What a training run reports at the end (also written to summary.json).</summary>
public sealed record TrainSummary(
    string Model, long Parameters, long Steps, int Epochs, double FinalTrainBpd, double HeldOutBpd,
    double HeldOutStdErr, double BestHeldOutBpd, double ImagesPerSecond, double WallSeconds,
    int DroppedSteps, int Rollbacks, string Data, string RunFolder, bool StoppedEarly);

/// <summary>
/// The training loop: Adam with a <see cref="LearningRateSchedule"/>, one guarded
/// <see cref="TrainingStep"/> per batch, held-out <see cref="Evaluation"/> after every epoch, and a
/// <see cref="RunFolder"/> with atomic checkpoints every N steps and at the best held-out score.
/// Seeded and reproducible: data order and dequantisation noise are functions of seed and step,
/// so a resumed run continues exactly as an uninterrupted one. A step whose loss or gradient is
/// not finite, or whose loss explodes against the recent kept ones (<see cref="DivergenceGuard"/>),
/// is dropped; <see cref="TrainingSettings.RollbackAfter"/> dropped steps in a row roll back to the
/// last checkpoint (a fresh run writes one at step 0) at half the learning rate, and a run that
/// needs more than <see cref="TrainingSettings.MaxRollbacks"/> rollbacks ends with a
/// <see cref="TrainingDivergedException"/>. <see cref="Run(CancellationToken)"/> stops cleanly when
/// cancelled, saving last.ckpt first (<see cref="TrainingInterruptedException"/>).
/// </summary>
public sealed class Trainer
{
    public const string LastCheckpoint = RunFolder.LastCheckpoint;
    public const string BestCheckpoint = RunFolder.BestCheckpoint;
    const int ReportEvery = 10;
    const int EvaluationBatch = 256;

    readonly TrainingSettings settings;
    readonly ITrainingObserver observer;

    /// <summary>The model being trained (set once the run has been set up).</summary>
    public ImageFlow? Model { get; private set; }

    public Trainer(TrainingSettings settings, ITrainingObserver? observer = null)
    {
        ArgumentNullException.ThrowIfNull(settings);
        NativeRuntime.EnsureLoaded();
        var problems = settings.Problems();
        if (problems.Count > 0) throw new UserError($"training settings: {string.Join("; ", problems)}");
        this.settings = settings;
        this.observer = observer ?? NullObserver.Instance;
    }

    /// <summary>The device named by <paramref name="name"/>; a clear error where CUDA is missing.</summary>
    public static Device ParseDevice(string name)
    {
        if (name == "cuda" && !cuda.is_available())
            throw new UserError("device cuda: no CUDA device is available (this build uses the CPU LibTorch; build with -p:TorchBackend=cuda on a CUDA machine)");
        if (name is not ("cpu" or "cuda")) throw new UserError($"device: must be cpu or cuda, got '{name}'");
        return name == "cuda" ? CUDA : CPU;
    }

    /// <summary>The order of the training images in an epoch: a function of seed and epoch only.</summary>
    public static int[] EpochOrder(int count, int seed, int epoch)
    {
        var order = Enumerable.Range(0, count).ToArray();
        // A fixed arithmetic mix: HashCode.Combine would be salted per process, and then neither
        // a rerun nor a resumed run in a new process would see the same order.
        new Random(unchecked(seed * 1_000_003 + epoch * 7_919 + 0x5EED)).Shuffle(order);
        return order;
    }

    /// <summary>Trains to the end; see <see cref="Run(CancellationToken)"/>.</summary>
    public TrainSummary Run() => Run(CancellationToken.None);

    /// <summary>
    /// Trains to the end and returns the summary (also written to summary.json). When
    /// <paramref name="cancellationToken"/> is cancelled, the step in progress is finished, last.ckpt
    /// is saved at the current step and a <see cref="TrainingInterruptedException"/> (an
    /// <see cref="OperationCanceledException"/>) is thrown; resuming the run folder continues from there.
    /// A run that keeps diverging throws <see cref="TrainingDivergedException"/>; invalid input or
    /// settings, a <see cref="UserError"/>.
    /// </summary>
    public TrainSummary Run(CancellationToken cancellationToken)
    {
        var s = settings;
        var wall = Stopwatch.StartNew();

        // Model, optimiser and step: fresh, or from the run folder's last checkpoint.
        string runPath = s.RunFolder ?? Path.Combine("runs", $"{s.Model.Name}-{DateTime.Now:yyyyMMdd-HHmmss}");
        string? resumeFrom = s.Resume ? Path.Combine(runPath, LastCheckpoint) : null;
        // A resumed run continues under the settings it was started with (settings.json), which
        // given settings may not contradict; folders written before settings.json use the given ones.
        if (s.Resume && File.Exists(RunFolder.SettingsFile(runPath)))
        {
            TrainingSettings saved;
            try { saved = TrainingSettings.FromJson(File.ReadAllText(RunFolder.SettingsFile(runPath))); }
            catch (System.Text.Json.JsonException e) { throw new UserError($"'{RunFolder.SettingsFile(runPath)}' cannot be read: {e.Message}", e); }
            s = s.ForResume(saved);
        }
        // Device and threads may change on resume: read them from the resolved settings, once.
        if (s.Threads > 0) set_num_threads(s.Threads);
        var device = ParseDevice(s.Device);
        manual_seed(s.Seed);
        var model = new ImageFlow(resumeFrom is null ? s.Model : Checkpoint.ReadConfig(resumeFrom));
        var cfg = model.Config;
        model.MoveTo(device, float32);
        Model = model;
        using var adam = new Adam(model.parameters(), s.LearningRate);
        Checkpoint.Header? resumed = null;
        if (resumeFrom is not null)
        {
            resumed = Checkpoint.LoadInto(resumeFrom, model, adam);
            // A finished run (its saved total reached, its summary written) is not trained again.
            if (s.Steps > 0 && resumed.Step >= s.Steps && RunFolder.ReadSummary(runPath) is { } done)
            {
                observer.OnMessage($"run already finished at step {resumed.Step}; use --extend-steps N to train N more steps");
                return done;
            }
        }
        // The data is loaded before the run folder is made: a failed load leaves no folder behind.
        var data = DatasetLoader.Load(s.Data, cfg.Channels, cfg.Height, cfg.Width, s.Seed);
        if (s.BatchSize > data.Train.Count)
            throw new UserError($"batch size {s.BatchSize} is larger than the training set ({data.Train.Count} images: {data.Description}); " +
                                $"use a batch size of at most {data.Train.Count}");
        // One process per run folder: a second `train` on it is refused with the holder's PID.
        using var runLock = RunFolder.Lock(runPath);
        var folder = new RunFolder(runPath);
        foreach (var name in folder.RemoveStaleTemps())
            observer.OnMessage($"removed {name}, the temporary file of an interrupted write");
        if (resumed is not null)
        {
            observer.OnMessage($"resuming {resumeFrom} at step {resumed.Step}");
            int trimmed = folder.TrimMetrics(resumed.Step);
            if (trimmed > 0) observer.OnMessage($"metrics.csv: dropped {trimmed} rows after step {resumed.Step}");
            folder.ReadCurves(resumed.Step);
        }
        folder.WriteConfig(cfg);

        int stepsPerEpoch = Math.Max(1, data.Train.Count / s.BatchSize);
        long totalSteps = s.Steps > 0 ? s.Steps : (long)stepsPerEpoch * s.Epochs;
        folder.WriteSettings(s with { Steps = totalSteps, Resume = false, ExtendSteps = 0, Given = null });
        var schedule = new LearningRateSchedule(s.LearningRate, totalSteps, s.WarmupSteps);
        var trainingStep = new TrainingStep(model, adam, s.ClipNorm);
        long step = resumed?.Step ?? 0;
        double best = resumed?.BestHeldOutBpd ?? double.PositiveInfinity;
        observer.OnStart(folder.Path, cfg.Name, model.ParameterCount, data.Description, step, totalSteps);

        if (resumed is null)
        {
            // A rollback target from the start: a run that goes bad before its first checkpoint
            // rolls back to the untrained model.
            folder.SaveCheckpoint(LastCheckpoint, model, 0, 0, best, adam);
            // The untrained model's held-out score starts the curve.
            var (held0, se0) = Evaluation.BitsPerDim(model, data.HeldOut, EvaluationBatch, device);
            folder.Record(0, 0, null, (held0, se0), null, null, 0);
            observer.OnEvaluation(new EvaluationReport(0, 0, held0, se0, false));
        }

        var guard = new DivergenceGuard();
        int dropped = 0, rollbacks = 0, consecutiveBad = 0;
        double lrScale = 1.0, lastTrainBpd = double.NaN, runningBpd = double.NaN, imagesPerSecond = 0;
        (double Bpd, double StdErr)? lastHeldOut = null;
        var throughput = Stopwatch.StartNew();
        long imagesSinceReport = 0;
        bool stoppedEarly = false;
        int[] order = [];
        int orderEpoch = -1;
        // The same base noise is decoded after every epoch (samples/epoch-NNN.png): a generator of
        // its own, so the training's random stream is untouched.
        Tensor? epochNoise = null;
        if (s.Pictures)
        {
            using var noiseGenerator = new Generator((ulong)s.Seed + 0x5A3D1E);
            epochNoise = randn(Ops.BatchShape(36, model.Transform.OutputShape), generator: noiseGenerator).to(device);
        }
        using var epochNoiseOwner = epochNoise;
        model.train();
        while (step < totalSteps)
        {
            if (cancellationToken.IsCancellationRequested)
            {
                // Between steps: the last one finished, so the state is whole; save it and stop.
                folder.SaveCheckpoint(LastCheckpoint, model, step, (int)(Math.Max(0, step - 1) / stepsPerEpoch), best, adam);
                throw new TrainingInterruptedException(step, folder.Last, folder.Path, cancellationToken);
            }
            int epoch = (int)(step / stepsPerEpoch);
            int inEpoch = (int)(step % stepsPerEpoch);
            if (epoch != orderEpoch) (order, orderEpoch) = (EpochOrder(data.Train.Count, s.Seed, epoch), epoch);
            var idx = order.AsSpan(inEpoch * s.BatchSize, Math.Min(s.BatchSize, order.Length)).ToArray();
            double lr = schedule.At(step) * lrScale;
            long stepNow = step;
            manual_seed(s.Seed * 1_000_003L + step);
            StepOutcome outcome;
            using (var scope = NewDisposeScope())
                outcome = trainingStep.Take(data.Train.Batch(idx).to(device), lr, loss => observer.TransformLoss(stepNow, loss), guard.Judge);

            if (!outcome.Kept)
            {
                dropped++;
                consecutiveBad++;
                observer.OnMessage($"step {step}: {outcome.DroppedBecause}, step dropped ({dropped} so far)");
                if (consecutiveBad >= s.RollbackAfter)
                {
                    if (rollbacks >= s.MaxRollbacks)
                        throw new TrainingDivergedException(
                            $"training diverged: {s.RollbackAfter} steps in a row dropped at step {step} (last: {outcome.DroppedBecause}) " +
                            $"after {rollbacks} rollbacks, each halving the learning rate; nothing after the last checkpoint was kept " +
                            $"and no summary was written; train again with a lower --lr than {s.LearningRate}", step, rollbacks);
                    if (!File.Exists(folder.Last))
                        throw new UserError($"{s.RollbackAfter} bad steps in a row and no checkpoint to roll back to ({folder.Last} is missing); lower the learning rate (now {s.LearningRate})");
                    step = Checkpoint.LoadInto(folder.Last, model, adam).Step;
                    guard.ForgetAfter(step);
                    lrScale *= 0.5;
                    rollbacks++;
                    consecutiveBad = 0;
                    observer.OnMessage($"rolled back to step {step} ({folder.Last}); learning rate now x{lrScale}");
                    continue;
                }
                step++;
                continue;
            }
            consecutiveBad = 0;
            guard.Keep(step, outcome.BitsPerDim);
            step++;
            imagesSinceReport += idx.Length;
            lastTrainBpd = outcome.BitsPerDim;
            runningBpd = double.IsNaN(runningBpd) ? outcome.BitsPerDim : 0.95 * runningBpd + 0.05 * outcome.BitsPerDim;
            if (step % ReportEvery == 0 || step == totalSteps)
            {
                // Training throughput since the last report (held-out evaluation excluded).
                imagesPerSecond = imagesSinceReport / Math.Max(1e-9, throughput.Elapsed.TotalSeconds);
                imagesSinceReport = 0;
                throughput.Restart();
                folder.Record(step, epoch, runningBpd, null, lr, imagesPerSecond, dropped);
                observer.OnProgress(new StepReport(step, totalSteps, epoch, runningBpd, lr, imagesPerSecond, dropped));
            }
            if (step % s.CheckpointEvery == 0) folder.SaveCheckpoint(LastCheckpoint, model, step, epoch, best, adam);

            if (step % stepsPerEpoch == 0 || step == totalSteps)
            {
                var (held, se) = Evaluation.BitsPerDim(model, data.HeldOut, EvaluationBatch, device);
                lastHeldOut = (held, se);
                folder.Record(step, epoch, runningBpd, (held, se), lr, imagesPerSecond, dropped);
                bool isBest = double.IsFinite(held) && held < best;
                observer.OnEvaluation(new EvaluationReport(step, epoch, held, se, isBest));
                if (isBest) { best = held; folder.SaveCheckpoint(BestCheckpoint, model, step, epoch, best, adam); }
                folder.SaveCheckpoint(LastCheckpoint, model, step, epoch, best, adam);
                if (s.Pictures)
                {
                    folder.SaveCurve($"{cfg.Name}: bits/dim");
                    folder.SaveEpochSamples(model, epochNoise!, (int)Math.Ceiling(step / (double)stepsPerEpoch));
                }
                throughput.Restart();
            }
            if (observer.ShouldStop(step)) { stoppedEarly = true; break; }
        }

        if (!stoppedEarly && s.Pictures) folder.SavePictures(model, data.HeldOut, s.Seed);
        // The last step ends an epoch, so its evaluation is the final score; a run that was
        // already finished evaluates once; one stopped early reports its last evaluation, if any.
        var (finalHeld, finalSe) = lastHeldOut is { } lh ? lh
            : stoppedEarly ? (double.NaN, double.NaN)
            : Evaluation.BitsPerDim(model, data.HeldOut, EvaluationBatch, device);
        var summary = new TrainSummary(cfg.Name, model.ParameterCount, step, (int)Math.Ceiling(step / (double)stepsPerEpoch),
            lastTrainBpd, finalHeld, finalSe, Math.Min(best, finalHeld), imagesPerSecond, wall.Elapsed.TotalSeconds,
            dropped, rollbacks, data.Description, folder.Path, stoppedEarly);
        if (!stoppedEarly) folder.SaveSummary(summary);
        observer.OnMessage($"held-out bits/dim: {finalHeld:0.0000} +- {finalSe:0.0000} ({data.HeldOut.Count} images); " +
                           $"{step} steps, {summary.WallSeconds:0} s, {imagesPerSecond:0} images/s, {dropped} dropped steps; run folder {folder.Path}");
        return summary;
    }
}
