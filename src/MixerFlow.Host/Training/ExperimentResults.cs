using MixerFlow.Host.Data;
using System.Globalization;
using System.Text;
using MixerFlow.Host.Files;
using MixerFlow.Host.Imaging;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>One trained seed of a run, as evaluated (also written as experiment-result.json in its folder).</summary>
public sealed record ExperimentSeedResult(
    string Run, int Seed, long Parameters, double ImagesPerSecond, double TestBpd, double TestStdErr,
    double ProbeAccuracy, double WallSeconds, long Steps, double TrainingSeconds = 0,
    IReadOnlyList<ExperimentQuality>? Quality = null);

/// <summary>One row of results.csv: a run over its seeds.</summary>
/// <param name="Run">The run's name in the specification.</param>
/// <param name="Seeds">Seeds trained and evaluated.</param>
/// <param name="Parameters">The model's parameter count.</param>
/// <param name="ImagesPerSecond">Training images per second, mean over seeds.</param>
/// <param name="TestBpd">Held-out bits/dim, mean over seeds.</param>
/// <param name="TestStdErr">The evaluation's standard error of <paramref name="TestBpd"/> (over images, pooled over seeds).</param>
/// <param name="SeedSpread">Sample standard deviation of the seeds' test bits/dim; NaN with one seed.</param>
/// <param name="ProbeAccuracy">Mean linear-probe accuracy over seeds; NaN without labels or probe.</param>
/// <param name="WallSeconds">Training and evaluation time over all seeds (the time of this process's work; a run resumed counts its last part).</param>
/// <param name="Steps">Optimiser steps taken, mean over seeds (a run under a time budget takes as many as fit).</param>
/// <param name="TrainingSeconds">Seconds spent in training steps (the time budget's measure), mean over seeds.</param>
/// <param name="Quality">Sample quality at each of the spec's temperatures, mean over seeds (empty without it).</param>
public sealed record ExperimentRow(
    string Run, int Seeds, long Parameters, double ImagesPerSecond, double TestBpd, double TestStdErr,
    double SeedSpread, double ProbeAccuracy, double WallSeconds, double Steps = 0, double TrainingSeconds = 0,
    IReadOnlyList<ExperimentQuality>? Quality = null);

/// <summary>The experiment's results: the rows over seeds, results.csv, results.md, the held-out curves and the sample sheet.</summary>
public sealed partial class Experiment
{
    ExperimentRow Aggregate(string name, IReadOnlyList<ExperimentSeedResult> seeds)
    {
        int n = seeds.Count;
        double mean = seeds.Average(s => s.TestBpd);
        double spread = n > 1 ? Math.Sqrt(seeds.Sum(s => (s.TestBpd - mean) * (s.TestBpd - mean)) / (n - 1)) : double.NaN;
        double se = Math.Sqrt(seeds.Sum(s => s.TestStdErr * s.TestStdErr)) / n;
        double probe = seeds.All(s => double.IsNaN(s.ProbeAccuracy)) ? double.NaN : seeds.Where(s => !double.IsNaN(s.ProbeAccuracy)).Average(s => s.ProbeAccuracy);
        return new ExperimentRow(name, n, seeds[0].Parameters, seeds.Average(s => s.ImagesPerSecond), mean, se, spread, probe, seeds.Sum(s => s.WallSeconds),
            seeds.Average(s => (double)s.Steps), seeds.Average(s => s.TrainingSeconds),
            ExperimentQuality.Mean(seeds.Select(s => s.Quality), spec.QualityTemperatures));
    }

    /// <summary>Held-out bits/dim by step from the seeds' metrics.csv, averaged over the seeds at the steps they all have.</summary>
    IReadOnlyList<(long, double)> MeanHeldOutCurve(ExperimentRun run)
    {
        var perSeed = run.Seeds.Select(seed =>
        {
            var path = Path.Combine(FolderOf(run.Name, seed), "metrics.csv");
            var d = new Dictionary<long, double>();
            if (!File.Exists(path)) return d;
            foreach (var row in CsvLog.Read(path))
                if (row.TryGetValue("heldout_bpd", out var v) && v != "")
                    d[long.Parse(row["step"], CultureInfo.InvariantCulture)] = double.Parse(v, CultureInfo.InvariantCulture);
            return d;
        }).ToList();
        return perSeed[0].Keys.Where(k => perSeed.All(d => d.ContainsKey(k))).Order()
            .Select(k => (k, perSeed.Average(d => d[k]))).ToList();
    }

    void SaveSampleSheet()
    {
        var rows = new List<(string, Tensor)>();
        using var scope = NewDisposeScope();
        foreach (var run in spec.Runs)
        {
            var (model, _) = Checkpoint.Load(Path.Combine(FolderOf(run.Name, run.Seeds[0]), RunFolder.LastCheckpoint));
            model.eval();
            manual_seed(0);
            var permutation = PixelPermutation.Of(run.PixelPermutationSeed, model.Config.Height, model.Config.Width);
            using (no_grad())
            {
                var samples = model.Sample(spec.SamplesPerRun, 0.7);
                rows.Add((run.Name, permutation?.Unpermute(samples) ?? samples));
            }
        }
        SampleSheet.Save(rows, Path.Combine(output, SamplesPng));
    }

    /// <summary>The budget of the runs in words (each run's own where they differ).</summary>
    string BudgetLine()
    {
        var budgets = spec.Runs.Select(r => Budget(r)).Distinct().ToList();
        return budgets.Count == 1 ? budgets[0] : "each run's own budget (steps / seconds of training steps)";
    }

    static string F(double v, string format) => double.IsNaN(v) ? "" : v.ToString(format, CultureInfo.InvariantCulture);

    void WriteCsv(IReadOnlyList<ExperimentRow> rows)
    {
        var sb = new StringBuilder("run,seeds,parameters,images_per_s,test_bpd,test_bpd_stderr,seed_sd,probe_accuracy,wall_s,steps,train_s");
        foreach (var t in spec.QualityTemperatures.Select(ExperimentQuality.Name))
            sb.Append(CultureInfo.InvariantCulture, $",fd_t{t},precision_t{t},recall_t{t}");
        sb.Append('\n');
        foreach (var r in rows)
        {
            sb.Append(CultureInfo.InvariantCulture,
                $"{r.Run},{r.Seeds},{r.Parameters},{F(r.ImagesPerSecond, "0.0")},{F(r.TestBpd, "0.00000")},{F(r.TestStdErr, "0.00000")},{F(r.SeedSpread, "0.00000")},{F(r.ProbeAccuracy, "0.0000")},{F(r.WallSeconds, "0.0")},{F(r.Steps, "0.#")},{F(r.TrainingSeconds, "0.0")}");
            foreach (var t in spec.QualityTemperatures)
            {
                var q = r.Quality?.FirstOrDefault(x => x.Temperature == t);
                sb.Append(CultureInfo.InvariantCulture, $",{F(q?.FrechetDistance ?? double.NaN, "0.0000")},{F(q?.Precision ?? double.NaN, "0.0000")},{F(q?.Recall ?? double.NaN, "0.0000")}");
            }
            sb.Append('\n');
        }
        AtomicFile.WriteAllText(Path.Combine(output, ResultsCsv), sb.ToString());
    }

    void WriteMarkdown(IReadOnlyList<ExperimentRow> rows, ExperimentQuality? floor)
    {
        var sb = new StringBuilder();
        sb.Append(CultureInfo.InvariantCulture, $"# {spec.Name}\n\n");
        sb.Append(CultureInfo.InvariantCulture,
            $"{BudgetLine()} at batch {spec.BatchSize}, peak learning rate {spec.LearningRate}, data: {spec.Data ?? "bundled Fashion-MNIST test split"}. ");
        sb.Append("Test bits/dim on the held-out split (± the evaluation's standard error); with several seeds, their mean ± their standard deviation.\n\n");
        sb.Append("| run | parameters | images/s | test bits/dim | over seeds | linear probe | steps | training time | wall time |\n");
        sb.Append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        foreach (var r in rows)
            sb.Append(string.Create(CultureInfo.InvariantCulture,
                $"| {r.Run} | {r.Parameters:N0} | {r.ImagesPerSecond:0} | {r.TestBpd:0.0000} ± {r.TestStdErr:0.0000} | ") + string.Create(CultureInfo.InvariantCulture,
                $"{(r.Seeds > 1 ? $"{r.TestBpd:0.0000} ± {r.SeedSpread:0.0000} ({r.Seeds} seeds)" : "1 seed")} | " +
                $"{(double.IsNaN(r.ProbeAccuracy) ? "n/a" : r.ProbeAccuracy.ToString("P1", CultureInfo.InvariantCulture))} | {r.Steps:0.#} | {r.TrainingSeconds:0} s | {r.WallSeconds:0} s |\n"));
        AppendQuality(sb, rows, floor);
        sb.Append(CultureInfo.InvariantCulture, $"\n![held-out bits/dim]({CurvesPng})\n\n![samples at temperature 0.7]({SamplesPng})\n");
        AtomicFile.WriteAllText(Path.Combine(output, ResultsMarkdown), sb.ToString());
    }

    /// <summary>The sample-quality table: one line per run and temperature, and the data's own score as the floor.</summary>
    void AppendQuality(StringBuilder sb, IReadOnlyList<ExperimentRow> rows, ExperimentQuality? floor)
    {
        var scored = rows.Where(r => r.Quality is { Count: > 0 }).ToList();
        if (scored.Count == 0) return;
        var any = scored[0].Quality![0];
        sb.Append(CultureInfo.InvariantCulture,
            $"\nSample quality as `mixerflow score` measures it: {any.Samples:N0} samples per temperature against the held-out images, ");
        sb.Append(CultureInfo.InvariantCulture,
            $"in the features of a classifier trained on the training split ({any.ClassifierAccuracy:P1} held-out accuracy); with several seeds, the mean. Lower Fréchet distance is better.\n\n");
        sb.Append("| run | temperature | Fréchet distance | precision | recall |\n| --- | ---: | ---: | ---: | ---: |\n");
        foreach (var r in scored)
            foreach (var q in r.Quality!)
                sb.Append(CultureInfo.InvariantCulture, $"| {r.Run} | {ExperimentQuality.Name(q.Temperature)} | {q.FrechetDistance:0.000} | {q.Precision:0.000} | {q.Recall:0.000} |\n");
        if (floor is not null)
            sb.Append(CultureInfo.InvariantCulture,
                $"| *training images (the floor)* | | {floor.FrechetDistance:0.000} | {floor.Precision:0.000} | {floor.Recall:0.000} |\n");
    }
}
