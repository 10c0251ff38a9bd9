using MixerFlow.Core;
using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Quality;

/// <summary>The mean and covariance (float64) of a set of feature vectors.</summary>
/// <param name="Mean">Per-feature mean, [D].</param>
/// <param name="Covariance">Unbiased covariance, [D, D] (row-major).</param>
/// <param name="Count">Vectors they were computed from.</param>
public sealed record GaussianStatistics(double[] Mean, double[,] Covariance, long Count)
{
    /// <summary>The statistics of <paramref name="features"/> [N, D] (N at least 2).</summary>
    public static GaussianStatistics Of(Tensor features)
    {
        ArgumentNullException.ThrowIfNull(features);
        if (features.dim() != 2 || features.shape[0] < 2)
            throw new ArgumentException($"features must be [N, D] with N >= 2, got [{string.Join(", ", features.shape)}]", nameof(features));
        using var scope = NewDisposeScope();
        var x = features.to(float64).cpu();
        int d = (int)x.shape[1];
        var mean = x.mean(new long[] { 0 }).data<double>().ToArray();
        var flat = cov(x.t()).reshape(d, d).data<double>().ToArray();
        var c = new double[d, d];
        Buffer.BlockCopy(flat, 0, c, 0, flat.Length * sizeof(double));
        return new GaussianStatistics(mean, c, x.shape[0]);
    }
}

/// <summary>Precision and recall of generated feature vectors against real ones (Kynkäänniemi et al. 2019).</summary>
/// <param name="Precision">Share of generated vectors inside some real vector's k-NN ball.</param>
/// <param name="Recall">Share of real vectors inside some generated vector's k-NN ball.</param>
public sealed record PrecisionRecall(double Precision, double Recall);

/// <summary>The quality of one set of images (samples at one temperature) against real images.</summary>
/// <param name="Temperature">The sampling temperature (NaN for images that were not sampled).</param>
/// <param name="Samples">Images scored.</param>
/// <param name="ReferenceImages">Real images they were compared with.</param>
/// <param name="FrechetDistance">Fréchet distance between the two feature sets' Gaussians (lower is better).</param>
/// <param name="Precision">Share of the images that look real (k-NN manifold of the real features).</param>
/// <param name="Recall">Share of the real images' variety the images cover.</param>
/// <param name="Classifier">The feature classifier (its accuracy on the real test images included).</param>
public sealed record QualityScore(double Temperature, int Samples, int ReferenceImages, double FrechetDistance,
    double Precision, double Recall, ClassifierInfo Classifier)
{
    /// <summary>The classifier's accuracy on the real test (held-out) images.</summary>
    public double ClassifierAccuracy => Classifier.TestAccuracy;
}

/// <summary>
/// Sample quality in the feature space of a small classifier trained on the data set
/// (<see cref="FeatureClassifier"/>): the Fréchet distance between Gaussians fitted to real and
/// generated features, and k-NN precision and recall.
/// </summary>
public static class SampleQuality
{
    /// <summary>Neighbours that set a real (or generated) vector's radius in <see cref="PrecisionAndRecall"/>.</summary>
    public const int DefaultNeighbours = 3;
    /// <summary>Samples drawn when no count is given (fewer when the test split is smaller).</summary>
    public const int DefaultSamples = 10_000;

    /// <summary>
    /// Fréchet distance ||m1 - m2||² + tr(C1 + C2 - 2 (C1 C2)^½) between N(m1, C1) and N(m2, C2), in float64:
    /// tr (C1 C2)^½ is the sum of the square roots of the eigenvalues of the symmetric C1^½ C2 C1^½.
    /// </summary>
    public static double FrechetDistance(GaussianStatistics a, GaussianStatistics b)
    {
        ArgumentNullException.ThrowIfNull(a);
        ArgumentNullException.ThrowIfNull(b);
        if (a.Mean.Length != b.Mean.Length) throw new ArgumentException($"{a.Mean.Length} features against {b.Mean.Length}");
        double meanTerm = 0, traces = 0;
        for (int i = 0; i < a.Mean.Length; i++)
        {
            meanTerm += (a.Mean[i] - b.Mean[i]) * (a.Mean[i] - b.Mean[i]);
            traces += a.Covariance[i, i] + b.Covariance[i, i];
        }
        return meanTerm + traces - 2 * TraceSqrtProduct(a.Covariance, b.Covariance);
    }

    /// <summary>Fréchet distance between the Gaussians fitted to two feature sets [N, D] and [M, D].</summary>
    public static double FrechetDistance(Tensor features1, Tensor features2) =>
        FrechetDistance(GaussianStatistics.Of(features1), GaussianStatistics.Of(features2));

    /// <summary>tr (C1 C2)^½ for symmetric positive semi-definite C1, C2 (negative eigenvalues of round-off count as 0).</summary>
    internal static double TraceSqrtProduct(double[,] c1, double[,] c2)
    {
        using var scope = NewDisposeScope();
        int d = c1.GetLength(0);
        var a = tensor(c1, float64);
        var (l1, q1) = linalg.eigh(a);
        var root1 = q1.mul(l1.clamp_min(Ops.Scalar(0.0)).sqrt().unsqueeze(0)).matmul(q1.t());
        var m = root1.matmul(tensor(c2, float64)).matmul(root1);
        var symmetric = Ops.Add(m, m.t()).mul(Ops.Scalar(0.5));
        var (l, _) = linalg.eigh(symmetric);
        return l.clamp_min(Ops.Scalar(0.0)).sqrt().sum().item<double>();
    }

    /// <summary>
    /// Precision and recall (Kynkäänniemi et al. 2019): each real vector's radius is the distance to its
    /// k-th nearest other real vector, likewise for generated ones; precision is the share of generated
    /// vectors inside some real ball, recall the share of real vectors inside some generated ball.
    /// </summary>
    public static PrecisionRecall PrecisionAndRecall(Tensor real, Tensor generated, int k = DefaultNeighbours)
    {
        ArgumentNullException.ThrowIfNull(real);
        ArgumentNullException.ThrowIfNull(generated);
        if (k < 1) throw new ArgumentOutOfRangeException(nameof(k), k, "at least 1");
        if (real.shape[0] <= k || generated.shape[0] <= k)
            throw new ArgumentException($"precision and recall with k = {k} need more than {k} vectors per set, got {real.shape[0]} and {generated.shape[0]}");
        using var scope = NewDisposeScope();
        var r = real.to(float64);
        var g = generated.to(float64);
        var realRadii = Radii(r, k);
        var generatedRadii = Radii(g, k);
        return new PrecisionRecall(Covered(g, r, realRadii), Covered(r, g, generatedRadii));
    }

    const long Chunk = 1024;

    /// <summary>Distance of each vector to its k-th nearest other vector of the same set.</summary>
    static Tensor Radii(Tensor x, int k)
    {
        var parts = new List<Tensor>();
        for (long s = 0; s < x.shape[0]; s += Chunk)
        {
            var d = cdist(x.narrow(0, s, Math.Min(Chunk, x.shape[0] - s)), x);
            // k + 1: the vector itself is its own nearest neighbour, at distance 0.
            parts.Add(d.topk(k + 1, dim: 1, largest: false).values.select(1, k));
        }
        return cat(parts, 0);
    }

    /// <summary>Share of <paramref name="points"/> within the radius of at least one of <paramref name="centres"/>.</summary>
    static double Covered(Tensor points, Tensor centres, Tensor radii)
    {
        long inside = 0;
        for (long s = 0; s < points.shape[0]; s += Chunk)
        {
            using var scope = NewDisposeScope();
            var d = cdist(points.narrow(0, s, Math.Min(Chunk, points.shape[0] - s)), centres);
            inside += d.le(radii.unsqueeze(0)).any(1).sum().item<long>();
        }
        return inside / (double)points.shape[0];
    }

    /// <summary>
    /// Scores images (pixels 0..255, [N, C, H, W]) against real features: Fréchet distance, precision and recall.
    /// </summary>
    public static QualityScore ScoreImages(FeatureClassifier classifier, Tensor images, Tensor realFeatures,
        double temperature = double.NaN, int k = DefaultNeighbours)
    {
        ArgumentNullException.ThrowIfNull(classifier);
        ArgumentNullException.ThrowIfNull(images);
        ArgumentNullException.ThrowIfNull(realFeatures);
        using var scope = NewDisposeScope();
        // Diverged samples (NaN, Inf, out of range) are scored as the pixels they would be saved as.
        var pixels = nan_to_num(images.to(float32), 0.0, 255.0, 0.0).clamp(Ops.Scalar(0.0), Ops.Scalar(255.0));
        var features = classifier.Features(pixels);
        var fd = FrechetDistance(realFeatures, features);
        var pr = PrecisionAndRecall(realFeatures, features, k);
        return new QualityScore(temperature, (int)images.shape[0], (int)realFeatures.shape[0], fd, pr.Precision, pr.Recall, classifier.Info);
    }

    /// <summary>
    /// Scores <paramref name="model"/>'s samples at each temperature against the real test (held-out) images of
    /// <paramref name="data"/>: <paramref name="samples"/> images per temperature (default: <see cref="DefaultSamples"/>,
    /// at most the test split's size), drawn in batches without gradients after seeding LibTorch's generator with
    /// <paramref name="seed"/> (the same for each temperature). The classifier is trained on the training split
    /// the first time and cached (<see cref="FeatureClassifier.GetOrTrain"/>). A model trained on pixel-permuted
    /// images (<paramref name="permutation"/>) has its samples un-permuted before they are scored against
    /// <paramref name="data"/>, which holds the images as they are.
    /// </summary>
    /// <exception cref="UserError">The data has no labels, or the model's image shape does not match the data's.</exception>
    public static IReadOnlyList<QualityScore> Score(ImageFlow model, DataSplits data, IReadOnlyList<double> temperatures,
        int? samples = null, int seed = 0, ClassifierSettings? classifier = null, string? cacheFolder = null,
        IProgress<QualityProgress>? progress = null, PixelPermutation? permutation = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(temperatures);
        var c = model.Config;
        var test = data.HeldOut;
        if ((c.Channels, c.Height, c.Width) != (test.Channels, test.Height, test.Width))
            throw new UserError($"'{test.Source}' holds images of {test.Channels}x{test.Height}x{test.Width}, but model '{c.Name}' makes {c.Channels}x{c.Height}x{c.Width}");
        int n = samples ?? Math.Min(DefaultSamples, test.Count);
        if (n <= DefaultNeighbours) throw new UserError($"--samples must be more than {DefaultNeighbours} (the neighbours of precision and recall), got {n}");
        using var net = FeatureClassifier.GetOrTrain(data, classifier, cacheFolder, progress);
        using var scope = NewDisposeScope();
        progress?.Report(new QualityProgress("features of the test images", 0, 1));
        var real = net.Features(test);
        var scores = new List<QualityScore>();
        foreach (var t in temperatures)
        {
            var sampled = Sample(model, n, t, seed, progress);
            var images = permutation?.Unpermute(sampled) ?? sampled;
            if (!ReferenceEquals(images, sampled)) sampled.Dispose();
            scores.Add(ScoreImages(net, images, real, t));
            images.Dispose();
        }
        return scores;
    }

    /// <summary>
    /// The real data's own score, a floor for samples: up to <paramref name="samples"/> training images (the first
    /// ones; default as in <see cref="Score"/>) against the test (held-out) images, in the cached classifier's features.
    /// </summary>
    public static QualityScore ScoreData(DataSplits data, int? samples = null, ClassifierSettings? classifier = null,
        string? cacheFolder = null, IProgress<QualityProgress>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(data);
        int n = Math.Min(samples ?? Math.Min(DefaultSamples, data.HeldOut.Count), data.Train.Count);
        using var net = FeatureClassifier.GetOrTrain(data, classifier, cacheFolder, progress);
        using var scope = NewDisposeScope();
        var real = net.Features(data.HeldOut);
        var train = data.Train.Subset(Enumerable.Range(0, n).ToArray());
        return ScoreImages(net, train.Batch(Enumerable.Range(0, n).ToArray()), real);
    }

    /// <summary><paramref name="count"/> samples at temperature <paramref name="t"/>, in batches, in evaluation mode without gradients.</summary>
    static Tensor Sample(ImageFlow model, int count, double t, int seed, IProgress<QualityProgress>? progress)
    {
        manual_seed(seed);
        int batchSize = Defaults.SampleBatchSize;
        var parts = new List<Tensor>();
        model.Evaluating(() =>
        {
            for (int done = 0; done < count; done += batchSize)
            {
                using var scope = NewDisposeScope();
                parts.Add(model.Sample(Math.Min(batchSize, count - done), t).to(float32).cpu().MoveToOuterDisposeScope());
                progress?.Report(new QualityProgress(FormattableString.Invariant($"sampling at temperature {t}"), Math.Min(done + batchSize, count), count));
            }
        });
        var all = cat(parts, 0);
        foreach (var p in parts) p.Dispose();
        return all;
    }
}
