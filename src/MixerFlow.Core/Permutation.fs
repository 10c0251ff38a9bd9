namespace MixerFlow.Core

open System
open TorchSharp
open MixerFlow.Core.Ops

/// A fixed permutation along the first event axis (features or channels); log|det| = 0.
/// The permutation is a buffer, saved with the model.
type Permutation(eventShape: int64[], permutation: int64[]) as this =
    inherit Bijector("Permutation", eventShape, eventShape)
    do
        if eventShape.Length = 0 || int64 permutation.Length <> eventShape.[0]
           || Array.sort permutation <> Array.init permutation.Length int64 then
            invalidArg "permutation"
                (sprintf "Permutation: %A is not a permutation of 0..%d for event shape %s"
                    permutation (if eventShape.Length = 0 then -1L else eventShape.[0] - 1L) (Shapes.show eventShape))
    let forwardIndex = torch.tensor(permutation)
    let inverseIndex = torch.tensor(inversePermutation permutation)
    do
        this.register_buffer("forwardIndex", forwardIndex)
        this.register_buffer("inverseIndex", inverseIndex)
    member _.Indices : int64[] = forwardIndex.data<int64>().ToArray()
    /// Reverses the order of the first event axis.
    static member Reverse(eventShape: int64[]) =
        new Permutation(eventShape, Array.init (int eventShape.[0]) (fun i -> eventShape.[0] - 1L - int64 i))
    /// A uniformly random permutation drawn from `seed`.
    static member Random(eventShape: int64[], seed: int) =
        let rng = Random(seed)
        let p = Array.init (int eventShape.[0]) int64
        for i in p.Length - 1 .. -1 .. 1 do
            let j = rng.Next(i + 1)
            let t = p.[i] in p.[i] <- p.[j]; p.[j] <- t
        new Permutation(eventShape, p)
    override this.Forward(x) =
        this.CheckShape(x, eventShape, "input")
        Transformed.VolumePreserving(x.index_select(1L, forwardIndex))
    override this.Inverse(y) =
        this.CheckShape(y, eventShape, "input")
        Transformed.VolumePreserving(y.index_select(1L, inverseIndex))
