namespace MixerFlow.Core.Runtime

open System
open System.IO
open System.Collections.Generic
open MixerFlow.Core
open TorchSharp

module internal RuntimeState =
    let configuredBy = "MixerFlowRuntime.Configure"

    /// Whether LibTorch (and with it its OpenMP runtime) is mapped into this process: after that,
    /// libgomp has read OMP_WAIT_POLICY and GOMP_SPINCOUNT and setting them changes nothing.
    let libTorchLoaded () =
        OperatingSystem.IsLinux()
        && (try
                File.ReadLines "/proc/self/maps"
                |> Seq.exists (fun l -> l.Contains("libgomp", StringComparison.Ordinal) || l.Contains("libtorch_cpu", StringComparison.Ordinal))
            with _ -> false)

    /// The C environment's value (setenv does not change .NET's copy).
    let env (name: string) = NativeGlue.getenv name
    let given (name: string) = not (String.IsNullOrEmpty(env name))

    // What Configure did, for Describe; null until it did it.
    let mutable configured : RuntimeOptions = null
    let mutable waitPolicy : string = null
    let mutable mklOutcome : string = null
    let mutable mklTrustedByUs = false
    let mutable mallocOutcome : string = null
    let mutable threadsSet = 0
    let warnings = List<string>()

    /// Sets OMP_WAIT_POLICY (and GOMP_SPINCOUNT) in the C environment unless given or too late.
    /// LibTorch's OpenMP (libgomp) lets idle worker threads spin; with two threads on two busy
    /// cores most of a step went to spinning under load. A pure sleep costs a futex wake-up per
    /// parallel region; a short spin first (GOMP_SPINCOUNT=10000) was faster still (both measured
    /// in docs/benchmarks.md). libgomp reads both once, when it loads with LibTorch.
    let openMp (o: RuntimeOptions) (warn: string -> unit) : string =
        let policy = o.OpenMpWaitPolicy
        if given "OMP_WAIT_POLICY" then
            match waitPolicy with
            | null -> env "OMP_WAIT_POLICY" + " (given)"
            | earlier ->
                if not (isNull policy) && not (String.Equals(policy, env "OMP_WAIT_POLICY", StringComparison.OrdinalIgnoreCase)) then
                    warn (sprintf "OpenMP wait policy %s asked for, but OMP_WAIT_POLICY=%s is already set and LibTorch's OpenMP reads it once" policy (env "OMP_WAIT_POLICY"))
                earlier
        elif String.IsNullOrEmpty policy then "LibTorch's default"
        elif libTorchLoaded () then
            warn (sprintf "OpenMP wait policy %s asked for after LibTorch's OpenMP was loaded (it reads OMP_WAIT_POLICY once, when it loads): call MixerFlowRuntime.Configure before anything uses TorchSharp" policy)
            "LibTorch's default (Configure came after LibTorch had loaded)"
        elif not (OperatingSystem.IsLinux()) || (try NativeGlue.setenv ("OMP_WAIT_POLICY", policy, 0) <> 0 with _ -> true) then
            "LibTorch's default (could not set OMP_WAIT_POLICY)"
        else
            let p = policy.ToUpperInvariant()
            if p <> "PASSIVE" then p + " (set by MixerFlow)"
            elif given "GOMP_SPINCOUNT" then "PASSIVE (set by MixerFlow; GOMP_SPINCOUNT given)"
            elif o.OpenMpSpinCount > 0 && (try NativeGlue.setenv ("GOMP_SPINCOUNT", string o.OpenMpSpinCount, 0) = 0 with _ -> false) then
                sprintf "PASSIVE after a short spin (GOMP_SPINCOUNT=%d, set by MixerFlow)" o.OpenMpSpinCount
            else "PASSIVE (set by MixerFlow)"

    /// MKL's CPU dispatch as asked, where it can still be chosen.
    let mkl (o: RuntimeOptions) (warn: string -> unit) : string =
        if env "MIXERFLOW_MKL_GENERIC" = "1" then "left on MKL's own CPU check (MIXERFLOW_MKL_GENERIC=1)"
        elif o.TrustMklCpuDispatch then
            let trusted, outcome = MklDispatch.trustCpuFeatures ()
            if trusted && outcome = "MKL set to trust the CPU's feature flags" then mklTrustedByUs <- true
            if not trusted && outcome.StartsWith("MKL had already chosen", StringComparison.Ordinal) then
                warn "MKL's CPU dispatch asked for after MKL's first GEMM had chosen its generic kernels: left alone (call MixerFlowRuntime.Configure before any matrix product)"
            if mklTrustedByUs && outcome = "MKL already trusts this CPU" then "MKL set to trust the CPU's feature flags" else outcome
        else
            if mklTrustedByUs then
                warn "MKL's own CPU check asked for after an earlier Configure made MKL trust the CPU: MKL keeps its first choice"
                "MKL set to trust the CPU's feature flags"
            else "left on MKL's own CPU check (RuntimeOptions.TrustMklCpuDispatch is false)"

    /// glibc malloc on huge pages: the restart (which does not return when it happens), or why not.
    let malloc (o: RuntimeOptions) : string =
        if not o.HugePages then
            if isNull mallocOutcome then "not asked for (RuntimeOptions.HugePages is false)" else mallocOutcome
        else
            match HugePages.RestartWithHugePages() with
            | "already in effect" when env "MIXERFLOW_HUGETLB_RESTARTED" = "1" -> configuredBy + " (restarted the process)"
            | "already in effect" -> "environment (GLIBC_TUNABLES)"
            | why -> "not restarted: " + why

    let onOff (b: bool) = if b then "on" else "off"

    /// Who set a LibTorch switch whose value is `now`, Configure having asked for `asked` (if at all).
    let switchSetBy (now: bool) (asked: bool option) =
        match asked with
        | Some a when a = now -> configuredBy
        | Some _ -> "changed after Configure, outside MixerFlowRuntime"
        | None -> "LibTorch's default or the application's own code (Configure not called)"

/// The one place where a MixerFlow application sets up the process: LibTorch's oneDNN and NNPACK
/// switches, MKL's CPU dispatch, the OpenMP wait policy, glibc malloc's huge pages and LibTorch's
/// thread count. MixerFlow's bijectors, flows and models never set any of them (MixerFlow's own
/// convolutions are right whatever they say); the `mixerflow` tool, the benchmarks and the tests
/// call <see cref="Configure"/> first. Everything is process-wide.
///
/// Calling Configure again is defined: LibTorch's switches (oneDNN, NNPACK, threads) take the
/// latest call's values; the OpenMP environment, MKL's dispatch and malloc's tunables are read
/// by the native libraries once, so the first setting that took effect stays, and a later call
/// asking otherwise gets a warning (<see cref="RuntimeDescription.Warnings"/>). A call with the
/// same options changes nothing.
[<AbstractClass; Sealed>]
type MixerFlowRuntime =
    static let gate = obj ()

    /// Sets the process up as `options` say, as far as it still can, and returns the state (as
    /// <see cref="Describe"/>). Call it as the first statement of Main: the OpenMP wait policy
    /// takes effect only before LibTorch loads, MKL's dispatch only before its first GEMM, and
    /// with HugePages set the process restarts itself (and this call does not return) when
    /// malloc's tunables are not in effect. What came too late is reported in the result's
    /// Warnings, never written to the console. Throws NativeLoadException when TorchSharp's native
    /// glue cannot load.
    static member Configure(options: RuntimeOptions) : RuntimeDescription =
        if isNull options then nullArg "options"
        lock gate (fun () ->
            let warn (w: string) = if not (RuntimeState.warnings.Contains w) then RuntimeState.warnings.Add w
            RuntimeState.mallocOutcome <- RuntimeState.malloc options
            RuntimeState.waitPolicy <- RuntimeState.openMp options warn
            NativeRuntime.EnsureLoaded()
            if NativeBackend.Available then
                NativeBackend.MkldnnEnabled <- options.OneDnn
                NativeBackend.NnpackEnabled <- options.Nnpack
            else warn "LibTorch's oneDNN and NNPACK switches cannot be reached in this LibTorch build; left as LibTorch set them"
            RuntimeState.mklOutcome <- RuntimeState.mkl options warn
            if options.IntraOpThreads > 0 then
                torch.set_num_threads options.IntraOpThreads
                RuntimeState.threadsSet <- options.IntraOpThreads
            RuntimeState.configured <- options.Clone()
            MixerFlowRuntime.Describe())

    /// The options of the latest Configure, or null when it was not called in this process.
    static member Configured : RuntimeOptions =
        match RuntimeState.configured with null -> null | o -> o.Clone()

    /// What was done about the OpenMP wait policy, in words (e.g. "PASSIVE after a short spin
    /// (GOMP_SPINCOUNT=10000, set by MixerFlow)", "ACTIVE (given)").
    static member OpenMpWaitPolicy : string =
        match RuntimeState.waitPolicy with
        | null -> if RuntimeState.given "OMP_WAIT_POLICY" then RuntimeState.env "OMP_WAIT_POLICY" + " (given)" else "LibTorch's default (Configure not called)"
        | p -> p

    /// What was done about MKL's CPU dispatch, in words.
    static member MklOutcome : string =
        match RuntimeState.mklOutcome with null -> "MKL's own CPU check (Configure not called)" | m -> m

    /// The state of every switch now: its value and who set it, and the warnings so far. Reads
    /// only; it does not load LibTorch (its switches read "LibTorch not loaded yet" before then).
    static member Describe() : RuntimeDescription =
        lock gate (fun () ->
            let o = RuntimeState.configured
            let asked (f: RuntimeOptions -> bool) = if isNull o then None else Some(f o)
            let loaded = RuntimeState.libTorchLoaded ()
            let reachable = loaded && NativeBackend.Available
            let pending = "LibTorch not loaded yet", "LibTorch's default applies when it loads"
            let switch name (read: unit -> bool) (f: RuntimeOptions -> bool) =
                if reachable then
                    let v = read ()
                    RuntimeSetting(name, RuntimeState.onOff v, RuntimeState.switchSetBy v (asked f))
                elif loaded then RuntimeSetting(name, "unknown", "switch not reachable in this LibTorch build")
                else RuntimeSetting(name, fst pending, snd pending)
            let mklValue =
                if not loaded then fst pending
                else
                    match MklDispatch.cached () with
                    | Ok -1 -> "not chosen yet"
                    | Ok 0 -> "MKL's generic kernels"
                    | Ok 1 -> "the CPU's feature flags trusted"
                    | Ok n -> sprintf "cached answer %d" n
                    | Error why -> why
            let threads =
                if not loaded then RuntimeSetting("LibTorch intra-op threads", fst pending, snd pending)
                else
                    let n = torch.get_num_threads ()
                    let by = if RuntimeState.threadsSet > 0 && RuntimeState.threadsSet = n then RuntimeState.configuredBy else "LibTorch's default or the application's own code"
                    RuntimeSetting("LibTorch intra-op threads", string n, by)
            let ompValue =
                if RuntimeState.given "OMP_WAIT_POLICY" then
                    "OMP_WAIT_POLICY=" + RuntimeState.env "OMP_WAIT_POLICY"
                    + (if RuntimeState.given "GOMP_SPINCOUNT" then ", GOMP_SPINCOUNT=" + RuntimeState.env "GOMP_SPINCOUNT" else "")
                else "LibTorch's default"
            let settings =
                [| switch "oneDNN" (fun () -> NativeBackend.MkldnnEnabled) (fun o -> o.OneDnn)
                   switch "NNPACK" (fun () -> NativeBackend.NnpackEnabled) (fun o -> o.Nnpack)
                   RuntimeSetting("MKL CPU dispatch", mklValue, MixerFlowRuntime.MklOutcome)
                   RuntimeSetting("OpenMP wait policy", ompValue, MixerFlowRuntime.OpenMpWaitPolicy)
                   RuntimeSetting("malloc", HugePages.Description,
                                  (match RuntimeState.mallocOutcome with null -> "Configure not called" | m -> m))
                   threads |]
            RuntimeDescription(settings, RuntimeState.warnings.ToArray()))
