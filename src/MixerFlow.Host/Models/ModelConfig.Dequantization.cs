using System.Text.Json.Serialization;
using MixerFlow.Core;

namespace MixerFlow.Host.Models;

/// <summary>The dequantisation fields every family shares: uniform or variational (a learned noise flow).</summary>
public abstract partial record ModelConfig
{
    /// <summary>
    /// Uniform (the default) or variational dequantisation: the noise u added to the pixels comes
    /// from a flow q(u | x) trained with the model, and log-likelihoods and bits/dim are the
    /// variational bound E_q[log p(x + u) - log q(u | x)] (<see cref="VariationalDequantize"/>).
    /// Configurations written before the field existed read as Uniform.
    /// </summary>
    public DequantizationKind Dequantization { get; init; } = DequantizationKind.Uniform;
    /// <summary>Variational dequantisation: affine couplings of the noise flow (<see cref="DequantizationFlow"/>).</summary>
    public int DequantizationLayers { get; init; } = 4;
    /// <summary>Variational dequantisation: channels of the noise flow's hidden convolutions.</summary>
    public int DequantizationWidth { get; init; } = 16;

    [JsonIgnore] bool Variational => Dequantization == DequantizationKind.Variational;

    /// <summary>The problems of the dequantisation fields (the image shape is valid when this is called).</summary>
    void DequantizationProblems(List<string> p)
    {
        if (!Enum.IsDefined(Dequantization)) p.Add($"dequantization: must be one of uniform, variational, got {Dequantization}");
        InRange(p, "dequantizationLayers", DequantizationLayers, 1, MaxDequantizationLayers);
        InRange(p, "dequantizationWidth", DequantizationWidth, 1, MaxDequantizationWidth);
        if (Variational && (long)Height * Width < 2)
            p.Add($"dequantization: variational needs images of at least 2 pixels (its noise flow's checkerboard), got {Height}x{Width}");
    }

    /// <summary>The most couplings of a variational dequantiser's noise flow.</summary>
    public const int MaxDequantizationLayers = 64;
    /// <summary>The widest hidden convolutions of a variational dequantiser's noise flow.</summary>
    public const int MaxDequantizationWidth = 4096;

    /// <summary>Parameters of the variational dequantiser's noise flow (0 for uniform): per coupling a
    /// 3x3 convolution from 2C channels to the width, a 1x1 one and a 3x3 one back to 2C.</summary>
    double DequantizerParameters()
    {
        if (!Variational) return 0;
        double w = DequantizationWidth, c2 = 2.0 * Channels;
        return DequantizationLayers * ((9 * c2 + 1) * w + (w + 1) * w + (9 * w + 1) * c2);
    }

    /// <summary>The noise flow's activations per image (0 for uniform): per coupling its hidden
    /// feature maps (before and after the activation) and a few image-sized tensors.</summary>
    double DequantizerActivationsPerImage() =>
        Variational ? DequantizationLayers * (double)Height * Width * (4.0 * DequantizationWidth + 8 * Channels) : 0;

    /// <summary>Builds the model's dequantisation: <see cref="Dequantize"/> (uniform) or
    /// <see cref="VariationalDequantize"/> with its noise flow.</summary>
    public Dequantize BuildDequantizer() => Variational
        ? new VariationalDequantize(ImageShape, DequantizationLayers, DequantizationWidth)
        : new Dequantize(ImageShape);
}
