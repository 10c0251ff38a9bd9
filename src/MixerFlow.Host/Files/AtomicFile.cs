using System.Text;

namespace MixerFlow.Host.Files;

/// <summary>
/// Writes a file so that a crash never leaves it half-written: the content goes to a temporary
/// file in the same folder, which is flushed to disk and then renamed over the target.
/// If the writer throws, the temporary file is removed and the target is left as it was; a
/// refusal of the file system (a full disk, a read-only folder, a folder in the target's place)
/// becomes an <see cref="IOException"/> whose one-line message names the target and the reason.
/// A target that exists but is not a regular file (a named pipe, a device such as /dev/null) is
/// refused with a <see cref="UserError"/> before anything is written: the rename would replace it.
/// </summary>
public static class AtomicFile
{
    /// <summary>Writes <paramref name="path"/> through a stream.</summary>
    public static void Write(string path, Action<Stream> write)
    {
        ArgumentNullException.ThrowIfNull(write);
        var target = Path.GetFullPath(path);
        OutputPath.RefuseSpecialTarget(target, "an output");
        string? temp = null;
        try
        {
            temp = TempPathFor(target);
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            {
                write(stream);
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, target, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            TryDelete(temp);
            throw Refused(target, e);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
    }

    /// <summary>
    /// Writes <paramref name="path"/> through an API that only writes to a path (for example
    /// TorchSharp's <c>module.save(path)</c>): it is given a temporary path in the same folder,
    /// whose file is then flushed to disk and renamed over the target.
    /// </summary>
    public static void Write(string path, Action<string> writeToPath)
    {
        ArgumentNullException.ThrowIfNull(writeToPath);
        var target = Path.GetFullPath(path);
        OutputPath.RefuseSpecialTarget(target, "an output");
        string? temp = null;
        try
        {
            temp = TempPathFor(target);
            writeToPath(temp);
            if (!File.Exists(temp))
                throw new IOException($"the writer for '{target}' did not create its temporary file '{temp}'");
            using (var stream = new FileStream(temp, FileMode.Open, FileAccess.ReadWrite, FileShare.None))
                stream.Flush(flushToDisk: true);
            File.Move(temp, target, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            TryDelete(temp);
            throw Refused(target, e);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
    }

    /// <summary>The one-line error for a write of <paramref name="target"/> that the file system refused
    /// (the original is the inner exception).</summary>
    static IOException Refused(string target, Exception e) =>
        new($"{target}: cannot write ({OutputPath.Reason(e)}); " +
            (File.Exists(target) ? "the previous file is unchanged" : "nothing was written"), e);

    /// <summary>Writes <paramref name="text"/> as UTF-8 (no byte-order mark).</summary>
    public static void WriteAllText(string path, string text) =>
        Write(path, (Stream s) =>
        {
            var bytes = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false).GetBytes(text);
            s.Write(bytes, 0, bytes.Length);
        });

    /// <summary>
    /// A fresh temporary name beside the target, <c>.NAME.&lt;R&gt;&lt;C&gt;.tmp[EXT]</c>: R is 16 random hex
    /// digits and C the first 16 hex digits of a SHA-256 over a text of this program's, NAME, R and
    /// EXT, a mark that only this program writes, so that <see cref="IsTempName"/> tells its own
    /// temporaries from a user's file named alike. The extension is kept so that path-based writers
    /// which look at it still behave.
    /// </summary>
    internal static string TempPathFor(string target)
    {
        var folder = Path.GetDirectoryName(target) ?? ".";
        Directory.CreateDirectory(folder);
        var name = Path.GetFileNameWithoutExtension(target);
        var ext = Path.GetExtension(target);
        var random = Convert.ToHexStringLower(System.Security.Cryptography.RandomNumberGenerator.GetBytes(8));
        return Path.Combine(folder, $".{name}.{random}{Mark(name, random, ext)}.tmp{ext}");
    }

    static string Mark(string name, string random, string ext) =>
        Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(
            Encoding.UTF8.GetBytes($"MixerFlow temporary file\0{name}\0{random}\0{ext}")))[..16];

    /// <summary>Whether <paramref name="fileName"/> (a name, not a path) is one of <see cref="TempPathFor"/>'s
    /// temporary names, as a killed write leaves behind: of its form and carrying its mark.</summary>
    public static bool IsTempName(string fileName)
    {
        ArgumentNullException.ThrowIfNull(fileName);
        var m = TempName.Match(fileName);
        return m.Success && m.Groups["mark"].Value == Mark(m.Groups["name"].Value, m.Groups["random"].Value, m.Groups["ext"].Value);
    }

    static readonly System.Text.RegularExpressions.Regex TempName =
        new(@"^\.(?<name>.*)\.(?<random>[0-9a-f]{16})(?<mark>[0-9a-f]{16})\.tmp(?<ext>\.[^.]*)?$", System.Text.RegularExpressions.RegexOptions.CultureInvariant);

    /// <summary>Removes the temporary files that killed writes left in <paramref name="folder"/>; returns their names.</summary>
    public static IReadOnlyList<string> RemoveStaleTemps(string folder)
    {
        var removed = new List<string>();
        if (!Directory.Exists(folder)) return removed;
        foreach (var file in Directory.GetFiles(folder))
        {
            var name = Path.GetFileName(file);
            if (!IsTempName(name)) continue;
            TryDelete(file);
            if (!File.Exists(file)) removed.Add(name);
        }
        return removed;
    }

    static void TryDelete(string? path)
    {
        if (path is null) return;
        try { File.Delete(path); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }
}
