namespace MixerFlow.Core.Runtime

open System
open System.Collections.Generic

/// How an application wants LibTorch and the C runtime set up, for
/// <see cref="MixerFlowRuntime.Configure"/>. Every switch is process-wide. The defaults are what
/// the `mixerflow` tool uses. Settable properties (C#: an object initializer; F#: named property
/// setters in the constructor call) or the With... methods, which return a changed copy.
[<Sealed; AllowNullLiteral>]
type RuntimeOptions() =
    /// Whether LibTorch may use oneDNN (mkldnn) kernels (default false). MixerFlow's own
    /// convolutions are right either way; LibTorch 2.10's oneDNN float32 convolution is wrong for
    /// channel counts that are not multiples of its block (16 with AVX-512), so a Conv2d of your
    /// own is right only with it off. bfloat16 conditioners turn it on for their products only.
    member val OneDnn = false with get, set
    /// Whether LibTorch may try NNPACK for convolutions (default false: on CPUs it does not support
    /// every try logs "Could not initialize NNPACK!" and falls back to the same kernels).
    member val Nnpack = false with get, set
    /// Whether LibTorch's MKL is made to trust the CPU's feature flags where it would take its
    /// generic kernels on a CPU that is not an Intel one (default true; the environment variable
    /// MIXERFLOW_MKL_GENERIC=1 overrides it). Takes effect only before MKL's first GEMM.
    member val TrustMklCpuDispatch = true with get, set
    /// The OpenMP wait policy (OMP_WAIT_POLICY) for LibTorch's threads: "PASSIVE" (default),
    /// "ACTIVE", or null to leave LibTorch's default. A value in the environment wins. Takes effect
    /// only before LibTorch (and its libgomp) is loaded into the process.
    member val OpenMpWaitPolicy = "PASSIVE" with get, set
    /// The spins before an idle OpenMP thread sleeps (GOMP_SPINCOUNT) with the PASSIVE policy
    /// (default 10000, about 0.1 ms; 0: not set). A value in the environment wins.
    member val OpenMpSpinCount = 10000 with get, set
    /// Whether glibc malloc should run on transparent huge pages and keep freed memory for reuse
    /// (default true). glibc reads its tunables at process start, so this restarts the process
    /// (execve of itself, same id and arguments) when they are not in effect: call Configure as the
    /// first statement of Main, and set it false in a test host or any process that must not
    /// restart. MIXERFLOW_HUGETLB=0 in the environment opts out.
    member val HugePages = true with get, set
    /// LibTorch's intra-op thread count (default 0: leave LibTorch's choice, all cores).
    member val IntraOpThreads = 0 with get, set

    /// A copy of these options.
    member this.Clone() = this.MemberwiseClone() :?> RuntimeOptions
    /// A copy with <see cref="OneDnn"/> set.
    member this.WithOneDnn(enabled: bool) = let c = this.Clone() in c.OneDnn <- enabled; c
    /// A copy with <see cref="Nnpack"/> set.
    member this.WithNnpack(enabled: bool) = let c = this.Clone() in c.Nnpack <- enabled; c
    /// A copy with <see cref="TrustMklCpuDispatch"/> set.
    member this.WithTrustMklCpuDispatch(trust: bool) = let c = this.Clone() in c.TrustMklCpuDispatch <- trust; c
    /// A copy with the OpenMP wait policy (null: LibTorch's default) and spin count set.
    member this.WithOpenMpWaitPolicy(policy: string, spinCount: int) =
        let c = this.Clone()
        c.OpenMpWaitPolicy <- policy
        c.OpenMpSpinCount <- spinCount
        c
    /// A copy with <see cref="HugePages"/> set.
    member this.WithHugePages(enabled: bool) = let c = this.Clone() in c.HugePages <- enabled; c
    /// A copy with <see cref="IntraOpThreads"/> set (0: LibTorch's choice).
    member this.WithIntraOpThreads(threads: int) = let c = this.Clone() in c.IntraOpThreads <- threads; c

/// One switch of the runtime: its name, its current value, and who set it.
[<Sealed>]
type RuntimeSetting(name: string, value: string, setBy: string) =
    /// The switch, e.g. "oneDNN".
    member _.Name = name
    /// Its value now, in words.
    member _.Value = value
    /// Who set it: "MixerFlowRuntime.Configure", "environment", "LibTorch's default", ...
    member _.SetBy = setBy
    override _.ToString() = sprintf "%-26s %s (%s)" name value setBy

/// The runtime's state: each switch with its value and who set it, and the warnings of every
/// Configure so far (a switch asked for too late to take effect).
[<Sealed>]
type RuntimeDescription(settings: IReadOnlyList<RuntimeSetting>, warnings: IReadOnlyList<string>) =
    /// The switches, in a fixed order.
    member _.Settings = settings
    /// What could not be done as asked, and why; empty when everything took effect.
    member _.Warnings = warnings
    /// The setting named `name`; throws KeyNotFoundException for an unknown name.
    member _.Item
        with get (name: string) =
            match settings |> Seq.tryFind (fun s -> s.Name = name) with
            | Some s -> s
            | None -> raise (KeyNotFoundException(sprintf "no runtime setting named %s" name))
    /// One line per setting, then one per warning.
    override _.ToString() =
        let lines = [ for s in settings -> "  " + string s ] @ [ for w in warnings -> "  warning: " + w ]
        String.Join(Environment.NewLine, lines)
