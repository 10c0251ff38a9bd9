namespace MixerFlow.Core

/// Default values shared by the library, the property checks and the command line, each in one
/// place. Constants (C# sees them as `const`, usable as default parameter values).
[<RequireQualifiedAccess>]
module Defaults =
    /// Seed that derandomises the property checks' FsCheck runs (`check --seed`, CheckOptions).
    [<Literal>]
    let CheckSeed = 20261129

    /// Random cases per property check (`check --cases`, CheckOptions).
    [<Literal>]
    let CheckCases = 12

    /// Images per batch when scoring a model or computing latents (`eval --batch-size`, Evaluation).
    [<Literal>]
    let EvaluationBatchSize = 256

    /// Samples per temperature (`sample --count`).
    [<Literal>]
    let SampleCount = 64

    /// Samples drawn per batch, so that memory stays bounded whatever the count.
    [<Literal>]
    let SampleBatchSize = 256

    /// Temperature of the base distribution when sampling (`sample --temperature`).
    [<Literal>]
    let SampleTemperature = 0.7

    /// Seed of the base samples (`sample --seed`).
    [<Literal>]
    let SampleSeed = 0

    /// Images on an interpolation path, both ends included (`interpolate --steps`).
    [<Literal>]
    let InterpolationSteps = 10
