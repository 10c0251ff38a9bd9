using MixerFlow.Core;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using MixerFlow.CommandLine;
using MixerFlow.Host.Data;
using MixerFlow.Host.Files;
using MixerFlow.Host.Imaging;
using MixerFlow.Host.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>What a training run reports at the end (also written to summary.json).</summary>
public sealed record TrainSummary(
    string Preset, long Parameters, long Steps, int Epochs, double FinalTrainBpd, double HeldOutBpd,
    double HeldOutStdErr, double BestHeldOutBpd, double ImagesPerSecond, double WallSeconds,
    int DroppedSteps, int Rollbacks, string Data, string RunFolder);

/// <summary>
/// The training loop: Adam with a linear warmup and cosine decay, gradient clipping, seeded and
/// reproducible (data order and dequantisation noise are functions of seed and step, so a resumed
/// run continues exactly as an uninterrupted one); held-out bits/dim after every epoch;
/// atomic checkpoints every N steps and at the best held-out score; a NaN/Inf guard.
/// </summary>
public sealed class Trainer
{
    public const string LastCheckpoint = "last.ckpt";
    public const string BestCheckpoint = "best.ckpt";
    const double ClipNorm = 50.0;
    const int WarmupSteps = 100;
    const int RollbackAfter = 5;
    public const int DefaultEpochs = 10;

    readonly TrainOptions options;
    readonly TextWriter log;

    /// <summary>Test hook: called with the step number before each step; may corrupt the loss by returning true.</summary>
    public Func<long, bool>? InjectNonFinite { get; set; }

    /// <summary>Test hook: stop (as a crash would) once this many steps are done and checkpointed.</summary>
    public long? StopAfter { get; set; }

    /// <summary>The model being trained (after Run).</summary>
    public ImageFlow? Model { get; private set; }

    public Trainer(TrainOptions options, TextWriter log)
    {
        this.options = options;
        this.log = log;
    }

    /// <summary>The device named on the command line; a clear error where CUDA is missing.</summary>
    public static Device ParseDevice(string name)
    {
        if (name == "cuda" && !cuda.is_available())
            throw new UserError("--device cuda: no CUDA device is available (this build uses the CPU LibTorch; build with -p:TorchBackend=cuda on a CUDA machine)");
        return name == "cuda" ? CUDA : CPU;
    }

    static double LearningRate(double peak, long step, long total)
    {
        double warm = Math.Min(1.0, (step + 1) / (double)WarmupSteps);
        double progress = Math.Clamp(step / (double)Math.Max(1, total), 0, 1);
        return peak * warm * (0.1 + 0.9 * 0.5 * (1 + Math.Cos(Math.PI * progress)));
    }

    /// <summary>Mean bits/dim over a data set with its standard error, evaluation mode, no gradients.</summary>
    public static (double Mean, double StdErr) Evaluate(ImageFlow model, ImageDataset data, int batchSize, Device device, int seed = 1234)
    {
        bool training = model.training;
        model.eval();
        var all = new List<double>(data.Count);
        try
        {
            manual_seed(seed);
            for (int start = 0; start < data.Count; start += batchSize)
            {
                var idx = Enumerable.Range(start, Math.Min(batchSize, data.Count - start)).ToArray();
                all.AddRange(NativeSafety.Run(() =>
                {
                    using var scope = NewDisposeScope();
                    using var _ = no_grad();
                    return model.BitsPerDim(data.Batch(idx).to(model.DType).to(device)).to_type(float64).cpu().data<double>().ToArray();
                }));
            }
        }
        finally { model.train(training); }
        double mean = all.Average();
        double sd = Math.Sqrt(all.Sum(v => (v - mean) * (v - mean)) / Math.Max(1, all.Count - 1));
        return (mean, sd / Math.Sqrt(all.Count));
    }

    public TrainSummary Run()
    {
        var wall = Stopwatch.StartNew();
        if (options.Threads > 0) set_num_threads(options.Threads);
        var device = ParseDevice(options.Device);

        // Model, optimiser and step: fresh, or from the run folder's last checkpoint.
        string runDir = options.Resume
            ?? options.Out
            ?? Path.Combine("runs", $"{options.Preset}-{DateTime.Now:yyyyMMdd-HHmmss}");
        var resumeFrom = options.Resume is null ? null : Path.Combine(options.Resume, LastCheckpoint);
        manual_seed(options.Seed);
        var model = new ImageFlow(resumeFrom is null ? Presets.Get(options.Preset) : Checkpoint.ReadConfig(resumeFrom));
        Directory.CreateDirectory(runDir);
        var cfg = model.Config;
        model.MoveTo(device, float32);
        Model = model;
        var adam = optim.Adam(model.parameters(), options.Lr);
        Checkpoint.Header? resumed = null;
        if (resumeFrom is not null)
        {
            resumed = Checkpoint.LoadInto(resumeFrom, model, adam);
            log.WriteLine($"resuming {resumeFrom} at step {resumed.Step}");
        }
        AtomicFile.WriteAllText(Path.Combine(runDir, "config.json"), cfg.ToJson());

        var data = DatasetLoader.Load(options.Data, cfg.Channels, cfg.Height, cfg.Width, options.Seed);
        log.WriteLine($"data: {data.Description}");
        log.WriteLine($"model: {cfg.Name}, {model.ParameterCount:N0} parameters; run folder {runDir}");

        int stepsPerEpoch = Math.Max(1, data.Train.Count / options.BatchSize);
        long totalSteps = options.Steps > 0 ? options.Steps : (long)stepsPerEpoch * (options.Epochs > 0 ? options.Epochs : DefaultEpochs);
        long step = resumed?.Step ?? 0;
        double best = resumed?.BestHeldOutBpd ?? double.PositiveInfinity;
        int dropped = 0, rollbacks = 0, consecutiveBad = 0;
        double lrScale = 1.0;
        var metrics = new CsvLog(Path.Combine(runDir, "metrics.csv"),
            "step", "epoch", "train_bpd", "heldout_bpd", "heldout_stderr", "lr", "images_per_s", "dropped_steps", "rss_mb", "live_tensors");
        var trainCurve = new List<(long, double)>();
        var heldCurve = new List<(long, double)>();
        foreach (var row in File.Exists(metrics.Path) ? CsvLog.Read(metrics.Path) : [])
        {
            long s = long.Parse(row["step"], CultureInfo.InvariantCulture);
            if (s > step) continue;
            if (row["train_bpd"] != "") trainCurve.Add((s, double.Parse(row["train_bpd"], CultureInfo.InvariantCulture)));
            if (row["heldout_bpd"] != "") heldCurve.Add((s, double.Parse(row["heldout_bpd"], CultureInfo.InvariantCulture)));
        }

        void SaveCheckpoint(string name, int epoch) =>
            Checkpoint.Save(Path.Combine(runDir, name), model, step, epoch, best, adam);

        if (resumed is null)
        {
            // The untrained model's held-out score starts the curve.
            var (held0, se0) = Evaluate(model, data.HeldOut, 256, device);
            heldCurve.Add((0, held0));
            metrics.Append(0, 0, null, held0, se0, null, null, 0, ResidentMegabytes(), LiveTensors());
            log.WriteLine($"step 0: held-out {held0:0.0000} +- {se0:0.0000} bits/dim");
        }
        var progress = new ProgressReporter(log, totalSteps, step);
        double lastTrainBpd = double.NaN, runningBpd = double.NaN;
        (double Bpd, double StdErr)? lastHeldOut = null;
        var throughput = Stopwatch.StartNew();
        long imagesSinceLog = 0;
        double imagesPerSecond = 0;
        model.train();
        int[] order = [];
        int orderEpoch = -1;
        while (step < totalSteps)
        {
            int epoch = (int)(step / stepsPerEpoch);
            int inEpoch = (int)(step % stepsPerEpoch);
            if (epoch != orderEpoch) (order, orderEpoch) = (EpochOrder(data.Train.Count, options.Seed, epoch), epoch);
            var idx = order.AsSpan(inEpoch * options.BatchSize, options.BatchSize).ToArray();
            double lr = LearningRate(options.Lr, step, totalSteps) * lrScale;
            foreach (var g in adam.ParamGroups) g.LearningRate = lr;

            var (ok, bpdValue) = NativeSafety.Run(() =>
            {
                using var scope = NewDisposeScope();
                manual_seed(options.Seed * 1_000_003L + step);
                var x = data.Train.Batch(idx).to(device);
                var loss = model.BitsPerDim(x).mean();
                if (InjectNonFinite?.Invoke(step) == true) loss = loss * double.NaN;
                double bpd = loss.item<float>();
                if (!double.IsFinite(bpd)) return (false, bpd);
                adam.zero_grad();
                loss.backward();
                var norm = nn.utils.clip_grad_norm_(model.parameters(), ClipNorm);
                if (!double.IsFinite(norm))
                {
                    adam.zero_grad();
                    return (false, bpd);
                }
                adam.step();
                return (true, bpd);
            });

            if (!ok)
            {
                dropped++;
                consecutiveBad++;
                log.WriteLine($"step {step}: non-finite loss or gradient, step dropped ({dropped} so far)");
                if (consecutiveBad >= RollbackAfter)
                {
                    var last = Path.Combine(runDir, LastCheckpoint);
                    if (!File.Exists(last)) throw new InvalidOperationException($"{RollbackAfter} non-finite steps in a row before any checkpoint; lower --lr");
                    step = Checkpoint.LoadInto(last, model, adam).Step;
                    lrScale *= 0.5;
                    rollbacks++;
                    consecutiveBad = 0;
                    log.WriteLine($"rolled back to step {step} ({last}); learning rate now x{lrScale}");
                    continue;
                }
                step++;
                continue;
            }
            consecutiveBad = 0;
            step++;
            imagesSinceLog += idx.Length;
            lastTrainBpd = bpdValue;
            runningBpd = double.IsNaN(runningBpd) ? bpdValue : 0.95 * runningBpd + 0.05 * bpdValue;
            if (step % 10 == 0 || step == totalSteps)
            {
                // Training throughput since the last report (held-out evaluation excluded).
                imagesPerSecond = imagesSinceLog / Math.Max(1e-9, throughput.Elapsed.TotalSeconds);
                imagesSinceLog = 0;
                throughput.Restart();
                trainCurve.Add((step, runningBpd));
                metrics.Append(step, epoch, runningBpd, null, null, lr, imagesPerSecond, dropped, ResidentMegabytes(), LiveTensors());
                progress.Report(step, runningBpd, imagesPerSecond);
            }
            if (step % options.CheckpointEvery == 0) SaveCheckpoint(LastCheckpoint, epoch);
            if (StopAfter == step) { Model = model; return null!; }

            bool epochEnd = step % stepsPerEpoch == 0 || step == totalSteps;
            if (epochEnd)
            {
                var (held, se) = Evaluate(model, data.HeldOut, 256, device);
                lastHeldOut = (held, se);
                heldCurve.Add((step, held));
                metrics.Append(step, epoch, runningBpd, held, se, lr, imagesPerSecond, dropped, ResidentMegabytes(), LiveTensors());
                progress.Line($"step {step} (epoch {epoch + 1}): held-out {held:0.0000} +- {se:0.0000} bits/dim");
                if (held < best) { best = held; SaveCheckpoint(BestCheckpoint, epoch); }
                SaveCheckpoint(LastCheckpoint, epoch);
                TrainingCurve.Save(trainCurve, heldCurve, Path.Combine(runDir, "training-curve.png"), $"{cfg.Name}: bits/dim");
                throughput.Restart();
            }
        }
        progress.Done();

        // Pictures: samples at three temperatures, reconstructions beside originals.
        model.eval();
        manual_seed(options.Seed);
        foreach (var t in new[] { 0.5, 0.7, 1.0 })
            ImageGrid.Save(model.Sample(64, t), Path.Combine(runDir, $"samples-t{t:0.0}.png"));
        var originals = data.HeldOut.Batch(Enumerable.Range(0, Math.Min(16, data.HeldOut.Count)).ToArray()).to(device);
        using (no_grad()) ImageGrid.SavePairs(originals, model.Reconstruct(originals), Path.Combine(runDir, "reconstructions.png"));

        // The last step always ends an epoch, so its evaluation is the final score (a resumed run
        // that had already finished has none and evaluates once).
        var (finalHeld, finalSe) = lastHeldOut ?? Evaluate(model, data.HeldOut, 256, device);
        var summary = new TrainSummary(cfg.Name, model.ParameterCount, step, (int)Math.Ceiling(step / (double)stepsPerEpoch),
            lastTrainBpd, finalHeld, finalSe, Math.Min(best, finalHeld), imagesPerSecond, wall.Elapsed.TotalSeconds,
            dropped, rollbacks, data.Description, runDir);
        AtomicFile.WriteAllText(Path.Combine(runDir, "summary.json"),
            JsonSerializer.Serialize(summary, new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase }));
        log.WriteLine($"held-out bits/dim: {finalHeld:0.0000} +- {finalSe:0.0000} ({data.HeldOut.Count} images); " +
                      $"{step} steps, {summary.WallSeconds:0} s, {imagesPerSecond:0} images/s, {dropped} dropped steps; run folder {runDir}");
        return summary;
    }

    /// <summary>Resident memory of the process (managed and native), for the memory-growth benchmark.</summary>
    /// <summary>Tensors alive on this thread (TorchSharp's dispose-scope statistics): flat when no step leaks.</summary>
    static long LiveTensors() => DisposeScopeManager.Statistics.ThreadTotalLiveCount;

    static double ResidentMegabytes()
    {
        using var p = Process.GetCurrentProcess();
        return Math.Round(p.WorkingSet64 / 1048576.0, 1);
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
}
