using MixerFlow.Core;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// Volume-preserving steps (shifts, reshapes, permutations) make their zero log-det only when it
/// is read, and a chain adds only the log-dets that are not known zeros: the same numbers, fewer tensors.
/// </summary>
public class VolumePreservingTests
{
    [Fact]
    public void A_zero_log_det_is_made_when_read_with_the_batch_dtype_and_device()
    {
        var shift = new Shift(new long[] { 1, 4, 4 }, 1, 2);
        var x = randn(3, 1, 4, 4, dtype: float64);
        var r = shift.Forward(x);
        Assert.True(r.IsVolumePreserving);
        Assert.Equal(new long[] { 3 }, r.LogDet.shape);
        Assert.Equal(float64, r.LogDet.dtype);
        Assert.Equal(0.0, r.LogDet.abs().max().item<double>());
        Assert.Throws<ArgumentNullException>(() => new Transformed(x, null!));
    }

    [Fact]
    public void A_chain_sums_only_the_log_dets_that_are_not_zero_and_gets_the_same_numbers()
    {
        manual_seed(3);
        var shape = new long[] { 1, 4, 4 };
        var norm = new ActNorm(shape, new[] { 0 });
        using (no_grad()) foreach (var p in norm.parameters()) p.copy_(randn_like(p));
        var parts = new Bijector[] { new Shift(shape, 1, 1), norm, new Shift(shape, 2, 3) };
        var chain = new Chain(parts);
        var x = randn(5, 1, 4, 4);
        var r = chain.Forward(x);
        Assert.False(r.IsVolumePreserving);
        // The parts one by one, every log-det read and added.
        var h = x;
        var sum = zeros(5);
        foreach (var p in parts) { var q = p.Forward(h); h = q.Value; sum = Ops.Add(sum, q.LogDet); }
        Assert.Equal(0.0, r.Value.sub(h).abs().max().item<float>());
        Assert.Equal(0.0, r.LogDet.sub(sum).abs().max().item<float>());
        Assert.True(r.LogDet.abs().max().item<float>() > 0, "ActNorm with random parameters has a non-zero log-det");
        // Only volume-preserving parts: the chain is one too, in both directions.
        var shifts = new Chain(new Bijector[] { new Shift(shape, 1, 1), new Shift(shape, 2, 3) });
        Assert.True(shifts.Forward(x).IsVolumePreserving);
        Assert.True(shifts.Inverse(x).IsVolumePreserving);
        Assert.Equal(0.0, shifts.Inverse(shifts.Forward(x).Value).Value.sub(x).abs().max().item<float>());
    }
}
