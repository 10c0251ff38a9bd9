namespace MixerFlow.Core

open System
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core.Ops

/// Dequantisation noise drawn from q(u | x) with its log density. Deconstructs in C# as
/// `var (u, logQ) = dequantizer.Sample(x)`.
[<Struct>]
type DequantizationNoiseSample(noise: Tensor, logDensity: Tensor) =
    /// The noise u, of the pixels' shape [B, C, H, W], each value in (0, 1).
    member _.Noise = noise
    /// log q(u | x) per sample, [B] (nats; 0 for uniform noise).
    member _.LogDensity = logDensity
    /// The noise and its log density, for C#'s `var (u, logQ) = ...`.
    member _.Deconstruct([<Out>] u: byref<Tensor>, [<Out>] logQ: byref<Tensor>) =
        u <- noise
        logQ <- logDensity

/// The flow of variational dequantisation's noise (Ho et al. 2019, Flow++, section 3.1): a
/// conditional bijection from eps in R^(C x H x W) to u in (0, 1)^(C x H x W) given the pixels x.
/// `layers` affine couplings with checkerboard masks (the squares of one colour condition, the
/// others move, the colours alternating from layer to layer) whose conditioners see the
/// conditioning values and the pixel image, then an elementwise sigmoid:
///   e_k = m_k e_(k-1) + (1 - m_k) (e_(k-1) exp(s_k) + t_k),  (t_k, s_k) = net_k([m_k e_(k-1), x']),
///   u = sigmoid(e_K),
///   log|det du/deps| = sum_k sum (1 - m_k) s_k + sum (log sigmoid(e_K) + log sigmoid(-e_K)).
/// Each net is Glow's coupling network (<see cref="Conditioners.Conv"/>: 3x3, 1x1 and a
/// zero-initialised 3x3 convolution of `width` channels) from 2C to 2C channels; the log-scale is
/// soft-clamped to (-2, 2). A new flow's couplings are the identity: u = sigmoid(eps).
/// The context x' is the pixel image scaled to [-1, 1], flattened per sample ([B, C H W]:
/// <see cref="VariationalDequantize.Context"/>). Registered names: `nets`, `masks`.
/// <param name="eventShape">The image shape [channels, height, width], at least 2 pixels.</param>
/// <param name="layers">Affine couplings (at least 1).</param>
/// <param name="width">Channels of the coupling networks' hidden convolutions (at least 1).</param>
type DequantizationFlow(eventShape: int64[], layers: int, width: int64) as this =
    inherit Bijector("DequantizationFlow", eventShape, eventShape)
    do
        if isNull eventShape || eventShape.Length <> 3 || eventShape |> Array.exists (fun s -> s < 1L) then
            invalidArg "eventShape" (sprintf "DequantizationFlow needs an image shape [channels, height, width], got %s"
                                        (if isNull eventShape then "null" else Shapes.show eventShape))
        if eventShape.[1] * eventShape.[2] < 2L then
            invalidArg "eventShape" (sprintf "DequantizationFlow needs at least 2 pixels (both colours of its checkerboard), got %s" (Shapes.show eventShape))
        if layers < 1 then invalidArg "layers" (sprintf "DequantizationFlow needs at least 1 coupling, got %d" layers)
        if width < 1L then invalidArg "width" (sprintf "DequantizationFlow needs width >= 1, got %d" width)
    let channels = eventShape.[0]
    let features = Shapes.numel eventShape
    let affine = Affine(ScaleBound.SoftClamp 2.0)
    let nets =
        let make = Conditioners.Conv(width)
        new ModuleList<torch.nn.Module<Tensor, Tensor>>([| for _ in 1 .. layers -> make.Invoke(2L * channels, 2L * channels) |])
    /// masks.[0]: 1 on the squares (h + w even) that condition the even layers; masks.[1] = 1 - masks.[0]; [2, 1, H, W].
    let masks =
        let h, w = int eventShape.[1], int eventShape.[2]
        let values = [| for colour in 0 .. 1 do for i in 0 .. h - 1 do for j in 0 .. w - 1 -> if (i + j + colour) % 2 = 0 then 1.0f else 0.0f |]
        torch.tensor(values).reshape(2L, 1L, int64 h, int64 w)
    do
        this.register_module("nets", nets)
        this.register_buffer("masks", masks)

    /// The couplings.
    member _.Layers = layers
    /// Channels of the coupling networks' hidden convolutions.
    member _.Width = width
    /// The coupling networks, in forward order.
    member _.Networks : Collections.Generic.IReadOnlyList<torch.nn.Module<Tensor, Tensor>> = Seq.toArray nets :> _
    override _.ContextFeatures = features

    /// The context [B, C H W] as an image [B, C, H, W], checked.
    member private this.ContextImage(context: Tensor, batch: int64) =
        if isNull context then
            invalidArg "context" (sprintf "%s is conditional: it needs the pixels' context of %d features (Forward(eps, context))" this.Name features)
        if context.dim() <> 2L || context.shape.[0] <> batch || context.shape.[1] <> features then
            invalidArg "context" (sprintf "%s expects a context of shape [%d, %d], got %s" this.Name batch features (Shapes.show context.shape))
        context.reshape(Array.append [| batch |] eventShape)

    /// Coupling k: its network's shift and unconstrained log-scale for e, and the masks
    /// (conditioning, moving) of its colour, each [1, 1, H, W].
    member private _.Coupling(k: int, e: Tensor, image: Tensor) =
        let keep = masks.narrow(0L, int64 (k % 2), 1L)
        let free = masks.narrow(0L, int64 (1 - k % 2), 1L)
        let conditioning = e * keep
        let out = nets.[k].call(torch.cat([| conditioning; image |], 1L))
        let parts = out.split([| channels; channels |], 1L)
        struct (conditioning, free, parts.[0], parts.[1])

    override this.Forward(eps: Tensor, context: Tensor) =
        this.CheckShape(eps, eventShape, "input")
        let image = this.ContextImage(context, eps.shape.[0])
        let mutable e = eps
        let mutable logDerivative : Tensor = null
        for k in 0 .. layers - 1 do
            let struct (conditioning, free, shift, raw) = this.Coupling(k, e, image)
            let struct (moved, logScale) = affine.ForwardParts(e, shift, raw)
            e <- (moved * free).add_(conditioning, Scalars.One)
            let term = logScale * free
            logDerivative <- if isNull logDerivative then term else logDerivative.add_(term, Scalars.One)
        // log sigmoid'(e) = log sigmoid(e) + log sigmoid(-e), stable for large |e|.
        let sigmoidTerm = torch.nn.functional.logsigmoid(e) +. torch.nn.functional.logsigmoid(e.neg())
        Transformed.Elementwise(e.sigmoid(), logDerivative.add_(sigmoidTerm, Scalars.One))

    override this.Inverse(u: Tensor, context: Tensor) =
        this.CheckShape(u, eventShape, "input")
        let image = this.ContextImage(context, u.shape.[0])
        let logU = u.log()
        let log1mU = u.neg().log1p()
        let mutable e = logU - log1mU
        let mutable logDerivative = (logU +. log1mU).neg_()
        for k in layers - 1 .. -1 .. 0 do
            let struct (conditioning, free, shift, raw) = this.Coupling(k, e, image)
            let struct (back, negLogScale) = affine.InverseParts(e, shift, raw)
            e <- (back * free).add_(conditioning, Scalars.One)
            logDerivative <- logDerivative.add_(negLogScale * free, Scalars.One)
        Transformed.Elementwise(e, logDerivative)

    override this.Forward(_eps: Tensor) : Transformed =
        invalidArg "context" (sprintf "%s is conditional: it needs the pixels' context (Forward(eps, context))" this.Name)
    override this.Inverse(_u: Tensor) : Transformed =
        invalidArg "context" (sprintf "%s is conditional: it needs the pixels' context (Inverse(u, context))" this.Name)

/// Variational dequantisation (Ho et al. 2019, Flow++): 8-bit pixel values x -> y = (x + u) / 256
/// as in <see cref="Dequantize"/>, with the noise u drawn from a learned q(u | x) instead of
/// U[0, 1)^D. The noise starts as uniform draws v (the <see cref="Dequantize.Noise"/> property's, or
/// fresh ones), eps = logit(v) is then a standard logistic draw, and the flow
/// (<see cref="DequantizationFlow"/>) maps it to u given x. So
///   log q(u | x) = sum log logistic(eps) - log|det du/deps|,  log logistic(e) = log sigmoid(e) + log sigmoid(-e),
/// and while the flow's couplings are the identity (as built) u = sigmoid(logit(v)) = v and
/// log q = 0: uniform dequantisation exactly.
/// The forward log-det is -D log 256 - log q(u | x), so a flow's LogProb is the variational bound
///   log P(x) >= E_q[ log p(x + u) - log q(u | x) ]
/// at one draw, a bound on the discrete data as uniform dequantisation's (log q = 0) is, and a
/// tighter one as q learns. That log-det is a bound's term, not log|det J|
/// (<see cref="BijectorTraits.VariationalLogDet"/>). The inverse rounds down as Dequantize's does,
/// with log-det D log 256: sampling ignores q. With <see cref="Dequantize.Midpoint"/> u = 1/2 (and
/// the log-det -D log 256), as for Dequantize. Registered names: `flow`.
/// <param name="eventShape">The image shape [channels, height, width].</param>
/// <param name="flow">q(u | x)'s flow, of the same shape.</param>
/// <param name="levels">Values per pixel (256 for 8 bits).</param>
type VariationalDequantize(eventShape: int64[], flow: DequantizationFlow, levels: int) as this =
    inherit Dequantize("VariationalDequantize", eventShape, levels)
    do
        if isNull (box flow) then nullArg "flow"
        if flow.InputShape <> eventShape then
            invalidArg "flow" (sprintf "VariationalDequantize: the flow's shape %s is not the image's %s" (Shapes.show flow.InputShape) (Shapes.show eventShape))
        if levels < 2 then invalidArg "levels" (sprintf "VariationalDequantize needs at least 2 levels, got %d" levels)
        this.register_module("flow", flow)
    /// The largest distance from 0 and 1 kept by uniform draws and noise of a dtype (half its
    /// machine epsilon: 1 - margin is the largest value below 1), so that logit(v) is finite
    /// and x + u stays below x + 1.
    static let margin (dtype: torch.ScalarType) =
        match dtype with
        | torch.ScalarType.Float64 -> Math.Pow(2.0, -53.0)
        | torch.ScalarType.Float16 -> Math.Pow(2.0, -11.0)
        | torch.ScalarType.BFloat16 -> Math.Pow(2.0, -8.0)
        | _ -> Math.Pow(2.0, -24.0)
    let logLevelsPerSample = Math.Log(float levels) * float (Shapes.numel eventShape)
    /// The largest u kept for a dtype: x + u below x + 1 for every pixel value x, in that dtype
    /// (1 less the spacing of its values just below the power of 2 at or above levels).
    let largestNoise (dtype: torch.ScalarType) =
        1.0 - Math.Pow(2.0, Math.Ceiling(Math.Log2(float levels))) * margin dtype

    /// With a new flow of `layers` couplings of `width` channels, for 8-bit pixels.
    /// <param name="eventShape">The image shape [channels, height, width].</param>
    /// <param name="layers">Affine couplings of the noise flow.</param>
    /// <param name="width">Channels of their networks' hidden convolutions.</param>
    new(eventShape: int64[], layers: int, width: int64) =
        new VariationalDequantize(eventShape, new DequantizationFlow(eventShape, layers, width), 256)

    /// q(u | x)'s flow.
    member _.Flow = flow

    /// The flow's context for pixels x [B, C, H, W]: x scaled to [-1, 1] (2 x / (levels - 1) - 1),
    /// flattened per sample, without gradient (x is data).
    /// <param name="x">Pixel values 0 .. levels - 1.</param>
    member _.Context(x: Tensor) : Tensor =
        x.detach().mul(scalar (2.0 / float (levels - 1))).add_(scalar -1.0, Scalars.One).reshape(x.shape.[0], -1L)

    /// u ~ q(u | x) from the given uniform draws v (of x's shape, in [0, 1); kept within
    /// [margin, 1 - margin], margin half the dtype's machine epsilon, so that logit(v) is finite):
    /// eps = logit(v), u = flow(eps; x), with log q(u | x). The value of u is kept within
    /// [margin, 1 - levels' resolution] (for float32 and 256 levels [2^-24, 1 - 2^-16]), where the
    /// dtype's rounding would otherwise give u = 0, u = 1 or x + u = x + 1; the log density is the
    /// flow's at its own value, exact.
    /// <param name="x">Pixel values [B, C, H, W].</param>
    /// <param name="uniform">Uniform draws, x's shape.</param>
    member this.Sample(x: Tensor, uniform: Tensor) : DequantizationNoiseSample =
        this.CheckShape(x, eventShape, "input")
        if isNull uniform then nullArg "uniform"
        if uniform.shape <> x.shape then
            invalidArg "uniform" (sprintf "VariationalDequantize: uniform draws of shape %s for an input of shape %s" (Shapes.show uniform.shape) (Shapes.show x.shape))
        let m = margin x.dtype
        let v = uniform.to_type(x.dtype).clamp(scalar m, scalar (1.0 - m))
        let eps = v.log() - v.neg().log1p_()
        let logBase = torch.nn.functional.logsigmoid(eps) +. torch.nn.functional.logsigmoid(eps.neg())
        let r = flow.Forward(eps, this.Context x)
        let u = r.Value.clamp(scalar m, scalar (largestNoise x.dtype))
        DequantizationNoiseSample(u, Shapes.sumPerSample(logBase) - r.LogDet)
    /// u ~ q(u | x) with log q(u | x), from the <see cref="Dequantize.Noise"/> property's uniform
    /// draws where set, else fresh ones.
    /// <param name="x">Pixel values [B, C, H, W].</param>
    member this.Sample(x: Tensor) : DequantizationNoiseSample =
        this.CheckShape(x, eventShape, "input")
        let v = if isNull this.Noise then torch.rand_like(x) else this.Noise
        this.Sample(x, v)

    /// y = (x + u) / levels with u ~ q(u | x); log-det -D log levels - log q(u | x) per sample.
    override this.Forward(x: Tensor) : Transformed =
        if this.Midpoint then base.Forward x
        else
            let s = this.Sample x
            let y = (x +. s.Noise).div_(scalar (float levels))
            let constant = torch.full(([||]: int64[]), scalar -logLevelsPerSample, dtype = x.dtype, device = x.device)
            Transformed.OfPieces(y, [ s.LogDensity.neg() ], [], [ constant ])
    override _.Traits = { BijectorTraits.Bijective with Surjective = true; VariationalLogDet = true }
