using MixerFlow.Core;
using MixerFlow.Host.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// Conditioners computing their products in bfloat16 (<see cref="ReluNetwork.ComputeType"/>,
/// <see cref="MixerFlowConfig.ConditionerPrecision"/>): the forward and the hand-written backward
/// against the same rounding done in float64, the oneDNN switch left as found, and the models.
/// </summary>
public class ReducedPrecisionTests
{
    static ReluNetwork Perceptron(long inputs, long width, int depth, long outputs, bool reduced, int seed)
    {
        manual_seed(seed);
        var net = (ReluNetwork)(reduced ? Conditioners.Mlp(width, depth, ScalarType.BFloat16) : Conditioners.Mlp(width, depth)).Invoke(inputs, outputs);
        using (no_grad()) foreach (var p in net.parameters()) p.normal_(0, 0.4);
        return net;
    }

    /// <summary>Rounds to bfloat16 in the forward, passes gradients unchanged (straight through).</summary>
    static Tensor Round(Tensor t) => t + (t.to_type(bfloat16).to_type(float64) - t).detach();

    /// <summary>The perceptron in float64 with bfloat16 rounding where the reduced path rounds:
    /// the input, each weight and bias, each product's result.</summary>
    static Tensor Reference(ReluNetwork net, Tensor x)
    {
        var h = Round(x);
        var linears = net.Layers.OfType<Linear>().ToList();
        for (int i = 0; i < linears.Count; i++)
        {
            var a = Round(nn.functional.linear(h, Round(linears[i].weight!), Round(linears[i].bias!)));
            h = i < linears.Count - 1 ? a.relu() : a;
        }
        return h;
    }

    static double RelativeError(Tensor got, Tensor expected) =>
        (got.to_type(float64) - expected).norm().item<double>() / expected.norm().item<double>();

    [Theory]
    [InlineData(7, 32, 2, 10)]
    [InlineData(24, 64, 1, 48)]
    [InlineData(3, 16, 3, 4)]
    public void The_bfloat16_perceptron_and_its_gradients_follow_the_rounded_arithmetic(int inputs, int width, int depth, int outputs)
    {
        var net = Perceptron(inputs, width, depth, outputs, reduced: true, seed: inputs);
        var x = randn(300, inputs).requires_grad_(true);
        var weights = randn(300, outputs);
        var y = net.forward(x);
        Assert.Equal(ScalarType.Float32, y.dtype);
        var parameters = net.parameters().ToList();
        var grads = autograd.grad(new[] { (y * weights).sum() }, new[] { x }.Concat(parameters).ToList());
        Assert.All(grads, g => Assert.Equal(ScalarType.Float32, g.dtype));

        var net64 = Perceptron(inputs, width, depth, outputs, reduced: false, seed: inputs);
        net64.load_state_dict(net.state_dict());
        net64.to(float64);
        var x64 = x.detach().to_type(float64).requires_grad_(true);
        var y64 = Reference(net64, x64);
        var grads64 = autograd.grad(new[] { (y64 * weights.to_type(float64)).sum() }, new[] { x64 }.Concat(net64.parameters()).ToList());

        // The forward is the rounded arithmetic but for the GEMMs' own summation order (a result
        // one bfloat16 step apart now and then); the backward also rounds each layer's incoming
        // gradient to bfloat16, about 2^-9 relative per layer.
        Assert.InRange(RelativeError(y.detach(), y64.detach()), 0, 4e-3);
        for (int i = 0; i < grads.Count; i++)
            Assert.True(RelativeError(grads[i], grads64[i]) < 2e-2, $"gradient {i} off by {RelativeError(grads[i], grads64[i])}");

        // And the arithmetic is a reduced one: the same weights in float32 give other outputs.
        var net32 = Perceptron(inputs, width, depth, outputs, reduced: false, seed: inputs);
        net32.load_state_dict(net.state_dict());
        using (no_grad()) Assert.True((net32.forward(x) - y).abs().max().item<float>() > 0);
    }

    [Fact]
    public void The_oneDNN_switch_is_left_as_found_by_the_forward_and_the_backward()
    {
        // The tests' runtime has oneDNN off (LibTorchSetup).
        Assert.False(NativeBackend.Available && NativeBackend.MkldnnEnabled);
        var net = Perceptron(6, 32, 2, 8, reduced: true, seed: 4);
        var y = net.forward(randn(64, 6));
        Assert.False(NativeBackend.Available && NativeBackend.MkldnnEnabled);
        y.sum().backward();
        Assert.False(NativeBackend.Available && NativeBackend.MkldnnEnabled);
        Assert.NotNull(net.parameters().First().grad);
    }

    [Fact]
    public void Float64_inputs_and_batched_rows_take_the_plain_and_the_same_path()
    {
        var reduced = Perceptron(5, 16, 1, 6, reduced: true, seed: 9);
        var plain = Perceptron(5, 16, 1, 6, reduced: false, seed: 9);
        plain.load_state_dict(reduced.state_dict());
        using var _ = no_grad();
        reduced.to(float64);
        plain.to(float64);
        var x = randn(40, 5, dtype: float64);
        Assert.Equal(0.0, (reduced.forward(x) - plain.forward(x)).abs().max().item<double>());
        reduced.to(float32);
        // A [B, P, D] input is computed as its [B * P, D] rows.
        var rows = randn(4, 10, 5);
        Assert.Equal(0f, (reduced.forward(rows) - reduced.forward(rows.reshape(40, 5)).reshape(4, 10, 6)).abs().max().item<float>());
    }

    [Fact]
    public void Only_a_perceptron_takes_a_reduced_compute_type_and_only_bfloat16()
    {
        var net = (ReluNetwork)Conditioners.Mlp(8, 1).Invoke(4, 4);
        Assert.Throws<ArgumentException>(() => net.ComputeType = ScalarType.Float16);
        Assert.Throws<ArgumentException>(() => Conditioners.Mlp(8, 1, ScalarType.Float64));
        var conv = (ReluNetwork)Conditioners.Conv(8).Invoke(2, 4);
        var e = Assert.Throws<ArgumentException>(() => conv.ComputeType = ScalarType.BFloat16);
        Assert.Contains("perceptron", e.Message);
        net.ComputeType = ScalarType.BFloat16;
        net.ComputeType = null;
        Assert.Null(net.ComputeType);
    }

    [Fact]
    public void A_bfloat16_MixerFlow_reconstructs_its_images_and_trains()
    {
        var c = (MixerFlowConfig)ConfigOverrides.Apply(Presets.Get("tiny"), new[] { ("conditionerPrecision", "bfloat16") });
        Assert.Equal(ConditionerPrecision.Bfloat16, c.ConditionerPrecision);
        Assert.Contains("\"conditionerPrecision\": \"bfloat16\"", c.ToJson());
        Assert.Equal(c, ModelConfig.FromJson(c.ToJson(), "test"));
        Assert.All(new ImageFlow(c).modules().OfType<ReluNetwork>(), r => Assert.Equal(ScalarType.BFloat16, r.ComputeType));

        var m = ModelTests.Randomised(c, 3);
        var x = ModelTests.RandomImages(8, c);
        Assert.InRange(m.ReconstructionError(x), 0, 1e-3);
        Assert.Equal(0f, (m.Reconstruct(x) - x).abs().max().item<float>());

        // A few Adam steps on one batch lower its bits/dim.
        m.train();
        var adam = optim.Adam(m.parameters(), 3e-3);
        double first = 0, last = 0;
        for (int step = 0; step < 30; step++)
        {
            adam.zero_grad();
            var loss = m.BitsPerDim(x).mean();
            loss.backward();
            adam.step();
            if (step == 0) first = loss.item<float>();
            last = loss.item<float>();
        }
        Assert.True(last < first - 0.05, $"bits/dim {first} -> {last}");
    }
}
