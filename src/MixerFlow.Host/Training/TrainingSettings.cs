using MixerFlow.Host.Models;

namespace MixerFlow.Host.Training;

/// <summary>
/// Everything a training run needs besides the model: what to train on, for how long, and how.
/// Immutable; derive variants with <c>with</c>. The command line maps its options onto this record,
/// and library users build one directly.
/// </summary>
public sealed record TrainingSettings
{
    /// <summary>The model to train. Ignored when resuming: the checkpoint carries its configuration.</summary>
    public ModelConfig Model { get; init; } = Presets.Get(Presets.Default);

    /// <summary>A data file or folder (IDX, CIFAR-10 batches, PNG/JPEG folder); null for the bundled Fashion-MNIST test split.</summary>
    public string? Data { get; init; }

    /// <summary>The run folder; null for <c>runs/&lt;model&gt;-&lt;time&gt;</c>.</summary>
    public string? RunFolder { get; init; }

    /// <summary>Continue the run in <see cref="RunFolder"/> from its last checkpoint.</summary>
    public bool Resume { get; init; }

    /// <summary>Passes over the training images; used when <see cref="Steps"/> is 0.</summary>
    public int Epochs { get; init; } = 10;

    /// <summary>Optimiser steps; 0 means <see cref="Epochs"/> epochs.</summary>
    public long Steps { get; init; }

    /// <summary>Images per step.</summary>
    public int BatchSize { get; init; } = 64;

    /// <summary>Peak learning rate of Adam (reached after the warmup, then decayed by a cosine).</summary>
    public double LearningRate { get; init; } = 2e-3;

    /// <summary>Steps of linear learning-rate warmup.</summary>
    public int WarmupSteps { get; init; } = 100;

    /// <summary>Global gradient-norm clipping threshold.</summary>
    public double ClipNorm { get; init; } = 50.0;

    /// <summary>Seed of initialisation, data order and dequantisation noise.</summary>
    public int Seed { get; init; }

    /// <summary>"cpu" or "cuda".</summary>
    public string Device { get; init; } = "cpu";

    /// <summary>LibTorch CPU threads; 0 keeps LibTorch's default.</summary>
    public int Threads { get; init; }

    /// <summary>Steps between checkpoints (last.ckpt).</summary>
    public int CheckpointEvery { get; init; } = 200;

    /// <summary>Non-finite steps in a row after which the run rolls back to its last checkpoint.</summary>
    public int RollbackAfter { get; init; } = 5;

    /// <summary>Write samples, reconstructions and the training curve into the run folder.</summary>
    public bool Pictures { get; init; } = true;

    /// <summary>Every problem with the settings, each naming the field.</summary>
    public IReadOnlyList<string> Problems()
    {
        var p = new List<string>();
        if (Epochs < 1 && Steps < 1) p.Add($"epochs / steps: one must be positive, got {Epochs} / {Steps}");
        if (Steps < 0) p.Add($"steps: must be >= 0, got {Steps}");
        if (BatchSize < 1) p.Add($"batchSize: must be >= 1, got {BatchSize}");
        if (!(LearningRate > 0 && LearningRate < 1)) p.Add($"learningRate: must lie in (0, 1), got {LearningRate}");
        if (WarmupSteps < 0) p.Add($"warmupSteps: must be >= 0, got {WarmupSteps}");
        if (!(ClipNorm > 0)) p.Add($"clipNorm: must be > 0, got {ClipNorm}");
        if (Device is not ("cpu" or "cuda")) p.Add($"device: must be cpu or cuda, got '{Device}'");
        if (Threads < 0) p.Add($"threads: must be >= 0, got {Threads}");
        if (CheckpointEvery < 1) p.Add($"checkpointEvery: must be >= 1, got {CheckpointEvery}");
        if (RollbackAfter < 1) p.Add($"rollbackAfter: must be >= 1, got {RollbackAfter}");
        if (Resume && RunFolder is null) p.Add("resume: needs the run folder to continue");
        return p;
    }
}
