// float32 GEMM throughput of LibTorch as MixerFlow sets it up, one thread:
//   dotnet run --project benchmarks/Gemm -c Release -- [n] [repeats]
// Run once as is and once with MIXERFLOW_MKL_GENERIC=1 (MKL's own CPU check) to compare.
using MixerFlow.Core;
using static TorchSharp.torch;

int n = args.Length > 0 ? int.Parse(args[0]) : 1024;
int repeats = args.Length > 1 ? int.Parse(args[1]) : 15;
NativeRuntime.EnsureLoaded();
NativeBackend.Ensure();
set_num_threads(1);
Console.WriteLine($"MKL: {NativeBackend.MklOutcome}");
manual_seed(1);
var a = randn(n, n);
var b = randn(n, n);
var times = new List<double>();
for (int i = 0; i < repeats + 2; i++)
{
    var sw = System.Diagnostics.Stopwatch.StartNew();
    using var c = a.matmul(b);
    if (i >= 2) times.Add(sw.Elapsed.TotalSeconds);
}
times.Sort();
double flop = 2.0 * n * n * n;
Console.WriteLine($"{n}^3 float32 matmul, 1 thread: median {flop / times[times.Count / 2] / 1e9:0.0} GFLOP/s " +
                  $"(min {flop / times[^1] / 1e9:0.0}, max {flop / times[0] / 1e9:0.0}; {repeats} runs)");
// A checksum of the product, to compare the two paths' results.
using var check = a.matmul(b);
Console.WriteLine($"checksum {check.sum().item<float>():0.000} abs-sum {check.abs().sum().item<float>():0.0}");
