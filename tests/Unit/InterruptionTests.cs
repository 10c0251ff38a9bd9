using System.Diagnostics;
using System.Runtime.InteropServices;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;

namespace MixerFlow.Unit;

/// <summary>The built <c>mixerflow</c> executable in a child process (<c>dotnet mixerflow.dll ...</c>).</summary>
static class MixerflowProcess
{
    public static string Dll => Path.Combine(AppContext.BaseDirectory, "mixerflow.dll");

    public sealed class Child : IDisposable
    {
        readonly Process process;
        readonly System.Text.StringBuilder stdout = new(), stderr = new();

        public Child(params string[] args) : this("dotnet", [Dll, .. args]) { }

        /// <summary>Any program (a launcher such as mpiexec, say), its output collected the same way.</summary>
        public Child(string program, IEnumerable<string> args, Action<ProcessStartInfo>? configure = null)
        {
            var psi = new ProcessStartInfo(program) { RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (var a in args) psi.ArgumentList.Add(a);
            configure?.Invoke(psi);
            process = new Process { StartInfo = psi };
            process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (stdout) stdout.AppendLine(e.Data); };
            process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (stderr) stderr.AppendLine(e.Data); };
            process.Start();
            process.BeginOutputReadLine();
            process.BeginErrorReadLine();
        }

        public int Id => process.Id;
        public string Stdout { get { lock (stdout) return stdout.ToString(); } }
        public string Stderr { get { lock (stderr) return stderr.ToString(); } }

        [DllImport("libc", SetLastError = true)]
        static extern int kill(int pid, int sig);

        public void Signal(int number) => Assert.Equal(0, kill(process.Id, number));

        /// <summary>Waits for the exit (and the end of both streams); the exit code.</summary>
        public int Wait(TimeSpan limit)
        {
            if (!process.WaitForExit(limit))
            {
                process.Kill(entireProcessTree: true);
                Assert.Fail($"mixerflow did not exit within {limit}\n{Stdout}\n{Stderr}");
            }
            process.WaitForExit();
            return process.ExitCode;
        }

        public void Dispose()
        {
            if (!process.HasExited) process.Kill(entireProcessTree: true);
            process.Dispose();
        }
    }

    /// <summary>Runs mixerflow to the end: exit code, standard output and standard error.</summary>
    public static (int Code, string Stdout, string Stderr) Run(TimeSpan limit, params string[] args)
    {
        using var child = new Child(args);
        int code = child.Wait(limit);
        return (code, child.Stdout, child.Stderr);
    }
}

/// <summary>
/// Interrupting a run: a cancelled token (library) or SIGTERM / Ctrl-C (command line) saves
/// last.ckpt at the current step, says so in one line and exits 143 / 130; --resume continues.
/// </summary>
public class InterruptionTests
{
    const int SIGINT = 2, SIGTERM = 15;

    static string TempDir() => Directory.CreateTempSubdirectory("mixerflow-interrupt-").FullName;

    static TrainingSettings Tiny(string dir, long steps, bool resume = false) => new()
    {
        Model = Presets.Get("tiny"), RunFolder = dir, Resume = resume, Steps = steps, BatchSize = 16,
        LearningRate = 1e-3, Seed = 7, CheckpointEvery = 100_000, Pictures = false,
    };

    /// <summary>Cancels a token after a chosen step (as a signal handler would), and counts steps.</summary>
    sealed class CancelAt(CancellationTokenSource cts, long at) : ITrainingObserver
    {
        public List<string> Messages { get; } = [];
        public void OnMessage(string text) => Messages.Add(text);
        public bool ShouldStop(long step)
        {
            if (step == at) cts.Cancel();
            return false;
        }
    }

    [Fact]
    public void A_cancelled_token_saves_last_ckpt_at_the_current_step_and_a_resume_continues_from_it()
    {
        var dir = TempDir();
        try
        {
            using var cts = new CancellationTokenSource();
            var e = Assert.Throws<TrainingInterruptedException>(() => new Trainer(Tiny(dir, 100_000), new CancelAt(cts, 7)).Run(cts.Token));
            Assert.IsAssignableFrom<OperationCanceledException>(e);
            Assert.Equal(7, e.Step);
            Assert.Equal(Path.Combine(dir, Trainer.LastCheckpoint), e.Checkpoint);
            Assert.Equal(7, Checkpoint.Load(e.Checkpoint).Header.Step);
            Assert.False(File.Exists(Path.Combine(dir, "summary.json")));

            using var again = new CancellationTokenSource();
            var resumed = new CancelAt(again, 10);
            var e2 = Assert.Throws<TrainingInterruptedException>(() =>
                new Trainer(new TrainingSettings { RunFolder = dir, Resume = true, Given = new HashSet<string>() }, resumed).Run(again.Token));
            Assert.Contains(resumed.Messages, m => m.Contains("at step 7"));
            Assert.Equal(10, e2.Step);
            Assert.Equal(10, Checkpoint.Load(e2.Checkpoint).Header.Step);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_token_cancelled_before_the_run_stops_it_at_step_0_with_a_checkpoint()
    {
        var dir = TempDir();
        try
        {
            using var cts = new CancellationTokenSource();
            cts.Cancel();
            var e = Assert.Throws<TrainingInterruptedException>(() => new Trainer(Tiny(dir, 50)).Run(cts.Token));
            Assert.Equal(0, e.Step);
            Assert.True(File.Exists(e.Checkpoint));
        }
        finally { Directory.Delete(dir, true); }
    }

    /// <summary>Waits until the run has taken some steps (a progress row in metrics.csv).</summary>
    static void WaitForSteps(MixerflowProcess.Child child, string dir)
    {
        var metrics = Path.Combine(dir, "metrics.csv");
        var until = DateTime.UtcNow.AddMinutes(3);
        while (DateTime.UtcNow < until)
        {
            Thread.Sleep(200);
            if (File.Exists(metrics))
            {
                string text;
                try { text = File.ReadAllText(metrics); } catch (IOException) { continue; }
                if (text.Split('\n').Skip(1).Any(l => l.Length > 0 && !l.StartsWith("0,"))) return;
            }
        }
        Assert.Fail($"no training progress within 3 minutes\n{child.Stdout}\n{child.Stderr}");
    }

    static long Interrupt(string dir, int signal, int expectedCode, params string[] args)
    {
        using var child = new MixerflowProcess.Child(args);
        WaitForSteps(child, dir);
        child.Signal(signal);
        int code = child.Wait(TimeSpan.FromMinutes(2));
        string log = $"exit {code}\nstdout:\n{child.Stdout}\nstderr:\n{child.Stderr}";
        Assert.True(code == expectedCode, log);
        var last = Path.Combine(dir, Trainer.LastCheckpoint);
        long step = Checkpoint.Load(last).Header.Step;
        Assert.True(step > 0, log);
        Assert.Contains($"interrupted at step {step}: saved {last}; continue with: mixerflow train --resume {dir}", child.Stderr);
        Assert.False(File.Exists(Path.Combine(dir, "summary.json")), log);
        return step;
    }

    [Fact]
    public void SIGTERM_saves_a_checkpoint_and_exits_143_and_after_a_resume_Ctrl_C_saves_a_later_one_and_exits_130()
    {
        var dir = TempDir();
        try
        {
            long first = Interrupt(dir, SIGTERM, 143,
                "train", "--preset", "tiny", "--steps", "100000", "--checkpoint-every", "100000", "--threads", "1", "--out", dir);
            // metrics.csv keeps its rows up to the saved step; the resumed run waits for a later one.
            using (var child = new MixerflowProcess.Child("train", "--resume", dir, "--threads", "1"))
            {
                var until = DateTime.UtcNow.AddMinutes(3);
                while (!child.Stdout.Contains($"resuming {Path.Combine(dir, Trainer.LastCheckpoint)} at step {first}") && DateTime.UtcNow < until)
                    Thread.Sleep(100);
                Assert.Contains($"at step {first}", child.Stdout);
                var metrics = Path.Combine(dir, "metrics.csv");
                long Latest() => File.ReadAllLines(metrics).Skip(1).Where(l => l.Length > 0)
                    .Select(l => long.Parse(l.Split(',')[0])).DefaultIfEmpty(0).Max();
                while (Latest() <= first && DateTime.UtcNow < until) Thread.Sleep(200);
                child.Signal(SIGINT);
                int code = child.Wait(TimeSpan.FromMinutes(2));
                Assert.True(code == 130, $"exit {code}\n{child.Stdout}\n{child.Stderr}");
                long second = Checkpoint.Load(Path.Combine(dir, Trainer.LastCheckpoint)).Header.Step;
                Assert.True(second > first, $"{second} after {first}");
                Assert.Contains($"interrupted at step {second}", child.Stderr);
            }
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void A_second_Ctrl_C_exits_at_once_without_the_resume_line()
    {
        var dir = TempDir();
        try
        {
            // fashion-mnist: a step takes long enough (over 50 ms here) for the second signal to
            // arrive while the first is still being honoured.
            using var child = new MixerflowProcess.Child("train", "--preset", "fashion-mnist", "--steps", "100000",
                "--checkpoint-every", "100000", "--threads", "1", "--out", dir);
            WaitForSteps(child, dir);
            child.Signal(SIGINT);
            Thread.Sleep(10);
            child.Signal(SIGINT);
            int code = child.Wait(TimeSpan.FromMinutes(2));
            Assert.True(code == 130, $"exit {code}\n{child.Stdout}\n{child.Stderr}");
            Assert.DoesNotContain("interrupted at step", child.Stderr);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void Ctrl_C_on_a_fresh_run_exits_130_with_the_resume_line()
    {
        var dir = TempDir();
        try
        {
            Interrupt(dir, SIGINT, 130,
                "train", "--preset", "tiny", "--steps", "100000", "--checkpoint-every", "100000", "--threads", "1", "--out", dir);
        }
        finally { Directory.Delete(dir, true); }
    }
}
