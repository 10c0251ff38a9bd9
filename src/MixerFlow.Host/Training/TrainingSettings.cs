using System.Text.Json;
using System.Text.Json.Serialization;
using MixerFlow.Host.Models;

namespace MixerFlow.Host.Training;

/// <summary>
/// Everything a training run needs besides the model: what to train on, for how long, and how.
/// Immutable; derive variants with <c>with</c>. The command line maps its options onto this record,
/// and library users build one directly.
/// A run saves its resolved settings (without <see cref="Model"/>, <see cref="RunFolder"/>,
/// <see cref="Resume"/>, <see cref="ExtendSteps"/> and <see cref="Given"/>) as settings.json in the
/// run folder; a resumed run continues under those, see <see cref="ForResume"/>.
/// </summary>
public sealed record TrainingSettings
{
    /// <summary>The model to train. Ignored when resuming: the checkpoint carries its configuration.</summary>
    [JsonIgnore]
    public ModelConfig Model { get; init; } = Presets.Get(Presets.Default);

    /// <summary>A data file or folder (IDX, CIFAR-10 batches, PNG/JPEG folder); null for the bundled Fashion-MNIST test split.</summary>
    public string? Data { get; init; }

    /// <summary>
    /// The run folder; null for <c>runs/&lt;model&gt;-&lt;time&gt;</c>. A fresh run needs a new or empty
    /// folder: one that holds a run is refused (continue it with <see cref="Resume"/>).
    /// </summary>
    [JsonIgnore]
    public string? RunFolder { get; init; }

    /// <summary>
    /// Continue the run in <see cref="RunFolder"/> from its last checkpoint, under the folder's
    /// settings.json; a folder without it, or whose checkpoint is of another model than its
    /// config.json, is refused.
    /// </summary>
    [JsonIgnore]
    public bool Resume { get; init; }

    /// <summary>
    /// When resuming: steps to add to the saved total (which is otherwise kept). The cosine
    /// learning-rate schedule then follows the new total, so the learning rate at the resumed step
    /// jumps up to where the longer schedule has it; the extended total is saved for later resumes.
    /// </summary>
    [JsonIgnore]
    public long ExtendSteps { get; init; }

    /// <summary>
    /// The names of the properties the caller set on purpose (for example "Steps", "BatchSize"), as
    /// the command line fills it from the options typed; null means every property counts as given.
    /// When resuming, a given setting that differs from the saved one is refused.
    /// </summary>
    [JsonIgnore]
    public IReadOnlySet<string>? Given { get; init; }

    /// <summary>Passes over the training images; used when <see cref="Steps"/> is 0.</summary>
    public int Epochs { get; init; } = 10;

    /// <summary>Optimiser steps; 0 means <see cref="Epochs"/> epochs.</summary>
    public long Steps { get; init; }

    /// <summary>
    /// Seconds of training steps the run may take; 0 for no time budget. The run stops after the
    /// step that spends it (or at <see cref="Steps"/>, whichever comes first), then evaluates and
    /// finishes as at its last step. Only the steps are timed (the batch, forward and backward
    /// passes, the optimiser step): evaluations, checkpoints and pictures are not counted. With a
    /// time budget and <see cref="Steps"/> 0 the steps are unbounded (<see cref="Epochs"/> is not
    /// used), and the cosine schedule follows the share of the budget spent (see
    /// <see cref="TrainingBudget"/>). Decides what the run computes: a resume may not change it, and
    /// continues with the seconds left (saved beside last.ckpt as budget.json).
    /// </summary>
    public double MaxSeconds { get; init; }

    /// <summary>
    /// The seed of one fixed random permutation of the images' H x W pixel positions, applied to the
    /// training, held-out and test images alike (<see cref="Data.PixelPermutation"/>); 0 for none.
    /// Saved in settings.json, so <c>eval</c>, <c>sample</c> and <c>embed</c> on the run's checkpoints
    /// permute their data and un-permute their pictures. Decides what the run computes: a resume may
    /// not change it.
    /// </summary>
    public int PixelPermutationSeed { get; init; }

    /// <summary>
    /// Images of the training split held out as a validation set (chosen by a shuffle seeded with
    /// <see cref="Seed"/>, never trained on; the same images in every process and after a resume);
    /// 0 for none. With a validation set, the evaluations during training (at step 0 and at every
    /// epoch's end) score it, best.ckpt is the checkpoint with the best validation bits/dim, and the
    /// held-out (test) split is scored only at the end, for the last and the best checkpoint: the
    /// choice of best.ckpt never reads a test score. Decides what the run computes: a resume may not change it.
    /// </summary>
    public int ValidationImages { get; init; }

    /// <summary>
    /// The decay of an exponential moving average of the parameters (<see cref="MixerFlow.Core.WeightAverage"/>),
    /// updated after every optimiser step; 0 for none. With an average, evaluations, pictures and the
    /// checkpoints' model tensors use the averaged parameters, and each checkpoint also holds the trained
    /// ones, so a resume continues both. For example 0.999 (about the last 1,000 steps). Decides what the
    /// run computes: a resume may not change it.
    /// </summary>
    public double EmaDecay { get; init; }

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

    /// <summary>LibTorch CPU threads; 0 keeps LibTorch's default; at most <see cref="MaxThreads"/>.</summary>
    public int Threads { get; init; }

    /// <summary>The most LibTorch CPU threads a run (or an experiment spec) may ask for.</summary>
    public const int MaxThreads = 1024;

    /// <summary>Steps between checkpoints (last.ckpt).</summary>
    public int CheckpointEvery { get; init; } = 200;

    /// <summary>Non-finite steps in a row after which the run rolls back to its last checkpoint.</summary>
    public int RollbackAfter { get; init; } = 5;

    /// <summary>
    /// Rollbacks a run may make; when it needs one more, it ends with a
    /// <see cref="TrainingDivergedException"/> (the learning rate is too high for the model).
    /// </summary>
    public int MaxRollbacks { get; init; } = 3;

    /// <summary>
    /// The processes that trained together (MPI ranks): <see cref="BatchSize"/> is per rank, so each
    /// step sees <see cref="GlobalBatchSize"/> images. Set by the <see cref="Trainer"/> from its
    /// communicator and saved in settings.json; a resume must use as many ranks.
    /// </summary>
    public int Ranks { get; init; } = 1;

    /// <summary>Images per optimiser step over all ranks: <see cref="BatchSize"/> x <see cref="Ranks"/>.</summary>
    public int GlobalBatchSize => BatchSize * Ranks;

    /// <summary>Write samples, reconstructions and the training curve into the run folder.</summary>
    public bool Pictures { get; init; } = true;

    /// <summary>Every problem with the settings, each naming the field.</summary>
    public IReadOnlyList<string> Problems()
    {
        var p = new List<string>();
        if (Epochs < 1 && Steps < 1 && MaxSeconds <= 0) p.Add($"epochs / steps / maxSeconds: one must be positive, got {Epochs} / {Steps} / {MaxSeconds}");
        if (!(MaxSeconds >= 0 && double.IsFinite(MaxSeconds))) p.Add($"maxSeconds: must be a finite number >= 0 (0: no time budget), got {MaxSeconds}");
        if (PixelPermutationSeed < 0) p.Add($"pixelPermutationSeed: must be >= 0 (0: no permutation), got {PixelPermutationSeed}");
        if (Steps < 0) p.Add($"steps: must be >= 0, got {Steps}");
        if (ValidationImages < 0) p.Add($"validationImages: must be >= 0 (0: no validation set), got {ValidationImages}");
        if (!(EmaDecay >= 0 && EmaDecay < 1)) p.Add($"emaDecay: must lie in [0, 1) (0: no weight average), got {EmaDecay}");
        if (BatchSize < 1) p.Add($"batchSize: must be >= 1, got {BatchSize}");
        if (!(LearningRate > 0 && LearningRate < 1)) p.Add($"learningRate: must lie in (0, 1), got {LearningRate}");
        if (WarmupSteps < 0) p.Add($"warmupSteps: must be >= 0, got {WarmupSteps}");
        if (!(ClipNorm > 0)) p.Add($"clipNorm: must be > 0, got {ClipNorm}");
        if (Device is not ("cpu" or "cuda")) p.Add($"device: must be cpu or cuda, got '{Device}'");
        if (Threads < 0 || Threads > MaxThreads) p.Add($"threads: must lie in [0, {MaxThreads}] (0: LibTorch's default), got {Threads}");
        if (Ranks < 1) p.Add($"ranks: must be >= 1, got {Ranks}");
        if (CheckpointEvery < 1) p.Add($"checkpointEvery: must be >= 1, got {CheckpointEvery}");
        if (RollbackAfter < 1) p.Add($"rollbackAfter: must be >= 1, got {RollbackAfter}");
        if (MaxRollbacks < 0) p.Add($"maxRollbacks: must be >= 0, got {MaxRollbacks}");
        if (ExtendSteps < 0) p.Add($"extendSteps: must be >= 0, got {ExtendSteps}");
        if (ExtendSteps > 0 && !Resume) p.Add("extendSteps: only extends a resumed run");
        if (Resume && RunFolder is null) p.Add("resume: needs the run folder to continue");
        if (RunFolder is null && !Files.SafeName.IsSafe(Model.Name))
            p.Add($"name: '{Model.Name}' would name the run folder under runs/, but a name must be {Files.SafeName.Rule}; " +
                  "set another with --set name=NAME, or choose the run folder with --out");
        if (RunFolder is not null && string.IsNullOrWhiteSpace(RunFolder)) p.Add("runFolder (--out / --resume): must not be empty");
        return p;
    }

    /// <summary>The settings every run starts from unless told otherwise (the command line's and the experiments' defaults).</summary>
    public static TrainingSettings Defaults { get; } = new();

    /// <summary>
    /// The properties that say how one call runs rather than what the run computes (not saved in
    /// settings.json): never compared with a saved run.
    /// </summary>
    public static readonly IReadOnlyList<string> PerCall = [nameof(Model), nameof(RunFolder), nameof(Resume), nameof(ExtendSteps), nameof(Given)];

    /// <summary>
    /// The settings a resumed run may change: where and how fast it computes, and whether it draws
    /// pictures. <see cref="MaxSeconds"/> and <see cref="PixelPermutationSeed"/> are not among them:
    /// the one sets the schedule, the other the data.
    /// </summary>
    public static readonly IReadOnlyList<string> Adjustable = [nameof(Device), nameof(Threads), nameof(Pictures)];

    /// <summary>
    /// Every setting whose value differs between <paramref name="saved"/> and <paramref name="now"/>,
    /// named (camelCase) with both values: every settable property is compared, a new one included
    /// (see <see cref="SettingDifference"/>). Filter with <see cref="PerCall"/> and <see cref="Adjustable"/>.
    /// </summary>
    public static IReadOnlyList<SettingDifference> Differences(TrainingSettings saved, TrainingSettings now) => SettingDifference.Of(saved, now);

    static readonly JsonSerializerOptions Json = new() { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase };

    /// <summary>settings.json's text (camelCase).</summary>
    public string ToJson() => JsonSerializer.Serialize(this, Json);

    /// <summary>Reads settings.json's text.</summary>
    public static TrainingSettings FromJson(string json) =>
        JsonSerializer.Deserialize<TrainingSettings>(json, Json) ?? throw new InvalidDataException("settings.json is empty");

    /// <summary>
    /// The settings a resumed run continues under: <paramref name="saved"/> (read from settings.json)
    /// with this run's folder, device, threads and pictures, and its total step count raised by
    /// <see cref="ExtendSteps"/>. A given setting that contradicts the saved one is a
    /// <see cref="UserError"/> naming the field and both values (Steps of 0 means "not given in steps").
    /// </summary>
    public TrainingSettings ForResume(TrainingSettings saved)
    {
        ArgumentNullException.ThrowIfNull(saved);
        // Ranks: the trainer checks them against its communicator, naming the fix.
        var ignored = PerCall.Concat(Adjustable).Append(nameof(Ranks))
            .Concat(Given is null ? [] : SettingDifference.SettingsFields.Where(f => !Given.Contains(f)))
            .Concat(Steps == 0 ? [nameof(Steps)] : []);
        var clashes = SettingDifference.Except(Differences(saved, this), ignored)
            .Select(d => $"{d.Field}: the run was started with {d.Saved}, now given {d.Now}").ToList();
        if (ExtendSteps > 0 && saved.MaxSeconds > 0)
            clashes.Add($"extendSteps: the run has a time budget ({saved.MaxSeconds} s of training steps), which --extend-steps does not extend");
        if (clashes.Count > 0)
            throw new UserError($"resume {RunFolder}: settings differ from the run's settings.json ({string.Join("; ", clashes)}); " +
                                "leave them out to continue as started, or use --extend-steps N to train N more steps");
        return saved with
        {
            Model = Model, RunFolder = RunFolder, Resume = true, ExtendSteps = 0, Given = null,
            Steps = saved.Steps + ExtendSteps, Device = Device, Threads = Threads, Pictures = Pictures,
        };
    }
}
