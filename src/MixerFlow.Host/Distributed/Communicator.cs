using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace MixerFlow.Host.Distributed;

/// <summary>
/// The processes training one model together (data-parallel), and the collective operations the
/// training loop needs. Every rank must call the collective operations in the same order.
/// <see cref="Communicator.FromEnvironment"/> gives MPI's world when the process was started by
/// <c>mpiexec</c> and <see cref="SingleProcess"/> otherwise.
/// </summary>
public interface ICommunicator
{
    /// <summary>This process's rank, 0 .. <see cref="Size"/> - 1.</summary>
    int Rank { get; }
    /// <summary>The number of processes.</summary>
    int Size { get; }
    /// <summary>Rank 0: the one that reads and writes the run folder and reports progress.</summary>
    bool IsRoot => Rank == 0;
    /// <summary>One line for logs, for example "MPI rank 1 of 2 (libmpich.so.12)".</summary>
    string Description { get; }

    /// <summary>Sums <paramref name="values"/> element-wise over all ranks, in place.</summary>
    void AllReduceSum(Span<double> values);

    /// <summary>Sums a float32 or float64 tensor element-wise over all ranks, in place (one call for the whole tensor).</summary>
    void AllReduceSum(Tensor tensor);

    /// <summary>Rank 0's bytes on every rank: rank 0 passes them, the others pass null.</summary>
    byte[] Broadcast(byte[]? fromRoot);

    /// <summary>Waits until every rank has called it.</summary>
    void Barrier();

    /// <summary>Ends every rank of the job with <paramref name="exitCode"/> (MPI_Abort); does not return.</summary>
    void Abort(int exitCode);
}

/// <summary>One process: every collective operation is the identity.</summary>
public sealed class SingleProcess : ICommunicator
{
    public static readonly SingleProcess Instance = new();
    SingleProcess() { }
    public int Rank => 0;
    public int Size => 1;
    public string Description => "a single process";
    public void AllReduceSum(Span<double> values) { }
    public void AllReduceSum(Tensor tensor) { }
    public byte[] Broadcast(byte[]? fromRoot) => fromRoot ?? throw new ArgumentNullException(nameof(fromRoot), "rank 0 must pass the bytes");
    public void Barrier() { }
    public void Abort(int exitCode) => Environment.Exit(exitCode);
}

/// <summary>Where the training processes come from.</summary>
public static class Communicator
{
    static readonly object gate = new();
    static ICommunicator? current;

    /// <summary>
    /// The ranks this process belongs to: MPI's world when it was started by MPICH's <c>mpiexec</c>
    /// (or another launcher that sets <c>PMI_SIZE</c>, such as Slurm's srun) with more than one
    /// process, <see cref="SingleProcess"/> otherwise, without loading MPI. Set <c>MIXERFLOW_MPI=0</c>
    /// to stay a single process under a launcher. MPI is initialised once per process and finalised
    /// at exit. A launch by Open MPI's mpirun is refused with the fix (this binding speaks MPICH's ABI).
    /// </summary>
    public static ICommunicator FromEnvironment()
    {
        lock (gate)
        {
            if (current is not null) return current;
            current = Create();
            return current;
        }
    }

    /// <summary>The number of processes the launcher says it started (1 when none did).</summary>
    public static int LaunchedSize(Func<string, string?>? environment = null)
    {
        environment ??= Environment.GetEnvironmentVariable;
        if (environment("MIXERFLOW_MPI") == "0") return 1;
        if (int.TryParse(environment("OMPI_COMM_WORLD_SIZE"), out int ompi) && ompi > 1)
            throw new UserError($"MPI: started by Open MPI's mpirun ({ompi} processes), but MixerFlow speaks MPICH's ABI; " +
                                "install MPICH (Debian: apt install mpich) and start with mpiexec.mpich, or set MIXERFLOW_MPI=0 to run single processes");
        return int.TryParse(environment("PMI_SIZE"), out int size) && size > 1 ? size : 1;
    }

    /// <summary>The processes of this job on this machine, as the launcher says (MPICH's MPI_LOCALNRANKS, Open MPI's equivalent; 1 when unknown).</summary>
    public static int LocalSize() =>
        int.TryParse(Environment.GetEnvironmentVariable("MPI_LOCALNRANKS") ?? Environment.GetEnvironmentVariable("OMPI_COMM_WORLD_LOCAL_SIZE"), out int n) && n > 0 ? n : 1;

    /// <summary>This process's index among the job's processes on this machine (MPICH's MPI_LOCALRANKID, Open MPI's or Slurm's equivalent; 0 when unknown): which GPU it takes.</summary>
    public static int LocalRank() =>
        int.TryParse(Environment.GetEnvironmentVariable("MPI_LOCALRANKID") ?? Environment.GetEnvironmentVariable("OMPI_COMM_WORLD_LOCAL_RANK")
                     ?? Environment.GetEnvironmentVariable("SLURM_LOCALID"), out int r) && r >= 0 ? r : 0;

    static ICommunicator Create()
    {
        if (LaunchedSize() <= 1) return SingleProcess.Instance;
        MpiNative.Load();
        MpiNative.Init();
        var world = new MpiWorld(MpiNative.Rank(), MpiNative.Size(), MpiNative.LibraryName);
        AppDomain.CurrentDomain.ProcessExit += (_, _) => world.Close();
        return world;
    }

    /// <summary>Finalises MPI if this process initialised it (also done at process exit).</summary>
    public static void Shutdown()
    {
        lock (gate) (current as MpiWorld)?.Close();
    }
}

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

    public void Abort(int exitCode)
    {
        Console.Out.Flush();
        Console.Error.Flush();
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
