using System.Globalization;
using System.Diagnostics;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using MixerFlow.Host.Data;
using MixerFlow.Host.Files;
using MixerFlow.Host.Imaging;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>One model of an experiment: a preset or a configuration file, overrides, and the seeds to train it with.</summary>
/// <param name="Name">Unique within the spec; letters, digits, '.', '_' and '-' (it names the run's folder).</param>
/// <param name="Model">The resolved configuration (preset or file, then <paramref name="Set"/>).</param>
/// <param name="Set">The overrides, as given (key, value), applied with <see cref="ConfigOverrides"/>.</param>
/// <param name="Seeds">Seeds of initialisation, data order and noise; one training run each.</param>
public sealed record ExperimentRun(string Name, ModelConfig Model, IReadOnlyList<(string Key, string Value)> Set, IReadOnlyList<int> Seeds);

/// <summary>
/// An experiment: runs (models) trained under one shared budget and data set, then compared on the
/// held-out split. Read from JSON with <see cref="Load"/> / <see cref="Parse"/>; every problem is a
/// <see cref="UserError"/> naming the file, the run and the field. Spec file:
/// <code>
/// { "name": "shift", "data": null, "steps": 2000, "batchSize": 64, "learningRate": 0.002,
///   "seeds": [0, 1],
///   "runs": [ { "name": "shift-on", "preset": "fashion-mnist" },
///             { "name": "shift-off", "preset": "fashion-mnist", "set": { "shift": false } },
///             { "name": "mine", "config": "my-model.json", "seeds": [3] } ] }
/// </code>
/// <c>data</c>: a folder or file as <c>train --data</c> takes (relative paths from the spec's folder),
/// null for the bundled Fashion-MNIST test split. The held-out (test) split is the data's own test
/// split where it has one (IDX t10k-*, CIFAR-10 test_batch), otherwise a seeded 10%.
/// </summary>
public sealed partial record ExperimentSpec
{
    public string Name { get; init; } = "experiment";
    public string? Data { get; init; }
    /// <summary>Optimiser steps of every run.</summary>
    public long Steps { get; init; }
    public int BatchSize { get; init; } = 64;
    public double LearningRate { get; init; } = 2e-3;
    public int WarmupSteps { get; init; } = 100;
    public int CheckpointEvery { get; init; } = 200;
    /// <summary>LibTorch CPU threads; 0 keeps LibTorch's default.</summary>
    public int Threads { get; init; }
    /// <summary>Training images whose latents fit the linear probe (0: no probe).</summary>
    public int ProbeTrainImages { get; init; } = 5000;
    /// <summary>Held-out images the linear probe is scored on (0: all).</summary>
    public int ProbeTestImages { get; init; } = 2000;
    /// <summary>Images per run in the sample sheet (temperature 0.7).</summary>
    public int SamplesPerRun { get; init; } = 8;
    public IReadOnlyList<ExperimentRun> Runs { get; init; } = [];

    static readonly string[] TopKeys =
        ["name", "description", "data", "steps", "batchSize", "learningRate", "warmupSteps", "checkpointEvery", "threads",
         "probeTrainImages", "probeTestImages", "samplesPerRun", "seeds", "runs"];
    static readonly string[] RunKeys = ["name", "description", "preset", "config", "set", "seeds"];

    /// <summary>Reads and validates the spec file at <paramref name="path"/>.</summary>
    public static ExperimentSpec Load(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (!File.Exists(path)) throw new UserError($"{path}: no such experiment spec file");
        return Parse(InputFile.ReadAllText(path, InputFile.TextLimit, "an experiment spec"), path, Path.GetDirectoryName(Path.GetFullPath(path)) ?? ".");
    }

    /// <summary>Parses and validates a spec; <paramref name="source"/> names it in errors, relative paths are taken from <paramref name="baseDirectory"/>.</summary>
    public static ExperimentSpec Parse(string json, string source, string baseDirectory)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(json, new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true }); }
        catch (JsonException e) { throw new UserError($"{source}: not valid JSON (line {e.LineNumber + 1}): {e.Message.Split(" LineNumber")[0]}"); }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw new UserError($"{source}: the spec must be a JSON object with \"steps\" and \"runs\"");
            Unknown(root, TopKeys, source);
            var d = new ExperimentSpec();
            var spec = d with
            {
                Name = Text(root, "name", source) ?? Path.GetFileNameWithoutExtension(source),
                Data = Text(root, "data", source) is { } data ? (Path.IsPathRooted(data) ? data : Path.GetFullPath(Path.Combine(baseDirectory, data))) : null,
                Steps = Integer(root, "steps", source, 1, 100_000_000) ?? throw new UserError($"{source}: steps: required (optimiser steps of every run, >= 1)"),
                BatchSize = (int)(Integer(root, "batchSize", source, 1, 1_000_000) ?? d.BatchSize),
                LearningRate = Number(root, "learningRate", source) ?? d.LearningRate,
                WarmupSteps = (int)(Integer(root, "warmupSteps", source, 0, 100_000_000) ?? d.WarmupSteps),
                CheckpointEvery = (int)(Integer(root, "checkpointEvery", source, 1, 100_000_000) ?? d.CheckpointEvery),
                Threads = (int)(Integer(root, "threads", source, 0, TrainingSettings.MaxThreads) ?? d.Threads),
                ProbeTrainImages = (int)(Integer(root, "probeTrainImages", source, 0, 10_000_000) ?? d.ProbeTrainImages),
                ProbeTestImages = (int)(Integer(root, "probeTestImages", source, 0, 10_000_000) ?? d.ProbeTestImages),
                SamplesPerRun = (int)(Integer(root, "samplesPerRun", source, 1, 64) ?? d.SamplesPerRun),
            };
            if (!(spec.LearningRate > 0 && spec.LearningRate < 1)) throw new UserError($"{source}: learningRate: must lie in (0, 1), got {spec.LearningRate}");
            var seeds = Seeds(root, source) ?? [0];
            if (!root.TryGetProperty("runs", out var runs) || runs.ValueKind != JsonValueKind.Array || runs.GetArrayLength() == 0)
                throw new UserError($"{source}: runs: required, a non-empty list of {{ \"name\", \"preset\" or \"config\", \"set\", \"seeds\" }}");
            var list = new List<ExperimentRun>();
            int index = 0;
            foreach (var r in runs.EnumerateArray())
            {
                list.Add(ParseRun(r, $"{source}: runs[{index}]", seeds, baseDirectory));
                index++;
            }
            foreach (var dup in list.GroupBy(r => r.Name, StringComparer.OrdinalIgnoreCase).Where(g => g.Count() > 1))
                throw new UserError($"{source}: run '{dup.Key}': name: used by {dup.Count()} runs; run names must differ");
            // What training would refuse, refused before the first run trains.
            foreach (var run in list)
                TrainingLimits.Check(run.Model, spec.BatchSize, $"{source}: run '{run.Name}'");
            return spec with { Runs = list };
        }
    }

    static ExperimentRun ParseRun(JsonElement r, string where, IReadOnlyList<int> defaultSeeds, string baseDirectory)
    {
        if (r.ValueKind != JsonValueKind.Object) throw new UserError($"{where}: must be an object with \"name\" and \"preset\" or \"config\"");
        var name = Text(r, "name", where) ?? throw new UserError($"{where}: name: required");
        if (!SafeName.IsSafe(name)) throw new UserError($"{where}: name: '{name}' must be {SafeName.Rule} (it names the run's folder)");
        where = $"{where.Split(": runs[")[0]}: run '{name}'";
        Unknown(r, RunKeys, where);
        var preset = Text(r, "preset", where);
        var config = Text(r, "config", where);
        if ((preset is null) == (config is null))
            throw new UserError($"{where}: preset / config: give exactly one (presets: {string.Join(", ", Presets.Names)}; config: a model JSON file or checkpoint)");
        if (preset is not null && !Presets.All.ContainsKey(preset))
            throw new UserError($"{where}: preset: unknown preset '{preset}'; known presets: {string.Join(", ", Presets.Names)}");
        var set = new List<(string, string)>();
        if (r.TryGetProperty("set", out var s) && s.ValueKind != JsonValueKind.Null)
        {
            if (s.ValueKind != JsonValueKind.Object) throw new UserError($"{where}: set: must be an object of field: value (for example {{ \"shift\": false }})");
            foreach (var p in s.EnumerateObject())
                set.Add((p.Name, p.Value.ValueKind switch
                {
                    JsonValueKind.String => p.Value.GetString()!,
                    JsonValueKind.Number or JsonValueKind.True or JsonValueKind.False => p.Value.GetRawText(),
                    _ => throw new UserError($"{where}: set.{p.Name}: must be a string, number or boolean, got {p.Value.ValueKind.ToString().ToLowerInvariant()}"),
                }));
        }
        ModelConfig baseConfig;
        try
        {
            baseConfig = preset is not null ? Presets.Get(preset)
                : ConfigOverrides.ReadConfigFile(Path.IsPathRooted(config!) || Presets.All.ContainsKey(config!) ? config! : Path.Combine(baseDirectory, config!));
        }
        catch (UserError e) { throw new UserError($"{where}: config: {e.Message}", e); }
        var model = ConfigOverrides.Apply(baseConfig, set, $"{where}: set");
        return new ExperimentRun(name, model, set, Seeds(r, where) ?? defaultSeeds);
    }

    static void Unknown(JsonElement o, string[] known, string where)
    {
        foreach (var p in o.EnumerateObject())
            if (!known.Contains(p.Name))
                throw new UserError($"{where}: {p.Name}: unknown field; known fields: {string.Join(", ", known)}");
    }

    static string? Text(JsonElement o, string key, string where)
    {
        if (!o.TryGetProperty(key, out var v) || v.ValueKind == JsonValueKind.Null) return null;
        if (v.ValueKind != JsonValueKind.String || string.IsNullOrWhiteSpace(v.GetString()))
            throw new UserError($"{where}: {key}: must be a non-empty string, got {v.GetRawText()}");
        return v.GetString();
    }

    static long? Integer(JsonElement o, string key, string where, long low, long high)
    {
        if (!o.TryGetProperty(key, out var v) || v.ValueKind == JsonValueKind.Null) return null;
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt64(out var n) || n < low || n > high)
            throw new UserError($"{where}: {key}: must be an integer in [{low}, {high}], got {v.GetRawText()}");
        return n;
    }

    static double? Number(JsonElement o, string key, string where)
    {
        if (!o.TryGetProperty(key, out var v) || v.ValueKind == JsonValueKind.Null) return null;
        if (v.ValueKind != JsonValueKind.Number) throw new UserError($"{where}: {key}: must be a number, got {v.GetRawText()}");
        return v.GetDouble();
    }

    static IReadOnlyList<int>? Seeds(JsonElement o, string where)
    {
        if (!o.TryGetProperty("seeds", out var v) || v.ValueKind == JsonValueKind.Null) return null;
        if (v.ValueKind != JsonValueKind.Array || v.GetArrayLength() == 0
            || v.EnumerateArray().Any(e => e.ValueKind != JsonValueKind.Number || !e.TryGetInt32(out var n) || n < 0))
            throw new UserError($"{where}: seeds: must be a non-empty list of integers >= 0, got {v.GetRawText()}");
        var seeds = v.EnumerateArray().Select(e => e.GetInt32()).ToList();
        if (seeds.Distinct().Count() != seeds.Count) throw new UserError($"{where}: seeds: repeated seed in {v.GetRawText()}");
        return seeds;
    }

    /// <summary>The training settings of one run and seed (the shared budget).</summary>
    public TrainingSettings SettingsFor(ExperimentRun run, int seed, string folder, bool resume) => new()
    {
        Model = run.Model, Data = Data, RunFolder = folder, Resume = resume, Steps = Steps, BatchSize = BatchSize,
        LearningRate = LearningRate, WarmupSteps = WarmupSteps, Seed = seed, Threads = Threads, CheckpointEvery = CheckpointEvery,
    };
}

/// <summary>One trained seed of a run, as evaluated (also written as experiment-result.json in its folder).</summary>
public sealed record ExperimentSeedResult(
    string Run, int Seed, long Parameters, double ImagesPerSecond, double TestBpd, double TestStdErr,
    double ProbeAccuracy, double WallSeconds, long Steps);

/// <summary>One row of results.csv: a run over its seeds.</summary>
/// <param name="Run">The run's name in the specification.</param>
/// <param name="Seeds">Seeds trained and evaluated.</param>
/// <param name="Parameters">The model's parameter count.</param>
/// <param name="ImagesPerSecond">Training images per second, mean over seeds.</param>
/// <param name="TestBpd">Held-out bits/dim, mean over seeds.</param>
/// <param name="TestStdErr">The evaluation's standard error of <paramref name="TestBpd"/> (over images, pooled over seeds).</param>
/// <param name="SeedSpread">Sample standard deviation of the seeds' test bits/dim; NaN with one seed.</param>
/// <param name="ProbeAccuracy">Mean linear-probe accuracy over seeds; NaN without labels or probe.</param>
/// <param name="WallSeconds">Training and evaluation time over all seeds (the time of this process's work; a run resumed counts its last part).</param>
public sealed record ExperimentRow(
    string Run, int Seeds, long Parameters, double ImagesPerSecond, double TestBpd, double TestStdErr,
    double SeedSpread, double ProbeAccuracy, double WallSeconds);

/// <summary>
/// Runs an <see cref="ExperimentSpec"/>: every run x seed trained by <see cref="Trainer"/> under the
/// shared budget in its own folder (<c>runs/NAME/seed-N</c> of the results folder), scored on the
/// held-out split with its standard error, its latents linearly probed where the data has labels;
/// then results.csv, results.md, heldout-curves.png (held-out bits/dim against step, one line per
/// run, averaged over seeds) and samples.png (a labelled row of samples at temperature 0.7 per run).
/// Resumable: a seed whose summary.json exists is not trained again; one with a last.ckpt continues
/// from it; one with neither starts afresh.
/// </summary>
public sealed class Experiment
{
    readonly ExperimentSpec spec;
    readonly string output;
    readonly TextWriter log;
    readonly Func<string, ITrainingObserver>? observerFor;

    public const string ResultsCsv = "results.csv";
    public const string ResultsMarkdown = "results.md";
    public const string CurvesPng = "heldout-curves.png";
    public const string SamplesPng = "samples.png";
    public const string SeedResultFile = "experiment-result.json";

    /// <param name="spec">The runs, seeds, budget and data.</param>
    /// <param name="outputFolder">The results folder (created if missing; seeds already finished or checkpointed there are resumed, see above).</param>
    /// <param name="log">Progress lines; null for none.</param>
    /// <param name="observerFor">The observer of each run's training (given "run/seed-N"); null for plain progress lines on <paramref name="log"/>.</param>
    public Experiment(ExperimentSpec spec, string outputFolder, TextWriter? log = null, Func<string, ITrainingObserver>? observerFor = null)
    {
        ArgumentNullException.ThrowIfNull(spec);
        ArgumentNullException.ThrowIfNull(outputFolder);
        this.spec = spec;
        output = outputFolder;
        this.log = log ?? TextWriter.Null;
        this.observerFor = observerFor;
    }

    /// <summary>The folder of a run's seed.</summary>
    public string FolderOf(string run, int seed) => Path.Combine(output, "runs", run, $"seed-{seed}");

    /// <summary>Seeds trained in this call (not those found finished); for tests and reports.</summary>
    public List<string> Trained { get; } = [];

    static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals,
    };

    /// <summary>Trains and evaluates what is not done yet, then writes the results files; returns one row per run.</summary>
    public IReadOnlyList<ExperimentRow> Run()
    {
        Directory.CreateDirectory(output);
        var rows = new List<ExperimentRow>();
        var curves = new List<(string, IReadOnlyList<(long, double)>)>();
        var results = new Dictionary<string, List<ExperimentSeedResult>>();
        foreach (var run in spec.Runs)
        {
            var seeds = new List<ExperimentSeedResult>();
            foreach (var seed in run.Seeds) seeds.Add(RunSeed(run, seed));
            results[run.Name] = seeds;
            rows.Add(Aggregate(run.Name, seeds));
            curves.Add((run.Name, MeanHeldOutCurve(run)));
        }
        WriteCsv(rows);
        WriteMarkdown(rows);
        TrainingCurve.SaveSeries(curves, Path.Combine(output, CurvesPng), $"{spec.Name}: held-out bits/dim");
        SaveSampleSheet();
        log.WriteLine($"experiment {spec.Name}: {rows.Count} runs; results in {Path.Combine(output, ResultsMarkdown)}");
        return rows;
    }

    ExperimentSeedResult RunSeed(ExperimentRun run, int seed)
    {
        var folder = FolderOf(run.Name, seed);
        var resultPath = Path.Combine(folder, SeedResultFile);
        var label = $"{run.Name}/seed-{seed}";
        CheckUnchanged(run, seed, folder, label);
        var earlier = RunFolder.ReadSummary(folder);
        if (earlier is not null && File.Exists(resultPath))
        {
            log.WriteLine($"{label}: finished earlier, not retrained");
            return JsonSerializer.Deserialize<ExperimentSeedResult>(InputFile.ReadAllText(resultPath, InputFile.TextLimit, "a run's result file"), Json)
                   ?? throw new UserError($"{resultPath}: empty");
        }
        var wall = Stopwatch.StartNew();
        TrainSummary summary;
        ImageFlow? model = null;
        bool trainedHere = false;
        if (earlier is { } done)
        {
            log.WriteLine($"{label}: trained earlier, evaluating");
            summary = done;
        }
        else
        {
            bool resume = File.Exists(Path.Combine(folder, RunFolder.LastCheckpoint));
            if (!resume && Directory.Exists(folder))
            {
                // Started but never checkpointed: nothing to continue from; start clean.
                log.WriteLine($"{label}: no checkpoint in the earlier attempt, starting afresh");
                Directory.Delete(folder, recursive: true);
            }
            log.WriteLine(resume ? $"{label}: resuming from its last checkpoint" : $"{label}: training {spec.Steps} steps");
            var trainer = new Trainer(spec.SettingsFor(run, seed, folder, resume), observerFor?.Invoke(label) ?? new TextObserver(new PrefixWriter(log, label + ": ")));
            summary = trainer.Run();
            if (summary.StoppedEarly) throw new UserError($"{label}: training stopped early; run the experiment again to continue");
            model = trainer.Model;
            Trained.Add(label);
            trainedHere = true;
        }
        model ??= Checkpoint.Load(Path.Combine(folder, RunFolder.LastCheckpoint)).Model;
        double probe = Probe(model, seed);
        var result = new ExperimentSeedResult(run.Name, seed, summary.Parameters, summary.ImagesPerSecond,
            summary.HeldOutBpd, summary.HeldOutStdErr, probe, (trainedHere ? 0 : summary.WallSeconds) + wall.Elapsed.TotalSeconds, summary.Steps);
        AtomicFile.WriteAllText(resultPath, JsonSerializer.Serialize(result, Json));
        return result;
    }

    /// <summary>
    /// Refuses a run folder trained under another budget or model than the spec now gives (a
    /// finished run would otherwise be reported under the new spec without being retrained).
    /// </summary>
    void CheckUnchanged(ExperimentRun run, int seed, string folder, string label)
    {
        var diffs = new List<string>();
        var settingsPath = RunFolder.SettingsFile(folder);
        if (File.Exists(settingsPath))
        {
            TrainingSettings saved;
            try { saved = TrainingSettings.FromJson(InputFile.ReadAllText(settingsPath, InputFile.TextLimit, "a run's settings.json")); }
            catch (JsonException e) { throw new UserError($"{label}: '{settingsPath}' cannot be read: {e.Message}", e); }
            var now = spec.SettingsFor(run, seed, folder, false);
            static string D(string? d) => d is null ? "the bundled data" : Path.GetFullPath(d);
            if (saved.Steps != now.Steps) diffs.Add($"steps: trained with {saved.Steps}, the spec says {now.Steps}");
            if (saved.BatchSize != now.BatchSize) diffs.Add($"batchSize: trained with {saved.BatchSize}, the spec says {now.BatchSize}");
            if (saved.LearningRate != now.LearningRate) diffs.Add($"learningRate: trained with {saved.LearningRate}, the spec says {now.LearningRate}");
            if (saved.WarmupSteps != now.WarmupSteps) diffs.Add($"warmupSteps: trained with {saved.WarmupSteps}, the spec says {now.WarmupSteps}");
            if (D(saved.Data) != D(now.Data)) diffs.Add($"data: trained on {D(saved.Data)}, the spec says {D(now.Data)}");
        }
        var configPath = Path.Combine(folder, RunFolder.ConfigFile);
        if (File.Exists(configPath))
        {
            using var saved = JsonDocument.Parse(InputFile.ReadAllText(configPath, InputFile.TextLimit, "a run's config.json"));
            using var now = JsonDocument.Parse(run.Model.ToJson());
            foreach (var p in now.RootElement.EnumerateObject())
                if (!saved.RootElement.TryGetProperty(p.Name, out var v) || v.GetRawText() != p.Value.GetRawText())
                    diffs.Add($"{p.Name}: trained with {(saved.RootElement.TryGetProperty(p.Name, out var w) ? w.GetRawText() : "none")}, the spec says {p.Value.GetRawText()}");
        }
        if (diffs.Count > 0)
            throw new UserError($"{label}: {folder} was trained under another spec ({string.Join("; ", diffs)}); " +
                                "give another --out folder, or delete the run's folder to train it again");
    }

    /// <summary>
    /// Linear-probe accuracy of the model's latents (NaN without labels or with the probe off), on
    /// the run's own split (data without a test split is split by the run's seed, as the Trainer does).
    /// </summary>
    double Probe(ImageFlow model, int seed)
    {
        if (spec.ProbeTrainImages == 0) return double.NaN;
        var c = model.Config;
        var data = DatasetLoader.Load(spec.Data, c.Channels, c.Height, c.Width, seed);
        if (data.Train.Labels is null || data.HeldOut.Labels is null) return double.NaN;
        var train = First(data.Train, spec.ProbeTrainImages);
        var test = spec.ProbeTestImages > 0 ? First(data.HeldOut, spec.ProbeTestImages) : data.HeldOut;
        using var scope = NewDisposeScope();
        var zTrain = Evaluation.Latents(model, train);
        var zTest = Evaluation.Latents(model, test);
        return Evaluation.LinearProbeAccuracy(zTrain, train.Labels!, zTest, test.Labels!);
    }

    static ImageDataset First(ImageDataset set, int n) =>
        n >= set.Count ? set : set.Subset(Enumerable.Range(0, n).ToArray());

    static ExperimentRow Aggregate(string name, IReadOnlyList<ExperimentSeedResult> seeds)
    {
        int n = seeds.Count;
        double mean = seeds.Average(s => s.TestBpd);
        double spread = n > 1 ? Math.Sqrt(seeds.Sum(s => (s.TestBpd - mean) * (s.TestBpd - mean)) / (n - 1)) : double.NaN;
        double se = Math.Sqrt(seeds.Sum(s => s.TestStdErr * s.TestStdErr)) / n;
        double probe = seeds.All(s => double.IsNaN(s.ProbeAccuracy)) ? double.NaN : seeds.Where(s => !double.IsNaN(s.ProbeAccuracy)).Average(s => s.ProbeAccuracy);
        return new ExperimentRow(name, n, seeds[0].Parameters, seeds.Average(s => s.ImagesPerSecond), mean, se, spread, probe, seeds.Sum(s => s.WallSeconds));
    }

    /// <summary>Held-out bits/dim by step from the seeds' metrics.csv, averaged over the seeds at the steps they all have.</summary>
    IReadOnlyList<(long, double)> MeanHeldOutCurve(ExperimentRun run)
    {
        var perSeed = run.Seeds.Select(seed =>
        {
            var path = Path.Combine(FolderOf(run.Name, seed), "metrics.csv");
            var d = new Dictionary<long, double>();
            if (!File.Exists(path)) return d;
            foreach (var row in CsvLog.Read(path))
                if (row.TryGetValue("heldout_bpd", out var v) && v != "")
                    d[long.Parse(row["step"], CultureInfo.InvariantCulture)] = double.Parse(v, CultureInfo.InvariantCulture);
            return d;
        }).ToList();
        return perSeed[0].Keys.Where(k => perSeed.All(d => d.ContainsKey(k))).Order()
            .Select(k => (k, perSeed.Average(d => d[k]))).ToList();
    }

    void SaveSampleSheet()
    {
        var rows = new List<(string, Tensor)>();
        using var scope = NewDisposeScope();
        foreach (var run in spec.Runs)
        {
            var (model, _) = Checkpoint.Load(Path.Combine(FolderOf(run.Name, run.Seeds[0]), RunFolder.LastCheckpoint));
            model.eval();
            manual_seed(0);
            using (no_grad()) rows.Add((run.Name, model.Sample(spec.SamplesPerRun, 0.7)));
        }
        SampleSheet.Save(rows, Path.Combine(output, SamplesPng));
    }

    static string F(double v, string format) => double.IsNaN(v) ? "" : v.ToString(format, CultureInfo.InvariantCulture);

    void WriteCsv(IReadOnlyList<ExperimentRow> rows)
    {
        var sb = new StringBuilder("run,seeds,parameters,images_per_s,test_bpd,test_bpd_stderr,seed_sd,probe_accuracy,wall_s\n");
        foreach (var r in rows)
            sb.Append(CultureInfo.InvariantCulture,
                $"{r.Run},{r.Seeds},{r.Parameters},{F(r.ImagesPerSecond, "0.0")},{F(r.TestBpd, "0.00000")},{F(r.TestStdErr, "0.00000")},{F(r.SeedSpread, "0.00000")},{F(r.ProbeAccuracy, "0.0000")},{F(r.WallSeconds, "0.0")}\n");
        AtomicFile.WriteAllText(Path.Combine(output, ResultsCsv), sb.ToString());
    }

    void WriteMarkdown(IReadOnlyList<ExperimentRow> rows)
    {
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture, $"# {spec.Name}\n\n");
        sb.Append(CultureInfo.InvariantCulture,
            $"{spec.Steps} steps at batch {spec.BatchSize}, peak learning rate {spec.LearningRate}, data: {spec.Data ?? "bundled Fashion-MNIST test split"}. ");
        sb.Append("Test bits/dim on the held-out split (± the evaluation's standard error); with several seeds, their mean ± their standard deviation.\n\n");
        sb.Append("| run | parameters | images/s | test bits/dim | over seeds | linear probe | wall time |\n");
        sb.Append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        foreach (var r in rows)
            sb.Append(string.Create(CultureInfo.InvariantCulture,
                $"| {r.Run} | {r.Parameters:N0} | {r.ImagesPerSecond:0} | {r.TestBpd:0.0000} ± {r.TestStdErr:0.0000} | ") + string.Create(CultureInfo.InvariantCulture,
                $"{(r.Seeds > 1 ? $"{r.TestBpd:0.0000} ± {r.SeedSpread:0.0000} ({r.Seeds} seeds)" : "1 seed")} | " +
                $"{(double.IsNaN(r.ProbeAccuracy) ? "n/a" : r.ProbeAccuracy.ToString("P1", CultureInfo.InvariantCulture))} | {r.WallSeconds:0} s |\n"));
        sb.Append(CultureInfo.InvariantCulture, $"\n![held-out bits/dim]({CurvesPng})\n\n![samples at temperature 0.7]({SamplesPng})\n");
        AtomicFile.WriteAllText(Path.Combine(output, ResultsMarkdown), sb.ToString());
    }

    /// <summary>Prefixes every line written through it (the runs' progress lines).</summary>
    sealed class PrefixWriter(TextWriter inner, string prefix) : TextWriter
    {
        public override Encoding Encoding => inner.Encoding;
        public override void WriteLine(string? value) => inner.WriteLine(prefix + value);
        public override void Write(char value) => inner.Write(value);
    }
}
