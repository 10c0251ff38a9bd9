using System.Globalization;
using System.Text.Json;
using MixerFlow.CommandLine;
using MixerFlow.Host.Data;
using MixerFlow.Host.Files;
using MixerFlow.Host.Models;
using MixerFlow.Host.Quality;
using static TorchSharp.torch;

namespace MixerFlow.Cli.Verbs;

/// <summary>`score`: sample quality of a checkpoint in a data-trained classifier's feature space.</summary>
public static class ScoreVerb
{
    /// <summary>Scores the checkpoint at each temperature; prints a table (and writes JSON when asked).
    /// The progress goes to stderr.</summary>
    public static int Run(ScoreCommand o, TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(o);
        if (o.Json is not null) OutputPath.CheckFile(o.Json, "--json", ("--checkpoint", o.Checkpoint));
        var (model, _) = Checkpoint.Load(o.Checkpoint);
        model.MoveTo(CPU, float32);
        model.eval();
        var c = model.Config;
        var data = DatasetLoader.Load(o.Data, c.Channels, c.Height, c.Width);
        var progress = new ProgressLine(Console.Error);
        var scores = SampleQuality.Score(model, data, o.Temperatures, o.Samples > 0 ? o.Samples : null, o.Seed,
            progress: progress);
        var floor = SampleQuality.ScoreData(data, o.Samples > 0 ? o.Samples : null, progress: progress);
        progress.Finish();
        var info = scores[0].Classifier;
        output.WriteLine($"data: {data.Description}");
        output.WriteLine(FormattableString.Invariant(
            $"classifier: {info.FeatureDimension} features, test accuracy {info.TestAccuracy:P1} ({(info.FromCache ? "cached" : "trained now")}: {info.Path})"));
        output.WriteLine($"{"temperature",11}  {"samples",7}  {"Fréchet distance",16}  {"precision",9}  {"recall",6}");
        foreach (var s in scores.Append(floor))
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{(double.IsNaN(s.Temperature) ? "train data" : s.Temperature.ToString("0.###", CultureInfo.InvariantCulture)),11}  {s.Samples,7}  {s.FrechetDistance,16:0.000}  {s.Precision,9:0.000}  {s.Recall,6:0.000}"));
        output.WriteLine("(train data: training images against the same test images, the score of real data)");
        if (o.Json is not null)
        {
            AtomicFile.WriteAllText(o.Json, JsonSerializer.Serialize(
                new { checkpoint = o.Checkpoint, data = data.Description, seed = o.Seed, classifier = info, scores = scores.Select(s => new
                {
                    temperature = s.Temperature, samples = s.Samples, referenceImages = s.ReferenceImages,
                    frechetDistance = s.FrechetDistance, precision = s.Precision, recall = s.Recall, classifierAccuracy = s.ClassifierAccuracy,
                }), trainData = new { samples = floor.Samples, frechetDistance = floor.FrechetDistance, precision = floor.Precision, recall = floor.Recall } },
                new JsonSerializerOptions { WriteIndented = true }));
            output.WriteLine($"wrote {o.Json}");
        }
        return 0;
    }

    /// <summary>A progress line on a text writer: rewritten in place on a terminal, a line per stage otherwise.</summary>
    sealed class ProgressLine(TextWriter writer) : IProgress<QualityProgress>
    {
        readonly bool live = ReferenceEquals(writer, Console.Error) && !Console.IsErrorRedirected;
        string? stage;
        bool open;

        public void Report(QualityProgress p)
        {
            int filled = (int)(30 * p.Done / Math.Max(1.0, p.Total));
            var text = $"{p.Stage} [{new string('#', filled)}{new string('.', 30 - filled)}] {p.Done}/{p.Total}";
            if (live) { writer.Write("\r" + text.PadRight(100)); open = true; }
            else if (p.Stage != stage) writer.WriteLine(p.Stage);
            stage = p.Stage;
        }

        public void Finish()
        {
            if (open) writer.WriteLine();
            open = false;
        }
    }
}
