using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace MixerFlow.Host.Distributed;

/// <summary>MPI's COMM_WORLD through <see cref="MpiNative"/>.</summary>
internal sealed class MpiWorld(int rank, int size, string library) : ICommunicator
{
    const int Chunk = 1 << 30;
    bool finalized;

    public int Rank => rank;
    public int Size => size;
    public string Description => $"MPI rank {rank} of {size} ({library})";

    [DllImport("LibTorchSharp")]
    static extern nint THSTensor_data(nint handle);

    public unsafe void AllReduceSum(Span<double> values)
    {
        if (values.Length == 0) return;
        fixed (double* p = values) MpiNative.AllReduceInPlace((nint)p, values.Length, MpiNative.Double, MpiNative.OpSum);
    }

    public void AllReduceSum(Tensor tensor)
    {
        var (datatype, width) = tensor.dtype switch
        {
            ScalarType.Float32 => (MpiNative.Float, 4),
            ScalarType.Float64 => (MpiNative.Double, 8),
            _ => throw new ArgumentException($"allreduce: float32 or float64 tensors only, got {tensor.dtype}", nameof(tensor)),
        };
        // Host memory for MPI (a CUDA-aware MPI could take device pointers; see docs/distributed.md).
        bool direct = tensor.device_type == TorchSharp.DeviceType.CPU && tensor.is_contiguous();
        using var host = direct ? null : tensor.detach().to(CPU).contiguous();
        var target = host ?? tensor;
        nint data = THSTensor_data(target.Handle);
        long n = target.numel();
        for (long at = 0; at < n; at += Chunk)
            MpiNative.AllReduceInPlace(data + (nint)(at * width), (int)Math.Min(Chunk, n - at), datatype, MpiNative.OpSum);
        if (host is not null) using (no_grad()) tensor.copy_(host);
    }

    public unsafe byte[] Broadcast(byte[]? fromRoot)
    {
        if (rank == 0 && fromRoot is null) throw new ArgumentNullException(nameof(fromRoot), "rank 0 must pass the bytes");
        var length = new double[] { rank == 0 ? fromRoot!.Length : 0 };
        fixed (double* p = length) MpiNative.Broadcast((nint)p, 1, MpiNative.Double, 0);
        var bytes = rank == 0 ? fromRoot! : new byte[(long)length[0]];
        fixed (byte* p = bytes)
            for (long at = 0; at < bytes.Length; at += Chunk)
                MpiNative.Broadcast((nint)(p + at), (int)Math.Min(Chunk, bytes.Length - at), MpiNative.Byte, 0);
        return bytes;
    }

    public void Barrier() => MpiNative.Barrier();

    public byte[]? ShareFromRoot(Func<byte[]>? make)
    {
        if (rank != 0) return Broadcast(null);
        ArgumentNullException.ThrowIfNull(make);
        Broadcast(make());
        return null;
    }

    public bool Any(bool mine)
    {
        Span<double> v = [mine ? 1 : 0];
        AllReduceSum(v);
        return v[0] > 0;
    }

    public (int Start, int Count) ShareOf(int count)
    {
        if (count % size != 0) throw new ArgumentException($"a global batch of {count} does not split evenly over {size} ranks", nameof(count));
        int per = count / size;
        return (rank * per, per);
    }

    // N ranks on one machine share its cores: LibTorch's default (every core) would oversubscribe them.
    public int DefaultThreads => Math.Max(1, Environment.ProcessorCount / Math.Max(1, Communicator.LocalSize()));

    public Device DeviceFor(Device device) =>
        device.type == TorchSharp.DeviceType.CUDA ? new Device(TorchSharp.DeviceType.CUDA, Communicator.LocalRank() % Math.Max(1, cuda.device_count())) : device;

    /// <summary>Ends every rank (MPI_Abort); the caller flushes what it wrote first.</summary>
    public void Abort(int exitCode)
    {
        MpiNative.Abort(exitCode);
        Environment.Exit(exitCode);
    }

    public void Close()
    {
        if (finalized) return;
        finalized = true;
        if (!MpiNative.IsFinalized()) MpiNative.Close();
    }
}
