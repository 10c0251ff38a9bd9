using System.Diagnostics;
using MixerFlow.Host;
using MixerFlow.Host.Distributed;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;

namespace MixerFlow.Unit;

/// <summary>MPICH's <c>mpiexec</c> starting <c>dotnet mixerflow.dll</c> on several ranks.</summary>
static class MpiLauncher
{
    public const string SkipVariable = "MIXERFLOW_SKIP_MPI";

    /// <summary>MPICH's launcher: mpiexec.mpich where Debian installed it beside another MPI, else mpiexec.</summary>
    public static string? Mpiexec => new[] { "/usr/bin/mpiexec.mpich", "/usr/bin/mpiexec.hydra", "/usr/bin/mpiexec" }.FirstOrDefault(File.Exists);

    public static string SkipReason => $"{SkipVariable}=1 and no MPICH mpiexec here; install it with `apt-get install mpich`";

    public static void Require()
    {
        if (Mpiexec is null)
            Assert.Fail($"no MPICH mpiexec here: install it with `apt-get install mpich` (Debian), or set {SkipVariable}=1 to skip the MPI tests");
    }

    /// <summary>A started <c>mpiexec -n ranks dotnet mixerflow.dll args</c>, its output collected.</summary>
    public sealed class Job : IDisposable
    {
        readonly MixerflowProcess.Child child;

        public Job(int ranks, params string[] args)
        {
            Require();
            child = new MixerflowProcess.Child(Mpiexec!, ["-n", ranks.ToString(), "dotnet", MixerflowProcess.Dll, .. args],
                                               psi => psi.Environment.Remove("MIXERFLOW_MPI"));
        }

        /// <summary>Standard output, then standard error.</summary>
        public string Output => child.Stdout + child.Stderr;

        public int Wait(TimeSpan limit) => child.Wait(limit);

        /// <summary>The pid of the rank's <c>dotnet</c> process (found by its PMI_RANK among this job's processes).</summary>
        public int RankPid(int rank)
        {
            foreach (var dir in Directory.GetDirectories("/proc"))
            {
                if (!int.TryParse(Path.GetFileName(dir), out int pid) || pid == child.Id) continue;
                try
                {
                    var cmdline = File.ReadAllText(Path.Combine(dir, "cmdline"));
                    if (!cmdline.Contains(MixerflowProcess.Dll)) continue;
                    var env = File.ReadAllText(Path.Combine(dir, "environ")).Split('\0');
                    if (env.Contains($"PMI_RANK={rank}") && IsDescendant(pid)) return pid;
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
            }
            throw new InvalidOperationException($"rank {rank} of mpiexec {child.Id} not found\n{Output}");
        }

        bool IsDescendant(int pid)
        {
            for (int p = pid, hops = 0; p > 1 && hops < 8; hops++)
            {
                var stat = File.ReadAllText($"/proc/{p}/stat");
                // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
                p = int.Parse(stat[(stat.LastIndexOf(')') + 2)..].Split(' ')[1]);
                if (p == child.Id) return true;
            }
            return false;
        }

        public void Dispose() => child.Dispose();
    }

    public static (int Code, string Output) Run(int ranks, TimeSpan limit, params string[] args)
    {
        using var job = new Job(ranks, args);
        int code = job.Wait(limit);
        return (code, job.Output);
    }
}

/// <summary>A fact that needs MPICH: it fails (saying how to install it) without mpiexec, and is skipped instead when MIXERFLOW_SKIP_MPI=1.</summary>
sealed class MpiFactAttribute : FactAttribute
{
    public MpiFactAttribute()
    {
        if (Environment.GetEnvironmentVariable(MpiLauncher.SkipVariable) == "1" && MpiLauncher.Mpiexec is null) Skip = MpiLauncher.SkipReason;
    }
}

/// <summary>
/// Data-parallel training on MPI: N ranks at batch B train the model one process trains at batch
/// N x B; a killed rank ends the job with the last checkpoint whole; a resume on MPI continues exactly.
/// </summary>
public class MpiTests
{
    static readonly TimeSpan Limit = TimeSpan.FromMinutes(4);

    static string[] Tiny(string dir, int batch, int steps, params string[] more) =>
        ["train", "--preset", "tiny", "--steps", steps.ToString(), "--batch-size", batch.ToString(), "--seed", "3",
         "--threads", "1", "--out", dir, .. more];

    /// <summary>The largest difference between two checkpoints' parameters, relative to the largest parameter.</summary>
    static double RelativeDifference(string a, string b)
    {
        var (ma, _) = Checkpoint.Load(a);
        var (mb, _) = Checkpoint.Load(b);
        double diff = 0, scale = 0;
        foreach (var (pa, pb) in ma.parameters().Zip(mb.parameters()))
        {
            diff = Math.Max(diff, (pa - pb).abs().max().item<float>());
            scale = Math.Max(scale, pa.abs().max().item<float>());
        }
        return diff / scale;
    }

    /// <summary>Whether the process has gone (or is a zombie awaiting its parent) within the limit.</summary>
    static bool Ended(int pid, TimeSpan limit)
    {
        for (var until = DateTime.UtcNow + limit; DateTime.UtcNow < until; Thread.Sleep(50))
        {
            try
            {
                var stat = File.ReadAllText($"/proc/{pid}/stat");
                if (stat[(stat.LastIndexOf(')') + 2)..].StartsWith('Z')) return true;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return true; }
        }
        return false;
    }

    static TrainSummary Summary(string dir) => RunFolder.ReadSummary(dir) ?? throw new Xunit.Sdk.XunitException($"no summary.json in {dir}");

    [MpiFact]
    public void Two_ranks_at_batch_8_train_the_parameters_of_one_process_at_batch_16()
    {
        using var tmp = new TempDir();
        string two = tmp.File("two-ranks"), one = tmp.File("one-process"), half = tmp.File("one-process-batch-8");
        var (code, log) = MpiLauncher.Run(2, Limit, Tiny(two, 8, 20));
        Assert.True(code == 0, log);
        Assert.Contains("data-parallel on 2 MPI ranks", log);
        // Only rank 0 reports: one summary line, not two.
        Assert.Single(log.Split('\n'), l => l.StartsWith("held-out bits/dim:"));
        var (c1, o1, e1) = MixerflowProcess.Run(Limit, Tiny(one, 16, 20));
        Assert.True(c1 == 0, o1 + e1);
        var (c2, o2, e2) = MixerflowProcess.Run(Limit, Tiny(half, 8, 20));
        Assert.True(c2 == 0, o2 + e2);

        double same = RelativeDifference(Path.Combine(two, Trainer.LastCheckpoint), Path.Combine(one, Trainer.LastCheckpoint));
        double other = RelativeDifference(Path.Combine(two, Trainer.LastCheckpoint), Path.Combine(half, Trainer.LastCheckpoint));
        Assert.True(same < 1e-5, $"2 ranks x 8 against 1 process x 16: relative difference {same:E2}\n{log}");
        // The check can fail: one process at batch 8 (half the data per step) trains another model.
        Assert.True(other > 1e-3, $"2 ranks x 8 against 1 process x 8: relative difference only {other:E2}");
        // The sharded, reduced held-out score is the one-process score, up to float32 summation order
        // (a tolerance, not rounding to 4 places: 32.589066 and 32.589048 round apart).
        Assert.Equal(Summary(one).HeldOutBpd, Summary(two).HeldOutBpd, tolerance: 1e-4);

        // The run states its global batch and schedule.
        var config = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(two, "config.json")))!["training"]!;
        Assert.Equal(2, (int)config["ranks"]!);
        Assert.Equal(8, (int)config["batchPerRank"]!);
        Assert.Equal(16, (int)config["globalBatch"]!);
        Assert.Equal(2, TrainingSettings.FromJson(File.ReadAllText(Path.Combine(two, "settings.json"))).Ranks);
        // config.json still reads as a model configuration.
        var (c3, o3, e3) = MixerflowProcess.Run(Limit, "info", "--config", Path.Combine(two, "config.json"));
        Assert.True(c3 == 0, o3 + e3);
    }

    [MpiFact]
    public void A_killed_rank_ends_the_job_with_the_last_checkpoint_whole_and_a_resume_on_two_ranks_continues_exactly()
    {
        using var tmp = new TempDir();
        string killed = tmp.File("killed"), whole = tmp.File("uninterrupted");
        string[] extra = ["--checkpoint-every", "10"];
        const int steps = 600;
        var last = Path.Combine(killed, Trainer.LastCheckpoint);
        using (var job = new MpiLauncher.Job(2, Tiny(killed, 8, steps, extra)))
        {
            // Wait for a checkpoint after step 0, then kill rank 1 as a crash would.
            var until = DateTime.UtcNow + Limit;
            while (DateTime.UtcNow < until)
            {
                Thread.Sleep(20);
                try { if (File.Exists(last) && Checkpoint.Load(last).Header.Step >= 10) break; }
                catch (UserError) { } // being replaced
            }
            int survivor = job.RankPid(0);
            Process.GetProcessById(job.RankPid(1)).Kill();
            int code = job.Wait(TimeSpan.FromMinutes(2));
            string log = job.Output;
            // The job fails and the launcher ends the other rank. Its wording (which rank it names
            // first, "Killed (signal 9)" or an exit code) varies with timing, so it is not asserted.
            Assert.True(code != 0, log);
            Assert.True(Ended(survivor, TimeSpan.FromSeconds(30)), $"rank 0 (pid {survivor}) still runs after the job ended\n{log}");
            Assert.False(File.Exists(Path.Combine(killed, "summary.json")), log);
        }
        var header = Checkpoint.Load(last).Header; // whole: its checksums verify
        Assert.True(header.Step >= 10 && header.Step % 10 == 0 && header.Step < steps, $"last.ckpt at step {header.Step}");

        // Resuming on another number of ranks is refused: the global batch would change.
        var (c0, o0, e0) = MixerflowProcess.Run(Limit, "train", "--resume", killed, "--threads", "1");
        Assert.True(c0 == 2, o0 + e0);
        Assert.Contains("trained on 2 process(es)", e0);

        var (c1, log1) = MpiLauncher.Run(2, Limit, "train", "--resume", killed, "--threads", "1");
        Assert.True(c1 == 0, log1);
        Assert.Contains($"resuming {last} at step {header.Step}", log1);
        var (c2, log2) = MpiLauncher.Run(2, Limit, Tiny(whole, 8, steps, extra));
        Assert.True(c2 == 0, log2);
        double diff = RelativeDifference(last, Path.Combine(whole, Trainer.LastCheckpoint));
        Assert.True(diff == 0, $"resumed against uninterrupted: relative difference {diff:E2}");
        Assert.Equal(Summary(whole).HeldOutBpd, Summary(killed).HeldOutBpd);
    }

    [MpiFact]
    public void Under_mpiexec_info_says_so_and_experiment_is_refused_by_name()
    {
        var (code, log) = MpiLauncher.Run(2, Limit, "info", "--preset", "tiny");
        Assert.True(code == 0, log);
        Assert.Contains("MPI: started by a launcher as 2 processes", log);
        using var tmp = new TempDir();
        File.WriteAllText(tmp.File("spec.json"), """{ "name": "x", "steps": 2, "runs": [ { "name": "tiny", "preset": "tiny" } ] }""");
        (code, log) = MpiLauncher.Run(2, Limit, "experiment", tmp.File("spec.json"), "--out", tmp.File("out"));
        Assert.True(code != 0, log);
        Assert.Contains("experiment runs in one process", log);
        Assert.False(Directory.Exists(tmp.File("out")), log);
    }

    [Fact]
    public void The_launcher_decides_between_one_process_and_MPI()
    {
        string? Env(Dictionary<string, string> vars, string name) => vars.GetValueOrDefault(name);
        Assert.Equal(1, Communicator.LaunchedSize(n => Env(new(), n)));
        Assert.Equal(4, Communicator.LaunchedSize(n => Env(new() { ["PMI_SIZE"] = "4", ["PMI_RANK"] = "1" }, n)));
        Assert.Equal(1, Communicator.LaunchedSize(n => Env(new() { ["PMI_SIZE"] = "1" }, n)));
        Assert.Equal(1, Communicator.LaunchedSize(n => Env(new() { ["PMI_SIZE"] = "4", ["MIXERFLOW_MPI"] = "0" }, n)));
        var e = Assert.Throws<UserError>(() => Communicator.LaunchedSize(n => Env(new() { ["OMPI_COMM_WORLD_SIZE"] = "2" }, n)));
        Assert.Contains("Open MPI", e.Message);
        Assert.Contains("apt install mpich", e.Message);
        // Without a launcher the trainer is a single process and loads no MPI.
        Assert.Equal(1, SingleProcess.Instance.Size);
        var settings = new TrainingSettings { Model = Presets.Get("tiny"), Steps = 1 };
        Assert.Equal(1, settings.Ranks);
        Assert.Equal(settings.BatchSize, settings.GlobalBatchSize);
    }
}
