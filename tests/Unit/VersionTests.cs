using System.Diagnostics;
using System.Reflection;
using System.Text.RegularExpressions;

namespace MixerFlow.Unit;

/// <summary>build/Version.props: a development build carries its commit in its version.</summary>
public class VersionTests
{
    /// <summary>git's answer in the repository, or null where git cannot answer.</summary>
    static string? Git(params string[] args)
    {
        var psi = new ProcessStartInfo("git") { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = Repository.Root() };
        foreach (var a in args) psi.ArgumentList.Add(a);
        try
        {
            using var git = Process.Start(psi)!;
            string output = git.StandardOutput.ReadToEnd().Trim();
            git.StandardError.ReadToEnd();
            git.WaitForExit();
            return git.ExitCode == 0 ? output : null;
        }
        catch (System.ComponentModel.Win32Exception) { return null; } // no git here
    }

    [Fact]
    public void A_development_build_is_versioned_by_the_commit_it_was_built_from()
    {
        var info = typeof(MixerFlow.Core.Flow).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()!.InformationalVersion;
        // VersionPrefix-dev.<commits>.g<short sha>, then the SDK's +<full sha>.
        var m = Regex.Match(info, @"^\d+\.\d+\.\d+-dev\.(\d+)\.g([0-9a-f]{7,})\+([0-9a-f]{40})$");
        if (Git("rev-parse", "HEAD") is null)
        {
            // Built outside a git checkout: the plain development version.
            Assert.Matches(@"^\d+\.\d+\.\d+-dev$", info);
            return;
        }
        Assert.True(m.Success, $"informational version {info}");
        string commit = m.Groups[3].Value;
        Assert.StartsWith(m.Groups[2].Value, commit);
        Assert.Equal(Git("rev-list", "--count", commit), m.Groups[1].Value);
    }
}
