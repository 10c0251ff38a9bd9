namespace MixerFlow.Checks

open System
open System.IO
open System.Runtime.InteropServices
open TorchSharp
open FsCheck
open FsCheck.FSharp
open MixerFlow.Core
open MixerFlow.Core.Ops
open MixerFlow.Checks.Format
open MixerFlow.Checks.CheckEvaluations

/// Property-based checks of bijectors, driven by FsCheck (generation, shrinking, replay): the F#
/// API (curried, camelCase). C# callers use BijectorChecks.
[<RequireQualifiedAccess>]
module PropertyChecks =
    /// Every bijector in b (b itself first, then its parts, depth first).
    let allBijectors (b: Bijector) : Bijector list = CheckEvaluations.allBijectors b
    /// The bijectors in b that hold no other bijector.
    let leafBijectors (b: Bijector) : Bijector list = CheckEvaluations.leafBijectors b
    /// The parameter noise's standard deviation for b (see NoiseScaling).
    let noiseSigma (o: CheckOptions) (b: Bijector) = CheckEvaluations.noiseSigma o b
    /// A built and randomised instance of the family for a case.
    let instantiate (spec: BijectorSpec) (case: CheckCase) (o: CheckOptions) (initSeed: int) : Bijector =
        CheckEvaluations.instantiate spec case o initSeed
    /// The Jacobian of f at inp (float64 autograd, one output row at a time).
    let jacobian (f: Tensor -> Tensor) (inp: Tensor) = CheckEvaluations.jacobian f inp
    let internal evaluator (kind: CheckKind) : BijectorSpec -> CheckCase -> CheckOptions -> Bijector -> Evaluation =
        match kind with
        | CheckKind.Inverse -> roundTrip
        | CheckKind.LogDet -> logDet
        | CheckKind.InverseLogDet -> inverseLogDet
        | CheckKind.Chain -> chain
        | CheckKind.Edges -> edges
        | CheckKind.Independence -> independence
        | CheckKind.Structure -> structure
        | CheckKind.Gradients -> gradients
        | CheckKind.SaveLoad -> saveLoad
        | CheckKind.HandGradient -> HandGradientChecks.evaluate
        | k -> invalidArg "kind" (sprintf "unknown check %A" k)

    let tolerance (kind: CheckKind) (dtype: torch.ScalarType) =
        match kind with
        | CheckKind.Inverse | CheckKind.Edges -> Tolerances.roundTrip dtype
        | CheckKind.LogDet -> Tolerances.jacobian
        | CheckKind.InverseLogDet | CheckKind.Chain -> Tolerances.logDet dtype
        | CheckKind.Independence -> Tolerances.independence dtype
        | CheckKind.Structure -> Tolerances.structure
        | CheckKind.HandGradient -> if dtype = torch.float64 then 1e-9 else 1e-3
        | _ -> 0.0

    /// Cases: seeds and batch sizes, shrinking toward small seeds and batch 2.
    let caseArbitrary =
        let gen =
            gen {
                let! seed = Gen.choose (0, 999_999)
                let! batch = Gen.choose (2, 5)
                return { Seed = seed; Batch = batch }
            }
        let shrink (c: CheckCase) =
            seq {
                if c.Batch > 2 then yield { c with Batch = 2 }
                if c.Seed > 0 then
                    yield { c with Seed = 0 }
                    yield { c with Seed = c.Seed / 2 }
            }
        Arb.fromGenShrink (gen, shrink)

    /// Whether the family's forward log-det is a variational bound's term (BijectorTraits.VariationalLogDet).
    let private variationalLogDet (probe: unit -> Bijector) =
        use _ = torch.NewDisposeScope()
        (probe ()).Traits.VariationalLogDet

    /// Whether a check applies to `probe()` (an instance of the family) at a dtype, and why not.
    let private applicableTo (spec: BijectorSpec) (probe: unit -> Bijector) (kind: CheckKind) (o: CheckOptions) =
        match kind with
        | CheckKind.LogDet when o.DType <> torch.float64 -> Some "the Jacobian oracle runs in float64 only"
        | CheckKind.LogDet | CheckKind.InverseLogDet when variationalLogDet probe ->
            Some "its forward log-det is a variational bound's term (-log q of its noise), not log|det J|: its noise flow is checked on its own"
        | CheckKind.Edges when isNull (box spec.EdgeInputs) && isNull (box spec.EdgeOutputs) -> Some "no edge cases declared"
        | CheckKind.HandGradient ->
            // Whether a hand-written rule runs the instance (or a part of it) at this dtype.
            use _ = torch.NewDisposeScope()
            let b = probe ()
            HandGradientChecks.refusal b (sample spec b 2L o) |> Option.ofObj
        | CheckKind.Structure ->
            // Whether the family declares a Jacobian structure: look at one instance.
            use _ = torch.NewDisposeScope()
            match box (probe ()) with
            | :? IJacobianStructure -> None
            | _ -> Some "no Jacobian structure declared"
        | _ -> None

    /// Whether a check applies to a bijector family at a dtype, and why not.
    let applicability (spec: BijectorSpec) (kind: CheckKind) (o: CheckOptions) =
        applicableTo spec (fun () -> spec.Build.Invoke(Random 0)) kind o

    let private dtypeName (o: CheckOptions) = (string o.DType).ToLowerInvariant()

    /// One check as an FsCheck property over `o.Cases` random cases (replayable from `o.Seed`).
    /// `provide case` gives the bijector to check (built or given), `release case b` undoes what
    /// the check did to it; both run inside the case's dispose scope.
    let private property (spec: BijectorSpec) (kind: CheckKind) (o: CheckOptions)
                         (provide: CheckCase -> Bijector) (release: Bijector -> unit) : CheckResult =
        let result passed applicable worst cases msg =
            { Bijector = spec.Name; Check = kind; DType = dtypeName o; Applicable = applicable; Passed = passed
              WorstError = worst; Tolerance = tolerance kind o.DType; Cases = cases; Message = msg }
        let evaluate = evaluator kind
        let mutable worst = 0.0
        let mutable cases = 0
        let mutable lastDetail = ""
        let property =
            Prop.forAll caseArbitrary (fun case ->
                use _ = torch.NewDisposeScope()
                let shapes = ref "(not built)"
                let e =
                    try
                        let b = provide case
                        try
                            shapes.Value <- sprintf "%s -> %s" (showShape b.InputShape) (showShape b.OutputShape)
                            evaluate spec case o b
                        finally release b
                    with ex -> fail (sprintf "threw %s: %s" (ex.GetType().Name) ex.Message)
                worst <- max worst e.Error
                cases <- cases + 1
                let detail = sprintf "%s %s, %s, %s: %s" spec.Name shapes.Value (string case) (dtypeName o) e.Detail
                lastDetail <- detail
                e.Passed |> Prop.label detail)
        let config =
            Config.QuickThrowOnFailure
                .WithMaxTest(o.Cases)
                .WithQuietOnSuccess(true)
                .WithReplay(Some { Rnd = FsCheck.Rnd(uint64 o.Seed, 0x9E3779B97F4A7C15UL); Size = None })
        let saved = torch.get_default_dtype()
        try
            try
                Check.One(config, property)
                result true true worst cases lastDetail
            with ex -> result false true worst cases ex.Message
        finally torch.set_default_dtype(saved)

    let private notApplicable (spec: BijectorSpec) (kind: CheckKind) (o: CheckOptions) (why: string) =
        { Bijector = spec.Name; Check = kind; DType = dtypeName o; Applicable = false; Passed = true
          WorstError = 0.0; Tolerance = tolerance kind o.DType; Cases = 0; Message = why }

    let private allKinds = Enum.GetValues(typeof<CheckKind>) |> Seq.cast<CheckKind> |> Seq.toList

    /// Runs one check as an FsCheck property over `o.Cases` random cases (replayable from
    /// `o.Seed`), each on a freshly built and randomised instance (see instantiate). A failure's
    /// message holds FsCheck's original and shrunk counterexample and the label: shapes, worst
    /// element, both numbers.
    let run (spec: BijectorSpec) (kind: CheckKind) (o: CheckOptions) : CheckResult =
        match applicability spec kind o with
        | Some why -> notApplicable spec kind o why
        | None -> property spec kind o (fun case -> instantiate spec case o case.Seed) ignore

    /// Every check on one family.
    let runAll (spec: BijectorSpec) (o: CheckOptions) : CheckResult list =
        [ for k in allKinds -> run spec k o ]

    /// Every applicable check on one given instance (a trained flow, say), as it is: not rebuilt,
    /// not re-noised. The cases vary the seed of the input sampling (`spec.SampleInput`) and the
    /// batch size, and shrink over both. `spec.Build`, when `canRebuild`, makes a fresh instance
    /// of the same architecture for the save/load check; otherwise that check is reported as not
    /// applicable. The instance is converted to `o.DType`/`o.Device` for the run if it is not
    /// already there and converted back afterwards (float32 -> float64 -> float32 is exact; the
    /// parameter objects are replaced by the conversion, as with any `to`). Its parameters,
    /// buffers and training mode are restored after every case, so checks that train (the
    /// gradient check runs in training mode: batch-norm statistics) leave no trace; gradients
    /// are zeroed.
    let runAllOn (spec: BijectorSpec) (canRebuild: bool) (b: Bijector) (o: CheckOptions) : CheckResult list =
        let firstFloat = b.parameters() |> Seq.tryFind (fun p -> p.is_floating_point())
        let original = firstFloat |> Option.map (fun p -> p.dtype, p.device)
        let convert = match original with Some (dt, dev) -> dt <> o.DType || dev.ToString() <> o.Device.ToString() | None -> true
        if convert then moveTo o.DType o.Device b
        let wasTraining = b.training
        try
            [ for kind in allKinds ->
                let why =
                    match kind with
                    | CheckKind.SaveLoad when not canRebuild -> Some "no factory for a fresh instance to load into was given"
                    | _ -> applicableTo spec (fun () -> b) kind o
                match why with
                | Some why -> notApplicable spec kind o why
                | None ->
                    let mutable saved = []
                    let provide (case: CheckCase) =
                        saved <-
                            [ for struct (_, p) in b.named_parameters() -> (p :> Tensor), p.detach().clone() ]
                            @ [ for struct (_, t) in b.named_buffers() -> t, t.detach().clone() ]
                        // The cases' seeds drive the input sampling (and stochastic bijectors).
                        torch.manual_seed(int64 case.Seed) |> ignore
                        b.eval()
                        b
                    let release (b: Bijector) =
                        using (torch.no_grad()) (fun _ -> for t, copy in saved do t.copy_(copy) |> ignore)
                        saved <- []
                        b.zero_grad()
                        b.train(wasTraining)
                    property spec kind o provide release ]
        finally
            match original with
            | Some (dt, dev) when convert -> moveTo dt dev b
            | _ -> ()

/// C#-friendly entry point to the checks (PascalCase, tupled, Func, IReadOnlyList).
[<AbstractClass; Sealed>]
type BijectorChecks =
    static member private Throw(failed: CheckResult list) =
        if not failed.IsEmpty then
            failwith (String.Join("\n\n", failed |> List.map (fun r -> sprintf "(%c) %A: %s" r.Letter r.Check r.Message)))

    /// One check on freshly built, randomised instances of a family.
    static member Run(spec: BijectorSpec, check: CheckKind, options: CheckOptions) = PropertyChecks.run spec check options
    /// Every check on freshly built, randomised instances of a family (inapplicable ones are
    /// reported with Applicable = false and the reason).
    static member RunAll(spec: BijectorSpec, options: CheckOptions) : Collections.Generic.IReadOnlyList<CheckResult> =
        ResizeArray(PropertyChecks.runAll spec options) :> _
    /// Runs every check and throws with every failure's message if any fails.
    static member AssertAll(spec: BijectorSpec, options: CheckOptions) =
        BijectorChecks.Throw(PropertyChecks.runAll spec options |> List.filter (fun r -> not r.Passed))
    /// Whether a check applies to a family at the options' dtype: null if it does, else why not.
    static member Applicability(spec: BijectorSpec, check: CheckKind, options: CheckOptions) : string =
        PropertyChecks.applicability spec check options |> Option.toObj

    /// Every applicable check on one given (for example trained) instance, without rebuilding or
    /// re-noising it. `sampleInput n` draws n inputs in the domain (default: standard normal of
    /// InputShape); `freshInstance` builds an instance of the same architecture for the
    /// save/load check, which is skipped (not applicable, with the reason) without it. The
    /// instance's parameters, buffers and mode are left as they were (see PropertyChecks.runAllOn).
    static member RunOn(bijector: Bijector, options: CheckOptions,
                        [<Optional; DefaultParameterValue(null: Func<int64, Tensor>)>] sampleInput: Func<int64, Tensor>,
                        [<Optional; DefaultParameterValue(null: Func<Bijector>)>] freshInstance: Func<Bijector>)
                        : Collections.Generic.IReadOnlyList<CheckResult> =
        if isNull (box bijector) then nullArg "bijector"
        let sampler =
            if isNull (box sampleInput) then null
            else Func<Bijector, int64, Tensor>(fun _ n -> sampleInput.Invoke n)
        let canRebuild = not (isNull (box freshInstance))
        let build = Func<Random, Bijector>(fun _ -> if canRebuild then freshInstance.Invoke() else invalidOp "no fresh instance factory")
        let spec = BijectorSpec(bijector.Name, build, sampler)
        ResizeArray(PropertyChecks.runAllOn spec canRebuild bijector options) :> _
    /// RunOn, throwing with every failure's message if any fails.
    static member AssertOn(bijector: Bijector, options: CheckOptions,
                           [<Optional; DefaultParameterValue(null: Func<int64, Tensor>)>] sampleInput: Func<int64, Tensor>,
                           [<Optional; DefaultParameterValue(null: Func<Bijector>)>] freshInstance: Func<Bijector>) =
        BijectorChecks.Throw(
            BijectorChecks.RunOn(bijector, options, sampleInput, freshInstance) |> Seq.filter (fun r -> not r.Passed) |> Seq.toList)
