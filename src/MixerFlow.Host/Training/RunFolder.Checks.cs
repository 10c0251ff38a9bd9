using System.Text.Json;
using System.Text.Json.Nodes;
using MixerFlow.Host.Files;
using MixerFlow.Host.Models;

namespace MixerFlow.Host.Training;

/// <summary>The checks a run folder passes before a run starts in it or resumes it; each refusal names the file.</summary>
public sealed partial class RunFolder
{
    /// <summary>The model configuration file (with the run's "training" object).</summary>
    public const string ConfigFile = "config.json";
    /// <summary>The metrics log, one row per report and evaluation.</summary>
    public const string MetricsFile = "metrics.csv";

    /// <summary>The files a run writes; a folder holding any of them holds a run.</summary>
    static readonly string[] RunFiles = [ConfigFile, SettingsFileName, MetricsFile, LastCheckpoint, BestCheckpoint, SummaryFileName];

    /// <summary>
    /// Refuses to start a fresh run in <paramref name="folder"/> when it already holds one (any of
    /// its files), which the new run would overwrite and mix into: the message points to
    /// <c>--resume</c> or a new folder. A missing or empty folder passes.
    /// </summary>
    public static void CheckFresh(string folder)
    {
        ArgumentNullException.ThrowIfNull(folder);
        var found = RunFiles.Where(f => Exists(System.IO.Path.Combine(folder, f))).ToList();
        if (found.Count > 0)
            throw new UserError($"{folder}: already holds a run ({string.Join(", ", found)}); continue it with --resume {folder}, " +
                                "or give a new --out folder");
    }

    static bool Exists(string path) => File.Exists(path) || Directory.Exists(path);

    /// <summary>
    /// The settings a run in <paramref name="folder"/> was started with (settings.json), which a
    /// resume continues under: the folder and the file must exist, parse and pass
    /// <see cref="TrainingSettings.Problems"/>; otherwise a <see cref="UserError"/> names the file and the field.
    /// </summary>
    public static TrainingSettings ReadSettings(string folder)
    {
        ArgumentNullException.ThrowIfNull(folder);
        if (!Directory.Exists(folder)) throw new UserError($"resume {folder}: no such run folder");
        var path = SettingsFile(folder);
        if (Directory.Exists(path)) throw new UserError($"{path}: is a folder, not the run's settings file; the run cannot be resumed without it");
        if (!File.Exists(path))
            throw new UserError($"{path}: missing; a resume continues under the settings the run was started with, and without them " +
                                "it cannot; train afresh in a new --out folder");
        TrainingSettings saved;
        try { saved = TrainingSettings.FromJson(InputFile.ReadAllText(path, InputFile.TextLimit, "a run's settings.json")); }
        catch (Exception e) when (e is JsonException or InvalidDataException) { throw new UserError($"{path}: cannot be read: {e.Message}", e); }
        var problems = saved.Problems();
        if (problems.Count > 0) throw new UserError($"{path}: {string.Join("; ", problems)}");
        return saved;
    }

    /// <summary>
    /// The pixel permutation the run that wrote <paramref name="checkpoint"/> trained under, from the
    /// settings.json beside it (<see cref="TrainingSettings.PixelPermutationSeed"/>); null when the run
    /// permuted nothing or the checkpoint has no settings.json beside it (a copied checkpoint).
    /// </summary>
    public static Data.PixelPermutation? PixelPermutationOf(string checkpoint, ModelConfig config)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        ArgumentNullException.ThrowIfNull(config);
        var folder = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(checkpoint)) ?? ".";
        if (!File.Exists(SettingsFile(folder))) return null;
        return Data.PixelPermutation.Of(ReadSettings(folder).PixelPermutationSeed, config.Height, config.Width);
    }

    /// <summary>
    /// The model configuration of the run in <paramref name="folder"/> (its config.json, without the
    /// "training" object); null when the file is missing, a <see cref="UserError"/> naming it when it
    /// cannot be read.
    /// </summary>
    public static ModelConfig? ReadConfig(string folder)
    {
        var path = System.IO.Path.Combine(folder, ConfigFile);
        if (!File.Exists(path)) return null;
        try
        {
            var saved = JsonNode.Parse(InputFile.ReadAllText(path, InputFile.TextLimit, "a run's config.json")) as JsonObject ?? throw new JsonException("not a JSON object");
            saved.Remove("training");
            return ModelConfig.FromJson(saved.ToJsonString(), path);
        }
        catch (JsonException e) { throw new UserError($"{path}: cannot be read: {e.Message}", e); }
    }

    /// <summary>
    /// Refuses a checkpoint (<paramref name="checkpoint"/>, holding <paramref name="model"/>) that is
    /// not of the model the run in <paramref name="folder"/> trains (its config.json), naming every
    /// field that differs; config.json must exist and parse.
    /// </summary>
    public static void CheckCheckpoint(string folder, string checkpoint, ModelConfig model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var run = ReadConfig(folder)
                  ?? throw new UserError($"{System.IO.Path.Combine(folder, ConfigFile)}: missing; the run's model cannot be checked against {checkpoint}, so it is not resumed");
        var differ = SettingDifference.Of(run, model).Select(d => $"{d.Field}: {d.Saved} in {ConfigFile}, {d.Now} in the checkpoint").ToList();
        if (differ.Count > 0)
            throw new UserError($"{checkpoint}: a checkpoint of another model than the run's ({string.Join("; ", differ)}); " +
                                "put back the run's own checkpoint, or train the other model in its own folder");
    }
}
