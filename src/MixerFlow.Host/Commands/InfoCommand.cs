using MixerFlow.CommandLine;
using MixerFlow.Host.Models;

namespace MixerFlow.Host.Commands;

/// <summary>`info`: a model's configuration and parameter breakdown.</summary>
public static class InfoCommand
{
    public static int Run(InfoOptions options, TextWriter output)
    {
        var config = options.Preset is not null ? Presets.Get(options.Preset) : Checkpoint.ReadConfig(options.Checkpoint);
        var model = new ImageFlow(config);
        Describe(model, output);
        return 0;
    }

    public static void Describe(ImageFlow model, TextWriter output)
    {
        output.WriteLine(model.Config.ToJson());
        output.WriteLine();
        output.WriteLine($"{"part",-30} {"parameters",12}");
        foreach (var (part, count) in model.ParameterBreakdown())
            output.WriteLine($"{part,-30} {count,12:N0}");
        output.WriteLine($"{"total",-30} {model.ParameterCount,12:N0}");
    }
}
