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

/// <summary>Every verb rejects a bad argument with exit code 2 and a message.</summary>
public class CommandLineTests
{
    [Theory]
    [InlineData("train", "--batch-size", "0")]
    [InlineData("train", "--lr", "-1")]
    [InlineData("train", "--epochs", "2", "--steps", "3")]
    [InlineData("train", "--device", "tpu")]
    [InlineData("train", "--preset", "no-such-preset")]
    [InlineData("eval")]
    [InlineData("eval", "--checkpoint", "/nonexistent/file.ckpt")]
    [InlineData("eval", "--checkpoint", "x.ckpt", "--split", "validation")]
    [InlineData("sample", "--checkpoint", "x.ckpt", "--count", "-4")]
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
        Assert.False(string.IsNullOrWhiteSpace(err.ToString()));
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
        var t = Assert.IsType<MixerFlow.CommandLine.Command.Train>(parsed.Command);
        var s = t.settings;
        Assert.Equal(MixerFlow.Host.Models.Presets.Get("tiny"), s.Model);
        Assert.Equal((7L, 3, 0.01, 5, "cpu", "x", false), (s.Steps, s.BatchSize, s.LearningRate, s.Seed, s.Device, s.RunFolder, s.Resume));
        var defaults = new TrainingSettings();
        var d = Assert.IsType<MixerFlow.CommandLine.Command.Train>(MixerFlow.CommandLine.CommandLine.Parse(new[] { "train" }).Command).settings;
        Assert.Equal(defaults with { Model = d.Model }, d);
        var r = Assert.IsType<MixerFlow.CommandLine.Command.Train>(MixerFlow.CommandLine.CommandLine.Parse(new[] { "train", "--resume", "runs/a" }).Command).settings;
        Assert.Equal(("runs/a", true), (r.RunFolder, r.Resume));
    }

    [Fact]
    public void Enumerated_options_parse_to_their_cases_and_name_the_choices_in_help()
    {
        var e = Assert.IsType<MixerFlow.CommandLine.Command.Eval>(
            MixerFlow.CommandLine.CommandLine.Parse(new[] { "eval", "--checkpoint", "a.ckpt", "--split", "train", "--device", "cuda" }).Command).Item;
        Assert.Equal((MixerFlow.CommandLine.Split.Train, MixerFlow.CommandLine.Device.Cuda), (e.Split, e.Device));
        var c = Assert.IsType<MixerFlow.CommandLine.Command.Check>(MixerFlow.CommandLine.CommandLine.Parse(new[] { "check", "--dtype", "float32" }).Command).Item;
        Assert.Equal(MixerFlow.CommandLine.Precision.Float32, c.Precision);
        var help = MixerFlow.CommandLine.CommandLine.Parse(new[] { "train", "--help" }).Message;
        foreach (var name in MixerFlow.Host.Models.Presets.Names) Assert.Contains(name, help);
    }

    [Fact]
    public void Help_exits_with_0_and_lists_the_verbs()
    {
        var parsed = MixerFlow.CommandLine.CommandLine.Parse(new[] { "--help" });
        Assert.Equal(0, parsed.ExitCode);
        foreach (var verb in new[] { "train", "eval", "sample", "embed", "info", "check" })
            Assert.Contains(verb, parsed.Message);
    }
}
