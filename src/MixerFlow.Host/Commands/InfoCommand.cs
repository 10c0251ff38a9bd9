using MixerFlow.CommandLine;

namespace MixerFlow.Host.Commands;

/// <summary>`info`: a model's configuration and parameter breakdown.</summary>
public static class InfoCommand
{
    public static int Run(InfoOptions options, TextWriter output)
    {
        throw new UserError("info: no model presets are defined yet");
    }
}
