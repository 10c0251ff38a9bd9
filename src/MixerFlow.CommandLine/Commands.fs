/// The parsed verbs of the `mixerflow` command line: one record per verb behind ICommand, and the
/// handler interface with one method per verb.
namespace MixerFlow.CommandLine

open System
open Argu
open MixerFlow.Core
open MixerFlow.Host.Models
open MixerFlow.Host.Training

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
