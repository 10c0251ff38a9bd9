using System.Text.RegularExpressions;

namespace MixerFlow.Host.Files;

/// <summary>
/// The names the program turns into a file or folder name of its own making (a run's folder under
/// runs/, an experiment run's folder): one path component that cannot leave the folder it is put
/// in, so no separator, no "." or "..", and no leading dot that would hide it.
/// </summary>
public static partial class SafeName
{
    /// <summary>The rule in words, for messages.</summary>
    public const string Rule = "1 to 64 letters, digits, '.', '_' or '-', not starting with '.'";

    /// <summary>The rule as a regular expression.</summary>
    public const string Pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$";

    /// <summary>Whether <paramref name="name"/> follows <see cref="Rule"/>.</summary>
    public static bool IsSafe(string? name) => name is not null && Safe().IsMatch(name);

    [GeneratedRegex(Pattern, RegexOptions.CultureInvariant)]
    private static partial Regex Safe();
}
