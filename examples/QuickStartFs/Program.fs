open MixerFlow.Core
open TorchSharp
open type TorchSharp.torch

// 2-D data: two Gaussian blobs ([N, 2] float32; any such tensor will do).
manual_seed 0L |> ignore
let blobs n = cat [| Ops.addScalar (randn(n / 2L, 2L)) -2.0; Ops.addScalar (randn(n / 2L, 2L)) 2.0 |]
let train, heldOut = blobs 10_000L, blobs 2_000L

let flow = Flows.NSF(2L, transforms = 3)                    // a neural spline flow
let fit = Fitting.Fit(flow, train, FitOptions.Default       // Adam, batches, early stopping
                        .WithSteps(500).WithBatchSize(256).WithLearningRate(3e-3).WithHeldOut(heldOut))
printfn "held-out NLL %.3f -> %.3f nats" fit.InitialHeldOutNll fit.BestHeldOutNll

flow.eval() |> ignore
using (no_grad ()) (fun _ ->
    let logp = flow.LogProb heldOut                         // log p(x) per sample: [2000]
    let samples = flow.Sample 1000L                         // new points: [1000, 2]
    printfn "mean log p(x) %.3f; %d samples" (logp.mean().item<float32>()) samples.shape[0])
exit (if fit.BestHeldOutNll < fit.InitialHeldOutNll then 0 else 1)
