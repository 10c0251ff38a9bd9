namespace MixerFlow.Host.Files;

/// <summary>
/// Checks, before any work is done, that an output can be written where the user asked: a file
/// output is not an existing folder, a pipe or a device, nor (however spelled) one of the command's
/// inputs; a run folder is not an existing file; and the folder that
/// will receive it (the nearest one that exists) accepts a new file. A refusal is a
/// <see cref="UserError"/> that names the path and the problem in one line.
/// Also turns the file system's refusals into short reasons ("the file system is read-only",
/// "no space left on device") for messages that name the file concerned.
/// </summary>
public static class OutputPath
{
    /// <summary>
    /// Checks that <paramref name="path"/> can be written as a file: it is not a folder, no folder
    /// above it is a file, and the nearest existing folder above it accepts a new file (a one-byte
    /// probe file is written there and removed at once, so a read-only or full disk is refused). <paramref name="what"/> names the option, for
    /// the message (for example <c>--out</c>).
    /// </summary>
    /// <exception cref="UserError">The path cannot be written; the message names it and why.</exception>
    public static void CheckFile(string path, string what)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var full = Path.GetFullPath(path);
        if (Directory.Exists(full))
            throw new UserError($"{path}: is a folder; {what} must name a file (for example {Path.Combine(path, "out" + Path.GetExtension(path))})");
        RefuseSpecialTarget(path, what);
        Probe(path, NearestFolder(path, Path.GetDirectoryName(full)), what);
    }

    /// <summary>
    /// <see cref="CheckFile(string, string)"/>, and also refuses a path that names the same file as one of
    /// <paramref name="inputs"/> (an option and the path it gave, for example <c>("--checkpoint", path)</c>;
    /// a null path, an option not given, is skipped),
    /// however it is spelled (<c>./x</c>, a symbolic link), so that an output never replaces an input.
    /// </summary>
    /// <exception cref="UserError">The path cannot be written, or it is one of the inputs.</exception>
    public static void CheckFile(string path, string what, params (string Option, string? Path)[] inputs)
    {
        CheckFile(path, what);
        foreach (var (option, input) in inputs ?? [])
            if (input is not null && SameFile(path, input))
                throw new UserError($"{path}: is the same file as {option} {input}; {what} would replace it: choose another {what}");
    }

    /// <summary>
    /// Refuses an existing <paramref name="path"/> that is not a regular file (a named pipe, a device
    /// such as /dev/null, a socket): writing the program's output would replace it by a regular file.
    /// </summary>
    /// <exception cref="UserError">The path names a pipe, a device or a socket.</exception>
    public static void RefuseSpecialTarget(string path, string what)
    {
        var kind = InputFile.Kind(path);
        if (InputFile.IsSpecial(kind))
            throw new UserError($"{path}: is {InputFile.Describe(kind)}, not a regular file; {what} must name a regular file or a new path (nothing was written)");
    }

    /// <summary>Whether <paramref name="a"/> and <paramref name="b"/> both exist and are the same entry once every symbolic link on them is resolved.</summary>
    public static bool SameFile(string a, string b)
    {
        ArgumentNullException.ThrowIfNull(a);
        ArgumentNullException.ThrowIfNull(b);
        if (InputFile.Kind(a) == EntryKind.Missing || InputFile.Kind(b) == EntryKind.Missing) return false;
        var comparison = OperatingSystem.IsLinux() ? StringComparison.Ordinal : StringComparison.OrdinalIgnoreCase;
        return string.Equals(Resolved(a), Resolved(b), comparison);
    }

    /// <summary>The absolute path with every symbolic link on it resolved, from the root down (a loop of links is left as it is).</summary>
    internal static string Resolved(string path)
    {
        var full = Path.GetFullPath(path);
        for (int hops = 0; hops < 64; hops++)
        {
            var root = Path.GetPathRoot(full) ?? "";
            var parts = full[root.Length..].Split(Path.DirectorySeparatorChar, StringSplitOptions.RemoveEmptyEntries);
            var at = root;
            int i = 0;
            for (; i < parts.Length; i++)
            {
                var next = Path.Combine(at, parts[i]);
                var target = new FileInfo(next).LinkTarget;
                if (target is null) { at = next; continue; }
                // The link's target, taken from the link's folder, then the rest of the path.
                full = Path.GetFullPath(Path.Combine(Path.GetFullPath(target, at), string.Join(Path.DirectorySeparatorChar, parts[(i + 1)..])));
                break;
            }
            if (i == parts.Length) return at;
        }
        return full;
    }

    /// <summary>
    /// Checks that <paramref name="path"/> can be used as a run folder: it is not an existing file,
    /// no folder above it is a file, and it (or, when it does not exist yet, the nearest existing
    /// folder above it) accepts a new file. Nothing is created, so a check that passes leaves no
    /// folder behind.
    /// </summary>
    /// <exception cref="UserError">The folder cannot be written; the message names it and why.</exception>
    public static void CheckFolder(string path, string what)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var full = Path.GetFullPath(path);
        if (File.Exists(full))
            throw new UserError($"{path}: is an existing file, not a folder; {what} names a run folder");
        Probe(path, NearestFolder(path, full), what);
    }

    /// <summary>The nearest existing folder at or above <paramref name="start"/>; a file on the way is refused.</summary>
    static string NearestFolder(string path, string? start)
    {
        var at = start ?? Directory.GetCurrentDirectory();
        while (!Directory.Exists(at))
        {
            if (File.Exists(at))
                throw new UserError($"{path}: {at} is a file, not a folder");
            var up = Path.GetDirectoryName(at);
            if (up is null) break;
            at = up;
        }
        return at;
    }

    static void Probe(string path, string folder, string what)
    {
        // One of AtomicFile's temporary names, so a probe left by a killed process is removed
        // like any other interrupted write.
        var probe = AtomicFile.TempPathFor(Path.Combine(folder, "probe"));
        try
        {
            // One byte, flushed: a full disk is refused here, not after the work.
            using var stream = new FileStream(probe, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1, FileOptions.DeleteOnClose);
            stream.WriteByte(0);
            stream.Flush(flushToDisk: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            var where = string.Equals(Path.GetFullPath(path).TrimEnd(Path.DirectorySeparatorChar), folder.TrimEnd(Path.DirectorySeparatorChar), StringComparison.Ordinal)
                ? "" : $" in {folder}";
            throw new UserError($"{path}: cannot write{where} ({Reason(e)}); choose another {what}", e);
        }
        finally
        {
            try { if (File.Exists(probe)) File.Delete(probe); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    /// <summary>
    /// Why the file system refused, in a few words without the path: the usual errors by name
    /// (read-only file system, no space left on device, permission denied), others by the
    /// runtime's message.
    /// </summary>
    public static string Reason(Exception e)
    {
        ArgumentNullException.ThrowIfNull(e);
        if (e is UnauthorizedAccessException) return "permission denied";
        if (e is IOException && !OperatingSystem.IsWindows())
        {
            // On Unix an IOException's HResult is the errno.
            switch (e.HResult)
            {
                case 28: return "no space left on device";
                case 30: return "the file system is read-only";
                case 122 when OperatingSystem.IsLinux(): return "disk quota exceeded";
                case 21: return "it is a folder";
                case 20: return "a part of the path is not a folder";
            }
        }
        if (e is IOException && OperatingSystem.IsWindows())
        {
            switch (e.HResult & 0xFFFF)
            {
                case 0x70: case 0x27: return "no space left on device";   // ERROR_DISK_FULL, ERROR_HANDLE_DISK_FULL
                case 0x13: return "the disk is write-protected";           // ERROR_WRITE_PROTECT
            }
        }
        var message = e.Message;
        // The runtime's Unix messages end with " : 'PATH'"; the caller names the path itself.
        int cut = message.LastIndexOf(" : '", StringComparison.Ordinal);
        if (cut > 0 && message.EndsWith('\'')) message = message[..cut];
        return message.Trim().TrimEnd('.');
    }

    /// <summary>Whether <paramref name="e"/> is an OS lock held by another handle (not a file-system refusal).</summary>
    public static bool IsSharingViolation(IOException e)
    {
        ArgumentNullException.ThrowIfNull(e);
        return OperatingSystem.IsWindows()
            ? (e.HResult & 0xFFFF) is 0x20 or 0x21      // ERROR_SHARING_VIOLATION, ERROR_LOCK_VIOLATION
            : e.HResult == 11;                          // EWOULDBLOCK (EAGAIN) from flock
    }
}
