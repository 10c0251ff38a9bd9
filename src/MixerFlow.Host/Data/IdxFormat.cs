using System.Buffers.Binary;

namespace MixerFlow.Host.Data;

/// <summary>The IDX format of MNIST and Fashion-MNIST: a big-endian magic and dimension sizes, then unsigned bytes.</summary>
internal static class IdxFormat
{
    public const int ImagesMagic = 0x00000803;
    public const int LabelsMagic = 0x00000801;
    /// <summary>The most pixel bytes an images file may claim (the largest array .NET allocates).</summary>
    public static readonly long MaxBodyBytes = Array.MaxLength;

    /// <summary>An images file and, when given, its labels file, as a one-channel dataset.</summary>
    public static ImageDataset Read(string imagesPath, string? labelsPath)
    {
        var (pixels, count, height, width) = ReadImages(imagesPath);
        int[]? labels = null;
        if (labelsPath is not null)
        {
            labels = ReadLabels(labelsPath);
            if (labels.Length != count)
                throw new UserError(
                    $"'{labelsPath}' holds {labels.Length} labels but '{imagesPath}' holds {count} images; they must match");
        }
        string source = labelsPath is null ? imagesPath : $"{imagesPath} + {Path.GetFileName(labelsPath)}";
        return new ImageDataset(pixels, count, 1, height, width, labels, source);
    }

    public static (byte[] Pixels, int Count, int Height, int Width) ReadImages(string path)
    {
        using var s = FileContent.Open(path, out bool gzip);
        var dims = ReadHeader(s, path, gzip, ImagesMagic, "images", 3);
        var (count, height, width) = (dims[0], dims[1], dims[2]);
        string claim = $"its header says {count} images of {height}x{width}";
        long bytes;
        try { bytes = checked((long)count * height * width); }
        catch (OverflowException) { throw new UserError($"'{path}' has a corrupt IDX header: {claim}, more bytes than any file may hold"); }
        if (bytes > MaxBodyBytes)
            throw new UserError($"'{path}' has a corrupt IDX header: {claim}, {bytes:N0} bytes, more than an IDX data set may hold ({MaxBodyBytes:N0})");
        var pixels = FileContent.ReadBody(s, path, gzip, 16, bytes, claim);
        return (pixels, count, height, width);
    }

    public static int[] ReadLabels(string path)
    {
        using var s = FileContent.Open(path, out bool gzip);
        int count = ReadHeader(s, path, gzip, LabelsMagic, "labels", 1)[0];
        var bytes = FileContent.ReadBody(s, path, gzip, 8, count, $"its header says {count} labels");
        return Array.ConvertAll(bytes, b => (int)b);
    }

    static int[] ReadHeader(Stream s, string path, bool gzip, int magic, string what, int rank)
    {
        int headerBytes = 4 * (1 + rank);
        var header = new byte[headerBytes];
        int n;
        try
        {
            n = s.ReadAtLeast(header, headerBytes, throwOnEndOfStream: false);
        }
        catch (InvalidDataException e) when (gzip)
        {
            throw FileContent.Damaged(path, e);
        }
        if (n >= 4 && BinaryPrimitives.ReadInt32BigEndian(header) != magic)
            throw new UserError(
                $"'{path}' is not an IDX {what} file: it starts with 0x{BinaryPrimitives.ReadUInt32BigEndian(header):X8} " +
                $"where the IDX {what} magic 0x{magic:X8} was expected");
        if (n < headerBytes)
            throw new UserError(
                $"'{path}' is truncated: an IDX {what} header needs {headerBytes} bytes, but {(gzip ? "it decompresses to" : "the file holds")} only {n}");
        var dims = new int[rank];
        for (int i = 0; i < rank; i++)
        {
            dims[i] = BinaryPrimitives.ReadInt32BigEndian(header.AsSpan(4 * (i + 1)));
            if (dims[i] < 0 || (rank > 1 && i > 0 && dims[i] == 0))
                throw new UserError($"'{path}' has a corrupt IDX header: dimension {i} is {dims[i]}");
        }
        return dims;
    }
}
