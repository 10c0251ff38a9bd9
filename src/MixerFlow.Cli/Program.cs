using MixerFlow.Cli.Verbs;
using MixerFlow.CommandLine;
using MixerFlow.Host;

namespace MixerFlow.Cli;

/// <summary>The <c>mixerflow</c> executable: parse, dispatch on the command, turn user errors into one line and exit code 2.</summary>
public static class Program
{
    public static int Main(string[] args)
    {
        var parsed = CommandLine.CommandLine.Parse(args);
        if (parsed.Command is null)
        {
            (parsed.IsError ? Console.Error : Console.Out).WriteLine(parsed.Message);
            return parsed.ExitCode;
        }
        try
        {
            return parsed.Command switch
            {
                Command.Train t => ModelVerbs.Train(t.settings, Console.Out),
                Command.Eval e => ModelVerbs.Eval(e.Item, Console.Out),
                Command.Sample s => ModelVerbs.Sample(s.Item, Console.Out),
                Command.Embed e => ModelVerbs.Embed(e.Item, Console.Out),
                Command.Check c => CheckVerb.Run(c.Item, Console.Out),
                Command.Info i => InfoVerb.Run(i.Item, Console.Out),
                _ => throw new InvalidOperationException($"command {parsed.Command} has no handler"),
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
