using MixerFlow.Core;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>Core's C# face: optional parameters, deconstruction, no F# types in signatures.</summary>
public class CoreApiTests
{
    [Fact]
    public void Factories_take_named_optional_parameters_and_samples_deconstruct()
    {
        manual_seed(1);
        var flow = Flows.NSF(features: 2, transforms: 3);
        var (x, logProb) = flow.SampleWithLogProb(5);
        Assert.Equal(new long[] { 5, 2 }, x.shape);
        Assert.Equal(new long[] { 5 }, logProb.shape);
        Assert.Equal(new long[] { 5 }, flow.LogProb(x).shape);
        var conditional = Flows.RealNVP(3, hidden: 16, context: 2);
        var samples = conditional.Sample(4, randn(2, 2), temperature: 0.5);
        Assert.Equal(new long[] { 8, 3 }, samples.shape);
    }

    [Fact]
    public void Layers_take_maps_bounds_and_conditioners_without_fsharp_types()
    {
        var coupling = new Coupling(new long[] { 4 }, Partition.Halves(4), Conditioners.Mlp(8, 1),
                                    new Affine(ScaleBound.SoftClamp(1.5)), contextFeatures: 2);
        var custom = new ConditionerFactory((inputs, outputs) => nn.Linear(inputs, outputs));
        var spline = new Coupling(new long[] { 4 }, Partition.Alternating(4), custom, new RationalQuadratic(4, 2.0));
        var maf = new MaskedAutoregressive(4, 8, 1, new RationalQuadratic());
        var chain = new Chain(new Bijector[] { coupling, new AffineCoupling(new long[] { 4 }, Partition.Halves(4), Conditioners.Mlp(8, 1), ScaleBound.Sigmoid), spline, maf });
        IReadOnlyList<Bijector> parts = chain.Parts;
        Assert.Equal(4, parts.Count);
        Assert.Equal(2, chain.ContextFeatures);
        var x = randn(3, 4);
        var (y, logDet) = chain.Forward(x, randn(3, 2));
        Assert.Equal(new long[] { 3 }, logDet.shape);
        var bn = new BatchNormFlow(new long[] { 4 }, new[] { 0 }, momentum: 0.2);
        Assert.Equal(0.2, bn.Momentum);
        Assert.Equal(1e-5, bn.Eps);
        Ops.MoveTo(ScalarType.Float64, CPU, bn);
    }
}
