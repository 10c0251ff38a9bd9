using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using Adam = MixerFlow.Core.Adam;
using Parameter = TorchSharp.Modules.Parameter;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// The exponential moving average of the weights (<see cref="WeightAverage"/>, <see cref="TrainingSettings.EmaDecay"/>):
/// against an independent float64 recomputation, evaluated and saved as the averaged weights, and
/// continued exactly by a resume.
/// </summary>
public class TrainingWeightAverageTests
{
    static TrainingSettings Options(string dir, int steps, double decay, bool resume = false) => new()
    {
        Model = Presets.Get("tiny"), RunFolder = dir, Resume = resume, Steps = steps, BatchSize = 16, LearningRate = 1e-3,
        WarmupSteps = 0, Seed = 7, CheckpointEvery = 5, EmaDecay = decay, Pictures = false,
    };

    static string TempDir() => Directory.CreateTempSubdirectory("mixerflow-ema-").FullName;

    static double[] Flat(IEnumerable<Tensor> tensors) =>
        tensors.SelectMany(p => p.detach().cpu().to_type(float64).data<double>().ToArray()).ToArray();

    static double MaxDifference(double[] a, double[] b)
    {
        Assert.Equal(a.Length, b.Length);
        return a.Zip(b, (x, y) => Math.Abs(x - y)).Max();
    }

    sealed class StopAfter(long step) : ITrainingObserver
    {
        public bool ShouldStop(long s) => s == step;
    }

    /// <summary>
    /// Random parameters of several shapes, random gradients for a few Adam steps: the average after
    /// each step is e_1 = p_1, e_k = d e_(k-1) + (1 - d) p_k, recomputed in float64 from the parameters
    /// read after each step. The same recomputation at another decay is far off (the check can fail).
    /// </summary>
    [Fact]
    public void The_average_equals_an_independent_float64_recomputation_over_steps_with_randomised_parameters()
    {
        manual_seed(11);
        var ps = new[] { new Parameter(randn(3, 4)), new Parameter(randn(5)), new Parameter(randn(2, 2, 3)) };
        using var adam = new Adam(ps, 0.05);
        const double decay = 0.8;
        using var average = new WeightAverage(adam, decay);
        double[]? expected = null, wrong = null;
        for (int step = 0; step < 6; step++)
        {
            adam.ZeroGrad();
            foreach (var p in ps) p.grad!.copy_(randn_like(p));
            adam.Step();
            average.Update();
            var now = Flat(ps);
            expected = expected is null ? now : expected.Zip(now, (e, p) => decay * e + (1 - decay) * p).ToArray();
            wrong = wrong is null ? now : wrong.Zip(now, (e, p) => 0.7 * e + 0.3 * p).ToArray();
            Assert.True(MaxDifference(Flat([average.Values()]), expected) < 1e-6, $"step {step}");
        }
        Assert.Equal(6, average.Updates);
        Assert.True(MaxDifference(Flat([average.Values()]), wrong!) > 1e-3);
        Assert.True(MaxDifference(Flat(ps), expected!) > 1e-3, "the average differs from the parameters");

        // Applied: the parameters hold the average; disposed: the trained values come back bit for bit.
        var trained = Flat(ps);
        using (average.Apply())
        {
            Assert.True(MaxDifference(Flat(ps), expected!) < 1e-6);
            Assert.Throws<InvalidOperationException>(() => average.Update());
        }
        Assert.Equal(trained, Flat(ps));
    }

    /// <summary>
    /// A run with an average evaluates the averaged weights: its summary's held-out score is that of
    /// last.ckpt's model tensors (the averaged weights), not that of the trained weights the
    /// checkpoint also holds; and the trainer's model ends with the averaged weights.
    /// </summary>
    [Fact]
    public void Evaluation_and_checkpoints_with_an_average_use_the_averaged_weights()
    {
        var dir = TempDir();
        try
        {
            var trainer = new Trainer(Options(dir, 8, 0.9));
            var summary = trainer.Run();
            var heldOut = trainer.Data!.HeldOut;
            var last = Path.Combine(dir, Trainer.LastCheckpoint);

            var (averaged, header) = Checkpoint.Load(last);
            Assert.True(header.HasAverage);
            Assert.Equal(summary.HeldOutBpd, Evaluation.BitsPerDim(averaged, heldOut).Mean);
            Assert.Equal(Flat(averaged.parameters()), Flat(trainer.Model!.parameters()));

            // The trained weights, as a resume reads them: another model, another score.
            var raw = new ImageFlow(averaged.Config);
            using var adam = new Adam(raw.parameters(), 1e-3);
            using var average = new WeightAverage(adam, 0.9);
            Checkpoint.LoadInto(last, raw, adam, average);
            Assert.Equal(8, average.Updates);
            Assert.Equal(Flat(averaged.parameters()), Flat([average.Values()]));
            Assert.True(MaxDifference(Flat(raw.parameters()), Flat(averaged.parameters())) > 1e-4);
            Assert.NotEqual(summary.HeldOutBpd, Evaluation.BitsPerDim(raw, heldOut).Mean);
        }
        finally { Directory.Delete(dir, true); }
    }

    /// <summary>Stopped at step 5 and resumed to 12: the same average and the same trained weights as 12 steps in one go.</summary>
    [Fact]
    public void A_resumed_run_continues_the_average_exactly()
    {
        string a = TempDir(), b = TempDir();
        try
        {
            var whole = new Trainer(Options(a, 12, 0.9));
            whole.Run();
            Assert.True(new Trainer(Options(b, 12, 0.9), new StopAfter(5)).Run().StoppedEarly);
            var resumed = new Trainer(Options(b, 12, 0.9, resume: true));
            Assert.Equal(12, resumed.Run().Steps);
            Assert.Equal(Flat(whole.Model!.parameters()), Flat(resumed.Model!.parameters()));
            var (wholeRaw, wholeAverage) = TrainedAndAverage(Path.Combine(a, Trainer.LastCheckpoint));
            var (resumedRaw, resumedAverage) = TrainedAndAverage(Path.Combine(b, Trainer.LastCheckpoint));
            Assert.Equal(wholeRaw, resumedRaw);
            Assert.Equal(wholeAverage, resumedAverage);
            // The average is not the trained weights (so equal averages say something of their own).
            Assert.True(MaxDifference(wholeRaw, wholeAverage) > 1e-4);
        }
        finally { Directory.Delete(a, true); Directory.Delete(b, true); }
    }

    static (double[] Trained, double[] Average) TrainedAndAverage(string checkpoint)
    {
        var model = new ImageFlow(Checkpoint.ReadConfig(checkpoint));
        using var adam = new Adam(model.parameters(), 1e-3);
        using var average = new WeightAverage(adam, 0.9);
        Checkpoint.LoadInto(checkpoint, model, adam, average);
        return (Flat(model.parameters()), Flat([average.Values()]));
    }

    /// <summary>A resume that would change the decay is refused, naming the field; without a decay, checkpoints hold no average.</summary>
    [Fact]
    public void A_resume_may_not_change_the_decay_and_runs_without_one_save_no_average()
    {
        var dir = TempDir();
        try
        {
            new Trainer(Options(dir, 5, 0)).Run();
            Assert.False(Checkpoint.Load(Path.Combine(dir, Trainer.LastCheckpoint)).Header.HasAverage);
            var e = Assert.Throws<MixerFlow.Host.UserError>(() => new Trainer(Options(dir, 8, 0.99, resume: true)).Run());
            Assert.Contains("emaDecay: the run was started with 0, now given 0.99", e.Message);
        }
        finally { Directory.Delete(dir, true); }
    }
}
