using MixerFlow.Core;
using MixerFlow.Checks;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>MixerFlow and Glow assembled in the host: checks, reconstruction, bits/dim, sharing, sizes.</summary>
public class ModelTests
{
    internal static Tensor RandomImages(int n, ModelConfig c) =>
        randint(0, 256, new long[] { n, c.Channels, c.Height, c.Width }).to_type(float32);

    /// <summary>Initialise ActNorm on data and perturb every parameter: not the identity any more.</summary>
    internal static ImageFlow Randomised(ModelConfig c, int seed, double noise = 0.02)
    {
        manual_seed(seed);
        var m = new ImageFlow(c);
        m.train();
        using (no_grad())
        {
            m.LogLikelihood(RandomImages(16, c));
            foreach (var p in m.parameters()) p.add_(randn_like(p) * noise);
        }
        m.eval();
        return m;
    }

    // The body (everything after dequantisation) is a bijection of (0,1)-valued images: run the
    // Core property checks on it. The full flow (with the surjective dequantisation) gets the
    // gradient check.
    static BijectorSpec BodySpec(string preset) => new(preset + "-body", _ =>
    {
        var m = new ImageFlow(Presets.Get(preset));
        return m.Body;
    }, (b, n) => rand(new[] { n }.Concat(b.InputShape).ToArray()) * 0.98 + 0.01);

    [Theory]
    [InlineData("tiny")]
    [InlineData("glow-tiny")]
    public void Core_checks_pass_on_the_tiny_models(string preset)
    {
        var spec = BodySpec(preset);
        var o = CheckOptions.Float64.WithCases(2);
        foreach (var kind in new[] { CheckKind.Inverse, CheckKind.LogDet, CheckKind.InverseLogDet, CheckKind.Independence, CheckKind.Gradients, CheckKind.SaveLoad })
        {
            var r = BijectorChecks.Run(spec, kind, o);
            Assert.True(r.Passed, $"{kind}: {r.Message}");
        }
        var flow = new BijectorSpec(preset + "-flow", _ => new ImageFlow(Presets.Get(preset)).Transform,
            (b, n) => randint(0, 256, new[] { n }.Concat(b.InputShape).ToArray()).to_type(float32));
        Assert.True(BijectorChecks.Run(flow, CheckKind.Gradients, o).Passed);
    }

    [Theory]
    [InlineData("fashion-mnist")]
    [InlineData("cifar10")]
    [InlineData("glow-fashion-mnist")]
    public void Full_presets_reconstruct_random_images_within_a_thousandth_of_a_pixel(string preset)
    {
        var c = Presets.Get(preset);
        var m = Randomised(c, 3);
        var x = RandomImages(4, c);
        double err = m.ReconstructionError(x);
        Assert.InRange(err, 0, 1e-3);
        // Randomised means not the identity: the latent differs from the logit of the input.
        var z = m.Encode(x);
        Assert.True((z - new Logit(c.ImageShape, c.Alpha).Forward((x + 0.5) / 256).Value).abs().max().item<float>() > 1e-2);
        // And rounding gives back the exact pixels.
        Assert.Equal(0f, (m.Reconstruct(x) - x).abs().max().item<float>());
    }

    [Fact]
    public void Bits_per_dim_matches_a_hand_computation_for_the_identity_body()
    {
        // A new tiny MixerFlow in evaluation mode is the identity after its logit: ActNorm
        // is not initialised and every coupling's last layer is zero.
        var c = Presets.Get("tiny");
        var m = new ImageFlow(c);
        m.eval();
        m.Dequantize.Midpoint = true;
        manual_seed(5);
        var x = RandomImages(2, c).to_type(float64);
        m.MoveTo(CPU, float64);
        var bpd = m.BitsPerDim(x);
        for (int i = 0; i < 2; i++)
        {
            double logp = 0, a = c.Alpha;
            foreach (var v in x[i].reshape(-1).data<double>())
            {
                double y = (v + 0.5) / 256, p = a + (1 - 2 * a) * y, z = Math.Log(p / (1 - p));
                logp += -0.5 * (z * z + Math.Log(2 * Math.PI)) + Math.Log(1 - 2 * a) - Math.Log(p) - Math.Log(1 - p) - Math.Log(256);
            }
            double expected = -logp / (c.Dimensions * Math.Log(2));
            Assert.Equal(expected, bpd[i].item<double>(), 9);
        }
    }

    [Fact]
    public void Channel_mixing_parameters_do_not_grow_with_the_number_of_patches()
    {
        var small = new ImageFlow(Presets.Get("tiny"));
        var large = new ImageFlow(Presets.Get("tiny") with { Height = 56, Width = 56 });
        long Part(ImageFlow m, string name) => m.ParameterBreakdown().Single(p => p.Part == name).Parameters;
        Assert.Equal(Part(small, "channel-mixing flows"), Part(large, "channel-mixing flows"));
        Assert.NotEqual(Part(small, "patch-mixing flows"), Part(large, "patch-mixing flows"));
    }

    [Fact]
    public void The_shared_channel_flow_applied_to_one_patch_gives_that_patch_row()
    {
        manual_seed(11);
        var inner = MixerFlowBuilder.VectorFlow(Presets.MixerFlow("tiny"), InnerFlow.Affine, 49);
        using (no_grad()) foreach (var p in inner.parameters()) p.add_(randn_like(p) * 0.3);
        var rows = new RowWise(5, inner);
        var x = randn(3, 5, 49);
        var full = rows.Forward(x);
        for (int r = 0; r < 5; r++)
        {
            var alone = inner.Forward(x[.., r, ..]);
            Assert.True(alone.Value.allclose(full.Value[.., r, ..], 1e-4, 1e-5)); // float32, batched vs single GEMM
        }
        var perRow = Enumerable.Range(0, 5).Select(r => inner.Forward(x[.., r, ..]).LogDet).Aggregate((a, b) => a + b);
        Assert.True(perRow.allclose(full.LogDet, 1e-4, 1e-4));
        Assert.True(full.LogDet.abs().max().item<float>() > 1e-3); // randomised, not the identity
    }

    [Fact]
    public void Preset_parameter_counts()
    {
        long cifar = new ImageFlow(Presets.Get("cifar10")).ParameterCount;
        Assert.InRange(cifar, 7_125_000, 7_875_000); // 7.5M +- 5%
        long glow = new ImageFlow(Presets.Get("glow-cifar10")).ParameterCount;
        Assert.InRange(glow, (long)(cifar * 0.9), (long)(cifar * 1.1));
        long fm = new ImageFlow(Presets.Get("fashion-mnist")).ParameterCount;
        long glowFm = new ImageFlow(Presets.Get("glow-fashion-mnist")).ParameterCount;
        Assert.InRange(glowFm, (long)(fm * 0.9), (long)(fm * 1.1));
    }

    [Fact]
    public void Sampling_gives_pixels_in_range_and_temperature_zero_is_the_mode()
    {
        var m = Randomised(Presets.Get("tiny"), 4);
        var s = m.Sample(3, 0.7);
        Assert.Equal(new long[] { 3, 1, 28, 28 }, s.shape);
        Assert.InRange(s.min().item<float>(), 0, 255);
        Assert.InRange(s.max().item<float>(), 0, 255);
        var a = m.Sample(2, 0.0);
        Assert.Equal(0f, (a[0] - a[1]).abs().max().item<float>());
    }

    [Fact]
    public void Checkpoint_round_trip_gives_the_same_log_likelihood()
    {
        var m = Randomised(Presets.Get("tiny"), 6);
        var path = Path.Combine(Path.GetTempPath(), $"mf-{Guid.NewGuid():N}.ckpt");
        try
        {
            Checkpoint.Save(path, m, 17, 2, 3.5);
            var (loaded, header) = Checkpoint.Load(path);
            loaded.eval();
            Assert.Equal(17, header.Step);
            Assert.Equal(m.Config, loaded.Config);
            m.Dequantize.Midpoint = loaded.Dequantize.Midpoint = true;
            var x = RandomImages(3, m.Config);
            Assert.Equal(0f, (m.LogLikelihood(x) - loaded.LogLikelihood(x)).abs().max().item<float>());
        }
        finally { File.Delete(path); }
    }

    [Fact]
    public void A_bad_configuration_names_the_field()
    {
        var e = Assert.Throws<MixerFlow.Host.UserError>(() => new ImageFlow(Presets.MixerFlow("tiny") with { PatchSize = 5 }));
        Assert.Contains("patchSize", e.Message);
        var g = Assert.Throws<MixerFlow.Host.UserError>(() => new ImageFlow(Presets.Glow("glow-tiny") with { Levels = 4 }));
        Assert.Contains("levels", g.Message);
    }
}
