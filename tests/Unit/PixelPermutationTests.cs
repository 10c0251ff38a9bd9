using System.Text.RegularExpressions;
using MixerFlow.Host.Data;
using MixerFlow.Host.Imaging;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>The fixed pixel permutation: the transform itself, and a run trained, evaluated and pictured under it.</summary>
public class PixelPermutationTests
{
    /// <summary>Three images of 2 channels x 3 x 4, every byte different.</summary>
    static ImageDataset Distinct()
    {
        var pixels = Enumerable.Range(0, 3 * 2 * 12).Select(i => (byte)i).ToArray();
        return new ImageDataset(pixels, 3, 2, 3, 4, [0, 1, 2], "test");
    }

    [Fact]
    public void A_permuted_dataset_moves_every_pixel_of_every_image_and_channel_by_the_same_permutation()
    {
        var data = Distinct();
        var p = PixelPermutation.Of(11, 3, 4)!;
        var permuted = data.Permuted(p);
        Assert.Equal(data.Labels, permuted.Labels);
        Assert.NotEqual(data.Pixels, permuted.Pixels);
        for (int image = 0; image < 3; image++)
            for (int c = 0; c < 2; c++)
            {
                int plane = (image * 2 + c) * 12;
                var before = data.Pixels.AsSpan(plane, 12).ToArray();
                var after = permuted.Pixels.AsSpan(plane, 12).ToArray();
                Assert.Equal(before.Order(), after.Order());
                // The same positions for every image and channel: the position each value came from.
                Assert.Equal(p.Positions, after.Select(v => Array.IndexOf(before, v)));
            }
    }

    [Fact]
    public void Unpermute_restores_the_images_and_permute_matches_the_dataset()
    {
        var data = Distinct();
        var p = PixelPermutation.Of(11, 3, 4)!;
        using var original = data.Batch([0, 1, 2]);
        using var permuted = data.Permuted(p).Batch([0, 1, 2]);
        Assert.True(p.Permute(original).equal(permuted).all().item<bool>());
        Assert.True(p.Unpermute(permuted).equal(original).all().item<bool>());
        Assert.False(permuted.equal(original).all().item<bool>());
    }

    [Fact]
    public void The_same_seed_gives_the_same_permutation_and_other_seeds_others()
    {
        Assert.Null(PixelPermutation.Of(0, 28, 28));
        var a = PixelPermutation.Of(1, 28, 28)!.Positions;
        Assert.Equal(a, PixelPermutation.Of(1, 28, 28)!.Positions);
        Assert.Equal(Enumerable.Range(0, 784), a.Order());
        Assert.NotEqual(a, PixelPermutation.Of(2, 28, 28)!.Positions);
        Assert.NotEqual(Enumerable.Range(0, 784), a);
    }

    /// <summary>Gray levels of a PNG, row by row.</summary>
    static byte[] Gray(string path)
    {
        using var image = Image.Load<L8>(path);
        var values = new byte[image.Width * image.Height];
        image.CopyPixelDataTo(values);
        return values;
    }

    /// <summary>The share of pixels of two same-sized PNGs that differ by more than a few levels.</summary>
    static double Differing(string a, string b)
    {
        var (x, y) = (Gray(a), Gray(b));
        Assert.Equal(x.Length, y.Length);
        return x.Zip(y, (u, v) => Math.Abs(u - v) > 8).Count(d => d) / (double)x.Length;
    }

    [Fact]
    public void A_permuted_run_records_its_permutation_eval_applies_it_and_its_pictures_are_unpermuted()
    {
        var dir = Directory.CreateTempSubdirectory("mixerflow-permuted-").FullName;
        try
        {
            var run = Path.Combine(dir, "run");
            var summary = new Trainer(new TrainingSettings
            {
                Model = Presets.Get("tiny"), RunFolder = run, Steps = 4, BatchSize = 16, WarmupSteps = 2, PixelPermutationSeed = 9,
            }).Run();
            Assert.Equal(9, TrainingSettings.FromJson(File.ReadAllText(RunFolder.SettingsFile(run))).PixelPermutationSeed);
            Assert.Contains("pixels permuted (seed 9)", summary.Data);
            var checkpoint = Path.Combine(run, RunFolder.LastCheckpoint);
            double Eval()
            {
                var (code, output, err) = CliInProcess.Run("eval", "--checkpoint", checkpoint);
                Assert.True(code == 0, err);
                return double.Parse(Regex.Match(output, @"bits/dim: ([0-9.]+)").Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
            }
            Assert.Equal(Math.Round(summary.HeldOutBpd, 4), Eval(), 6);

            // The reconstructions show the held-out images as they are, not as the model sees them.
            var data = DatasetLoader.Load(null, 1, 28, 28);
            var p = PixelPermutation.Of(9, 28, 28)!;
            var first = Enumerable.Range(0, 16).ToArray();
            using var natural = data.HeldOut.Batch(first);
            using var seen = data.HeldOut.Permuted(p).Batch(first);
            string asImages = Path.Combine(dir, "natural.png"), asSeen = Path.Combine(dir, "seen.png");
            ImageGrid.SavePairs(natural, natural, asImages);
            ImageGrid.SavePairs(seen, seen, asSeen);
            var written = Path.Combine(run, "reconstructions.png");
            Assert.True(Differing(written, asImages) < 0.01, $"{Differing(written, asImages):P1} of the pixels differ from the images");
            Assert.True(Differing(written, asSeen) > 0.1);

            // `sample` writes the model's samples un-permuted: the grid of the same draw, inverse-permuted.
            string sampled = Path.Combine(dir, "sampled.png"), expected = Path.Combine(dir, "expected.png"), raw = Path.Combine(dir, "raw.png");
            Assert.Equal(0, CliInProcess.Run("sample", "--checkpoint", checkpoint, "--count", "4", "--seed", "3", "--out", sampled).Code);
            var (model, _) = Checkpoint.Load(checkpoint);
            model.eval();
            manual_seed(3);
            using (no_grad())
            using (var drawn = model.Sample(4, MixerFlow.Core.Defaults.SampleTemperature))
            {
                ImageGrid.Save(p.Unpermute(drawn), expected);
                ImageGrid.Save(drawn, raw);
            }
            Assert.Equal(0.0, Differing(sampled, expected));
            Assert.True(Differing(sampled, raw) > 0.05);

            // Without the run's settings.json beside it the checkpoint is evaluated on unpermuted data: another score.
            File.Delete(RunFolder.SettingsFile(run));
            Assert.NotEqual(Math.Round(summary.HeldOutBpd, 4), Eval());
        }
        finally { Directory.Delete(dir, true); }
    }
}
