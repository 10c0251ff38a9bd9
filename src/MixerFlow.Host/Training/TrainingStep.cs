using MixerFlow.Core;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>The outcome of one optimiser step: kept, or dropped by a guard (and why).</summary>
public readonly record struct StepOutcome(bool Kept, double BitsPerDim, string? DroppedBecause);

/// <summary>
/// One training step with its guards: the mean bits/dim of a batch, backward, global-norm gradient
/// clipping, Adam. A step whose loss or gradient norm is not finite changes nothing and is
/// reported as dropped.
/// </summary>
public sealed class TrainingStep(ImageFlow model, Adam optimizer, double clipNorm)
{
    public Adam Optimizer => optimizer;

    /// <summary>Takes one step on <paramref name="batch"/> (pixels 0..255, on the model's device) at learning rate <paramref name="lr"/>.</summary>
    public StepOutcome Take(Tensor batch, double lr, Func<Tensor, Tensor>? transformLoss = null)
    {
        optimizer.LearningRate = lr;
        using var scope = NewDisposeScope();
        var loss = model.BitsPerDim(batch).mean();
        if (transformLoss is not null) loss = transformLoss(loss);
        double bpd = loss.item<float>();
        if (!double.IsFinite(bpd)) return new StepOutcome(false, bpd, "non-finite loss");
        optimizer.ZeroGrad();
        loss.backward();
        var norm = nn.utils.clip_grad_norm_(model.parameters(), clipNorm);
        if (!double.IsFinite(norm))
        {
            optimizer.ZeroGrad();
            return new StepOutcome(false, bpd, "non-finite gradient");
        }
        optimizer.Step();
        return new StepOutcome(true, bpd, null);
    }
}
