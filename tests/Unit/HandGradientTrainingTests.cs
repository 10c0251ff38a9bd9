using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// Training steps with hand-written gradients (<see cref="HandGradient"/>) against autograd's: the
/// same losses and the same parameters after several steps from the same start (the first one
/// initialising ActNorm), and autograd for models the hand path does not cover (Glow) or when it
/// is switched off.
/// </summary>
public class HandGradientTrainingTests
{
    static (ImageFlow Model, TrainingStep Step) Setup(string preset, bool hand)
    {
        manual_seed(5);
        var model = new ImageFlow(Presets.Get(preset));
        model.train();
        var step = new TrainingStep(model, new MixerFlow.Core.Adam(model.parameters(), 5e-4), 50.0) { HandGradients = hand };
        return (model, step);
    }

    static Tensor[] Batches(int channels, int size)
    {
        var data = DatasetLoader.Load(null, channels, size, size, 0);
        // The same 32 images each step (with fresh dequantisation noise): ActNorm's per-entry
        // initialisation from one small batch fits it alone, and other images' losses would start
        // near 100 bits/dim, where float rounding grows from step to step.
        var batch = data.Train.Batch(Enumerable.Range(0, 32).ToArray());
        return Enumerable.Range(0, 4).Select(_ => batch).ToArray();
    }

    /// <summary>Takes a step on each batch with the same dequantisation noise; returns the losses and which path each took.</summary>
    static (double[] Losses, bool[] Hand) Train(TrainingStep step, Tensor[] batches)
    {
        var losses = new List<double>();
        var hand = new List<bool>();
        for (int i = 0; i < batches.Length; i++)
        {
            manual_seed(100 + i);
            var outcome = step.Take(batches[i], 5e-4);
            Assert.True(outcome.Kept, outcome.DroppedBecause);
            losses.Add(outcome.BitsPerDim);
            hand.Add(step.LastUsedHandGradients);
        }
        return (losses.ToArray(), hand.ToArray());
    }

    [Fact]
    public void MixerFlow_trains_with_hand_gradients_as_with_autograd()
    {
        var batches = Batches(1, 28);
        var (autoModel, autoStep) = Setup("tiny", hand: false);
        var (handModel, handStep) = Setup("tiny", hand: true);
        // The first step initialises ActNorm from the batch (on the hand path too).
        var (autoFirst, _) = Train(autoStep, batches.Take(1).ToArray());
        var (handFirst, handFirstPath) = Train(handStep, batches.Take(1).ToArray());
        Assert.True(handFirstPath[0], "the first step takes the hand path too");
        Assert.True(Math.Abs(autoFirst[0] - handFirst[0]) < 1e-5 * (1 + Math.Abs(autoFirst[0])));
        // Then both at the same random parameters, away from the identity the couplings start at
        // and from ActNorm's fit to this very batch (where some gradients are at rounding level).
        using (no_grad())
        {
            manual_seed(9);
            foreach (var ((_, a), (_, h)) in autoModel.named_parameters().Zip(handModel.named_parameters()))
            {
                a.add_(randn_like(a).mul_(Ops.Scalar(0.05)));
                h.copy_(a);
            }
        }
        var (autoSecond, _) = Train(autoStep, batches.Skip(1).Take(1).ToArray());
        var (handSecond, _) = Train(handStep, batches.Skip(1).Take(1).ToArray());
        Assert.True(Math.Abs(autoSecond[0] - handSecond[0]) < 1e-5 * (1 + Math.Abs(autoSecond[0])), $"loss {handSecond[0]} against autograd's {autoSecond[0]}");
        // That step's (clipped) gradients, which the optimiser's buffer still holds after its update.
        double overall = autoStep.Optimizer.GradientBuffer().abs().max().item<float>();
        handStep.Optimizer.GradientBuffer();
        int compared = 0;
        foreach (var ((name, a), (_, h)) in autoModel.named_parameters().Zip(handModel.named_parameters()))
        {
            double largest = a.grad!.abs().max().item<float>();
            double diff = (a.grad - h.grad!).abs().max().item<float>();
            // Float32 rounding: relative to the parameter's own gradient, with a floor of 1e-6 of the largest of all.
            Assert.True(diff <= 1e-4 * largest + 1e-6 * overall, $"{name}: gradients differ by {diff:G3} (largest {largest:G3}, of all {overall:G3})");
            if (largest > 1e-3 * overall) compared++;
        }
        int total = autoModel.parameters().Count();
        Assert.True(compared >= total / 2, $"only {compared} of {total} parameters have a gradient above 1e-3 of the largest");
        // And the same losses on the next steps (Adam's normalised updates turn rounding in small
        // gradients into differences of up to the learning rate, so parameters are not compared).
        var (autoLosses, autoPaths) = Train(autoStep, batches.Skip(2).ToArray());
        var (handLosses, handPaths) = Train(handStep, batches.Skip(2).ToArray());
        Assert.All(autoPaths, used => Assert.False(used));
        Assert.All(handPaths, used => Assert.True(used));
        for (int i = 0; i < autoLosses.Length; i++)
            Assert.True(Math.Abs(autoLosses[i] - handLosses[i]) < 1e-4 * (1 + Math.Abs(autoLosses[i])), $"step {i + 2}: loss {handLosses[i]} against autograd's {autoLosses[i]}");
    }

    [Fact]
    public void Glow_and_a_switched_off_step_take_autograd()
    {
        var (_, glowStep) = Setup("glow-tiny", hand: true);
        manual_seed(2);
        var glowBatches = Enumerable.Range(0, 2).Select(_ => randint(0, 256, new long[] { 16, 1, 8, 8 }).to(float32)).ToArray();
        var (_, glowPaths) = Train(glowStep, glowBatches);
        Assert.All(glowPaths, used => Assert.False(used));
        Assert.Contains("most parameters are in parts without a hand-written rule", glowStep.AutogradReason);
        var (_, step) = Setup("tiny", hand: false);
        var (_, paths) = Train(step, Batches(1, 28).Take(2).ToArray());
        Assert.All(paths, used => Assert.False(used));
        Assert.Contains("turned off", step.AutogradReason);
    }

    [Fact]
    public void A_loss_hook_is_applied_on_the_hand_path_as_on_autograd_s_and_called_once_per_step()
    {
        var batch = Batches(1, 28)[0];
        var (autoModel, autoStep) = Setup("tiny", hand: false);
        var (handModel, handStep) = Setup("tiny", hand: true);
        // Twice the loss plus a regulariser on the first parameter: the chain rule through the
        // hook on one side, autograd's graph of it on the other.
        int calls = 0;
        Func<Tensor, Tensor> Hook(TrainingStep step) => loss =>
        {
            calls++;
            return loss.mul(Ops.Scalar(2.0)).add(step.Optimizer.Parameters[0].square().sum(), Ops.Scalar(1e-2));
        };
        manual_seed(1);
        Assert.True(autoStep.Take(batch, 5e-4, Hook(autoStep)).Kept);
        manual_seed(1);
        Assert.True(handStep.Take(batch, 5e-4, Hook(handStep)).Kept);
        Assert.Equal(2, calls);
        Assert.Equal(GradientPath.HandWritten, handStep.LastGradientPath);
        Assert.Null(handStep.AutogradReason);
        var a = autoStep.Optimizer.GradientBuffer();
        var h = handStep.Optimizer.GradientBuffer();
        double largest = a.abs().max().item<float>();
        double diff = (a - h).abs().max().item<float>();
        Assert.True(diff <= 1e-4 * largest, $"gradients differ by {diff:G3} (largest {largest:G3})");
        // The regulariser's own gradient reached the first parameter on the hand path too.
        Assert.True(handStep.Optimizer.Parameters[0].grad!.abs().max().item<float>() > 0);
    }

    [Fact]
    public void Hand_autograd_and_hand_passes_run_one_after_the_other_on_one_model()
    {
        var batch = Batches(1, 28)[0];
        var (model, step) = Setup("tiny", hand: true);
        foreach (bool hand in new[] { true, false, true, false })
        {
            step.HandGradients = hand;
            manual_seed(3);
            var outcome = step.Take(batch, 5e-4);
            Assert.True(outcome.Kept, outcome.DroppedBecause);
            Assert.Equal(hand, step.LastUsedHandGradients);
        }
        // Sampling and evaluation after them (the index tables made under inference mode before).
        model.eval();
        using (no_grad()) Assert.True(double.IsFinite(model.BitsPerDim(batch).mean().item<float>()));
    }

    [Fact]
    public void Train_takes_the_hand_written_path_and_says_so()
    {
        var folder = Path.Combine(Path.GetTempPath(), "mixerflow-path-" + Guid.NewGuid().ToString("N"));
        try
        {
            var (code, output, error) = CliInProcess.Run("train", "--preset", "tiny", "--steps", "4", "--batch-size", "16", "--out", folder);
            Assert.True(code == 0, error);
            Assert.Contains("gradients: hand-written", output);
            var summary = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "summary.json")));
            Assert.Equal("hand-written", summary.RootElement.GetProperty("gradientPath").GetString());
        }
        finally { if (Directory.Exists(folder)) Directory.Delete(folder, true); }
    }

    [Fact]
    public void Train_says_why_it_takes_autograd()
    {
        var folder = Path.Combine(Path.GetTempPath(), "mixerflow-path-" + Guid.NewGuid().ToString("N"));
        try
        {
            var (code, output, error) = CliInProcess.Run("train", "--preset", "tiny", "--set", "channelFlow=maf", "--steps", "2", "--batch-size", "16", "--out", folder);
            Assert.True(code == 0, error);
            Assert.Contains("gradients: autograd (because most parameters are in parts without a hand-written rule", output);
            Assert.Contains("no hand-written rule for MaskedAutoregressive", output);
        }
        finally { if (Directory.Exists(folder)) Directory.Delete(folder, true); }
    }
}
