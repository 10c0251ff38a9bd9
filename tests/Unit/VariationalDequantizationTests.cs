using MixerFlow.Core;
using MixerFlow.Host;
using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// Variational dequantisation as a model option (<see cref="ModelConfig.Dequantization"/>): the
/// configuration fields and their errors, the parameters it adds, gradients of every parameter on
/// the hand-written path (the dequantiser an autograd island) equal to autograd's, sampling that
/// ignores it, a training run and a checkpoint round trip.
/// </summary>
public class VariationalDequantizationTests
{
    static ModelConfig Tiny(int width = 8) =>
        Presets.Get("tiny").With([("dequantization", "variational"), ("dequantizationWidth", width.ToString())]);

    [Fact]
    public void Uniform_is_the_default_and_files_without_the_field_read_as_uniform()
    {
        foreach (var c in Presets.All.Values) Assert.Equal(DequantizationKind.Uniform, c.Dequantization);
        var old = ModelConfig.FromJson(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "data", "v1-tiny-config.json")), "v1");
        Assert.Equal(DequantizationKind.Uniform, old.Dequantization);
        Assert.IsNotType<VariationalDequantize>(new ImageFlow(old).Dequantize);
        // The field round-trips through JSON and --set.
        var v = Tiny();
        Assert.Contains("\"dequantization\": \"variational\"", v.ToJson());
        Assert.Equal(v, ModelConfig.FromJson(v.ToJson(), "round trip"));
        Assert.IsType<VariationalDequantize>(new ImageFlow(v).Dequantize);
    }

    [Theory]
    [InlineData("dequantization", "gaussian", "one of uniform, variational")]
    [InlineData("dequantizationLayers", "0", "dequantizationLayers: must lie in [1, 64], got 0")]
    [InlineData("dequantizationWidth", "0", "dequantizationWidth: must lie in [1, 4096], got 0")]
    public void A_bad_dequantization_field_is_refused_by_name(string key, string value, string expected)
    {
        var e = Assert.Throws<UserError>(() => Presets.Get("tiny").With([(key, value)]));
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void A_variational_model_counts_its_noise_flow_as_parameters_of_its_own_part()
    {
        var uniform = new ImageFlow(Presets.Get("tiny"));
        var variational = new ImageFlow(Tiny(8));
        var flow = ((VariationalDequantize)variational.Dequantize).Flow;
        long flowParameters = flow.parameters().Sum(p => p.numel());
        // Per coupling: 3x3 from 2 to 8 channels, 1x1 from 8 to 8, 3x3 from 8 to 2, with biases.
        Assert.Equal(4 * ((18 * 8 + 8) + (8 * 8 + 8) + (72 * 2 + 2)), flowParameters);
        Assert.Equal(uniform.ParameterCount + flowParameters, variational.ParameterCount);
        var breakdown = variational.ParameterBreakdown();
        Assert.Equal(("dequantisation (noise flow)", flowParameters), breakdown[0]);
        Assert.Equal(variational.ParameterCount, breakdown.Sum(b => b.Parameters));
        // Its state is saved under the dequantiser's name.
        Assert.Contains(variational.state_dict().Keys, k => k.StartsWith("transform.parts.0.flow.nets."));
    }

    /// <summary>
    /// At random parameters (noise flow and body), one step on the hand-written path and one on
    /// autograd's from the same parameters and noise: the same loss, every parameter's gradient
    /// non-zero and equal. The dequantiser runs as an autograd island inside the hand-written pass.
    /// </summary>
    [Fact]
    public void Training_on_the_hand_written_path_gives_every_parameter_autograd_s_gradient()
    {
        var data = DatasetLoader.Load(null, 1, 28, 28, 0);
        var batch = data.Train.Batch(Enumerable.Range(0, 16).ToArray());
        (ImageFlow, TrainingStep) Make(bool hand)
        {
            manual_seed(3);
            var m = new ImageFlow(Tiny());
            m.train();
            return (m, new TrainingStep(m, new MixerFlow.Core.Adam(m.parameters(), 1e-3), 1e6) { HandGradients = hand });
        }
        var (autoModel, autoStep) = Make(hand: false);
        var (handModel, handStep) = Make(hand: true);
        // A first step each (ActNorm's initialisation), then both at the same random parameters.
        manual_seed(4);
        Assert.True(autoStep.Take(batch, 1e-3).Kept);
        manual_seed(4);
        Assert.True(handStep.Take(batch, 1e-3).Kept);
        using (no_grad())
        {
            manual_seed(9);
            foreach (var ((_, a), (_, h)) in autoModel.named_parameters().Zip(handModel.named_parameters()))
            {
                a.add_(randn_like(a).mul_(Ops.Scalar(0.05)));
                h.copy_(a);
            }
        }
        manual_seed(5);
        var auto = autoStep.Take(batch, 1e-3);
        manual_seed(5);
        var handOutcome = handStep.Take(batch, 1e-3);
        Assert.Equal(GradientPath.Autograd, autoStep.LastGradientPath);
        Assert.Equal(GradientPath.HandWritten, handStep.LastGradientPath);
        Assert.Contains("autograd islands: VariationalDequantize: its noise flow q(u|x) has no hand-written rule", handStep.GradientPathDescription);
        Assert.True(Math.Abs(auto.BitsPerDim - handOutcome.BitsPerDim) < 1e-5 * (1 + Math.Abs(auto.BitsPerDim)),
            $"loss {handOutcome.BitsPerDim} against autograd's {auto.BitsPerDim}");
        double overall = autoStep.Optimizer.GradientBuffer().abs().max().item<float>();
        handStep.Optimizer.GradientBuffer();
        int flowParameters = 0;
        foreach (var ((name, a), (_, h)) in autoModel.named_parameters().Zip(handModel.named_parameters()))
        {
            Assert.True(h.grad is not null && h.grad.abs().max().item<float>() > 0, $"{name}: no gradient on the hand-written path");
            Assert.True(a.grad!.abs().max().item<float>() > 0, $"{name}: no gradient under autograd");
            double largest = a.grad.abs().max().item<float>();
            double diff = (a.grad - h.grad).abs().max().item<float>();
            Assert.True(diff <= 1e-4 * largest + 1e-6 * overall, $"{name}: gradients differ by {diff:G3} (largest {largest:G3})");
            if (name.StartsWith("transform.parts.0.flow.")) flowParameters++;
        }
        Assert.Equal(24, flowParameters);
    }

    [Fact]
    public void A_glow_model_takes_it_too_and_trains_its_noise_flow_under_autograd()
    {
        manual_seed(2);
        var model = new ImageFlow(Presets.Get("glow-tiny").With([("dequantization", "variational"), ("dequantizationWidth", "4")]));
        model.train();
        var step = new TrainingStep(model, new MixerFlow.Core.Adam(model.parameters(), 1e-3), 1e6);
        var batch = randint(0, 256, new long[] { 8, 1, 8, 8 }).to(float32);
        // Two steps: the first moves the couplings' zero-initialised last layers, the second reaches every parameter.
        for (int i = 0; i < 2; i++)
        {
            var outcome = step.Take(batch, 1e-3);
            Assert.True(outcome.Kept && double.IsFinite(outcome.BitsPerDim), outcome.DroppedBecause);
        }
        Assert.Equal(GradientPath.Autograd, step.LastGradientPath);
        var flowParameters = model.named_parameters().Where(p => p.name.StartsWith("transform.parts.0.flow.")).ToList();
        Assert.Equal(24, flowParameters.Count);
        foreach (var (name, p) in flowParameters)
            Assert.True(p.grad is not null && p.grad.abs().max().item<float>() > 0, $"{name}: no gradient");
    }

    [Fact]
    public void Samples_ignore_the_dequantiser()
    {
        manual_seed(1);
        var uniform = ModelTests.Randomised(Presets.Get("tiny"), 2);
        var variational = new ImageFlow(Tiny());
        using (no_grad())
        {
            // The same body; a noise flow far from the identity.
            var bodyState = uniform.state_dict();
            foreach (var (name, t) in variational.state_dict())
                if (bodyState.TryGetValue(name, out var same)) t.copy_(same);
                else t.add_(randn_like(t));
        }
        variational.eval();
        manual_seed(8);
        var a = uniform.Sample(4, 0.8);
        manual_seed(8);
        var b = variational.Sample(4, 0.8);
        Assert.Equal(0f, (a - b).abs().max().item<float>());
        // The latents (mid-bin dequantisation) agree too, and the likelihoods do not (q is not uniform).
        var x = ModelTests.RandomImages(3, uniform.Config);
        Assert.Equal(0f, (uniform.Encode(x) - variational.Encode(x)).abs().max().item<float>());
        var noise = rand(x.shape);
        uniform.Dequantize.Noise = variational.Dequantize.Noise = noise;
        using (no_grad()) Assert.True((uniform.LogLikelihood(x) - variational.LogLikelihood(x)).abs().min().item<float>() > 1e-3);
    }

    [Fact]
    public void A_short_training_run_gives_finite_bits_per_dim_and_its_checkpoint_scores_the_same_after_loading()
    {
        var dir = Directory.CreateTempSubdirectory("mixerflow-vardeq-").FullName;
        try
        {
            var settings = new TrainingSettings
            {
                Model = Presets.Get("tiny").With([("dequantization", "variational")]), RunFolder = dir, Steps = 8,
                BatchSize = 16, LearningRate = 1e-3, Seed = 7, CheckpointEvery = 4,
            };
            var summary = new Trainer(settings).Run();
            Assert.True(double.IsFinite(summary.HeldOutBpd), $"held-out {summary.HeldOutBpd}");
            Assert.True(double.IsFinite(summary.FinalTrainBpd));
            var (model, header) = Checkpoint.Load(Path.Combine(dir, Trainer.LastCheckpoint));
            Assert.Equal(8, header.Step);
            Assert.Equal(settings.Model, model.Config);
            // The run's held-out images (its data seed) and evaluation noise (the default seed).
            var data = DatasetLoader.Load(null, 1, 28, 28, settings.Seed);
            var (bpd, _) = Evaluation.BitsPerDim(model, data.HeldOut);
            Assert.Equal(summary.HeldOutBpd, bpd, 6);
            // And through a second file: every tensor, the noise flow's included, round-trips.
            var path = Path.Combine(dir, "again.ckpt");
            Checkpoint.Save(path, model, 8, 1, bpd);
            var (again, _) = Checkpoint.Load(path);
            foreach (var ((name, t), (_, u)) in model.state_dict().Zip(again.state_dict()))
                Assert.True(t.eq(u).all().item<bool>(), name);
        }
        finally { Directory.Delete(dir, true); }
    }
}
