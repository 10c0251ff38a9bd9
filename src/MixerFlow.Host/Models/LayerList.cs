using System.Collections;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace MixerFlow.Host.Models;

/// <summary>
/// An ordered list of layer numbers with value equality (two lists of the same numbers are
/// equal, so configurations that hold one compare by value). In JSON an array of integers
/// (<c>[2, 4]</c>); as text, as <c>--set</c> takes it, the numbers separated by commas
/// (<c>2,4</c>), and <c>none</c> (or nothing, or <c>[]</c>) for the empty list.
/// </summary>
[JsonConverter(typeof(LayerListJsonConverter))]
public sealed class LayerList : IReadOnlyList<int>, IEquatable<LayerList>
{
    readonly int[] values;

    /// <summary>A list of the given numbers, in the order given (copied).</summary>
    public LayerList(IEnumerable<int> values)
    {
        ArgumentNullException.ThrowIfNull(values);
        this.values = values.ToArray();
    }

    /// <summary>The empty list.</summary>
    public static LayerList Empty { get; } = new(Array.Empty<int>());

    /// <summary>The number at <paramref name="index"/>.</summary>
    public int this[int index] => values[index];
    /// <summary>How many numbers the list holds.</summary>
    public int Count => values.Length;
    /// <summary>The numbers in order.</summary>
    public IEnumerator<int> GetEnumerator() => ((IEnumerable<int>)values).GetEnumerator();
    IEnumerator IEnumerable.GetEnumerator() => GetEnumerator();

    /// <summary>Whether <paramref name="other"/> holds the same numbers in the same order.</summary>
    public bool Equals(LayerList? other) => other is not null && values.AsSpan().SequenceEqual(other.values);
    /// <summary>Whether <paramref name="obj"/> is a list of the same numbers in the same order.</summary>
    public override bool Equals(object? obj) => Equals(obj as LayerList);
    /// <summary>A hash of the numbers.</summary>
    public override int GetHashCode()
    {
        var h = new HashCode();
        foreach (var v in values) h.Add(v);
        return h.ToHashCode();
    }

    /// <summary>The numbers separated by commas ("2,4"); "none" for the empty list.</summary>
    public override string ToString() => values.Length == 0 ? "none" : string.Join(",", values);

    /// <summary>Parses "2,4" (also "[2, 4]"), or "none", "" or "[]" for the empty list; false for anything else.</summary>
    public static bool TryParse(string? text, out LayerList list)
    {
        list = Empty;
        var t = (text ?? "").Trim();
        if (t.StartsWith('[') && t.EndsWith(']')) t = t[1..^1].Trim();
        if (t.Length == 0 || t.Equals("none", StringComparison.OrdinalIgnoreCase)) return true;
        var parsed = new List<int>();
        foreach (var part in t.Split(','))
        {
            if (!int.TryParse(part.Trim(), NumberStyles.Integer, CultureInfo.InvariantCulture, out var v)) return false;
            parsed.Add(v);
        }
        list = new LayerList(parsed);
        return true;
    }
}

/// <summary>Reads and writes a <see cref="LayerList"/> as a JSON array of integers (null reads as the empty list).</summary>
public sealed class LayerListJsonConverter : JsonConverter<LayerList>
{
    /// <summary>True: a JSON null reaches <see cref="Read"/>, which makes it the empty list.</summary>
    public override bool HandleNull => true;

    /// <summary>Reads an array of integers.</summary>
    public override LayerList Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options)
    {
        if (reader.TokenType == JsonTokenType.Null) return LayerList.Empty;
        if (reader.TokenType != JsonTokenType.StartArray) throw new JsonException("expected an array of layer numbers, e.g. [2]");
        var values = new List<int>();
        while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
        {
            if (reader.TokenType != JsonTokenType.Number || !reader.TryGetInt32(out var v))
                throw new JsonException("expected an array of layer numbers (integers), e.g. [2]");
            values.Add(v);
        }
        return values.Count == 0 ? LayerList.Empty : new LayerList(values);
    }

    /// <summary>Writes an array of integers.</summary>
    public override void Write(Utf8JsonWriter writer, LayerList value, JsonSerializerOptions options)
    {
        writer.WriteStartArray();
        foreach (var v in value) writer.WriteNumberValue(v);
        writer.WriteEndArray();
    }
}
