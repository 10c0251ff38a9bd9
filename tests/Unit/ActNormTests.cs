using MixerFlow.Core;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>ActNorm's data-dependent initialisation (TFP's Glow test: mean ~0, std ~1 per feature).</summary>
public class ActNormTests
{
    [Fact]
    public void First_training_batch_gives_zero_mean_unit_std_per_channel()
    {
        manual_seed(1);
        var x = randn(64, 3, 4, 4) * tensor(new float[] { 0.5f, 3f, 10f }).reshape(1, 3, 1, 1)
                + tensor(new float[] { -2f, 5f, 100f }).reshape(1, 3, 1, 1);
        var a = new ActNorm(new long[] { 3, 4, 4 }, new[] { 0 });
        Assert.False(a.IsInitialized);
        a.train();
        var y = a.Forward(x).Value;
        Assert.True(a.IsInitialized);
        var mean = y.mean(new long[] { 0, 2, 3 });
        var std = y.std(new long[] { 0, 2, 3 }, unbiased: false);
        for (int c = 0; c < 3; c++)
        {
            Assert.InRange(mean[c].item<float>(), -1e-4f, 1e-4f);
            Assert.InRange(std[c].item<float>(), 1 - 1e-3f, 1 + 1e-3f);
        }
        // Once initialised, a second batch leaves the parameters alone.
        var before = a.LogScale.clone();
        a.Forward(randn(8, 3, 4, 4));
        Assert.Equal(0.0, (a.LogScale - before).abs().max().item<float>());
    }

    [Fact]
    public void Evaluation_mode_does_not_initialise()
    {
        var a = new ActNorm(new long[] { 5 });
        a.eval();
        a.Forward(randn(4, 5) * 7);
        Assert.False(a.IsInitialized);
    }

    [Fact]
    public void The_initialised_flag_is_saved_and_loaded()
    {
        var a = new ActNorm(new long[] { 5 });
        a.train();
        a.Forward(randn(16, 5) * 3 + 1);
        var path = Path.GetTempFileName();
        try
        {
            a.save(path);
            var b = new ActNorm(new long[] { 5 });
            b.load(path);
            Assert.True(b.IsInitialized);
            b.train();
            var x = randn(4, 5);
            Assert.Equal(0.0, (a.Forward(x).Value - b.Forward(x).Value).abs().max().item<float>());
        }
        finally { File.Delete(path); }
    }
}
