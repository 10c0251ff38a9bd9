module MixerFlow.Properties.AssemblyInfo

open MixerFlow.Core.Runtime

/// xunit's test framework, after setting the runtime up as the mixerflow tool does (without its
/// huge-pages restart of the test host): xunit constructs it once per test process, before any
/// test, so every check runs under the same switches (oneDNN off, MKL's kernels, OpenMP policy).
type RuntimeFramework(sink: Xunit.Abstractions.IMessageSink) =
    inherit Xunit.Sdk.XunitTestFramework(sink)
    do MixerFlowRuntime.Configure(RuntimeOptions(HugePages = false)) |> ignore

// The checks seed torch's global generator; tests must not interleave.
[<assembly: Xunit.CollectionBehavior(DisableTestParallelization = true)>]
[<assembly: Xunit.TestFramework("MixerFlow.Properties.AssemblyInfo+RuntimeFramework", "MixerFlow.Properties")>]
do ()
