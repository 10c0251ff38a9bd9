using System.Buffers.Binary;
using System.Globalization;
using System.Security.Cryptography;
using MixerFlow.Host;
using MixerFlow.Host.Data;
using MixerFlow.Host.Files;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;

namespace MixerFlow.Unit;

/// <summary>
/// A validation set held out of the training images (<see cref="TrainingSettings.ValidationImages"/>):
/// disjoint from the images trained on, the same after a resume, the only score that chooses best.ckpt;
/// the summary's held-out score is the test split's.
/// </summary>
public class TrainingValidationTests
{
    static string TempDir() => Directory.CreateTempSubdirectory("mixerflow-validation-").FullName;

    static TrainingSettings Options(string dir, string? data, int steps, int validation, bool resume = false) => new()
    {
        Model = Presets.Get("tiny"), Data = data, RunFolder = dir, Resume = resume, Steps = steps, BatchSize = 16,
        LearningRate = 2e-3, Seed = 7, CheckpointEvery = 5, ValidationImages = validation, Pictures = false,
    };

    sealed class StopAfter(long step) : ITrainingObserver
    {
        public bool ShouldStop(long s) => s == step;
    }

    /// <summary>Each image of <paramref name="images"/> by its SHA-256.</summary>
    static string[] Hashes(ImageDataset images) =>
        Enumerable.Range(0, images.Count)
            .Select(i => Convert.ToHexString(SHA256.HashData(images.Pixels.AsSpan(i * images.ImageSize, images.ImageSize)))).ToArray();

    [Fact]
    public void The_validation_images_come_out_of_the_training_split_by_the_seed_and_leave_the_test_split_alone()
    {
        var data = DatasetLoader.Load(null, 1, 28, 28, seed: 3);
        var split = data.WithValidation(500, seed: 3);
        var (train, validation) = split.ValidationSplit!.Value;
        Assert.Equal(500, validation.Length);
        Assert.Empty(train.Intersect(validation));
        Assert.Equal(Enumerable.Range(0, data.Train.Count), train.Concat(validation).Order());
        // The images are those positions of the training split, and the held-out split is untouched.
        Assert.Equal(Hashes(data.Train.Subset(validation)), Hashes(split.Validation!));
        Assert.Equal(Hashes(data.Train.Subset(train)), Hashes(split.Train));
        Assert.Same(data.HeldOut, split.HeldOut);
        // Seeded: the same seed the same images, another seed others.
        Assert.Equal(validation, data.WithValidation(500, 3).ValidationSplit!.Value.Validation);
        Assert.NotEqual(validation, data.WithValidation(500, 4).ValidationSplit!.Value.Validation);
        Assert.Same(data, data.WithValidation(0, 3));
        var e = Assert.Throws<UserError>(() => data.WithValidation(data.Train.Count, 3));
        Assert.Contains($"hold out at most {data.Train.Count - 1}", e.Message);
    }

    /// <summary>
    /// The images a run trains on (its training split, which the epoch order indexes) and its
    /// validation images share no image (by content hash, on data whose images all differ); a resumed
    /// run holds out the same images as a fresh one. A broken split (validation images left in the
    /// training split) fails the check.
    /// </summary>
    [Fact]
    public void A_run_never_trains_on_its_validation_images_and_a_resume_holds_out_the_same_ones()
    {
        string data = TempDir(), a = TempDir(), b = TempDir();
        try
        {
            WriteIdx(data, "train", UniqueImages(300, salt: 1));
            WriteIdx(data, "t10k", UniqueImages(40, salt: 2));
            Assert.True(new Trainer(Options(a, data, 12, 60), new StopAfter(5)).Run().StoppedEarly);
            var resumed = new Trainer(Options(a, data, 12, 60, resume: true));
            resumed.Run();
            var fresh = new Trainer(Options(b, data, 1, 60));
            fresh.Run();
            var trainedOn = Hashes(resumed.Data!.Train).ToHashSet();
            var validation = Hashes(resumed.Data.Validation!);
            Assert.Equal(300 - 60, trainedOn.Count);
            Assert.Equal(60, validation.Distinct().Count());
            Assert.DoesNotContain(validation, trainedOn.Contains);
            Assert.Equal(validation, Hashes(fresh.Data!.Validation!));
            Assert.Empty(Hashes(resumed.Data.HeldOut).Intersect(validation));
            // The check can fail: validation images left among the training images are found.
            var leaky = Hashes(DatasetLoader.Load(data, 1, 28, 28, 7).Train).ToHashSet();
            Assert.Contains(validation, leaky.Contains);
        }
        finally { foreach (var d in new[] { data, a, b }) Directory.Delete(d, true); }
    }

    /// <summary>
    /// A constructed case in which validation and test disagree: trained on Fashion-MNIST images and
    /// tested on inverted ones (white background), the test score worsens as the validation score
    /// improves. best.ckpt is at the step of the lowest validation score of metrics.csv, not of the
    /// lowest test score; the summary's held-out scores are the test split's (the last model's, and
    /// best.ckpt's scored at the end), its validation scores the validation set's.
    /// </summary>
    [Fact]
    public void Best_checkpoint_is_chosen_by_validation_and_never_by_the_test_split()
    {
        string data = TempDir(), dir = TempDir();
        try
        {
            var bundled = DatasetLoader.Load(null, 1, 28, 28, seed: 0);
            WriteIdx(data, "train", bundled.Train.Subset(Enumerable.Range(0, 400).ToArray()).Pixels);
            WriteIdx(data, "t10k", bundled.HeldOut.Subset(Enumerable.Range(0, 200).ToArray()).Pixels.Select(v => (byte)(255 - v)).ToArray());
            // 300 training images at batch 16: 18 steps an epoch, 5 epochs.
            var summary = new Trainer(Options(dir, data, 90, 100)).Run();
            var rows = CsvLog.Read(Path.Combine(dir, "metrics.csv")).Where(r => r["validation_bpd"] != "")
                .Select(r => (Step: long.Parse(r["step"], CultureInfo.InvariantCulture), Validation: Number(r["validation_bpd"]), Test: Number(r["heldout_bpd"])))
                .ToList();
            Assert.Equal(new long[] { 0, 18, 36, 54, 72, 90 }, rows.Select(r => r.Step));
            var epochs = rows.Where(r => r.Step > 0).ToList();   // best.ckpt is saved at epoch ends
            var byValidation = epochs.MinBy(r => r.Validation);
            var byTest = epochs.MinBy(r => r.Test);
            Assert.NotEqual(byValidation.Step, byTest.Step);   // the constructed case: they disagree
            var (_, best) = Checkpoint.Load(Path.Combine(dir, Trainer.BestCheckpoint));
            Assert.Equal(byValidation.Step, best.Step);
            Assert.Equal(byValidation.Validation, best.BestHeldOutBpd);
            Assert.Equal((100, byValidation.Step, byValidation.Validation), (summary.ValidationImages, summary.BestStep, summary.BestValidationBpd));
            Assert.Equal((rows[^1].Test, rows[^1].Validation), (summary.HeldOutBpd, summary.ValidationBpd));
            Assert.Equal(byValidation.Test, summary.BestHeldOutBpd, 9);
            // The summary's held-out split is the test split (the inverted t10k images), scored on the last model.
            var test = DatasetLoader.Load(data, 1, 28, 28, 7).HeldOut;
            var (last, _) = Checkpoint.Load(Path.Combine(dir, Trainer.LastCheckpoint));
            Assert.Equal(summary.HeldOutBpd, Evaluation.BitsPerDim(last, test).Mean);
            Assert.Contains("t10k", summary.Data);
        }
        finally { Directory.Delete(data, true); Directory.Delete(dir, true); }
    }

    [Fact]
    public void Train_options_and_spec_fields_set_the_validation_images_and_the_weight_average()
    {
        static TrainingSettings Parsed(params string[] args) =>
            Assert.IsType<MixerFlow.CommandLine.TrainCommand>(MixerFlow.CommandLine.CommandLine.Parse(args).Command).Settings;
        var s = Parsed("train", "--validation-images", "500", "--ema-decay", "0.999");
        Assert.Equal((500, 0.999), (s.ValidationImages, s.EmaDecay));
        Assert.Equal((0, 0.0), (Parsed("train").ValidationImages, Parsed("train").EmaDecay));
        Assert.Equal(["EmaDecay", "ValidationImages"], Parsed("train", "--resume", "r", "--ema-decay", "0.9", "--validation-images", "5").Given!.Order());
        foreach (var bad in new[] { "--ema-decay=1", "--ema-decay=-0.5", "--validation-images=-1" })
            Assert.True(MixerFlow.CommandLine.CommandLine.Parse(["train", .. bad.Split('=')]).IsError, bad);

        const string runs = """ "runs": [ { "name": "a", "preset": "tiny" }, { "name": "b", "preset": "tiny", "emaDecay": 0 } ] """;
        var spec = ExperimentSpec.Parse($$"""{ "steps": 5, "validationImages": 300, "emaDecay": 0.99, {{runs}} }""", "spec.json", ".");
        var (a, b) = (spec.SettingsFor(spec.Runs[0], 0, "x", false), spec.SettingsFor(spec.Runs[1], 0, "y", false));
        Assert.Equal((300, 0.99, 300, 0.0), (a.ValidationImages, a.EmaDecay, b.ValidationImages, b.EmaDecay));
        Assert.Contains("emaDecay: must be a number in [0, 1)",
            Assert.Throws<UserError>(() => ExperimentSpec.Parse($$"""{ "steps": 5, "emaDecay": 1, {{runs}} }""", "spec.json", ".")).Message);
        Assert.Contains("validationImages: must be an integer in [0, 100000000]",
            Assert.Throws<UserError>(() => ExperimentSpec.Parse($$"""{ "steps": 5, "validationImages": -1, {{runs}} }""", "spec.json", ".")).Message);
    }

    static double Number(string text) => double.Parse(text, CultureInfo.InvariantCulture);

    /// <summary>28 x 28 images that all differ: the first two pixels spell the index.</summary>
    static byte[] UniqueImages(int count, int salt)
    {
        var pixels = new byte[count * 784];
        for (int i = 0; i < count; i++)
            for (int k = 0; k < 784; k++)
                pixels[i * 784 + k] = k switch { 0 => (byte)(i % 256), 1 => (byte)(i / 256), _ => (byte)((k * 7 + i * 13 + salt) % 256) };
        return pixels;
    }

    /// <summary>An IDX images file of 28 x 28 images: <paramref name="part"/>-images-idx3-ubyte in <paramref name="folder"/>.</summary>
    static void WriteIdx(string folder, string part, byte[] pixels)
    {
        var header = new byte[16];
        BinaryPrimitives.WriteInt32BigEndian(header, 0x00000803);
        BinaryPrimitives.WriteInt32BigEndian(header.AsSpan(4), pixels.Length / 784);
        BinaryPrimitives.WriteInt32BigEndian(header.AsSpan(8), 28);
        BinaryPrimitives.WriteInt32BigEndian(header.AsSpan(12), 28);
        File.WriteAllBytes(Path.Combine(folder, $"{part}-images-idx3-ubyte"), [.. header, .. pixels]);
    }
}
