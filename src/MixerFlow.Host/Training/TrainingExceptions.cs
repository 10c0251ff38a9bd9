namespace MixerFlow.Host.Training;

/// <summary>
/// <see cref="Trainer.Run(CancellationToken)"/> was cancelled: the step in progress was finished,
/// last.ckpt was saved at <see cref="Step"/> (atomically) and the run can be continued with
/// <c>Resume = true</c> (<c>mixerflow train --resume DIR</c>). The command line exits with 130 after
/// Ctrl-C (SIGINT) and 143 after SIGTERM.
/// </summary>
public sealed class TrainingInterruptedException(long step, string checkpoint, string runFolder, CancellationToken token)
    : OperationCanceledException($"training interrupted at step {step}; saved {checkpoint}", token)
{
    /// <summary>Steps taken when the run stopped (the step saved in <see cref="Checkpoint"/>).</summary>
    public long Step { get; } = step;
    /// <summary>The last.ckpt written at <see cref="Step"/>.</summary>
    public string Checkpoint { get; } = checkpoint;
    /// <summary>The run folder to resume.</summary>
    public string RunFolder { get; } = runFolder;
}

/// <summary>
/// The run kept going bad (non-finite or divergent losses, see <see cref="DivergenceGuard"/>) after
/// <see cref="TrainingSettings.MaxRollbacks"/> rollbacks, each at half the learning rate. Nothing
/// after the last checkpoint was kept: best.ckpt and summary.json are not written by the failed
/// run. The command line prints the message and exits with code 2.
/// </summary>
public sealed class TrainingDivergedException(string message, long step, int rollbacks) : Exception(message)
{
    /// <summary>The step at which the run gave up.</summary>
    public long Step { get; } = step;
    /// <summary>Rollbacks made before giving up.</summary>
    public int Rollbacks { get; } = rollbacks;
}
