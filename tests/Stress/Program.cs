// The Scalar-race stress run: training steps of MixerFlow (affine and spline inner flows) and Glow
// while another thread allocates and forces collections, with no no-GC region. Run it with a tiny
// gen-0 budget so that collections also come from the training thread's own allocations:
//
//   DOTNET_GCgen0size=0x10000 dotnet run --project tests/Stress -c Release -- --steps 3000
//
// `--torchsharp-adam` trains with torch.optim.Adam instead of MixerFlow.Core.Adam: the control
// that shows the run can catch the race (TorchSharp's Adam hands native code temporary Scalars).
// Exit 0: every step ran; exit 1: an error, printed with the family and step.
using System.Diagnostics;
using MixerFlow.Core;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

int steps = 1000;
bool torchSharpAdam = false;
var families = new List<string>();
for (int i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--steps": steps = int.Parse(args[++i]); break;
        case "--torchsharp-adam": torchSharpAdam = true; break;
        case "--family": families.Add(args[++i]); break;
        default:
            Console.Error.WriteLine($"unknown argument '{args[i]}'; use --steps N, --family mixerflow-affine|mixerflow-spline|glow, --torchsharp-adam");
            return 2;
    }
}
if (families.Count == 0) families = ["mixerflow-affine", "mixerflow-spline", "glow"];

ModelConfig Config(string family) => family switch
{
    "mixerflow-affine" => Presets.MixerFlow("tiny") with { Name = family },
    "mixerflow-spline" => Presets.MixerFlow("tiny") with { Name = family, ChannelFlow = InnerFlow.Spline, PatchFlow = InnerFlow.Spline },
    "glow" => Presets.Glow("glow-tiny") with { Name = family },
    _ => throw new ArgumentException($"unknown family '{family}'"),
};

// The tool's runtime (no huge-pages restart: the stress run is started by tests too), one thread.
MixerFlow.Core.Runtime.MixerFlowRuntime.Configure(new MixerFlow.Core.Runtime.RuntimeOptions { HugePages = false, IntraOpThreads = 1 });
Console.WriteLine($"gen-0 budget: {Environment.GetEnvironmentVariable("DOTNET_GCgen0size") ?? "(default)"}; " +
                  $"optimiser: {(torchSharpAdam ? "torch.optim.Adam" : "MixerFlow.Core.Adam")}; {steps} steps per family");

// The other thread: allocates garbage and forces full collections (and finalizers) nonstop.
using var stop = new CancellationTokenSource();
long collections = 0;
var hammer = new Thread(() =>
{
    var rng = new Random(1);
    var keep = new List<byte[]>();
    while (!stop.IsCancellationRequested)
    {
        keep.Add(new byte[rng.Next(64, 64 * 1024)]);
        if (keep.Count > 64) keep.Clear();
        if (rng.Next(8) == 0)
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
            Interlocked.Increment(ref collections);
        }
    }
}) { IsBackground = true, Name = "gc-hammer" };
hammer.Start();

int exit = 0;
foreach (var family in families)
{
    var clock = Stopwatch.StartNew();
    long gcBefore = GC.CollectionCount(0);
    int step = 0;
    try
    {
        manual_seed(7);
        var cfg = Config(family);
        using var model = new ImageFlow(cfg);
        model.train();
        using var adam = new Adam(model.parameters(), 1e-3);
        var trainingStep = new TrainingStep(model, adam, clipNorm: 50.0);
        var torchAdam = torchSharpAdam ? optim.Adam(model.parameters(), 1e-3) : null;
        double first = double.NaN, last = double.NaN;
        for (step = 0; step < steps; step++)
        {
            using var scope = NewDisposeScope();
            // Random images (pixels 0..255) with some structure so the loss falls.
            var x = Ops.AddScalar(rand(16, cfg.Channels, cfg.Height, cfg.Width).mul(Ops.Scalar(64)).floor(), 96);
            if (torchAdam is null)
            {
                var outcome = trainingStep.Take(x, 1e-3);
                last = outcome.BitsPerDim;
            }
            else
            {
                var loss = model.BitsPerDim(x).mean();
                torchAdam.zero_grad();
                loss.backward();
                torchAdam.step();
                last = loss.item<float>();
            }
            if (step == 0) first = last;
        }
        Console.WriteLine($"{family}: {steps} steps without error in {clock.Elapsed.TotalSeconds:0.0} s; " +
                          $"bits/dim {first:0.000} -> {last:0.000}; {GC.CollectionCount(0) - gcBefore} gen-0 collections, " +
                          $"{Interlocked.Read(ref collections)} forced so far");
    }
    catch (Exception e)
    {
        Console.WriteLine($"{family}: FAILED at step {step} after {clock.Elapsed.TotalSeconds:0.0} s: {e.GetType().Name}: {e.Message.Split('\n')[0]}");
        exit = 1;
    }
}
stop.Cancel();
return exit;
