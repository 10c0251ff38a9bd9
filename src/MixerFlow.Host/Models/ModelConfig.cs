using System.Text.Json;
using System.Text.Json.Serialization;
using MixerFlow.Core;

namespace MixerFlow.Host.Models;

public enum ModelKind { MixerFlow, Glow }

/// <summary>The vector flow inside a mixing step.</summary>
public enum InnerFlow { Affine, Additive, Spline, Maf }

public enum Normalisation { ActNorm, BatchNorm }

/// <summary>
/// Everything that defines a model; saved with every checkpoint, so a model can be rebuilt
/// from its file alone. MixerFlow fields and Glow fields live side by side; Kind says which apply.
/// </summary>
public sealed record ModelConfig
{
    public string Name { get; init; } = "custom";
    public ModelKind Kind { get; init; } = ModelKind.MixerFlow;
    public int Channels { get; init; } = 1;
    public int Height { get; init; } = 28;
    public int Width { get; init; } = 28;
    /// <summary>Logit margin alpha (RealNVP).</summary>
    public double Alpha { get; init; } = 0.05;

    // MixerFlow
    public PatchStrategy Patches { get; init; } = PatchStrategy.Square;
    public int PatchSize { get; init; } = 4;
    public int Layers { get; init; } = 4;
    public InnerFlow ChannelFlow { get; init; } = InnerFlow.Affine;
    public InnerFlow PatchFlow { get; init; } = InnerFlow.Affine;
    public int InnerSteps { get; init; } = 2;
    public int HiddenWidth { get; init; } = 128;
    public int HiddenDepth { get; init; } = 1;
    public Normalisation Norm { get; init; } = Normalisation.ActNorm;
    public bool Shift { get; init; } = true;
    public int SplineBins { get; init; } = 8;
    public double SplineBound { get; init; } = 3.0;

    // Glow
    public int Levels { get; init; } = 3;
    public int StepsPerLevel { get; init; } = 8;
    public int GlowWidth { get; init; } = 256;

    [JsonIgnore] public long[] ImageShape => new long[] { Channels, Height, Width };
    [JsonIgnore] public long Dimensions => (long)Channels * Height * Width;

    /// <summary>Every problem with the configuration, each naming the field.</summary>
    public IReadOnlyList<string> Problems()
    {
        var p = new List<string>();
        if (Channels < 1 || Height < 1 || Width < 1) p.Add($"image shape: channels, height, width must be >= 1, got {Channels}x{Height}x{Width}");
        if (!(Alpha > 0 && Alpha < 0.5)) p.Add($"alpha: must lie in (0, 0.5), got {Alpha}");
        if (Kind == ModelKind.MixerFlow)
        {
            var (ph, pw) = PatchDims();
            if (PatchSize < 1 || Height % ph != 0 || Width % pw != 0)
                p.Add($"patchSize: {Patches} patches of size {PatchSize} do not tile a {Height}x{Width} image");
            else
            {
                if (PatchCount < 2) p.Add($"patchSize: {Patches} patches of size {PatchSize} give {PatchCount} patch; patch mixing needs at least 2");
                if (PatchFeatures < 2) p.Add($"patchSize: patches hold {PatchFeatures} value; channel mixing needs at least 2");
            }
            if (Layers < 1) p.Add($"layers: must be >= 1, got {Layers}");
            if (InnerSteps < 1) p.Add($"innerSteps: must be >= 1, got {InnerSteps}");
            if (HiddenWidth < 1 || HiddenDepth < 1) p.Add($"hiddenWidth / hiddenDepth: must be >= 1, got {HiddenWidth} / {HiddenDepth}");
            if (PatchFlow == InnerFlow.Maf && PatchCount > 256) p.Add("patchFlow: MAF over more than 256 patches makes sampling too slow; use a coupling");
            if (SplineBins < 2 || !(SplineBound > 0)) p.Add($"splineBins / splineBound: need >= 2 bins and bound > 0, got {SplineBins} / {SplineBound}");
        }
        else
        {
            if (Levels < 1 || StepsPerLevel < 1 || GlowWidth < 1) p.Add($"levels / stepsPerLevel / glowWidth: must be >= 1, got {Levels} / {StepsPerLevel} / {GlowWidth}");
            long h = Height, w = Width;
            for (int l = 0; l < Levels; l++)
            {
                if (h % 2 != 0 || w % 2 != 0) { p.Add($"levels: {Levels} levels halve the image {Levels} times; {Height}x{Width} cannot be squeezed at level {l + 1}"); break; }
                h /= 2; w /= 2;
            }
        }
        return p;
    }

    public (long Height, long Width) PatchDims() => Patches switch
    {
        PatchStrategy.Square => (PatchSize, PatchSize),
        PatchStrategy.Bands => (PatchSize, Width),
        _ => (Height, PatchSize),
    };

    [JsonIgnore] public long PatchCount { get { var (ph, pw) = PatchDims(); return (Height / ph) * (Width / pw); } }
    [JsonIgnore] public long PatchFeatures { get { var (ph, pw) = PatchDims(); return Channels * ph * pw; } }

    static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true,
        PropertyNamingPolicy = JsonNamingPolicy.CamelCase,
        Converters = { new JsonStringEnumConverter(JsonNamingPolicy.CamelCase) },
    };

    public string ToJson() => JsonSerializer.Serialize(this, Json);

    /// <summary>Parses a configuration; `source` names the file in errors.</summary>
    public static ModelConfig FromJson(string json, string source)
    {
        ModelConfig? c;
        try { c = JsonSerializer.Deserialize<ModelConfig>(json, Json); }
        catch (JsonException e) { throw new UserError($"{source}: invalid model configuration at {e.Path ?? "?"}: {e.Message}"); }
        if (c is null) throw new UserError($"{source}: empty model configuration");
        var problems = c.Problems();
        if (problems.Count > 0) throw new UserError($"{source}: {string.Join("; ", problems)}");
        return c;
    }
}
