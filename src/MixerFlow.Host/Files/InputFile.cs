using System.Runtime.InteropServices;
using System.Text;

namespace MixerFlow.Host.Files;

/// <summary>What a path names, links followed.</summary>
public enum EntryKind
{
    /// <summary>Nothing (or nothing this process may look at).</summary>
    Missing,
    /// <summary>A regular file.</summary>
    Regular,
    /// <summary>A folder.</summary>
    Folder,
    /// <summary>A named pipe (FIFO): opening it waits for a writer, reading it may never end.</summary>
    Pipe,
    /// <summary>A character device such as /dev/zero or /dev/null.</summary>
    CharacterDevice,
    /// <summary>A block device (a disk).</summary>
    BlockDevice,
    /// <summary>A Unix-domain socket.</summary>
    Socket,
}

/// <summary>
/// Opens and reads the files the program is given (data, configurations, specs, settings,
/// checkpoints, images) only when they are regular files, and only up to a size fixed before
/// anything is read: a named pipe would hold the open for ever and a device such as /dev/zero
/// never ends, so both are refused by their type, before they are opened, with a
/// <see cref="UserError"/> naming the file.
/// </summary>
public static partial class InputFile
{
    /// <summary>The most a text input (a JSON configuration, spec, settings or summary file) may hold: 16 MiB.</summary>
    public const long TextLimit = 16L << 20;

    /// <summary>What <paramref name="path"/> names, links followed, found without opening it. The path is
    /// made absolute first, as the file APIs do (so "a/missing/../b" names "a/b").</summary>
    public static EntryKind Kind(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        path = Path.GetFullPath(path);
        if (OperatingSystem.IsWindows()) return ManagedKind(path);
        try
        {
            if (Stat(path, out var status) != 0) return EntryKind.Missing;
            return (status.Mode & 0xF000) switch
            {
                0x1000 => EntryKind.Pipe,
                0x2000 => EntryKind.CharacterDevice,
                0x4000 => EntryKind.Folder,
                0x6000 => EntryKind.BlockDevice,
                0xC000 => EntryKind.Socket,
                _ => EntryKind.Regular,
            };
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return ManagedKind(path);
        }
    }

    /// <summary>The kind in words, for messages ("a named pipe (FIFO)").</summary>
    public static string Describe(EntryKind kind) => kind switch
    {
        EntryKind.Missing => "missing",
        EntryKind.Regular => "a regular file",
        EntryKind.Folder => "a folder",
        EntryKind.Pipe => "a named pipe (FIFO)",
        EntryKind.CharacterDevice => "a character device",
        EntryKind.BlockDevice => "a block device",
        EntryKind.Socket => "a socket",
        _ => kind.ToString(),
    };

    /// <summary>Whether <paramref name="kind"/> is something other than a regular file, a folder or nothing.</summary>
    public static bool IsSpecial(EntryKind kind) => kind is not (EntryKind.Missing or EntryKind.Regular or EntryKind.Folder);

    /// <summary>
    /// Refuses <paramref name="path"/> when it names a pipe, a device or a socket (a missing file,
    /// a regular file and a folder pass: the caller words those). <paramref name="what"/> names
    /// the input in the message (for example <c>--config</c>).
    /// </summary>
    /// <exception cref="UserError">The path is not a regular file.</exception>
    public static void RefuseSpecial(string path, string what) => RefuseSpecial(path, Kind(path), what);

    static void RefuseSpecial(string path, EntryKind kind, string what)
    {
        if (IsSpecial(kind))
            throw new UserError($"{path}: is {Describe(kind)}, not a regular file; {what} must be a regular file");
    }

    /// <summary>
    /// Opens <paramref name="path"/> for reading if it is a regular file of at most
    /// <paramref name="limit"/> bytes; its type and size are checked before it is opened.
    /// </summary>
    /// <exception cref="UserError">The file is missing, not a regular file, too large, or cannot be opened.</exception>
    public static FileStream Open(string path, long limit, string what)
    {
        ArgumentNullException.ThrowIfNull(path);
        var kind = Kind(path);
        if (kind == EntryKind.Missing) throw new UserError($"{path}: no such file; {what} must be an existing regular file");
        if (kind == EntryKind.Folder) throw new UserError($"{path}: is a folder; {what} must be a regular file");
        RefuseSpecial(path, kind, what);
        FileStream stream;
        try { stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new UserError($"{path}: cannot read ({OutputPath.Reason(e)})", e);
        }
        if (stream.Length > limit)
        {
            long length = stream.Length;
            stream.Dispose();
            throw TooLarge(path, length, limit, what);
        }
        return stream;
    }

    static UserError TooLarge(string path, long length, long limit, string what) =>
        new($"{path}: holds {(length > limit ? $"{length:N0}" : $"more than {limit:N0}")} bytes, more than the {limit:N0} that {what} may hold");

    /// <summary>The whole of a regular file of at most <paramref name="limit"/> bytes (checked before reading, and again while reading).</summary>
    /// <exception cref="UserError">As <see cref="Open"/>; also a file that grows past the limit while it is read.</exception>
    public static byte[] ReadAllBytes(string path, long limit, string what)
    {
        using var stream = Open(path, limit, what);
        using var copy = new MemoryStream((int)Math.Min(stream.Length, 1 << 20));
        var chunk = new byte[1 << 16];
        try
        {
            int n;
            while ((n = stream.Read(chunk, 0, chunk.Length)) > 0)
            {
                if (copy.Length + n > limit) throw TooLarge(path, copy.Length + n, limit, what);
                copy.Write(chunk, 0, n);
            }
        }
        catch (IOException e) { throw new UserError($"{path}: cannot read ({OutputPath.Reason(e)})", e); }
        return copy.ToArray();
    }

    /// <summary>The text of a regular file of at most <paramref name="limit"/> bytes (UTF-8 unless a byte-order mark says otherwise).</summary>
    /// <exception cref="UserError">As <see cref="ReadAllBytes"/>.</exception>
    public static string ReadAllText(string path, long limit, string what)
    {
        var bytes = ReadAllBytes(path, limit, what);
        using var reader = new StreamReader(new MemoryStream(bytes, writable: false), Encoding.UTF8, detectEncodingFromByteOrderMarks: true);
        return reader.ReadToEnd();
    }

    static EntryKind ManagedKind(string path) =>
        Directory.Exists(path) ? EntryKind.Folder : File.Exists(path) ? EntryKind.Regular : EntryKind.Missing;

    /// <summary>The head of the runtime's own stat record (System.Native's FileStatus): its
    /// flags, then the mode with POSIX's type bits; the rest of the record is room only.</summary>
    [StructLayout(LayoutKind.Sequential, Size = 512)]
    struct FileStatus
    {
        public int Flags;
        public int Mode;
    }

    /// <summary>stat(2), links followed, through the runtime's own native library (present wherever .NET runs on Unix).</summary>
    [LibraryImport("libSystem.Native", EntryPoint = "SystemNative_Stat", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int Stat(string path, out FileStatus status);
}
