namespace MixerFlow.Host.Data;

/// <summary>
/// CIFAR-10's binary batches: records of one label byte then 3072 pixel bytes, the red, green and blue
/// 32x32 planes in turn, which is already the C x H x W layout.
/// </summary>
internal static class CifarFormat
{
    public const int Channels = 3, Side = 32, ImageBytes = Channels * Side * Side, RecordBytes = 1 + ImageBytes;
    public const int Classes = 10;

    /// <summary>
    /// Whether the bytes could be CIFAR-10 records, which carry no magic: a whole number of records,
    /// every label byte a class index.
    /// </summary>
    public static bool Looks(byte[] content)
    {
        if (content.Length == 0 || content.Length % RecordBytes != 0) return false;
        for (int r = 0; r < content.Length; r += RecordBytes)
            if (content[r] >= Classes) return false;
        return true;
    }

    /// <summary>The most record bytes the batches of one data set may hold together (decompressed): one array's worth.</summary>
    public static readonly long MaxTotalBytes = Array.MaxLength;

    /// <summary>
    /// The batch files, concatenated in the order given. Their decompressed bytes are counted across
    /// the files, and reading stops as soon as the total passes <paramref name="limit"/> (by default
    /// <see cref="MaxTotalBytes"/>), so batches too large together are refused before they are all in memory.
    /// </summary>
    public static ImageDataset Read(IReadOnlyList<string> paths, long? limit = null)
    {
        long total = limit ?? MaxTotalBytes, read = 0;
        var contents = new List<(string, byte[])>();
        foreach (var p in paths)
        {
            var bytes = ReadBatch(p, total - read,
                $"the {total - read:N0} bytes left of the {total:N0} that CIFAR-10 batches may hold together ({contents.Count} batch(es) before it)");
            read += bytes.Length;
            contents.Add((p, bytes));
        }
        return Assemble(contents);
    }

    /// <summary>Batches already read (and checked with <see cref="Looks"/> or <see cref="ReadBatch"/>) as one dataset.</summary>
    public static ImageDataset Assemble(IReadOnlyList<(string Path, byte[] Bytes)> contents)
    {
        var paths = contents.Select(c => c.Path).ToList();
        long count = contents.Sum(c => (long)(c.Bytes.Length / RecordBytes));
        if (count * ImageBytes > Array.MaxLength)
            throw new UserError($"{count} CIFAR-10 images are more than one data set may hold here");
        var pixels = new byte[count * ImageBytes];
        var labels = new int[count];
        int i = 0;
        foreach (var (_, bytes) in contents)
            for (int r = 0; r < bytes.Length; r += RecordBytes, i++)
            {
                labels[i] = bytes[r];
                bytes.AsSpan(r + 1, ImageBytes).CopyTo(pixels.AsSpan(i * ImageBytes, ImageBytes));
            }
        string source = paths.Count == 1
            ? paths[0]
            : $"{Path.GetDirectoryName(paths[0])}/{{{string.Join(", ", paths.Select(Path.GetFileName))}}}";
        return new ImageDataset(pixels, (int)count, Channels, Side, Side, labels, source);
    }

    /// <summary>One batch file, checked record by record; its content may hold at most <paramref name="limit"/> bytes
    /// (worded as <paramref name="limitText"/> in the message).</summary>
    public static byte[] ReadBatch(string path, long limit, string? limitText = null)
    {
        var bytes = FileContent.ReadAll(path, limit, out _, limitText);
        if (bytes.Length == 0 || bytes.Length % RecordBytes != 0)
            throw new UserError(
                $"'{path}' is not a CIFAR-10 binary batch: it holds {bytes.Length} bytes, which is not a whole number " +
                $"of {RecordBytes}-byte records (1 label byte + 3x32x32 pixel bytes)");
        for (int r = 0; r < bytes.Length; r += RecordBytes)
            if (bytes[r] >= Classes)
                throw new UserError(
                    $"'{path}' is not a CIFAR-10 binary batch: record {r / RecordBytes} has label {bytes[r]}, " +
                    $"but CIFAR-10 labels are 0..{Classes - 1} (CIFAR-100's two-label records are not supported)");
        return bytes;
    }
}
