using MixerFlow.CommandLine;
using MixerFlow.Host.Training;

namespace MixerFlow.Cli.Verbs;

/// <summary>`experiment`: the library's <see cref="Experiment"/> on a spec file.</summary>
public static class ExperimentVerb
{
    public static int Run(ExperimentCommand options, TextWriter output)
    {
        if (MixerFlow.Host.Distributed.Communicator.LaunchedSize() > 1)
            throw new MixerFlow.Host.UserError("experiment runs in one process (its runs, results and pictures are written by it alone); " +
                                               "start it without mpiexec, or train single runs data-parallel with mpiexec -n N mixerflow train ...");
        var spec = ExperimentSpec.Load(options.Spec);
        var rows = new Experiment(spec, options.Out, output).Run();
        foreach (var r in rows)
            output.WriteLine($"{r.Run}: {r.Parameters:N0} parameters, test {r.TestBpd:0.0000} +- {r.TestStdErr:0.0000} bits/dim" +
                             (r.Seeds > 1 ? $" (seeds: sd {r.SeedSpread:0.0000} over {r.Seeds})" : "") +
                             (double.IsNaN(r.ProbeAccuracy) ? "" : $", linear probe {r.ProbeAccuracy:P1}"));
        return 0;
    }
}
