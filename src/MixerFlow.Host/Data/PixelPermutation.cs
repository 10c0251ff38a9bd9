using static TorchSharp.torch;

namespace MixerFlow.Host.Data;

/// <summary>
/// One fixed, seeded shuffle of an image's H x W spatial positions, the same for every image and
/// every channel: the data-side transform of the pixel-permutation test (a model that relies on
/// neighbouring pixels loses its advantage on permuted images). <see cref="Positions"/>[p] is the
/// position of the original image whose pixel lands at position p (row-major, y * W + x).
/// </summary>
public sealed class PixelPermutation
{
    /// <summary>For each position of a permuted image, the original position its pixel comes from.</summary>
    public IReadOnlyList<int> Positions => positions;

    /// <summary>The seed the permutation was drawn with.</summary>
    public int Seed { get; }

    readonly int[] positions;
    readonly int[] inverse;

    PixelPermutation(int seed, int[] positions)
    {
        Seed = seed;
        this.positions = positions;
        inverse = new int[positions.Length];
        for (int p = 0; p < positions.Length; p++) inverse[positions[p]] = p;
    }

    /// <summary>
    /// The permutation of <paramref name="height"/> x <paramref name="width"/> positions drawn with
    /// <paramref name="seed"/>: a function of the seed and the size only (a fixed shuffle, the same in
    /// every process); null when <paramref name="seed"/> is 0 (no permutation).
    /// </summary>
    public static PixelPermutation? Of(int seed, int height, int width)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(height);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(width);
        if (seed == 0) return null;
        var order = Enumerable.Range(0, height * width).ToArray();
        new Random(unchecked(seed * 1_000_003 + 0x9E37)).Shuffle(order);
        return new PixelPermutation(seed, order);
    }

    /// <summary>Rearranges one channel plane (or any run of H x W values): result[p] = plane[Positions[p]].</summary>
    internal void Apply(ReadOnlySpan<byte> plane, Span<byte> result)
    {
        for (int p = 0; p < positions.Length; p++) result[p] = plane[positions[p]];
    }

    /// <summary>Permutes images [N, C, H, W] (a new tensor): what the model sees.</summary>
    public Tensor Permute(Tensor images) => Gather(images, positions);

    /// <summary>Undoes <see cref="Permute"/> on images [N, C, H, W] (a new tensor): what a picture shows.</summary>
    public Tensor Unpermute(Tensor images) => Gather(images, inverse);

    static Tensor Gather(Tensor images, int[] from)
    {
        ArgumentNullException.ThrowIfNull(images);
        var shape = images.shape;
        if (shape.Length != 4 || shape[2] * shape[3] != from.Length)
            throw new ArgumentException($"expected images [N, C, H, W] with H x W = {from.Length}, got [{string.Join(", ", shape)}]", nameof(images));
        using var index = tensor(from.Select(i => (long)i).ToArray(), device: images.device);
        using var flat = images.reshape(shape[0], shape[1], from.Length);
        using var picked = flat.index_select(2, index);
        return picked.reshape(shape);
    }
}
