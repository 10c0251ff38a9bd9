using System.Diagnostics;
using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Distributed;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>
/// One run of the <see cref="Trainer"/>: its loop (<see cref="Train"/>) sequences the collaborators
/// set up here: <see cref="RunSetup"/> (settings, threads, device), <see cref="StartingState"/>
/// (model, optimiser, weight average), the data (with its validation set, if any), <see cref="RunOutput"/> (run folder, checkpoints, pictures),
/// the <see cref="LearningRateSchedule"/>, <see cref="DivergenceGuard"/> and <see cref="DroppedSteps"/>
/// (rollbacks), <see cref="Evaluation"/> and the observer. Ranks differ only through the
/// <see cref="ICommunicator"/>.
/// </summary>
internal sealed partial class TrainingRun : IDisposable
{
    const int ReportEvery = 10;

    readonly TrainingSettings s;
    readonly RunSetup run;
    readonly ICommunicator ranks;
    readonly ITrainingObserver observer;
    /// <summary>The observer on the writing rank, nothing on the others: reports come from one rank.</summary>
    readonly ITrainingObserver report;
    readonly StartingState start;
    readonly ImageFlow model;
    readonly Stopwatch wall = Stopwatch.StartNew();
    readonly DivergenceGuard guard = new();
    readonly DroppedSteps drops;
    readonly TimeProvider clock;
    DataSplits data = null!;
    PixelPermutation? permutation;
    TrainingBudget budget = null!;
    RunOutput output = null!;
    LearningRateSchedule schedule = null!;
    TrainingStep trainingStep = null!;
    long step, totalSteps;
    int stepsPerEpoch;
    double best;

    public TrainingRun(TrainingSettings given, ITrainingObserver observer, ICommunicator ranks, TimeProvider clock)
    {
        this.clock = clock;
        this.ranks = ranks;
        this.observer = observer;
        report = ranks.IsWriter ? observer : NullObserver.Instance;
        run = RunSetup.Resolve(given, ranks);
        s = run.Settings;
        start = StartingState.Build(run, ranks);
        model = start.Model;
        drops = new DroppedSteps(s, model.Config.Name);
    }

    /// <summary>The model being trained.</summary>
    public ImageFlow Model => model;

    /// <summary>The run's images, once loaded (null before, and for a run that was already finished).</summary>
    public DataSplits? Data => data;

    /// <summary>Trains to the end (see <see cref="Trainer.Run(CancellationToken)"/>).</summary>
    public TrainSummary Train(CancellationToken cancellationToken)
    {
        if (start.Finished is { } finished)
        {
            start.Average?.Assign();
            report.OnMessage(s.MaxSeconds > 0
                ? $"run already finished at step {start.Resumed!.Step} (its budget of {s.MaxSeconds} s of training steps spent, or its steps)"
                : $"run already finished at step {start.Resumed!.Step}; use --extend-steps N to train N more steps");
            return finished;
        }
        Prepare();
        bool stoppedEarly = false;
        model.train();
        // Rank 0's clock decides (Agree): every rank follows the same schedule and stops at the same step.
        bool timeUp = budget.TimeSpent;
        while (step < totalSteps && !timeUp)
        {
            // A signal may reach the ranks at different steps: they stop together at the first step any of them saw it.
            if (ranks.Any(cancellationToken.IsCancellationRequested)) throw Interrupted(cancellationToken);
            int epoch = (int)(step / stepsPerEpoch);
            var batch = GlobalBatch(epoch);
            double lr = schedule.At(step, budget.Progress(step)) * drops.LearningRateScale;
            var outcome = budget.Time(() => TakeStep(batch, lr));
            budget.Agree(ranks);
            stepsTimed++;
            ReportGradientPath();
            if (!outcome.Kept)
            {
                bool rollBack = drops.Drop(outcome.DroppedBecause!);
                report.OnMessage($"step {step}: {outcome.DroppedBecause}, step dropped ({drops.Dropped} so far)");
                if (rollBack) RollBack();
                else step++;
                continue;
            }
            drops.Keep();
            guard.Keep(step, outcome.BitsPerDim);
            step++;
            Count(batch.Length, outcome.BitsPerDim);
            timeUp = budget.TimeSpent;
            bool last = step == totalSteps || timeUp;
            if (step % ReportEvery == 0 || last) ReportProgress(epoch, lr);
            if (step % s.CheckpointEvery == 0) SaveLast(epoch);
            if (step % stepsPerEpoch == 0 || last) EndEpoch(epoch, lr);
            if (ranks.Any(observer.ShouldStop(step))) { stoppedEarly = true; break; }
        }
        return Finish(stoppedEarly);
    }

    /// <summary>
    /// Loads the data (before the run folder is made: a failed load leaves no folder behind), opens
    /// the run folder, writes config.json and settings.json, and scores the untrained model.
    /// </summary>
    void Prepare()
    {
        var cfg = model.Config;
        permutation = PixelPermutation.Of(s.PixelPermutationSeed, cfg.Height, cfg.Width);
        data = DatasetLoader.Load(s.Data, cfg.Channels, cfg.Height, cfg.Width, s.Seed)
            .WithValidation(s.ValidationImages, s.Seed).Permuted(permutation);
        int globalBatch = s.GlobalBatchSize;
        if (globalBatch > data.Train.Count) throw BatchTooLarge(globalBatch);
        output = RunOutput.Open(run, ranks, model, start.Resumed, report, permutation);
        if (ranks.Size > 1)
            report.OnMessage($"data-parallel on {ranks.Size} MPI ranks ({ranks.Description}): batch {s.BatchSize} per rank, global batch {globalBatch}");
        stepsPerEpoch = Math.Max(1, data.Train.Count / globalBatch);
        totalSteps = s.Steps > 0 ? s.Steps : s.MaxSeconds > 0 ? long.MaxValue : (long)stepsPerEpoch * s.Epochs;
        output.WriteSettings(cfg, s, totalSteps == long.MaxValue ? 0 : totalSteps);
        schedule = new LearningRateSchedule(s.LearningRate, totalSteps, s.WarmupSteps);
        budget = new TrainingBudget(s.MaxSeconds, totalSteps, UsedSecondsAtStart(), clock);
        if (s.MaxSeconds > 0)
            report.OnMessage($"time budget: {s.MaxSeconds} s of training steps ({budget.UsedSeconds:0.#} s used)" +
                             (totalSteps == long.MaxValue ? "" : $", at most {totalSteps} steps"));
        trainingStep = new TrainingStep(model, start.Optimizer, s.ClipNorm, ranks);
        step = start.Resumed?.Step ?? 0;
        best = start.Resumed?.BestHeldOutBpd ?? double.PositiveInfinity;
        report.OnStart(output.Path, cfg.Name, model.ParameterCount, data.Description, step, budget.ReportedTotal(step, 0));
        if (start.Resumed is not null) return;
        // A rollback target from the start: a run that goes bad before its first checkpoint rolls
        // back to the untrained model, whose held-out score starts the curve.
        output.SaveLast(model, 0, 0, best, start.Optimizer, start.Average);
        var scores = Evaluate();
        output.Record(0, 0, null, scores.HeldOut, null, null, 0, scores.Validation);
        report.OnEvaluation(scores.Report(0, 0, false));
    }

    UserError BatchTooLarge(int globalBatch) => new(ranks.Size == 1
        ? $"batch size {s.BatchSize} is larger than the training set ({data.Train.Count} images: {data.Description}); " +
          $"use a batch size of at most {data.Train.Count}"
        : $"global batch {globalBatch} ({ranks.Size} ranks x batch {s.BatchSize}) is larger than the training set " +
          $"({data.Train.Count} images: {data.Description}); use a batch size of at most {data.Train.Count / ranks.Size} per rank");


    /// <summary>
    /// The seconds a resumed run under a time budget spent before its checkpoint (rank 0 reads
    /// budget.json and hands them on; a missing or mismatched file is refused): 0 for a fresh run.
    /// </summary>
    double UsedSecondsAtStart()
    {
        if (s.MaxSeconds <= 0 || start.Resumed is not { } resumed) return 0;
        var used = new[] { ranks.IsRoot ? RunOutput.ReadUsedSeconds(run.RunPath, resumed.Step, s.MaxSeconds) : 0.0 };
        ranks.AllReduceSum(used);
        return used[0];
    }

    /// <summary>last.ckpt, with the seconds spent so far where the run has a time budget.</summary>
    void SaveLast(int epoch)
    {
        output.SaveLast(model, step, epoch, best, start.Optimizer, start.Average);
        if (s.MaxSeconds > 0) output.SaveUsedSeconds(step, budget.UsedSeconds);
    }

    /// <summary>Between steps: the last one finished, so the state is whole; save it and stop.</summary>
    TrainingInterruptedException Interrupted(CancellationToken cancellationToken)
    {
        SaveLast((int)(Math.Max(0, step - 1) / stepsPerEpoch));
        return new TrainingInterruptedException(step, output.Last, output.Path,
            cancellationToken.IsCancellationRequested ? cancellationToken : new CancellationToken(true));
    }

    public void Dispose()
    {
        output?.Dispose();
        start.Dispose();
    }
}
