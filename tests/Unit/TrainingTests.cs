using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>The training loop on the embedded data with the tiny preset: resume, NaN guard, files.</summary>
public class TrainingTests
{
    static TrainingSettings Options(string dir, int steps, bool resume = false, int checkpointEvery = 5) => new()
    {
        Model = MixerFlow.Host.Models.Presets.Get("tiny"), RunFolder = dir, Resume = resume, Steps = steps,
        BatchSize = 16, LearningRate = 1e-3, Seed = 7, CheckpointEvery = checkpointEvery,
    };

    /// <summary>Test observer: stops after a step, or makes chosen steps' losses non-finite.</summary>
    sealed class Hooks(Func<long, bool>? corrupt = null, long? stopAfter = null) : ITrainingObserver
    {
        public List<string> Messages { get; } = [];
        public long? TotalSteps { get; private set; }
        public int Steps { get; private set; }
        public void OnMessage(string text) => Messages.Add(text);
        public void OnStart(string runFolder, string model, long parameters, string data, long fromStep, long totalSteps) => TotalSteps = totalSteps;
        public void OnProgress(StepReport report) => Steps++;
        public Tensor TransformLoss(long step, Tensor loss) => corrupt?.Invoke(step) == true ? loss * double.NaN : loss;
        public bool ShouldStop(long step) => step == stopAfter;
    }

    static string TempDir() => Directory.CreateTempSubdirectory("mixerflow-train-").FullName;

    static float[] Flat(MixerFlow.Host.Models.ImageFlow m) =>
        m.parameters().SelectMany(p => p.detach().cpu().to_type(float32).data<float>().ToArray()).ToArray();

    [Fact]
    public void A_resumed_run_ends_with_the_same_parameters_as_an_uninterrupted_one()
    {
        string a = TempDir(), b = TempDir();
        try
        {
            var whole = new Trainer(Options(a, 12));
            whole.Run();
            var interrupted = new Trainer(Options(b, 12), new Hooks(stopAfter: 5));
            Assert.True(interrupted.Run().StoppedEarly);
            Assert.True(File.Exists(Path.Combine(b, Trainer.LastCheckpoint)));
            var resumed = new Trainer(Options(b, 12, resume: true));
            var summary = resumed.Run();
            Assert.Equal(12, summary.Steps);
            var pa = Flat(whole.Model!);
            var pb = Flat(resumed.Model!);
            Assert.Equal(pa.Length, pb.Length);
            Assert.Equal(0f, pa.Zip(pb, (x, y) => Math.Abs(x - y)).Max());
            // and training moved the parameters at all
            var fresh = Flat(new MixerFlow.Host.Models.ImageFlow(MixerFlow.Host.Models.Presets.Get("tiny")));
            Assert.True(pa.Zip(fresh, (x, y) => Math.Abs(x - y)).Max() > 1e-4);
        }
        finally { Directory.Delete(a, true); Directory.Delete(b, true); }
    }

    [Fact]
    public void A_run_in_another_process_with_the_same_seed_gives_the_same_parameters()
    {
        string a = TempDir(), b = TempDir();
        try
        {
            var here = new Trainer(Options(a, 6));
            here.Run();
            var host = Path.Combine(AppContext.BaseDirectory, "mixerflow.dll");
            var psi = new System.Diagnostics.ProcessStartInfo("dotnet")
            {
                ArgumentList = { host, "train", "--preset", "tiny", "--steps", "6", "--batch-size", "16", "--lr", "0.001",
                                 "--seed", "7", "--checkpoint-every", "5", "--out", b },
                RedirectStandardOutput = true,
                RedirectStandardError = true,
            };
            using var child = System.Diagnostics.Process.Start(psi)!;
            string log = child.StandardOutput.ReadToEnd() + child.StandardError.ReadToEnd();
            child.WaitForExit();
            Assert.True(child.ExitCode == 0, log);
            var (there, _) = MixerFlow.Host.Models.Checkpoint.Load(Path.Combine(b, Trainer.LastCheckpoint));
            var pa = Flat(here.Model!);
            var pb = Flat(there);
            Assert.Equal(0f, pa.Zip(pb, (x, y) => Math.Abs(x - y)).Max());
        }
        finally { Directory.Delete(a, true); Directory.Delete(b, true); }
    }

    [Fact]
    public void No_step_leaks_a_tensor()
    {
        var dir = TempDir();
        try
        {
            new Trainer(Options(dir, 40)).Run();
            var live = MixerFlow.Host.Files.CsvLog.Read(Path.Combine(dir, "metrics.csv"))
                .Where(r => r["heldout_bpd"] == "" && r["step"] != "0")
                .ToDictionary(r => int.Parse(r["step"]), r => long.Parse(r["live_tensors"]));
            Assert.Equal(new[] { 10, 20, 30, 40 }, live.Keys.Order());
            Assert.True(live[10] > 0);
            Assert.All(live.Values, v => Assert.Equal(live[10], v));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void An_injected_NaN_drops_the_step_and_the_run_goes_on()
    {
        var dir = TempDir();
        try
        {
            var t = new Trainer(Options(dir, 8), new Hooks(corrupt: s => s == 3));
            var summary = t.Run();
            Assert.Equal(1, summary.DroppedSteps);
            Assert.Equal(0, summary.Rollbacks);
            Assert.True(double.IsFinite(summary.HeldOutBpd));
            Assert.All(Flat(t.Model!), v => Assert.True(float.IsFinite(v)));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void Repeated_NaNs_roll_back_to_the_last_checkpoint()
    {
        var dir = TempDir();
        try
        {
            int injected = 0;
            // Steps 6..10 fail once each, after the checkpoint at step 5.
            var t = new Trainer(Options(dir, 12), new Hooks(corrupt: s => s >= 6 && s <= 10 && injected++ < 5));
            var summary = t.Run();
            Assert.Equal(5, summary.DroppedSteps);
            Assert.Equal(1, summary.Rollbacks);
            Assert.Equal(12, summary.Steps);
        }
        finally { Directory.Delete(dir, true); }
    }

    /// <summary>What the command line passes for `train --resume DIR` with no other option.</summary>
    static TrainingSettings ResumeOnly(string dir, params string[] given) =>
        new() { RunFolder = dir, Resume = true, Given = new HashSet<string>(given) };

    [Fact]
    public void A_run_saves_its_resolved_settings_and_a_resume_without_options_continues_under_them()
    {
        var dir = TempDir();
        try
        {
            Assert.True(new Trainer(Options(dir, 12), new Hooks(stopAfter: 5)).Run().StoppedEarly);
            var json = File.ReadAllText(Path.Combine(dir, "settings.json"));
            Assert.Contains("\"batchSize\": 16", json);
            Assert.Contains("\"steps\": 12", json);
            Assert.DoesNotContain("resume", json, StringComparison.OrdinalIgnoreCase);
            var hooks = new Hooks();
            var summary = new Trainer(ResumeOnly(dir), hooks).Run();
            Assert.Equal(12L, hooks.TotalSteps); // not the defaults' 10 epochs at batch 64
            Assert.Equal(12, summary.Steps);
            var saved = TrainingSettings.FromJson(File.ReadAllText(Path.Combine(dir, "settings.json")));
            Assert.Equal((16, 1e-3, 7, 5), (saved.BatchSize, saved.LearningRate, saved.Seed, saved.CheckpointEvery));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void Resuming_a_finished_run_says_so_and_returns_its_summary_without_training()
    {
        var dir = TempDir();
        try
        {
            var first = new Trainer(Options(dir, 6)).Run();
            var metrics = File.ReadAllText(Path.Combine(dir, "metrics.csv"));
            var hooks = new Hooks();
            var again = new Trainer(ResumeOnly(dir), hooks).Run();
            Assert.Contains("run already finished at step 6", string.Join("\n", hooks.Messages));
            Assert.Equal(0, hooks.Steps);
            Assert.Equal((first.Steps, first.HeldOutBpd), (again.Steps, again.HeldOutBpd));
            Assert.Equal(metrics, File.ReadAllText(Path.Combine(dir, "metrics.csv")));
            // and the command line exits 0
            Assert.Equal(0, MixerFlow.Cli.Program.Main(["train", "--resume", dir]));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_resume_with_a_contradicting_setting_is_refused_naming_the_field_and_both_values()
    {
        var dir = TempDir();
        try
        {
            new Trainer(Options(dir, 12), new Hooks(stopAfter: 5)).Run();
            var e = Assert.Throws<MixerFlow.Host.UserError>(() =>
                new Trainer(ResumeOnly(dir, "BatchSize", "Seed") with { BatchSize = 32, Seed = 7 }).Run());
            Assert.Contains("batchSize", e.Message);
            Assert.Contains("16", e.Message);
            Assert.Contains("32", e.Message);
            Assert.DoesNotContain("seed", e.Message); // the same seed given again is no contradiction
            Assert.Equal(2, MixerFlow.Cli.Program.Main(["train", "--resume", dir, "--steps", "1400"]));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void Extend_steps_raises_the_total_of_a_finished_run()
    {
        var dir = TempDir();
        try
        {
            new Trainer(Options(dir, 6)).Run();
            var hooks = new Hooks();
            var summary = new Trainer(ResumeOnly(dir) with { ExtendSteps = 4 }, hooks).Run();
            Assert.Equal(10L, hooks.TotalSteps);
            Assert.Equal(10, summary.Steps);
            Assert.Equal(10, TrainingSettings.FromJson(File.ReadAllText(Path.Combine(dir, "settings.json"))).Steps);
            Assert.NotEmpty(new TrainingSettings { ExtendSteps = 3 }.Problems()); // only with resume
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_resume_trims_metrics_after_the_checkpoint_and_removes_stale_temporary_files()
    {
        var dir = TempDir();
        try
        {
            // Checkpoint at 15, a metrics row at 20, stopped at 25: the row at 20 is recomputed.
            new Trainer(Options(dir, 30, checkpointEvery: 15), new Hooks(stopAfter: 25)).Run();
            var stale = MixerFlow.Host.Files.AtomicFile.TempPathFor(Path.Combine(dir, "last.ckpt"));
            var staleJson = MixerFlow.Host.Files.AtomicFile.TempPathFor(Path.Combine(dir, "summary.json"));
            var other = Path.Combine(dir, ".notes.tmp");
            foreach (var f in new[] { stale, staleJson, other }) File.WriteAllText(f, "x");
            new Trainer(Options(dir, 30, resume: true, checkpointEvery: 15)).Run();
            var steps = MixerFlow.Host.Files.CsvLog.Read(Path.Combine(dir, "metrics.csv"))
                .Where(r => r["heldout_bpd"] == "").Select(r => long.Parse(r["step"])).ToList();
            Assert.Equal(new long[] { 10, 20, 30 }, steps);
            Assert.False(File.Exists(stale));
            Assert.False(File.Exists(staleJson));
            Assert.True(File.Exists(other)); // not one of AtomicFile's names
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_batch_larger_than_the_training_set_is_refused_before_a_run_folder_is_made()
    {
        var images = TempDir();
        var runs = TempDir();
        try
        {
            for (int i = 0; i < 10; i++)
                SixLabors.ImageSharp.ImageExtensions.SaveAsPng(
                    new SixLabors.ImageSharp.Image<SixLabors.ImageSharp.PixelFormats.L8>(8, 8, new((byte)(i * 20))), Path.Combine(images, $"{i}.png"));
            var run = Path.Combine(runs, "fresh");
            var e = Assert.Throws<MixerFlow.Host.UserError>(() =>
                new Trainer(Options(run, 4) with { Data = images, BatchSize = 64 }).Run());
            Assert.Contains("batch size 64", e.Message);
            Assert.Contains("9 images", e.Message);
            Assert.False(Directory.Exists(run));
        }
        finally { Directory.Delete(images, true); Directory.Delete(runs, true); }
    }

    [Fact]
    public void A_failed_data_load_leaves_no_run_folder()
    {
        var runs = TempDir();
        try
        {
            var run = Path.Combine(runs, "fresh");
            Assert.Throws<MixerFlow.Host.UserError>(() =>
                new Trainer(Options(run, 4) with { Data = Path.Combine(runs, "no-such-data") }).Run());
            Assert.False(Directory.Exists(run));
            Assert.Equal(2, MixerFlow.Cli.Program.Main(["train", "--preset", "tiny", "--data", Path.Combine(runs, "missing"), "--out", run]));
            Assert.False(Directory.Exists(run));
        }
        finally { Directory.Delete(runs, true); }
    }

    [Fact]
    public void A_run_folder_holds_everything_a_person_looks_at()
    {
        var dir = TempDir();
        try
        {
            new Trainer(Options(dir, 6)).Run();
            foreach (var f in new[] { "config.json", "metrics.csv", "training-curve.png", "samples-t0.5.png", "samples-t0.7.png",
                                      "samples-t1.0.png", "reconstructions.png", "last.ckpt", "best.ckpt", "summary.json" })
                Assert.True(File.Exists(Path.Combine(dir, f)), f);
            var rows = MixerFlow.Host.Files.CsvLog.Read(Path.Combine(dir, "metrics.csv"));
            Assert.Contains(rows, r => r["heldout_bpd"] != "");
            Assert.DoesNotContain(Directory.GetFiles(dir), f => f.EndsWith(".tmp"));
        }
        finally { Directory.Delete(dir, true); }
    }
}

/// <summary>Every verb rejects a bad argument with exit code 2 and a one-line message.</summary>
public class CommandLineTests
{
    [Theory]
    [InlineData("train", "--batch-size", "0")]
    [InlineData("train", "--lr", "-1")]
    [InlineData("train", "--epochs", "2", "--steps", "3")]
    [InlineData("train", "--device", "tpu")]
    [InlineData("train", "--preset", "no-such-preset")]
    [InlineData("train", "--extend-steps", "5")]
    [InlineData("train", "--resume", "runs/a", "--extend-steps", "0")]
    [InlineData("eval")]
    [InlineData("eval", "--checkpoint", "/nonexistent/file.ckpt")]
    [InlineData("eval", "--checkpoint", "x.ckpt", "--split", "validation")]
    [InlineData("sample", "--checkpoint", "x.ckpt", "--count", "-4")]
    [InlineData("sample", "--checkpoint", "x.ckpt", "--count", "10001")]
    [InlineData("sample", "--checkpoint", "x.ckpt", "--temperature", "-1")]
    [InlineData("embed", "--checkpoint", "x.ckpt")]
    [InlineData("info")]
    [InlineData("info", "--preset", "nope")]
    [InlineData("check", "--bijector", "nope")]
    [InlineData("check", "--dtype", "float16")]
    [InlineData("frobnicate")]
    public void A_bad_argument_exits_with_2(params string[] args)
    {
        var err = new StringWriter();
        var saved = Console.Error;
        Console.SetError(err);
        try { Assert.Equal(2, MixerFlow.Cli.Program.Main(args)); }
        finally { Console.SetError(saved); }
        var line = Assert.Single(err.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
        Assert.StartsWith("error: ", line);
    }

    [Theory]
    [InlineData("train", "--preset", "glow-tiny")]
    [InlineData("info", "--preset", "glow-tiny")]
    [InlineData("info", "--preset", "cifar10")]
    public void Every_preset_the_host_knows_is_accepted_where_a_preset_is_asked(params string[] args)
    {
        foreach (var name in MixerFlow.Host.Models.Presets.Names)
        {
            var a = args.ToArray();
            a[^1] = name;
            Assert.NotNull(MixerFlow.CommandLine.CommandLine.Parse(a).Command);
        }
        Assert.NotNull(MixerFlow.CommandLine.CommandLine.Parse(args).Command);
    }

    [Fact]
    public void Train_options_become_the_library_training_settings()
    {
        var parsed = MixerFlow.CommandLine.CommandLine.Parse(new[]
            { "train", "--preset", "tiny", "--steps", "7", "--batch-size", "3", "--lr", "0.01", "--seed", "5", "--device", "cpu", "--out", "x" });
        var t = Assert.IsType<MixerFlow.CommandLine.TrainCommand>(parsed.Command);
        var s = t.Settings;
        Assert.Equal(MixerFlow.Host.Models.Presets.Get("tiny"), s.Model);
        Assert.Equal((7L, 3, 0.01, 5, "cpu", "x", false), (s.Steps, s.BatchSize, s.LearningRate, s.Seed, s.Device, s.RunFolder, s.Resume));
        var defaults = new TrainingSettings();
        var d = Assert.IsType<MixerFlow.CommandLine.TrainCommand>(MixerFlow.CommandLine.CommandLine.Parse(new[] { "train" }).Command).Settings;
        Assert.Equal(defaults with { Model = d.Model }, d);
        var r = Assert.IsType<MixerFlow.CommandLine.TrainCommand>(MixerFlow.CommandLine.CommandLine.Parse(new[] { "train", "--resume", "runs/a" }).Command).Settings;
        Assert.Equal(("runs/a", true), (r.RunFolder, r.Resume));
        Assert.Empty(r.Given!);
        var g = Assert.IsType<MixerFlow.CommandLine.TrainCommand>(MixerFlow.CommandLine.CommandLine.Parse(
            new[] { "train", "--resume", "runs/a", "--lr", "0.01", "--batch-size", "8", "--extend-steps", "100" }).Command).Settings;
        Assert.Equal(new[] { "BatchSize", "LearningRate" }, g.Given!.Order());
        Assert.Equal(100L, g.ExtendSteps);
    }

    [Fact]
    public void Enumerated_options_parse_to_their_cases_and_name_the_choices_in_help()
    {
        var e = Assert.IsType<MixerFlow.CommandLine.EvalCommand>(
            MixerFlow.CommandLine.CommandLine.Parse(new[] { "eval", "--checkpoint", "a.ckpt", "--split", "train", "--device", "cuda" }).Command);
        Assert.Equal((MixerFlow.CommandLine.Split.Train, MixerFlow.CommandLine.Device.Cuda), (e.Split, e.Device));
        var c = Assert.IsType<MixerFlow.CommandLine.CheckCommand>(MixerFlow.CommandLine.CommandLine.Parse(new[] { "check", "--dtype", "float32" }).Command);
        Assert.Equal(MixerFlow.CommandLine.Precision.Float32, c.Precision);
        var help = MixerFlow.CommandLine.CommandLine.Parse(new[] { "train", "--help" }).Message;
        foreach (var name in MixerFlow.Host.Models.Presets.Names) Assert.Contains(name, help);
    }

    [Fact]
    public void Help_exits_with_0_and_lists_the_verbs()
    {
        var parsed = MixerFlow.CommandLine.CommandLine.Parse(new[] { "--help" });
        Assert.Equal(0, parsed.ExitCode);
        foreach (var verb in new[] { "train", "eval", "sample", "embed", "info", "check", "export" })
            Assert.Contains(verb, parsed.Message);
    }
}

/// <summary>`sample` on a real checkpoint: bounded grids, and file-system refusals as one line.</summary>
public class SampleVerbTests
{
    static (int Code, string Err) Run(params string[] args)
    {
        var (code, _, err) = CliInProcess.Run(args);
        return (code, err);
    }

    [Fact]
    public void Many_samples_go_to_numbered_grids_and_a_folder_as_output_is_one_line_with_exit_2()
    {
        var dir = Directory.CreateTempSubdirectory("mixerflow-sample-").FullName;
        try
        {
            new Trainer(new TrainingSettings
            {
                Model = MixerFlow.Host.Models.Presets.Get("tiny"), RunFolder = Path.Combine(dir, "run"), Steps = 2, BatchSize = 8, Pictures = false,
            }).Run();
            var ckpt = Path.Combine(dir, "run", Trainer.LastCheckpoint);
            var (code, err) = Run("sample", "--checkpoint", ckpt, "--count", "1100", "--out", Path.Combine(dir, "s.png"));
            Assert.True(code == 0, err);
            Assert.True(File.Exists(Path.Combine(dir, "s-001.png")) && File.Exists(Path.Combine(dir, "s-002.png")));
            Assert.False(File.Exists(Path.Combine(dir, "s-003.png")));

            Directory.CreateDirectory(Path.Combine(dir, "taken.png"));
            (code, err) = Run("sample", "--checkpoint", ckpt, "--count", "4", "--out", Path.Combine(dir, "taken.png"));
            Assert.Equal(2, code);
            Assert.StartsWith("error:", err);
            Assert.Contains("taken.png", err);
            Assert.DoesNotContain(" at ", err);   // no stack trace
        }
        finally { Directory.Delete(dir, true); }
    }
}
