/// The `mixerflow` command line's arguments as Argu unions (which also write `--help`); Commands.fs
/// holds the parsed verbs and Parser.fs the parsing. Defaults and preset names come from their
/// owners (MixerFlow.Core.Defaults, TrainingSettings, Presets).
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

/// The arguments of `check`.
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

/// The arguments of `info`.
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

/// The arguments of `train`.
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
    | Validation_Images of count: int
    | Ema_Decay of decay: float
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
            | Validation_Images _ -> "hold this many training images out as a validation set (chosen with --seed, never trained on): the evaluations during training score it, best.ckpt is the checkpoint with the best validation bits/dim, and the held-out (test) split is scored beside it for the record and for best.ckpt at the end (default 0: none; best.ckpt by held-out bits/dim)."
            | Ema_Decay _ -> "keep an exponential moving average of the parameters with this decay in (0, 1), e.g. 0.999 (about the last 1000 steps), updated after every step: evaluations, pictures and the checkpoints' weights use it, and last.ckpt also keeps the trained weights for --resume (default 0: none)."

/// The arguments of `eval`.
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

/// The arguments of `sample`.
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

/// The arguments of `score`.
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

/// The arguments of `embed`.
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

/// The arguments of `export`.
type ExportArgs =
    | [<Mandatory>] Checkpoint of file: string
    | [<Mandatory>] Out of file: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "checkpoint file written by train."
            | Out _ -> "the .safetensors file to write: every parameter and buffer under its state_dict name, the configuration JSON in its metadata (what benchmarks/mirror/mixerflow_mirror.py loads)."

/// The arguments of `interpolate`.
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
/// The arguments of `experiment`.
type ExperimentArgs =
    | [<MainCommand; Mandatory; Unique>] Spec of file: string
    | Out of dir: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Spec _ -> "the experiment spec (JSON): runs (name, preset or config, set, seeds) and the shared budget (steps, batchSize, learningRate, data); see experiments/README.md."
            | Out _ -> "results folder (default runs/<spec file name>); running again resumes: finished runs are not retrained."

/// The verbs of `mixerflow`, each with its own arguments.
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
