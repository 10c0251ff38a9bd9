using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// Whether training reaches every parameter of the models a user trains: a few of the trainer's own
/// steps from the real initialisation move every trainable parameter of every preset (and of the
/// spline variants) and leave no row of a layer's weight identically zero, where a dead gradient
/// behind a zero-initialised last layer would hide; and an untrained spline model is the identity,
/// as an untrained affine one is.
/// </summary>
public class TrainingSignalTests
{
    public static TheoryData<string, string> Models() => new()
    {
        { "fashion-mnist", "" }, { "fashion-mnist-quality", "" }, { "cifar10", "" }, { "imagenet64", "" }, { "tiny", "" },
        { "glow-fashion-mnist", "" }, { "glow-cifar10", "" }, { "glow-tiny", "" },
        { "tiny", "channelFlow=spline,patchFlow=spline,splineBins=5" },
        { "fashion-mnist", "channelFlow=spline" },
        { "tiny", "channelFlow=maf" },
        { "tiny", "channelFlow=additive,norm=batchNorm" },
        { "tiny", "conditioner=kan" },
        { "tiny", "conditioner=kan,channelFlow=spline,patchFlow=additive" },
        { "tiny", "splitAfter=1" },
        { "fashion-mnist", "splitAfter=1,3" },
    };

    static ImageFlow Build(string preset, string set) =>
        // Assignments separated by commas; a comma not followed by "key=" belongs to a list (splitAfter=1,3).
        new(ConfigOverrides.Apply(Presets.Get(preset), set.Length == 0 ? [] : System.Text.RegularExpressions.Regex.Split(set, ",(?=[a-zA-Z]+=)")));

    static Tensor Pixels(ModelConfig c, int batch) =>
        randint(0, 256, new long[] { batch, c.Channels, c.Height, c.Width }).to_type(float32);

    [Fact]
    public void The_model_list_covers_every_preset() =>
        Assert.Equal(Presets.Names.OrderBy(n => n), Models().Select(row => (string)row[0]).Distinct().OrderBy(n => n));

    [Theory]
    [MemberData(nameof(Models))]
    public void A_few_training_steps_move_every_parameter_and_leave_no_weight_row_zero(string preset, string set)
    {
        manual_seed(7);
        var model = Build(preset, set);
        model.train();
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).ToArray();
        var before = trainable.Select(p => p.parameter.detach().clone()).ToArray();
        using var adam = new MixerFlow.Core.Adam(model.parameters(), 1e-3);
        var step = new TrainingStep(model, adam, clipNorm: 50.0);
        for (int i = 0; i < 3; i++)
        {
            using var scope = NewDisposeScope();
            var outcome = step.Take(Pixels(model.Config, 8), 1e-3);
            Assert.True(outcome.Kept, outcome.DroppedBecause);
        }
        using (no_grad())
        {
            for (int i = 0; i < trainable.Length; i++)
                Assert.True((trainable[i].parameter - before[i]).abs().max().item<float>() > 0,
                            $"{preset} {set}: {trainable[i].name} did not move in 3 steps ({step.GradientPathDescription})");
            foreach (var (name, module) in model.named_modules())
            {
                var weight = module switch { Linear l => l.weight, Conv2d c => c.weight, MixerFlow.Core.KanLayer k => k.Coefficients, _ => null };
                if (weight is null) continue;
                long zeroRows = weight.reshape(weight.shape[0], -1).abs().sum(1).eq(0).sum().item<long>();
                Assert.True(zeroRows == 0, $"{preset} {set}: {name}.weight has {zeroRows} rows that are still zero");
            }
        }
    }

    [Fact]
    public void An_untrained_spline_model_scores_what_the_identity_scores()
    {
        manual_seed(3);
        var x = Pixels(Presets.Get("tiny"), 32);
        double Score(string set)
        {
            manual_seed(4);
            var model = Build("tiny", set);
            model.eval();
            using var _ = no_grad();
            manual_seed(5); // the same dequantisation noise
            return model.BitsPerDim(x).mean().item<float>();
        }
        double affine = Score("channelFlow=affine,patchFlow=affine");
        double spline = Score("channelFlow=spline,patchFlow=spline");
        Assert.True(Math.Abs(spline - affine) < 1e-4, $"untrained spline model {spline} bits/dim, untrained affine (the identity) {affine}");
    }
}
