// Running the tools that xtask and the benchmark drive (cargo, rustup,
// apt-get, ip, ovl, iperf3): echoing what runs, failing with its command line.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// `cmd` as one shell-like line for messages: program, arguments, and the
/// environment it sets explicitly. Never re-parsed, so nothing is quoted.
pub fn line(cmd: &Command) -> String {
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter_map(|(key, value)| {
            let value = value?;
            // PATH is only ever widened for rustc to find bpf-linker;
            // printing it would bury the command.
            (key != "PATH").then(|| format!("{}={}", key.to_string_lossy(), readable(value)))
        })
        .collect();
    let program = Path::new(cmd.get_program());
    // The toolchain's cargo is reached by its full path (`$CARGO`); the
    // path says nothing a reader needs.
    words.push(if program.file_name() == Some(OsStr::new("cargo")) {
        "cargo".to_string()
    } else {
        readable(program.as_os_str())
    });
    words.extend(cmd.get_args().map(readable));
    words.join(" ")
}

/// Text with control characters (the 0x1f separator of encoded rustflags)
/// shown as escapes instead of vanishing on the terminal.
fn readable(text: &OsStr) -> String {
    text.to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_control() {
                format!("\\x{:02x}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Runs `cmd` with the terminal as its stdout/stderr (no stdin: CI has
/// none, and nothing here may wait for an answer) after echoing it; fails
/// naming `step` unless it exits with status 0.
pub fn run_step(step: &str, cmd: &mut Command) -> Result<()> {
    let line = line(cmd);
    eprintln!("xtask: $ {line}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("{step}: cannot start `{line}`"))?;
    if !status.success() {
        bail!("{step}: `{line}` failed with {status}");
    }
    Ok(())
}

/// Runs `cmd` capturing its output, whatever its exit status; fails only
/// when it cannot be started (e.g. the program is not installed).
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", line(cmd)))
}

/// Runs `cmd` capturing its output and returns its stdout as text; fails,
/// with stdout and stderr in the message, unless it exits with status 0.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let output = capture(cmd)?;
    if !output.status.success() {
        bail!("{}", describe_failure(cmd, &output));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A failed captured run, for an error message.
pub fn describe_failure(cmd: &Command, output: &Output) -> String {
    format!(
        "`{}` failed with {}\n--- stdout ---\n{}--- stderr ---\n{}",
        line(cmd),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    )
}
