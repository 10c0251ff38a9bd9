using System.Text.Json;
using System.Text.Json.Serialization;
using System.Text.RegularExpressions;

namespace MixerFlow.Host.Training;

/// <summary>
/// An experiment spec file as System.Text.Json reads it: unknown fields are refused and a value of
/// the wrong type is reported by the file, the run and the field with what was expected; the
/// ranges and rules are checked after reading (<see cref="ExperimentSpec.Parse"/>).
/// </summary>
internal sealed partial class ExperimentSpecFile
{
    public string? Name { get; set; }
    public string? Description { get; set; }
    public string? Data { get; set; }
    public long? Steps { get; set; }
    public double? Seconds { get; set; }
    public long? BatchSize { get; set; }
    public double? LearningRate { get; set; }
    public long? WarmupSteps { get; set; }
    public long? CheckpointEvery { get; set; }
    public long? Threads { get; set; }
    public long? ProbeTrainImages { get; set; }
    public long? ProbeTestImages { get; set; }
    public long? SamplesPerRun { get; set; }
    public List<double>? QualityTemperatures { get; set; }
    public long? QualitySamples { get; set; }
    public long? ValidationImages { get; set; }
    public double? EmaDecay { get; set; }
    public List<int>? Seeds { get; set; }
    public List<Run?>? Runs { get; set; }

    /// <summary>One entry of "runs".</summary>
    public sealed class Run
    {
        public string? Name { get; set; }
        public string? Description { get; set; }
        public string? Preset { get; set; }
        public string? Config { get; set; }
        public Dictionary<string, JsonElement>? Set { get; set; }
        public List<int>? Seeds { get; set; }
        public long? Steps { get; set; }
        public double? Seconds { get; set; }
        public long? PermutePixels { get; set; }
        public double? EmaDecay { get; set; }
    }

    static readonly string[] TopKeys =
        ["name", "description", "data", "steps", "seconds", "batchSize", "learningRate", "warmupSteps", "checkpointEvery", "threads",
         "probeTrainImages", "probeTestImages", "samplesPerRun", "qualityTemperatures", "qualitySamples", "validationImages", "emaDecay", "seeds", "runs"];
    static readonly string[] RunKeys = ["name", "description", "preset", "config", "set", "seeds", "steps", "seconds", "permutePixels", "emaDecay"];

    const string RunShape = "{ \"name\", \"preset\" or \"config\", \"set\", \"seeds\" }";

    /// <summary>What each field takes, for the message about a value of the wrong type.</summary>
    static readonly Dictionary<string, string> Expected = new()
    {
        ["name"] = "a non-empty string", ["description"] = "a string", ["data"] = "a non-empty string (a data file or folder)",
        ["preset"] = "a non-empty string", ["config"] = "a non-empty string (a model JSON file or checkpoint)",
        ["steps"] = "an integer in [1, 100000000]", ["seconds"] = "a number of seconds in (0, 100000000]",
        ["permutePixels"] = "an integer seed in [0, 2147483647] (0: no permutation)", ["batchSize"] = "an integer in [1, 1000000]", ["learningRate"] = "a number",
        ["warmupSteps"] = "an integer in [0, 100000000]", ["checkpointEvery"] = "an integer in [1, 100000000]",
        ["threads"] = $"an integer in [0, {TrainingSettings.MaxThreads}]", ["probeTrainImages"] = "an integer in [0, 10000000]",
        ["probeTestImages"] = "an integer in [0, 10000000]", ["samplesPerRun"] = "an integer in [1, 64]",
        ["qualityTemperatures"] = "a list of temperatures in [0, 10] (sample quality scored at each; empty or absent: none)",
        ["qualitySamples"] = "an integer in [4, 100000] (samples scored per temperature)",
        ["validationImages"] = "an integer in [0, 100000000] (training images held out for validation; 0: none)",
        ["emaDecay"] = "a number in [0, 1) (the decay of the weight average; 0: none)",
        ["seeds"] = "a non-empty list of integers >= 0", ["runs"] = $"a non-empty list of {RunShape}",
        ["set"] = "an object of field: value (for example { \"shift\": false })",
    };

    static readonly JsonSerializerOptions Options = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
        ReadCommentHandling = JsonCommentHandling.Skip,
        AllowTrailingCommas = true,
    };

    /// <summary>Reads the spec's JSON; a <see cref="UserError"/> naming <paramref name="source"/>, the run and the field.</summary>
    public static ExperimentSpecFile Read(string json, string source)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(json, new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true }); }
        catch (JsonException e) { throw new UserError($"{source}: not valid JSON (line {e.LineNumber + 1}): {e.Message.Split(" LineNumber")[0]}"); }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new UserError($"{source}: the spec must be a JSON object with \"steps\" and \"runs\"");
            try { return doc.RootElement.Deserialize<ExperimentSpecFile>(Options)!; }
            catch (JsonException e) { throw Explain(doc.RootElement, e, source); }
        }
    }

    /// <summary>The reader's complaint in the spec's words: the run (by name where it has one), the field, what it takes.</summary>
    static UserError Explain(JsonElement root, JsonException e, string source)
    {
        var path = Segments(e.Path ?? "$");
        var unknown = UnmappedName().Match(e.Message);
        if (unknown.Success && path.LastOrDefault() == unknown.Groups[1].Value) path.RemoveAt(path.Count - 1);
        // The object the problem is in: the spec itself or one of its runs.
        string where = source;
        JsonElement within = root;
        string[] known = TopKeys;
        if (path.Count >= 2 && path[0] == "runs" && int.TryParse(path[1], out int index))
        {
            within = root.GetProperty("runs")[index];
            where = within.ValueKind == JsonValueKind.Object && within.TryGetProperty("name", out var n) && n.ValueKind == JsonValueKind.String
                    && !string.IsNullOrWhiteSpace(n.GetString()) ? $"{source}: run '{n.GetString()}'" : $"{source}: runs[{index}]";
            known = RunKeys;
            path.RemoveRange(0, 2);
            if (path.Count == 0 && !unknown.Success)
                return new UserError($"{where}: must be an object with \"name\" and \"preset\" or \"config\", got {within.GetRawText()}", e);
        }
        if (unknown.Success)
            return new UserError($"{where}: {unknown.Groups[1].Value}: unknown field; known fields: {string.Join(", ", known)}", e);
        var field = path.FirstOrDefault() ?? "?";
        var got = within.ValueKind == JsonValueKind.Object && within.TryGetProperty(field, out var v) ? v.GetRawText() : "?";
        return new UserError($"{where}: {field}: must be {Expected.GetValueOrDefault(field, "another value")}, got {got}", e);
    }

    /// <summary>"$.runs[0].seeds[1]" as ["runs", "0", "seeds", "1"].</summary>
    static List<string> Segments(string path) =>
        PathSegment().Matches(path).Select(m => m.Groups[1].Success ? m.Groups[1].Value : m.Groups[2].Success ? m.Groups[2].Value : m.Groups[3].Value).ToList();

    [GeneratedRegex(@"\.([^.\[]+)|\[(\d+)\]|\['([^']*)'\]")]
    private static partial Regex PathSegment();

    [GeneratedRegex(@"property '([^']*)' could not be mapped")]
    private static partial Regex UnmappedName();

    /// <summary>A string field: null when absent, refused when empty.</summary>
    public static string? NonEmpty(string? value, string key, string where) =>
        value is null ? null : !string.IsNullOrWhiteSpace(value) ? value
        : throw new UserError($"{where}: {key}: must be a non-empty string, got {JsonSerializer.Serialize(value)}");

    /// <summary>An integer field: null when absent, refused outside [low, high].</summary>
    public static long? InRange(long? value, string key, string where, long low, long high) =>
        value is not long n ? null : n >= low && n <= high ? n
        : throw new UserError($"{where}: {key}: must be an integer in [{low}, {high}], got {n}");

    /// <summary>A number of seconds: null when absent, refused outside (0, 100000000].</summary>
    public static double? CheckSeconds(double? value, string where) =>
        value is not double v ? null : v > 0 && v <= 100_000_000 ? v
        : throw new UserError($"{where}: seconds: must be a number of seconds in (0, 100000000], got {v}");

    /// <summary>A weight average's decay: null when absent, refused outside [0, 1).</summary>
    public static double? CheckEmaDecay(double? value, string where) =>
        value is not double v ? null : v >= 0 && v < 1 ? v
        : throw new UserError($"{where}: emaDecay: must be a number in [0, 1) (0: no weight average), got {v}");

    /// <summary>A temperatures list: empty when absent, refused outside [0, 10] or repeated.</summary>
    public static IReadOnlyList<double> CheckTemperatures(List<double>? temperatures, string where)
    {
        if (temperatures is null) return [];
        string text = $"[{string.Join(", ", temperatures.Select(t => t.ToString(System.Globalization.CultureInfo.InvariantCulture)))}]";
        if (temperatures.Any(t => !(t >= 0 && t <= 10)))
            throw new UserError($"{where}: qualityTemperatures: must be temperatures in [0, 10], got {text}");
        if (temperatures.Distinct().Count() != temperatures.Count) throw new UserError($"{where}: qualityTemperatures: repeated temperature in {text}");
        return temperatures;
    }

    /// <summary>A seeds list: null when absent, refused when empty, negative or repeated.</summary>
    public static IReadOnlyList<int>? CheckSeeds(List<int>? seeds, string where)
    {
        if (seeds is null) return null;
        string text = $"[{string.Join(", ", seeds)}]";
        if (seeds.Count == 0 || seeds.Any(s => s < 0))
            throw new UserError($"{where}: seeds: must be a non-empty list of integers >= 0, got {text}");
        if (seeds.Distinct().Count() != seeds.Count) throw new UserError($"{where}: seeds: repeated seed in {text}");
        return seeds;
    }
}
