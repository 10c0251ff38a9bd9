using MixerFlow.Core;

namespace MixerFlow.Host.Models;

/// <summary>Named configurations.</summary>
public static class Presets
{
    /// <summary>The preset of the README's main command.</summary>
    public const string Default = "fashion-mnist";

    /// <summary>The preset names, in table order.</summary>
    public static IReadOnlyList<string> Names => All.Keys.ToList();

    public static readonly IReadOnlyDictionary<string, ModelConfig> All = new Dictionary<string, ModelConfig>
    {
        // 28x28x1; 4x4 patches: 49 patches of 16 values. Sized for minutes of training on 2 CPU cores.
        ["fashion-mnist"] = new MixerFlowConfig
        {
            Name = "fashion-mnist", Channels = 1, Height = 28, Width = 28, PatchSize = 4, Layers = 4,
            InnerSteps = 2, HiddenWidth = 96, HiddenDepth = 1,
        },
        // 28x28x1, the quality recipe (experiments/quality.json): twice the layers of fashion-mnist and
        // conditioners with two hidden layers of 128; about 1.5 hours on one core of the 2-core machine.
        ["fashion-mnist-quality"] = new MixerFlowConfig
        {
            Name = "fashion-mnist-quality", Channels = 1, Height = 28, Width = 28, PatchSize = 4, Layers = 8,
            InnerSteps = 2, HiddenWidth = 128, HiddenDepth = 2,
        },
        // 32x32x3; 4x4 patches: 64 patches of 48 values. The seed design's headline: ~7.5M parameters.
        ["cifar10"] = new MixerFlowConfig
        {
            Name = "cifar10", Channels = 3, Height = 32, Width = 32, PatchSize = 4, Layers = 8,
            InnerSteps = 2, HiddenWidth = 440, HiddenDepth = 2,
        },
        // 64x64x3; 8x8 patches: 64 patches of 192 values.
        ["imagenet64"] = new MixerFlowConfig
        {
            Name = "imagenet64", Channels = 3, Height = 64, Width = 64, PatchSize = 8, Layers = 6,
            InnerSteps = 2, HiddenWidth = 400, HiddenDepth = 2,
        },
        // 28x28x1 (784 dimensions, fits the embedded data) with few, small parts: for tests and
        // smoke runs; float64 Jacobians of the whole model take about a second.
        ["tiny"] = new MixerFlowConfig
        {
            Name = "tiny", Channels = 1, Height = 28, Width = 28, PatchSize = 7, Layers = 2,
            InnerSteps = 2, HiddenWidth = 16, HiddenDepth = 1,
        },
        ["glow-fashion-mnist"] = new GlowConfig
        {
            Name = "glow-fashion-mnist", Channels = 1, Height = 28, Width = 28,
            Levels = 2, StepsPerLevel = 4, GlowWidth = 72,
        },
        ["glow-cifar10"] = new GlowConfig
        {
            Name = "glow-cifar10", Channels = 3, Height = 32, Width = 32,
            Levels = 3, StepsPerLevel = 8, GlowWidth = 392,
        },
        ["glow-tiny"] = new GlowConfig
        {
            Name = "glow-tiny", Channels = 1, Height = 8, Width = 8,
            Levels = 2, StepsPerLevel = 2, GlowWidth = 8,
        },
    };

    /// <summary>The preset named <paramref name="name"/>; a <see cref="UserError"/> listing the known names otherwise.</summary>
    public static ModelConfig Get(string name) =>
        All.TryGetValue(name, out var c)
            ? c
            : throw new UserError($"unknown preset '{name}'; known presets: {string.Join(", ", All.Keys)}");

    /// <summary>A MixerFlow preset, typed for <c>with</c> changes of its fields.</summary>
    public static MixerFlowConfig MixerFlow(string name) =>
        Get(name) as MixerFlowConfig ?? throw new UserError($"preset '{name}' is not a MixerFlow model");

    /// <summary>A Glow preset, typed for <c>with</c> changes of its fields.</summary>
    public static GlowConfig Glow(string name) =>
        Get(name) as GlowConfig ?? throw new UserError($"preset '{name}' is not a Glow model");
}
