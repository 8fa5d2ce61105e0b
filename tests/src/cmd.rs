// Running external tools (ip, bridge, sysctl, ping, ...) and turning their
// failures into errors that show the command line, exit status and output.

use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// Runs `argv` in the caller's namespaces and fails unless it exits with
/// status 0.
///
/// The error names the full command line, its exit status, stdout and
/// stderr, so a failing test says exactly which step of the setup broke.
pub fn run(argv: &[&str]) -> Result<Output> {
    let output = run_unchecked(argv)?;
    if !output.status.success() {
        bail!("{}", describe_failure(argv, &output));
    }
    Ok(output)
}

/// Runs `argv` and returns its output whatever the exit status; fails only
/// when the program cannot be started at all.
pub fn run_unchecked(argv: &[&str]) -> Result<Output> {
    let (program, args) = argv
        .split_first()
        .context("cannot run an empty command line")?;
    Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot start `{}`", command_line(argv)))
}

/// Joins `argv` into one shell-like line for messages (no quoting: the
/// line is for humans, never re-parsed).
pub fn command_line(argv: &[&str]) -> String {
    argv.join(" ")
}

/// Renders a failed command for an error message.
pub fn describe_failure(argv: &[&str], output: &Output) -> String {
    format!(
        "`{}` failed with {}\n--- stdout ---\n{}--- stderr ---\n{}",
        command_line(argv),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    )
}

/// The stdout of a finished command as text, trailing whitespace trimmed.
pub fn stdout_text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout)
        .trim_end()
        .to_string()
}
