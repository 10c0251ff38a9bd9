using MixerFlow.Host;
using MixerFlow.Host.Data;

namespace MixerFlow.Unit;

/// <summary>The data-format registry is the one list of formats: help and errors name what it holds.</summary>
public sealed class DataFormatRegistryTests : IDisposable
{
    readonly string dir = Directory.CreateTempSubdirectory("mixerflow-format-tests-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    [Fact]
    public void The_registry_lists_the_formats_in_precedence_order()
    {
        Assert.Equal(new[] { "IDX", "CIFAR-10", "PNG/JPEG" }, DataFormats.Names);
        Assert.Equal(DataFormats.Names, DataFormats.All.Select(f => f.Name));
        // The image folder reader takes any folder, so it must come last.
        Assert.IsType<ImageFolderData>(DataFormats.All[^1]);
    }

    [Theory]
    [InlineData("train")]
    [InlineData("eval")]
    [InlineData("embed")]
    public void The_data_option_help_names_every_registered_format(string verb)
    {
        var help = MixerFlow.CommandLine.CommandLine.Parse([verb, "--help"]).Message;
        Assert.Contains(DataFormats.Summary, Flatten(help));
        foreach (var format in DataFormats.All) Assert.Contains(format.Summary, Flatten(help));
    }

    [Fact]
    public void An_unknown_file_and_an_empty_folder_name_every_registered_format()
    {
        var file = Path.Combine(dir, "notes.txt");
        File.WriteAllText(file, "hello, world");
        var unknown = Assert.Throws<UserError>(() => DatasetLoader.Load(file, 1, 28, 28)).Message;
        var empty = Assert.Throws<UserError>(() => DatasetLoader.Load(Directory.CreateDirectory(Path.Combine(dir, "empty")).FullName, 1, 4, 4)).Message;
        foreach (var format in DataFormats.All)
        {
            if (format.FileDescription is { } described) Assert.Contains(described, unknown);
            Assert.Contains(format.FolderDescription, unknown);
            Assert.Contains(format.FolderDescription, empty);
        }
        Assert.Contains(DataFormats.Expected, unknown);
    }

    /// <summary>Argu wraps long usage lines: compare with runs of white space as one space.</summary>
    static string Flatten(string text) => System.Text.RegularExpressions.Regex.Replace(text, @"\s+", " ");
}
