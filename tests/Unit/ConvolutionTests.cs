using MixerFlow.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// LibTorch 2.10's oneDNN float32 convolution reads uninitialised channel padding of its blocked
/// layouts: Glow's coupling network (3x3 conv, 1x1 conv, 3x3 conv to 2 x transformed channels)
/// gave wrong or NaN outputs (72 -> 4 channels) and input gradients (8 -> 4), differently from
/// one call to the next. Core turns oneDNN off (NativeBackend); float32 must then agree with float64.
/// </summary>
public class ConvolutionTests
{
    static (Tensor y, Tensor gx, Tensor[] gp) Run(nn.Module<Tensor, Tensor> net, Tensor x)
    {
        var xg = x.detach().clone().requires_grad_(true);
        var y = net.forward(xg);
        var inputs = new List<Tensor> { xg };
        inputs.AddRange(net.parameters());
        var g = autograd.grad(new[] { (y * y).sum() }, inputs);
        return (y.detach().to_type(float64), g[0].to_type(float64), g.Skip(1).Select(t => t.to_type(float64)).ToArray());
    }

    static double MaxError(Tensor got, Tensor expected) =>
        ((got - expected).abs() / (expected.abs() + 1)).max().item<double>();

    [Theory]
    [InlineData(72, 1, 7)]   // glow-fashion-mnist's coupling net: 72 hidden channels, 2 -> 2x2 channels
    [InlineData(8, 2, 3)]    // the property checks' affine-coupling-conv: 4 channels, 3x3 images
    [InlineData(5, 1, 2)]
    public void Float32_conv_conditioner_matches_float64_in_output_and_gradients(int width, int half, int side)
    {
        manual_seed(7);
        var net = Conditioners.Conv(width).Invoke(half, 2 * half);
        using (no_grad())
            foreach (var p in net.parameters()) p.add_(randn_like(p) * 0.2);
        var x = randn(4, half, side, side, dtype: float64);
        net.to(float64);
        var (y64, gx64, gp64) = Run(net, x);
        net.to(float32);
        for (int rep = 0; rep < 5; rep++)
        {
            var (y, gx, gp) = Run(net, x.to_type(float32));
            Assert.InRange(MaxError(y, y64), 0, 1e-4);
            Assert.InRange(MaxError(gx, gx64), 0, 1e-4);
            for (int i = 0; i < gp.Length; i++) Assert.InRange(MaxError(gp[i], gp64[i]), 0, 1e-4);
        }
    }

    [Fact]
    public void A_bare_float32_conv2d_after_Core_is_loaded_matches_float64()
    {
        NativeBackend.Ensure();
        manual_seed(3);
        foreach (var (cin, cout) in new[] { (72, 4), (8, 4), (20, 4), (2, 72) })
        {
            var x = randn(4, cin, 7, 7, dtype: float64);
            var w = randn(cout, cin, 3, 3, dtype: float64) * 0.2;
            var go = randn(4, cout, 7, 7, dtype: float64);
            (Tensor y, Tensor gx) Conv(ScalarType dt)
            {
                var xi = x.to_type(dt).requires_grad_(true);
                var y = nn.functional.conv2d(xi, w.to_type(dt), padding: new long[] { 1, 1 });
                var gx = autograd.grad(new[] { y }, new[] { xi }, new[] { go.to_type(dt) })[0];
                return (y.detach().to_type(float64), gx.to_type(float64));
            }
            var (yR, gR) = Conv(float64);
            for (int rep = 0; rep < 5; rep++)
            {
                var (y, g) = Conv(float32);
                Assert.True(MaxError(y, yR) < 1e-4, $"conv {cin}->{cout}: forward error {MaxError(y, yR)}");
                Assert.True(MaxError(g, gR) < 1e-4, $"conv {cin}->{cout}: input-gradient error {MaxError(g, gR)}");
            }
        }
    }
}
