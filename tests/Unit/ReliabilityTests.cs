using System.Text.Json.Nodes;
using MixerFlow.Host;
using MixerFlow.Host.Models;
using MixerFlow.Host.Training;

namespace MixerFlow.Unit;

/// <summary>
/// Damaged and crafted files are refused by name: checksummed checkpoints (version 3 and later), truncated
/// checkpoint headers, configurations beyond the size bounds, and a run folder held by another run.
/// </summary>
public sealed class ReliabilityTests : IDisposable
{
    readonly string dir = Directory.CreateTempSubdirectory("mixerflow-reliability-tests-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    string SavedTiny(string name = "tiny.ckpt")
    {
        TorchSharp.torch.manual_seed(2);
        var m = new ImageFlow(Presets.Get("tiny"));
        var path = Path.Combine(dir, name);
        Checkpoint.Save(path, m, 17, 2, 3.5);
        return path;
    }

    // ---------------------------------------------------------------- checksums

    [Fact]
    public void A_saved_checkpoint_is_version_5_and_loads()
    {
        var path = SavedTiny();
        var (_, header) = Checkpoint.Load(path);
        Assert.Equal(5, header.FileVersion);
        Assert.Equal(17, header.Step);
    }

    [Theory]
    [InlineData(0.5)]
    [InlineData(0.75)]
    [InlineData(0.999)]
    public void A_flipped_byte_in_the_tensors_is_refused_as_damaged_naming_the_file(double where)
    {
        var path = SavedTiny();
        var bytes = File.ReadAllBytes(path);
        int at = (int)(bytes.Length * where);
        bytes[at] ^= 0x40;
        File.WriteAllBytes(path, bytes);

        var e = Assert.Throws<UserError>(() => Checkpoint.Load(path));

        Assert.Contains(path, e.Message);
        Assert.Contains("damaged", e.Message);
        Assert.Contains("checksum", e.Message);
        Assert.Contains("model tensors", e.Message);
    }

    [Fact]
    public void A_flipped_byte_in_the_header_is_refused_as_damaged_before_the_configuration_is_used()
    {
        var path = SavedTiny();
        var bytes = File.ReadAllBytes(path);
        bytes[60] ^= 0x01;   // inside the configuration's JSON
        File.WriteAllBytes(path, bytes);

        var e = Assert.Throws<UserError>(() => Checkpoint.ReadConfig(path));

        Assert.Contains(path, e.Message);
        Assert.Contains("damaged", e.Message);
        Assert.Contains("header", e.Message);
    }

    [Fact]
    public void A_checkpoint_truncated_anywhere_is_a_user_error_naming_the_file()
    {
        var path = SavedTiny();
        var full = File.ReadAllBytes(path);
        int json = Presets.Get("tiny").ToJson().Length;
        var cuts = new[] { 0, 1, 5, 21, 23, 26, 30, 25 + json / 2, 25 + json, 25 + json + 4, 25 + json + 12, 25 + json + 21,
                           25 + json + 40, 25 + json + 70, 25 + json + 100, full.Length / 2, full.Length - 1 };
        foreach (int cut in cuts.Where(c => c < full.Length))
        {
            File.WriteAllBytes(path, full[..cut]);
            var e = Assert.Throws<UserError>(() => Checkpoint.Load(path));
            Assert.Contains(path, e.Message);
        }
    }

    [Fact]
    public void A_checkpoint_truncated_inside_its_header_says_so()
    {
        var path = SavedTiny();
        var full = File.ReadAllBytes(path);
        File.WriteAllBytes(path, full[..30]);   // inside the configuration's JSON
        var e = Assert.Throws<UserError>(() => Checkpoint.ReadConfig(path));
        Assert.Contains(path, e.Message);
        Assert.Contains("truncated", e.Message);
    }

    // ---------------------------------------------------------------- configuration bounds

    static UserError Crafted(string preset, string field, JsonNode value)
    {
        var json = JsonNode.Parse(Presets.Get(preset).ToJson())!.AsObject();
        json[field] = value;
        return Assert.Throws<UserError>(() => ModelConfig.FromJson(json.ToJsonString(), "crafted.json"));
    }

    [Theory]
    [InlineData("tiny", "hiddenWidth", 2000000000)]
    [InlineData("tiny", "layers", 200000)]
    [InlineData("tiny", "innerSteps", 100000)]
    [InlineData("tiny", "hiddenDepth", 100000)]
    [InlineData("tiny", "classes", 2000000000)]
    [InlineData("tiny", "channels", 1000)]
    [InlineData("tiny", "height", 100000)]
    [InlineData("tiny", "width", 100000)]
    [InlineData("glow-tiny", "levels", 30)]
    [InlineData("glow-tiny", "stepsPerLevel", 200000)]
    [InlineData("glow-tiny", "glowWidth", 2000000000)]
    public void A_crafted_size_field_is_refused_naming_the_field(string preset, string field, int value)
    {
        var e = Crafted(preset, field, value);
        Assert.Contains("crafted.json", e.Message);
        Assert.Contains(field + ":", e.Message);
    }

    [Fact]
    public void Crafted_spline_bins_are_refused_naming_the_field()
    {
        var json = JsonNode.Parse(Presets.Get("tiny").ToJson())!.AsObject();
        json["channelFlow"] = "spline";
        json["splineBins"] = 100000000;
        var e = Assert.Throws<UserError>(() => ModelConfig.FromJson(json.ToJsonString(), "crafted.json"));
        Assert.Contains("splineBins:", e.Message);
    }

    [Fact]
    public void Fields_each_within_bounds_but_too_many_parameters_together_are_refused()
    {
        var json = JsonNode.Parse(Presets.Get("tiny").ToJson())!.AsObject();
        json["layers"] = 256;
        json["innerSteps"] = 64;
        json["hiddenWidth"] = 65536;
        json["hiddenDepth"] = 16;
        var e = Assert.Throws<UserError>(() => ModelConfig.FromJson(json.ToJsonString(), "crafted.json"));
        Assert.Contains("parameters", e.Message);
        Assert.Contains("hiddenWidth", e.Message);
    }

    [Fact]
    public void Every_preset_is_within_the_bounds()
    {
        foreach (var (name, c) in Presets.All) Assert.True(c.Problems().Count == 0, $"{name}: {string.Join("; ", c.Problems())}");
    }

    // ---------------------------------------------------------------- run folder lock

    [Fact]
    public void A_second_holder_of_a_run_folder_is_refused_naming_the_folder_and_the_holders_process_id()
    {
        var run = Path.Combine(dir, "run");
        using (var first = RunFolder.Lock(run))
        {
            var e = Assert.Throws<UserError>(() => RunFolder.Lock(run));
            Assert.Contains(run, e.Message);
            Assert.Contains(Environment.ProcessId.ToString(), e.Message);
            Assert.True(File.Exists(Path.Combine(run, RunFolder.LockFile)));
        }
        using var again = RunFolder.Lock(run);   // released on dispose
    }
}
