using MixerFlow.CommandLine;
using MixerFlow.Cli.Commands;
using MixerFlow.Host;

namespace MixerFlow.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        var parsed = CommandLine.CommandLine.Parse(args);
        if (parsed.Verb is null)
        {
            (parsed.IsError ? Console.Error : Console.Out).WriteLine(parsed.Message);
            return parsed.ExitCode;
        }
        try
        {
            return parsed.Verb switch
            {
                "train" => ModelCommands.Train((TrainOptions)parsed.Options, Console.Out),
                "eval" => ModelCommands.Eval((EvalOptions)parsed.Options, Console.Out),
                "sample" => ModelCommands.Sample((SampleOptions)parsed.Options, Console.Out),
                "embed" => ModelCommands.Embed((EmbedOptions)parsed.Options, Console.Out),
                "check" => CheckCommand.Run((CommandLine.CheckOptions)parsed.Options, Console.Out),
                "info" => InfoCommand.Run((InfoOptions)parsed.Options, Console.Out),
                _ => throw new InvalidOperationException($"verb '{parsed.Verb}' has no handler"),
            };
        }
        catch (UserError e)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return 2;
        }
        catch (MixerFlow.Core.NativeLoadException e)
        {
            // The machine, not the command: the message names the loader's reason and the fix.
            Console.Error.WriteLine($"error: {e.Message}");
            return 3;
        }
    }
}

