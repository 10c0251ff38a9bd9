namespace MixerFlow.Core

open System
open System.Collections.Concurrent
open TorchSharp
open MixerFlow.Core.Ops

/// MixerFlow's own rules: affine couplings with a soft-clamped scale and rational-quadratic spline
/// couplings, each with a perceptron conditioner, ActNorm, dequantisation, the logit, permutations
/// (patchify, shifts and their inverses, runs of them in a chain as one gather), row- and column-wise
/// liftings, partial maps and chains.
module internal BuiltInRules =
    let private floating (x: Tensor) = if x.is_floating_point() then null else "the batch is not floating point"

    /// Gather.[k] = the flat input value that output value k takes, for a bijector that permutes
    /// each sample's values; null for any other.
    let rec gatherOf (b: Bijector) : int64[] =
        match b with
        | :? Patchify as p -> p.Gather
        | :? Shift as s -> s.Gather
        | :? Inverted as i ->
            match gatherOf i.Inner with
            | null -> null
            | g -> inversePermutation g
        | _ -> null

    let private permutation (part: Bijector) : IHandStep =
        PermutationRunStep(part, part.OutputShape, gatherOf part) :> _

    /// A chain's steps: consecutive permutations composed into one gather, every other part
    /// planned on its own.
    let private chain (c: Chain) (planner: HandPlanner) : IHandStep =
        let parts = c.Parts
        let gathers = parts |> Seq.map gatherOf |> Seq.toArray
        let steps = ResizeArray<IHandStep>()
        let starts = ResizeArray<int>()
        let mutable i = 0
        while i < parts.Count do
            let mutable j = i
            if not (isNull gathers.[i]) then
                while j + 1 < parts.Count && not (isNull gathers.[j + 1]) do j <- j + 1
            starts.Add i
            if j > i then
                // Output k of the run takes input gather.[k]: each part's gather read through the last.
                let mutable gather = gathers.[i]
                for p in i + 1 .. j do
                    let g = gathers.[p]
                    gather <- Array.map (fun k -> gather.[int k]) g
                for p in i .. j do planner.Note(parts.[p], sprintf "permutation run (parts %d..%d as one gather)" i j)
                steps.Add(PermutationRunStep(parts.[i], parts.[j].OutputShape, gather))
            else steps.Add(planner.Compile parts.[i])
            i <- j + 1
        // The first part with parameters: the steps before it need no backward unless dL/dx is wanted.
        let first = match Seq.tryFindIndex HandGradients.hasParameters parts with Some k -> k | None -> parts.Count
        ChainStep(steps.ToArray(), starts.ToArray(), first) :> _

    /// Couplings: the affine step for an affine map, the spline step for a rational-quadratic one.
    let private coupling =
        let isSpline (c: Coupling) = c.Map.GetType() = typeof<RationalQuadratic>
        { new HandRule("coupling") with
            member _.NameOf(part) = if isSpline (part :?> Coupling) then "spline coupling" else "affine coupling"
            member _.Refusal(part, x) =
                let c = part :?> Coupling
                if c.IsAffine then AffineCouplingStep.Refusal(c, x)
                elif isSpline c then SplineCouplingStep.Refusal(c, x)
                else sprintf "its map is %s, not the affine or the rational-quadratic spline one" c.Map.Name
            member _.Make(part, _) =
                let c = part :?> Coupling
                if isSpline c then SplineCouplingStep c :> IHandStep else AffineCouplingStep c :> IHandStep }

    let all : (Type * HandRule) list =
        [ typeof<Coupling>, coupling
          typeof<ActNorm>,
          HandRule.Create<ActNorm>("ActNorm", (fun a x -> ActNormStep.Refusal(a, x)), (fun a _ -> ActNormStep a :> IHandStep))
          typeof<Dequantize>,
          HandRule.Create<Dequantize>("dequantisation", (fun _ x -> floating x), (fun d _ -> DequantizeStep d :> IHandStep))
          // A Dequantize whose noise comes from a learned flow: Dequantize's step would draw
          // uniform noise, so it runs as an autograd island (its noise flow's gradients by autograd).
          typeof<VariationalDequantize>,
          HandRule.Create<VariationalDequantize>(
              "variational dequantisation",
              (fun _ _ -> "its noise flow q(u|x) has no hand-written rule"),
              (fun _ _ -> invalidOp "variational dequantisation has no hand-written step"))
          typeof<Logit>,
          HandRule.Create<Logit>("logit", (fun _ x -> floating x), (fun l _ -> LogitStep l :> IHandStep))
          typeof<Patchify>, HandRule.Create<Bijector>("permutation", (fun _ x -> floating x), (fun b _ -> permutation b))
          typeof<Shift>, HandRule.Create<Bijector>("permutation", (fun _ x -> floating x), (fun b _ -> permutation b))
          typeof<Inverted>,
          HandRule.Create<Inverted>(
              "permutation",
              (fun i x ->
                  if isNull (gatherOf i) then sprintf "no hand-written rule for the inverse of %s" (i.Inner.GetType().Name)
                  else floating x),
              (fun i _ -> permutation i))
          typeof<Lifted>,
          HandRule.Create<Lifted>(
              "lifting",
              (fun l _ -> if l.Inner.ContextFeatures <> 0L then "its inner bijector is conditional" else null),
              (fun l planner -> LiftedStep(l, planner.Compile l.Inner) :> IHandStep))
          typeof<Partial>,
          HandRule.Create<Partial>(
              "partial",
              (fun p _ -> if p.Inner.ContextFeatures <> 0L then "its inner bijector is conditional" else null),
              (fun p planner -> PartialStep(p, planner.Compile p.Inner) :> IHandStep))
          typeof<Chain>, HandRule.Create<Chain>("chain", null, (fun c planner -> chain c planner)) ]

/// The rules that run bijectors by hand, by bijector type: MixerFlow's own (affine couplings with
/// a soft-clamped scale and rational-quadratic spline couplings, each with a perceptron conditioner,
/// ActNorm, dequantisation, the logit, permutations, liftings, partial maps, chains) and any
/// registered. A part is run by the rule of its type, else
/// of its nearest base type with one; a part without one runs as an autograd island.
[<Sealed>]
type HandRules private () =
    static let rules = ConcurrentDictionary<Type, HandRule>(dict BuiltInRules.all)
    static let mutable version = 0
    /// Registers (or replaces) the rule for a bijector type and its subclasses without a rule of their own.
    /// <param name="bijectorType">A subclass of Bijector.</param>
    /// <param name="rule">The rule.</param>
    static member Register(bijectorType: Type, rule: HandRule) =
        if isNull bijectorType then nullArg "bijectorType"
        if isNull (box rule) then nullArg "rule"
        if not (typeof<Bijector>.IsAssignableFrom bijectorType) then
            invalidArg "bijectorType" (sprintf "HandRules.Register: %s is not a Bijector" bijectorType.Name)
        rules.[bijectorType] <- rule
        Threading.Interlocked.Increment(&version) |> ignore
    /// Registers a rule for bijectors of type 'B from two functions (see <see cref="HandRule.Create"/>).
    /// <param name="name">The rule's name.</param>
    /// <param name="refusal">Why it cannot run a part (null: it can); null for "always can".</param>
    /// <param name="make">The step for a part.</param>
    static member Register<'B when 'B :> Bijector>(name: string, refusal: Func<'B, Tensor, string>, make: Func<'B, HandPlanner, IHandStep>) =
        HandRules.Register(typeof<'B>, HandRule.Create<'B>(name, refusal, make))
    /// Removes the rule registered for exactly this type; whether there was one.
    /// <param name="bijectorType">The type.</param>
    static member Remove(bijectorType: Type) : bool =
        let removed, _ = rules.TryRemove bijectorType
        if removed then Threading.Interlocked.Increment(&version) |> ignore
        removed
    /// The rule for a bijector type (its own, else its nearest base type's); null when none.
    /// <param name="bijectorType">The type.</param>
    static member For(bijectorType: Type) : HandRule =
        let rec find (t: Type) =
            if isNull t || t = typeof<Bijector> then null
            else
                match rules.TryGetValue t with
                | true, r -> r
                | _ -> find t.BaseType
        find bijectorType
    /// Changes with every registration: plans made before are made again.
    static member internal Version = version
