// What the scale benchmark found, per step of endpoints, and the markdown
// and JSON that report it, with each of the goals met or missed.

use std::fmt::Write as _;
use std::fs;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::Plan;
use super::cli::CliSample;
use super::load::{ChurnResult, OpTimes};
use super::prober::POLL_INTERVAL;
use super::usage::{EtcdCounters, EtcdRates};

/// Goals of the issue: connect to every node p99, idle agent CPU, agent
/// RSS at 10k endpoints.
const GOAL_P99: Duration = Duration::from_secs(1);
const GOAL_IDLE_CPU_PERCENT: f64 = 0.5;
const GOAL_RSS_MIB: f64 = 64.0;

/// CPU and etcd traffic over one window.
#[derive(Clone, Debug, Default)]
pub struct Window {
    pub seconds: f64,
    /// Percent of one core, per agent in node order.
    pub agent_cpu: Vec<f64>,
    pub etcd_cpu: f64,
    /// The benchmark process itself (etcd client, prober).
    pub bench_cpu: f64,
    /// Every process on the machine, others' included (200 = two cores).
    pub machine_cpu: f64,
    /// The 1-minute load average at the end.
    pub load: f64,
    pub etcd: EtcdRates,
}

/// Everything measured at one number of endpoints and churn rate.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub endpoints: usize,
    pub networks: usize,
    /// Changes per second asked of the churn.
    pub rate: u32,
    pub fill_seconds: f64,
    /// From the first write of the step until every map held everything.
    pub converge_seconds: f64,
    /// After the churn stopped, until every map held what the store says.
    pub after_churn_seconds: f64,
    pub idle: Window,
    pub busy: Window,
    pub rss_idle_kib: Vec<u64>,
    pub rss_churn_kib: Vec<u64>,
    /// Peak RSS (VmHWM) of each agent so far.
    pub hwm_kib: Vec<u64>,
    pub etcd_rss_idle_kib: u64,
    pub etcd_rss_churn_kib: u64,
    /// etcd's counters at the end of the step.
    pub etcd: EtcdCounters,
    pub churn: ChurnResult,
    pub cli: Vec<CliSample>,
}

impl Step {
    /// Agent CPU per committed change, mean over the agents, in ms: what
    /// one node pays per change wherever it runs.
    pub fn agent_ms_per_change(&self) -> f64 {
        let changes = self.churn.changes_per_second().max(1e-9);
        (mean(&self.busy.agent_cpu) - mean(&self.idle.agent_cpu)).max(0.0) / 100.0 / changes
            * 1000.0
    }

    /// Bytes etcd sent and received per committed change, beyond what it
    /// moves when idle.
    pub fn bytes_per_change(&self) -> f64 {
        let busy = self.busy.etcd.sent_bytes + self.busy.etcd.received_bytes;
        let idle = self.idle.etcd.sent_bytes + self.idle.etcd.received_bytes;
        (busy - idle).max(0.0) / self.churn.changes_per_second().max(1e-9)
    }

    /// Bytes etcd sent per committed change beyond idle (reads and watch
    /// events), and received (requests).
    fn bytes_split(&self) -> (f64, f64) {
        let per = self.churn.changes_per_second().max(1e-9);
        (
            (self.busy.etcd.sent_bytes - self.idle.etcd.sent_bytes).max(0.0) / per,
            (self.busy.etcd.received_bytes - self.idle.etcd.received_bytes).max(0.0) / per,
        )
    }
}

/// The whole run.
pub struct ScaleReport {
    pub title: String,
    pub machine: Vec<(String, String)>,
    pub plan: Plan,
    pub steps: Vec<Step>,
    pub total_seconds: f64,
}

/// Nearest-rank percentiles of a sample.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    /// Of `values` (milliseconds or any unit).
    pub fn of(mut values: Vec<f64>) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |p: f64| {
            let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
            values[rank.clamp(1, values.len()) - 1]
        };
        Spread {
            n: values.len(),
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: *values.last().expect("not empty"),
        }
    }

    fn json(&self) -> Value {
        json!({"n": self.n, "p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max})
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn all_ms(ops: &[OpTimes]) -> Spread {
    Spread::of(ops.iter().filter_map(|o| o.all).map(ms).collect())
}

fn commit_ms(ops: &[OpTimes]) -> Spread {
    Spread::of(ops.iter().map(|o| ms(o.commit)).collect())
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn max(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(0.0, f64::max)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One line for the progress log.
pub fn one_line(s: &Step) -> String {
    let c = all_ms(&s.churn.connects);
    format!(
        "{} endpoints, {} changes/s asked, {:.0} made: connect→all p50 {:.0} ms p99 {:.0} ms; agent CPU idle {:.2}% churn {:.1}% (max {:.1}%), {:.2} ms/change; RSS max {:.1} MiB; etcd {:.0} req/s churn, {:.0} B/change",
        s.endpoints,
        s.rate,
        s.churn.changes_per_second(),
        c.p50,
        c.p99,
        mean(&s.idle.agent_cpu),
        mean(&s.busy.agent_cpu),
        max(s.busy.agent_cpu.iter().copied()),
        s.agent_ms_per_change(),
        mib(s.hwm_kib.iter().copied().max().unwrap_or(0)),
        s.busy.etcd.requests,
        s.bytes_per_change()
    )
}

/// The report as markdown.
pub fn markdown(r: &ScaleReport) -> String {
    let mut md = String::new();
    let p = &r.plan;
    let _ = writeln!(md, "# {}\n", r.title);
    let _ = writeln!(md, "| what | value |\n|---|---|");
    for (k, v) in &r.machine {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(
        md,
        "\n{} nodes (one `ovl attach` each, decap on TC) on one switched underlay segment with one etcd 3.4 on it; networks of {} endpoints (/22, `--internal`), each node holding an equal share of every network; steps of {:?} endpoints; at each step {} s idle, {} real `ovl connect` runs, then {} s of churn at {} changes per second (half connects, half disconnects, each through its node's own store connection){}. Maps polled every {} ms. {:.0} s in all.\n",
        p.nodes,
        p.per_network,
        p.steps,
        p.idle_seconds,
        p.cli_samples,
        p.churn_seconds,
        p.rate,
        p.stress_rate
            .map(|r| format!(", and at the last step once more at {r} changes per second"))
            .unwrap_or_default(),
        POLL_INTERVAL.as_millis(),
        r.total_seconds
    );
    let head: Vec<String> = r
        .steps
        .iter()
        .map(|s| format!("{} endpoints, {} changes/s", s.endpoints, s.rate))
        .collect();
    let _ = writeln!(md, "| | {} |", head.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(r.steps.len()));
    let mut row = |label: &str, f: &dyn Fn(&Step) -> String| {
        let cells: Vec<String> = r.steps.iter().map(f).collect();
        let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
    };
    let spread3 = |s: Spread| format!("{:.0} / {:.0} / {:.0}", s.p50, s.p99, s.max);
    row("networks", &|s| s.networks.to_string());
    row("written in / in every map after (s)", &|s| {
        format!("{:.1} / {:.1}", s.fill_seconds, s.converge_seconds)
    });
    row(
        "**connect → every other node's map**, p50 / p99 / max (ms)",
        &|s| spread3(all_ms(&s.churn.connects)),
    );
    row(
        "disconnect → gone from every other map, p50 / p99 / max (ms)",
        &|s| spread3(all_ms(&s.churn.disconnects)),
    );
    row("connect → first other node, p50 / p99 (ms)", &|s| {
        let f = Spread::of(
            s.churn
                .connects
                .iter()
                .filter_map(|o| o.first)
                .map(ms)
                .collect(),
        );
        format!("{:.0} / {:.0}", f.p50, f.p99)
    });
    row("store commit of a connect, p50 / p99 (ms)", &|s| {
        let c = commit_ms(&s.churn.connects);
        format!("{:.0} / {:.0}", c.p50, c.p99)
    });
    row(
        "changes committed per second (skipped ticks, errors)",
        &|s| {
            format!(
                "{:.0} ({}, {})",
                s.churn.changes_per_second(),
                s.churn.skipped,
                s.churn.errors.len()
            )
        },
    );
    row(
        "real `ovl connect` at idle: command, p50 / max (ms)",
        &|s| {
            let c = Spread::of(s.cli.iter().map(|c| ms(c.command)).collect());
            if c.n == 0 {
                return "–".into();
            }
            format!("{:.0} / {:.0}", c.p50, c.max)
        },
    );
    row(
        "real `ovl connect` at idle → every other node, p50 / max (ms)",
        &|s| {
            let c = Spread::of(s.cli.iter().filter_map(|c| c.all).map(ms).collect());
            if s.cli.is_empty() {
                return "–".into();
            }
            format!("{:.0} / {:.0} (n={} of {})", c.p50, c.max, c.n, s.cli.len())
        },
    );
    row("maps in step again after the churn (s)", &|s| {
        format!("{:.1}", s.after_churn_seconds)
    });
    row("**agent CPU idle**, mean / max (% of a core)", &|s| {
        format!(
            "{:.2} / {:.2}",
            mean(&s.idle.agent_cpu),
            max(s.idle.agent_cpu.iter().copied())
        )
    });
    row("agent CPU under churn, mean / max (%)", &|s| {
        format!(
            "{:.1} / {:.1}",
            mean(&s.busy.agent_cpu),
            max(s.busy.agent_cpu.iter().copied())
        )
    });
    row("agent CPU per change, mean beyond idle (ms)", &|s| {
        format!("{:.2}", s.agent_ms_per_change())
    });
    row("**agent RSS** idle, max (MiB)", &|s| {
        format!(
            "{:.1}",
            mib(s.rss_idle_kib.iter().copied().max().unwrap_or(0))
        )
    });
    row("agent RSS after churn / peak, max (MiB)", &|s| {
        format!(
            "{:.1} / {:.1}",
            mib(s.rss_churn_kib.iter().copied().max().unwrap_or(0)),
            mib(s.hwm_kib.iter().copied().max().unwrap_or(0))
        )
    });
    row("etcd CPU idle / churn (%)", &|s| {
        format!("{:.1} / {:.1}", s.idle.etcd_cpu, s.busy.etcd_cpu)
    });
    row("etcd RSS idle / after churn (MiB)", &|s| {
        format!(
            "{:.0} / {:.0}",
            mib(s.etcd_rss_idle_kib),
            mib(s.etcd_rss_churn_kib)
        )
    });
    row("**etcd requests/s** idle / churn", &|s| {
        format!("{:.1} / {:.0}", s.idle.etcd.requests, s.busy.etcd.requests)
    });
    row("etcd requests/s under churn, by method", &|s| {
        s.busy
            .etcd
            .by_method
            .iter()
            .map(|(m, v)| format!("{m} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    row("etcd watch responses/s under churn", &|s| {
        format!("{:.0}", s.busy.etcd.watch_responses)
    });
    row("etcd KB/s sent + received, idle / churn", &|s| {
        format!(
            "{:.1} / {:.0}",
            (s.idle.etcd.sent_bytes + s.idle.etcd.received_bytes) / 1000.0,
            (s.busy.etcd.sent_bytes + s.busy.etcd.received_bytes) / 1000.0
        )
    });
    row(
        "**etcd bytes per change** (sent + received, beyond idle)",
        &|s| {
            let (sent, received) = s.bytes_split();
            format!(
                "{:.0} ({:.0} sent, {:.0} received)",
                s.bytes_per_change(),
                sent,
                received
            )
        },
    );
    row("etcd keys; db size / in use (MB)", &|s| {
        format!(
            "{:.0}; {:.1} / {:.1}",
            s.etcd.keys,
            s.etcd.db_bytes / 1e6,
            s.etcd.db_in_use_bytes / 1e6
        )
    });
    row("benchmark process CPU under churn (%)", &|s| {
        format!("{:.0}", s.busy.bench_cpu)
    });
    row(
        "**whole machine CPU under churn** / of it this benchmark's processes (%)",
        &|s| {
            let ours = s.busy.agent_cpu.iter().sum::<f64>() + s.busy.etcd_cpu + s.busy.bench_cpu;
            format!("{:.0} / {:.0}", s.busy.machine_cpu, ours)
        },
    );
    row("load average (1 min) after idle / churn", &|s| {
        format!("{:.1} / {:.1}", s.idle.load, s.busy.load)
    });

    let _ = writeln!(md, "\n## Goals\n");
    for line in goals(r) {
        let _ = writeln!(md, "- {line}");
    }
    let errors: Vec<String> = r
        .steps
        .iter()
        .flat_map(|s| {
            s.churn
                .errors
                .iter()
                .map(move |e| format!("{} endpoints: {e}", s.endpoints))
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(md, "\n## Errors during churn ({})\n", errors.len());
        for e in errors.iter().take(20) {
            let _ = writeln!(md, "- {e}");
        }
    }
    md
}

/// Each goal of the issue with what was measured, met or missed.
fn goals(r: &ScaleReport) -> Vec<String> {
    let nominal: Vec<&Step> = r.steps.iter().filter(|s| s.rate == r.plan.rate).collect();
    let Some(last) = nominal.last().copied() else {
        return vec!["no step ran".into()];
    };
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let p99 = all_ms(&last.churn.connects).p99;
    let idle = max(last.idle.agent_cpu.iter().copied());
    let rss = mib(last.hwm_kib.iter().copied().max().unwrap_or(0));
    let per_change: Vec<String> = nominal
        .iter()
        .map(|s| format!("{:.0} B at {}", s.bytes_per_change(), s.endpoints))
        .collect();
    let first = nominal.first().map_or(0.0, |s| s.bytes_per_change());
    let growth = last.bytes_per_change() / first.max(1.0);
    vec![
        format!(
            "connect → every other node p99 < {} ms at {} endpoints and {} changes/s: {:.0} ms — {}",
            GOAL_P99.as_millis(),
            last.endpoints,
            last.rate,
            p99,
            // No connect measured is no p99 (Spread's 0): not a goal met.
            verdict(
                !last.churn.connects.is_empty()
                    && Duration::from_secs_f64(p99 / 1000.0) < GOAL_P99
                    && last.churn.connects.iter().all(|o| o.all.is_some())
            )
        ),
        format!(
            "idle agent CPU ≈ 0 (below {GOAL_IDLE_CPU_PERCENT}% of a core) at {} endpoints: busiest agent {idle:.2}% — {}",
            last.endpoints,
            verdict(!last.idle.agent_cpu.is_empty() && idle < GOAL_IDLE_CPU_PERCENT)
        ),
        format!(
            "agent RSS < {GOAL_RSS_MIB} MiB at {} endpoints: peak of the largest agent {rss:.1} MiB — {}",
            last.endpoints,
            verdict(!last.hwm_kib.is_empty() && rss < GOAL_RSS_MIB)
        ),
        format!(
            "bytes per change independent of cluster size: {} ({growth:.2}× from the first step to the last) — {}",
            per_change.join(", "),
            verdict((0.67..=1.5).contains(&growth))
        ),
    ]
}

/// The report as JSON.
pub fn json(r: &ScaleReport) -> Value {
    json!({
        "title": r.title,
        "machine": r.machine.iter().map(|(k, v)| json!({"what": k, "value": v})).collect::<Vec<_>>(),
        "plan": {
            "nodes": r.plan.nodes,
            "steps": r.plan.steps,
            "per_network": r.plan.per_network,
            "idle_seconds": r.plan.idle_seconds,
            "churn_seconds": r.plan.churn_seconds,
            "changes_per_second": r.plan.rate,
            "stress_changes_per_second": r.plan.stress_rate,
            "cli_samples": r.plan.cli_samples,
            "poll_interval_ms": POLL_INTERVAL.as_millis() as u64,
        },
        "total_seconds": r.total_seconds,
        "goals": goals(r),
        "steps": r.steps.iter().map(|s| json!({
            "endpoints": s.endpoints,
            "rate": s.rate,
            "agent_cpu_ms_per_change": s.agent_ms_per_change(),
            "networks": s.networks,
            "fill_seconds": s.fill_seconds,
            "converge_seconds": s.converge_seconds,
            "after_churn_seconds": s.after_churn_seconds,
            "connect_all_ms": all_ms(&s.churn.connects).json(),
            "disconnect_all_ms": all_ms(&s.churn.disconnects).json(),
            "connect_first_ms": Spread::of(s.churn.connects.iter().filter_map(|o| o.first).map(ms).collect()).json(),
            "connect_commit_ms": commit_ms(&s.churn.connects).json(),
            "disconnect_commit_ms": commit_ms(&s.churn.disconnects).json(),
            "changes_per_second": s.churn.changes_per_second(),
            "churn_seconds": s.churn.seconds,
            "skipped_ticks": s.churn.skipped,
            "errors": s.churn.errors,
            "cli_command_ms": Spread::of(s.cli.iter().map(|c| ms(c.command)).collect()).json(),
            "cli_all_ms": Spread::of(s.cli.iter().filter_map(|c| c.all).map(ms).collect()).json(),
            "idle": window_json(&s.idle),
            "churn": window_json(&s.busy),
            "agent_rss_idle_kib": s.rss_idle_kib,
            "agent_rss_after_churn_kib": s.rss_churn_kib,
            "agent_peak_rss_kib": s.hwm_kib,
            "etcd_rss_idle_kib": s.etcd_rss_idle_kib,
            "etcd_rss_after_churn_kib": s.etcd_rss_churn_kib,
            "etcd_bytes_per_change": s.bytes_per_change(),
            "etcd_keys": s.etcd.keys,
            "etcd_db_bytes": s.etcd.db_bytes,
            "etcd_db_in_use_bytes": s.etcd.db_in_use_bytes,
            "etcd_puts": s.etcd.puts,
            "etcd_deletes": s.etcd.deletes,
            "etcd_ranges": s.etcd.ranges,
            "etcd_txns": s.etcd.txns,
        })).collect::<Vec<_>>(),
    })
}

fn window_json(w: &Window) -> Value {
    json!({
        "seconds": w.seconds,
        "agent_cpu_percent": w.agent_cpu,
        "etcd_cpu_percent": w.etcd_cpu,
        "bench_cpu_percent": w.bench_cpu,
        "machine_cpu_percent": w.machine_cpu,
        "load_average": w.load,
        "etcd_requests_per_second": w.etcd.requests,
        "etcd_requests_by_method": w.etcd.by_method,
        "etcd_watch_responses_per_second": w.etcd.watch_responses,
        "etcd_sent_bytes_per_second": w.etcd.sent_bytes,
        "etcd_received_bytes_per_second": w.etcd.received_bytes,
    })
}

/// Writes `bench/results/<date>-scale[-quick].{md,json}` and prints the
/// markdown.
pub fn write(r: &ScaleReport, date: &str) -> Result<()> {
    let dir = ovl_tests::workspace_root().join("bench/results");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stem = if r.plan.quick {
        format!("{date}-scale-quick")
    } else {
        format!("{date}-scale")
    };
    let md = markdown(r);
    let md_path = dir.join(format!("{stem}.md"));
    fs::write(&md_path, &md).with_context(|| format!("write {}", md_path.display()))?;
    let json_path = dir.join(format!("{stem}.json"));
    let text = serde_json::to_string_pretty(&json(r)).context("encode the report")?;
    fs::write(&json_path, text + "\n").with_context(|| format!("write {}", json_path.display()))?;
    println!("{md}");
    eprintln!(
        "ovl-bench: scale: wrote {} and {}",
        md_path.display(),
        json_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_goal_with_nothing_measured_is_missed_not_met() {
        let plan = crate::scale::Plan::new(true);
        let report = ScaleReport {
            title: "scale".into(),
            machine: Vec::new(),
            steps: vec![Step {
                endpoints: 1000,
                rate: plan.rate,
                ..Step::default()
            }],
            plan,
            total_seconds: 1.0,
        };
        let goals = goals(&report);
        assert!(
            goals[0].starts_with("connect → every other node p99"),
            "{goals:?}"
        );
        assert!(goals[1].starts_with("idle agent CPU"), "{goals:?}");
        assert!(goals[2].starts_with("agent RSS"), "{goals:?}");
        for goal in &goals[..3] {
            assert!(goal.ends_with("**missed**"), "{goal}");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Spread::of((1..=100).map(f64::from).collect());
        assert_eq!(
            (s.n, s.p50, s.p90, s.p99, s.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        let one = Spread::of(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(Spread::of(Vec::new()).n, 0);
    }
}
