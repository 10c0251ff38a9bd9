using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using MixerFlow.Host.Files;
using static TorchSharp.torch;

namespace MixerFlow.Host.Models;

/// <summary>
/// The safetensors format (Hugging Face), written and read by hand: an 8-byte little-endian
/// header length N, N bytes of JSON <c>{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..,
/// "__metadata__": {"key": "value", ..}}</c>, then the tensors' raw little-endian bytes (offsets
/// relative to the end of the header). Python reads it with the <c>safetensors</c> package or,
/// without it, with <c>json</c> and <c>torch.frombuffer</c> (see <c>benchmarks/mirror/mixerflow_mirror.py</c>).
/// Supported element types: float32 (F32), float64 (F64), int64 (I64), int32 (I32), uint8 (U8).
/// </summary>
public static class SafeTensors
{
    /// <summary>The format's cap on the header (100 MB), also applied when reading.</summary>
    const long MaxHeaderBytes = 100_000_000;

    /// <summary>
    /// Writes <paramref name="tensors"/> (copied to the CPU, contiguous) under their names, in the
    /// order given, with string <paramref name="metadata"/> in the header's <c>__metadata__</c>.
    /// Written to a temporary file and renamed, so a crash never leaves a broken file.
    /// </summary>
    /// <param name="path">The .safetensors file to write.</param>
    /// <param name="tensors">Name and tensor; names must be unique and not <c>__metadata__</c>.</param>
    /// <param name="metadata">String key-value pairs for the header, or null.</param>
    /// <exception cref="ArgumentException">A repeated or reserved name, or an unsupported dtype (naming the tensor).</exception>
    public static void Write(string path, IEnumerable<(string Name, Tensor Tensor)> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        ArgumentNullException.ThrowIfNull(tensors);
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("safetensors export needs a little-endian machine");
        var blobs = new List<(string Name, string DType, long[] Shape, byte[] Bytes)>();
        var seen = new HashSet<string>();
        foreach (var (name, tensor) in tensors)
        {
            if (string.IsNullOrEmpty(name) || name == "__metadata__") throw new ArgumentException($"safetensors: tensor name '{name}' is reserved or empty", nameof(tensors));
            if (!seen.Add(name)) throw new ArgumentException($"safetensors: tensor name '{name}' given twice", nameof(tensors));
            blobs.Add((name, Code(tensor.dtype, name), tensor.shape, Bytes(tensor)));
        }
        var header = new MemoryStream();
        using (var j = new Utf8JsonWriter(header))
        {
            j.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                j.WriteStartObject("__metadata__");
                foreach (var (k, v) in metadata) j.WriteString(k, v);
                j.WriteEndObject();
            }
            long offset = 0;
            foreach (var (name, dtype, shape, bytes) in blobs)
            {
                j.WriteStartObject(name);
                j.WriteString("dtype", dtype);
                j.WriteStartArray("shape");
                foreach (var s in shape) j.WriteNumberValue(s);
                j.WriteEndArray();
                j.WriteStartArray("data_offsets");
                j.WriteNumberValue(offset);
                j.WriteNumberValue(offset + bytes.LongLength);
                j.WriteEndArray();
                j.WriteEndObject();
                offset += bytes.LongLength;
            }
            j.WriteEndObject();
        }
        // The format pads the header with spaces to a multiple of 8 bytes (aligned data).
        var headerBytes = header.ToArray();
        int pad = (8 - headerBytes.Length % 8) % 8;
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
        AtomicFile.Write(path, (Stream stream) =>
        {
            using var w = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true);
            w.Write((ulong)(headerBytes.Length + pad)); // BinaryWriter writes little-endian
            w.Write(headerBytes);
            for (int i = 0; i < pad; i++) w.Write((byte)' ');
            foreach (var b in blobs) w.Write(b.Bytes);
        });
    }

    /// <summary>Reads every tensor of a safetensors file (on the CPU) and its string metadata.</summary>
    /// <param name="path">The .safetensors file.</param>
    /// <exception cref="UserError">A file that is not safetensors, truncated, or holds an unsupported dtype, naming the file and the tensor.</exception>
    public static (IReadOnlyDictionary<string, Tensor> Tensors, IReadOnlyDictionary<string, string> Metadata) Read(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("safetensors import needs a little-endian machine");
        byte[] all;
        all = Files.InputFile.ReadAllBytes(path, Array.MaxLength, "a safetensors file");
        if (all.Length < 8) throw new UserError($"{path}: not a safetensors file (shorter than its 8-byte header length)");
        long n = BitConverter.ToInt64(all, 0);
        if (n < 2 || n > MaxHeaderBytes || 8 + n > all.Length) throw new UserError($"{path}: not a safetensors file (header length {n} for a file of {all.Length} bytes)");
        var tensors = new Dictionary<string, Tensor>();
        var metadata = new Dictionary<string, string>();
        long dataStart = 8 + n;
        JsonDocument doc;
        try { doc = JsonDocument.Parse(all.AsMemory(8, (int)n)); }
        catch (JsonException e) { throw new UserError($"{path}: the safetensors header is not valid JSON: {e.Message}", e); }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new UserError($"{path}: the safetensors header is not a JSON object");
            foreach (var entry in doc.RootElement.EnumerateObject())
            {
                if (entry.Name == "__metadata__")
                {
                    foreach (var m in entry.Value.EnumerateObject()) metadata[m.Name] = m.Value.GetString() ?? "";
                    continue;
                }
                try
                {
                    string dtype = entry.Value.GetProperty("dtype").GetString() ?? "";
                    long[] shape = entry.Value.GetProperty("shape").EnumerateArray().Select(e => e.GetInt64()).ToArray();
                    long[] offsets = entry.Value.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()).ToArray();
                    if (offsets.Length != 2 || offsets[0] < 0 || offsets[1] < offsets[0] || dataStart + offsets[1] > all.Length)
                        throw new UserError($"{path}: tensor '{entry.Name}': data_offsets [{string.Join(", ", offsets)}] lie outside the file's {all.Length - dataStart} data bytes");
                    var bytes = all.AsSpan((int)(dataStart + offsets[0]), (int)(offsets[1] - offsets[0]));
                    tensors[entry.Name] = FromBytes(bytes, dtype, shape, $"{path}: tensor '{entry.Name}'");
                }
                catch (Exception e) when (e is KeyNotFoundException or InvalidOperationException or FormatException)
                {
                    throw new UserError($"{path}: tensor '{entry.Name}': needs dtype, shape and data_offsets ({e.Message})", e);
                }
            }
        }
        return (tensors, metadata);
    }

    static string Code(ScalarType t, string name) => t switch
    {
        ScalarType.Float32 => "F32",
        ScalarType.Float64 => "F64",
        ScalarType.Int64 => "I64",
        ScalarType.Int32 => "I32",
        ScalarType.Byte => "U8",
        _ => throw new ArgumentException($"safetensors: tensor '{name}' has dtype {t}; supported: float32, float64, int64, int32, uint8"),
    };

    static byte[] Bytes(Tensor t)
    {
        using var cpu = t.detach().cpu().contiguous();
        return cpu.dtype switch
        {
            ScalarType.Float32 => MemoryMarshal.AsBytes(cpu.data<float>().ToArray().AsSpan()).ToArray(),
            ScalarType.Float64 => MemoryMarshal.AsBytes(cpu.data<double>().ToArray().AsSpan()).ToArray(),
            ScalarType.Int64 => MemoryMarshal.AsBytes(cpu.data<long>().ToArray().AsSpan()).ToArray(),
            ScalarType.Int32 => MemoryMarshal.AsBytes(cpu.data<int>().ToArray().AsSpan()).ToArray(),
            ScalarType.Byte => cpu.data<byte>().ToArray(),
            _ => throw new ArgumentException($"safetensors: unsupported dtype {cpu.dtype}"),
        };
    }

    static Tensor FromBytes(ReadOnlySpan<byte> bytes, string dtype, long[] shape, string what)
    {
        long count = shape.Aggregate(1L, (a, b) => a * b);
        int size = dtype switch { "F32" or "I32" => 4, "F64" or "I64" => 8, "U8" => 1, _ => 0 };
        if (size == 0) throw new UserError($"{what}: dtype '{dtype}' is not supported (F32, F64, I64, I32, U8)");
        if (bytes.Length != count * size) throw new UserError($"{what}: shape [{string.Join(", ", shape)}] of {dtype} needs {count * size} bytes, the offsets give {bytes.Length}");
        return dtype switch
        {
            "F32" => tensor(MemoryMarshal.Cast<byte, float>(bytes).ToArray(), shape),
            "F64" => tensor(MemoryMarshal.Cast<byte, double>(bytes).ToArray(), shape),
            "I64" => tensor(MemoryMarshal.Cast<byte, long>(bytes).ToArray(), shape),
            "I32" => tensor(MemoryMarshal.Cast<byte, int>(bytes).ToArray(), shape),
            _ => tensor(bytes.ToArray(), shape),
        };
    }
}
