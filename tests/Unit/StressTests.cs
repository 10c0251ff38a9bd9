namespace MixerFlow.Unit;

/// <summary>
/// TorchSharp's Scalar race, end to end: the stress program (tests/Stress) trains MixerFlow with
/// affine and spline inner flows and Glow while another thread allocates and forces full
/// collections nonstop, with a tiny gen-0 budget and no no-GC region. Before MixerFlow stopped
/// creating temporary Scalars, the same run with torch.optim.Adam failed within about 35 to 110
/// steps ("Unknown scalar type", "Expected false to be true"). The long run is explicit:
/// <c>DOTNET_GCgen0size=0x10000 dotnet run --project tests/Stress -c Release -- --steps 3000</c>.
/// </summary>
public class StressTests
{
    [Fact]
    public void Training_steps_survive_collections_forced_from_another_thread()
    {
        var program = Path.Combine(AppContext.BaseDirectory, "MixerFlow.Stress.dll");
        var psi = new System.Diagnostics.ProcessStartInfo("dotnet")
        {
            ArgumentList = { program, "--steps", "200", "--family", "mixerflow-affine", "--family", "glow" },
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            Environment = { ["DOTNET_GCgen0size"] = "0x10000" },
        };
        using var child = System.Diagnostics.Process.Start(psi)!;
        string log = child.StandardOutput.ReadToEnd() + child.StandardError.ReadToEnd();
        child.WaitForExit();
        Assert.True(child.ExitCode == 0, log);
        Assert.Contains("mixerflow-affine: 200 steps without error", log);
        Assert.Contains("glow: 200 steps without error", log);

        psi.ArgumentList.Clear();
        foreach (var a in new[] { program, "--steps", "40", "--family", "mixerflow-spline" }) psi.ArgumentList.Add(a);
        using var spline = System.Diagnostics.Process.Start(psi)!;
        log = spline.StandardOutput.ReadToEnd() + spline.StandardError.ReadToEnd();
        spline.WaitForExit();
        Assert.True(spline.ExitCode == 0, log);
        Assert.Contains("mixerflow-spline: 40 steps without error", log);
    }
}
