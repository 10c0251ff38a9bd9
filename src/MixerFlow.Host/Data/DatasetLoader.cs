using System.Text.RegularExpressions;

namespace MixerFlow.Host.Data;

/// <summary>
/// Loads training and held-out images from a file or folder, recognising IDX (MNIST, Fashion-MNIST),
/// CIFAR-10 binary batches and folders of PNG/JPEG images by their content.
/// </summary>
public static partial class DatasetLoader
{
    /// <summary>Names the folder holding the bundled data set's files, overriding the search above the program.</summary>
    public const string DataEnvironmentVariable = "MIXERFLOW_DATA";

    /// <summary>The share held out when the source has no split of its own.</summary>
    public const double HeldOutFraction = 0.1;

    const string BundledFolder = "data/fashion-mnist";
    const string Expected =
        "expected an IDX images file (magic 0x00000803, raw or gzip), a CIFAR-10 binary batch " +
        "(3073-byte records: 1 label + 3x32x32 pixels), or a folder holding IDX files (train-/t10k-images-idx3-ubyte[.gz]), " +
        "CIFAR-10 batches (data_batch_1.bin, ..., test_batch.bin) or PNG/JPEG images";

    /// <summary>
    /// Loads <paramref name="path"/> (or, when null, the bundled Fashion-MNIST test split) for a model of
    /// <paramref name="channels"/> x <paramref name="height"/> x <paramref name="width"/>. Sources without a split
    /// of their own are split by a shuffle seeded with <paramref name="seed"/>.
    /// </summary>
    /// <exception cref="UserError">The data is missing, damaged, of an unknown format, or does not fit the model.</exception>
    public static DataSplits Load(string? path, int channels, int height, int width, int seed = 0)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(channels);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(height);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(width);
        var shape = new Shape(channels, height, width);
        if (path is null) return LoadBundled(shape, seed);
        if (path.Trim().Length == 0) throw new UserError("the data path is empty");
        var full = Path.GetFullPath(path);
        if (Directory.Exists(full)) return LoadFolder(full, shape, seed);
        if (File.Exists(full)) return LoadFile(full, shape, seed);
        throw new UserError($"'{path}' does not exist");
    }

    readonly record struct Shape(int Channels, int Height, int Width)
    {
        public override string ToString() => $"{Channels}x{Height}x{Width}";
    }

    static DataSplits LoadBundled(Shape shape, int seed)
    {
        if (shape != new Shape(1, 28, 28))
            throw new UserError(
                $"the bundled data set (Fashion-MNIST, 1x28x28 images) does not fit a model of {shape}; " +
                "pass --data with images for this model");
        var folder = LocateBundled();
        var images = FindIdx(folder, "t10k-images-idx3-ubyte")
                     ?? throw new UserError($"'{folder}' lacks t10k-images-idx3-ubyte.gz, the bundled data set");
        var dataset = IdxFormat.Read(images, FindIdx(folder, "t10k-labels-idx1-ubyte"));
        CheckShape(dataset, shape, "IDX");
        return Split(dataset, seed, "Fashion-MNIST test split (bundled)");
    }

    /// <summary>
    /// The bundled data set's folder: the one <see cref="DataEnvironmentVariable"/> names (or its fashion-mnist
    /// subfolder), else the first data/fashion-mnist found walking up from the program, which finds the
    /// repository's copy from any build output folder.
    /// </summary>
    internal static string LocateBundled()
    {
        var overridden = Environment.GetEnvironmentVariable(DataEnvironmentVariable);
        if (!string.IsNullOrWhiteSpace(overridden))
        {
            foreach (var candidate in new[] { Path.Combine(overridden, "fashion-mnist"), overridden })
                if (FindIdx(candidate, "t10k-images-idx3-ubyte") is not null) return Path.GetFullPath(candidate);
            throw new UserError(
                $"{DataEnvironmentVariable}='{overridden}' holds no t10k-images-idx3-ubyte[.gz], " +
                "neither directly nor in a fashion-mnist subfolder");
        }
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            var candidate = Path.Combine(dir.FullName, BundledFolder);
            if (Directory.Exists(candidate)) return candidate;
        }
        throw new UserError(
            $"the bundled data set ({BundledFolder}) was not found in any folder above '{AppContext.BaseDirectory}'; " +
            $"set {DataEnvironmentVariable} to its folder, or pass --data");
    }

    static DataSplits LoadFolder(string folder, Shape shape, int seed)
    {
        var trainImages = FindIdx(folder, "train-images-idx3-ubyte");
        var testImages = FindIdx(folder, "t10k-images-idx3-ubyte");
        if (trainImages is not null || testImages is not null)
        {
            var train = trainImages is null ? null : IdxFormat.Read(trainImages, FindIdx(folder, "train-labels-idx1-ubyte"));
            var test = testImages is null ? null : IdxFormat.Read(testImages, FindIdx(folder, "t10k-labels-idx1-ubyte"));
            foreach (var part in new[] { train, test })
                if (part is not null) CheckShape(part, shape, "IDX");
            if (train is not null && test is not null)
                return new DataSplits(train, test, $"IDX: {train.Count} train / {test.Count} test (t10k) from {folder}");
            return Split((train ?? test)!, seed, $"IDX ({(train is null ? "t10k" : "train")} files only)");
        }

        var batches = Directory.GetFiles(folder)
            .Select(f => (Path: f, Match: CifarTrainBatch().Match(Path.GetFileName(f))))
            .Where(b => b.Match.Success)
            .OrderBy(b => int.Parse(b.Match.Groups[1].Value))
            .Select(b => b.Path)
            .ToList();
        var testBatch = Path.Combine(folder, "test_batch.bin");
        bool hasTest = File.Exists(testBatch);
        if (batches.Count > 0 || hasTest)
        {
            if (batches.Count > 0 && hasTest)
            {
                var train = CheckShape(CifarFormat.Read(batches), shape, "CIFAR-10");
                var test = CheckShape(CifarFormat.Read(new[] { testBatch }), shape, "CIFAR-10");
                return new DataSplits(train, test, $"CIFAR-10: {train.Count} train / {test.Count} test from {folder}");
            }
            var only = CheckShape(CifarFormat.Read(hasTest ? new[] { testBatch } : batches), shape, "CIFAR-10");
            return Split(only, seed, $"CIFAR-10 ({(hasTest ? "test batch" : "training batches")} only)");
        }

        var read = ImageFolderFormat.Read(folder, shape.Channels, shape.Height, shape.Width);
        var what = read.Classes is null
            ? "PNG/JPEG images, unlabelled"
            : $"PNG/JPEG images in {read.Classes.Length} classes ({Abbreviate(read.Classes)})";
        if (read.Skipped > 0) what += $", {read.Skipped} other files skipped";
        return Split(read.Images, seed, $"{what}, resized and centre-cropped to {shape}");
    }

    [GeneratedRegex(@"^data_batch_(\d{1,9})\.bin$")]
    private static partial Regex CifarTrainBatch();

    static string Abbreviate(string[] names) =>
        names.Length <= 5 ? string.Join(", ", names) : string.Join(", ", names.Take(4)) + $", ... {names[^1]}";

    static DataSplits LoadFile(string file, Shape shape, int seed)
    {
        switch (FileContent.Sniff(file, out bool gzip))
        {
            case ContentKind.IdxImages:
                var dataset = CheckShape(IdxFormat.Read(file, LabelsBeside(file)), shape, "IDX");
                return Split(dataset, seed, "IDX");
            case ContentKind.IdxLabels:
                throw new UserError($"'{file}' is an IDX labels file; pass the images file beside it, or their folder");
            case ContentKind.IdxOther:
                throw new UserError(
                    $"'{file}' is an IDX file of another kind (magic 0x{Magic(file):X8}); expected IDX images (magic 0x00000803)");
            case ContentKind.Png or ContentKind.Jpeg:
                throw new UserError($"'{file}' is a single image; pass the folder that holds the images");
        }
        if (!gzip && new FileInfo(file).Length % CifarFormat.RecordBytes == 0)
        {
            var content = FileContent.ReadAll(file, Array.MaxLength, out _);
            if (CifarFormat.Looks(content))
                return Split(CheckShape(CifarFormat.Assemble(new[] { (file, content) }), shape, "CIFAR-10"), seed, "CIFAR-10");
        }
        var head = FileContent.Head(file, 8, out _);
        var start = head.Length == 0 ? "it is empty" : $"it starts with {Convert.ToHexString(head)}";
        throw new UserError($"'{file}' is not a recognised data file ({start}{(gzip ? " after gunzipping" : "")}); {Expected}");
    }

    static uint Magic(string file) =>
        System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(FileContent.Head(file, 4, out _));

    /// <summary>The labels file named like the images file (train-images-idx3-ubyte -> train-labels-idx1-ubyte), if present.</summary>
    static string? LabelsBeside(string imagesFile)
    {
        var name = Path.GetFileName(imagesFile);
        if (name.EndsWith(".gz", StringComparison.OrdinalIgnoreCase)) name = name[..^3];
        var labels = name.Replace("images", "labels").Replace("idx3", "idx1");
        return labels == name ? null : FindIdx(Path.GetDirectoryName(imagesFile)!, labels);
    }

    /// <summary>The file named <paramref name="stem"/>, gzipped or not, also in the "train-images.idx3-ubyte" spelling.</summary>
    static string? FindIdx(string folder, string stem)
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

    /// <summary>IDX and CIFAR-10 images are used as they are: resizing them would silently change the benchmark.</summary>
    static ImageDataset CheckShape(ImageDataset data, Shape shape, string format)
    {
        var holds = new Shape(data.Channels, data.Height, data.Width);
        if (holds != shape)
            throw new UserError(
                $"'{data.Source}' holds {format} images of {holds} (channels x height x width), but the model expects {shape}; " +
                $"{format} data is not resized: choose a model of the data's shape, or pass a folder of PNG/JPEG images, which are resized");
        return data;
    }

    /// <summary>
    /// Holds out <see cref="HeldOutFraction"/> of the images (at least one), chosen by a shuffle seeded with
    /// <paramref name="seed"/>; both parts keep the source's order.
    /// </summary>
    internal static DataSplits Split(ImageDataset data, int seed, string what)
    {
        if (data.Count < 2)
            throw new UserError($"'{data.Source}' holds {data.Count} image(s); at least 2 are needed to hold one out");
        var order = Enumerable.Range(0, data.Count).ToArray();
        new Random(seed).Shuffle(order);
        int heldCount = Math.Max(1, (int)Math.Round(data.Count * HeldOutFraction, MidpointRounding.AwayFromZero));
        var heldOut = order[..heldCount];
        var train = order[heldCount..];
        Array.Sort(heldOut);
        Array.Sort(train);
        return new DataSplits(data.Subset(train), data.Subset(heldOut),
            $"{what}: {train.Length} train / {heldOut.Length} held out (seeded split, seed {seed}) from {data.Source}");
    }
}
