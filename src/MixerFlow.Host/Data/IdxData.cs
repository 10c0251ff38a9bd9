namespace MixerFlow.Host.Data;

/// <summary>The IDX format (MNIST, Fashion-MNIST) in the registry: an images file, or a folder holding
/// train-/t10k- images files with their labels.</summary>
internal sealed class IdxData : IDataFormat
{
    public string Name => "IDX";
    public string Summary => "IDX files (MNIST / Fashion-MNIST)";
    public string FileDescription => $"an IDX images file (magic 0x{IdxFormat.ImagesMagic:X8}, raw or gzip)";
    public string FolderDescription => "IDX files (train-/t10k-images-idx3-ubyte[.gz])";

    public DataSplits? TryLoadFolder(string folder, DataRequest request)
    {
        var trainImages = Find(folder, "train-images-idx3-ubyte");
        var testImages = Find(folder, "t10k-images-idx3-ubyte");
        if (trainImages is null && testImages is null) return null;
        var train = trainImages is null ? null : IdxFormat.Read(trainImages, Find(folder, "train-labels-idx1-ubyte"));
        var test = testImages is null ? null : IdxFormat.Read(testImages, Find(folder, "t10k-labels-idx1-ubyte"));
        foreach (var part in new[] { train, test })
            if (part is not null) DatasetLoader.CheckShape(part, request, Name);
        if (train is not null && test is not null)
            return new DataSplits(train, test, $"IDX: {train.Count} train / {test.Count} test (t10k) from {folder}");
        return DatasetLoader.Split((train ?? test)!, request.Seed, $"IDX ({(train is null ? "t10k" : "train")} files only)");
    }

    public DataSplits? TryLoadFile(string file, DataRequest request)
    {
        switch (FileContent.Sniff(file, out _))
        {
            case ContentKind.IdxImages:
                var dataset = DatasetLoader.CheckShape(IdxFormat.Read(file, LabelsBeside(file)), request, Name);
                return DatasetLoader.Split(dataset, request.Seed, Name);
            case ContentKind.IdxLabels:
                throw new UserError($"'{file}' is an IDX labels file; pass the images file beside it, or their folder");
            case ContentKind.IdxOther:
                throw new UserError(
                    $"'{file}' is an IDX file of another kind (magic 0x{Magic(file):X8}); expected IDX images (magic 0x{IdxFormat.ImagesMagic:X8})");
            default:
                return null;
        }
    }

    static uint Magic(string file) =>
        System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(FileContent.Head(file, 4, out _));

    /// <summary>The labels file named like the images file (train-images-idx3-ubyte -> train-labels-idx1-ubyte), if present.</summary>
    static string? LabelsBeside(string imagesFile)
    {
        var name = Path.GetFileName(imagesFile);
        if (name.EndsWith(".gz", StringComparison.OrdinalIgnoreCase)) name = name[..^3];
        var labels = name.Replace("images", "labels").Replace("idx3", "idx1");
        return labels == name ? null : Find(Path.GetDirectoryName(imagesFile)!, labels);
    }

    /// <summary>The file named <paramref name="stem"/>, gzipped or not, also in the "train-images.idx3-ubyte" spelling.</summary>
    internal static string? Find(string folder, string stem)
    {
        int dash = stem.LastIndexOf('-');
        var dotted = stem[..dash] + "." + stem[(dash + 1)..];
        foreach (var name in new[] { stem, stem + ".gz", dotted, dotted + ".gz" })
        {
            var candidate = Path.Combine(folder, name);
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }
}
