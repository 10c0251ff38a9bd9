namespace MixerFlow.Unit;

/// <summary>The `mixerflow` command line's parse errors (one line) and help (the full usage), run in process.</summary>
public class CommandLineErrorTests
{
    static string[] Lines(string text) => text.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    [Theory]
    [InlineData("train", "--stepz", "3")]
    [InlineData("train", "--steps", "many")]
    [InlineData("train", "--epochs", "1", "--steps", "2")]
    [InlineData("train", "--epochs", "1", "--seconds", "2")]
    [InlineData("train", "--seconds", "0")]
    [InlineData("train", "--permute-pixels", "0")]
    [InlineData("eval", "--checkpoint", "a.ckpt", "--splitt", "test")]
    [InlineData("eval")]
    [InlineData("sample", "--checkpoint", "a.ckpt", "--cuont", "4")]
    [InlineData("sample", "--checkpoint", "a.ckpt", "--temperature", "11")]
    [InlineData("info", "--presett", "tiny")]
    [InlineData("check", "--casez", "2")]
    [InlineData("experiment")]
    public void A_parse_error_is_one_line_on_stderr_that_names_the_verbs_help_and_exits_2(params string[] args)
    {
        var (code, output, err) = CliInProcess.Run(args);
        Assert.Equal(2, code);
        Assert.Equal("", output);
        var line = Assert.Single(Lines(err));
        Assert.StartsWith("error: ", line);
        Assert.EndsWith($"(see mixerflow {args[0]} --help)", line);
    }

    [Fact]
    public void A_misspelt_option_is_named_in_its_error()
    {
        var (_, _, err) = CliInProcess.Run("train", "--stepz", "3");
        Assert.Contains("'--stepz'", err);
    }

    [Theory]
    [InlineData]
    [InlineData("--bogus")]
    [InlineData("trian")]
    public void Without_a_verb_the_error_is_one_line_that_names_the_main_help(params string[] args)
    {
        var (code, _, err) = CliInProcess.Run(args);
        Assert.Equal(2, code);
        var line = Assert.Single(Lines(err));
        Assert.StartsWith("error: ", line);
        Assert.EndsWith("(see mixerflow --help)", line);
    }

    [Fact]
    public void Help_is_the_full_usage_on_stdout_with_exit_0_and_shows_set_as_key_equals_value()
    {
        var (code, output, err) = CliInProcess.Run("train", "--help");
        Assert.Equal(0, code);
        Assert.Equal("", err);
        Assert.True(Lines(output).Length > 10, output);
        Assert.Contains("--set <key=value>", output);
        Assert.Contains("--set <key=value>", CliInProcess.Run("info", "--help").Out);
    }
}
