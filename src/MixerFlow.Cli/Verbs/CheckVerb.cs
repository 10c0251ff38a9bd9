using MixerFlow.Core;
using MixerFlow.Checks;
using MixerFlow.Host;
using Spectre.Console;
using static TorchSharp.torch;

namespace MixerFlow.Cli.Verbs;

/// <summary>`check`: the Core property checks on the built-in bijectors, as a table.</summary>
public static class CheckVerb
{
    public static int Run(CommandLine.CheckCommand options, TextWriter output)
    {
        IEnumerable<BijectorSpec> specs;
        try
        {
            specs = options.Bijector is null ? Catalogue.All : new[] { Catalogue.Find(options.Bijector) };
        }
        catch (ArgumentException e)
        {
            throw new UserError(e.Message);
        }

        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output) });
        if (Console.IsOutputRedirected) console.Profile.Width = 120;
        var table = new Table().AddColumns("bijector", "check", "dtype", "worst error", "tolerance", "cases", "result");
        var failures = new List<CheckResult>();
        var started = DateTime.UtcNow;
        foreach (var spec in specs)
            foreach (var dtype in options.Precision switch { CommandLine.Precision.Float64 => new[] { "float64" }, CommandLine.Precision.Float32 => new[] { "float32" }, _ => new[] { "float64", "float32" } })
            {
                var o = (dtype == "float64" ? MixerFlow.Checks.CheckOptions.Float64 : MixerFlow.Checks.CheckOptions.Float32)
                    .WithCases(options.Cases).WithSeed(options.Seed);
                foreach (var result in BijectorChecks.RunAll(spec, o))
                {
                    if (!result.Applicable) continue;
                    if (!result.Passed) failures.Add(result);
                    table.AddRow(
                        Markup.Escape(result.Bijector), $"({result.Letter}) {result.Check}", result.DType,
                        result.WorstError.ToString("0.0e+00"), result.Tolerance.ToString("0e+00"),
                        result.Cases.ToString(), result.Passed ? "[green]pass[/]" : "[red]FAIL[/]");
                }
            }
        console.Write(table);
        output.WriteLine($"{table.Rows.Count} checks, {failures.Count} failed, {(DateTime.UtcNow - started).TotalSeconds:0.0} s");
        foreach (var f in failures)
            output.WriteLine($"\n{f.Bijector} ({f.Letter}) {f.Check} [{f.DType}]:\n{f.Message}");
        return failures.Count == 0 ? 0 : 1;
    }
}
