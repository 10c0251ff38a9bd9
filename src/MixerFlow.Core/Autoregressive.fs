namespace MixerFlow.Core

open System
open System.Runtime.InteropServices
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core.Ops

/// A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE).
type MaskedLinear(inF: int64, outF: int64, maskValues: Tensor) as this =
    inherit torch.nn.Module<Tensor, Tensor>("MaskedLinear")
    let weight = new Parameter(torch.randn(outF, inF) * scalar (1.0 / Math.Sqrt(float inF)))
    let bias = new Parameter(torch.zeros(outF))
    let mask = maskValues
    do
        this.register_parameter("weight", weight)
        this.register_parameter("bias", bias)
        this.register_buffer("mask", mask)
    member _.Weight = weight
    member _.Bias = bias
    override _.forward(x) = torch.nn.functional.linear(x, weight * mask, bias)

/// MADE (Germain, Gregor, Murray & Larochelle 2015): an MLP whose masks make output i depend
/// only on inputs 0..i-1 (in the natural order). Outputs `paramsPerInput` values per input,
/// laid out as [B, paramsPerInput, D]. With `contextFeatures` > 0 the input is [x, context]
/// ([B, D + contextFeatures]); every hidden unit may see the context.
type Made(dim: int64, width: int64, depth: int, paramsPerInput: int64, contextFeatures: int64) as this =
    inherit torch.nn.Module<Tensor, Tensor>("MADE")
    do
        if dim < 1L || width < 1L || depth < 1 then invalidArg "dim" (sprintf "MADE needs dim, width, depth >= 1, got %d, %d, %d" dim width depth)
        if contextFeatures < 0L then invalidArg "contextFeatures" (sprintf "MADE needs contextFeatures >= 0, got %d" contextFeatures)
    // Degrees: inputs 1..D, context 0; output i has degree i+1. Hidden units cycle through
    // 1..max(1, D-1), or through 0..D-1 with a context (degree-0 units carry the context to
    // every output, also to the first).
    let inDeg = Array.append (Array.init (int dim) (fun i -> i + 1)) (Array.zeroCreate (int contextFeatures))
    let hidDeg =
        if contextFeatures = 0L then Array.init (int width) (fun k -> k % max 1 (int dim - 1) + 1)
        else Array.init (int width) (fun k -> k % int dim)
    let maskOf (outDeg: int[]) (inDeg: int[]) strict =
        let m = Array2D.init outDeg.Length inDeg.Length (fun o i -> if (if strict then outDeg.[o] > inDeg.[i] else outDeg.[o] >= inDeg.[i]) then 1.0f else 0.0f)
        torch.tensor(m)
    let layers = new ModuleList<torch.nn.Module<Tensor, Tensor>>()
    do
        let mutable prevDeg = inDeg
        for _ in 1 .. depth do
            layers.Add(new MaskedLinear(int64 prevDeg.Length, width, maskOf hidDeg prevDeg false))
            layers.Add(torch.nn.ReLU())
            prevDeg <- hidDeg
        let outDeg = Array.init (int (dim * paramsPerInput)) (fun j -> j % int dim + 1)
        let last = new MaskedLinear(int64 prevDeg.Length, dim * paramsPerInput, maskOf outDeg prevDeg true)
        // Zero-initialised output: a new affine MAF layer is the identity.
        using (torch.no_grad()) (fun _ -> last.Weight.zero_() |> ignore)
        layers.Add last
        this.register_module("layers", layers)
    new(dim, width, depth, paramsPerInput) = new Made(dim, width, depth, paramsPerInput, 0L)
    override _.forward(x) =
        let mutable h = x
        for l in layers do h <- l.call(h)
        h.reshape(x.shape.[0], paramsPerInput, dim)

/// Masked autoregressive flow layer (Papamakarios, Pavlakou & Murray 2017):
/// y_i = f(x_i; h_i(x_<i)) for an elementwise map f (affine by default, log s soft-clamped;
/// a RationalQuadratic map gives a neural spline MAF). The forward pass is one network
/// evaluation; the inverse is sequential, D evaluations. log|det dy/dx| = sum_i log|f'|; the
/// Jacobian is lower triangular. A conditional layer (contextFeatures > 0) feeds the context
/// to every hidden unit of the MADE (registered as `made`).
/// <param name="dim">Features D.</param>
/// <param name="width">Hidden units per MADE layer.</param>
/// <param name="depth">Hidden MADE layers.</param>
/// <param name="map">The elementwise map.</param>
/// <param name="contextFeatures">Context features per sample (default 0: unconditional).</param>
type MaskedAutoregressive(dim: int64, width: int64, depth: int, map: ElementwiseMap,
                          [<Optional; DefaultParameterValue(0L)>] contextFeatures: int64) as this =
    inherit Bijector((if isNull (box map) || map :? Affine then "MAF" else "MAF(" + map.Name + ")"), [| dim |], [| dim |])
    do if isNull (box map) then nullArg "map"
    let made = new Made(dim, width, depth, map.ParamsPerElement, contextFeatures)
    do this.register_module("made", made)
    /// Affine, with log s soft-clamped to (-clamp, clamp).
    new(dim, width, depth, clamp: float) = new MaskedAutoregressive(dim, width, depth, Affine(ScaleBound.SoftClamp clamp), 0L)
    /// Affine, with log s soft-clamped to (-2, 2).
    new(dim, width, depth) = new MaskedAutoregressive(dim, width, depth, Affine(ScaleBound.SoftClamp 2.0), 0L)
    member _.Map = map
    override _.ContextFeatures = contextFeatures
    member private this.Params(x: Tensor, context: Tensor) =
        if contextFeatures = 0L then made.call(x)
        elif isNull context then
            invalidArg "context" (sprintf "%s is conditional: it needs a context of %d features (Forward(x, context))" this.Name contextFeatures)
        else
            if context.dim() <> 2L || context.shape.[0] <> x.shape.[0] || context.shape.[1] <> contextFeatures then
                invalidArg "context" (sprintf "%s expects a context of shape [%d, %d], got %s" this.Name x.shape.[0] contextFeatures (Shapes.show context.shape))
            made.call(torch.cat([| x; context |], 1L))
    member private this.Run(x: Tensor, context: Tensor) =
        this.CheckShape(x, [| dim |], "input")
        let struct (y, logDeriv) = map.Forward(x, this.Params(x, context))
        Transformed.Elementwise(y, logDeriv)
    member private this.RunInverse(y: Tensor, context: Tensor) =
        this.CheckShape(y, [| dim |], "input")
        // After pass i, elements 0..i are exact (they depend only on earlier ones).
        let mutable x = torch.zeros_like(y)
        let mutable logDeriv = torch.zeros_like(y)
        for _ in 1 .. int dim do
            let struct (xi, ld) = map.Inverse(y, this.Params(x, context))
            x <- xi
            logDeriv <- ld
        Transformed.Elementwise(x, logDeriv)
    override this.Forward(x: Tensor) = this.Run(x, null)
    override this.Inverse(y: Tensor) = this.RunInverse(y, null)
    override this.Forward(x: Tensor, context: Tensor) = this.Run(x, context)
    override this.Inverse(y: Tensor, context: Tensor) = this.RunInverse(y, context)
    interface IJacobianStructure with
        member _.StructureDescription = "autoregressive: dy_i/dx_j = 0 for j > i (lower triangular)"
        member _.ExpectedJacobian() =
            let n = int dim
            Array2D.init n n (fun i j -> if j > i then 0.0 else Double.NaN)
