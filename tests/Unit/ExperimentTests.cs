using MixerFlow.Core;
using MixerFlow.Host;
using MixerFlow.Host.Files;
using MixerFlow.Host.Imaging;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>Configuration overrides (--config / --set) in the library and on the command line.</summary>
public class ConfigOverrideTests
{
    static (int Code, string Out, string Err) Cli(params string[] args)
    {
        var (err, output) = (new StringWriter(), new StringWriter());
        var (savedErr, savedOut) = (Console.Error, Console.Out);
        Console.SetError(err);
        Console.SetOut(output);
        try { return (MixerFlow.Cli.Program.Main(args), output.ToString(), err.ToString()); }
        finally { Console.SetError(savedErr); Console.SetOut(savedOut); }
    }

    [Fact]
    public void Good_overrides_change_the_built_model()
    {
        var tiny = (MixerFlowConfig)Presets.Get("tiny");
        var changed = Assert.IsType<MixerFlowConfig>(ConfigOverrides.Apply(tiny,
            ["PATCHES=bands", "shift=false", "channelFlow=Spline", "hiddenWidth=24", "norm=batchNorm", "alpha=0.01"]));
        Assert.Equal((PatchStrategy.Bands, false, InnerFlow.Spline, 24, Normalisation.BatchNorm, 0.01),
            (changed.Patches, changed.Shift, changed.ChannelFlow, changed.HiddenWidth, changed.Norm, changed.Alpha));
        Assert.Equal(tiny with { Patches = PatchStrategy.Bands, Shift = false, ChannelFlow = InnerFlow.Spline, HiddenWidth = 24, Norm = Normalisation.BatchNorm, Alpha = 0.01 }, changed);
        Assert.Equal(PatchStrategy.Square, tiny.Patches); // the preset itself is untouched
        using var a = new ImageFlow(tiny);
        using var b = new ImageFlow(changed);
        Assert.NotEqual(a.ParameterCount, b.ParameterCount);
        Assert.Equal(4, changed.Geometry.Patches); // 28 rows in bands of 7

        var glow = Presets.Get("glow-tiny").With([("glowWidth", "12"), ("stepsPerLevel", "1")]);
        using var g0 = new ImageFlow(Presets.Get("glow-tiny"));
        using var g1 = new ImageFlow(glow);
        Assert.NotEqual(g0.ParameterCount, g1.ParameterCount);
        // a later override of the same key wins; no overrides give the same configuration
        Assert.Equal(32, ((MixerFlowConfig)tiny.With([("hiddenWidth", "8"), ("hiddenWidth", "32")])).HiddenWidth);
        Assert.Same(tiny, ConfigOverrides.Apply(tiny, Array.Empty<string>()));
    }

    [Theory]
    [InlineData("foo=1", "unknown key 'foo'", "valid keys: name, channels, height, width, alpha, dequantization")]
    [InlineData("glowWidth=3", "unknown key 'glowWidth'", "channelFlow")]
    [InlineData("patches=diagonal", "patches must be one of square, bands, stripes", "")]
    [InlineData("channelFlow=glow", "channelFlow must be one of affine, additive, spline, maf", "")]
    [InlineData("norm=layer", "norm must be one of actNorm, batchNorm", "")]
    [InlineData("shift=maybe", "shift must be true or false", "")]
    [InlineData("layers=two", "layers must be an integer", "")]
    [InlineData("layers=0", "layers: must lie in [1, 256], got 0", "")]
    [InlineData("hiddenWidth=100000", "hiddenWidth: must lie in [1, 65536]", "")]
    [InlineData("alpha=0.7", "alpha: must lie in (0, 0.5)", "")]
    [InlineData("patchSize=5", "patchSize", "")]
    [InlineData("shift", "expected key=value", "")]
    [InlineData("conditionerPrecision=half", "conditionerPrecision must be one of float32, bfloat16", "")]
    [InlineData("conditioner=rbf", "conditioner must be one of mlp, kan", "")]
    public void Bad_keys_values_and_bounds_are_refused_naming_the_field_and_what_it_accepts(string assignment, string expected, string also)
    {
        var e = Assert.Throws<UserError>(() => ConfigOverrides.Apply(Presets.Get("tiny"), [assignment]));
        Assert.Contains(expected, e.Message);
        Assert.Contains(also, e.Message);
        Assert.StartsWith("--set", e.Message);
        // the command line: one line on stderr, exit 2
        var (code, _, err) = Cli("info", "--preset", "tiny", "--set", assignment);
        Assert.Equal(2, code);
        Assert.Contains(expected, err);
        Assert.Single(err.Trim().Split('\n'));
        Assert.Equal(2, Cli("train", "--preset", "tiny", "--steps", "1", "--set", assignment).Code);
    }

    [Fact]
    public void Info_shows_bfloat16_conditioners_and_when_oneDNN_runs()
    {
        var (code, output, _) = Cli("info", "--preset", "tiny", "--set", "conditionerPrecision=bfloat16");
        Assert.Equal(0, code);
        Assert.Contains("\"conditionerPrecision\": \"bfloat16\"", output);
        Assert.Contains("on during the bfloat16 conditioners' products only", output);
        (code, output, _) = Cli("info", "--preset", "tiny");
        Assert.Contains("\"conditionerPrecision\": \"float32\"", output);
        Assert.DoesNotContain("bfloat16 conditioners", output);
    }

    [Fact]
    public void The_keys_are_the_json_names_of_each_family()
    {
        var mixer = ConfigOverrides.Keys(Presets.Get("tiny"));
        var json = Presets.Get("tiny").ToJson();
        foreach (var k in mixer) Assert.Contains($"\"{k}\":", json);
        Assert.Contains("glowWidth", ConfigOverrides.Keys(Presets.Get("glow-tiny")));
        Assert.DoesNotContain("kind", mixer);
        Assert.Equal("one of square, bands, stripes", ConfigOverrides.Accepts(Presets.Get("tiny"), "patches"));
    }

    [Fact]
    public void Config_files_round_trip_through_info_and_train_and_the_run_folder_keeps_the_resolved_configuration()
    {
        var dir = Directory.CreateTempSubdirectory("mixerflow-config-").FullName;
        try
        {
            var custom = Presets.Get("tiny").With([("patches", "stripes"), ("shift", "false"), ("name", "mine")]);
            var file = Path.Combine(dir, "model.json");
            File.WriteAllText(file, custom.ToJson());

            var parsed = Assert.IsType<MixerFlow.CommandLine.TrainCommand>(MixerFlow.CommandLine.CommandLine.Parse(["train", "--config", file]).Command);
            Assert.Equal(custom, parsed.Settings.Model);
            var withSet = Assert.IsType<MixerFlow.CommandLine.TrainCommand>(
                MixerFlow.CommandLine.CommandLine.Parse(["train", "--config", file, "--set", "hiddenWidth=8"]).Command);
            Assert.Equal(((MixerFlowConfig)custom) with { HiddenWidth = 8 }, withSet.Settings.Model);
            // a preset name is accepted as --config too
            var preset = Assert.IsType<MixerFlow.CommandLine.TrainCommand>(MixerFlow.CommandLine.CommandLine.Parse(["train", "--config", "glow-tiny"]).Command);
            Assert.Equal(Presets.Get("glow-tiny"), preset.Settings.Model);

            var (code, output, err) = Cli("info", "--config", file, "--set", "hiddenWidth=8");
            Assert.True(code == 0, err);
            Assert.Contains("\"patches\": \"stripes\"", output);
            Assert.Contains("\"hiddenWidth\": 8", output);
            Assert.Contains("total", output);

            // train with --config and --set; config.json holds the resolved configuration, and reads back as --config
            var run = Path.Combine(dir, "run");
            (code, _, err) = Cli("train", "--config", file, "--set", "hiddenWidth=8", "--steps", "2", "--batch-size", "8", "--out", run);
            Assert.True(code == 0, err);
            var saved = ConfigOverrides.ReadConfigFile(Path.Combine(run, "config.json"));
            Assert.Equal(((MixerFlowConfig)custom) with { HiddenWidth = 8 }, saved);
            Assert.Equal(saved, ConfigOverrides.ReadConfigFile(Path.Combine(run, Trainer.LastCheckpoint)));
            (code, output, _) = Cli("info", "--config", Path.Combine(run, "config.json"));
            Assert.Equal(0, code);
            // what `info` prints (the JSON, then the parameter table) reads back as --config
            var printed = Path.Combine(dir, "printed.json");
            File.WriteAllText(printed, output);
            Assert.Contains("total", File.ReadAllText(printed));
            Assert.Equal(saved, ConfigOverrides.ReadConfigFile(printed));

            // refusals: both --preset and --config, --set with --resume, a missing file
            Assert.Equal(2, Cli("train", "--preset", "tiny", "--config", file).Code);
            Assert.Equal(2, Cli("train", "--resume", run, "--set", "shift=true").Code);
            (code, _, err) = Cli("info", "--config", Path.Combine(dir, "missing.json"));
            Assert.Equal(2, code);
            Assert.Contains("missing.json", err);
        }
        finally { Directory.Delete(dir, true); }
    }
}

/// <summary>The experiment runner: spec validation, results files, resuming.</summary>
public class ExperimentTests
{
    const string TinySpec = """
        {
          "name": "tiny-shift",
          "steps": 10, "batchSize": 16, "learningRate": 0.002, "warmupSteps": 2, "checkpointEvery": 5,
          "probeTrainImages": 300, "probeTestImages": 100,
          "runs": [
            { "name": "tiny", "preset": "tiny" },
            { "name": "tiny-no-shift", "preset": "tiny", "set": { "shift": false }, "seeds": [0, 1] }
          ]
        }
        """;

    static string TempDir() => Directory.CreateTempSubdirectory("mixerflow-experiment-").FullName;

    sealed class StopAt(long step) : ITrainingObserver
    {
        public bool ShouldStop(long s) => s == step;
    }

    [Fact]
    public void A_tiny_experiment_writes_every_file_and_a_rerun_does_not_retrain()
    {
        var dir = TempDir();
        try
        {
            var specPath = Path.Combine(dir, "tiny.json");
            File.WriteAllText(specPath, TinySpec);
            var spec = ExperimentSpec.Load(specPath);
            Assert.False(((MixerFlowConfig)spec.Runs[1].Model).Shift);
            var output = Path.Combine(dir, "out");
            var experiment = new Experiment(spec, output);
            var rows = experiment.Run();
            Assert.Equal(3, experiment.Trained.Count);
            Assert.Equal(new[] { "tiny", "tiny-no-shift" }, rows.Select(r => r.Run));
            Assert.Equal(new[] { 1, 2 }, rows.Select(r => r.Seeds));
            Assert.All(rows, r => Assert.Equal(12_900, r.Parameters));
            Assert.All(rows, r => Assert.True(double.IsFinite(r.TestBpd) && r.TestStdErr > 0 && r.ImagesPerSecond > 0));
            Assert.True(double.IsNaN(rows[0].SeedSpread) && rows[1].SeedSpread > 0);
            Assert.All(rows, r => Assert.InRange(r.ProbeAccuracy, 0.0, 1.0));
            foreach (var f in new[] { Experiment.ResultsCsv, Experiment.ResultsMarkdown, Experiment.CurvesPng, Experiment.SamplesPng })
                Assert.True(new FileInfo(Path.Combine(output, f)).Length > 0, f);
            var csv = CsvLog.Read(Path.Combine(output, Experiment.ResultsCsv));
            Assert.Equal(new[] { "tiny", "tiny-no-shift" }, csv.Select(r => r["run"]));
            Assert.Equal("12900", csv[0]["parameters"]);
            Assert.Equal("", csv[0]["seed_sd"]);
            var md = File.ReadAllText(Path.Combine(output, Experiment.ResultsMarkdown));
            Assert.Contains("| tiny-no-shift | 12,900 |", md);
            Assert.Contains("(2 seeds)", md);
            foreach (var (run, seed) in new[] { ("tiny", 0), ("tiny-no-shift", 0), ("tiny-no-shift", 1) })
            {
                var folder = experiment.FolderOf(run, seed);
                Assert.True(File.Exists(Path.Combine(folder, "summary.json")) && File.Exists(Path.Combine(folder, "config.json")));
            }
            Assert.Contains("\"shift\": false", File.ReadAllText(Path.Combine(experiment.FolderOf("tiny-no-shift", 1), "config.json")));
            // the sample sheet: a labelled row per run
            using (var png = SixLabors.ImageSharp.Image.Load(Path.Combine(output, Experiment.SamplesPng)))
                Assert.True(png.Height >= 2 * 28 * 2 && png.Width > 8 * 28 * 2);

            var log = new StringWriter();
            var again = new Experiment(ExperimentSpec.Load(specPath), output, log);
            var rows2 = again.Run();
            Assert.Empty(again.Trained);
            Assert.Contains("finished earlier, not retrained", log.ToString());
            Assert.Equal(rows.Select(r => r.TestBpd), rows2.Select(r => r.TestBpd));

            // a changed budget or model is refused by name, not reported as if trained under it
            File.WriteAllText(specPath, TinySpec.Replace("\"steps\": 10", "\"steps\": 12"));
            var e = Assert.Throws<UserError>(() => new Experiment(ExperimentSpec.Load(specPath), output).Run());
            Assert.Contains("steps: trained with 10, the spec says 12", e.Message);
            File.WriteAllText(specPath, TinySpec.Replace("\"shift\": false", "\"shift\": false, \"hiddenWidth\": 8"));
            e = Assert.Throws<UserError>(() => new Experiment(ExperimentSpec.Load(specPath), output).Run());
            Assert.Contains("tiny-no-shift/seed-0", e.Message);
            Assert.Contains("hiddenWidth: trained with 16, the spec says 8", e.Message);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void An_interrupted_run_resumes_from_its_last_checkpoint()
    {
        var dir = TempDir();
        try
        {
            var spec = ExperimentSpec.Parse("""{ "steps": 10, "batchSize": 16, "checkpointEvery": 5, "probeTrainImages": 0, "runs": [ { "name": "a", "preset": "tiny" } ] }""", "a.json", dir);
            var output = Path.Combine(dir, "out");
            Assert.Throws<UserError>(() => new Experiment(spec, output, null, _ => new StopAt(6)).Run());
            Assert.True(File.Exists(Path.Combine(output, "runs", "a", "seed-0", "last.ckpt")));
            Assert.False(File.Exists(Path.Combine(output, "runs", "a", "seed-0", "summary.json")));
            var log = new StringWriter();
            var rows = new Experiment(spec, output, log).Run();
            Assert.Contains("a/seed-0: resuming from its last checkpoint", log.ToString());
            Assert.Contains("resuming", log.ToString());
            Assert.Contains("at step 5", log.ToString());
            Assert.True(double.IsNaN(rows[0].ProbeAccuracy));
            Assert.Equal(10, RunFolder.ReadSummary(Path.Combine(output, "runs", "a", "seed-0"))!.Steps);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Theory]
    [InlineData("""{ "runs": [ { "name": "a", "preset": "tiny" } ] }""", "run 'a': steps / seconds: required, in the run or at the top")]
    [InlineData("""{ "seconds": -1, "runs": [ { "name": "a", "preset": "tiny" } ] }""", "seconds: must be a number of seconds in (0, 100000000], got -1")]
    [InlineData("""{ "seconds": "long", "runs": [ { "name": "a", "preset": "tiny" } ] }""", "seconds: must be a number of seconds in (0, 100000000], got \"long\"")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "seconds": 0 } ] }""", "run 'a': seconds: must be a number of seconds in (0, 100000000], got 0")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "steps": 0 } ] }""", "run 'a': steps: must be an integer in [1, 100000000], got 0")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "permutePixels": -2 } ] }""", "run 'a': permutePixels: must be an integer in [0, 2147483647], got -2")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "permutePixels": "x" } ] }""", "run 'a': permutePixels: must be an integer seed")]
    [InlineData("""{ "steps": 5, "runs": [] }""", "runs: required")]
    [InlineData("""{ "steps": 5, "batchsize": 4, "runs": [ { "name": "a", "preset": "tiny" } ] }""", "batchsize: unknown field; known fields: name")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "set": { "shift": "maybe" } } ] }""", "run 'a': set shift=maybe: shift must be true or false")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "set": { "depth": 3 } } ] }""", "run 'a': set depth=3: unknown key 'depth'")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "set": { "layers": 0 } } ] }""", "run 'a': set layers=0: layers: must lie in [1, 256]")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "nope" } ] }""", "run 'a': preset: unknown preset 'nope'")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a" } ] }""", "run 'a': preset / config: give exactly one")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "config": "missing.json" } ] }""", "run 'a': config:")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a b", "preset": "tiny" } ] }""", "runs[0]: name: 'a b' must be")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny" }, { "name": "a", "preset": "tiny" } ] }""", "run 'a': name: used by 2 runs")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "seeds": [1, 1] } ] }""", "run 'a': seeds: repeated")]
    [InlineData("""{ "steps": 5, "learningRate": 2, "runs": [ { "name": "a", "preset": "tiny" } ] }""", "learningRate: must lie in (0, 1)")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny" } """, "not valid JSON")]
    [InlineData("""{ "steps": "ten", "runs": [ { "name": "a", "preset": "tiny" } ] }""", "steps: must be an integer in [1, 100000000], got \"ten\"")]
    [InlineData("""{ "steps": 5, "learningRate": [1], "runs": [ { "name": "a", "preset": "tiny" } ] }""", "learningRate: must be a number, got [1]")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "colour": 1 } ] }""", "run 'a': colour: unknown field; known fields: name, description, preset, config, set, seeds")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "seeds": "0" } ] }""", "run 'a': seeds: must be a non-empty list of integers >= 0, got \"0\"")]
    [InlineData("""{ "steps": 5, "runs": [ { "name": "a", "preset": "tiny", "set": [1] } ] }""", "run 'a': set: must be an object of field: value")]
    [InlineData("""{ "steps": 5, "runs": [ 3 ] }""", "runs[0]: must be an object with")]
    [InlineData("""{ "steps": 5, "runs": { "name": "a" } }""", "runs: must be a non-empty list of")]
    public void A_bad_spec_is_one_line_naming_the_file_the_run_and_the_field(string json, string expected)
    {
        var dir = TempDir();
        try
        {
            var path = Path.Combine(dir, "bad.json");
            File.WriteAllText(path, json);
            var e = Assert.Throws<UserError>(() => ExperimentSpec.Load(path));
            Assert.StartsWith(path + ": ", e.Message);
            Assert.Contains(expected, e.Message);
            var err = new StringWriter();
            var saved = Console.Error;
            Console.SetError(err);
            try { Assert.Equal(2, MixerFlow.Cli.Program.Main(["experiment", path, "--out", Path.Combine(dir, "out")])); }
            finally { Console.SetError(saved); }
            Assert.Single(err.ToString().Trim().Split('\n'));
            Assert.Contains(expected, err.ToString());
            Assert.False(Directory.Exists(Path.Combine(dir, "out")));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void The_experiment_verb_parses_its_spec_and_results_folder()
    {
        var e = Assert.IsType<MixerFlow.CommandLine.ExperimentCommand>(MixerFlow.CommandLine.CommandLine.Parse(["experiment", "experiments/shift.json"]).Command);
        Assert.Equal(("experiments/shift.json", Path.Combine("runs", "shift")), (e.Spec, e.Out));
        e = Assert.IsType<MixerFlow.CommandLine.ExperimentCommand>(MixerFlow.CommandLine.CommandLine.Parse(["experiment", "s.json", "--out", "r"]).Command);
        Assert.Equal("r", e.Out);
        Assert.Null(MixerFlow.CommandLine.CommandLine.Parse(["experiment"]).Command);
    }

    [Fact]
    public void The_spec_files_in_experiments_are_valid()
    {
        var folder = FindExperiments();
        var files = Directory.GetFiles(folder, "*.json");
        Assert.NotEmpty(files);
        foreach (var f in files)
        {
            var spec = ExperimentSpec.Load(f);
            Assert.NotEmpty(spec.Runs);
            foreach (var r in spec.Runs) Assert.Empty(r.Model.Problems());
        }
    }

    static string FindExperiments()
    {
        var experiments = Path.Combine(Repository.Root(), "experiments");
        return Directory.Exists(experiments) ? experiments : throw new DirectoryNotFoundException($"{experiments} is missing");
    }
}

/// <summary>The experiment's pictures: labelled sample rows and the multi-series curve.</summary>
public class ExperimentPictureTests
{
    [Fact]
    public void The_sample_sheet_has_a_labelled_row_per_model_with_its_images()
    {
        var path = Path.Combine(Path.GetTempPath(), $"sheet-{Guid.NewGuid():N}.png");
        try
        {
            using var grey = full(new long[] { 3, 1, 10, 10 }, 255f);          // white images
            using var colour = zeros(new long[] { 2, 3, 12, 12 });              // black images
            SampleSheet.Save([("first", grey), ("b", colour)], path);
            using var image = SixLabors.ImageSharp.Image.Load<SixLabors.ImageSharp.PixelFormats.Rgb24>(path);
            int labelWidth = SampleSheet.TextWidth("first") + 8;
            Assert.Equal(labelWidth + 3 * (10 * 2 + 1) + 4, image.Width);
            Assert.Equal(4 + (20 + 4) + (24 + 4), image.Height);       // rows: max(image height x 2, glyph 14) + gaps
            // ink in each label, the images where they belong
            bool Ink(int x0, int x1, int y0, int y1)
            {
                for (int y = y0; y < y1; y++) for (int x = x0; x < x1; x++) if (image[x, y].R == 0) return true;
                return false;
            }
            Assert.True(Ink(0, labelWidth, 4, 4 + 20));
            Assert.True(Ink(0, labelWidth, 4 + 24, image.Height));
            Assert.Equal(0, image[labelWidth + 1, 4 + 24 + 1].R);
            Assert.Equal(255, image[labelWidth + 1, 4 + 1].R);           // the white grey image       // the black colour image
            Assert.Throws<ArgumentException>(() => SampleSheet.Save([], path));
        }
        finally { File.Delete(path); }
    }

    [Fact]
    public void The_curve_plot_takes_one_series_per_run()
    {
        var path = Path.Combine(Path.GetTempPath(), $"curves-{Guid.NewGuid():N}.png");
        try
        {
            TrainingCurve.SaveSeries(
                [("a", new List<(long, double)> { (0, 9.7), (10, 5.0) }), ("b", new List<(long, double)> { (0, 9.7), (10, 6.0) }), ("c", [])],
                path, "test");
            using var image = SixLabors.ImageSharp.Image.Load(path);
            Assert.Equal((TrainingCurve.Width, TrainingCurve.Height), (image.Width, image.Height));
        }
        finally { File.Delete(path); }
    }
}
