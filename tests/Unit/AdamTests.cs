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
