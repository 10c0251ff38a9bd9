// The float32 arithmetic peak of the cores the benchmark runs on: fused multiply-adds on
// independent vector registers, one loop per LibTorch thread, nothing read from memory. No GEMM
// can run faster; the benchmark divides a preset's GFLOP per step by it (and by the GEMM ceiling)
// to state how much faster than the PyTorch mirror a training step could possibly be.
using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace MixerFlow.Speed;

static class FmaPeak
{
    /// <summary>The widest fused multiply-add this CPU has, or null when it has none (then no peak is measured).</summary>
    public static string? Instruction =>
        Avx512F.IsSupported ? "AVX-512 FMA (16 float32 lanes)" : Fma.IsSupported ? "AVX2 FMA (8 float32 lanes)" : null;

    /// <summary>
    /// GFLOP/s of <paramref name="threads"/> threads, each running the FMA loop for about
    /// <paramref name="seconds"/> (wall time over all of them); NaN where the CPU has no FMA.
    /// </summary>
    public static double Measure(int threads, double seconds = 0.25)
    {
        if (Instruction is null) return double.NaN;
        Loop(1000); // compiled before timing
        // Iterations for the requested time, from a short calibration run.
        var calibration = Stopwatch.StartNew();
        Loop(2_000_000);
        long iterations = Math.Max(2_000_000, (long)(2_000_000 * seconds / calibration.Elapsed.TotalSeconds));
        // One dedicated thread per loop, all started together (a thread pool could run two loops
        // one after the other on one thread and halve the rate).
        var sums = new float[threads];
        var workers = Enumerable.Range(0, threads).Select(t => new Thread(() => sums[t] = Loop(iterations))).ToList();
        var clock = Stopwatch.StartNew();
        foreach (var w in workers) w.Start();
        foreach (var w in workers) w.Join();
        double elapsed = clock.Elapsed.TotalSeconds;
        if (sums.Any(float.IsNaN)) throw new InvalidOperationException("FMA loop produced NaN");
        return threads * iterations * FlopsPerIteration / elapsed / 1e9;
    }

    const int Accumulators = 12; // > latency (4 cycles) x FMA pipes (2): every pipe busy every cycle
    static double FlopsPerIteration => Accumulators * 2.0 * (Avx512F.IsSupported ? 16 : 8);

    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    static float Loop(long iterations) => Avx512F.IsSupported ? Loop512(iterations) : Loop256(iterations);

    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    static float Loop512(long iterations)
    {
        var m = Vector512.Create(0.9999999f);
        var c = Vector512.Create(1e-7f);
        Vector512<float> a0 = Vector512<float>.One, a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
                         a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
        for (long i = 0; i < iterations; i++)
        {
            a0 = Avx512F.FusedMultiplyAdd(a0, m, c); a1 = Avx512F.FusedMultiplyAdd(a1, m, c);
            a2 = Avx512F.FusedMultiplyAdd(a2, m, c); a3 = Avx512F.FusedMultiplyAdd(a3, m, c);
            a4 = Avx512F.FusedMultiplyAdd(a4, m, c); a5 = Avx512F.FusedMultiplyAdd(a5, m, c);
            a6 = Avx512F.FusedMultiplyAdd(a6, m, c); a7 = Avx512F.FusedMultiplyAdd(a7, m, c);
            a8 = Avx512F.FusedMultiplyAdd(a8, m, c); a9 = Avx512F.FusedMultiplyAdd(a9, m, c);
            a10 = Avx512F.FusedMultiplyAdd(a10, m, c); a11 = Avx512F.FusedMultiplyAdd(a11, m, c);
        }
        return Vector512.Sum(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11);
    }

    [MethodImpl(MethodImplOptions.NoInlining | MethodImplOptions.AggressiveOptimization)]
    static float Loop256(long iterations)
    {
        var m = Vector256.Create(0.9999999f);
        var c = Vector256.Create(1e-7f);
        Vector256<float> a0 = Vector256<float>.One, a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
                         a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
        for (long i = 0; i < iterations; i++)
        {
            a0 = Fma.MultiplyAdd(a0, m, c); a1 = Fma.MultiplyAdd(a1, m, c);
            a2 = Fma.MultiplyAdd(a2, m, c); a3 = Fma.MultiplyAdd(a3, m, c);
            a4 = Fma.MultiplyAdd(a4, m, c); a5 = Fma.MultiplyAdd(a5, m, c);
            a6 = Fma.MultiplyAdd(a6, m, c); a7 = Fma.MultiplyAdd(a7, m, c);
            a8 = Fma.MultiplyAdd(a8, m, c); a9 = Fma.MultiplyAdd(a9, m, c);
            a10 = Fma.MultiplyAdd(a10, m, c); a11 = Fma.MultiplyAdd(a11, m, c);
        }
        return Vector256.Sum(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11);
    }
}
