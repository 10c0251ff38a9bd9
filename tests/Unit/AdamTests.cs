using MixerFlow.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// MixerFlow.Core.Adam against torch.optim.Adam: the same update, and state that moves between
/// the two in TorchSharp's binary format (checkpoints written before the switch still resume).
/// </summary>
public class AdamTests
{
    static (nn.Module<Tensor, Tensor> Model, Tensor X, Tensor Y) Problem(int seed)
    {
        manual_seed(seed);
        var model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3));
        model.to(float64);
        // Randomised parameters, not the initialisation alone.
        using (no_grad())
            foreach (var p in model.parameters()) p.add_(randn_like(p), Ops.Scalar(0.3));
        return (model, randn(32, 5, dtype: float64), randn(32, 3, dtype: float64));
    }

    static void Gradients(nn.Module<Tensor, Tensor> model, Tensor x, Tensor y)
    {
        using var scope = NewDisposeScope();
        var loss = model.call(x).sub(y).pow(Ops.Scalar(2)).mean();
        loss.backward();
    }

    static double[] Flat(nn.Module model) =>
        model.parameters().SelectMany(p => p.detach().cpu().to_type(float64).data<double>().ToArray()).ToArray();

    [Theory]
    [InlineData(1e-3, 0.9, 0.999)]
    [InlineData(3e-2, 0.5, 0.9)]
    public void Takes_the_same_steps_as_torch_optim_Adam(double lr, double beta1, double beta2)
    {
        var (a, x, y) = Problem(1);
        var (b, _, _) = Problem(1);
        using var ours = new Adam(a.parameters(), lr, beta1, beta2);
        var theirs = optim.Adam(b.parameters(), lr, beta1, beta2);
        var start = Flat(a);
        for (int step = 0; step < 20; step++)
        {
            // A learning rate that changes between steps, as the schedule does.
            ours.LearningRate = lr * (1 + step % 3);
            foreach (var g in theirs.ParamGroups) g.LearningRate = lr * (1 + step % 3);
            ours.ZeroGrad(); theirs.zero_grad();
            Gradients(a, x, y); Gradients(b, x, y);
            ours.Step(); theirs.step();
        }
        var pa = Flat(a);
        var pb = Flat(b);
        Assert.True(pa.Zip(start, (p, s) => Math.Abs(p - s)).Max() > 10 * lr, "the parameters moved");
        Assert.True(pa.Zip(pb, (p, q) => Math.Abs(p - q)).Max() < 1e-12,
            $"largest difference {pa.Zip(pb, (p, q) => Math.Abs(p - q)).Max():E2}");
        Assert.All(ours.StepCounts, n => Assert.Equal(20L, n));
    }

    [Fact]
    public void A_parameter_without_a_gradient_is_left_alone()
    {
        var (a, x, y) = Problem(2);
        var frozen = a.parameters().Last();
        frozen.requires_grad = false;
        var before = frozen.detach().clone();
        using var ours = new Adam(a.parameters(), 0.1);
        Gradients(a, x, y);
        ours.Step();
        Assert.Equal(0.0, frozen.detach().sub(before).abs().max().item<double>());
        Assert.Equal(0L, ours.StepCounts[^1]);
        Assert.Equal(1L, ours.StepCounts[0]);
    }

    [Fact]
    public void State_moves_between_TorchSharp_Adam_and_ours_in_both_directions()
    {
        // TorchSharp's Adam trains 5 steps and saves; ours loads and continues 5 more; the same
        // 10 steps taken by TorchSharp alone give the same parameters. Then back again.
        var (a, x, y) = Problem(3);
        var (b, _, _) = Problem(3);
        var theirsA = optim.Adam(a.parameters(), 0.01);
        var theirsB = optim.Adam(b.parameters(), 0.01);
        for (int i = 0; i < 5; i++)
        {
            theirsA.zero_grad(); Gradients(a, x, y); theirsA.step();
            theirsB.zero_grad(); Gradients(b, x, y); theirsB.step();
        }
        var saved = new MemoryStream();
        using (var w = new BinaryWriter(saved, System.Text.Encoding.UTF8, leaveOpen: true)) theirsA.save_state_dict(w);
        using var ours = new Adam(a.parameters(), 0.5);
        saved.Position = 0;
        using (var r = new BinaryReader(saved)) ours.LoadState(r);
        Assert.Equal(0.01, ours.LearningRate);
        for (int i = 0; i < 5; i++)
        {
            ours.ZeroGrad(); Gradients(a, x, y); ours.Step();
            theirsB.zero_grad(); Gradients(b, x, y); theirsB.step();
        }
        Assert.True(Flat(a).Zip(Flat(b), (p, q) => Math.Abs(p - q)).Max() < 1e-12);

        var back = new MemoryStream();
        using (var w = new BinaryWriter(back, System.Text.Encoding.UTF8, leaveOpen: true)) ours.SaveState(w);
        var theirsAgain = optim.Adam(a.parameters(), 0.5);
        back.Position = 0;
        using (var r = new BinaryReader(back)) theirsAgain.load_state_dict(r);
        theirsAgain.zero_grad(); Gradients(a, x, y); theirsAgain.step();
        theirsB.zero_grad(); Gradients(b, x, y); theirsB.step();
        Assert.True(Flat(a).Zip(Flat(b), (p, q) => Math.Abs(p - q)).Max() < 1e-12);
    }

    [Fact]
    public void State_for_other_parameters_is_refused_saying_why()
    {
        var (a, _, _) = Problem(4);
        using var ours = new Adam(a.parameters(), 0.01);
        var saved = new MemoryStream();
        using (var w = new BinaryWriter(saved, System.Text.Encoding.UTF8, leaveOpen: true)) ours.SaveState(w);
        using var fewer = new Adam(a.parameters().Take(2), 0.01);
        saved.Position = 0;
        var e = Assert.Throws<InvalidDataException>(() => fewer.LoadState(new BinaryReader(saved)));
        Assert.Contains("4 parameters, the model has 2", e.Message);
    }

    [Theory]
    [InlineData(0.0)]
    [InlineData(-1e-3)]
    [InlineData(double.NaN)]
    public void A_learning_rate_that_is_not_positive_is_refused(double lr)
    {
        var (a, _, _) = Problem(5);
        Assert.Throws<ArgumentException>(() => new Adam(a.parameters(), lr));
    }
}

/// <summary>
/// Adam over flat buffers: parameters and gradients live in one buffer each, so a step is a few
/// operations whatever the number of parameters, and the update stays torch.optim.Adam's when
/// something outside replaces a parameter or a gradient.
/// </summary>
public class FlatAdamTests
{
    static nn.Module<Tensor, Tensor> Model(int seed, int layers = 3)
    {
        manual_seed(seed);
        var mods = new List<nn.Module<Tensor, Tensor>>();
        for (int i = 0; i < layers; i++) { mods.Add(nn.Linear(6, 6)); mods.Add(nn.Tanh()); }
        var model = nn.Sequential(mods.ToArray());
        model.to(float64);
        using (no_grad())
            foreach (var p in model.parameters()) p.add_(randn_like(p), Ops.Scalar(0.3));
        return model;
    }

    static void Gradients(nn.Module<Tensor, Tensor> model, int seed)
    {
        using var scope = NewDisposeScope();
        manual_seed(100 + seed);
        var x = randn(16, 6, dtype: float64);
        model.call(x).pow(Ops.Scalar(2)).mean().backward();
    }

    static double MaxDifference(nn.Module a, nn.Module b) =>
        a.parameters().Zip(b.parameters(), (p, q) => p.detach().sub(q.detach()).abs().max().item<double>()).Max();

    [Fact]
    public void Parameters_become_views_of_one_buffer_and_keep_their_values_and_identity()
    {
        var model = Model(1);
        var before = model.parameters().Select(p => p.detach().clone()).ToArray();
        var objects = model.parameters().ToArray();
        using var adam = new Adam(model.parameters(), 0.01);
        Assert.Equal(objects, model.parameters().ToArray());
        Assert.All(model.parameters().Zip(before), pair => Assert.Equal(0.0, pair.First.detach().sub(pair.Second).abs().max().item<double>()));
        // One buffer: writing through it is seen by every parameter.
        using (no_grad()) foreach (var p in model.parameters()) p.zero_();
        Gradients(model, 0);
        Assert.All(model.parameters(), p => Assert.NotNull(p.grad));
    }

    [Fact]
    public void Replaced_gradients_and_parameters_are_taken_back_into_the_buffers()
    {
        var a = Model(2);
        var b = Model(2);
        using var ours = new Adam(a.parameters(), 0.05);
        var theirs = optim.Adam(b.parameters(), 0.05);
        for (int step = 0; step < 12; step++)
        {
            // TorchSharp's own zero_grad and a gradient set by hand replace our views.
            if (step % 3 == 0) a.zero_grad(); else ours.ZeroGrad();
            theirs.zero_grad();
            Gradients(a, step); Gradients(b, step);
            if (step == 4)
            {
                var p = a.parameters().First();
                p.grad = p.grad!.clone();
            }
            if (step == 7)
            {
                // A parameter moved to new storage with its values.
                var p = a.parameters().Last();
                using (no_grad()) p.set_(p.detach().clone());
            }
            ours.Step(); theirs.step();
        }
        Assert.True(MaxDifference(a, b) < 1e-12, $"largest difference {MaxDifference(a, b):E2}");
    }

    [Theory]
    [InlineData(0.05)]
    [InlineData(1e6)]
    public void Clipping_matches_torch_clip_grad_norm(double maxNorm)
    {
        var a = Model(3);
        var b = Model(3);
        using var ours = new Adam(a.parameters(), 0.01);
        Gradients(a, 0); Gradients(b, 0);
        double n1 = ours.ClipGradientNorm(maxNorm);
        double n2 = nn.utils.clip_grad_norm_(b.parameters(), maxNorm);
        Assert.Equal(n2, n1, 12);
        Assert.True(n1 > 0.05, "the gradients are not tiny, so the small bound clips");
        double worst = a.parameters().Zip(b.parameters(), (p, q) => p.grad!.sub(q.grad!).abs().max().item<double>()).Max();
        Assert.True(worst < 1e-14, $"gradients differ by {worst:E2}");
    }

    [Fact]
    public void A_non_finite_gradient_gives_a_non_finite_norm_and_changes_nothing()
    {
        var a = Model(4);
        using var ours = new Adam(a.parameters(), 0.01);
        Gradients(a, 0);
        using (no_grad()) a.parameters().First().grad!.fill_(Ops.Scalar(double.NaN));
        var before = a.parameters().Select(p => p.detach().clone()).ToArray();
        Assert.True(double.IsNaN(ours.ClipGradientNorm(1.0)));
        Assert.All(a.parameters().Zip(before), pair => Assert.Equal(0.0, pair.First.detach().sub(pair.Second).abs().max().item<double>()));
    }

    [Fact]
    public void A_step_creates_a_few_tensors_whatever_the_number_of_parameters()
    {
        long Created(int layers)
        {
            var model = Model(5, layers);
            using var adam = new Adam(model.parameters(), 0.01);
            adam.ZeroGrad(); Gradients(model, 0); adam.ClipGradientNorm(1.0); adam.Step();
            var stats = DisposeScopeManager.Statistics;
            long before = stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount;
            adam.ZeroGrad(); Gradients(model, 1);
            long afterBackward = stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount;
            adam.ClipGradientNorm(1.0); adam.Step();
            return stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount - afterBackward;
        }
        long few = Created(2), many = Created(20);
        Assert.True(many == few && many <= 8, $"Adam created {few} tensors for 4 parameters and {many} for 40");
    }

    [Fact]
    public void Parameters_of_different_dtypes_are_refused_by_name()
    {
        var a = nn.Linear(3, 3);
        var b = nn.Linear(3, 3);
        b.to(float64);
        var e = Assert.Throws<ArgumentException>(() => new Adam(a.parameters().Concat(b.parameters()), 0.01));
        Assert.Contains("parameter 2 is Float64", e.Message);
    }
}
