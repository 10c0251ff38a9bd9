namespace MixerFlow.Core

open System
open System.IO
open System.Runtime.InteropServices
open TorchSharp

/// TorchSharp's native glue (libLibTorchSharp.so) could not be loaded. The message quotes the
/// dynamic loader (dlerror) and says how to fix it.
type NativeLoadException(message: string, libraryPath: string, loaderMessage: string) =
    inherit Exception(message)
    /// The copy of the glue that was tried.
    member _.LibraryPath = libraryPath
    /// What the dynamic loader said (dlerror), e.g. "version `GLIBCXX_3.4.32' not found".
    member _.LoaderMessage = loaderMessage

/// Addresses of a tensor's data and of its gradient's data, read without making a managed Tensor.
module internal TensorNative =
    [<DllImport("LibTorchSharp")>]
    extern nativeint THSTensor_data(nativeint handle)
    [<DllImport("LibTorchSharp")>]
    extern nativeint THSTensor_grad(nativeint handle)
    [<DllImport("LibTorchSharp")>]
    extern void THSTensor_dispose(nativeint handle)

    /// The address of a tensor's first element.
    let dataPtr (t: torch.Tensor) = THSTensor_data t.Handle

    /// The address of a tensor's gradient's first element, 0 when it has none; no managed Tensor
    /// is made for the gradient (its native handle is released at once).
    let gradPtr (t: torch.Tensor) =
        let g = THSTensor_grad t.Handle
        if g = 0n then 0n
        else
            try THSTensor_data g finally THSTensor_dispose g

module internal NativeGlue =
    let fileName = "libLibTorchSharp.so"

    let rid () =
        match RuntimeInformation.ProcessArchitecture with
        | Architecture.Arm64 -> "linux-arm64"
        | _ -> "linux-x64"

    /// The copies of the glue this process would load, most likely first: the folders the host
    /// computed from the app's deps.json (where .NET's own probing looks), then TorchSharp's folder
    /// and the app's folder with their runtimes/<rid>/native subfolders.
    let candidates () =
        let probing =
            match AppContext.GetData "NATIVE_DLL_SEARCH_DIRECTORIES" with
            | :? string as dirs -> dirs.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries) |> List.ofArray
            | _ -> []
        let torchDir =
            try Path.GetDirectoryName(typeof<TorchSharp.torch.Tensor>.Assembly.Location) with _ -> null
        let bases = [ torchDir; AppContext.BaseDirectory ] |> List.filter (String.IsNullOrEmpty >> not)
        let near = bases |> List.collect (fun b -> [ b; Path.Combine(b, "runtimes", rid (), "native") ])
        probing @ near
        |> List.map (fun d -> Path.Combine(d, fileName))
        |> List.filter File.Exists
        |> List.distinct

    /// The loader's own words: .NET puts dlerror's text after its generic advice.
    let loaderText (e: exn) =
        let m = e.Message
        let marker = "LD_DEBUG environment variable:"
        let i = m.IndexOf(marker, StringComparison.Ordinal)
        (if i >= 0 then m.Substring(i + marker.Length) else m).Trim()

    let explain (path: string) (loader: string) =
        let missingGlibcxx = loader.Contains("GLIBCXX_3.4.32", StringComparison.Ordinal)
        let fix =
            if missingGlibcxx then
                String.concat Environment.NewLine
                    [ "The system's libstdc++ (Debian 12, Ubuntu 22.04 and others of their age) lacks the symbol version"
                      "GLIBCXX_3.4.32, which TorchSharp's glue declares but does not use. MixerFlow's build targets mark that"
                      "requirement weak in the copy of the glue in your build output (never in the NuGet cache):"
                      "  - PackageReference to MixerFlow.Core, MixerFlow.Checks or MixerFlow.Host: the package's targets do it on"
                      "    every build of an application or test project; rebuild, and do not pass -p:MixerFlowPatchLibStdCxx=false."
                      "  - ProjectReference to the MixerFlow sources: add this line to your project or Directory.Build.targets:"
                      "      <Import Project=\"path/to/MixerFlow.NET/build/LibStdCxxFix.targets\" />"
                      "    and build with -p:MixerFlowPatchLibStdCxx=true (the default)."
                      "  - Loading from somewhere else (a publish folder, a container): run the build or publish with those targets,"
                      "    or use a system whose libstdc++ provides GLIBCXX_3.4.32 (GCC 13 or newer)." ]
            else
                "The glue needs a newer system library than this machine has (see the loader's message above); "
                + "use a newer operating system or a TorchSharp build made for this one."
        String.concat Environment.NewLine
            [ sprintf "TorchSharp's native glue could not be loaded from %s:" path
              "  " + loader
              fix
              "(TorchSharp itself would report this as a missing reference to the libtorch-cpu package; that is not the cause.)" ]

    /// Loads the glue at `path`; a symbol-version failure becomes a NativeLoadException. A missing
    /// file or dependency is left for TorchSharp to report: its message is right about those.
    let verify (path: string) =
        try
            NativeLibrary.Load path |> ignore
        with :? DllNotFoundException as e ->
            let loader = loaderText e
            if loader.Contains("version `", StringComparison.Ordinal) && loader.Contains("not found", StringComparison.Ordinal) then
                raise (NativeLoadException(explain path loader, path, loader))

    [<DllImport("libc", EntryPoint = "setenv")>]
    extern int setenv(string name, string value, int overwrite)
    [<DllImport("libc", EntryPoint = "getenv")>]
    extern nativeint private getenvPtr(string name)

    /// A variable of the C environment (what LibTorch and glibc read; .NET keeps its own copy,
    /// made at start, which setenv does not change), or null. Off Linux, .NET's copy.
    let getenv (name: string) : string =
        if OperatingSystem.IsLinux() then
            (try Marshal.PtrToStringAnsi(getenvPtr name) with :? DllNotFoundException | :? EntryPointNotFoundException -> Environment.GetEnvironmentVariable name)
        else Environment.GetEnvironmentVariable name

    /// Sets nothing: only checks, once, that the glue this process would use loads.
    let ensured =
        lazy
            (if OperatingSystem.IsLinux() then
                 match candidates () with
                 | first :: _ -> verify first
                 | [] -> ())

/// Checks, once per process and before TorchSharp's first native call, that TorchSharp's native glue
/// loads on this machine; if it cannot, throws a NativeLoadException that names the real cause (the
/// loader's message, e.g. the missing GLIBCXX_3.4.32 of Debian 12's libstdc++) and the fix.
/// Bijector constructors call it; later calls cost a field read. It changes nothing in the process
/// (the runtime's switches are set by MixerFlow.Core.Runtime.MixerFlowRuntime.Configure).
[<AbstractClass; Sealed>]
type NativeRuntime =
    /// Throws NativeLoadException when the glue this process would use cannot load (Linux only).
    static member EnsureLoaded() = NativeGlue.ensured.Force()

    /// Loads the glue at `libraryPath` and throws NativeLoadException when the loader refuses it for a
    /// symbol version (GLIBCXX_3.4.32 and the like). For diagnosing a deployment.
    static member Verify(libraryPath: string) =
        if isNull libraryPath then nullArg "libraryPath"
        NativeGlue.verify libraryPath

    /// Runs EnsureLoaded and returns `value`: for constructor arguments, so that the check runs
    /// before a base class touches TorchSharp.
    static member internal Checked(value: 'T) : 'T =
        NativeRuntime.EnsureLoaded()
        value

module internal LibTorchContext =
    [<DllImport("libtorch_cpu", EntryPoint = "_ZN2at13globalContextEv")>]
    extern nativeint globalContext()
    [<DllImport("libtorch_cpu", EntryPoint = "_ZN2at7Context20setUserEnabledMkldnnEb")>]
    extern void setUserEnabledMkldnn(nativeint context, [<MarshalAs(UnmanagedType.U1)>] bool enabled)
    [<DllImport("libtorch_cpu", EntryPoint = "_ZNK2at7Context17userEnabledMkldnnEv")>]
    extern [<return: MarshalAs(UnmanagedType.U1)>] bool userEnabledMkldnn(nativeint context)
    [<DllImport("libtorch_cpu", EntryPoint = "_ZN2at7Context20setUserEnabledNNPACKEb")>]
    extern void setUserEnabledNNPACK(nativeint context, [<MarshalAs(UnmanagedType.U1)>] bool enabled)
    [<DllImport("libtorch_cpu", EntryPoint = "_ZNK2at7Context17userEnabledNNPACKEv")>]
    extern [<return: MarshalAs(UnmanagedType.U1)>] bool userEnabledNNPACK(nativeint context)

module internal MklDispatch =
    /// MKL (linked into libtorch_cpu) picks its GEMM kernels by CPU: on a CPU whose vendor string
    /// is not "GenuineIntel" `mkl_serv_intel_cpu_true()` returns 0 and MKL takes its generic code
    /// path, at about half the GEMM rate it reaches when the function returns 1 (docs/benchmarks.md). The function caches its answer in a static int (-1 until computed):
    ///   mov eax, [rip + cached]; test eax, eax; js compute; ret
    /// Setting that int to 1 before MKL's first GEMM makes MKL trust the CPU's feature flags, as
    /// a preloaded override of the function does. Nothing is written unless the function starts
    /// with exactly that sequence. Returns whether MKL now trusts the CPU, and what was done.
    /// The address of the int that caches `mkl_serv_intel_cpu_true`'s answer, or why there is none.
    let locate () : Result<nativeint, string> =
        let mutable lib = 0n
        if not (NativeLibrary.TryLoad("libtorch_cpu", typeof<NativeRuntime>.Assembly, Nullable(), &lib)) then
            Error "libtorch_cpu not found"
        else
            let mutable f = 0n
            if not (NativeLibrary.TryGetExport(lib, "mkl_serv_intel_cpu_true", &f)) then
                Error "no mkl_serv_intel_cpu_true in libtorch_cpu (no MKL)"
            else
                let b i = Marshal.ReadByte(f, i)
                if not (b 0 = 0x8buy && b 1 = 0x05uy && b 6 = 0x85uy && b 7 = 0xc0uy && b 8 = 0x78uy) then
                    Error "mkl_serv_intel_cpu_true has an unknown shape; left alone"
                else Ok(f + 6n + nativeint (Marshal.ReadInt32(f, 2)))

    /// MKL's cached answer: -1 not chosen yet, 0 generic kernels, 1 the CPU's feature flags trusted;
    /// or why it cannot be read. Reads only.
    let cached () : Result<int, string> = locate () |> Result.map Marshal.ReadInt32

    let trustCpuFeatures () : bool * string =
        match locate () with
        | Error why -> false, why
        | Ok cached ->
            match Marshal.ReadInt32 cached with
            | 1 -> true, "MKL already trusts this CPU"
            // A GEMM ran before the runtime was configured: switching now would mix kernels (and
            // rounding) within the process, so MKL's choice stays.
            | 0 -> false, "MKL had already chosen its generic path before MixerFlow's first use; left alone"
            | _ ->
                Marshal.WriteInt32(cached, 1)
                true, "MKL set to trust the CPU's feature flags"

/// LibTorch's oneDNN (mkldnn) float32 convolution reads the padding of its blocked channel
/// layouts (blocks of 16 channels with AVX-512, 8 with AVX2) uninitialised: a 3x3 Conv2d whose
/// input channels are not a multiple of the block (72 -> 4) gives wrong or NaN outputs, and one
/// whose output channels are not (8 -> 4, Glow's coupling nets) a wrong or NaN input gradient,
/// differently from call to call (LibTorch 2.10.0 / oneDNN 3.7.1, seen on AMD Zen 5). Float64 and
/// batch-1 convolutions never take that path and are right. TorchSharp has no switch for it; this
/// reads and sets LibTorch's own, as `torch.backends.mkldnn.enabled` does in PyTorch
/// (`at::globalContext().setUserEnabledMkldnn`), and NNPACK's. Nothing here is called by
/// MixerFlow's bijectors: the application sets the switches (MixerFlow.Core.Runtime). Where the
/// symbols are missing (a LibTorch built with another C++ ABI, Windows) nothing changes and
/// `Available` is false.
[<AbstractClass; Sealed>]
type NativeBackend =
    static let context =
        lazy
            (try
                // Let TorchSharp load its natives first, so the same libtorch_cpu is used.
                torch.InitializeDeviceType(DeviceType.CPU)
                Some(LibTorchContext.globalContext ())
             with
             | :? DllNotFoundException
             | :? EntryPointNotFoundException -> None)

    /// Whether the switches could be reached in this LibTorch (reaching them loads LibTorch).
    static member Available = context.Force().IsSome

    /// Whether LibTorch may use oneDNN (mkldnn) kernels (LibTorch's default: true). Process-wide;
    /// an application sets it with MixerFlow.Core.Runtime.MixerFlowRuntime.Configure. MixerFlow's
    /// own convolutions are right either way (GemmConvolution); a float32 Conv2d of your own whose
    /// channels are not multiples of 16 is right only while it is false.
    static member MkldnnEnabled
        with get () = match context.Force() with Some c -> LibTorchContext.userEnabledMkldnn c | None -> true
        and set (v: bool) = match context.Force() with Some c -> LibTorchContext.setUserEnabledMkldnn (c, v) | None -> ()

    /// Whether LibTorch may try NNPACK for convolutions (LibTorch's default: true). On CPUs NNPACK
    /// does not support (AMD Zen 5 here) each try logs "Could not initialize NNPACK! Reason:
    /// Unsupported hardware" before falling back to the same im2col + BLAS path.
    static member NnpackEnabled
        with get () =
            match context.Force() with
            | Some c -> (try LibTorchContext.userEnabledNNPACK c with :? EntryPointNotFoundException -> true)
            | None -> true
        and set (v: bool) =
            match context.Force() with
            | Some c -> (try LibTorchContext.setUserEnabledNNPACK (c, v) with :? EntryPointNotFoundException -> ())
            | None -> ()

    /// Runs `f` with oneDNN enabled and puts the switch back as it was after: for products that
    /// need oneDNN's kernels (bfloat16 GEMMs). Process-wide while it runs, like the switch itself.
    static member WithMkldnn(f: Func<'T>) : 'T =
        let before = NativeBackend.MkldnnEnabled
        if not before then NativeBackend.MkldnnEnabled <- true
        try f.Invoke() finally if not before then NativeBackend.MkldnnEnabled <- false

module internal HugePageGlue =
    [<DllImport("libc", EntryPoint = "execve", SetLastError = true)>]
    extern int execve(string path, nativeint[] argv, nativeint[] envp)
    [<DllImport("libc", EntryPoint = "malloc_trim")>]
    extern int malloc_trim(unativeint pad)

    let tunable = "glibc.malloc.hugetlb"
    let optOut = "MIXERFLOW_HUGETLB"
    let marker = "MIXERFLOW_HUGETLB_RESTARTED"

    /// The kernel's transparent-huge-page mode: "always", "madvise", "never", or null if unknown.
    let kernelMode () =
        try
            let text = File.ReadAllText "/sys/kernel/mm/transparent_hugepage/enabled"
            let i, j = text.IndexOf '[', text.IndexOf ']'
            if i >= 0 && j > i then text.Substring(i + 1, j - i - 1) else null
        with _ -> null

    /// What the restart adds to GLIBC_TUNABLES, each only when not given: huge pages, and malloc
    /// keeping what it frees (mmap only above 32 MB, the largest threshold glibc takes, and no
    /// trimming of the heap), so the buffers a training step frees are reused by the next step
    /// instead of being unmapped and faulted in again (docs/benchmarks.md has the measurement).
    let added = [ tunable, "1"; "glibc.malloc.mmap_threshold", "33554432"; "glibc.malloc.trim_threshold", "17179869184" ]

    /// The value of tunable `name` in a GLIBC_TUNABLES string, or null.
    let valueOf (name: string) (tunables: string) =
        if String.IsNullOrEmpty tunables then null
        else
            tunables.Split(':')
            |> Array.tryPick (fun kv ->
                let eq = kv.IndexOf '='
                if eq > 0 && kv.Substring(0, eq).Trim() = name then Some(kv.Substring(eq + 1).Trim()) else None)
            |> Option.toObj

    /// The value of glibc.malloc.hugetlb in a GLIBC_TUNABLES string ("a=1:b=2"), or null.
    let tunableValue (tunables: string) = valueOf tunable tunables

    /// Whether GLIBC_TUNABLES keeps freed memory in the heap (an mmap threshold given).
    let keepsFreedMemory (tunables: string) = not (isNull (valueOf "glibc.malloc.mmap_threshold" tunables))

    /// GLIBC_TUNABLES with the tunables of `added` that it does not set appended.
    let withTunables (given: string) =
        let extra = added |> List.filter (fun (k, _) -> isNull (valueOf k given)) |> List.map (fun (k, v) -> k + "=" + v)
        String.Join(":", (if String.IsNullOrEmpty given then extra else given :: extra))

    let nullTerminated (items: string list) =
        let ptrs = items |> List.map Marshal.StringToHGlobalAnsi
        List.toArray ptrs |> fun a -> Array.append a [| 0n |]

/// glibc malloc on transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`). LibTorch's
/// large temporary buffers (ATen's im2col for convolutions, hundreds of MB per call for
/// glow-cifar10) are mmapped and unmapped by malloc on every call; on 4 KB pages each call
/// faults every page in again; 2 MB pages cut the faults by far (docs/benchmarks.md). glibc reads the tunable
/// once, at process start, so an executable has to restart itself to get it:
/// <see cref="RestartWithHugePages"/> does that for the `mixerflow` tool; library users set the
/// variable in their process's environment.
[<AbstractClass; Sealed>]
type HugePages =
    /// Whether this process started with `glibc.malloc.hugetlb` set to a non-zero value in
    /// GLIBC_TUNABLES (and the kernel's transparent huge pages are not "never").
    static member InEffect =
        let v = HugePageGlue.tunableValue (Environment.GetEnvironmentVariable "GLIBC_TUNABLES")
        not (isNull v) && v <> "0" && HugePageGlue.kernelMode () <> "never" && OperatingSystem.IsLinux()

    /// One line for `info` and logs: whether malloc uses huge pages and why.
    static member Description =
        let restarted = Environment.GetEnvironmentVariable HugePageGlue.marker = "1"
        if HugePages.InEffect then
            "malloc on transparent huge pages (glibc.malloc.hugetlb=1" + (if restarted then ", set by MixerFlow)" else ", given)")
            + (if HugePageGlue.keepsFreedMemory (Environment.GetEnvironmentVariable "GLIBC_TUNABLES") then ", freed memory kept for reuse (mmap threshold 32 MB, no trimming)" else "")
        elif Environment.GetEnvironmentVariable HugePageGlue.optOut = "0" then "malloc on 4 KB pages (MIXERFLOW_HUGETLB=0)"
        elif not (isNull (HugePageGlue.tunableValue (Environment.GetEnvironmentVariable "GLIBC_TUNABLES"))) then "malloc on 4 KB pages (glibc.malloc.hugetlb=0 given)"
        else "malloc on 4 KB pages"

    /// Hands the memory that malloc keeps for reuse back to the system (glibc's malloc_trim): with
    /// the tunables of <see cref="RestartWithHugePages"/> the heap never shrinks by itself, so a
    /// one-off peak (an evaluation over a large batch, pictures) would stay resident for the rest
    /// of the process. The trainer calls it after each epoch's evaluation; the next training step
    /// faults its pages in again once. Returns whether memory was released (false off Linux).
    static member ReleaseFreedMemory() : bool =
        OperatingSystem.IsLinux() && (try HugePageGlue.malloc_trim 0un <> 0 with :? DllNotFoundException | :? EntryPointNotFoundException -> false)

    /// For an executable's first statement: on Linux, when this process did not start with
    /// `glibc.malloc.hugetlb` in GLIBC_TUNABLES, the kernel offers transparent huge pages
    /// ("madvise" or "always"), and the environment variable MIXERFLOW_HUGETLB is not "0",
    /// replaces the process by itself (execve of /proc/self/exe with the same arguments, so the
    /// same process id, signals and exit code) with `glibc.malloc.hugetlb=1` added to
    /// GLIBC_TUNABLES. It then never returns. It returns, with the reason, when it does not
    /// restart: already in effect, opted out, the tunable given (even as 0), not Linux, a restart
    /// already tried, or execve refused.
    /// Call it before any thread of your own starts and before anything is written to stdout.
    static member RestartWithHugePages() : string =
        let env (n: string) = Environment.GetEnvironmentVariable n
        if not (OperatingSystem.IsLinux()) then "not Linux"
        elif HugePages.InEffect then "already in effect"
        elif env HugePageGlue.optOut = "0" then "MIXERFLOW_HUGETLB=0"
        elif not (isNull (HugePageGlue.tunableValue (env "GLIBC_TUNABLES"))) then "glibc.malloc.hugetlb given in GLIBC_TUNABLES"
        elif env HugePageGlue.marker = "1" then "restarted once already; glibc did not take the tunable"
        else
            match HugePageGlue.kernelMode () with
            | null | "never" -> "the kernel offers no transparent huge pages"
            | _ ->
                let argv =
                    try File.ReadAllText("/proc/self/cmdline").Split('\000', StringSplitOptions.None) |> Array.toList
                    with _ -> []
                // cmdline ends with a NUL: the split leaves one empty string at the end.
                let argv = match List.rev argv with "" :: rest -> List.rev rest | _ -> argv
                if argv.IsEmpty then "/proc/self/cmdline unreadable"
                else
                    let tunables = HugePageGlue.withTunables (env "GLIBC_TUNABLES")
                    let vars =
                        Environment.GetEnvironmentVariables()
                        |> Seq.cast<System.Collections.DictionaryEntry>
                        |> Seq.map (fun e -> string e.Key, string e.Value)
                        |> Seq.filter (fun (k, _) -> k <> "GLIBC_TUNABLES" && k <> HugePageGlue.marker)
                        |> Seq.map (fun (k, v) -> k + "=" + v)
                        |> Seq.toList
                    let envp = vars @ [ "GLIBC_TUNABLES=" + tunables; HugePageGlue.marker + "=1" ]
                    Console.Out.Flush()
                    Console.Error.Flush()
                    let argvPtrs, envPtrs = HugePageGlue.nullTerminated argv, HugePageGlue.nullTerminated envp
                    HugePageGlue.execve ("/proc/self/exe", argvPtrs, envPtrs) |> ignore
                    let errno = Marshal.GetLastWin32Error()
                    // Still here: execve was refused; the strings are ours to free.
                    for p in Array.append argvPtrs envPtrs do if p <> 0n then Marshal.FreeHGlobal p
                    sprintf "execve refused (errno %d)" errno
