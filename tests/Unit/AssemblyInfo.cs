// Tests seed torch's global generator and measure native memory: run them one at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]

namespace MixerFlow.Unit
{
    static class LibTorchSetup
    {
        /// <summary>
        /// Sets the runtime up as the mixerflow tool does (OpenMP wait policy, oneDNN off, MKL's
        /// kernels; no huge-pages restart of the test host) when the test assembly loads, before
        /// any test's first GEMM: a test that multiplied matrices first would otherwise leave this
        /// process on MKL's generic kernels while the mixerflow processes the tests start use the
        /// fast ones, and results compared across processes would differ in the last bits.
        /// </summary>
        [System.Runtime.CompilerServices.ModuleInitializer]
        internal static void AsMixerFlowDoes() => Configured = MixerFlow.Core.Runtime.MixerFlowRuntime.Configure(Options);

        /// <summary>The options the tests run under (the tool's defaults without huge pages).</summary>
        internal static MixerFlow.Core.Runtime.RuntimeOptions Options => new() { HugePages = false };

        /// <summary>What the first Configure of this process reported.</summary>
        internal static MixerFlow.Core.Runtime.RuntimeDescription? Configured { get; private set; }
    }
}
