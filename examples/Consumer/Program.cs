// MixerFlow from NuGet packages: fit a neural spline flow to a 2-D mixture of Gaussians, compare
// its held-out log-likelihood with the true one, sample it, run the property checks on the trained
// flow, and take a few training steps of a MixerFlow image model. Exits non-zero on any failure.
using MixerFlow.Checks;
using MixerFlow.Core;
using MixerFlow.Host.Models;
using TorchSharp;
using static TorchSharp.torch;

torch.manual_seed(0);
// Small tensors: one LibTorch thread is faster than two that spin-wait on each other.
torch.set_num_threads(1);
var mixture = new Mixture(seed: 1);
var train = mixture.Sample(20_000);
var heldOut = mixture.Sample(10_000);

// 1. Fit an NSF by maximum likelihood with MixerFlow.Core's Fitting.Fit: shuffled batches, a
// dispose scope per step, MixerFlow.Core's Adam (no temporary Scalars), gradient clipping, and the
// parameters that score best on a validation set (not the held-out set of step 2).
var flow = Flows.NSF(features: 2, transforms: 3);
var validation = mixture.Sample(5_000);
var clock = System.Diagnostics.Stopwatch.StartNew();
var fit = Fitting.Fit(flow, train, FitOptions.Default
    .WithSteps(1000).WithBatchSize(512).WithLearningRate(3e-3)
    .WithHeldOut(validation).WithEvaluateEvery(250).WithPatience(2)
    .WithProgress(p => Console.WriteLine(p)));
Console.WriteLine($"trained {fit.Steps} steps in {clock.Elapsed.TotalSeconds:F1} s; best validation NLL {fit.BestHeldOutNll:F4} nats at step {fit.BestStep}");

// 2. Held-out log-likelihood next to the true one.
flow.eval();
double model, truth;
using (no_grad())
{
    model = flow.LogProb(heldOut).mean().item<float>();
    truth = mixture.LogProb(heldOut).mean().item<double>();
}
double gap = truth - model;
Console.WriteLine($"held-out log-likelihood: flow {model:F4}, true {truth:F4} nats per sample; gap {gap:F4} (must be < 0.1)");

// 3. Samples: their mean and spread against the mixture's.
var (samples, logp) = flow.SampleWithLogProb(10_000);
using (no_grad())
{
    var m = samples.mean(new long[] { 0 }).data<float>().ToArray();
    var s = samples.std(0).data<float>().ToArray();
    var tm = heldOut.mean(new long[] { 0 }).data<float>().ToArray();
    var ts = heldOut.std(0).data<float>().ToArray();
    Console.WriteLine($"samples: mean ({m[0]:F3}, {m[1]:F3}) std ({s[0]:F3}, {s[1]:F3}); data: mean ({tm[0]:F3}, {tm[1]:F3}) std ({ts[0]:F3}, {ts[1]:F3})");
    Console.WriteLine($"samples' log-density under the flow: {logp.mean().item<float>():F4}; under the truth: {mixture.LogProb(samples).mean().item<double>():F4}");
}

// 4. The property checks on the trained flow (inverse, log-det against autograd, ...).
var results = BijectorChecks.RunOn(flow.Transform, CheckOptions.Float64);
int failed = 0;
foreach (var r in results.Where(r => r.Applicable))
{
    Console.WriteLine($"  {(r.Passed ? "pass" : "FAIL")}  {r.Check,-14} worst error {r.WorstError:E1}, tolerance {r.Tolerance:E0}{(r.Passed ? "" : ": " + r.Message)}");
    if (!r.Passed) failed++;
}
Console.WriteLine($"checks on the trained flow: {results.Count(r => r.Applicable) - failed} passed, {failed} failed");

// 5. A MixerFlow image model from MixerFlow.Host: a few Adam steps on 28x28 images.
var image = new ImageFlow(Presets.Get("tiny"));
using var imageOptimizer = new Adam(image.parameters(), 5e-3);
const int imageSteps = 20;
var pictures = Pictures(16);
double first = double.NaN, last = double.NaN;
for (int step = 0; step < imageSteps; step++)
{
    using var scope = NewDisposeScope();
    var bpd = image.BitsPerDim(pictures).mean();
    imageOptimizer.ZeroGrad();
    bpd.backward();
    imageOptimizer.Step();
    last = bpd.item<float>();
    if (step == 0) first = last;
}
Console.WriteLine($"MixerFlow 'tiny' ({image.ParameterCount:N0} parameters): bits/dim {first:F3} -> {last:F3} in {imageSteps} steps");

bool ok = gap < 0.1 && fit.SkippedSteps == 0 && failed == 0 && double.IsFinite(first) && double.IsFinite(last);
Console.WriteLine(ok ? "consumer: all good" : "consumer: FAILED");
return ok ? 0 : 1;

// 16 images of soft bright discs on a dark ground, pixel values 0..255 as float32 [B, 1, 28, 28].
static Tensor Pictures(int n)
{
    var g = arange(28, dtype: float32);
    var (yy, xx) = (g.view(1, 1, 28, 1), g.view(1, 1, 1, 28));
    // Ops and cached Scalars instead of `t * 14 + 7`: TorchSharp's operators with numbers create
    // temporary Scalars that the garbage collector can free while native code reads them.
    var cx = Ops.AddScalar(rand(n, 1, 1, 1).mul(Ops.Scalar(14.0)), 7.0);
    var cy = Ops.AddScalar(rand(n, 1, 1, 1).mul(Ops.Scalar(14.0)), 7.0);
    var d2 = Ops.Add(xx.sub(cx).pow(Ops.Scalar(2.0)), yy.sub(cy).pow(Ops.Scalar(2.0)));
    return exp(d2.div(Ops.Scalar(-30.0))).mul(Ops.Scalar(255.0)).round().clamp(Ops.Scalar(0.0), Ops.Scalar(255.0));
}

/// <summary>Three correlated Gaussians in the plane: exact samples and log-density.</summary>
sealed class Mixture(int seed)
{
    readonly double[] weights = { 0.45, 0.35, 0.20 };
    readonly double[][] means = { new[] { -2.0, -1.0 }, new[] { 2.0, -1.0 }, new[] { 0.0, 2.0 } };
    // Lower-triangular Cholesky factors of the covariances.
    readonly double[][] chol = { new[] { 0.8, 0.0, 0.5, 0.6 }, new[] { 0.7, 0.0, -0.4, 0.6 }, new[] { 1.0, 0.0, 0.0, 0.4 } };
    readonly Random random = new(seed);

    public Tensor Sample(int n)
    {
        var data = new float[n * 2];
        for (int i = 0; i < n; i++)
        {
            double u = random.NextDouble();
            int k = u < weights[0] ? 0 : u < weights[0] + weights[1] ? 1 : 2;
            double e1 = Normal(), e2 = Normal();
            var l = chol[k];
            data[2 * i] = (float)(means[k][0] + l[0] * e1);
            data[2 * i + 1] = (float)(means[k][1] + l[2] * e1 + l[3] * e2);
        }
        return tensor(data).view(n, 2);
    }

    /// <summary>log p(x) per row, in float64.</summary>
    public Tensor LogProb(Tensor x)
    {
        var v = x.to_type(float64).data<double>().ToArray();
        int n = v.Length / 2;
        var result = new double[n];
        for (int i = 0; i < n; i++)
        {
            var terms = new double[3];
            for (int k = 0; k < 3; k++)
            {
                var l = chol[k];
                // Solve L z = x - mu; log N = -|z|^2/2 - log|L| - log(2 pi).
                double z1 = (v[2 * i] - means[k][0]) / l[0];
                double z2 = (v[2 * i + 1] - means[k][1] - l[2] * z1) / l[3];
                terms[k] = Math.Log(weights[k]) - 0.5 * (z1 * z1 + z2 * z2) - Math.Log(l[0] * l[3]) - Math.Log(2 * Math.PI);
            }
            double max = terms.Max();
            result[i] = max + Math.Log(terms.Sum(t => Math.Exp(t - max)));
        }
        return tensor(result);
    }

    double Normal() => Math.Sqrt(-2 * Math.Log(1 - random.NextDouble())) * Math.Cos(2 * Math.PI * random.NextDouble());
}
