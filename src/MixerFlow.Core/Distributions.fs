namespace MixerFlow.Core

open System
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core.Ops

/// A base (latent) distribution of a flow over events of `eventShape`, batch-first. A module:
/// it follows `to(device | dtype)` through its parameters or, for a distribution without any,
/// through the registered buffer `reference` (an empty tensor), so samples come out on the
/// module's device and in its dtype.
/// <param name="name">The module's name.</param>
/// <param name="eventShape">The shape of one sample.</param>
[<AbstractClass>]
type BaseDistribution(name: string, eventShape: int64[]) as this =
    inherit torch.nn.Module(name)
    let reference = torch.zeros([| 0L |])
    do this.register_buffer("reference", reference)
    member _.EventShape = Array.copy eventShape
    /// The dtype and device samples are drawn in.
    member _.Reference = reference
    /// log density per sample: [B, eventShape...] -> [B].
    /// <param name="z">A batch of events.</param>
    abstract LogProb: z: Tensor -> Tensor
    /// n samples [n, eventShape...], reparameterised (differentiable in the parameters).
    /// <param name="n">How many samples.</param>
    /// <param name="temperature">Scales the spread (the standard deviation of a normal); 1 is the distribution itself.</param>
    abstract Sample: n: int64 * temperature: float -> Tensor
    /// n samples at temperature 1.
    /// <param name="n">How many samples.</param>
    member this.Sample(n: int64) = this.Sample(n, 1.0)
    /// Standard normal noise [n, eventShape...] in the module's dtype and device.
    member _.Noise(n: int64) = torch.randn(batchShape n eventShape, dtype = reference.dtype, device = reference.device)

/// The standard normal N(0, I) over events of `eventShape`.
type StandardNormal(eventShape: int64[]) =
    inherit BaseDistribution("StandardNormal", eventShape)
    override _.LogProb(z) = standardNormalLogProb z
    override this.Sample(n, temperature) = this.Noise n * scalar temperature

/// A normal with a learnable mean and log standard deviation per element (registered as
/// `mean`, `logStd`), initialised to N(0, I).
type DiagonalNormal(eventShape: int64[]) as this =
    inherit BaseDistribution("DiagonalNormal", eventShape)
    let mean = new Parameter(torch.zeros(eventShape))
    let logStd = new Parameter(torch.zeros(eventShape))
    do
        this.register_parameter("mean", mean)
        this.register_parameter("logStd", logStd)
    member _.Mean = mean
    member _.LogStd = logStd
    override _.LogProb(z) =
        let u = (z - mean) * logStd.neg().exp()
        sumPerSample ((addScalar (u * u) (Math.Log(2.0 * Math.PI))) * scalar -0.5 - logStd)
    override this.Sample(n, temperature) = mean +. this.Noise n * scalar temperature * logStd.exp()
