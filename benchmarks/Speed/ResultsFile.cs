// The benchmark's results file (--out FILE): everything it prints, under a header that names the
// command, the commit, the machine and the date, so that a table copied into docs/benchmarks.md
// carries where it came from.
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;

namespace MixerFlow.Speed;

/// <summary>The header of a results file and the writer that copies the console into the file.</summary>
public static class ResultsFile
{
    /// <summary>The header: a title, then the command, commit, machine and date as a list.</summary>
    public static string Header(string command, string commit, string machine, DateTime utc) =>
        "# MixerFlow.NET speed (benchmarks/Speed)\n\n" +
        $"- command: `{command}`\n" +
        $"- commit: {commit}\n" +
        $"- machine: {machine}\n" +
        $"- date: {utc:yyyy-MM-dd} (UTC)\n\n";

    /// <summary>The checked-out commit (git rev-parse HEAD in <paramref name="folder"/>), with "+ local changes" when the tree differs; "unknown" without git.</summary>
    public static string Commit(string folder)
    {
        var head = Git(folder, "rev-parse --short=12 HEAD");
        if (head is null) return "unknown (no git)";
        var status = Git(folder, "status --porcelain --untracked-files=no");
        return string.IsNullOrEmpty(status) ? head : head + " + local changes";
    }

    /// <summary>The CPU model (from /proc/cpuinfo where there is one), the core count and the operating system.</summary>
    public static string Machine()
    {
        string cpu = RuntimeInformation.ProcessArchitecture.ToString();
        try
        {
            var model = File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal));
            if (model is not null) cpu = model[(model.IndexOf(':') + 1)..].Trim();
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return $"{cpu}, {Environment.ProcessorCount} cores, {RuntimeInformation.OSDescription}";
    }

    static string? Git(string folder, string arguments)
    {
        try
        {
            var info = new ProcessStartInfo("git", arguments) { WorkingDirectory = folder, RedirectStandardOutput = true, RedirectStandardError = true };
            using var p = Process.Start(info)!;
            var output = p.StandardOutput.ReadToEnd().Trim();
            p.WaitForExit();
            return p.ExitCode == 0 ? output : null;
        }
        catch (System.ComponentModel.Win32Exception) { return null; }
    }

    /// <summary>
    /// Opens <paramref name="path"/>, writes the header and makes the console write to both the
    /// console and the file until the returned writer is disposed.
    /// </summary>
    public static TextWriter Open(string path, string header)
    {
        var file = new StreamWriter(path, append: false, new UTF8Encoding(false)) { AutoFlush = true, NewLine = "\n" };
        file.Write(header);
        var tee = new Tee(Console.Out, file);
        Console.SetOut(tee);
        return tee;
    }

    /// <summary>Writes to two writers; disposing it restores the first as the console and closes the second.</summary>
    sealed class Tee(TextWriter console, TextWriter file) : TextWriter
    {
        public override Encoding Encoding => console.Encoding;
        public override void Write(char value) { console.Write(value); file.Write(value); }
        public override void Write(string? value) { console.Write(value); file.Write(value); }
        public override void WriteLine(string? value) { console.WriteLine(value); file.WriteLine(value); }
        public override void Flush() { console.Flush(); file.Flush(); }

        protected override void Dispose(bool disposing)
        {
            if (disposing)
            {
                Console.SetOut(console);
                file.Dispose();
            }
            base.Dispose(disposing);
        }
    }
}
