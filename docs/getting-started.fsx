(*** hide ***)
// Executed by `docs/build.sh` (fsdocs --eval) against the built examples/CustomFlow, which holds
// MixerFlow.Core, MixerFlow.Checks and the LibTorch natives (patched for Debian 12 where needed).
#r "../examples/CustomFlow/bin/Debug/net10.0/TorchSharp.dll"
#r "../examples/CustomFlow/bin/Debug/net10.0/MixerFlow.Core.dll"
#r "../examples/CustomFlow/bin/Debug/net10.0/MixerFlow.Checks.dll"
// Loads the build output's (patched) native glue before TorchSharp looks for it.
MixerFlow.Core.NativeRuntime.EnsureLoaded()

(**
# Getting started: fit a flow to 2-D data

This tutorial is an F# script that the documentation build runs, so every output below is what
the code printed. The same steps in C# are the README's quick start (`examples/QuickStart`).

A normalising flow is a bijector `f` from data `x` to a latent `z = f(x)` with a simple base
density, here a standard normal: `log p(x) = log N(f(x); 0, I) + log |det df/dx|`. Fitting it by
maximum likelihood means minimising `-log p(x)` over the training data.

## Data

Any float32 tensor `[N, features]` will do. Here: points on a noisy ring, which no Gaussian fits.
*)
open System
open MixerFlow.Core
open TorchSharp
open type TorchSharp.torch

manual_seed 0L |> ignore
let ring (n: int64) =
    let angle = rand(n) * (2.0 * Math.PI)
    let radius = randn(n) * 0.1 + 2.0
    stack([| radius * cos angle; radius * sin angle |], 1L)

let train = ring 8_000L
let heldOut = ring 2_000L
(**
## A flow

`Flows.NSF` builds a neural spline flow: rational-quadratic spline couplings on alternating halves
of the features, with an LU-parametrised linear map between them. `Flows.RealNVP` (affine
couplings) and `Flows.MAF` (masked autoregressive) are built the same way, each with an optional
`context` for conditional flows.
*)
let flow = Flows.NSF(2L, transforms = 4)
let parameters = flow.parameters() |> Seq.sumBy (fun p -> p.numel())
(*** include-value: parameters ***)

(**
## Fitting

`Fitting.Fit` takes shuffled batches, keeps every step in a dispose scope, uses MixerFlow.Core's
`Adam`, clips the gradient norm, scores the held-out data every `EvaluateEvery` steps, stops after
`Patience` evaluations without improvement and restores the best parameters
(see [fitting](fitting.md) for every option).
*)
let result =
    Fitting.Fit(flow, train,
                FitOptions.Default.WithSteps(300).WithBatchSize(256).WithLearningRate(5e-3)
                    .WithHeldOut(heldOut).WithEvaluateEvery(100).WithPatience(3))

printfn "held-out NLL: %.3f nats before, %.3f after (best at step %d of %d)"
    result.InitialHeldOutNll result.BestHeldOutNll result.BestStep result.Steps
(*** include-output ***)

(**
## Scoring and sampling

`LogProb` gives log p(x) per sample; `Sample` draws new points (without gradients);
`SampleWithLogProb` draws them with their log-density, differentiably.
*)
flow.eval() |> ignore
let meanLogProb, radii =
    use _ = no_grad ()
    let logp = flow.LogProb heldOut
    let samples = flow.Sample 2_000L
    let r = samples.square().sum(1L).sqrt()
    logp.mean().item<float32>(), (r.mean().item<float32>(), r.std().item<float32>())

printfn "mean held-out log p(x): %.3f nats" meanLogProb
printfn "samples' radius: mean %.2f, sd %.2f (the data: 2.00 and 0.10)" (fst radii) (snd radii)
(*** include-output ***)

(**
The fitted flow puts its samples on the ring. The script fails the documentation build if it did
not learn:
*)
if not (result.BestHeldOutNll < result.InitialHeldOutNll - 1.0) then failwith "the flow did not fit"
if Math.Abs(fst radii - 2.0f) > 0.3f then failwith "the samples are not on the ring"

(**
## Next

- Your own training loop (a schedule, several losses): [fitting](fitting.md#why-not-an-ordinary-loop).
- A bijector of your own, checked like the built-in ones: [composing a custom flow](custom-flow.fsx).
- Conditional flows, coupling maps, image models: [library guide](library.md).
*)
