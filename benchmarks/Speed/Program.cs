// Training-speed benchmark of the presets: one Markdown table.
//   dotnet run --project benchmarks/Speed -c Release -- [--presets a,b] [--repeats N] [--quick] [--threads 1] [--batch 64] [--no-mirror]
//     [--mirror-threads N] [--mirror-blas-threads N] [--out FILE]
// --out FILE also writes everything printed to FILE, under a header naming the command, commit,
// machine and date (ResultsFile.cs), e.g. --out docs/benchmarks/speed.md.
// Each preset's PyTorch mirror (benchmarks/mirror/mixerflow_mirror.py, Debian's python3-torch)
// takes the same training steps, evaluations and samplings, interleaved with ours, unless --no-mirror.
// A preset name with "+bfloat16" (cifar10+bfloat16) is that MixerFlow preset with its conditioners
// computing in bfloat16 (conditionerPrecision), its mirror under torch.autocast(bfloat16); with
// "+spline" (fashion-mnist+spline) its channel flows are rational-quadratic spline couplings.
// Method and the measured table: docs/benchmarks.md. Follows the codebase's Scalar rule (no
// temporary TorchSharp Scalars), although benchmarks/ is not scanned by the unit test.
using System.Diagnostics;
using System.Globalization;
using MixerFlow.Core;
using MixerFlow.Core.Runtime;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using MixerFlow.Speed;
using TorchSharp;
using static TorchSharp.torch;

// As the mixerflow tool does: the runtime's defaults, which restart once with glibc malloc on
// transparent huge pages (MIXERFLOW_HUGETLB=0 measures without them).
MixerFlowRuntime.Configure(new RuntimeOptions());
CultureInfo.DefaultThreadCurrentCulture = CultureInfo.InvariantCulture;
CultureInfo.CurrentCulture = CultureInfo.InvariantCulture;

string[] presets = { "fashion-mnist", "cifar10", "cifar10+bfloat16", "imagenet64", "glow-fashion-mnist", "glow-cifar10" };
int repeats = 5, threads = 1, batch = 64, sampleBatch = 16, mirrorThreads = 0, mirrorBlasThreads = 0;
bool convProbe = false, mirrors = true, oneDnn = false;
string? outFile = null;
double chunkSeconds = 2.0; // wall time of training steps per preset per round (at least one step)
for (int i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--presets": presets = args[++i].Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries); break;
        case "--repeats": repeats = int.Parse(args[++i]); break;
        case "--threads": threads = int.Parse(args[++i]); break;
        // The mirror's torch threads and its OpenBLAS threads (both default to --threads): its
        // fastest setting on the same cores may differ from ours.
        case "--mirror-threads": mirrorThreads = int.Parse(args[++i]); break;
        case "--mirror-blas-threads": mirrorBlasThreads = int.Parse(args[++i]); break;
        case "--batch": batch = int.Parse(args[++i]); break;
        case "--quick": repeats = 2; chunkSeconds = 1.0; break;
        case "--conv-probe": convProbe = true; break;
        case "--no-mirror": mirrors = false; break;
        case "--out": outFile = args[++i]; break;
        // LibTorch's oneDNN switch on (RuntimeOptions.OneDnn), to compare with the default off.
        case "--onednn": oneDnn = true; break;
        // Our training steps through autograd even where the model has hand-written gradients.
        case "--autograd": HandGradient.Enabled = false; break;
        case "--help" or "-h":
            Console.WriteLine("dotnet run --project benchmarks/Speed -c Release -- [--presets a,b] [--repeats N] [--quick] [--threads 1] [--batch 64] [--no-mirror] [--conv-probe] [--mirror-threads N] [--mirror-blas-threads N] [--autograd] [--onednn] [--out FILE]");
            Console.WriteLine("a preset name ending in +bfloat16 (cifar10+bfloat16): its conditioners compute in bfloat16");
            Console.WriteLine("a preset name ending in +spline (fashion-mnist+spline): its channel flows are spline couplings (channelFlow=spline)");
            return 0;
        default: Console.Error.WriteLine($"unknown argument '{args[i]}'"); return 2;
    }
}
if (mirrorThreads == 0) mirrorThreads = threads;
if (mirrorBlasThreads == 0) mirrorBlasThreads = mirrorThreads;
if (repeats < 1 || threads < 1 || batch < 1 || mirrorThreads < 1 || mirrorBlasThreads < 1)
{
    Console.Error.WriteLine("--repeats, --threads, --batch, --mirror-threads and --mirror-blas-threads must be >= 1");
    return 2;
}

MixerFlowRuntime.Configure(new RuntimeOptions { IntraOpThreads = threads, OneDnn = oneDnn });
manual_seed(1);

if (convProbe) { ConvProbe.Run(batch); return 0; }

using var results = outFile is null ? null : ResultsFile.Open(outFile, ResultsFile.Header(
    "dotnet run --project benchmarks/Speed -c Release -- " + string.Join(" ", args),
    ResultsFile.Commit(AppContext.BaseDirectory), ResultsFile.Machine(), DateTime.UtcNow));
var loadStart = Machine.LoadAverage();
var clock = Stopwatch.StartNew();
Console.WriteLine($"# MixerFlow.NET speed, {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
Console.WriteLine($"cores: {Environment.ProcessorCount}; load average at start {loadStart} (about {Machine.FreeCores(loadStart):0.0} cores free); " +
                  $"LibTorch threads: {get_num_threads()}; MKL: {MixerFlowRuntime.MklOutcome}; oneDNN convolutions {(NativeBackend.MkldnnEnabled ? "on" : "off")}; {HugePages.Description}");
Console.WriteLine($"batch {batch} (training, evaluation), {sampleBatch} (sampling); {repeats} rounds, presets interleaved in each round");
string? mirrorProblem = mirrors ? Mirror.Unavailable() : "off (--no-mirror)";
Console.WriteLine(mirrorProblem is null
    ? $"PyTorch mirror: {Mirror.Python} (Debian's python3-torch, {mirrorThreads} torch thread(s), OpenBLAS with {mirrorBlasThreads}), one process per preset, the same steps, evaluations and samplings interleaved with ours in every round"
    : $"PyTorch mirror: {mirrorProblem}");
Console.WriteLine();

// The cores' float32 FMA peak, measured once per round (FmaPeak.cs).
var fmaPeaks = new List<double>();
var benches = presets.Select(p => new Bench(Preset(p), batch, sampleBatch, mirrorProblem is null ? mirrorThreads : 0, mirrorBlasThreads)).ToList();

// A preset by name, with modifiers after "+": "cifar10+bfloat16" is the preset with its
// conditioners computing in bfloat16 (MixerFlowConfig.ConditionerPrecision), its mirror under
// torch.autocast(bfloat16); "fashion-mnist+spline" is the preset with rational-quadratic spline
// channel flows (channelFlow = spline, as `--set channelFlow=spline`), its mirror the same.
static ModelConfig Preset(string spec)
{
    var parts = spec.Split('+');
    var config = Presets.Get(parts[0]);
    foreach (var modifier in parts.Skip(1))
    {
        if (config is not MixerFlowConfig m)
            throw new ArgumentException($"{spec}: +{modifier} is a MixerFlow setting; {config.Name} is {config.Kind}");
        config = modifier.ToLowerInvariant() switch
        {
            "bfloat16" => m with { ConditionerPrecision = ConditionerPrecision.Bfloat16 },
            "spline" => m with { ChannelFlow = InnerFlow.Spline },
            _ => throw new ArgumentException($"{spec}: unknown modifier +{modifier} (bfloat16, spline)"),
        };
    }
    return parts.Length == 1 ? config : config with { Name = spec };
}
// Warm-up (ActNorm's data initialisation, allocator, MKL's first calls), FLOP count, chunk sizes.
foreach (var b in benches)
{
    b.Warm(chunkSeconds);
    Console.Error.WriteLine($"[{clock.Elapsed.TotalSeconds:0}s] {b.Config.Name}: warm, {b.StepsPerRound} step(s), {b.EvaluationsPerRound} evaluation(s), {b.SamplingsPerRound} sampling(s) per round, {b.ForwardGflop * 3:0.00} GFLOP per step" +
                            (b.MirrorNote is { } note ? $"; mirror: {note}" : ""));
}
for (int r = 0; r < repeats; r++)
{
    // A/B/A/B: every round visits every preset; odd rounds go in reverse order.
    var order = r % 2 == 0 ? benches : Enumerable.Reverse(benches).ToList();
    foreach (var b in order) b.Round(mirrorFirst: r % 2 == 1);
    fmaPeaks.Add(FmaPeak.Measure(threads));
    Console.Error.WriteLine($"[{clock.Elapsed.TotalSeconds:0}s] round {r + 1}/{repeats} done");
}
var loadEnd = Machine.LoadAverage();

Console.WriteLine("| preset | parameters | training step, ms: median (min-max, n) | PyTorch mirror step, ms: median (min-max, n) | mirror / ours, paired: median (min-max, pairs) | CPU ms per step (of it kernel) | " +
                  "evaluation ms per image | mirror evaluation ms per image | evaluation: mirror / ours, paired | sampling ms per image | mirror sampling ms per image | sampling: mirror / ours, paired | " +
                  "GFLOP per step | achieved GFLOP/s | GEMM ceiling GFLOP/s | fraction of ceiling | tensors created per step | GC per step (gen 0/1/2) |");
Console.WriteLine("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
foreach (var b in benches) Console.WriteLine(b.Row());
Console.WriteLine();
Console.WriteLine("Evaluations and samplings per round (each timed alone; the table gives the median of all), and the median of each round's first, ms per image, ours / the mirror's:");
foreach (var b in benches) Console.WriteLine(b.FirstCallsLine());
Console.WriteLine();
Console.WriteLine("Where a training step goes, ms, medians over all steps: forward (to the loss value), backward (with zeroing the gradients), update (clipping and Adam):");
foreach (var b in benches) Console.WriteLine(b.PhasesLine());
Console.WriteLine();
Console.WriteLine(FmaPeak.Instruction is null
    ? "How much faster than the mirror a step could be: no FMA instruction on this CPU, so no float32 peak was measured; at the GEMM ceiling:"
    : $"How much faster than the mirror a step could be: this machine's float32 FMA peak on {threads} thread(s), {FmaPeak.Instruction}, median " +
      $"{Machine.Median(fmaPeaks):0} GFLOP/s (highest {fmaPeaks.Max():0}, {fmaPeaks.Count} rounds); a step whose GEMMs all ran at the GEMM ceiling (or at the highest " +
      "peak) and did nothing else, against the mirror's median step:");
foreach (var b in benches) Console.WriteLine(b.BoundLine(fmaPeaks.Max()));
Console.WriteLine();
Console.WriteLine($"load average at end {loadEnd}; total {clock.Elapsed.TotalSeconds:0} s");
if (mirrorProblem is null)
{
    Console.WriteLine();
    Console.WriteLine("PyTorch mirror (benchmarks/mirror/mixerflow_mirror.py; parameter counts checked equal at its start; GEMM shapes of one forward pass compared here):");
    foreach (var b in benches) Console.WriteLine(b.MirrorLine());
}
Console.WriteLine();
Console.WriteLine("Dominant GEMM shapes (forward pass: share of its FLOPs; torch.matmul at that shape, median GFLOP/s; the same shape inside the model, timed once by module hooks during the counting pass):");
foreach (var b in benches) b.PrintShapes(Console.Out);
foreach (var b in benches) b.Dispose();
return 0;

/// <summary>
/// glow-cifar10's slowest layer alone: the 3x3 convolution from 392 hidden channels to 12 at
/// 16x16, by nn.Conv2d and by its own im2col (unfold) plus one batched matmul.
/// </summary>
static class ConvProbe
{
    public static void Run(int batch)
    {
        Console.WriteLine($"load average {Machine.LoadAverage()}; LibTorch threads {get_num_threads()}; oneDNN convolutions {(NativeBackend.MkldnnEnabled ? "on" : "off")}");
        manual_seed(1);
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        var x = nn.functional.relu(randn(batch, 392, 16, 16));
        foreach (int cout in new[] { 12, 392 })
        {
            var conv = nn.Conv2d(392, cout, 3, padding: 1);
            double gflop = 2.0 * batch * cout * 392 * 9 * 256 / 1e9;
            double convMs = Time(() => conv.forward(x));
            double convSys = KernelMs;
            double unfoldMs = Time(() => nn.functional.unfold(x, 3, padding: 1));
            double unfoldSys = KernelMs;
            var cols = nn.functional.unfold(x, 3, padding: 1); // [B, 392 * 9, 256]
            var w = conv.weight!.reshape(cout, -1);
            double matmulMs = Time(() => w.matmul(cols));
            double matmulSys = KernelMs;
            Console.WriteLine($"Conv2d(392 -> {cout}, 3x3) on [{batch}, 392, 16, 16], {gflop:0.00} GFLOP: nn.Conv2d {convMs:N0} ms ({gflop / convMs * 1000:0.0} GFLOP/s, kernel CPU {convSys:N0} ms); " +
                              $"unfold {unfoldMs:N0} ms (kernel {unfoldSys:N0}) + batched matmul {matmulMs:N0} ms ({gflop / matmulMs * 1000:0} GFLOP/s, kernel {matmulSys:N0})");
        }
    }

    static double Time(Func<Tensor> f, int n = 3)
    {
        f().Dispose();
        var times = new List<double>();
        var sys = Process.GetCurrentProcess().PrivilegedProcessorTime;
        for (int i = 0; i < n; i++)
        {
            var sw = Stopwatch.StartNew();
            f().Dispose();
            times.Add(sw.Elapsed.TotalMilliseconds);
        }
        KernelMs = (Process.GetCurrentProcess().PrivilegedProcessorTime - sys).TotalMilliseconds / n;
        return Machine.Median(times);
    }

    /// <summary>Kernel (system) CPU milliseconds per call of the last <see cref="Time"/>.</summary>
    static double KernelMs;
}

static class Machine
{
    public static string LoadAverage()
    {
        try { return string.Join(" ", File.ReadAllText("/proc/loadavg").Split(' ').Take(3)); }
        catch (IOException) { return "unknown"; }
    }

    public static double FreeCores(string load) =>
        double.TryParse(load.Split(' ')[0], NumberStyles.Float, CultureInfo.InvariantCulture, out var l)
            ? Math.Max(0, Environment.ProcessorCount - l) : double.NaN;

    public static double Median(List<double> xs)
    {
        if (xs.Count == 0) return double.NaN;
        var s = xs.OrderBy(x => x).ToList();
        return s.Count % 2 == 1 ? s[s.Count / 2] : (s[s.Count / 2 - 1] + s[s.Count / 2]) / 2;
    }
}

sealed class Bench : IDisposable
{
    public ModelConfig Config { get; }
    readonly ImageFlow model;
    readonly Adam adam;
    readonly TrainingStep step;
    readonly int batch, sampleBatch, mirrorThreads, mirrorBlasThreads;
    Mirror? mirror;
    /// <summary>Why this preset has no mirror timings (null when it has them).</summary>
    public string? MirrorNote { get; private set; }
    public int StepsPerRound { get; private set; } = 1;
    /// <summary>Evaluations and samplings per round: as many as fit in a quarter of the steps' chunk (1 to 50), each timed alone.</summary>
    public int EvaluationsPerRound { get; private set; } = 1;
    public int SamplingsPerRound { get; private set; } = 1;
    public double ForwardGflop { get; private set; }
    IReadOnlyList<Gemm> shapes = Array.Empty<Gemm>();
    IReadOnlyDictionary<(string, long, long, long), double> inModelSeconds = new Dictionary<(string, long, long, long), double>();
    double countedForwardSeconds;
    readonly List<Gemm> timedShapes = new();
    readonly List<List<double>> shapeRates = new();
    readonly List<double> stepMs = new(), cpuMs = new(), sysMs = new(), evalMs = new(), sampleMs = new(), ceiling = new();
    readonly List<StepPhases> ourPhases = new();
    int handSteps;
    /// <summary>The mirror's median over ours, one per interleaved pair of chunks (see Paired).</summary>
    readonly List<double> stepRatios = new(), evalRatios = new(), sampleRatios = new();
    long steps, created, gc0, gc1, gc2;
    const double Lr = 1e-4;

    /// <param name="mirrorThreads">Threads of the PyTorch mirror's torch; 0 for no mirror.</param>
    /// <param name="mirrorBlasThreads">Threads of the mirror's OpenBLAS.</param>
    public Bench(ModelConfig config, int batch, int sampleBatch, int mirrorThreads, int mirrorBlasThreads)
    {
        Config = config;
        this.batch = batch;
        this.sampleBatch = sampleBatch;
        this.mirrorThreads = mirrorThreads;
        this.mirrorBlasThreads = mirrorBlasThreads;
        if (mirrorThreads == 0) MirrorNote = "off";
        model = new ImageFlow(config);
        adam = new Adam(model.parameters(), Lr);
        step = new TrainingStep(model, adam, clipNorm: new TrainingSettings().ClipNorm);
    }

    Tensor Batch(int n) => randint(0, 256, new long[] { n, Config.Channels, Config.Height, Config.Width }).to_type(float32);

    public void Warm(double chunkSeconds)
    {
        model.train();
        double last = 0;
        for (int i = 0; i < 2; i++)
        {
            using var scope = NewDisposeScope();
            var x = Batch(batch);
            var sw = Stopwatch.StartNew();
            step.Take(x, Lr);
            last = sw.Elapsed.TotalSeconds;
        }
        StepsPerRound = Math.Clamp((int)Math.Round(chunkSeconds / last), 1, 20);
        using (var scope = NewDisposeScope())
        using (var counter = new FlopCounter(model))
        {
            var x = Batch(batch);
            var sw = Stopwatch.StartNew();
            shapes = FlopCounter.Merge(counter.Count(batch, () =>
            {
                using var _ = no_grad();
                model.BitsPerDim(x).mean().item<float>();
            }));
            countedForwardSeconds = sw.Elapsed.TotalSeconds;
            inModelSeconds = counter.SecondsByShape();
        }
        ForwardGflop = shapes.Sum(g => g.Flops) / 1e9;
        // The shapes that hold 95% of the forward FLOPs (at most 8) are timed as plain matmuls.
        double total = shapes.Sum(g => g.Flops), acc = 0;
        foreach (var g in shapes)
        {
            if (acc >= 0.95 * total || timedShapes.Count >= 8) break;
            timedShapes.Add(g);
            shapeRates.Add(new List<double>());
            acc += g.Flops;
        }
        Evaluate(); Sample(); // first calls
        // Later calls set the counts: a single call of a small preset (a few ms) measures the
        // caches and allocator left by the presets before it more than its own cost.
        EvaluationsPerRound = Math.Clamp((int)Math.Round(chunkSeconds / 4 / (Evaluate() * batch / 1e3)), 1, 50);
        SamplingsPerRound = Math.Clamp((int)Math.Round(chunkSeconds / 4 / (Sample() * sampleBatch / 1e3)), 1, 50);
        if (mirrorThreads > 0)
        {
            // Started after our warm-up; it takes its own two warm-up steps before answering.
            try { mirror = new Mirror(Config, model.ParameterCount, batch, mirrorThreads, mirrorBlasThreads, sampleBatch); }
            catch (InvalidOperationException e) { MirrorNote = e.Message; }
        }
    }

    /// <param name="mirrorFirst">The mirror's first chunk of this round before ours (alternated by the caller).</param>
    public void Round(bool mirrorFirst)
    {
        // Each chunk of measurements right before or right after the mirror's of the same kind and size.
        Paired(StepsPerRound, OurSteps, (m, k) => m.Steps(k), stepRatios, mirrorFirst);
        Paired(EvaluationsPerRound, k => Repeat(k, Evaluate, evalMs), (m, k) => m.Evaluations(k), evalRatios, mirrorFirst);
        Paired(SamplingsPerRound, k => Repeat(k, Sample, sampleMs), (m, k) => m.Samplings(k), sampleRatios, mirrorFirst);
        // The GEMM ceiling at this model's shapes, measured between its own steps.
        double seconds = 0;
        for (int i = 0; i < timedShapes.Count; i++)
        {
            double rate = TimeMatmul(timedShapes[i]);
            shapeRates[i].Add(rate);
            seconds += timedShapes[i].Flops / (rate * 1e9);
        }
        ceiling.Add(timedShapes.Sum(g => g.Flops) / seconds / 1e9);
    }

    /// <summary>Chunks of a round that are paired with the mirror's (at most; fewer when the round has fewer measurements).</summary>
    public const int PairsPerRound = 4;

    /// <summary>
    /// A round's <paramref name="count"/> measurements of one kind in up to <see cref="PairsPerRound"/>
    /// chunks, each right before or right after the mirror's chunk of the same size (the order
    /// alternating from chunk to chunk), so that the two sides of a pair see the same moment of the
    /// machine; the ratio of the pair's medians (the mirror's over ours) goes to <paramref name="ratios"/>.
    /// </summary>
    void Paired(int count, Func<int, List<double>> ours, Func<Mirror, int, IReadOnlyList<double>> theirs, List<double> ratios, bool mirrorFirst)
    {
        int chunks = Math.Min(count, PairsPerRound);
        for (int j = 0; j < chunks; j++)
        {
            int k = count / chunks + (j < count % chunks ? 1 : 0);
            bool theirsFirst = mirrorFirst ^ (j % 2 == 1);
            IReadOnlyList<double>? t = theirsFirst ? InMirror(m => theirs(m, k)) : null;
            var o = ours(k);
            if (!theirsFirst) t = InMirror(m => theirs(m, k));
            if (t is { Count: > 0 }) ratios.Add(Machine.Median(t.ToList()) / Machine.Median(o));
        }
    }

    /// <summary><paramref name="count"/> timed calls, kept in <paramref name="into"/> and returned.</summary>
    static List<double> Repeat(int count, Func<double> call, List<double> into)
    {
        var times = new List<double>(count);
        for (int i = 0; i < count; i++) times.Add(call());
        into.AddRange(times);
        return times;
    }

    /// <summary>Runs a request in the mirror and returns its times; a failure ends the mirror for this preset, with the reason kept (null then, and without a mirror).</summary>
    IReadOnlyList<double>? InMirror(Func<Mirror, IReadOnlyList<double>> request)
    {
        if (mirror is null) return null;
        try { return request(mirror); }
        catch (Exception e) when (e is InvalidOperationException or IOException or System.Text.Json.JsonException)
        {
            MirrorNote = $"stopped mid-run: {e.Message}";
            mirror.Dispose();
            mirror = null;
            return null;
        }
    }

    /// <summary>One line on the mirror under the table: its torch, its own FLOP count, or why it has no timings.</summary>
    public string MirrorLine()
    {
        if (mirror is null) return $"- `{Config.Name}`: no mirror timings ({MirrorNote})";
        // Linear and Conv2d GEMMs of one forward pass, ours (FlopCounter) against the mirror's hooks.
        var ours = shapes.Where(g => g.Kind is "linear" or "conv" or FlopCounter.ReducedLinear).Select(g => (g with { Kind = g.Kind == FlopCounter.ReducedLinear ? "linear" : g.Kind }).Shape).ToHashSet();
        var theirs = mirror.Gemms.ToHashSet();
        string same = ours.SetEquals(theirs)
            ? $"the same {ours.Count} Linear/Conv2d GEMM shapes and counts as ours"
            : $"GEMM shapes DIFFER: only ours {string.Join("; ", ours.Except(theirs))}; only the mirror's {string.Join("; ", theirs.Except(ours))}";
        return $"- `{Config.Name}`: torch {mirror.Torch}; {same}; forward {mirror.ForwardGflop:0.000} GFLOP in them (ours {ForwardGflop:0.000}" +
               (Config is GlowConfig ? ", which also counts the 1x1 convolutions' products)" : ")");
    }

    /// <summary><paramref name="count"/> training steps: wall and CPU time, tensors created, collections; returns their wall times.</summary>
    List<double> OurSteps(int count)
    {
        model.train();
        var times = new List<double>(count);
        for (int i = 0; i < count; i++)
        {
            using var scope = NewDisposeScope();
            var x = Batch(batch);
            var stats = DisposeScopeManager.Statistics;
            long created0 = stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount;
            int g0 = GC.CollectionCount(0), g1 = GC.CollectionCount(1), g2 = GC.CollectionCount(2);
            var before = Process.GetCurrentProcess();
            var (cpu, sys) = (before.TotalProcessorTime, before.PrivilegedProcessorTime);
            var sw = Stopwatch.StartNew();
            step.Take(x, Lr);
            times.Add(sw.Elapsed.TotalMilliseconds);
            ourPhases.Add(step.LastPhases);
            if (step.LastUsedHandGradients) handSteps++;
            var after = Process.GetCurrentProcess();
            cpuMs.Add((after.TotalProcessorTime - cpu).TotalMilliseconds);
            sysMs.Add((after.PrivilegedProcessorTime - sys).TotalMilliseconds);
            created += stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount - created0;
            gc0 += GC.CollectionCount(0) - g0; gc1 += GC.CollectionCount(1) - g1; gc2 += GC.CollectionCount(2) - g2;
            steps++;
        }
        stepMs.AddRange(times);
        return times;
    }

    /// <summary>Milliseconds per image of bits/dim on one batch, evaluation mode, no gradient.</summary>
    double Evaluate()
    {
        using var scope = NewDisposeScope();
        var x = Batch(batch);
        model.eval();
        try
        {
            using var _ = no_grad();
            var sw = Stopwatch.StartNew();
            model.BitsPerDim(x).mean().item<float>();
            return sw.Elapsed.TotalMilliseconds / batch;
        }
        finally { model.train(); }
    }

    /// <summary>Milliseconds per image of sampling a batch (pixels), evaluation mode, no gradient.</summary>
    double Sample()
    {
        using var scope = NewDisposeScope();
        model.eval();
        try
        {
            using var _ = no_grad();
            var sw = Stopwatch.StartNew();
            model.Sample(sampleBatch).sum().item<float>();
            return sw.Elapsed.TotalMilliseconds / sampleBatch;
        }
        finally { model.train(); }
    }

    /// <summary>A float32 matmul's rate at <paramref name="g"/>'s shape, or bfloat16's (with oneDNN,
    /// which the conditioners enable for their products) where the shape is one of theirs.</summary>
    static double TimeMatmul(Gemm g)
    {
        using var scope = NewDisposeScope();
        if (g.Kind != FlopCounter.ReducedLinear) return TimeMatmul(g, randn(g.M, g.K), randn(g.K, g.N));
        return NativeBackend.WithMkldnn(() => TimeMatmul(g, randn(g.M, g.K).to_type(bfloat16), randn(g.K, g.N).to_type(bfloat16)));
    }

    /// <summary>GFLOP/s of torch.matmul at one shape ([M, K] x [K, N]), repeated for about 0.2 s.</summary>
    static double TimeMatmul(Gemm g, Tensor a, Tensor b)
    {
        a.matmul(b); // first call
        double one = 2.0 * g.M * g.K * g.N;
        int n = 0;
        var sw = Stopwatch.StartNew();
        do
        {
            using var inner = NewDisposeScope();
            a.matmul(b);
            n++;
        } while (sw.Elapsed.TotalSeconds < 0.2);
        return one * n / sw.Elapsed.TotalSeconds / 1e9;
    }

    /// <summary>The calls per round and the median of each round's first evaluation and sampling, ours and the mirror's.</summary>
    public string FirstCallsLine()
    {
        static string First(List<double> times, int perRound) =>
            times.Count == 0 ? "n/a" : $"{Machine.Median(times.Where((_, i) => i % perRound == 0).ToList()):0.00}";
        string theirs(Func<Mirror, List<double>> f, int perRound) => mirror is null ? "n/a" : First(f(mirror), perRound);
        return $"- `{Config.Name}`: {EvaluationsPerRound} evaluation(s) per round, first {First(evalMs, EvaluationsPerRound)} / {theirs(m => m.EvaluationMs, EvaluationsPerRound)}; " +
               $"{SamplingsPerRound} sampling(s) per round, first {First(sampleMs, SamplingsPerRound)} / {theirs(m => m.SamplingMs, SamplingsPerRound)}";
    }

    public string Row()
    {
        double median = Machine.Median(stepMs);
        double gflop = 3 * ForwardGflop;
        double achieved = gflop / (median / 1000);
        double ceil = Machine.Median(ceiling);
        string mirrorCells = "n/a | n/a", evalCells = "n/a | n/a", sampleCells = "n/a | n/a";
        double ourEval = Machine.Median(evalMs), ourSample = Machine.Median(sampleMs);
        if (mirror is { StepMs.Count: > 0 } m)
        {
            double theirs = Machine.Median(m.StepMs);
            mirrorCells = $"{theirs:N0} ({m.StepMs.Min():N0}-{m.StepMs.Max():N0}, {m.StepMs.Count}) | {Ratios(stepRatios)}";
        }
        if (mirror is { EvaluationMs.Count: > 0 } e)
            evalCells = $"{Machine.Median(e.EvaluationMs):0.00} | {Ratios(evalRatios)}";
        if (mirror is { SamplingMs.Count: > 0 } s)
            sampleCells = $"{Machine.Median(s.SamplingMs):0.00} | {Ratios(sampleRatios)}";
        return $"| `{Config.Name}` | {model.ParameterCount:N0} | {median:N0} ({stepMs.Min():N0}-{stepMs.Max():N0}, {stepMs.Count}) | {mirrorCells} | {Machine.Median(cpuMs):N0} ({Machine.Median(sysMs):N0}) | " +
               $"{ourEval:0.00} | {evalCells} | {ourSample:0.00} | {sampleCells} | {gflop:0.00} | {achieved:0.0} | {ceil:0} | {achieved / ceil:0%} | " +
               $"{(double)created / steps:N0} | {(double)gc0 / steps:0.00}/{(double)gc1 / steps:0.00}/{(double)gc2 / steps:0.00} |";
    }

    /// <summary>
    /// The most the mirror's median step could be over ours: our step's GFLOP at the median GEMM
    /// ceiling, and at <paramref name="fmaPeak"/> (NaN where none was measured) when the ceiling's
    /// shapes are all float32, with nothing else in the step.
    /// </summary>
    public string BoundLine(double fmaPeak)
    {
        double gflop = 3 * ForwardGflop;
        double atCeiling = gflop / Machine.Median(ceiling) * 1000, atPeak = gflop / fmaPeak * 1000;
        // The float32 peak bounds float32 products only; the ceiling is timed in each shape's own precision.
        bool float32 = timedShapes.All(g => g.Kind != FlopCounter.ReducedLinear);
        double? theirs = mirror is { StepMs.Count: > 0 } m ? Machine.Median(m.StepMs) : null;
        string peakPart = !float32 ? "; bfloat16 GEMMs, which the float32 FMA peak does not bound"
            : double.IsNaN(atPeak) ? ""
            : $"; at the FMA peak: {atPeak:N0} ms" + (theirs is { } t ? $", at most {t / atPeak:0.00}" : "") +
              // No GEMM outruns the cores' peak: a ceiling above it means the peak's loop ran while other work held the cores.
              (atPeak > atCeiling ? " (the GEMM ceiling above the FMA peak: the peak was measured while other work held the cores)" : "");
        if (theirs is not { } mirrorMs)
            return $"- `{Config.Name}`: no mirror; {gflop:0.00} GFLOP per step take {atCeiling:N0} ms at the GEMM ceiling" + peakPart;
        double ours = Machine.Median(stepMs);
        return $"- `{Config.Name}`: mirror {mirrorMs:N0} ms, ours {ours:N0} ms (mirror / ours {mirrorMs / ours:0.00}); {gflop:0.00} GFLOP at the GEMM ceiling: " +
               $"{atCeiling:N0} ms, so mirror / ours at most {mirrorMs / atCeiling:0.00}" + peakPart;
    }

    /// <summary>The medians of the training step's phases, ours and the mirror's, and our evaluation's forward pass per batch.</summary>
    public string PhasesLine()
    {
        static double Ms(List<StepPhases> p, Func<StepPhases, TimeSpan> phase) => Machine.Median(p.Select(x => phase(x).TotalMilliseconds).ToList());
        static string Phases(List<StepPhases> p) => p.Count == 0 ? "n/a" :
            $"forward {Ms(p, x => x.Forward):N1}, backward {Ms(p, x => x.Backward):N1}, update {Ms(p, x => x.Update):N1}";
        string how = handSteps == ourPhases.Count ? "hand-written gradients" : handSteps == 0 ? "autograd" : $"hand-written gradients in {handSteps} of {ourPhases.Count} steps";
        return $"- `{Config.Name}`: ours ({how}) {Phases(ourPhases)}; the mirror's {(mirror is null ? "n/a" : Phases(mirror.StepPhases))}; " +
               $"the evaluation's forward pass (no gradient, batch {batch}) ours {Machine.Median(evalMs) * batch:N1}, the mirror's " +
               (mirror is { EvaluationMs.Count: > 0 } m ? $"{Machine.Median(m.EvaluationMs) * batch:N1}" : "n/a");
    }

    /// <summary>A ratio cell: the median of the paired ratios (min-max, pairs).</summary>
    static string Ratios(List<double> ratios) =>
        ratios.Count == 0 ? "n/a" : $"{Machine.Median(ratios):0.00} ({ratios.Min():0.00}-{ratios.Max():0.00}, {ratios.Count})";

    public void PrintShapes(TextWriter output)
    {
        double total = shapes.Sum(g => g.Flops);
        double inModules = inModelSeconds.Values.Sum();
        output.WriteLine($"- `{Config.Name}`: {shapes.Count} shapes, {ForwardGflop:0.000} GFLOP forward; one forward pass (no gradient, " +
                         $"batch {batch}) took {countedForwardSeconds * 1000:N0} ms, {inModules * 1000:N0} ms of it inside Linear/Conv2d modules; " +
                         string.Join("; ", timedShapes.Select((g, i) =>
                         {
                             string inModel = inModelSeconds.TryGetValue((g.Kind, g.M, g.K, g.N), out var s) && s > 0
                                 ? $", {g.Flops / s / 1e9:0} inside the model" : "";
                             return $"{g.Shape} {g.Flops / total:0%} of FLOPs, matmul {Machine.Median(shapeRates[i]):0} GFLOP/s{inModel}";
                         })));
    }

    public void Dispose()
    {
        mirror?.Dispose();
        ((IDisposable)adam).Dispose();
        model.Dispose();
    }
}
