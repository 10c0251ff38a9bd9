// Composing a custom flow from MixerFlow.Core in C#, with a bijector of our own, and checking
// it with the same property checks the built-in bijectors pass.
//   dotnet run --project examples/CustomFlow
using MixerFlow.Core;
using MixerFlow.Checks;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

// 1. Check the custom bijector and a flow built from it and built-in parts.
var specs = new[]
{
    new BijectorSpec("elementwise-sinh-affine", rng => new SinhAffine(rng.Next(2, 6))),
    new BijectorSpec("custom-flow", rng =>
    {
        long d = 2 * rng.Next(1, 4);
        return new Chain(new Bijector[]
        {
            new ActNorm(new[] { d }),
            new SinhAffine(d),
            new AffineCoupling(new[] { d }, Partition.Halves(d), Conditioners.Mlp(16, 2)),
            LULinear.Vector(d),
            new SplineCoupling(new[] { d }, Partition.Halves(d).Swapped, Conditioners.Mlp(16, 2)),
        });
    }),
};
int failures = 0;
foreach (var spec in specs)
    foreach (var result in BijectorChecks.RunAll(spec, CheckOptions.Float64.WithCases(8)))
    {
        if (!result.Applicable) continue;
        Console.WriteLine($"{result.Bijector,-24} ({result.Letter}) {result.Check,-14} worst {result.WorstError:0.0e+00}  {(result.Passed ? "pass" : "FAIL")}");
        if (!result.Passed) { failures++; Console.WriteLine(result.Message); }
    }

// 2. Check one given instance as it is (a trained model, say): not rebuilt, not re-noised, and
//    left as it was. Without a factory of fresh instances the save/load check is skipped.
var given = new Chain(new Bijector[] { new ActNorm(new[] { 4L }), new SinhAffine(4), LULinear.Vector(4) });
foreach (var result in BijectorChecks.RunOn(given, CheckOptions.Float32.WithCases(4), n => randn(n, 4).mul(Ops.Scalar(2.0))))
{
    Console.WriteLine($"{"given instance",-24} ({result.Letter}) {result.Check,-14} " +
        (result.Applicable ? $"worst {result.WorstError:0.0e+00}  {(result.Passed ? "pass" : "FAIL")}" : $"skipped: {result.Message}"));
    if (!result.Passed) { failures++; Console.WriteLine(result.Message); }
}
return failures == 0 ? 0 : 1;

/// <summary>
/// y = sinh(a * asinh(x) + b) elementwise (a sinh-arcsinh map, Jones and Pewsey 2009), a > 0.
/// dy/dx = cosh(a asinh(x) + b) * a / sqrt(1 + x^2).
/// </summary>
sealed class SinhAffine : Bijector
{
    readonly Parameter logA;
    readonly Parameter b;

    public SinhAffine(long dim) : base("SinhAffine", new[] { dim }, new[] { dim })
    {
        logA = new Parameter(zeros(dim));
        b = new Parameter(zeros(dim));
        // Registered under the field names, so that to(dtype / device) updates the fields.
        register_parameter(nameof(logA), logA);
        register_parameter(nameof(b), b);
    }

    // Arithmetic through methods and Ops, not `a + b` or `t * 0.5`: TorchSharp's operators (and
    // any number where a Scalar is expected) create a temporary Scalar that the garbage collector
    // can free while native code still reads it. Ops.Scalar(c) is cached for the process's life.
    public override Transformed Forward(Tensor x)
    {
        var u = Ops.Add(logA.exp().mul(x.asinh()), b);
        var halfLog1pX2 = Ops.AddScalar(x.mul(x), 1.0).log().mul(Ops.Scalar(0.5));
        var logDet = Ops.Add(u.cosh().log(), logA).sub(halfLog1pX2).sum(1);
        return new Transformed(u.sinh(), logDet);
    }

    public override Transformed Inverse(Tensor y)
    {
        var x = y.asinh().sub(b).mul(logA.neg().exp()).sinh();
        var forward = Forward(x);
        return new Transformed(x, forward.LogDet.neg());
    }
}
