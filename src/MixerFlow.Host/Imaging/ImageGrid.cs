using MixerFlow.Core;
using MixerFlow.Host.Files;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats.Png;
using SixLabors.ImageSharp.PixelFormats;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Host.Imaging;

/// <summary>
/// Writes batches of images as PNG grids. Images are [N, C, H, W] (C = 1 or 3; a single [C, H, W]
/// image is also accepted) holding values in 0..255, of any floating or integer dtype, on any
/// device: they are moved to the CPU, clamped to 0..255 and rounded. 1-channel images are written
/// as 8-bit grey (L8), 3-channel images as 8-bit RGB (Rgb24).
/// </summary>
/// <remarks>
/// Layout (as torchvision's make_grid): tiles are placed row by row, <c>columns</c> to a row
/// (fewer when N is smaller), each upscaled <c>scale</c> times by nearest neighbour, with
/// <c>padding</c> pixels of neutral grey (<see cref="PaddingValue"/>) between tiles and around the
/// border. A grid of N tiles of H x W is
/// <c>cols * (W*scale + padding) + padding</c> wide and <c>rows * (H*scale + padding) + padding</c>
/// high, where <c>cols = min(columns, N)</c> and <c>rows = ceil(N / cols)</c>.
/// Unused cells in the last row stay grey.
/// </remarks>
public static class ImageGrid
{
    /// <summary>The grey level of padding and empty cells (in every channel).</summary>
    public const byte PaddingValue = 128;

    /// <summary>Writes <paramref name="images"/> as one PNG grid at <paramref name="path"/>, atomically.</summary>
    public static void Save(Tensor images, string path, int columns = 8, int scale = 2, int padding = 1)
    {
        var (pixels, n, c, h, w) = ToBytes(images);
        var png = Compose(pixels, n, c, h, w, columns, scale, padding);
        WritePng(png, c, path);
    }

    /// <summary>
    /// Writes each original beside its reconstruction: two columns per pair (original on the
    /// left), <paramref name="pairsPerRow"/> pairs to a row, in the same layout as
    /// <see cref="Save"/> with padding 1 (so the grid has <c>2 * min(pairsPerRow, N)</c> columns).
    /// </summary>
    public static void SavePairs(Tensor originals, Tensor reconstructions, string path, int scale = 2, int pairsPerRow = 4)
    {
        if (pairsPerRow < 1) throw new ArgumentOutOfRangeException(nameof(pairsPerRow), "must be at least 1");
        using var scope = NewDisposeScope();
        var a = AsBatch(originals);
        var b = AsBatch(reconstructions);
        if (!a.shape.SequenceEqual(b.shape))
            throw new ArgumentException(
                $"originals [{string.Join(", ", a.shape)}] and reconstructions [{string.Join(", ", b.shape)}] differ in shape");
        // Interleave: o0, r0, o1, r1, ...
        var interleaved = stack(new[] { a.to(CPU).to_type(float32), b.to(CPU).to_type(float32) }, dim: 1)
            .reshape(2 * a.shape[0], a.shape[1], a.shape[2], a.shape[3]);
        Save(interleaved, path, columns: 2 * pairsPerRow, scale: scale, padding: 1);
    }

    /// <summary>Pixel size of the grid <see cref="Save"/> writes for N tiles of H x W.</summary>
    public static (int Width, int Height) GridSize(int n, int h, int w, int columns = 8, int scale = 2, int padding = 1)
    {
        Validate(n, columns, scale, padding);
        int cols = Math.Min(columns, n);
        int rows = (n + cols - 1) / cols;
        return (cols * (w * scale + padding) + padding, rows * (h * scale + padding) + padding);
    }

    static void Validate(int n, int columns, int scale, int padding)
    {
        if (n < 1) throw new ArgumentException("no images to write");
        if (columns < 1) throw new ArgumentOutOfRangeException(nameof(columns), "must be at least 1");
        if (scale < 1) throw new ArgumentOutOfRangeException(nameof(scale), "must be at least 1");
        if (padding < 0) throw new ArgumentOutOfRangeException(nameof(padding), "must not be negative");
    }

    static Tensor AsBatch(Tensor images)
    {
        var t = images.dim() switch
        {
            4 => images,
            3 => images.unsqueeze(0),
            _ => throw new ArgumentException(
                $"images must be [N, C, H, W] or [C, H, W], got [{string.Join(", ", images.shape)}]"),
        };
        if (t.shape[1] != 1 && t.shape[1] != 3)
            throw new ArgumentException($"images must have 1 or 3 channels, got {t.shape[1]}");
        return t;
    }

    /// <summary>Moves to the CPU, clamps, rounds and flattens to bytes in N, C, H, W order.</summary>
    static (byte[] Pixels, int N, int C, int H, int W) ToBytes(Tensor images)
    {
        using var scope = NewDisposeScope();
        var t = AsBatch(images);
        var cpu = t.detach().to(CPU).to_type(float32).clamp(Ops.Scalar(0), Ops.Scalar(255)).round().to_type(ScalarType.Byte).contiguous();
        var bytes = cpu.data<byte>().ToArray();
        return (bytes, (int)t.shape[0], (int)t.shape[1], (int)t.shape[2], (int)t.shape[3]);
    }

    /// <summary>Lays out the tiles into an interleaved (HWC) byte canvas.</summary>
    internal static (byte[] Canvas, int Width, int Height) Compose(
        byte[] pixels, int n, int c, int h, int w, int columns, int scale, int padding)
    {
        var (width, height) = GridSize(n, h, w, columns, scale, padding);
        int cols = Math.Min(columns, n);
        var canvas = new byte[width * height * c];
        Array.Fill(canvas, PaddingValue);
        int tile = c * h * w;
        for (int i = 0; i < n; i++)
        {
            int x0 = padding + (i % cols) * (w * scale + padding);
            int y0 = padding + (i / cols) * (h * scale + padding);
            for (int y = 0; y < h * scale; y++)
            {
                int sy = y / scale;
                int row = ((y0 + y) * width + x0) * c;
                for (int x = 0; x < w * scale; x++)
                {
                    int sx = x / scale;
                    for (int ch = 0; ch < c; ch++)
                        canvas[row + x * c + ch] = pixels[i * tile + ch * h * w + sy * w + sx];
                }
            }
        }
        return (canvas, width, height);
    }

    static void WritePng((byte[] Canvas, int Width, int Height) png, int channels, string path)
    {
        if (channels == 1)
        {
            using var image = Image.LoadPixelData<L8>(png.Canvas, png.Width, png.Height);
            var encoder = new PngEncoder { ColorType = PngColorType.Grayscale, BitDepth = PngBitDepth.Bit8 };
            AtomicFile.Write(path, (Stream s) => image.SaveAsPng(s, encoder));
        }
        else
        {
            using var image = Image.LoadPixelData<Rgb24>(png.Canvas, png.Width, png.Height);
            var encoder = new PngEncoder { ColorType = PngColorType.Rgb, BitDepth = PngBitDepth.Bit8 };
            AtomicFile.Write(path, (Stream s) => image.SaveAsPng(s, encoder));
        }
    }
}
