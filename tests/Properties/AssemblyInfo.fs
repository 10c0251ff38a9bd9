module MixerFlow.Properties.AssemblyInfo

// The checks seed torch's global generator; tests must not interleave.
[<assembly: Xunit.CollectionBehavior(DisableTestParallelization = true)>]
do ()
