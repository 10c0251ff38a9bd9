using System.Diagnostics;
using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Distributed;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>What a training run reports at the end (also written to summary.json).</summary>
public sealed record TrainSummary(
    string Model, long Parameters, long Steps, int Epochs, double FinalTrainBpd, double HeldOutBpd,
    double HeldOutStdErr, double BestHeldOutBpd, double ImagesPerSecond, double WallSeconds,
    int DroppedSteps, int Rollbacks, string Data, string RunFolder, bool StoppedEarly, string GradientPath = "");

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
/// cancelled, saving last.ckpt first (<see cref="TrainingInterruptedException"/>). A run that kept
/// no step at all (every loss non-finite) ends with a <see cref="TrainingDivergedException"/> that
/// names the model configuration as the likely cause. Before anything is made, a fresh run's folder
/// must hold no run (<see cref="RunFolder.CheckFresh"/>), a resumed one's settings.json, config.json
/// and checkpoint must agree (<see cref="RunFolder.ReadSettings"/>, <see cref="RunFolder.CheckCheckpoint"/>),
/// and the model must fit in memory (<see cref="TrainingLimits"/>).
/// </summary>
/// <remarks>
/// <b>Data-parallel.</b> Under MPI (<c>mpiexec -n N</c>; see <see cref="Communicator.FromEnvironment"/>)
/// N processes train one model: rank 0 resolves the settings and the model (fresh or resumed) and
/// hands its state to the others; every step takes a global batch of N x
/// <see cref="TrainingSettings.BatchSize"/> images from the epoch's order, of which each rank reads
/// its own slice with its slice of the dequantisation noise drawn for the whole global batch;
/// gradients are averaged with one allreduce over the flat buffer and the guards decide on the
/// averaged loss; ActNorm's data-dependent initialisation sees the whole first global batch;
/// held-out evaluation is sharded by batch and reduced; only rank 0 writes the run folder, reports
/// progress and saves checkpoints, and a rollback hands rank 0's restored state to the others. So
/// N ranks at batch B train the same model as one process at batch N x B with the same seed
/// (up to float32 rounding in the averaging), except for batch norm, whose statistics stay per rank.
/// An exception on one rank other than an interruption or divergence (which all ranks agree on)
/// ends every rank (MPI_Abort) after writing the error: otherwise the others would wait forever.
/// </remarks>
public sealed class Trainer
{
    public const string LastCheckpoint = RunFolder.LastCheckpoint;
    public const string BestCheckpoint = RunFolder.BestCheckpoint;
    const int ReportEvery = 10;
    const int EvaluationBatch = 256;

    readonly TrainingSettings settings;
    readonly ITrainingObserver observer;
    readonly ICommunicator ranks;

    /// <summary>The model being trained (set once the run has been set up).</summary>
    public ImageFlow? Model { get; private set; }

    /// <param name="settings">What to train and how.</param>
    /// <param name="observer">Progress and steering; on rank 0 only for the reports (start,
    /// progress, evaluations, messages), on every rank for <see cref="ITrainingObserver.TransformLoss"/>
    /// and <see cref="ITrainingObserver.ShouldStop"/> (a stop any rank asks for ends every rank at that step).</param>
    /// <param name="communicator">The ranks training together; null for
    /// <see cref="Communicator.FromEnvironment"/> (a single process unless started by mpiexec).</param>
    public Trainer(TrainingSettings settings, ITrainingObserver? observer = null, ICommunicator? communicator = null)
    {
        ArgumentNullException.ThrowIfNull(settings);
        NativeRuntime.EnsureLoaded();
        var problems = settings.Problems();
        if (problems.Count > 0) throw new UserError($"training settings: {string.Join("; ", problems)}");
        this.settings = settings;
        this.observer = observer ?? NullObserver.Instance;
        ranks = communicator ?? Communicator.FromEnvironment();
    }

    /// <summary>The ranks this trainer trains with.</summary>
    public ICommunicator Ranks => ranks;

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
        if (ranks.Size == 1) return RunRanks(cancellationToken);
        try { return RunRanks(cancellationToken); }
        catch (Exception e) when (e is not (TrainingInterruptedException or TrainingDivergedException))
        {
            // Only this rank failed: the others wait in a collective call and would wait forever.
            Console.Error.WriteLine($"error on rank {ranks.Rank} of {ranks.Size}: {(e is UserError ? e.Message : e.ToString())}");
            Console.Error.WriteLine("ending every rank (MPI_Abort); checkpoints already written are kept");
            ranks.Abort(e is UserError ? 2 : 1);
            throw;
        }
    }

    TrainSummary RunRanks(CancellationToken cancellationToken)
    {
        var s = settings;
        bool root = ranks.IsRoot;
        // Reports come from rank 0 only.
        var report = root ? observer : NullObserver.Instance;
        var wall = Stopwatch.StartNew();

        // Model, optimiser and step: fresh, or from the run folder's last checkpoint.
        string runPath = s.RunFolder ?? Path.Combine("runs", $"{s.Model.Name}-{DateTime.Now:yyyyMMdd-HHmmss}");
        string? resumeFrom = s.Resume ? Path.Combine(runPath, LastCheckpoint) : null;
        // A fresh run starts in a new or empty folder; a resumed one continues under the settings it
        // was started with (settings.json), which given settings may not contradict.
        if (root && !s.Resume) RunFolder.CheckFresh(runPath);
        if (root && s.Resume)
        {
            s = s.ForResume(RunFolder.ReadSettings(runPath));
            if (s.Ranks != ranks.Size)
                throw new UserError($"resume {runPath}: the run was trained on {s.Ranks} process(es) at batch {s.BatchSize} each " +
                                    $"(global batch {s.GlobalBatchSize}), now started on {ranks.Size}; resume with mpiexec -n {s.Ranks} " +
                                    "so that the global batch, the data order and the schedule stay the same");
        }
        s = s with { Ranks = ranks.Size };
        if (ranks.Size > 1)
        {
            // Every rank continues under rank 0's resolved settings and run folder.
            var shared = System.Text.Json.JsonSerializer.Deserialize<string[]>(ranks.Broadcast(root
                ? System.Text.Json.JsonSerializer.SerializeToUtf8Bytes(new[] { runPath, s.ToJson(), s.Resume ? "resume" : "" })
                : null))!;
            if (!root)
            {
                runPath = shared[0];
                s = TrainingSettings.FromJson(shared[1]) with { Model = s.Model, RunFolder = runPath, Resume = shared[2] == "resume", Given = null, ExtendSteps = 0 };
                resumeFrom = s.Resume ? Path.Combine(runPath, LastCheckpoint) : null;
            }
            if (s.Threads == 0 && s.Device == "cpu")
            {
                // N ranks on one machine share its cores: LibTorch's default (every core) would oversubscribe them.
                int local = Communicator.LocalSize();
                set_num_threads(Math.Max(1, Environment.ProcessorCount / Math.Max(1, local)));
            }
        }
        // Device and threads may change on resume: read them from the resolved settings, once.
        if (s.Threads > 0) set_num_threads(s.Threads);
        var device = ParseDevice(s.Device);
        if (ranks.Size > 1 && device.type == TorchSharp.DeviceType.CUDA) device = new Device(TorchSharp.DeviceType.CUDA, Communicator.LocalRank() % Math.Max(1, cuda.device_count()));
        manual_seed(s.Seed);
        // Rank 0 builds the model (fresh, or from the checkpoint) and hands it to the others as a
        // checkpoint in memory: model tensors, optimiser state, step and best score.
        byte[]? state = null, fileBytes = null;
        if (!root) state = ranks.Broadcast(null);
        else if (resumeFrom is not null) fileBytes = Checkpoint.ReadBytes(resumeFrom); // read once: configuration, then tensors
        var modelConfig = state is not null ? Checkpoint.ReadConfig(state, "rank 0's state")
                          : fileBytes is not null ? Checkpoint.ReadConfig(fileBytes, resumeFrom!) : s.Model;
        if (fileBytes is not null) RunFolder.CheckCheckpoint(runPath, resumeFrom!, modelConfig);
        TrainingLimits.Check(modelConfig, s.BatchSize, resumeFrom ?? $"model '{modelConfig.Name}'");
        var model = new ImageFlow(modelConfig);
        var cfg = model.Config;
        model.MoveTo(device, float32);
        Model = model;
        using var adam = new Adam(model.parameters(), s.LearningRate);
        Checkpoint.Header? resumed = null;
        TrainSummary? finished = null;
        if (root && resumeFrom is not null)
        {
            resumed = Checkpoint.LoadInto(fileBytes!, resumeFrom, model, adam);
            // A finished run (its saved total reached, its summary written) is not trained again.
            if (s.Steps > 0 && resumed.Step >= s.Steps && RunFolder.ReadSummary(runPath) is { } done) finished = done;
        }
        if (ranks.Size > 1)
        {
            // A finished run is handed over without optimiser state: the others then return its summary.
            if (root) ranks.Broadcast(Checkpoint.ToBytes(model, resumed?.Step ?? 0, resumed?.Epoch ?? 0,
                                                         resumed?.BestHeldOutBpd ?? double.PositiveInfinity, finished is not null ? null : adam));
            else
            {
                var header = Checkpoint.LoadInto(state!, "rank 0's state", model, adam);
                if (!header.HasOptimizer)
                    return RunFolder.ReadSummary(runPath) ?? new TrainSummary(cfg.Name, model.ParameterCount, 0, 0, double.NaN, double.NaN,
                        double.NaN, double.NaN, 0, 0, 0, 0, "", runPath, false);
                if (s.Resume) resumed = header;
            }
        }
        if (finished is not null)
        {
            report.OnMessage($"run already finished at step {resumed!.Step}; use --extend-steps N to train N more steps");
            return finished;
        }
        // The data is loaded before the run folder is made: a failed load leaves no folder behind.
        var data = DatasetLoader.Load(s.Data, cfg.Channels, cfg.Height, cfg.Width, s.Seed);
        int globalBatch = s.GlobalBatchSize;
        if (globalBatch > data.Train.Count)
            throw new UserError(ranks.Size == 1
                ? $"batch size {s.BatchSize} is larger than the training set ({data.Train.Count} images: {data.Description}); " +
                  $"use a batch size of at most {data.Train.Count}"
                : $"global batch {globalBatch} ({ranks.Size} ranks x batch {s.BatchSize}) is larger than the training set " +
                  $"({data.Train.Count} images: {data.Description}); use a batch size of at most {data.Train.Count / ranks.Size} per rank");
        // One process per run folder: a second `train` on it is refused with the holder's PID.
        // Under MPI rank 0 holds the folder: the other ranks neither read nor write it.
        using var runLock = root ? RunFolder.Lock(runPath) : null;
        var folder = root ? new RunFolder(runPath) : null;
        if (folder is not null)
        {
            foreach (var name in folder.RemoveStaleTemps())
                report.OnMessage($"removed {name}, the temporary file of an interrupted write");
            if (resumed is not null)
            {
                report.OnMessage($"resuming {resumeFrom} at step {resumed.Step}");
                folder.ReadCurves(resumed.Step); // checks the rows before any is dropped
                int trimmed = folder.TrimMetrics(resumed.Step);
                if (trimmed > 0) report.OnMessage($"metrics.csv: dropped {trimmed} rows after step {resumed.Step}");
            }
        }
        if (ranks.Size > 1) report.OnMessage($"data-parallel on {ranks.Size} MPI ranks ({ranks.Description}): batch {s.BatchSize} per rank, global batch {globalBatch}");

        int stepsPerEpoch = Math.Max(1, data.Train.Count / globalBatch);
        long totalSteps = s.Steps > 0 ? s.Steps : (long)stepsPerEpoch * s.Epochs;
        folder?.WriteConfig(cfg, s with { Steps = totalSteps });
        folder?.WriteSettings(s with { Steps = totalSteps, Resume = false, ExtendSteps = 0, Given = null });
        var schedule = new LearningRateSchedule(s.LearningRate, totalSteps, s.WarmupSteps);
        var trainingStep = new TrainingStep(model, adam, s.ClipNorm, ranks);
        long step = resumed?.Step ?? 0;
        double best = resumed?.BestHeldOutBpd ?? double.PositiveInfinity;
        report.OnStart(folder?.Path ?? runPath, cfg.Name, model.ParameterCount, data.Description, step, totalSteps);

        if (resumed is null)
        {
            // A rollback target from the start: a run that goes bad before its first checkpoint
            // rolls back to the untrained model.
            folder?.SaveCheckpoint(LastCheckpoint, model, 0, 0, best, adam);
            // The untrained model's held-out score starts the curve.
            var (held0, se0) = Evaluation.BitsPerDim(model, data.HeldOut, EvaluationBatch, device, communicator: ranks);
            folder?.Record(0, 0, null, (held0, se0), null, null, 0);
            report.OnEvaluation(new EvaluationReport(0, 0, held0, se0, false));
        }

        var guard = new DivergenceGuard();
        int dropped = 0, rollbacks = 0, consecutiveBad = 0, kept = 0;
        string? lastDropped = null;
        double lrScale = 1.0, lastTrainBpd = double.NaN, runningBpd = double.NaN, imagesPerSecond = 0;
        (double Bpd, double StdErr)? lastHeldOut = null;
        var throughput = Stopwatch.StartNew();
        long imagesSinceReport = 0;
        bool stoppedEarly = false;
        string gradientPath = "";
        int[] order = [];
        int orderEpoch = -1;
        // The same base noise is decoded after every epoch (samples/epoch-NNN.png): a generator of
        // its own, so the training's random stream is untouched.
        Tensor? epochNoise = null;
        if (s.Pictures && root)
        {
            using var noiseGenerator = new Generator((ulong)s.Seed + 0x5A3D1E);
            epochNoise = randn(Ops.BatchShape(36, model.Transform.OutputShape), generator: noiseGenerator).to(device);
        }
        using var epochNoiseOwner = epochNoise;
        model.train();
        while (step < totalSteps)
        {
            // A signal may reach the ranks at different steps: they stop together at the first
            // step any of them saw it.
            if (AnyRank(cancellationToken.IsCancellationRequested))
            {
                // Between steps: the last one finished, so the state is whole; save it and stop.
                folder?.SaveCheckpoint(LastCheckpoint, model, step, (int)(Math.Max(0, step - 1) / stepsPerEpoch), best, adam);
                throw new TrainingInterruptedException(step, Path.Combine(runPath, LastCheckpoint), folder?.Path ?? runPath,
                                                       cancellationToken.IsCancellationRequested ? cancellationToken : new CancellationToken(true));
            }
            int epoch = (int)(step / stepsPerEpoch);
            int inEpoch = (int)(step % stepsPerEpoch);
            if (epoch != orderEpoch) (order, orderEpoch) = (EpochOrder(data.Train.Count, s.Seed, epoch), epoch);
            // The step's global batch; each rank takes its slice of it.
            var idx = order.AsSpan(inEpoch * globalBatch, Math.Min(globalBatch, order.Length)).ToArray();
            double lr = schedule.At(step) * lrScale;
            long stepNow = step;
            manual_seed(s.Seed * 1_000_003L + step);
            StepOutcome outcome;
            using (var scope = NewDisposeScope())
            {
                if (ranks.Size == 1)
                    outcome = trainingStep.Take(data.Train.Batch(idx).to(device), lr, loss => observer.TransformLoss(stepNow, loss), guard.Judge);
                else
                {
                    // The noise one process would draw for the whole global batch (the same generator
                    // state, shape and dtype as its rand_like of the batch); this rank reads only its slice.
                    var noise = rand([idx.Length, cfg.Channels, cfg.Height, cfg.Width], dtype: float32, device: device);
                    if (resumed is null && step == 0) InitialiseActNormOnGlobalBatch(model, data.Train.Batch(idx).to(device), noise);
                    int per = s.BatchSize;
                    model.Dequantize.Noise = noise.narrow(0, ranks.Rank * per, per);
                    try
                    {
                        var mine = data.Train.Batch(idx.AsSpan(ranks.Rank * per, per)).to(device);
                        outcome = trainingStep.Take(mine, lr, loss => observer.TransformLoss(stepNow, loss), guard.Judge);
                    }
                    finally { model.Dequantize.Noise = null!; }
                }
            }

            if (trainingStep.GradientPathDescription != gradientPath)
            {
                gradientPath = trainingStep.GradientPathDescription;
                report.OnMessage($"gradients: {gradientPath}");
            }
            if (!outcome.Kept)
            {
                dropped++;
                consecutiveBad++;
                lastDropped = outcome.DroppedBecause;
                report.OnMessage($"step {step}: {outcome.DroppedBecause}, step dropped ({dropped} so far)");
                if (consecutiveBad >= s.RollbackAfter)
                {
                    if (rollbacks >= s.MaxRollbacks)
                        throw kept == 0 ? NoStepKept(cfg.Name, dropped, lastDropped, step, rollbacks) : new TrainingDivergedException(
                            $"training diverged: {s.RollbackAfter} steps in a row dropped at step {step} (last: {outcome.DroppedBecause}) " +
                            $"after {rollbacks} rollbacks, each halving the learning rate; nothing after the last checkpoint was kept " +
                            $"and no summary was written; train again with a lower --lr than {s.LearningRate}", step, rollbacks);
                    if (folder is not null && !File.Exists(folder.Last))
                        throw new UserError($"{s.RollbackAfter} bad steps in a row and no checkpoint to roll back to ({folder.Last} is missing); lower the learning rate (now {s.LearningRate})");
                    step = RollBack(folder, model, adam);
                    guard.ForgetAfter(step);
                    lrScale *= 0.5;
                    rollbacks++;
                    consecutiveBad = 0;
                    report.OnMessage($"rolled back to step {step} ({Path.Combine(runPath, LastCheckpoint)}); learning rate now x{lrScale}");
                    continue;
                }
                step++;
                continue;
            }
            consecutiveBad = 0;
            kept++;
            guard.Keep(step, outcome.BitsPerDim);
            step++;
            imagesSinceReport += idx.Length; // the global batch: images/s of all ranks together
            lastTrainBpd = outcome.BitsPerDim;
            runningBpd = double.IsNaN(runningBpd) ? outcome.BitsPerDim : 0.95 * runningBpd + 0.05 * outcome.BitsPerDim;
            if (step % ReportEvery == 0 || step == totalSteps)
            {
                // Training throughput since the last report (held-out evaluation excluded).
                imagesPerSecond = imagesSinceReport / Math.Max(1e-9, throughput.Elapsed.TotalSeconds);
                imagesSinceReport = 0;
                throughput.Restart();
                folder?.Record(step, epoch, runningBpd, null, lr, imagesPerSecond, dropped);
                report.OnProgress(new StepReport(step, totalSteps, epoch, runningBpd, lr, imagesPerSecond, dropped));
            }
            if (step % s.CheckpointEvery == 0) folder?.SaveCheckpoint(LastCheckpoint, model, step, epoch, best, adam);

            if (step % stepsPerEpoch == 0 || step == totalSteps)
            {
                var (held, se) = Evaluation.BitsPerDim(model, data.HeldOut, EvaluationBatch, device, communicator: ranks);
                lastHeldOut = (held, se);
                folder?.Record(step, epoch, runningBpd, (held, se), lr, imagesPerSecond, dropped);
                bool isBest = double.IsFinite(held) && held < best;
                report.OnEvaluation(new EvaluationReport(step, epoch, held, se, isBest));
                if (isBest) { best = held; folder?.SaveCheckpoint(BestCheckpoint, model, step, epoch, best, adam); }
                folder?.SaveCheckpoint(LastCheckpoint, model, step, epoch, best, adam);
                if (s.Pictures && folder is not null)
                {
                    folder.SaveCurve($"{cfg.Name}: bits/dim");
                    folder.SaveEpochSamples(model, epochNoise!, (int)Math.Ceiling(step / (double)stepsPerEpoch));
                }
                // The evaluation's and the pictures' buffers, freed: back to the system, not left
                // resident for the rest of the run (malloc keeps freed memory; see HugePages).
                HugePages.ReleaseFreedMemory();
                throughput.Restart();
            }
            if (AnyRank(observer.ShouldStop(step))) { stoppedEarly = true; break; }
        }

        // The tensors the hand-written passes kept from step to step (a training step's activations).
        HandGradient.Release(model);
        if (kept == 0 && dropped > 0) throw NoStepKept(cfg.Name, dropped, lastDropped, step, rollbacks);
        if (!stoppedEarly && s.Pictures) folder?.SavePictures(model, data.HeldOut, s.Seed);
        // The last step ends an epoch, so its evaluation is the final score; a run that was
        // already finished evaluates once; one stopped early reports its last evaluation, if any.
        var (finalHeld, finalSe) = lastHeldOut is { } lh ? lh
            : stoppedEarly ? (double.NaN, double.NaN)
            : Evaluation.BitsPerDim(model, data.HeldOut, EvaluationBatch, device, communicator: ranks);
        var summary = new TrainSummary(cfg.Name, model.ParameterCount, step, (int)Math.Ceiling(step / (double)stepsPerEpoch),
            lastTrainBpd, finalHeld, finalSe, Math.Min(best, finalHeld), imagesPerSecond, wall.Elapsed.TotalSeconds,
            dropped, rollbacks, data.Description, folder?.Path ?? runPath, stoppedEarly, gradientPath);
        if (!stoppedEarly) folder?.SaveSummary(summary);
        report.OnMessage($"held-out bits/dim: {finalHeld:0.0000} +- {finalSe:0.0000} ({data.HeldOut.Count} images); " +
                           $"{step} steps, {summary.WallSeconds:0} s, {imagesPerSecond:0} images/s, {dropped} dropped steps; run folder {summary.RunFolder}");
        return summary;
    }

    /// <summary>A run in which every step was dropped: the losses were not finite from the start, which the learning rate does not explain.</summary>
    static TrainingDivergedException NoStepKept(string model, int dropped, string? last, long step, int rollbacks) =>
        new($"no step was kept: all {dropped} steps taken were dropped (last: {last}){(rollbacks > 0 ? $", {rollbacks} rollbacks at lower learning rates included" : "")}; " +
            $"losses that are not finite from the first step point at the model configuration '{model}' (for example an extreme " +
            "splineBound or alpha) or at the data, not at the learning rate; nothing was trained and no summary was written", step, rollbacks);

    /// <summary>Whether any rank says yes (one allreduce under MPI; the value itself for one process).</summary>
    bool AnyRank(bool mine)
    {
        if (ranks.Size == 1) return mine;
        Span<double> v = [mine ? 1 : 0];
        ranks.AllReduceSum(v);
        return v[0] > 0;
    }

    /// <summary>Rank 0 reloads last.ckpt and hands the restored state to the other ranks; the step it holds.</summary>
    long RollBack(RunFolder? folder, ImageFlow model, Adam adam)
    {
        long step = folder is not null ? Checkpoint.LoadInto(folder.Last, model, adam).Step : 0;
        if (ranks.Size == 1) return step;
        var bytes = ranks.Broadcast(folder is not null ? Checkpoint.ToBytes(model, step, 0, 0, adam) : null);
        return folder is not null ? step : Checkpoint.LoadInto(bytes, "rank 0's restored state", model, adam).Step;
    }

    /// <summary>
    /// ActNorm's data-dependent initialisation on the whole global batch with its noise, as one
    /// process at the global batch would do it in its first step: a forward pass without gradient.
    /// The pass changes nothing else: other buffers (batch norm's running statistics) are put back.
    /// </summary>
    static void InitialiseActNormOnGlobalBatch(ImageFlow model, Tensor global, Tensor noise)
    {
        if (!model.modules().OfType<ActNorm>().Any(a => !a.IsInitialized)) return;
        var others = new BufferSnapshot(model.named_buffers().Where(b => !b.name.EndsWith("initialized") && b.buffer.is_floating_point()).Select(b => b.buffer));
        using (no_grad())
        {
            model.Dequantize.Noise = noise;
            try { model.BitsPerDim(global); }
            finally { model.Dequantize.Noise = null!; }
        }
        others.Restore();
    }

}
