using MixerFlow.Core;
using System.Globalization;
using System.Text;
using MixerFlow.CommandLine;
using MixerFlow.Host.Data;
using MixerFlow.Host.Files;
using MixerFlow.Host.Imaging;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;
using static TorchSharp.torch;

namespace MixerFlow.Host.Commands;

/// <summary>`train`, `eval`, `sample` and `embed`.</summary>
public static class ModelCommands
{
    public static int Train(TrainOptions o, TextWriter output)
    {
        new Trainer(o, output).Run();
        return 0;
    }

    static ImageFlow Load(string checkpoint, string device)
    {
        var (model, _) = Checkpoint.Load(checkpoint);
        model.MoveTo(Trainer.ParseDevice(device), float32);
        model.eval();
        return model;
    }

    public static int Eval(EvalOptions o, TextWriter output)
    {
        var model = Load(o.Checkpoint, o.Device);
        var c = model.Config;
        var data = DatasetLoader.Load(o.Data, c.Channels, c.Height, c.Width);
        var set = o.Split == "train" ? data.Train : data.HeldOut;
        var (mean, se) = Trainer.Evaluate(model, set, o.BatchSize, model.Device);
        output.WriteLine($"{o.Split} split of {data.Description}");
        output.WriteLine($"bits/dim: {mean:0.0000} +- {se:0.0000} (standard error over {set.Count} images)");
        return 0;
    }

    public static int Sample(SampleOptions o, TextWriter output)
    {
        var model = Load(o.Checkpoint, "cpu");
        manual_seed(o.Seed);
        foreach (var t in o.Temperatures)
        {
            var path = o.Temperatures.Length == 1
                ? o.Out
                : Path.Combine(Path.GetDirectoryName(o.Out) ?? "", $"{Path.GetFileNameWithoutExtension(o.Out)}-t{t.ToString("0.0##", CultureInfo.InvariantCulture)}.png");
            ImageGrid.Save(NativeSafety.Run(() => model.Sample(o.Count, t)), path);
            output.WriteLine($"wrote {o.Count} samples at temperature {t} to {path}");
        }
        return 0;
    }

    public static int Embed(EmbedOptions o, TextWriter output)
    {
        var model = Load(o.Checkpoint, "cpu");
        var c = model.Config;
        var data = DatasetLoader.Load(o.Data, c.Channels, c.Height, c.Width);
        Tensor Latents(ImageDataset set)
        {
            var parts = new List<Tensor>();
            for (int s = 0; s < set.Count; s += 256)
            {
                var idx = Enumerable.Range(s, Math.Min(256, set.Count - s)).ToArray();
                parts.Add(NativeSafety.Run(() =>
                {
                    using var _ = no_grad();
                    return model.Encode(set.Batch(idx)).flatten(1);
                }));
            }
            return cat(parts, 0);
        }
        var train = Latents(data.Train);
        var held = Latents(data.HeldOut);
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
            double acc = LinearProbe.Accuracy(train, data.Train.Labels, held, data.HeldOut.Labels);
            output.WriteLine($"linear probe (softmax regression on the latents): held-out accuracy {acc:P1}");
        }
        return 0;
    }
}

/// <summary>Softmax regression trained on latents, scored on held-out latents.</summary>
public static class LinearProbe
{
    public static double Accuracy(Tensor trainZ, int[] trainY, Tensor testZ, int[] testY, int epochs = 100)
    {
        int classes = Math.Max(trainY.Max(), testY.Max()) + 1;
        var mean = trainZ.mean(new long[] { 0 }, keepdim: true);
        var std = trainZ.std(0, keepdim: true) + 1e-6;
        var x = (trainZ - mean) / std;
        var y = tensor(trainY.Select(v => (long)v).ToArray());
        var lin = nn.Linear(x.shape[1], classes);
        var opt = optim.Adam(lin.parameters(), 0.01);
        for (int e = 0; e < epochs; e++)
            NativeSafety.Run(() =>
            {
                using var scope = NewDisposeScope();
                opt.zero_grad();
                var loss = nn.functional.cross_entropy(lin.call(x), y) + 1e-4 * lin.weight.square().sum();
                loss.backward();
                opt.step();
            });
        using var _ = no_grad();
        var pred = lin.call((testZ - mean) / std).argmax(1);
        var truth = tensor(testY.Select(v => (long)v).ToArray());
        return pred.eq(truth).to_type(float64).mean().item<double>();
    }
}
