using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>Progress of a run, reported every few steps.</summary>
public sealed record StepReport(long Step, long TotalSteps, int Epoch, double TrainBitsPerDim, double LearningRate, double ImagesPerSecond, int DroppedSteps);

/// <summary>
/// An evaluation during training (after step 0 and at every epoch end): of the held-out split, or of
/// the validation images where the run holds some out (<see cref="Split"/>); <see cref="Best"/> when
/// it is the best so far, which best.ckpt then holds.
/// </summary>
public sealed record EvaluationReport(long Step, int Epoch, double BitsPerDim, double StdErr, bool Best)
{
    /// <summary>The split scored: "held-out", or "validation" (<see cref="TrainingSettings.ValidationImages"/>).</summary>
    public string Split { get; init; } = "held-out";

    /// <summary>With a validation set, the held-out (test) bits/dim scored beside it, for the record (best.ckpt is not chosen by it); null otherwise.</summary>
    public double? HeldOutBitsPerDim { get; init; }
}

/// <summary>
/// Watches (and may steer) a training run. Every member has a default that does nothing, so an
/// observer implements only what it needs: a progress display, a time budget, a logger.
/// </summary>
public interface ITrainingObserver
{
    /// <summary>The run is set up: model built or restored, data loaded.</summary>
    void OnStart(string runFolder, string model, long parameters, string data, long fromStep, long totalSteps) { }

    /// <summary>Every 10 steps and at the last one.</summary>
    void OnProgress(StepReport report) { }

    /// <summary>After each held-out evaluation.</summary>
    void OnEvaluation(EvaluationReport report) { }

    /// <summary>Events worth a line in a log: dropped steps, rollbacks, resumption.</summary>
    void OnMessage(string text) { }

    /// <summary>
    /// The loss of step <paramref name="step"/> before the backward pass; the returned tensor is
    /// what is minimised (add a regulariser here, or return the loss unchanged). Called once per
    /// step. On the hand-written gradient path the loss handed in is a leaf that requires a
    /// gradient: autograd differentiates what the hook makes of it, and the hand-written backward
    /// is scaled by that slope, so a hook never switches the fast path off.
    /// </summary>
    Tensor TransformLoss(long step, Tensor loss) => loss;

    /// <summary>
    /// Asked after every step (once its checkpoint, if due, is written): true ends the run there,
    /// as a crash or a deadline would; the summary then says it stopped early.
    /// </summary>
    bool ShouldStop(long step) => false;
}

/// <summary>An observer that does nothing.</summary>
public sealed class NullObserver : ITrainingObserver
{
    public static readonly NullObserver Instance = new();
}

/// <summary>Writes an observer's messages and evaluations as plain lines.</summary>
public sealed class TextObserver(TextWriter log) : ITrainingObserver
{
    DateTime last = DateTime.MinValue;

    public void OnStart(string runFolder, string model, long parameters, string data, long fromStep, long totalSteps)
    {
        log.WriteLine($"data: {data}");
        log.WriteLine($"model: {model}, {parameters:N0} parameters; run folder {runFolder}");
    }

    public void OnProgress(StepReport r)
    {
        if ((DateTime.UtcNow - last).TotalSeconds < 5 && r.Step != r.TotalSteps) return;
        last = DateTime.UtcNow;
        log.WriteLine($"step {r.Step}/{r.TotalSteps}  {r.TrainBitsPerDim:0.000} bits/dim  {r.ImagesPerSecond:0} img/s");
    }

    public void OnEvaluation(EvaluationReport r) =>
        log.WriteLine(r.Step == 0
            ? $"step 0: {r.Split} {r.BitsPerDim:0.0000} +- {r.StdErr:0.0000} bits/dim{HeldOutBeside(r)}"
            : $"step {r.Step} (epoch {r.Epoch + 1}): {r.Split} {r.BitsPerDim:0.0000} +- {r.StdErr:0.0000} bits/dim{HeldOutBeside(r)}");

    static string HeldOutBeside(EvaluationReport r) => r.HeldOutBitsPerDim is double h ? $" (held-out {h:0.0000})" : "";

    public void OnMessage(string text) => log.WriteLine(text);
}
