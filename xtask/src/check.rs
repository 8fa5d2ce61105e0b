// The CI gate: `cargo xtask test` (build, every workspace test, then lint)
// and `cargo xtask lint`; each step runs even if an earlier one failed.

use anyhow::{Result, bail};

use crate::workspace::{self, Profile};
use crate::{command, ebpf};

/// The crate that builds only for the BPF target; host-target cargo
/// commands over the workspace must leave it out.
const EBPF_PACKAGE: &str = "ovl-ebpf";

/// Builds `ovl`, clears leftovers of killed test runs, runs every workspace
/// test against that binary with `cargo_test_args` passed on to `cargo
/// test`, then lints. Fails naming every step that failed.
pub fn test(cargo_test_args: &[String]) -> Result<()> {
    // Without a binary the scenario tests cannot run at all: stop here.
    let ovl = workspace::build_ovl(Profile::Debug)?;

    let mut failed = Vec::new();
    // A killed run leaves namespaces, agents and bpffs mounts behind; they
    // would hold addresses and pins the next run's labs expect free.
    match ovl_tests::remove_stale_labs() {
        Ok(0) => {}
        Ok(removed) => eprintln!("xtask: removed {removed} stale lab namespace(s)"),
        Err(error) => {
            eprintln!("xtask: error: removing stale labs: {error:#}");
            failed.push("remove stale labs".to_string());
        }
    }

    // Programs that differ from ovl's own: the upgrade scenarios swap them
    // in under a running data path.
    let variant = ebpf::build_upgrade_variant()?;

    let mut cargo_test = workspace::cargo();
    cargo_test
        // Every test binary runs even after one fails: one CI run shows
        // every failure.
        .args([
            "test",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            EBPF_PACKAGE,
        ])
        .args(cargo_test_args)
        .env(ovl_tests::OVL_BIN_ENV, &ovl)
        .env(ovl_tests::UPGRADE_OBJECT_ENV, &variant);
    record(
        &mut failed,
        "cargo test",
        command::run_step("cargo test", &mut cargo_test),
    );

    failed.extend(lint_steps());
    finish("test", &failed)
}

/// rustfmt over the workspace, clippy over the host crates and clippy over
/// the eBPF crate on its own target, warnings denied everywhere.
pub fn lint() -> Result<()> {
    finish("lint", &lint_steps())
}

/// Runs every lint step and returns the names of those that failed.
fn lint_steps() -> Vec<String> {
    let mut failed = Vec::new();

    let mut fmt = workspace::cargo();
    fmt.args(["fmt", "--all", "--check"]);
    record(
        &mut failed,
        "rustfmt",
        command::run_step("rustfmt", &mut fmt),
    );

    let mut clippy = workspace::cargo();
    // --all-features: every optional part of every crate is linted.
    clippy
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            EBPF_PACKAGE,
            "--all-targets",
            "--all-features",
        ])
        .args(["--", "-D", "warnings"]);
    record(
        &mut failed,
        "clippy (host crates)",
        command::run_step("clippy (host crates)", &mut clippy),
    );

    record(&mut failed, "clippy (ovl-ebpf, nightly)", ebpf::clippy());
    failed
}

fn record(failed: &mut Vec<String>, step: &str, outcome: Result<()>) {
    if let Err(error) = outcome {
        eprintln!("xtask: error: {error:#}");
        failed.push(step.to_string());
    }
}

fn finish(task: &str, failed: &[String]) -> Result<()> {
    if failed.is_empty() {
        eprintln!("xtask: {task}: every step passed");
        Ok(())
    } else {
        bail!("{task}: failed step(s): {}", failed.join(", "))
    }
}
