using System.Diagnostics;
using MixerFlow.Host;
using MixerFlow.Host.Files;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using Xunit.Abstractions;

namespace MixerFlow.Unit;

/// <summary>
/// Real file-system conditions for the tests: a tiny tmpfs (a disk that fills up) and read-only
/// folders. Mounting needs root with mount permitted (as in CI); elsewhere a read-only folder falls
/// back to permissions (which stop a non-root user), and what cannot be set up is said in
/// <see cref="Unavailable"/> for the test to report. Everything mounted is unmounted in
/// <see cref="Dispose"/>.
/// </summary>
public sealed class FileSystemConditions : IDisposable
{
    readonly List<string> mounts = [];
    readonly List<string> locked = [];

    /// <summary>A fresh temporary folder holding everything the test makes.</summary>
    public string Root { get; } = Directory.CreateTempSubdirectory("mixerflow-fs-").FullName;

    /// <summary>Why the last condition asked for could not be set up (null when it was).</summary>
    public string? Unavailable { get; private set; }

    /// <summary>A tmpfs of <paramref name="bytes"/> bytes mounted at Root/<paramref name="name"/>, or null.</summary>
    public string? Tmpfs(string name, long bytes)
    {
        var dir = Path.Combine(Root, name);
        Directory.CreateDirectory(dir);
        var (ok, why) = Sh("mount", "-t", "tmpfs", "-o", $"size={bytes}", "tmpfs", dir);
        if (!ok) { Unavailable = $"cannot mount a tmpfs ({why}); run as root where mount is permitted"; return null; }
        mounts.Add(dir);
        Unavailable = null;
        return dir;
    }

    /// <summary>Resizes a tmpfs made by <see cref="Tmpfs"/>.</summary>
    public void Resize(string dir, long bytes) => Must(Sh("mount", "-o", $"remount,size={bytes}", dir));

    /// <summary>
    /// A folder Root/<paramref name="name"/> filled by <paramref name="fill"/> and then made
    /// read-only: a tmpfs remounted read-only, or (not root, no mount) mode 0555. Null when neither
    /// can be done (root without mount permission: permissions do not stop root).
    /// </summary>
    public string? ReadOnly(string name, Action<string>? fill = null)
    {
        var dir = Tmpfs(name, 64L << 20);
        if (dir is not null)
        {
            fill?.Invoke(dir);
            Must(Sh("mount", "-o", "remount,ro", dir));
            return dir;
        }
        if (Environment.IsPrivilegedProcess || OperatingSystem.IsWindows())
        {
            Unavailable = $"cannot make a read-only folder: {Unavailable}";
            return null;
        }
        dir = Path.Combine(Root, name);
        fill?.Invoke(dir);
        // Everything in it read-only too: folders 0555, files 0444.
        const UnixFileMode read = UnixFileMode.UserRead | UnixFileMode.GroupRead | UnixFileMode.OtherRead;
        const UnixFileMode enter = UnixFileMode.UserExecute | UnixFileMode.GroupExecute | UnixFileMode.OtherExecute;
        foreach (var f in Directory.GetFiles(dir, "*", SearchOption.AllDirectories)) File.SetUnixFileMode(f, read);
        foreach (var d in Directory.GetDirectories(dir, "*", SearchOption.AllDirectories).Append(dir)) File.SetUnixFileMode(d, read | enter);
        locked.Add(dir);
        Unavailable = null;
        return dir;
    }

    /// <summary>Fills the file system of <paramref name="dir"/> until at most <paramref name="leave"/> bytes are free.</summary>
    public static void Fill(string dir, long leave = 0)
    {
        long free = new DriveInfo(dir).AvailableFreeSpace;
        using var filler = new FileStream(Path.Combine(dir, "filler"), FileMode.Create, FileAccess.Write, FileShare.None, 0);
        var block = new byte[4096];
        try
        {
            for (long written = 0; written + block.Length <= free - leave; written += block.Length) filler.Write(block);
            if (leave == 0) while (true) filler.Write(block, 0, 1);
        }
        catch (IOException) { }
    }

    static void Must((bool Ok, string Why) r) { if (!r.Ok) throw new InvalidOperationException(r.Why); }

    static (bool Ok, string Why) Sh(string file, params string[] args)
    {
        try
        {
            var psi = new ProcessStartInfo(file) { RedirectStandardError = true, RedirectStandardOutput = true };
            foreach (var a in args) psi.ArgumentList.Add(a);
            using var p = Process.Start(psi)!;
            var err = p.StandardError.ReadToEndAsync();
            p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            return (p.ExitCode == 0, $"{file} {string.Join(' ', args)}: exit {p.ExitCode} {err.Result.Trim()}");
        }
        catch (System.ComponentModel.Win32Exception e) { return (false, $"{file}: {e.Message}"); }
    }

    public void Dispose()
    {
        foreach (var dir in Enumerable.Reverse(mounts))
            if (!Sh("umount", dir).Ok) Sh("umount", "-l", dir);
        foreach (var dir in locked)
        {
            if (OperatingSystem.IsWindows()) break; // nothing is locked there: the tests that lock folders need Linux
            const UnixFileMode all = UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute;
            File.SetUnixFileMode(dir, all);
            foreach (var d in Directory.GetDirectories(dir, "*", SearchOption.AllDirectories)) File.SetUnixFileMode(d, all);
        }
        try { Directory.Delete(Root, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}

/// <summary>A small trained checkpoint and a ten-image data folder, made once for the file-system tests.</summary>
public sealed class TinyRunFixture : IDisposable
{
    public string Dir { get; } = Directory.CreateTempSubdirectory("mixerflow-fs-fixture-").FullName;
    public string Checkpoint => Path.Combine(Dir, "run", Trainer.LastCheckpoint);
    public string Images => Path.Combine(Dir, "images");

    public TinyRunFixture()
    {
        new Trainer(new TrainingSettings
        {
            Model = Presets.Get("tiny"), RunFolder = Path.Combine(Dir, "run"), Steps = 2, BatchSize = 8, Pictures = false,
        }).Run();
        Directory.CreateDirectory(Images);
        for (int i = 0; i < 10; i++)
            SixLabors.ImageSharp.ImageExtensions.SaveAsPng(
                new SixLabors.ImageSharp.Image<SixLabors.ImageSharp.PixelFormats.L8>(28, 28, new((byte)(i * 20))), Path.Combine(Images, $"{i}.png"));
    }

    public void Dispose() => Directory.Delete(Dir, recursive: true);
}

/// <summary>
/// File-system refusals (an existing file as the run folder, a folder as a file output, a read-only
/// folder, a disk that fills up, a folder as a checkpoint) end the `mixerflow` process with exit 2
/// and one line on stderr naming the path and the problem, no stack trace, and nothing already
/// written lost. The command line runs as a child process, so its real exit code is seen.
/// </summary>
public sealed class FileSystemTests(TinyRunFixture fixture, ITestOutputHelper log) : IClassFixture<TinyRunFixture>, IDisposable
{
    readonly FileSystemConditions fs = new();

    public void Dispose() => fs.Dispose();

    static (int Code, string Out, string Err) Cli(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "mixerflow.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var err = p.StandardError.ReadToEndAsync();
        var output = p.StandardOutput.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromMinutes(3))) { p.Kill(entireProcessTree: true); throw new TimeoutException($"mixerflow {string.Join(' ', args)}"); }
        p.WaitForExit();
        return (p.ExitCode, output.Result, err.Result);
    }

    /// <summary>Exit 2 and exactly one line on stderr, "error: ..." naming <paramref name="path"/> and the reason; no stack trace.</summary>
    static void AssertRefused((int Code, string Out, string Err) r, string path, params string[] reason)
    {
        var lines = r.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.True(r.Code == 2, $"exit {r.Code}\nstderr:\n{r.Err}\nstdout:\n{r.Out}");
        Assert.True(lines.Length == 1, $"stderr has {lines.Length} lines:\n{r.Err}");
        Assert.StartsWith("error: ", lines[0]);
        Assert.Contains(path, lines[0]);
        foreach (var words in reason) Assert.Contains(words, lines[0], StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("   at ", r.Err);
        Assert.DoesNotContain("Unhandled exception", r.Err);
    }

    bool NotSetUp(string? dir)
    {
        if (dir is not null) return false;
        // Not root, or no mount permission: said in the test output, not failed.
        log.WriteLine($"NOT RUN: {fs.Unavailable}");
        return true;
    }

    static string[] TempFiles(string dir) =>
        Directory.GetFiles(dir).Select(Path.GetFileName).Where(n => AtomicFile.IsTempName(n!)).ToArray()!;

    // ------------------------------------------------------------------ library level

    [Fact]
    public void Output_checks_refuse_a_folder_as_a_file_and_a_file_as_a_folder_and_create_nothing()
    {
        var file = Path.Combine(fs.Root, "a.txt");
        File.WriteAllText(file, "keep");
        var e = Assert.Throws<UserError>(() => OutputPath.CheckFile(fs.Root, "--out"));
        Assert.Contains(fs.Root, e.Message);
        Assert.Contains("is a folder", e.Message);
        e = Assert.Throws<UserError>(() => OutputPath.CheckFolder(file, "--out"));
        Assert.Contains("is an existing file", e.Message);
        e = Assert.Throws<UserError>(() => OutputPath.CheckFile(Path.Combine(file, "x.png"), "--out"));
        Assert.Contains($"{file} is a file", e.Message);
        e = Assert.Throws<UserError>(() => RunFolder.Lock(file));
        Assert.Contains(file, e.Message);

        OutputPath.CheckFolder(Path.Combine(fs.Root, "new", "run"), "--out");
        OutputPath.CheckFile(Path.Combine(fs.Root, "new", "x.png"), "--out");
        Assert.False(Directory.Exists(Path.Combine(fs.Root, "new")));
        Assert.Equal(new[] { "a.txt" }, Directory.GetFiles(fs.Root).Select(Path.GetFileName));
        Assert.Equal("keep", File.ReadAllText(file));
    }

    [Fact]
    public void An_atomic_write_on_a_full_disk_names_the_file_keeps_the_previous_one_and_leaves_no_temporary_file()
    {
        var disk = fs.Tmpfs("disk", 64 << 10);
        if (NotSetUp(disk)) return;
        var path = Path.Combine(disk!, "state.bin");
        var old = Enumerable.Range(0, 10_000).Select(i => (byte)i).ToArray();
        AtomicFile.Write(path, (Stream s) => s.Write(old));
        FileSystemConditions.Fill(disk!, leave: 8 << 10);

        var e = Assert.Throws<IOException>(() => AtomicFile.Write(path, (Stream s) => s.Write(new byte[32 << 10])));

        Assert.Contains(path, e.Message);
        Assert.Contains("no space left on device", e.Message);
        Assert.Contains("previous file is unchanged", e.Message);
        Assert.Equal(old, File.ReadAllBytes(path));
        Assert.Empty(TempFiles(disk!));
    }

    [Fact]
    public void A_csv_row_that_does_not_fit_on_the_disk_is_cut_back_and_the_rows_before_it_are_kept()
    {
        var disk = fs.Tmpfs("disk", 64 << 10);
        if (NotSetUp(disk)) return;
        var path = Path.Combine(disk!, "metrics.csv");
        var log = new CsvLog(path, "step", "text");
        int rows = 0;
        while (new FileInfo(path).Exists is false || new FileInfo(path).Length < 4000) log.Append(rows++, "row");
        long before = new FileInfo(path).Length;
        FileSystemConditions.Fill(disk!);   // the file's last page has room for a few bytes only

        var e = Assert.Throws<IOException>(() => log.Append(rows, new string('x', 300)));

        Assert.Contains(path, e.Message);
        Assert.Contains("no space left on device", e.Message);
        Assert.Equal(before, new FileInfo(path).Length);
        var read = CsvLog.Read(path);
        Assert.Equal(rows, read.Count);
        Assert.Equal((rows - 1).ToString(), read[^1]["step"]);
    }

    [Fact]
    public void Locking_a_read_only_run_folder_says_it_cannot_be_written_not_that_it_is_in_use()
    {
        var ro = fs.ReadOnly("ro", dir => File.WriteAllText(Path.Combine(dir, RunFolder.LockFile), ""));
        if (NotSetUp(ro)) return;
        var e = Assert.Throws<UserError>(() => RunFolder.Lock(ro!));
        Assert.Contains(ro!, e.Message);
        Assert.Contains("cannot write", e.Message);
        Assert.DoesNotContain("in use", e.Message);
    }

    // ------------------------------------------------------------------ train

    [Fact]
    public void Train_with_an_existing_file_as_out_is_refused_in_one_line_and_the_file_is_kept()
    {
        var file = Path.Combine(fs.Root, "notes.txt");
        File.WriteAllText(file, "mine");
        AssertRefused(Cli("train", "--preset", "tiny", "--steps", "2", "--out", file), file, "is an existing file");
        Assert.Equal("mine", File.ReadAllText(file));
    }

    [Fact]
    public void Train_into_a_read_only_folder_is_refused_in_one_line_before_anything_is_made()
    {
        var ro = fs.ReadOnly("ro");
        if (NotSetUp(ro)) return;
        var run = Path.Combine(ro!, "run");
        AssertRefused(Cli("train", "--preset", "tiny", "--steps", "2", "--out", run), run, "cannot write");
        Assert.False(Directory.Exists(run));
    }

    [Fact]
    public void A_disk_that_fills_up_mid_run_ends_it_in_one_line_keeping_the_last_checkpoint_and_metrics_and_it_resumes()
    {
        // A checkpoint of the tiny preset is about 160 KiB: one fits (a fresh run writes it at
        // step 0, so the rollback guard has a target), a second (written beside it before the
        // rename) does not.
        var disk = fs.Tmpfs("disk", 256 << 10);
        if (NotSetUp(disk)) return;
        var run = Path.Combine(disk!, "run");
        string[] train = ["train", "--preset", "tiny", "--steps", "20", "--batch-size", "16", "--checkpoint-every", "5", "--out", run];

        var r = Cli(train);

        AssertRefused(r, run, "no space left on device");
        var last = Path.Combine(run, Trainer.LastCheckpoint);
        var (_, header) = Checkpoint.Load(last);
        Assert.Equal(0, header.Step);
        var rows = CsvLog.Read(Path.Combine(run, "metrics.csv"));
        Assert.Equal(new[] { "0" }, rows.Select(x => x["step"]));
        Assert.All(rows, x => Assert.True(double.TryParse(x["rss_mb"], System.Globalization.CultureInfo.InvariantCulture, out _)));
        Assert.Empty(TempFiles(run));
        Assert.False(File.Exists(Path.Combine(run, RunFolder.LockHolderFile)));

        // Room again: the run resumes from step 0 and finishes.
        fs.Resize(disk!, 16L << 20);
        r = Cli("train", "--resume", run);
        Assert.True(r.Code == 0, r.Err);
        Assert.Contains("resuming", r.Out);
        Assert.Equal(20, Checkpoint.Load(last).Header.Step);
    }

    [Fact]
    public void Resuming_a_run_whose_folder_became_read_only_is_refused_in_one_line_and_changes_nothing()
    {
        var ro = fs.ReadOnly("ro", dir => new Trainer(new TrainingSettings
        {
            Model = Presets.Get("tiny"), RunFolder = Path.Combine(dir, "run"), Steps = 12, BatchSize = 8, CheckpointEvery = 5, Pictures = false,
        }, new StopAt(5)).Run());
        if (NotSetUp(ro)) return;
        var run = Path.Combine(ro!, "run");
        var before = Directory.GetFiles(run).ToDictionary(f => f, File.ReadAllBytes);

        AssertRefused(Cli("train", "--resume", run), run, "cannot write");

        Assert.Equal(before.Keys.Order(), Directory.GetFiles(run).Order());
        foreach (var (f, bytes) in before) Assert.Equal(bytes, File.ReadAllBytes(f));
        // The library refuses the same way, before any step is taken.
        var e = Assert.Throws<UserError>(() => new Trainer(new TrainingSettings { RunFolder = run, Resume = true, Given = new HashSet<string>() }).Run());
        Assert.Contains(run, e.Message);
    }

    sealed class StopAt(long step) : ITrainingObserver
    {
        public bool ShouldStop(long s) => s == step;
    }

    // ------------------------------------------------------------------ sample, embed, eval

    [Fact]
    public void Sample_and_embed_with_a_folder_as_out_are_refused_in_one_line()
    {
        var folder = Path.Combine(fs.Root, "taken.png");
        Directory.CreateDirectory(folder);
        AssertRefused(Cli("sample", "--checkpoint", fixture.Checkpoint, "--count", "4", "--out", folder), folder, "is a folder");
        AssertRefused(Cli("embed", "--checkpoint", fixture.Checkpoint, "--data", fixture.Images, "--out", folder), folder, "is a folder");
        Assert.Empty(Directory.GetFileSystemEntries(folder));
    }

    [Fact]
    public void Sample_and_embed_into_a_read_only_folder_are_refused_in_one_line()
    {
        var ro = fs.ReadOnly("ro");
        if (NotSetUp(ro)) return;
        var png = Path.Combine(ro!, "s.png");
        var csv = Path.Combine(ro!, "z.csv");
        AssertRefused(Cli("sample", "--checkpoint", fixture.Checkpoint, "--count", "4", "--out", png), png, "cannot write");
        AssertRefused(Cli("embed", "--checkpoint", fixture.Checkpoint, "--data", fixture.Images, "--out", csv), csv, "cannot write");
    }

    [Fact]
    public void Sample_and_embed_on_a_full_disk_end_in_one_line_and_keep_the_previous_output()
    {
        var disk = fs.Tmpfs("disk", 256 << 10);
        if (NotSetUp(disk)) return;
        var png = Path.Combine(disk!, "s.png");
        var csv = Path.Combine(disk!, "z.csv");
        File.WriteAllText(png, "previous samples");
        File.WriteAllText(csv, "previous latents");
        // A little room: the output check passes, the write itself runs out of space.
        FileSystemConditions.Fill(disk!, leave: 8 << 10);

        AssertRefused(Cli("sample", "--checkpoint", fixture.Checkpoint, "--count", "64", "--out", png), png, "no space left on device");
        AssertRefused(Cli("embed", "--checkpoint", fixture.Checkpoint, "--data", fixture.Images, "--out", csv), csv, "no space left on device");
        Assert.Equal("previous samples", File.ReadAllText(png));
        Assert.Equal("previous latents", File.ReadAllText(csv));
        Assert.Empty(TempFiles(disk!));

        // No room at all: refused by the check, before any work.
        FileSystemConditions.Fill(disk!);
        AssertRefused(Cli("sample", "--checkpoint", fixture.Checkpoint, "--count", "4", "--out", png), png, "no space left on device");
        Assert.Equal("previous samples", File.ReadAllText(png));
    }

    [Fact]
    public void Eval_and_sample_with_a_folder_as_checkpoint_are_refused_in_one_line_naming_the_checkpoints_inside()
    {
        var run = Path.GetDirectoryName(fixture.Checkpoint)!;
        var r = Cli("eval", "--checkpoint", run, "--data", fixture.Images);
        AssertRefused(r, run, "is a folder", fixture.Checkpoint);
        r = Cli("sample", "--checkpoint", run, "--count", "4", "--out", Path.Combine(fs.Root, "s.png"));
        AssertRefused(r, run, "is a folder");
        Assert.False(File.Exists(Path.Combine(fs.Root, "s.png")));
    }
}
