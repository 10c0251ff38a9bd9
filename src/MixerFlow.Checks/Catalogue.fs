namespace MixerFlow.Checks

open System
open TorchSharp
open MixerFlow.Core
open MixerFlow.Core.Ops

/// The built-in bijectors as check specifications: random shapes and options per case. Used by
/// the property tests and by the `check` command. A new bijector gets every check by adding a
/// spec here (or by writing a BijectorSpec of its own).
module Catalogue =
    let private between (r: Random) lo hi = int64 (r.Next(lo, hi + 1))
    let private pick (r: Random) (xs: 'a[]) = xs.[r.Next xs.Length]
    let private spec name (build: Random -> Bijector) = BijectorSpec(name, Func<Random, Bijector>(build))
    let private specWith name (build: Random -> Bijector) sampler edgesIn edgesOut =
        BijectorSpec(name, Func<Random, Bijector>(build), sampler, edgesIn, edgesOut)

    /// A vector [d] or an image [c, h, w] event.
    let private anyShape (r: Random) =
        if r.Next 2 = 0 then [| between r 2 6 |] else [| between r 1 3; between r 1 3; between r 1 3 |]
    let private imageShape (r: Random) = [| between r 1 2; 2L * between r 1 2; 2L * between r 1 2 |]
    let private partition (r: Random) d =
        let p = if r.Next 2 = 0 then Partition.Halves d else Partition.Alternating d
        if r.Next 2 = 0 then p else p.Swapped
    let private mlp (r: Random) = Conditioners.Mlp(between r 4 12, r.Next(1, 3))
    /// A permutation seed from the torch generator (not the shape seed), so that a fresh
    /// instance in the save/load check gets a different permutation unless it is loaded.
    let private torchSeed () = int (torch.randint(0L, 1_000_000L, [| 1L |]).item<int64>())

    [<CompiledName("ActNorm")>]
    let actNorm =
        spec "actnorm" (fun r ->
            let s = anyShape r
            if s.Length = 3 && r.Next 2 = 0 then new ActNorm(s, [| 0 |]) else new ActNorm(s))
    [<CompiledName("BatchNorm")>]
    let batchNorm =
        spec "batchnorm" (fun r ->
            let s = anyShape r
            if s.Length = 3 && r.Next 2 = 0 then new BatchNormFlow(s, [| 0 |]) else new BatchNormFlow(s))
    [<CompiledName("AffineCoupling")>]
    let affineCoupling =
        spec "affine-coupling" (fun r ->
            let d = between r 2 8
            new AffineCoupling([| d |], partition r d, mlp r, pick r [| ScaleBound.SoftClamp 2.0; ScaleBound.SoftClamp 1.0; ScaleBound.Sigmoid |]))
    [<CompiledName("AffineCouplingConv")>]
    let affineCouplingConv =
        spec "affine-coupling-conv" (fun r ->
            let c = 2L * between r 1 2
            new AffineCoupling([| c; between r 2 3; between r 2 3 |], partition r c, Conditioners.Conv(between r 4 8)))
    /// The affine coupling with a conditioner computing its products in bfloat16
    /// (Conditioners.Mlp with a compute type): in float32 the reduced path runs (the float64 checks
    /// see the plain network, which ignores it there).
    [<CompiledName("AffineCouplingBfloat16")>]
    let affineCouplingBfloat16 =
        spec "affine-coupling-bfloat16" (fun r ->
            let d = between r 2 8
            new AffineCoupling([| d |], partition r d, Conditioners.Mlp(between r 4 12, r.Next(1, 3), torch.ScalarType.BFloat16)))
    [<CompiledName("AdditiveCoupling")>]
    let additiveCoupling =
        spec "additive-coupling" (fun r ->
            let d = between r 2 8
            new AdditiveCoupling([| d |], partition r d, mlp r))

    let private splineCouplingBuild (r: Random) : Bijector =
        let d = between r 2 6
        new SplineCoupling([| d |], partition r d, mlp r, r.Next(2, 7), float (between r 1 3))
    [<CompiledName("SplineCoupling")>]
    let splineCoupling =
        specWith "spline-coupling" splineCouplingBuild
            // Wider than the spline's interval, so that both tails are exercised.
            (Func<Bijector, int64, Tensor>(fun b n -> torch.randn(batchShape n b.InputShape) * scalar 2.5))
            // Inputs exactly on knots (bin boundaries), on +-bound, just inside and outside, and far out.
            (Func<Bijector, Tensor>(fun b ->
                let s = b :?> SplineCoupling
                let x = torch.randn(batchShape 6L b.InputShape, dtype = torch.float64) * scalar 2.0
                let knots = s.InputKnots(x.to_type(s.Partition |> fun _ -> (s.parameters() |> Seq.head).dtype))
                let tIdx = torch.tensor(s.Partition.Transformed)
                let bound = s.Bound
                let special = torch.tensor([| -bound; bound; -bound - 1e-9; bound + 1e-9; -bound + 1e-9; bound - 1e-9; -1e3; 1e3; 0.0 |], dtype = torch.float64)
                let nB = tIdx.shape.[0]
                let rows =
                    [| for i in 0L .. 5L ->
                        let row = x.[i].clone()
                        let values =
                            if i < 3L then
                                // pick knot (i*j) mod (K+1) for transformed element j
                                let k = knots.shape.[2]
                                torch.stack([| for j in 0L .. nB - 1L -> knots.[i, j, (i * 3L + j) % k].to_type(torch.float64) |])
                            else
                                torch.stack([| for j in 0L .. nB - 1L -> special.[((i - 3L) * 3L + j) % special.shape.[0]] |])
                        row.index_copy_(0L, tIdx, values) |]
                torch.stack(rows)))
            (Func<Bijector, Tensor>(fun b ->
                let s = b :?> SplineCoupling
                torch.tensor([| -s.Bound; s.Bound; -1e3; 1e3; 0.0 |], dtype = torch.float64).unsqueeze(1L).expand(5L, b.InputShape.[0]).contiguous()))

    [<CompiledName("Maf")>]
    let maf = spec "maf" (fun r -> new MaskedAutoregressive(between r 2 6, between r 6 12, r.Next(1, 3)))
    /// One of the elementwise maps, with random options.
    let private anyMap (r: Random) : ElementwiseMap =
        match r.Next 3 with
        | 0 -> Affine(pick r [| ScaleBound.SoftClamp 2.0; ScaleBound.Sigmoid |])
        | 1 -> Additive()
        | _ -> RationalQuadratic(r.Next(2, 6), float (between r 1 3))
    /// Wider than the splines' interval, so that both tails are exercised.
    let private wide = Func<Bijector, int64, Tensor>(fun b n -> torch.randn(batchShape n b.InputShape) * scalar 2.5)
    [<CompiledName("Coupling")>]
    let coupling =
        specWith "coupling-generic" (fun r ->
            let d = between r 2 6
            new Coupling([| d |], partition r d, mlp r, anyMap r)) wide null null
    /// A KAN conditioner (Conditioners.Kan) of random width, depth, grid and range.
    let private kan (r: Random) = Conditioners.Kan(between r 2 6, r.Next(1, 3), r.Next(1, 6), float (between r 1 3))
    /// The affine coupling with a KAN conditioner; inputs wider than the grid, so that the
    /// conditioner is also seen outside it.
    [<CompiledName("AffineCouplingKan")>]
    let affineCouplingKan =
        specWith "affine-coupling-kan" (fun r ->
            let d = between r 2 8
            new AffineCoupling([| d |], partition r d, kan r, pick r [| ScaleBound.SoftClamp 2.0; ScaleBound.Sigmoid |])) wide null null
    /// A coupling with a KAN conditioner and any elementwise map.
    [<CompiledName("CouplingKan")>]
    let couplingKan =
        specWith "coupling-kan" (fun r ->
            let d = between r 2 6
            new Coupling([| d |], partition r d, kan r, anyMap r)) wide null null
    [<CompiledName("SplineMaf")>]
    let splineMaf =
        specWith "spline-maf" (fun r ->
            new MaskedAutoregressive(between r 2 5, between r 6 12, r.Next(1, 3), RationalQuadratic(r.Next(2, 6), float (between r 1 3)))) wide null null
    /// A conditional layer with a random context row, fixed (the context is drawn from the
    /// torch generator: a fresh instance differs unless loaded).
    let private withContext (inner: Bijector) : Bijector =
        new FixedContext(inner, torch.randn(inner.ContextFeatures)) :> Bijector
    [<CompiledName("ConditionalCoupling")>]
    let conditionalCoupling =
        specWith "conditional-coupling" (fun r ->
            let d = between r 2 6
            withContext (new Coupling([| d |], partition r d, mlp r, anyMap r, between r 1 3))) wide null null
    [<CompiledName("ConditionalMaf")>]
    let conditionalMaf =
        specWith "conditional-maf" (fun r ->
            withContext (new MaskedAutoregressive(between r 1 4, between r 6 12, r.Next(1, 3), anyMap r, between r 1 3))) wide null null
    [<CompiledName("PermutationReverse")>]
    let permutationReverse = spec "permutation-reverse" (fun r -> Permutation.Reverse(anyShape r))
    [<CompiledName("PermutationRandom")>]
    let permutationRandom =
        spec "permutation-random" (fun r ->
            let s = anyShape r
            Permutation.Random((if s.[0] < 2L then [| 4L |] else s), torchSeed ()))
    [<CompiledName("LuLinear")>]
    let luLinear = spec "lu-linear" (fun r -> LULinear.Vector(between r 2 6))
    [<CompiledName("Conv1x1")>]
    let conv1x1 = spec "conv1x1" (fun r -> LULinear.Conv1x1(between r 2 4, between r 1 3, between r 1 3))
    [<CompiledName("Squeeze")>]
    let squeeze = spec "squeeze" (fun r -> new Squeeze(imageShape r))
    let private patchify strategy name =
        spec name (fun r ->
            let c, h, w = between r 1 2, between r 1 2, between r 1 2
            let p = between r 1 2
            new Patchify([| c; h * p; w * p |], strategy, p))
    [<CompiledName("PatchifySquare")>]
    let patchifySquare = patchify PatchStrategy.Square "patchify-square"
    [<CompiledName("PatchifyBands")>]
    let patchifyBands = patchify PatchStrategy.Bands "patchify-bands"
    [<CompiledName("PatchifyStripes")>]
    let patchifyStripes = patchify PatchStrategy.Stripes "patchify-stripes"
    [<CompiledName("Shift")>]
    let shift =
        spec "shift" (fun r ->
            let s = [| between r 1 2; between r 2 5; between r 2 5 |]
            new Shift(s, between r -3 3, between r -3 3))
    [<CompiledName("Reshape")>]
    let reshape =
        spec "reshape" (fun r ->
            let image = imageShape r
            let flat = [| Array.fold (*) 1L image |]
            if r.Next 2 = 0 then new Reshape(image, flat) else new Reshape(flat, image))
    let private vectorFlow (r: Random) (d: int64) : Bijector =
        match r.Next 3 with
        | 0 -> new AffineCoupling([| d |], partition r d, mlp r)
        | 1 -> new MaskedAutoregressive(d, between r 4 8, 1)
        | _ -> new Chain([ new ActNorm([| d |]) :> Bijector; new AdditiveCoupling([| d |], partition r d, mlp r) ])
    [<CompiledName("RowWise")>]
    let rowWise =
        spec "row-wise" (fun r ->
            let d = between r 2 4
            new RowWise(between r 2 4, vectorFlow r d))
    [<CompiledName("ColumnWise")>]
    let columnWise =
        spec "column-wise" (fun r ->
            let p = between r 2 4
            new ColumnWise(between r 2 4, vectorFlow r p))
    [<CompiledName("Partial")>]
    let partial =
        spec "partial" (fun r ->
            let c = between r 2 4
            let h, w = 2L * between r 1 2, 2L * between r 1 2
            let k = between r 1 (int c - 1)
            let inner : Bijector =
                if r.Next 2 = 0 then new Chain([ new Squeeze([| k; h; w |]) :> Bijector; new ActNorm([| 4L * k; h / 2L; w / 2L |]); new Inverted(new Squeeze([| k; h; w |])) ])
                else LULinear.Conv1x1(k, h, w) :> Bijector
            new Partial([| c; h; w |], k, inner))
    /// Partial along the second axis of a patches x features matrix [p, d]: mixing layers (rows,
    /// a normalisation, columns) on its first k columns, as multi-scale MixerFlow's later layers.
    [<CompiledName("PartialColumns")>]
    let partialColumns =
        spec "partial-columns" (fun r ->
            let p, d = between r 2 4, between r 3 6
            let k = between r 2 (int d - 1)
            let inner = new Chain([ new RowWise(p, vectorFlow r k) :> Bijector; new ActNorm([| p; k |]); new ColumnWise(k, vectorFlow r p) ])
            new Partial([| p; d |], 1, k, inner))
    /// Multi-scale MixerFlow's split of a matrix [p, d]: each row's second half under an affine
    /// coupling given its first half (the Gaussian split prior), then mixing on the first half.
    [<CompiledName("MatrixSplit")>]
    let matrixSplit =
        spec "matrix-split" (fun r ->
            let p, d = between r 2 4, between r 4 7
            let k = d / 2L
            let prior = new RowWise(p, new Coupling([| d |], Partition.Halves d, mlp r, Affine()))
            let mixing = new Chain([ new RowWise(p, new AffineCoupling([| k |], partition r k, mlp r)) :> Bijector; new ActNorm([| p; k |]); new ColumnWise(k, new AffineCoupling([| p |], partition r p, mlp r)) ])
            new Chain([ prior :> Bijector; new Partial([| p; d |], 1, k, mixing) ]))
    [<CompiledName("SplitPrior")>]
    let splitPrior =
        spec "split-prior" (fun r ->
            let c = 2L * between r 1 2
            new AffineCoupling([| c; between r 2 3; between r 2 3 |], Partition.Halves c, Conditioners.ZeroConv()))
    [<CompiledName("Dequantize")>]
    let dequantize =
        specWith "dequantize" (fun r -> new Dequantize(anyShape r))
            (Func<Bijector, int64, Tensor>(fun b n -> torch.randint(0L, 256L, batchShape n b.InputShape).to_type(torch.float32)))
            (Func<Bijector, Tensor>(fun b ->
                let n = b.InputSize
                torch.stack([| torch.zeros(b.InputShape); torch.full(b.InputShape, scalar 255.0) |])))
            null
    /// Pixel values 0..255 of a bijector's input shape.
    let private pixels = Func<Bijector, int64, Tensor>(fun b n -> torch.randint(0L, 256L, batchShape n b.InputShape).to_type(torch.float32))
    /// q(u | x)'s flow of variational dequantisation at a fixed pixel context (a random row).
    [<CompiledName("DequantizationFlow")>]
    let dequantizationFlow =
        spec "dequantization-flow" (fun r ->
            let flow = new DequantizationFlow([| between r 1 2; between r 1 3; between r 2 3 |], r.Next(1, 4), between r 4 8)
            new FixedContext(flow, addScalar (torch.rand(flow.ContextFeatures) * scalar 2.0) -1.0) :> Bijector)
    /// Variational dequantisation with a random noise flow.
    [<CompiledName("VariationalDequantize")>]
    let variationalDequantize =
        specWith "variational-dequantize" (fun r -> new VariationalDequantize([| between r 1 2; between r 1 3; between r 2 3 |], r.Next(1, 4), between r 4 8))
            pixels
            (Func<Bijector, Tensor>(fun b -> torch.stack([| torch.zeros(b.InputShape); torch.full(b.InputShape, scalar 255.0) |])))
            null
    [<CompiledName("Logit")>]
    let logit =
        specWith "logit" (fun r -> new Logit(anyShape r, pick r [| 0.05; 0.01; 1e-3 |]))
            (Func<Bijector, int64, Tensor>(fun b n -> torch.rand(batchShape n b.InputShape)))
            (Func<Bijector, Tensor>(fun b ->
                torch.stack([| for v in [ 0.0; 1.0; 1e-12; 1.0 - 1e-12 ] -> torch.full(b.InputShape, scalar v, dtype = torch.float64) |])))
            (Func<Bijector, Tensor>(fun b ->
                torch.stack([| for v in [ -40.0; 40.0; -1e4; 1e4 ] -> torch.full(b.InputShape, scalar v, dtype = torch.float64) |])))
    [<CompiledName("Chain")>]
    let chain =
        spec "chain" (fun r ->
            let d = between r 2 6
            new Chain(
                [ new ActNorm([| d |]) :> Bijector
                  new AffineCoupling([| d |], partition r d, mlp r)
                  LULinear.Vector d
                  Permutation.Random([| d |], torchSeed ())
                  new SplineCoupling([| d |], partition r d, mlp r) ]))
    [<CompiledName("Inverted")>]
    let inverted = spec "inverted-maf" (fun r -> new Inverted(new MaskedAutoregressive(between r 2 5, 8L, 1)))

    /// Every built-in family, in catalogue order.
    [<CompiledName("All")>]
    let all : Collections.Generic.IReadOnlyList<BijectorSpec> =
        [| actNorm; batchNorm; affineCoupling; affineCouplingBfloat16; affineCouplingConv; additiveCoupling; splineCoupling; maf
           permutationReverse; permutationRandom; luLinear; conv1x1; squeeze; patchifySquare; patchifyBands
           patchifyStripes; shift; reshape; rowWise; columnWise; partial; partialColumns; matrixSplit; splitPrior; dequantize; logit; chain; inverted
           coupling; splineMaf; conditionalCoupling; conditionalMaf; affineCouplingKan; couplingKan; dequantizationFlow
           variationalDequantize |]

    /// The public concrete (non-abstract) subclasses of Bijector in an assembly: for the Core
    /// assembly, what the catalogue must cover.
    [<CompiledName("BijectorTypes")>]
    let bijectorTypes (assembly: Reflection.Assembly) : Collections.Generic.IReadOnlyList<Type> =
        assembly.GetTypes()
        |> Array.filter (fun t ->
            (t.IsPublic || t.IsNestedPublic) && not t.IsAbstract && not t.IsGenericTypeDefinition
            && typeof<Bijector>.IsAssignableFrom t)
        |> Array.sortBy (fun t -> t.FullName)
        :> _

    /// The runtime types of every bijector that the catalogue's specs build for shape seeds
    /// 0 .. seeds - 1, inner parts of chains and wrappers included (torch seeded alike, since
    /// some specs draw choices from it).
    [<CompiledName("CoveredTypes")>]
    let coveredTypes (seeds: int) : Collections.Generic.IReadOnlyList<Type> =
        [ for s in all do
                for seed in 0 .. seeds - 1 do
                    use _ = torch.NewDisposeScope()
                    torch.manual_seed(int64 seed) |> ignore
                    for b in PropertyChecks.allBijectors (s.Build.Invoke(Random seed)) -> b.GetType() ]
        |> List.distinct
        |> List.sortBy (fun t -> t.FullName)
        |> List.toArray
        :> _

    /// Looks a family up by name; the error lists the names that exist.
    [<CompiledName("Find")>]
    let find (name: string) : BijectorSpec =
        match all |> Seq.tryFind (fun s -> String.Equals(s.Name, name, StringComparison.OrdinalIgnoreCase)) with
        | Some s -> s
        | None -> invalidArg "name" (sprintf "no built-in bijector named '%s'; known: %s" name (String.Join(", ", all |> Seq.map (fun s -> s.Name))))
