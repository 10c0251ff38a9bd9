using System.Diagnostics;
using System.Text.Json;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;

namespace MixerFlow.Speed;

/// <summary>
/// The PyTorch mirror of one preset (benchmarks/mirror/mixerflow_mirror.py, copied beside the
/// program) as a long-lived Debian python3 process in its <c>time --serve</c> mode: it builds the
/// model from the configuration JSON (refusing to run if its parameter count differs from ours),
/// takes two warm-up steps (and one evaluation and one sampling), then answers each request of N
/// training steps, evaluations or samplings with their times, so that they can be interleaved with
/// ours round by round. One thread, OpenBLAS at its full speed (OPENBLAS_CORETYPE and
/// OPENBLAS_L2_SIZE removed from its environment).
/// </summary>
sealed class Mirror : IDisposable
{
    public const string Python = "/usr/bin/python3";
    static string Script => Path.Combine(AppContext.BaseDirectory, "mirror", "mixerflow_mirror.py");

    readonly Process process;
    readonly string configFile;
    /// <summary>Training step times, ms.</summary>
    public List<double> StepMs { get; } = new();
    /// <summary>Each training step's phases: forward (to the loss value), zero_grad and backward, clipping and Adam.</summary>
    public List<StepPhases> StepPhases { get; } = new();
    /// <summary>Evaluation times (bits/dim of one batch, evaluation mode, no gradient), ms per image.</summary>
    public List<double> EvaluationMs { get; } = new();
    /// <summary>Sampling times (a batch of pixels from the base through the inverse, evaluation mode, no gradient), ms per image.</summary>
    public List<double> SamplingMs { get; } = new();
    public string Torch { get; }
    public double ForwardGflop { get; }
    /// <summary>The forward pass's Linear and Conv2d GEMMs as the mirror's hooks saw them, in <see cref="Gemm.Shape"/>'s format.</summary>
    public IReadOnlyList<string> Gemms { get; }

    /// <summary>Why no mirror can run on this machine, or null when one can.</summary>
    public static string? Unavailable()
    {
        if (!File.Exists(Script)) return $"the mirror script is not beside the program ({Script})";
        if (!File.Exists(Python)) return $"{Python} is absent (apt-get install python3-torch libopenblas0-pthread)";
        var psi = new ProcessStartInfo(Python) { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
        psi.ArgumentList.Add("-c"); psi.ArgumentList.Add("import torch");
        using var p = Process.Start(psi)!;
        p.StandardOutput.ReadToEnd();
        string err = p.StandardError.ReadToEnd();
        p.WaitForExit();
        return p.ExitCode == 0 ? null : $"{Python} cannot import torch (apt-get install python3-torch libopenblas0-pthread): {err.Trim().Split('\n').LastOrDefault()}";
    }

    /// <param name="config">The model configuration (written to a temporary JSON file for the mirror).</param>
    /// <param name="parameters">Our parameter count: the mirror refuses to run with another.</param>
    /// <param name="batch">Images per training step and per evaluation.</param>
    /// <param name="threads">Threads of the mirror's torch (intra-op, OpenMP).</param>
    /// <param name="blasThreads">Threads of its OpenBLAS.</param>
    /// <param name="sampleBatch">Images per sampling call.</param>
    public Mirror(ModelConfig config, long parameters, int batch, int threads, int blasThreads, int sampleBatch)
    {
        configFile = Path.Combine(Path.GetTempPath(), $"mixerflow-mirror-{Environment.ProcessId}-{Guid.NewGuid():N}.json");
        File.WriteAllText(configFile, config.ToJson());
        var psi = new ProcessStartInfo(Python)
        {
            RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
        };
        foreach (var a in new[] { Script, "time", configFile, "--serve", "--batch", batch.ToString(), "--sample-batch", sampleBatch.ToString(),
                                  "--threads", threads.ToString(), "--expect-parameters", parameters.ToString() })
            psi.ArgumentList.Add(a);
        psi.Environment.Remove("OPENBLAS_CORETYPE");
        psi.Environment.Remove("OPENBLAS_L2_SIZE");
        psi.Environment["OPENBLAS_NUM_THREADS"] = blasThreads.ToString();
        psi.Environment["OMP_NUM_THREADS"] = threads.ToString();
        try { process = Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {Python}"); }
        catch (Exception e) when (e is InvalidOperationException or System.ComponentModel.Win32Exception)
        {
            File.Delete(configFile);
            throw new InvalidOperationException($"cannot start {Python}: {e.Message}", e);
        }
        try { (Torch, ForwardGflop, Gemms) = Handshake(config, parameters); }
        catch (Exception e)
        {
            Dispose();
            if (e is InvalidOperationException) throw;
            throw new InvalidOperationException($"the mirror of {config.Name} answered badly: {e.Message}", e);
        }
    }

    /// <summary>The mirror's first line: its torch version, FLOPs and GEMMs, after its parameter count is checked.</summary>
    (string Torch, double ForwardGflop, IReadOnlyList<string> Gemms) Handshake(ModelConfig config, long parameters)
    {
        // stderr is read in the background so that a chatty process never blocks on a full pipe.
        var stderr = new System.Text.StringBuilder();
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (stderr) stderr.AppendLine(e.Data); };
        process.BeginErrorReadLine();
        string? first = process.StandardOutput.ReadLine();
        if (first is null)
        {
            process.WaitForExit();
            lock (stderr) throw new InvalidOperationException($"the mirror of {config.Name} exited (code {process.ExitCode}): {stderr.ToString().Trim()}");
        }
        using var info = JsonDocument.Parse(first);
        long theirs = info.RootElement.GetProperty("parameters").GetInt64();
        if (theirs != parameters) throw new InvalidOperationException($"the mirror of {config.Name} has {theirs:N0} parameters, ours {parameters:N0}");
        return (info.RootElement.GetProperty("torch").GetString() ?? "?",
                info.RootElement.GetProperty("forward_gflop").GetDouble(),
                info.RootElement.GetProperty("gemms").EnumerateArray().Select(e => e.GetString() ?? "").ToList());
    }

    /// <summary>Runs <paramref name="steps"/> training steps in the mirror and records their times (also returned).</summary>
    public IReadOnlyList<double> Steps(int steps) => Request(steps.ToString(), StepMs);

    /// <summary>Runs <paramref name="count"/> evaluations of one batch in the mirror and records their times per image (also returned).</summary>
    public IReadOnlyList<double> Evaluations(int count) => Request($"eval {count}", EvaluationMs);

    /// <summary>Runs <paramref name="count"/> samplings of one batch in the mirror and records their times per image (also returned).</summary>
    public IReadOnlyList<double> Samplings(int count) => Request($"sample {count}", SamplingMs);

    List<double> Request(string line, List<double> into)
    {
        process.StandardInput.WriteLine(line);
        process.StandardInput.Flush();
        string answer = process.StandardOutput.ReadLine() ?? throw new InvalidOperationException("the mirror exited mid-run");
        using var doc = JsonDocument.Parse(answer);
        var times = doc.RootElement.GetProperty("ms").EnumerateArray().Select(e => e.GetDouble()).ToList();
        into.AddRange(times);
        if (doc.RootElement.TryGetProperty("phases", out var phases))
            StepPhases.AddRange(phases.EnumerateArray().Select(p => new StepPhases(
                TimeSpan.FromMilliseconds(p[0].GetDouble()), TimeSpan.FromMilliseconds(p[1].GetDouble()), TimeSpan.FromMilliseconds(p[2].GetDouble()))));
        return times;
    }

    public void Dispose()
    {
        try
        {
            process.StandardInput.WriteLine("quit");
            process.StandardInput.Flush();
            if (!process.WaitForExit(10_000)) process.Kill();
        }
        catch (IOException) { }
        catch (InvalidOperationException) { }
        process.Dispose();
        try { File.Delete(configFile); } catch (IOException) { }
    }
}
