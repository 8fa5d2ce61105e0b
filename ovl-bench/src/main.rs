// `ovl-bench`: measures ovl against the bare underlay and Docker's kernel
// vxlan overlay, and its kernel programs alone. `cargo xtask bench` builds
// the release `ovl` and runs this with it.

//! The benchmark harness of ovl, a crate of its own so xtask stays build
//! orchestration: the data-path comparison (`bench.rs` with its topology,
//! measurement, report and chart units) and the BPF_PROG_TEST_RUN
//! micro-benchmark (`bin/ovl-microbench.rs`), and the control plane at
//! scale (`scale/`: many agents on one etcd, thousands of endpoints,
//! churn). Speed targets live here, never in timed tests.

mod bench;
mod chart;
mod cipher;
mod dns;
mod hold;
mod machine;
mod measure;
mod micro;
mod offloads;
mod progstats;
mod report;
mod scale;
mod tools;
mod topology;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use crate::report::{PathId, Underlay};

/// Measure ovl's data path side by side with the bare underlay and the
/// kernel vxlan overlay (root).
#[derive(Debug, Parser)]
#[command(name = "ovl-bench")]
struct Cli {
    /// The release `ovl` binary to measure.
    #[arg(long)]
    ovl: PathBuf,
    /// Fewer, shorter runs (3 runs of 1 s): a check that the whole
    /// benchmark works, not figures to quote.
    #[arg(long)]
    quick: bool,
    /// Runs per figure (at least 3; default 3).
    #[arg(long)]
    runs: Option<u32>,
    /// Seconds per measurement (default 3, or 1 with --quick; at most
    /// 3600).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(measure::MAX_SECONDS)))]
    seconds: Option<u32>,
    /// Only TCP throughput (1 and 4 streams, CPU per GB) of the bare
    /// underlay, kernel vxlan, ovl tc and ovl native XDP, interleaved as
    /// ever; no micro-benchmark, no in-situ runs
    /// (bench/results/<date>-tcp.md).
    #[arg(long, conflicts_with = "quick")]
    tcp_only: bool,
    /// Only TCP 1 stream (and its CPU per GB) of ovl tc and ovl
    /// encrypted, interleaved as ever; no micro-benchmark, no in-situ runs
    /// (bench/results/<date>-encrypted.md).
    #[arg(long, conflicts_with_all = ["quick", "tcp_only"])]
    encrypted_only: bool,
    /// Only one underlay mode: `offloads` or `wire-like` (the results'
    /// names end in `-<mode>`).
    #[arg(long, value_parser = parse_underlay)]
    underlay: Option<Underlay>,
    /// The control plane at scale instead: 20 agents on one etcd, 1k, 5k
    /// and 10k endpoints, then churn (with --quick: 5 agents, up to 1k).
    /// Its hosts share one switched segment of its own: no --underlay.
    #[arg(long, conflicts_with_all = ["runs", "seconds", "dns", "tcp_only", "encrypted_only", "underlay"])]
    scale: bool,
    /// Measure the containers' resolver instead (bench/results/<date>-dns.md).
    /// Its two routed hosts have one underlay of their own: no --underlay.
    #[arg(long, conflicts_with_all = ["runs", "seconds", "tcp_only", "encrypted_only", "underlay"])]
    dns: bool,
    /// Build one path's lab as the benchmark does (with --underlay, default
    /// offloads), print how to drive it and keep it until Enter: for
    /// profiling by hand. PATH: bare, kernel-vxlan, tc, tc-fwd, native,
    /// generic, encrypted.
    #[arg(long, value_name = "PATH", value_parser = parse_path,
          conflicts_with_all = ["quick", "runs", "seconds", "tcp_only", "encrypted_only", "scale", "dns"])]
    hold: Option<PathId>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = as_root_with(&cli.ovl) {
        eprintln!("ovl-bench: error: {error:#}");
        return ExitCode::FAILURE;
    }
    let tools = if cli.scale {
        tools::SCALE
    } else if cli.dns {
        tools::DNS
    } else {
        tools::DATA_PATH
    };
    if let Err(error) = tools::require(tools) {
        eprintln!("ovl-bench: error: {error:#}");
        return ExitCode::FAILURE;
    }
    let other = if let Some(path) = cli.hold {
        Some(hold::run(path, cli.underlay.unwrap_or(Underlay::Offloads)))
    } else if cli.scale {
        Some(scale::run(scale::Options { quick: cli.quick }))
    } else if cli.dns {
        Some(dns::run(cli.quick))
    } else {
        None
    };
    if let Some(result) = other {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ovl-bench: error: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let options = bench::Options {
        quick: cli.quick,
        runs: cli.runs,
        seconds: cli.seconds,
        tcp_only: cli.tcp_only,
        encrypted_only: cli.encrypted_only,
        underlay: cli.underlay,
    };
    match bench::run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ovl-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every mode builds network namespaces, loads BPF programs and runs
/// agents: it needs root, the lab helpers find `ovl` through the
/// environment, and an interrupted run removes its labs.
fn as_root_with(ovl: &Path) -> anyhow::Result<()> {
    ovl_tests::require_root("ovl-bench")?;
    // SAFETY: nothing else runs yet (no thread, no child), so nothing reads
    // the environment concurrently.
    unsafe { std::env::set_var(ovl_tests::OVL_BIN_ENV, ovl) };
    // Ctrl-C or a `kill` must not leave the labs' agents, servers and
    // namespaces running.
    ovl_tests::remove_labs_on_interrupt("ovl-bench")
}

fn parse_underlay(name: &str) -> Result<Underlay, String> {
    Underlay::ALL
        .into_iter()
        .find(|u| u.short() == name)
        .ok_or_else(|| format!("unknown underlay mode {name:?} (offloads, wire-like)"))
}

fn parse_path(name: &str) -> Result<PathId, String> {
    PathId::ALL
        .into_iter()
        .find(|p| p.short() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = PathId::ALL.iter().map(|p| p.short()).collect();
            format!("unknown path {name:?} ({})", names.join(", "))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_named_on_the_command_line_by_its_short_name() {
        for path in PathId::ALL {
            assert_eq!(parse_path(path.short()), Ok(path));
        }
        let error = parse_path("vxlan").unwrap_err();
        assert!(error.contains("unknown path \"vxlan\""), "{error}");
        assert!(error.contains("kernel-vxlan"), "{error}");
    }

    #[test]
    fn hold_goes_with_an_underlay_and_nothing_that_measures() {
        let cli = Cli::try_parse_from([
            "ovl-bench",
            "--ovl",
            "o",
            "--hold",
            "tc",
            "--underlay",
            "wire-like",
        ])
        .expect("--hold with --underlay parses");
        assert_eq!(cli.hold, Some(PathId::OvlTc));
        assert_eq!(cli.underlay, Some(Underlay::WireLike));
        assert!(
            Cli::try_parse_from(["ovl-bench", "--ovl", "o", "--hold", "tc", "--runs", "5"])
                .is_err()
        );
    }

    #[test]
    fn scale_and_dns_refuse_an_underlay_mode_they_would_ignore() {
        for mode in ["--scale", "--dns"] {
            let error =
                Cli::try_parse_from(["ovl-bench", "--ovl", "o", mode, "--underlay", "wire-like"])
                    .expect_err("an underlay mode the run would ignore is refused");
            assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
            let text = error.to_string();
            assert!(text.contains(mode) && text.contains("--underlay"), "{text}");
        }
    }

    #[test]
    fn seconds_beyond_an_hour_are_refused_when_parsed() {
        let parse =
            |seconds: &str| Cli::try_parse_from(["ovl-bench", "--ovl", "o", "--seconds", seconds]);
        assert_eq!(parse("3600").expect("an hour parses").seconds, Some(3600));
        for bad in ["0", "3601", "4294967295"] {
            let text = parse(bad).expect_err(bad).to_string();
            assert!(
                text.contains(&format!("invalid value '{bad}' for '--seconds"))
                    && text.contains("1..=3600"),
                "{text}"
            );
        }
    }
}
