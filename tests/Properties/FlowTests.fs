/// Flow as a distribution (Core's Flow.fs and Distributions.fs): log-density bookkeeping,
/// normalisation on a grid, reparameterised sampling, the ready-made factories, conditional
/// flows and dtype moves. Float64 unless the test is about fitting.
module MixerFlow.Properties.FlowTests

open System
open Xunit
open TorchSharp
open MixerFlow.Core
open MixerFlow.Core.Ops

let private float64 (m: 'M when 'M :> torch.nn.Module) =
    TorchSharp.ModuleExtensionMethods.``to``(m, torch.float64) |> ignore
    m

/// Gaussian noise on every parameter, so that zero-initialised last layers are not the identity.
let private randomise (std: float) (m: torch.nn.Module) =
    use _ = torch.no_grad()
    for p in m.parameters() do p.add_(torch.randn_like(p) * scalar std) |> ignore

let private maxAbs (t: Tensor) = t.abs().max().to_type(torch.float64).item<float>()

let private eval (m: 'M when 'M :> torch.nn.Module) = m.eval() |> ignore; m

[<Fact>]
let ``LogProb is the base log-prob of the transform plus its log-det`` () =
    torch.manual_seed(1L) |> ignore
    for flow in [ Flows.NSF(3L, transforms = 2, hidden = 16L); Flows.MAF(3L, hidden = 16L); Flows.RealNVP(3L, hidden = 16L)
                  new Flow(new Chain([ new ActNorm([| 3L |]) :> Bijector; LULinear.Vector 3L ]), new DiagonalNormal([| 3L |])) ] do
        float64 flow |> ignore
        randomise 0.3 flow
        let x = torch.randn(7L, 3L, dtype = torch.float64) * scalar 2.0
        let r = flow.Transform.Forward x
        let z = r.Value
        let byHand =
            match flow.Base with
            | :? DiagonalNormal as d ->
                let u = (z - d.Mean) / d.LogStd.exp()
                (u * u * scalar -0.5 - d.LogStd - scalar (0.5 * Math.Log(2.0 * Math.PI))).sum(1L)
            | _ -> (z * z * scalar -0.5 - scalar (0.5 * Math.Log(2.0 * Math.PI))).sum(1L)
        Assert.True(maxAbs (flow.LogProb x - (byHand + r.LogDet)) < 1e-10, flow.Transform.Name)

/// Trapezoid-free Riemann sum of exp(log p) on a uniform grid over [-l, l]^d (d = 1, 2).
let private integral (flow: Flow) (d: int) (l: float) (n: int64) =
    let axis = torch.linspace(-l, l, n, dtype = torch.float64)
    let step = 2.0 * l / float (n - 1L)
    let points =
        if d = 1 then axis.unsqueeze(1L)
        else
            let g = torch.meshgrid([| axis; axis |], indexing = "ij")
            torch.stack([| g.[0].reshape(-1L); g.[1].reshape(-1L) |], 1L)
    use _ = torch.no_grad()
    (flow.LogProb points).exp().sum().item<float>() * Math.Pow(step, float d)

[<Fact>]
let ``a 2-D NSF density with random parameters integrates to one`` () =
    torch.manual_seed(2L) |> ignore
    let flow = Flows.NSF(2L, transforms = 2, bins = 4, bound = 3.0, hidden = 8L) |> float64 |> eval
    randomise 0.15 flow
    // Mild randomisation keeps the density smooth enough for a coarse grid (measured for this
    // seed: 1.00001 at step 0.05, 1.000000 at 0.025 over [-10, 10]^2).
    let total = integral flow 2 8.0 241L
    Assert.True(abs (total - 1.0) < 1e-3, sprintf "integral %g" total)

[<Fact>]
let ``a 1-D spline MAF density with random parameters integrates to one`` () =
    torch.manual_seed(3L) |> ignore
    let t = new Chain([ new MaskedAutoregressive(1L, 8L, 1, RationalQuadratic(5, 2.0)) :> Bijector; new ActNorm([| 1L |]) ])
    let flow = new Flow(t, new DiagonalNormal([| 1L |])) |> float64 |> eval
    randomise 0.5 flow
    let total = integral flow 1 30.0 30001L
    Assert.True(abs (total - 1.0) < 1e-3, sprintf "integral %g" total)

[<Fact>]
let ``SampleWithLogProb gives the LogProb of its samples`` () =
    torch.manual_seed(4L) |> ignore
    for flow in [ Flows.NSF(4L, transforms = 2, hidden = 16L); Flows.MAF(4L, hidden = 16L); Flows.RealNVP(2L, hidden = 16L) ] do
        float64 flow |> eval |> randomise 0.3
        let s = flow.SampleWithLogProb(64L)
        Assert.Equal<int64[]>([| 64L; flow.EventShape.[0] |], s.Value.shape)
        let again = flow.LogProb s.Value
        Assert.True(maxAbs (s.LogProb - again) < 1e-6, sprintf "%s: %g" flow.Transform.Name (maxAbs (s.LogProb - again)))

[<Fact>]
let ``gradients flow into every parameter through SampleWithLogProb`` () =
    torch.manual_seed(5L) |> ignore
    let t = Flows.NSF(3L, transforms = 2, hidden = 8L).Transform
    let flow = new Flow(t, new DiagonalNormal([| 3L |])) |> float64
    randomise 0.3 flow
    let struct (x, logProb) =
        let s = flow.SampleWithLogProb(32L, temperature = 0.8)
        struct (s.Value, s.LogProb)
    Assert.True(x.requires_grad && logProb.requires_grad)
    ((x * x).sum() + logProb.sum()).backward()
    for struct (name, p) in flow.named_parameters() do
        Assert.True(not (isNull p.grad) && maxAbs p.grad > 0.0, sprintf "no gradient for %s" name)

/// A mixture of two Gaussians in 2-D at (-2, -2) and (2, 2), std 0.5.
let private mixture (n: int64) =
    let sign = (torch.randint(0L, 2L, [| n; 1L |]) * 2L - 1L).to_type(torch.float32)
    sign * scalar 2.0 + torch.randn(n, 2L) * scalar 0.5

[<Fact>]
let ``a short NSF fit on a 2-D Gaussian mixture improves the log-likelihood`` () =
    torch.manual_seed(6L) |> ignore
    let flow = Flows.NSF(features = 2L, transforms = 2, hidden = 16L)
    let test = mixture 1000L
    let score () = using (torch.no_grad()) (fun _ -> (flow.LogProb test).mean().item<float32>() |> float)
    let before = score ()
    use opt = new Adam(flow.parameters(), 1e-2)
    for _ in 1 .. 60 do
        use _ = torch.NewDisposeScope()
        opt.ZeroGrad()
        let loss = (flow.LogProb(mixture 128L)).mean().neg()
        loss.backward()
        opt.Step()
    let after = score ()
    // At initialisation about -6.1 nats (a standard normal on the mixture); the mixture itself
    // scores about -2.1.
    Assert.True(after > before + 1.0, sprintf "log-likelihood %g -> %g" before after)
    Assert.True(Double.IsFinite after)

[<Fact>]
let ``the factories build with defaults and features = 2`` () =
    for flow in [ Flows.RealNVP(2L); Flows.MAF(2L); Flows.NSF(2L); Flows.MAF(1L); Flows.NSF(5L, context = 3L) ] do
        let c = if flow.ContextFeatures > 0L then torch.randn(4L, flow.ContextFeatures) else null
        let x = flow.Sample(4L, c)
        let rows = if isNull c then 4L else 16L
        Assert.Equal<int64[]>([| rows; flow.EventShape.[0] |], x.shape)
        let lp = flow.LogProb(x, (if isNull c then null else c.repeat_interleave(4L, 0L)))
        Assert.Equal<int64[]>([| rows |], lp.shape)
    Assert.Throws<ArgumentException>(fun () -> Flows.NSF(1L) |> ignore) |> ignore

[<Fact>]
let ``a conditional flow depends on its context and samples follow it`` () =
    torch.manual_seed(7L) |> ignore
    let flow = Flows.NSF(2L, transforms = 2, hidden = 16L, context = 1L) |> float64
    randomise 0.3 flow
    let x = torch.randn(5L, 2L, dtype = torch.float64)
    let c1 = torch.full([| 5L; 1L |], scalar -1.0, dtype = torch.float64)
    let c2 = torch.full([| 5L; 1L |], scalar 1.0, dtype = torch.float64)
    Assert.True(maxAbs (flow.LogProb(x, c1) - flow.LogProb(x, c2)) > 1e-3)
    Assert.Throws<ArgumentException>(fun () -> flow.LogProb x |> ignore) |> ignore
    // Samples are grouped by context row and carry the log-prob under their own row.
    let rows = torch.tensor([| -1.0; 1.0; 3.0 |], dtype = torch.float64).unsqueeze(1L)
    let s = flow.SampleWithLogProb(8L, rows)
    Assert.Equal<int64[]>([| 24L; 2L |], s.Value.shape)
    Assert.True(maxAbs (s.LogProb - flow.LogProb(s.Value, rows.repeat_interleave(8L, 0L))) < 1e-6)

[<Fact>]
let ``a fitted conditional MAF samples near the mean its context asks for`` () =
    torch.manual_seed(8L) |> ignore
    let flow = Flows.MAF(2L, transforms = 2, hidden = 32L, context = 1L)
    use opt = new Adam(flow.parameters(), 1e-2)
    let data n =
        let c = (torch.randint(0L, 2L, [| n; 1L |]) * 2L - 1L).to_type(torch.float32) * scalar 2.0
        torch.randn(n, 2L) * scalar 0.5 + c, c
    for _ in 1 .. 200 do
        use _ = torch.NewDisposeScope()
        let x, c = data 256L
        opt.ZeroGrad()
        (flow.LogProb(x, c)).mean().neg().backward()
        opt.Step()
    let contexts = torch.tensor([| -2.0f; 2.0f |]).unsqueeze(1L)
    let samples = flow.Sample(500L, contexts)
    let low = samples.narrow(0L, 0L, 500L).mean().item<float32>()
    let high = samples.narrow(0L, 500L, 500L).mean().item<float32>()
    Assert.True(abs (low + 2.0f) < 0.5f && abs (high - 2.0f) < 0.5f, sprintf "means %g and %g" low high)

[<Fact>]
let ``a flow moves to float64 with to(float64), base samples included`` () =
    for flow in [ Flows.NSF(2L, hidden = 8L); new Flow(LULinear.Vector 3L, new DiagonalNormal([| 3L |])) ] do
        TorchSharp.ModuleExtensionMethods.``to``(flow, torch.float64) |> ignore
        Assert.Equal(torch.float64, flow.Sample(3L).dtype)
        let s = flow.SampleWithLogProb(3L)
        Assert.Equal(torch.float64, s.LogProb.dtype)
        Assert.Equal(torch.float64, (flow.LogProb(torch.randn(3L, flow.EventShape.[0], dtype = torch.float64))).dtype)

[<Fact>]
let ``the coupling names and buffers of old checkpoints are kept`` () =
    let names (m: torch.nn.Module) = m.state_dict().Keys |> Seq.toArray
    let d = 4L
    let affine = new AffineCoupling([| d |], Partition.Halves d, Conditioners.Mlp(8L, 1))
    for n in [ "conditioningIndex"; "transformedIndex"; "mergeIndex"; "net.0.weight" ] do Assert.Contains(n, names affine)
    Assert.Equal("AffineCoupling", affine.Name)
    let maf = new MaskedAutoregressive(d, 8L, 1)
    Assert.Contains("made.layers.0.weight", names maf)
    Assert.Equal("MAF", maf.Name)
