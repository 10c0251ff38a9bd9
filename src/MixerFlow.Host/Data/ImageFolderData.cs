namespace MixerFlow.Host.Data;

/// <summary>Folders of PNG/JPEG images in the registry (last: it takes any folder the formats before it
/// did not); a single image file is recognised only to say that its folder is wanted.</summary>
internal sealed class ImageFolderData : IDataFormat
{
    public string Name => "PNG/JPEG";
    public string Summary => "PNG/JPEG images";
    public string? FileDescription => null;
    public string FolderDescription => "PNG/JPEG images";

    public DataSplits? TryLoadFolder(string folder, DataRequest request)
    {
        var read = ImageFolderFormat.Read(folder, request.Channels, request.Height, request.Width);
        var what = read.Classes is null
            ? "PNG/JPEG images, unlabelled"
            : $"PNG/JPEG images in {read.Classes.Length} classes ({Abbreviate(read.Classes)})";
        if (read.Skipped > 0) what += $", {read.Skipped} other files skipped";
        return DatasetLoader.Split(read.Images, request.Seed, $"{what}, resized and centre-cropped to {request}");
    }

    public DataSplits? TryLoadFile(string file, DataRequest request) =>
        FileContent.Sniff(file, out _) is ContentKind.Png or ContentKind.Jpeg
            ? throw new UserError($"'{file}' is a single image; pass the folder that holds the images")
            : null;

    static string Abbreviate(string[] names) =>
        names.Length <= 5 ? string.Join(", ", names) : string.Join(", ", names.Take(4)) + $", ... {names[^1]}";
}
