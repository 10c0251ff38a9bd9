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
    public void Interpolation_keeps_no_Scalar_for_the_life_of_the_process()
    {
        // Core's cache of constant Scalars (Scalars.Of): every value put there stays for good.
        var cache = typeof(MixerFlow.Core.Scalars).GetField("cache", System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Static)!;
        int Cached() => ((System.Collections.ICollection)cache.GetValue(null)!).Count;
        manual_seed(5);
        var model = new ImageFlow(Presets.Get("tiny"));
        var data = DatasetLoader.Load(null, 1, 28, 28, 7).HeldOut;
        model.Interpolate(data.Batch([0]), data.Batch([1]), steps: 3);
        int before = Cached();
        // Other images, other weights: none of them may join the cache.
        model.Interpolate(data.Batch([2]), data.Batch([3]), steps: 11);
        Assert.Equal(before, Cached());
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

/// <summary>The `interpolate` verb end to end.</summary>
public class InterpolateVerbTests
{
    static (int Code, string Out, string Err) Run(params string[] args) => CliInProcess.Run(args);

    [Fact]
    public void Writes_a_strip_between_two_pictures_and_refuses_a_missing_one_in_one_line()
    {
        var dir = Directory.CreateTempSubdirectory("mixerflow-interpolate-").FullName;
        try
        {
            new Trainer(new TrainingSettings
            {
                Model = Presets.Get("tiny"), RunFolder = Path.Combine(dir, "run"), Steps = 2, BatchSize = 8, Pictures = false,
            }).Run();
            var ckpt = Path.Combine(dir, "run", Trainer.LastCheckpoint);
            var images = DatasetLoader.Load(null, 1, 28, 28, 7).HeldOut;
            ImageGrid.Save(images.Batch([0]), Path.Combine(dir, "a.png"), columns: 1, scale: 1, padding: 0);
            ImageGrid.Save(images.Batch([1]), Path.Combine(dir, "b.png"), columns: 1, scale: 1, padding: 0);
            var strip = Path.Combine(dir, "strip.png");
            var (code, output, err) = Run("interpolate", "--checkpoint", ckpt, "--from", Path.Combine(dir, "a.png"),
                                          "--to", Path.Combine(dir, "b.png"), "--steps", "5", "--out", strip);
            Assert.True(code == 0, err);
            Assert.Contains("wrote 5 images", output);
            // 5 tiles of 28 pixels at scale 2 with 1-pixel padding, in one row.
            var info = SixLabors.ImageSharp.Image.Identify(strip);
            Assert.Equal(5 * 56 + 6, info.Width);
            Assert.Equal(56 + 2, info.Height);

            (code, _, err) = Run("interpolate", "--checkpoint", ckpt, "--from", Path.Combine(dir, "missing.png"),
                                 "--to", Path.Combine(dir, "b.png"), "--out", Path.Combine(dir, "x.png"));
            Assert.Equal(2, code);
            Assert.StartsWith("error:", err);
            Assert.Contains("missing.png", err);
            Assert.DoesNotContain(" at ", err);
        }
        finally { Directory.Delete(dir, true); }
    }
}
