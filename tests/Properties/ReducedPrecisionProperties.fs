/// Couplings whose conditioners compute in bfloat16 (Conditioners.Mlp with a compute type). The
/// catalogue runs every check on them in float32 but the log-det one, whose oracle needs float64,
/// where the reduced path does not run. Here the oracle is the float32 autograd Jacobian: a
/// coupling's Jacobian is block-triangular, so its determinant depends only on the transformed
/// block's diagonal, which the conditioner's (rounded) outputs fix exactly; the conditioner's
/// own gradients (the off-diagonal block, through ReducedPrecisionLinear's backward) must not
/// change it, and the Structure check sees that block's zeros.
module MixerFlow.Properties.ReducedPrecisionProperties

open System
open Xunit
open FsCheck
open FsCheck.FSharp
open FsCheck.Xunit
open TorchSharp
open MixerFlow.Core
open MixerFlow.Checks

/// The coupling's forward log-det and log|det J| of its float32 autograd Jacobian, per sample (float64).
let private logDetAndReference (b: Bijector) (x: Tensor) =
    let j = PropertyChecks.jacobian (fun x -> (b.Forward x).Value) x
    let _, reference = torch.linalg.slogdet(j.to_type(torch.float64)).ToTuple()
    let got = using (torch.no_grad()) (fun _ -> b.Forward x)
    got.LogDet.to_type(torch.float64), reference

let private largestGap (got: Tensor) (reference: Tensor) = (got - reference).abs().max().item<float>()

let private logDetGap (b: Bijector) (x: Tensor) = logDetAndReference b x ||> largestGap

let private randomise (m: torch.nn.Module) =
    use _ = torch.no_grad()
    for p in m.parameters() do p.normal_(0.0, 0.3) |> ignore

[<Property(MaxTest = 12)>]
let ``a bfloat16 coupling's log-det equals log|det J| of its float32 Jacobian`` (seed: PositiveInt) =
    let r = Random(seed.Get)
    torch.manual_seed(int64 seed.Get) |> ignore
    let d = int64 (r.Next(2, 9))
    let partition = if r.Next 2 = 0 then Partition.Halves d else Partition.Alternating d
    use b = new AffineCoupling([| d |], partition, Conditioners.Mlp(int64 (r.Next(4, 13)), r.Next(1, 3), torch.ScalarType.BFloat16))
    randomise b
    let x = torch.randn(5L, d)
    let gap = logDetGap b x
    gap < 1e-4 |> Prop.label (sprintf "d=%d: |log-det - log|det J|| = %g" d gap)

[<Fact>]
let ``the check sees a bfloat16 coupling whose log-det is off`` () =
    // The same coupling with its log-det shifted by 1e-3 per sample: the oracle must notice.
    torch.manual_seed(7L) |> ignore
    use b = new AffineCoupling([| 6L |], Partition.Halves 6L, Conditioners.Mlp(8L, 2, torch.ScalarType.BFloat16))
    randomise b
    let x = torch.randn(5L, 6L)
    let got, reference = logDetAndReference b x
    Assert.True(largestGap (Ops.addScalar got 1e-3) reference > 1e-4)
    Assert.True(largestGap got reference < 1e-4)

[<Fact>]
let ``a bfloat16 conditioner changes the coupling's outputs, not its invertibility`` () =
    // The reduced path really runs (outputs differ from the float32 network with the same
    // weights) and the coupling still inverts to float32 precision.
    torch.manual_seed(11L) |> ignore
    use reduced = new AffineCoupling([| 8L |], Partition.Halves 8L, Conditioners.Mlp(16L, 2, torch.ScalarType.BFloat16))
    use plain = new AffineCoupling([| 8L |], Partition.Halves 8L, Conditioners.Mlp(16L, 2))
    randomise reduced
    plain.load_state_dict(reduced.state_dict()) |> ignore
    let x = torch.randn(64L, 8L)
    use _ = torch.no_grad()
    let y = reduced.Forward(x).Value
    Assert.True((y - plain.Forward(x).Value).abs().max().item<float32>() > 0.0f)
    let back = reduced.Inverse(y).Value
    Assert.True((back - x).abs().max().item<float32>() < 1e-4f)
