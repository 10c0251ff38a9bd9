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
    new(imageShape) = new Squeeze(imageShape, 2L)
    override this.Forward(x) =
        this.CheckShape(x, imageShape, "input")
        Transformed.VolumePreserving(torch.nn.functional.pixel_unshuffle(x, factor))
    override this.Inverse(y) =
        this.CheckShape(y, this.OutputShape, "input")
        Transformed.VolumePreserving(torch.nn.functional.pixel_shuffle(y, factor))

/// How an image is cut into the rows of MixerFlow's patches x features matrix.
type PatchStrategy =
    /// p x p square patches.
    | Square = 0
    /// Horizontal bands of p full-width rows.
    | Bands = 1
    /// Vertical stripes of p full-height columns.
    | Stripes = 2

/// How MixerFlow cuts an image [C, H, W] into the rows of its patches x features matrix: the
/// patch size, how many patches, how many values per patch, and the patch-grid shift between
/// layers. The one place these numbers are computed (Patchify, model configurations and shifts
/// all ask it).
[<Sealed>]
type PatchGeometry(imageShape: int64[], strategy: PatchStrategy, size: int64) =
    do ImageShape.check "PatchGeometry" imageShape
    let c, h, w = imageShape.[0], imageShape.[1], imageShape.[2]
    let ph, pw =
        match strategy with
        | PatchStrategy.Square -> size, size
        | PatchStrategy.Bands -> size, w
        | PatchStrategy.Stripes -> h, size
        | s -> invalidArg "strategy" (sprintf "unknown patch strategy %A" s)
    do
        if size < 1L || h % ph <> 0L || w % pw <> 0L then
            invalidArg "size" (sprintf "%A patches of size %d do not tile a %dx%d image" strategy size h w)
    member _.ImageShape = Array.copy imageShape
    member _.Strategy = strategy
    member _.Size = size
    member _.PatchHeight = ph
    member _.PatchWidth = pw
    /// Number of patches P (rows of the matrix).
    member _.Patches = (h / ph) * (w / pw)
    /// Values per patch D = C * ph * pw (columns of the matrix).
    member _.Features = c * ph * pw
    /// The matrix shape [P, D].
    member this.MatrixShape = [| this.Patches; this.Features |]
    /// The cyclic shift applied after layer `layer` (0-based): half a patch, in alternating
    /// directions so the grid does not drift; zero along an axis a patch spans entirely.
    member _.ShiftAfter(layer: int) : struct (int64 * int64) =
        let dy = if strategy = PatchStrategy.Stripes then 0L else ph / 2L
        let dx = if strategy = PatchStrategy.Bands then 0L else pw / 2L
        let sign = if layer % 2 = 0 then 1L else -1L
        struct (sign * dy, sign * dx)
    override _.ToString() = sprintf "%A patches %dx%d of a %dx%dx%d image: %d x %d" strategy ph pw c h w ((h / ph) * (w / pw)) (c * ph * pw)

/// Patchify: an image [C, H, W] as a matrix [P, D] of patches x features, each row one patch
/// of size ph x pw holding its C*ph*pw values (channel-major). A permutation: log|det| = 0.
type Patchify(geometry: PatchGeometry) =
    inherit Bijector("Patchify", geometry.ImageShape, geometry.MatrixShape)
    let shape = geometry.ImageShape
    let c, h, w = shape.[0], shape.[1], shape.[2]
    let ph, pw = geometry.PatchHeight, geometry.PatchWidth
    let matrix = geometry.MatrixShape
    let p, d = geometry.Patches, geometry.Features
    // The permutation as flat indices: row p of the matrix is patch (p / (W/pw), p % (W/pw)) in
    // raster order, its D values in (channel, i, j) order. Matrix entry k = p D + d holds image
    // value forward[k]; image value i is matrix entry inverse[i], or entry inverseOfTransposed[i]
    // of a matrix laid out [D, P] (a transposed view, which ColumnWise returns, is read as it lies).
    // One index_select along the flat axis copies faster than the 6-d permuted copy, whose
    // innermost runs are only pw values long (measured in docs/benchmarks.md).
    let forward =
        Array.init (int (p * d)) (fun k ->
            let row, col = int64 k / d, int64 k % d
            let py, px = row / (w / pw), row % (w / pw)
            let ch, i, j = col / (ph * pw), (col / pw) % ph, col % pw
            ch * h * w + (py * ph + i) * w + px * pw + j)
    let inverse = inversePermutation forward
    let inverseOfTransposed = Shapes.transposedPositions p d inverse
    // The three index tensors on each device, made on first use and freed with the module.
    let indexTensors = DeviceTensors<unit>()
    let indices (x: Tensor) =
        indexTensors.Get((), x, fun device -> [| for a in [ forward; inverse; inverseOfTransposed ] -> torch.tensor(a, device = device) |])
    /// Image [B, C, H, W] -> matrix [B, P, D].
    let toMatrix (x: Tensor) =
        let b = x.shape.[0]
        x.reshape(b, -1L).index_select(1L, (indices x).[0]).view(Array.append [| b |] matrix)
    /// Matrix [B, P, D] (contiguous or a transposed view) -> image [B, C, H, W].
    let toImage (y: Tensor) =
        let struct (flat, transposed) = Shapes.flatAsLaid y
        flat.index_select(1L, (indices y).[if transposed then 2 else 1]).view(Array.append [| y.shape.[0] |] shape)
    new(imageShape: int64[], strategy: PatchStrategy, size: int64) = new Patchify(PatchGeometry(imageShape, strategy, size))
    member _.Geometry = geometry
    member _.Strategy = geometry.Strategy
    member _.PatchHeight = ph
    member _.PatchWidth = pw
    member _.Patches = geometry.Patches
    member _.Features = geometry.Features
    override this.Forward(x) =
        this.CheckShape(x, shape, "input")
        Transformed.VolumePreserving(toMatrix x)
    override this.Inverse(y) =
        this.CheckShape(y, this.OutputShape, "input")
        Transformed.VolumePreserving(toImage y)
    /// Gather.[k] is the image value (flat, row-major) that matrix value k takes.
    member internal _.Gather = Array.copy forward
    override _.Dispose(disposing: bool) =
        if disposing then indexTensors.Clear()
        base.Dispose(disposing)

/// A cyclic shift of an image [C, H, W] by (dy, dx) pixels: moves patch borders between
/// MixerFlow layers. A permutation: log|det| = 0.
type Shift(imageShape: int64[], dy: int64, dx: int64) =
    inherit Bijector("Shift", imageShape, (ImageShape.check "Shift" imageShape; imageShape))
    member _.Offset = struct (dy, dx)
    override this.Forward(x) =
        this.CheckShape(x, imageShape, "input")
        Transformed.VolumePreserving(x.roll([| dy; dx |], [| 2L; 3L |]))
    override this.Inverse(y) =
        this.CheckShape(y, imageShape, "input")
        Transformed.VolumePreserving(y.roll([| -dy; -dx |], [| 2L; 3L |]))
    /// out[c, h, w] = in[c, (h - dy) mod H, (w - dx) mod W], as roll does.
    member internal _.Gather =
        let c, h, w = imageShape.[0], imageShape.[1], imageShape.[2]
        let wrap (v: int64) (n: int64) = ((v % n) + n) % n
        [| for ch in 0L .. c - 1L do
             for i in 0L .. h - 1L do
                 for j in 0L .. w - 1L -> ch * h * w + wrap (i - dy) h * w + wrap (j - dx) w |]

/// A reshape between two shapes with the same number of elements; log|det| = 0.
type Reshape(inputShape: int64[], outputShape: int64[]) =
    inherit Bijector("Reshape", inputShape, outputShape)
    override this.Forward(x) =
        this.CheckShape(x, inputShape, "input")
        Transformed.VolumePreserving(x.reshape(Array.append [| x.shape.[0] |] outputShape))
    override this.Inverse(y) =
        this.CheckShape(y, outputShape, "input")
        Transformed.VolumePreserving(y.reshape(Array.append [| y.shape.[0] |] inputShape))
