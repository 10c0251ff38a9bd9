using MixerFlow.Core;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// Log-dets travel in pieces (unsummed elementwise log-derivatives, per-sample values, constants)
/// and are added up once, when read: the same numbers as the parts' log-dets added one by one,
/// with fewer tensors per training step.
/// </summary>
public class LogDetPiecesTests
{
    [Fact]
    public void A_lifted_chain_of_couplings_and_ActNorm_gives_the_log_det_of_its_parts_added_one_by_one()
    {
        manual_seed(5);
        const long batch = 5, rows = 6, d = 4;
        var inner = new Chain(new Bijector[]
        {
            new Coupling(new[] { d }, Partition.Halves(d), Conditioners.Mlp(8, 1), new Affine()),
            new ActNorm(new[] { d }),
            new Coupling(new[] { d }, Partition.Halves(d).Swapped, Conditioners.Mlp(8, 1), new Affine(ScaleBound.Sigmoid)),
        });
        var lifted = new RowWise(rows, inner);
        Ops.MoveTo(float64, CPU, lifted);
        lifted.eval();
        using (no_grad()) foreach (var p in lifted.parameters()) p.copy_(randn_like(p).mul(Ops.Scalar(0.5)));
        var x = randn(batch, rows, d, dtype: float64);

        var r = lifted.Forward(x);
        var back = lifted.Inverse(r.Value);

        // Every row through every part, each part's log-det read and added.
        var h = x.reshape(batch * rows, d);
        var sum = zeros(batch * rows, dtype: float64);
        foreach (var part in inner.Parts) { var q = part.Forward(h); h = q.Value; sum = Ops.Add(sum, q.LogDet); }
        var expected = sum.reshape(batch, rows).sum(1);

        Assert.Equal(new long[] { batch }, r.LogDet.shape);
        Assert.Equal(0.0, r.Value.sub(h.reshape(batch, rows, d)).abs().max().item<double>());
        Assert.True(r.LogDet.sub(expected).abs().max().item<double>() < 1e-12, $"{r.LogDet.str()} vs {expected.str()}");
        Assert.True(back.LogDet.add(expected).abs().max().item<double>() < 1e-12, "the inverse's log-det is minus the forward's");
        Assert.True(back.Value.sub(x).abs().max().item<double>() < 1e-12);
    }

    /// <summary>Returns its input object itself: a chain must not free what a part hands back.</summary>
    sealed class ReturnsItsInput(long[] shape) : Bijector("ReturnsItsInput", shape, shape)
    {
        public override Transformed Forward(Tensor x) => Transformed.VolumePreserving(x);
        public override Transformed Inverse(Tensor y) => Transformed.VolumePreserving(y);
    }

    [Fact]
    public void Without_gradients_a_chain_frees_its_parts_temporaries_and_gives_the_same_numbers()
    {
        manual_seed(6);
        const long batch = 4, d = 6;
        var parts = new List<Bijector> { new ReturnsItsInput(new[] { d }) };
        for (int i = 0; i < 12; i++)
        {
            parts.Add(new Coupling(new[] { d }, i % 2 == 0 ? Partition.Halves(d) : Partition.Halves(d).Swapped, Conditioners.Mlp(8, 1), new Affine()));
            parts.Add(new ActNorm(new[] { d }));
            parts.Add(new ReturnsItsInput(new[] { d }));
        }
        var chain = new Chain(parts);
        Ops.MoveTo(float64, CPU, chain);
        chain.eval();
        using (no_grad()) foreach (var p in chain.parameters()) p.copy_(randn_like(p).mul(Ops.Scalar(0.5)));
        var x = randn(batch, d, dtype: float64);

        var withGrad = chain.Forward(x);
        var (expectedValue, expectedLogDet) = (withGrad.Value.detach(), withGrad.LogDet.detach());
        var expectedBack = chain.Inverse(expectedValue);
        long liveBefore, liveAfter;
        Transformed r, back;
        using (no_grad())
        using (NewDisposeScope())
        {
            liveBefore = Tensor.TotalCount;
            r = chain.Forward(x);
            _ = r.LogDet;
            // What a chain of 37 parts leaves alive: its output and log-det pieces, not every part's temporaries.
            liveAfter = Tensor.TotalCount;
            back = chain.Inverse(r.Value);
            Assert.Equal(0.0, r.Value.sub(expectedValue).abs().max().item<double>());
            Assert.True(r.LogDet.sub(expectedLogDet).abs().max().item<double>() < 1e-12);
            Assert.Equal(0.0, back.Value.sub(expectedBack.Value).abs().max().item<double>());
            Assert.Equal(0.0, back.LogDet.sub(expectedBack.LogDet).abs().max().item<double>());
        }
        Assert.False(x.IsInvalid, "the caller's input was freed");
        Assert.True(liveAfter - liveBefore < 40, $"{liveAfter - liveBefore} tensors left alive by a no-gradient pass through 37 parts");
    }

    [Fact]
    public void Elementwise_and_constant_pieces_read_as_per_sample_log_dets()
    {
        var x = randn(3, 2, 2, dtype: float64);
        var terms = randn(3, 2, 2, dtype: float64);
        Assert.Equal(0.0, Transformed.Elementwise(x, terms).LogDet.sub(terms.sum(new long[] { 1, 2 })).abs().max().item<double>());
        var c = tensor(1.5, dtype: float64);
        var constant = Transformed.Constant(x, c).LogDet;
        Assert.Equal(new long[] { 3 }, constant.shape);
        Assert.Equal(1.5, constant.min().item<double>());
        Assert.Equal(1.5, constant.max().item<double>());
        Assert.Throws<ArgumentException>(() => Transformed.Elementwise(x, randn(4, 2)));
        Assert.Throws<ArgumentException>(() => Transformed.Constant(x, randn(3)));
    }

    [Theory]
    [InlineData("tiny")]
    [InlineData("glow-tiny")]
    public void Parameter_gradients_of_the_log_likelihood_match_finite_differences_in_float64(string preset)
    {
        // In-place updates must leave autograd's parameter gradients right: the directional
        // derivative along a random direction against a central difference.
        manual_seed(2);
        var model = new ImageFlow(Presets.Get(preset)).MoveTo(CPU, float64);
        var c = model.Config;
        var x = randint(0, 256, new long[] { 4, c.Channels, c.Height, c.Width }).to_type(float64);
        model.Dequantize.Midpoint = true;
        model.train();
        using (no_grad()) model.LogProb(x); // ActNorm's data-dependent initialisation
        model.eval();
        var ps = model.parameters().ToArray();
        using (no_grad()) foreach (var p in ps) p.add_(randn_like(p).mul(Ops.Scalar(0.05)));
        var v = ps.Select(p => randn_like(p)).ToArray();
        foreach (var p in ps) p.grad = null;
        model.LogProb(x).sum().backward();
        double analytic = ps.Zip(v).Sum(pv => pv.First.grad!.mul(pv.Second).sum().item<double>());
        double F(double step)
        {
            using var _ = no_grad();
            for (int i = 0; i < ps.Length; i++) ps[i].add_(v[i].mul(Ops.Scalar(step)));
            double f = model.LogProb(x).sum().item<double>();
            for (int i = 0; i < ps.Length; i++) ps[i].sub_(v[i].mul(Ops.Scalar(step)));
            return f;
        }
        // A small step: a larger one (1e-5) lets some ReLUs cross their kink between the two
        // evaluations, which alone moved the difference by 1e-4 relative.
        const double h = 1e-7;
        double numeric = (F(h) - F(-h)) / (2 * h);
        Assert.True(Math.Abs(analytic - numeric) <= 1e-6 * Math.Max(1.0, Math.Abs(numeric)),
            $"{preset}: directional derivative {analytic} by autograd, {numeric} by central difference");
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void A_fashion_mnist_training_step_creates_fewer_than_300_tensors_on_either_path(bool hand)
    {
        manual_seed(1);
        var model = new ImageFlow(Presets.Get("fashion-mnist"));
        using var adam = new MixerFlow.Core.Adam(model.parameters(), 1e-4);
        // Autograd's backward pass creates no managed tensors; the hand-written one (the default)
        // writes its couplings' results into tensors they keep from step to step.
        var step = new TrainingStep(model, adam, clipNorm: new TrainingSettings().ClipNorm) { HandGradients = hand };
        model.train();
        long Step()
        {
            using var scope = NewDisposeScope();
            var x = randint(0, 256, new long[] { 8, 1, 28, 28 }).to_type(float32);
            var stats = DisposeScopeManager.Statistics;
            long before = stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount;
            Assert.True(step.Take(x, 1e-4).Kept);
            return stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount - before;
        }
        Step(); // ActNorm's data-dependent initialisation
        long created = Step();
        Assert.Equal(hand, step.LastUsedHandGradients);
        Assert.True(created < 300, $"a training step created {created} tensors");
    }
}
