using static TorchSharp.torch;

namespace MixerFlow.Host.Training;

/// <summary>
/// Copies of some of a model's buffers, taken before a forward pass whose changes to them
/// (batch-norm running statistics, ActNorm's initialised flag) may have to be undone: a dropped
/// training step, or a pass made only to initialise ActNorm. The copies belong to the dispose
/// scope that is current when the snapshot is taken.
/// </summary>
internal sealed class BufferSnapshot
{
    readonly Tensor[] buffers, saved;

    public BufferSnapshot(IEnumerable<Tensor> buffers)
    {
        this.buffers = buffers.ToArray();
        using (no_grad()) saved = this.buffers.Select(b => b.clone()).ToArray();
    }

    /// <summary>Writes the copies back into the buffers.</summary>
    public void Restore()
    {
        using (no_grad()) for (int i = 0; i < buffers.Length; i++) buffers[i].copy_(saved[i]);
    }
}
