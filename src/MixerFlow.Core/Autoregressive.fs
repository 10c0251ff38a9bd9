namespace MixerFlow.Core

open System
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
/// laid out as [B, paramsPerInput, D].
type Made(dim: int64, width: int64, depth: int, paramsPerInput: int64) as this =
    inherit torch.nn.Module<Tensor, Tensor>("MADE")
    do if dim < 1L || width < 1L || depth < 1 then invalidArg "dim" (sprintf "MADE needs dim, width, depth >= 1, got %d, %d, %d" dim width depth)
    // Degrees: inputs 1..D; hidden units cycle through 1..max(1, D-1); output i has degree i+1.
    let inDeg = Array.init (int dim) (fun i -> i + 1)
    let hidDeg = Array.init (int width) (fun k -> k % max 1 (int dim - 1) + 1)
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
        // Zero-initialised output: a new MAF layer is the identity.
        using (torch.no_grad()) (fun _ -> last.Weight.zero_() |> ignore)
        layers.Add last
        this.register_module("layers", layers)
    override _.forward(x) =
        let mutable h = x
        for l in layers do h <- l.call(h)
        h.reshape(x.shape.[0], paramsPerInput, dim)

/// Masked autoregressive flow layer (Papamakarios, Pavlakou & Murray 2017), affine:
/// y_i = x_i * exp(s_i(x_<i)) + t_i(x_<i), with log s soft-clamped to (-c, c). The forward
/// pass is one network evaluation; the inverse is sequential, D evaluations.
/// log|det dy/dx| = sum_i s_i; the Jacobian is lower triangular.
type MaskedAutoregressive(dim: int64, width: int64, depth: int, clamp: float) as this =
    inherit Bijector("MAF", [| dim |], [| dim |])
    let made = new Made(dim, width, depth, 2L)
    do this.register_module("made", made)
    new(dim, width, depth) = MaskedAutoregressive(dim, width, depth, 2.0)
    member private _.ShiftLogScale(x: Tensor) =
        let h = made.call(x)
        h.select(1L, 0L), (h.select(1L, 1L) / scalar clamp).tanh() * scalar clamp
    override this.Forward(x) =
        this.CheckShape(x, [| dim |], "input")
        let shift, logScale = this.ShiftLogScale x
        Transformed(x * logScale.exp() + shift, logScale.sum(1L))
    override this.Inverse(y) =
        this.CheckShape(y, [| dim |], "input")
        // After pass i, elements 0..i are exact (they depend only on earlier ones).
        let mutable x = torch.zeros_like(y)
        let mutable logScale = torch.zeros_like(y)
        for _ in 1 .. int dim do
            let shift, ls = this.ShiftLogScale x
            x <- (y - shift) * ls.neg().exp()
            logScale <- ls
        Transformed(x, logScale.sum(1L).neg())
    interface IJacobianStructure with
        member _.StructureDescription = "autoregressive: dy_i/dx_j = 0 for j > i (lower triangular)"
        member _.ExpectedJacobian() =
            let n = int dim
            Array2D.init n n (fun i j -> if j > i then 0.0 else Double.NaN)
