// `cargo xtask`: the command line of ovl's build orchestration and the
// dispatch to the module that owns each task. No product logic lives here.

//! Every task a developer or CI runs on ovl, reproducible from a fresh
//! machine: `setup` installs what is missing, the build tasks compile the
//! kernel programs and the `ovl` binary that embeds them, `test`/`lint` are
//! the CI gate, `demo` is the README's walk-through and `bench` measures
//! ovl against the bare underlay and Docker's kernel vxlan overlay (the
//! harness itself is the `ovl-bench` crate).

mod check;
mod demo;
mod ebpf;
mod setup;
mod workspace;

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::workspace::Profile;
// The one helper that runs commands for xtask, the tests and the benchmark.
use ovl_tests::command;

/// Build, test and demo ovl.
#[derive(Debug, Parser)]
#[command(bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what is missing: the nightly toolchain and its components,
    /// bpf-linker, and the Debian packages tests and benchmarks use.
    Setup,
    /// Build the kernel programs (nightly, bpfel-unknown-none) and print the
    /// object's path.
    BuildEbpf {
        /// Build the `upgrade-test` variant instead (programs that differ,
        /// for the upgrade scenarios: point OVL_UPGRADE_OBJECT at it).
        #[arg(long)]
        upgrade_test: bool,
    },
    /// Build `ovl` with its kernel programs embedded and print its path.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build `ovl`, then run it with the arguments after `--`.
    Run {
        /// Build and run the release profile.
        #[arg(long)]
        release: bool,
        /// Arguments for `ovl`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The CI gate: full setup, build, every workspace test, then lint.
    /// Arguments after `--` go to `cargo test` (filters, `-- --nocapture`).
    Test {
        /// Arguments for `cargo test`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// rustfmt and clippy over the workspace, the eBPF crate on its target.
    Lint,
    /// Two hosts behind a router, one overlay network, two containers
    /// pinging each other: the README's main job, step by step.
    Demo,
    /// Release build, then throughput, latency, small-packet rate and CPU
    /// of the bare underlay, the kernel vxlan overlay and ovl (each decap
    /// mode), plus ovl's kernel programs alone; writes bench/results/.
    Bench {
        /// Fewer, shorter runs (3 runs of 1 s): a check that the whole
        /// benchmark works, not figures to quote.
        #[arg(long)]
        quick: bool,
        /// Runs per figure (at least 3; default 3).
        // Checked here too: a typo must not cost a release build first.
        #[arg(long, value_parser = clap::value_parser!(u32).range(3..))]
        runs: Option<u32>,
        /// Seconds per measurement (default 3, or 1 with --quick; at most
        /// 3600, as the harness takes).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3600))]
        seconds: Option<u32>,
        /// The control plane at scale instead: 20 agents on one etcd, 1k,
        /// 5k and 10k endpoints, then churn (with --quick: 5 agents, up to
        /// 1k endpoints); writes bench/results/<date>-scale.{md,json}.
        #[arg(long, conflicts_with_all = ["runs", "seconds"])]
        scale: bool,
        /// Only TCP throughput (bare, kernel vxlan, ovl tc, ovl native
        /// XDP); writes <date>-tcp.md.
        #[arg(long, conflicts_with_all = ["quick", "scale"])]
        tcp_only: bool,
        /// Only TCP 1 stream of ovl tc and ovl encrypted; writes
        /// <date>-encrypted.md.
        #[arg(long, conflicts_with_all = ["quick", "scale", "tcp_only"])]
        encrypted_only: bool,
        /// Only one underlay mode: `offloads` or `wire-like` (the results'
        /// names end in `-<mode>`).
        #[arg(long, conflicts_with = "scale", value_parser = ["offloads", "wire-like"])]
        underlay: Option<String>,
    },
    /// Release build, then the containers' resolver on two hosts: answer
    /// and forwarding latency, throughput, a flooding neighbour's cost,
    /// removal after disconnect, the gap across an agent restart; writes
    /// bench/results/<date>-dns.md.
    BenchDns {
        /// Shorter runs: a check that it works, not figures to quote.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => {
            setup::toolchain()?;
            setup::packages()
        }
        Task::BuildEbpf { upgrade_test } => {
            setup::toolchain()?;
            let object = if upgrade_test {
                ebpf::build_upgrade_variant()?
            } else {
                ebpf::build()?
            };
            println!("{}", object.display());
            Ok(())
        }
        Task::Build { release } => {
            setup::toolchain()?;
            let binary = workspace::build_ovl(Profile::from_release_flag(release))?;
            println!("{}", binary.display());
            Ok(())
        }
        Task::Run { release, args } => {
            setup::toolchain()?;
            let binary = workspace::build_ovl(Profile::from_release_flag(release))?;
            // exec, not spawn: Ctrl-C and the exit code reach `ovl` and the
            // caller directly, as if it had been started by hand.
            let error = Command::new(&binary).args(&args).exec();
            Err(error).with_context(|| format!("cannot exec {}", binary.display()))
        }
        Task::Test { args } => {
            setup::toolchain()?;
            setup::packages()?;
            check::test(&args)
        }
        Task::Lint => {
            setup::toolchain()?;
            check::lint()
        }
        Task::Demo => {
            ovl_tests::require_root("cargo xtask demo")?;
            setup::toolchain()?;
            setup::packages()?;
            demo::run()
        }
        Task::Bench {
            quick,
            runs,
            seconds,
            scale,
            tcp_only,
            encrypted_only,
            underlay,
        } => {
            // Before the release build, not after it.
            ovl_tests::require_root("cargo xtask bench")?;
            setup::toolchain()?;
            setup::packages()?;
            let focus = if tcp_only {
                Some("--tcp-only")
            } else if encrypted_only {
                Some("--encrypted-only")
            } else {
                None
            };
            workspace::bench(quick, runs, seconds, scale, focus, underlay)
        }
        Task::BenchDns { quick } => {
            ovl_tests::require_root("cargo xtask bench-dns")?;
            setup::toolchain()?;
            setup::packages()?;
            workspace::bench_dns(quick)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parses(args: &[&str]) -> bool {
        Cli::try_parse_from(std::iter::once("cargo xtask").chain(args.iter().copied())).is_ok()
    }

    #[test]
    fn bench_flags_the_harness_would_refuse_are_refused_before_any_build() {
        assert!(parses(&["bench", "--runs", "3", "--seconds", "1"]));
        assert!(parses(&["bench", "--underlay", "wire-like"]));
        assert!(!parses(&["bench", "--runs", "2"]));
        assert!(!parses(&["bench", "--seconds", "0"]));
        assert!(parses(&["bench", "--seconds", "3600"]));
        assert!(!parses(&["bench", "--seconds", "3601"]));
        assert!(!parses(&["bench", "--seconds", "4294967295"]));
        assert!(!parses(&["bench", "--underlay", "wirelike"]));
    }
}
