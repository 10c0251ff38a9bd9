using System.Globalization;
using System.Text;

namespace MixerFlow.Host.Files;

/// <summary>
/// Appends rows to a CSV file (for example metrics.csv). The header is written only when the
/// file is new or empty, so a resumed run appends to the existing file without repeating it.
/// Numbers are written with the invariant culture and every row is flushed to disk.
/// </summary>
public sealed class CsvLog
{
    readonly string[] _columns;

    /// <summary>The file this log appends to.</summary>
    public string Path { get; }

    /// <summary>The column names, in order.</summary>
    public IReadOnlyList<string> Columns => _columns;

    /// <summary>Opens (or prepares to create) a CSV log with the given columns. If the file
    /// already has a header, it must match <paramref name="columns"/>.</summary>
    public CsvLog(string path, params string[] columns)
    {
        if (columns is null || columns.Length == 0)
            throw new ArgumentException("a CSV log needs at least one column", nameof(columns));
        Path = System.IO.Path.GetFullPath(path);
        _columns = (string[])columns.Clone();
        // A pipe or a device in the log's place would hold the program for ever or swallow the rows.
        OutputPath.RefuseSpecialTarget(Path, "a CSV log");
        if (File.Exists(Path))
        {
            using var reader = new StreamReader(Path, Encoding.UTF8);
            var first = reader.ReadLine();
            if (!string.IsNullOrEmpty(first))
            {
                var existing = ParseLine(first);
                if (!existing.SequenceEqual(_columns))
                    throw new InvalidDataException(
                        $"{Path} has columns [{string.Join(",", existing)}], expected [{string.Join(",", _columns)}]");
            }
        }
    }

    /// <summary>Appends one row; values are given in column order (null writes an empty field).
    /// If the file system refuses (a full disk), the file is cut back to the rows it had and an
    /// <see cref="IOException"/> names the file and the reason.</summary>
    public void Append(params object?[] values)
    {
        if (values.Length != _columns.Length)
            throw new ArgumentException($"expected {_columns.Length} values, got {values.Length}", nameof(values));
        var sb = new StringBuilder();
        FileStream? stream = null;
        long start = -1;
        try
        {
            var dir = System.IO.Path.GetDirectoryName(Path);
            if (!string.IsNullOrEmpty(dir)) Directory.CreateDirectory(dir);
            // Unbuffered, so that nothing of a failed row is left to be written when the stream closes.
            stream = new FileStream(Path, FileMode.Append, FileAccess.Write, FileShare.Read, bufferSize: 0);
            start = stream.Length;
            if (start == 0)
                sb.Append(JoinLine(_columns));
            sb.Append(JoinLine(values.Select(Format)));
            var bytes = new UTF8Encoding(false).GetBytes(sb.ToString());
            stream.Write(bytes, 0, bytes.Length);
            stream.Flush(flushToDisk: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // A full disk can take part of the row: cut the file back to the rows it had.
            bool restored = start < 0;
            if (stream is not null && start >= 0)
            {
                try { stream.SetLength(start); restored = true; }
                catch (Exception x) when (x is IOException or UnauthorizedAccessException) { }
            }
            throw new IOException(
                $"{Path}: cannot append a row ({OutputPath.Reason(e)}); " +
                (restored ? "the rows already written are kept" : "the last row may be incomplete"), e);
        }
        finally
        {
            stream?.Dispose();
        }
    }

    /// <summary>Appends one row given by column name; columns not named are left empty.</summary>
    public void Append(IReadOnlyDictionary<string, object?> row)
    {
        foreach (var key in row.Keys)
            if (Array.IndexOf(_columns, key) < 0)
                throw new ArgumentException($"unknown column '{key}'", nameof(row));
        Append(_columns.Select(c => row.TryGetValue(c, out var v) ? v : null).ToArray());
    }

    /// <summary>Rewrites the file atomically keeping only the data rows <paramref name="keep"/> accepts
    /// (for a resumed run: the rows up to its checkpoint); returns how many rows were dropped.</summary>
    public int KeepRows(Func<IReadOnlyDictionary<string, string>, bool> keep)
    {
        ArgumentNullException.ThrowIfNull(keep);
        if (!File.Exists(Path)) return 0;
        var rows = Read(Path);
        var kept = rows.Where(r => keep(r)).ToList();
        if (kept.Count == rows.Count) return 0;
        var sb = new StringBuilder(JoinLine(_columns));
        foreach (var row in kept) sb.Append(JoinLine(_columns.Select(c => row.TryGetValue(c, out var v) ? v : "")));
        AtomicFile.WriteAllText(Path, sb.ToString());
        return rows.Count - kept.Count;
    }

    /// <summary>Reads a CSV file written by <see cref="CsvLog"/>: one dictionary per data row,
    /// keyed by the header's column names.</summary>
    public static IReadOnlyList<Dictionary<string, string>> Read(string path)
    {
        InputFile.RefuseSpecial(path, "a CSV log");
        var rows = new List<Dictionary<string, string>>();
        string[]? header = null;
        foreach (var line in File.ReadLines(path, Encoding.UTF8))
        {
            if (line.Length == 0) continue;
            var fields = ParseLine(line);
            if (header is null) { header = fields; continue; }
            var row = new Dictionary<string, string>(header.Length);
            for (int i = 0; i < header.Length; i++)
                row[header[i]] = i < fields.Length ? fields[i] : "";
            rows.Add(row);
        }
        return rows;
    }

    static string Format(object? value) => value switch
    {
        null => "",
        double d => d.ToString("R", CultureInfo.InvariantCulture),
        float f => f.ToString("R", CultureInfo.InvariantCulture),
        IFormattable f => f.ToString(null, CultureInfo.InvariantCulture),
        _ => value.ToString() ?? "",
    };

    static string JoinLine(IEnumerable<string> fields) =>
        string.Join(",", fields.Select(Escape)) + "\n";

    /// <summary>Quotes a field holding a comma or quote; line breaks become spaces so that
    /// every row stays on one line.</summary>
    static string Escape(string field)
    {
        field = field.Replace("\r\n", " ").Replace('\n', ' ').Replace('\r', ' ');
        return field.IndexOfAny(new[] { ',', '"' }) >= 0
            ? "\"" + field.Replace("\"", "\"\"") + "\""
            : field;
    }

    /// <summary>Splits one CSV line (RFC 4180 quoting; fields do not span lines).</summary>
    static string[] ParseLine(string line)
    {
        var fields = new List<string>();
        var sb = new StringBuilder();
        bool quoted = false;
        for (int i = 0; i < line.Length; i++)
        {
            char c = line[i];
            if (quoted)
            {
                if (c == '"')
                {
                    if (i + 1 < line.Length && line[i + 1] == '"') { sb.Append('"'); i++; }
                    else quoted = false;
                }
                else sb.Append(c);
            }
            else if (c == '"') quoted = true;
            else if (c == ',') { fields.Add(sb.ToString()); sb.Clear(); }
            else sb.Append(c);
        }
        fields.Add(sb.ToString());
        return fields.ToArray();
    }
}
