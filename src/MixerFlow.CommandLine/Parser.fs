/// Parsing the `mixerflow` command line into a verb record (Commands.fs), or help / an error.
namespace MixerFlow.CommandLine

open System
open Argu
open MixerFlow.Core
open MixerFlow.Host.Models
open MixerFlow.Host.Training

/// The outcome of parsing: a command, or help / an error with the exit code.
[<Sealed; AllowNullLiteral>]
type ParsedCommand(command: ICommand, message: string, exitCode: int, verbose: bool) =
    /// A command (null when parsing stopped), the help or error text, the exit code.
    new(command, message, exitCode) = ParsedCommand(command, message, exitCode, false)
    /// --verbose was given: unexpected errors print their stack trace.
    member _.Verbose = verbose
    /// The command, or null when parsing stopped (help or error); dispatch with
    /// `Command.Accept(handler)`.
    member _.Command : ICommand = command
    /// Help text or error message to print when Command is null.
    member _.Message = message
    /// 0 after --help, 2 after a bad argument.
    member _.ExitCode = exitCode
    /// Parsing stopped at a bad argument (not at --help).
    member _.IsError = isNull command && exitCode <> 0

/// Parses `mixerflow`'s arguments into a <see cref="ParsedCommand"/>: a verb record, or the help or
/// error text with its exit code (0 for help, 2 for a usage error).
[<AbstractClass; Sealed>]
type CommandLine =
    static member private Parser = ArgumentParser.Create<MainArgs>(programName = "mixerflow")

    static member Usage() = CommandLine.Parser.PrintUsage()

    /// Argu post-processing: a failure becomes a parse error naming the argument.
    static member private Positive (v: int) = if v <= 0 then failwithf "must be a positive integer, got %d" v else v
    static member private KnownPreset (name: string) =
        if Presets.All.ContainsKey name then name
        else failwithf "unknown preset '%s'; known presets: %s" name (Text.presets ())

    /// `score`'s arguments: temperatures comma- or space-separated.
    static member private ScoreCommandOf(s: ParseResults<ScoreArgs>) : ScoreCommand =
        let temps =
            s.TryPostProcessResult(ScoreArgs.Temperature, fun ts ->
                let parts = ts |> List.collect (fun t -> t.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries) |> List.ofArray)
                let parse (t: string) =
                    match Double.TryParse(t, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
                    | true, v when v >= 0.0 && v <= 10.0 -> v
                    | _ -> failwithf "needs numbers in [0, 10], got '%s'" t
                if parts.IsEmpty then failwith "needs at least one temperature" else parts |> List.map parse)
            |> Option.defaultValue [ 1.0 ]
            |> List.toArray
        { ScoreCommand.Checkpoint = s.GetResult ScoreArgs.Checkpoint
          Data = s.TryGetResult ScoreArgs.Data |> Option.toObj
          Samples =
            s.TryPostProcessResult(ScoreArgs.Samples, fun n ->
                if n < 4 || n > 100000 then failwithf "must lie in 4..100000, got %d" n else n)
            |> Option.defaultValue 0
          Temperatures = temps
          Seed = s.GetResult(ScoreArgs.Seed, defaultValue = 0)
          Json = s.TryGetResult ScoreArgs.Json |> Option.toObj }

    /// `train`'s arguments: the library's training settings, with the names of those typed (checked by a resume).
    static member private TrainCommandOf(t: ParseResults<TrainArgs>) : TrainCommand =
        let d = TrainingSettings()
        if t.Contains TrainArgs.Epochs && t.Contains TrainArgs.Steps then
            t.Raise("train takes --epochs or --steps, not both")
        if t.Contains TrainArgs.Epochs && t.Contains TrainArgs.Seconds then
            t.Raise("train takes --epochs or --seconds, not both (--seconds with --steps stops at whichever comes first)")
        let preset = t.TryPostProcessResult(TrainArgs.Preset, CommandLine.KnownPreset)
        let config = t.TryGetResult TrainArgs.Config
        let sets = t.GetResults TrainArgs.Override
        let resume = t.TryGetResult TrainArgs.Resume
        if preset.IsSome && config.IsSome then t.Raise("train takes --preset NAME or --config FILE, not both")
        if resume.IsSome && (config.IsSome || not sets.IsEmpty) then
            t.Raise("--config and --set do not apply to --resume: the run's checkpoint carries its model")
        if t.Contains TrainArgs.Extend_Steps && resume.IsNone then
            t.Raise("--extend-steps only extends a run continued with --resume DIR")
        // The settings typed (by TrainingSettings property name): with --resume only these are
        // checked against the run's saved settings.json; everything else comes from that file.
        let given =
            [ t.Contains TrainArgs.Data, "Data"; t.Contains TrainArgs.Epochs, "Epochs"; t.Contains TrainArgs.Steps, "Steps"
              t.Contains TrainArgs.Batch_Size, "BatchSize"; t.Contains TrainArgs.Lr, "LearningRate"; t.Contains TrainArgs.Seed, "Seed"
              t.Contains TrainArgs.Checkpoint_Every, "CheckpointEvery"; t.Contains TrainArgs.Seconds, "MaxSeconds"
              t.Contains TrainArgs.Permute_Pixels, "PixelPermutationSeed"; t.Contains TrainArgs.Validation_Images, "ValidationImages"
              t.Contains TrainArgs.Ema_Decay, "EmaDecay" ]
            |> List.filter fst
            |> List.map snd
        let givenSet : Collections.Generic.IReadOnlySet<string> =
            if resume.IsSome then Collections.Generic.HashSet<string>(given) else null
        { Settings =
            TrainingSettings(
                Model = (if resume.IsSome then Presets.Get(defaultArg preset Presets.Default)
                         else ConfigOverrides.Resolve(Option.toObj preset, Option.toObj config, sets)),
                Data = (t.TryGetResult TrainArgs.Data |> Option.toObj),
                RunFolder = ((match resume with Some r -> r | None -> t.TryGetResult TrainArgs.Out |> Option.toObj)),
                Resume = (resume.IsSome),
                Epochs = (t.TryPostProcessResult(TrainArgs.Epochs, CommandLine.Positive) |> Option.defaultValue d.Epochs),
                Steps = (t.TryPostProcessResult(TrainArgs.Steps, CommandLine.Positive) |> Option.map int64 |> Option.defaultValue d.Steps),
                BatchSize = (t.TryPostProcessResult(TrainArgs.Batch_Size, CommandLine.Positive) |> Option.defaultValue d.BatchSize),
                LearningRate = (
                    t.TryPostProcessResult(TrainArgs.Lr, fun v -> if v > 0.0 && v < 1.0 then v else failwithf "must lie in (0, 1), got %g" v)
                    |> Option.defaultValue d.LearningRate),
                Seed = (t.GetResult(TrainArgs.Seed, defaultValue = d.Seed)),
                Device = (Text.lower (t.GetResult(TrainArgs.Device, defaultValue = Device.Cpu))),
                Threads = (t.TryPostProcessResult(TrainArgs.Threads, CommandLine.Positive) |> Option.defaultValue d.Threads),
                CheckpointEvery = (t.TryPostProcessResult(TrainArgs.Checkpoint_Every, CommandLine.Positive) |> Option.defaultValue d.CheckpointEvery),
                MaxSeconds = (
                    t.TryPostProcessResult(TrainArgs.Seconds, fun v ->
                        if v > 0.0 && v <= 1e8 then v else failwithf "must be a number of seconds in (0, 100000000], got %g" v)
                    |> Option.defaultValue d.MaxSeconds),
                PixelPermutationSeed = (t.TryPostProcessResult(TrainArgs.Permute_Pixels, CommandLine.Positive) |> Option.defaultValue d.PixelPermutationSeed),
                ValidationImages = (
                    t.TryPostProcessResult(TrainArgs.Validation_Images, fun n -> if n >= 0 then n else failwithf "must be a number of images >= 0, got %d" n)
                    |> Option.defaultValue d.ValidationImages),
                EmaDecay = (
                    t.TryPostProcessResult(TrainArgs.Ema_Decay, fun v -> if v >= 0.0 && v < 1.0 then v else failwithf "must lie in [0, 1) (0: no average), got %g" v)
                    |> Option.defaultValue d.EmaDecay),
                ExtendSteps = (t.TryPostProcessResult(TrainArgs.Extend_Steps, CommandLine.Positive) |> Option.map int64 |> Option.defaultValue 0L),
                Given = givenSet) }

    static member private ToCommand(r: ParseResults<MainArgs>) : ICommand =
        match r.GetSubCommand() with
        | MainArgs.Train t -> upcast CommandLine.TrainCommandOf t
        | MainArgs.Eval e ->
            upcast
                { EvalCommand.Checkpoint = e.GetResult EvalArgs.Checkpoint
                  Data = e.TryGetResult EvalArgs.Data |> Option.toObj
                  Split = e.GetResult(EvalArgs.Split, defaultValue = Split.Test)
                  BatchSize = e.TryPostProcessResult(EvalArgs.Batch_Size, CommandLine.Positive) |> Option.defaultValue Defaults.EvaluationBatchSize
                  Device = e.GetResult(EvalArgs.Device, defaultValue = Device.Cpu) }
        | MainArgs.Sample s ->
            let temps =
                s.TryPostProcessResult(SampleArgs.Temperature, fun ts ->
                    if ts.IsEmpty || ts |> List.exists (fun t -> not (t >= 0.0 && t <= 10.0)) then failwithf "needs values in [0, 10], got %s" (String.Join(" ", ts))
                    else ts)
                |> Option.defaultValue [ Defaults.SampleTemperature ]
                |> List.toArray
            upcast
                { SampleCommand.Checkpoint = s.GetResult SampleArgs.Checkpoint
                  Count =
                    s.TryPostProcessResult(SampleArgs.Count, fun n ->
                        if n < 1 || n > 10000 then failwithf "must lie in 1..10000 (1024 images per PNG grid), got %d" n else n)
                    |> Option.defaultValue Defaults.SampleCount
                  Temperatures = temps
                  Out = s.GetResult(SampleArgs.Out, defaultValue = "samples.png")
                  Seed = s.GetResult(SampleArgs.Seed, defaultValue = Defaults.SampleSeed) }
        | MainArgs.Score s -> upcast CommandLine.ScoreCommandOf s
        | MainArgs.Embed e ->
            upcast { EmbedCommand.Checkpoint = e.GetResult EmbedArgs.Checkpoint; Data = e.TryGetResult EmbedArgs.Data |> Option.toObj; Out = e.GetResult EmbedArgs.Out }
        | MainArgs.Check c ->
            upcast
                { CheckCommand.Bijector = c.TryGetResult CheckArgs.Bijector |> Option.toObj
                  Cases = c.TryPostProcessResult(CheckArgs.Cases, CommandLine.Positive) |> Option.defaultValue Defaults.CheckCases
                  Precision = c.GetResult(CheckArgs.Dtype, defaultValue = Precision.Both)
                  Seed = c.GetResult(CheckArgs.Seed, defaultValue = Defaults.CheckSeed) }
        | MainArgs.Info i ->
            let preset = i.TryPostProcessResult(InfoArgs.Preset, CommandLine.KnownPreset)
            let sets = i.GetResults InfoArgs.Override
            let timeStep = i.Contains InfoArgs.Time_Step
            match preset, i.TryGetResult InfoArgs.Checkpoint, i.TryGetResult InfoArgs.Config with
            | Some p, None, None ->
                upcast { InfoCommand.Preset = p; Checkpoint = null; TimeStep = timeStep; Model = ConfigOverrides.Resolve(p, null, sets) }
            | None, Some c, None ->
                upcast { InfoCommand.Preset = null; Checkpoint = c; TimeStep = timeStep; Model = ConfigOverrides.Apply(MixerFlow.Host.Models.Checkpoint.ReadConfig c, sets) }
            | None, None, Some f ->
                upcast { InfoCommand.Preset = null; Checkpoint = null; TimeStep = timeStep; Model = ConfigOverrides.Resolve(null, f, sets) }
            | _ -> i.Raise("info needs exactly one of --preset NAME, --config FILE and --checkpoint FILE")
        | MainArgs.Export x ->
            upcast { ExportCommand.Checkpoint = x.GetResult ExportArgs.Checkpoint; Out = x.GetResult ExportArgs.Out }
        | MainArgs.Interpolate p ->
            upcast
                { InterpolateCommand.Checkpoint = p.GetResult InterpolateArgs.Checkpoint
                  From = p.GetResult InterpolateArgs.From
                  To = p.GetResult InterpolateArgs.To
                  Steps =
                    p.TryPostProcessResult(InterpolateArgs.Steps, fun n ->
                        if n < 2 || n > 64 then failwithf "must lie in 2..64, got %d" n else n)
                    |> Option.defaultValue Defaults.InterpolationSteps
                  Spherical = not (p.Contains InterpolateArgs.Linear)
                  Out = p.GetResult(InterpolateArgs.Out, defaultValue = "interpolation.png") }
        | MainArgs.Experiment e ->
            let spec = e.GetResult ExperimentArgs.Spec
            upcast
                { ExperimentCommand.Spec = spec
                  Out = e.GetResult(ExperimentArgs.Out, defaultValue = IO.Path.Combine("runs", IO.Path.GetFileNameWithoutExtension spec)) }
        | MainArgs.Verbose -> r.Raise("--verbose goes before a verb: mixerflow --verbose train ...")

    /// The verbs' names as typed (train, eval, ...).
    static member private Verbs =
        Reflection.FSharpType.GetUnionCases typeof<MainArgs>
        |> Array.filter (fun c -> c.GetFields().Length = 1)
        |> Array.map (fun c -> c.Name.ToLowerInvariant())

    /// An Argu error as one line: its first line (Argu follows it with the usage), without Argu's
    /// "ERROR" prefix, and where the full usage is: `mixerflow VERB --help` for the verb given.
    static member private ErrorLine(argv: string[], message: string) =
        let first =
            message.Split([| '\r'; '\n' |], StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries)
            |> Array.tryHead |> Option.defaultValue "bad arguments"
        let text = if first.StartsWith "ERROR" then first.Substring(5).TrimStart(':', ' ') else first
        let text = text.TrimEnd('.')
        let verb = argv |> Array.tryFind (fun a -> Array.contains a CommandLine.Verbs) |> Option.map (fun v -> v + " ")
        sprintf "error: %s (see mixerflow %s--help)" text (defaultArg verb "")

    /// Parses the arguments; never throws for bad input. An error is one line (exit code 2);
    /// --help gives the full usage (exit code 0).
    static member Parse(argv: string[]) : ParsedCommand =
        try
            let r = CommandLine.Parser.ParseCommandLine(argv, raiseOnUsage = true)
            ParsedCommand(CommandLine.ToCommand r, null, 0, r.Contains MainArgs.Verbose)
        with
        | :? ArguParseException as e when e.ErrorCode = ErrorCode.HelpText -> ParsedCommand(null, e.Message, 0)
        | :? ArguParseException as e -> ParsedCommand(null, CommandLine.ErrorLine(argv, e.Message), 2)
        // A configuration that cannot be resolved (--config file, --set key=value): one line.
        | :? MixerFlow.Host.UserError as e -> ParsedCommand(null, "error: " + e.Message, 2)
        | :? System.IO.IOException as e -> ParsedCommand(null, "error: " + e.Message, 2)
        | :? UnauthorizedAccessException as e -> ParsedCommand(null, "error: " + e.Message, 2)
