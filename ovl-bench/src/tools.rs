// The programs each benchmark mode runs, looked for on PATH before any lab
// is built: a missing one is named, with its package, at once.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Result, bail};

/// A program the harness runs and the Debian package that has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

const fn tool(program: &'static str, package: &'static str) -> Tool {
    Tool { program, package }
}

/// The data-path benchmark and `--hold`: load generators, pinning, offload
/// switches and the programs' run-time statistics.
pub const DATA_PATH: &[Tool] = &[
    tool("iperf3", "iperf3"),
    tool("sockperf", "sockperf"),
    tool("taskset", "util-linux"),
    tool("ethtool", "ethtool"),
    tool("bpftool", "bpftool"),
];

/// `--dns`: the upstream resolver and the pinned Python probe.
pub const DNS: &[Tool] = &[
    tool("dnsmasq", "dnsmasq-base"),
    tool("python3", "python3"),
    tool("taskset", "util-linux"),
];

/// `--scale`: the store's etcd and the agents' metrics scrape.
pub const SCALE: &[Tool] = &[tool("etcd", "etcd-server"), tool("curl", "curl")];

/// Fails naming every tool of `tools` not on `PATH`, and what installs it.
pub fn require(tools: &[Tool]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing = missing(tools, &path);
    if missing.is_empty() {
        return Ok(());
    }
    let programs: Vec<&str> = missing.iter().map(|t| t.program).collect();
    let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    packages.dedup();
    bail!(
        "{} not found on PATH: `cargo xtask setup` installs it, or `apt-get install {}`",
        programs.join(", "),
        packages.join(" ")
    )
}

/// The tools of `tools` that no directory of `path` has as an executable.
fn missing(tools: &[Tool], path: &OsStr) -> Vec<Tool> {
    tools
        .iter()
        .filter(|tool| !std::env::split_paths(path).any(|dir| executable(&dir.join(tool.program))))
        .copied()
        .collect()
}

fn executable(file: &Path) -> bool {
    file.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_missing_from_every_path_directory_is_named() {
        let dir = std::env::temp_dir().join(format!("ovl-bench-tools-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let present = dir.join("iperf3");
        std::fs::write(&present, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&present, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Not executable: not a tool.
        std::fs::write(dir.join("sockperf"), "").expect("write");
        let path = std::env::join_paths([Path::new("/nonexistent"), &dir]).expect("path");
        let tools = [tool("iperf3", "iperf3"), tool("sockperf", "sockperf")];
        let missing = missing(&tools, &path);
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(missing, vec![tool("sockperf", "sockperf")]);
    }
}
