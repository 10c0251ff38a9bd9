using MixerFlow.Core;
using MixerFlow.Host.Models;
using MixerFlow.Speed;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// The FLOP counter of benchmarks/Speed against counts computed by hand. No timings here: the
/// benchmark's speeds depend on the machine and its load.
/// </summary>
public class SpeedBenchmarkTests
{
    [Fact]
    public void OneLinearLayerCountsTwiceItsMultiplyAdds()
    {
        NativeRuntime.EnsureLoaded();
        using var scope = NewDisposeScope();
        var net = nn.Sequential(nn.Linear(10, 7));
        using var counter = new FlopCounter(net);
        net.forward(randn(5, 10)); // not recorded
        var gemms = counter.Count(5, () => net.forward(randn(2, 3, 10)));
        var g = Assert.Single(gemms);
        Assert.Equal(new Gemm("linear", 6, 10, 7, 1), g);
        Assert.Equal(2.0 * 6 * 10 * 7, g.Flops);
    }

    [Fact]
    public void ConvolutionCountsItsIm2colGemmPerImage()
    {
        NativeRuntime.EnsureLoaded();
        using var scope = NewDisposeScope();
        var net = nn.Sequential(nn.Conv2d(3, 4, 3, padding: 1));
        using var counter = new FlopCounter(net);
        var g = Assert.Single(counter.Count(2, () => net.forward(randn(2, 3, 5, 6))));
        // Per image [4 x 3*3*3] x [27 x 5*6]; 2 images.
        Assert.Equal(new Gemm("conv", 4, 27, 30, 2), g);
        Assert.Equal(2.0 * 2 * 4 * 27 * 30, g.Flops);
    }

    [Fact]
    public void A_thin_convolution_counts_as_the_convolution_it_computes()
    {
        NativeRuntime.EnsureLoaded();
        using var scope = NewDisposeScope();
        // 6 -> 2 channels: ReluNetwork runs it as ThinConvolution, which no module hook sees.
        var net = new ReluNetwork(new nn.Module<Tensor, Tensor>[] { nn.Conv2d(6, 2, 3, padding: 1) });
        using (var counter = new FlopCounter(net))
        {
            var g = Assert.Single(counter.Count(2, () => net.forward(randn(2, 6, 5, 6))));
            Assert.Equal(new Gemm("conv", 2, 54, 30, 2), g);
        }
        Assert.Null(GemmConvolution.Observer);
        // Glow's coupling net: its 3x3, 1x1 and thin 3x3 convolutions all run as GEMMs; each counts once.
        var glow = Conditioners.Conv(8).Invoke(2, 4);
        using (var counter = new FlopCounter(glow))
        {
            var gemms = counter.Count(2, () => glow.forward(randn(2, 2, 5, 6)));
            Assert.Equal(new[] { new Gemm("conv", 8, 18, 30, 2), new Gemm("conv", 8, 8, 30, 2), new Gemm("conv", 4, 72, 30, 2) }, gemms);
        }
    }

    [Fact]
    public void MergeAddsTheCountsOfEqualShapes()
    {
        var merged = FlopCounter.Merge(new[]
        {
            new Gemm("linear", 4, 3, 2, 1), new Gemm("linear", 8, 8, 8, 1), new Gemm("linear", 4, 3, 2, 2),
        });
        Assert.Equal(new[] { new Gemm("linear", 8, 8, 8, 1), new Gemm("linear", 4, 3, 2, 3) }, merged);
    }

    [Fact]
    public void FashionMnistPresetForwardMatchesTheHandCount()
    {
        using var scope = NewDisposeScope();
        using var model = new ImageFlow(Presets.Get("fashion-mnist"));
        using var counter = new FlopCounter(model);
        const int batch = 2;
        var x = randint(0, 256, new long[] { batch, 1, 28, 28 }).to_type(float32);
        var gemms = counter.Count(batch, () => { using var _ = no_grad(); model.BitsPerDim(x); });
        // 4 layers x 2 inner couplings, MLPs with one hidden layer of 96.
        // Channel mixing: 49 patches of 16 values, 8 condition 8: Linear(8, 96), Linear(96, 16).
        double channel = 2.0 * batch * 49 * (8 * 96 + 96 * 16);
        // Patch mixing: 16 columns of 49 patches, halves 24 | 25 then swapped:
        // Linear(24, 96), Linear(96, 2 * 25) and Linear(25, 96), Linear(96, 2 * 24).
        double patch = 2.0 * batch * 16 * (24 * 96 + 96 * 50) + 2.0 * batch * 16 * (25 * 96 + 96 * 48);
        Assert.Equal(4 * (2 * channel + patch), gemms.Sum(g => g.Flops));
    }
}
