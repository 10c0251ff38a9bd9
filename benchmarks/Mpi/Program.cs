// Data-parallel scaling on MPI: training images/s of presets on 1, 2, ... ranks, the allreduce time
// per step and the scaling efficiency, as one Markdown table.
//   dotnet run --project benchmarks/Mpi -c Release -- [--presets fashion-mnist,cifar10] [--ranks 1,2] [--batch 64] [--threads 1] [--seconds 20]
// The driver (this program started without mpiexec) starts `mpiexec -n N` of itself with --worker
// for each preset and rank count, interleaved over --repeats rounds, and reads one result line per
// job from rank 0. Each rank takes batch B (weak scaling: the global batch is N x B) of random
// pixels; TrainingStep averages the loss and the flat gradient buffer with MPI_Allreduce.
// Efficiency = images/s on N ranks / (N x images/s on 1 rank). Method and results: docs/distributed.md.
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using MixerFlow.Core;
using MixerFlow.Core.Runtime;
using MixerFlow.Host.Distributed;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

CultureInfo.DefaultThreadCurrentCulture = CultureInfo.InvariantCulture;
CultureInfo.CurrentCulture = CultureInfo.InvariantCulture;

string[] presets = ["fashion-mnist", "cifar10"];
int[] rankCounts = [1, 2];
int batch = 64, threads = 1, repeats = 3;
double seconds = 20;
bool worker = false;
string preset = "fashion-mnist";
for (int i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--presets": presets = args[++i].Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries); break;
        case "--ranks": rankCounts = args[++i].Split(',').Select(int.Parse).ToArray(); break;
        case "--batch": batch = int.Parse(args[++i]); break;
        case "--threads": threads = int.Parse(args[++i]); break;
        case "--repeats": repeats = int.Parse(args[++i]); break;
        case "--seconds": seconds = double.Parse(args[++i]); break;
        case "--worker": worker = true; preset = args[++i]; break;
        case "--help" or "-h":
            Console.WriteLine("dotnet run --project benchmarks/Mpi -c Release -- [--presets fashion-mnist,cifar10] [--ranks 1,2] [--batch 64] [--threads 1] [--repeats 3] [--seconds 20]");
            return 0;
        default: Console.Error.WriteLine($"unknown argument '{args[i]}'"); return 2;
    }
}
if (batch < 1 || threads < 1 || repeats < 1 || seconds <= 0 || rankCounts.Any(n => n < 1))
{
    Console.Error.WriteLine("--batch, --threads, --repeats, --seconds and every --ranks value must be positive");
    return 2;
}
return worker ? Worker.Run(preset, batch, threads, seconds) : Driver.Run(presets, rankCounts, batch, threads, repeats, seconds);

/// <summary>One job's result, printed by rank 0 as one JSON line.</summary>
record Result(string Preset, int Ranks, int Steps, double StepMs, double AllreduceMs, double AllreduceAloneMs, double ImagesPerSecond, long Parameters);

static class Worker
{
    public static int Run(string preset, int batch, int threads, double seconds)
    {
        MixerFlowRuntime.Configure(new RuntimeOptions { IntraOpThreads = threads });
        var ranks = Communicator.FromEnvironment();
        manual_seed(1);
        var model = new ImageFlow(Presets.Get(preset));
        model.MoveTo(CPU, float32);
        using var adam = new Adam(model.parameters(), 1e-4);
        var step = new TrainingStep(model, adam, 50.0, ranks);
        var c = model.Config;
        // Each rank its own random pixels (what it reads of the data does not change the work).
        var generator = new Generator((ulong)(1000 + ranks.Rank));
        Tensor Batch() => randint(0, 256, [batch, c.Channels, c.Height, c.Width], generator: generator).to(float32);
        model.train();
        for (int i = 0; i < 2; i++) using (NewDisposeScope()) step.Take(Batch(), 1e-4);
        // As many steps as fit in the time on rank 0's first timed step, agreed by every rank.
        var probe = Stopwatch.StartNew();
        using (NewDisposeScope()) step.Take(Batch(), 1e-4);
        double[] agreed = [ranks.IsRoot ? Math.Max(2, Math.Ceiling(seconds / Math.Max(1e-3, probe.Elapsed.TotalSeconds))) : 0];
        ranks.AllReduceSum(agreed);
        int steps = (int)agreed[0];
        ranks.Barrier();
        var before = step.CommunicationTime;
        var clock = Stopwatch.StartNew();
        for (int i = 0; i < steps; i++) using (NewDisposeScope()) step.Take(Batch(), 1e-4);
        ranks.Barrier();
        double wall = clock.Elapsed.TotalSeconds;
        double[] allreduce = [(step.CommunicationTime - before).TotalSeconds];
        ranks.AllReduceSum(allreduce);
        // The allreduce alone: the gradient buffer's, with every rank ready (no waiting for a slower one).
        double alone = 0;
        if (ranks.Size > 1)
        {
            const int calls = 20;
            var gradients = adam.GradientBuffer();
            double total = 0;
            for (int k = 0; k < calls; k++)
            {
                ranks.Barrier();
                var t = Stopwatch.StartNew();
                ranks.AllReduceSum(gradients);
                total += t.Elapsed.TotalSeconds;
            }
            double[] sum = [total];
            ranks.AllReduceSum(sum);
            alone = 1000 * sum[0] / ranks.Size / calls;
        }
        if (ranks.IsRoot)
            Console.WriteLine(JsonSerializer.Serialize(new Result(preset, ranks.Size, steps, 1000 * wall / steps,
                1000 * allreduce[0] / ranks.Size / steps, alone, (double)steps * batch * ranks.Size / wall, model.ParameterCount)));
        Communicator.Shutdown();
        return 0;
    }
}

static class Driver
{
    static string Mpiexec => new[] { "/usr/bin/mpiexec.mpich", "/usr/bin/mpiexec.hydra", "/usr/bin/mpiexec" }.FirstOrDefault(File.Exists)
        ?? throw new InvalidOperationException("no MPICH mpiexec: apt-get install mpich");

    public static int Run(string[] presets, int[] rankCounts, int batch, int threads, int repeats, double seconds)
    {
        var self = Environment.ProcessPath!.EndsWith("dotnet") ? typeof(Driver).Assembly.Location : null;
        string load = File.Exists("/proc/loadavg") ? string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3)) : "n/a";
        Console.WriteLine($"# MixerFlow.NET data-parallel scaling (MPI), {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        Console.WriteLine($"cores: {Environment.ProcessorCount}; load average at start {load}; {Mpiexec}; batch {batch} per rank (global batch = ranks x {batch}); " +
                          $"{threads} LibTorch thread(s) per rank; about {seconds:0} s of steps per job; {repeats} rounds, jobs interleaved");
        var results = new Dictionary<(string, int), List<Result>>();
        var independent = new Dictionary<(string, int), List<double>>();
        for (int round = 0; round < repeats; round++)
        {
            var jobs = presets.SelectMany(p => rankCounts.Select(n => (p, n))).ToList();
            if (round % 2 == 1) jobs.Reverse();
            foreach (var (p, n) in jobs)
            {
                string[] workerArgs = ["--worker", p, "--batch", batch.ToString(), "--threads", threads.ToString(), "--seconds", seconds.ToString()];
                var r = Start(p, n, self, workerArgs, mpi: true);
                if (r is null) return 1;
                Console.Error.WriteLine($"[round {round + 1}] {p} on {n} rank(s): {r.ImagesPerSecond:0.0} images/s, {r.StepMs:0.0} ms per step, " +
                                        $"allreduce {r.AllreduceMs:0.00} ms in the step, {r.AllreduceAloneMs:0.00} ms alone");
                (results.TryGetValue((p, n), out var list) ? list : results[(p, n)] = []).Add(r);
                if (n > 1)
                {
                    // The machine's own limit: n independent single processes at once, no MPI.
                    var alone = Enumerable.Range(0, n).Select(_ => Task.Run(() => Start(p, 1, self, workerArgs, mpi: false))).ToArray();
                    Task.WaitAll(alone);
                    if (alone.Any(t => t.Result is null)) return 1;
                    double sum = alone.Sum(t => t.Result!.ImagesPerSecond);
                    Console.Error.WriteLine($"[round {round + 1}] {p}: {n} independent processes: {sum:0.0} images/s together");
                    (independent.TryGetValue((p, n), out var ilist) ? ilist : independent[(p, n)] = []).Add(sum);
                }
            }
        }
        Console.WriteLine();
        Console.WriteLine("| preset | parameters | ranks | global batch | images/s: median (min-max) | step ms: median | allreduce ms per step, in the step: median (share) | allreduce ms alone | scaling efficiency | N independent processes, images/s | MPI / independent |");
        Console.WriteLine("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        foreach (var p in presets)
        {
            double one = rankCounts.Contains(1) ? Median(results[(p, 1)].Select(r => r.ImagesPerSecond)) : double.NaN;
            foreach (var n in rankCounts)
            {
                var rs = results[(p, n)];
                double ips = Median(rs.Select(r => r.ImagesPerSecond)), ms = Median(rs.Select(r => r.StepMs)), ar = Median(rs.Select(r => r.AllreduceMs));
                string eff = double.IsNaN(one) ? "n/a" : $"{100 * ips / (n * one):0}%";
                double alone = Median(rs.Select(r => r.AllreduceAloneMs));
                string ind = independent.TryGetValue((p, n), out var il) ? $"{Median(il):0.0}" : "-";
                string ratio = independent.TryGetValue((p, n), out var il2) ? $"{100 * ips / Median(il2):0}%" : "-";
                Console.WriteLine($"| `{p}` | {rs[0].Parameters:N0} | {n} | {n * batch} | {ips:0.0} ({rs.Min(r => r.ImagesPerSecond):0.0}-{rs.Max(r => r.ImagesPerSecond):0.0}) | " +
                                  $"{ms:0.0} | {ar:0.00} ({100 * ar / ms:0.0}%) | {(n > 1 ? $"{alone:0.00}" : "-")} | {eff} | {ind} | {ratio} |");
            }
        }
        string loadEnd = File.Exists("/proc/loadavg") ? string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3)) : "n/a";
        Console.WriteLine();
        Console.WriteLine($"load average at end {loadEnd}");
        return 0;
    }

    /// <summary>One worker job (under mpiexec -n <paramref name="n"/>, or a plain process); null after reporting a failure.</summary>
    static Result? Start(string preset, int n, string? self, string[] workerArgs, bool mpi)
    {
        var psi = new ProcessStartInfo(mpi ? Mpiexec : self is not null ? "dotnet" : Environment.ProcessPath!) { RedirectStandardOutput = true, RedirectStandardError = true };
        if (mpi) { psi.ArgumentList.Add("-n"); psi.ArgumentList.Add(n.ToString()); }
        if (self is not null) { if (mpi) psi.ArgumentList.Add("dotnet"); psi.ArgumentList.Add(self); }
        else if (mpi) psi.ArgumentList.Add(Environment.ProcessPath!);
        foreach (var a in workerArgs) psi.ArgumentList.Add(a);
        if (!mpi) psi.Environment["MIXERFLOW_MPI"] = "0";
        using var job = Process.Start(psi)!;
        var err = job.StandardError.ReadToEndAsync();
        var text = job.StandardOutput.ReadToEnd();
        job.WaitForExit();
        var line = text.Split('\n').FirstOrDefault(l => l.StartsWith('{'));
        if (job.ExitCode == 0 && line is not null) return JsonSerializer.Deserialize<Result>(line)!;
        Console.Error.WriteLine($"{preset} on {n} {(mpi ? "rank(s)" : "independent process")} failed (exit {job.ExitCode}):\n{text}{err.Result}");
        return null;
    }

    static double Median(IEnumerable<double> values)
    {
        var v = values.OrderBy(x => x).ToArray();
        return v.Length % 2 == 1 ? v[v.Length / 2] : (v[v.Length / 2 - 1] + v[v.Length / 2]) / 2;
    }
}
