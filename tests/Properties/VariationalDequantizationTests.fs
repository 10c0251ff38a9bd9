/// Variational dequantisation (VariationalDequantize, DequantizationFlow): the bound against uniform
/// dequantisation's estimate at the same noise less an independent log q(u | x) (logistic density
/// and the log|det| of autograd's Jacobian, float64), at the identity the flow starts as and at
/// random parameters; broken twins that the checks must catch; u inside (0, 1) and the rounding
/// exact whatever the parameters and draws.
module MixerFlow.Properties.VariationalDequantizationTests

open System
open Xunit
open TorchSharp
open MixerFlow.Core
open MixerFlow.Core.Ops
open MixerFlow.Checks

/// Broken: forgets to subtract log q(u | x); the uniform estimate at q's noise.
type ForgetsLogQ(shape: int64[], flow: DequantizationFlow) =
    inherit VariationalDequantize(shape, flow, 256)
    override this.Forward(x: Tensor) =
        let s = this.Sample x
        let constant = torch.full(([||]: int64[]), scalar (-Math.Log 256.0 * float (Array.fold (*) 1L shape)), dtype = x.dtype)
        Transformed.Constant((x +. s.Noise).div(scalar 256.0), constant)

/// Broken: the sigmoid's log-derivative without its log sigmoid(-e) half.
type HalfSigmoidLogDet(shape: int64[], layers: int, width: int64) =
    inherit DequantizationFlow(shape, layers, width)
    override _.Forward(eps: Tensor, context: Tensor) =
        let r = base.Forward(eps, context)
        let u = r.Value
        let e = u.log() - u.neg().log1p()
        Transformed(u, r.LogDet - sumPerSample (torch.nn.functional.logsigmoid(e.neg())))

let private shape = [| 2L; 3L; 2L |]
let private features = 12L

/// Runs f in float64 (the default dtype restored after).
let private inFloat64 (f: unit -> unit) =
    use _ = torch.NewDisposeScope()
    let saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try f () finally torch.set_default_dtype(saved)

let private perturb (sigma: float) (m: torch.nn.Module) =
    use _ = torch.no_grad()
    for p in m.parameters() do p.add_(torch.randn_like(p).mul_(scalar sigma), Scalars.One) |> ignore

/// The model after dequantisation: the logit, then an affine coupling and ActNorm on the flattened image, randomised.
let private body () : Bijector =
    let b =
        new Chain([ new Logit(shape) :> Bijector
                    new Reshape(shape, [| features |])
                    new AffineCoupling([| features |], Partition.Halves features, Conditioners.Mlp(8L, 1))
                    new ActNorm([| features |]) ])
    using (torch.no_grad()) (fun _ -> b.Forward(torch.rand(16L, 2L, 3L, 2L)) |> ignore)
    perturb 0.3 b
    b.eval()
    b

/// Pixels [B, C, H, W] with 0 and 255 among them, and uniform draws away from 0 and 1.
let private data (batch: int64) =
    let x = torch.randint(0L, 256L, Array.append [| batch |] shape).to_type(torch.float64)
    x.[0L, 0L, 0L, 0L] <- torch.tensor(0.0)
    x.[0L, 0L, 0L, 1L] <- torch.tensor(255.0)
    let v = torch.rand(Array.append [| batch |] shape).mul_(scalar 0.98).add_(scalar 0.01, Scalars.One)
    x, v

/// log q(u | x) computed apart from the dequantiser: eps = logit(v), the standard logistic log
/// density -|e| - 2 log(1 + exp(-|e|)), less log|det du/deps| of autograd's Jacobian of the flow's value.
let private independentLogQ (flow: DequantizationFlow) (x: Tensor) (v: Tensor) =
    let eps = v.log() - (scalarMinus 1.0 v).log()
    let context = (addScalar (x * scalar (2.0 / 255.0)) -1.0).reshape(x.shape.[0], -1L)
    let j = PropertyChecks.jacobian (fun e -> (flow.Forward(e, context)).Value) eps
    let _, logAbsDet = torch.linalg.slogdet(j).ToTuple()
    let a = eps.abs()
    let logLogistic = sumPerSample (a.neg() - (a.neg().exp().log1p() * scalar 2.0))
    let u = using (torch.no_grad()) (fun _ -> (flow.Forward(eps, context)).Value)
    u, logLogistic - logAbsDet

/// Worst error, relative with a unit floor, of (bound) against (uniform estimate at q's u - log q)
/// over the batch, log q computed apart; and of the dequantiser's own log q against that one.
let private boundErrors (dequantizer: VariationalDequantize) (flow: DequantizationFlow) (b: Bijector) (x: Tensor) (v: Tensor) =
    let u, logQ = independentLogQ flow x v
    use _ = torch.no_grad()
    let uniform = new Dequantize(shape)
    let flowU = new Flow(new Chain([ uniform :> Bijector; b ]))
    let flowV = new Flow(new Chain([ dequantizer :> Bijector; b ]))
    dequantizer.Noise <- v
    uniform.Noise <- u
    let bound = flowV.LogProb x
    let estimate = flowU.LogProb x
    let rel (got: Tensor) (expected: Tensor) = ((got - expected).abs() / addScalar (expected.abs()) 1.0).max().item<float>()
    rel bound (estimate - logQ), rel (dequantizer.Sample(x, v).LogDensity) logQ

[<Fact>]
let ``with the noise flow at the identity the bound is uniform dequantisation's estimate at the same noise, and log q = 0`` () =
    inFloat64 (fun () ->
        torch.manual_seed(11L) |> ignore
        let b = body ()
        let x, v = data 5L
        let flow = new DequantizationFlow(shape, 3, 6L)
        let healthy = new VariationalDequantize(shape, flow, 256)
        healthy.eval()
        let sample = using (torch.no_grad()) (fun _ -> healthy.Sample(x, v))
        Assert.True(sample.LogDensity.abs().max().item<float>() < 1e-12, "log q = 0 at the identity")
        Assert.True((sample.Noise - v).abs().max().item<float>() < 1e-12, "u = v at the identity")
        let boundError, logQError = boundErrors healthy flow b x v
        Assert.True(boundError < 1e-10, sprintf "bound vs uniform estimate: %g" boundError)
        Assert.True(logQError < 1e-10, sprintf "log q vs independent: %g" logQError)
        // The check catches a wrong sigmoid log-det even here...
        let brokenFlow = new HalfSigmoidLogDet(shape, 3, 6L)
        let brokenError, _ = boundErrors (new VariationalDequantize(shape, brokenFlow, 256)) brokenFlow b x v
        Assert.True(brokenError > 1e-3, sprintf "half the sigmoid's log-det passed: %g" brokenError)
        // ...but not a bound that forgets log q, which is 0 here: the randomised test below catches that.
        let forgetfulError, _ = boundErrors (new ForgetsLogQ(shape, flow)) flow b x v
        Assert.True(forgetfulError < 1e-10, sprintf "%g" forgetfulError))

[<Fact>]
let ``at random parameters the bound is the uniform estimate at q's noise less log q, and log q matches autograd's Jacobian`` () =
    inFloat64 (fun () ->
        for seed in 1 .. 4 do
            torch.manual_seed(int64 (100 + seed)) |> ignore
            let b = body ()
            let x, v = data 4L
            let layers = 1 + seed % 3
            let flow = new DequantizationFlow(shape, layers, 5L)
            perturb 0.3 flow
            let healthy = new VariationalDequantize(shape, flow, 256)
            let boundError, logQError = boundErrors healthy flow b x v
            Assert.True(boundError < 1e-9, sprintf "seed %d: bound vs uniform estimate - log q: %g" seed boundError)
            Assert.True(logQError < 1e-9, sprintf "seed %d: log q vs independent: %g" seed logQError)
            // log q is far from 0 here, so forgetting it is caught...
            let _, logQ = independentLogQ flow x v
            Assert.True(logQ.abs().min().item<float>() > 1e-2, sprintf "seed %d: log q too close to 0 to tell: %O" seed logQ)
            let forgetfulError, _ = boundErrors (new ForgetsLogQ(shape, flow)) flow b x v
            Assert.True(forgetfulError > 1e-3, sprintf "seed %d: forgetting log q passed: %g" seed forgetfulError)
            // ...and so is a wrong sigmoid log-det.
            let brokenFlow = new HalfSigmoidLogDet(shape, layers, 5L)
            brokenFlow.load_state_dict(flow.state_dict()) |> ignore
            let brokenError, brokenLogQ = boundErrors (new VariationalDequantize(shape, brokenFlow, 256)) brokenFlow b x v
            Assert.True(brokenError > 1e-3 && brokenLogQ > 1e-3, sprintf "seed %d: half the sigmoid's log-det passed: %g, %g" seed brokenError brokenLogQ))

[<Theory>]
[<InlineData("float32")>]
[<InlineData("float64")>]
let ``u lies in (0, 1) and rounding gives the pixels back, whatever the parameters and draws`` (dtype: string) =
    use _ = torch.NewDisposeScope()
    let dt = if dtype = "float64" then torch.float64 else torch.float32
    torch.manual_seed(7L) |> ignore
    let d = new VariationalDequantize(shape, 3, 6L)
    // Far from the identity: shifts and scales that push the noise against 0 and 1.
    perturb 3.0 d
    moveTo dt torch.CPU d
    let n = 64L
    let x = torch.randint(0L, 256L, Array.append [| n |] shape).to_type(dt)
    x.narrow(0L, 0L, 8L).fill_(scalar 255.0) |> ignore
    x.narrow(0L, 8L, 8L).fill_(scalar 0.0) |> ignore
    let v = torch.rand(Array.append [| n |] shape, dtype = dt)
    // Draws at and next to the ends (1 itself a user's noise could hold).
    let ends = [| 0.0; Math.Pow(2.0, -24.0); 1e-12; 0.5; 1.0 - Math.Pow(2.0, -24.0); 1.0 |]
    for i in 0 .. ends.Length - 1 do
        v.narrow(0L, int64 (2 * i), 2L).fill_(scalar ends.[i]) |> ignore
        v.narrow(0L, int64 (16 + 2 * i), 2L).fill_(scalar ends.[i]) |> ignore
    use _ = torch.no_grad()
    let s = d.Sample(x, v)
    Assert.True(s.Noise.gt(scalar 0.0).all().item<bool>(), "u > 0")
    Assert.True(s.Noise.lt(scalar 1.0).all().item<bool>(), "u < 1")
    Assert.True(s.LogDensity.isfinite().all().item<bool>(), "log q finite")
    d.Noise <- v
    let r = d.Forward x
    Assert.True(r.LogDet.isfinite().all().item<bool>(), "log-det finite")
    Assert.True(r.Value.ge(scalar 0.0).all().item<bool>() && r.Value.lt(scalar 1.0).all().item<bool>(), "y in [0, 1)")
    Assert.True(d.Inverse(r.Value).Value.eq(x).all().item<bool>(), "floor(256 y) = x")
    // The pushed noise reaches the ends the clamp keeps it from passing.
    let u64 = s.Noise.to_type(torch.float64)
    Assert.True(u64.max().item<float>() > 0.999 && u64.min().item<float>() < 0.001, "the noise reaches near both ends")

[<Fact>]
let ``the dequantiser is checked by name: every built-in check passes or says why it does not apply`` () =
    for spec in [ Catalogue.find "variational-dequantize"; Catalogue.find "dequantization-flow" ] do
        let why = PropertyChecks.applicability spec CheckKind.LogDet CheckOptions.Float64
        if spec.Name = "variational-dequantize" then Assert.True(why.IsSome && why.Value.Contains "variational bound")
        else Assert.True(why.IsNone, "the noise flow's log-det is checked against autograd")
