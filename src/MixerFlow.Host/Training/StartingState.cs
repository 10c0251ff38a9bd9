using MixerFlow.Core;
using MixerFlow.Host.Distributed;
using MixerFlow.Host.Models;

namespace MixerFlow.Host.Training;

/// <summary>
/// The model, optimiser and weight average (where the run averages its weights) a run starts from:
/// fresh, or from the run folder's last checkpoint. Rank 0 builds them and hands them to the others
/// as a checkpoint in memory (model tensors, optimiser and average state, step and best score); a
/// finished run is handed over without optimiser state, and the others then return its summary.
/// </summary>
internal sealed class StartingState : IDisposable
{
    public required ImageFlow Model { get; init; }
    public required Adam Optimizer { get; init; }
    /// <summary>The exponential moving average of the parameters (<see cref="TrainingSettings.EmaDecay"/>); null for none.</summary>
    public WeightAverage? Average { get; init; }
    /// <summary>The checkpoint a resumed run continues from; null for a fresh run.</summary>
    public Checkpoint.Header? Resumed { get; init; }
    /// <summary>The summary of a run that was already finished (not trained again); null otherwise.</summary>
    public TrainSummary? Finished { get; init; }

    public void Dispose()
    {
        ((IDisposable?)Average)?.Dispose();
        ((IDisposable)Optimizer).Dispose();
    }

    /// <summary>Builds (rank 0) or receives (the others) the starting state of <paramref name="run"/>.</summary>
    public static StartingState Build(RunSetup run, ICommunicator ranks)
    {
        if (!ranks.IsRoot) return Receive(run, ranks.ShareFromRoot(null)!);
        var state = OnRoot(run);
        var h = state.Resumed;
        ranks.ShareFromRoot(() => Checkpoint.ToBytes(state.Model, h?.Step ?? 0, h?.Epoch ?? 0,
            h?.BestHeldOutBpd ?? double.PositiveInfinity, state.Finished is not null ? null : state.Optimizer, state.Average));
        return state;
    }

    static StartingState OnRoot(RunSetup run)
    {
        var s = run.Settings;
        // Read once: configuration, then tensors.
        byte[]? fileBytes = run.ResumeFrom is not null ? Checkpoint.ReadBytes(run.ResumeFrom) : null;
        var config = fileBytes is not null ? Checkpoint.ReadConfig(fileBytes, run.ResumeFrom!) : s.Model;
        if (fileBytes is not null) RunFolder.CheckCheckpoint(run.RunPath, run.ResumeFrom!, config);
        var (model, adam, average) = Make(config, run);
        if (fileBytes is null) return new StartingState { Model = model, Optimizer = adam, Average = average };
        var resumed = Checkpoint.LoadInto(fileBytes, run.ResumeFrom!, model, adam, average);
        if (resumed.HasAverage != average is not null)
            throw new UserError($"resume {run.RunPath}: {run.ResumeFrom} {(resumed.HasAverage ? "holds" : "holds no")} weight average, but the run's " +
                                $"settings.json has emaDecay {s.EmaDecay}; the checkpoint is not this run's (train it afresh in a new folder)");
        // A finished run (its saved total reached, its summary written) is not trained again.
        // One with a time budget is finished once its summary is written.
        var finished = (s.Steps > 0 && resumed.Step >= s.Steps) || s.MaxSeconds > 0 ? RunFolder.ReadSummary(run.RunPath) : null;
        return new StartingState { Model = model, Optimizer = adam, Average = average, Resumed = resumed, Finished = finished };
    }

    static StartingState Receive(RunSetup run, byte[] state)
    {
        const string name = "rank 0's state";
        var (model, adam, average) = Make(Checkpoint.ReadConfig(state, name), run);
        var header = Checkpoint.LoadInto(state, name, model, adam, average);
        var finished = header.HasOptimizer ? null
            : RunFolder.ReadSummary(run.RunPath) ?? new TrainSummary(model.Config.Name, model.ParameterCount, 0, 0, double.NaN, double.NaN,
                double.NaN, double.NaN, 0, 0, 0, 0, "", run.RunPath, false);
        return new StartingState { Model = model, Optimizer = adam, Average = average, Resumed = run.Settings.Resume ? header : null, Finished = finished };
    }

    static (ImageFlow, Adam, WeightAverage?) Make(ModelConfig config, RunSetup run)
    {
        TrainingLimits.Check(config, run.Settings.BatchSize, run.ResumeFrom ?? $"model '{config.Name}'");
        var model = new ImageFlow(config);
        model.MoveTo(run.Device, TorchSharp.torch.float32);
        var adam = new Adam(model.parameters(), run.Settings.LearningRate);
        return (model, adam, run.Settings.EmaDecay > 0 ? new WeightAverage(adam, run.Settings.EmaDecay) : null);
    }
}
