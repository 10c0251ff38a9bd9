/// Saved state holds each tensor once, under the name it was registered with.
module MixerFlow.Properties.StateNameTests

open System
open Xunit
open TorchSharp
open MixerFlow.Core
open MixerFlow.Checks

/// TorchSharp registers a module's fields by reflection too; a field whose compiled name differs
/// from its registered name (F# gives a shadowed constructor argument the name `x@123`) puts
/// every tensor below it into the state a second time, under a second name.
[<Fact>]
let ``no catalogue bijector saves a tensor under a compiler-generated name or twice`` () =
    for spec in Catalogue.all do
        for seed in 0 .. 3 do
            use _ = torch.NewDisposeScope()
            let b = spec.Build.Invoke(Random seed)
            let outer = new Chain([ b; new Chain([ new ActNorm(b.OutputShape) :> Bijector ]) ])
            for m in [ b; outer :> Bijector ] do
                let names = [ for kv in m.state_dict() -> kv.Key ]
                let generated = names |> List.filter (fun n -> n.Contains "@")
                Assert.True(generated.IsEmpty, sprintf "%s: %s" spec.Name (String.Join(", ", generated)))
                let handles = [ for kv in m.state_dict() -> kv.Value.Handle ]
                Assert.True((List.distinct handles).Length = handles.Length,
                            sprintf "%s: %d state entries for %d tensors: %s" spec.Name handles.Length (List.distinct handles).Length (String.Join(", ", names)))
