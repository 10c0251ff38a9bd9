/// Autograd islands: a part that no hand-written rule takes runs under autograd inside the
/// hand-written pass, the parts around it stay on their rules, and the gradients equal autograd's.
/// Also: the bijector files hold maths only (a source scan).
module MixerFlow.Properties.HandGradientIslandTests

open System
open System.IO
open Xunit
open TorchSharp
open TorchSharp.Modules
open MixerFlow.Core
open MixerFlow.Core.Ops

/// y = sinh(x) exp(s) + t per feature (the README's custom bijector): no hand-written rule.
type SinhAffine(dim: int64) as this =
    inherit Bijector("SinhAffine", [| dim |], [| dim |])
    let logScale = new Parameter(torch.randn(dim).mul_(scalar 0.3))
    let shift = new Parameter(torch.randn(dim))
    do
        this.register_parameter("logScale", logScale)
        this.register_parameter("shift", shift)
    override _.Forward(x) =
        let y = x.sinh() * logScale.exp() +. shift
        // log|dy/dx| = log cosh(x) + s per feature.
        Transformed.Elementwise(y, x.cosh().log() +. logScale.expand_as(x))
    override _.Inverse(y) =
        let x = ((y - shift) * logScale.neg().exp()).asinh()
        Transformed.Elementwise(x, (x.cosh().log() +. logScale.expand_as(x)).neg())

/// Couplings (a rule each), the custom part and ActNorm on vectors of 6 features, in training mode
/// and initialised, the couplings moved away from the identity they start at.
let private mixedFlow () =
    let mlp = Conditioners.Mlp(8L, 1)
    let body =
        new Chain([ new Coupling([| 6L |], Partition.Halves 6L, mlp, Affine()) :> Bijector
                    new SinhAffine(6L)
                    new Coupling([| 6L |], (Partition.Halves 6L).Swapped, mlp, Affine())
                    new ActNorm([| 6L |]) ])
    let flow = new Flow(body)
    flow.train()
    let x = torch.randn(5L, 6L)
    flow.LogProb x |> ignore
    using (torch.no_grad()) (fun _ -> for p in flow.parameters() do p.add_(torch.randn_like(p).mul_(scalar 0.3), Scalars.One) |> ignore)
    flow, x

[<Fact>]
let ``a flow with a part that has no rule keeps its other parts on the hand-written path and gives autograd's gradients of every parameter`` () =
    use _ = torch.NewDisposeScope()
    let saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try
        torch.manual_seed(31L) |> ignore
        let flow, x = mixedFlow ()
        Assert.True(HandGradient.Supports(flow, x), HandGradient.WhyNot(flow, x))
        let weight = -1.0 / (5.0 * 6.0 * Math.Log 2.0)
        flow.zero_grad()
        flow.LogProb(x).neg().div(scalar (6.0 * Math.Log 2.0)).mean().backward()
        let expected = [ for struct (n, p) in flow.named_parameters() -> n, p.grad.clone() ]
        flow.zero_grad()
        // Two steps: the second reuses the plan and its workspaces.
        for _ in 1 .. 2 do
            flow.zero_grad()
            let pass = HandGradient.Forward(flow, x)
            Assert.True((pass.LogProb - flow.LogProb(x).detach()).abs().max().item<float>() < 1e-9, "log p differs from LogProb")
            pass.Backward weight
            let got = [ for struct (n, p) in flow.named_parameters() -> n, p.grad.clone() ]
            Assert.Equal(expected.Length, got.Length)
            for (name, e), (_, g) in List.zip expected got do
                Assert.True(e.abs().max().item<float>() > 1e-8, sprintf "autograd's gradient of %s is zero" name)
                let err = (g - e).abs().max().item<float>()
                Assert.True(err < 1e-9, sprintf "%s: the gradient differs from autograd's by %g" name err)
    finally torch.set_default_dtype(saved)

[<Fact>]
let ``the plan names the part on an autograd island and why, and the rules of the others`` () =
    use _ = torch.NewDisposeScope()
    let flow, x = mixedFlow ()
    let plan = HandGradient.Plan(flow, x)
    let island = Assert.Single(plan.Islands)
    Assert.Equal("SinhAffine", island.Part)
    Assert.Equal("no hand-written rule for SinhAffine", island.AutogradReason)
    let rules = [ for p in plan.Parts -> p.Rule ]
    Assert.Equal<string list>([ "chain"; "affine coupling"; null; "affine coupling"; "ActNorm" ], rules)
    let text = HandGradient.Describe(flow, x)
    Assert.Contains("SinhAffine: autograd island (no hand-written rule for SinhAffine)", text)
    Assert.StartsWith("hand-written gradients", text)
    // Forward and Backward of the pass that the plan took name the same plan.
    let pass = HandGradient.Forward(flow, x)
    Assert.Same(plan, pass.Plan)

[<Fact>]
let ``a rule registered for a bijector type takes its parts off the islands`` () =
    use _ = torch.NewDisposeScope()
    let flow, x = mixedFlow ()
    Assert.Equal(1, HandGradient.Plan(flow, x).Islands.Count)
    try
        HandRules.Register<SinhAffine>("refusing", Func<SinhAffine, Tensor, string>(fun _ _ -> "refused by the test rule"), Func<SinhAffine, HandPlanner, IHandStep>(fun _ _ -> failwith "not made"))
        let island = Assert.Single(HandGradient.Plan(flow, x).Islands)
        Assert.Equal("refused by the test rule", island.AutogradReason)
    finally HandRules.Remove(typeof<SinhAffine>) |> ignore
    Assert.Equal("no hand-written rule for SinhAffine", (Assert.Single(HandGradient.Plan(flow, x).Islands)).AutogradReason)

/// The repository's root: the first folder above the test's binaries that holds src/MixerFlow.Core.
let private repositoryRoot () =
    let rec up (d: DirectoryInfo) =
        if isNull d then failwith "src/MixerFlow.Core not found above the test binaries"
        elif Directory.Exists(Path.Combine(d.FullName, "src", "MixerFlow.Core")) then d.FullName
        else up d.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

[<Fact>]
let ``no bijector file of Core mentions workspaces, tapes or hand gradients: they live in Training/`` () =
    let core = Path.Combine(repositoryRoot (), "src", "MixerFlow.Core")
    let bijectorFiles = Directory.GetFiles(core, "*.fs", SearchOption.TopDirectoryOnly)
    Assert.Contains(bijectorFiles, fun f -> Path.GetFileName f = "Bijector.fs")
    Assert.Contains(bijectorFiles, fun f -> Path.GetFileName f = "Coupling.fs")
    for file in bijectorFiles do
        let text = File.ReadAllText file
        for word in [ "Workspace"; "Tape"; "IHandGradient"; "HandGradient"; "ViewCache" ] do
            Assert.False(text.Contains(word, StringComparison.Ordinal), sprintf "%s mentions %s" (Path.GetFileName file) word)
    Assert.True(File.Exists(Path.Combine(core, "Training", "Workspace.fs")))
