using MixerFlow.Core;
using MixerFlow.Host;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// Multi-scale MixerFlow (<see cref="MixerFlowConfig.SplitAfter"/>): the field (defaults, older
/// files, <c>--set</c>, bounds), the density of randomised models in float64 against the standard
/// normal of the latent plus the log|det| of the autograd Jacobian, the split prior as the Gaussian
/// N(mu(kept), sigma(kept)^2) at a sampling temperature, round trips, the hand-written training
/// pass against autograd's, and training and sampling from the command line.
/// </summary>
public class MultiScaleTests
{
    /// <summary>2x8x8 images in 4x4 patches (4 patches of 32 values), split after layers 2 and 3
    /// (32 -> 16 -> 8 values), with a shift after layer 1; or 1x6x6 in 3x3 patches (9 values, an
    /// odd count: 4 stay), split after layer 2.</summary>
    static MixerFlowConfig Small(int variant) => variant == 0
        ? new MixerFlowConfig { Name = "small", Channels = 2, Height = 8, Width = 8, PatchSize = 4, Layers = 4, HiddenWidth = 8, SplitAfter = new LayerList([2, 3]) }
        : new MixerFlowConfig { Name = "small-odd", Channels = 1, Height = 6, Width = 6, PatchSize = 3, Layers = 3, HiddenWidth = 8, SplitAfter = new LayerList([2]) };

    /// <summary>A float64 model of <paramref name="config"/>, ActNorm initialised on data, every
    /// parameter moved (not the identity the couplings start at), in evaluation mode.</summary>
    static ImageFlow RandomisedFloat64(MixerFlowConfig config, int seed)
    {
        manual_seed(seed);
        var m = new ImageFlow(config).MoveTo(CPU, float64);
        m.train();
        using (no_grad())
        {
            var context = config.Classes > 0 ? m.OneHot(Enumerable.Range(0, 16).Select(i => i % config.Classes).ToList()) : null;
            m.Body.Forward(BodyInputs(16, config), context);
            foreach (var p in m.parameters()) p.add_(randn_like(p) * 0.05);
        }
        m.eval();
        return m;
    }

    /// <summary>n float64 inputs of the body (dequantised pixels in (0.05, 0.95)).</summary>
    static Tensor BodyInputs(int n, ModelConfig c) =>
        rand(new long[] { n, c.Channels, c.Height, c.Width }, dtype: float64) * 0.9 + 0.05;

    /// <summary>log|det dz/du| of each sample from the full Jacobian: the sample repeated once per
    /// dimension, one backward pass with the identity as dL/dz (in evaluation mode samples are
    /// independent, so row k of the input's gradient is row k of the Jacobian).</summary>
    static double[] JacobianLogDets(Bijector body, Tensor u)
    {
        long n = u[0].numel();
        var result = new double[u.shape[0]];
        for (int b = 0; b < u.shape[0]; b++)
        {
            var x = u[b].unsqueeze(0).expand(n, -1, -1, -1).clone().requires_grad_(true);
            var z = body.Forward(x).Value.reshape(n, n);
            z.backward([eye(n, dtype: float64)]);
            var (sign, logAbsDet) = linalg.slogdet(x.grad!.reshape(n, n));
            Assert.NotEqual(0.0, sign.item<double>());
            result[b] = logAbsDet.item<double>();
        }
        return result;
    }

    static string Show(Tensor t) => string.Join(", ", t.detach().to_type(float64).data<double>().ToArray().Select(v => v.ToString("G6")));

    [Fact]
    public void The_field_defaults_to_no_split_and_older_files_read_as_before()
    {
        var tiny = (MixerFlowConfig)Presets.Get("tiny");
        Assert.Empty(tiny.SplitAfter);
        Assert.Contains("\"splitAfter\": []", tiny.ToJson());
        var old = string.Join('\n', tiny.ToJson().Split('\n').Where(l => !l.Contains("\"splitAfter\"")));
        Assert.Equal(tiny, ModelConfig.FromJson(old, "old.json"));
        Assert.Equal(tiny, ModelConfig.FromJson(tiny.ToJson().Replace("\"splitAfter\": []", "\"splitAfter\": null"), "null.json"));
        var split = Presets.Get("fashion-mnist").With([("splitAfter", "1,3")]);
        Assert.Equal(new LayerList([1, 3]), ((MixerFlowConfig)split).SplitAfter);
        // Value equality (checkpoints compare configurations): a file's copy equals the original.
        Assert.Equal(split, ModelConfig.FromJson(split.ToJson(), "split.json"));
        Assert.Equal(split, split.With([("splitAfter", "[1, 3]")]));
        Assert.Equal(Presets.Get("fashion-mnist"), split.With([("splitAfter", "none")]));
        // Without a split the model is built as before: no split prior, no Partial.
        using var model = new ImageFlow(tiny);
        Assert.Empty(model.modules().OfType<Partial>());
        Assert.DoesNotContain("split priors", model.ParameterBreakdown().Select(p => p.Part));
    }

    [Theory]
    [InlineData("fashion-mnist", "splitAfter=0", "splitAfter: layer numbers must increase and lie in [1, 3]")]
    [InlineData("fashion-mnist", "splitAfter=4", "splitAfter: layer numbers must increase and lie in [1, 3]")]
    [InlineData("fashion-mnist", "splitAfter=2,2", "got 2,2")]
    [InlineData("fashion-mnist", "splitAfter=3,1", "got 3,1")]
    [InlineData("fashion-mnist", "splitAfter=1,2x", "splitAfter must be layer numbers separated by commas")]
    [InlineData("tiny", "patchSize=2,layers=4,splitAfter=1,2", "splitAfter: 2 splits halve each patch's 4 values to 1; channel mixing needs at least 2")]
    public void Bad_split_layers_are_refused_naming_the_field(string preset, string assignments, string expected)
    {
        // "a,b" after splitAfter= belongs to the list: split the assignments at ",key=" only.
        var set = System.Text.RegularExpressions.Regex.Split(assignments, ",(?=[a-zA-Z]+=)");
        var e = Assert.Throws<UserError>(() => ConfigOverrides.Apply(Presets.Get(preset), set));
        Assert.Contains(expected, e.Message);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    public void The_log_density_is_the_latent_s_normal_density_plus_the_autograd_jacobian_log_det(int variant)
    {
        var config = Small(variant);
        using var model = RandomisedFloat64(config, 5 + variant);
        var u = BodyInputs(3, config);
        Transformed r;
        using (no_grad()) r = model.Body.Forward(u);
        var z = r.Value;
        var expected = JacobianLogDets(model.Body, u);
        var flow = new Flow(model.Body);
        using var _ = no_grad();
        var logProb = flow.LogProb(u);
        var normal = (z * z + Math.Log(2 * Math.PI)).mul(-0.5).reshape(3, -1).sum(1);
        for (int b = 0; b < 3; b++)
        {
            Assert.Equal(expected[b], r.LogDet[b].item<double>(), 8);
            Assert.Equal(normal[b].item<double>() + expected[b], logProb[b].item<double>(), 8);
        }
        // The check can fail: the first split prior's own log-det is far above its tolerance, so a
        // model that dropped it would be caught.
        var prior = SplitPriors(model.Body).First();
        var priorLogDet = prior.Forward(PrefixBefore(model.Body, prior, u)).LogDet;
        Assert.True(priorLogDet.abs().min().item<double>() > 1e-3, $"prior log-det {Show(priorLogDet)}");
    }

    /// <summary>The split priors in the body's top-level chain and in every Partial below it.</summary>
    static IEnumerable<RowWise> SplitPriors(Bijector body) =>
        new[] { (Chain)body }.Concat(body.modules().OfType<Chain>()).SelectMany(c => c.Parts.Zip(c.Parts.Skip(1)))
            .Where(pair => pair.Second is Partial).Select(pair => (RowWise)pair.First).Distinct();

    /// <summary>What the top-level chain's parts before <paramref name="part"/> make of u.</summary>
    static Tensor PrefixBefore(Bijector body, Bijector part, Tensor u)
    {
        var h = u;
        foreach (var p in ((Chain)body).Parts)
        {
            if (ReferenceEquals(p, part)) return h;
            h = p.Forward(h).Value;
        }
        throw new InvalidOperationException("the part is not in the body's top-level chain");
    }

    [Theory]
    [InlineData(0.0)]
    [InlineData(0.7)]
    public void Sampling_draws_the_factored_out_half_from_the_Gaussian_prior_at_the_temperature(double temperature)
    {
        var config = Small(0);
        using var model = RandomisedFloat64(config, 9);
        var body = (Chain)model.Body;
        var prior = SplitPriors(body).First();
        var patchify = new Patchify(config.Geometry);
        using var _ = no_grad();
        manual_seed(3);
        var eps = randn(new long[] { 4, config.Channels, config.Height, config.Width }, dtype: float64);
        var u = body.Inverse(eps * temperature).Value;
        // At the first split: the matrix [B, P, D], its kept half x1 and factored-out half x2.
        var h = PrefixBefore(body, prior, u);
        long d = h.shape[2], kept = d / 2;
        var x1 = h.narrow(2, 0, kept).reshape(-1, kept);
        var x2 = h.narrow(2, kept, d - kept).reshape(-1, d - kept);
        // The prior's conditioner gives (t, r) per row: z2 = x2 exp(s) + t, s = 2 tanh(r / 2), so
        // x2 ~ N(mu, sigma^2) with mu = -t exp(-s), sigma = exp(-s) (closed form, not the flow's code).
        var coupling = (Coupling)prior.Inner;
        var parameters = coupling.Parameters(x1);
        var t = parameters.select(1, 0);
        var s = (parameters.select(1, 1) / 2).tanh() * 2;
        var mu = -t * (-s).exp();
        var sigma = (-s).exp();
        // The base noise at the factored-out positions: the last columns of the latent's matrix.
        var eps2 = patchify.Forward(eps).Value.narrow(2, kept, d - kept).reshape(-1, d - kept);
        double error = (x2 - (mu + sigma * eps2 * temperature)).abs().max().item<double>();
        Assert.True(error < 1e-9 * (1 + x2.abs().max().item<double>()), $"x2 differs from mu + sigma T eps by {error}");
        // And the density of x2 given x1 is that normal's: the prior's log-det plus the standard
        // normal of z2 equals log N(x2; mu, sigma^2) summed over each sample's rows.
        var r = prior.Forward(h);
        var z2 = r.Value.narrow(2, kept, d - kept);
        var viaFlow = r.LogDet + (z2 * z2 + Math.Log(2 * Math.PI)).mul(-0.5).reshape(4, -1).sum(1);
        var gaussian = (((x2 - mu) / sigma).pow(2) + Math.Log(2 * Math.PI)).mul(-0.5).sub(sigma.log()).reshape(4, -1).sum(1);
        Assert.True((viaFlow - gaussian).abs().max().item<double>() < 1e-9 * (1 + gaussian.abs().max().item<double>()), $"{Show(viaFlow)} against {Show(gaussian)}");
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    public void Inverse_of_forward_is_the_identity(int variant)
    {
        var config = Small(variant);
        using var model = RandomisedFloat64(config, 12);
        using var _ = no_grad();
        var u = BodyInputs(4, config);
        var z = model.Body.Forward(u).Value;
        Assert.True((model.Body.Inverse(z).Value - u).abs().max().item<double>() < 1e-9);
        // A class-conditional one: the split prior's conditioner also sees the class.
        var conditional = Small(variant) with { Classes = 3 };
        using var classModel = RandomisedFloat64(conditional, 13);
        var context = classModel.OneHot([0, 2, 1, 2]);
        var zc = classModel.Body.Forward(u, context).Value;
        Assert.True((classModel.Body.Inverse(zc, context).Value - u).abs().max().item<double>() < 1e-9);
        Assert.True((classModel.Body.Forward(u, classModel.OneHot([1, 1, 1, 1])).Value - zc).abs().max().item<double>() > 1e-6);
        // A full-size model in float32, on pixels: back within a thousandth, exact after rounding.
        var fm = Presets.Get("fashion-mnist").With([("splitAfter", "1,3")]);
        var m = ModelTests.Randomised(fm, 3);
        var x = ModelTests.RandomImages(4, fm);
        Assert.InRange(m.ReconstructionError(x), 0, 1e-3);
        Assert.Equal(0f, (m.Reconstruct(x) - x).abs().max().item<float>());
    }

    [Fact]
    public void The_hand_written_pass_runs_every_part_and_equals_autograd()
    {
        var config = Small(0);
        using var model = RandomisedFloat64(config, 21);
        model.train();
        var x = ModelTests.RandomImages(4, config).to_type(float64);
        var plan = HandGradient.Plan(model, x);
        Assert.Empty(plan.Islands);
        Assert.Contains("partial", HandGradient.Describe(model, x));
        double scale = 1.0 / (4 * config.Dimensions * Math.Log(2));
        // The same dequantised values for both passes: mid-bin.
        model.Dequantize.Midpoint = true;
        model.zero_grad();
        (model.LogProb(x).sum() * -scale).backward();
        var expected = model.parameters().Select(p => p.grad!.clone()).ToArray();
        model.zero_grad();
        var pass = HandGradient.Forward(model, x);
        var reference = model.LogProb(x).detach();
        Assert.True((pass.LogProb - reference).abs().max().item<double>() < 1e-9 * (1 + reference.abs().max().item<double>()), $"hand {Show(pass.LogProb)} autograd {Show(reference)}");
        pass.Backward(-scale);
        var got = model.parameters().Select(p => p.grad!.clone()).ToArray();
        Assert.Equal(expected.Length, got.Length);
        for (int i = 0; i < got.Length; i++)
        {
            double e = expected[i].abs().max().item<double>();
            Assert.True(e > 0, $"parameter {i} has no gradient");
            Assert.True((got[i] - expected[i]).abs().max().item<double>() <= 1e-9 * (1 + e), $"parameter {i}");
        }
    }

    [Fact]
    public void Train_sample_and_info_work_from_the_command_line_on_the_hand_written_path()
    {
        var folder = Path.Combine(Path.GetTempPath(), "mixerflow-split-" + Guid.NewGuid().ToString("N"));
        try
        {
            var (code, output, error) = CliInProcess.Run("train", "--preset", "tiny", "--set", "splitAfter=1", "--steps", "4", "--batch-size", "16", "--out", folder);
            Assert.True(code == 0, error);
            Assert.Contains("gradients: hand-written", output);
            var checkpoint = Path.Combine(folder, "last.ckpt");
            (code, output, error) = CliInProcess.Run("info", "--checkpoint", checkpoint);
            Assert.True(code == 0, error);
            Assert.Contains("split priors", output);
            var png = Path.Combine(folder, "samples.png");
            (code, _, error) = CliInProcess.Run("sample", "--checkpoint", checkpoint, "--count", "4", "--temperature", "0.5", "--out", png);
            Assert.True(code == 0, error);
            Assert.True(File.Exists(png));
        }
        finally { if (Directory.Exists(folder)) Directory.Delete(folder, true); }
    }
}
