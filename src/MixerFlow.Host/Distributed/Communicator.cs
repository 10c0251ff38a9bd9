using static TorchSharp.torch;

namespace MixerFlow.Host.Distributed;

/// <summary>
/// The processes training one model together (data-parallel), and the collective operations the
/// training loop needs. Every rank must call the collective operations in the same order.
/// <see cref="Communicator.FromEnvironment"/> gives MPI's world when the process was started by
/// <c>mpiexec</c> and <see cref="SingleProcess"/> otherwise. The training loop asks these members
/// rather than the number of ranks: one process and N ranks differ only here.
/// </summary>
public interface ICommunicator
{
    /// <summary>This process's rank, 0 .. <see cref="Size"/> - 1.</summary>
    int Rank { get; }
    /// <summary>The number of processes.</summary>
    int Size { get; }
    /// <summary>Rank 0: the one that resolves the settings and builds the model the others receive.</summary>
    bool IsRoot => Rank == 0;
    /// <summary>Whether this rank writes the run folder and reports progress (rank 0 only).</summary>
    bool IsWriter => IsRoot;
    /// <summary>One line for logs, for example "MPI rank 1 of 2 (libmpich.so.12)".</summary>
    string Description { get; }

    /// <summary>Sums <paramref name="values"/> element-wise over all ranks, in place.</summary>
    void AllReduceSum(Span<double> values);

    /// <summary>Sums a float32 or float64 tensor element-wise over all ranks, in place (one call for the whole tensor).</summary>
    void AllReduceSum(Tensor tensor);

    /// <summary>Whether any rank passes true (one allreduce under MPI; <paramref name="mine"/> itself for one process).</summary>
    bool Any(bool mine);

    /// <summary>Rank 0's bytes on every rank: rank 0 passes them, the others pass null.</summary>
    byte[] Broadcast(byte[]? fromRoot);

    /// <summary>
    /// Hands rank 0's bytes to the other ranks: rank 0 passes a function that makes them (called
    /// only when there are other ranks) and gets null back; the others pass null and get the bytes.
    /// </summary>
    byte[]? ShareFromRoot(Func<byte[]>? make);

    /// <summary>Waits until every rank has called it.</summary>
    void Barrier();

    /// <summary>
    /// This rank's part of a global batch of <paramref name="count"/> items (a multiple of
    /// <see cref="Size"/>): the whole batch for one process, the rank's equal slice under MPI.
    /// </summary>
    (int Start, int Count) ShareOf(int count);

    /// <summary>
    /// The LibTorch CPU threads this rank takes when the settings leave the count open: 0 keeps
    /// LibTorch's default (every core) for one process; N ranks on one machine split its cores.
    /// </summary>
    int DefaultThreads { get; }

    /// <summary>The device this rank computes on, given the one asked for (under MPI, CUDA ranks take the machine's GPUs in turn).</summary>
    Device DeviceFor(Device device);

    /// <summary>
    /// Ends every rank of the job with <paramref name="exitCode"/> (MPI_Abort for MPI, the process's
    /// exit for one process); does not return. For the application: the library never calls it.
    /// </summary>
    void Abort(int exitCode);
}

/// <summary>One process: every collective operation is the identity.</summary>
public sealed class SingleProcess : ICommunicator
{
    /// <summary>The one instance.</summary>
    public static readonly SingleProcess Instance = new();
    SingleProcess() { }
    /// <inheritdoc/>
    public int Rank => 0;
    /// <inheritdoc/>
    public int Size => 1;
    /// <inheritdoc/>
    public string Description => "a single process";
    /// <inheritdoc/>
    public void AllReduceSum(Span<double> values) { }
    /// <inheritdoc/>
    public void AllReduceSum(Tensor tensor) { }
    /// <inheritdoc/>
    public bool Any(bool mine) => mine;
    /// <inheritdoc/>
    public byte[] Broadcast(byte[]? fromRoot) => fromRoot ?? throw new ArgumentNullException(nameof(fromRoot), "rank 0 must pass the bytes");
    /// <inheritdoc/>
    public byte[]? ShareFromRoot(Func<byte[]>? make) => null;
    /// <inheritdoc/>
    public void Barrier() { }
    /// <inheritdoc/>
    public (int Start, int Count) ShareOf(int count) => (0, count);
    /// <inheritdoc/>
    public int DefaultThreads => 0;
    /// <inheritdoc/>
    public Device DeviceFor(Device device) => device;
    /// <inheritdoc/>
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
