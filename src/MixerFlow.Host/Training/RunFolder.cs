using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using MixerFlow.Host.Data;
using MixerFlow.Host.Files;
using MixerFlow.Host.Imaging;
using MixerFlow.Host.Models;
using TorchSharp.Modules;
using Adam = MixerFlow.Core.Adam;
using WeightAverage = MixerFlow.Core.WeightAverage;
using Ops = MixerFlow.Core.Ops;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>
/// The files of one training run: config.json, metrics.csv, training-curve.png, last.ckpt and
/// best.ckpt, samples-t*.png, reconstructions.png and summary.json. Every file is written
/// atomically (or appended and flushed row by row), so a crash leaves the previous version.
/// </summary>
public sealed partial class RunFolder
{
    public const string LastCheckpoint = "last.ckpt";
    public const string BestCheckpoint = "best.ckpt";
    static readonly string[] MetricColumns =
        ["step", "epoch", "train_bpd", "heldout_bpd", "heldout_stderr", "lr", "images_per_s", "dropped_steps", "rss_mb", "live_tensors"];
    /// <summary>The columns of a run with a validation set: the validation score after the held-out one.</summary>
    static readonly string[] ValidationMetricColumns = [.. MetricColumns[..5], "validation_bpd", "validation_stderr", .. MetricColumns[5..]];

    readonly CsvLog metrics;

    public string Path { get; }
    public string Last => System.IO.Path.Combine(Path, LastCheckpoint);
    public string Best => System.IO.Path.Combine(Path, BestCheckpoint);

    /// <summary>Training bits/dim (running mean), held-out and validation bits/dim by step, as far as the run has come.</summary>
    public List<(long Step, double Bpd)> TrainCurve { get; } = [];
    public List<(long Step, double Bpd)> HeldOutCurve { get; } = [];
    /// <summary>Validation bits/dim by step (runs that hold training images out; see <see cref="HasValidation"/>).</summary>
    public List<(long Step, double Bpd)> ValidationCurve { get; } = [];

    /// <summary>Whether metrics.csv has validation columns (a run that holds training images out for validation).</summary>
    public bool HasValidation { get; }

    /// <param name="path">The run folder (created if missing).</param>
    /// <param name="validation">Whether the run holds training images out for validation: metrics.csv then has the columns validation_bpd and validation_stderr.</param>
    public RunFolder(string path, bool validation = false)
    {
        Path = path;
        HasValidation = validation;
        Directory.CreateDirectory(path);
        var file = System.IO.Path.Combine(path, MetricsFile);
        try { metrics = new CsvLog(file, validation ? ValidationMetricColumns : MetricColumns); }
        catch (InvalidDataException e) { throw new UserError($"{file}: damaged: {e.Message.Replace(System.IO.Path.GetFullPath(file), "", StringComparison.Ordinal).Trim()}", e); }
    }

    public const string LockFile = ".lock";
    public const string LockHolderFile = ".lock-holder";

    /// <summary>
    /// Locks the run folder <paramref name="path"/> (creating it) for one process: an OS lock on its
    /// <c>.lock</c> file, opened with <see cref="FileShare.None"/> and held until the result is
    /// disposed (or the process ends, also by a crash). A second holder, in this or another process,
    /// is refused with a <see cref="UserError"/> naming the folder and the holder's process id; so is
    /// a path that is an existing file, or a folder the file system will not write (read-only, full).
    /// The id is written into <c>.lock</c> and, so that a refused process can read it while the
    /// lock is held, into <c>.lock-holder</c>.
    /// </summary>
    public static IDisposable Lock(string path)
    {
        if (File.Exists(path))
            throw new UserError($"{path}: is an existing file, not a folder; a run folder must be a folder or a new path");
        try { Directory.CreateDirectory(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new UserError($"{path}: cannot create the run folder ({OutputPath.Reason(e)})", e);
        }
        var lockPath = System.IO.Path.Combine(path, LockFile);
        var holderPath = System.IO.Path.Combine(path, LockHolderFile);
        FileStream stream;
        try
        {
            stream = new FileStream(lockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
        }
        catch (IOException e) when (!OutputPath.IsSharingViolation(e))
        {
            // Not another holder: the file system refused (a read-only or full disk).
            throw new UserError($"{path}: cannot write the run folder ({OutputPath.Reason(e)})", e);
        }
        catch (IOException e)
        {
            string holder;
            try { holder = File.ReadAllText(holderPath).Trim(); }
            catch (Exception x) when (x is IOException or UnauthorizedAccessException) { holder = "unknown"; }
            throw new UserError(
                $"{path}: the run folder is in use by another process (process id {holder}); " +
                $"wait for it to finish, stop it, or choose another run folder", e);
        }
        catch (UnauthorizedAccessException e)
        {
            throw new UserError($"{path}: cannot write the run folder ({OutputPath.Reason(e)})", e);
        }
        try
        {
            string pid = Environment.ProcessId.ToString(CultureInfo.InvariantCulture);
            stream.SetLength(0);
            var bytes = System.Text.Encoding.ASCII.GetBytes(pid + "\n");
            stream.Write(bytes);
            stream.Flush();
            File.WriteAllText(holderPath, pid + "\n");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            try { stream.Dispose(); } catch (IOException) { }
            throw new UserError($"{path}: cannot write the run folder ({OutputPath.Reason(e)})", e);
        }
        catch
        {
            stream.Dispose();
            throw;
        }
        return new FolderLock(stream, holderPath);
    }

    sealed class FolderLock(FileStream stream, string holderPath) : IDisposable
    {
        bool disposed;

        public void Dispose()
        {
            if (disposed) return;
            disposed = true;
            try { File.Delete(holderPath); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            stream.Dispose();
        }
    }

    /// <summary>
    /// Reads the curves of metrics.csv up to <paramref name="step"/> (for a resumed run, before
    /// <see cref="TrimMetrics"/>). A row whose step is not a whole number, or a row up to
    /// <paramref name="step"/> whose bits/dim is not a number, is a <see cref="UserError"/> naming the
    /// file, the row and the column.
    /// </summary>
    public void ReadCurves(long step)
    {
        if (!File.Exists(metrics.Path)) return;
        int index = 0;
        foreach (var row in CsvLog.Read(metrics.Path))
        {
            index++;
            if (!long.TryParse(row["step"], NumberStyles.Integer, CultureInfo.InvariantCulture, out long s))
                throw DamagedRow(index, "step", row["step"], "a whole number");
            if (s > step) continue;
            if (Number(row, "train_bpd", index) is double t) TrainCurve.Add((s, t));
            if (Number(row, "heldout_bpd", index) is double h) HeldOutCurve.Add((s, h));
            if (HasValidation && Number(row, "validation_bpd", index) is double v) ValidationCurve.Add((s, v));
        }
    }

    /// <summary>An optional number of a metrics.csv row (empty: none).</summary>
    double? Number(IReadOnlyDictionary<string, string> row, string column, int index)
    {
        var text = row[column];
        if (text == "") return null;
        return double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var v) ? v : throw DamagedRow(index, column, text, "a number");
    }

    UserError DamagedRow(int index, string column, string value, string expected) =>
        new($"{metrics.Path}: data row {index}: {column}: expected {expected}, got '{value}'; metrics.csv is damaged " +
            "(delete or fix that row to resume)");

    /// <summary>The run's saved settings (settings.json).</summary>
    public string SettingsPath => SettingsFile(Path);

    public static string SettingsFile(string folder) => System.IO.Path.Combine(folder, SettingsFileName);
    public static string SummaryFile(string folder) => System.IO.Path.Combine(folder, SummaryFileName);
    /// <summary>The run's resolved training settings, which a resume continues under.</summary>
    public const string SettingsFileName = "settings.json";
    /// <summary>The finished run's summary.</summary>
    public const string SummaryFileName = "summary.json";

    /// <summary>Writes the run's resolved settings as settings.json (atomically).</summary>
    public void WriteSettings(TrainingSettings settings) => AtomicFile.WriteAllText(SettingsPath, settings.ToJson());

    /// <summary>Drops the rows of metrics.csv after <paramref name="step"/> (a resumed run recomputes them).</summary>
    public int TrimMetrics(long step) =>
        metrics.KeepRows(r => long.TryParse(r["step"], NumberStyles.Integer, CultureInfo.InvariantCulture, out var s) && s <= step);

    /// <summary>Removes temporary files of killed atomic writes (AtomicFile's own names only).</summary>
    public IReadOnlyList<string> RemoveStaleTemps() => AtomicFile.RemoveStaleTemps(Path);

    /// <summary>summary.json of a finished run, or null; a <see cref="UserError"/> naming the file when it is damaged.</summary>
    public static TrainSummary? ReadSummary(string folder)
    {
        var path = SummaryFile(folder);
        if (!File.Exists(path)) return null;
        try
        {
            return JsonSerializer.Deserialize<TrainSummary>(InputFile.ReadAllText(path, InputFile.TextLimit, "a run's summary.json"),
                       new JsonSerializerOptions { PropertyNamingPolicy = JsonNamingPolicy.CamelCase, NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals })
                   ?? throw new JsonException("it holds null");
        }
        catch (JsonException e)
        {
            throw new UserError($"{path}: damaged ({e.Message.Split(" Path:")[0]}); delete it and resume the run to write it again", e);
        }
    }

    public void WriteConfig(ModelConfig config) => AtomicFile.WriteAllText(System.IO.Path.Combine(Path, ConfigFile), config.ToJson());

    /// <summary>
    /// config.json: the model's configuration and a "training" object stating how it is trained:
    /// ranks, batch per rank, global batch, steps and the learning-rate schedule, so that a run on
    /// N ranks at batch B can be compared with one process at batch N x B.
    /// </summary>
    public void WriteConfig(ModelConfig config, TrainingSettings settings)
    {
        var json = System.Text.Json.Nodes.JsonNode.Parse(config.ToJson())!.AsObject();
        json["training"] = new System.Text.Json.Nodes.JsonObject
        {
            ["ranks"] = settings.Ranks,
            ["batchPerRank"] = settings.BatchSize,
            ["globalBatch"] = settings.GlobalBatchSize,
            ["steps"] = settings.Steps,
            ["learningRate"] = settings.LearningRate,
            ["warmupSteps"] = settings.WarmupSteps,
            ["schedule"] = $"linear warmup over {settings.WarmupSteps} steps to {settings.LearningRate}, then cosine decay to 0.1 x that at step {settings.Steps}; per optimiser step of the global batch, whatever the number of ranks",
            ["seed"] = settings.Seed,
        };
        AtomicFile.WriteAllText(System.IO.Path.Combine(Path, ConfigFile), json.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>
    /// A row of metrics.csv; the training, held-out or validation value may be missing (a validation
    /// value only in a folder opened with validation columns).
    /// </summary>
    public void Record(long step, int epoch, double? trainBpd, (double Bpd, double StdErr)? heldOut, double? lr, double? imagesPerSecond, int dropped,
                       (double Bpd, double StdErr)? validation = null)
    {
        if (validation is not null && !HasValidation) throw new ArgumentException("this run folder's metrics.csv has no validation columns", nameof(validation));
        if (trainBpd is double t) TrainCurve.Add((step, t));
        if (heldOut is { } h) HeldOutCurve.Add((step, h.Bpd));
        if (validation is { } v) ValidationCurve.Add((step, v.Bpd));
        object?[] scores = HasValidation ? [heldOut?.Bpd, heldOut?.StdErr, validation?.Bpd, validation?.StdErr] : [heldOut?.Bpd, heldOut?.StdErr];
        metrics.Append([step, epoch, trainBpd, .. scores, lr, imagesPerSecond, dropped, ResidentMegabytes(), LiveTensors()]);
    }

    /// <summary>Saves a checkpoint in the folder (with a weight average: the averaged parameters as the model's, and the average's state).</summary>
    public void SaveCheckpoint(string name, ImageFlow model, long step, int epoch, double best, Adam optimizer, WeightAverage? average = null) =>
        Checkpoint.Save(System.IO.Path.Combine(Path, name), model, step, epoch, best, optimizer, average);

    /// <summary>training-curve.png: training bits/dim, and validation (where the run has some) or else held-out bits/dim.</summary>
    public void SaveCurve(string title)
    {
        var path = System.IO.Path.Combine(Path, "training-curve.png");
        if (HasValidation) TrainingCurve.Save(TrainCurve, ValidationCurve, path, title, "validation");
        else TrainingCurve.Save(TrainCurve, HeldOutCurve, path, title);
    }

    /// <summary>Samples at temperatures 0.5, 0.7 and 1.0 and reconstructions of held-out images beside the originals.</summary>
    public void SavePictures(ImageFlow model, ImageDataset heldOut, int seed)
    {
        model.eval();
        manual_seed(seed);
        using var scope = NewDisposeScope();
        foreach (var t in new[] { 0.5, 0.7, 1.0 })
            ImageGrid.Save(Picture(model.Sample(64, t)), System.IO.Path.Combine(Path, $"samples-t{t.ToString("0.0", CultureInfo.InvariantCulture)}.png"));
        var originals = heldOut.Batch(Enumerable.Range(0, Math.Min(16, heldOut.Count)).ToArray()).to(model.Device);
        using (no_grad()) ImageGrid.SavePairs(Picture(originals), Picture(model.Reconstruct(originals)), System.IO.Path.Combine(Path, "reconstructions.png"));
    }

    /// <summary>
    /// The pixel permutation the run trains under (null: none): the pictures (samples,
    /// reconstructions) are un-permuted by it before they are written, so they show images.
    /// </summary>
    public PixelPermutation? PixelPermutation { get; set; }

    /// <summary>Images as a picture shows them: un-permuted where the run permutes its pixels.</summary>
    Tensor Picture(Tensor images) => PixelPermutation?.Unpermute(images) ?? images;

    /// <summary>The folder of the per-epoch sample grids (samples/epoch-NNN.png).</summary>
    public string SamplesFolder => System.IO.Path.Combine(Path, "samples");

    /// <summary>
    /// Decodes the same base noise after every epoch (samples/epoch-NNN.png, temperature 0.7), so
    /// that progress can be watched on the same samples; <paramref name="noise"/> is a standard
    /// normal draw of the model's latent shape, fixed for the run.
    /// </summary>
    public void SaveEpochSamples(ImageFlow model, Tensor noise, int epoch) => model.Evaluating(() =>
    {
        using var scope = NewDisposeScope();
        Directory.CreateDirectory(SamplesFolder);
        ImageGrid.Save(Picture(model.Decode(noise.mul(Ops.Scalar(0.7)))), System.IO.Path.Combine(SamplesFolder, $"epoch-{epoch:000}.png"));
    });

    public void SaveSummary(TrainSummary summary) =>
        AtomicFile.WriteAllText(SummaryFile(Path),
            JsonSerializer.Serialize(summary, new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase, NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals }));

    /// <summary>Tensors alive on this thread (TorchSharp's dispose-scope statistics): flat when no step leaks.</summary>
    static long LiveTensors() => TorchSharp.DisposeScopeManager.Statistics.ThreadTotalLiveCount;

    /// <summary>Resident memory of the process (managed and native), for the memory-growth benchmark.</summary>
    static double ResidentMegabytes()
    {
        using var p = Process.GetCurrentProcess();
        return Math.Round(p.WorkingSet64 / 1048576.0, 1);
    }
}
