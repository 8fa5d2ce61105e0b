// Traffic generators and what they report: iperf3 (TCP streams, UDP 64 B)
// and sockperf ping-pong, pinned client/server cores, CPU from /proc/stat.

use std::fs;
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use ovl_tests::{Lab, Netns, wait_until};
use serde_json::Value;

use ovl_tests::command;

/// The core every client (sender) runs on.
pub const CLIENT_CPU: usize = 0;
/// The core every server (receiver) runs on.
pub const SERVER_CPU: usize = 1;
/// iperf3's control and data port.
pub const IPERF_PORT: u16 = 5201;
/// sockperf's server port.
const SOCKPERF_PORT: u16 = 11111;
/// sockperf message size: a small request/response, as an RPC would send.
const RR_MESSAGE_BYTES: u32 = 64;
/// UDP payload of the small-packet test.
const UDP_PAYLOAD_BYTES: u32 = 64;
/// Streams of the multi-stream TCP test.
pub const TCP_MULTI_STREAMS: u32 = 4;
/// Time a client may take beyond its test duration before it is killed:
/// a path that stops delivering must fail, not hang.
const CLIENT_GRACE_SECS: u64 = 15;
/// The longest measurement the harness takes (`--seconds`): an hour per
/// run, times runs, paths and tests, is days already; more is a typo, and
/// iperf3 itself refuses more than a day.
pub const MAX_SECONDS: u32 = 3600;
/// Below these a path is broken, not slow: it let a handshake and a few
/// packets through (e.g. everything but GSO super-packets). Every working
/// path here moves orders of magnitude more.
const MIN_TCP_BITS_PER_S: f64 = 10e6;
const MIN_UDP_PACKETS_PER_S: f64 = 1e3;
const MIN_TRANSACTIONS_PER_S: f64 = 100.0;
/// How long servers may take to listen.
const SERVER_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A client namespace and the server it talks to.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub client: Netns,
    pub server: Netns,
    pub server_addr: Ipv4Addr,
}

impl Endpoints {
    /// Starts the iperf3 and sockperf servers (pinned to [`SERVER_CPU`])
    /// as lab processes and waits until both listen.
    pub fn start_servers(&self, lab: &Lab) -> Result<()> {
        let cpu = SERVER_CPU.to_string();
        let addr = self.server_addr.to_string();
        let iperf_port = IPERF_PORT.to_string();
        let sockperf_port = SOCKPERF_PORT.to_string();
        lab.spawn(
            &self.server,
            &[
                "taskset",
                "-c",
                &cpu,
                "iperf3",
                "-s",
                "-B",
                &addr,
                "-p",
                &iperf_port,
                // One banner per test otherwise; clients get errors in JSON.
                "--logfile",
                "/dev/null",
            ],
            &[],
        )?;
        lab.spawn(
            &self.server,
            &[
                "taskset",
                "-c",
                &cpu,
                "sockperf",
                "server",
                "--tcp",
                "-i",
                &addr,
                "-p",
                &sockperf_port,
            ],
            &[],
        )?;
        wait_until(SERVER_START_TIMEOUT, || {
            let output = self.server.exec(&["ss", "-Hltn"])?;
            let listening = String::from_utf8_lossy(&output.stdout).into_owned();
            Ok([IPERF_PORT, SOCKPERF_PORT]
                .iter()
                .all(|port| listening.contains(&format!("{addr}:{port} "))))
        })
        .with_context(|| format!("iperf3/sockperf servers in {} did not listen", self.server))
    }

    /// `argv` run in the client namespace on [`CLIENT_CPU`], killed if it
    /// runs `seconds` + grace.
    fn client_command(&self, seconds: u32, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.client.name()])
            .args(["timeout", "--kill-after=5"])
            .arg((u64::from(seconds) + CLIENT_GRACE_SECS).to_string())
            .args(["taskset", "-c", &CLIENT_CPU.to_string()])
            .args(argv);
        cmd
    }

    /// iperf3 TCP from client to server with `streams` parallel streams.
    pub fn tcp_throughput(&self, seconds: u32, streams: u32) -> Result<(TcpResult, CpuUse)> {
        let (json, cpu) = self.iperf3(seconds, &["-P", &streams.to_string()])?;
        Ok((TcpResult::from_iperf3(&json)?, cpu))
    }

    /// iperf3 UDP with 64-byte payloads at unlimited rate.
    pub fn udp_small(&self, seconds: u32) -> Result<(UdpResult, CpuUse)> {
        let length = UDP_PAYLOAD_BYTES.to_string();
        let (json, cpu) = self.iperf3(seconds, &["-u", "-l", &length, "-b", "0"])?;
        Ok((UdpResult::from_iperf3(&json)?, cpu))
    }

    fn iperf3(&self, seconds: u32, extra: &[&str]) -> Result<(Value, CpuUse)> {
        let addr = self.server_addr.to_string();
        let port = IPERF_PORT.to_string();
        let duration = seconds.to_string();
        let mut argv = vec![
            "iperf3",
            "-c",
            &addr,
            "-p",
            &port,
            "-t",
            &duration,
            "-J",
            "--connect-timeout",
            "3000",
        ];
        argv.extend_from_slice(extra);
        let mut cmd = self.client_command(seconds, &argv);
        let before = CpuTimes::read()?;
        let output = command::capture(&mut cmd)?;
        let cpu = CpuTimes::read()?.since(&before);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let json: Value = serde_json::from_str(&stdout).map_err(|_| {
            anyhow::anyhow!(
                "iperf3 printed no JSON\n{}",
                command::describe_failure(&cmd, &output)
            )
        })?;
        if let Some(error) = json.get("error").and_then(Value::as_str) {
            bail!("iperf3 failed: {error} (`{}`)", command::line(&cmd));
        }
        if !output.status.success() {
            bail!("{}", command::describe_failure(&cmd, &output));
        }
        Ok((json, cpu))
    }

    /// sockperf ping-pong over TCP: one 64-byte message in flight.
    pub fn tcp_request_response(&self, seconds: u32) -> Result<RrResult> {
        let addr = self.server_addr.to_string();
        let port = SOCKPERF_PORT.to_string();
        let duration = seconds.to_string();
        let size = RR_MESSAGE_BYTES.to_string();
        let mut cmd = self.client_command(
            seconds,
            &[
                "sockperf",
                "ping-pong",
                "--tcp",
                "-i",
                &addr,
                "-p",
                &port,
                "-t",
                &duration,
                "-m",
                &size,
                "--full-rtt",
            ],
        );
        let output = command::capture(&mut cmd)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            bail!("{}", command::describe_failure(&cmd, &output));
        }
        RrResult::from_sockperf(&text)
            .with_context(|| format!("`{}` printed:\n{text}", command::line(&cmd)))
    }
}

/// What iperf3 reported for a TCP test, receiver side.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TcpResult {
    pub bytes: u64,
    pub seconds: f64,
}

impl TcpResult {
    fn from_iperf3(json: &Value) -> Result<TcpResult> {
        let received = &json["end"]["sum_received"];
        let bytes = received["bytes"]
            .as_u64()
            .context("iperf3 JSON has no end.sum_received.bytes")?;
        let seconds = received["seconds"]
            .as_f64()
            .context("iperf3 JSON has no end.sum_received.seconds")?;
        ensure!(
            seconds > 0.0 && bytes as f64 * 8.0 / seconds >= MIN_TCP_BITS_PER_S,
            "TCP delivered only {bytes} bytes in {seconds:.2} s (less than {} Mbit/s)",
            MIN_TCP_BITS_PER_S / 1e6
        );
        Ok(TcpResult { bytes, seconds })
    }

    /// Goodput in Gbit/s.
    pub fn gbit_per_s(self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }

    /// CPU seconds a core spent per GB (10^9 bytes) received.
    pub fn cpu_seconds_per_gb(self, busy_seconds: f64) -> f64 {
        busy_seconds / (self.bytes as f64 / 1e9)
    }
}

/// What iperf3 reported for a UDP test, receiver side.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UdpResult {
    pub received_packets: u64,
    pub seconds: f64,
}

impl UdpResult {
    fn from_iperf3(json: &Value) -> Result<UdpResult> {
        let received = &json["end"]["sum_received"];
        // The server counts up to the highest sequence number it saw and
        // the gaps below it: delivered = packets - lost.
        let packets = received["packets"]
            .as_u64()
            .context("iperf3 JSON has no end.sum_received.packets")?;
        let lost = received["lost_packets"]
            .as_u64()
            .context("iperf3 JSON has no end.sum_received.lost_packets")?;
        let seconds = received["seconds"]
            .as_f64()
            .context("iperf3 JSON has no end.sum_received.seconds")?;
        let received_packets = packets.saturating_sub(lost);
        ensure!(
            seconds > 0.0 && received_packets as f64 / seconds >= MIN_UDP_PACKETS_PER_S,
            "UDP delivered only {received_packets} datagrams in {seconds:.2} s ({lost} lost)"
        );
        Ok(UdpResult {
            received_packets,
            seconds,
        })
    }

    /// Datagrams delivered per second, in thousands.
    pub fn kpps(self) -> f64 {
        self.received_packets as f64 / self.seconds / 1e3
    }

    /// CPU nanoseconds a core spent per datagram delivered.
    pub fn cpu_ns_per_packet(self, busy_seconds: f64) -> f64 {
        busy_seconds * 1e9 / self.received_packets as f64
    }
}

/// sockperf ping-pong: round-trip percentiles and rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RrResult {
    pub p50_us: f64,
    pub p99_us: f64,
    pub transactions_per_s: f64,
}

impl RrResult {
    /// Parses sockperf's summary: `[Valid Duration] RunTime=1.550 sec;
    /// SentMessages=17380; ReceivedMessages=17380` and `---> percentile
    /// 50.000 =   38.972` (microseconds; round trips with --full-rtt).
    pub fn from_sockperf(text: &str) -> Result<RrResult> {
        let text = strip_ansi(text);
        let valid = text
            .lines()
            .find(|line| line.contains("[Valid Duration]"))
            .context("sockperf printed no [Valid Duration] line")?;
        let run_time: f64 = field_after(valid, "RunTime=")
            .context("no RunTime in the [Valid Duration] line")?
            .parse()
            .context("RunTime is not a number")?;
        let received: f64 = field_after(valid, "ReceivedMessages=")
            .context("no ReceivedMessages in the [Valid Duration] line")?
            .parse()
            .context("ReceivedMessages is not a number")?;
        ensure!(
            run_time > 0.0 && received / run_time >= MIN_TRANSACTIONS_PER_S,
            "sockperf: only {received} round trips completed in {run_time} s"
        );
        let percentile = |wanted: &str| -> Result<f64> {
            let line = text
                .lines()
                .find(|line| {
                    line.split_once("percentile")
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with(wanted))
                })
                .with_context(|| format!("sockperf printed no percentile {wanted}"))?;
            line.rsplit('=')
                .next()
                .and_then(|value| value.trim().parse().ok())
                .with_context(|| format!("unreadable percentile line {line:?}"))
        };
        Ok(RrResult {
            p50_us: percentile("50.000")?,
            p99_us: percentile("99.000")?,
            transactions_per_s: received / run_time,
        })
    }
}

/// The value after `key` up to the next space or semicolon.
fn field_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = &line[start..];
    let end = rest.find([' ', ';']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// `text` without ANSI colour escapes (`ESC [ ... m`), which sockperf
/// prints even into a pipe.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Busy and total ticks per CPU from /proc/stat.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuTimes {
    /// (busy, total) ticks, indexed by CPU number.
    per_cpu: Vec<(u64, u64)>,
}

/// CPU time each core spent busy over an interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuUse {
    busy_seconds: Vec<f64>,
}

impl CpuUse {
    /// Seconds `cpu` spent in user, system, irq or softirq context: the
    /// softirq part is where veth delivery and BPF programs run.
    pub fn busy_seconds(&self, cpu: usize) -> f64 {
        self.busy_seconds.get(cpu).copied().unwrap_or(0.0)
    }
}

impl CpuTimes {
    /// A snapshot of /proc/stat.
    pub fn read() -> Result<CpuTimes> {
        let text = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        CpuTimes::parse(&text)
    }

    /// Parses the `cpuN user nice system idle iowait irq softirq steal ...`
    /// lines. Busy = user + nice + system + irq + softirq; steal (time the
    /// hypervisor took) is neither busy nor idle for us.
    fn parse(text: &str) -> Result<CpuTimes> {
        let mut per_cpu = Vec::new();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let Some(name) = fields.next() else { continue };
            let Some(index) = name.strip_prefix("cpu").filter(|n| !n.is_empty()) else {
                continue;
            };
            let index: usize = index
                .parse()
                .with_context(|| format!("bad CPU name {name:?} in /proc/stat"))?;
            let ticks: Vec<u64> = fields
                .take(7)
                .map(|field| field.parse().context("non-numeric /proc/stat field"))
                .collect::<Result<_>>()?;
            ensure!(ticks.len() == 7, "short /proc/stat line {line:?}");
            let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
            let total = busy + ticks[3] + ticks[4];
            if per_cpu.len() <= index {
                per_cpu.resize(index + 1, (0, 0));
            }
            per_cpu[index] = (busy, total);
        }
        ensure!(!per_cpu.is_empty(), "no per-CPU lines in /proc/stat");
        Ok(CpuTimes { per_cpu })
    }

    /// Busy seconds per CPU between `earlier` and this snapshot.
    pub fn since(&self, earlier: &CpuTimes) -> CpuUse {
        // SAFETY: sysconf only reads a constant.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        CpuUse {
            busy_seconds: self
                .per_cpu
                .iter()
                .zip(&earlier.per_cpu)
                .map(|((busy, _), (busy_before, _))| {
                    busy.saturating_sub(*busy_before) as f64 / ticks_per_second
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKPERF_OUTPUT: &str = "\
sockperf: \u{1b}[2;35m== version #3.7-no.git == \u{1b}[0m
sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=22827; ReceivedMessages=22826
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=17380; ReceivedMessages=17380
sockperf: \u{1b}[2;35m====> avg-rtt=47.247 (std-dev=141.280)\u{1b}[0m
sockperf: ---> percentile 99.999 = 4569.253
sockperf: ---> percentile 99.000 =   97.983
sockperf: ---> percentile 90.000 =   52.257
sockperf: ---> percentile 50.000 =   38.972
sockperf: ---> <MIN> observation =   24.425
";

    #[test]
    fn sockperf_summary_gives_percentiles_and_rate() {
        let rr = RrResult::from_sockperf(SOCKPERF_OUTPUT).expect("parses");
        assert_eq!(rr.p50_us, 38.972);
        assert_eq!(rr.p99_us, 97.983);
        assert!((rr.transactions_per_s - 17380.0 / 1.55).abs() < 1e-6);
    }

    #[test]
    fn sockperf_without_replies_is_a_failure() {
        let text = SOCKPERF_OUTPUT.replace("ReceivedMessages=17380", "ReceivedMessages=0");
        let error = RrResult::from_sockperf(&text).expect_err("no replies");
        assert!(format!("{error:#}").contains("only 0 round trips"));
        assert!(RrResult::from_sockperf("sockperf: connect() failed").is_err());
    }

    #[test]
    fn iperf3_tcp_needs_received_bytes() {
        let json: Value =
            serde_json::from_str(r#"{"end":{"sum_received":{"bytes":1250000000,"seconds":1.0}}}"#)
                .expect("valid JSON");
        let tcp = TcpResult::from_iperf3(&json).expect("parses");
        assert_eq!(tcp.gbit_per_s(), 10.0);
        assert_eq!(tcp.cpu_seconds_per_gb(0.5), 0.4);
        // A handshake and a few segments: broken, not slow.
        let trickle: Value =
            serde_json::from_str(r#"{"end":{"sum_received":{"bytes":44736,"seconds":2.0}}}"#)
                .expect("valid JSON");
        let error = TcpResult::from_iperf3(&trickle).expect_err("too little to count");
        assert!(format!("{error:#}").contains("only 44736 bytes"));
    }

    #[test]
    fn iperf3_udp_counts_delivered_datagrams() {
        let json: Value = serde_json::from_str(
            r#"{"end":{"sum_received":{"packets":200000,"lost_packets":50000,"seconds":2.0}}}"#,
        )
        .expect("valid JSON");
        let udp = UdpResult::from_iperf3(&json).expect("parses");
        assert_eq!(udp.received_packets, 150_000);
        assert_eq!(udp.kpps(), 75.0);
        assert_eq!(udp.cpu_ns_per_packet(0.15), 1000.0);
    }

    #[test]
    fn proc_stat_busy_excludes_idle_iowait_and_steal() {
        let before = CpuTimes::parse(
            "cpu  10 0 10 100 0 0 0 0 0 0\n\
             cpu0 1 0 2 50 1 0 3 9 0 0\n\
             cpu1 4 0 4 50 0 1 1 0 0 0\n",
        )
        .expect("parses");
        assert_eq!(before.per_cpu, vec![(6, 57), (10, 60)]);
    }
}
