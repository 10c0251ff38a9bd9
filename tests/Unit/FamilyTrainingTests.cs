using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// Every model family learns: 50 guarded training steps on the embedded Fashion-MNIST images with
/// finite loss throughout and a clear fall (MixerFlow with each inner flow and each
/// normalisation, and Glow). Glow's step-0 NaN (oneDNN's convolution reading uninitialised
/// channel padding) would fail here at once.
/// </summary>
public class FamilyTrainingTests(Xunit.Abstractions.ITestOutputHelper output)
{
    const int Steps = 50, Batch = 32;

    public static TheoryData<string> Families() =>
    [
        "mixerflow-affine-actnorm", "mixerflow-additive-actnorm", "mixerflow-spline-actnorm", "mixerflow-maf-actnorm",
        "mixerflow-affine-batchnorm", "mixerflow-spline-batchnorm", "mixerflow-bands-noshift", "glow",
    ];

    static ModelConfig Config(string family)
    {
        var tiny = Presets.MixerFlow("tiny");
        return family switch
        {
            "glow" => Presets.Glow("glow-fashion-mnist") with { Name = family, StepsPerLevel = 2, GlowWidth = 24 },
            "mixerflow-bands-noshift" => tiny with { Name = family, Patches = PatchStrategy.Bands, Shift = false },
            _ => family.Split('-') is [_, var inner, var norm]
                ? tiny with
                {
                    Name = family,
                    ChannelFlow = Enum.Parse<InnerFlow>(inner, ignoreCase: true),
                    Norm = norm == "batchnorm" ? Normalisation.BatchNorm : Normalisation.ActNorm,
                }
                : throw new ArgumentException(family),
        };
    }

    [Theory]
    [MemberData(nameof(Families))]
    public void Takes_50_steps_with_finite_falling_loss(string family)
    {
        var cfg = Config(family);
        manual_seed(11);
        var data = DatasetLoader.Load(null, cfg.Channels, cfg.Height, cfg.Width, seed: 3);
        using var model = new ImageFlow(cfg);
        model.train();
        using var adam = new Adam(model.parameters(), 2e-3);
        var step = new TrainingStep(model, adam, clipNorm: 50.0);
        var losses = new List<double>();
        for (int i = 0; i < Steps; i++)
        {
            var idx = Trainer.EpochOrder(data.Train.Count, 5, i / (data.Train.Count / Batch))
                .Skip(i % (data.Train.Count / Batch) * Batch).Take(Batch).ToArray();
            using var scope = NewDisposeScope();
            var outcome = step.Take(data.Train.Batch(idx), 2e-3);
            Assert.True(outcome.Kept, $"{family}: step {i} dropped ({outcome.DroppedBecause}, loss {outcome.BitsPerDim})");
            losses.Add(outcome.BitsPerDim);
        }
        Assert.All(losses, l => Assert.True(double.IsFinite(l)));
        double first = losses.Take(5).Average(), last = losses.TakeLast(5).Average();
        output.WriteLine($"{family}: {model.ParameterCount:N0} parameters; bits/dim {first:0.000} (first 5 steps) -> {last:0.000} (last 5)");
        Assert.True(last < first - 0.3,
            $"{family}: mean bits/dim of the first 5 steps {first:0.000}, of the last 5 {last:0.000}: not falling");
    }
}
