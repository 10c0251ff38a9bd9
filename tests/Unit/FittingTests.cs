using MixerFlow.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>MixerFlow.Core's Fitting.Fit: maximum likelihood on 2-D data, early stopping, skipped steps, no leaks.</summary>
public class FittingTests
{
    /// <summary>n points of three Gaussian blobs in the plane (seeded).</summary>
    static Tensor Mixture(int n, int seed)
    {
        using var g = new Generator((ulong)seed);
        var centres = tensor(new float[] { -2, -1, 2, -1, 0, 2 }).view(3, 2);
        var which = randint(0, 3, [n], generator: g);
        return (centres.index_select(0, which) + 0.4f * randn([n, 2], generator: g)).DetachFromDisposeScope();
    }

    static Tensor[] Copy(Flow flow) => flow.parameters().Select(p => p.detach().clone()).ToArray();

    static double LargestChange(Flow flow, Tensor[] before) =>
        flow.parameters().Zip(before).Max(pair => (pair.First - pair.Second).abs().max().item<float>());

    [Fact]
    public void An_NSF_fitted_to_a_Gaussian_mixture_scores_the_held_out_data_far_better_than_at_the_start()
    {
        torch.manual_seed(1);
        var flow = Flows.NSF(features: 2, transforms: 2, hidden: 32);
        var reports = new List<FitProgress>();
        var options = FitOptions.Default.WithSteps(300).WithBatchSize(256).WithLearningRate(5e-3)
            .WithHeldOut(Mixture(2000, 2)).WithEvaluateEvery(100).WithProgress(reports.Add);
        var result = Fitting.Fit(flow, Mixture(4000, 1), options);

        // The untrained flow scores these blobs at about 4.3 nats; the mixture itself at 2.07.
        Assert.True(result.BestHeldOutNll < result.InitialHeldOutNll - 1.5 && result.BestHeldOutNll < 2.5,
            $"held-out NLL {result.InitialHeldOutNll:F3} -> {result.BestHeldOutNll:F3}");
        Assert.Equal((300, 0, false), (result.Steps, result.SkippedSteps, result.StoppedEarly));
        Assert.Equal(new[] { 100, 200, 300 }, result.History.Select(p => p.Step));
        Assert.Equal(result.History, reports);
        Assert.All(reports, p => Assert.True(double.IsFinite(p.TrainingNll) && double.IsFinite(p.HeldOutNll), p.ToString()));
        Assert.True(flow.training);
    }

    [Fact]
    public void A_conditional_RealNVP_learns_how_its_context_moves_the_data()
    {
        torch.manual_seed(2);
        Tensor Data(int n, int seed, out Tensor context)
        {
            using var g = new Generator((ulong)seed);
            context = (randint(0, 2, [n, 1], generator: g).to_type(float32) * 2 - 1).DetachFromDisposeScope();
            return (context * 3 + 0.5f * randn([n, 2], generator: g)).DetachFromDisposeScope();
        }
        var flow = Flows.RealNVP(features: 2, transforms: 4, hidden: 32, context: 1);
        var data = Data(2000, 1, out var context);
        var heldOut = Data(1000, 2, out var heldOutContext);
        var result = Fitting.Fit(flow, data, context,
            FitOptions.Default.WithSteps(300).WithLearningRate(5e-3).WithHeldOut(heldOut, heldOutContext).WithEvaluateEvery(100));
        // Given the context the data are one blob of spread 0.5 (1.45 nats); without it, two blobs
        // 6 apart (2.15 nats): below 1.9 only a flow that uses the context.
        Assert.True(result.BestHeldOutNll < 1.9, $"held-out NLL {result.InitialHeldOutNll:F3} -> {result.BestHeldOutNll:F3}");
        Assert.Throws<ArgumentException>(() => Fitting.Fit(flow, data, FitOptions.Default.WithSteps(1)));
    }

    [Fact]
    public void Early_stopping_ends_after_the_patience_and_restores_the_best_parameters()
    {
        torch.manual_seed(3);
        // The flow starts as the standard normal, which is the held-out data's own law; training
        // on a tight blob far from it only makes the held-out score worse.
        var heldOut = randn(2000, 2).DetachFromDisposeScope();
        var blob = (randn(500, 2) * 0.1f + 3).DetachFromDisposeScope();
        var options = FitOptions.Default.WithSteps(1000).WithLearningRate(1e-2).WithEvaluateEvery(10).WithHeldOut(heldOut).WithPatience(1);

        var flow = Flows.RealNVP(features: 2, transforms: 2, hidden: 16);
        var initial = Copy(flow);
        var result = Fitting.Fit(flow, blob, options);
        Assert.True(result.StoppedEarly);
        Assert.Equal((20, 0, true), (result.Steps, result.BestStep, result.RestoredBest));
        Assert.Equal(2, result.History.Count);
        Assert.All(result.History, p => Assert.True(p.HeldOutNll > result.InitialHeldOutNll, p.ToString()));
        Assert.Equal(0.0, LargestChange(flow, initial));
        using (no_grad()) Assert.Equal(result.BestHeldOutNll, -flow.LogProb(heldOut).to_type(float64).mean().item<double>(), tolerance: 1e-5);

        // Without restoring, the flow keeps the last step's parameters.
        var kept = Flows.RealNVP(features: 2, transforms: 2, hidden: 16);
        var start = Copy(kept);
        var last = Fitting.Fit(kept, blob, options.WithPatience(0).WithRestoreBest(false));
        Assert.Equal((10, false), (last.Steps, last.RestoredBest));
        Assert.True(LargestChange(kept, start) > 1e-3);
    }

    [Fact]
    public void Steps_with_a_non_finite_loss_are_skipped_and_leave_the_parameters_finite()
    {
        torch.manual_seed(4);
        var data = Mixture(64, 5);
        data[7] = tensor(new[] { float.NaN, 0f });
        var flow = Flows.RealNVP(features: 2, transforms: 2, hidden: 16);
        var result = Fitting.Fit(flow, data, FitOptions.Default.WithSteps(40).WithBatchSize(16).WithEvaluateEvery(40));
        // Each pass of 4 batches holds the NaN row once: a quarter of the steps are skipped.
        Assert.Equal((40, 10), (result.Steps, result.SkippedSteps));
        Assert.All(flow.parameters(), p => Assert.False(p.isnan().any().item<bool>()));
        Assert.True(double.IsFinite(result.History[^1].TrainingNll));
    }

    [Fact]
    public void Fitting_leaves_no_more_live_tensors_behind_after_many_steps_than_after_few()
    {
        torch.manual_seed(5);
        var data = Mixture(512, 6);
        var heldOut = Mixture(256, 7);
        long LeftBehind(int steps)
        {
            var flow = Flows.RealNVP(features: 2, transforms: 2, hidden: 16);
            var options = FitOptions.Default.WithSteps(steps).WithBatchSize(64).WithEvaluateEvery(5).WithHeldOut(heldOut).WithLearningRate(1e-2);
            long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
            Fitting.Fit(flow, data, options);
            return DisposeScopeManager.Statistics.ThreadTotalLiveCount - before;
        }
        long few = LeftBehind(10), many = LeftBehind(60);
        Assert.Equal(few, many);
    }

    [Fact]
    public void Options_refuse_bad_values_by_name_and_data_of_the_wrong_shape_is_refused()
    {
        Assert.Contains("steps", Assert.Throws<ArgumentException>(() => FitOptions.Default.WithSteps(0)).Message);
        Assert.Contains("patience", Assert.Throws<ArgumentException>(() => FitOptions.Default.WithPatience(-1)).Message);
        Assert.Contains("learningRate", Assert.Throws<ArgumentException>(() => FitOptions.Default.WithLearningRate(double.NaN)).Message);
        var flow = Flows.RealNVP(features: 2, transforms: 1, hidden: 4);
        var e = Assert.Throws<ArgumentException>(() => Fitting.Fit(flow, zeros(10, 3)));
        Assert.Contains("[rows, 2]", e.Message);
        Assert.Equal(1000, FitOptions.Default.Steps);
    }
}
