using System.Text.RegularExpressions;
using Xunit;

namespace MixerFlow.Unit;

/// <summary>
/// The size rules of the source tree (docs/architecture.md): no file under src/ over 500 lines and
/// no method (an F# member or top-level let, a C# method or constructor) over 120 lines. A method's
/// extent is read from the layout: in F# the lines indented deeper than its first line, in C# the
/// lines up to the closing brace at its own indentation.
/// </summary>
public class HouseRulesTests
{
    public const int MaxFileLines = 500;
    public const int MaxMethodLines = 120;

    static IEnumerable<string> SourceFiles() =>
        Directory.EnumerateFiles(Path.Combine(Repository.Root(), "src"), "*.*", SearchOption.AllDirectories)
            .Where(f => (f.EndsWith(".fs") || f.EndsWith(".cs"))
                        && !f.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}")
                        && !f.Contains($"{Path.DirectorySeparatorChar}bin{Path.DirectorySeparatorChar}"));

    static string Relative(string path) => Path.GetRelativePath(Repository.Root(), path);

    [Fact]
    public void No_source_file_is_over_500_lines()
    {
        var files = SourceFiles().ToList();
        Assert.True(files.Count > 40, $"only {files.Count} source files found under src/");
        var over = files.Select(f => (File: Relative(f), Lines: File.ReadAllLines(f).Length))
                        .Where(x => x.Lines > MaxFileLines).Select(x => $"{x.File}: {x.Lines} lines").ToList();
        Assert.True(over.Count == 0, string.Join("\n", over));
    }

    [Fact]
    public void No_method_is_over_120_lines()
    {
        var over = SourceFiles().SelectMany(f => LongMethods(f, File.ReadAllLines(f)))
                                .Select(m => $"{Relative(m.File)}:{m.Line}: {m.Lines} lines: {m.Signature}").ToList();
        Assert.True(over.Count == 0, string.Join("\n", over));
    }

    [Fact]
    public void The_method_scan_finds_a_long_method_in_either_language()
    {
        var body = Enumerable.Range(0, 130).Select(i => $"        x{i}();").ToArray();
        var cs = new[] { "class C", "{", "    void Long()", "    {" }.Concat(body).Concat(new[] { "    }", "}" }).ToArray();
        var fsBody = Enumerable.Range(0, 130).Select(i => $"        let y{i} = {i}").ToArray();
        var fs = new[] { "type T() =", "    member _.Long() =" }.Concat(fsBody).Concat(new[] { "        ()" }).ToArray();
        Assert.Equal(133, Assert.Single(LongMethods("a.cs", cs)).Lines);
        Assert.Equal(132, Assert.Single(LongMethods("a.fs", fs)).Lines);
        Assert.Empty(LongMethods("b.cs", cs.Take(20).Append("    }").Append("}").ToArray()));
    }

    static readonly Regex FsDefinition = new(@"^\s*(static member|member|override|default|new|let|and)\b");
    static readonly Regex CsControl = new(@"^\s*(if|for|foreach|while|switch|catch|using|lock|return|else|new|try|do|case|var|await|throw|fixed)\b");
    static readonly Regex CsType = new(@"\b(class|record|struct|interface|enum)\b");

    static int Indent(string line) => line.Length - line.TrimStart(' ').Length;

    internal static IEnumerable<(string File, int Line, int Lines, string Signature)> LongMethods(string file, string[] lines)
    {
        bool fs = file.EndsWith(".fs");
        for (int i = 0; i < lines.Length; i++)
        {
            int end = fs ? FsEnd(lines, i) : CsEnd(lines, i);
            if (end >= 0 && end - i + 1 > MaxMethodLines) yield return (file, i + 1, end - i + 1, lines[i].Trim());
        }
    }

    /// <summary>The last line of the F# definition that starts at line i, or -1 where none starts there.</summary>
    static int FsEnd(string[] lines, int i)
    {
        var line = lines[i];
        if (!FsDefinition.IsMatch(line) || line.TrimStart().StartsWith("//")) return -1;
        // Local lets belong to the definition around them.
        if (line.TrimStart().StartsWith("let") && Indent(line) > 8) return -1;
        int last = i;
        for (int j = i + 1; j < lines.Length; j++)
        {
            if (lines[j].Trim().Length == 0) continue;
            if (Indent(lines[j]) <= Indent(line)) break;
            last = j;
        }
        return last;
    }

    /// <summary>The closing brace of the C# method that starts at line i, or -1 where none starts there.</summary>
    static int CsEnd(string[] lines, int i)
    {
        var s = lines[i].Trim();
        if (!s.Contains('(') || s.EndsWith(';') || s.StartsWith("//") || CsControl.IsMatch(lines[i]) || CsType.IsMatch(s)
            || s.Split('(')[0].Contains('=') || Indent(lines[i]) > 8) return -1;
        int open = -1;
        for (int j = i; j < Math.Min(lines.Length, i + 6) && open < 0; j++)
            if (lines[j].TrimEnd().EndsWith('{') || lines[j].Trim() == "{") open = j;
            else if (lines[j].TrimEnd().EndsWith(';')) return -1;
        if (open < 0) return -1;
        for (int k = open + 1; k < lines.Length; k++)
            if (lines[k].Trim().StartsWith('}') && Indent(lines[k]) == Indent(lines[i])) return k;
        return lines.Length - 1;
    }
}
