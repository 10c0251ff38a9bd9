namespace MixerFlow.Core

open System
open TorchSharp
open MixerFlow.Core.Ops

/// A forward pass taken for <see cref="HandGradient"/>: log p(x) per sample, and the tape of its
/// backward pass.
[<Sealed; AllowNullLiteral>]
type HandGradientPass internal (plan: HandGradientPlan, generation: int64, z: Tensor, tape: obj, logProb: Tensor) =
    let mutable used = false
    /// log p(x) per sample, [B]: an inference tensor (no autograd history; see HandGradient.Forward).
    member _.LogProb = logProb
    /// The plan that took the pass.
    member _.Plan = plan
    /// Adds to every parameter's <c>grad</c> the gradient of sum_b weight * log p(x_b) (for the mean
    /// bits per dimension over B samples of D dimensions, weight = -1 / (B D ln 2)).
    /// A pass's backward runs once, before the flow's next hand-written forward pass: its steps
    /// keep their activations in tensors that the next pass overwrites (see HandGradient.Release);
    /// a spent pass is refused (InvalidOperationException).
    /// <param name="weight">The loss's derivative with respect to each sample's log p(x).</param>
    member _.Backward(weight: float) =
        if used || generation <> plan.Generation then
            invalidOp "HandGradientPass: this tape is spent (a tape serves one backward pass, before the flow's next hand-written forward pass)"
        used <- true
        // Inference mode: no autograd bookkeeping at all on the way through LibTorch's dispatcher.
        use _inference = torch.inference_mode(true)
        // d(weight log N(z; 0, I))/dz = -weight z; each sample's log|det| enters log p with weight 1.
        let negWeight = Scalar.op_Implicit(-weight)
        let dz = try z.mul(negWeight) finally negWeight.Dispose()
        plan.Backward(tape, dz, weight, false) |> ignore

/// Gradients of a flow's log-likelihood by hand-written steps instead of autograd: the flow's
/// transform is planned part by part (<see cref="HandGradientPlan"/>, rules in
/// <see cref="HandRules"/>), a part without a rule running as an autograd island. MixerFlow's parts
/// (dequantisation, logit, patchify, shifts, row- and column-wise liftings, the partial maps of a
/// multi-scale model, affine couplings with a soft-clamped scale and a perceptron conditioner,
/// ActNorm) have rules. A flow with a context, a
/// base other than the standard normal, or whose parameters lie mostly in islands takes autograd's
/// path for the whole step. The results equal autograd's up to float rounding (the property tests
/// compare them at random parameters).
[<AbstractClass; Sealed>]
type HandGradient =
    /// Whether training uses hand-written gradients where a flow supports them: true unless the
    /// environment variable MIXERFLOW_HAND_GRADIENTS is 0 (the opt-out, read once).
    static member val Enabled =
        Environment.GetEnvironmentVariable "MIXERFLOW_HAND_GRADIENTS" <> "0" with get, set

    /// Why the flow as a whole cannot take the plan (null: it can), before any plan is made.
    static member private WhyNotFlow(flow: Flow, x: Tensor) : string =
        if isNull (box flow) then "there is no flow"
        elif isNull x then "there is no batch"
        elif flow.ContextFeatures <> 0L then "the flow is conditional (hand-written gradients take no context)"
        elif flow.Base.GetType() <> typeof<StandardNormal> then
            sprintf "its base distribution is %s, not the standard normal" (flow.Base.GetType().Name)
        elif not (x.is_floating_point()) then "the batch is not floating point"
        else null

    /// Why a plan cannot serve the step (null: it can): nothing would be gained where the
    /// hand-written steps take no parameter's gradient, or where most parameters are in islands.
    static member private WhyNotPlan(plan: HandGradientPlan) : string =
        if plan.HandWrittenParameters = 0L then sprintf "no part with parameters has a hand-written rule (%s)" plan.IslandSummary
        elif plan.IslandParameters > plan.HandWrittenParameters then
            sprintf "most parameters are in parts without a hand-written rule (%s)" plan.IslandSummary
        else null

    /// The plan for this flow and batch (kept with the flow's transform and made again when it no
    /// longer fits), or null with the reason the whole step takes autograd's path.
    static member private PlanOrReason(flow: Flow, x: Tensor) : struct (HandGradientPlan * string) =
        match HandGradient.WhyNotFlow(flow, x) with
        | null ->
            let plan = HandGradientPlan.Cached(flow.Transform, x)
            match HandGradient.WhyNotPlan plan with
            | null -> struct (plan, null)
            | why -> struct (null, why)
        | why -> struct (null, why)

    /// Whether <see cref="Forward"/> can take this flow and batch.
    /// <param name="flow">The flow.</param>
    /// <param name="x">The batch.</param>
    static member Supports(flow: Flow, x: Tensor) = isNull (HandGradient.WhyNot(flow, x))
    /// Why <see cref="Forward"/> cannot take this flow and batch, in a phrase that names the parts
    /// at fault; null when it can (some parts may still run as autograd islands: see <see cref="Plan"/>).
    /// <param name="flow">The flow.</param>
    /// <param name="x">The batch.</param>
    static member WhyNot(flow: Flow, x: Tensor) : string =
        let struct (_, why) = HandGradient.PlanOrReason(flow, x)
        why
    /// The plan of the flow's transform for batches like x (whether or not <see cref="Supports"/>
    /// holds: its description says which rule runs each part, or why autograd does).
    /// <param name="flow">An unconditional flow.</param>
    /// <param name="x">The batch.</param>
    static member Plan(flow: Flow, x: Tensor) : HandGradientPlan =
        if isNull (box flow) then nullArg "flow"
        HandGradientPlan.Cached(flow.Transform, x)
    /// The plan in words (<see cref="HandGradientPlan.Describe"/>), after a first line that says
    /// whether the whole step takes autograd's path and why.
    /// <param name="flow">The flow.</param>
    /// <param name="x">The batch.</param>
    static member Describe(flow: Flow, x: Tensor) : string =
        match HandGradient.WhyNotFlow(flow, x) with
        | null ->
            let plan = HandGradient.Plan(flow, x)
            let head =
                match HandGradient.WhyNotPlan plan with
                | null -> "hand-written gradients, by these rules:"
                | why -> sprintf "autograd for the whole step (because %s); the plan would be:" why
            head + Environment.NewLine + plan.Describe()
        | why -> sprintf "autograd for the whole step (because %s)" why
    /// log p(x) per sample without autograd (under LibTorch's inference mode), with the tape for
    /// <see cref="HandGradientPass.Backward"/>.
    /// <param name="flow">A flow that <see cref="Supports"/> x.</param>
    /// <param name="x">The batch.</param>
    static member Forward(flow: Flow, x: Tensor) : HandGradientPass =
        let mutable why = null
        match HandGradient.TryForward(flow, x, &why) with
        | null -> invalidArg "flow" (sprintf "HandGradient: hand-written gradients do not take this flow: %s" why)
        | pass -> pass
    /// <see cref="Forward"/> where the flow and batch take it; else null, with the reason in
    /// <paramref name="why"/> (<see cref="WhyNot"/>'s), from one look at the plan: for a training step
    /// that takes whichever path the flow allows.
    /// <param name="flow">The flow.</param>
    /// <param name="x">The batch.</param>
    /// <param name="why">Null when the pass ran, else why autograd must take the step.</param>
    static member TryForward(flow: Flow, x: Tensor, [<Runtime.InteropServices.Out>] why: byref<string>) : HandGradientPass =
        let struct (plan, reason) = HandGradient.PlanOrReason(flow, x)
        why <- reason
        if isNull (box plan) then null
        else HandGradient.Run(plan, x)
    static member private Run(plan: HandGradientPlan, x: Tensor) : HandGradientPass =
        // Inference mode rather than no_grad: LibTorch's dispatcher then skips its autograd layer
        // for every operation. The results are inference tensors: read them, compute with them,
        // but they cannot be trained through.
        use _inference = torch.inference_mode(true)
        let logDet = torch.zeros([| x.shape.[0] |], dtype = x.dtype, device = x.device)
        let struct (z, tape) = plan.Forward(x, logDet)
        HandGradientPass(plan, plan.Generation, z, tape, logDet.add_(standardNormalLogProb z, Scalars.One))
    /// Frees the tensors that hand-written passes keep from one step to the next. The steps write
    /// their activations and gradients in place into tensors they keep (about one training step's
    /// activations at the last batch size), so that a step allocates none; after training, this
    /// hands that memory back, with the temporaries the steps share on the calling thread. A later
    /// pass makes them again. Passes taken before it cannot run their backward any more.
    /// <param name="model">A flow, a bijector or any module holding them.</param>
    static member Release(model: torch.nn.Module) =
        if isNull (box model) then nullArg "model"
        for m in Seq.append [ model ] (model.modules()) do HandGradientPlan.ReleaseCached m
        Workspace.ClearScratch()
