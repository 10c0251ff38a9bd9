namespace MixerFlow.Core

open System
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core.Ops

/// Invertible linear map over the first event axis with an LU parametrisation (Kingma &
/// Dhariwal 2018, Glow, section 3.2): W = P L (U + diag(sign * exp(logS))), P fixed, L unit lower
/// triangular, U strictly upper. Applied to every position of the remaining axes, so on an
/// image [C, H, W] it is Glow's invertible 1x1 convolution. log|det| = positions * sum(logS).
/// Initialised from a random rotation.
type LULinear(eventShape: int64[]) as this =
    inherit Bijector((if eventShape.Length = 1 then "LULinear" else "Conv1x1"), eventShape, eventShape)
    do if eventShape.Length = 0 then invalidArg "eventShape" "LULinear needs at least one event axis"
    let c = eventShape.[0]
    let positions = float (Shapes.numel eventShape / c)
    let struct (q, _) = torch.linalg.qr(torch.randn(c, c))
    let struct (pInit, lInit, uInit) = torch.linalg.lu(q)
    let sInit = uInit.diagonal()
    let permutationMatrix = pInit
    let signS = sInit.sign()
    let lowerMask = torch.ones(c, c).tril(-1L)
    let upperMask = torch.ones(c, c).triu(1L)
    let lower = new Parameter(lInit * lowerMask)
    let upper = new Parameter(uInit * upperMask)
    let logS = new Parameter(sInit.abs().log())
    do
        this.register_buffer("permutationMatrix", permutationMatrix)
        this.register_buffer("signS", signS)
        this.register_buffer("lowerMask", lowerMask)
        this.register_buffer("upperMask", upperMask)
        this.register_parameter("lower", lower)
        this.register_parameter("upper", upper)
        this.register_parameter("logS", logS)

    static member Vector(dim: int64) = new LULinear([| dim |])
    static member Conv1x1(channels: int64, height: int64, width: int64) = new LULinear([| channels; height; width |])

    /// Unit lower triangular: the masked parameters with ones written on the fresh product's diagonal.
    member _.L =
        let l = lower * lowerMask
        l.diagonal().fill_(Scalars.One) |> ignore
        l
    member _.U = (upper * upperMask).add_(torch.diag(signS * logS.exp()), Scalars.One)
    /// The weight matrix W = P L U.
    member this.Weight = permutationMatrix.matmul(this.L.matmul(this.U))

    override this.Forward(x) =
        this.CheckShape(x, eventShape, "input")
        let b = x.shape.[0]
        let y = this.Weight.matmul(x.reshape(b, c, -1L)).reshape(x.shape)
        Transformed.Constant(y, scaledSum (logS.sum()) positions)

    /// W^-1 = U^-1 L^-1 P^T, by two triangular solves of the c x c matrix P^T.
    member this.InverseWeight =
        let z = torch.linalg.solve_triangular(this.L, permutationMatrix.t(), upper = false, unitriangular = true)
        torch.linalg.solve_triangular(this.U, z, upper = true)

    override this.Inverse(y) =
        this.CheckShape(y, eventShape, "input")
        let b = y.shape.[0]
        // x = W^-1 y with W^-1 solved once as a c x c matrix: solves on the batch itself would
        // leave x in LAPACK's column-major layout, which reaches the layers after it as a
        // channels-last image (and their convolutions take LibTorch's slower channels-last path).
        let x = this.InverseWeight.matmul(y.reshape(b, c, -1L))
        Transformed.Constant(x.reshape(y.shape), scaledSum (logS.sum()) (-positions))
