namespace MixerFlow.Host.Data;

/// <summary>
/// Loads training and held-out images from a file or folder, recognising the formats of
/// <see cref="DataFormats"/> by their content.
/// </summary>
public static class DatasetLoader
{
    /// <summary>Names the folder holding the bundled data set's files, overriding the search above the program.</summary>
    public const string DataEnvironmentVariable = "MIXERFLOW_DATA";

    /// <summary>The share held out when the source has no split of its own.</summary>
    public const double HeldOutFraction = 0.1;

    const string BundledFolder = "data/fashion-mnist";

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
        var request = new DataRequest(channels, height, width, seed);
        if (path is null) return LoadBundled(request);
        if (path.Trim().Length == 0) throw new UserError("the data path is empty");
        var full = Path.GetFullPath(path);
        if (Directory.Exists(full)) return LoadFolder(full, request);
        if (File.Exists(full)) return LoadFile(full, request);
        throw new UserError($"'{path}' does not exist");
    }

    static DataSplits LoadBundled(DataRequest shape)
    {
        if ((shape.Channels, shape.Height, shape.Width) != (1, 28, 28))
            throw new UserError(
                $"the bundled data set (Fashion-MNIST, 1x28x28 images) does not fit a model of {shape}; " +
                "pass --data with images for this model");
        var folder = LocateBundled();
        var images = IdxData.Find(folder, "t10k-images-idx3-ubyte")
                     ?? throw new UserError($"'{folder}' lacks t10k-images-idx3-ubyte.gz, the bundled data set");
        var dataset = IdxFormat.Read(images, IdxData.Find(folder, "t10k-labels-idx1-ubyte"));
        CheckShape(dataset, shape, "IDX");
        return Split(dataset, shape.Seed, "Fashion-MNIST test split (bundled)");
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
                if (IdxData.Find(candidate, "t10k-images-idx3-ubyte") is not null) return Path.GetFullPath(candidate);
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

    /// <summary>The first format of <see cref="DataFormats.All"/> that recognises the folder reads it.</summary>
    static DataSplits LoadFolder(string folder, DataRequest request) =>
        DataFormats.All.Select(f => f.TryLoadFolder(folder, request)).FirstOrDefault(d => d is not null)
        ?? throw new UserError($"'{folder}' holds no data; {DataFormats.Expected}");

    /// <summary>The first format of <see cref="DataFormats.All"/> that recognises the file's content reads it.</summary>
    static DataSplits LoadFile(string file, DataRequest request)
    {
        foreach (var format in DataFormats.All)
            if (format.TryLoadFile(file, request) is { } data) return data;
        var head = FileContent.Head(file, 8, out bool gzip);
        var start = head.Length == 0 ? "it is empty" : $"it starts with {Convert.ToHexString(head)}";
        throw new UserError($"'{file}' is not a recognised data file ({start}{(gzip ? " after gunzipping" : "")}); {DataFormats.Expected}");
    }

    /// <summary>IDX and CIFAR-10 images are used as they are: resizing them would silently change the benchmark.</summary>
    internal static ImageDataset CheckShape(ImageDataset data, DataRequest shape, string format)
    {
        var holds = new DataRequest(data.Channels, data.Height, data.Width, shape.Seed);
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
