using System.Diagnostics;
using System.IO.Compression;
using MixerFlow.Host;
using MixerFlow.Host.Data;
using MixerFlow.Host.Files;
using MixerFlow.Host.Training;

namespace MixerFlow.Unit;

/// <summary>
/// Inputs and outputs that are not what they seem: a named pipe or a device where a file is
/// expected (as data, configuration, checkpoint, image or output), an output that is the input,
/// names that would leave runs/, files named like the program's temporaries, and gzip'd batches
/// that decompress to too much together. Each ends at once with exit 2 and one line naming the
/// path, and leaves what it names as it was. Pipes are made in a temporary folder (mkfifo);
/// devices are reached through links to /dev/null and /dev/zero, which only ever get read.
/// A command that still blocked on a pipe would fail its test after a minute instead of hanging.
/// </summary>
public sealed class HostileInputTests(TinyRunFixture fixture) : IClassFixture<TinyRunFixture>, IDisposable
{
    readonly string dir = Directory.CreateTempSubdirectory("mixerflow-hostile-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    /// <summary>How long a command may take before it counts as hanging (a guard, not a measurement).</summary>
    static readonly TimeSpan HangGuard = TimeSpan.FromSeconds(60);

    string Fifo(string name)
    {
        var path = Path.Combine(dir, name);
        using var p = Process.Start("mkfifo", [path]);
        p.WaitForExit();
        Assert.Equal(EntryKind.Pipe, InputFile.Kind(path));
        return path;
    }

    string Link(string name, string target)
    {
        var path = Path.Combine(dir, name);
        File.CreateSymbolicLink(path, target);
        return path;
    }

    /// <summary>Runs the command line in this process; if it is still running after <see cref="HangGuard"/>,
    /// the pipe is opened for writing (so the blocked reader sees its end) and the test fails.</summary>
    static (int Code, string Out, string Err) Within(string pipe, params string[] args)
    {
        var run = Task.Run(() => CliInProcess.Run(args));
        if (run.Wait(HangGuard)) return run.Result;
        Task.Run(() => { using var w = new FileStream(pipe, FileMode.Open, FileAccess.Write); }).Wait(HangGuard);
        run.Wait(HangGuard);
        Assert.Fail($"mixerflow {string.Join(' ', args)} was still running after {HangGuard.TotalSeconds} s: it blocked on the pipe {pipe}");
        return default;
    }

    /// <summary>Exit 2 and one line on stderr naming <paramref name="path"/> and every one of <paramref name="words"/>.</summary>
    static void AssertRefused((int Code, string Out, string Err) r, string path, params string[] words)
    {
        var lines = r.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.True(r.Code == 2, $"exit {r.Code}\nstderr:\n{r.Err}\nstdout:\n{r.Out}");
        Assert.True(lines.Length == 1, $"stderr has {lines.Length} lines:\n{r.Err}");
        Assert.StartsWith("error: ", lines[0]);
        Assert.Contains(path, lines[0]);
        foreach (var w in words) Assert.Contains(w, lines[0], StringComparison.OrdinalIgnoreCase);
    }

    // ------------------------------------------------------------------ outputs

    [Fact]
    public void Sample_export_and_embed_refuse_an_out_that_is_a_pipe_or_a_link_to_a_device_and_leave_it_as_it_was()
    {
        var pipe = Fifo("out.png");
        var devNull = Link("null.png", "/dev/null");
        foreach (var target in new[] { pipe, devNull })
        {
            AssertRefused(Within(pipe, "sample", "--checkpoint", fixture.Checkpoint, "--count", "4", "--out", target), target, "not a regular file");
            AssertRefused(Within(pipe, "export", "--checkpoint", fixture.Checkpoint, "--out", target), target, "not a regular file");
            AssertRefused(Within(pipe, "embed", "--checkpoint", fixture.Checkpoint, "--data", fixture.Images, "--out", target), target, "not a regular file");
        }
        Assert.Equal(EntryKind.Pipe, InputFile.Kind(pipe));
        Assert.Equal("/dev/null", new FileInfo(devNull).LinkTarget);
        Assert.Equal(EntryKind.CharacterDevice, InputFile.Kind("/dev/null"));
    }

    [Fact]
    public void An_atomic_write_over_a_pipe_is_refused_and_the_pipe_is_kept()
    {
        var pipe = Fifo("metrics.json");
        var e = Assert.Throws<UserError>(() => AtomicFile.WriteAllText(pipe, "{}"));
        Assert.Contains("named pipe", e.Message);
        Assert.Equal(EntryKind.Pipe, InputFile.Kind(pipe));
        Assert.Empty(Directory.GetFiles(dir).Where(f => f != pipe));
    }

    [Fact]
    public void Sample_and_export_refuse_an_out_that_is_the_checkpoint_however_it_is_spelled()
    {
        var checkpoint = Path.Combine(dir, "model.ckpt");
        File.Copy(fixture.Checkpoint, checkpoint);
        var before = File.ReadAllBytes(checkpoint);
        var link = Link("link.ckpt", checkpoint);
        var folderLink = Link("here", dir);
        var spellings = new[]
        {
            (checkpoint, checkpoint),
            (checkpoint, Path.Combine(dir, ".", "sub", "..", "model.ckpt")),
            (link, checkpoint),
            (checkpoint, Path.Combine(folderLink, "model.ckpt")),
        };
        foreach (var (ckpt, @out) in spellings)
        {
            AssertRefused(CliInProcess.Run("sample", "--checkpoint", ckpt, "--count", "4", "--out", @out), @out, "same file as --checkpoint");
            AssertRefused(CliInProcess.Run("export", "--checkpoint", ckpt, "--out", @out), @out, "same file as --checkpoint");
        }
        Assert.Equal(before, File.ReadAllBytes(checkpoint));
        Assert.Equal(checkpoint, new FileInfo(link).LinkTarget);
    }

    // ------------------------------------------------------------------ inputs that are pipes

    [Fact]
    public void A_pipe_as_data_file_in_an_image_folder_as_config_or_as_interpolate_from_is_refused_unopened()
    {
        var pipe = Fifo("data.bin");
        AssertRefused(Within(pipe, "eval", "--checkpoint", fixture.Checkpoint, "--data", pipe), pipe, "named pipe");

        var images = Path.Combine(dir, "images");
        Directory.CreateDirectory(images);
        foreach (var f in Directory.GetFiles(fixture.Images)) File.Copy(f, Path.Combine(images, Path.GetFileName(f)));
        var inFolder = Path.Combine(images, "z.png");
        using (var p = Process.Start("mkfifo", [inFolder])) p.WaitForExit();
        AssertRefused(Within(inFolder, "eval", "--checkpoint", fixture.Checkpoint, "--data", images), inFolder, "named pipe");

        AssertRefused(Within(pipe, "info", "--config", pipe), pipe, "named pipe", "configuration");
        AssertRefused(Within(pipe, "interpolate", "--checkpoint", fixture.Checkpoint, "--from", pipe,
            "--to", Path.Combine(fixture.Images, "0.png"), "--out", Path.Combine(dir, "strip.png")), pipe, "named pipe");
        Assert.False(File.Exists(Path.Combine(dir, "strip.png")));
    }

    // ------------------------------------------------------------------ inputs that never end, or are too large

    [Fact]
    public void Dev_zero_as_config_spec_or_checkpoint_is_refused_by_type_before_it_is_read()
    {
        var zero = Link("zero.json", "/dev/zero");
        AssertRefused(CliInProcess.Run("info", "--config", zero), zero, "character device");
        AssertRefused(CliInProcess.Run("experiment", zero, "--out", Path.Combine(dir, "results")), zero, "character device");
        var zeroCkpt = Link("zero.ckpt", "/dev/zero");
        AssertRefused(CliInProcess.Run("eval", "--checkpoint", zeroCkpt), zeroCkpt, "character device");

        // A run folder whose settings and configuration are whole: its checkpoint is what is refused.
        var run = Path.Combine(dir, "run");
        var trained = CliInProcess.Run("train", "--preset", "tiny", "--steps", "1", "--batch-size", "8", "--out", run);
        Assert.True(trained.Code == 0, trained.Err);
        var last = Path.Combine(run, Trainer.LastCheckpoint);
        File.Delete(last);
        File.CreateSymbolicLink(last, "/dev/zero");
        AssertRefused(CliInProcess.Run("train", "--resume", run), last, "character device");
    }

    [Fact]
    public void A_configuration_file_larger_than_the_text_limit_is_refused_by_its_size()
    {
        var big = Path.Combine(dir, "big.json");
        using (var f = File.Create(big)) f.SetLength(InputFile.TextLimit + 1); // sparse: nothing is written
        var r = CliInProcess.Run("info", "--config", big);
        AssertRefused(r, big, $"more than the {InputFile.TextLimit:N0}");
    }

    [Fact]
    public void Gzip_cifar_batches_count_their_decompressed_bytes_together_and_stop_at_the_limit()
    {
        // Three records per batch; the limit holds five, so the second batch passes it. The third,
        // 64 MiB of zeros in 64 KiB, is never reached.
        var records = new byte[3 * CifarFormat.RecordBytes];
        var batches = new[]
        {
            Gzip("data_batch_1.bin", records),
            Gzip("data_batch_2.bin", records),
            Gzip("data_batch_3.bin", new byte[64 << 20]),
        };
        long limit = 5L * CifarFormat.RecordBytes;
        Assert.Equal(3, CifarFormat.Read(batches[..1], limit).Count);
        var e = Assert.Throws<UserError>(() => CifarFormat.Read(batches, limit));
        Assert.Contains(batches[1], e.Message);
        Assert.Contains($"{limit:N0} that CIFAR-10 batches may hold together", e.Message);
    }

    string Gzip(string name, byte[] content)
    {
        var path = Path.Combine(dir, name);
        using var file = File.Create(path);
        using var gz = new GZipStream(file, CompressionLevel.Fastest);
        gz.Write(content);
        return path;
    }

    // ------------------------------------------------------------------ names and temporary files

    [Fact]
    public void A_model_name_that_would_leave_runs_is_refused_naming_the_key_and_the_rule()
    {
        foreach (var name in new[] { Path.Combine(dir, "escaped"), "../escaped", ".." })
        {
            var r = CliInProcess.Run("train", "--preset", "tiny", "--steps", "1", "--set", $"name={name}");
            AssertRefused(r, name, "name:", SafeName.Rule);
        }
        Assert.Empty(Directory.GetFileSystemEntries(dir));
        Assert.Empty(Directory.GetDirectories(Directory.GetCurrentDirectory(), "escaped-*"));
    }

    [Theory]
    [InlineData(".")]
    [InlineData("..")]
    [InlineData(".hidden")]
    public void An_experiment_run_name_that_is_not_a_plain_folder_name_is_refused(string name)
    {
        var json = $$"""{ "steps": 1, "runs": [ { "name": "{{name}}", "preset": "tiny" } ] }""";
        var e = Assert.Throws<UserError>(() => ExperimentSpec.Parse(json, "spec.json", dir));
        Assert.Contains($"name: '{name}' must be {SafeName.Rule}", e.Message);
    }

    [Fact]
    public void Only_the_programs_own_temporary_files_are_removed_not_a_users_file_named_alike()
    {
        var ours = AtomicFile.TempPathFor(Path.Combine(dir, "last.ckpt"));
        var users = new[]
        {
            Path.Combine(dir, $".notes.{Guid.NewGuid():N}.tmp.txt"),
            Path.Combine(dir, $".last.{Guid.NewGuid():N}.tmp.ckpt"),
            Path.Combine(dir, ".probe.0123456789abcdef0123456789abcdef.tmp"),
        };
        foreach (var f in users.Append(ours)) File.WriteAllText(f, "keep");
        var removed = AtomicFile.RemoveStaleTemps(dir);
        Assert.Equal([Path.GetFileName(ours)], removed);
        Assert.All(users, f => Assert.True(File.Exists(f), f));
    }
}
