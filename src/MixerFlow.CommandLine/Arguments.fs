/// The `mixerflow` command line as Argu types, parsed here in F# and handed to the C# host as
/// plain option objects (Argu's typed accessors need F# quotations, which C# cannot write).
namespace MixerFlow.CommandLine

open System
open Argu

type CheckArgs =
    | [<AltCommandLine("-b")>] Bijector of name: string
    | Cases of count: int
    | Dtype of dtype: string
    | Seed of seed: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Bijector _ -> "check only this built-in bijector (default: all); names as listed by `check`."
            | Cases _ -> "random cases per property (default 12)."
            | Dtype _ -> "float64, float32 or both (default both)."
            | Seed _ -> "seed that derandomises the FsCheck runs (default 20261129)."

type InfoArgs =
    | Preset of name: string
    | Checkpoint of file: string
    | Time_Step
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Time_Step -> "also time training steps (forward, backward, Adam) at batch 64 on random images."
            | Preset _ -> "a model preset: fashion-mnist, cifar10, imagenet64, tiny, glow-fashion-mnist, glow-cifar10."
            | Checkpoint _ -> "a checkpoint file written by `train`."

type TrainArgs =
    | Preset of name: string
    | Data of dir: string
    | Out of dir: string
    | Epochs of count: int
    | Steps of count: int
    | Batch_Size of size: int
    | Lr of rate: float
    | Seed of seed: int
    | Device of device: string
    | Threads of count: int
    | Resume of dir: string
    | Checkpoint_Every of steps: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Preset _ -> "model preset (default fashion-mnist): fashion-mnist, cifar10, imagenet64, tiny, glow-fashion-mnist, glow-cifar10, glow-tiny."
            | Data _ -> "folder of IDX files (MNIST / Fashion-MNIST), CIFAR-10 binary batches or PNG/JPEG images (default: the embedded Fashion-MNIST test split)."
            | Out _ -> "run folder (default runs/<preset>-<time>)."
            | Epochs _ -> "number of passes over the training images (default 10)."
            | Steps _ -> "number of optimiser steps (instead of --epochs)."
            | Batch_Size _ -> "images per step (default 64)."
            | Lr _ -> "peak learning rate of Adam (default 0.002), reached after a warmup and decayed by a cosine."
            | Seed _ -> "seed of initialisation, data order and dequantisation noise (default 0)."
            | Device _ -> "cpu or cuda (default cpu)."
            | Threads _ -> "CPU threads for LibTorch (default: all cores)."
            | Resume _ -> "continue the run in this folder from its last checkpoint (optimiser state and step included)."
            | Checkpoint_Every _ -> "steps between checkpoints (default 200)."

type EvalArgs =
    | [<Mandatory>] Checkpoint of file: string
    | Data of dir: string
    | Split of split: string
    | Batch_Size of size: int
    | Device of device: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "checkpoint file written by train."
            | Data _ -> "data folder (default: the embedded Fashion-MNIST test split)."
            | Split _ -> "test (held-out, default) or train."
            | Batch_Size _ -> "images per batch (default 256)."
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
            | Count _ -> "samples per temperature (default 64)."
            | Temperature _ -> "one or more temperatures (default 0.7)."
            | Out _ -> "PNG file (default samples.png); one file per temperature when several are given."
            | Seed _ -> "seed of the base samples (default 0)."

type EmbedArgs =
    | [<Mandatory>] Checkpoint of file: string
    | Data of dir: string
    | [<Mandatory>] Out of file: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "checkpoint file written by train."
            | Data _ -> "data folder (default: the embedded Fashion-MNIST test split)."
            | Out _ -> "CSV file: one row per image, the label (if any) and the latent."

[<RequireSubcommand>]
type MainArgs =
    | [<CliPrefix(CliPrefix.None)>] Train of ParseResults<TrainArgs>
    | [<CliPrefix(CliPrefix.None)>] Eval of ParseResults<EvalArgs>
    | [<CliPrefix(CliPrefix.None)>] Sample of ParseResults<SampleArgs>
    | [<CliPrefix(CliPrefix.None)>] Embed of ParseResults<EmbedArgs>
    | [<CliPrefix(CliPrefix.None)>] Info of ParseResults<InfoArgs>
    | [<CliPrefix(CliPrefix.None)>] Check of ParseResults<CheckArgs>
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Train _ -> "train a model; writes a run folder (checkpoints, metrics.csv, curve, samples, summary.json)."
            | Eval _ -> "bits/dim of a checkpoint on a split, with its standard error."
            | Sample _ -> "sample images from a checkpoint as a PNG grid."
            | Embed _ -> "latents of a data set for downstream use, with a linear-probe accuracy where labels exist."
            | Info _ -> "print a model's configuration and parameter breakdown."
            | Check _ -> "run the property checks (inverse, log-det vs autograd Jacobian, ...) on the built-in bijectors."

/// Options of `train`. Null / 0 means "not given".
[<Sealed; AllowNullLiteral>]
type TrainOptions(preset, data, out, epochs, steps, batchSize, lr, seed, device, threads, resume, checkpointEvery) =
    member _.Preset: string = preset
    member _.Data: string = data
    member _.Out: string = out
    member _.Epochs: int = epochs
    member _.Steps: int = steps
    member _.BatchSize: int = batchSize
    member _.Lr: float = lr
    member _.Seed: int = seed
    member _.Device: string = device
    member _.Threads: int = threads
    member _.Resume: string = resume
    member _.CheckpointEvery: int = checkpointEvery

[<Sealed; AllowNullLiteral>]
type EvalOptions(checkpoint: string, data: string, split: string, batchSize: int, device: string) =
    member _.Checkpoint = checkpoint
    member _.Data = data
    member _.Split = split
    member _.BatchSize = batchSize
    member _.Device = device

[<Sealed; AllowNullLiteral>]
type SampleOptions(checkpoint: string, count: int, temperatures: float[], out: string, seed: int) =
    member _.Checkpoint = checkpoint
    member _.Count = count
    member _.Temperatures = temperatures
    member _.Out = out
    member _.Seed = seed

[<Sealed; AllowNullLiteral>]
type EmbedOptions(checkpoint: string, data: string, out: string) =
    member _.Checkpoint = checkpoint
    member _.Data = data
    member _.Out = out

/// Options of `check`.
[<Sealed; AllowNullLiteral>]
type CheckOptions(bijector: string, cases: int, dtypes: string[], seed: int) =
    member _.Bijector = bijector
    member _.Cases = cases
    member _.DTypes = dtypes
    member _.Seed = seed

/// Options of `info`: exactly one of Preset and Checkpoint is set.
[<Sealed; AllowNullLiteral>]
type InfoOptions(preset: string, checkpoint: string, timeStep: bool) =
    new(preset, checkpoint) = InfoOptions(preset, checkpoint, false)
    member _.TimeStep = timeStep
    member _.Preset = preset
    member _.Checkpoint = checkpoint

/// The outcome of parsing: a verb with its options, or help / an error with the exit code.
[<Sealed; AllowNullLiteral>]
type ParsedCommand(verb: string, options: obj, message: string, exitCode: int) =
    /// "check", "info", ... or null when parsing stopped (help or error).
    member _.Verb = verb
    member _.Options = options
    /// Help text or error message to print when Verb is null.
    member _.Message = message
    /// 0 after --help, 2 after a bad argument.
    member _.ExitCode = exitCode
    member _.IsError = isNull verb && exitCode <> 0

exception BadArgument of string

[<AbstractClass; Sealed>]
type CommandLine =
    static member private Parser = ArgumentParser.Create<MainArgs>(programName = "mixerflow")

    static member Usage() = CommandLine.Parser.PrintUsage()

    static member private Positive (what: string) (v: int) =
        if v <= 0 then raise (BadArgument(sprintf "%s must be a positive integer, got %d" what v))
        v

    static member private Device(d: string option) =
        match d |> Option.map (fun s -> s.ToLowerInvariant()) with
        | None -> "cpu"
        | Some ("cpu" | "cuda" as d) -> d
        | Some d -> raise (BadArgument(sprintf "--device must be cpu or cuda, got '%s'" d))

    static member private ToOptions(r: ParseResults<MainArgs>) : string * obj =
        let pos what = Option.map (CommandLine.Positive what) >> Option.defaultValue 0
        match r.GetSubCommand() with
        | Train t ->
            if t.Contains TrainArgs.Epochs && t.Contains TrainArgs.Steps then
                raise (BadArgument "train takes --epochs or --steps, not both")
            let lr = t.GetResult(TrainArgs.Lr, defaultValue = 2e-3)
            if not (lr > 0.0 && lr < 1.0) then raise (BadArgument(sprintf "--lr must lie in (0, 1), got %g" lr))
            "train",
            box (TrainOptions(
                    t.GetResult(TrainArgs.Preset, defaultValue = "fashion-mnist"),
                    t.TryGetResult TrainArgs.Data |> Option.toObj,
                    t.TryGetResult TrainArgs.Out |> Option.toObj,
                    t.TryGetResult TrainArgs.Epochs |> pos "--epochs",
                    t.TryGetResult TrainArgs.Steps |> pos "--steps",
                    t.GetResult(TrainArgs.Batch_Size, defaultValue = 64) |> CommandLine.Positive "--batch-size",
                    lr,
                    t.GetResult(TrainArgs.Seed, defaultValue = 0),
                    CommandLine.Device(t.TryGetResult TrainArgs.Device),
                    t.TryGetResult TrainArgs.Threads |> pos "--threads",
                    t.TryGetResult TrainArgs.Resume |> Option.toObj,
                    t.GetResult(TrainArgs.Checkpoint_Every, defaultValue = 200) |> CommandLine.Positive "--checkpoint-every"))
        | Eval e ->
            let split = e.GetResult(EvalArgs.Split, defaultValue = "test").ToLowerInvariant()
            if split <> "test" && split <> "train" then raise (BadArgument(sprintf "--split must be test or train, got '%s'" split))
            "eval",
            box (EvalOptions(e.GetResult EvalArgs.Checkpoint, e.TryGetResult EvalArgs.Data |> Option.toObj, split,
                             e.GetResult(EvalArgs.Batch_Size, defaultValue = 256) |> CommandLine.Positive "--batch-size",
                             CommandLine.Device(e.TryGetResult EvalArgs.Device)))
        | Sample s ->
            let temps = s.GetResult(SampleArgs.Temperature, defaultValue = [ 0.7 ]) |> List.toArray
            if temps.Length = 0 || temps |> Array.exists (fun t -> not (t >= 0.0 && t <= 10.0)) then
                raise (BadArgument(sprintf "--temperature needs values in [0, 10], got %A" temps))
            "sample",
            box (SampleOptions(s.GetResult SampleArgs.Checkpoint,
                               s.GetResult(SampleArgs.Count, defaultValue = 64) |> CommandLine.Positive "--count",
                               temps, s.GetResult(SampleArgs.Out, defaultValue = "samples.png"),
                               s.GetResult(SampleArgs.Seed, defaultValue = 0)))
        | Embed e ->
            "embed", box (EmbedOptions(e.GetResult EmbedArgs.Checkpoint, e.TryGetResult EmbedArgs.Data |> Option.toObj, e.GetResult EmbedArgs.Out))
        | Check c ->
            let dtypes =
                match c.TryGetResult CheckArgs.Dtype |> Option.map (fun s -> s.ToLowerInvariant()) with
                | None | Some "both" -> [| "float64"; "float32" |]
                | Some ("float64" | "float32" as d) -> [| d |]
                | Some d -> raise (BadArgument(sprintf "--dtype must be float64, float32 or both, got '%s'" d))
            "check",
            box (CheckOptions(
                    c.TryGetResult CheckArgs.Bijector |> Option.toObj,
                    c.TryGetResult CheckArgs.Cases |> Option.map (CommandLine.Positive "--cases") |> Option.defaultValue 12,
                    dtypes,
                    c.GetResult(CheckArgs.Seed, defaultValue = 20261129)))
        | Info i ->
            match i.TryGetResult InfoArgs.Preset, i.TryGetResult InfoArgs.Checkpoint with
            | Some p, None -> "info", box (InfoOptions(p, null, i.Contains InfoArgs.Time_Step))
            | None, Some c -> "info", box (InfoOptions(null, c, i.Contains InfoArgs.Time_Step))
            | _ -> raise (BadArgument "info needs exactly one of --preset NAME and --checkpoint FILE")
        | _ -> raise (BadArgument "unknown verb")

    /// Parses the arguments; never throws for bad input.
    static member Parse(argv: string[]) : ParsedCommand =
        try
            let r = CommandLine.Parser.ParseCommandLine(argv, raiseOnUsage = true)
            let verb, options = CommandLine.ToOptions r
            ParsedCommand(verb, options, null, 0)
        with
        | :? ArguParseException as e when e.ErrorCode = ErrorCode.HelpText -> ParsedCommand(null, null, e.Message, 0)
        | :? ArguParseException as e -> ParsedCommand(null, null, e.Message, 2)
        | BadArgument msg -> ParsedCommand(null, null, "ERROR: " + msg + Environment.NewLine + CommandLine.Usage(), 2)
