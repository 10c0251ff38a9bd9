/// The checks must reject each deliberately broken bijector, with a counterexample.
module MixerFlow.Properties.BrokenTests

open Xunit
open MixerFlow.Core
open MixerFlow.Checks
open MixerFlow.Properties

let private quick = CheckOptions.Float64.WithCases(5)

let private assertRejected (spec: BijectorSpec) (kind: CheckKind) =
    let r = PropertyChecks.run spec kind quick
    Assert.True(r.Applicable)
    Assert.False(r.Passed, sprintf "check %A accepted %s" kind spec.Name)
    // FsCheck's report names the counterexample; our label gives shapes and numbers.
    Assert.Contains("Falsifiable", r.Message)
    Assert.Contains("seed=", r.Message)
    Assert.Contains("expected", r.Message)

let private assertAccepted (spec: BijectorSpec) (kind: CheckKind) =
    let r = PropertyChecks.run spec kind quick
    Assert.True(r.Passed, r.Message)

[<Fact>]
let ``a correct twin passes the checks the broken ones fail`` () =
    for kind in [ CheckKind.Inverse; CheckKind.LogDet; CheckKind.InverseLogDet; CheckKind.Independence; CheckKind.Gradients; CheckKind.SaveLoad; CheckKind.HandGradient ] do
        assertAccepted (Broken.spec "none") kind

[<Fact>]
let ``wrong log-det sign is caught by the Jacobian and inverse log-det checks`` () =
    assertRejected (Broken.spec "wrong-sign") CheckKind.LogDet
    assertRejected (Broken.spec "wrong-sign") CheckKind.InverseLogDet

[<Fact>]
let ``log-det off by a constant is caught by the Jacobian check`` () =
    assertRejected (Broken.spec "offset") CheckKind.LogDet
    assertRejected (Broken.spec "offset") CheckKind.InverseLogDet

[<Fact>]
let ``an inverse that is off by a little is caught by the round trip and the inverse Jacobian`` () =
    assertRejected (Broken.spec "sloppy-inverse") CheckKind.Inverse
    assertRejected (Broken.spec "sloppy-inverse") CheckKind.LogDet

[<Fact>]
let ``samples that interact are caught by the independence check`` () =
    assertRejected (Broken.spec "batch-mixing") CheckKind.Independence

[<Fact>]
let ``a coupling that leaks into its conditioning half is caught by the structure check`` () =
    assertRejected (Broken.spec "leaky-structure") CheckKind.Structure

[<Fact>]
let ``a parameter that gets no gradient is caught`` () =
    let r = PropertyChecks.run (Broken.spec "unused-parameter") CheckKind.Gradients quick
    Assert.False(r.Passed)
    Assert.Contains("unused", r.Message)

[<Fact>]
let ``a hand-written backward that forgets the log-det's gradient is caught`` () =
    assertRejected (Broken.spec "hand-gradient") CheckKind.HandGradient
    let r = PropertyChecks.run (Broken.spec "hand-gradient") CheckKind.HandGradient quick
    Assert.Contains("dL/dlogScale", r.Message)

[<Fact>]
let ``a Partial's hand-written step that drops the passed-through slices' gradient is caught`` () =
    assertAccepted (Broken.partialSpec false) CheckKind.HandGradient
    assertRejected (Broken.partialSpec true) CheckKind.HandGradient
    let r = PropertyChecks.run (Broken.partialSpec true) CheckKind.HandGradient quick
    Assert.Contains("dL/dx", r.Message)

[<Fact>]
let ``state that is not saved is caught by the save and load check`` () =
    assertRejected Broken.forgetful CheckKind.SaveLoad

[<Fact>]
let ``a broken bijector inside a chain is still caught`` () =
    let spec =
        BijectorSpec("broken-in-chain", System.Func<System.Random, Bijector>(fun r ->
            let d = int64 (r.Next(2, 5))
            new Chain([ new ActNorm([| d |]) :> Bijector; new Broken.FaultyAffine(d, "offset"); LULinear.Vector d ])))
    assertRejected spec CheckKind.LogDet
