using MixerFlow.Core;
using MixerFlow.CommandLine;

namespace MixerFlow.Unit;

/// <summary>The command line's defaults, the checks' and the help text's come from <see cref="Defaults"/>.</summary>
public class DefaultsTests
{
    static T Parsed<T>(params string[] args) => Assert.IsType<T>(CommandLine.CommandLine.Parse(args).Command);

    [Fact]
    public void Verbs_without_options_take_the_shared_defaults()
    {
        var check = Parsed<CheckCommand>("check");
        Assert.Equal((Defaults.CheckCases, Defaults.CheckSeed), (check.Cases, check.Seed));
        Assert.Equal((Defaults.CheckCases, Defaults.CheckSeed),
                     (MixerFlow.Checks.CheckOptions.Float64.Cases, MixerFlow.Checks.CheckOptions.Float64.Seed));
        Assert.Equal(Defaults.EvaluationBatchSize, Parsed<EvalCommand>("eval", "--checkpoint", "a").BatchSize);
        var sample = Parsed<SampleCommand>("sample", "--checkpoint", "a");
        Assert.Equal((Defaults.SampleCount, Defaults.SampleSeed), (sample.Count, sample.Seed));
        Assert.Equal(new[] { Defaults.SampleTemperature }, sample.Temperatures);
        Assert.Equal(Defaults.InterpolationSteps, Parsed<InterpolateCommand>("interpolate", "--checkpoint", "a", "--from", "b", "--to", "c").Steps);
    }

    /// <summary>A verb's help with Argu's line wrapping undone.</summary>
    static string Help(string verb) =>
        System.Text.RegularExpressions.Regex.Replace(CommandLine.CommandLine.Parse([verb, "--help"]).Message, @"\s+", " ");

    [Fact]
    public void Help_states_the_shared_defaults()
    {
        var check = Help("check");
        Assert.Contains($"(default {Defaults.CheckSeed})", check);
        Assert.Contains($"(default {Defaults.CheckCases})", check);
        Assert.Contains($"(default {Defaults.EvaluationBatchSize})", Help("eval"));
        Assert.Contains($"(default {Defaults.InterpolationSteps})", Help("interpolate"));
    }
}
