using MixerFlow.Core;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MixerFlow.Host.Quality;

/// <summary>
/// How the feature network is built and trained. Every field enters the cache key, so a change
/// trains (and caches) a new network.
/// </summary>
public sealed record ClassifierSettings
{
    /// <summary>Seed of the initialisation and of the batch order.</summary>
    public int Seed { get; init; } = 0;
    /// <summary>Passes over the training images.</summary>
    public int Epochs { get; init; } = 3;
    /// <summary>Images per training step.</summary>
    public int BatchSize { get; init; } = 64;
    /// <summary>Adam's learning rate.</summary>
    public double LearningRate { get; init; } = 5e-3;
    /// <summary>Channels of the first convolution (the second has twice as many).</summary>
    public int Width { get; init; } = 16;
    /// <summary>Size of the feature vector: the penultimate layer's width.</summary>
    public int FeatureDimension { get; init; } = 128;
    /// <summary>Train on at most this many training images (the first ones); 0 for all.</summary>
    public int MaxTrainImages { get; init; } = 0;

    /// <summary>A small, quick setting for tests and smoke runs.</summary>
    public static ClassifierSettings Tiny { get; } = new() { Epochs = 2, Width = 8, FeatureDimension = 16, LearningRate = 5e-3, MaxTrainImages = 2000 };

    /// <summary>What is wrong with the settings, one entry per field.</summary>
    public IReadOnlyList<string> Problems()
    {
        var p = new List<string>();
        if (Epochs < 1) p.Add($"Epochs must be at least 1, got {Epochs}");
        if (BatchSize < 1) p.Add($"BatchSize must be at least 1, got {BatchSize}");
        if (!(LearningRate > 0 && LearningRate < 1)) p.Add($"LearningRate must lie in (0, 1), got {LearningRate}");
        if (Width < 1) p.Add($"Width must be at least 1, got {Width}");
        if (FeatureDimension < 2) p.Add($"FeatureDimension must be at least 2, got {FeatureDimension}");
        if (MaxTrainImages < 0) p.Add($"MaxTrainImages must be 0 (all) or positive, got {MaxTrainImages}");
        return p;
    }

    /// <summary>The settings as one line of text (the cache key's part and the record's).</summary>
    public string Describe() =>
        FormattableString.Invariant($"seed={Seed} epochs={Epochs} batch={BatchSize} lr={LearningRate:R} width={Width} features={FeatureDimension} maxTrain={MaxTrainImages}");
}

/// <summary>
/// A small convolutional classifier: two 3x3 convolutions with ReLU and 2x2 max pooling, an
/// average pool to 4 x 4, a linear layer with ReLU (the features) and a linear head (the classes).
/// Input: pixels 0..255, [B, C, H, W] with H, W at least 4.
/// </summary>
public sealed class FeatureNetwork : nn.Module<Tensor, Tensor>
{
    readonly Conv2d conv1, conv2;
    readonly Linear hidden, head;

    /// <summary>Builds the network for images of <paramref name="channels"/> channels and <paramref name="classes"/> classes.</summary>
    public FeatureNetwork(int channels, int classes, ClassifierSettings settings) : base("FeatureNetwork")
    {
        ArgumentNullException.ThrowIfNull(settings);
        conv1 = nn.Conv2d(channels, settings.Width, 3, padding: 1);
        conv2 = nn.Conv2d(settings.Width, 2L * settings.Width, 3, padding: 1);
        hidden = nn.Linear(2L * settings.Width * 16, settings.FeatureDimension);
        head = nn.Linear(settings.FeatureDimension, classes);
        RegisterComponents();
    }

    /// <summary>The penultimate layer's activations [B, FeatureDimension].</summary>
    public Tensor Features(Tensor pixels)
    {
        ArgumentNullException.ThrowIfNull(pixels);
        using var scope = NewDisposeScope();
        // 0..255 to -1..1.
        var x = Ops.AddScalar(pixels.div(Ops.Scalar(127.5)), -1.0);
        x = nn.functional.max_pool2d(nn.functional.relu(conv1.forward(x)), 2);
        x = nn.functional.max_pool2d(nn.functional.relu(conv2.forward(x)), 2);
        x = nn.functional.adaptive_avg_pool2d(x, new long[] { 4, 4 }).flatten(1);
        return nn.functional.relu(hidden.forward(x)).MoveToOuterDisposeScope();
    }

    /// <summary>Class logits [B, classes].</summary>
    public override Tensor forward(Tensor pixels)
    {
        using var features = Features(pixels);
        return head.forward(features);
    }
}
