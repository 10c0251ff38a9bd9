using MixerFlow.Cli.Verbs;
using MixerFlow.CommandLine;
using MixerFlow.Host;

namespace MixerFlow.Cli;

/// <summary>The <c>mixerflow</c> executable: parse, dispatch on the command, turn user errors into one line and exit code 2.</summary>
public static class Program
{
    /// <summary>Runs the command line <paramref name="args"/>; returns the exit code: 0 done, 2 bad input or a
    /// path the file system refused (one line on stderr naming it), 3 the native library cannot load,
    /// 1 anything unexpected (the stack trace only under <c>--verbose</c>).</summary>
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
            // The process's runtime, set up once, before the command's first LibTorch call: the
            // defaults of RuntimeOptions. Huge pages (a restart of the process with glibc malloc's
            // tunables; opt out with MIXERFLOW_HUGETLB=0) only as the process's own entry point,
            // not when a test host calls Main.
            MixerFlow.Core.Runtime.MixerFlowRuntime.Configure(new MixerFlow.Core.Runtime.RuntimeOptions
            {
                HugePages = System.Reflection.Assembly.GetEntryAssembly() == typeof(Program).Assembly,
            });
            return parsed.Command.Accept(new VerbHandler(Console.Out));
        }
        catch (UserError e)
        {
            Console.Error.WriteLine($"error: {OneLine(e.Message)}");
            return 2;
        }
        catch (MixerFlow.Core.NativeLoadException e)
        {
            // The machine, not the command: the message names the loader's reason and the fix.
            Console.Error.WriteLine($"error: {e.Message}");
            return 3;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // The file system refused (a folder given as a file, a read-only or full disk): the
            // message names the path (AtomicFile and CsvLog name the file and the reason).
            Console.Error.WriteLine($"error: {OneLine(e.Message)}");
            if (parsed.Verbose) Console.Error.WriteLine(e);
            return 2;
        }
        catch (Exception e)
        {
            // Last resort: one line, the stack trace only when asked for.
            Console.Error.WriteLine($"error: {e.GetType().Name}: {OneLine(e.Message)}");
            Console.Error.WriteLine(parsed.Verbose ? e.ToString() : "(run with --verbose for the stack trace)");
            return 1;
        }
    }

    /// <summary>Each verb's handler: a verb added to <see cref="ICommandHandler{TResult}"/> without a
    /// method here does not compile.</summary>
    sealed class VerbHandler(TextWriter output) : ICommandHandler<int>
    {
        public int Train(TrainCommand command) => ModelVerbs.Train(command.Settings, output);
        public int Eval(EvalCommand command) => ModelVerbs.Eval(command, output);
        public int Sample(SampleCommand command) => ModelVerbs.Sample(command, output);
        public int Score(ScoreCommand command) => ScoreVerb.Run(command, output);
        public int Embed(EmbedCommand command) => ModelVerbs.Embed(command, output);
        public int Info(InfoCommand command) => InfoVerb.Run(command, output);
        public int Check(CheckCommand command) => CheckVerb.Run(command, output);
        public int Interpolate(InterpolateCommand command) => ModelVerbs.Interpolate(command, output);
        public int Export(ExportCommand command) => ModelVerbs.Export(command, output);
        public int Experiment(ExperimentCommand command) => ExperimentVerb.Run(command, output);
    }

    /// <summary>A message on one line: line breaks become "; ".</summary>
    static string OneLine(string message) =>
        string.Join("; ", message.Split(['\r', '\n'], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
}
