using MixerFlow.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Host.Models;

/// <summary>
/// An image model as a Core <see cref="Flow"/>: dequantisation of the 8-bit pixels (uniform, or
/// variational with a learned noise flow: <see cref="ModelConfig.Dequantization"/>), then a
/// bijector (the body, MixerFlow or Glow) to a latent of the image's shape under a standard
/// normal base. <c>LogProb</c>, <c>Sample</c> and <c>SampleWithLogProb</c> work on pixel values
/// 0..255 (batches [B, C, H, W], any float dtype), like any other flow's; with variational
/// dequantisation <c>LogProb</c> is the variational bound at one noise draw.
/// Registered state: <c>transform.parts.0</c> (dequantisation; its noise flow under
/// <c>transform.parts.0.flow</c>), <c>transform.parts.1</c> (the body), <c>baseDistribution</c>.
/// </summary>
public sealed class ImageFlow : Flow
{
    public ModelConfig Config { get; }
    readonly IReadOnlyDictionary<string, IReadOnlyList<nn.Module>> parts;

    /// <summary>Builds the model a configuration describes; a <see cref="UserError"/> naming every bad field otherwise.</summary>
    public ImageFlow(ModelConfig config) : this(config, Assemble(config)) { }

    ImageFlow(ModelConfig config, BuiltFlow built)
        : this(config, built, config.BuildDequantizer()) { }

    ImageFlow(ModelConfig config, BuiltFlow built, Dequantize dequantizer)
        : base(new Chain(new Bijector[] { dequantizer, built.Body }), new StandardNormal(config.ImageShape))
    {
        Config = config;
        parts = dequantizer is VariationalDequantize v
            ? new[] { new KeyValuePair<string, IReadOnlyList<nn.Module>>("dequantisation (noise flow)", new nn.Module[] { v.Flow }) }
                .Concat(built.Parts).ToDictionary(kv => kv.Key, kv => kv.Value)
            : built.Parts;
    }

    static BuiltFlow Assemble(ModelConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        // Before TorchSharp's first native call, which would fail with a misleading message.
        NativeRuntime.EnsureLoaded();
        var problems = config.Problems();
        if (problems.Count > 0) throw new UserError($"model configuration '{config.Name}': {string.Join("; ", problems)}");
        return config.Build();
    }

    // Read through the transform, not kept in fields: TorchSharp registers Module-typed fields by
    // reflection, and a second name for the same module would save its tensors twice.
    /// <summary>Dequantisation of the 8-bit pixels, the transform's first part: a
    /// <see cref="VariationalDequantize"/> where the configuration asks for variational dequantisation.</summary>
    public Dequantize Dequantize => (Dequantize)((Chain)Transform).Parts[0];
    /// <summary>The model's bijector after dequantisation (MixerFlow's or Glow's).</summary>
    public Bijector Body => ((Chain)Transform).Parts[1];

    public Device Device => Body.parameters().Select(p => p.device).FirstOrDefault() ?? CPU;
    public ScalarType DType => Body.parameters().Select(p => p.dtype).FirstOrDefault(ScalarType.Float32);

    public ImageFlow MoveTo(Device device, ScalarType dtype)
    {
        Ops.MoveTo(dtype, device, this);
        return this;
    }

    /// <summary>log p(x) of the discrete pixels in nats per image (a dequantisation bound, at one draw of the noise;
    /// with variational dequantisation log p(x + u) - log q(u | x)): the flow's <c>LogProb</c>.</summary>
    public Tensor LogLikelihood(Tensor x) => LogProb(x);

    /// <summary>One-hot class contexts [B, classes] for a class-conditional model, in its dtype and on its device.</summary>
    /// <param name="labels">Class indices in 0 .. classes - 1.</param>
    public Tensor OneHot(IReadOnlyList<int> labels)
    {
        int classes = (int)ContextFeatures;
        if (classes == 0) throw new InvalidOperationException($"model '{Config.Name}' is not class-conditional (classes = 0)");
        var bad = labels.FirstOrDefault(l => l < 0 || l >= classes, -1);
        if (labels.Any(l => l < 0 || l >= classes)) throw new ArgumentOutOfRangeException(nameof(labels), $"labels must lie in 0..{classes - 1}, got {bad}");
        var idx = tensor(labels.Select(l => (long)l).ToArray());
        return nn.functional.one_hot(idx, classes).to(DType).to(Device);
    }

    /// <summary>Bits per dimension of the 8-bit data, per image.</summary>
    public Tensor BitsPerDim(Tensor x) => Likelihood.BitsPerDim(LogLikelihood(x), Config.Dimensions);

    /// <summary>Bits per dimension per image given a context (a class-conditional model's one-hot classes).</summary>
    public Tensor BitsPerDim(Tensor x, Tensor context) => Likelihood.BitsPerDim(LogProb(x, context), Config.Dimensions);

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

    /// <summary>Runs <paramref name="f"/> in evaluation mode without gradients, then restores the mode the model was in.</summary>
    public T Evaluating<T>(Func<T> f)
    {
        ArgumentNullException.ThrowIfNull(f);
        bool wasTraining = training;
        eval();
        try
        {
            using var _ = no_grad();
            return f();
        }
        finally { train(wasTraining); }
    }

    /// <summary>Runs <paramref name="action"/> in evaluation mode without gradients, then restores the mode.</summary>
    public void Evaluating(Action action)
    {
        ArgumentNullException.ThrowIfNull(action);
        Evaluating(() => { action(); return 0; });
    }

    /// <summary>Pixels 0..255 from a latent.</summary>
    public Tensor Decode(Tensor z) => Dequantize.Inverse(Body.Inverse(z).Value).Value;

    /// <summary>inverse(forward(x)): pixels 0..255.</summary>
    public Tensor Reconstruct(Tensor x) => Decode(Encode(x));

    /// <summary>
    /// The images on the path between <paramref name="from"/> and <paramref name="to"/> (each
    /// [1, C, H, W] or [C, H, W], pixels 0..255) in latent space: both are encoded, the latents
    /// interpolated at <paramref name="steps"/> evenly spaced points (the ends included) and
    /// decoded. Spherical interpolation (default) keeps the latents' norm, which a Gaussian base
    /// concentrates on a shell; linear interpolation passes through the low-norm middle.
    /// Returns [steps, C, H, W] pixels.
    /// </summary>
    public Tensor Interpolate(Tensor from, Tensor to, int steps = 8, bool spherical = true)
    {
        ArgumentNullException.ThrowIfNull(from);
        ArgumentNullException.ThrowIfNull(to);
        if (steps < 2) throw new ArgumentOutOfRangeException(nameof(steps), steps, "at least 2 (the two ends)");
        return Evaluating(() =>
        {
            using var scope = NewDisposeScope();
            var shape = new long[] { 1, Config.Channels, Config.Height, Config.Width };
            var za = Encode(from.reshape(shape).to(DType).to(Device)).flatten();
            var zb = Encode(to.reshape(shape).to(DType).to(Device)).flatten();
            double na = za.norm().item<float>(), nb = zb.norm().item<float>();
            double cos = Math.Clamp(za.dot(zb).item<float>() / Math.Max(na * nb, 1e-12), -1.0, 1.0);
            double omega = Math.Acos(cos);
            var rows = new List<Tensor>(steps);
            for (int i = 0; i < steps; i++)
            {
                double t = i / (double)(steps - 1);
                // Slerp weights; linear where asked or where the latents are (nearly) parallel.
                (double wa, double wb) = spherical && Math.Sin(omega) > 1e-6
                    ? (Math.Sin((1 - t) * omega) / Math.Sin(omega), Math.Sin(t * omega) / Math.Sin(omega))
                    : (1 - t, t);
                // Per-call weights: Scalars that live until the native calls return, not entries of
                // the process-lifetime cache of constants (Ops.Scalar), which would keep every one.
                Scalar sa = wa, sb = wb;
                try { rows.Add(Ops.Add(za.mul(sa), zb.mul(sb))); }
                finally { sa.Dispose(); sb.Dispose(); }
            }
            var z = stack(rows).reshape(steps, Config.Channels, Config.Height, Config.Width);
            return Decode(z).MoveToOuterDisposeScope();
        });
    }

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
            return (back - y).abs().max().mul(Ops.Scalar(Dequantize.Levels)).to_type(float64).item<double>();
        });
    }

    /// <summary>
    /// Writes the model's state (every parameter and buffer, under its <c>state_dict</c> name, in
    /// its own dtype) to a safetensors file (<see cref="SafeTensors"/>), for use outside .NET: the
    /// PyTorch mirror in <c>benchmarks/mirror/mixerflow_mirror.py</c> rebuilds the model from the
    /// file alone and loads it by name. The header's metadata carries <c>mixerflow.config</c> (the
    /// configuration JSON as <c>info</c> prints it), <c>mixerflow.parameters</c> (the parameter
    /// count) and <c>format</c> = <c>pt</c>.
    /// </summary>
    /// <param name="path">The .safetensors file to write (replaced atomically).</param>
    public void ExportSafetensors(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        var metadata = new Dictionary<string, string>
        {
            ["format"] = "pt",
            ["mixerflow.config"] = Config.ToJson(),
            ["mixerflow.parameters"] = ParameterCount.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        var state = state_dict();
        SafeTensors.Write(path, state.Select(kv => (kv.Key, kv.Value)), metadata);
    }

    public long ParameterCount => parameters().Sum(p => p.numel());

    /// <summary>Parameters per part of the model, in build order.</summary>
    public IReadOnlyList<(string Part, long Parameters)> ParameterBreakdown() =>
        parts.Select(kv => (kv.Key, kv.Value.Sum(m => m.parameters().Sum(p => p.numel())))).ToList();
}
