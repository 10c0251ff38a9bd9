using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;

namespace MixerFlow.Unit;

/// <summary>
/// Files written by earlier versions keep loading. data/v1-* were written by the command line at
/// commit 6844c9a (checkpoint version 1): `train --preset tiny --steps 3 --batch-size 8`, whose
/// `eval` printed 181.5730 +- 10.6246 bits/dim on the bundled held-out images.
/// </summary>
public class CompatibilityTests
{
    static string Data(string name) => Path.Combine(AppContext.BaseDirectory, "data", name);

    [Fact]
    public void A_version_1_checkpoint_loads_and_scores_what_it_scored_when_written()
    {
        var (model, header) = Checkpoint.Load(Data("v1-tiny-step3.ckpt"));
        Assert.Equal(3, header.Step);
        Assert.IsType<MixerFlowConfig>(model.Config);
        var data = DatasetLoader.Load(null, 1, 28, 28);
        var (bpd, se) = Evaluation.BitsPerDim(model, data.HeldOut);
        Assert.Equal(181.5730, bpd, 3);
        Assert.Equal(10.6246, se, 3);
    }

    /// <summary>
    /// data/v3-tiny-spline-step6.ckpt was written by the command line at commit 4c4897a (checkpoint
    /// version 3, spline knot derivatives softplus(u) + 1e-3): `train --preset tiny --set
    /// channelFlow=spline --set patchFlow=spline --set splineBins=5 --steps 6 --batch-size 16`, whose
    /// `eval` printed 53.9244 +- 4.2408 bits/dim on the bundled held-out images. Read without its
    /// conversion to the shifted derivatives, the same file scores 53.8232.
    /// </summary>
    [Fact]
    public void A_version_3_spline_checkpoint_is_converted_and_scores_what_it_scored_when_written()
    {
        var (model, header) = Checkpoint.Load(Data("v3-tiny-spline-step6.ckpt"));
        Assert.Equal(3, header.FileVersion);
        var data = DatasetLoader.Load(null, 1, 28, 28);
        var (bpd, se) = Evaluation.BitsPerDim(model, data.HeldOut);
        Assert.Equal(53.9244, bpd, 3);
        Assert.Equal(4.2408, se, 3);
    }

    [Theory]
    [InlineData("v1-tiny-config.json", ModelKind.MixerFlow, "tiny")]
    [InlineData("v1-glow-tiny-config.json", ModelKind.Glow, "glow-tiny")]
    public void A_version_1_config_parses_as_its_own_family_equal_to_the_preset(string file, ModelKind kind, string preset)
    {
        var c = ModelConfig.FromJson(File.ReadAllText(Data(file)), file);
        Assert.Equal(kind, c.Kind);
        Assert.Equal(Presets.Get(preset), c);
    }

    [Fact]
    public void A_configuration_round_trips_through_json_with_its_kind_first()
    {
        foreach (var c in Presets.All.Values)
        {
            var json = c.ToJson();
            Assert.StartsWith("{\n  \"kind\"", json.Replace("\r\n", "\n"));
            Assert.Equal(c, ModelConfig.FromJson(json, "test"));
        }
    }

    [Fact]
    public void A_mixerflow_configuration_does_not_carry_glow_fields()
    {
        var json = Presets.Get("cifar10").ToJson();
        Assert.DoesNotContain("levels", json);
        Assert.DoesNotContain("glowWidth", json);
        Assert.DoesNotContain("patchSize", Presets.Get("glow-cifar10").ToJson());
    }

    [Theory]
    [InlineData("tiny")]
    [InlineData("glow-tiny")]
    public void An_image_model_saves_each_tensor_once_under_its_registered_name(string preset)
    {
        var m = new ImageFlow(Presets.Get(preset));
        var state = m.state_dict();
        Assert.All(state.Keys, k => Assert.True(k.StartsWith("transform.parts.") || k.StartsWith("baseDistribution."), k));
        Assert.All(state.Keys, k => Assert.DoesNotContain("@", k));
        Assert.All(state.Keys, k => Assert.DoesNotContain("<", k));
        Assert.Equal(state.Count, state.Values.Select(t => t.Handle).Distinct().Count());
        Assert.Equal(m.parameters().Count(), m.named_parameters().Count());
    }

    [Fact]
    public void An_image_model_is_a_core_flow_whose_log_prob_is_its_log_likelihood()
    {
        TorchSharp.torch.manual_seed(3);
        MixerFlow.Core.Flow flow = new ImageFlow(Presets.Get("tiny"));
        var x = TorchSharp.torch.randint(0, 256, new long[] { 4, 1, 28, 28 }).to_type(TorchSharp.torch.float32);
        TorchSharp.torch.manual_seed(9);
        var viaFlow = flow.LogProb(x);
        TorchSharp.torch.manual_seed(9);
        var viaModel = ((ImageFlow)flow).LogLikelihood(x);
        Assert.Equal(0.0, (viaFlow - viaModel).abs().max().item<float>(), 6);
        var samples = flow.Sample(3, temperature: 0.7);
        Assert.Equal(new long[] { 3, 1, 28, 28 }, samples.shape);
        Assert.True(samples.min().item<float>() >= 0 && samples.max().item<float>() <= 255);
    }

    [Fact]
    public void A_class_conditional_mixerflow_scores_and_samples_by_class()
    {
        TorchSharp.torch.manual_seed(5);
        var m = new ImageFlow(Presets.MixerFlow("tiny") with { Classes = 3 });
        Assert.Equal(3, m.ContextFeatures);
        var x = TorchSharp.torch.randint(0, 256, new long[] { 2, 1, 28, 28 }).to_type(TorchSharp.torch.float32);
        m.train();
        using (TorchSharp.torch.no_grad())
        {
            m.BitsPerDim(x, m.OneHot(new[] { 0, 0 }));   // ActNorm's data initialisation
            foreach (var p in m.parameters()) p.add_(TorchSharp.torch.randn_like(p) * 0.05);
        }
        m.eval();
        TorchSharp.torch.manual_seed(1);
        var asClass0 = m.BitsPerDim(x, m.OneHot(new[] { 0, 0 }));
        TorchSharp.torch.manual_seed(1);
        var asClass2 = m.BitsPerDim(x, m.OneHot(new[] { 2, 2 }));
        Assert.True((asClass0 - asClass2).abs().max().item<float>() > 1e-4);
        Assert.ThrowsAny<ArgumentException>(() => m.BitsPerDim(x));   // a conditional model needs its class
        var samples = m.Sample(2, m.OneHot(new[] { 0, 1, 2 }), temperature: 0.5);
        Assert.Equal(new long[] { 6, 1, 28, 28 }, samples.shape);
        Assert.Throws<ArgumentOutOfRangeException>(() => m.OneHot(new[] { 3 }));
        Assert.Contains("\"classes\": 3", m.Config.ToJson());
    }
}
