using System.Text.RegularExpressions;

namespace MixerFlow.Host.Data;

/// <summary>CIFAR-10's binary batches in the registry: one batch file, or a folder of data_batch_N.bin
/// and test_batch.bin.</summary>
internal sealed partial class CifarData : IDataFormat
{
    public string Name => "CIFAR-10";
    public string Summary => "CIFAR-10 binary batches";
    public string FileDescription =>
        $"a CIFAR-10 binary batch ({CifarFormat.RecordBytes}-byte records: 1 label + {CifarFormat.Channels}x{CifarFormat.Side}x{CifarFormat.Side} pixels)";
    public string FolderDescription => "CIFAR-10 batches (data_batch_1.bin, ..., test_batch.bin)";

    public DataSplits? TryLoadFolder(string folder, DataRequest request)
    {
        var batches = Directory.GetFiles(folder)
            .Select(f => (Path: f, Match: TrainBatch().Match(Path.GetFileName(f))))
            .Where(b => b.Match.Success)
            .OrderBy(b => int.Parse(b.Match.Groups[1].Value))
            .Select(b => b.Path)
            .ToList();
        var testBatch = Path.Combine(folder, "test_batch.bin");
        bool hasTest = File.Exists(testBatch);
        if (batches.Count == 0 && !hasTest) return null;
        if (batches.Count > 0 && hasTest)
        {
            var train = DatasetLoader.CheckShape(CifarFormat.Read(batches), request, Name);
            var test = DatasetLoader.CheckShape(CifarFormat.Read(new[] { testBatch }), request, Name);
            return new DataSplits(train, test, $"CIFAR-10: {train.Count} train / {test.Count} test from {folder}");
        }
        var only = DatasetLoader.CheckShape(CifarFormat.Read(hasTest ? new[] { testBatch } : batches), request, Name);
        return DatasetLoader.Split(only, request.Seed, $"CIFAR-10 ({(hasTest ? "test batch" : "training batches")} only)");
    }

    /// <summary>A plain (not gzip) file of whole records whose label bytes are all class indices.</summary>
    public DataSplits? TryLoadFile(string file, DataRequest request)
    {
        FileContent.Head(file, 2, out bool gzip);
        if (gzip || new FileInfo(file).Length % CifarFormat.RecordBytes != 0) return null;
        var content = FileContent.ReadAll(file, Array.MaxLength, out _);
        if (!CifarFormat.Looks(content)) return null;
        var dataset = DatasetLoader.CheckShape(CifarFormat.Assemble(new[] { (file, content) }), request, Name);
        return DatasetLoader.Split(dataset, request.Seed, Name);
    }

    [GeneratedRegex(@"^data_batch_(\d{1,9})\.bin$")]
    private static partial Regex TrainBatch();
}
