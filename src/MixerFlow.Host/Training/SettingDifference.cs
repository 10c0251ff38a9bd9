using System.Globalization;
using System.Reflection;
using System.Text.Json.Nodes;
using MixerFlow.Host.Models;

namespace MixerFlow.Host.Training;

/// <summary>
/// One field whose value differs between a saved run (its settings.json or config.json) and what
/// is given now, both as text; callers word the pair (for example "steps: trained with 10, the
/// spec says 12"). <see cref="Of(TrainingSettings, TrainingSettings)"/> and
/// <see cref="Of(ModelConfig, ModelConfig)"/> compare every field by construction: every property
/// of <see cref="TrainingSettings"/> (by reflection) and every key of a model's JSON form.
/// </summary>
/// <param name="Field">The field's JSON name (camelCase).</param>
/// <param name="Saved">The saved value as text.</param>
/// <param name="Now">The value given now as text.</param>
public sealed record SettingDifference(string Field, string Saved, string Now)
{
    static readonly PropertyInfo[] SettingsProperties = typeof(TrainingSettings)
        .GetProperties(BindingFlags.Public | BindingFlags.Instance)
        .Where(p => p.CanWrite)
        .ToArray();

    /// <summary>The names of the settable properties of <see cref="TrainingSettings"/>, which <see cref="Of(TrainingSettings, TrainingSettings)"/> compares.</summary>
    public static IReadOnlyList<string> SettingsFields { get; } = SettingsProperties.Select(p => p.Name).ToArray();

    /// <summary>Every settable property of <see cref="TrainingSettings"/> whose value differs, in declaration order.</summary>
    public static IReadOnlyList<SettingDifference> Of(TrainingSettings saved, TrainingSettings now)
    {
        ArgumentNullException.ThrowIfNull(saved);
        ArgumentNullException.ThrowIfNull(now);
        var list = new List<SettingDifference>();
        foreach (var p in SettingsProperties)
        {
            string a = Text(p.Name, p.GetValue(saved)), b = Text(p.Name, p.GetValue(now));
            if (a != b) list.Add(new SettingDifference(Camel(p.Name), a, b));
        }
        return list;
    }

    /// <summary>Every key of the two configurations' JSON forms whose value differs ("none" where one lacks it).</summary>
    public static IReadOnlyList<SettingDifference> Of(ModelConfig saved, ModelConfig now)
    {
        ArgumentNullException.ThrowIfNull(saved);
        ArgumentNullException.ThrowIfNull(now);
        var a = (JsonObject)JsonNode.Parse(saved.ToJson())!;
        var b = (JsonObject)JsonNode.Parse(now.ToJson())!;
        return a.Select(p => p.Key).Union(b.Select(p => p.Key))
            .Where(k => !JsonNode.DeepEquals(a[k], b[k]))
            .Select(k => new SettingDifference(k, a[k]?.ToJsonString() ?? "none", b[k]?.ToJsonString() ?? "none"))
            .ToList();
    }

    /// <summary>Only the differences in fields outside <paramref name="ignored"/> (property names, as in <see cref="TrainingSettings"/>).</summary>
    public static IReadOnlyList<SettingDifference> Except(IEnumerable<SettingDifference> differences, IEnumerable<string> ignored)
    {
        var skip = ignored.Select(Camel).ToHashSet();
        return differences.Where(d => !skip.Contains(d.Field)).ToList();
    }

    /// <summary>A value as text: data paths made absolute (null: the bundled data), a model by its JSON, a set sorted.</summary>
    static string Text(string property, object? value) => value switch
    {
        null when property == nameof(TrainingSettings.Data) => "the bundled data",
        null => "none",
        string path when property == nameof(TrainingSettings.Data) => Path.GetFullPath(path),
        ModelConfig model => model.ToJson(),
        string text => text,
        IEnumerable<string> names => $"[{string.Join(", ", names.Order(StringComparer.Ordinal))}]",
        IFormattable number => number.ToString(null, CultureInfo.InvariantCulture),
        _ => value.ToString() ?? "",
    };

    static string Camel(string name) => char.ToLowerInvariant(name[0]) + name[1..];
}
