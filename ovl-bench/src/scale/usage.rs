// What the agents and etcd cost while the scale benchmark runs: CPU time
// and resident memory from /proc, and etcd's own counters from /metrics.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ovl_tests::Netns;

/// CPU time (user + system) of process `pid` so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) may hold spaces: count fields after its ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path} has no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime), i.e. 12 and 13 after the name.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} is too short"))?
            .parse::<u64>()
            .with_context(|| format!("field {} of {path}", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_secs_f64(total as f64 / clock_ticks()))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Resident set size and its peak of process `pid`, in KiB.
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .with_context(|| format!("{path} has no {name}"))?
            .parse()
            .with_context(|| format!("{name} in {path}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU use of some processes over a window of time.
pub struct CpuWindow {
    pids: Vec<u32>,
    start: Instant,
    before: Vec<Duration>,
}

impl CpuWindow {
    /// Starts measuring `pids`.
    pub fn start(pids: &[u32]) -> Result<CpuWindow> {
        Ok(CpuWindow {
            pids: pids.to_vec(),
            start: Instant::now(),
            before: pids.iter().map(|p| cpu_time(*p)).collect::<Result<_>>()?,
        })
    }

    /// Each process's CPU use since the start, in percent of one core.
    pub fn percent(&self) -> Result<Vec<f64>> {
        let wall = self.start.elapsed().as_secs_f64();
        if wall <= 0.0 {
            bail!("empty CPU window");
        }
        self.pids
            .iter()
            .zip(&self.before)
            .map(|(p, b)| Ok((cpu_time(*p)? - *b).as_secs_f64() / wall * 100.0))
            .collect()
    }

    /// Seconds since the start.
    pub fn seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// The whole machine's CPU time so far (all processes, every core), from
/// the first line of /proc/stat: (busy, idle) in clock ticks.
fn machine_ticks() -> Result<(u64, u64)> {
    let text = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let fields: Vec<u64> = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    let idle = at(3) + at(4);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    Ok((busy, idle))
}

/// How busy the whole machine was over a window, whoever used it.
pub struct MachineWindow {
    start: Instant,
    before: (u64, u64),
}

impl MachineWindow {
    pub fn start() -> Result<MachineWindow> {
        Ok(MachineWindow {
            start: Instant::now(),
            before: machine_ticks()?,
        })
    }

    /// CPU used by every process since the start, in percent of one core
    /// (200 is two cores fully busy).
    pub fn percent(&self) -> Result<f64> {
        let (busy, _) = machine_ticks()?;
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        Ok((busy.saturating_sub(self.before.0)) as f64 / clock_ticks() / wall * 100.0)
    }
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The etcd counters the report uses, as of one scrape.
#[derive(Clone, Debug, Default)]
pub struct EtcdCounters {
    /// gRPC messages etcd received, by method (a unary call is one; a
    /// lease keep-alive or a watch request on a stream is one each).
    pub received: BTreeMap<String, f64>,
    /// gRPC messages etcd sent, by method (watch responses under `Watch`).
    pub sent: BTreeMap<String, f64>,
    /// Bytes etcd sent to and received from clients.
    pub sent_bytes: f64,
    pub received_bytes: f64,
    /// Size of the backend database file, and the part of it in use.
    pub db_bytes: f64,
    pub db_in_use_bytes: f64,
    /// Keys etcd holds now.
    pub keys: f64,
    /// MVCC operations so far.
    pub puts: f64,
    pub deletes: f64,
    pub ranges: f64,
    pub txns: f64,
}

impl EtcdCounters {
    /// Scrapes the plain-text `/metrics` of the etcd at `endpoint`
    /// (HOST:PORT) from inside `netns`.
    pub fn scrape(netns: &Netns, endpoint: &str) -> Result<EtcdCounters> {
        let url = format!("http://{endpoint}/metrics");
        let out = netns.exec(&["curl", "-sf", "--max-time", "5", &url])?;
        Ok(Self::parse(&String::from_utf8_lossy(&out.stdout)))
    }

    fn parse(text: &str) -> EtcdCounters {
        let mut c = EtcdCounters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match key.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (key, ""),
            };
            let method = || label(labels, "grpc_method").unwrap_or_default();
            match name {
                "grpc_server_msg_received_total" => {
                    *c.received.entry(method()).or_default() += value
                }
                "grpc_server_msg_sent_total" => *c.sent.entry(method()).or_default() += value,
                "etcd_network_client_grpc_sent_bytes_total" => c.sent_bytes += value,
                "etcd_network_client_grpc_received_bytes_total" => c.received_bytes += value,
                "etcd_mvcc_db_total_size_in_bytes" => c.db_bytes = value,
                "etcd_mvcc_db_total_size_in_use_in_bytes" => c.db_in_use_bytes = value,
                "etcd_debugging_mvcc_keys_total" => c.keys = value,
                "etcd_mvcc_put_total" => c.puts = value,
                "etcd_mvcc_delete_total" => c.deletes = value,
                "etcd_mvcc_range_total" => c.ranges = value,
                "etcd_mvcc_txn_total" => c.txns = value,
                _ => {}
            }
        }
        c
    }

    /// Messages received in all.
    pub fn requests(&self) -> f64 {
        self.received.values().sum()
    }

    /// What changed from `before` to `self`, per second of `seconds`.
    pub fn rates_since(&self, before: &EtcdCounters, seconds: f64) -> EtcdRates {
        let per_s = |now: f64, then: f64| (now - then).max(0.0) / seconds;
        let methods: BTreeMap<String, f64> = self
            .received
            .iter()
            .map(|(m, v)| {
                (
                    m.clone(),
                    per_s(*v, before.received.get(m).copied().unwrap_or(0.0)),
                )
            })
            .filter(|(_, v)| *v > 0.0)
            .collect();
        EtcdRates {
            requests: per_s(self.requests(), before.requests()),
            by_method: methods,
            watch_responses: per_s(
                self.sent.get("Watch").copied().unwrap_or(0.0),
                before.sent.get("Watch").copied().unwrap_or(0.0),
            ),
            sent_bytes: per_s(self.sent_bytes, before.sent_bytes),
            received_bytes: per_s(self.received_bytes, before.received_bytes),
        }
    }
}

/// etcd's traffic per second over a window.
#[derive(Clone, Debug, Default)]
pub struct EtcdRates {
    /// gRPC messages received per second, in all and by method.
    pub requests: f64,
    pub by_method: BTreeMap<String, f64>,
    /// Watch responses sent per second.
    pub watch_responses: f64,
    /// Bytes per second sent to and received from clients.
    pub sent_bytes: f64,
    pub received_bytes: f64,
}

fn label(labels: &str, name: &str) -> Option<String> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_counters_sum_label_sets_and_keep_methods_apart() {
        let text = "\
# HELP x
grpc_server_msg_received_total{grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 5
grpc_server_msg_received_total{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 2
grpc_server_msg_received_total{grpc_method=\"Txn\",grpc_service=\"other\",grpc_type=\"unary\"} 1
grpc_server_msg_sent_total{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 40
etcd_network_client_grpc_sent_bytes_total 1000
etcd_mvcc_db_total_size_in_bytes 24576
";
        let c = EtcdCounters::parse(text);
        assert_eq!(c.received["Txn"], 6.0);
        assert_eq!(c.requests(), 8.0);
        assert_eq!(c.sent["Watch"], 40.0);
        assert_eq!(c.sent_bytes, 1000.0);
        assert_eq!(c.db_bytes, 24576.0);
        let later = EtcdCounters::parse(&text.replace("} 5", "} 25"));
        let r = later.rates_since(&c, 2.0);
        assert_eq!(r.requests, 10.0);
        assert_eq!(r.by_method.keys().collect::<Vec<_>>(), vec!["Txn"]);
    }

    #[test]
    fn cpu_time_and_memory_of_this_process_are_readable() {
        let pid = std::process::id();
        cpu_time(pid).unwrap();
        let (rss, peak) = memory_kib(pid).unwrap();
        assert!(rss > 0 && peak >= rss, "{rss} {peak}");
    }
}
