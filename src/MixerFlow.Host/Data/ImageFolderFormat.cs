using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using SixLabors.ImageSharp.Processing;

namespace MixerFlow.Host.Data;

/// <summary>A folder of PNG/JPEG files, or of class subfolders holding them (the ImageFolder convention).</summary>
internal static class ImageFolderFormat
{
    /// <summary>Larger images are refused before decoding: a small file can declare a huge canvas.</summary>
    public const int MaxSide = 4096;

    /// <summary>The largest image file read: 256 MiB, well above any PNG or JPEG of <see cref="MaxSide"/> pixels a side.</summary>
    public const long MaxFileBytes = 256L << 20;

    public sealed record Result(ImageDataset Images, string[]? Classes, int Skipped);

    /// <summary>The PNG/JPEG files directly inside <paramref name="folder"/>, in name order; other files are counted.</summary>
    public static List<string> ImageFiles(string folder, SearchOption depth, ref int skipped)
    {
        var images = new List<string>();
        foreach (var file in Directory.GetFiles(folder, "*", depth).Where(f => !Hidden(f)).Order(StringComparer.Ordinal))
        {
            if (FileContent.Sniff(file, out _) is ContentKind.Png or ContentKind.Jpeg) images.Add(file);
            else skipped++;
        }
        return images;
    }

    static bool Hidden(string path) => Path.GetFileName(path).StartsWith('.');

    /// <summary>
    /// Reads the folder's images, or, when it holds no images but does hold subfolders, each subfolder's images
    /// (searched recursively) labelled by the subfolder's place in name order.
    /// </summary>
    public static Result Read(string folder, int channels, int height, int width)
    {
        if (channels is not (1 or 3))
            throw new UserError($"images can be read as 1 (grey) or 3 (RGB) channels, but the model expects {channels}");
        int skipped = 0;
        var files = ImageFiles(folder, SearchOption.TopDirectoryOnly, ref skipped);
        string[]? classes = null;
        List<int>? labels = null;
        if (files.Count == 0)
        {
            var subfolders = Directory.GetDirectories(folder).Where(d => !Hidden(d)).Order(StringComparer.Ordinal).ToArray();
            if (subfolders.Length > 0)
            {
                classes = subfolders.Select(d => Path.GetFileName(d)).ToArray();
                labels = new List<int>();
                for (int c = 0; c < subfolders.Length; c++)
                {
                    var inClass = ImageFiles(subfolders[c], SearchOption.AllDirectories, ref skipped);
                    // An empty class would still take a label (and a one-hot slot) that no image ever has.
                    if (inClass.Count == 0)
                        throw new UserError(
                            $"class folder '{subfolders[c]}' holds no PNG or JPEG images; remove it or add images " +
                            "(every subfolder of a class-labelled image folder becomes a class)");
                    files.AddRange(inClass);
                    labels.AddRange(Enumerable.Repeat(c, inClass.Count));
                }
            }
        }
        if (files.Count == 0)
            throw new UserError(
                $"'{folder}' holds no PNG or JPEG images{(skipped > 0 ? $" ({skipped} other files)" : "")}; expected " +
                $"{DataFormats.FolderListing}, the images directly or in one subfolder per class");

        int size = channels * height * width;
        if ((long)files.Count * size > Array.MaxLength)
            throw new UserError($"{files.Count} images of {channels}x{height}x{width} are more than one data set may hold here");
        var pixels = new byte[(long)files.Count * size];
        for (int i = 0; i < files.Count; i++) DecodeInto(files[i], channels, height, width, pixels, i * size);
        var dataset = new ImageDataset(pixels, files.Count, channels, height, width, labels?.ToArray(), folder);
        return new Result(dataset, classes, skipped);
    }

    /// <summary>One PNG/JPEG file as a data set of one image (scaled to cover, centre-cropped).</summary>
    public static ImageDataset ReadFile(string path, int channels, int height, int width)
    {
        if (channels is not (1 or 3))
            throw new UserError($"images can be read as 1 (grey) or 3 (RGB) channels, but the model expects {channels}");
        if (Directory.Exists(path)) throw new UserError($"'{path}' is a folder; expected a PNG or JPEG file");
        if (!File.Exists(path)) throw new UserError($"'{path}' does not exist");
        var pixels = new byte[channels * height * width];
        DecodeInto(path, channels, height, width, pixels, 0);
        return new ImageDataset(pixels, 1, channels, height, width, null, path);
    }

    /// <summary>Decodes one file as grey (1 channel) or RGB (3) planes at <paramref name="offset"/>.</summary>
    static void DecodeInto(string path, int channels, int height, int width, byte[] pixels, int offset)
    {
        if (channels == 1) Decode<L8>(path, height, width, pixels, offset, (row, plane, x, stride) => plane[x] = row.PackedValue);
        else Decode<Rgb24>(path, height, width, pixels, offset, (row, plane, x, stride) =>
        {
            plane[x] = row.R;
            plane[stride + x] = row.G;
            plane[2 * stride + x] = row.B;
        });
    }

    delegate void Store<TPixel>(TPixel pixel, Span<byte> plane, int x, int planeStride);

    /// <summary>Decodes, scales to cover height x width, centre-crops, and writes channel-major at <paramref name="offset"/>.</summary>
    static void Decode<TPixel>(string path, int height, int width, byte[] pixels, int offset, Store<TPixel> store)
        where TPixel : unmanaged, IPixel<TPixel>
    {
        // Opened only when it is a regular file of a bounded size: a pipe or a device is refused unopened.
        using var file = Files.InputFile.Open(path, MaxFileBytes, "an image file");
        try
        {
            var info = Image.Identify(file)
                       ?? throw new UserError($"'{path}' looks like a PNG/JPEG file but cannot be decoded");
            if (info.Width > MaxSide || info.Height > MaxSide)
                throw new UserError(
                    $"'{path}' is {info.Width}x{info.Height} pixels; images larger than {MaxSide}x{MaxSide} are refused");
            file.Position = 0;
            using var image = Image.Load<TPixel>(file);
            if (image.Width != width || image.Height != height)
                image.Mutate(x => x.Resize(new ResizeOptions
                {
                    Size = new Size(width, height),
                    Mode = ResizeMode.Crop,
                    Position = AnchorPositionMode.Center,
                }));
            int stride = height * width;
            image.ProcessPixelRows(rows =>
            {
                for (int y = 0; y < rows.Height; y++)
                {
                    var row = rows.GetRowSpan(y);
                    var plane = pixels.AsSpan(offset + y * width);
                    for (int x = 0; x < row.Length; x++) store(row[x], plane, x, stride);
                }
            });
        }
        catch (Exception e) when (e is ImageFormatException or NotSupportedException)
        {
            throw new UserError($"'{path}' cannot be decoded as an image: {e.Message}", e);
        }
    }
}
