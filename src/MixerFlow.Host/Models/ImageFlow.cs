using MixerFlow.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Host.Models;

/// <summary>
/// An image model: dequantisation of the 8-bit pixels, then a bijector (the body) to a latent
/// of the image's shape under a standard normal base. One interface for MixerFlow and Glow.
/// Inputs are batches [B, C, H, W] of pixel values 0..255 (any float dtype).
/// </summary>
public sealed class ImageFlow : nn.Module
{
    public ModelConfig Config { get; }
    public Dequantize Dequantize { get; }
    public Bijector Body { get; }
    readonly IReadOnlyDictionary<string, IReadOnlyList<nn.Module>> parts;

    public ImageFlow(ModelConfig config) : base(NativeChecked("ImageFlow"))
    {
        var problems = config.Problems();
        if (problems.Count > 0) throw new UserError($"model configuration '{config.Name}': {string.Join("; ", problems)}");
        Config = config;
        Dequantize = new Dequantize(config.ImageShape);
        var built = config.Build();
        Body = built.Body;
        parts = built.Parts;
        register_module("body", Body);
    }

    // Before the base constructor, TorchSharp's first chance to fail with a misleading message.
    static string NativeChecked(string name)
    {
        NativeRuntime.EnsureLoaded();
        return name;
    }

    /// <summary>The whole flow, pixels to latent, as one bijector (for the Core checks).</summary>
    public Bijector Flow => new Chain(new Bijector[] { Dequantize, Body });

    public Device Device => Body.parameters().Select(p => p.device).FirstOrDefault() ?? CPU;
    public ScalarType DType => Body.parameters().Select(p => p.dtype).FirstOrDefault(ScalarType.Float32);

    public ImageFlow MoveTo(Device device, ScalarType dtype)
    {
        Ops.MoveTo(dtype, device, this);
        return this;
    }

    /// <summary>log p(x) of the discrete pixels in nats per image (a dequantisation bound).</summary>
    public Tensor LogLikelihood(Tensor x)
    {
        var d = Dequantize.Forward(x);
        var b = Body.Forward(d.Value);
        return Likelihood.StandardNormalLogProb(b.Value) + b.LogDet + d.LogDet;
    }

    /// <summary>Bits per dimension of the 8-bit data, per image.</summary>
    public Tensor BitsPerDim(Tensor x) => Likelihood.BitsPerDim(LogLikelihood(x), Config.Dimensions);

    /// <summary>n samples at a temperature (the base's standard deviation), as pixels 0..255.</summary>
    public Tensor Sample(int n, double temperature)
    {
        using var _ = no_grad();
        var z = randn(new long[] { n }.Concat(Config.ImageShape).ToArray(), dtype: DType, device: Device) * temperature;
        return Decode(z);
    }

    /// <summary>The latent of x (deterministic: mid-bin dequantisation).</summary>
    public Tensor Encode(Tensor x) => AtMidpoint(() => Body.Forward(Dequantize.Forward(x).Value).Value);

    /// <summary>Runs `f` with mid-bin (deterministic) dequantisation.</summary>
    T AtMidpoint<T>(Func<T> f)
    {
        bool saved = Dequantize.Midpoint;
        Dequantize.Midpoint = true;
        try { return f(); }
        finally { Dequantize.Midpoint = saved; }
    }

    /// <summary>Pixels 0..255 from a latent.</summary>
    public Tensor Decode(Tensor z) => Dequantize.Inverse(Body.Inverse(z).Value).Value;

    /// <summary>inverse(forward(x)): pixels 0..255.</summary>
    public Tensor Reconstruct(Tensor x) => Decode(Encode(x));

    /// <summary>
    /// Worst |inverse(forward(y)) - y| over the continuous, dequantised input y, in pixel units
    /// (0..255): the numerical error that rounding in Reconstruct would hide.
    /// </summary>
    public double ReconstructionError(Tensor x)
    {
        using var _ = no_grad();
        return AtMidpoint(() =>
        {
            var y = Dequantize.Forward(x).Value;
            var back = Body.Inverse(Body.Forward(y).Value).Value;
            return ((back - y).abs().max() * Dequantize.Levels).to_type(float64).item<double>();
        });
    }

    public long ParameterCount => parameters().Sum(p => p.numel());

    /// <summary>Parameters per part of the model, in build order.</summary>
    public IReadOnlyList<(string Part, long Parameters)> ParameterBreakdown() =>
        parts.Select(kv => (kv.Key, kv.Value.Sum(m => m.parameters().Sum(p => p.numel())))).ToList();
}
