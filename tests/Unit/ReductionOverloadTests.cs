using System.Text.RegularExpressions;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// In C#, the literal 0 converts to any enum, and TorchSharp's <c>Tensor.sum</c> and
/// <c>Tensor.prod</c> have an overload whose only parameter is a <c>ScalarType?</c> (the result's
/// type). Overload resolution prefers it to <c>sum(long dim, bool keepdim = false, ...)</c>, which
/// needs a default filled in: so <c>x.sum(0)</c> sums the whole tensor into a Byte, silently.
/// <c>x.sum(1)</c> and <c>x.sum(0L)</c> reduce a dimension as meant. A scan of the project's C#
/// sources refuses the trap.
/// </summary>
public class ReductionOverloadTests
{
    static readonly Regex Trap = new(@"\.(sum|prod)\(\s*0\s*\)", RegexOptions.Compiled);

    /// <summary>"file:line: text" for every line of <paramref name="text"/> whose code (before any
    /// <c>//</c> comment) calls sum or prod with a literal 0.</summary>
    internal static IEnumerable<string> Offenders(string file, string text) =>
        text.Split('\n')
            .Select((line, i) => (line, i))
            .Where(p => Trap.IsMatch(p.line.Split("//")[0]))
            .Select(p => $"{file}:{p.i + 1}: {p.line.Trim()}");

    [Fact]
    public void The_trap_is_real_in_this_TorchSharp()
    {
        var x = ones(5, 3);
        const ScalarType byZero = 0;
        Assert.Equal(ScalarType.Byte, byZero);
        // What sum(0) compiles to (written with the enum, so that the scan below passes this file).
        var whole = x.sum(byZero);
        Assert.Equal(0L, whole.dim());
        Assert.Equal(ScalarType.Byte, whole.dtype);
        Assert.Equal(new long[] { 3 }, x.sum(0L).shape);
        Assert.Equal(new long[] { 5 }, x.sum(1).shape);
    }

    [Fact]
    public void The_scan_finds_the_trap()
    {
        // Split so that this file itself passes the scan below.
        string sum = ".sum(", prod = ".prod(";
        var found = Offenders("Sample.cs", $"var a = x{sum}1);\nvar b = x{sum} 0 );\nvar c = x{prod}0);\nvar d = x{sum}0L);\nvar e = x{sum}0, keepdim: true);\nvar f = x{sum}1); // not x{sum}0)").ToList();
        Assert.Equal(new[] { $"Sample.cs:2: var b = x{sum} 0 );", $"Sample.cs:3: var c = x{prod}0);" }, found);
    }

    [Fact]
    public void No_CSharp_source_of_the_project_calls_sum_or_prod_with_a_literal_0()
    {
        var root = Repository.Root();
        var files = new[] { "src", "tests", "benchmarks", "examples" }
            .Select(d => Path.Combine(root, d))
            .Where(Directory.Exists)
            .SelectMany(d => Directory.EnumerateFiles(d, "*.cs", SearchOption.AllDirectories))
            .Where(f => !f.Split(Path.DirectorySeparatorChar).Any(part => part is "bin" or "obj"))
            .ToList();
        Assert.Contains(files, f => f.EndsWith("TrainingStep.cs", StringComparison.Ordinal));
        var offenders = files.SelectMany(f => Offenders(Path.GetRelativePath(root, f), File.ReadAllText(f))).ToList();
        Assert.True(offenders.Count == 0,
            "sum or prod with a literal 0 reduces the whole tensor into a Byte (the ScalarType overload); write 0L:\n" + string.Join("\n", offenders));
    }
}
