namespace MixerFlow.Host.Data;

/// <summary>What a format's reader is asked for: the model's image shape, and the seed of the held-out
/// split for sources without a split of their own.</summary>
internal readonly record struct DataRequest(int Channels, int Height, int Width, int Seed)
{
    /// <summary>The shape as channels x height x width.</summary>
    public override string ToString() => $"{Channels}x{Height}x{Width}";
}

/// <summary>
/// A data format that <see cref="DatasetLoader"/> recognises by content. A new format is a class
/// implementing this and one line in <see cref="DataFormats.All"/>.
/// </summary>
internal interface IDataFormat
{
    /// <summary>The short name in messages ("IDX", "CIFAR-10"): "holds IDX images of 1x28x28".</summary>
    string Name { get; }

    /// <summary>What the format is, for the command line's help: "CIFAR-10 binary batches".</summary>
    string Summary { get; }

    /// <summary>A single file of this format as the "expected ..." of an error, or null when the format
    /// is read only as a folder.</summary>
    string? FileDescription { get; }

    /// <summary>What a folder of this format holds, as the "expected a folder holding ..." of an error.</summary>
    string FolderDescription { get; }

    /// <summary>The folder's data when the folder holds this format, else null.</summary>
    /// <exception cref="UserError">The folder is of this format but cannot be used.</exception>
    DataSplits? TryLoadFolder(string folder, DataRequest request);

    /// <summary>The file's data when its content is of this format, else null.</summary>
    /// <exception cref="UserError">The file is of this format but cannot be used.</exception>
    DataSplits? TryLoadFile(string file, DataRequest request);
}

/// <summary>The data formats, in the order they are tried (the first that recognises a file or folder reads it),
/// and every text that lists them (help, errors).</summary>
public static class DataFormats
{
    /// <summary>The registry in precedence order: the last one's folder reader takes any folder.</summary>
    internal static readonly IReadOnlyList<IDataFormat> All =
    [
        new IdxData(),
        new CifarData(),
        new ImageFolderData(),
    ];

    /// <summary>The formats' short names, in precedence order ("IDX", "CIFAR-10", "PNG/JPEG").</summary>
    public static IReadOnlyList<string> Names { get; } = All.Select(f => f.Name).ToArray();

    /// <summary>The formats for help text: "IDX files (MNIST / Fashion-MNIST), CIFAR-10 binary batches or PNG/JPEG images".</summary>
    public static string Summary { get; } = Join(All.Select(f => f.Summary), " or ");

    /// <summary>What a data path may be, for errors: "expected an IDX images file (...), ..., or a folder holding ...".</summary>
    public static string Expected { get; } =
        "expected " + string.Join(", ", All.Select(f => f.FileDescription).OfType<string>()) +
        ", or a folder holding " + FolderListing;

    /// <summary>What a data folder may hold: "IDX files (...), CIFAR-10 batches (...) or PNG/JPEG images".</summary>
    public static string FolderListing => Join(All.Select(f => f.FolderDescription), " or ");

    static string Join(IEnumerable<string> items, string last)
    {
        var list = items.ToList();
        return list.Count == 1 ? list[0] : string.Join(", ", list.Take(list.Count - 1)) + last + list[^1];
    }
}
