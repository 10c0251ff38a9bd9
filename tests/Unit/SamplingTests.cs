using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Imaging;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>Per-epoch sample grids from fixed noise, latent interpolation, single-image reading.</summary>
public class SamplingTests : IDisposable
{
    readonly string dir = Path.Combine(Path.GetTempPath(), "mixerflow-sampling-" + Guid.NewGuid().ToString("N"));
    public SamplingTests() => Directory.CreateDirectory(dir);
    public void Dispose() => Directory.Delete(dir, recursive: true);

    [Fact]
    public void Every_epoch_writes_a_sample_grid_from_the_same_noise()
    {
        var trainCount = DatasetLoader.Load(null, 1, 28, 28, 7).Train.Count;
        var settings = new TrainingSettings
        {
            Model = Presets.Get("tiny"), RunFolder = Path.Combine(dir, "run"), Steps = 4,
            BatchSize = trainCount / 2, LearningRate = 1e-3, Seed = 7, CheckpointEvery = 100,
        };
        new Trainer(settings).Run();
        var grids = Directory.GetFiles(Path.Combine(dir, "run", "samples")).Select(Path.GetFileName).Order().ToArray();
        Assert.Equal(new[] { "epoch-001.png", "epoch-002.png" }, grids);
        // Different models (one epoch apart) decode the fixed noise differently.
        var a = File.ReadAllBytes(Path.Combine(dir, "run", "samples", "epoch-001.png"));
        var b = File.ReadAllBytes(Path.Combine(dir, "run", "samples", "epoch-002.png"));
        Assert.NotEqual(a, b);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Interpolation_starts_and_ends_at_the_two_images(bool spherical)
    {
        manual_seed(5);
        var model = new ImageFlow(Presets.Get("tiny"));
        var data = DatasetLoader.Load(null, 1, 28, 28, 7).HeldOut;
        var from = data.Batch([0]);
        var to = data.Batch([1]);
        var path = model.Interpolate(from, to, steps: 6, spherical: spherical);
        Assert.Equal(new long[] { 6, 1, 28, 28 }, path.shape);
        // The untrained flow is invertible: the ends are the images themselves, up to rounding.
        Assert.True(path[0].sub(from[0]).abs().max().item<float>() <= 1f);
        Assert.True(path[5].sub(to[0]).abs().max().item<float>() <= 1f);
        // The middle is neither end.
        Assert.True(path[3].sub(from[0]).abs().mean().item<float>() > 1f);
        Assert.True(path[3].sub(to[0]).abs().mean().item<float>() > 1f);
        Assert.Throws<ArgumentOutOfRangeException>(() => model.Interpolate(from, to, steps: 1));
    }

    [Fact]
    public void A_written_image_reads_back_with_its_pixels()
    {
        var images = DatasetLoader.Load(null, 1, 28, 28, 7).HeldOut.Batch([3]);
        var png = Path.Combine(dir, "one.png");
        ImageGrid.Save(images, png, columns: 1, scale: 1, padding: 0);
        var back = ImageFolderFormat.ReadFile(png, 1, 28, 28).Batch([0]);
        Assert.Equal(0f, back.sub(images).abs().max().item<float>());
        var e = Assert.Throws<MixerFlow.Host.UserError>(() => ImageFolderFormat.ReadFile(dir, 1, 28, 28));
        Assert.Contains("is a folder", e.Message);
    }
}
