using MixerFlow.Core;
using MixerFlow.Core.Runtime;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// The runtime's one entry point (MixerFlowRuntime): Configure sets the switches and says who set
/// each and what came too late; building MixerFlow objects sets nothing. The tests run one at a
/// time (AssemblyInfo) and put the tests' runtime back after flipping a switch.
/// </summary>
public class RuntimeTests
{
    [Fact]
    public void Configure_sets_the_LibTorch_switches_and_Describe_says_who_set_them()
    {
        try
        {
            var d = MixerFlowRuntime.Configure(LibTorchSetup.Options.WithOneDnn(true).WithNnpack(true));
            if (!NativeBackend.Available) return;
            Assert.Equal("on", d["oneDNN"].Value);
            Assert.Equal("MixerFlowRuntime.Configure", d["oneDNN"].SetBy);
            Assert.True(NativeBackend.MkldnnEnabled && NativeBackend.NnpackEnabled);
            // A change made outside the runtime is reported as such.
            NativeBackend.MkldnnEnabled = false;
            Assert.Contains("outside MixerFlowRuntime", MixerFlowRuntime.Describe()["oneDNN"].SetBy);
        }
        finally { MixerFlowRuntime.Configure(LibTorchSetup.Options); }
        var back = MixerFlowRuntime.Describe();
        Assert.Equal("off", back["oneDNN"].Value);
        Assert.Equal("off", back["NNPACK"].Value);
        Assert.False(NativeBackend.MkldnnEnabled);
        Assert.Contains("oneDNN", back.ToString());
        Assert.Equal(6, back.Settings.Count);
    }

    [Fact]
    public void A_wait_policy_asked_for_after_LibTorch_loaded_is_a_warning_not_a_change()
    {
        NativeRuntime.EnsureLoaded();
        using (var t = ones(2, 2)) Assert.Equal(4, t.sum().item<float>());
        var policyBefore = MixerFlowRuntime.OpenMpWaitPolicy;
        try
        {
            var d = MixerFlowRuntime.Configure(LibTorchSetup.Options.WithOpenMpWaitPolicy("ACTIVE", 0));
            Assert.Contains(d.Warnings, w => w.Contains("OpenMP wait policy ACTIVE"));
            Assert.Equal(policyBefore, MixerFlowRuntime.OpenMpWaitPolicy);
        }
        finally { MixerFlowRuntime.Configure(LibTorchSetup.Options); }
    }

    [Fact]
    public void Configuring_twice_with_the_same_options_adds_no_warning()
    {
        var first = MixerFlowRuntime.Configure(LibTorchSetup.Options).Warnings.Count;
        var second = MixerFlowRuntime.Configure(LibTorchSetup.Options);
        Assert.Equal(first, second.Warnings.Count);
        Assert.Equal(MixerFlowRuntime.Configured!.OneDnn, LibTorchSetup.Options.OneDnn);
    }

    [Fact]
    public void The_options_default_to_the_tools_settings_and_With_methods_copy()
    {
        var o = new RuntimeOptions();
        Assert.False(o.OneDnn);
        Assert.False(o.Nnpack);
        Assert.True(o.TrustMklCpuDispatch);
        Assert.Equal("PASSIVE", o.OpenMpWaitPolicy);
        Assert.Equal(10000, o.OpenMpSpinCount);
        Assert.True(o.HugePages);
        Assert.Equal(0, o.IntraOpThreads);
        var changed = o.WithOneDnn(true).WithIntraOpThreads(3);
        Assert.True(changed.OneDnn);
        Assert.Equal(3, changed.IntraOpThreads);
        Assert.False(o.OneDnn);
    }

    [Fact]
    public void Building_and_running_Glow_pieces_leaves_the_oneDNN_switch_alone()
    {
        try
        {
            MixerFlowRuntime.Configure(LibTorchSetup.Options.WithOneDnn(true));
            var coupling = new AffineCoupling(new long[] { 4, 6, 6 }, Partition.Halves(4), Conditioners.Conv(8), ScaleBound.Sigmoid);
            var prior = new AffineCoupling(new long[] { 4, 6, 6 }, Partition.Halves(4), Conditioners.ZeroConv());
            var (y, _) = coupling.Forward(randn(16, 4, 6, 6));
            prior.Forward(y);
            Assert.True(!NativeBackend.Available || NativeBackend.MkldnnEnabled);
        }
        finally { MixerFlowRuntime.Configure(LibTorchSetup.Options); }
    }

    /// <summary>A program that references MixerFlow.Core alone builds every kind of bijector and
    /// a flow, runs them, and finds LibTorch's switches, the C environment and MKL's dispatch as
    /// they were (tests/CoreOnly).</summary>
    [Fact]
    public void A_Core_only_program_leaves_the_process_alone()
    {
        if (!OperatingSystem.IsLinux()) return;
        var psi = new System.Diagnostics.ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "MixerFlow.CoreOnly.dll"));
        foreach (var v in new[] { "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GLIBC_TUNABLES", "MIXERFLOW_HUGETLB_RESTARTED" }) psi.Environment.Remove(v);
        using var child = System.Diagnostics.Process.Start(psi)!;
        string log = child.StandardOutput.ReadToEnd() + child.StandardError.ReadToEnd();
        child.WaitForExit();
        Assert.True(child.ExitCode == 0, log);
        Assert.Contains("process left alone", log);
        Assert.Contains("built and ran", log);
    }
}
