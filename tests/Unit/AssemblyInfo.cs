// Tests seed torch's global generator and measure native memory: run them one at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
