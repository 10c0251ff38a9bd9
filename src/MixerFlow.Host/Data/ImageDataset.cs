using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Host.Data;

/// <summary>
/// Images held as 8-bit values, laid out N x C x H x W in one array. The dataset owns
/// <see cref="Pixels"/> and <see cref="Labels"/>: nothing mutates them after construction.
/// </summary>
public sealed class ImageDataset
{
    public byte[] Pixels { get; }
    public int Count { get; }
    public int Channels { get; }
    public int Height { get; }
    public int Width { get; }
    /// <summary>One class index per image, or null when the source carries no labels.</summary>
    public int[]? Labels { get; }
    /// <summary>The file(s) or folder the images came from.</summary>
    public string Source { get; }

    /// <summary>Bytes per image: C x H x W.</summary>
    public int ImageSize => Channels * Height * Width;

    /// <summary>Takes ownership of <paramref name="pixels"/> and <paramref name="labels"/> (no copy).</summary>
    public ImageDataset(byte[] pixels, int count, int channels, int height, int width, int[]? labels, string source)
    {
        ArgumentNullException.ThrowIfNull(pixels);
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(channels);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(height);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(width);
        if ((long)count * channels * height * width != pixels.LongLength)
            throw new ArgumentException(
                $"{pixels.LongLength} pixel bytes do not make {count} images of {channels}x{height}x{width}", nameof(pixels));
        if (labels is not null && labels.Length != count)
            throw new ArgumentException($"{labels.Length} labels for {count} images", nameof(labels));
        Pixels = pixels;
        Count = count;
        Channels = channels;
        Height = height;
        Width = width;
        Labels = labels;
        Source = source;
    }

    /// <summary>The images at <paramref name="indices"/> as a float32 CPU tensor [n, C, H, W] holding 0..255.</summary>
    public Tensor Batch(ReadOnlySpan<int> indices)
    {
        int size = ImageSize;
        var values = new float[(long)indices.Length * size];
        for (int i = 0; i < indices.Length; i++)
        {
            var image = Pixels.AsSpan(Offset(indices[i]), size);
            var target = values.AsSpan(i * size, size);
            for (int k = 0; k < size; k++) target[k] = image[k];
        }
        return torch.tensor(values, new long[] { indices.Length, Channels, Height, Width }, dtype: float32);
    }

    /// <summary>The images (and labels) at <paramref name="indices"/>, in that order, as a new dataset.</summary>
    public ImageDataset Subset(int[] indices)
    {
        ArgumentNullException.ThrowIfNull(indices);
        int size = ImageSize;
        var pixels = new byte[(long)indices.Length * size];
        for (int i = 0; i < indices.Length; i++)
            Pixels.AsSpan(Offset(indices[i]), size).CopyTo(pixels.AsSpan(i * size, size));
        var labels = Labels is null ? null : Array.ConvertAll(indices, i => Labels[i]);
        return new ImageDataset(pixels, indices.Length, Channels, Height, Width, labels, Source);
    }

    /// <summary>
    /// The same images with their pixel positions rearranged by <paramref name="permutation"/> (the
    /// same rearrangement for every image and channel), as a new dataset with the same labels.
    /// </summary>
    public ImageDataset Permuted(PixelPermutation permutation)
    {
        ArgumentNullException.ThrowIfNull(permutation);
        int plane = Height * Width;
        if (permutation.Positions.Count != plane)
            throw new ArgumentException($"a permutation of {permutation.Positions.Count} positions for images of {Height}x{Width}", nameof(permutation));
        var pixels = new byte[Pixels.LongLength];
        for (long start = 0; start < pixels.LongLength; start += plane)
            permutation.Apply(Pixels.AsSpan((int)start, plane), pixels.AsSpan((int)start, plane));
        return new ImageDataset(pixels, Count, Channels, Height, Width, Labels, Source);
    }

    int Offset(int index)
    {
        if ((uint)index >= (uint)Count)
            throw new ArgumentOutOfRangeException(nameof(index), index, $"the dataset holds {Count} images");
        return index * ImageSize;
    }
}

/// <summary>
/// Training images, images held out for evaluation (the test split), and a line saying where they
/// came from; optionally a validation set taken from the training images (<see cref="WithValidation"/>).
/// </summary>
public sealed record DataSplits(ImageDataset Train, ImageDataset HeldOut, string Description)
{
    /// <summary>Images taken out of the training split to choose the best checkpoint by; null for none.</summary>
    public ImageDataset? Validation { get; init; }

    /// <summary>
    /// The positions in the training split before <see cref="WithValidation"/> of the images now in
    /// <see cref="Train"/> and in <see cref="Validation"/> (ascending, disjoint; null without a validation set).
    /// </summary>
    public (int[] Train, int[] Validation)? ValidationSplit { get; init; }

    /// <summary>Every split with its pixels rearranged by <paramref name="permutation"/> (none: these splits).</summary>
    public DataSplits Permuted(PixelPermutation? permutation) => permutation is null ? this
        : new DataSplits(Train.Permuted(permutation), HeldOut.Permuted(permutation),
            $"{Description}, pixels permuted (seed {permutation.Seed})")
        { Validation = Validation?.Permuted(permutation), ValidationSplit = ValidationSplit };

    /// <summary>
    /// Takes <paramref name="count"/> images out of the training split as a validation set (0: these
    /// splits), chosen by a shuffle seeded with <paramref name="seed"/> (a stream of its own: not the
    /// data order's, nor the held-out split's), so the same images in every process; both parts keep
    /// the training split's order. A <see cref="UserError"/> when fewer than <paramref name="count"/> + 1
    /// training images are there.
    /// </summary>
    public DataSplits WithValidation(int count, int seed)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        if (count == 0) return this;
        if (Validation is not null) throw new InvalidOperationException("these splits already hold a validation set");
        if (count >= Train.Count)
            throw new UserError($"validation images: {count} asked for, but the training split holds {Train.Count} ({Description}); " +
                                $"hold out at most {Train.Count - 1}, so that some are left to train on");
        var order = Enumerable.Range(0, Train.Count).ToArray();
        // A fixed arithmetic mix (not HashCode.Combine, which is salted per process).
        new Random(unchecked(seed * 1_000_003 + 0x7A11DA7E)).Shuffle(order);
        var validation = order[..count];
        var train = order[count..];
        Array.Sort(validation);
        Array.Sort(train);
        return new DataSplits(Train.Subset(train), HeldOut,
            $"{Description}; {count} of the training images held out for validation (seed {seed})")
        { Validation = Train.Subset(validation), ValidationSplit = (train, validation) };
    }
}
