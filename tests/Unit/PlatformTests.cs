using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>TorchSharp runs here, and the build's libstdc++ fix did what it says.</summary>
public class PlatformTests
{
    [Fact]
    public void A_tensor_op_runs_and_computes_correctly()
    {
        var a = tensor(new double[] { 1, 2, 3, 4 }).reshape(2, 2);
        var b = tensor(new double[] { 5, 6, 7, 8 }).reshape(2, 2);
        var c = a.matmul(b);
        Assert.Equal(new double[] { 19, 22, 43, 50 }, c.data<double>().ToArray());
        Assert.Equal(-2.0, linalg.det(a).item<double>(), 12);
    }

    static string NativeGlueInOutput() =>
        Directory.GetFiles(AppContext.BaseDirectory, "libLibTorchSharp.so", SearchOption.AllDirectories).Single();

    internal static bool SystemProvides(string version)
    {
        var lib = new[] { "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/lib64/libstdc++.so.6" }
            .First(File.Exists);
        var bytes = File.ReadAllBytes(lib);
        return bytes.AsSpan().IndexOf(Encoding.ASCII.GetBytes(version + "\0")) >= 0;
    }

    [Fact]
    public void The_output_copy_of_the_glue_has_GLIBCXX_3_4_32_weak_exactly_when_the_system_lacks_it()
    {
        if (!OperatingSystem.IsLinux()) return;
        var flags = ElfVersionNeeds.Flags(NativeGlueInOutput(), "GLIBCXX_3.4.32");
        Assert.NotNull(flags); // the glue does ask for it
        bool weak = (flags!.Value & 0x2) != 0;
        Assert.Equal(!SystemProvides("GLIBCXX_3.4.32"), weak);
    }

    [Fact]
    public void The_NuGet_cache_copy_is_never_patched()
    {
        if (!OperatingSystem.IsLinux()) return;
        var home = Environment.GetEnvironmentVariable("NUGET_PACKAGES")
                   ?? Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        var cached = Path.Combine(home, "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        if (!File.Exists(cached)) return; // a custom package folder: nothing to compare
        var flags = ElfVersionNeeds.Flags(cached, "GLIBCXX_3.4.32");
        Assert.NotNull(flags);
        Assert.Equal(0, flags!.Value & 0x2);
    }
}

/// <summary>Reads the vna_flags of a symbol-version requirement from an ELF64 file (.gnu.version_r).</summary>
static class ElfVersionNeeds
{
    public static int? Flags(string path, string version)
    {
        var b = File.ReadAllBytes(path);
        long shoff = BitConverter.ToInt64(b, 0x28);
        int shentsize = BitConverter.ToUInt16(b, 0x3A), shnum = BitConverter.ToUInt16(b, 0x3C);
        for (int i = 0; i < shnum; i++)
        {
            int sh = (int)(shoff + (long)i * shentsize);
            if (BitConverter.ToUInt32(b, sh + 4) != 0x6ffffffe) continue;
            long off = BitConverter.ToInt64(b, sh + 0x18);
            int link = (int)BitConverter.ToUInt32(b, sh + 0x28), count = (int)BitConverter.ToUInt32(b, sh + 0x2C);
            long str = BitConverter.ToInt64(b, (int)(shoff + (long)link * shentsize) + 0x18);
            long vn = off;
            for (int n = 0; n < count; n++)
            {
                int cnt = BitConverter.ToUInt16(b, (int)vn + 2);
                long aux = vn + BitConverter.ToUInt32(b, (int)vn + 8);
                for (int a = 0; a < cnt; a++)
                {
                    int name = (int)(str + BitConverter.ToUInt32(b, (int)aux + 8));
                    int end = Array.IndexOf(b, (byte)0, name);
                    if (Encoding.ASCII.GetString(b, name, end - name) == version)
                        return BitConverter.ToUInt16(b, (int)aux + 4);
                    aux += BitConverter.ToUInt32(b, (int)aux + 12);
                }
                vn += BitConverter.ToUInt32(b, (int)vn + 12);
            }
        }
        return null;
    }
}
