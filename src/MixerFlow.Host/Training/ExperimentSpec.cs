using System.Text.Json;
using MixerFlow.Host.Files;
using MixerFlow.Host.Models;

namespace MixerFlow.Host.Training;

/// <summary>One model of an experiment: a preset or a configuration file, overrides, and the seeds to train it with.</summary>
/// <param name="Name">Unique within the spec; letters, digits, '.', '_' and '-' (it names the run's folder).</param>
/// <param name="Model">The resolved configuration (preset or file, then <paramref name="Set"/>).</param>
/// <param name="Set">The overrides, as given (key, value), applied with <see cref="ConfigOverrides"/>.</param>
/// <param name="Seeds">Seeds of initialisation, data order and noise; one training run each.</param>
/// <param name="Steps">The run's optimiser steps (0: no step budget); its own "steps" or the spec's.</param>
/// <param name="Seconds">The run's seconds of training steps (0: no time budget); its own "seconds" or the spec's.</param>
/// <param name="PixelPermutationSeed">The seed of the run's fixed pixel permutation ("permutePixels"; 0: none).</param>
/// <param name="EmaDecay">The decay of the run's weight average ("emaDecay"; 0: none); its own or the spec's.</param>
public sealed record ExperimentRun(string Name, ModelConfig Model, IReadOnlyList<(string Key, string Value)> Set, IReadOnlyList<int> Seeds,
                                   long Steps = 0, double Seconds = 0, int PixelPermutationSeed = 0, double EmaDecay = 0);

/// <summary>
/// An experiment: runs (models) trained under one shared budget and data set, then compared on the
/// held-out split. Read from JSON with <see cref="Load"/> / <see cref="Parse"/> (System.Text.Json,
/// unknown fields refused, then one validation pass); every problem is a <see cref="UserError"/>
/// naming the file, the run and the field. Spec file:
/// <code>
/// { "name": "shift", "data": null, "steps": 2000, "batchSize": 64, "learningRate": 0.002,
///   "seeds": [0, 1],
///   "runs": [ { "name": "shift-on", "preset": "fashion-mnist" },
///             { "name": "shift-off", "preset": "fashion-mnist", "set": { "shift": false } },
///             { "name": "mine", "config": "my-model.json", "seeds": [3] } ] }
/// </code>
/// <c>steps</c> and <c>seconds</c> (seconds of training steps, evaluations not counted) are each
/// optional at the top and in a run (a run's own wins); every run needs at least one, and with both
/// it stops at whichever is reached first. <c>qualityTemperatures</c> (for example <c>[0.7, 1.0]</c>)
/// and <c>qualitySamples</c> score each seed's samples (<see cref="QualityTemperatures"/>). A run's <c>permutePixels</c> (a seed, 0 for none) trains
/// and evaluates it on images whose pixel positions are shuffled by one fixed permutation.
/// <c>validationImages</c> holds that many training images out of every run as a validation set, by
/// which each run's best.ckpt is chosen (<see cref="TrainingSettings.ValidationImages"/>); <c>emaDecay</c>,
/// at the top or in a run (a run's own wins), keeps a weight average (<see cref="TrainingSettings.EmaDecay"/>).
/// <c>data</c>: a folder or file as <c>train --data</c> takes (relative paths from the spec's folder),
/// null for the bundled Fashion-MNIST test split. The held-out (test) split is the data's own test
/// split where it has one (IDX t10k-*, CIFAR-10 test_batch), otherwise a seeded 10%. Unset budget
/// fields take <see cref="TrainingSettings.Defaults"/>.
/// </summary>
public sealed record ExperimentSpec
{
    static TrainingSettings D => TrainingSettings.Defaults;

    public string Name { get; init; } = "experiment";
    public string? Data { get; init; }
    /// <summary>Optimiser steps of every run without its own (0: none).</summary>
    public long Steps { get; init; }
    /// <summary>Seconds of training steps of every run without its own (0: none).</summary>
    public double Seconds { get; init; }
    public int BatchSize { get; init; } = D.BatchSize;
    public double LearningRate { get; init; } = D.LearningRate;
    public int WarmupSteps { get; init; } = D.WarmupSteps;
    public int CheckpointEvery { get; init; } = D.CheckpointEvery;
    /// <summary>LibTorch CPU threads; 0 keeps LibTorch's default.</summary>
    public int Threads { get; init; } = D.Threads;
    /// <summary>Training images whose latents fit the linear probe (0: no probe).</summary>
    public int ProbeTrainImages { get; init; } = 5000;
    /// <summary>Held-out images the linear probe is scored on (0: all).</summary>
    public int ProbeTestImages { get; init; } = 2000;
    /// <summary>Images per run in the sample sheet (temperature 0.7).</summary>
    public int SamplesPerRun { get; init; } = 8;
    /// <summary>
    /// Temperatures at which each seed's samples are scored by <see cref="Quality.SampleQuality"/> against the
    /// held-out images (columns of results.csv and a table of results.md); empty: no sample quality. The first
    /// time, the feature classifier is trained on the data's training split and cached.
    /// </summary>
    public IReadOnlyList<double> QualityTemperatures { get; init; } = [];
    /// <summary>Samples scored per temperature; 0: <see cref="Quality.SampleQuality.DefaultSamples"/> or the held-out split's size where smaller.</summary>
    public int QualitySamples { get; init; }
    /// <summary>Training images every run holds out as a validation set (<see cref="TrainingSettings.ValidationImages"/>; 0: none).</summary>
    public int ValidationImages { get; init; }
    /// <summary>The weight average's decay of every run without its own (<see cref="TrainingSettings.EmaDecay"/>; 0: none).</summary>
    public double EmaDecay { get; init; }
    /// <summary>The feature classifier's settings (code only; the spec file takes the defaults).</summary>
    public Quality.ClassifierSettings QualityClassifier { get; init; } = new();
    /// <summary>The classifier cache folder (code only); null: <see cref="Quality.FeatureClassifier.CacheFolder"/>.</summary>
    public string? QualityCacheFolder { get; init; }
    public IReadOnlyList<ExperimentRun> Runs { get; init; } = [];

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
        var file = ExperimentSpecFile.Read(json, source);
        var d = new ExperimentSpec();
        var spec = d with
        {
            Name = ExperimentSpecFile.NonEmpty(file.Name, "name", source) ?? Path.GetFileNameWithoutExtension(source),
            Data = ExperimentSpecFile.NonEmpty(file.Data, "data", source) is { } data ? (Path.IsPathRooted(data) ? data : Path.GetFullPath(Path.Combine(baseDirectory, data))) : null,
            Steps = ExperimentSpecFile.InRange(file.Steps, "steps", source, 1, 100_000_000) ?? 0,
            Seconds = ExperimentSpecFile.CheckSeconds(file.Seconds, source) ?? 0,
            BatchSize = (int)(ExperimentSpecFile.InRange(file.BatchSize, "batchSize", source, 1, 1_000_000) ?? d.BatchSize),
            LearningRate = file.LearningRate ?? d.LearningRate,
            WarmupSteps = (int)(ExperimentSpecFile.InRange(file.WarmupSteps, "warmupSteps", source, 0, 100_000_000) ?? d.WarmupSteps),
            CheckpointEvery = (int)(ExperimentSpecFile.InRange(file.CheckpointEvery, "checkpointEvery", source, 1, 100_000_000) ?? d.CheckpointEvery),
            Threads = (int)(ExperimentSpecFile.InRange(file.Threads, "threads", source, 0, TrainingSettings.MaxThreads) ?? d.Threads),
            ProbeTrainImages = (int)(ExperimentSpecFile.InRange(file.ProbeTrainImages, "probeTrainImages", source, 0, 10_000_000) ?? d.ProbeTrainImages),
            ProbeTestImages = (int)(ExperimentSpecFile.InRange(file.ProbeTestImages, "probeTestImages", source, 0, 10_000_000) ?? d.ProbeTestImages),
            SamplesPerRun = (int)(ExperimentSpecFile.InRange(file.SamplesPerRun, "samplesPerRun", source, 1, 64) ?? d.SamplesPerRun),
            QualityTemperatures = ExperimentSpecFile.CheckTemperatures(file.QualityTemperatures, source),
            QualitySamples = (int)(ExperimentSpecFile.InRange(file.QualitySamples, "qualitySamples", source, 4, 100_000) ?? 0),
            ValidationImages = (int)(ExperimentSpecFile.InRange(file.ValidationImages, "validationImages", source, 0, 100_000_000) ?? 0),
            EmaDecay = ExperimentSpecFile.CheckEmaDecay(file.EmaDecay, source) ?? 0,
        };
        if (!(spec.LearningRate > 0 && spec.LearningRate < 1)) throw new UserError($"{source}: learningRate: must lie in (0, 1), got {spec.LearningRate}");
        var seeds = ExperimentSpecFile.CheckSeeds(file.Seeds, source) ?? [0];
        if (file.Runs is not { Count: > 0 })
            throw new UserError($"{source}: runs: required, a non-empty list of {{ \"name\", \"preset\" or \"config\", \"set\", \"seeds\" }}");
        var list = file.Runs.Select((r, i) => ResolveRun(r, $"{source}: runs[{i}]", seeds, baseDirectory, spec.EmaDecay))
            .Select(r => r with { Steps = r.Steps > 0 ? r.Steps : spec.Steps, Seconds = r.Seconds > 0 ? r.Seconds : spec.Seconds }).ToList();
        if (list.FirstOrDefault(r => r.Steps == 0 && r.Seconds == 0) is { } unbounded)
            throw new UserError($"{source}: run '{unbounded.Name}': steps / seconds: required, in the run or at the top of the spec " +
                                "(optimiser steps >= 1, or seconds of training steps > 0; with both, the run stops at whichever comes first)");
        foreach (var dup in list.GroupBy(r => r.Name, StringComparer.OrdinalIgnoreCase).Where(g => g.Count() > 1))
            throw new UserError($"{source}: run '{dup.Key}': name: used by {dup.Count()} runs; run names must differ");
        // What training would refuse, refused before the first run trains.
        foreach (var run in list)
            TrainingLimits.Check(run.Model, spec.BatchSize, $"{source}: run '{run.Name}'");
        return spec with { Runs = list };
    }

    static ExperimentRun ResolveRun(ExperimentSpecFile.Run? r, string where, IReadOnlyList<int> defaultSeeds, string baseDirectory, double emaDecay)
    {
        if (r is null) throw new UserError($"{where}: must be an object with \"name\" and \"preset\" or \"config\"");
        var name = ExperimentSpecFile.NonEmpty(r.Name, "name", where) ?? throw new UserError($"{where}: name: required");
        if (!SafeName.IsSafe(name)) throw new UserError($"{where}: name: '{name}' must be {SafeName.Rule} (it names the run's folder)");
        where = $"{where.Split(": runs[")[0]}: run '{name}'";
        var preset = ExperimentSpecFile.NonEmpty(r.Preset, "preset", where);
        var config = ExperimentSpecFile.NonEmpty(r.Config, "config", where);
        if ((preset is null) == (config is null))
            throw new UserError($"{where}: preset / config: give exactly one (presets: {string.Join(", ", Presets.Names)}; config: a model JSON file or checkpoint)");
        if (preset is not null && !Presets.All.ContainsKey(preset))
            throw new UserError($"{where}: preset: unknown preset '{preset}'; known presets: {string.Join(", ", Presets.Names)}");
        var set = (r.Set ?? []).Select(p => (p.Key, SetValue(p.Key, p.Value, where))).ToList();
        ModelConfig baseConfig;
        try
        {
            baseConfig = preset is not null ? Presets.Get(preset)
                : ConfigOverrides.ReadConfigFile(Path.IsPathRooted(config!) || Presets.All.ContainsKey(config!) ? config! : Path.Combine(baseDirectory, config!));
        }
        catch (UserError e) { throw new UserError($"{where}: config: {e.Message}", e); }
        var model = ConfigOverrides.Apply(baseConfig, set, $"{where}: set");
        return new ExperimentRun(name, model, set, ExperimentSpecFile.CheckSeeds(r.Seeds, where) ?? defaultSeeds,
            ExperimentSpecFile.InRange(r.Steps, "steps", where, 1, 100_000_000) ?? 0, ExperimentSpecFile.CheckSeconds(r.Seconds, where) ?? 0,
            (int)(ExperimentSpecFile.InRange(r.PermutePixels, "permutePixels", where, 0, int.MaxValue) ?? 0),
            ExperimentSpecFile.CheckEmaDecay(r.EmaDecay, where) ?? emaDecay);
    }

    static string SetValue(string key, JsonElement value, string where) => value.ValueKind switch
    {
        JsonValueKind.String => value.GetString()!,
        JsonValueKind.Number or JsonValueKind.True or JsonValueKind.False => value.GetRawText(),
        _ => throw new UserError($"{where}: set.{key}: must be a string, number or boolean, got {value.ValueKind.ToString().ToLowerInvariant()}"),
    };

    /// <summary>The training settings of one run and seed (the shared budget).</summary>
    public TrainingSettings SettingsFor(ExperimentRun run, int seed, string folder, bool resume) => new()
    {
        Model = run.Model, Data = Data, RunFolder = folder, Resume = resume, Steps = run.Steps, MaxSeconds = run.Seconds,
        PixelPermutationSeed = run.PixelPermutationSeed, ValidationImages = ValidationImages, EmaDecay = run.EmaDecay, BatchSize = BatchSize,
        LearningRate = LearningRate, WarmupSteps = WarmupSteps, Seed = seed, Threads = Threads, CheckpointEvery = CheckpointEvery,
    };
}
