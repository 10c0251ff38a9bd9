using MixerFlow.Host.Files;
using MixerFlow.Host.Training;

namespace MixerFlow.Unit;

/// <summary>An experiment's budgets in steps and seconds, and its runs on permuted pixels.</summary>
public class ExperimentBudgetTests
{
    static string TempDir() => Directory.CreateTempSubdirectory("mixerflow-experiment-budget-").FullName;

    [Fact]
    public void Steps_and_seconds_are_each_optional_at_the_top_and_in_a_run_whose_own_wins()
    {
        var spec = ExperimentSpec.Parse("""
            { "seconds": 30, "runs": [
                { "name": "timed", "preset": "tiny" },
                { "name": "both", "preset": "tiny", "steps": 7, "permutePixels": 5 },
                { "name": "own", "preset": "tiny", "seconds": 2 } ] }
            """, "s.json", ".");
        Assert.Equal(new[] { (0L, 30.0, 0), (7L, 30.0, 5), (0L, 2.0, 0) }, spec.Runs.Select(r => (r.Steps, r.Seconds, r.PixelPermutationSeed)));
        var settings = spec.SettingsFor(spec.Runs[1], 0, "f", false);
        Assert.Equal((7L, 30.0, 5), (settings.Steps, settings.MaxSeconds, settings.PixelPermutationSeed));
        var stepsOnly = ExperimentSpec.Parse("""{ "steps": 9, "runs": [ { "name": "a", "preset": "tiny", "seconds": 4 } ] }""", "t.json", ".");
        Assert.Equal((9L, 4.0), (stepsOnly.Runs[0].Steps, stepsOnly.Runs[0].Seconds));
        Assert.Equal(0, stepsOnly.SettingsFor(stepsOnly.Runs[0], 0, "f", false).PixelPermutationSeed);
    }

    [Fact]
    public void A_run_under_a_tiny_time_budget_stops_after_its_first_step_and_the_results_say_so()
    {
        var dir = TempDir();
        try
        {
            var spec = ExperimentSpec.Parse("""
                { "steps": 10, "batchSize": 16, "probeTrainImages": 0, "samplesPerRun": 2, "runs": [
                    { "name": "steps", "preset": "tiny", "steps": 3 },
                    { "name": "timed", "preset": "tiny", "seconds": 0.000001, "permutePixels": 3 } ] }
                """, "a.json", dir);
            var output = Path.Combine(dir, "out");
            var log = new StringWriter();
            var rows = new Experiment(spec, output, log).Run();
            Assert.Matches("timed/seed-0: training 10 steps or .* s of training steps, whichever comes first", log.ToString());
            Assert.Equal((3.0, 1.0), (rows[0].Steps, rows[1].Steps));
            Assert.All(rows, r => Assert.True(r.TrainingSeconds > 0));
            var csv = CsvLog.Read(Path.Combine(output, Experiment.ResultsCsv));
            Assert.Equal(new[] { "3", "1" }, csv.Select(r => r["steps"]));
            Assert.All(csv, r => Assert.True(double.Parse(r["train_s"], System.Globalization.CultureInfo.InvariantCulture) >= 0));
            Assert.Contains("| steps | training time | wall time |", File.ReadAllText(Path.Combine(output, Experiment.ResultsMarkdown)));
            var saved = TrainingSettings.FromJson(File.ReadAllText(RunFolder.SettingsFile(Path.Combine(output, "runs", "timed", "seed-0"))));
            Assert.Equal((1e-6, 3), (saved.MaxSeconds, saved.PixelPermutationSeed));
            Assert.Equal(1, RunFolder.ReadSummary(Path.Combine(output, "runs", "timed", "seed-0"))!.Steps);
        }
        finally { Directory.Delete(dir, true); }
    }
}
