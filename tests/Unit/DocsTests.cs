using System.Text;
using System.Text.RegularExpressions;
using Argu;
using Microsoft.FSharp.Core;
using MixerFlow.CommandLine;

namespace MixerFlow.Unit;

/// <summary>
/// Documentation that cannot drift: the README stays short and free of dated logs, its quick start
/// is the code of the examples that CI runs, every relative link resolves, and docs/cli.md is what
/// the Argu definitions print.
/// </summary>
public class DocsTests
{
    static string Root => Repository.Root();
    static string Read(string relative) => File.ReadAllText(Path.Combine(Root, relative)).ReplaceLineEndings("\n");

    [Fact]
    public void The_README_has_at_most_200_lines_and_15_KB()
    {
        var text = Read("README.md");
        var lines = text.TrimEnd('\n').Split('\n').Length;
        var bytes = new FileInfo(Path.Combine(Root, "README.md")).Length;
        Assert.True(lines <= 200, $"README.md has {lines} lines; at most 200 (move detail into docs/)");
        Assert.True(bytes <= 15 * 1024, $"README.md has {bytes} bytes; at most {15 * 1024} (move detail into docs/)");
    }

    [Fact]
    public void The_README_holds_no_clock_time_or_load_average()
    {
        Assert.Empty(DatedLogs(Read("README.md")));
    }

    [Fact]
    public void The_dated_log_check_finds_clock_times_and_load_averages()
    {
        Assert.Equal(2, DatedLogs("measured at 07:25 UTC\nat load average 1.6\nbatch 64, 4.0991 bits/dim\n").Count);
        Assert.Single(DatedLogs("2026-11-30 8:36 on the machine"));
        Assert.Empty(DatedLogs("arXiv:1605.08803, ratio 3:1 in 2026"));
    }

    /// <summary>Lines with a clock time (h:mm, optionally :ss) or a load average.</summary>
    internal static List<string> DatedLogs(string text) =>
        text.Split('\n').Where(l => Regex.IsMatch(l, @"(?<![\w:.])\d{1,2}:\d{2}(:\d{2})?(?![\w:.])")
                                  || Regex.IsMatch(l, @"load average|\bload \d", RegexOptions.IgnoreCase)).ToList();

    [Fact]
    public void The_README_keeps_the_training_and_test_commands()
    {
        var lines = Read("README.md").Split('\n');
        Assert.Contains("    dotnet run --project src/MixerFlow.Cli -c Release -- train", lines);
        Assert.Contains("    dotnet test", lines);
    }

    [Theory]
    [InlineData("csharp", "examples/QuickStart/Program.cs")]
    [InlineData("fsharp", "examples/QuickStartFs/Program.fs")]
    public void The_READMEs_quick_start_is_the_example_program_that_CI_runs(string language, string program)
    {
        var shown = FirstFencedBlock(Read("README.md"), language);
        Assert.True(shown is not null, $"README.md has no ```{language} block");
        var code = Read(program).TrimEnd('\n');
        Assert.True(code == shown,
            $"README.md's first ```{language} block differs from {program}; copy the program into the README (or the README's block into the program). " +
            $"First difference at line {FirstDifference(shown!, code)}.");
    }

    [Fact]
    public void The_quick_start_comparison_sees_a_one_character_change()
    {
        var readme = "intro\n```csharp\nvar x = 1;\n```\n";
        Assert.Equal("var x = 1;", FirstFencedBlock(readme, "csharp"));
        Assert.NotEqual("var x = 2;", FirstFencedBlock(readme, "csharp"));
        Assert.Null(FirstFencedBlock(readme, "fsharp"));
    }

    /// <summary>The content of the first block fenced as ```language, without the fences.</summary>
    internal static string? FirstFencedBlock(string markdown, string language)
    {
        var m = Regex.Match(markdown, $@"^```{language}[ \t]*\n(.*?)\n```[ \t]*$", RegexOptions.Singleline | RegexOptions.Multiline);
        return m.Success ? m.Groups[1].Value : null;
    }

    static int FirstDifference(string a, string b)
    {
        var (x, y) = (a.Split('\n'), b.Split('\n'));
        int i = 0;
        while (i < x.Length && i < y.Length && x[i] == y[i]) i++;
        return i + 1;
    }

    /// <summary>README.md and every Markdown page under docs/.</summary>
    public static TheoryData<string> Pages()
    {
        var pages = new TheoryData<string> { "README.md" };
        foreach (var f in Directory.EnumerateFiles(Path.Combine(Root, "docs"), "*.md", SearchOption.AllDirectories).Order())
            pages.Add(Path.GetRelativePath(Root, f).Replace('\\', '/'));
        return pages;
    }

    [Theory]
    [MemberData(nameof(Pages))]
    public void Every_relative_link_and_image_resolves(string page)
    {
        var broken = BrokenLinks(Root, page);
        Assert.True(broken.Count == 0, $"{page}: broken links: {string.Join("; ", broken)}");
    }

    [Fact]
    public void The_link_check_finds_a_missing_file_and_a_missing_heading()
    {
        var dir = Directory.CreateTempSubdirectory("mixerflow-links-");
        try
        {
            File.WriteAllText(Path.Combine(dir.FullName, "a.md"), "# A page\n\n## Some heading, here\n");
            File.WriteAllText(Path.Combine(dir.FullName, "b.md"),
                "[ok](a.md) [ok](a.md#some-heading-here) [ok](#b) [web](https://example.org/x.md)\n" +
                "`[code](missing-in-code.md)`\n```\n[fenced](missing-in-fence.md)\n```\n" +
                "[gone](missing.md) ![gone](img/missing.png) [bad anchor](a.md#no-such-heading)\n\n# B\n");
            var broken = BrokenLinks(dir.FullName, "b.md");
            Assert.Equal(new[] { "missing.md", "img/missing.png", "a.md#no-such-heading" }, broken);
        }
        finally { dir.Delete(true); }
    }

    /// <summary>
    /// The relative link targets of a Markdown page (outside code) that name no file or folder,
    /// or a heading anchor that a Markdown target does not have.
    /// </summary>
    internal static List<string> BrokenLinks(string root, string page)
    {
        var text = StripCode(File.ReadAllText(Path.Combine(root, page)).ReplaceLineEndings("\n"));
        var folder = Path.GetDirectoryName(Path.Combine(root, page))!;
        var broken = new List<string>();
        foreach (Match m in Regex.Matches(text, @"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+""[^""]*"")?\s*\)"))
        {
            var target = m.Groups[1].Value;
            if (Regex.IsMatch(target, @"^[a-zA-Z][a-zA-Z0-9+.-]*:")) continue; // https:, mailto:, ...
            var hash = target.IndexOf('#');
            var (file, anchor) = hash < 0 ? (target, null) : (target[..hash], target[(hash + 1)..]);
            var path = file.Length == 0 ? Path.Combine(root, page) : Path.GetFullPath(Path.Combine(folder, Uri.UnescapeDataString(file)));
            if (!File.Exists(path) && !Directory.Exists(path)) { broken.Add(target); continue; }
            if (anchor is not null && path.EndsWith(".md", StringComparison.OrdinalIgnoreCase)
                && !Headings(File.ReadAllText(path)).Contains(anchor))
                broken.Add(target);
        }
        return broken;
    }

    /// <summary>The page without fenced blocks, indented code lines and inline code spans.</summary>
    static string StripCode(string text)
    {
        text = Regex.Replace(text, @"^```.*?^```[ \t]*$", "", RegexOptions.Singleline | RegexOptions.Multiline);
        text = Regex.Replace(text, @"^(    |\t).*$", "", RegexOptions.Multiline);
        return Regex.Replace(text, @"`[^`\n]*`", "");
    }

    /// <summary>GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens.</summary>
    internal static HashSet<string> Headings(string markdown)
    {
        var anchors = new HashSet<string>();
        foreach (Match m in Regex.Matches(StripFences(markdown.ReplaceLineEndings("\n")), @"^#{1,6}[ \t]+(.+?)[ \t#]*$", RegexOptions.Multiline))
        {
            var slug = Regex.Replace(m.Groups[1].Value.Trim().ToLowerInvariant(), @"[^\p{L}\p{N}\- _]", "").Replace(' ', '-');
            var anchor = slug;
            for (int n = 1; !anchors.Add(anchor); n++) anchor = $"{slug}-{n}";
        }
        return anchors;
    }

    static string StripFences(string text) =>
        Regex.Replace(text, @"^```.*?^```[ \t]*$", "", RegexOptions.Singleline | RegexOptions.Multiline);

    internal const string CliReferencePath = "docs/cli.md";
    internal const string Regenerate =
        "MIXERFLOW_WRITE_DOCS=1 dotnet test tests/Unit --filter FullyQualifiedName~DocsTests.The_command_line_reference";

    [Fact]
    public void The_command_line_reference_is_what_the_argument_definitions_print()
    {
        var generated = CliReference.Markdown();
        var path = Path.Combine(Root, CliReferencePath);
        if (Environment.GetEnvironmentVariable("MIXERFLOW_WRITE_DOCS") == "1")
            File.WriteAllText(path, generated);
        var committed = File.Exists(path) ? File.ReadAllText(path).ReplaceLineEndings("\n") : "";
        Assert.True(committed == generated,
            $"{CliReferencePath} is not what src/MixerFlow.CommandLine/Arguments.fs prints (first difference at line " +
            $"{FirstDifference(committed, generated)}); regenerate it with: {Regenerate}");
    }

    [Fact]
    public void The_command_line_reference_has_every_verb_and_option()
    {
        var md = CliReference.Markdown();
        foreach (var verb in new[] { "train", "eval", "sample", "embed", "info", "check", "interpolate", "export", "experiment" })
            Assert.Contains($"\n## `mixerflow {verb}`\n", md);
        Assert.Contains("--batch-size", md);
        Assert.Contains("--extend-steps", md);
        Assert.Contains("--time-step", md);
    }
}

/// <summary>
/// docs/cli.md from the command line's Argu definitions: the main usage and each verb's, as
/// <c>mixerflow --help</c> and <c>mixerflow VERB --help</c> print them, at a fixed width.
/// </summary>
internal static class CliReference
{
    const int Width = 100;

    public static string Markdown()
    {
        var main = ArgumentParser.Create<MainArgs>(FSharpOption<string>.Some("mixerflow"), null, FSharpOption<int>.Some(Width), null, null);
        var md = new StringBuilder();
        md.Append("# Command-line reference\n\n");
        md.Append("Generated from the Argu definitions in `src/MixerFlow.CommandLine/Arguments.fs` (what\n");
        md.Append("`mixerflow --help` and `mixerflow VERB --help` print) by `tests/Unit/DocsTests.cs`, which fails when\n");
        md.Append("this page differs from them. Do not edit it by hand; regenerate it with\n\n");
        md.Append($"    {DocsTests.Regenerate}\n\n");
        md.Append("What the verbs do beyond their options (run folders, data formats, what is refused, exit codes):\n");
        md.Append("[training runs](training.md); the model fields that `--set` changes: [model configuration](configuration.md).\n\n");
        Section(md, "mixerflow", main);
        foreach (var verb in main.GetSubCommandParsers())
            Section(md, "mixerflow " + verb.ParentInfo.Value.CommandLineNames.Value.Head, verb);
        return md.ToString();
    }

    static void Section(StringBuilder md, string title, ArgumentParser parser)
    {
        var usage = parser.PrintUsage(null, FSharpOption<string>.Some("mixerflow"), null, FSharpOption<int>.Some(Width));
        var lines = usage.ReplaceLineEndings("\n").Split('\n').Select(l => l.TrimEnd());
        md.Append($"## `{title}`\n\n```text\n{string.Join("\n", lines).Trim('\n')}\n```\n\n");
    }
}
