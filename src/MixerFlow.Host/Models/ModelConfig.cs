using System.Text.Json;
using System.Text.Json.Serialization;
using MixerFlow.Core;

namespace MixerFlow.Host.Models;

/// <summary>Which family a configuration builds.</summary>
public enum ModelKind { MixerFlow, Glow }

/// <summary>The vector flow inside a mixing step.</summary>
public enum InnerFlow { Affine, Additive, Spline, Maf }

/// <summary>The normalisation after each mixing flow.</summary>
public enum Normalisation { ActNorm, BatchNorm }

/// <summary>The type MixerFlow's coupling conditioners compute in (see
/// <see cref="MixerFlowConfig.ConditionerPrecision"/>).</summary>
public enum ConditionerPrecision { Float32, Bfloat16 }

/// <summary>The network of MixerFlow's coupling conditioners (see <see cref="MixerFlowConfig.Conditioner"/>).</summary>
public enum ConditionerKind { Mlp, Kan }

/// <summary>How an image model dequantises its 8-bit pixels (see <see cref="ModelConfig.Dequantization"/>).</summary>
public enum DequantizationKind
{
    /// <summary>Uniform noise u ~ U[0, 1) (Core's <see cref="Dequantize"/>).</summary>
    Uniform,
    /// <summary>Noise from a learned flow q(u | x) (Flow++; Core's <see cref="VariationalDequantize"/>).</summary>
    Variational,
}

/// <summary>
/// Everything that defines an image model; saved with every checkpoint (as JSON with a
/// <c>kind</c> field), so a model can be rebuilt from its file alone. The fields every family
/// shares live here; <see cref="MixerFlowConfig"/> and <see cref="GlowConfig"/> add their own.
/// </summary>
[JsonPolymorphic(TypeDiscriminatorPropertyName = "kind")]
[JsonDerivedType(typeof(MixerFlowConfig), "mixerFlow")]
[JsonDerivedType(typeof(GlowConfig), "glow")]
public abstract partial record ModelConfig
{
    public string Name { get; init; } = "custom";
    public int Channels { get; init; } = 1;
    public int Height { get; init; } = 28;
    public int Width { get; init; } = 28;
    /// <summary>Logit margin alpha (RealNVP): pixels in [0, 1] map to logit(alpha + (1 - 2 alpha) x).</summary>
    public double Alpha { get; init; } = 0.05;
    [JsonIgnore] public abstract ModelKind Kind { get; }
    [JsonIgnore] public long[] ImageShape => new long[] { Channels, Height, Width };
    [JsonIgnore] public long Dimensions => (long)Channels * Height * Width;

    /// <summary>Every problem with the configuration, each naming the field.</summary>
    public IReadOnlyList<string> Problems()
    {
        var p = new List<string>();
        if (Channels < 1 || Height < 1 || Width < 1) p.Add($"channels / height / width: must be >= 1, got {Channels}x{Height}x{Width}");
        else if (Channels > MaxChannels) p.Add($"channels: must be <= {MaxChannels}, got {Channels}");
        else if (Height > MaxSide) p.Add($"height: must be <= {MaxSide}, got {Height}");
        else if (Width > MaxSide) p.Add($"width: must be <= {MaxSide}, got {Width}");
        else
        {
            int before = p.Count;
            FamilyProblems(p);
            DequantizationProblems(p);
            if (p.Count == before && EstimatedParameters() + DequantizerParameters() is var n && n > MaxParameters)
                p.Add($"{SizeFields}{(Variational ? " / dequantizationLayers / dequantizationWidth" : "")}: the model would have about {n:0.##e0} parameters, more than {MaxParameters:0.##e0}");
        }
        if (!(Alpha > 0 && Alpha < 0.5)) p.Add($"alpha: must lie in (0, 0.5), got {Alpha}");
        return p;
    }

    // Bounds on every size field, so that a crafted configuration (a checkpoint's, a file's) is
    // refused by name instead of failing in a native allocation or building for hours.
    public const int MaxChannels = 64;
    public const int MaxSide = 4096;
    /// <summary>The largest model built: 1e9 parameters, 4 GB of float32 weights.</summary>
    public const double MaxParameters = 1e9;

    /// <summary>A rough count of the model's parameters (only its order of magnitude matters).</summary>
    protected abstract double EstimatedParameters();

    /// <summary>
    /// A rough count of the float32 values one image's training step keeps for the backward pass
    /// (the conditioners' hidden activations and the flow's intermediate tensors).
    /// </summary>
    protected abstract double EstimatedActivationsPerImage();

    /// <summary>
    /// A rough estimate, in bytes, of the memory a float32 training step at
    /// <paramref name="batchSize"/> images needs: the weights, their gradients and Adam's two
    /// moments (4 values per parameter) plus the activations of the batch. Only its order of
    /// magnitude matters; call it on a configuration without <see cref="Problems"/>.
    /// </summary>
    public double EstimatedTrainingBytes(int batchSize) =>
        sizeof(float) * (4 * (EstimatedParameters() + DequantizerParameters())
                         + (double)batchSize * (EstimatedActivationsPerImage() + DequantizerActivationsPerImage()));

    /// <summary>The fields that set the model's size, named when the parameter bound is exceeded.</summary>
    protected abstract string SizeFields { get; }

    /// <summary>Adds a problem naming <paramref name="field"/> unless <paramref name="low"/> &lt;= value &lt;= <paramref name="high"/>.</summary>
    protected static bool InRange(List<string> problems, string field, int value, int low, int high)
    {
        if (value >= low && value <= high) return true;
        problems.Add($"{field}: must lie in [{low}, {high}], got {value}");
        return false;
    }

    /// <summary>The family's own problems (the image shape is valid when this is called).</summary>
    protected abstract void FamilyProblems(List<string> problems);

    /// <summary>Builds the model's bijector (everything after dequantisation), with its parts grouped.</summary>
    public abstract BuiltFlow Build();

    static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true,
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        Converters = { new JsonStringEnumConverter(JsonNamingPolicy.CamelCase) },
        // Checkpoints of version 1 wrote "kind" after "name".
        AllowOutOfOrderMetadataProperties = true,
    };

    public string ToJson() => JsonSerializer.Serialize<ModelConfig>(this, Json);

    /// <summary>
    /// This configuration with fields changed by name, as <c>--set key=value</c> does:
    /// <c>Presets.Get("tiny").With([("shift", "false"), ("channelFlow", "spline")])</c>.
    /// Keys are the JSON names (case-insensitive); see <see cref="ConfigOverrides"/>.
    /// </summary>
    /// <exception cref="UserError">An unknown key, a bad value or a value out of bounds, naming the field and what it accepts.</exception>
    public ModelConfig With(IEnumerable<(string Key, string Value)> overrides, string source = "--set") =>
        ConfigOverrides.Apply(this, overrides, source);

    /// <summary>Parses a configuration; <paramref name="source"/> names the file in errors.</summary>
    public static ModelConfig FromJson(string json, string source) => FromJson(json, source, check: true);

    internal static ModelConfig FromJson(string json, string source, bool check)
    {
        ModelConfig? c;
        try { c = JsonSerializer.Deserialize<ModelConfig>(json, Json); }
        catch (JsonException e) { throw new UserError($"{source}: invalid model configuration at {e.Path ?? "?"}: {e.Message}"); }
        catch (NotSupportedException e) { throw new UserError($"{source}: invalid model configuration: {e.Message} (a \"kind\" of mixerFlow or glow is required)"); }
        if (c is null) throw new UserError($"{source}: empty model configuration");
        if (!check) return c;
        var problems = c.Problems();
        if (problems.Count > 0) throw new UserError($"{source}: {string.Join("; ", problems)}");
        return c;
    }
}

/// <summary>MixerFlow: patches x channels, a channel-mixing and a patch-mixing flow per layer.</summary>
public sealed record MixerFlowConfig : ModelConfig
{
    [JsonIgnore] public override ModelKind Kind => ModelKind.MixerFlow;
    public PatchStrategy Patches { get; init; } = PatchStrategy.Square;
    public int PatchSize { get; init; } = 4;
    public int Layers { get; init; } = 4;
    public InnerFlow ChannelFlow { get; init; } = InnerFlow.Affine;
    public InnerFlow PatchFlow { get; init; } = InnerFlow.Affine;
    public int InnerSteps { get; init; } = 2;
    public int HiddenWidth { get; init; } = 128;
    public int HiddenDepth { get; init; } = 1;
    public Normalisation Norm { get; init; } = Normalisation.ActNorm;
    /// <summary>The type the coupling conditioners compute their products in: Float32 (the
    /// default) or BFloat16, with float32 parameters, results and gradients
    /// (<see cref="Conditioners.Mlp(long, int, TorchSharp.torch.ScalarType)"/>). Used only when
    /// the model runs in float32; the MAF's masked networks keep float32.</summary>
    public ConditionerPrecision ConditionerPrecision { get; init; } = ConditionerPrecision.Float32;
    /// <summary>The coupling conditioners' network: Mlp (the default; ReLU perceptrons) or Kan
    /// (Kolmogorov-Arnold networks, <see cref="Conditioners.Kan(long, int, int, double)"/>, with
    /// hiddenDepth hidden layers of hiddenWidth units). Applies to the channel- and patch-mixing
    /// couplings; a MAF's masked networks stay perceptrons, so Kan and Maf do not go together.
    /// Configurations written before the field existed read as Mlp.</summary>
    public ConditionerKind Conditioner { get; init; } = ConditionerKind.Mlp;
    /// <summary>Intervals of a Kan conditioner's B-spline grid (cubic splines: kanGrid + 3 basis functions per edge).</summary>
    public int KanGrid { get; init; } = Conditioners.KanIntervals;
    /// <summary>Half-width r of a Kan conditioner's grid [-r, r]; beyond it only the silu base part of each edge varies.</summary>
    public double KanRange { get; init; } = Conditioners.KanRange;
    public bool Shift { get; init; } = true;
    public int SplineBins { get; init; } = 8;
    public double SplineBound { get; init; } = 3.0;
    /// <summary>
    /// Classes of a class-conditional model (0: unconditional). Every channel- and patch-mixing
    /// conditioner then also sees the one-hot class: <c>LogProb(x, ImageFlow.OneHot(labels))</c>.
    /// </summary>
    public int Classes { get; init; }
    /// <summary>
    /// Multi-scale MixerFlow: the layers (numbered from 1, increasing, each below <see cref="Layers"/>)
    /// after which half of every patch's values leave for the base distribution, under a learned
    /// Gaussian prior conditioned on the half that stays (Glow's split prior, row by row); the later
    /// layers mix the matrix of the values that stay, without patch shifts. Empty (the default, and
    /// what files written before the field existed read as): no split.
    /// </summary>
    public LayerList SplitAfter { get; init; } = LayerList.Empty;

    /// <summary>The patch layout (Core's <see cref="PatchGeometry"/>); throws for a layout that does not tile the image.</summary>
    [JsonIgnore] public PatchGeometry Geometry => new(ImageShape, Patches, PatchSize);

    protected override void FamilyProblems(List<string> p)
    {
        // Core validates what it builds; its messages are reported under the field that fed it.
        var g = Validated(p, "patchSize", () => Geometry);
        if (g is not null)
        {
            if (g.Patches < 2) p.Add($"patchSize: {Patches} patches of size {PatchSize} give {g.Patches} patch; patch mixing needs at least 2");
            if (g.Features < 2) p.Add($"patchSize: patches hold {g.Features} value; channel mixing needs at least 2");
            if (PatchFlow == InnerFlow.Maf && g.Patches > 256) p.Add("patchFlow: MAF over more than 256 patches makes sampling too slow; use a coupling");
        }
        InRange(p, "layers", Layers, 1, MaxLayers);
        InRange(p, "innerSteps", InnerSteps, 1, MaxInnerSteps);
        if (Classes < 0) p.Add($"classes: must be >= 0 (0: unconditional), got {Classes}");
        else InRange(p, "classes", Classes, 0, MaxClasses);
        bool hidden = InRange(p, "hiddenWidth", HiddenWidth, 1, MaxHiddenWidth) & InRange(p, "hiddenDepth", HiddenDepth, 0, MaxHiddenDepth);
        if (hidden) Validated(p, "hiddenWidth / hiddenDepth", () => Conditioners.Mlp(HiddenWidth, HiddenDepth));
        ConditionerProblems(p);
        SplitProblems(p, g);
        if (ChannelFlow == InnerFlow.Spline || PatchFlow == InnerFlow.Spline)
        {
            if (!(SplineBound > 0 && SplineBound <= MaxSplineBound))
                p.Add($"splineBound: must lie in (0, {MaxSplineBound}], got {SplineBound}");
            else if (InRange(p, "splineBins", SplineBins, 1, MaxSplineBins))
                Validated(p, "splineBins / splineBound", () => new RationalQuadratic(SplineBins, SplineBound));
        }
    }

    /// <summary>The problems of the conditioner fields (conditioner, kanGrid, kanRange).</summary>
    void ConditionerProblems(List<string> p)
    {
        if (!Enum.IsDefined(Conditioner))
        {
            p.Add($"conditioner: must be one of mlp, kan, got {Conditioner}");
            return;
        }
        if (Conditioner != ConditionerKind.Kan) return;
        if (ChannelFlow == InnerFlow.Maf || PatchFlow == InnerFlow.Maf)
            p.Add("conditioner: kan applies to coupling flows; a MAF (channelFlow / patchFlow = maf) keeps its masked perceptron");
        if (ConditionerPrecision != ConditionerPrecision.Float32)
            p.Add($"conditionerPrecision: {ConditionerPrecision.ToString().ToLowerInvariant()} applies to mlp conditioners only; kan computes in float32");
        if (!(KanRange > 0 && KanRange <= MaxSplineBound)) p.Add($"kanRange: must lie in (0, {MaxSplineBound}], got {KanRange}");
        if (InRange(p, "kanGrid", KanGrid, 1, MaxKanGrid) && KanRange > 0 && KanRange <= MaxSplineBound && HiddenWidth >= 1 && HiddenDepth >= 1)
            Validated(p, "kanGrid / kanRange", () => Conditioners.Kan(HiddenWidth, HiddenDepth, KanGrid, KanRange));
    }

    /// <summary>The problems of <see cref="SplitAfter"/>: its layer numbers and the width they leave.</summary>
    void SplitProblems(List<string> p, PatchGeometry? g)
    {
        if (SplitAfter is null) { p.Add("splitAfter: must be a list of layer numbers (empty: no split)"); return; }
        if (SplitAfter.Count == 0 || Layers < 1 || Layers > MaxLayers) return;
        int previous = 0;
        foreach (int s in SplitAfter)
        {
            if (s <= previous || s >= Layers)
            {
                p.Add($"splitAfter: layer numbers must increase and lie in [1, {Layers - 1}] (layers - 1: a split needs a layer after it), got {SplitAfter}");
                return;
            }
            previous = s;
        }
        if (g is not null && KeptFeatures(g.Features, SplitAfter.Count) < 2)
            p.Add($"splitAfter: {SplitAfter.Count} splits halve each patch's {g.Features} values to {KeptFeatures(g.Features, SplitAfter.Count)}; channel mixing needs at least 2");
    }

    /// <summary>The values per patch that stay after <paramref name="splits"/> splits of
    /// <paramref name="features"/> (each keeps the first half, rounded down).</summary>
    public static long KeptFeatures(long features, int splits)
    {
        for (int i = 0; i < splits; i++) features /= 2;
        return features;
    }

    public const int MaxKanGrid = 256;
    public const int MaxLayers = 256;
    public const int MaxInnerSteps = 64;
    public const int MaxHiddenWidth = 65536;
    public const int MaxHiddenDepth = 16;
    public const int MaxSplineBins = 1024;
    public const int MaxClasses = 100000;
    /// <summary>
    /// The largest spline interval [-splineBound, splineBound]: the spline's knots are float32, and
    /// far larger bounds give non-finite losses within a few steps (1e8 did on the tiny preset) and 1e39 overflows float32.
    /// </summary>
    public const double MaxSplineBound = 1e4;

    protected override string SizeFields => "layers / innerSteps / hiddenWidth / hiddenDepth / classes";

    protected override double EstimatedParameters()
    {
        var g = Geometry;
        double outputs = (ChannelFlow == InnerFlow.Spline || PatchFlow == InnerFlow.Spline) ? 3.0 * SplineBins + 1 : 2;
        // A Kan conditioner has kanGrid + 5 parameters per edge where a perceptron has one weight.
        double perEdge = Conditioner == ConditionerKind.Kan ? KanGrid + 5.0 : 1.0;
        double Mlp(double inputs) => perEdge *
            ((inputs + Classes) * HiddenWidth + Math.Max(0, HiddenDepth - 1) * (double)HiddenWidth * HiddenWidth + HiddenWidth * inputs * outputs);
        return (double)Layers * InnerSteps * (Mlp(g.Features) + Mlp(g.Patches));
    }

    /// <summary>
    /// Per layer and inner step: the channel-mixing conditioner runs on every patch and the
    /// patch-mixing one on every feature, each keeping its hidden layers (before and after the
    /// activation) and its outputs; the flow keeps a few image-sized tensors besides.
    /// </summary>
    protected override double EstimatedActivationsPerImage()
    {
        var g = Geometry;
        double outputs = (ChannelFlow == InnerFlow.Spline || PatchFlow == InnerFlow.Spline) ? 3.0 * SplineBins + 1 : 2;
        double hidden = 2.0 * HiddenWidth * Math.Max(1, HiddenDepth) * (g.Patches + g.Features);
        // A Kan layer keeps its inputs' B-spline bases (kanGrid + 3 per input, a few per order).
        if (Conditioner == ConditionerKind.Kan) hidden *= 2.0 * (KanGrid + 3);
        return (double)Layers * InnerSteps * (hidden + (outputs + 4) * Dimensions) + 8.0 * Layers * Dimensions;
    }

    /// <summary>Runs a Core constructor; its ArgumentException becomes a problem named after <paramref name="field"/>.</summary>
    static T? Validated<T>(List<string> problems, string field, Func<T> build) where T : class
    {
        try { return build(); }
        catch (ArgumentException e)
        {
            problems.Add($"{field}: {e.Message.Split(" (Parameter")[0]}");
            return null;
        }
    }

    public override BuiltFlow Build() => MixerFlowBuilder.Build(this);
}

/// <summary>Multi-scale Glow: squeeze, K steps of ActNorm, 1x1 convolution and affine coupling per level, split priors.</summary>
public sealed record GlowConfig : ModelConfig
{
    [JsonIgnore] public override ModelKind Kind => ModelKind.Glow;
    public int Levels { get; init; } = 3;
    public int StepsPerLevel { get; init; } = 8;
    public int GlowWidth { get; init; } = 256;

    protected override void FamilyProblems(List<string> p)
    {
        if (!InRange(p, "levels", Levels, 1, MaxLevels)) return;
        InRange(p, "stepsPerLevel", StepsPerLevel, 1, MaxStepsPerLevel);
        InRange(p, "glowWidth", GlowWidth, 1, MaxGlowWidth);
        long h = Height, w = Width;
        for (int l = 0; l < Levels; l++)
        {
            if (h % 2 != 0 || w % 2 != 0) { p.Add($"levels: {Levels} levels halve the image {Levels} times; {Height}x{Width} cannot be squeezed at level {l + 1}"); break; }
            h /= 2; w /= 2;
        }
    }

    public const int MaxLevels = 8;
    public const int MaxStepsPerLevel = 256;
    public const int MaxGlowWidth = 65536;

    protected override string SizeFields => "levels / stepsPerLevel / glowWidth";

    /// <summary>Per step a coupling network (3x3, 1x1 and 3x3 convolutions of glowWidth) at each level's channel count.</summary>
    protected override double EstimatedParameters()
    {
        double total = 0, c = Channels;
        for (int l = 0; l < Levels; l++)
        {
            c *= 4;
            total += (double)StepsPerLevel * (9 * c / 2 * GlowWidth + (double)GlowWidth * GlowWidth + 9 * GlowWidth * c + c * c);
            c /= 2;
        }
        return total;
    }

    /// <summary>Per step of each level: the coupling network's two hidden feature maps of glowWidth
    /// (before and after the activation) and a few tensors of the level's shape.</summary>
    protected override double EstimatedActivationsPerImage()
    {
        double total = 0, c = Channels, pixels = (double)Height * Width;
        for (int l = 0; l < Levels; l++)
        {
            c *= 4;
            pixels /= 4;
            total += StepsPerLevel * pixels * (4.0 * GlowWidth + 8 * c);
            c /= 2;
        }
        return total;
    }

    public override BuiltFlow Build() => GlowBuilder.Build(this);
}
