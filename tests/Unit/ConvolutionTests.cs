using MixerFlow.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// LibTorch 2.10's oneDNN float32 convolution reads uninitialised channel padding of its blocked
/// layouts: Glow's coupling network (3x3 conv, 1x1 conv, 3x3 conv to 2 x transformed channels)
/// gave wrong or NaN outputs (72 -> 4 channels) and input gradients (8 -> 4), differently from
/// one call to the next. MixerFlow computes its own convolutions as GEMMs (GemmConvolution,
/// ThinConvolution), so float32 must agree with float64 with LibTorch's oneDNN switch on or off.
/// The oneDNN cases flip the process-wide switch through the runtime API and put it back; the test
/// assembly runs its tests one at a time.
/// </summary>
public class ConvolutionTests
{
    /// <summary>Runs <paramref name="body"/> with the runtime's oneDNN switch as given, then restores the tests' runtime.</summary>
    static void WithOneDnn(bool on, Action body)
    {
        var d = MixerFlow.Core.Runtime.MixerFlowRuntime.Configure(LibTorchSetup.Options.WithOneDnn(on));
        try
        {
            if (NativeBackend.Available) Assert.Equal(on ? "on" : "off", d["oneDNN"].Value);
            body();
        }
        finally { MixerFlow.Core.Runtime.MixerFlowRuntime.Configure(LibTorchSetup.Options); }
        Assert.False(NativeBackend.Available && NativeBackend.MkldnnEnabled);
    }

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
    [InlineData(12, 4, 3, 5, 7, false)]    // Glow's last coupling layer in miniature, a non-square image
    [InlineData(12, 4, 3, 5, 7, true)]     // the same by the GEMM path (oneDNN on)
    [InlineData(9, 2, 5, 6, 6, true)]      // a 5x5 kernel
    [InlineData(3, 1, 3, 1, 4, false)]     // one row
    [InlineData(3, 1, 3, 1, 4, true)]
    public void A_thin_convolution_gives_the_convolution_and_its_gradients(int inC, int outC, int k, int h, int w, bool oneDnn) =>
        WithOneDnn(oneDnn, () => ThinConvolutionAgrees(inC, outC, k, h, w));

    static void ThinConvolutionAgrees(int inC, int outC, int k, int h, int w)
    {
        manual_seed(11);
        var conv = nn.Conv2d(inC, outC, k, padding: k / 2);
        conv.to(float64);
        using (no_grad()) foreach (var p in conv.parameters()) p.copy_(randn_like(p));
        Assert.True(ThinConvolution.Applies(conv));
        var x = randn(3, inC, h, w, dtype: float64);
        var net = new ReluNetwork(new nn.Module<Tensor, Tensor>[] { conv });
        var (yThin, gxThin, gpThin) = Run(net, x);
        var (y, gx, gp) = Run(conv, x);
        Assert.True(MaxError(yThin, y) < 1e-12, $"output off by {MaxError(yThin, y)}");
        Assert.True(MaxError(gxThin, gx) < 1e-12, $"input gradient off by {MaxError(gxThin, gx)}");
        for (int i = 0; i < gp.Length; i++) Assert.True(MaxError(gpThin[i], gp[i]) < 1e-12, $"parameter {i}'s gradient off by {MaxError(gpThin[i], gp[i])}");
        // An empty batch gives an empty output of the convolution's shape.
        using (no_grad()) Assert.Equal(new long[] { 0, outC, h, w }, net.forward(zeros(0, inC, h, w, dtype: float64)).shape);
        // Wider outputs, strides and other paddings keep LibTorch's convolution.
        Assert.False(ThinConvolution.Applies(nn.Conv2d(outC, inC, k, padding: k / 2)));
        Assert.False(ThinConvolution.Applies(nn.Conv2d(inC, outC, k, stride: 2, padding: k / 2)));
        Assert.False(ThinConvolution.Applies(nn.Conv2d(inC, outC, k)));
    }

    [Theory]
    [InlineData(3, 8, 1, 5, 6, true)]      // a 1x1 convolution
    [InlineData(3, 8, 1, 5, 6, false)]
    [InlineData(2, 72, 3, 7, 7, true)]     // Glow's first layer: to more channels than it reads
    [InlineData(2, 72, 3, 7, 7, false)]
    [InlineData(4, 4, 5, 6, 5, true)]      // a 5x5 kernel, a non-square image
    public void A_gemm_convolution_gives_the_convolution_and_its_gradients(int inC, int outC, int k, int h, int w, bool oneDnn) =>
        WithOneDnn(oneDnn, () =>
        {
            // oneDNN on: the GEMM path; off: LibTorch's own convolution (float64 is right either way).
            Assert.Equal(!oneDnn || !NativeBackend.Available, GemmConvolution.LibTorchIsRight);
            GemmConvolutionAgrees(inC, outC, k, h, w);
        });

    static void GemmConvolutionAgrees(int inC, int outC, int k, int h, int w)
    {
        manual_seed(13);
        var conv = nn.Conv2d(inC, outC, k, padding: k / 2);
        conv.to(float64);
        using (no_grad()) foreach (var p in conv.parameters()) p.copy_(randn_like(p));
        Assert.True(GemmConvolution.Applies(conv));
        Assert.False(ThinConvolution.Applies(conv));
        var x = randn(3, inC, h, w, dtype: float64);
        var net = new ReluNetwork(new nn.Module<Tensor, Tensor>[] { conv });
        var (yG, gxG, gpG) = Run(net, x);
        var (y, gx, gp) = Run(conv, x);
        Assert.True(MaxError(yG, y) < 1e-12, $"output off by {MaxError(yG, y)}");
        Assert.True(MaxError(gxG, gx) < 1e-12, $"input gradient off by {MaxError(gxG, gx)}");
        for (int i = 0; i < gp.Length; i++) Assert.True(MaxError(gpG[i], gp[i]) < 1e-12, $"parameter {i}'s gradient off by {MaxError(gpG[i], gp[i])}");
        // The result is a plain batch, and the check can fail: another weight, another output.
        Assert.True(net.forward(x).is_contiguous());
        using (no_grad()) conv.weight!.add_(1.0);
        Assert.True(MaxError(Run(net, x).y, y) > 1e-3);
        // Strides, dilations and groups keep LibTorch's convolution.
        Assert.False(GemmConvolution.Applies(nn.Conv2d(inC, outC, k, stride: 2, padding: k / 2)));
        Assert.False(GemmConvolution.Applies(nn.Conv2d(inC, outC, 3, padding: 0L)));
    }

    [Fact]
    public void Glows_prior_convolution_keeps_a_Conv2ds_names_and_follows_its_dtype()
    {
        manual_seed(17);
        var prior = (SameConvolution)Conditioners.ZeroConv().Invoke(3, 6);
        Assert.Equal(new[] { "weight", "bias" }, prior.state_dict().Keys);
        Assert.Equal(0.0, prior.forward(randn(2, 3, 4, 4)).abs().max().item<float>());
        var conv = nn.Conv2d(3, 6, 3, padding: 1);
        using (no_grad()) foreach (var p in conv.parameters()) p.copy_(randn_like(p));
        prior.load_state_dict(conv.state_dict());
        prior.to(float64);
        conv.to(float64);
        Assert.Equal(ScalarType.Float64, prior.Weight.dtype);
        var x = randn(2, 3, 4, 5, dtype: float64);
        using (no_grad()) Assert.True(MaxError(prior.forward(x), conv.forward(x)) < 1e-12);
    }

    [Theory]
    [InlineData(72, 1, 7, false)]   // glow-fashion-mnist's coupling net: 72 hidden channels, 2 -> 2x2 channels
    [InlineData(72, 1, 7, true)]    // the same with LibTorch's oneDNN on
    [InlineData(8, 2, 3, false)]    // the property checks' affine-coupling-conv: 4 channels, 3x3 images
    [InlineData(8, 2, 3, true)]
    [InlineData(20, 2, 6, true)]
    [InlineData(5, 1, 2, false)]
    public void Float32_conv_conditioner_matches_float64_in_output_and_gradients(int width, int half, int side, bool oneDnn) =>
        WithOneDnn(oneDnn, () =>
        {
            ConditionerMatchesFloat64(Conditioners.Conv(width).Invoke(half, 2 * half), half, side, 7);
            ConditionerMatchesFloat64(Conditioners.ZeroConv().Invoke(half, 2 * half), half, side, 8);
        });

    static void ConditionerMatchesFloat64(nn.Module<Tensor, Tensor> net, int half, int side, int seed)
    {
        manual_seed(seed);
        using (no_grad())
            foreach (var p in net.parameters()) p.add_(randn_like(p) * 0.2);
        // 16 images: LibTorch takes oneDNN for 1x1 convolutions too from 16 images on.
        var x = randn(16, half, side, side, dtype: float64);
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
    public void A_bare_float32_conv2d_under_the_default_runtime_matches_float64()
    {
        // The tests' runtime is the tool's default: oneDNN off, so LibTorch's own Conv2d is right too.
        Assert.False(NativeBackend.Available && NativeBackend.MkldnnEnabled);
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
/// <summary>
/// Glow's coupling networks run large batches in chunks (ReluNetwork), so that no im2col
/// buffer outgrows malloc's heap; the result must be that of the whole batch at once.
/// </summary>
public class ReluNetworkChunkTests
{
    static ReluNetwork Net(long bufferBytes)
    {
        manual_seed(5);
        var layers = new nn.Module<Tensor, Tensor>[]
        {
            nn.Conv2d(6, 16, 3, padding: 1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 3, padding: 1),
        };
        return new ReluNetwork(layers, bufferBytes);
    }

    [Fact]
    public void Chunks_give_the_whole_batchs_outputs_and_gradients_and_a_Sequentials_names()
    {
        var x = randn(10, 6, 8, 8, dtype: float64);
        var whole = Net(long.MaxValue);
        // 16 x 9 x 8 x 8 x 4 bytes = 36,864 per image: a 100,000-byte buffer takes 2 images a chunk.
        var chunked = Net(100_000);
        whole.to(float64);
        chunked.to(float64);
        Tensor Loss(ReluNetwork net, Tensor input) => net.forward(input).pow(2).sum();
        var (lw, lc) = (Loss(whole, x), Loss(chunked, x));
        Assert.Equal(lw.item<double>(), lc.item<double>(), 10);
        lw.backward();
        lc.backward();
        foreach (var (a, b) in whole.parameters().Zip(chunked.parameters()))
            Assert.True((a.grad! - b.grad!).abs().max().item<double>() < 1e-9 * (1 + a.grad!.abs().max().item<double>()));
        // The same names as torch.nn.Sequential of the same layers (checkpoints and the mirror rely on them).
        manual_seed(5);
        var sequential = nn.Sequential(nn.Conv2d(6, 16, 3, padding: 1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 3, padding: 1));
        Assert.Equal(sequential.state_dict().Keys, chunked.state_dict().Keys);
        // The check can fail: a net with other weights gives another loss.
        var other = Net(100_000);
        using (no_grad()) other.parameters().First().add_(1.0);
        other.to(float64);
        Assert.NotEqual(lw.item<double>(), Loss(other, x).item<double>(), 6);
    }
}
