using System.Globalization;
using MixerFlow.Host.Data;
using MixerFlow.Host.Files;
using MixerFlow.Host.Models;
using MixerFlow.Host.Quality;
using MixerFlow.Host.Training;

namespace MixerFlow.Unit;

/// <summary>The experiment verb's sample-quality columns: per run and temperature, permuted runs scored as pictures, added to finished runs without retraining.</summary>
public class ExperimentQualityTests(QualityFixture fixture) : IClassFixture<QualityFixture>
{
    const string Runs = """
        "steps": 3, "batchSize": 16, "probeTrainImages": 0, "samplesPerRun": 2, "runs": [
            { "name": "plain", "preset": "tiny" },
            { "name": "permuted", "preset": "tiny", "permutePixels": 3 } ]
        """;

    ExperimentSpec Spec(string json, string dir) =>
        ExperimentSpec.Parse(json, "q.json", dir) with { QualityClassifier = ClassifierSettings.Tiny, QualityCacheFolder = fixture.Cache };

    [Fact]
    public void Each_run_is_scored_at_each_temperature_and_a_permuted_run_on_its_unpermuted_samples()
    {
        var dir = Directory.CreateTempSubdirectory("mixerflow-experiment-quality-").FullName;
        try
        {
            var output = Path.Combine(dir, "out");
            // Trained without quality first: asking for it later scores the finished runs, and trains nothing again.
            new Experiment(Spec("{" + Runs + "}", dir), output).Run();
            var experiment = new Experiment(Spec("""{ "qualityTemperatures": [0.5, 1.0], "qualitySamples": 64, """ + Runs + "}", dir), output);
            var rows = experiment.Run();
            Assert.Empty(experiment.Trained);

            Assert.All(rows, r =>
            {
                Assert.Equal(new[] { 0.5, 1.0 }, r.Quality!.Select(q => q.Temperature));
                Assert.All(r.Quality!, q =>
                {
                    Assert.Equal(64, q.Samples);
                    Assert.True(q.FrechetDistance > 0 && double.IsFinite(q.FrechetDistance));
                    Assert.InRange(q.Precision, 0, 1);
                    Assert.InRange(q.Recall, 0, 1);
                });
            });
            // An independent scoring of the permuted run's checkpoint: its samples un-permuted before scoring.
            var (model, _) = Checkpoint.Load(Path.Combine(experiment.FolderOf("permuted", 0), RunFolder.LastCheckpoint));
            double Fd(PixelPermutation? p) => SampleQuality.Score(model, fixture.Data, [1.0], 64, seed: 0, ClassifierSettings.Tiny, fixture.Cache, permutation: p)[0].FrechetDistance;
            Assert.Equal(Fd(PixelPermutation.Of(3, 28, 28)), rows[1].Quality![1].FrechetDistance, 9);
            Assert.NotEqual(Fd(null), rows[1].Quality![1].FrechetDistance, 3);

            var csv = CsvLog.Read(Path.Combine(output, Experiment.ResultsCsv));
            Assert.Equal(rows[0].Quality![0].FrechetDistance, double.Parse(csv[0]["fd_t0.5"], CultureInfo.InvariantCulture), 3);
            Assert.Equal(rows[1].Quality![1].Recall, double.Parse(csv[1]["recall_t1"], CultureInfo.InvariantCulture), 3);
            var markdown = File.ReadAllText(Path.Combine(output, Experiment.ResultsMarkdown));
            Assert.Contains("| run | temperature | Fréchet distance | precision | recall |", markdown);
            Assert.Contains(FormattableString.Invariant($"| permuted | 1 | {rows[1].Quality![1].FrechetDistance:0.000} |"), markdown);
            Assert.Contains("| *training images (the floor)* |", markdown);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Theory]
    [InlineData("""{ "steps": 1, "qualityTemperatures": [0.7, 0.7], "runs": [ { "name": "a", "preset": "tiny" } ] }""", "qualityTemperatures: repeated temperature in [0.7, 0.7]")]
    [InlineData("""{ "steps": 1, "qualityTemperatures": [11], "runs": [ { "name": "a", "preset": "tiny" } ] }""", "qualityTemperatures: must be temperatures in [0, 10], got [11]")]
    [InlineData("""{ "steps": 1, "qualityTemperatures": 0.7, "runs": [ { "name": "a", "preset": "tiny" } ] }""", "qualityTemperatures: must be a list of temperatures")]
    [InlineData("""{ "steps": 1, "qualitySamples": 2, "runs": [ { "name": "a", "preset": "tiny" } ] }""", "qualitySamples: must be an integer in [4, 100000], got 2")]
    public void Bad_quality_fields_are_refused_with_the_field_and_what_it_takes(string json, string expected)
    {
        var e = Assert.Throws<MixerFlow.Host.UserError>(() => ExperimentSpec.Parse(json, "q.json", "."));
        Assert.Contains("q.json: " + expected, e.Message);
    }
}
