using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// Training steps with hand-written gradients (<see cref="HandGradient"/>) against autograd's: the
/// same losses and the same parameters after several steps from the same start, the first step of
/// an ActNorm model through autograd (it initialises), and autograd for models the hand path does
/// not cover (Glow) or when it is switched off.
/// </summary>
public class HandGradientTrainingTests
{
    static (ImageFlow Model, TrainingStep Step) Setup(string preset, bool hand)
    {
        manual_seed(5);
        var model = new ImageFlow(Presets.Get(preset));
        model.train();
        var step = new TrainingStep(model, new MixerFlow.Core.Adam(model.parameters(), 2e-3), 50.0) { HandGradients = hand };
        return (model, step);
    }

    static Tensor[] Batches(int channels, int size)
    {
        var data = DatasetLoader.Load(null, channels, size, size, 0);
        return Enumerable.Range(0, 4).Select(i => data.Train.Batch(Enumerable.Range(16 * i, 16).ToArray())).ToArray();
    }

    /// <summary>Takes a step on each batch with the same dequantisation noise; returns the losses and which path each took.</summary>
    static (double[] Losses, bool[] Hand) Train(TrainingStep step, Tensor[] batches)
    {
        var losses = new List<double>();
        var hand = new List<bool>();
        for (int i = 0; i < batches.Length; i++)
        {
            manual_seed(100 + i);
            var outcome = step.Take(batches[i], 2e-3);
            Assert.True(outcome.Kept, outcome.DroppedBecause);
            losses.Add(outcome.BitsPerDim);
            hand.Add(step.LastUsedHandGradients);
        }
        return (losses.ToArray(), hand.ToArray());
    }

    [Fact]
    public void MixerFlow_trains_to_the_same_parameters_with_hand_gradients_as_with_autograd()
    {
        var batches = Batches(1, 28);
        var (autoModel, autoStep) = Setup("tiny", hand: false);
        var (handModel, handStep) = Setup("tiny", hand: true);
        var (autoLosses, autoPaths) = Train(autoStep, batches);
        var (handLosses, handPaths) = Train(handStep, batches);
        Assert.All(autoPaths, used => Assert.False(used));
        // The first step initialises ActNorm through autograd; the others take the hand path.
        Assert.Equal(new[] { false, true, true, true }, handPaths);
        for (int i = 0; i < autoLosses.Length; i++)
            Assert.True(Math.Abs(autoLosses[i] - handLosses[i]) < 1e-4, $"step {i}: loss {handLosses[i]} against autograd's {autoLosses[i]}");
        var moved = 0.0;
        foreach (var ((name, a), (_, h)) in autoModel.named_parameters().Zip(handModel.named_parameters()))
        {
            var scale = 1.0 + a.abs().max().item<float>();
            var diff = (a - h).abs().max().item<float>() / scale;
            Assert.True(diff < 1e-4, $"{name} differs by {diff:G3}");
        }
        using (no_grad())
        {
            manual_seed(5);
            using var fresh = new ImageFlow(Presets.Get("tiny"));
            foreach (var ((_, a), (_, f)) in autoModel.named_parameters().Zip(fresh.named_parameters()))
                moved = Math.Max(moved, (a - f).abs().max().item<float>());
        }
        Assert.True(moved > 1e-3, "training moved the parameters (the comparison is not between two untouched models)");
    }

    [Fact]
    public void Glow_and_a_switched_off_step_take_autograd()
    {
        var (_, glowStep) = Setup("glow-tiny", hand: true);
        manual_seed(2);
        var glowBatches = Enumerable.Range(0, 2).Select(_ => randint(0, 256, new long[] { 16, 1, 8, 8 }).to(float32)).ToArray();
        var (_, glowPaths) = Train(glowStep, glowBatches);
        Assert.All(glowPaths, used => Assert.False(used));
        var (_, step) = Setup("tiny", hand: false);
        var (_, paths) = Train(step, Batches(1, 28).Take(2).ToArray());
        Assert.All(paths, used => Assert.False(used));
    }
}
