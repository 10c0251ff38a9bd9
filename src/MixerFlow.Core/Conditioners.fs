namespace MixerFlow.Core

open System
open TorchSharp
open TorchSharp.Modules

/// Builds a conditioner network from (input features, output features). For vector events the
/// network maps [B, in] -> [B, out]; for image events [B, in, H, W] -> [B, out, H, W].
/// A C# lambda `(inputs, outputs) => ...` converts to it; in F#
/// `ConditionerFactory(fun inputs outputs -> ...)`.
type ConditionerFactory = delegate of inputFeatures: int64 * outputFeatures: int64 -> torch.nn.Module<Tensor, Tensor>

/// Convolutions (odd k, stride 1, zero padding k / 2, no dilation or groups) that are right
/// whatever LibTorch's oneDNN switch says. While oneDNN is off they are LibTorch's own convolution
/// (ATen's im2col and BLAS path); while it is on, one GEMM over the whole batch, never LibTorch's
/// convolution: LibTorch's oneDNN float32
/// convolution reads the padding of its blocked channel layouts uninitialised (wrong or NaN
/// outputs for 72 -> 4 channels, wrong input gradients for 8 -> 4; LibTorch 2.10.0, oneDNN 3.7.1),
/// and whether LibTorch takes it depends on a process-wide switch that the application owns
/// (MixerFlow.Core.Runtime). A GEMM and im2col (`unfold`) or col2im (`fold`) are right whatever
/// that switch says. Batches are laid channels first ([C, B H W]) for the product, so a 1x1
/// convolution reads its input without a copy when the layer before was one of these, and each
/// layer's product is one [out, in k k] x [in k k, B H W] GEMM rather than one per image.
/// Results are returned as [B, C, H, W] views of the channels-first products.
[<AbstractClass; Sealed>]
type GemmConvolution =
    /// Whether `c` has this shape: square odd kernel, stride 1, same zero padding, no groups.
    static member Applies(c: Conv2d) =
        let k = c.kernel_size
        not (isNull k) && k.Length = 2 && k.[0] = k.[1] && k.[0] % 2L = 1L
        && not c.transposed && c.groups = 1L && c.padding_mode = PaddingModes.Zeros
        && not (isNull c.stride) && c.stride |> Array.forall (fun v -> v = 1L)
        && (isNull c.dilation || c.dilation |> Array.forall (fun v -> v = 1L))
        && (k.[0] = 1L && (isNull c.padding || c.padding |> Array.forall (fun v -> v = 0L))
            || not (isNull c.padding) && c.padding.Length = 2 && c.padding |> Array.forall (fun v -> v = k.[0] / 2L))
    /// A batch [B, C, H, W] as the matrix [C, B H W]: a view when it is laid channels first (the
    /// results of this type), a copy otherwise.
    static member internal ChannelsFirst(x: Tensor) = x.transpose(0L, 1L).reshape(x.shape.[1], -1L)
    /// The im2col matrix [C k k, B H W] of a batch [B, C, H, W] (zero padding k / 2); rows in
    /// the order (channel, kernel row, kernel column) of a Conv2d weight's.
    static member internal Columns(x: Tensor, k: int64) =
        if k = 1L then GemmConvolution.ChannelsFirst x
        else
            let b, c, h, w = x.shape.[0], x.shape.[1], x.shape.[2], x.shape.[3]
            let planes = x.transpose(0L, 1L).reshape(c * b, 1L, h, w)
            let cols = torch.nn.functional.unfold(planes, k, padding = k / 2L)
            cols.view(c, b, k * k, h * w).transpose(1L, 2L).reshape(c * k * k, b * h * w)
    /// The product [O, B H W] as the batch [B, O, H, W] (a view).
    static member internal AsBatch(y: Tensor, b: int64, h: int64, w: int64) =
        y.view(y.shape.[0], b, h, w).transpose(0L, 1L)
    /// Called after every convolution computed by this type or ThinConvolution with the weight,
    /// the input, the output and the seconds it took, where set (null by default): for profilers
    /// and FLOP counters, which cannot hook the Conv2d modules since their forward is not called.
    static member val Observer : Action<Tensor, Tensor, Tensor, float> = null with get, set
    /// Runs `compute` and reports it to the Observer, if any.
    static member internal Observed(weight: Tensor, x: Tensor, compute: unit -> Tensor) : Tensor =
        let observer = GemmConvolution.Observer
        if isNull observer then compute ()
        else
            let started = Diagnostics.Stopwatch.GetTimestamp()
            let y = compute ()
            observer.Invoke(weight, x, y, Diagnostics.Stopwatch.GetElapsedTime(started).TotalSeconds)
            y
    /// The convolution of a batch [B, in, H, W] by `c` (which must satisfy Applies).
    static member Apply(c: Conv2d, x: Tensor) : Tensor = GemmConvolution.Apply(c.weight, c.bias, x)
    /// The convolution of a batch [B, in, H, W] by a weight [out, in, k, k] (odd k, zero padding
    /// k / 2) and a bias [out] (or null).
    static member Apply(weight: Tensor, bias: Tensor, x: Tensor) : Tensor =
        GemmConvolution.Observed(weight, x, fun () -> GemmConvolution.Compute(weight, bias, x))
    /// Whether LibTorch's own convolution is right here and now: oneDNN is off (its float32
    /// kernels are the wrong ones), so LibTorch takes ATen's im2col and BLAS path, which is the
    /// faster one for MixerFlow's shapes. Read at every call: the switch belongs to the application.
    static member LibTorchIsRight = not NativeBackend.MkldnnEnabled
    static member private Compute(weight: Tensor, bias: Tensor, x: Tensor) : Tensor =
        if GemmConvolution.LibTorchIsRight then
            let k = weight.shape.[2]
            torch.nn.functional.conv2d(x, weight, bias, padding = [| k / 2L; k / 2L |])
        else GemmConvolution.Product(weight, bias, x)
    static member private Product(weight: Tensor, bias: Tensor, x: Tensor) : Tensor =
        let b, h, w = x.shape.[0], x.shape.[2], x.shape.[3]
        let o = weight.shape.[0]
        let cols = GemmConvolution.Columns(x, weight.shape.[2])
        let flat = weight.reshape(o, -1L)
        let y = if isNull bias then flat.mm(cols) else bias.unsqueeze(1L).addmm(flat, cols, 1.0f, 1.0f)
        GemmConvolution.AsBatch(y, b, h, w)

/// A k x k convolution (odd k, stride 1, zero padding k / 2, no dilation or groups) to fewer
/// channels than it reads, computed without an im2col of its input: with the kernel flipped,
/// z = W' x is one product ([out k k, in] x [in, B H W], a GEMM as in GemmConvolution), and col2im
/// (`fold`) adds z's k x k shifted planes into the output. The same sums as the convolution, in
/// another order. An im2col would build an [in k k, B H W] buffer and its backward would fold
/// one back: for Glow's last coupling layer (392 -> 12 channels, 3x3, 16 x 16) 3,528 rows
/// against this path's 108.
[<AbstractClass; Sealed>]
type ThinConvolution =
    /// Whether the convolution has this shape and reads more channels than it writes.
    static member Applies(c: Conv2d) =
        GemmConvolution.Applies c && c.kernel_size.[0] > 1L && c.out_channels < c.in_channels
    /// The convolution of a batch [B, in, H, W] by this path (reported to GemmConvolution.Observer).
    static member Apply(c: Conv2d, x: Tensor) : Tensor =
        GemmConvolution.Observed(c.weight, x, fun () -> ThinConvolution.Compute(c, x))
    static member private Compute(c: Conv2d, x: Tensor) : Tensor =
        let w = c.weight
        let o, i, k = w.shape.[0], w.shape.[1], w.shape.[2]
        let b, h, wd = x.shape.[0], x.shape.[2], x.shape.[3]
        // fold adds plane (a, b) of z at offset (a - k/2, b - k/2); the convolution reads its input
        // at (k/2 - a, k/2 - b) from each output: hence the flipped kernel.
        let flat = w.flip(2L, 3L).permute(0L, 2L, 3L, 1L).reshape(o * k * k, i)
        let z =
            if GemmConvolution.LibTorchIsRight then
                // A 1x1 convolution: LibTorch's takes the input as it lies, one product per image.
                torch.nn.functional.conv2d(x, flat.view(o * k * k, i, 1L, 1L)).view(b, o * k * k, h * wd)
            else flat.mm(GemmConvolution.ChannelsFirst x).view(o * k * k, b, h * wd).transpose(0L, 1L)
        let pad = struct (k / 2L, k / 2L)
        let y = torch.nn.functional.fold(z, struct (h, wd), struct (k, k), padding = Nullable pad)
        // In place on fold's fresh output: its backward does not read it.
        if isNull c.bias then y else y.add_(c.bias.view(1L, o, 1L, 1L), Scalars.One)

/// One convolution (odd k, stride 1, zero padding k / 2) whose parameters are named `weight`
/// and `bias` as a Conv2d's, computed as GemmConvolution: Glow's learned prior at a split.
type SameConvolution(inChannels: int64, outChannels: int64, kernel: int64) as this =
    inherit torch.nn.Module<Tensor, Tensor>("SameConvolution")
    // A Conv2d of the same shape, for its layout and its parameters' initialisation.
    let conv = torch.nn.Conv2d(inChannels, outChannels, kernel, padding = kernel / 2L)
    do
        if kernel % 2L <> 1L then invalidArg "kernel" (sprintf "SameConvolution needs an odd kernel, got %d" kernel)
        this.register_parameter("weight", conv.weight)
        this.register_parameter("bias", conv.bias)
    /// The convolution's weight [out, in, k, k] (the registered parameter: `to` replaces it).
    member this.Weight : Tensor = this.get_parameter("weight")
    /// The convolution's bias [out].
    member this.Bias : Tensor = this.get_parameter("bias")
    override this.forward(x) = GemmConvolution.Apply(this.Weight, this.Bias, x).contiguous()

/// A Linear layer's product in a reduced precision (bfloat16) from float32 parameters: the input
/// comes already rounded, the weight and bias are rounded once per call, the product accumulates
/// in float32 inside the GEMM and is rounded to the reduced type, as under PyTorch's autocast; the
/// parameters' gradients come back as float32. oneDNN's bfloat16 GEMM outruns float32's
/// on CPUs with AVX-512 BF16 (LibTorch's own fallback is far slower), and LibTorch
/// takes it only while oneDNN is enabled, which NativeBackend keeps off for its float32
/// convolutions: so the forward and the backward each enable it for their own products and
/// restore it after, which is why the layer is one autograd node of its own. The switch is
/// process-wide: a float32 convolution on another thread during those products could take
/// oneDNN's path. Vars: the input, the weight, the bias.
type internal ReducedPrecisionLinear() =
    inherit torch.autograd.SingleTensorFunction<ReducedPrecisionLinear>()
    /// The product without autograd; the rounded weight is handed back for a backward.
    static member Product(h: Tensor, weight: Tensor, bias: Tensor) =
        NativeBackend.WithMkldnn(fun () ->
            let w = weight.to_type(h.dtype)
            use b = bias.to_type(h.dtype)
            struct (torch.nn.functional.linear(h, w, b), w))
    static member Apply(h: Tensor, weight: Tensor, bias: Tensor) : Tensor =
        if torch.is_grad_enabled() && (h.requires_grad || weight.requires_grad || bias.requires_grad) then
            torch.autograd.SingleTensorFunction<ReducedPrecisionLinear>.apply(h, weight, bias)
        else
            let struct (y, w) = ReducedPrecisionLinear.Product(h, weight, bias)
            w.Dispose()
            y
    override _.Name = "ReducedPrecisionLinear"
    override _.forward(ctx, vars) =
        let h, weight, bias = vars.[0] :?> Tensor, vars.[1] :?> Tensor, vars.[2] :?> Tensor
        let struct (y, w) = ReducedPrecisionLinear.Product(h, weight, bias)
        ctx.save_for_backward(Collections.Generic.List<Tensor>([| h; w |]))
        ctx.save_data("inputGradient", box h.requires_grad)
        ctx.save_data("dtype", box weight.dtype)
        y
    override _.backward(ctx, g) =
        let saved = ctx.get_saved_variables()
        use h = saved.[0]
        use w = saved.[1]
        let dtype = unbox<torch.ScalarType> (ctx.get_data "dtype")
        NativeBackend.WithMkldnn(fun () ->
            let dh = if unbox<bool> (ctx.get_data "inputGradient") then g.mm(w) else null
            use dw = g.t().mm(h)
            use db = g.sum(0L)
            Collections.Generic.List<Tensor>([| dh; dw.to_type(dtype); db.to_type(dtype) |]))

/// Layers applied in order, each ReLU in place on the fresh output of the layer before it
/// (TorchSharp's Sequential disposes every intermediate result, so its ReLU cannot work in place
/// without a second handle). The layers are registered as "0", "1", ... like a Sequential's, so
/// the saved state has the same names.
///
/// Convolutions run as GemmConvolution (ThinConvolution for those to fewer channels than they
/// read): right whatever LibTorch's oneDNN switch says. Image batches run in chunks when one
/// convolution's im2col buffer for the whole batch would exceed `bufferBytes`: 231 MB for glow-cifar10's 3x3 convolutions from 392
/// channels at 16x16 and batch 64. Buffers above glibc's largest mmap threshold (32 MB) are mapped
/// and unmapped on every call, their pages faulted in afresh; chunks of a few images keep each
/// buffer in the heap for reuse. Every image is computed as without chunks (each layer acts on
/// images one by one); only the order in which the chunks' weight gradients are summed differs.
type ReluNetwork(layers: torch.nn.Module<Tensor, Tensor>[], bufferBytes: int64) as this =
    inherit torch.nn.Module<Tensor, Tensor>("ReluNetwork")
    // Linear and convolution layers keep their input for the backward pass, not their output:
    // the ReLU may overwrite that output (PyTorch's ReLU(inplace=True)), but never the input.
    let inPlace = layers |> Array.mapi (fun i m -> i > 0 && (m :? ReLU))
    do layers |> Array.iteri (fun i m -> this.register_module(string i, m))
    // Convolutions to fewer channels than they read (Glow's last 3x3 layer: 392 -> 12) run as
    // ThinConvolution: one product and a col2im, with no im2col buffer of the wide input.
    let thin = layers |> Array.map (fun l -> match l with :? Conv2d as c -> ThinConvolution.Applies c | _ -> false)
    // Every other convolution of that shape as one GEMM (GemmConvolution).
    let gemm = layers |> Array.mapi (fun i l -> match l with :? Conv2d as c -> not thin.[i] && GemmConvolution.Applies c | _ -> false)
    /// Bytes per image of the largest buffer a layer builds at an input of h x w: the im2col
    /// buffer of a convolution, or a thin convolution's product before its col2im.
    let perImage (h: int64) (w: int64) =
        layers
        |> Array.mapi (fun i l ->
            match l with
            | :? Conv2d as c ->
                let k = c.weight.shape
                let rows = if thin.[i] then k.[0] * k.[2] * k.[3] else k.[1] * k.[2] * k.[3]
                rows * h * w * int64 (c.weight.element_size())
            | _ -> 0L)
        |> Array.fold max 0L
    // Linear, ReLU, ..., Linear with biases: what a reduced compute type applies to.
    let perceptron =
        layers.Length % 2 = 1
        && layers |> Array.mapi (fun i l -> if i % 2 = 0 then (match l with :? Linear as f -> not (isNull f.bias) | _ -> false) else l :? ReLU) |> Array.forall id
    let mutable computeType = Nullable<torch.ScalarType>()
    let reduced (x: Tensor) =
        let flat = if x.dim() = 2L then x else x.reshape(-1L, x.shape.[int (x.dim() - 1L)])
        let mutable h = flat.to_type(computeType.Value)
        for i in 0 .. 2 .. layers.Length - 1 do
            let l = layers.[i] :?> Linear
            let a = ReducedPrecisionLinear.Apply(h, l.weight, l.bias)
            h <- if i < layers.Length - 1 then a.relu_() else a
        let y = h.to_type(x.dtype)
        if x.dim() = 2L then y
        else
            let shape = Array.copy x.shape
            shape.[shape.Length - 1] <- y.shape.[1]
            y.reshape(shape)
    let run (x: Tensor) =
        let mutable h = x
        for i in 0 .. layers.Length - 1 do
            h <-
                if inPlace.[i] then h.relu_()
                elif thin.[i] then ThinConvolution.Apply(layers.[i] :?> Conv2d, h)
                elif gemm.[i] then GemmConvolution.Apply(layers.[i] :?> Conv2d, h)
                else layers.[i].call(h)
        // GemmConvolution leaves its result laid channels first; callers get a plain batch.
        if h.is_contiguous() then h else h.contiguous()
    /// Layers without a limit on the convolutions' buffers.
    new(layers) = new ReluNetwork(layers, Int64.MaxValue)
    member _.Layers : Collections.Generic.IReadOnlyList<torch.nn.Module<Tensor, Tensor>> = layers :> _
    /// The largest im2col buffer one call builds; larger image batches run in chunks.
    member _.BufferBytes = bufferBytes
    /// The type the network computes in, where it is not its parameters' own: null (the default)
    /// or BFloat16, which a perceptron (Linear, ReLU, ..., Linear, with biases) on float32 inputs
    /// then uses for its products, with float32 parameters, results and gradients (see
    /// Conditioners.Mlp). Other inputs and other networks ignore it. Only first-order gradients
    /// pass through a network computing in bfloat16. On the CPU its products turn LibTorch's oneDNN
    /// on for their duration (process-wide; see NativeBackend for why it is otherwise off).
    member _.ComputeType
        with get () = computeType
        and set (v: Nullable<torch.ScalarType>) =
            if v.HasValue && v.Value <> torch.ScalarType.BFloat16 then
                invalidArg "ComputeType" (sprintf "ReluNetwork computes in its parameters' type or in BFloat16, got %A" v.Value)
            if v.HasValue && not perceptron then
                invalidArg "ComputeType" "a reduced compute type needs a perceptron: Linear, ReLU, ..., Linear, each Linear with a bias"
            computeType <- v
    override _.forward(x) =
        if computeType.HasValue && x.dtype = torch.ScalarType.Float32 && x.dim() >= 2L then reduced x else
        let b = x.shape.[0]
        let per = if x.dim() = 4L then perImage x.shape.[2] x.shape.[3] else 0L
        let chunk = if per = 0L then b else max 1L (bufferBytes / per)
        if chunk >= b then run x
        else
            let parts = [| for start in 0L .. chunk .. b - 1L -> run (x.narrow(0L, start, min chunk (b - start))) |]
            let y = torch.cat(parts, 0L)
            for p in parts do p.Dispose()
            y

/// Conditioner networks. The last layer is zero-initialised so a new coupling layer is the
/// identity (Kingma & Dhariwal 2018, section 3.3).
[<AbstractClass; Sealed>]
type Conditioners =
    static member private ZeroLast(m: torch.nn.Module) =
        use _ = torch.no_grad()
        for p in m.parameters() do p.zero_() |> ignore

    /// A multilayer perceptron with `depth` hidden layers of `width` units and ReLU.
    static member Mlp(width: int64, depth: int) : ConditionerFactory =
        if width < 1L || depth < 1 then invalidArg "width" (sprintf "Mlp needs width >= 1 and depth >= 1, got %d and %d" width depth)
        ConditionerFactory(fun inF outF ->
            let layers = ResizeArray<torch.nn.Module<Tensor, Tensor>>()
            let mutable d = inF
            for _ in 1 .. depth do
                layers.Add(torch.nn.Linear(d, width))
                layers.Add(torch.nn.ReLU())
                d <- width
            let last = torch.nn.Linear(d, outF)
            Conditioners.ZeroLast last
            layers.Add last
            new ReluNetwork(layers.ToArray()))

    /// The same perceptron computing its products in `computeType` (BFloat16) for float32 inputs,
    /// with float32 parameters, results and gradients (see ReluNetwork.ComputeType): on CPUs with
    /// AVX-512 BF16 about twice float32's GEMM rate; the flow stays exactly invertible and its
    /// log-determinant exact, since both passes of a coupling compute the same conditioner outputs,
    /// but those outputs, and so the trained model, differ from a float32 network's.
    static member Mlp(width: int64, depth: int, computeType: torch.ScalarType) : ConditionerFactory =
        let plain = Conditioners.Mlp(width, depth)
        if computeType <> torch.ScalarType.BFloat16 then
            invalidArg "computeType" (sprintf "Mlp computes in float32 (the other overload) or BFloat16, got %A" computeType)
        ConditionerFactory(fun inF outF ->
            let net = plain.Invoke(inF, outF) :?> ReluNetwork
            net.ComputeType <- Nullable computeType
            net :> _)

    /// The default KAN grid: 5 intervals.
    static member KanIntervals = 5
    /// The KAN splines' order (cubic).
    static member KanOrder = 3
    /// The default half-width of the KAN grid: [-3, 3].
    static member KanRange = 3.0

    /// A Kolmogorov-Arnold network (<see cref="KanLayer"/>) with `depth` hidden layers of `width`
    /// units, cubic B-splines on `intervals` intervals of [-range, range] plus a silu base on
    /// every edge. The last layer starts with every output 0 (base weights, coefficients and bias
    /// 0, spline scales 1), so a new coupling layer is the identity, as with Mlp. For vector
    /// events ([B, in] -> [B, out]); the masked networks of MaskedAutoregressive stay perceptrons.
    static member Kan(width: int64, depth: int, intervals: int, range: float) : ConditionerFactory =
        if width < 1L || depth < 1 then invalidArg "width" (sprintf "Kan needs width >= 1 and depth >= 1, got %d and %d" width depth)
        let grid = BSplineGrid(intervals, Conditioners.KanOrder, range)
        ConditionerFactory(fun inF outF ->
            let layers = ResizeArray<KanLayer>()
            let mutable d = inF
            for _ in 1 .. depth do
                layers.Add(new KanLayer(d, width, grid))
                d <- width
            layers.Add(new KanLayer(d, outF, grid, true))
            new KanNetwork(layers.ToArray()) :> torch.nn.Module<Tensor, Tensor>)

    /// Kan on the default grid (5 intervals on [-3, 3]).
    static member Kan(width: int64, depth: int) : ConditionerFactory =
        Conditioners.Kan(width, depth, Conditioners.KanIntervals, Conditioners.KanRange)

    /// Parameters of a Kan conditioner from `inputs` to `outputs` features: (intervals + 5) per
    /// edge (a base weight, a spline scale and intervals + 3 coefficients) and one bias per unit.
    static member KanParameterCount(inputs: int64, outputs: int64, width: int64, depth: int, intervals: int) =
        let grid = BSplineGrid(intervals, Conditioners.KanOrder, Conditioners.KanRange)
        KanLayer.ParameterCount(inputs, width, grid)
        + int64 (depth - 1) * KanLayer.ParameterCount(width, width, grid)
        + KanLayer.ParameterCount(width, outputs, grid)

    /// Parameters of an Mlp conditioner from `inputs` to `outputs` features.
    static member MlpParameterCount(inputs: int64, outputs: int64, width: int64, depth: int) =
        inputs * width + width + int64 (depth - 1) * (width * width + width) + width * outputs + outputs

    /// Glow's coupling network: 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialised 3x3 conv.
    static member Conv(width: int64) : ConditionerFactory =
        if width < 1L then invalidArg "width" (sprintf "Conv needs width >= 1, got %d" width)
        ConditionerFactory(fun inC outC ->
            let last = torch.nn.Conv2d(width, outC, 3L, padding = 1L)
            Conditioners.ZeroLast last
            new ReluNetwork(
                [| torch.nn.Conv2d(inC, width, 3L, padding = 1L) :> torch.nn.Module<Tensor, Tensor>
                   torch.nn.ReLU()
                   torch.nn.Conv2d(width, width, 1L)
                   torch.nn.ReLU()
                   last |], Conditioners.ConvBufferBytes) :> torch.nn.Module<Tensor, Tensor>)

    /// The largest im2col buffer a Glow coupling network builds per call (24 MB: under glibc's
    /// 32 MB mmap threshold); larger batches run in chunks (<see cref="ReluNetwork"/>).
    static member val ConvBufferBytes = 24L * 1024L * 1024L with get, set

    /// One zero-initialised 3x3 convolution: Glow's learned prior for the factored-out half
    /// at a split (mean and log-scale from the half that stays).
    static member ZeroConv() : ConditionerFactory =
        ConditionerFactory(fun inC outC ->
            let conv = new SameConvolution(inC, outC, 3L)
            Conditioners.ZeroLast conv
            conv :> torch.nn.Module<Tensor, Tensor>)

/// Which slices along the first event axis (features of a vector, channels of an image)
/// condition the coupling and which are transformed.
[<Sealed>]
type Partition(conditioning: int64[], transformed: int64[]) =
    do
        let all = Array.append conditioning transformed |> Array.sort
        if conditioning.Length = 0 || transformed.Length = 0 || all <> Array.init all.Length int64 then
            invalidArg "conditioning"
                (sprintf "Partition: conditioning %A and transformed %A must be non-empty and together cover 0..n-1 once" conditioning transformed)
    member _.Conditioning = Array.copy conditioning
    member _.Transformed = Array.copy transformed
    member _.Size = conditioning.Length + transformed.Length
    /// The roles swapped.
    member _.Swapped = Partition(transformed, conditioning)
    /// The first half conditions the second (the split of RealNVP and Glow).
    static member Halves(n: int64) =
        if n < 2L then invalidArg "n" (sprintf "a coupling needs at least 2 features, got %d" n)
        let h = n / 2L
        Partition([| 0L .. h - 1L |], [| h .. n - 1L |])
    /// Even indices condition the odd ones (an alternating mask).
    static member Alternating(n: int64) =
        if n < 2L then invalidArg "n" (sprintf "a coupling needs at least 2 features, got %d" n)
        Partition([| 0L .. 2L .. n - 1L |], [| 1L .. 2L .. n - 1L |])
