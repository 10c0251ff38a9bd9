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
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Preset _ -> "a model preset: fashion-mnist, cifar10, imagenet64, tiny, glow-fashion-mnist, glow-cifar10."
            | Checkpoint _ -> "a checkpoint file written by `train`."

[<RequireSubcommand>]
type MainArgs =
    | [<CliPrefix(CliPrefix.None)>] Check of ParseResults<CheckArgs>
    | [<CliPrefix(CliPrefix.None)>] Info of ParseResults<InfoArgs>
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Check _ -> "run the property checks (inverse, log-det vs autograd Jacobian, ...) on the built-in bijectors."
            | Info _ -> "print a model's configuration and parameter breakdown."

/// Options of `check`.
[<Sealed; AllowNullLiteral>]
type CheckOptions(bijector: string, cases: int, dtypes: string[], seed: int) =
    member _.Bijector = bijector
    member _.Cases = cases
    member _.DTypes = dtypes
    member _.Seed = seed

/// Options of `info`: exactly one of Preset and Checkpoint is set.
[<Sealed; AllowNullLiteral>]
type InfoOptions(preset: string, checkpoint: string) =
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

    static member private ToOptions(r: ParseResults<MainArgs>) : string * obj =
        match r.GetSubCommand() with
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
            | Some p, None -> "info", box (InfoOptions(p, null))
            | None, Some c -> "info", box (InfoOptions(null, c))
            | _ -> raise (BadArgument "info needs exactly one of --preset NAME and --checkpoint FILE")

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
