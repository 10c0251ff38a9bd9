using System.Buffers.Binary;
using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using MixerFlow.Host.Quality;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>The bundled data and one tiny feature classifier, trained once into a temporary cache.</summary>
public sealed class QualityFixture : IDisposable
{
    public string Cache { get; } = Directory.CreateTempSubdirectory("mixerflow-quality-").FullName;
    public DataSplits Data { get; } = DatasetLoader.Load(null, 1, 28, 28);
    public FeatureClassifier Classifier { get; }

    public QualityFixture() => Classifier = FeatureClassifier.GetOrTrain(Data, ClassifierSettings.Tiny, Cache);

    public void Dispose()
    {
        Classifier.Dispose();
        Directory.Delete(Cache, true);
    }
}

public class SampleQualityTests(QualityFixture fixture) : IClassFixture<QualityFixture>
{
    /// <summary>FD between N(m1, S1) and N(m2, S2) for 2x2 covariances in closed form: tr (S1 S2)^½ =
    /// sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))), since S1 S2 has positive eigenvalues.</summary>
    static double ClosedForm(double[] m1, double[,] s1, double[] m2, double[,] s2)
    {
        double p00 = s1[0, 0] * s2[0, 0] + s1[0, 1] * s2[1, 0], p11 = s1[1, 0] * s2[0, 1] + s1[1, 1] * s2[1, 1];
        double p01 = s1[0, 0] * s2[0, 1] + s1[0, 1] * s2[1, 1], p10 = s1[1, 0] * s2[0, 0] + s1[1, 1] * s2[1, 0];
        double traceSqrt = Math.Sqrt(p00 + p11 + 2 * Math.Sqrt(p00 * p11 - p01 * p10));
        double mean = (m1[0] - m2[0]) * (m1[0] - m2[0]) + (m1[1] - m2[1]) * (m1[1] - m2[1]);
        return mean + s1[0, 0] + s1[1, 1] + s2[0, 0] + s2[1, 1] - 2 * traceSqrt;
    }

    /// <summary>Non-commuting covariances, so that a square root taken of each factor alone, or dropped, shows.</summary>
    static readonly (double[] M1, double[,] S1, double[] M2, double[,] S2)[] Cases =
    [
        ([0, 0], new double[,] { { 2, 0.5 }, { 0.5, 1 } }, [1, -2], new double[,] { { 1, -0.3 }, { -0.3, 3 } }),
        ([0.5, 1], new double[,] { { 4, 1.9 }, { 1.9, 1 } }, [0.5, 1], new double[,] { { 0.2, 0 }, { 0, 5 } }),
        ([3, 0], new double[,] { { 1, 0 }, { 0, 1 } }, [0, 4], new double[,] { { 1, 0 }, { 0, 1 } }),
    ];

    static bool AgreesWithClosedForm(Func<GaussianStatistics, GaussianStatistics, double> fd) =>
        Cases.All(c => Math.Abs(fd(new(c.M1, c.S1, 100), new(c.M2, c.S2, 100)) - ClosedForm(c.M1, c.S1, c.M2, c.S2)) < 1e-9);

    static double Trace(double[,] a) => a[0, 0] + a[1, 1];
    static double MeanTerm(GaussianStatistics a, GaussianStatistics b) => a.Mean.Zip(b.Mean, (x, y) => (x - y) * (x - y)).Sum();

    [Fact]
    public void The_Frechet_distance_matches_the_closed_form_and_a_dropped_square_root_does_not()
    {
        Assert.True(AgreesWithClosedForm(SampleQuality.FrechetDistance));
        // The same formula with tr(S1 S2) for tr (S1 S2)^½ (the square root dropped).
        Assert.False(AgreesWithClosedForm((a, b) => MeanTerm(a, b) + Trace(a.Covariance) + Trace(b.Covariance) - 2 *
            (a.Covariance[0, 0] * b.Covariance[0, 0] + a.Covariance[0, 1] * b.Covariance[1, 0] + a.Covariance[1, 0] * b.Covariance[0, 1] + a.Covariance[1, 1] * b.Covariance[1, 1])));
        // tr(S1^½ S2^½): right only when the covariances commute.
        Assert.False(AgreesWithClosedForm((a, b) => MeanTerm(a, b) + Trace(a.Covariance) + Trace(b.Covariance) - 2 * TraceOfRootProduct(a.Covariance, b.Covariance)));
    }

    static double TraceOfRootProduct(double[,] s1, double[,] s2)
    {
        static Tensor Root(double[,] s)
        {
            var (l, q) = linalg.eigh(tensor(s, float64));
            return q.mul(l.sqrt().unsqueeze(0)).matmul(q.t());
        }
        return Root(s1).matmul(Root(s2)).trace().item<double>();
    }

    [Fact]
    public void The_Frechet_distance_of_sampled_Gaussians_approaches_the_closed_form()
    {
        manual_seed(3);
        var c = Cases[0];
        var l1 = linalg.cholesky(tensor(c.S1, float64));
        var l2 = linalg.cholesky(tensor(c.S2, float64));
        var x = randn(200_000, 2, dtype: float64).matmul(l1.t()).add(tensor(c.M1, float64));
        var y = randn(200_000, 2, dtype: float64).matmul(l2.t()).add(tensor(c.M2, float64));
        Assert.Equal(ClosedForm(c.M1, c.S1, c.M2, c.S2), SampleQuality.FrechetDistance(x, y), 1);
        Assert.True(SampleQuality.FrechetDistance(x, x) < 1e-6);
    }

    [Fact]
    public void Precision_and_recall_are_one_for_identical_sets_and_zero_for_far_apart_ones()
    {
        manual_seed(1);
        var a = randn(200, 8, dtype: float64);
        Assert.Equal(new PrecisionRecall(1, 1), SampleQuality.PrecisionAndRecall(a, a.clone()));
        var far = randn(150, 8, dtype: float64).add(tensor(1000.0, float64));
        Assert.Equal(new PrecisionRecall(0, 0), SampleQuality.PrecisionAndRecall(a, far));
        // Half of the generated set on the real one: precision one half, recall (nearly) complete.
        var half = cat([a.narrow(0, 0, 100), far.narrow(0, 0, 100)], 0);
        var pr = SampleQuality.PrecisionAndRecall(a, half);
        Assert.Equal(0.5, pr.Precision);
    }

    Tensor Images(ImageDataset set, int count) => set.Batch(Enumerable.Range(0, count).ToArray());

    [Fact]
    public void Test_images_score_close_to_training_images_and_further_away_the_more_noise_is_added()
    {
        var real = fixture.Classifier.Features(Images(fixture.Data.Train, 1000));
        var test = Images(fixture.Data.HeldOut, 500);
        manual_seed(5);
        var noise = randn_like(test);
        var distances = new[] { 0.0, 16, 32, 64, 128 }.Select(sigma =>
            SampleQuality.ScoreImages(fixture.Classifier, test.add(noise.mul(tensor(sigma))), real).FrechetDistance).ToArray();
        for (int i = 1; i < distances.Length; i++)
            Assert.True(distances[i] > distances[i - 1], $"FD at noise levels 0, 16, 32, 64, 128: {string.Join(", ", distances)}");
        Assert.True(distances[0] < distances[^1] / 10, $"clean test images {distances[0]} against noisiest {distances[^1]}");
    }

    [Fact]
    public void The_classifier_is_cached_by_data_and_settings_and_the_same_seed_gives_the_same_score()
    {
        var again = FeatureClassifier.GetOrTrain(fixture.Data, ClassifierSettings.Tiny, fixture.Cache);
        Assert.True(again.Info.FromCache);
        Assert.False(fixture.Classifier.Info.FromCache);
        Assert.Equal(fixture.Classifier.Info.Key, again.Info.Key);
        Assert.Equal(fixture.Classifier.Info.TestAccuracy, again.Info.TestAccuracy);
        Assert.True(again.Info.TestAccuracy > 0.3, $"accuracy {again.Info.TestAccuracy}");
        var images = Images(fixture.Data.HeldOut, 50);
        Assert.True(fixture.Classifier.Features(images).eq(again.Features(images)).all().item<bool>());
        // One pixel changed: another key.
        var pixels = (byte[])fixture.Data.Train.Pixels.Clone();
        pixels[123] ^= 1;
        var t = fixture.Data.Train;
        var changed = fixture.Data with { Train = new ImageDataset(pixels, t.Count, t.Channels, t.Height, t.Width, t.Labels, t.Source) };
        Assert.NotEqual(FeatureClassifier.Key(fixture.Data, ClassifierSettings.Tiny), FeatureClassifier.Key(changed, ClassifierSettings.Tiny));
        Assert.NotEqual(FeatureClassifier.Key(fixture.Data, ClassifierSettings.Tiny), FeatureClassifier.Key(fixture.Data, ClassifierSettings.Tiny with { Seed = 1 }));
    }

    [Fact]
    public void A_trained_model_scores_better_than_an_untrained_one_and_the_same_seed_repeats_the_score()
    {
        var dir = Directory.CreateTempSubdirectory("mixerflow-score-").FullName;
        try
        {
            new Trainer(new TrainingSettings
            {
                Model = Presets.Get("tiny"), RunFolder = Path.Combine(dir, "run"), Steps = 150, BatchSize = 32, Pictures = false,
            }).Run();
            var (trained, _) = Checkpoint.Load(Path.Combine(dir, "run", Trainer.LastCheckpoint));
            manual_seed(0);
            var untrained = new ImageFlow(Presets.Get("tiny"));
            double Fd(ImageFlow m) => SampleQuality.Score(m, fixture.Data, [1.0], 200, seed: 4, ClassifierSettings.Tiny, fixture.Cache)[0].FrechetDistance;
            double good = Fd(trained), bad = Fd(untrained);
            Assert.True(good < bad, $"trained {good}, untrained {bad}");
            Assert.Equal(good, Fd(trained));
        }
        finally { Directory.Delete(dir, true); }
    }

    static void WriteIdx(string path, int magic, int[] dims, byte[] body)
    {
        var content = new byte[4 + 4 * dims.Length + body.Length];
        BinaryPrimitives.WriteInt32BigEndian(content, magic);
        for (int i = 0; i < dims.Length; i++) BinaryPrimitives.WriteInt32BigEndian(content.AsSpan(4 + 4 * i), dims[i]);
        body.CopyTo(content, 4 + 4 * dims.Length);
        File.WriteAllBytes(path, content);
    }

    /// <summary>A folder of the first <paramref name="count"/> bundled images as IDX (with labels where asked).</summary>
    string SmallIdxFolder(string dir, int count, bool labels)
    {
        var set = fixture.Data.Train;
        Directory.CreateDirectory(dir);
        WriteIdx(Path.Combine(dir, "t10k-images-idx3-ubyte"), 0x803, [count, 28, 28], set.Pixels.AsSpan(0, count * 784).ToArray());
        if (labels) WriteIdx(Path.Combine(dir, "t10k-labels-idx1-ubyte"), 0x801, [count], set.Labels!.Take(count).Select(l => (byte)l).ToArray());
        return dir;
    }

    [Fact]
    public void The_score_verb_prints_the_metrics_and_refuses_bad_input_in_one_line()
    {
        var dir = Directory.CreateTempSubdirectory("mixerflow-score-cli-").FullName;
        var saved = Environment.GetEnvironmentVariable(FeatureClassifier.CacheEnvironmentVariable);
        Environment.SetEnvironmentVariable(FeatureClassifier.CacheEnvironmentVariable, Path.Combine(dir, "cache"));
        try
        {
            var ckpt = Path.Combine(Repository.Root(), "tests", "Unit", "data", "v3-tiny-spline-step6.ckpt");
            var data = SmallIdxFolder(Path.Combine(dir, "data"), 400, labels: true);
            var json = Path.Combine(dir, "score.json");
            var (code, output, err) = CliInProcess.Run("score", "--checkpoint", ckpt, "--data", data, "--samples", "30", "--temperature", "0.7,1", "--json", json);
            Assert.True(code == 0, err);
            foreach (var word in new[] { "Fréchet distance", "precision", "recall", "test accuracy", "0.7" }) Assert.Contains(word, output);
            Assert.Contains("frechetDistance", File.ReadAllText(json));
            Assert.Single(Directory.GetFiles(Path.Combine(dir, "cache"), "*.dat"));

            var unlabelled = SmallIdxFolder(Path.Combine(dir, "unlabelled"), 400, labels: false);
            (code, _, err) = CliInProcess.Run("score", "--checkpoint", ckpt, "--data", unlabelled, "--samples", "30");
            Assert.Equal(2, code);
            Assert.Single(err.Trim().Split('\n'));
            Assert.Contains("no labels", err);
            (code, _, err) = CliInProcess.Run("score", "--checkpoint", ckpt, "--temperature", "hot");
            Assert.Equal(2, code);
            Assert.Contains("--temperature", err);
            Assert.Single(err.Trim().Split('\n'));
            (code, _, err) = CliInProcess.Run("score", "--checkpoint", Path.Combine(dir, "missing.ckpt"));
            Assert.Equal(2, code);
            Assert.Contains("missing.ckpt", err);
        }
        finally
        {
            Environment.SetEnvironmentVariable(FeatureClassifier.CacheEnvironmentVariable, saved);
            Directory.Delete(dir, true);
        }
    }
}
