using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// The training guards: a dropped step leaves the model's buffers (batch-norm running statistics)
/// as they were; a loss that explodes against the recent kept ones is dropped like a non-finite
/// one, and a run that keeps diverging ends with a clear error and no garbage summary.
/// </summary>
public class GuardTests
{
    static string TempDir() => Directory.CreateTempSubdirectory("mixerflow-guard-").FullName;

    static float[] Stats(ImageFlow model) =>
        model.modules().OfType<BatchNormFlow>()
            .SelectMany(b => b.RunningMean.cpu().data<float>().ToArray().Concat(b.RunningVar.cpu().data<float>().ToArray()))
            .ToArray();

    static (ImageFlow Model, TrainingStep Step, Tensor Batch) BatchNormSetup()
    {
        manual_seed(3);
        var config = (MixerFlowConfig)Presets.Get("tiny") with { Norm = Normalisation.BatchNorm };
        var model = new ImageFlow(config);
        model.train();
        var step = new TrainingStep(model, new MixerFlow.Core.Adam(model.parameters(), 1e-3), 50.0);
        var data = DatasetLoader.Load(null, 1, 28, 28, 0);
        var batch = data.Train.Batch(Enumerable.Range(0, 16).ToArray());
        return (model, step, batch);
    }

    [Theory]
    [InlineData("non-finite loss")]
    [InlineData("rejected loss")]
    public void A_dropped_step_leaves_batch_norm_running_statistics_unchanged_and_a_kept_one_updates_them(string how)
    {
        var (model, step, batch) = BatchNormSetup();
        var before = Stats(model);
        Assert.NotEmpty(before);
        var dropped = how == "non-finite loss"
            ? step.Take(batch, 1e-3, loss => loss * double.PositiveInfinity)
            : step.Take(batch, 1e-3, rejectLoss: _ => "rejected by the test");
        Assert.False(dropped.Kept);
        Assert.Equal(before, Stats(model));
        var kept = step.Take(batch, 1e-3);
        Assert.True(kept.Kept);
        var after = Stats(model);
        Assert.True(before.Zip(after, (x, y) => Math.Abs(x - y)).Max() > 1e-4, "a kept step moves the running statistics");
    }

    [Fact]
    public void A_step_reports_the_wall_time_of_its_phases_and_a_dropped_one_only_those_it_reached()
    {
        var (_, step, batch) = BatchNormSetup();
        var sw = System.Diagnostics.Stopwatch.StartNew();
        Assert.True(step.Take(batch, 1e-3).Kept);
        var total = sw.Elapsed;
        var p = step.LastPhases;
        Assert.True(p.Forward > TimeSpan.Zero && p.Backward > TimeSpan.Zero && p.Update > TimeSpan.Zero, $"{p}");
        Assert.True(p.Forward + p.Backward + p.Update <= total, $"{p} within {total}");
        // Rejected after the forward pass: no backward, no update.
        Assert.False(step.Take(batch, 1e-3, rejectLoss: _ => "rejected by the test").Kept);
        p = step.LastPhases;
        Assert.True(p.Forward > TimeSpan.Zero && p.Backward == TimeSpan.Zero && p.Update == TimeSpan.Zero, $"{p}");
        // A finite loss with a non-finite gradient (0 times sqrt's infinite slope at 0): forward and backward, no update.
        var outcome = step.Take(batch, 1e-3, loss => loss + (loss - loss.detach()).sqrt() * 0.0);
        Assert.Equal("non-finite gradient", outcome.DroppedBecause);
        p = step.LastPhases;
        Assert.True(p.Forward > TimeSpan.Zero && p.Backward > TimeSpan.Zero && p.Update == TimeSpan.Zero, $"{p}");
    }

    [Fact]
    public void A_batch_containing_NaN_is_dropped_without_touching_the_running_statistics()
    {
        var (model, step, batch) = BatchNormSetup();
        var before = Stats(model);
        var poisoned = batch.clone();
        poisoned[0, 0, 5, 5] = tensor(float.NaN);
        Assert.False(step.Take(poisoned, 1e-3).Kept);
        Assert.Equal(before, Stats(model));
        Assert.All(Stats(model), v => Assert.True(float.IsFinite(v)));
    }

    [Fact]
    public void The_divergence_rule_ignores_noise_and_the_initial_fall_and_flags_an_explosion()
    {
        var g = new DivergenceGuard();
        // Too little history: nothing is judged, however large.
        Assert.Null(g.Judge(1e9));
        // A fast fall with noise (losses measured in the first steps of a tiny run at batch 16
        // reach about 4x the running median; the rule allows 11x).
        double[] early = [6.4, 93.1, 37.8, 145.4, 32.7, 19.3, 139.1, 13.7, 24.0, 45.3, 37.6, 44.7, 61.1, 147.4, 26.2, 34.8];
        for (int i = 0; i < early.Length; i++)
        {
            if (i >= DivergenceGuard.MinimumHistory) Assert.Null(g.Judge(early[i]));
            g.Keep(i, early[i]);
        }
        for (int i = 0; i < 100; i++)
        {
            double loss = 8 - 2 * i / 100.0 + (i % 3) * 0.3;
            Assert.Null(g.Judge(loss));
            g.Keep(100 + i, loss);
        }
        // The measured explosion of a run at learning rate 0.3: 7.8, then 64 and 532.
        Assert.Null(g.Judge(7.8));
        Assert.Contains("divergent loss", g.Judge(532));
        // 64.1 (9x the median of about 7) is still allowed; it is the next steps' hundreds that are not.
        Assert.Null(g.Judge(64.1));
        Assert.NotNull(g.Judge(100));
        // After a rollback to step 150, the losses after it are forgotten.
        // The window holds the kept steps 150..199.
        g.ForgetAfter(150);
        Assert.Equal(1, g.Count);
        Assert.Null(g.Judge(1e9));
    }

    static TrainingSettings Tiny(string dir, int steps, double lr, int batch = 64) => new()
    {
        Model = Presets.Get("tiny"), RunFolder = dir, Steps = steps, BatchSize = batch, LearningRate = lr,
        Seed = 0, Pictures = false,
    };

    sealed class Log : ITrainingObserver
    {
        public List<string> Messages { get; } = [];
        public void OnMessage(string text) => Messages.Add(text);
    }

    [Fact]
    public void A_run_that_keeps_diverging_ends_with_an_error_and_leaves_no_garbage()
    {
        var dir = TempDir();
        try
        {
            var log = new Log();
            // lr 0.9 after 10 warmup steps: the loss jumps from a few to hundreds of bits/dim
            // within tens of steps, again after each rollback at half the rate, until the fourth
            // time. The trajectory is chaotic (float32 rounding decides the step of each
            // divergence), so the epoch is made long (batch 16: 562 steps) for the fourth
            // divergence to come well before its end, where a best checkpoint would be written.
            var e = Assert.Throws<TrainingDivergedException>(() => new Trainer(Tiny(dir, 2000, 0.9, batch: 16) with { WarmupSteps = 10 }, log).Run());
            Assert.Contains("training diverged", e.Message);
            Assert.Contains("lower --lr", e.Message);
            Assert.Equal(3, e.Rollbacks);
            Assert.Contains(log.Messages, m => m.Contains("divergent loss"));
            Assert.False(File.Exists(Path.Combine(dir, "summary.json")));
            Assert.False(File.Exists(Path.Combine(dir, Trainer.BestCheckpoint)));
            // The rollback target is clean: the untrained model written at step 0.
            var (model, header) = Checkpoint.Load(Path.Combine(dir, Trainer.LastCheckpoint));
            Assert.Equal(0, header.Step);
            Assert.All(model.parameters().SelectMany(p => p.cpu().data<float>().ToArray()), v => Assert.True(float.IsFinite(v)));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_normal_run_drops_no_step_as_divergent()
    {
        var dir = TempDir();
        try
        {
            var log = new Log();
            // Batch 16: the noisiest start (losses up to 4x their running median in the first steps).
            var summary = new Trainer(Tiny(dir, 300, 1e-3, batch: 16) with { Seed = 1 }, log).Run();
            Assert.Equal(0, summary.DroppedSteps);
            Assert.Equal(0, summary.Rollbacks);
            Assert.DoesNotContain(log.Messages, m => m.Contains("divergent"));
            Assert.True(File.Exists(Path.Combine(dir, "summary.json")));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void The_command_line_exits_non_zero_with_one_line_when_training_diverges()
    {
        var dir = TempDir();
        try
        {
            var (code, stdout, stderr) = MixerflowProcess.Run(TimeSpan.FromMinutes(5), "train", "--preset", "tiny", "--lr", "0.9", "--steps", "600",
                "--threads", "1", "--out", dir);
            Assert.True(code == 2, $"exit {code}\n{stdout}\n{stderr}");
            var line = Assert.Single(stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries));
            Assert.StartsWith("error: training diverged", line);
            Assert.False(File.Exists(Path.Combine(dir, "summary.json")));
        }
        finally { Directory.Delete(dir, true); }
    }
}
