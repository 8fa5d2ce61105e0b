// The nightly cargo that builds and lints the eBPF crate for its own target,
// run exactly as ovl-userspace's build script runs it so both share outputs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, ensure};

use crate::{command, setup, workspace};

/// The kernel programs' target: little-endian BPF, no std.
pub const TARGET: &str = "bpfel-unknown-none";

/// The eBPF crate, which is also the name of the object it builds.
const PACKAGE: &str = "ovl-ebpf";

/// Object name cargo gives the crate's `[[bin]]`.
const OBJECT_NAME: &str = "ovl";

/// Variables an outer cargo (the one running xtask, or the one running a
/// build script) sets for the host target; none may reach the nightly
/// cargo, which builds for BPF with its own toolchain.
pub const HOST_BUILD_VARS: [&str; 9] = [
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTUP_TOOLCHAIN",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_MAKEFLAGS",
];

/// Where eBPF builds go: a target dir of their own, shared by this task and
/// the build script (which cannot use the outer cargo's: it holds its lock).
pub fn target_dir() -> PathBuf {
    workspace::root().join("target/ebpf")
}

/// `rustup run nightly cargo SUBCOMMAND ...` for the eBPF crate: started in
/// its directory (whose `.cargo/config.toml` holds the eBPF rustflags, shared
/// with the build script), with host-build variables removed and bpf-linker
/// findable.
fn nightly_cargo(subcommand: &str) -> Result<Command> {
    nightly_cargo_in(subcommand, &target_dir())
}

/// [`nightly_cargo`] with another target dir.
fn nightly_cargo_in(subcommand: &str, target_dir: &std::path::Path) -> Result<Command> {
    let mut cmd = setup::nightly_command("cargo")?;
    cmd.current_dir(workspace::root().join(PACKAGE))
        .arg(subcommand)
        .args(["--release", "--package", PACKAGE])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir);
    Ok(cmd)
}

/// Builds the `upgrade-test` variant of the kernel programs (programs that
/// differ from the default build) in a target dir of its own and returns
/// the object's path.
pub fn build_upgrade_variant() -> Result<PathBuf> {
    let dir = workspace::root().join("target/ebpf-upgrade-test");
    let mut cmd = nightly_cargo_in("build", &dir)?;
    cmd.args(["--features", "upgrade-test"]);
    command::run_step("build ovl-ebpf (upgrade-test variant)", &mut cmd)?;
    let object = dir.join(TARGET).join("release").join(OBJECT_NAME);
    ensure!(
        object.is_file(),
        "the eBPF build succeeded but {} does not exist",
        object.display()
    );
    Ok(object)
}

/// Builds the kernel programs and returns the object's path.
pub fn build() -> Result<PathBuf> {
    command::run_step("build ovl-ebpf", &mut nightly_cargo("build")?)?;
    let object = target_dir().join(TARGET).join("release").join(OBJECT_NAME);
    ensure!(
        object.is_file(),
        "the eBPF build succeeded but {} does not exist",
        object.display()
    );
    Ok(object)
}

/// Clippy over the eBPF crate on its own target, warnings denied.
pub fn clippy() -> Result<()> {
    let mut cmd = nightly_cargo("clippy")?;
    cmd.args(["--", "-D", "warnings"]);
    command::run_step("clippy (ovl-ebpf, nightly)", &mut cmd)
}
