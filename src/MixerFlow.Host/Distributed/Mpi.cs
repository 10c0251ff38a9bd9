using System.Runtime.InteropServices;

namespace MixerFlow.Host.Distributed;

/// <summary>
/// A thin binding of the few MPI calls data-parallel training needs (init, rank, size, allreduce,
/// broadcast, barrier, abort, finalize), for MPICH's ABI: communicators, datatypes and operations
/// are integer handles (MPICH, Intel MPI, MVAPICH and MS-MPI share it). Open MPI's handles are
/// pointers to its own globals, so its library is recognised and refused with the fix.
/// The library is loaded on first use only: a single process without MPI never touches it.
/// </summary>
internal static unsafe class MpiNative
{
    public const int Success = 0;
    public const int CommWorld = 0x44000000;
    public const int Byte = 0x4c00010d;
    public const int Int = 0x4c000405;
    public const int Float = 0x4c00040a;
    public const int Double = 0x4c00080b;
    public const int OpMax = 0x58000001;
    public const int OpSum = 0x58000003;
    public static readonly nint InPlace = -1;

    /// <summary>The libraries tried, in order: MPICH's soname first, then the generic names.</summary>
    public static readonly string[] Candidates = ["libmpich.so.12", "libmpi.so.12", "libmpich.so", "libmpi.so"];

    static nint library;
    static string libraryName = "";
    static delegate* unmanaged<nint, nint, int> init;
    static delegate* unmanaged<int*, int> initialized;
    static delegate* unmanaged<int*, int> finalized;
    static delegate* unmanaged<int> finalize;
    static delegate* unmanaged<int, int*, int> commRank;
    static delegate* unmanaged<int, int*, int> commSize;
    static delegate* unmanaged<nint, nint, int, int, int, int, int> allreduce;
    static delegate* unmanaged<nint, int, int, int, int, int> bcast;
    static delegate* unmanaged<int, int> barrier;
    static delegate* unmanaged<int, int, int> abort;

    public static string LibraryName => libraryName;

    /// <summary>Loads the MPI library and its entry points; a <see cref="UserError"/> naming what was tried and the fix.</summary>
    public static void Load()
    {
        if (library != 0) return;
        var tried = new List<string>();
        foreach (var name in Candidates)
        {
            if (!NativeLibrary.TryLoad(name, out var handle)) { tried.Add($"{name} (not found)"); continue; }
            if (NativeLibrary.TryGetExport(handle, "ompi_mpi_comm_world", out _))
            {
                tried.Add($"{name} (Open MPI, whose pointer handles this binding does not speak)");
                NativeLibrary.Free(handle);
                continue;
            }
            library = handle;
            libraryName = name;
            break;
        }
        if (library == 0)
            throw new UserError("MPI: launched under mpiexec, but no MPICH-compatible MPI library could be loaded (tried " +
                                string.Join(", ", tried) + "); install MPICH (Debian: apt install mpich) and start with its mpiexec");
        nint F(string symbol) => NativeLibrary.TryGetExport(library, symbol, out var f) ? f
            : throw new UserError($"MPI: {libraryName} has no {symbol}; it is not an MPI library this binding can use (install MPICH)");
        init = (delegate* unmanaged<nint, nint, int>)F("MPI_Init");
        initialized = (delegate* unmanaged<int*, int>)F("MPI_Initialized");
        finalized = (delegate* unmanaged<int*, int>)F("MPI_Finalized");
        finalize = (delegate* unmanaged<int>)F("MPI_Finalize");
        commRank = (delegate* unmanaged<int, int*, int>)F("MPI_Comm_rank");
        commSize = (delegate* unmanaged<int, int*, int>)F("MPI_Comm_size");
        allreduce = (delegate* unmanaged<nint, nint, int, int, int, int, int>)F("MPI_Allreduce");
        bcast = (delegate* unmanaged<nint, int, int, int, int, int>)F("MPI_Bcast");
        barrier = (delegate* unmanaged<int, int>)F("MPI_Barrier");
        abort = (delegate* unmanaged<int, int, int>)F("MPI_Abort");
    }

    static void Check(int code, string call)
    {
        // MPI's default error handler aborts the job on errors; a code that still comes back is reported.
        if (code != Success) throw new InvalidOperationException($"{call} failed with MPI error code {code}");
    }

    public static void Init()
    {
        int flag;
        Check(initialized(&flag), "MPI_Initialized");
        if (flag == 0) Check(init(0, 0), "MPI_Init");
    }

    public static bool IsFinalized()
    {
        int flag;
        Check(finalized(&flag), "MPI_Finalized");
        return flag != 0;
    }

    public static void Close() => Check(finalize(), "MPI_Finalize");

    public static int Rank()
    {
        int r;
        Check(commRank(CommWorld, &r), "MPI_Comm_rank");
        return r;
    }

    public static int Size()
    {
        int s;
        Check(commSize(CommWorld, &s), "MPI_Comm_size");
        return s;
    }

    public static void AllReduceInPlace(nint buffer, int count, int datatype, int op) =>
        Check(allreduce(InPlace, buffer, count, datatype, op, CommWorld), "MPI_Allreduce");

    public static void Broadcast(nint buffer, int count, int datatype, int root) =>
        Check(bcast(buffer, count, datatype, root, CommWorld), "MPI_Bcast");

    public static void Barrier() => Check(barrier(CommWorld), "MPI_Barrier");

    public static void Abort(int code) => abort(CommWorld, code);
}
