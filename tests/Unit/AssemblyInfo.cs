// Tests seed torch's global generator and measure native memory: run them one at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]

namespace MixerFlow.Unit
{
    static class LibTorchSetup
    {
        /// <summary>
        /// Sets LibTorch up as MixerFlow does (OpenMP wait policy, oneDNN off, MKL's kernels) when
        /// the test assembly loads, before any test's first GEMM: a test that multiplied matrices
        /// before its first MixerFlow object would otherwise leave this process on MKL's generic
        /// kernels while the mixerflow processes the tests start use the fast ones, and results
        /// compared across processes would differ in the last bits.
        /// </summary>
        [System.Runtime.CompilerServices.ModuleInitializer]
        internal static void AsMixerFlowDoes()
        {
            MixerFlow.Core.NativeRuntime.EnsureLoaded();
            MixerFlow.Core.NativeBackend.Ensure();
        }
    }
}
