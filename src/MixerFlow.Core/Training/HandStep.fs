namespace MixerFlow.Core

open System
open TorchSharp

/// One part's pass with a hand-written backward instead of one recorded by autograd, made by a
/// <see cref="HandRule"/> for one bijector and owned by a <see cref="HandGradientPlan"/>. The step
/// keeps whatever its backward needs (a tape it returns with y, and tensors it may keep from pass to
/// pass), so the bijector itself holds only its maths. A training step whose parts run such steps
/// records no autograd graph for them: no node per operation, no saved-tensor bookkeeping, and
/// backward formulas that fuse what autograd would do op by op. Each built-in step is checked
/// against autograd at random parameters (the checks' HandGradient kind).
type IHandStep =
    /// The forward map without autograd (the plan runs it under inference mode): returns y and a
    /// tape for <see cref="Backward"/>, and adds every sample's log|det dy/dx| in place to logDet.
    /// <param name="x">A batch whose rows are logDet's samples or a whole multiple of them (a
    /// lifted flow's rows: each sample's rows consecutive).</param>
    /// <param name="logDet">[samples], added to in place.</param>
    abstract Forward: x: Tensor * logDet: Tensor -> struct (Tensor * obj)
    /// The backward pass of <see cref="Forward"/>: given dL/dy and dL/d(log|det|) (the same for
    /// every sample), adds dL/d(parameter) to each parameter's <c>grad</c> and returns dL/dx, or null
    /// when <paramref name="inputGradient"/> is false. A tape serves one backward pass, taken before
    /// the step's next forward pass: a step may keep y, dL/dx and its activations in tensors that it
    /// overwrites from pass to pass, and refuse a spent tape. The y and dL/dx it hands out may be
    /// such tensors: read them, do not dispose them.
    /// <param name="tape">What Forward returned with y.</param>
    /// <param name="dy">dL/dy, y's shape (any layout).</param>
    /// <param name="logDetGradient">dL/d(log|det|) of each sample.</param>
    /// <param name="inputGradient">Whether dL/dx is wanted.</param>
    abstract Backward: tape: obj * dy: Tensor * logDetGradient: float * inputGradient: bool -> Tensor
    /// Frees the tensors the step keeps from one pass to the next (a later pass makes them again;
    /// tapes taken before are spent).
    abstract Release: unit -> unit

/// What a rule is handed while a plan is made: the batch, and a way to plan the parts inside the
/// part at hand (a lifting's inner bijector, a chain's parts).
[<Sealed>]
type HandPlanner internal (input: Tensor, compile: Func<Bijector, IHandStep>, note: Action<Bijector, string>) =
    /// The batch the plan is made for (the flow's input: its dtype and device).
    member _.Input = input
    /// The step for a part inside the one being planned: its rule's step, or an autograd island
    /// (the part's own forward pass under autograd) where no rule takes it. Noted in the plan's
    /// description either way.
    /// <param name="part">The inner bijector.</param>
    member _.Compile(part: Bijector) : IHandStep = compile.Invoke part
    /// Notes in the plan's description how a part that the rule runs itself is run.
    member internal _.Note(part: Bijector, how: string) = note.Invoke(part, how)

/// How to run one kind of bijector by hand: whether it can (<see cref="Refusal"/>) and the step
/// that does (<see cref="Make"/>). Rules are looked up by the bijector's type, then its base
/// types (<see cref="HandRules"/>); register one for a bijector of your own to keep it off an
/// autograd island.
/// <param name="name">The rule's name, for the plan's description.</param>
[<AbstractClass; AllowNullLiteral>]
type HandRule(name: string) =
    /// The rule's name, for the plan's description.
    member _.Name = name
    /// Why this rule cannot run the part by hand on batches like x (null: it can). Asked when a
    /// plan is made and again before each pass (a plan is made anew when an answer changes).
    /// <param name="part">The bijector.</param>
    /// <param name="x">The flow's batch (its dtype and device).</param>
    abstract Refusal: part: Bijector * x: Tensor -> string
    /// The rule's name for one part it runs, in a plan's description: <see cref="Name"/> unless
    /// the rule runs several kinds of part (a coupling: "affine coupling", "spline coupling").
    /// <param name="part">The bijector.</param>
    abstract NameOf: part: Bijector -> string
    default this.NameOf(_part: Bijector) = this.Name
    /// The step that runs the part (only asked where <see cref="Refusal"/> is null).
    /// <param name="part">The bijector.</param>
    /// <param name="planner">Plans the parts inside it, if any.</param>
    abstract Make: part: Bijector * planner: HandPlanner -> IHandStep
    /// A rule from two functions, for bijectors of type 'B.
    /// <param name="name">The rule's name.</param>
    /// <param name="refusal">Why it cannot run a part (null: it can); null for "always can".</param>
    /// <param name="make">The step for a part.</param>
    static member Create<'B when 'B :> Bijector>(name: string, refusal: Func<'B, Tensor, string>, make: Func<'B, HandPlanner, IHandStep>) : HandRule =
        if isNull (box make) then nullArg "make"
        { new HandRule(name) with
            member _.Refusal(part, x) = if isNull (box refusal) then null else refusal.Invoke(part :?> 'B, x)
            member _.Make(part, planner) = make.Invoke(part :?> 'B, planner) }
