using MixerFlow.Speed;

namespace MixerFlow.Unit;

/// <summary>benchmarks/Speed's --out FILE: a header naming command, commit, machine and date, then what the benchmark prints.</summary>
public class SpeedResultsFileTests
{
    [Fact]
    public void The_header_names_the_command_commit_machine_and_date()
    {
        var header = ResultsFile.Header("dotnet run --project benchmarks/Speed -c Release -- --quick", "0123456789ab", "Some CPU, 2 cores, Linux", new DateTime(2026, 11, 30, 7, 25, 0, DateTimeKind.Utc));
        Assert.StartsWith("# MixerFlow.NET speed", header);
        Assert.Contains("- command: `dotnet run --project benchmarks/Speed -c Release -- --quick`\n", header);
        Assert.Contains("- commit: 0123456789ab\n", header);
        Assert.Contains("- machine: Some CPU, 2 cores, Linux\n", header);
        Assert.Contains("- date: 2026-11-30 (UTC)\n", header);
    }

    [Fact]
    public void The_commit_is_this_checkouts_and_the_machine_names_its_cores()
    {
        var commit = ResultsFile.Commit(Repository.Root());
        Assert.Matches("^([0-9a-f]{12}( \\+ local changes)?|unknown \\(no git\\))$", commit);
        Assert.Contains($"{Environment.ProcessorCount} cores", ResultsFile.Machine());
        Assert.Equal("unknown (no git)", ResultsFile.Commit(Path.GetTempPath()));
    }

    [Fact]
    public void The_file_gets_the_header_and_everything_printed_until_disposed()
    {
        var path = Path.Combine(Path.GetTempPath(), $"mixerflow-speed-{Guid.NewGuid():N}.md");
        var console = Console.Out;
        try
        {
            using (ResultsFile.Open(path, "# header\n\n"))
            {
                Console.WriteLine("| preset | ms |");
                Console.Write("done");
            }
            Console.WriteLine("after");
            Assert.Same(console, Console.Out);
            Assert.Equal("# header\n\n| preset | ms |\ndone", File.ReadAllText(path));
        }
        finally
        {
            Console.SetOut(console);
            File.Delete(path);
        }
    }
}
