namespace MixerFlow.Unit;

/// <summary>The repository the tests were built from: the folder above the test binaries that holds MixerFlow.sln.</summary>
internal static class Repository
{
    public static string Root()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "MixerFlow.sln"))) return d.FullName;
        throw new DirectoryNotFoundException("MixerFlow.sln above the test binaries");
    }
}
