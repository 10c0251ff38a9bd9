using System.Globalization;
using System.Reflection;
using System.Text.Json.Serialization;

namespace MixerFlow.Host.Models;

/// <summary>
/// Field-by-field changes of a <see cref="ModelConfig"/> given as text, as the command line's
/// <c>--set key=value</c> and experiment specs give them. Keys are the configuration's JSON names
/// (camelCase, as <see cref="ModelConfig.ToJson"/> writes them), matched case-insensitively;
/// values are parsed by the field's type: integers, decimal numbers (invariant culture),
/// <c>true</c>/<c>false</c> (also <c>on</c>/<c>off</c>, <c>yes</c>/<c>no</c>), enum members by name
/// (case-insensitive, e.g. <c>patches=bands</c>, <c>channelFlow=spline</c>, <c>norm=batchNorm</c>),
/// layer lists as numbers separated by commas (<c>splitAfter=2,3</c>, <c>splitAfter=none</c>) and text. An unknown key, an unparsable value or a resulting configuration with
/// <see cref="ModelConfig.Problems"/> is a <see cref="UserError"/> that names the field and what it accepts.
/// </summary>
public static class ConfigOverrides
{
    /// <summary>The keys that <paramref name="config"/>'s family accepts, in declaration order (base fields first).</summary>
    public static IReadOnlyList<string> Keys(ModelConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        return Fields(config.GetType()).Select(f => f.Key).ToList();
    }

    /// <summary>What <paramref name="key"/> accepts in <paramref name="config"/>'s family, in words (e.g. "one of square, bands, stripes").</summary>
    public static string Accepts(ModelConfig config, string key)
    {
        ArgumentNullException.ThrowIfNull(config);
        var f = Find(config, key, "") ?? throw new ArgumentException($"unknown key '{key}'", nameof(key));
        return Describe(f.Property.PropertyType);
    }

    /// <summary>Splits <c>key=value</c> at its first '='; a <see cref="UserError"/> naming <paramref name="source"/> otherwise.</summary>
    public static (string Key, string Value) ParseAssignment(string text, string source = "--set")
    {
        ArgumentNullException.ThrowIfNull(text);
        int eq = text.IndexOf('=');
        if (eq <= 0) throw new UserError($"{source} '{text}': expected key=value (for example patches=bands)");
        return (text[..eq].Trim(), text[(eq + 1)..].Trim());
    }

    /// <summary>
    /// <paramref name="config"/> with each (key, value) applied in order (a later one wins). The
    /// result is checked with <see cref="ModelConfig.Problems"/>. <paramref name="source"/> prefixes
    /// every error (for example "--set" or "spec.json: run 'a': set").
    /// </summary>
    /// <exception cref="UserError">An unknown key (the message lists the valid keys), a value the field's
    /// type does not accept (the message lists the enum members or the type), or a value out of bounds
    /// (the message gives the bounds, from <see cref="ModelConfig.Problems"/>).</exception>
    public static ModelConfig Apply(ModelConfig config, IEnumerable<(string Key, string Value)> overrides, string source = "--set")
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(overrides);
        var list = overrides.ToList();
        if (list.Count == 0) return config;
        // A fresh copy (records' init-only properties are set through reflection on the copy only).
        var copy = ModelConfig.FromJson(config.ToJson(), source, check: false);
        var changed = new List<string>();
        foreach (var (key, value) in list)
        {
            var f = Find(copy, key, source)
                    ?? throw new UserError($"{source} {key}={value}: unknown key '{key}' for a {Family(copy)} model; valid keys: {string.Join(", ", Keys(copy))}" +
                                           (key.Equals("kind", StringComparison.OrdinalIgnoreCase) ? " (the kind is chosen by --preset or --config)" : ""));
            f.Property.SetValue(copy, Parse(f, value, source));
            changed.Add(f.Key);
        }
        var problems = copy.Problems();
        if (problems.Count > 0)
            throw new UserError($"{source} {string.Join(", ", list.Select(o => $"{o.Key}={o.Value}"))}: {string.Join("; ", problems)}");
        return copy;
    }

    /// <summary><see cref="Apply(ModelConfig, IEnumerable{ValueTuple{string, string}}, string)"/> with <c>key=value</c> texts.</summary>
    public static ModelConfig Apply(ModelConfig config, IEnumerable<string> assignments, string source = "--set") =>
        Apply(config, assignments.Select(a => ParseAssignment(a, source)), source);

    /// <summary>
    /// The model of a command line or spec: a preset name or a configuration file (JSON as
    /// <c>info</c> prints it and run folders keep it as config.json, or a checkpoint .ckpt), then
    /// the overrides. A <paramref name="configFile"/> that is not an existing file but names a preset
    /// is taken as that preset. With neither, <see cref="Presets.Default"/>.
    /// </summary>
    public static ModelConfig Resolve(string? preset, string? configFile, IEnumerable<string>? assignments, string source = "--set")
    {
        if (preset is not null && configFile is not null) throw new UserError("give --preset NAME or --config FILE, not both");
        ModelConfig baseConfig;
        if (configFile is not null) baseConfig = ReadConfigFile(configFile);
        else baseConfig = Presets.Get(preset ?? Presets.Default);
        return Apply(baseConfig, assignments ?? [], source);
    }

    /// <summary>
    /// Reads a configuration file: JSON (a "kind" of mixerFlow or glow) or a checkpoint; a preset
    /// name is also accepted. Text after the JSON object is ignored, so the output of
    /// <c>mixerflow info ... &gt; model.json</c> (the JSON, then the parameter table) reads as is.
    /// </summary>
    public static ModelConfig ReadConfigFile(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (!File.Exists(path))
        {
            if (Presets.All.TryGetValue(path, out var preset)) return preset;
            throw new UserError($"config '{path}': no such file (and not a preset: {string.Join(", ", Presets.Names)})");
        }
        if (path.EndsWith(".ckpt", StringComparison.OrdinalIgnoreCase)) return Checkpoint.ReadConfig(path);
        var json = LeadingJson(Files.InputFile.ReadAllText(path, Files.InputFile.TextLimit, "a configuration file"));
        var config = ModelConfig.FromJson(json, path);
        CheckKeys(json, config, path);
        return config;
    }

    /// <summary>
    /// Refuses a key of a configuration file that no field reads (a misspelt "layer" would otherwise
    /// be ignored and the default trained), listing the valid keys. Accepted besides the family's
    /// fields: "kind", a run folder's "training" object, and the other family's fields, which
    /// version-1 files carry for both families.
    /// </summary>
    static void CheckKeys(string json, ModelConfig config, string path)
    {
        using var doc = System.Text.Json.JsonDocument.Parse(json);
        var known = new HashSet<string>(Fields(typeof(MixerFlowConfig)).Concat(Fields(typeof(GlowConfig))).Select(f => f.Key), StringComparer.Ordinal)
            { "kind", "training" };
        var unknown = doc.RootElement.EnumerateObject().Select(p => p.Name).Where(n => !known.Contains(n)).ToList();
        if (unknown.Count > 0)
            throw new UserError($"{path}: unknown key{(unknown.Count > 1 ? "s" : "")} {string.Join(", ", unknown.Select(u => $"'{u}'"))} " +
                                $"for a {Family(config)} model; valid keys: kind, {string.Join(", ", Keys(config))}");
    }

    /// <summary>The leading JSON value of <paramref name="text"/> (all of it when that does not parse: the parser then reports the error).</summary>
    static string LeadingJson(string text)
    {
        var bytes = System.Text.Encoding.UTF8.GetBytes(text);
        var reader = new System.Text.Json.Utf8JsonReader(bytes, new System.Text.Json.JsonReaderOptions
            { AllowMultipleValues = true, CommentHandling = System.Text.Json.JsonCommentHandling.Skip });
        try
        {
            if (!reader.Read() || reader.TokenType != System.Text.Json.JsonTokenType.StartObject || !reader.TrySkip()) return text;
            return System.Text.Encoding.UTF8.GetString(bytes, 0, (int)reader.BytesConsumed);
        }
        catch (System.Text.Json.JsonException) { return text; }
    }

    sealed record Field(string Key, PropertyInfo Property);

    static string Family(ModelConfig c) => c is GlowConfig ? "glow" : "mixerFlow";

    static Field? Find(ModelConfig config, string key, string source) =>
        Fields(config.GetType()).FirstOrDefault(f => string.Equals(f.Key, key?.Trim(), StringComparison.OrdinalIgnoreCase));

    static IEnumerable<Field> Fields(Type type)
    {
        // Base-class fields first: the order of the JSON.
        var chain = new List<Type>();
        for (var t = type; t is not null && t != typeof(object); t = t.BaseType) chain.Insert(0, t);
        foreach (var t in chain)
            foreach (var p in t.GetProperties(BindingFlags.Public | BindingFlags.Instance | BindingFlags.DeclaredOnly))
            {
                if (p.GetCustomAttribute<JsonIgnoreAttribute>() is not null || p.SetMethod is null || !p.SetMethod.IsPublic) continue;
                if (p.Name == "EqualityContract") continue;
                yield return new Field(char.ToLowerInvariant(p.Name[0]) + p.Name[1..], p);
            }
    }

    static string Camel(string name) => char.ToLowerInvariant(name[0]) + name[1..];

    static string Describe(Type t) =>
        t.IsEnum ? $"one of {string.Join(", ", Enum.GetNames(t).Select(Camel))}"
        : t == typeof(int) ? "an integer"
        : t == typeof(double) ? "a number"
        : t == typeof(bool) ? "true or false"
        : t == typeof(LayerList) ? "layer numbers separated by commas (e.g. 2 or 2,3; none: no split)"
        : "text";

    static object Parse(Field f, string value, string source)
    {
        var t = f.Property.PropertyType;
        var v = value.Trim();
        string Bad() => $"{source} {f.Key}={value}: {f.Key} must be {Describe(t)}";
        if (t.IsEnum)
        {
            var name = Enum.GetNames(t).FirstOrDefault(n => string.Equals(n, v, StringComparison.OrdinalIgnoreCase));
            return name is not null ? Enum.Parse(t, name) : throw new UserError(Bad());
        }
        if (t == typeof(int))
            return int.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture, out var i) ? i : throw new UserError(Bad());
        if (t == typeof(double))
            return double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && double.IsFinite(d) ? d : throw new UserError(Bad());
        if (t == typeof(bool))
            return v.ToLowerInvariant() switch
            {
                "true" or "on" or "yes" or "1" => true,
                "false" or "off" or "no" or "0" => false,
                _ => throw new UserError(Bad()),
            };
        if (t == typeof(LayerList))
            return LayerList.TryParse(v, out var layers) ? layers : throw new UserError(Bad());
        if (t == typeof(string))
            return v.Length > 0 ? v : throw new UserError($"{source} {f.Key}=: {f.Key} must not be empty");
        throw new UserError($"{source} {f.Key}: fields of type {t.Name} cannot be set from text");
    }
}
