// Where the workspace and its build outputs are, and the host cargo that
// builds the userspace crates (the `ovl` binary embeds the eBPF object).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::command;

/// The cargo package whose build script embeds the kernel programs.
const USERSPACE_PACKAGE: &str = "ovl-userspace";

/// The binary that package builds.
const OVL_BINARY: &str = "ovl";

/// A cargo build profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// The `dev` profile, built into `<target>/debug`.
    Debug,
    /// The `release` profile, built into `<target>/release`.
    Release,
}

impl Profile {
    /// The profile a `--release` flag asks for.
    pub fn from_release_flag(release: bool) -> Self {
        if release {
            Profile::Release
        } else {
            Profile::Debug
        }
    }

    /// The directory under the target dir that cargo builds it into.
    fn dir_name(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// The workspace root: xtask lives in `<root>/xtask`.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir always has the workspace root as parent")
}

/// The cargo that runs xtask (so `cargo +toolchain xtask` stays on that
/// toolchain), started in the workspace root, without the variables that
/// describe xtask's own package.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(root());
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(describes_xtask_package) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Whether `name` is one of the variables `cargo run` sets for the binary
/// it runs (xtask). Handed on to the cargo xtask starts, they reach build
/// scripts that track them — ring's build script reruns when
/// CARGO_MANIFEST_DIR changes — so every build from xtask undid one made
/// with plain cargo and the other way round: ring, rustls, boringtun,
/// tonic, etcd-client and ovl-userspace compiled again each time.
fn describes_xtask_package(name: &str) -> bool {
    matches!(
        name,
        "CARGO_MANIFEST_DIR"
            | "CARGO_MANIFEST_PATH"
            | "CARGO_CRATE_NAME"
            | "CARGO_BIN_NAME"
            | "CARGO_PRIMARY_PACKAGE"
    ) || name.starts_with("CARGO_PKG_")
}

/// The target directory of host builds, as cargo resolves it (honouring
/// `CARGO_TARGET_DIR` and config), always absolute.
pub fn target_dir() -> Result<PathBuf> {
    let metadata =
        command::stdout_of(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("`cargo metadata` printed invalid JSON")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// Builds `ovl` (its build script builds and embeds the kernel programs)
/// and returns the binary's absolute path.
pub fn build_ovl(profile: Profile) -> Result<PathBuf> {
    let mut build = cargo();
    build.args(["build", "--package", USERSPACE_PACKAGE]);
    if profile == Profile::Release {
        build.arg("--release");
    }
    command::run_step("build ovl", &mut build)?;
    let binary = target_dir()?.join(profile.dir_name()).join(OVL_BINARY);
    ensure!(
        binary.is_file(),
        "cargo built {USERSPACE_PACKAGE} but {} does not exist",
        binary.display()
    );
    Ok(binary)
}

/// `cargo xtask bench`: the release `ovl`, then the `ovl-bench` crate's
/// binaries (the harness and its micro-benchmark), run with it; `--scale`
/// runs the harness's control-plane benchmark instead; `focus` is one of
/// the harness's focused loops (`--tcp-only`, `--encrypted-only`).
pub fn bench(
    quick: bool,
    runs: Option<u32>,
    seconds: Option<u32>,
    scale: bool,
    focus: Option<&str>,
    underlay: Option<String>,
) -> Result<()> {
    let ovl = build_ovl(Profile::Release)?;
    let mut cargo = cargo();
    cargo.args(["build", "--release", "--package", "ovl-bench"]);
    crate::command::run_step("build the benchmark", &mut cargo)?;
    let harness = target_dir()?.join("release").join("ovl-bench");
    let mut run = Command::new(&harness);
    run.arg("--ovl").arg(&ovl);
    if quick {
        run.arg("--quick");
    }
    if scale {
        run.arg("--scale");
    }
    if let Some(flag) = focus {
        run.arg(flag);
    }
    if let Some(mode) = underlay {
        run.args(["--underlay", &mode]);
    }
    if let Some(n) = runs {
        run.args(["--runs", &n.to_string()]);
    }
    if let Some(s) = seconds {
        run.args(["--seconds", &s.to_string()]);
    }
    exec_harness(run)
}

/// Release build, then `ovl-bench --dns`: the containers' resolver.
pub fn bench_dns(quick: bool) -> Result<()> {
    let ovl = build_ovl(Profile::Release)?;
    let mut cargo = cargo();
    cargo.args(["build", "--release", "--package", "ovl-bench"]);
    crate::command::run_step("build the benchmark", &mut cargo)?;
    let harness = target_dir()?.join("release").join("ovl-bench");
    let mut run = Command::new(&harness);
    run.arg("--ovl").arg(&ovl).arg("--dns");
    if quick {
        run.arg("--quick");
    }
    exec_harness(run)
}

/// Replaces xtask with the harness: Ctrl-C then reaches only the harness,
/// which removes its labs before it exits (xtask waiting as its parent
/// would die at once and give the shell back mid-cleanup), and its exit
/// code is the command's.
fn exec_harness(mut harness: Command) -> Result<()> {
    eprintln!("xtask: $ {}", command::line(&harness));
    let error = harness.exec();
    Err(error).with_context(|| format!("cannot exec `{}`", command::line(&harness)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_started_by_xtask_does_not_inherit_xtasks_package_variables() {
        // `cargo test` sets these for this test binary as `cargo run` does
        // for xtask.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let cmd = cargo();
        let removed: Vec<String> = cmd
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .collect();
        for name in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME", "CARGO_PKG_VERSION"] {
            assert!(
                removed.iter().any(|r| r == name),
                "{name} is handed on: {removed:?}"
            );
        }
        assert!(
            !removed
                .iter()
                .any(|r| r == "CARGO_HOME" || r == "CARGO_TARGET_DIR"),
            "cargo's own configuration stays: {removed:?}"
        );
    }
}
