using MixerFlow.Core;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// The first-use check of TorchSharp's native glue: silent where the glue loads, and where it cannot,
/// an error that names the loader's reason (GLIBCXX_3.4.32 on Debian 12) and the fix, not TorchSharp's
/// "doesn't contain a reference to libtorch-cpu-linux-x64".
/// </summary>
public class NativeRuntimeTests
{
    [Fact]
    public void The_check_passes_in_a_build_that_carries_the_fix_and_torch_still_works()
    {
        NativeRuntime.EnsureLoaded();
        NativeRuntime.EnsureLoaded(); // cached: a second call is free and agrees
        Assert.Equal(6.0, (ones(2, 3).sum()).item<float>());
    }

    [Fact]
    public void An_unpatched_copy_of_the_glue_is_refused_with_the_loader_reason_and_the_fix()
    {
        if (!OperatingSystem.IsLinux()) return;
        var home = Environment.GetEnvironmentVariable("NUGET_PACKAGES")
                   ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        var cached = Path.Combine(home, "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        if (!File.Exists(cached)) return; // a custom package folder: nothing to copy
        if (PlatformTests.SystemProvides("GLIBCXX_3.4.32")) return; // a newer libstdc++ loads it: nothing to refuse

        // This process's torch is loaded from the build output; the temporary copy sees the same
        // LibTorch through links, so the loader gets as far as the version check and no further.
        Assert.Equal(1.0, ones(1).item<float>());
        var native = Path.GetDirectoryName(Directory.GetFiles(AppContext.BaseDirectory, "libLibTorchSharp.so", SearchOption.AllDirectories).Single())!;
        var dir = Directory.CreateTempSubdirectory("mixerflow-glue-");
        try
        {
            var copy = Path.Combine(dir.FullName, "libLibTorchSharp.so");
            File.Copy(cached, copy);
            foreach (var lib in Directory.GetFiles(native).Where(f => Path.GetFileName(f) != "libLibTorchSharp.so"))
                File.CreateSymbolicLink(Path.Combine(dir.FullName, Path.GetFileName(lib)), lib);

            var e = Assert.Throws<NativeLoadException>(() => NativeRuntime.Verify(copy));
            Assert.Contains("GLIBCXX_3.4.32", e.LoaderMessage);
            Assert.Contains(copy, e.LoaderMessage); // "(required by <copy>)": the loader's own words
            Assert.Contains("GLIBCXX_3.4.32", e.Message);
            Assert.Contains("LibStdCxxFix.targets", e.Message);
            Assert.Contains("MixerFlowPatchLibStdCxx", e.Message);
            Assert.Equal(copy, e.LibraryPath);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
        // The process's own torch is untouched.
        Assert.Equal(-2.0, linalg.det(tensor(new double[] { 1, 2, 3, 4 }).reshape(2, 2)).item<double>(), 12);
    }

    [Fact]
    public void A_missing_file_is_left_to_TorchSharp()
    {
        if (!OperatingSystem.IsLinux()) return;
        NativeRuntime.Verify(Path.Combine(Path.GetTempPath(), "no-such-folder-" + Guid.NewGuid(), "libLibTorchSharp.so"));
    }
}

/// <summary>
/// MKL's fast kernels on CPUs it does not recognise (MixerFlowRuntime.MklOutcome): the same
/// training run with them and with MKL's generic path (MIXERFLOW_MKL_GENERIC=1) ends at the
/// same held-out score to float32 accuracy.
/// </summary>
public class MklDispatchTests
{
    static (int Exit, string Log) Mixerflow(IDictionary<string, string?> env, params string[] args)
    {
        var psi = new System.Diagnostics.ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "mixerflow.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        foreach (var (k, v) in env)
            if (v is null) psi.Environment.Remove(k); else psi.Environment[k] = v;
        using var child = System.Diagnostics.Process.Start(psi)!;
        string log = child.StandardOutput.ReadToEnd() + child.StandardError.ReadToEnd();
        child.WaitForExit();
        return (child.ExitCode, log);
    }

    [Fact]
    public void Info_reports_the_choice_and_the_opt_out_switch_keeps_MKLs_own()
    {
        var (exit, log) = Mixerflow(new Dictionary<string, string?> { ["OMP_WAIT_POLICY"] = null, ["GOMP_SPINCOUNT"] = null }, "info", "--preset", "tiny");
        Assert.True(exit == 0, log);
        // Either MKL trusts the CPU now, or there is no MKL / an unknown shape, said plainly.
        Assert.Matches("MKL: (MKL (set to trust|already trusts)|no mkl_serv|mkl_serv_intel_cpu_true has)", log);
        // OpenMP threads sleep instead of spinning, unless the environment says otherwise.
        Assert.Contains("OpenMP wait policy PASSIVE after a short spin (GOMP_SPINCOUNT=10000, set by MixerFlow)", log);
        (exit, log) = Mixerflow(new Dictionary<string, string?> { ["OMP_WAIT_POLICY"] = null, ["GOMP_SPINCOUNT"] = "300000" }, "info", "--preset", "tiny");
        Assert.True(exit == 0, log);
        Assert.Contains("OpenMP wait policy PASSIVE (set by MixerFlow; GOMP_SPINCOUNT given)", log);
        (exit, log) = Mixerflow(new Dictionary<string, string?> { ["MIXERFLOW_MKL_GENERIC"] = "1", ["OMP_WAIT_POLICY"] = "ACTIVE" },
                                "info", "--preset", "tiny");
        Assert.True(exit == 0, log);
        Assert.Contains("MKL: left on MKL's own CPU check (MIXERFLOW_MKL_GENERIC=1)", log);
        Assert.Contains("OpenMP wait policy ACTIVE (given)", log);
    }

    [Fact]
    public void Training_gives_the_same_score_with_and_without_the_fast_kernels()
    {
        var scores = new List<double>();
        foreach (var generic in new[] { "0", "1" })
        {
            var dir = Path.Combine(Path.GetTempPath(), "mixerflow-mkl-" + Guid.NewGuid().ToString("N"));
            try
            {
                var (exit, log) = Mixerflow(new Dictionary<string, string?> { ["MIXERFLOW_MKL_GENERIC"] = generic },
                    "train", "--preset", "tiny", "--steps", "8", "--batch-size", "32", "--checkpoint-every", "8", "--out", dir);
                Assert.True(exit == 0, log);
                using var summary = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "summary.json")));
                scores.Add(summary.RootElement.GetProperty("heldOutBpd").GetDouble());
            }
            finally { if (Directory.Exists(dir)) Directory.Delete(dir, true); }
        }
        Assert.True(Math.Abs(scores[0] - scores[1]) < 1e-3, $"fast kernels {scores[0]}, generic {scores[1]}");
    }
}

/// <summary>
/// The tool restarts itself with glibc malloc on transparent huge pages (MixerFlow.Core.HugePages),
/// unless told not to; the restart keeps the exit code and changes no result.
/// </summary>
public class HugePagesTests
{
    static (int Exit, string Log) Mixerflow(IDictionary<string, string?> env, params string[] args)
    {
        var psi = new System.Diagnostics.ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "mixerflow.dll"));
        foreach (var a in args) psi.ArgumentList.Add(a);
        // The test host's own environment must not decide the outcome.
        psi.Environment.Remove("GLIBC_TUNABLES");
        psi.Environment.Remove("MIXERFLOW_HUGETLB");
        psi.Environment.Remove("MIXERFLOW_HUGETLB_RESTARTED");
        foreach (var (k, v) in env)
            if (v is null) psi.Environment.Remove(k); else psi.Environment[k] = v;
        using var child = System.Diagnostics.Process.Start(psi)!;
        var err = child.StandardError.ReadToEndAsync();
        string log = child.StandardOutput.ReadToEnd() + err.Result;
        child.WaitForExit();
        return (child.ExitCode, log);
    }

    static bool KernelOffersHugePages()
    {
        try { return !File.ReadAllText("/sys/kernel/mm/transparent_hugepage/enabled").Contains("[never]"); }
        catch (IOException) { return false; }
    }

    static double ResidentMegabytes()
    {
        using var self = System.Diagnostics.Process.GetCurrentProcess();
        self.Refresh();
        return self.WorkingSet64 / 1048576.0;
    }

    [Fact]
    public void ReleaseFreedMemory_hands_freed_heap_pages_back_to_the_system()
    {
        if (!OperatingSystem.IsLinux()) return;
        // 2,000 tensors of 64 KB (below malloc's mmap threshold: heap chunks), every other one
        // freed: the freed half (about 64 MB) lies between live chunks, where only a trim can
        // return it (free() alone returns the top of the heap only).
        var kept = new List<Tensor>();
        var freed = new List<Tensor>();
        for (int i = 0; i < 2000; i++) (i % 2 == 0 ? kept : freed).Add(ones(16384));
        foreach (var t in freed) t.Dispose();
        double afterFree = ResidentMegabytes();
        Assert.True(HugePages.ReleaseFreedMemory(), "malloc_trim released nothing");
        double afterTrim = ResidentMegabytes();
        foreach (var t in kept) t.Dispose();
        Assert.True(afterFree - afterTrim > 30, $"resident {afterFree:0.0} MB after the frees, {afterTrim:0.0} MB after the trim");
    }

    [Fact]
    public void Info_says_which_pages_malloc_uses_and_the_switches_are_obeyed()
    {
        if (!OperatingSystem.IsLinux()) return;
        var (exit, log) = Mixerflow(new Dictionary<string, string?>(), "info", "--preset", "tiny");
        Assert.True(exit == 0, log);
        Assert.Contains(KernelOffersHugePages()
            ? "malloc on transparent huge pages (glibc.malloc.hugetlb=1, set by MixerFlow), freed memory kept for reuse (mmap threshold 32 MB, no trimming)"
            : "malloc on 4 KB pages", log);

        (exit, log) = Mixerflow(new Dictionary<string, string?> { ["MIXERFLOW_HUGETLB"] = "0" }, "info", "--preset", "tiny");
        Assert.True(exit == 0, log);
        Assert.Contains("malloc on 4 KB pages (MIXERFLOW_HUGETLB=0)", log);

        (exit, log) = Mixerflow(new Dictionary<string, string?> { ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=0" }, "info", "--preset", "tiny");
        Assert.True(exit == 0, log);
        Assert.Contains("malloc on 4 KB pages (glibc.malloc.hugetlb=0 given)", log);

        (exit, log) = Mixerflow(new Dictionary<string, string?> { ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1" }, "info", "--preset", "tiny");
        Assert.True(exit == 0, log);
        // Given tunables are kept as given: huge pages without the kept-memory pair.
        if (KernelOffersHugePages())
        {
            Assert.Contains("(glibc.malloc.hugetlb=1, given)", log);
            Assert.DoesNotContain("freed memory kept", log);
        }
    }

    [Fact]
    public void The_restart_keeps_the_arguments_and_the_exit_code()
    {
        if (!OperatingSystem.IsLinux()) return;
        // A bad value after the restart is still reported by name, with exit code 2.
        var (exit, log) = Mixerflow(new Dictionary<string, string?>(), "info", "--preset", "tiny", "--set", "layers=-3");
        Assert.True(exit == 2, log);
        Assert.Contains("layers", log);
        // Arguments with spaces and empty strings survive /proc/self/cmdline.
        var dir = Path.Combine(Path.GetTempPath(), "mf hp " + Guid.NewGuid().ToString("N"));
        try
        {
            (exit, log) = Mixerflow(new Dictionary<string, string?>(), "train", "--preset", "tiny", "--steps", "2", "--out", Path.Combine(dir, "run a"));
            Assert.True(exit == 0, log);
            Assert.True(File.Exists(Path.Combine(dir, "run a", "summary.json")), log);
        }
        finally { if (Directory.Exists(dir)) Directory.Delete(dir, true); }
    }

    [Fact]
    public void Training_gives_the_same_score_on_huge_and_on_small_pages()
    {
        if (!OperatingSystem.IsLinux()) return;
        var scores = new List<string>();
        foreach (var optOut in new[] { null, "0" })
        {
            var dir = Path.Combine(Path.GetTempPath(), "mf-hp-" + Guid.NewGuid().ToString("N"));
            try
            {
                var (exit, log) = Mixerflow(new Dictionary<string, string?> { ["MIXERFLOW_HUGETLB"] = optOut, ["OMP_NUM_THREADS"] = "1" },
                                            "train", "--preset", "tiny", "--steps", "15", "--threads", "1", "--out", dir);
                Assert.True(exit == 0, log);
                var line = log.Split('\n').Single(l => l.StartsWith("held-out bits/dim:"));
                scores.Add(line[..line.IndexOf(';')]);
            }
            finally { if (Directory.Exists(dir)) Directory.Delete(dir, true); }
        }
        Assert.Equal(scores[0], scores[1]);
    }
}
