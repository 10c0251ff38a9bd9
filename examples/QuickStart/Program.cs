using MixerFlow.Core;
using static TorchSharp.torch;

// 2-D data: two Gaussian blobs ([N, 2] float32; any such tensor will do).
manual_seed(0);
Tensor Blobs(int n) => cat(new[] { Ops.AddScalar(randn(n / 2, 2), -2), Ops.AddScalar(randn(n / 2, 2), 2) });
var (train, heldOut) = (Blobs(10_000), Blobs(2_000));

var flow = Flows.NSF(features: 2, transforms: 3);          // a neural spline flow
var fit = Fitting.Fit(flow, train, FitOptions.Default      // Adam, batches, early stopping
    .WithSteps(500).WithBatchSize(256).WithLearningRate(3e-3).WithHeldOut(heldOut));
Console.WriteLine($"held-out NLL {fit.InitialHeldOutNll:F3} -> {fit.BestHeldOutNll:F3} nats");

flow.eval();
using (no_grad())
{
    var logp = flow.LogProb(heldOut);                      // log p(x) per sample: [2000]
    var samples = flow.Sample(1000);                       // new points: [1000, 2]
    Console.WriteLine($"mean log p(x) {logp.mean().item<float>():F3}; {samples.shape[0]} samples");
}
return fit.BestHeldOutNll < fit.InitialHeldOutNll ? 0 : 1;
