/// Every check on every built-in bijector, in float64 and float32, with random shapes, seeds
/// and randomised parameters (see Checks.instantiate).
module MixerFlow.Properties.CatalogueTests

open System
open Xunit
open TorchSharp
open MixerFlow.Core
open MixerFlow.Checks

let private options dtype = if dtype = "float64" then CheckOptions.Float64 else CheckOptions.Float32

let cases () : seq<obj[]> =
    seq {
        for spec in Catalogue.all do
            for kind in Enum.GetValues(typeof<CheckKind>) |> Seq.cast<CheckKind> do
                for dtype in [ "float64"; "float32" ] do
                    if (PropertyChecks.applicability spec kind (options dtype)).IsNone then
                        yield [| box spec.Name; box kind; box dtype |]
    }

[<Theory>]
[<MemberData(nameof cases)>]
let ``built-in bijector passes check`` (name: string, kind: CheckKind, dtype: string) =
    let result = PropertyChecks.run (Catalogue.find name) kind (options dtype)
    Assert.True(result.Applicable)
    Assert.True(result.Passed, result.Message)
    Assert.True(result.Cases >= (options dtype).Cases, sprintf "ran %d cases" result.Cases)

[<Fact>]
let ``the catalogue covers all eleven families of the design`` () =
    let names = Catalogue.all |> Seq.map (fun s -> s.Name) |> Set.ofSeq
    for required in
        [ "actnorm"; "batchnorm"; "affine-coupling"; "additive-coupling"; "spline-coupling"; "maf"
          "permutation-reverse"; "permutation-random"; "lu-linear"; "conv1x1"; "squeeze"; "patchify-square"
          "patchify-bands"; "patchify-stripes"; "shift"; "row-wise"; "column-wise"; "dequantize"; "logit" ] do
        Assert.Contains(required, names)

[<Fact>]
let ``edge cases are declared for the spline, logit and dequantisation`` () =
    for name in [ "spline-coupling"; "logit"; "dequantize" ] do
        Assert.True((PropertyChecks.applicability (Catalogue.find name) CheckKind.Edges CheckOptions.Float64).IsNone, name)

[<Fact>]
let ``every concrete bijector in Core appears in the catalogue`` () =
    let core = Catalogue.bijectorTypes typeof<Bijector>.Assembly
    // The reflection sees the types it must (not an empty set that trivially passes).
    for t in [ typeof<Chain>; typeof<Inverted>; typeof<Reshape>; typeof<SplineCoupling> ] do Assert.Contains(t, core)
    Assert.DoesNotContain(typeof<Lifted>, core)   // abstract: not a catalogue entry of its own
    Assert.Contains(typeof<Coupling>, core)
    let covered = Catalogue.coveredTypes 8
    let missing = core |> Seq.except covered |> Seq.toList
    Assert.True(missing.IsEmpty, sprintf "bijectors in Core without a catalogue entry: %s" (String.Join(", ", missing |> Seq.map (fun t -> t.Name))))
    // A bijector type without an entry is noticed: this assembly's broken twins stand in for a
    // new Core type that nobody catalogued.
    let withNew = Seq.append core (Catalogue.bijectorTypes typeof<Broken.ForgetfulShift>.Assembly)
    let missingNew = withNew |> Seq.except covered
    Assert.Contains(typeof<Broken.ForgetfulShift>, missingNew)
    Assert.Contains(typeof<Broken.FaultyAffine>, missingNew)
