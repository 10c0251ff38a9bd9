using MixerFlow.Core;
using MixerFlow.Checks;
using MixerFlow.Host;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using MixerFlow.CommandLine;
using Device = MixerFlow.CommandLine.Device;
using MixerFlow.Host.Data;
using MixerFlow.Host.Files;
using MixerFlow.Host.Imaging;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Cli.Verbs;

/// <summary>`train`, `eval`, `sample` and `embed`.</summary>
public static class ModelVerbs
{
    /// <summary>Exit code after Ctrl-C (SIGINT): 128 + 2, the shell convention.</summary>
    public const int InterruptedExitCode = 130;
    /// <summary>Exit code after SIGTERM: 128 + 15.</summary>
    public const int TerminatedExitCode = 143;

    /// <summary>
    /// Trains. The first Ctrl-C (SIGINT) or SIGTERM finishes the step in progress, saves last.ckpt,
    /// prints one line naming the step, the checkpoint and how to resume, and exits with 130 (SIGINT)
    /// or 143 (SIGTERM); a second one exits at once. A run that keeps diverging exits with 2.
    /// </summary>
    /// The settings and the run folder are checked first (not an existing file, writable), so a
    /// refusal comes before any data is loaded or step taken.
    public static int Train(TrainingSettings settings, TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(settings);
        // The settings first (an empty --out is refused by name), then the folder; the default run
        // folder is made under runs/ (Trainer names it).
        var trainer = new Trainer(settings, new ProgressReporter(output));
        OutputPath.CheckFolder(settings.RunFolder ?? "runs", settings.Resume ? "--resume" : "--out");
        using var cts = new CancellationTokenSource();
        int signal = 0; // the first signal received: 2 (SIGINT) or 15 (SIGTERM)
        bool Request(int number)
        {
            // True: the first request, handled here; false: a second one, which ends the process.
            if (Interlocked.CompareExchange(ref signal, number, 0) != 0) return false;
            // On a terminal the live progress line has no newline yet.
            if (!Console.IsOutputRedirected) Console.WriteLine();
            Console.Error.WriteLine($"{(number == 2 ? "Ctrl-C" : "SIGTERM")}: stopping after the current step and saving last.ckpt (Ctrl-C again to stop at once)");
            cts.Cancel();
            return true;
        }
        ConsoleCancelEventHandler onCtrlC = (_, e) => e.Cancel = Request(2);
        Console.CancelKeyPress += onCtrlC;
        PosixSignalRegistration? onTerm = null;
        try { onTerm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => c.Cancel = Request(15)); }
        catch (PlatformNotSupportedException) { }
        try
        {
            trainer.Run(cts.Token);
            return 0;
        }
        catch (TrainingInterruptedException e)
        {
            // Under MPI every rank stops at the same step; rank 0, which saved the checkpoint, says so.
            if (MixerFlow.Host.Distributed.Communicator.FromEnvironment().IsRoot)
                Console.Error.WriteLine($"interrupted at step {e.Step}: saved {e.Checkpoint}; continue with: mixerflow train --resume {e.RunFolder}");
            return signal == 15 ? TerminatedExitCode : InterruptedExitCode;
        }
        catch (TrainingDivergedException e)
        {
            if (MixerFlow.Host.Distributed.Communicator.FromEnvironment().IsRoot) Console.Error.WriteLine($"error: {e.Message}");
            return 2;
        }
        catch (Exception e) when (trainer.Ranks.Size > 1)
        {
            // Only this rank failed: the others wait in a collective call and would wait forever.
            Console.Error.WriteLine($"error on rank {trainer.Ranks.Rank} of {trainer.Ranks.Size}: {(e is UserError ? e.Message : e.ToString())}");
            Console.Error.WriteLine("ending every rank (MPI_Abort); checkpoints already written are kept");
            Console.Out.Flush();
            Console.Error.Flush();
            trainer.Ranks.Abort(e is UserError ? 2 : 1);
            throw;
        }
        finally
        {
            Console.CancelKeyPress -= onCtrlC;
            onTerm?.Dispose();
        }
    }

    static ImageFlow Load(string checkpoint, Device device)
    {
        var (model, _) = Checkpoint.Load(checkpoint);
        model.MoveTo(Trainer.ParseDevice(device.ToString().ToLowerInvariant()), float32);
        model.eval();
        return model;
    }

    public static int Eval(EvalCommand o, TextWriter output)
    {
        var model = Load(o.Checkpoint, o.Device);
        var c = model.Config;
        var data = DatasetLoader.Load(o.Data, c.Channels, c.Height, c.Width).Permuted(RunFolder.PixelPermutationOf(o.Checkpoint, c));
        var set = o.Split == Split.Train ? data.Train : data.HeldOut;
        var (mean, se) = Evaluation.BitsPerDim(model, set, o.BatchSize, model.Device);
        output.WriteLine($"{o.Split.ToString().ToLowerInvariant()} split of {data.Description}");
        output.WriteLine($"bits/dim: {mean:0.0000} +- {se:0.0000} (standard error over {set.Count} images)");
        return 0;
    }

    /// <summary>Images per PNG grid: larger counts are written to numbered files.</summary>
    public const int ImagesPerGrid = 1024;
    /// <summary>Samples drawn per batch, so memory stays bounded whatever the count.</summary>
    const int SampleBatch = MixerFlow.Core.Defaults.SampleBatchSize;

    /// <summary>The files `sample` writes: one grid per temperature and per <see cref="ImagesPerGrid"/> images.</summary>
    static List<(double Temperature, string Path, int Count)> SampleFiles(SampleCommand o)
    {
        var plan = new List<(double, string, int)>();
        foreach (var t in o.Temperatures)
        {
            var stem = o.Temperatures.Length == 1
                ? o.Out
                : Path.Combine(Path.GetDirectoryName(o.Out) ?? "", $"{Path.GetFileNameWithoutExtension(o.Out)}-t{t.ToString("0.0##", CultureInfo.InvariantCulture)}.png");
            int files = (o.Count + ImagesPerGrid - 1) / ImagesPerGrid;
            for (int f = 0; f < files; f++)
            {
                int inFile = Math.Min(ImagesPerGrid, o.Count - f * ImagesPerGrid);
                var path = files == 1 ? stem
                    : Path.Combine(Path.GetDirectoryName(stem) ?? "", $"{Path.GetFileNameWithoutExtension(stem)}-{f + 1:000}.png");
                plan.Add((t, path, inFile));
            }
        }
        return plan;
    }

    /// <summary>`sample`: every output path is checked (not a folder, its folder writable) before the
    /// checkpoint is loaded; each grid is written atomically, so a failure keeps the files before it.</summary>
    public static int Sample(SampleCommand o, TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(o);
        var plan = SampleFiles(o);
        foreach (var (_, path, _) in plan) OutputPath.CheckFile(path, "--out", ("--checkpoint", o.Checkpoint));
        var model = Load(o.Checkpoint, Device.Cpu);
        // A run trained on permuted pixels samples permuted images: shown un-permuted.
        var permutation = RunFolder.PixelPermutationOf(o.Checkpoint, model.Config);
        manual_seed(o.Seed);
        foreach (var (t, path, inFile) in plan)
        {
            var parts = new List<Tensor>();
            for (int done = 0; done < inFile; done += SampleBatch)
            {
                int n = Math.Min(SampleBatch, inFile - done);
                using var scope = NewDisposeScope();
                var drawn = model.Sample(n, t);
                parts.Add((permutation?.Unpermute(drawn) ?? drawn).MoveToOuterDisposeScope());
            }
            ImageGrid.Save(cat(parts, 0), path);
            foreach (var part in parts) part.Dispose();
            output.WriteLine($"wrote {inFile} samples at temperature {t} to {path}");
        }
        return 0;
    }

    /// <summary>`interpolate`: both images are encoded, the latent path between them decoded, and
    /// the strip written (the ends are the images as the model reconstructs them).</summary>
    public static int Interpolate(InterpolateCommand o, TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(o);
        OutputPath.CheckFile(o.Out, "--out", ("--checkpoint", o.Checkpoint), ("--from", o.From), ("--to", o.To));
        var model = Load(o.Checkpoint, Device.Cpu);
        var c = model.Config;
        var from = ImageFolderFormat.ReadFile(o.From, c.Channels, c.Height, c.Width);
        var to = ImageFolderFormat.ReadFile(o.To, c.Channels, c.Height, c.Width);
        // A run trained on permuted pixels: the images are permuted as it saw them, the strip shown un-permuted.
        var permutation = RunFolder.PixelPermutationOf(o.Checkpoint, c);
        using var scope = NewDisposeScope();
        Tensor Seen(ImageDataset image) => permutation?.Permute(image.Batch([0])) ?? image.Batch([0]);
        var strip = model.Interpolate(Seen(from), Seen(to), o.Steps, o.Spherical);
        if (permutation is not null) strip = permutation.Unpermute(strip);
        ImageGrid.Save(strip, o.Out, columns: o.Steps);
        output.WriteLine($"wrote {o.Steps} images from {o.From} to {o.To} ({(o.Spherical ? "spherical" : "linear")} in latent space) to {o.Out}");
        return 0;
    }

    /// <summary>`embed`: the output path is checked (not a folder, its folder writable) before any work.</summary>
    /// <summary>
    /// `export`: the checkpoint's model state (every parameter and buffer under its state_dict name,
    /// float32) as a safetensors file with the configuration in its metadata; see
    /// <see cref="ImageFlow.ExportSafetensors"/>.
    /// </summary>
    public static int Export(ExportCommand o, TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(o);
        OutputPath.CheckFile(o.Out, "--out", ("--checkpoint", o.Checkpoint));
        var model = Load(o.Checkpoint, Device.Cpu);
        model.ExportSafetensors(o.Out);
        output.WriteLine($"wrote {model.state_dict().Count} tensors ({model.ParameterCount:N0} parameters of '{model.Config.Name}') to {o.Out}");
        return 0;
    }

    public static int Embed(EmbedCommand o, TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(o);
        OutputPath.CheckFile(o.Out, "--out", ("--checkpoint", o.Checkpoint), ("--data", o.Data));
        var model = Load(o.Checkpoint, Device.Cpu);
        var c = model.Config;
        var data = DatasetLoader.Load(o.Data, c.Channels, c.Height, c.Width).Permuted(RunFolder.PixelPermutationOf(o.Checkpoint, c));
        var train = Evaluation.Latents(model, data.Train);
        var held = Evaluation.Latents(model, data.HeldOut);
        AtomicFile.Write(o.Out, stream =>
        {
            using var w = new StreamWriter(stream, new UTF8Encoding(false), leaveOpen: true);
            w.WriteLine("split,index,label," + string.Join(",", Enumerable.Range(0, (int)train.shape[1]).Select(i => $"z{i}")));
            void Rows(string split, ImageDataset set, Tensor z)
            {
                var values = z.data<float>().ToArray();
                int d = (int)z.shape[1];
                for (int i = 0; i < set.Count; i++)
                    w.WriteLine($"{split},{i},{(set.Labels is null ? "" : set.Labels[i].ToString(CultureInfo.InvariantCulture))}," +
                                string.Join(",", values.Skip(i * d).Take(d).Select(v => v.ToString("R", CultureInfo.InvariantCulture))));
            }
            Rows("train", data.Train, train);
            Rows("heldout", data.HeldOut, held);
        });
        output.WriteLine($"wrote {data.Train.Count + data.HeldOut.Count} latents of {train.shape[1]} values to {o.Out}");
        if (data.Train.Labels is not null && data.HeldOut.Labels is not null)
        {
            double acc = Evaluation.LinearProbeAccuracy(train, data.Train.Labels, held, data.HeldOut.Labels);
            output.WriteLine($"linear probe (softmax regression on the latents): held-out accuracy {acc:P1}");
        }
        return 0;
    }
}

