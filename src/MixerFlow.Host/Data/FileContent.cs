using System.IO.Compression;

namespace MixerFlow.Host.Data;

/// <summary>What a file holds, judged by its first bytes (after gunzipping when it is gzip).</summary>
internal enum ContentKind { Unknown, IdxImages, IdxLabels, IdxOther, Png, Jpeg }

/// <summary>Opening files that may be gzip-compressed, sniffing their content, and reading them whole.</summary>
internal static class FileContent
{
    static readonly byte[] PngMagic = { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A };

    public static bool IsGzip(ReadOnlySpan<byte> head) => head.Length >= 2 && head[0] == 0x1F && head[1] == 0x8B;

    /// <summary>The file's content stream, gunzipped when the file starts with the gzip magic.</summary>
    public static Stream Open(string path, out bool gzip)
    {
        var file = OpenFile(path);
        Span<byte> head = stackalloc byte[2];
        int n = file.ReadAtLeast(head, 2, throwOnEndOfStream: false);
        file.Position = 0;
        gzip = IsGzip(head[..n]);
        return gzip ? new GZipStream(file, CompressionMode.Decompress) : file;
    }

    /// <summary>A data file, opened only when it is a regular file (a pipe or a device is refused before it is opened).</summary>
    static FileStream OpenFile(string path) => Files.InputFile.Open(path, long.MaxValue, "a data file");

    /// <summary>Up to <paramref name="count"/> leading content bytes (fewer when the content is shorter).</summary>
    public static byte[] Head(string path, int count, out bool gzip)
    {
        using var s = Open(path, out gzip);
        var buffer = new byte[count];
        int n = Guarded(path, gzip, () => s.ReadAtLeast(buffer, count, throwOnEndOfStream: false));
        return buffer[..n];
    }

    public static ContentKind Sniff(string path, out bool gzip)
    {
        var head = Head(path, 8, out gzip);
        if (head.Length >= 4 && head[0] == 0 && head[1] == 0)
            return (head[2], head[3]) switch
            {
                (0x08, 0x03) => ContentKind.IdxImages,
                (0x08, 0x01) => ContentKind.IdxLabels,
                _ => ContentKind.IdxOther,
            };
        if (!gzip && head.AsSpan().SequenceEqual(PngMagic)) return ContentKind.Png;
        if (!gzip && head.Length >= 3 && head[0] == 0xFF && head[1] == 0xD8 && head[2] == 0xFF) return ContentKind.Jpeg;
        return ContentKind.Unknown;
    }

    /// <summary>
    /// Reads exactly <paramref name="bodyBytes"/> bytes from <paramref name="s"/> (already past a header of
    /// <paramref name="headerBytes"/>), which must then be at its end; <paramref name="claim"/> words what the
    /// header says (e.g. "its header says 3 images of 28x28"). The buffer grows with what actually arrives, so a
    /// header that lies about its size cannot make us allocate gigabytes for a small file.
    /// </summary>
    public static byte[] ReadBody(Stream s, string path, bool gzip, long headerBytes, long bodyBytes, string claim)
    {
        long needed = headerBytes + bodyBytes;
        if (bodyBytes > Array.MaxLength)
            throw new UserError($"'{path}': {claim}, {needed} bytes, more than one data set may hold ({Array.MaxLength})");
        var buffer = new byte[Math.Min(bodyBytes, 16 << 20)];
        long got = 0;
        Guarded(path, gzip, () =>
        {
            while (got < bodyBytes)
            {
                if (got == buffer.Length) Array.Resize(ref buffer, (int)Math.Min(bodyBytes, 2L * buffer.Length));
                int n = s.Read(buffer, (int)got, buffer.Length - (int)got);
                if (n == 0) break;
                got += n;
            }
            return 0;
        });
        string holds = gzip ? "it decompresses to" : "the file holds";
        if (got < bodyBytes)
            throw new UserError($"'{path}' is truncated: {claim}, which needs {needed} bytes, but {holds} only {headerBytes + got}");
        if (Guarded(path, gzip, () => s.ReadByte()) >= 0)
            throw new UserError($"'{path}' is longer than its header says: {claim}, which needs {needed} bytes, but {holds} more");
        return buffer;
    }

    /// <summary>
    /// The whole content, refusing anything over <paramref name="limit"/> bytes: a plain file by its
    /// size before reading, gzip content as soon as its decompressed bytes pass the limit.
    /// <paramref name="limitText"/> words the limit in the message (default: "N bytes").
    /// </summary>
    public static byte[] ReadAll(string path, long limit, out bool gzip, string? limitText = null)
    {
        using var s = Open(path, out gzip);
        bool isGzip = gzip;
        UserError TooMuch() =>
            new($"'{path}' {(isGzip ? "decompresses to" : "holds")} more than {limitText ?? $"{limit:N0} bytes"}, too much to load");
        if (s is FileStream plain && plain.Length > limit) throw TooMuch();
        using var copy = new MemoryStream();
        var chunk = new byte[1 << 20];
        Guarded(path, gzip, () =>
        {
            int n;
            while ((n = s.Read(chunk, 0, chunk.Length)) > 0)
            {
                if (copy.Length + n > limit) throw TooMuch();
                copy.Write(chunk, 0, n);
            }
            return 0;
        });
        return copy.ToArray();
    }

    /// <summary>
    /// The error for gzip content that cannot be decoded. .NET words garbled deflate data as
    /// "unsupported compression method", which reads as a missing feature; it is a damaged file.
    /// </summary>
    public static UserError Damaged(string path, InvalidDataException e) =>
        new($"'{path}' is a damaged gzip file: its compressed data cannot be decoded (re-download or re-compress it)", e);

    /// <summary>Turns a damaged gzip stream into an error naming the file.</summary>
    static T Guarded<T>(string path, bool gzip, Func<T> read)
    {
        try
        {
            return read();
        }
        catch (InvalidDataException e) when (gzip)
        {
            throw Damaged(path, e);
        }
        catch (IOException e)
        {
            throw new UserError($"cannot read '{path}': {e.Message}", e);
        }
    }
}
