using System.Reflection;
using System.Reflection.Emit;
using TorchSharp;

namespace MixerFlow.Unit;

/// <summary>
/// An IL scan of the project's assemblies that reads every call they make into TorchSharp and
/// follows it through TorchSharp's own code: a TorchSharp method that creates a
/// <see cref="Scalar"/> (an implicit conversion, <c>ToScalar</c>, the <c>alpha = 1</c> of
/// <c>a + b</c>, Adam's coefficients) and does not dispose it in the same method hands native
/// code a handle that nothing keeps alive; a collection during the native call can finalize it
/// (TorchSharp's Scalar race). Such calls, and implicit Scalar conversions in our own code, are
/// refused everywhere except in Core's process-lifetime cache (<c>Scalars</c>) and in methods that
/// dispose what they create (<c>use</c>/<c>using</c>, which keeps the Scalar alive until then).
/// </summary>
public class ScalarSafetyTests
{
    static readonly Dictionary<short, OpCode> OpCodesByValue =
        typeof(OpCodes).GetFields(BindingFlags.Public | BindingFlags.Static)
            .Select(f => (OpCode)f.GetValue(null)!).ToDictionary(o => o.Value);

    /// <summary>The methods (and constructors) that <paramref name="method"/>'s IL calls or takes the address of.</summary>
    internal static IEnumerable<MethodBase> Callees(MethodBase method)
    {
        byte[]? il;
        try { il = method.GetMethodBody()?.GetILAsByteArray(); }
        catch (Exception e) when (e is InvalidOperationException or BadImageFormatException) { il = null; }
        if (il is null) yield break;
        var typeArgs = method.DeclaringType is { IsGenericType: true } t ? t.GetGenericArguments() : null;
        var methodArgs = method is MethodInfo { IsGenericMethod: true } mi ? mi.GetGenericArguments() : null;
        int i = 0;
        while (i < il.Length)
        {
            OpCode op;
            if (il[i] == 0xFE) { op = OpCodesByValue[unchecked((short)(0xFE00 | il[i + 1]))]; i += 2; }
            else { op = OpCodesByValue[il[i]]; i += 1; }
            int size = op.OperandType switch
            {
                OperandType.InlineNone => 0,
                OperandType.ShortInlineBrTarget or OperandType.ShortInlineI or OperandType.ShortInlineVar => 1,
                OperandType.InlineVar => 2,
                OperandType.InlineI8 or OperandType.InlineR => 8,
                OperandType.InlineSwitch => 4 + 4 * BitConverter.ToInt32(il, i),
                _ => 4,
            };
            if (op.OperandType == OperandType.InlineMethod)
            {
                MethodBase? callee = null;
                try { callee = method.Module.ResolveMethod(BitConverter.ToInt32(il, i), typeArgs, methodArgs); }
                catch (Exception e) when (e is ArgumentException or TypeLoadException or BadImageFormatException) { }
                if (callee is not null) yield return callee;
            }
            i += size;
        }
    }

    static readonly Assembly TorchSharpAssembly = typeof(Scalar).Assembly;

    static bool MakesScalar(MethodBase m) =>
        m.DeclaringType == typeof(Scalar) && (m.Name == "op_Implicit" || m is ConstructorInfo)
        || m.DeclaringType == typeof(ScalarExtensionMethods) && m.Name == "ToScalar";

    static bool DisposesScalar(MethodBase m) => m.DeclaringType == typeof(Scalar) && m.Name == "Dispose";

    readonly Dictionary<MethodBase, bool> leaks = new();

    /// <summary>
    /// Whether a TorchSharp method creates a Scalar that it does not dispose itself (directly or
    /// through the TorchSharp methods it calls), i.e. hands native code an unprotected handle.
    /// </summary>
    internal bool LeaksTemporaryScalar(MethodBase m)
    {
        if (m.Module.Assembly != TorchSharpAssembly) return false;
        if (leaks.TryGetValue(m, out var known)) return known;
        leaks[m] = false; // recursion guard
        var callees = Callees(m).ToList();
        bool disposes = callees.Any(DisposesScalar);
        bool leak = callees.Any(c => MakesScalar(c) && !disposes)
                    || callees.Any(c => !MakesScalar(c) && LeaksTemporaryScalar(c))
                    || Overrides(m).Any(LeaksTemporaryScalar);
        leaks[m] = leak;
        return leak;
    }

    static readonly Type[] TorchSharpTypes = TorchSharpAssembly.GetTypes();

    /// <summary>
    /// A virtual TorchSharp method's overrides in TorchSharp (a call through
    /// <c>OptimizerHelper.step</c> runs <c>Adam.step</c>): the scan cannot know the runtime type,
    /// so every override counts.
    /// </summary>
    static IEnumerable<MethodBase> Overrides(MethodBase m)
    {
        if (m is not MethodInfo { IsVirtual: true, IsFinal: false } mi || mi.DeclaringType is not { } declaring) yield break;
        // Only the optimisers: following every override of Module.forward behind each `call`
        // would blame our models for modules they never build; the modules Core does build are
        // checked by name below.
        if (!typeof(torch.optim.Optimizer).IsAssignableFrom(declaring)) yield break;
        var root = mi.GetBaseDefinition();
        var parameters = mi.GetParameters().Select(p => p.ParameterType).ToArray();
        foreach (var t in TorchSharpTypes)
        {
            if (t == declaring || t.IsGenericTypeDefinition || !declaring.IsAssignableFrom(t)) continue;
            MethodInfo? o;
            try { o = t.GetMethod(mi.Name, BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.DeclaredOnly, parameters); }
            catch (AmbiguousMatchException) { continue; }
            if (o is not null && o.GetBaseDefinition() == root) yield return o;
        }
    }

    static IEnumerable<MethodBase> AllMethods(Assembly a) =>
        a.GetTypes().SelectMany(t => t.GetMethods(BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance |
                                                  BindingFlags.Static | BindingFlags.DeclaredOnly).Cast<MethodBase>()
            .Concat(t.GetConstructors(BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance |
                                      BindingFlags.Static | BindingFlags.DeclaredOnly)));

    static string Show(MethodBase m) =>
        $"{m.DeclaringType?.FullName}.{m.Name}({string.Join(", ", m.GetParameters().Select(p => p.ParameterType.Name))})";

    /// <summary>Every call in <paramref name="assembly"/> that can hand native code an unprotected Scalar.</summary>
    internal List<string> Offenders(Assembly assembly)
    {
        var found = new List<string>();
        foreach (var m in AllMethods(assembly))
        {
            var callees = Callees(m).ToList();
            bool disposes = callees.Any(DisposesScalar);
            foreach (var c in callees)
            {
                if (MakesScalar(c) && !disposes && !IsScalarCache(m))
                    found.Add($"{Show(m)} creates a Scalar: {Show(c)}");
                else if (!MakesScalar(c) && LeaksTemporaryScalar(c))
                    found.Add($"{Show(m)} calls {Show(c)}, which creates a temporary Scalar");
            }
        }
        return found.Distinct().ToList();
    }

    /// <summary>Core's process-lifetime cache (<c>MixerFlow.Core.Scalars</c> and its closures).</summary>
    static bool IsScalarCache(MethodBase m) =>
        m.DeclaringType?.FullName is { } name && (name == "MixerFlow.Core.Scalars" || name.StartsWith("MixerFlow.Core.Scalars+"));

    [Theory]
    [InlineData("MixerFlow.Core")]
    [InlineData("MixerFlow.Checks")]
    [InlineData("MixerFlow.Host")]
    [InlineData("mixerflow")]
    public void No_call_hands_native_code_a_temporary_Scalar(string assemblyName)
    {
        var assembly = Assembly.Load(assemblyName);
        var offenders = Offenders(assembly);
        Assert.True(offenders.Count == 0, $"{offenders.Count} calls:\n" + string.Join("\n", offenders));
    }

    /// <summary>The examples teach the rule too: their built output (built before the tests, in the
    /// tests' configuration) is scanned like the libraries.</summary>
    [Theory]
    [InlineData("CustomFlow")]
    [InlineData("QuickStart")]
    [InlineData("QuickStartFs")]
    public void The_examples_hand_native_code_no_temporary_Scalar(string example)
    {
        var output = new DirectoryInfo(AppContext.BaseDirectory.TrimEnd(Path.DirectorySeparatorChar));
        var file = Path.Combine(Repository.Root(), "examples", example, "bin", output.Parent!.Name, output.Name, example + ".dll");
        Assert.True(File.Exists(file), $"{file} is not built");
        var offenders = Offenders(Assembly.LoadFrom(file));
        Assert.True(offenders.Count == 0, $"{offenders.Count} calls:\n" + string.Join("\n", offenders));
    }

    [Theory]
    [InlineData(typeof(TorchSharp.Modules.Linear))]
    [InlineData(typeof(TorchSharp.Modules.Conv2d))]
    [InlineData(typeof(TorchSharp.Modules.ReLU))]
    [InlineData(typeof(TorchSharp.Modules.Sequential))]
    public void The_TorchSharp_modules_the_models_build_run_without_temporary_Scalars(Type module)
    {
        var forward = module.GetMethod("forward", [typeof(torch.Tensor)])!;
        Assert.False(LeaksTemporaryScalar(forward), $"{module.Name}.forward creates a temporary Scalar");
    }

    [Fact]
    public void The_scan_sees_the_known_culprits()
    {
        // The scan must be able to fail: TorchSharp's own `a + b` (alpha = 1), a double
        // multiplier and Adam's step create temporary Scalars; `a - b` and a cached Scalar do not.
        var t = typeof(torch.Tensor);
        Assert.True(LeaksTemporaryScalar(t.GetMethod("op_Addition", [t, t])!));
        Assert.True(LeaksTemporaryScalar(t.GetMethod("op_Multiply", [t, typeof(double)])!));
        Assert.True(LeaksTemporaryScalar(typeof(TorchSharp.Modules.Adam).GetMethod("step")!));
        Assert.False(LeaksTemporaryScalar(t.GetMethod("sub", [t])!));
        Assert.False(LeaksTemporaryScalar(t.GetMethod("mul", [typeof(Scalar)])!));
        Assert.True(LeaksTemporaryScalar(typeof(torch.optim.Optimizer).GetMethod("step")!));
        Assert.Contains(Offenders(typeof(ScalarSafetyTests).Assembly.GetType("MixerFlow.Unit.DeliberatelyUnsafe")!.Assembly),
            o => o.Contains("DeliberatelyUnsafe"));
    }
}

/// <summary>Code the scan must reject (and nothing calls).</summary>
static class DeliberatelyUnsafe
{
    internal static torch.Tensor Add(torch.Tensor a, torch.Tensor b) => a + b;
    internal static torch.Tensor Half(torch.Tensor a) => a.mul(0.5);
}
