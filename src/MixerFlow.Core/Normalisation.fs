namespace MixerFlow.Core

open System
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core.Ops

/// Which event axes carry one parameter each; the others share it (and are averaged over).
module internal FeatureAxes =
    let validate (name: string) (eventShape: int64[]) (axes: int[]) =
        for a in axes do
            if a < 0 || a >= eventShape.Length then
                invalidArg "featureAxes"
                    (sprintf "%s: feature axis %d is outside the event shape %s" name a (Shapes.show eventShape))
    /// Parameter shape with a leading batch axis of 1: feature axes keep their size, others are 1.
    let paramShape (eventShape: int64[]) (axes: int[]) =
        Array.append [| 1L |] (eventShape |> Array.mapi (fun i s -> if Array.contains i axes then s else 1L))
    /// Dimensions (of the batched tensor) that statistics are reduced over.
    let reduceDims (eventShape: int64[]) (axes: int[]) =
        Array.append [| 0L |] [| for i in 0 .. eventShape.Length - 1 do if not (Array.contains i axes) then int64 (i + 1) |]
    /// How many event positions share each parameter.
    let positions (eventShape: int64[]) (axes: int[]) =
        Shapes.numel eventShape / Shapes.numel (paramShape eventShape axes)

/// ActNorm (Kingma & Dhariwal 2018, Glow, section 3.1): y = (x + bias) * exp(logScale), one
/// bias and scale per feature. On its first forward pass in training mode the parameters are
/// set from the batch so that every output feature has mean 0 and standard deviation 1; the
/// `initialized` flag is a buffer, saved with the model.
/// log|det dy/dx| = positions * sum(logScale).
type ActNorm(eventShape: int64[], featureAxes: int[]) as this =
    inherit Bijector("ActNorm", eventShape, eventShape)
    do FeatureAxes.validate "ActNorm" eventShape featureAxes
    let pshape = FeatureAxes.paramShape eventShape featureAxes
    let dims = FeatureAxes.reduceDims eventShape featureAxes
    let positions = float (FeatureAxes.positions eventShape featureAxes)
    let bias = new Parameter(torch.zeros(pshape))
    let logScale = new Parameter(torch.zeros(pshape))
    let initialized = torch.zeros([| 1L |], dtype = torch.int64)
    do
        this.register_parameter("bias", bias)
        this.register_parameter("logScale", logScale)
        this.register_buffer("initialized", initialized)

    /// One scale and bias per element of the event.
    new(eventShape: int64[]) = new ActNorm(eventShape, Array.init eventShape.Length id)

    member _.IsInitialized = initialized.item<int64>() <> 0L
    member _.Bias = bias
    member _.LogScale = logScale

    /// Data-dependent initialisation from a batch: output mean 0, standard deviation 1.
    member _.InitializeFrom(x: Tensor) =
        use _ = torch.no_grad()
        let mean = x.mean(dims, keepdim = true)
        let std = (x - mean).pow(scalar 2.0).mean(dims, keepdim = true).sqrt()
        bias.copy_(mean.neg()) |> ignore
        logScale.copy_((addScalar std 1e-6).log().neg()) |> ignore
        initialized.fill_(scalar 1.0) |> ignore

    override this.Forward(x) =
        this.CheckShape(x, eventShape, "input")
        if this.training && not this.IsInitialized then this.InitializeFrom x
        let y = (x +. bias) * logScale.exp()
        Transformed.Constant(y, scaledSum (logScale.sum()) positions)

    override this.Inverse(y) =
        this.CheckShape(y, eventShape, "input")
        let x = y * logScale.neg().exp() - bias
        Transformed.Constant(x, scaledSum (logScale.sum()) (-positions))

    /// The batch dimensions the parameters are shared over (statistics are reduced over them).
    member internal _.SharedDims = dims
    /// How many event positions share each parameter.
    member internal _.Positions = positions
    /// The parameters' shape, [1, ...].
    member internal _.ParameterShape = pshape

/// Invertible batch normalisation (Dinh, Sohl-Dickstein & Bengio 2017, RealNVP, appendix E):
/// y = (x - mean) / sqrt(var + eps) * exp(logGamma) + beta. Training mode uses the batch
/// statistics (and updates running averages with `momentum`); evaluation mode and the inverse
/// use the running averages. log|det dy/dx| = positions * sum(logGamma - log(var + eps) / 2),
/// the statistics treated as constants. In training mode samples interact through the batch
/// statistics.
/// <param name="eventShape">The shape of one sample.</param>
/// <param name="featureAxes">Event axes with one parameter each; the others share them.</param>
/// <param name="momentum">Weight of the newest batch in the running averages (default 0.1).</param>
/// <param name="eps">Added to the variance (default 1e-5).</param>
type BatchNormFlow(eventShape: int64[], featureAxes: int[],
                   [<Optional; DefaultParameterValue(0.1)>] momentum: float,
                   [<Optional; DefaultParameterValue(1e-5)>] eps: float) as this =
    inherit Bijector("BatchNorm", eventShape, eventShape)
    do FeatureAxes.validate "BatchNorm" eventShape featureAxes
    let pshape = FeatureAxes.paramShape eventShape featureAxes
    let dims = FeatureAxes.reduceDims eventShape featureAxes
    let positions = float (FeatureAxes.positions eventShape featureAxes)
    let logGamma = new Parameter(torch.zeros(pshape))
    let beta = new Parameter(torch.zeros(pshape))
    let runningMean = torch.zeros(pshape)
    let runningVar = torch.ones(pshape)
    do
        this.register_parameter("logGamma", logGamma)
        this.register_parameter("beta", beta)
        this.register_buffer("runningMean", runningMean)
        this.register_buffer("runningVar", runningVar)

    /// One parameter per element of the event.
    new(eventShape: int64[]) = new BatchNormFlow(eventShape, Array.init eventShape.Length id, 0.1, 1e-5)

    member _.Momentum = momentum
    member _.Eps = eps
    member _.RunningMean = runningMean
    member _.RunningVar = runningVar

    override this.Forward(x) =
        this.CheckShape(x, eventShape, "input")
        let mean, var =
            if this.training then
                let m = x.mean(dims, keepdim = true)
                let v = (x - m).pow(scalar 2.0).mean(dims, keepdim = true)
                use _ = torch.no_grad()
                runningMean.mul_(scalar (1.0 - momentum)).add_(m.detach(), scalar momentum) |> ignore
                runningVar.mul_(scalar (1.0 - momentum)).add_(v.detach(), scalar momentum) |> ignore
                m, v
            else runningMean, runningVar
        let logStd = (addScalar var eps).log() * scalar 0.5
        let logScale = logGamma - logStd
        let y = (x - mean) * logScale.exp() +. beta
        Transformed.Constant(y, scaledSum (logScale.sum()) positions)

    override this.Inverse(y) =
        this.CheckShape(y, eventShape, "input")
        let logStd = (addScalar runningVar eps).log() * scalar 0.5
        let logScale = logStd - logGamma
        let x = (y - beta) * logScale.exp() +. runningMean
        Transformed.Constant(x, scaledSum (logScale.sum()) positions)

    override _.Traits = { BijectorTraits.Bijective with BatchCoupledInTraining = true }
