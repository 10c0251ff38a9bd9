using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Distributed;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>Held-out scores of a model: bits per dimension with its standard error, latents, linear probe.</summary>
public static class Evaluation
{
    /// <summary>Images per batch of a held-out evaluation unless told otherwise (the trainer's and <c>eval</c>'s).</summary>
    public const int DefaultBatchSize = MixerFlow.Core.Defaults.EvaluationBatchSize;

    /// <summary>
    /// Mean bits/dim over <paramref name="data"/> with its standard error, in evaluation mode
    /// without gradients. The dequantisation noise is drawn from <paramref name="seed"/>, so the
    /// score is reproducible. With a <paramref name="communicator"/> of several ranks (every rank
    /// calls it) the batches are dealt out round-robin, each scored with the noise one process
    /// would draw for it, and the mean and squared deviations are reduced: every rank gets the
    /// one-process score.
    /// </summary>
    public static (double Mean, double StdErr) BitsPerDim(ImageFlow model, ImageDataset data, int batchSize = DefaultBatchSize, Device? device = null, int seed = 1234,
                                                          ICommunicator? communicator = null)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(batchSize);
        if (data.Count == 0) throw new UserError($"{data.Source}: no images to evaluate");
        device ??= model.Device;
        int size = communicator?.Size ?? 1, rank = communicator?.Rank ?? 0;
        var m = model.Config;
        var all = new List<double>(data.Count);
        model.Evaluating(() =>
        {
            manual_seed(seed);
            for (int start = 0, k = 0; start < data.Count; start += batchSize, k++)
            {
                int n = Math.Min(batchSize, data.Count - start);
                using var scope = NewDisposeScope();
                // The noise of the batch's dequantisation, drawn by every rank for every batch, so
                // the generator is where one process's would be (the same draw as its rand_like).
                var noise = rand([n, m.Channels, m.Height, m.Width], dtype: model.DType, device: device);
                if (k % size != rank) continue;
                model.Dequantize.Noise = noise;
                try
                {
                    var idx = Enumerable.Range(start, n).ToArray();
                    all.AddRange(model.BitsPerDim(data.Batch(idx).to(model.DType).to(device)).to_type(float64).cpu().data<double>().ToArray());
                }
                finally { model.Dequantize.Noise = null!; }
            }
        });
        if (size == 1)
        {
            double mean = all.Average();
            double sd = Math.Sqrt(all.Sum(v => (v - mean) * (v - mean)) / Math.Max(1, all.Count - 1));
            return (mean, sd / Math.Sqrt(all.Count));
        }
        // Two passes over the ranks, as over the images above: the mean, then the squared deviations.
        var sums = new[] { all.Count, all.Sum() };
        communicator!.AllReduceSum(sums);
        double count = sums[0], globalMean = sums[1] / count;
        var squares = new[] { all.Sum(v => (v - globalMean) * (v - globalMean)) };
        communicator.AllReduceSum(squares);
        return (globalMean, Math.Sqrt(squares[0] / Math.Max(1, count - 1)) / Math.Sqrt(count));
    }

    /// <summary>The latents of every image of <paramref name="data"/>, flattened: [N, C*H*W] on the CPU.</summary>
    public static Tensor Latents(ImageFlow model, ImageDataset data, int batchSize = DefaultBatchSize)
    {
        var parts = new List<Tensor>();
        for (int s = 0; s < data.Count; s += batchSize)
        {
            var idx = Enumerable.Range(s, Math.Min(batchSize, data.Count - s)).ToArray();
            // Every temporary in a scope: one the GC finalizes mid-op would be freed under the op.
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            parts.Add(model.Encode(data.Batch(idx).to(model.DType).to(model.Device)).flatten(1).cpu().MoveToOuterDisposeScope());
        }
        return cat(parts, 0);
    }

    /// <summary>
    /// Linear-probe accuracy: softmax regression (standardised inputs, small L2 penalty, Adam) fitted
    /// on <paramref name="trainZ"/> and scored on <paramref name="testZ"/>.
    /// </summary>
    public static double LinearProbeAccuracy(Tensor trainZ, int[] trainY, Tensor testZ, int[] testY, int epochs = 100)
    {
        int classes = Math.Max(trainY.Max(), testY.Max()) + 1;
        var mean = trainZ.mean(new long[] { 0 }, keepdim: true);
        var std = Ops.AddScalar(trainZ.std(0, keepdim: true), 1e-6);
        var x = (trainZ - mean) / std;
        var y = tensor(trainY.Select(v => (long)v).ToArray());
        var lin = nn.Linear(x.shape[1], classes);
        using var opt = new Adam(lin.parameters(), 0.01);
        for (int e = 0; e < epochs; e++)
        {
            using var scope = NewDisposeScope();
            opt.ZeroGrad();
            var penalty = lin.weight.pow(Ops.Scalar(2)).sum().mul(Ops.Scalar(1e-4));
            var loss = Ops.Add(nn.functional.cross_entropy(lin.call(x), y), penalty);
            loss.backward();
            opt.Step();
        }
        using var _ = no_grad();
        var pred = lin.call((testZ - mean) / std).argmax(1);
        var truth = tensor(testY.Select(v => (long)v).ToArray());
        return pred.eq(truth).to_type(float64).mean().item<double>();
    }
}
