using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using MixerFlow.Host.Data;
using MixerFlow.Host.Files;
using static TorchSharp.torch;

namespace MixerFlow.Host.Quality;

/// <summary>What a trained (or cached) feature classifier is: its key, file, settings and test accuracy.</summary>
/// <param name="Key">SHA-256 (hex) of the data (pixels, labels, shapes of both splits) and the settings.</param>
/// <param name="Path">The cached weights file.</param>
/// <param name="Settings">The settings it was trained with, as text.</param>
/// <param name="Classes">Number of classes of the training labels.</param>
/// <param name="FeatureDimension">Size of its feature vectors.</param>
/// <param name="TrainImages">Training images it saw.</param>
/// <param name="TestAccuracy">Share of the held-out (test) images classified correctly.</param>
/// <param name="TrainingSeconds">Wall time of its training (when it was first trained).</param>
/// <param name="FromCache">True when this process loaded it from the cache instead of training it.</param>
public sealed record ClassifierInfo(
    string Key, string Path, string Settings, int Classes, int FeatureDimension, int TrainImages,
    double TestAccuracy, double TrainingSeconds, bool FromCache);

/// <summary>Progress of a quality measurement: a stage, and how far it is (Done of Total units).</summary>
public sealed record QualityProgress(string Stage, long Done, long Total);

/// <summary>
/// The feature network of <see cref="SampleQuality"/>, trained once per data set and setting and
/// cached: <c>classifier-KEY.dat</c> (weights) and <c>classifier-KEY.json</c> (its
/// <see cref="ClassifierInfo"/>, written last) in <see cref="CacheFolder"/>, both written atomically.
/// </summary>
public sealed class FeatureClassifier : IDisposable
{
    /// <summary>Names the cache folder, overriding <c>$XDG_CACHE_HOME/mixerflow/quality</c> and <c>~/.cache/mixerflow/quality</c>.</summary>
    public const string CacheEnvironmentVariable = "MIXERFLOW_CACHE";
    const int FormatVersion = 1;
    const int FeatureBatch = 512;

    /// <summary>The trained network (evaluation mode).</summary>
    public FeatureNetwork Network { get; }
    /// <summary>What it is and how well it classifies.</summary>
    public ClassifierInfo Info { get; }

    FeatureClassifier(FeatureNetwork network, ClassifierInfo info)
    {
        Network = network;
        Info = info;
    }

    /// <summary>The cache folder: <see cref="CacheEnvironmentVariable"/>, else $XDG_CACHE_HOME/mixerflow/quality, else ~/.cache/mixerflow/quality.</summary>
    public static string CacheFolder()
    {
        var overridden = Environment.GetEnvironmentVariable(CacheEnvironmentVariable);
        if (!string.IsNullOrWhiteSpace(overridden)) return Path.GetFullPath(overridden);
        var xdg = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
        var root = !string.IsNullOrWhiteSpace(xdg) ? xdg
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache");
        return Path.Combine(root, "mixerflow", "quality");
    }

    /// <summary>
    /// The classifier for <paramref name="data"/> (trained on its training split, tested on its held-out split)
    /// under <paramref name="settings"/>: loaded from <paramref name="cacheFolder"/> (default <see cref="CacheFolder"/>)
    /// when cached, else trained and cached.
    /// </summary>
    /// <exception cref="UserError">The data has no labels, or the settings are invalid.</exception>
    public static FeatureClassifier GetOrTrain(DataSplits data, ClassifierSettings? settings = null,
        string? cacheFolder = null, IProgress<QualityProgress>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(data);
        settings ??= new ClassifierSettings();
        var problems = settings.Problems();
        if (problems.Count > 0) throw new UserError($"classifier settings: {string.Join("; ", problems)}");
        RequireLabels(data.Train, "training");
        RequireLabels(data.HeldOut, "held-out");
        if (data.Train.Height < 4 || data.Train.Width < 4)
            throw new UserError($"'{data.Train.Source}' holds images of {data.Train.Height}x{data.Train.Width}; the quality classifier needs at least 4x4");
        var folder = cacheFolder ?? CacheFolder();
        var key = Key(data, settings);
        var weights = Path.Combine(folder, $"classifier-{key}.dat");
        var infoFile = Path.Combine(folder, $"classifier-{key}.json");
        int classes = Math.Max(data.Train.Labels!.Max(), data.HeldOut.Labels!.Max()) + 1;
        if (File.Exists(infoFile) && File.Exists(weights))
        {
            var cached = JsonSerializer.Deserialize<ClassifierInfo>(File.ReadAllText(infoFile));
            if (cached is not null && cached.Key == key)
            {
                var network = new FeatureNetwork(data.Train.Channels, classes, settings);
                network.load(weights);
                network.eval();
                return new FeatureClassifier(network, cached with { Path = weights, FromCache = true });
            }
        }
        var clock = Stopwatch.StartNew();
        // The initialisation depends on the seed alone.
        manual_seed(settings.Seed);
        var trained = new FeatureNetwork(data.Train.Channels, classes, settings);
        int seen = Train(trained, data.Train, settings, progress);
        trained.eval();
        double accuracy = Accuracy(trained, data.HeldOut);
        var info = new ClassifierInfo(key, weights, settings.Describe(), classes, settings.FeatureDimension, seen,
            accuracy, clock.Elapsed.TotalSeconds, FromCache: false);
        Directory.CreateDirectory(folder);
        AtomicFile.Write(weights, (string temp) => trained.save(temp));
        AtomicFile.WriteAllText(infoFile, JsonSerializer.Serialize(info with { FromCache = false }, new JsonSerializerOptions { WriteIndented = true }));
        return new FeatureClassifier(trained, info);
    }

    static void RequireLabels(ImageDataset set, string split)
    {
        if (set.Labels is null)
            throw new UserError($"'{set.Source}' has no labels for its {split} images; the quality classifier trains on labelled images " +
                                "(IDX with its labels file, CIFAR binaries, or an image folder with one subfolder per class)");
    }

    /// <summary>The cache key: SHA-256 over a format version, the settings, and both splits' shapes, pixels and labels.</summary>
    internal static string Key(DataSplits data, ClassifierSettings settings)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        sha.AppendData(Encoding.UTF8.GetBytes($"MixerFlow quality classifier v{FormatVersion}\0{settings.Describe()}\0"));
        foreach (var set in new[] { data.Train, data.HeldOut })
        {
            sha.AppendData(Encoding.UTF8.GetBytes($"{set.Count}x{set.Channels}x{set.Height}x{set.Width}\0"));
            sha.AppendData(set.Pixels);
            var labels = set.Labels ?? [];
            var bytes = new byte[labels.Length * sizeof(int)];
            Buffer.BlockCopy(labels, 0, bytes, 0, bytes.Length);
            sha.AppendData(bytes);
        }
        return Convert.ToHexStringLower(sha.GetHashAndReset());
    }

    /// <summary>Adam on the cross-entropy, batches in an order seeded with the settings' seed; returns the images used.</summary>
    static int Train(FeatureNetwork network, ImageDataset train, ClassifierSettings s, IProgress<QualityProgress>? progress)
    {
        int count = s.MaxTrainImages > 0 ? Math.Min(s.MaxTrainImages, train.Count) : train.Count;
        network.train();
        using var adam = new MixerFlow.Core.Adam(network.parameters(), s.LearningRate);
        var random = new Random(s.Seed);
        var order = Enumerable.Range(0, count).ToArray();
        int stepsPerEpoch = (count + s.BatchSize - 1) / s.BatchSize;
        long total = (long)stepsPerEpoch * s.Epochs, done = 0;
        for (int epoch = 0; epoch < s.Epochs; epoch++)
        {
            random.Shuffle(order);
            for (int start = 0; start < count; start += s.BatchSize)
            {
                using (var scope = NewDisposeScope())
                {
                    var batch = order.AsSpan(start, Math.Min(s.BatchSize, count - start));
                    var x = train.Batch(batch);
                    var y = tensor(batch.ToArray().Select(i => (long)train.Labels![i]).ToArray());
                    adam.ZeroGrad();
                    nn.functional.cross_entropy(network.forward(x), y).backward();
                    adam.Step();
                }
                done++;
                if (done % 20 == 0 || done == total) progress?.Report(new QualityProgress("training the feature classifier", done, total));
            }
        }
        return count;
    }

    /// <summary>Share of <paramref name="set"/>'s images whose most likely class is their label.</summary>
    static double Accuracy(FeatureNetwork network, ImageDataset set)
    {
        long right = 0;
        using var _ = no_grad();
        for (int start = 0; start < set.Count; start += FeatureBatch)
        {
            using var scope = NewDisposeScope();
            var idx = Enumerable.Range(start, Math.Min(FeatureBatch, set.Count - start)).ToArray();
            var predicted = network.forward(set.Batch(idx)).argmax(1);
            var labels = tensor(idx.Select(i => (long)set.Labels![i]).ToArray());
            right += predicted.eq(labels).sum().item<long>();
        }
        return right / (double)set.Count;
    }

    /// <summary>Features [N, FeatureDimension] (float64, CPU) of pixels 0..255 [N, C, H, W], in batches, without gradients.</summary>
    public Tensor Features(Tensor pixels)
    {
        ArgumentNullException.ThrowIfNull(pixels);
        using var _ = no_grad();
        var parts = new List<Tensor>();
        using (var scope = NewDisposeScope())
        {
            long n = pixels.shape[0];
            for (long start = 0; start < n; start += FeatureBatch)
            {
                var batch = pixels.narrow(0, start, Math.Min(FeatureBatch, n - start)).to(float32);
                parts.Add(Network.Features(batch).to(float64));
            }
            return cat(parts, 0).MoveToOuterDisposeScope();
        }
    }

    /// <summary>Features of every image of <paramref name="set"/> (float64, CPU).</summary>
    public Tensor Features(ImageDataset set)
    {
        ArgumentNullException.ThrowIfNull(set);
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var parts = new List<Tensor>();
        for (int start = 0; start < set.Count; start += FeatureBatch)
            parts.Add(Network.Features(set.Batch(Enumerable.Range(start, Math.Min(FeatureBatch, set.Count - start)).ToArray())).to(float64));
        return cat(parts, 0).MoveToOuterDisposeScope();
    }

    /// <summary>Frees the network.</summary>
    public void Dispose() => Network.Dispose();
}
