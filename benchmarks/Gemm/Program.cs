// GEMM throughput of LibTorch as MixerFlow sets it up, one thread:
//   dotnet run --project benchmarks/Gemm -c Release -- [n | MxKxN] [repeats] [float32|bfloat16|float16] [onednn]
// Run once as is and once with MIXERFLOW_MKL_GENERIC=1 (MKL's own CPU check) to compare; the
// dtype argument measures the reduced-precision products (for example bfloat16 at a model's shape).
using MixerFlow.Core;
using MixerFlow.Core.Runtime;
using static TorchSharp.torch;

var shape = args.Length > 0 ? args[0].Split('x').Select(long.Parse).ToArray() : [1024L];
if (shape.Length == 1) shape = [shape[0], shape[0], shape[0]];
if (shape.Length != 3 || shape.Any(v => v < 1)) { Console.Error.WriteLine("shape: n or MxKxN, positive"); return 2; }
var (m, k, n) = (shape[0], shape[1], shape[2]);
int repeats = args.Length > 1 ? int.Parse(args[1]) : 15;
var dtype = (args.Length > 2 ? args[2] : "float32") switch
{
    "float32" => ScalarType.Float32,
    "bfloat16" => ScalarType.BFloat16,
    "float16" => ScalarType.Float16,
    var other => throw new ArgumentException($"dtype: float32, bfloat16 or float16, got '{other}'"),
};
// "onednn": oneDNN on (the runtime's default is off), for its bfloat16 kernels.
MixerFlowRuntime.Configure(new RuntimeOptions { HugePages = false, IntraOpThreads = 1, OneDnn = args.Length > 3 && args[3] == "onednn" });
Console.WriteLine($"MKL: {MixerFlowRuntime.MklOutcome}; oneDNN {(NativeBackend.MkldnnEnabled ? "on" : "off")}");
manual_seed(1);
var a = randn(m, k).to(dtype);
var b = randn(k, n).to(dtype);
var times = new List<double>();
for (int i = 0; i < repeats + 2; i++)
{
    var sw = System.Diagnostics.Stopwatch.StartNew();
    using var c = a.matmul(b);
    if (i >= 2) times.Add(sw.Elapsed.TotalSeconds);
}
times.Sort();
double flop = 2.0 * m * k * n;
Console.WriteLine($"[{m}x{k}]x[{k}x{n}] {dtype} matmul, 1 thread: median {flop / times[times.Count / 2] / 1e9:0.0} GFLOP/s " +
                  $"(min {flop / times[^1] / 1e9:0.0}, max {flop / times[0] / 1e9:0.0}; {repeats} runs)");
// A checksum of the product, to compare the two paths' results (and a reduced precision's error).
using var check = a.matmul(b).to(float32);
using var exact = a.to(float32).matmul(b.to(float32));
Console.WriteLine($"checksum {check.sum().item<float>():0.000} abs-sum {check.abs().sum().item<float>():0.0}; " +
                  $"largest difference from the float32 product of the same (rounded) inputs {(check - exact).abs().max().item<float>():G3}");
return 0;
