using MixerFlow.Core;
using TorchSharp;

namespace MixerFlow.Host.Models;

/// <summary>A model's bijector with its parts grouped for the parameter breakdown.</summary>
public sealed record BuiltFlow(Bijector Body, IReadOnlyDictionary<string, IReadOnlyList<torch.nn.Module>> Parts);

/// <summary>MixerFlow assembled from Core bijectors (the seed design).</summary>
public static class MixerFlowBuilder
{
    /// <summary>A vector flow over `dim` values: InnerSteps steps of the chosen kind.</summary>
    public static Bijector VectorFlow(MixerFlowConfig c, InnerFlow kind, long dim)
    {
        var steps = new List<Bijector>();
        var conditioner = Conditioner(c);
        for (int s = 0; s < c.InnerSteps; s++)
        {
            // Alternate the halves so that consecutive steps transform every value.
            var partition = s % 2 == 0 ? Partition.Halves(dim) : Partition.Halves(dim).Swapped;
            // A class-conditional model feeds the one-hot class to every conditioner (the context).
            ElementwiseMap map = kind switch
            {
                InnerFlow.Affine or InnerFlow.Maf => new Affine(),
                InnerFlow.Additive => new Additive(),
                InnerFlow.Spline => new RationalQuadratic(c.SplineBins, c.SplineBound),
                _ => throw new ArgumentOutOfRangeException(nameof(kind)),
            };
            steps.Add(kind == InnerFlow.Maf
                ? new MaskedAutoregressive(dim, c.HiddenWidth, c.HiddenDepth, map, c.Classes)
                : new Coupling(new[] { dim }, partition, conditioner, map, c.Classes));
            if (kind == InnerFlow.Maf && s < c.InnerSteps - 1) steps.Add(Permutation.Reverse(new[] { dim }));
        }
        return steps.Count == 1 ? steps[0] : new Chain(steps);
    }

    /// <summary>The coupling conditioners' factory: the configuration's network and precision.</summary>
    public static ConditionerFactory Conditioner(MixerFlowConfig c) => c.Conditioner switch
    {
        ConditionerKind.Kan => Conditioners.Kan(c.HiddenWidth, c.HiddenDepth, c.KanGrid, c.KanRange),
        _ when c.ConditionerPrecision == ConditionerPrecision.Bfloat16 => Conditioners.Mlp(c.HiddenWidth, c.HiddenDepth, torch.ScalarType.BFloat16),
        _ => Conditioners.Mlp(c.HiddenWidth, c.HiddenDepth),
    };

    static Bijector Norm(MixerFlowConfig c, long[] shape) => c.Norm == Normalisation.ActNorm
        ? new ActNorm(shape)
        : new BatchNormFlow(shape);

    /// <summary>The parameter groups of a MixerFlow model, filled while it is built.</summary>
    sealed class Groups
    {
        public readonly List<torch.nn.Module> Channel = new(), Patch = new(), Norms = new(), Reshapes = new(), Priors = new();
    }

    /// <summary>
    /// One mixing layer on the patches x features matrix [P, d]: channel mixing (each row), a
    /// normalisation, patch mixing (each column), a normalisation.
    /// </summary>
    static IEnumerable<Bijector> Mixing(MixerFlowConfig c, long p, long d, Groups g)
    {
        var channelMixing = new RowWise(p, VectorFlow(c, c.ChannelFlow, d));
        var patchMixing = new ColumnWise(d, VectorFlow(c, c.PatchFlow, p));
        var n1 = Norm(c, new[] { p, d });
        var n2 = Norm(c, new[] { p, d });
        g.Channel.Add(channelMixing); g.Patch.Add(patchMixing); g.Norms.Add(n1); g.Norms.Add(n2);
        return new Bijector[] { channelMixing, n1, patchMixing, n2 };
    }

    /// <summary>
    /// The split after a layer, on the matrix [P, d]: the second half of every row (patch) is
    /// factored out under a Gaussian prior given the first half (an affine coupling of each row, as
    /// Glow's split prior: with a standard normal base, N(mu(kept), sigma(kept)^2)), and the layers
    /// <paramref name="from"/> to the last (numbered from 0) mix the first half, [P, d / 2], split
    /// again after the layers <paramref name="splits"/> names.
    /// </summary>
    static IEnumerable<Bijector> Split(MixerFlowConfig c, long p, long d, int from, Queue<int> splits, Groups g)
    {
        var prior = new RowWise(p, new Coupling(new[] { d }, Partition.Halves(d), Conditioner(c), new Affine(), c.Classes));
        g.Priors.Add(prior);
        long kept = d / 2;
        var rest = new List<Bijector>();
        int next = splits.Count > 0 ? splits.Dequeue() : c.Layers;
        for (int l = from; l < next; l++) rest.AddRange(Mixing(c, p, kept, g));
        if (next < c.Layers) rest.AddRange(Split(c, p, kept, next, splits, g));
        return new Bijector[] { prior, new Partial(new[] { p, d }, 1, kept, rest.Count == 1 ? rest[0] : new Chain(rest)) };
    }

    public static BuiltFlow Build(MixerFlowConfig c)
    {
        var image = c.ImageShape;
        var geometry = c.Geometry;
        long p = geometry.Patches, d = geometry.Features;
        var g = new Groups();
        var parts = new List<Bijector> { new Logit(image, c.Alpha) };
        var preprocess = new List<torch.nn.Module> { parts[0] };
        // Layers on the image up to the first split (all of them without one); the split's layer
        // ends with the split and every later layer inside it, on the matrix (no patch shifts).
        var splits = new Queue<int>(c.SplitAfter);
        int imageLayers = splits.Count > 0 ? splits.Dequeue() : c.Layers;
        for (int l = 0; l < imageLayers; l++)
        {
            var patchify = new Patchify(geometry);
            var unpatchify = new Inverted(new Patchify(geometry));
            parts.Add(patchify);
            parts.AddRange(Mixing(c, p, d, g));
            if (l == imageLayers - 1 && imageLayers < c.Layers) parts.AddRange(Split(c, p, d, imageLayers, splits, g));
            parts.Add(unpatchify);
            g.Reshapes.Add(patchify); g.Reshapes.Add(unpatchify);
            var (dy, dx) = geometry.ShiftAfter(l);
            if (c.Shift && l < imageLayers - 1 && (dy != 0 || dx != 0))
            {
                var shift = new Shift(image, dy, dx);
                parts.Add(shift); g.Reshapes.Add(shift);
            }
        }
        var groups = new Dictionary<string, IReadOnlyList<torch.nn.Module>>
        {
            ["preprocess (logit)"] = preprocess,
            ["patchify and shifts"] = g.Reshapes,
            ["channel-mixing flows"] = g.Channel,
            ["patch-mixing flows"] = g.Patch,
            ["normalisation"] = g.Norms,
        };
        if (g.Priors.Count > 0) groups["split priors"] = g.Priors;
        return new BuiltFlow(new Chain(parts), groups);
    }
}

/// <summary>Multi-scale Glow (Kingma and Dhariwal 2018) from the same Core bijectors.</summary>
public static class GlowBuilder
{
    public static BuiltFlow Build(GlowConfig c)
    {
        var actnorms = new List<torch.nn.Module>();
        var convs = new List<torch.nn.Module>();
        var couplings = new List<torch.nn.Module>();
        var priors = new List<torch.nn.Module>();
        var logit = new Logit(c.ImageShape, c.Alpha);

        // One level on [C, H, W]: squeeze, K steps, then (but for the last level) a split whose
        // factored-out half gets a learned Gaussian prior given the other half, with the next
        // level on the half that stays; unsqueezed at the end so shapes match (log-det 0).
        Bijector Level(long ch, long h, long w, int levelsLeft)
        {
            var squeezed = new[] { 4 * ch, h / 2, w / 2 };
            var parts = new List<Bijector> { new Squeeze(new[] { ch, h, w }) };
            for (int k = 0; k < c.StepsPerLevel; k++)
            {
                var an = new ActNorm(squeezed, new[] { 0 });
                var conv = new LULinear(squeezed);
                var coupling = new AffineCoupling(squeezed, Partition.Halves(4 * ch), Conditioners.Conv(c.GlowWidth), ScaleBound.Sigmoid);
                parts.AddRange(new Bijector[] { an, conv, coupling });
                actnorms.Add(an); convs.Add(conv); couplings.Add(coupling);
            }
            if (levelsLeft > 1)
            {
                var prior = new AffineCoupling(squeezed, Partition.Halves(4 * ch), Conditioners.ZeroConv());
                priors.Add(prior);
                parts.Add(prior);
                parts.Add(new Partial(squeezed, 2 * ch, Level(2 * ch, h / 2, w / 2, levelsLeft - 1)));
            }
            parts.Add(new Inverted(new Squeeze(new[] { ch, h, w })));
            return new Chain(parts);
        }

        var body = new Chain(new Bijector[] { logit, Level(c.Channels, c.Height, c.Width, c.Levels) });
        return new BuiltFlow(body, new Dictionary<string, IReadOnlyList<torch.nn.Module>>
        {
            ["preprocess (logit)"] = new torch.nn.Module[] { logit },
            ["actnorm"] = actnorms,
            ["invertible 1x1 convolutions"] = convs,
            ["affine couplings"] = couplings,
            ["split priors"] = priors,
        });
    }
}
