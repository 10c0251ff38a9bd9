using System.Security.Cryptography;
using System.Text;
using MixerFlow.Core;
using MixerFlow.Host.Files;
using TorchSharp;
using TorchSharp.Modules;
using Adam = MixerFlow.Core.Adam;
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
    /// <remarks>
    /// 3: checksummed. After the header fields come the SHA-256 of the header's bytes, then each
    /// section (the model's tensors; the optimiser's state when the header says there is one) as
    /// its length (Int64), its SHA-256 and its bytes. Every checksum is verified before anything
    /// of its section is used, so a damaged file is refused by name instead of loading silently.
    /// 4: spline knot derivatives as softplus(u + c) + 1e-3 with c = <see cref="Spline.DerivativeShift"/>
    /// (zero parameters give derivative 1), where earlier versions had softplus(u) + 1e-3. A
    /// spline model of an earlier version is converted as it loads: c is subtracted from the
    /// conditioner biases that produce u, so that it computes exactly what it computed before.
    /// 5: the header ends with a flag saying whether a weight average's section follows the
    /// optimiser's (<see cref="WeightAverage"/>): then the model's tensors are the averaged
    /// parameters (what <c>eval</c>, <c>sample</c> and <c>export</c> use), and that section holds
    /// the trained parameters and the update count, from which a resumed run continues both.
    /// </remarks>
    const int Version = 5;
    const int FirstWithAverage = 5;
    const int OldestReadable = 1;
    const int FirstShiftedSplineDerivatives = 4;
    const int FirstChecksummed = 3;
    const int HashBytes = 32;

    /// <summary>What a checkpoint's header holds: the model's configuration, the step and epoch it was saved at,
    /// the best score so far (the bits/dim that chooses best.ckpt: held-out, or validation where the run holds
    /// images out), whether the optimiser's state follows, the file format's version, and whether a weight
    /// average's state follows (the model's tensors are then the averaged parameters).</summary>
    public sealed record Header(ModelConfig Config, long Step, int Epoch, double BestHeldOutBpd, bool HasOptimizer, int FileVersion, bool HasAverage = false);

    /// <summary>
    /// Writes a checkpoint atomically. With a weight <paramref name="average"/> (which averages
    /// <paramref name="optimizer"/>'s parameters) the model's tensors are saved with the averaged
    /// parameters, and the average's state (the trained parameters, the update count) follows.
    /// </summary>
    public static void Save(string path, ImageFlow model, long step, int epoch, double bestHeldOutBpd,
                            Adam? optimizer = null, WeightAverage? average = null)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
        AtomicFile.Write(path, Writer(model, step, epoch, bestHeldOutBpd, optimizer, average));
    }

    /// <summary>
    /// A checkpoint in memory, the bytes <see cref="Save"/> would write: how data-parallel training
    /// hands rank 0's model, optimiser and weight-average state to the other ranks (<see cref="LoadInto(byte[], string, ImageFlow, Adam?, WeightAverage?)"/>).
    /// </summary>
    public static byte[] ToBytes(ImageFlow model, long step, int epoch, double bestHeldOutBpd, Adam? optimizer = null, WeightAverage? average = null)
    {
        using var ms = new MemoryStream();
        Writer(model, step, epoch, bestHeldOutBpd, optimizer, average)(ms);
        return ms.ToArray();
    }

    static Action<Stream> Writer(ImageFlow model, long step, int epoch, double bestHeldOutBpd, Adam? optimizer, WeightAverage? average)
    {
        var header = new MemoryStream();
        using (var h = new BinaryWriter(header, Encoding.UTF8, leaveOpen: true))
        {
            h.Write(Magic);
            h.Write(Version);
            h.Write(model.Config.ToJson());
            h.Write(step);
            h.Write(epoch);
            h.Write(bestHeldOutBpd);
            h.Write(optimizer is not null);
            h.Write(average is not null);
        }
        byte[] tensors;
        using (average?.Apply()) tensors = Section(w => model.save(w));
        var optimiser = optimizer is null ? null : Section(w => optimizer.SaveState(w));
        var averaging = average is null ? null : Section(w => average.SaveState(w));
        return stream =>
        {
            using var w = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true);
            var headerBytes = header.ToArray();
            w.Write(headerBytes);
            w.Write(SHA256.HashData(headerBytes));
            WriteSection(w, tensors);
            if (optimiser is not null) WriteSection(w, optimiser);
            if (averaging is not null) WriteSection(w, averaging);
        };
    }

    static byte[] Section(Action<BinaryWriter> write)
    {
        using var ms = new MemoryStream();
        using (var w = new BinaryWriter(ms, Encoding.UTF8, leaveOpen: true)) write(w);
        return ms.ToArray();
    }

    static void WriteSection(BinaryWriter w, byte[] bytes)
    {
        w.Write((long)bytes.Length);
        w.Write(SHA256.HashData(bytes));
        w.Write(bytes);
    }

    static UserError Truncated(string path, string where, Exception? e = null) =>
        new($"{path}: the checkpoint is truncated or damaged (it ends or breaks off inside {where}); it cannot be loaded", e);

    static UserError Damaged(string path, string section) =>
        new($"{path}: the checkpoint is damaged: the checksum of its {section} does not match (the file was changed or corrupted after it was written)");

    /// <summary>Reads one header field; a file that ends inside it is a truncated checkpoint, not a stack trace.</summary>
    static T Field<T>(string path, Func<T> read)
    {
        try { return read(); }
        catch (Exception e) when (e is EndOfStreamException or IOException or FormatException or DecoderFallbackException)
        {
            throw Truncated(path, "its header", e);
        }
    }

    /// <summary>A length-prefixed string, refusing a length beyond the file's end (no huge allocation for a damaged length).</summary>
    static string ReadString(BinaryReader r, string path)
    {
        int length = Field(path, r.Read7BitEncodedInt);
        var s = r.BaseStream;
        if (length < 0 || length > s.Length - s.Position) throw Truncated(path, "its header");
        var bytes = Field(path, () => r.ReadBytes(length));
        if (bytes.Length != length) throw Truncated(path, "its header");
        return Field(path, () => new UTF8Encoding(false, true).GetString(bytes));
    }

    static Header ReadHeader(BinaryReader r, string path)
    {
        string magic;
        try { magic = ReadString(r, path); }
        catch (UserError) { throw new UserError($"{path}: not a MixerFlow checkpoint (file too short or bad header)"); }
        if (magic != Magic) throw new UserError($"{path}: not a MixerFlow checkpoint (bad header)");
        int version = Field(path, r.ReadInt32);
        if (version < OldestReadable || version > Version)
            throw new UserError($"{path}: checkpoint version {version}, this program reads versions {OldestReadable} to {Version}");
        var json = ReadString(r, path);
        long step = Field(path, r.ReadInt64);
        int epoch = Field(path, r.ReadInt32);
        double best = Field(path, r.ReadDouble);
        bool hasOptimizer = Field(path, r.ReadBoolean);
        bool hasAverage = version >= FirstWithAverage && Field(path, r.ReadBoolean);
        if (version >= FirstChecksummed)
        {
            long end = r.BaseStream.Position;
            var stored = Field(path, () => r.ReadBytes(HashBytes));
            if (stored.Length != HashBytes) throw Truncated(path, "its header");
            var s = r.BaseStream;
            s.Position = 0;
            var bytes = new byte[end];
            s.ReadExactly(bytes);
            s.Position = end + HashBytes;
            if (!SHA256.HashData(bytes).AsSpan().SequenceEqual(stored)) throw Damaged(path, "header");
        }
        CheckFields(path, step, epoch, best);
        var config = ModelConfig.FromJson(json, path);
        return new Header(config, step, epoch, best, hasOptimizer, version, hasAverage);
    }

    /// <summary>Refuses header values no run writes (a file altered and checksummed again, or written by another program).</summary>
    static void CheckFields(string path, long step, int epoch, double best)
    {
        string? bad = step < 0 ? $"step: must be >= 0, got {step}"
            : epoch < 0 ? $"epoch: must be >= 0, got {epoch}"
            : double.IsNaN(best) ? "best held-out bits/dim: must be a number, got NaN"
            : null;
        if (bad is not null) throw new UserError($"{path}: invalid checkpoint header: {bad}");
    }

    /// <summary>Reads a checksummed section whole and verifies it before any of it is used.</summary>
    static BinaryReader ReadSection(BinaryReader r, string path, string section)
    {
        long length = Field(path, r.ReadInt64);
        var s = r.BaseStream;
        if (length < 0 || length > s.Length - s.Position - HashBytes) throw Truncated(path, $"its {section}");
        if (length > Array.MaxLength) throw new UserError($"{path}: the checkpoint's {section} claims {length:N0} bytes, more than this program can load");
        var stored = Field(path, () => r.ReadBytes(HashBytes));
        var bytes = Field(path, () => r.ReadBytes((int)length));
        if (stored.Length != HashBytes || bytes.Length != length) throw Truncated(path, $"its {section}");
        if (!SHA256.HashData(bytes).AsSpan().SequenceEqual(stored)) throw Damaged(path, section);
        return new BinaryReader(new MemoryStream(bytes, writable: false), Encoding.UTF8);
    }

    static FileStream Open(string path, long limit = long.MaxValue)
    {
        if (Directory.Exists(path))
            throw new UserError(File.Exists(Path.Combine(path, "last.ckpt"))
                ? $"{path}: is a folder, not a checkpoint file; a run folder's checkpoints are {Path.Combine(path, "last.ckpt")} and {Path.Combine(path, "best.ckpt")}"
                : $"{path}: is a folder, not a checkpoint file");
        if (!File.Exists(path)) throw new UserError($"{path}: checkpoint file not found");
        // A regular file only (a pipe or a device such as /dev/zero is refused before it is opened);
        // its sections' lengths are checked against the file's length before they are read.
        return InputFile.Open(path, limit, "a checkpoint");
    }

    /// <summary>
    /// The whole file, for reading it once: <see cref="ReadConfig(byte[], string)"/> and then
    /// <see cref="LoadInto(byte[], string, ImageFlow, Adam?, WeightAverage?)"/> (a resume builds the model from the
    /// configuration before it loads the tensors). Errors name the file.
    /// </summary>
    public static byte[] ReadBytes(string path)
    {
        // Refused by its size before it is read: the whole file must fit one array.
        using var fs = Open(path, Array.MaxLength);
        using var ms = new MemoryStream();
        try { fs.CopyTo(ms); }
        catch (IOException e) { throw new UserError($"{path}: cannot read the checkpoint ({OutputPath.Reason(e)})", e); }
        return ms.ToArray();
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
    /// the file and the caller have one, its optimiser state into `optimizer` and its weight
    /// average's state into <paramref name="average"/> (which averages `optimizer`'s parameters):
    /// the model's parameters are then the trained ones and the average continues. Without an
    /// average given, the model keeps the file's model tensors (the averaged parameters where the
    /// run averaged them). From version 3 every section is verified against its checksum before any is loaded.
    /// </summary>
    public static Header LoadInto(string path, ImageFlow model, Adam? optimizer, WeightAverage? average = null)
    {
        using var fs = Open(path);
        return LoadInto(fs, path, model, optimizer, average);
    }

    /// <summary>
    /// <see cref="LoadInto(string, ImageFlow, Adam?, WeightAverage?)"/> from a checkpoint in memory (<see cref="ToBytes"/>);
    /// <paramref name="name"/> names it in errors.
    /// </summary>
    public static Header LoadInto(byte[] bytes, string name, ImageFlow model, Adam? optimizer, WeightAverage? average = null)
    {
        using var ms = new MemoryStream(bytes, writable: false);
        return LoadInto(ms, name, model, optimizer, average);
    }

    /// <summary>The configuration in a checkpoint in memory (<see cref="ToBytes"/>).</summary>
    public static ModelConfig ReadConfig(byte[] bytes, string name)
    {
        using var ms = new MemoryStream(bytes, writable: false);
        using var r = new BinaryReader(ms, Encoding.UTF8);
        return ReadHeader(r, name).Config;
    }

    static Header LoadInto(Stream fs, string path, ImageFlow model, Adam? optimizer, WeightAverage? average)
    {
        using var r = new BinaryReader(fs, Encoding.UTF8, leaveOpen: true);
        var header = ReadHeader(r, path);
        if (header.Config != model.Config)
            throw new UserError($"{path}: checkpoint of model '{header.Config.Name}' does not match the model '{model.Config.Name}' it is loaded into");
        BinaryReader tensors = r, optimiser = r, averaging = r;
        if (header.FileVersion >= FirstChecksummed)
        {
            tensors = ReadSection(r, path, "model tensors");
            if (header.HasOptimizer) optimiser = ReadSection(r, path, "optimiser state");
            if (header.HasAverage) averaging = ReadSection(r, path, "weight average");
        }
        try
        {
            LoadState(model, tensors, path, header.FileVersion);
            if (header.FileVersion < FirstShiftedSplineDerivatives) ShiftSplineDerivatives(model);
            if (header.HasOptimizer) optimizer?.LoadState(optimiser);
            if (header.HasAverage) average?.LoadState(averaging);
        }
        catch (Exception e) when (e is not UserError)
        {
            throw new UserError($"{path}: checkpoint is damaged or does not match its configuration ({e.Message})", e);
        }
        finally
        {
            if (tensors != r) tensors.Dispose();
            if (optimiser != r) optimiser.Dispose();
            if (averaging != r) averaging.Dispose();
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

    /// <summary>
    /// Converts the spline couplings of a model read from a file before version 4 to the shifted
    /// knot-derivative parameterisation: the conditioner's last layer produces, for each of the
    /// nB transformed values, the map's parameters as blocks of nB outputs (parameter j at outputs
    /// j nB ... (j + 1) nB - 1); the inner derivatives are parameters 2K ... 3K - 2, and their biases
    /// lose c, so that softplus(u - c + c) is the softplus(u) of before.
    /// </summary>
    static void ShiftSplineDerivatives(ImageFlow model)
    {
        using var _ = no_grad();
        foreach (var coupling in model.modules().OfType<Coupling>())
        {
            if (coupling.Map is not RationalQuadratic spline) continue;
            var last = coupling.Conditioner.modules().Where(m => m is TorchSharp.Modules.Linear or TorchSharp.Modules.Conv2d).LastOrDefault();
            var bias = last switch
            {
                TorchSharp.Modules.Linear l => l.bias,
                TorchSharp.Modules.Conv2d c => c.bias,
                _ => null,
            } ?? throw new InvalidOperationException($"{coupling.Name}: a spline coupling's conditioner without a last layer with a bias");
            long nB = coupling.Partition.Transformed.Length;
            bias.narrow(0, 2L * spline.Bins * nB, (spline.Bins - 1L) * nB).sub_(Ops.Scalar(Spline.DerivativeShift));
        }
    }
}
