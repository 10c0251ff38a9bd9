using MixerFlow.Host.Data;
using MixerFlow.Host.Models;
using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>The linear probe of a trained seed's latents.</summary>
public sealed partial class Experiment
{
    /// <summary>
    /// Linear-probe accuracy of the model's latents (NaN without labels or with the probe off), on
    /// the run's own split and pixel permutation (data without a test split is split by the run's seed, as the Trainer does).
    /// </summary>
    double Probe(ImageFlow model, int seed, int permutationSeed)
    {
        if (spec.ProbeTrainImages == 0) return double.NaN;
        var c = model.Config;
        var data = DatasetLoader.Load(spec.Data, c.Channels, c.Height, c.Width, seed)
            .Permuted(PixelPermutation.Of(permutationSeed, c.Height, c.Width));
        if (data.Train.Labels is null || data.HeldOut.Labels is null) return double.NaN;
        var train = First(data.Train, spec.ProbeTrainImages);
        var test = spec.ProbeTestImages > 0 ? First(data.HeldOut, spec.ProbeTestImages) : data.HeldOut;
        using var scope = NewDisposeScope();
        var zTrain = Evaluation.Latents(model, train);
        var zTest = Evaluation.Latents(model, test);
        return Evaluation.LinearProbeAccuracy(zTrain, train.Labels!, zTest, test.Labels!);
    }

    static ImageDataset First(ImageDataset set, int n) =>
        n >= set.Count ? set : set.Subset(Enumerable.Range(0, n).ToArray());
}
