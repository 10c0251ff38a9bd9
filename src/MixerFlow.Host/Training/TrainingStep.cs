using MixerFlow.Core;
using MixerFlow.Host.Distributed;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>The outcome of one optimiser step: kept, or dropped by a guard (and why).</summary>
public readonly record struct StepOutcome(bool Kept, double BitsPerDim, string? DroppedBecause);

/// <summary>How a training step took its gradients.</summary>
public enum GradientPath
{
    /// <summary>Hand-written backward passes (<see cref="HandGradient"/>): no autograd graph.</summary>
    HandWritten,
    /// <summary>LibTorch's autograd.</summary>
    Autograd,
}

/// <summary>Wall time of a training step's phases (see <see cref="TrainingStep.LastPhases"/>).</summary>
/// <param name="Forward">The forward pass up to the loss value on the host.</param>
/// <param name="Backward">Zeroing the gradients and the backward pass.</param>
/// <param name="Update">Gradient clipping and the optimiser's update.</param>
public readonly record struct StepPhases(TimeSpan Forward, TimeSpan Backward, TimeSpan Update);

/// <summary>
/// One training step with its guards: the mean bits/dim of a batch, backward, global-norm gradient
/// clipping, Adam. A step whose loss or gradient norm is not finite, or whose loss the caller
/// rejects (a divergence guard), changes nothing and is reported as dropped: not the parameters,
/// not the optimiser state, and not the model's buffers (batch-norm running statistics, ActNorm's
/// initialised flag), which the forward pass may have updated and which are put back.
/// </summary>
/// <remarks>
/// With a <see cref="ICommunicator"/> of several ranks (data-parallel training), each rank passes
/// its own shard of the global batch: the loss is averaged over the ranks (one allreduce of one
/// value) before any guard sees it, so every rank keeps or drops the same steps, and after the
/// backward pass the flat gradient buffer is averaged over the ranks with one allreduce, so every
/// rank clips and updates identically.
/// </remarks>
public sealed class TrainingStep(ImageFlow model, Adam optimizer, double clipNorm, ICommunicator? communicator = null)
{
    readonly ICommunicator ranks = communicator ?? SingleProcess.Instance;
    readonly System.Diagnostics.Stopwatch communication = new();
    public Adam Optimizer => optimizer;

    /// <summary>Wall time spent in the ranks' allreduce calls so far (loss and gradients; zero for one process).</summary>
    public TimeSpan CommunicationTime => communication.Elapsed;

    /// <summary>
    /// Where the last step's wall time went: <see cref="StepPhases.Forward"/> (the forward pass up to
    /// the loss value on the host), <see cref="StepPhases.Backward"/> (zeroing the gradients and the
    /// backward pass) and <see cref="StepPhases.Update"/> (clipping and the optimiser's update);
    /// allreduce time is in the phase it interrupts. A dropped step leaves the phases it did not reach zero.
    /// </summary>
    public StepPhases LastPhases { get; private set; }

    /// <summary>
    /// Whether steps take their gradients by hand (<see cref="HandGradient"/>: no autograd graph)
    /// where the model supports it; otherwise autograd. Defaults to <see cref="HandGradient.Enabled"/>
    /// (MIXERFLOW_HAND_GRADIENTS=0 turns it off).
    /// </summary>
    public bool HandGradients { get; set; } = HandGradient.Enabled;

    /// <summary>Whether the last step took its gradients by hand (see <see cref="HandGradients"/>).</summary>
    public bool LastUsedHandGradients => LastGradientPath == GradientPath.HandWritten;

    /// <summary>The gradient path of the last step (autograd before the first).</summary>
    public GradientPath LastGradientPath { get; private set; } = GradientPath.Autograd;

    /// <summary>Why the last step took autograd's path rather than the hand-written one; null when it did not.</summary>
    public string? AutogradReason { get; private set; } = "no step taken yet";

    /// <summary>
    /// The last step's gradient path in words: "hand-written", "hand-written (autograd islands: part:
    /// reason; ...)" where parts without a hand-written rule ran under autograd inside it, or
    /// "autograd (because ...)".
    /// </summary>
    public string GradientPathDescription =>
        LastGradientPath != GradientPath.HandWritten ? $"autograd (because {AutogradReason})"
        : LastPlan is { Islands.Count: > 0 } plan ? $"hand-written (autograd islands: {plan.IslandSummary})"
        : "hand-written";

    /// <summary>The plan of the last hand-written step (which rule ran each part, which ran as an
    /// autograd island and why); null before the first or after an autograd step.</summary>
    public HandGradientPlan? LastPlan { get; private set; }

    /// <summary>
    /// The last step's gradient path part by part: the plan's description (<see cref="HandGradientPlan.Describe"/>)
    /// after a hand-written step, the reason after an autograd one.
    /// </summary>
    public string PlanDescription =>
        LastPlan is { } plan ? "hand-written gradients, by these rules:" + Environment.NewLine + plan.Describe()
        : $"autograd for the whole step (because {AutogradReason})";

    /// <summary>Why no step takes the hand-written path whatever the batch (null: the flow and batch decide).</summary>
    string? WhyAutogradAlways() =>
        !HandGradients ? "hand-written gradients are turned off (TrainingStep.HandGradients, MIXERFLOW_HAND_GRADIENTS=0)"
        : !model.training ? "the model is in evaluation mode"
        : null;

    /// <summary>
    /// Takes one step on <paramref name="batch"/> (pixels 0..255, on the model's device) at learning
    /// rate <paramref name="lr"/>. <paramref name="rejectLoss"/>, given the finite loss before the
    /// backward pass, returns why the step must be dropped, or null to keep it.
    /// </summary>
    public StepOutcome Take(Tensor batch, double lr, Func<Tensor, Tensor>? transformLoss = null, Func<double, string?>? rejectLoss = null)
    {
        optimizer.LearningRate = lr;
        LastPhases = default;
        long started = System.Diagnostics.Stopwatch.GetTimestamp();
        using var scope = NewDisposeScope();
        // Only buffers a forward pass may change: floating point ones (running statistics) and
        // single values (ActNorm's initialised flag); integer index buffers never change.
        var buffers = new BufferSnapshot(model.buffers().Where(b => b.is_floating_point() || b.numel() == 1));
        StepOutcome Drop(double bpd, string why)
        {
            buffers.Restore();
            return new StepOutcome(false, bpd, why);
        }
        var (hand, lossLeaf, loss) = Forward(batch, transformLoss);
        double bpd = loss.item<float>();
        if (ranks.Size > 1)
        {
            // The mean over equal shards is the mean of the shards' means; a non-finite shard makes it non-finite.
            Span<double> shared = [bpd];
            communication.Start();
            ranks.AllReduceSum(shared);
            communication.Stop();
            bpd = shared[0] / ranks.Size;
        }
        long forwardDone = System.Diagnostics.Stopwatch.GetTimestamp();
        LastPhases = new StepPhases(System.Diagnostics.Stopwatch.GetElapsedTime(started, forwardDone), TimeSpan.Zero, TimeSpan.Zero);
        if (!double.IsFinite(bpd)) return Drop(bpd, "non-finite loss");
        if (rejectLoss?.Invoke(bpd) is { } rejected) return Drop(bpd, rejected);
        optimizer.ZeroGrad();
        // The mean bits/dim is -sum_b log p_b / (B D ln 2): each log p_b's weight in it.
        if (hand is null) loss.backward();
        else hand.Backward(-1.0 / (batch.shape[0] * model.Config.Dimensions * Math.Log(2.0)) * LossHookSlope(loss, lossLeaf!));
        if (ranks.Size > 1)
        {
            var gradients = optimizer.GradientBuffer();
            communication.Start();
            ranks.AllReduceSum(gradients);
            communication.Stop();
            using (no_grad()) gradients.div_(Ops.Scalar(ranks.Size));
        }
        long backwardDone = System.Diagnostics.Stopwatch.GetTimestamp();
        LastPhases = LastPhases with { Backward = System.Diagnostics.Stopwatch.GetElapsedTime(forwardDone, backwardDone) };
        var norm = optimizer.ClipGradientNorm(clipNorm);
        if (!double.IsFinite(norm))
        {
            optimizer.ZeroGrad();
            return Drop(bpd, "non-finite gradient");
        }
        optimizer.Step();
        LastPhases = LastPhases with { Update = System.Diagnostics.Stopwatch.GetElapsedTime(backwardDone) };
        return new StepOutcome(true, bpd, null);
    }

    /// <summary>
    /// The forward pass up to the loss: hand-written where neither <see cref="WhyAutogradAlways"/> nor
    /// the flow's plan (<see cref="HandGradient.TryForward"/>) finds anything against it, else through autograd. On the hand-written path the loss hook is handed the mean
    /// bits/dim as a leaf that requires a gradient (returned too), so that whatever the hook makes
    /// of it is differentiated by the chain rule (<see cref="LossHookSlope"/>).
    /// </summary>
    (HandGradientPass? Hand, Tensor? LossLeaf, Tensor Loss) Forward(Tensor batch, Func<Tensor, Tensor>? transformLoss)
    {
        string? why = WhyAutogradAlways();
        var hand = why is null ? HandGradient.TryForward(model, batch, out why) : null;
        AutogradReason = why;
        if (hand is not null)
        {
            LastGradientPath = GradientPath.HandWritten;
            LastPlan = hand.Plan;
            var leaf = Likelihood.BitsPerDim(hand.LogProb, model.Config.Dimensions).mean().detach().requires_grad_(true);
            return (hand, leaf, transformLoss is null ? leaf : transformLoss(leaf));
        }
        LastGradientPath = GradientPath.Autograd;
        LastPlan = null;
        var loss = model.BitsPerDim(batch).mean();
        return (null, null, transformLoss is null ? loss : transformLoss(loss));
    }

    /// <summary>
    /// d(loss)/d(mean bits/dim) for a hand-written step: 1 where the loss hook returned the mean
    /// itself; else autograd's backward through what the hook made of it (gradients of terms it
    /// added, e.g. a regulariser on the parameters, go into the parameters' gradients on the way),
    /// whose slope the hand-written backward then scales by.
    /// </summary>
    static double LossHookSlope(Tensor loss, Tensor leaf)
    {
        if (ReferenceEquals(loss, leaf)) return 1.0;
        loss.backward();
        return leaf.grad is { } slope ? slope.item<float>() : 0.0;
    }
}