/// FsCheck properties (through its xunit integration) of the reshapes MixerFlow relies on.
module MixerFlow.Properties.PatchifyProperties

open FsCheck
open FsCheck.FSharp
open FsCheck.Xunit
open TorchSharp
open MixerFlow.Core
open MixerFlow.Checks

let private image c h w = torch.arange(int64 (c * h * w), dtype = torch.float64).reshape(1L, int64 c, int64 h, int64 w)

[<Property(MaxTest = 40, Replay = "(12345,67891)")>]
let ``patchify puts each patch's pixels in one row`` (c: PositiveInt) (gh: PositiveInt) (gw: PositiveInt) (p: PositiveInt) =
    let c, p = min c.Get 3, min p.Get 3
    let gh, gw = min gh.Get 4, min gw.Get 4
    let h, w = gh * p, gw * p
    let x = image c h w
    let m = (new Patchify([| int64 c; int64 h; int64 w |], PatchStrategy.Square, int64 p)).Forward(x).Value
    // Row r = patch (r / gw, r % gw); feature f = (channel, dy, dx) channel-major.
    let ok =
        seq {
            for r in 0 .. gh * gw - 1 do
                for f in 0 .. c * p * p - 1 do
                    let ch, dy, dx = f / (p * p), (f / p) % p, f % p
                    let py, px = r / gw, r % gw
                    yield m.[0L, int64 r, int64 f].item<float>() = x.[0L, int64 ch, int64 (py * p + dy), int64 (px * p + dx)].item<float>()
        }
        |> Seq.forall id
    ok |> Prop.label (sprintf "c=%d h=%d w=%d p=%d" c h w p)

[<Property(MaxTest = 40, Replay = "(12345,67891)")>]
let ``every patch strategy is a permutation of the pixels`` (c: PositiveInt) (h: PositiveInt) (w: PositiveInt) (strategy: int) =
    let c, h, w = min c.Get 3, min h.Get 6, min w.Get 6
    let strategy = enum<PatchStrategy> (abs strategy % 3)
    let x = image c h w
    let size = 1L
    let m = (new Patchify([| int64 c; int64 h; int64 w |], strategy, size)).Forward(x).Value
    let struct (sorted, _) = m.reshape(-1L).sort()
    (sorted - x.reshape(-1L)).abs().max().item<float>() = 0.0 |> Prop.label (sprintf "%A c=%d h=%d w=%d" strategy c h w)

/// Patchify keeps its index tensors per device and frees them with the module: a disposed
/// Patchify that is called again makes them afresh and permutes as before.
[<Xunit.Fact>]
let ``a disposed Patchify makes its indices again`` () =
    let x = image 3 8 8
    let p = new Patchify([| 3L; 8L; 8L |], PatchStrategy.Square, 4L)
    let before = p.Forward(x).Value
    p.Dispose()
    let after = p.Forward(x).Value
    Xunit.Assert.Equal(0.0, (before - after).abs().max().item<float>())
    Xunit.Assert.Equal(0.0, (p.Inverse(after).Value - x).abs().max().item<float>())
