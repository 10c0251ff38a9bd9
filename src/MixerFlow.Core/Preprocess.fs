namespace MixerFlow.Core

open System
open TorchSharp
open MixerFlow.Core.Ops

/// Uniform dequantisation (Theis, van den Oord & Bethge 2016; Dinh et al. 2017): 8-bit pixel
/// values x in {0..255} (stored as floats) -> y = (x + u) / 256 with u ~ U[0, 1), so y lies in
/// [0, 1). log|det dy/dx| = -n log 256, which makes a continuous density on y a bound on the
/// probability of the discrete x (bits/dim of the 8-bit data). The inverse rounds down:
/// inverse(forward(x)) = x; it is a surjection, not a bijection.
type Dequantize internal (name: string, eventShape: int64[], levels: int) =
    inherit Bijector(name, eventShape, eventShape)
    let logLevels = Math.Log(float levels) * float (Shapes.numel eventShape)
    /// Uniform dequantisation of `levels` values per element.
    /// <param name="eventShape">The shape of one sample.</param>
    /// <param name="levels">Values per element (256 for 8 bits).</param>
    new(eventShape: int64[], levels: int) = new Dequantize("Dequantize", eventShape, levels)
    /// Uniform dequantisation of 8-bit values.
    /// <param name="eventShape">The shape of one sample.</param>
    new(eventShape: int64[]) = new Dequantize("Dequantize", eventShape, 256)
    member _.Levels = levels
    /// Use u = 1/2 instead of uniform noise: a deterministic map, for embeddings and for
    /// measuring reconstruction error.
    member val Midpoint = false with get, set
    /// The noise u of the next forward passes instead of fresh uniform noise (null: draw it), of
    /// the input's shape. Data-parallel training sets each rank's slice of the noise drawn for the
    /// whole global batch, so N ranks see exactly the noise one process would at N times the batch.
    member val Noise : torch.Tensor = null with get, set
    /// (x + u) / levels: the forward map's value (u = 1/2, the given noise or fresh uniform noise).
    member internal this.Dequantized(x: Tensor) =
        this.CheckShape(x, eventShape, "input")
        let y =
            if this.Midpoint then torch.full_like(x, scalar 0.5).add_(x, Scalars.One)
            elif not (isNull this.Noise) then
                if this.Noise.shape <> x.shape then
                    invalidArg "x" (sprintf "Dequantize: the given noise has shape %A, the input %A" this.Noise.shape x.shape)
                x +. this.Noise
            // x + u into the fresh noise (the same sum, one tensor fewer).
            else torch.rand_like(x).add_(x, Scalars.One)
        y.div_(scalar (float levels))
    override this.Forward(x) =
        Transformed.Constant(this.Dequantized x, torch.full(([||]: int64[]), scalar -logLevels, dtype = x.dtype, device = x.device))
    override this.Inverse(y) =
        this.CheckShape(y, eventShape, "input")
        let x = (y * scalar (float levels)).floor().clamp(scalar 0.0, scalar (float (levels - 1)))
        Transformed.Constant(x, torch.full(([||]: int64[]), scalar logLevels, dtype = y.dtype, device = y.device))
    override _.Traits = { BijectorTraits.Bijective with Surjective = true }
    /// log(levels) times the event size: minus the log-det of one sample.
    member internal _.LogLevels = logLevels

/// Logit transform with a margin (Dinh et al. 2017, RealNVP, section 4.1):
/// y = logit(alpha + (1 - 2 alpha) x) for x in [0, 1]; the margin keeps y finite at 0 and 1.
/// log|dy/dx| = log(1 - 2 alpha) - log p - log(1 - p), p = alpha + (1 - 2 alpha) x.
type Logit(eventShape: int64[], alpha: float) =
    inherit Bijector("Logit", eventShape, eventShape)
    do if not (alpha > 0.0 && alpha < 0.5) then invalidArg "alpha" (sprintf "Logit: alpha must lie in (0, 0.5), got %g" alpha)
    new(eventShape) = new Logit(eventShape, 0.05)
    member _.Alpha = alpha
    override this.Forward(x) =
        this.CheckShape(x, eventShape, "input")
        // Fresh intermediates are updated in place where their backward does not read them.
        let p = (x * scalar (1.0 - 2.0 * alpha)).add_(scalar alpha, Scalars.One)
        let logP = p.log()
        let log1mP = p.neg().add_(Scalars.One, Scalars.One).log()
        let y = logP - log1mP
        let ld = (logP +. log1mP).neg_().add_(scalar (Math.Log(1.0 - 2.0 * alpha)), Scalars.One)
        Transformed.Elementwise(y, ld)
    override this.Inverse(y) =
        this.CheckShape(y, eventShape, "input")
        let p = y.sigmoid()
        let x = (p - scalar alpha) / scalar (1.0 - 2.0 * alpha)
        // log p + log(1 - p) = logsigmoid(y) + logsigmoid(-y), stable for large |y|.
        let ld = torch.nn.functional.logsigmoid(y) +. torch.nn.functional.logsigmoid(y.neg()) - scalar (Math.Log(1.0 - 2.0 * alpha))
        Transformed.Elementwise(x, ld)

/// Bits per dimension of the discrete data from a log-likelihood in nats.
[<AbstractClass; Sealed>]
type Likelihood =
    /// -log p / (n log 2), n = number of dimensions per sample.
    static member BitsPerDim(logLikelihoodNats: Tensor, dimensions: int64) =
        logLikelihoodNats.neg().div_(scalar (float dimensions * Math.Log 2.0))
    /// Standard normal log density per sample.
    static member StandardNormalLogProb(z: Tensor) = standardNormalLogProb z
