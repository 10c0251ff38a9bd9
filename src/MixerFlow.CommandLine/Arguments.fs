/// The `mixerflow` command line as data: Argu argument unions (which also write `--help`),
/// parsed here into a `Command` union of option records that the C# executable dispatches on.
/// Defaults and preset names come from their owners in MixerFlow.Host (TrainingSettings, Presets).
namespace MixerFlow.CommandLine

open System
open Argu
open MixerFlow.Core
open MixerFlow.Host.Models
open MixerFlow.Host.Training

/// Where LibTorch runs.
type Device =
    | Cpu = 0
    | Cuda = 1

/// Which split `eval` scores.
type Split =
    | Test = 0
    | Train = 1

/// Which dtypes `check` runs.
type Precision =
    | Float64 = 0
    | Float32 = 1
    | Both = 2

module internal Text =
    let presets () = String.Join(", ", Presets.Names)
    let lower (e: 'E) = (string e).ToLowerInvariant()
    let configUsage =
        "a model configuration: a JSON file as `info` prints it and run folders keep it (config.json), a checkpoint (.ckpt), or a preset name."
    /// The data formats as the registry lists them (MixerFlow.Host.Data.DataFormats).
    let dataUsage =
        "a data file or folder: " + MixerFlow.Host.Data.DataFormats.Summary + " (default: the embedded Fashion-MNIST test split)."
    let setUsage =
        "change one configuration field, repeatable: --set patches=bands --set shift=false --set channelFlow=spline --set hiddenWidth=64 (keys as in the JSON, case-insensitive; enums by name)."

type CheckArgs =
    | [<AltCommandLine("-b")>] Bijector of name: string
    | Cases of count: int
    | Dtype of Precision
    | Seed of seed: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Bijector _ -> "check only this built-in bijector (default: all); names as listed by `check`."
            | Cases _ -> sprintf "random cases per property (default %d)." Defaults.CheckCases
            | Dtype _ -> "float64, float32 or both (default both)."
            | Seed _ -> sprintf "seed that derandomises the FsCheck runs (default %d)." Defaults.CheckSeed

type InfoArgs =
    | Preset of name: string
    | Checkpoint of file: string
    | Config of file: string
    | [<CustomCommandLine("--set")>] Override of ``key=value``: string
    | Time_Step
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Time_Step -> "also time training steps (forward, backward, Adam) at batch 64 on random images."
            | Preset _ -> "a model preset: " + Text.presets () + "."
            | Checkpoint _ -> "a checkpoint file written by `train`."
            | Config _ -> Text.configUsage
            | Override _ -> Text.setUsage

type TrainArgs =
    | Preset of name: string
    | Config of file: string
    | [<CustomCommandLine("--set")>] Override of ``key=value``: string
    | Data of dir: string
    | Out of dir: string
    | Epochs of count: int
    | Steps of count: int
    | Batch_Size of size: int
    | Lr of rate: float
    | Seed of seed: int
    | Device of Device
    | Threads of count: int
    | Resume of dir: string
    | Checkpoint_Every of steps: int
    | Extend_Steps of steps: int
    | Seconds of seconds: float
    | Permute_Pixels of seed: int
    interface IArgParserTemplate with
        member a.Usage =
            let d = TrainingSettings()
            match a with
            | Preset _ -> sprintf "model preset (default %s): %s." Presets.Default (Text.presets ())
            | Config _ -> Text.configUsage + " Instead of --preset."
            | Override _ -> Text.setUsage
            | Data _ -> Text.dataUsage
            | Out _ -> "run folder (default runs/<preset>-<time>)."
            | Epochs _ -> sprintf "number of passes over the training images (default %d)." d.Epochs
            | Steps _ -> "number of optimiser steps (instead of --epochs)."
            | Batch_Size _ -> sprintf "images per step (default %d)." d.BatchSize
            | Lr _ -> sprintf "peak learning rate of Adam (default %g), reached after %d warmup steps and decayed by a cosine." d.LearningRate d.WarmupSteps
            | Seed _ -> sprintf "seed of initialisation, data order and dequantisation noise (default %d)." d.Seed
            | Device _ -> "cpu or cuda (default cpu)."
            | Threads _ -> "CPU threads for LibTorch (default: LibTorch's choice, all cores)."
            | Resume _ -> "continue the run in this folder from its last checkpoint (optimiser state and step included) under its saved settings.json; options given that contradict those are refused, a finished run is reported, not retrained."
            | Extend_Steps _ -> "with --resume: train this many steps beyond the run's saved total; the cosine learning-rate schedule then follows the new total."
            | Checkpoint_Every _ -> sprintf "steps between checkpoints (default %d)." d.CheckpointEvery
            | Seconds _ -> "time budget: train until this many seconds of training steps are spent (evaluations, checkpoints and pictures not counted), then evaluate and finish; with --steps, whichever comes first. The cosine learning-rate schedule follows the share of the budget spent. Instead of --epochs."
            | Permute_Pixels _ -> "shuffle the images' pixel positions by one fixed permutation drawn with this seed (>= 1), the same for every image and channel, in training and evaluation; eval, sample and embed on the run's checkpoints apply it too, and pictures are shown un-permuted."

type EvalArgs =
    | [<Mandatory>] Checkpoint of file: string
    | Data of dir: string
    | Split of Split
    | Batch_Size of size: int
    | Device of Device
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "checkpoint file written by train."
            | Data _ -> Text.dataUsage
            | Split _ -> "test (held-out, default) or train."
            | Batch_Size _ -> sprintf "images per batch (default %d)." Defaults.EvaluationBatchSize
            | Device _ -> "cpu or cuda (default cpu)."

type SampleArgs =
    | [<Mandatory>] Checkpoint of file: string
    | Count of n: int
    | Temperature of t: float list
    | Out of file: string
    | Seed of seed: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "checkpoint file written by train."
            | Count _ -> sprintf "samples per temperature, at most 10000 (default %d); drawn %d at a time, 1024 per PNG grid (numbered files beyond)." Defaults.SampleCount Defaults.SampleBatchSize
            | Temperature _ -> sprintf "one or more temperatures in [0, 10] (default %g)." Defaults.SampleTemperature
            | Out _ -> "PNG file (default samples.png); one file per temperature when several are given."
            | Seed _ -> sprintf "seed of the base samples (default %d)." Defaults.SampleSeed

type ScoreArgs =
    | [<Mandatory>] Checkpoint of file: string
    | Data of dir: string
    | Samples of n: int
    | Temperature of t: string list
    | Seed of seed: int
    | Json of file: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "checkpoint file written by train."
            | Data _ -> Text.dataUsage + " Needs labels (the feature classifier trains on them)."
            | Samples _ -> "samples per temperature, 4..100000 (default 10000, or the test split's size where that is smaller)."
            | Temperature _ -> "one or more temperatures in [0, 10], comma- or space-separated (default 1)."
            | Seed _ -> "seed of the samples (default 0)."
            | Json _ -> "also write the scores to this JSON file."

type EmbedArgs =
    | [<Mandatory>] Checkpoint of file: string
    | Data of dir: string
    | [<Mandatory>] Out of file: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "checkpoint file written by train."
            | Data _ -> Text.dataUsage
            | Out _ -> "CSV file: one row per image, the label (if any) and the latent."

type ExportArgs =
    | [<Mandatory>] Checkpoint of file: string
    | [<Mandatory>] Out of file: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "checkpoint file written by train."
            | Out _ -> "the .safetensors file to write: every parameter and buffer under its state_dict name, the configuration JSON in its metadata (what benchmarks/mirror/mixerflow_mirror.py loads)."

type InterpolateArgs =
    | [<Mandatory>] Checkpoint of file: string
    | [<Mandatory>] From of image: string
    | [<Mandatory>] To of image: string
    | Steps of n: int
    | Linear
    | Out of file: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "checkpoint file written by train."
            | From _ -> "the first image (PNG or JPEG; scaled to cover the model's size and centre-cropped)."
            | To _ -> "the last image."
            | Steps _ -> sprintf "images on the path, the two ends included, 2..64 (default %d)." Defaults.InterpolationSteps
            | Linear -> "interpolate the latents linearly (default: spherically, keeping their norm)."
            | Out _ -> "PNG file for the strip (default interpolation.png)."
type ExperimentArgs =
    | [<MainCommand; Mandatory; Unique>] Spec of file: string
    | Out of dir: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Spec _ -> "the experiment spec (JSON): runs (name, preset or config, set, seeds) and the shared budget (steps, batchSize, learningRate, data); see experiments/README.md."
            | Out _ -> "results folder (default runs/<spec file name>); running again resumes: finished runs are not retrained."

[<RequireSubcommand>]
type MainArgs =
    | [<CliPrefix(CliPrefix.None)>] Train of ParseResults<TrainArgs>
    | [<CliPrefix(CliPrefix.None)>] Eval of ParseResults<EvalArgs>
    | [<CliPrefix(CliPrefix.None)>] Sample of ParseResults<SampleArgs>
    | [<CliPrefix(CliPrefix.None)>] Score of ParseResults<ScoreArgs>
    | [<CliPrefix(CliPrefix.None)>] Embed of ParseResults<EmbedArgs>
    | [<CliPrefix(CliPrefix.None)>] Info of ParseResults<InfoArgs>
    | [<CliPrefix(CliPrefix.None)>] Check of ParseResults<CheckArgs>
    | [<CliPrefix(CliPrefix.None)>] Interpolate of ParseResults<InterpolateArgs>
    | [<CliPrefix(CliPrefix.None)>] Export of ParseResults<ExportArgs>
    | [<CliPrefix(CliPrefix.None)>] Experiment of ParseResults<ExperimentArgs>
    | [<AltCommandLine("-v")>] Verbose
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Verbose -> "print the stack trace of an unexpected error (before the verb: mixerflow --verbose train ...)."
            | Train _ -> "train a model; writes a run folder (checkpoints, metrics.csv, curve, samples, summary.json)."
            | Eval _ -> "bits/dim of a checkpoint on a split, with its standard error."
            | Sample _ -> "sample images from a checkpoint as a PNG grid."
            | Score _ -> "sample quality: Fréchet distance, precision and recall in the features of a classifier trained (once, cached) on the data."
            | Embed _ -> "latents of a data set for downstream use, with a linear-probe accuracy where labels exist."
            | Info _ -> "print a model's configuration and parameter breakdown."
            | Interpolate _ -> "decode the path between two images in latent space as a PNG strip."
            | Export _ -> "write a checkpoint's weights as a safetensors file (for PyTorch: the mirror in benchmarks/mirror)."
            | Experiment _ -> "train several models under one budget and compare them: results.csv/.md, held-out curves, samples side by side."
            | Check _ -> "run the property checks (inverse, log-det vs autograd Jacobian, ...) on the built-in bijectors."

/// A handler of the parsed verbs, one method per verb: a handler that lacks a verb does not
/// compile. `ICommand.Accept` calls the method of its verb.
type ICommandHandler<'Result> =
    /// `train`.
    abstract Train: command: TrainCommand -> 'Result
    /// `eval`.
    abstract Eval: command: EvalCommand -> 'Result
    /// `sample`.
    abstract Sample: command: SampleCommand -> 'Result
    /// `score`.
    abstract Score: command: ScoreCommand -> 'Result
    /// `embed`.
    abstract Embed: command: EmbedCommand -> 'Result
    /// `info`.
    abstract Info: command: InfoCommand -> 'Result
    /// `check`.
    abstract Check: command: CheckCommand -> 'Result
    /// `interpolate`.
    abstract Interpolate: command: InterpolateCommand -> 'Result
    /// `export`.
    abstract Export: command: ExportCommand -> 'Result
    /// `experiment`.
    abstract Experiment: command: ExperimentCommand -> 'Result

/// A parsed verb with its arguments.
and [<AllowNullLiteral>] ICommand =
    /// Calls the handler's method for this verb and returns what it returns.
    abstract Accept<'Result> : handler: ICommandHandler<'Result> -> 'Result

/// `train`: the library's own settings record.
and TrainCommand =
    { Settings: TrainingSettings }
    interface ICommand with
        member c.Accept h = h.Train c
/// `eval`: score a checkpoint.
and EvalCommand =
    { Checkpoint: string; Data: string; Split: Split; BatchSize: int; Device: Device }
    interface ICommand with
        member c.Accept h = h.Eval c
/// `sample`: sample grids from a checkpoint.
and SampleCommand =
    { Checkpoint: string; Count: int; Temperatures: float[]; Out: string; Seed: int }
    interface ICommand with
        member c.Accept h = h.Sample c
/// `score`: sample quality of a checkpoint (Samples = 0: the default count).
and ScoreCommand =
    { Checkpoint: string; Data: string; Samples: int; Temperatures: float[]; Seed: int; Json: string }
    interface ICommand with
        member c.Accept h = h.Score c
/// `embed`: latents as CSV, and a linear probe.
and EmbedCommand =
    { Checkpoint: string; Data: string; Out: string }
    interface ICommand with
        member c.Accept h = h.Embed c
/// `info`: at most one of Preset and Checkpoint is non-null; Model is the resolved configuration
/// (preset, --config file or checkpoint, with the --set overrides applied).
and InfoCommand =
    { Preset: string; Checkpoint: string; TimeStep: bool; Model: ModelConfig }
    interface ICommand with
        member c.Accept h = h.Info c
/// `interpolate`: the latent path between two images as a strip.
and InterpolateCommand =
    { Checkpoint: string; From: string; To: string; Steps: int; Spherical: bool; Out: string }
    interface ICommand with
        member c.Accept h = h.Interpolate c
/// `export`: a checkpoint's state as a safetensors file.
and ExportCommand =
    { Checkpoint: string; Out: string }
    interface ICommand with
        member c.Accept h = h.Export c
/// `check`: the property checks of the built-in bijectors.
and CheckCommand =
    { Bijector: string; Cases: int; Precision: Precision; Seed: int }
    interface ICommand with
        member c.Accept h = h.Check c
/// `experiment`: run a spec file into a results folder.
and ExperimentCommand =
    { Spec: string; Out: string }
    interface ICommand with
        member c.Accept h = h.Experiment c

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

    static member private ToCommand(r: ParseResults<MainArgs>) : ICommand =
        match r.GetSubCommand() with
        | MainArgs.Train t ->
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
                  t.Contains TrainArgs.Permute_Pixels, "PixelPermutationSeed" ]
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
                    ExtendSteps = (t.TryPostProcessResult(TrainArgs.Extend_Steps, CommandLine.Positive) |> Option.map int64 |> Option.defaultValue 0L),
                    Given = givenSet) } :> ICommand
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
