using System.Globalization;
using MixerFlow.Host;
using MixerFlow.Host.Files;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;

namespace MixerFlow.Unit;

/// <summary>The time budget (TrainingSettings.MaxSeconds, an experiment's "seconds"): stopping, schedule, resume, results.</summary>
public class TimeBudgetTests
{
    /// <summary>A clock on which every reading is one second after the last: each timed step takes exactly one second.</summary>
    sealed class OneSecondPerReading : TimeProvider
    {
        long now;
        public override long TimestampFrequency => 1;
        public override long GetTimestamp() => now++;
    }

    sealed class StopAt(long step) : ITrainingObserver
    {
        public bool ShouldStop(long s) => s == step;
    }

    static TrainingSettings Options(string dir, double seconds, bool resume = false) => new()
    {
        Model = Presets.Get("tiny"), RunFolder = dir, Resume = resume, MaxSeconds = seconds,
        BatchSize = 16, LearningRate = 1e-3, WarmupSteps = 2, Seed = 7, CheckpointEvery = 3, Pictures = false,
    };

    static string TempDir() => Directory.CreateTempSubdirectory("mixerflow-budget-").FullName;

    static float[] Flat(ImageFlow m) =>
        m.parameters().SelectMany(p => p.detach().cpu().data<float>().ToArray()).ToArray();

    [Fact]
    public void A_time_budget_stops_the_run_which_evaluates_and_finishes_with_the_schedule_at_the_spent_share()
    {
        var dir = TempDir();
        try
        {
            var summary = new Trainer(Options(dir, 5)) { Clock = new OneSecondPerReading() }.Run();
            Assert.False(summary.StoppedEarly);
            Assert.Equal((5L, 5.0), (summary.Steps, summary.TrainingSeconds));
            Assert.True(double.IsFinite(summary.HeldOutBpd));
            Assert.NotNull(RunFolder.ReadSummary(dir));
            var rows = CsvLog.Read(Path.Combine(dir, RunFolder.MetricsFile));
            var last = rows.Last(r => r["heldout_bpd"] != "");
            Assert.Equal("5", last["step"]);
            // The last step (index 4) ran with 4 of 5 seconds spent: the cosine at 0.8, not at 4 / (10 epochs of steps).
            double expected = new LearningRateSchedule(1e-3, long.MaxValue, 2).At(4, 0.8);
            Assert.Equal(expected, double.Parse(last["lr"], CultureInfo.InvariantCulture), 1e-9);
            Assert.Equal(0, TrainingSettings.FromJson(File.ReadAllText(RunFolder.SettingsFile(dir))).Steps);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void With_steps_and_seconds_the_first_budget_reached_ends_the_run()
    {
        var dir = TempDir();
        try
        {
            var summary = new Trainer(Options(dir, 50) with { Steps = 4 }) { Clock = new OneSecondPerReading() }.Run();
            Assert.Equal((4L, 4.0), (summary.Steps, summary.TrainingSeconds));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_resumed_run_continues_with_the_seconds_left_and_ends_as_an_uninterrupted_one()
    {
        string a = TempDir(), b = TempDir();
        try
        {
            var whole = new Trainer(Options(a, 8)) { Clock = new OneSecondPerReading() };
            whole.Run();
            Assert.True(new Trainer(Options(b, 8), new StopAt(3)) { Clock = new OneSecondPerReading() }.Run().StoppedEarly);
            Assert.True(File.Exists(Path.Combine(b, RunOutput.BudgetFile)));
            var resumed = new Trainer(Options(b, 8, resume: true)) { Clock = new OneSecondPerReading() };
            var summary = resumed.Run();
            Assert.Equal((8L, 8.0), (summary.Steps, summary.TrainingSeconds));
            Assert.Equal(Flat(whole.Model!), Flat(resumed.Model!));
            // Finished: resuming again trains nothing.
            Assert.Equal(8L, new Trainer(Options(b, 8, resume: true)).Run().Steps);
        }
        finally { Directory.Delete(a, true); Directory.Delete(b, true); }
    }

    [Fact]
    public void A_resume_without_the_seconds_spent_is_refused_naming_the_file()
    {
        var dir = TempDir();
        try
        {
            new Trainer(Options(dir, 8), new StopAt(3)) { Clock = new OneSecondPerReading() }.Run();
            File.Delete(Path.Combine(dir, RunOutput.BudgetFile));
            var e = Assert.Throws<UserError>(() => new Trainer(Options(dir, 8, resume: true)).Run());
            Assert.Contains(RunOutput.BudgetFile, e.Message);
            Assert.Contains("is missing", e.Message);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_resume_may_not_change_the_time_budget_or_the_permutation_nor_extend_a_timed_run_in_steps()
    {
        var saved = new TrainingSettings { MaxSeconds = 60, PixelPermutationSeed = 3 };
        var given = new TrainingSettings { RunFolder = "r", Resume = true, MaxSeconds = 60, PixelPermutationSeed = 3 };
        Assert.Equal(60, given.ForResume(saved).MaxSeconds);
        var e = Assert.Throws<UserError>(() => (given with { MaxSeconds = 90 }).ForResume(saved));
        Assert.Contains("maxSeconds: the run was started with 60, now given 90", e.Message);
        e = Assert.Throws<UserError>(() => (given with { PixelPermutationSeed = 4 }).ForResume(saved));
        Assert.Contains("pixelPermutationSeed: the run was started with 3, now given 4", e.Message);
        e = Assert.Throws<UserError>(() => (given with { ExtendSteps = 5 }).ForResume(saved));
        Assert.Contains("extendSteps: the run has a time budget", e.Message);
        Assert.DoesNotContain(nameof(TrainingSettings.MaxSeconds), TrainingSettings.Adjustable);
        Assert.DoesNotContain(nameof(TrainingSettings.PixelPermutationSeed), TrainingSettings.Adjustable);
    }

    [Fact]
    public void Settings_with_a_time_budget_need_no_steps_and_a_bad_budget_is_named()
    {
        Assert.Empty(new TrainingSettings { Epochs = 0, MaxSeconds = 10 }.Problems());
        Assert.Contains(new TrainingSettings { Epochs = 0 }.Problems(), p => p.StartsWith("epochs / steps / maxSeconds"));
        Assert.Contains(new TrainingSettings { MaxSeconds = -1 }.Problems(), p => p.StartsWith("maxSeconds: must be a finite number >= 0"));
        Assert.Contains(new TrainingSettings { PixelPermutationSeed = -1 }.Problems(), p => p.StartsWith("pixelPermutationSeed"));
    }

    [Fact]
    public void Train_takes_seconds_and_a_permutation_seed_and_a_resume_compares_them_only_when_given()
    {
        var t = Assert.IsType<MixerFlow.CommandLine.TrainCommand>(
            MixerFlow.CommandLine.CommandLine.Parse(["train", "--preset", "tiny", "--seconds", "90.5", "--permute-pixels", "4"]).Command);
        Assert.Equal((90.5, 4, 0L), (t.Settings.MaxSeconds, t.Settings.PixelPermutationSeed, t.Settings.Steps));
        var r = Assert.IsType<MixerFlow.CommandLine.TrainCommand>(
            MixerFlow.CommandLine.CommandLine.Parse(["train", "--resume", "somewhere", "--seconds", "60"]).Command);
        Assert.Contains(nameof(TrainingSettings.MaxSeconds), r.Settings.Given!);
        Assert.DoesNotContain(nameof(TrainingSettings.PixelPermutationSeed), r.Settings.Given!);
    }

    /// <summary>Rank 1 of 2, whose allreduce adds rank 0's seconds (what MPI would give it).</summary>
    sealed class SecondRank(double rootSeconds) : MixerFlow.Host.Distributed.ICommunicator
    {
        public int Rank => 1;
        public int Size => 2;
        public string Description => "a fake second rank";
        public void AllReduceSum(Span<double> values) => values[0] += rootSeconds;
        public void AllReduceSum(TorchSharp.torch.Tensor tensor) => throw new NotSupportedException();
        public bool Any(bool mine) => throw new NotSupportedException();
        public byte[] Broadcast(byte[]? fromRoot) => throw new NotSupportedException();
        public byte[]? ShareFromRoot(Func<byte[]>? make) => throw new NotSupportedException();
        public void Barrier() { }
        public (int Start, int Count) ShareOf(int count) => (0, count);
        public int DefaultThreads => 1;
        public TorchSharp.torch.Device DeviceFor(TorchSharp.torch.Device device) => device;
        public void Abort(int exitCode) { }
    }

    [Fact]
    public void Every_rank_takes_rank_0s_seconds_so_schedule_and_stop_agree()
    {
        var budget = new TrainingBudget(10, long.MaxValue, 0, new OneSecondPerReading());
        budget.Time(() => 0);
        Assert.Equal(1.0, budget.UsedSeconds);
        budget.Agree(new SecondRank(rootSeconds: 10));
        Assert.Equal(10.0, budget.UsedSeconds);
        Assert.True(budget.TimeSpent);
        Assert.Equal(1.0, budget.Progress(1));
        // Without a time budget nothing is exchanged (the fake's seconds would show).
        var steps = new TrainingBudget(0, 100, 0, new OneSecondPerReading());
        steps.Agree(new SecondRank(rootSeconds: 10));
        Assert.Equal((0.0, false, 0.5), (steps.UsedSeconds, steps.TimeSpent, steps.Progress(50)));
    }

    [Fact]
    public void The_schedule_follows_the_larger_of_the_step_and_time_shares()
    {
        var s = new LearningRateSchedule(1.0, 100, 0);
        Assert.Equal(s.At(50), s.At(50, 0.5), 12);
        Assert.Equal(0.1, s.At(10, 1.0), 12);
        Assert.Equal(1.0, s.At(10, 0.0), 12);
    }
}
