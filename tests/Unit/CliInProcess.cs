namespace MixerFlow.Unit;

/// <summary>Runs the `mixerflow` entry point in this process, capturing its output and exit code.</summary>
static class CliInProcess
{
    public static (int Code, string Out, string Err) Run(params string[] args)
    {
        var (err, @out) = (new StringWriter(), new StringWriter());
        var (savedErr, savedOut) = (Console.Error, Console.Out);
        Console.SetError(err);
        Console.SetOut(@out);
        try { return (MixerFlow.Cli.Program.Main(args), @out.ToString(), err.ToString()); }
        finally { Console.SetError(savedErr); Console.SetOut(savedOut); }
    }
}
