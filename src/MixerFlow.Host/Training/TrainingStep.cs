using MixerFlow.Core;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>The outcome of one optimiser step: kept, or dropped by a guard (and why).</summary>
public readonly record struct StepOutcome(bool Kept, double BitsPerDim, string? DroppedBecause);

/// <summary>
/// One training step with its guards: the mean bits/dim of a batch, backward, global-norm gradient
/// clipping, Adam. A step whose loss or gradient norm is not finite, or whose loss the caller
/// rejects (a divergence guard), changes nothing and is reported as dropped: not the parameters,
/// not the optimiser state, and not the model's buffers (batch-norm running statistics, ActNorm's
/// initialised flag), which the forward pass may have updated and which are put back.
/// </summary>
public sealed class TrainingStep(ImageFlow model, Adam optimizer, double clipNorm)
{
    public Adam Optimizer => optimizer;

    /// <summary>
    /// Takes one step on <paramref name="batch"/> (pixels 0..255, on the model's device) at learning
    /// rate <paramref name="lr"/>. <paramref name="rejectLoss"/>, given the finite loss before the
    /// backward pass, returns why the step must be dropped, or null to keep it.
    /// </summary>
    public StepOutcome Take(Tensor batch, double lr, Func<Tensor, Tensor>? transformLoss = null, Func<double, string?>? rejectLoss = null)
    {
        optimizer.LearningRate = lr;
        using var scope = NewDisposeScope();
        // Only buffers a forward pass may change: floating point ones (running statistics) and
        // single values (ActNorm's initialised flag); integer index buffers never change.
        var buffers = model.buffers().Where(b => b.is_floating_point() || b.numel() == 1).ToArray();
        Tensor[] saved;
        using (no_grad()) saved = buffers.Select(b => b.clone()).ToArray();
        StepOutcome Drop(double bpd, string why)
        {
            using (no_grad()) for (int i = 0; i < buffers.Length; i++) buffers[i].copy_(saved[i]);
            return new StepOutcome(false, bpd, why);
        }
        var loss = model.BitsPerDim(batch).mean();
        if (transformLoss is not null) loss = transformLoss(loss);
        double bpd = loss.item<float>();
        if (!double.IsFinite(bpd)) return Drop(bpd, "non-finite loss");
        if (rejectLoss?.Invoke(bpd) is { } rejected) return Drop(bpd, rejected);
        optimizer.ZeroGrad();
        loss.backward();
        var norm = optimizer.ClipGradientNorm(clipNorm);
        if (!double.IsFinite(norm))
        {
            optimizer.ZeroGrad();
            return Drop(bpd, "non-finite gradient");
        }
        optimizer.Step();
        return new StepOutcome(true, bpd, null);
    }
}
