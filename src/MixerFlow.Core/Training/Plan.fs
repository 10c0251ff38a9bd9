namespace MixerFlow.Core

open System
open System.Collections.Generic
open TorchSharp

/// One part of a <see cref="HandGradientPlan"/>: which rule runs it, or why autograd does.
type HandPlanPart =
    { /// How deep the part sits (0: the plan's own bijector; its parts 1, and so on).
      Depth: int
      /// The part's name.
      Part: string
      /// The rule that runs it by hand; null on an autograd island.
      Rule: string
      /// Why the part runs as an autograd island (null when a rule runs it).
      AutogradReason: string }
    /// Whether the part runs as an autograd island.
    member p.IsIsland = not (isNull p.AutogradReason)
    override p.ToString() =
        let indent = String(' ', 2 * p.Depth)
        if p.IsIsland then sprintf "%s%s: autograd island (%s)" indent p.Part p.AutogradReason
        else sprintf "%s%s: %s" indent p.Part p.Rule

/// The hand-written training pass of one bijector (a flow's transform), made from its parts by
/// their rules (<see cref="HandRules"/>): it owns every step, workspace and tape. A part that no
/// rule takes runs as an autograd island (its own forward pass under autograd) while the parts
/// around it stay on their hand-written steps. <see cref="Describe"/> says which rule runs each part,
/// or why autograd does.
[<Sealed; AllowNullLiteral>]
type HandGradientPlan private (root: IHandStep, parts: HandPlanPart[], checks: struct (Bijector * HandRule * bool)[],
                               version: int, dtype: torch.ScalarType, deviceType: DeviceType, deviceIndex: int,
                               handParameters: int64, islandParameters: int64) =
    static let cache = Runtime.CompilerServices.ConditionalWeakTable<Bijector, HandGradientPlan ref>()
    static let parameterCount (m: torch.nn.Module) =
        m.parameters() |> Seq.sumBy (fun p -> if p.requires_grad then p.numel() else 0L)
    let mutable generation = 0L
    let islands = parts |> Array.filter (fun p -> p.IsIsland)
    let islandSummary =
        lazy (String.Join("; ", islands |> Seq.map (fun p -> sprintf "%s: %s" p.Part p.AutogradReason) |> Seq.distinct))

    /// Plans a bijector's hand-written pass for batches like x (its dtype and device).
    /// <param name="bijector">The bijector (a flow's transform, or any part).</param>
    /// <param name="x">A batch.</param>
    static member Make(bijector: Bijector, x: Tensor) : HandGradientPlan =
        if isNull (box bijector) then nullArg "bijector"
        if isNull x then nullArg "x"
        let version = HandRules.Version
        let parts = ResizeArray<HandPlanPart>()
        let checks = ResizeArray<struct (Bijector * HandRule * bool)>()
        let mutable islandParameters = 0L
        let rec compile (depth: int) (part: Bijector) : IHandStep =
            let rule = HandRules.For(part.GetType())
            let refusal =
                if isNull (box rule) then sprintf "no hand-written rule for %s" (part.GetType().Name)
                else rule.Refusal(part, x)
            if not (isNull (box rule)) then checks.Add(struct (part, rule, isNull refusal))
            if isNull refusal then
                parts.Add { Depth = depth; Part = part.Name; Rule = rule.NameOf part; AutogradReason = null }
                let note (p: Bijector) (how: string) = parts.Add { Depth = depth + 1; Part = p.Name; Rule = how; AutogradReason = null }
                rule.Make(part, HandPlanner(x, Func<_, _>(compile (depth + 1)), Action<_, _>(note)))
            else
                parts.Add { Depth = depth; Part = part.Name; Rule = null; AutogradReason = refusal }
                islandParameters <- islandParameters + parameterCount part
                AutogradIsland(part) :> IHandStep
        let root = compile 0 bijector
        HandGradientPlan(root, parts.ToArray(), checks.ToArray(), version, x.dtype, x.device_type, x.device_index,
                         parameterCount bijector - islandParameters, islandParameters)

    /// The plan kept for this bijector if it still fits batches like x (the same dtype, device,
    /// registered rules and answers of every rule), else a new one (the old one released).
    static member internal Cached(bijector: Bijector, x: Tensor) : HandGradientPlan =
        let cell = cache.GetValue(bijector, fun _ -> ref Unchecked.defaultof<HandGradientPlan>)
        let kept = cell.Value
        if not (isNull (box kept)) && kept.Fits x then kept
        else
            if not (isNull (box kept)) then kept.Release()
            let made = HandGradientPlan.Make(bijector, x)
            cell.Value <- made
            made

    /// Releases the plan kept for this module, if any (see <see cref="Release"/>).
    static member internal ReleaseCached(m: torch.nn.Module) =
        match m with
        | :? Bijector as b ->
            match cache.TryGetValue b with
            | true, cell when not (isNull (box cell.Value)) -> cell.Value.Release()
            | _ -> ()
        | _ -> ()

    /// Whether the plan still fits batches like x: the same dtype and device, no rule registered
    /// since, and every rule's answer (<see cref="HandRule.Refusal"/>) as when it was made.
    member internal _.Fits(x: Tensor) =
        version = HandRules.Version && x.dtype = dtype && x.device_type = deviceType && x.device_index = deviceIndex
        && checks |> Array.forall (fun struct (part, rule, accepted) -> isNull (rule.Refusal(part, x)) = accepted)

    /// Every part in order (a part's own parts after it, one level deeper).
    member _.Parts : IReadOnlyList<HandPlanPart> = parts :> _
    /// The parts that run as autograd islands, with the reasons.
    member _.Islands : IReadOnlyList<HandPlanPart> = islands :> _
    /// The islands in one line, "part: reason; ..." (each distinct one once); empty when none.
    member _.IslandSummary = islandSummary.Force()
    /// Elements of the parameters that hand-written steps take the gradients of.
    member _.HandWrittenParameters = handParameters
    /// Elements of the parameters inside autograd islands.
    member _.IslandParameters = islandParameters
    /// The plan in words: one line per part, the rule that runs it or why autograd does.
    member _.Describe() = String.Join(Environment.NewLine, parts |> Array.map string)
    /// Counts the forward passes and releases: a tape is spent once another began.
    member _.Generation = generation

    /// The forward map by hand (run it under inference mode or no_grad): y and a tape for
    /// <see cref="Backward"/>; each sample's log|det dy/dx| added to logDet in place.
    /// <param name="x">A batch.</param>
    /// <param name="logDet">[batch], added to in place.</param>
    member _.Forward(x: Tensor, logDet: Tensor) : struct (Tensor * obj) =
        generation <- generation + 1L
        root.Forward(x, logDet)
    /// The backward pass of the last <see cref="Forward"/> (see <see cref="IHandStep.Backward"/>):
    /// adds the parameters' gradients to their <c>grad</c>; dL/dx when inputGradient, else null.
    /// <param name="tape">What Forward returned.</param>
    /// <param name="dy">dL/dy.</param>
    /// <param name="logDetGradient">dL/d(log|det|) of each sample.</param>
    /// <param name="inputGradient">Whether dL/dx is wanted.</param>
    member _.Backward(tape: obj, dy: Tensor, logDetGradient: float, inputGradient: bool) : Tensor =
        root.Backward(tape, dy, logDetGradient, inputGradient)
    /// Frees the tensors the steps keep from one pass to the next (a later pass makes them again);
    /// passes taken before cannot run their backward any more.
    member _.Release() =
        generation <- generation + 1L
        root.Release()
