using System.Diagnostics;
using System.Text;
using System.Text.Json;
using MixerFlow.Host.Files;
using MixerFlow.Host.Imaging;
using MixerFlow.Host.Models;

namespace MixerFlow.Host.Training;

/// <summary>
/// Runs an <see cref="ExperimentSpec"/>: every run x seed trained by <see cref="Trainer"/> under the
/// shared budget in its own folder (<c>runs/NAME/seed-N</c> of the results folder), scored on the
/// held-out split with its standard error, its latents linearly probed where the data has labels;
/// then results.csv, results.md, heldout-curves.png (held-out bits/dim against step, one line per
/// run, averaged over seeds) and samples.png (a labelled row of samples at temperature 0.7 per run);
/// with <see cref="ExperimentSpec.QualityTemperatures"/>, each seed's sample quality at those temperatures.
/// Resumable: a seed whose summary.json exists is not trained again; one with a last.ckpt continues
/// from it; one with neither starts afresh.
/// </summary>
public sealed partial class Experiment
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
        WriteMarkdown(rows, DataQuality());
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
            var finished = JsonSerializer.Deserialize<ExperimentSeedResult>(InputFile.ReadAllText(resultPath, InputFile.TextLimit, "a run's result file"), Json)
                           ?? throw new UserError($"{resultPath}: empty");
            if (spec.QualityTemperatures.All(t => finished.Quality?.Any(q => q.Temperature == t) == true)) return finished;
            // Scored at other temperatures or not at all: score it now, from its last checkpoint.
            var last = Checkpoint.Load(Path.Combine(folder, RunFolder.LastCheckpoint)).Model;
            finished = finished with { Quality = Quality(last, seed, run.PixelPermutationSeed, label) };
            AtomicFile.WriteAllText(resultPath, JsonSerializer.Serialize(finished, Json));
            return finished;
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
            log.WriteLine(resume ? $"{label}: resuming from its last checkpoint" : $"{label}: training {Budget(run)}");
            var trainer = new Trainer(spec.SettingsFor(run, seed, folder, resume), observerFor?.Invoke(label) ?? new TextObserver(new PrefixWriter(log, label + ": ")));
            summary = trainer.Run();
            if (summary.StoppedEarly) throw new UserError($"{label}: training stopped early; run the experiment again to continue");
            model = trainer.Model;
            Trained.Add(label);
            trainedHere = true;
        }
        model ??= Checkpoint.Load(Path.Combine(folder, RunFolder.LastCheckpoint)).Model;
        double probe = Probe(model, seed, run.PixelPermutationSeed);
        var result = new ExperimentSeedResult(run.Name, seed, summary.Parameters, summary.ImagesPerSecond,
            summary.HeldOutBpd, summary.HeldOutStdErr, probe, (trainedHere ? 0 : summary.WallSeconds) + wall.Elapsed.TotalSeconds, summary.Steps, summary.TrainingSeconds,
            Quality(model, seed, run.PixelPermutationSeed, label));
        AtomicFile.WriteAllText(resultPath, JsonSerializer.Serialize(result, Json));
        return result;
    }

    /// <summary>
    /// Refuses a run folder trained under another budget or model than the spec now gives (a
    /// finished run would otherwise be reported under the new spec without being retrained): every
    /// setting that decides what the run computes (<see cref="TrainingSettings.Differences"/>) and
    /// every field of the model.
    /// </summary>
    void CheckUnchanged(ExperimentRun run, int seed, string folder, string label)
    {
        var diffs = new List<SettingDifference>();
        var settingsPath = RunFolder.SettingsFile(folder);
        if (File.Exists(settingsPath))
        {
            TrainingSettings saved;
            try { saved = TrainingSettings.FromJson(InputFile.ReadAllText(settingsPath, InputFile.TextLimit, "a run's settings.json")); }
            catch (Exception e) when (e is JsonException or InvalidDataException) { throw new UserError($"{label}: '{settingsPath}' cannot be read: {e.Message}", e); }
            var now = spec.SettingsFor(run, seed, folder, false);
            diffs.AddRange(SettingDifference.Except(TrainingSettings.Differences(saved, now), TrainingSettings.PerCall.Concat(TrainingSettings.Adjustable)));
        }
        if (RunFolder.ReadConfig(folder) is { } config) diffs.AddRange(SettingDifference.Of(config, run.Model));
        if (diffs.Count > 0)
            throw new UserError($"{label}: {folder} was trained under another spec " +
                                $"({string.Join("; ", diffs.Select(d => $"{d.Field}: trained with {d.Saved}, the spec says {d.Now}"))}); " +
                                "give another --out folder, or delete the run's folder to train it again");
    }

    /// <summary>A run's budget in words: "2000 steps", "600 s of training steps", or both.</summary>
    static string Budget(ExperimentRun run) => (run.Steps, run.Seconds) switch
    {
        (> 0, > 0) => $"{run.Steps} steps or {run.Seconds} s of training steps, whichever comes first",
        (_, > 0) => $"{run.Seconds} s of training steps",
        _ => $"{run.Steps} steps",
    };

    /// <summary>Prefixes every line written through it (the runs' progress lines).</summary>
    sealed class PrefixWriter(TextWriter inner, string prefix) : TextWriter
    {
        public override Encoding Encoding => inner.Encoding;
        public override void WriteLine(string? value) => inner.WriteLine(prefix + value);
        public override void Write(char value) => inner.Write(value);
    }
}
