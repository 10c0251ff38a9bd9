using System.Reflection;
using MixerFlow.Host;
using MixerFlow.Host.Distributed;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;

namespace MixerFlow.Unit;

/// <summary>
/// How a run reports: the library writes nothing to the console (its observer gets every line the
/// command line prints), and a saved run's settings are compared field by field, every field included.
/// </summary>
public class TrainingReportTests
{
    /// <summary>A value other than <paramref name="value"/> of the property's type; fails for a type it does not know.</summary>
    static object? Changed(PropertyInfo p, object? value) => p.PropertyType switch
    {
        var t when t == typeof(int) => (int)value! + 1,
        var t when t == typeof(long) => (long)value! + 1,
        var t when t == typeof(double) => (double)value! * 2 + 1,
        var t when t == typeof(bool) => !(bool)value!,
        var t when t == typeof(string) => (string?)value + "-changed",
        var t when t == typeof(ModelConfig) => Presets.Get("glow-tiny"),
        var t when t == typeof(IReadOnlySet<string>) => new HashSet<string> { "Steps" },
        var t => throw new Xunit.Sdk.XunitException($"{p.Name}: a property of type {t.Name}; teach this test a changed value of that type"),
    };

    [Fact]
    public void Every_settable_setting_changed_alone_is_one_named_difference()
    {
        var properties = typeof(TrainingSettings).GetProperties(BindingFlags.Public | BindingFlags.Instance).Where(p => p.CanWrite).ToList();
        Assert.Equal(properties.Select(p => p.Name), SettingDifference.SettingsFields);
        Assert.True(properties.Count >= 20, $"only {properties.Count} settable properties found");
        var saved = new TrainingSettings { Data = "some/data" };
        Assert.Empty(TrainingSettings.Differences(saved, saved with { }));
        foreach (var p in properties)
        {
            var now = saved with { };
            p.SetValue(now, Changed(p, p.GetValue(saved)));
            var d = Assert.Single(TrainingSettings.Differences(saved, now));
            Assert.Equal(char.ToLowerInvariant(p.Name[0]) + p.Name[1..], d.Field);
            Assert.NotEqual(d.Saved, d.Now);
        }
    }

    [Fact]
    public void Differences_name_the_field_and_both_values()
    {
        var saved = new TrainingSettings { LearningRate = 0.001 };
        var d = Assert.Single(TrainingSettings.Differences(saved, saved with { LearningRate = 0.002 }));
        Assert.Equal(("learningRate", "0.001", "0.002"), (d.Field, d.Saved, d.Now));
        d = Assert.Single(TrainingSettings.Differences(saved, saved with { Data = "x" }));
        Assert.Equal(("data", "the bundled data", Path.GetFullPath("x")), (d.Field, d.Saved, d.Now));
        var model = Assert.Single(SettingDifference.Of(Presets.Get("tiny"), Presets.Get("tiny").With([("hiddenWidth", "8")])));
        Assert.Equal(("hiddenWidth", "16", "8"), (model.Field, model.Saved, model.Now));
    }

    [Fact]
    public void A_resume_refuses_any_setting_that_decides_the_run_even_one_outside_the_usual_options()
    {
        var saved = new TrainingSettings { Steps = 10 };
        var given = new TrainingSettings { RunFolder = "r", Resume = true, MaxRollbacks = saved.MaxRollbacks + 1 };
        var e = Assert.Throws<UserError>(() => given.ForResume(saved));
        Assert.Contains($"maxRollbacks: the run was started with {saved.MaxRollbacks}, now given {saved.MaxRollbacks + 1}", e.Message);
        // Device, threads and pictures may change; a setting not given (the command line's Given) is not compared.
        var resumed = (given with { MaxRollbacks = saved.MaxRollbacks, Threads = 2, Pictures = false }).ForResume(saved);
        Assert.Equal((2, false, 10L), (resumed.Threads, resumed.Pictures, resumed.Steps));
        Assert.Equal(saved.MaxRollbacks, (given with { Given = new HashSet<string> { "Steps" } }).ForResume(saved).MaxRollbacks);
    }

    sealed class Recorder : ITrainingObserver
    {
        public List<string> Lines { get; } = [];
        public void OnStart(string runFolder, string model, long parameters, string data, long fromStep, long totalSteps) => Lines.Add($"start {model}");
        public void OnEvaluation(EvaluationReport report) => Lines.Add($"evaluation {report.Step}");
        public void OnMessage(string text) => Lines.Add(text);
    }

    [Fact]
    public void The_library_prints_nothing_and_its_observer_gets_the_lines_the_command_line_prints()
    {
        var dir = Directory.CreateTempSubdirectory("mixerflow-report-").FullName;
        var (savedOut, savedError) = (Console.Out, Console.Error);
        var (stdout, stderr) = (new StringWriter(), new StringWriter());
        var recorder = new Recorder();
        try
        {
            Console.SetOut(stdout);
            Console.SetError(stderr);
            var settings = new TrainingSettings { Model = Presets.Get("tiny"), RunFolder = dir, Steps = 4, BatchSize = 16, Pictures = false };
            new Trainer(settings, recorder, SingleProcess.Instance).Run();
            // Resuming the finished run says so through the observer too.
            new Trainer(settings with { Resume = true }, recorder, SingleProcess.Instance).Run();
        }
        finally
        {
            Console.SetOut(savedOut);
            Console.SetError(savedError);
            Directory.Delete(dir, true);
        }
        Assert.Equal("", stdout.ToString() + stderr.ToString());
        Assert.Contains("start tiny", recorder.Lines);
        Assert.Contains("evaluation 0", recorder.Lines);
        Assert.Contains(recorder.Lines, l => l.StartsWith("gradients: ", StringComparison.Ordinal));
        Assert.Contains(recorder.Lines, l => l.StartsWith("held-out bits/dim: ", StringComparison.Ordinal));
        Assert.Contains(recorder.Lines, l => l.StartsWith("run already finished at step 4", StringComparison.Ordinal));
    }

    [Fact]
    public void One_process_hands_every_item_to_itself_and_shares_nothing()
    {
        ICommunicator one = SingleProcess.Instance;
        Assert.True(one.IsWriter);
        Assert.Equal((0, 16), one.ShareOf(16));
        Assert.True(one.Any(true));
        Assert.False(one.Any(false));
        Assert.Null(one.ShareFromRoot(() => throw new InvalidOperationException("one process has no one to share with")));
        Assert.Equal(0, one.DefaultThreads);
    }
}
