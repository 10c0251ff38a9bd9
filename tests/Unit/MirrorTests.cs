using System.Diagnostics;
using MixerFlow.Core;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>
/// The PyTorch mirror of benchmarks/mirror/mixerflow_mirror.py against MixerFlow.NET on the same
/// weights: every parameter randomised (ActNorm initialised on data, then every parameter,
/// zero-initialised last layers included, perturbed), exported with
/// <see cref="ImageFlow.ExportSafetensors"/>, and log p(x) of the same continuous (dequantised)
/// images computed by both, per image, in float64 and in float32; and the inverse direction: the
/// same latents decoded by both to the same continuous images (before the final rounding to
/// pixels) and the same pixels. A broken mirror (a log-det, or one inverse step, left out) and
/// weights changed after the export must fail the same comparisons. Needs Debian's
/// /usr/bin/python3 with torch (apt-get install python3-torch); without it these tests fail,
/// unless MIXERFLOW_SKIP_MIRROR=1, which skips them.
/// </summary>
public class MirrorTests
{
    /// <summary>Relative tolerance on log p per image, float64 on both sides (values are ~1e3 nats).</summary>
    const double Float64Tolerance = 1e-9;
    /// <summary>Relative tolerance on log p per image, float32 on both sides.</summary>
    const double Float32Tolerance = 1e-4;

    /// <summary>Relative tolerance on log p per image with bfloat16 conditioners on both sides (oneDNN's
    /// summation order may differ between the two LibTorch versions: a product one bfloat16 step apart).</summary>
    const double BfloatTolerance = 1e-4;

    /// <summary>Largest |ours - mirror| of decoded continuous images (values in about [-0.06, 1.06]), float64 on both sides.</summary>
    const double DecodeFloat64Tolerance = 1e-12;
    /// <summary>Largest |ours - mirror| of decoded continuous images, float32 on both sides.</summary>
    const double DecodeFloat32Tolerance = 1e-4;

    /// <summary>A preset with `--set`-style changes ("key=value,key=value"; empty for none).</summary>
    static ModelConfig Config(string preset, string set) =>
        set.Length == 0 ? Presets.Get(preset)
            : ConfigOverrides.Apply(Presets.Get(preset), set.Split(',')) with { Name = $"{preset} ({set})" };

    /// <summary>A model with every parameter random at a sensible scale: not the identity.</summary>
    static ImageFlow Randomised(ModelConfig c, int seed)
    {
        manual_seed(seed);
        var m = new ImageFlow(c);
        m.train();
        using (no_grad())
        {
            var x = randint(0, 256, new long[] { 16, c.Channels, c.Height, c.Width }).to_type(float32);
            if (m.ContextFeatures == 0) m.LogLikelihood(x); // ActNorm's data init
            else m.LogProb(x, m.OneHot(Enumerable.Range(0, 16).Select(i => i % (int)m.ContextFeatures).ToList()));
            foreach (var p in m.parameters()) p.add_(randn_like(p).mul(Ops.Scalar(0.1)));
        }
        m.eval();
        return m;
    }

    /// <summary>A fixed batch of continuous images y = (x + u) / 256: pixels and dequantisation noise drawn here, once.</summary>
    static Tensor Inputs(ModelConfig c, int n, int seed)
    {
        manual_seed(seed);
        var x = randint(0, 256, new long[] { n, c.Channels, c.Height, c.Width }).to_type(float32);
        return Ops.Add(x, rand_like(x)).div(Ops.Scalar(256.0));
    }

    /// <summary>Our log p(x) in nats per image of continuous inputs: body, standard normal, dequantisation's -D log 256.</summary>
    static double[] OurLogProb(ImageFlow m, Tensor y, Tensor? context = null)
    {
        using var _ = no_grad();
        var (z, logDet) = context is null ? m.Body.Forward(y.to(m.DType)) : m.Body.Forward(y.to(m.DType), context.to(m.DType));
        var lp = Ops.AddScalar(Ops.Add(Likelihood.StandardNormalLogProb(z), logDet), -m.Config.Dimensions * Math.Log(256.0));
        return lp.to_type(float64).data<double>().ToArray();
    }

    /// <summary>The largest |ours - mirror| / max(1, |ours|) over the images.</summary>
    static double WorstRelative(double[] ours, double[] mirror)
    {
        Assert.Equal(ours.Length, mirror.Length);
        return ours.Zip(mirror, (a, b) => Math.Abs(a - b) / Math.Max(1.0, Math.Abs(a))).Max();
    }

    /// <summary>Our decoding of latents z: the body's inverse (continuous images y) and the pixels (<see cref="ImageFlow.Decode"/>).</summary>
    static (double[] Continuous, double[] Images) OurDecode(ImageFlow m, Tensor z, Tensor? context = null)
    {
        using var _ = no_grad();
        var latents = z.to(m.DType);
        var y = context is null ? m.Body.Inverse(latents).Value : m.Body.Inverse(latents, context.to(m.DType)).Value;
        var x = context is null ? m.Decode(latents) : m.Dequantize.Inverse(y).Value;
        return (y.to_type(float64).flatten().data<double>().ToArray(), x.to_type(float64).flatten().data<double>().ToArray());
    }

    /// <summary>The largest |ours - mirror| over all values.</summary>
    static double WorstAbsolute(double[] ours, double[] mirror)
    {
        Assert.Equal(ours.Length, mirror.Length);
        return ours.Zip(mirror, (a, b) => Math.Abs(a - b)).Max();
    }

    /// <summary>Exports the model's weights and writes six latents z ~ N(0, I) (with one-hot classes for a class-conditional model) for the mirror.</summary>
    static (Tensor Z, Tensor? Context) WriteDecodeCase(ImageFlow m, string weights, string latents, int seed)
    {
        m.ExportSafetensors(weights);
        manual_seed(seed);
        var c = m.Config;
        var z = randn(6, c.Channels, c.Height, c.Width);
        return (z, WriteWithClasses(m, latents, "latents", z));
    }

    /// Writes `x` as tensor `name`, with one-hot classes 0, 1, ... as tensor "context" for a
    /// class-conditional model (the same on both sides); returns the classes, or null.
    static Tensor? WriteWithClasses(ImageFlow m, string path, string name, Tensor x)
    {
        var n = (int)x.shape[0];
        var context = m.ContextFeatures > 0 ? m.OneHot(Enumerable.Range(0, n).Select(i => i % (int)m.ContextFeatures).ToList()) : null;
        SafeTensors.Write(path, context is null ? new[] { (name, x) } : new[] { (name, x), ("context", context) });
        return context;
    }

    static string Show(double[] ours, double[] mirror) =>
        string.Join("; ", ours.Zip(mirror, (a, b) => $"{a:0.######} vs {b:0.######}"));

    [MirrorTheory]
    [InlineData("tiny", "")]
    [InlineData("tiny", "shift=false")]
    [InlineData("tiny", "patches=bands,channelFlow=additive,hiddenDepth=2")]
    [InlineData("tiny", "channelFlow=spline,patchFlow=spline,splineBins=5,norm=batchNorm")]
    [InlineData("tiny", "channelFlow=maf,patchFlow=maf,innerSteps=3")]
    [InlineData("tiny", "classes=3")]
    [InlineData("tiny", "classes=3,channelFlow=maf")]
    [InlineData("glow-tiny", "")]
    public void Mirror_log_likelihood_equals_ours_on_the_same_weights(string preset, string set)
    {
        PythonMirror.Require();
        using var dir = new TempDir();
        var c = Config(preset, set);
        using var m = Randomised(c, 11);
        foreach (var (name, p) in m.named_parameters())
            Assert.True(p.abs().max().item<float>() > 0, $"{name} is still all zeros: the model is not randomised");
        string weights = dir.File("weights.safetensors"), inputs = dir.File("inputs.safetensors");
        m.ExportSafetensors(weights);
        var y = Inputs(c, 6, 12);
        var context = WriteWithClasses(m, inputs, "inputs", y);

        var ours32 = OurLogProb(m, y, context);
        var mirror32 = PythonMirror.LogProb(weights, inputs, dir.File("lp32.safetensors"), "float32");
        var mirror64 = PythonMirror.LogProb(weights, inputs, dir.File("lp64.safetensors"), "float64");
        m.MoveTo(CPU, float64);
        var ours64 = OurLogProb(m, y, context);

        // Not a trivial model: the images' log-likelihoods differ.
        Assert.True(ours64.Max() - ours64.Min() > 1.0, $"log p hardly varies over the batch: {string.Join(", ", ours64)}");
        double worst64 = WorstRelative(ours64, mirror64), worst32 = WorstRelative(ours32, mirror32);
        Console.WriteLine($"{c.Name}: worst relative difference float64 {worst64:0.0e0}, float32 {worst32:0.0e0}; max |diff| float64 " +
                          $"{ours64.Zip(mirror64, (a, b) => Math.Abs(a - b)).Max():0.0e0} nats, float32 {ours32.Zip(mirror32, (a, b) => Math.Abs(a - b)).Max():0.0e0} nats");
        Assert.True(worst64 <= Float64Tolerance, $"float64: relative difference {worst64:0.0e0} > {Float64Tolerance:0e0}: {Show(ours64, mirror64)}");
        Assert.True(worst32 <= Float32Tolerance, $"float32: relative difference {worst32:0.0e0} > {Float32Tolerance:0e0}: {Show(ours32, mirror32)}");
    }

    /// <summary>
    /// bfloat16 conditioners (conditionerPrecision=bfloat16) against the mirror's torch.autocast:
    /// the same rounding points (input, weights, biases, each product), so log p agrees far more
    /// closely than either agrees with the float32-conditioner model of the same weights.
    /// </summary>
    [MirrorFact]
    public void Mirror_log_likelihood_equals_ours_with_bfloat16_conditioners()
    {
        PythonMirror.Require();
        using var dir = new TempDir();
        var c = Config("tiny", "conditionerPrecision=bfloat16,hiddenWidth=64");
        using var m = Randomised(c, 11);
        string weights = dir.File("weights.safetensors"), inputs = dir.File("inputs.safetensors");
        m.ExportSafetensors(weights);
        var y = Inputs(c, 6, 12);
        WriteWithClasses(m, inputs, "inputs", y);
        var ours = OurLogProb(m, y);
        var mirror = PythonMirror.LogProb(weights, inputs, dir.File("lp.safetensors"), "float32");
        using var plain = new ImageFlow(Config("tiny", "hiddenWidth=64"));
        plain.load_state_dict(m.state_dict());
        plain.eval();
        var float32 = OurLogProb(plain, y);
        double worst = WorstRelative(ours, mirror), rounding = WorstRelative(ours, float32);
        Console.WriteLine($"bfloat16 conditioners: worst relative difference to the mirror {worst:0.0e0}, to float32 conditioners {rounding:0.0e0}");
        Assert.True(worst <= BfloatTolerance, $"relative difference {worst:0.0e0} > {BfloatTolerance:0e0}: {Show(ours, mirror)}");
        Assert.True(rounding > 10 * worst, $"bfloat16 and float32 conditioners differ by only {rounding:0.0e0} (mirror: {worst:0.0e0})");
    }

    [MirrorTheory]
    [InlineData("tiny")]
    [InlineData("glow-tiny")]
    public void The_comparison_fails_for_a_broken_mirror_and_for_weights_changed_after_the_export(string preset)
    {
        PythonMirror.Require();
        using var dir = new TempDir();
        var c = Presets.Get(preset);
        using var m = Randomised(c, 21);
        m.MoveTo(CPU, float64);
        string weights = dir.File("weights.safetensors"), inputs = dir.File("inputs.safetensors");
        m.ExportSafetensors(weights);
        var y = Inputs(c, 4, 22);
        SafeTensors.Write(inputs, new[] { ("inputs", y) });
        var ours = OurLogProb(m, y);
        Assert.True(WorstRelative(ours, PythonMirror.LogProb(weights, inputs, dir.File("ok.safetensors"), "float64")) <= Float64Tolerance);

        // A mirror that leaves out ActNorm's log-det.
        var broken = PythonMirror.LogProb(weights, inputs, dir.File("broken.safetensors"), "float64", "actnorm");
        Assert.True(WorstRelative(ours, broken) > 1e3 * Float64Tolerance, $"dropping ActNorm's log-det went unnoticed: {Show(ours, broken)}");

        // One weight of ours changed after the export, by 1e-3.
        var (name, p) = m.named_parameters().First(np => np.name.Contains("logScale") || np.name.Contains("logS"));
        using (no_grad()) p.view(-1)[0].add_(Ops.Scalar(1e-3));
        var changed = OurLogProb(m, y);
        var mirror = PythonMirror.LogProb(weights, inputs, dir.File("unchanged.safetensors"), "float64");
        Assert.True(WorstRelative(changed, mirror) > 1e3 * Float64Tolerance, $"changing {name} after the export went unnoticed: {Show(changed, mirror)}");
    }

    [MirrorTheory]
    [InlineData("tiny", "")]
    [InlineData("tiny", "patches=bands,channelFlow=additive,hiddenDepth=2")]
    [InlineData("tiny", "channelFlow=spline,patchFlow=spline,splineBins=5,norm=batchNorm")]
    [InlineData("tiny", "channelFlow=maf,patchFlow=maf,innerSteps=3")]
    [InlineData("tiny", "classes=3")]
    [InlineData("glow-tiny", "")]
    public void Mirror_decodes_the_same_latents_to_the_same_images(string preset, string set)
    {
        PythonMirror.Require();
        using var dir = new TempDir();
        var c = Config(preset, set);
        string weights = dir.File("weights.safetensors"), latents = dir.File("latents.safetensors");
        using var m = Randomised(c, 31);
        var (z, context) = WriteDecodeCase(m, weights, latents, 32);

        var (ours32, _) = OurDecode(m, z, context);
        var mirror32 = PythonMirror.Decode(weights, latents, dir.File("d32.safetensors"), "float32");
        var mirror64 = PythonMirror.Decode(weights, latents, dir.File("d64.safetensors"), "float64");
        m.MoveTo(CPU, float64);
        var (ours64, pixels64) = OurDecode(m, z, context);

        // Not a trivial decoding: the continuous images spread over the unit interval.
        Assert.True(ours64.Max() - ours64.Min() > 0.5, $"decoded values hardly vary: {ours64.Min()} .. {ours64.Max()}");
        double worst64 = WorstAbsolute(ours64, mirror64.Continuous), worst32 = WorstAbsolute(ours32, mirror32.Continuous);
        Console.WriteLine($"{c.Name}: decoded continuous images, worst |ours - mirror| float64 {worst64:0.0e0}, float32 {worst32:0.0e0}");
        Assert.True(worst64 <= DecodeFloat64Tolerance, $"float64: decoded values differ by {worst64:0.0e0} > {DecodeFloat64Tolerance:0e0}");
        Assert.True(worst32 <= DecodeFloat32Tolerance, $"float32: decoded values differ by {worst32:0.0e0} > {DecodeFloat32Tolerance:0e0}");

        // The pixels agree wherever 256 y is not within rounding distance of a bin boundary (floor can flip there).
        int compared = 0;
        for (int i = 0; i < pixels64.Length; i++)
        {
            double v = 256 * ours64[i];
            if (Math.Abs(v - Math.Round(v)) < 1e-9) continue;
            compared++;
            Assert.True(pixels64[i] == mirror64.Images[i], $"pixel {i}: ours {pixels64[i]}, the mirror's {mirror64.Images[i]} (256 y = {v})");
        }
        Assert.True(compared > pixels64.Length / 2, $"only {compared} of {pixels64.Length} pixels away from a bin boundary");
    }

    [MirrorTheory]
    [InlineData("tiny", "actnorm")]
    [InlineData("tiny", "shift")]
    [InlineData("glow-tiny", "lulinear")]
    public void The_decode_comparison_fails_for_a_mirror_that_skips_an_inverse_step(string preset, string skip)
    {
        PythonMirror.Require();
        using var dir = new TempDir();
        string weights = dir.File("weights.safetensors"), latents = dir.File("latents.safetensors");
        using var m = Randomised(Presets.Get(preset), 41);
        var (z, context) = WriteDecodeCase(m, weights, latents, 42);
        m.MoveTo(CPU, float64);
        var (ours, _) = OurDecode(m, z, context);
        Assert.True(WorstAbsolute(ours, PythonMirror.Decode(weights, latents, dir.File("ok.safetensors"), "float64").Continuous) <= DecodeFloat64Tolerance);
        var broken = PythonMirror.Decode(weights, latents, dir.File("broken.safetensors"), "float64", skip).Continuous;
        double worst = WorstAbsolute(ours, broken);
        Assert.True(worst > 1e3 * DecodeFloat64Tolerance, $"a mirror without its {skip} inverse went unnoticed: worst difference {worst:0.0e0}");
    }

    [MirrorFact]
    public void The_mirror_refuses_an_export_whose_parameter_count_it_does_not_match()
    {
        PythonMirror.Require();
        using var dir = new TempDir();
        using var m = new ImageFlow(Presets.Get("tiny"));
        string weights = dir.File("weights.safetensors"), inputs = dir.File("inputs.safetensors");
        var state = m.state_dict();
        SafeTensors.Write(weights, state.Select(kv => (kv.Key, kv.Value)), new Dictionary<string, string>
        {
            ["mixerflow.config"] = m.Config.ToJson(),
            ["mixerflow.parameters"] = (m.ParameterCount + 1).ToString(),
        });
        SafeTensors.Write(inputs, new[] { ("inputs", Inputs(m.Config, 2, 1)) });
        var e = Assert.ThrowsAny<Xunit.Sdk.XunitException>(() => PythonMirror.LogProb(weights, inputs, dir.File("out.safetensors"), "float64"));
        Assert.Contains("parameters", e.Message);
    }

    [MirrorFact]
    public void The_speed_benchmarks_mirror_process_takes_steps_on_request_and_refuses_a_different_parameter_count()
    {
        PythonMirror.Require();
        var c = Presets.Get("tiny");
        using (var m = new MixerFlow.Speed.Mirror(c, 12_900, batch: 8, threads: 1, blasThreads: 1, sampleBatch: 16))
        {
            m.Steps(2);
            m.Evaluations(2);
            m.Steps(1);
            m.Samplings(1);
            Assert.Equal(3, m.StepMs.Count);
            Assert.Equal(2, m.EvaluationMs.Count);
            Assert.Single(m.SamplingMs);
            Assert.All(m.StepMs.Concat(m.EvaluationMs).Concat(m.SamplingMs), ms => Assert.True(ms > 0));
            // Every step's phases, each positive and together within the step.
            Assert.Equal(m.StepMs.Count, m.StepPhases.Count);
            Assert.All(m.StepPhases.Zip(m.StepMs), p => Assert.True(p.First.Forward > TimeSpan.Zero && p.First.Backward > TimeSpan.Zero && p.First.Update > TimeSpan.Zero
                && (p.First.Forward + p.First.Backward + p.First.Update).TotalMilliseconds <= p.Second + 1e-6, $"{p.First} in {p.Second} ms"));
            Assert.Contains("linear [128x24]x[24x16] x2", m.Gemms); // channel mixing: 8 images x 16 patches as rows, 24 of 49 values conditioning, 16 hidden
        }
        var e = Assert.Throws<InvalidOperationException>(() => new MixerFlow.Speed.Mirror(c, 12_901, batch: 8, threads: 1, blasThreads: 1, sampleBatch: 16));
        Assert.Contains("12,901", e.Message);
    }

    [Fact]
    public void Safetensors_round_trip_keeps_names_dtypes_shapes_values_and_metadata()
    {
        using var dir = new TempDir();
        manual_seed(3);
        var tensors = new (string, Tensor)[]
        {
            ("a.weight", randn(3, 5)), ("b", randn(2, 1, 4, dtype: float64)), ("idx", tensor(new long[] { 4, 0, 7 })),
            ("empty", zeros(0)), ("flag", zeros(new long[] { 1 }, dtype: int64)),
        };
        string path = dir.File("t.safetensors");
        SafeTensors.Write(path, tensors, new Dictionary<string, string> { ["k"] = "v \"quoted\"" });
        var bytes = File.ReadAllBytes(path);
        long headerLength = BitConverter.ToInt64(bytes, 0);
        Assert.Equal(0, (8 + headerLength) % 8);
        var (read, meta) = SafeTensors.Read(path);
        Assert.Equal("v \"quoted\"", meta["k"]);
        Assert.Equal(tensors.Length, read.Count);
        foreach (var (name, t) in tensors)
        {
            Assert.Equal(t.dtype, read[name].dtype);
            Assert.Equal(t.shape, read[name].shape);
            Assert.True(t.eq(read[name]).all().item<bool>(), name);
        }
    }

    [Fact]
    public void Export_carries_every_state_entry_the_configuration_and_the_parameter_count()
    {
        using var dir = new TempDir();
        using var m = new ImageFlow(Presets.Get("glow-tiny"));
        string path = dir.File("m.safetensors");
        m.ExportSafetensors(path);
        var (read, meta) = SafeTensors.Read(path);
        Assert.Equal(m.state_dict().Keys.OrderBy(k => k), read.Keys.OrderBy(k => k));
        Assert.Equal(m.ParameterCount.ToString(), meta["mixerflow.parameters"]);
        Assert.Equal(m.Config, ModelConfig.FromJson(meta["mixerflow.config"], path));
    }

    [Fact]
    public void Export_verb_writes_a_checkpoints_state_and_refuses_a_missing_checkpoint_in_one_line()
    {
        using var dir = new TempDir();
        new MixerFlow.Host.Training.Trainer(new MixerFlow.Host.Training.TrainingSettings
        {
            Model = Presets.Get("tiny"), RunFolder = dir.File("run"), Steps = 2, BatchSize = 8, Pictures = false,
        }).Run();
        string ckpt = Path.Combine(dir.Path, "run", MixerFlow.Host.Training.Trainer.LastCheckpoint), path = dir.File("tiny.safetensors");
        var (code, output, err) = CliInProcess.Run("export", "--checkpoint", ckpt, "--out", path);
        Assert.True(code == 0, err);
        Assert.Contains("12,900 parameters", output);
        var (model, _) = Checkpoint.Load(ckpt);
        var (read, meta) = SafeTensors.Read(path);
        Assert.Equal(model.Config, ModelConfig.FromJson(meta["mixerflow.config"], path));
        foreach (var (name, t) in model.state_dict())
            Assert.True(t.eq(read[name]).all().item<bool>(), $"{name} differs in the export");
        Assert.True(read.Keys.All(k => k.EndsWith("initialized") ? read[k].item<long>() == 1 : true), "ActNorm exported uninitialised after training");

        (code, _, err) = CliInProcess.Run("export", "--checkpoint", dir.File("missing.ckpt"), "--out", dir.File("x.safetensors"));
        Assert.Equal(2, code);
        Assert.Single(err.Trim().Split('\n'));
        Assert.Contains("missing.ckpt", err);
    }

    [Fact]
    public void Reading_a_file_that_is_not_safetensors_names_the_file()
    {
        using var dir = new TempDir();
        string path = dir.File("bad.safetensors");
        File.WriteAllBytes(path, new byte[] { 200, 0, 0, 0, 0, 0, 0, 0, (byte)'{', (byte)'}' });
        var e = Assert.Throws<MixerFlow.Host.UserError>(() => SafeTensors.Read(path));
        Assert.Contains(path, e.Message);
    }
}

/// <summary>Runs benchmarks/mirror/mixerflow_mirror.py (copied beside the test assembly) with Debian's python3.</summary>
static class PythonMirror
{
    /// <summary>Debian's interpreter; MIXERFLOW_MIRROR_PYTHON names another (to try the tests' failure without torch, say).</summary>
    public static string Python => Environment.GetEnvironmentVariable("MIXERFLOW_MIRROR_PYTHON") is { Length: > 0 } p ? p : "/usr/bin/python3";
    public const string SkipVariable = "MIXERFLOW_SKIP_MIRROR";
    public static string Script => Path.Combine(AppContext.BaseDirectory, "mirror", "mixerflow_mirror.py");

    static readonly Lazy<string?> problem = new(() =>
    {
        if (!File.Exists(Python)) return $"{Python} is absent";
        var (code, _, err) = Run(new[] { "-c", "import torch" }, TimeSpan.FromSeconds(120));
        return code == 0 ? null : $"{Python} cannot import torch ({err.Trim().Split('\n').LastOrDefault()})";
    });

    /// <summary>Why the mirror cannot run here, or null when it can.</summary>
    public static string? Problem => problem.Value;

    /// <summary>Fails the test, saying how to install python3-torch, when the mirror cannot run here.</summary>
    public static void Require()
    {
        if (Problem is { } why)
            Assert.Fail($"the PyTorch mirror cannot run: {why}. Install it with `apt-get install python3-torch libopenblas0-pthread` " +
                        $"(Debian), or set {SkipVariable}=1 to skip the mirror tests");
    }

    public static bool SkipRequested => Environment.GetEnvironmentVariable(SkipVariable) == "1";

    /// <summary>Runs python with OpenBLAS at one thread and its full speed (see /work/shared/NOTES.md).</summary>
    public static (int Code, string Out, string Err) Run(IEnumerable<string> args, TimeSpan timeout)
    {
        var psi = new ProcessStartInfo(Python) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.Environment.Remove("OPENBLAS_CORETYPE");
        psi.Environment.Remove("OPENBLAS_L2_SIZE");
        psi.Environment["OPENBLAS_NUM_THREADS"] = "1";
        psi.Environment["OMP_NUM_THREADS"] = "1";
        using var p = Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {Python}");
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{Python} {string.Join(" ", args)} ran longer than {timeout.TotalSeconds} s");
        }
        p.WaitForExit();
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>The mirror's log p per image (nats) of the inputs under the exported weights.</summary>
    public static double[] LogProb(string weights, string inputs, string output, string dtype, string? dropLogDet = null)
    {
        Require();
        Assert.True(File.Exists(Script), $"the mirror script is not beside the tests: {Script}");
        var args = new List<string> { Script, "logprob", "--weights", weights, "--inputs", inputs, "--out", output, "--dtype", dtype };
        if (dropLogDet is not null) { args.Add("--drop-logdet"); args.Add(dropLogDet); }
        var (code, stdout, stderr) = Run(args, TimeSpan.FromSeconds(300));
        Assert.True(code == 0, $"the mirror failed (exit {code}): {stderr}{stdout}");
        var (tensors, _) = SafeTensors.Read(output);
        return tensors["logprob"].data<double>().ToArray();
    }

    /// <summary>The mirror's decoding of the latents under the exported weights: continuous images and pixels, flattened.</summary>
    public static (double[] Continuous, double[] Images) Decode(string weights, string latents, string output, string dtype, string? skipInverse = null)
    {
        Require();
        Assert.True(File.Exists(Script), $"the mirror script is not beside the tests: {Script}");
        var args = new List<string> { Script, "decode", "--weights", weights, "--latents", latents, "--out", output, "--dtype", dtype };
        if (skipInverse is not null) { args.Add("--skip-inverse"); args.Add(skipInverse); }
        var (code, stdout, stderr) = Run(args, TimeSpan.FromSeconds(300));
        Assert.True(code == 0, $"the mirror failed (exit {code}): {stderr}{stdout}");
        var (tensors, _) = SafeTensors.Read(output);
        return (tensors["continuous"].flatten().data<double>().ToArray(), tensors["images"].flatten().data<double>().ToArray());
    }

    public static string SkipReason =>
        $"{SkipVariable}=1 and the PyTorch mirror cannot run here: {Problem}; install it with `apt-get install python3-torch libopenblas0-pthread`";
}

/// <summary>A temporary folder, deleted on dispose.</summary>
sealed class TempDir : IDisposable
{
    public string Path { get; } = Directory.CreateTempSubdirectory("mixerflow-mirror-").FullName;
    public string File(string name) => System.IO.Path.Combine(Path, name);
    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { }
    }
}

/// <summary>
/// A fact that needs the PyTorch mirror: it fails (with how to install python3-torch) when
/// /usr/bin/python3 cannot import torch, and is skipped instead when MIXERFLOW_SKIP_MIRROR=1.
/// </summary>
sealed class MirrorFactAttribute : FactAttribute
{
    public MirrorFactAttribute()
    {
        if (PythonMirror.SkipRequested && PythonMirror.Problem is not null) Skip = PythonMirror.SkipReason;
    }
}

/// <summary>The theory form of <see cref="MirrorFactAttribute"/>.</summary>
sealed class MirrorTheoryAttribute : TheoryAttribute
{
    public MirrorTheoryAttribute()
    {
        if (PythonMirror.SkipRequested && PythonMirror.Problem is not null) Skip = PythonMirror.SkipReason;
    }
}
