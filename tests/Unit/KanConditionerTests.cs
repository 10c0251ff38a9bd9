using MixerFlow.Core;
using MixerFlow.Host;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// MixerFlow with Kolmogorov-Arnold conditioners (<see cref="MixerFlowConfig.Conditioner"/>):
/// the configuration field (validation, defaults of older files, JSON), the built couplings, the
/// width that matches the perceptron's parameter count, and training through autograd.
/// </summary>
public class KanConditionerTests
{
    static MixerFlowConfig Tiny(params string[] set) => (MixerFlowConfig)ConfigOverrides.Apply(Presets.Get("tiny"), set);

    [Theory]
    [InlineData("conditioner=rbf", "conditioner must be one of mlp, kan")]
    [InlineData("conditioner=", "conditioner must be one of mlp, kan")]
    public void A_bad_conditioner_is_refused_naming_the_field_and_the_allowed_values(string assignment, string expected)
    {
        var e = Assert.Throws<UserError>(() => Tiny(assignment));
        Assert.Contains(expected, e.Message);
        Assert.StartsWith("--set", e.Message);
    }

    [Theory]
    [InlineData("conditioner=kan,channelFlow=maf", "conditioner: kan applies to coupling flows")]
    [InlineData("conditioner=kan,conditionerPrecision=bfloat16", "conditionerPrecision: bfloat16 applies to mlp conditioners only")]
    [InlineData("conditioner=kan,kanGrid=0", "kanGrid: must lie in [1, 256], got 0")]
    [InlineData("conditioner=kan,kanRange=0", "kanRange: must lie in (0, 10000], got 0")]
    public void Kan_settings_out_of_bounds_are_refused_by_name(string assignments, string expected)
    {
        var e = Assert.Throws<UserError>(() => Tiny(assignments.Split(',')));
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void A_configuration_without_the_field_reads_as_mlp_and_kan_round_trips()
    {
        var json = Presets.Get("tiny").ToJson();
        Assert.Contains("\"conditioner\": \"mlp\"", json);
        var old = string.Join('\n', json.Split('\n').Where(l => !l.Contains("\"conditioner\"") && !l.Contains("\"kanGrid\"") && !l.Contains("\"kanRange\"")));
        var read = (MixerFlowConfig)ModelConfig.FromJson(old, "old.json");
        Assert.Equal(ConditionerKind.Mlp, read.Conditioner);
        Assert.Equal(Presets.Get("tiny"), read);
        var kan = Tiny("conditioner=kan", "kanGrid=7");
        Assert.Equal(kan, ModelConfig.FromJson(kan.ToJson(), "kan.json"));
        Assert.Contains("\"conditioner\": \"kan\"", kan.ToJson());
    }

    [Fact]
    public void Kan_builds_kan_networks_in_every_channel_and_patch_mixing_coupling()
    {
        manual_seed(1);
        using var model = new ImageFlow(Tiny("conditioner=kan", "kanGrid=4"));
        var couplings = model.modules().OfType<Coupling>().ToList();
        Assert.NotEmpty(couplings);
        foreach (var c in couplings)
        {
            var net = Assert.IsType<KanNetwork>(c.Conditioner);
            Assert.All(net.Layers, l => Assert.Equal(4, l.Grid.Intervals));
        }
        using var mlp = new ImageFlow(Tiny());
        Assert.All(mlp.modules().OfType<Coupling>(), c => Assert.IsType<ReluNetwork>(c.Conditioner));
    }

    [Fact]
    public void The_conditioner_count_is_what_the_model_holds_and_the_matching_width_is_near_the_mlp_count()
    {
        foreach (var preset in new[] { "tiny", "fashion-mnist" })
        {
            var c = (MixerFlowConfig)Presets.Get(preset);
            foreach (var config in new[] { c, c with { Conditioner = ConditionerKind.Kan, HiddenWidth = 3 } })
            {
                using var model = new ImageFlow(config);
                long held = model.modules().OfType<Coupling>().Sum(k => k.Conditioner.parameters().Sum(p => p.numel()));
                Assert.Equal(held, ConditionerSizing.CouplingConditionerParameters(config));
            }
            int width = ConditionerSizing.KanWidthMatchingMlp(c);
            if (preset == "tiny") { Assert.Equal(2, width); continue; } // width 16: too coarse for 10%
            long mlpCount = ConditionerSizing.CouplingConditionerParameters(c);
            var kan = c with { Conditioner = ConditionerKind.Kan, HiddenWidth = width };
            double gap = Math.Abs(ConditionerSizing.CouplingConditionerParameters(kan) - mlpCount) / (double)mlpCount;
            Assert.True(gap < 0.1, $"{preset}: kan width {width} gives {ConditionerSizing.CouplingConditionerParameters(kan)} against the mlp's {mlpCount}");
            Assert.True(width < c.HiddenWidth);
            // The width the configuration guide and experiments/kan.json give.
            Assert.Equal(10, width);
        }
    }

    [Fact]
    public void A_kan_model_trains_under_autograd_and_says_so()
    {
        manual_seed(2);
        using var model = new ImageFlow(Tiny("conditioner=kan"));
        model.train();
        using var adam = new MixerFlow.Core.Adam(model.parameters(), 1e-3);
        var step = new TrainingStep(model, adam, clipNorm: 50.0);
        for (int i = 0; i < 4; i++)
        {
            using var scope = NewDisposeScope();
            var outcome = step.Take(full(new long[] { 8, 1, 28, 28 }, 128f).add(randint(-20, 20, new long[] { 8, 1, 28, 28 }).to_type(float32)), 1e-3);
            Assert.True(outcome.Kept, outcome.DroppedBecause);
        }
        Assert.Contains("autograd", step.GradientPathDescription);
        Assert.Contains("perceptron", step.GradientPathDescription);
    }
}
