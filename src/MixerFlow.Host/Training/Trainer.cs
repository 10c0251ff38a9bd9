using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Distributed;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>
/// What a training run reports at the end (also written to summary.json). The held-out split is the
/// test split: <see cref="HeldOutBpd"/> scores the last model on it and <see cref="BestHeldOutBpd"/> best.ckpt.
/// </summary>
/// <param name="Model">The model configuration's name.</param>
/// <param name="Parameters">Its parameter count.</param>
/// <param name="Steps">Optimiser steps taken (a resumed run's earlier ones included).</param>
/// <param name="Epochs">Epochs begun.</param>
/// <param name="FinalTrainBpd">The last kept step's training bits/dim.</param>
/// <param name="HeldOutBpd">The last model's held-out (test) bits/dim.</param>
/// <param name="HeldOutStdErr">Its standard error.</param>
/// <param name="BestHeldOutBpd">best.ckpt's held-out (test) bits/dim. Without a validation set, the best held-out
/// score of the evaluations, which chose best.ckpt; with one, best.ckpt (chosen by validation) scored on the test split at the end.</param>
/// <param name="ImagesPerSecond">Training throughput at the last report (all ranks together).</param>
/// <param name="WallSeconds">Wall time of this process's part of the run.</param>
/// <param name="DroppedSteps">Steps dropped by the guards.</param>
/// <param name="Rollbacks">Rollbacks to the last checkpoint.</param>
/// <param name="Data">Where the images came from (and how they were split).</param>
/// <param name="RunFolder">The run folder.</param>
/// <param name="StoppedEarly">Whether the run stopped before its budget was spent (no summary.json is written then).</param>
/// <param name="GradientPath">How the last step took its gradients.</param>
/// <param name="TrainingSeconds">Seconds spent in training steps (evaluations, checkpoints and pictures not counted).</param>
/// <param name="ValidationImages">The training images held out for validation (0: none; then the validation fields are NaN and <see cref="BestStep"/> -1).</param>
/// <param name="ValidationBpd">The last model's validation bits/dim.</param>
/// <param name="BestValidationBpd">best.ckpt's validation bits/dim: the lowest of the run's validation scores.</param>
/// <param name="BestStep">best.ckpt's step (runs with a validation set).</param>
/// <param name="BestHeldOutStdErr">The standard error of <see cref="BestHeldOutBpd"/> (runs with a validation set).</param>
public sealed record TrainSummary(
    string Model, long Parameters, long Steps, int Epochs, double FinalTrainBpd, double HeldOutBpd,
    double HeldOutStdErr, double BestHeldOutBpd, double ImagesPerSecond, double WallSeconds,
    int DroppedSteps, int Rollbacks, string Data, string RunFolder, bool StoppedEarly, string GradientPath = "", double TrainingSeconds = 0,
    int ValidationImages = 0, double ValidationBpd = double.NaN, double BestValidationBpd = double.NaN, long BestStep = -1,
    double BestHeldOutStdErr = double.NaN);

/// <summary>
/// The training loop: Adam with a <see cref="LearningRateSchedule"/>, one guarded
/// <see cref="TrainingStep"/> per batch, held-out <see cref="Evaluation"/> after every epoch, and a
/// <see cref="RunFolder"/> with atomic checkpoints every N steps and at the best held-out score
/// (the best validation score where <see cref="TrainingSettings.ValidationImages"/> holds training
/// images out; then no held-out score decides anything). With <see cref="TrainingSettings.EmaDecay"/>
/// a <see cref="WeightAverage"/> of the parameters is what is evaluated, pictured and saved.
/// Seeded and reproducible: data order and dequantisation noise are functions of seed and step,
/// so a resumed run continues exactly as an uninterrupted one. A step whose loss or gradient is
/// not finite, or whose loss explodes against the recent kept ones (<see cref="DivergenceGuard"/>),
/// is dropped; <see cref="TrainingSettings.RollbackAfter"/> dropped steps in a row roll back to the
/// last checkpoint (a fresh run writes one at step 0) at half the learning rate, and a run that
/// needs more than <see cref="TrainingSettings.MaxRollbacks"/> rollbacks ends with a
/// <see cref="TrainingDivergedException"/>. <see cref="Run(CancellationToken)"/> stops cleanly when
/// cancelled, saving last.ckpt first (<see cref="TrainingInterruptedException"/>). A run that kept
/// no step at all (every loss non-finite) ends with a <see cref="TrainingDivergedException"/> that
/// names the model configuration as the likely cause. Before anything is made, a fresh run's folder
/// must hold no run (<see cref="RunFolder.CheckFresh"/>), a resumed one's settings.json, config.json
/// and checkpoint must agree (<see cref="RunFolder.ReadSettings"/>, <see cref="RunFolder.CheckCheckpoint"/>),
/// and the model must fit in memory (<see cref="TrainingLimits"/>).
/// </summary>
/// <remarks>
/// <b>Data-parallel.</b> Under MPI (<c>mpiexec -n N</c>; see <see cref="Communicator.FromEnvironment"/>)
/// N processes train one model: rank 0 resolves the settings and the model (fresh or resumed) and
/// hands its state to the others; every step takes a global batch of N x
/// <see cref="TrainingSettings.BatchSize"/> images from the epoch's order, of which each rank reads
/// its own slice with its slice of the dequantisation noise drawn for the whole global batch;
/// gradients are averaged with one allreduce over the flat buffer and the guards decide on the
/// averaged loss; ActNorm's data-dependent initialisation sees the whole first global batch;
/// held-out evaluation is sharded by batch and reduced; only rank 0 writes the run folder, reports
/// progress and saves checkpoints, and a rollback hands rank 0's restored state to the others. So
/// N ranks at batch B train the same model as one process at batch N x B with the same seed
/// (up to float32 rounding in the averaging), except for batch norm, whose statistics stay per rank.
/// An exception on one rank other than an interruption or divergence (which all ranks agree on)
/// leaves the other ranks waiting in a collective call: the application ends the job then
/// (<see cref="ICommunicator.Abort"/>; the command line does). The trainer writes nothing to the
/// console and never ends the process: it reports through its <see cref="ITrainingObserver"/> and
/// by exceptions.
/// </remarks>
public sealed class Trainer
{
    public const string LastCheckpoint = RunFolder.LastCheckpoint;
    public const string BestCheckpoint = RunFolder.BestCheckpoint;

    readonly TrainingSettings settings;
    readonly ITrainingObserver observer;
    readonly ICommunicator ranks;

    /// <summary>
    /// The model being trained (set once the run has been set up). After <see cref="Run(CancellationToken)"/>
    /// returns, with a weight average (<see cref="TrainingSettings.EmaDecay"/>), it holds the averaged parameters.
    /// </summary>
    public ImageFlow? Model { get; private set; }

    /// <summary>
    /// The images the run trained on (<see cref="DataSplits.Train"/>), held out and, where it holds
    /// training images out, validated with (<see cref="DataSplits.Validation"/>); set once
    /// <see cref="Run(CancellationToken)"/> has loaded them (null for a run that was already finished).
    /// </summary>
    public DataSplits? Data { get; private set; }

    /// <param name="settings">What to train and how.</param>
    /// <param name="observer">Progress and steering; on rank 0 only for the reports (start,
    /// progress, evaluations, messages), on every rank for <see cref="ITrainingObserver.TransformLoss"/>
    /// and <see cref="ITrainingObserver.ShouldStop"/> (a stop any rank asks for ends every rank at that step).</param>
    /// <param name="communicator">The ranks training together; null for
    /// <see cref="Communicator.FromEnvironment"/> (a single process unless started by mpiexec).</param>
    public Trainer(TrainingSettings settings, ITrainingObserver? observer = null, ICommunicator? communicator = null)
    {
        ArgumentNullException.ThrowIfNull(settings);
        NativeRuntime.EnsureLoaded();
        var problems = settings.Problems();
        if (problems.Count > 0) throw new UserError($"training settings: {string.Join("; ", problems)}");
        this.settings = settings;
        this.observer = observer ?? NullObserver.Instance;
        ranks = communicator ?? Communicator.FromEnvironment();
    }

    /// <summary>
    /// The clock that times the training steps against <see cref="TrainingSettings.MaxSeconds"/>
    /// (<see cref="TimeProvider.System"/> unless a test gives its own).
    /// </summary>
    public TimeProvider Clock { get; init; } = TimeProvider.System;

    /// <summary>The ranks this trainer trains with.</summary>
    public ICommunicator Ranks => ranks;

    /// <summary>The device named by <paramref name="name"/>; a clear error where CUDA is missing.</summary>
    public static Device ParseDevice(string name)
    {
        if (name == "cuda" && !cuda.is_available())
            throw new UserError("device cuda: no CUDA device is available (this build uses the CPU LibTorch; build with -p:TorchBackend=cuda on a CUDA machine)");
        if (name is not ("cpu" or "cuda")) throw new UserError($"device: must be cpu or cuda, got '{name}'");
        return name == "cuda" ? CUDA : CPU;
    }

    /// <summary>The order of the training images in an epoch: a function of seed and epoch only.</summary>
    public static int[] EpochOrder(int count, int seed, int epoch)
    {
        var order = Enumerable.Range(0, count).ToArray();
        // A fixed arithmetic mix: HashCode.Combine would be salted per process, and then neither
        // a rerun nor a resumed run in a new process would see the same order.
        new Random(unchecked(seed * 1_000_003 + epoch * 7_919 + 0x5EED)).Shuffle(order);
        return order;
    }

    /// <summary>Trains to the end; see <see cref="Run(CancellationToken)"/>.</summary>
    public TrainSummary Run() => Run(CancellationToken.None);

    /// <summary>
    /// Trains to the end and returns the summary (also written to summary.json). When
    /// <paramref name="cancellationToken"/> is cancelled, the step in progress is finished, last.ckpt
    /// is saved at the current step and a <see cref="TrainingInterruptedException"/> (an
    /// <see cref="OperationCanceledException"/>) is thrown; resuming the run folder continues from there.
    /// A run that keeps diverging throws <see cref="TrainingDivergedException"/>; invalid input or
    /// settings, a <see cref="UserError"/>. Under MPI, any other exception is this rank's alone:
    /// the caller ends the job (see the remarks).
    /// </summary>
    public TrainSummary Run(CancellationToken cancellationToken)
    {
        using var run = new TrainingRun(settings, observer, ranks, Clock);
        Model = run.Model;
        try { return run.Train(cancellationToken); }
        finally { Data = run.Data; }
    }
}
