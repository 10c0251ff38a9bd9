using System.Text;
using MixerFlow.Host.Files;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MixerFlow.Host.Models;

/// <summary>
/// A checkpoint file: a header, the model configuration (JSON), the training step, the model's
/// tensors (TorchSharp's format) and, optionally, the optimiser's state. Written to a temporary
/// file, flushed and renamed, so a crash never leaves a broken checkpoint.
/// </summary>
public static class Checkpoint
{
    const string Magic = "MIXERFLOW-CHECKPOINT";
    /// <summary>
    /// 2: each tensor stored once. Version 1 files hold many tensors a second time under
    /// compiler-generated names (F# fields such as <c>parts@136</c> that TorchSharp also registered);
    /// they load by name, the extra copies skipped.
    /// </summary>
    const int Version = 2;
    const int OldestReadable = 1;

    public sealed record Header(ModelConfig Config, long Step, int Epoch, double BestHeldOutBpd, bool HasOptimizer, int FileVersion);

    public static void Save(string path, ImageFlow model, long step, int epoch, double bestHeldOutBpd,
                            OptimizerHelper? optimizer = null)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
        AtomicFile.Write(path, (Stream stream) =>
        {
            using var w = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true);
            w.Write(Magic);
            w.Write(Version);
            w.Write(model.Config.ToJson());
            w.Write(step);
            w.Write(epoch);
            w.Write(bestHeldOutBpd);
            w.Write(optimizer is not null);
            model.save(w);
            optimizer?.save_state_dict(w);
        });
    }

    static Header ReadHeader(BinaryReader r, string path)
    {
        string magic;
        try { magic = r.ReadString(); }
        catch (Exception e) when (e is EndOfStreamException or IOException) { throw new UserError($"{path}: not a MixerFlow checkpoint (file too short)"); }
        if (magic != Magic) throw new UserError($"{path}: not a MixerFlow checkpoint (bad header)");
        int version = r.ReadInt32();
        if (version < OldestReadable || version > Version)
            throw new UserError($"{path}: checkpoint version {version}, this program reads versions {OldestReadable} to {Version}");
        var config = ModelConfig.FromJson(r.ReadString(), path);
        return new Header(config, r.ReadInt64(), r.ReadInt32(), r.ReadDouble(), r.ReadBoolean(), version);
    }

    static FileStream Open(string path)
    {
        if (!File.Exists(path)) throw new UserError($"{path}: checkpoint file not found");
        return File.OpenRead(path);
    }

    public static ModelConfig ReadConfig(string path)
    {
        using var fs = Open(path);
        using var r = new BinaryReader(fs, Encoding.UTF8);
        return ReadHeader(r, path).Config;
    }

    /// <summary>Rebuilds the model from the file.</summary>
    public static (ImageFlow Model, Header Header) Load(string path)
    {
        var model = new ImageFlow(ReadConfig(path));
        return (model, LoadInto(path, model, null));
    }

    /// <summary>
    /// Loads the file's tensors into an existing model of the same configuration and, when both
    /// the file and the caller have one, its optimiser state into `optimizer`.
    /// </summary>
    public static Header LoadInto(string path, ImageFlow model, OptimizerHelper? optimizer)
    {
        using var fs = Open(path);
        using var r = new BinaryReader(fs, Encoding.UTF8);
        var header = ReadHeader(r, path);
        if (header.Config != model.Config)
            throw new UserError($"{path}: checkpoint of model '{header.Config.Name}' does not match the model '{model.Config.Name}' it is loaded into");
        try
        {
            LoadState(model, r, path, header.FileVersion);
            if (header.HasOptimizer) optimizer?.load_state_dict(r);
        }
        catch (Exception e) when (e is not UserError)
        {
            throw new UserError($"{path}: checkpoint is damaged or does not match its configuration ({e.Message})", e);
        }
        return header;
    }

    /// <summary>
    /// Reads the model's tensors by name (TorchSharp's format: an entry count, then name and tensor
    /// pairs). Version 1 names the body <c>body.*</c> (now <c>transform.parts.1.*</c>) and holds
    /// extra copies under compiler-generated names, which are skipped; from version 2 every name
    /// must be the model's. Every tensor of the model must be in the file, but for the base
    /// distribution's empty reference buffer, which version 1 did not have.
    /// </summary>
    static void LoadState(ImageFlow model, BinaryReader r, string path, int version)
    {
        var device = model.Device;
        if (device.type != DeviceType.CPU) model.to(CPU);
        try
        {
            var state = model.state_dict();
            var loaded = new HashSet<string>();
            long entries = r.Read7BitEncodedInt64(); // TorchSharp writes the count as LEB128
            for (long i = 0; i < entries; i++)
            {
                var stored = r.ReadString();
                var name = version == 1 && stored.StartsWith("body.", StringComparison.Ordinal) ? "transform.parts.1." + stored[5..] : stored;
                if (state.TryGetValue(name, out var tensor) && loaded.Add(name)) tensor.Load(r);
                else if (version >= 2) throw new UserError($"{path}: the checkpoint holds a tensor '{stored}' that the model '{model.Config.Name}' does not have");
                else TensorExtensionMethods.Load(r, skip: true);
            }
            var missing = state.Keys.Where(k => !loaded.Contains(k) && !(version == 1 && k == ReferenceBuffer)).ToList();
            if (missing.Count > 0)
                throw new UserError($"{path}: the checkpoint lacks {missing.Count} of the model's tensors (first: {missing[0]})");
        }
        finally
        {
            if (device.type != DeviceType.CPU) model.to(device);
        }
    }

    const string ReferenceBuffer = "baseDistribution.reference";
}
