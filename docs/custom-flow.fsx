(*** hide ***)
// Executed by `docs/build.sh` (fsdocs --eval) against the built examples/CustomFlow, which holds
// MixerFlow.Core, MixerFlow.Checks and the LibTorch natives (patched for Debian 12 where needed).
#r "../examples/CustomFlow/bin/Debug/net10.0/TorchSharp.dll"
#r "../examples/CustomFlow/bin/Debug/net10.0/MixerFlow.Core.dll"
#r "../examples/CustomFlow/bin/Debug/net10.0/MixerFlow.Checks.dll"
#r "../examples/CustomFlow/bin/Debug/net10.0/FsCheck.dll"
// Loads the build output's (patched) native glue before TorchSharp looks for it.
MixerFlow.Core.NativeRuntime.EnsureLoaded()

(**
# Composing a custom flow

A bijector is a TorchSharp module with `Forward(x) -> (y, log|det dy/dx|)` and `Inverse(y)`;
chains, inverses and the MixerFlow liftings (`RowWise`, `ColumnWise`) are bijectors too. This
script (run by the documentation build) writes a bijector of its own, builds a flow from it and
built-in parts, and runs on both the property checks that every built-in bijector passes.
`examples/CustomFlow` does the same in C# (`dotnet run --project examples/CustomFlow`).

## A bijector of your own

The sinh-arcsinh map (Jones and Pewsey 2009), elementwise: `y = sinh(a * asinh(x) + b)` with
`a = exp(logA) > 0`, so `dy/dx = cosh(a asinh(x) + b) * a / sqrt(1 + x^2)`. The log-det is the sum
of the log-derivatives over the features of a sample.
*)
open MixerFlow.Core
open MixerFlow.Checks
open TorchSharp
type Tensor = torch.Tensor

type SinhAffine(dim: int64) as this =
    inherit Bijector("SinhAffine", [| dim |], [| dim |])
    let logAParameter = new Modules.Parameter(torch.zeros(dim))
    let bParameter = new Modules.Parameter(torch.zeros(dim))
    // Registered under names, so that to(dtype / device), save and load see them.
    do this.register_parameter("logA", logAParameter)
       this.register_parameter("b", bParameter)
    let logA, b = logAParameter :> Tensor, bParameter :> Tensor

    override _.Forward(x: Tensor) =
        let u = logA.exp() * x.asinh() + b
        let logDet = (u.cosh().log() + logA - (x.square() + 1.0).log() * 0.5).sum(1L)
        Transformed(u.sinh(), logDet)

    override this.Inverse(y: Tensor) =
        let x = ((y.asinh() - b) * (-logA).exp()).sinh()
        Transformed(x, -(this.Forward x).LogDet)

(**
## A flow from it and built-in parts

`Chain` composes bijectors; `ActNorm` (Glow's data-initialised normalisation), `AffineCoupling`
(RealNVP), `LULinear` (an LU-parametrised linear map) and `SplineCoupling` (neural spline flows)
are built in. A `BijectorSpec` names a factory of fresh instances, of random sizes, for the checks.
*)
let customFlow (r: System.Random) : Bijector =
    let d = 2L * int64 (r.Next(1, 4))
    new Chain([ new ActNorm([| d |]) :> Bijector
                new SinhAffine(d)
                new AffineCoupling([| d |], Partition.Halves d, Conditioners.Mlp(16L, 2))
                LULinear.Vector d
                new SplineCoupling([| d |], (Partition.Halves d).Swapped, Conditioners.Mlp(16L, 2)) ])

let specs =
    [ BijectorSpec("sinh-affine", System.Func<_, _>(fun (r: System.Random) -> new SinhAffine(int64 (r.Next(2, 6))) :> Bijector))
      BijectorSpec("custom-flow", System.Func<_, _>(customFlow)) ]

(**
## The property checks

`BijectorChecks.RunAll` runs every check that applies (inverse both ways, log-det against the
autograd Jacobian in float64, inverse log-det, chain rule, per-sample independence, gradients,
save and load, ...) on random instances with random parameters; `AssertAll` throws with a shrunk
counterexample instead. `RunOn` checks one given (trained) instance as it is.
*)
let results =
    [ for spec in specs do
        for r in BijectorChecks.RunAll(spec, CheckOptions.Float64.WithCases(4)) do
            if r.Applicable then yield r ]

for r in results do
    printfn "%-12s (%c) %-14O worst %.1e  %s" r.Bijector r.Letter r.Check r.WorstError (if r.Passed then "pass" else "FAIL")
(*** include-output ***)

(**
A bijector whose log-det is wrong fails the check that compares it with autograd's Jacobian:
*)
type WrongLogDet(dim: int64) =
    inherit SinhAffine(dim)
    override _.Forward(x: Tensor) =
        let t = base.Forward x
        Transformed(t.Value, t.LogDet * 0.5)

let broken =
    BijectorChecks.RunAll(BijectorSpec("wrong-log-det", System.Func<_, _>(fun _ -> new WrongLogDet(3L) :> Bijector)),
                          CheckOptions.Float64.WithCases(4))
    |> Seq.filter (fun r -> r.Applicable && not r.Passed)
    |> Seq.map (fun r -> string r.Check)
    |> List.ofSeq
printfn "checks that fail on the wrong log-det: %s" (String.concat ", " broken)
(*** include-output ***)

(*** hide ***)
if results |> List.exists (fun r -> not r.Passed) then failwith "a check failed on the custom flow"
if List.isEmpty broken then failwith "the checks did not catch the wrong log-det"

(**
## Next

A bijector with a hand-written backward pass, how log-dets are kept in pieces, and conditioner
networks: [library guide](library.md#composing-a-custom-flow).
*)
