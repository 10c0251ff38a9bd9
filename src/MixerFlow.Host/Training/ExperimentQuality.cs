using System.Globalization;
using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using MixerFlow.Host.Quality;

namespace MixerFlow.Host.Training;

/// <summary>The sample quality of one trained seed (or, averaged, of a run) at one temperature.</summary>
/// <param name="Temperature">The sampling temperature.</param>
/// <param name="Samples">Samples scored (against the held-out images).</param>
/// <param name="FrechetDistance">Fréchet distance in the feature classifier's space (lower is better).</param>
/// <param name="Precision">Share of samples inside the real images' feature manifold.</param>
/// <param name="Recall">Share of the real images covered by the samples' manifold.</param>
/// <param name="ClassifierAccuracy">The feature classifier's accuracy on the held-out images.</param>
public sealed record ExperimentQuality(double Temperature, int Samples, double FrechetDistance, double Precision, double Recall,
    double ClassifierAccuracy)
{
    internal static ExperimentQuality From(QualityScore s) =>
        new(s.Temperature, s.Samples, s.FrechetDistance, s.Precision, s.Recall, s.ClassifierAccuracy);

    /// <summary>The mean over seeds of the scores at each temperature of <paramref name="temperatures"/> (those every seed has).</summary>
    internal static IReadOnlyList<ExperimentQuality> Mean(IEnumerable<IReadOnlyList<ExperimentQuality>?> seeds, IReadOnlyList<double> temperatures)
    {
        var all = seeds.Select(s => s ?? []).ToList();
        var rows = new List<ExperimentQuality>();
        foreach (var t in temperatures)
        {
            var at = all.Select(s => s.FirstOrDefault(q => q.Temperature == t)).ToList();
            if (at.Count == 0 || at.Any(q => q is null)) continue;
            rows.Add(new ExperimentQuality(t, at[0]!.Samples, at.Average(q => q!.FrechetDistance), at.Average(q => q!.Precision),
                at.Average(q => q!.Recall), at[0]!.ClassifierAccuracy));
        }
        return rows;
    }

    /// <summary>"0.7" for the column names and tables.</summary>
    internal static string Name(double temperature) => temperature.ToString("0.###", CultureInfo.InvariantCulture);
}

/// <summary>Sample quality of the trained seeds (<see cref="ExperimentSpec.QualityTemperatures"/>).</summary>
public sealed partial class Experiment
{
    /// <summary>
    /// The seed's scores at every temperature of the spec: samples drawn with the seed, un-permuted where the run
    /// permutes pixels, against the real (un-permuted) held-out images. Null without temperatures or labels.
    /// </summary>
    IReadOnlyList<ExperimentQuality>? Quality(ImageFlow model, int seed, int permutationSeed, string label)
    {
        if (spec.QualityTemperatures.Count == 0) return null;
        var c = model.Config;
        var data = DatasetLoader.Load(spec.Data, c.Channels, c.Height, c.Width, seed);
        if (data.Train.Labels is null || data.HeldOut.Labels is null)
        {
            log.WriteLine($"{label}: the data has no labels, so no sample quality (its classifier trains on labels)");
            return null;
        }
        log.WriteLine($"{label}: sample quality at temperature {string.Join(", ", spec.QualityTemperatures.Select(ExperimentQuality.Name))}");
        var scores = SampleQuality.Score(model, data, spec.QualityTemperatures, QualitySamples(data), seed,
            spec.QualityClassifier, spec.QualityCacheFolder, permutation: PixelPermutation.Of(permutationSeed, c.Height, c.Width), progress: QualityLog(label));
        foreach (var s in scores)
            log.WriteLine(FormattableString.Invariant(
                $"{label}: temperature {s.Temperature}: Fréchet distance {s.FrechetDistance:0.000}, precision {s.Precision:0.000}, recall {s.Recall:0.000}"));
        return scores.Select(ExperimentQuality.From).ToList();
    }

    /// <summary>The data's own score (training images against the held-out images): the floor the runs' samples are read against.</summary>
    ExperimentQuality? DataQuality()
    {
        if (spec.QualityTemperatures.Count == 0 || spec.Runs.Count == 0) return null;
        var c = spec.Runs[0].Model;
        var seed = spec.Runs[0].Seeds[0];
        var data = DatasetLoader.Load(spec.Data, c.Channels, c.Height, c.Width, seed);
        if (data.Train.Labels is null || data.HeldOut.Labels is null) return null;
        return ExperimentQuality.From(SampleQuality.ScoreData(data, QualitySamples(data), spec.QualityClassifier, spec.QualityCacheFolder, QualityLog("data")));
    }

    int QualitySamples(DataSplits data) => spec.QualitySamples > 0 ? spec.QualitySamples : Math.Min(SampleQuality.DefaultSamples, data.HeldOut.Count);

    /// <summary>Progress of the classifier's training and the sampling as log lines, one per stage.</summary>
    IProgress<QualityProgress> QualityLog(string label)
    {
        string? last = null;
        return new SynchronousProgress<QualityProgress>(p =>
        {
            if (p.Stage == last) return;
            last = p.Stage;
            log.WriteLine($"{label}: {p.Stage}");
        });
    }

    sealed class SynchronousProgress<T>(Action<T> report) : IProgress<T>
    {
        public void Report(T value) => report(value);
    }
}
