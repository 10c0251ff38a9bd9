using MixerFlow.Core;
using MixerFlow.Core.Runtime;
using MixerFlow.Host;
using MixerFlow.Host.Training;
using MixerFlow.CommandLine;
using MixerFlow.Host.Models;

namespace MixerFlow.Cli.Verbs;

/// <summary>`info`: a model's configuration and parameter breakdown.</summary>
public static class InfoVerb
{
    public static int Run(InfoCommand options, TextWriter output)
    {
        var model = new ImageFlow(options.Model);
        Describe(model, output);
        output.WriteLine();
        output.WriteLine($"LibTorch: {TorchSharp.torch.get_num_threads()} threads, OpenMP wait policy {MixerFlowRuntime.OpenMpWaitPolicy}; MKL: {MixerFlowRuntime.MklOutcome}; " +
                         $"oneDNN convolutions {(NativeBackend.MkldnnEnabled ? "on" : "off")}" +
                         (model.Config is MixerFlowConfig { ConditionerPrecision: ConditionerPrecision.Bfloat16 }
                             ? " (on during the bfloat16 conditioners' products only)" : "") +
                         $"; {HugePages.Description}");
        output.WriteLine("Runtime (MixerFlowRuntime.Describe):");
        output.WriteLine(MixerFlowRuntime.Describe());
        int launched = MixerFlow.Host.Distributed.Communicator.LaunchedSize();
        output.WriteLine(launched > 1
            ? $"MPI: started by a launcher as {launched} processes; train runs data-parallel (docs/distributed.md)"
            : "MPI: not started by mpiexec; train runs as one process");
        if (options.TimeStep) TimeSteps(model, output);
        return 0;
    }

    /// <summary>Median wall time of a training step (batch 64) after two warm-up steps: the
    /// trainer's own <see cref="TrainingStep"/> (forward, backward, clipping, Adam).</summary>
    public static void TimeSteps(ImageFlow model, TextWriter output, int batch = 64, int steps = 11)
    {
        var c = model.Config;
        using var adam = new Adam(model.parameters(), 1e-4);
        var step = new TrainingStep(model, adam, clipNorm: new TrainingSettings().ClipNorm);
        model.train();
        var times = new List<double>();
        for (int i = 0; i < steps + 2; i++)
        {
            using var scope = TorchSharp.torch.NewDisposeScope();
            var x = TorchSharp.torch.randint(0, 256, new long[] { batch, c.Channels, c.Height, c.Width }).to_type(TorchSharp.torch.float32);
            var sw = System.Diagnostics.Stopwatch.StartNew();
            step.Take(x, 1e-4);
            if (i >= 2) times.Add(sw.Elapsed.TotalMilliseconds);
        }
        times.Sort();
        output.WriteLine($"training step at batch {batch}: {times[times.Count / 2]:0} ms (median of {steps}, {TorchSharp.torch.get_num_threads()} threads; " +
                         $"gradients: {step.GradientPathDescription})");
        if (step.LastPlan is { Islands.Count: > 0 } plan)
            foreach (var island in plan.Islands)
                output.WriteLine($"  autograd island: {island.Part} ({island.AutogradReason})");
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
