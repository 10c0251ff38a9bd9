// Builds every kind of MixerFlow.Core bijector, a flow, and runs them forward and backward
// without configuring the runtime, and checks that the process is as it was before: LibTorch's
// oneDNN and NNPACK switches, the whole C environment (OMP_WAIT_POLICY, GOMP_SPINCOUNT,
// GLIBC_TUNABLES, ...), and MKL's cached CPU-dispatch answer (read only). Exit code 0 when
// nothing changed, 1 otherwise (each change on its own line).
using System.Runtime.InteropServices;
using MixerFlow.Core;
using MixerFlow.Core.Runtime;
using TorchSharp;
using static TorchSharp.torch;

var problems = new List<string>();
// Describe reads only: it must not load LibTorch either.
var early = MixerFlowRuntime.Describe();
if (ProcessState.LibTorchMapped()) problems.Add("MixerFlowRuntime.Describe() loaded LibTorch");
if (early["oneDNN"].Value != "LibTorch not loaded yet") problems.Add($"Describe before LibTorch: oneDNN {early["oneDNN"].Value}");
var envBefore = ProcessState.CEnvironment();
InitializeDeviceType(DeviceType.CPU); // TorchSharp's own loading, not MixerFlow's
var before = ProcessState.Switches();

manual_seed(1);
using (var scope = NewDisposeScope())
{
    var built = Bijectors.All();
    foreach (var (name, bijector, shape) in built)
    {
        var x = name.StartsWith("dequantise") ? randint(0, 256, shape).to_type(float32) : name.StartsWith("logit") ? rand(shape) : randn(shape);
        var (y, logDet) = bijector.Forward(x);
        if (y.shape.SequenceEqual(Array.Empty<long>()) || logDet.shape[0] != shape[0]) problems.Add($"{name}: unexpected shapes");
    }
    var flow = new Flow(new Chain(new Bijector[] { new ActNorm(new long[] { 6 }), new AffineCoupling(new long[] { 6 }, Partition.Halves(6), Conditioners.Mlp(8, 1)) }));
    flow.LogProb(randn(5, 6)).sum().backward();
    Console.WriteLine($"built and ran {built.Count} bijectors and a flow");
}

var after = ProcessState.Switches();
var envAfter = ProcessState.CEnvironment();
if (before.OneDnn != after.OneDnn) problems.Add($"oneDNN switch {before.OneDnn} -> {after.OneDnn}");
if (before.Nnpack != after.Nnpack) problems.Add($"NNPACK switch {before.Nnpack} -> {after.Nnpack}");
// MKL fills its cache with its own answer at its first GEMM: from -1 only to that answer.
int own = ProcessState.IntelCpu() ? 1 : 0;
if (after.MklCached != before.MklCached && !(before.MklCached == -1 && after.MklCached == own))
    problems.Add($"MKL's cached CPU answer {before.MklCached} -> {after.MklCached} (its own answer on this CPU: {own})");
foreach (var key in envBefore.Keys.Union(envAfter.Keys).Order())
{
    envBefore.TryGetValue(key, out var a);
    envAfter.TryGetValue(key, out var b);
    if (a != b) problems.Add($"environment {key}: '{a ?? "(unset)"}' -> '{b ?? "(unset)"}'");
}
Console.WriteLine($"oneDNN {after.OneDnn}, NNPACK {after.Nnpack}, MKL cached answer {before.MklCached} -> {after.MklCached}, " +
                  $"OMP_WAIT_POLICY '{envAfter.GetValueOrDefault("OMP_WAIT_POLICY")}', GOMP_SPINCOUNT '{envAfter.GetValueOrDefault("GOMP_SPINCOUNT")}', " +
                  $"GLIBC_TUNABLES '{envAfter.GetValueOrDefault("GLIBC_TUNABLES")}', {envAfter.Count} variables");
foreach (var p in problems) Console.WriteLine("changed: " + p);
Console.WriteLine(problems.Count == 0 ? "process left alone" : $"{problems.Count} changes");
return problems.Count == 0 ? 0 : 1;

/// <summary>One of each kind of bijector, with an input shape (batch first).</summary>
static class Bijectors
{
    public static List<(string Name, Bijector Bijector, long[] Shape)> All()
    {
        var mlp = Conditioners.Mlp(8, 1);
        var image = new long[] { 4, 6, 6 };
        Bijector Vector() => new AffineCoupling(new long[] { 3 }, Partition.Halves(3), mlp);
        return new()
        {
            ("affine-coupling", new AffineCoupling(new long[] { 6 }, Partition.Halves(6), mlp), new long[] { 5, 6 }),
            ("additive-coupling", new AdditiveCoupling(new long[] { 6 }, Partition.Alternating(6), mlp), new long[] { 5, 6 }),
            ("spline-coupling", new SplineCoupling(new long[] { 6 }, Partition.Halves(6), mlp), new long[] { 5, 6 }),
            ("glow-coupling", new AffineCoupling(image, Partition.Halves(4), Conditioners.Conv(20), ScaleBound.Sigmoid), new long[] { 16, 4, 6, 6 }),
            ("glow-prior", new AffineCoupling(image, Partition.Halves(4), Conditioners.ZeroConv()), new long[] { 16, 4, 6, 6 }),
            ("maf", new MaskedAutoregressive(6, 12, 1), new long[] { 5, 6 }),
            ("actnorm", new ActNorm(image), new long[] { 5, 4, 6, 6 }),
            ("batchnorm", new BatchNormFlow(new long[] { 6 }), new long[] { 5, 6 }),
            ("lu-linear", LULinear.Vector(6), new long[] { 5, 6 }),
            ("conv1x1", LULinear.Conv1x1(4, 6, 6), new long[] { 5, 4, 6, 6 }),
            ("squeeze", new Squeeze(image), new long[] { 5, 4, 6, 6 }),
            ("patchify", new Patchify(image, PatchStrategy.Square, 2), new long[] { 5, 4, 6, 6 }),
            ("shift", new Shift(image, 1, -1), new long[] { 5, 4, 6, 6 }),
            ("rowwise", new RowWise(2, Vector()), new long[] { 5, 2, 3 }),
            ("columnwise", new ColumnWise(2, Vector()), new long[] { 5, 3, 2 }),
            ("logit", new Logit(new long[] { 6 }), new long[] { 5, 6 }),
            ("dequantise", new Dequantize(new long[] { 6 }), new long[] { 5, 6 }),
            ("chain", new Chain(new Bijector[] { new ActNorm(new long[] { 6 }), new MaskedAutoregressive(6, 12, 1) }), new long[] { 5, 6 }),
            ("inverted", new Inverted(new MaskedAutoregressive(6, 12, 1)), new long[] { 5, 6 }),
        };
    }
}

/// <summary>The process-wide state that MixerFlow.Core must leave alone, read without changing it.</summary>
static class ProcessState
{
    [DllImport("libtorch_cpu", EntryPoint = "_ZN2at13globalContextEv")]
    static extern IntPtr GlobalContext();
    [DllImport("libtorch_cpu", EntryPoint = "_ZNK2at7Context17userEnabledMkldnnEv")]
    [return: MarshalAs(UnmanagedType.U1)]
    static extern bool UserEnabledMkldnn(IntPtr context);
    [DllImport("libtorch_cpu", EntryPoint = "_ZNK2at7Context17userEnabledNNPACKEv")]
    [return: MarshalAs(UnmanagedType.U1)]
    static extern bool UserEnabledNnpack(IntPtr context);

    public static (bool OneDnn, bool Nnpack, int? MklCached) Switches() =>
        (UserEnabledMkldnn(GlobalContext()), UserEnabledNnpack(GlobalContext()), MklCached());

    /// <summary>The int in which mkl_serv_intel_cpu_true caches its answer (-1 until MKL's first
    /// GEMM), read only; null where the function is missing or has another shape.</summary>
    static int? MklCached()
    {
        if (!NativeLibrary.TryLoad("libtorch_cpu", typeof(ProcessState).Assembly, null, out var lib)) return null;
        if (!NativeLibrary.TryGetExport(lib, "mkl_serv_intel_cpu_true", out var f)) return null;
        byte B(int i) => Marshal.ReadByte(f, i);
        // mov eax, [rip + cached]; test eax, eax; js ...
        if (!(B(0) == 0x8b && B(1) == 0x05 && B(6) == 0x85 && B(7) == 0xc0 && B(8) == 0x78)) return null;
        return Marshal.ReadInt32(f + 6 + Marshal.ReadInt32(f, 2));
    }

    /// <summary>The C environment (libc's environ, which setenv changes; .NET's copy does not follow it).</summary>
    public static Dictionary<string, string> CEnvironment()
    {
        var result = new Dictionary<string, string>();
        var libc = NativeLibrary.Load("libc.so.6");
        var envp = Marshal.ReadIntPtr(NativeLibrary.GetExport(libc, "environ"));
        for (int i = 0; ; i++)
        {
            var p = Marshal.ReadIntPtr(envp, i * IntPtr.Size);
            if (p == IntPtr.Zero) break;
            var entry = Marshal.PtrToStringAnsi(p)!;
            int eq = entry.IndexOf('=');
            if (eq > 0) result[entry[..eq]] = entry[(eq + 1)..];
        }
        return result;
    }

    public static bool LibTorchMapped() =>
        File.ReadLines("/proc/self/maps").Any(l => l.Contains("libtorch_cpu") || l.Contains("libgomp"));

    public static bool IntelCpu() =>
        File.ReadLines("/proc/cpuinfo").Any(l => l.StartsWith("vendor_id") && l.Contains("GenuineIntel"));
}
