namespace MixerFlow.Host;

/// <summary>
/// A problem with the user's input (a file, an argument, a configuration field). Its message names
/// what is wrong and where; the command line prints it without a stack trace and exits with code 2.
/// </summary>
public sealed class UserError(string message, Exception? inner = null) : Exception(message, inner);
