using System.Globalization;
using MixerFlow.Host.Models;

namespace MixerFlow.Host.Training;

/// <summary>
/// What training refuses before it builds a model: a class-conditional configuration (training,
/// evaluation and the run's pictures take no labels) and a model whose estimated training memory
/// (<see cref="ModelConfig.EstimatedTrainingBytes"/>) exceeds the machine's physical memory.
/// </summary>
public static class TrainingLimits
{
    /// <summary>
    /// The memory training may count on: the physical memory (or the container's limit) the .NET
    /// runtime sees, <see cref="GCMemoryInfo.TotalAvailableMemoryBytes"/>.
    /// </summary>
    public static long AvailableMemoryBytes() => GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;

    /// <summary>
    /// Every reason <paramref name="model"/> cannot be trained at <paramref name="batchSize"/> images
    /// per step with <paramref name="availableBytes"/> of memory, each naming the field. A
    /// configuration with <see cref="ModelConfig.Problems"/> gets only those: the memory of an
    /// invalid model is not estimated.
    /// </summary>
    public static IReadOnlyList<string> Problems(ModelConfig model, int batchSize, long availableBytes)
    {
        ArgumentNullException.ThrowIfNull(model);
        var own = model.Problems();
        if (own.Count > 0) return own;
        var p = new List<string>();
        if (model is MixerFlowConfig { Classes: > 0 } m)
            p.Add($"classes: {m.Classes} makes the model class-conditional, which training does not support " +
                  "(its steps, evaluations and pictures take no labels); use classes=0");
        double need = model.EstimatedTrainingBytes(batchSize);
        if (need > availableBytes)
            p.Add($"training '{model.Name}' at batch {batchSize} needs about {Gigabytes(need)} of memory (weights, gradients, " +
                  $"Adam's two moments and the batch's activations), more than the {Gigabytes(availableBytes)} this machine has; " +
                  "use a smaller model (hiddenWidth, layers, ...) or batch size");
        return p;
    }

    /// <summary><see cref="Problems"/> with this machine's memory, as a <see cref="UserError"/> naming <paramref name="source"/>.</summary>
    public static void Check(ModelConfig model, int batchSize, string source)
    {
        var problems = Problems(model, batchSize, AvailableMemoryBytes());
        if (problems.Count > 0) throw new UserError($"{source}: {string.Join("; ", problems)}");
    }

    static string Gigabytes(double bytes) => string.Create(CultureInfo.InvariantCulture, $"{bytes / (1L << 30):0.#} GiB");
}
