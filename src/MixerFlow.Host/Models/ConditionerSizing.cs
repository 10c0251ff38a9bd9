using MixerFlow.Core;

namespace MixerFlow.Host.Models;

/// <summary>
/// Parameter counts of MixerFlow's coupling conditioners, and the hidden width at which Kan
/// conditioners hold about as many parameters as a configuration's Mlp ones (for comparisons
/// at equal size: <c>mixerflow info --set conditioner=kan --set hiddenWidth=W</c> prints the count).
/// </summary>
public static class ConditionerSizing
{
    /// <summary>
    /// The parameters of every coupling conditioner of <paramref name="c"/> (its channel- and
    /// patch-mixing couplings; MAF steps are not counted), from the shapes the builder gives them.
    /// </summary>
    public static long CouplingConditionerParameters(MixerFlowConfig c)
    {
        ArgumentNullException.ThrowIfNull(c);
        var g = c.Geometry;
        long perLayer = VectorFlow(c, c.ChannelFlow, g.Features) + VectorFlow(c, c.PatchFlow, g.Patches);
        return c.Layers * perLayer;
    }

    static long VectorFlow(MixerFlowConfig c, InnerFlow kind, long dim)
    {
        if (kind == InnerFlow.Maf) return 0;
        long k = kind switch
        {
            InnerFlow.Additive => 1,
            InnerFlow.Spline => new RationalQuadratic(c.SplineBins, c.SplineBound).ParamsPerElement,
            _ => 2,
        };
        long total = 0;
        for (int s = 0; s < c.InnerSteps; s++)
        {
            // Halves, swapped on odd steps (MixerFlowBuilder.VectorFlow).
            long first = dim / 2, second = dim - dim / 2;
            long nA = s % 2 == 0 ? first : second, nB = dim - nA;
            total += c.Conditioner == ConditionerKind.Kan
                ? Conditioners.KanParameterCount(nA + c.Classes, k * nB, c.HiddenWidth, c.HiddenDepth, c.KanGrid)
                : Conditioners.MlpParameterCount(nA + c.Classes, k * nB, c.HiddenWidth, c.HiddenDepth);
        }
        return total;
    }

    /// <summary>
    /// The hiddenWidth at which <paramref name="c"/> with Kan conditioners (its kanGrid, its
    /// hiddenDepth) has the coupling-conditioner parameter count nearest to that of
    /// <paramref name="c"/> with Mlp conditioners (the smaller width on a tie).
    /// </summary>
    public static int KanWidthMatchingMlp(MixerFlowConfig c)
    {
        ArgumentNullException.ThrowIfNull(c);
        long target = CouplingConditionerParameters(c with { Conditioner = ConditionerKind.Mlp });
        int best = 1;
        long bestGap = long.MaxValue;
        for (int w = 1; w <= c.HiddenWidth; w++)
        {
            long gap = Math.Abs(CouplingConditionerParameters(c with { Conditioner = ConditionerKind.Kan, HiddenWidth = w }) - target);
            if (gap < bestGap) { best = w; bestGap = gap; }
        }
        return best;
    }
}
