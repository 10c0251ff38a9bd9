using System.Reflection;

namespace MixerFlow.Unit;

/// <summary>The F# libraries' public face as C# sees it: no F# list, option, function value or
/// System.Tuple in a public signature, and PascalCase member names.</summary>
public class PublicApiShapeTests
{
    static readonly Assembly[] Libraries =
    [
        typeof(MixerFlow.Core.Bijector).Assembly,
        typeof(MixerFlow.Checks.BijectorSpec).Assembly,
        typeof(MixerFlow.CommandLine.ParsedCommand).Assembly,
    ];

    /// <summary>Types whose F#-shaped members are deliberate, with the reason.</summary>
    static readonly Dictionary<string, string> Allowed = new()
    {
        // Argu's argument templates are F# unions by Argu's design (they also write --help); C#
        // reads the parsed command (ParsedCommand, ICommand) instead.
        ["MixerFlow.CommandLine.SampleArgs"] = "Argu template",
        ["MixerFlow.CommandLine.SampleArgs+Temperature"] = "Argu template",
        // The F# property-check engine; C# calls it through BijectorChecks.
        ["MixerFlow.Checks.PropertyChecks"] = "F# engine behind BijectorChecks",
        ["MixerFlow.Checks.Tolerances"] = "F# engine behind BijectorChecks",
    };

    static bool IsFSharpShaped(Type t)
    {
        if (t.IsArray || t.IsByRef || t.IsPointer) return IsFSharpShaped(t.GetElementType()!);
        if (!t.IsGenericType) return false;
        var name = t.GetGenericTypeDefinition().FullName ?? "";
        return name.StartsWith("Microsoft.FSharp.Collections.FSharpList")
            || name.StartsWith("Microsoft.FSharp.Core.FSharpOption")
            || name.StartsWith("Microsoft.FSharp.Core.FSharpValueOption")
            || name.StartsWith("Microsoft.FSharp.Core.FSharpFunc")
            || name.StartsWith("System.Tuple`")
            || t.GetGenericArguments().Any(IsFSharpShaped);
    }

    static IEnumerable<Type> SignatureTypes(MemberInfo m) => m switch
    {
        MethodInfo mi => mi.GetParameters().Select(p => p.ParameterType).Prepend(mi.ReturnType),
        ConstructorInfo c => c.GetParameters().Select(p => p.ParameterType),
        FieldInfo f => [f.FieldType],
        PropertyInfo p => [p.PropertyType],
        _ => [],
    };

    static IEnumerable<(Type Type, MemberInfo Member)> PublicMembers(Assembly assembly) =>
        from t in assembly.GetExportedTypes()
        where !Allowed.ContainsKey(t.FullName!) && !typeof(Argu.IArgParserTemplate).IsAssignableFrom(t)
        from m in t.GetMembers(BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly)
        select (t, m);

    /// <summary>The offending members of the library assemblies (and of any further types given).</summary>
    internal static List<string> FSharpShapedMembers(IEnumerable<(Type Type, MemberInfo Member)> members) =>
        members.Where(x => SignatureTypes(x.Member).Any(IsFSharpShaped))
               .Select(x => $"{x.Type.FullName}.{x.Member.Name}").Distinct().ToList();

    [Fact]
    public void No_public_member_has_an_FSharp_list_option_function_or_tuple_in_its_signature()
    {
        var members = Libraries.SelectMany(PublicMembers).ToList();
        Assert.True(members.Count > 200, $"the scan saw only {members.Count} members");
        var offending = FSharpShapedMembers(members);
        Assert.True(offending.Count == 0, "F#-shaped public signatures: " + string.Join(", ", offending));
    }

    [Fact]
    public void The_scan_notices_an_FSharp_shaped_signature()
    {
        var probe = typeof(Microsoft.FSharp.Collections.ListModule);
        var members = probe.GetMembers(BindingFlags.Public | BindingFlags.Static).Select(m => (probe, m));
        Assert.NotEmpty(FSharpShapedMembers(members));
    }

    [Fact]
    public void Public_members_are_PascalCase()
    {
        var lower = Libraries.SelectMany(PublicMembers)
            .Where(x => x.Member is not ConstructorInfo && !x.Member.Name.StartsWith("op_") && x.Member.Name != "value__"
                        && !(x.Member is MethodInfo { IsVirtual: true } mi && mi.GetBaseDefinition() != mi))
            .Select(x => (x.Type, Name: x.Member.Name.Replace("get_", "").Replace("set_", "")))
            .Where(x => x.Name.Length > 0 && char.IsLower(x.Name[0]))
            .Select(x => $"{x.Type.FullName}.{x.Name}").Distinct().ToList();
        Assert.True(lower.Count == 0, "camelCase public members: " + string.Join(", ", lower));
    }

    [Fact]
    public void Every_verb_dispatches_to_its_own_handler_method()
    {
        var verbs = new[] { "train", "eval --checkpoint a", "sample --checkpoint a", "embed --checkpoint a --out b",
                            "info --preset tiny", "check", "interpolate --checkpoint a --from b --to c",
                            "export --checkpoint a --out b", "experiment s.json", "score --checkpoint a" };
        var handled = verbs.Select(v => CommandLine.CommandLine.Parse(v.Split(' ')).Command.Accept(new VerbName())).ToList();
        Assert.Equal(verbs.Select(v => v.Split(' ')[0]), handled);
        Assert.Equal(typeof(CommandLine.ICommandHandler<>).GetMethods().Length, verbs.Length);
    }

    sealed class VerbName : CommandLine.ICommandHandler<string>
    {
        public string Train(CommandLine.TrainCommand command) => "train";
        public string Eval(CommandLine.EvalCommand command) => "eval";
        public string Sample(CommandLine.SampleCommand command) => "sample";
        public string Embed(CommandLine.EmbedCommand command) => "embed";
        public string Info(CommandLine.InfoCommand command) => "info";
        public string Check(CommandLine.CheckCommand command) => "check";
        public string Interpolate(CommandLine.InterpolateCommand command) => "interpolate";
        public string Export(CommandLine.ExportCommand command) => "export";
        public string Experiment(CommandLine.ExperimentCommand command) => "experiment";
        public string Score(CommandLine.ScoreCommand command) => "score";
    }
}
