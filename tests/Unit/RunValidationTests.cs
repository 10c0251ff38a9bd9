using MixerFlow.Host;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// Hostile input to `train`, `--resume` and experiments: each is refused in one line naming the
/// option, file or field (exit code 2), before anything in the run folder is made or changed.
/// </summary>
public class RunValidationTests
{
    static string TempDir() => Directory.CreateTempSubdirectory("mixerflow-validate-").FullName;

    static TrainingSettings Tiny(string dir, long steps) => new()
    {
        Model = Presets.Get("tiny"), RunFolder = dir, Steps = steps, BatchSize = 16, LearningRate = 1e-3,
        Seed = 3, CheckpointEvery = 2, Pictures = false,
    };

    /// <summary>Stops after a step; or makes the loss of every step not finite.</summary>
    sealed class Hooks(long? stopAfter = null, bool poison = false) : ITrainingObserver
    {
        public Tensor TransformLoss(long step, Tensor loss) => poison ? loss * double.NaN : loss;
        public bool ShouldStop(long step) => step == stopAfter;
    }

    /// <summary>A run of the tiny preset stopped at step 2 of 6 (last.ckpt at 2), in a fresh folder.</summary>
    static string StoppedRun()
    {
        var dir = TempDir();
        Assert.True(new Trainer(Tiny(dir, 6), new Hooks(stopAfter: 2)).Run().StoppedEarly);
        return dir;
    }

    static Dictionary<string, byte[]> Files(string dir) =>
        Directory.GetFiles(dir).Where(f => !Path.GetFileName(f).StartsWith(".lock")).ToDictionary(f => f, File.ReadAllBytes);

    /// <summary>Exit code 2, one line on stderr that holds every one of <paramref name="words"/>.</summary>
    static void Refused((int Code, string Out, string Err) r, params string[] words)
    {
        Assert.True(r.Code == 2, $"exit {r.Code}: {r.Err}");
        Assert.Single(r.Err.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        foreach (var w in words) Assert.Contains(w, r.Err);
    }

    static void Unchanged(Dictionary<string, byte[]> before, string dir)
    {
        Assert.Equal(before.Keys.Order(), Files(dir).Keys.Order());
        foreach (var (f, bytes) in before) Assert.True(bytes.AsSpan().SequenceEqual(File.ReadAllBytes(f)), $"{f} changed");
    }

    [Fact]
    public void Threads_beyond_the_bound_are_refused_like_the_experiment_spec_s()
    {
        var dir = TempDir();
        try
        {
            var run = Path.Combine(dir, "run");
            Refused(CliInProcess.Run("train", "--preset", "tiny", "--steps", "1", "--threads", "100000", "--out", run),
                    "threads", TrainingSettings.MaxThreads.ToString());
            Assert.False(Directory.Exists(run));
            Assert.Empty(new TrainingSettings { Threads = TrainingSettings.MaxThreads }.Problems());
            var spec = $$"""{ "steps": 1, "threads": {{TrainingSettings.MaxThreads + 1}}, "runs": [ { "name": "a", "preset": "tiny" } ] }""";
            Assert.Contains("threads", Assert.Throws<UserError>(() => ExperimentSpec.Parse(spec, "spec.json", dir)).Message);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void Training_afresh_into_a_folder_that_holds_a_run_is_refused_and_points_to_resume()
    {
        var dir = StoppedRun();
        try
        {
            var before = Files(dir);
            Refused(CliInProcess.Run("train", "--preset", "tiny", "--steps", "2", "--out", dir), "--resume", "already holds a run");
            Unchanged(before, dir);
            Assert.Throws<UserError>(() => new Trainer(Tiny(dir, 2)).Run());
            Unchanged(before, dir);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_class_conditional_model_is_refused_before_a_run_folder_is_made()
    {
        var dir = TempDir();
        try
        {
            var run = Path.Combine(dir, "run");
            Refused(CliInProcess.Run("train", "--preset", "tiny", "--steps", "1", "--set", "classes=10", "--out", run), "classes: 10", "class-conditional");
            Assert.False(Directory.Exists(run));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_model_too_large_for_the_memory_is_refused_with_the_estimate_and_the_limit()
    {
        var huge = Presets.Get(Presets.Default).With([("hiddenWidth", "65536"), ("layers", "38")]);
        var problems = TrainingLimits.Problems(huge, 64, availableBytes: 16L << 30);
        Assert.Contains(problems, p => p.Contains("memory") && p.Contains("16 GiB") && p.Contains("batch 64"));
        // every preset trains at the default batch in 8 GiB
        foreach (var preset in Presets.All.Values) Assert.Empty(TrainingLimits.Problems(preset, 64, 8L << 30));
        var dir = TempDir();
        try
        {
            var run = Path.Combine(dir, "run");
            Refused(CliInProcess.Run("train", "--set", "hiddenWidth=65536", "--set", "layers=38", "--batch-size", "4096", "--out", run),
                    "GiB", "memory");
            Assert.False(Directory.Exists(run));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_checkpoint_of_another_model_is_refused_naming_the_differing_fields()
    {
        var dir = StoppedRun();
        var other = TempDir();
        try
        {
            new Trainer(Tiny(other, 6) with { Model = Presets.Get("tiny").With([("hiddenWidth", "8")]) }, new Hooks(stopAfter: 2)).Run();
            File.Copy(Path.Combine(other, Trainer.LastCheckpoint), Path.Combine(dir, Trainer.LastCheckpoint), overwrite: true);
            var before = Files(dir);
            Refused(CliInProcess.Run("train", "--resume", dir), "hiddenWidth", "16", "8", RunFolder.ConfigFile);
            Unchanged(before, dir);
        }
        finally { Directory.Delete(dir, true); Directory.Delete(other, true); }
    }

    [Theory]
    [InlineData("must not be empty", "--out", "")]
    [InlineData("must not be empty", "--resume", "")]
    [InlineData("splineBound", "--set", "channelFlow=spline", "--set", "splineBound=1e39")]
    [InlineData("splineBound", "--set", "channelFlow=spline", "--set", "splineBound=1e30")]
    public void A_bad_option_is_one_line_naming_it(string word, params string[] options) =>
        Refused(CliInProcess.Run(["train", "--preset", "tiny", "--steps", "1", .. options]), word);

    [Theory]
    [InlineData("settings.json", "\"batchSize\": 16", "\"batchSize\": 0", "batchSize")]
    [InlineData("settings.json", "\"threads\": 0", "\"threads\": 100000", "threads")]
    [InlineData("settings.json", "{", "null", "cannot be read")]
    [InlineData("metrics.csv", "\n0,", "\nzero,", "step")]
    [InlineData("metrics.csv", "step,", "stop,", "columns")]
    public void A_damaged_run_file_stops_the_resume_naming_the_file_and_changes_nothing(string file, string from, string to, string word)
    {
        var dir = StoppedRun();
        try
        {
            var path = Path.Combine(dir, file);
            var text = File.ReadAllText(path);
            Assert.Contains(from, text);
            File.WriteAllText(path, to == "null" ? "null" : text.Replace(from, to));
            var before = Files(dir);
            Refused(CliInProcess.Run("train", "--resume", dir), file, word);
            Unchanged(before, dir);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_bits_per_dim_that_is_not_a_number_in_metrics_csv_is_named_by_row_and_column()
    {
        var dir = StoppedRun();
        try
        {
            var path = Path.Combine(dir, RunFolder.MetricsFile);
            var lines = File.ReadAllLines(path);
            var fields = lines[1].Split(',');
            fields[3] = "lots"; // heldout_bpd of step 0
            lines[1] = string.Join(",", fields);
            File.WriteAllLines(path, lines);
            var before = Files(dir);
            Refused(CliInProcess.Run("train", "--resume", dir), "metrics.csv", "data row 1", "heldout_bpd", "lots");
            Unchanged(before, dir);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_damaged_summary_of_a_finished_run_is_named()
    {
        var dir = TempDir();
        try
        {
            new Trainer(Tiny(dir, 2)).Run();
            File.WriteAllText(RunFolder.SummaryFile(dir), "{ \"steps\": ");
            Refused(CliInProcess.Run("train", "--resume", dir), "summary.json", "damaged");
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_checkpoint_whose_header_gives_a_negative_step_is_refused_before_metrics_are_trimmed()
    {
        var dir = StoppedRun();
        try
        {
            var last = Path.Combine(dir, Trainer.LastCheckpoint);
            var model = new ImageFlow(Presets.Get("tiny"));
            using var adam = new MixerFlow.Core.Adam(model.parameters(), 1e-3);
            Checkpoint.Save(last, model, -5, 0, double.PositiveInfinity, adam); // whole and checksummed
            var before = Files(dir);
            Refused(CliInProcess.Run("train", "--resume", dir), last, "step", "-5");
            Unchanged(before, dir);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_misspelt_key_in_a_config_file_is_refused_listing_the_valid_keys()
    {
        var dir = TempDir();
        try
        {
            var file = Path.Combine(dir, "model.json");
            File.WriteAllText(file, Presets.Get("tiny").ToJson().Replace("\"layers\"", "\"layer\""));
            var run = Path.Combine(dir, "run");
            Refused(CliInProcess.Run("train", "--config", file, "--steps", "1", "--out", run), file, "'layer'", "valid keys", "layers");
            Assert.False(Directory.Exists(run));
            // a version-1 file (both families' fields) still reads
            Assert.Equal(Presets.Get("tiny"), ConfigOverrides.ReadConfigFile(Path.Combine(AppContext.BaseDirectory, "data", "v1-tiny-config.json")));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_resume_without_settings_json_is_refused_naming_it()
    {
        var dir = StoppedRun();
        try
        {
            var settings = RunFolder.SettingsFile(dir);
            File.Delete(settings);
            var before = Files(dir);
            Refused(CliInProcess.Run("train", "--resume", dir), settings, "missing");
            Unchanged(before, dir);
            Directory.CreateDirectory(settings);
            Refused(CliInProcess.Run("train", "--resume", dir), settings, "is a folder");
            Unchanged(before, dir);
            Refused(CliInProcess.Run("train", "--resume", Path.Combine(dir, "nothing-here")), "no such run folder");
        }
        finally { Directory.Delete(dir, true); }
    }

    [Theory]
    [InlineData(3)]
    [InlineData(30)]
    public void A_run_that_kept_no_step_fails_naming_the_model_not_the_learning_rate(int steps)
    {
        var dir = TempDir();
        try
        {
            var e = Assert.Throws<TrainingDivergedException>(() => new Trainer(Tiny(dir, steps), new Hooks(poison: true)).Run());
            Assert.Contains("no step was kept", e.Message);
            Assert.Contains("model configuration 'tiny'", e.Message);
            Assert.DoesNotContain("--lr", e.Message);
            Assert.False(File.Exists(RunFolder.SummaryFile(dir)));
        }
        finally { Directory.Delete(dir, true); }
    }
}
