using System.Diagnostics;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MixerFlow.Speed;

/// <summary>One GEMM shape as LibTorch's CPU path runs it: [M, K] x [K, N], <see cref="Count"/> times.</summary>
public readonly record struct Gemm(string Kind, long M, long K, long N, long Count)
{
    public double Flops => 2.0 * M * K * N * Count;
    public string Shape => $"{Kind} [{M}x{K}]x[{K}x{N}]" + (Count > 1 ? $" x{Count}" : "");
}

/// <summary>
/// Counts the matmul FLOPs of a forward pass from the shapes that really run: a forward hook on
/// every <see cref="Linear"/> (x [.., K] times W^T [K, N]: M = rows of x) and <see cref="Conv2d"/>
/// (ATen's im2col path: per image [C_out, C_in/groups * kh * kw] x [.., H_out * W_out]), plus
/// Glow's invertible 1x1 convolutions (<see cref="MixerFlow.Core.LULinear"/>, not a hookable
/// module) analytically: their C x C weight times [C, H*W] per image, and the two C^3 products
/// that compose the weight from P, L and U, once per forward pass. Elementwise work (ActNorm,
/// couplings' affine maps, logit, log-dets) is not counted. A training step is counted as 3x
/// its forward pass (backward: the gradient of the input and of the weight, each a GEMM of the
/// forward's size).
/// </summary>
public sealed class FlopCounter : IDisposable
{
    readonly List<Gemm> seen = new();
    readonly List<double> seenSeconds = new();
    long started;
    readonly List<Action> hooks = new();
    readonly List<(long C, long Pixels)> luLinears = new();
    public bool Recording { get; set; }
    /// <summary>The kind of a Linear's product computed in bfloat16 (ReluNetwork.ComputeType).</summary>
    public const string ReducedLinear = "linear-bf16";

    public FlopCounter(nn.Module root)
    {
        // Convolutions that ReluNetwork and SameConvolution compute as GEMMs (GemmConvolution,
        // ThinConvolution) are not called as modules; they are counted as the convolution they
        // compute (the same FLOPs), while this counter records.
        if (root.modules().Prepend(root).Any(m => m is MixerFlow.Core.ReluNetwork or MixerFlow.Core.SameConvolution))
        {
            MixerFlow.Core.GemmConvolution.Observer = (weight, x, y, seconds) =>
            {
                if (!Recording) return;
                var w = weight.shape;
                seen.Add(new Gemm("conv", w[0], w[1] * w[2] * w[3], y.shape[2] * y.shape[3], x.shape[0]));
                seenSeconds.Add(seconds);
            };
            hooks.Add(() => MixerFlow.Core.GemmConvolution.Observer = null);
        }
        // A ReluNetwork computing in bfloat16 runs each Linear as an autograd node of its own, not as
        // a module: its products are counted from its layers' shapes, as "linear-bf16".
        var reduced = root.modules().OfType<MixerFlow.Core.ReluNetwork>().Where(r => r.ComputeType.HasValue).ToList();
        var inReduced = reduced.SelectMany(r => r.Layers.OfType<Linear>()).ToHashSet(ReferenceEqualityComparer.Instance);
        foreach (var r in reduced)
        {
            var rp = r.register_forward_pre_hook((mod, x) => { started = Stopwatch.GetTimestamp(); return x; });
            hooks.Add(() => rp.remove());
            var rh = r.register_forward_hook((mod, x, y) =>
            {
                if (!Recording) return y;
                long rows = x.numel() / x.shape[^1];
                var linears = ((MixerFlow.Core.ReluNetwork)mod).Layers.OfType<Linear>().ToList();
                // The network's time (casts and ReLUs included), shared by its products' FLOPs.
                double seconds = Stopwatch.GetElapsedTime(started).TotalSeconds;
                var gemms = linears.Select(l => new Gemm(ReducedLinear, rows, l.weight!.shape[1], l.weight!.shape[0], 1)).ToList();
                double flops = gemms.Sum(g => g.Flops);
                foreach (var g in gemms)
                {
                    seen.Add(g);
                    seenSeconds.Add(seconds * g.Flops / flops);
                }
                return y;
            });
            hooks.Add(() => rh.remove());
        }
        foreach (var m in root.modules())
        {
            if (inReduced.Contains(m)) continue;
            switch (m)
            {
                case Linear linear:
                    var lp = linear.register_forward_pre_hook((mod, x) => { started = Stopwatch.GetTimestamp(); return x; });
                    hooks.Add(() => lp.remove());
                    var lh = linear.register_forward_hook((mod, x, y) =>
                    {
                        if (Recording)
                        {
                            long k = x.shape[^1], n = y.shape[^1];
                            seen.Add(new Gemm("linear", x.numel() / k, k, n, 1));
                            seenSeconds.Add(Stopwatch.GetElapsedTime(started).TotalSeconds);
                        }
                        return y;
                    });
                    hooks.Add(() => lh.remove());
                    break;
                case Conv2d conv:
                    var cp = conv.register_forward_pre_hook((mod, x) => { started = Stopwatch.GetTimestamp(); return x; });
                    hooks.Add(() => cp.remove());
                    var ch = conv.register_forward_hook((mod, x, y) =>
                    {
                        if (Recording)
                        {
                            var w = ((Conv2d)mod).weight!.shape; // [C_out, C_in / groups, kh, kw]
                            long groups = x.shape[1] / w[1];
                            seen.Add(new Gemm("conv", w[0] / groups, w[1] * w[2] * w[3], y.shape[2] * y.shape[3], x.shape[0] * groups));
                            seenSeconds.Add(Stopwatch.GetElapsedTime(started).TotalSeconds);
                        }
                        return y;
                    });
                    hooks.Add(() => ch.remove());
                    break;
                case MixerFlow.Core.LULinear lu:
                    var s = lu.InputShape;
                    luLinears.Add((s[0], s.Skip(1).Aggregate(1L, (a, b) => a * b)));
                    break;
            }
        }
    }

    /// <summary>Runs <paramref name="forward"/> once with recording on; returns the GEMMs of that pass.</summary>
    public IReadOnlyList<Gemm> Count(long batch, Action forward)
    {
        seen.Clear();
        seenSeconds.Clear();
        Recording = true;
        try { forward(); }
        finally { Recording = false; }
        var all = new List<Gemm>(seen);
        foreach (var (c, pixels) in luLinears)
        {
            all.Add(new Gemm("1x1", c, c, pixels, batch));
            all.Add(new Gemm("lu-weight", c, c, c, 2));
        }
        return all;
    }

    /// <summary>
    /// Seconds spent inside the hooked modules' forward calls (Linear with its bias, Conv2d with
    /// im2col) during the last <see cref="Count"/>, per merged shape (the 1x1 convolutions'
    /// analytic shapes are not timed and are absent).
    /// </summary>
    public IReadOnlyDictionary<(string Kind, long M, long K, long N), double> SecondsByShape() =>
        seen.Zip(seenSeconds).GroupBy(p => (p.First.Kind, p.First.M, p.First.K, p.First.N))
            .ToDictionary(g => g.Key, g => g.Sum(p => p.Second));

    /// <summary>The same shapes merged (their counts added), largest FLOP total first.</summary>
    public static IReadOnlyList<Gemm> Merge(IEnumerable<Gemm> gemms) =>
        gemms.GroupBy(g => (g.Kind, g.M, g.K, g.N))
             .Select(g => new Gemm(g.Key.Kind, g.Key.M, g.Key.K, g.Key.N, g.Sum(x => x.Count)))
             .OrderByDescending(g => g.Flops).ToList();

    public void Dispose()
    {
        foreach (var remove in hooks) remove();
        hooks.Clear();
    }
}
