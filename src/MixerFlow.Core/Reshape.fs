namespace MixerFlow.Core

open System
open TorchSharp
open MixerFlow.Core.Ops

module internal ImageShape =
    let check (name: string) (shape: int64[]) =
        if shape.Length <> 3 || Array.exists (fun s -> s < 1L) shape then
            invalidArg "imageShape" (sprintf "%s expects an image shape [C, H, W], got %s" name (Shapes.show shape))

/// Squeeze (Dinh et al. 2017, RealNVP, section 3.6): space to depth, [C, H, W] ->
/// [C f^2, H/f, W/f]. A permutation of the elements: log|det| = 0.
type Squeeze(imageShape: int64[], factor: int64) =
    inherit Bijector("Squeeze", imageShape,
                     (ImageShape.check "Squeeze" imageShape
                      if factor < 1L || imageShape.[1] % factor <> 0L || imageShape.[2] % factor <> 0L then
                          invalidArg "factor" (sprintf "Squeeze: factor %d must divide height %d and width %d" factor imageShape.[1] imageShape.[2])
                      [| imageShape.[0] * factor * factor; imageShape.[1] / factor; imageShape.[2] / factor |]))
    new(imageShape) = Squeeze(imageShape, 2L)
    override this.Forward(x) =
        this.CheckShape(x, imageShape, "input")
        Transformed(torch.nn.functional.pixel_unshuffle(x, factor), zeroLogDet x)
    override this.Inverse(y) =
        this.CheckShape(y, this.OutputShape, "input")
        Transformed(torch.nn.functional.pixel_shuffle(y, factor), zeroLogDet y)

/// How an image is cut into the rows of MixerFlow's patches x features matrix.
type PatchStrategy =
    /// p x p square patches.
    | Square = 0
    /// Horizontal bands of p full-width rows.
    | Bands = 1
    /// Vertical stripes of p full-height columns.
    | Stripes = 2

/// Patchify: an image [C, H, W] as a matrix [P, D] of patches x features, each row one patch
/// of size ph x pw holding its C*ph*pw values (channel-major). A permutation: log|det| = 0.
type Patchify(imageShape: int64[], strategy: PatchStrategy, size: int64) =
    inherit Bijector("Patchify", imageShape,
                     (ImageShape.check "Patchify" imageShape
                      let c, h, w = imageShape.[0], imageShape.[1], imageShape.[2]
                      let ph, pw =
                          match strategy with
                          | PatchStrategy.Square -> size, size
                          | PatchStrategy.Bands -> size, w
                          | PatchStrategy.Stripes -> h, size
                          | s -> invalidArg "strategy" (sprintf "unknown patch strategy %A" s)
                      if size < 1L || h % ph <> 0L || w % pw <> 0L then
                          invalidArg "size" (sprintf "Patchify: %A patches of size %d do not tile a %dx%d image" strategy size h w)
                      [| (h / ph) * (w / pw); c * ph * pw |]))
    let c, h, w = imageShape.[0], imageShape.[1], imageShape.[2]
    let ph, pw =
        match strategy with
        | PatchStrategy.Square -> size, size
        | PatchStrategy.Bands -> size, w
        | _ -> h, size
    member _.Strategy = strategy
    member _.PatchHeight = ph
    member _.PatchWidth = pw
    member _.Patches = (h / ph) * (w / pw)
    member _.Features = c * ph * pw
    override this.Forward(x) =
        this.CheckShape(x, imageShape, "input")
        let b = x.shape.[0]
        // [B, C, H/ph, ph, W/pw, pw] -> [B, H/ph, W/pw, C, ph, pw] -> [B, P, D]
        let y = x.reshape(b, c, h / ph, ph, w / pw, pw).permute(0L, 2L, 4L, 1L, 3L, 5L).reshape(b, this.Patches, this.Features)
        Transformed(y, zeroLogDet x)
    override this.Inverse(y) =
        this.CheckShape(y, this.OutputShape, "input")
        let b = y.shape.[0]
        let x = y.reshape(b, h / ph, w / pw, c, ph, pw).permute(0L, 3L, 1L, 4L, 2L, 5L).reshape(b, c, h, w)
        Transformed(x, zeroLogDet y)

/// A cyclic shift of an image [C, H, W] by (dy, dx) pixels: moves patch borders between
/// MixerFlow layers. A permutation: log|det| = 0.
type Shift(imageShape: int64[], dy: int64, dx: int64) =
    inherit Bijector("Shift", imageShape, (ImageShape.check "Shift" imageShape; imageShape))
    member _.Offset = struct (dy, dx)
    override this.Forward(x) =
        this.CheckShape(x, imageShape, "input")
        Transformed(x.roll([| dy; dx |], [| 2L; 3L |]), zeroLogDet x)
    override this.Inverse(y) =
        this.CheckShape(y, imageShape, "input")
        Transformed(y.roll([| -dy; -dx |], [| 2L; 3L |]), zeroLogDet y)

/// A reshape between two shapes with the same number of elements; log|det| = 0.
type Reshape(inputShape: int64[], outputShape: int64[]) =
    inherit Bijector("Reshape", inputShape, outputShape)
    override this.Forward(x) =
        this.CheckShape(x, inputShape, "input")
        Transformed(x.reshape(Array.append [| x.shape.[0] |] outputShape), zeroLogDet x)
    override this.Inverse(y) =
        this.CheckShape(y, outputShape, "input")
        Transformed(y.reshape(Array.append [| y.shape.[0] |] inputShape), zeroLogDet y)
