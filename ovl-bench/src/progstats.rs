// ovl's programs under real traffic: the kernel's own run-time statistics
// (BPF_ENABLE_STATS) read with bpftool around one measurement.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use ovl_tests::command;

/// `enum bpf_cmd`: BPF_ENABLE_STATS.
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `enum bpf_stats_type`: BPF_STATS_RUN_TIME.
const BPF_STATS_RUN_TIME: u32 = 0;
/// A map every ovl agent pins: it tells which loaded programs are whose.
const PINNED_MAP: &str = "OVL_CONFIG";
/// Prefix of every ovl program name.
const PROGRAM_PREFIX: &str = "ovl_";

/// While alive, the kernel times every BPF program run (`run_time_ns`,
/// `run_cnt`); closing the descriptor — also when xtask dies — turns the
/// accounting off again, unlike the global sysctl.
pub struct StatsEnabled {
    _fd: OwnedFd,
}

/// Turns on the kernel's BPF run-time statistics.
pub fn enable() -> Result<StatsEnabled> {
    #[repr(C)]
    struct EnableStatsAttr {
        stats_type: u32,
    }
    let attr = EnableStatsAttr {
        stats_type: BPF_STATS_RUN_TIME,
    };
    // SAFETY: the attribute is a valid, fully initialised `enable_stats`
    // member of `union bpf_attr` and its size is passed along; the kernel
    // zero-extends shorter attributes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            &attr as *const EnableStatsAttr,
            std::mem::size_of::<EnableStatsAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_ENABLE_STATS");
    }
    let fd = i32::try_from(fd).context("BPF_ENABLE_STATS returned an out-of-range fd")?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(StatsEnabled {
        _fd: unsafe { OwnedFd::from_raw_fd(fd) },
    })
}

/// The global switch of the same accounting.
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Refuses to measure while the global BPF statistics are on: every run
/// of a BPF program would then also read the scheduler clock twice, a
/// cost only ovl's paths pay (the bare underlay and kernel vxlan run no
/// programs), which skews every ratio against ovl.
pub fn ensure_global_off() -> Result<()> {
    let value =
        std::fs::read_to_string(STATS_SYSCTL).with_context(|| format!("read {STATS_SYSCTL}"))?;
    if global_stats_on(&value) {
        bail!(
            "kernel.bpf_stats_enabled is 1: every BPF program run is timed, which only ovl's \
             paths would pay. Turn it off (`sysctl -w kernel.bpf_stats_enabled=0`) and run \
             the benchmark again; it times ovl's programs itself where it reports them"
        );
    }
    Ok(())
}

/// Whether the sysctl's text says the accounting is on.
fn global_stats_on(value: &str) -> bool {
    value.trim() != "0"
}

/// One program's counters at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramCounters {
    /// Which host's agent loaded it (the label given to [`snapshot`]).
    pub host: String,
    pub id: u64,
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

/// The counters of every ovl program loaded by the agents whose pin
/// directories are `agents` (`(host label, pin dir)`).
pub fn snapshot(agents: &[(String, PathBuf)]) -> Result<Vec<ProgramCounters>> {
    let programs: Value = serde_json::from_str(&command::stdout_of(
        Command::new("bpftool").args(["-j", "prog", "show"]),
    )?)
    .context("bpftool printed invalid JSON")?;
    let programs = programs
        .as_array()
        .context("bpftool prog show: not an array")?;
    let mut counters = Vec::new();
    for (host, pin_dir) in agents {
        let map_id = pinned_map_id(&pin_dir.join(PINNED_MAP))?;
        for program in programs {
            let name = program["name"].as_str().unwrap_or_default();
            let owns_map = program["map_ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|id| id.as_u64() == Some(map_id)));
            if !name.starts_with(PROGRAM_PREFIX) || !owns_map {
                continue;
            }
            counters.push(ProgramCounters {
                host: host.clone(),
                id: program["id"].as_u64().context("program without id")?,
                name: name.to_string(),
                run_cnt: program["run_cnt"].as_u64().unwrap_or(0),
                run_time_ns: program["run_time_ns"].as_u64().unwrap_or(0),
            });
        }
    }
    if counters.is_empty() {
        bail!("found no ovl program using the maps pinned under {agents:?}");
    }
    Ok(counters)
}

fn pinned_map_id(pin: &Path) -> Result<u64> {
    let pin_text = pin.to_string_lossy();
    let map: Value = serde_json::from_str(&command::stdout_of(
        Command::new("bpftool").args(["-j", "map", "show", "pinned", &pin_text]),
    )?)
    .context("bpftool printed invalid JSON")?;
    map["id"]
        .as_u64()
        .with_context(|| format!("no map id for {pin_text}"))
}

/// What one program did between two snapshots.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramRuns {
    pub host: String,
    pub program: String,
    pub runs: u64,
    pub ns_per_run: f64,
}

/// Runs and mean time per run of each program between two snapshots, for
/// the programs that ran.
pub fn delta(before: &[ProgramCounters], after: &[ProgramCounters]) -> Vec<ProgramRuns> {
    after
        .iter()
        .filter_map(|now| {
            let then = before.iter().find(|b| b.id == now.id)?;
            let runs = now.run_cnt.checked_sub(then.run_cnt)?;
            let time = now.run_time_ns.checked_sub(then.run_time_ns)?;
            (runs > 0).then(|| ProgramRuns {
                host: now.host.clone(),
                program: now.name.clone(),
                runs,
                ns_per_run: time as f64 / runs as f64,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_zero_sysctl_counts_as_off() {
        assert!(!global_stats_on("0\n"));
        assert!(global_stats_on("1\n"));
        assert!(global_stats_on("1"));
    }

    fn counters(id: u64, run_cnt: u64, run_time_ns: u64) -> ProgramCounters {
        ProgramCounters {
            host: "host0".to_string(),
            id,
            name: format!("ovl_{id}"),
            run_cnt,
            run_time_ns,
        }
    }

    #[test]
    fn delta_is_time_per_run_of_programs_that_ran() {
        let before = [counters(1, 10, 1000), counters(2, 5, 500)];
        let after = [counters(1, 110, 21_000), counters(2, 5, 500)];
        assert_eq!(
            delta(&before, &after),
            vec![ProgramRuns {
                host: "host0".to_string(),
                program: "ovl_1".to_string(),
                runs: 100,
                ns_per_run: 200.0
            }]
        );
    }
}
