// What a benchmark run found, and the markdown that reports it: medians of
// interleaved runs, ovl's ratios to the kernel overlay and the bare underlay.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::cipher::CipherRate;

/// How the underlay veths are configured while a round of runs measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Underlay {
    /// veth defaults: TSO, GSO and checksum offload on, GRO off.
    Offloads,
    /// TSO, GSO, GRO and tx checksum offload off on both ends of every
    /// underlay veth: frames cross at MTU size with full checksums, as on a
    /// NIC without offloads.
    WireLike,
}

impl Underlay {
    /// Every mode, in the order the benchmark runs them.
    pub const ALL: [Underlay; 2] = [Underlay::Offloads, Underlay::WireLike];

    /// Heading text.
    pub fn label(self) -> &'static str {
        match self {
            Underlay::Offloads => "underlay with offloads (veth defaults)",
            Underlay::WireLike => "wire-like underlay (TSO/GSO/GRO/tx-checksum off)",
        }
    }

    /// Short name for charts and file keys.
    pub fn short(self) -> &'static str {
        match self {
            Underlay::Offloads => "offloads",
            Underlay::WireLike => "wire-like",
        }
    }
}

/// One data path between a client and a server on two routed hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathId {
    /// Host to host over the routed underlay, no overlay.
    Bare,
    /// Container to container through Linux bridge + kernel vxlan (Docker).
    KernelVxlan,
    /// ovl, decap on TC ingress (the default on veth), forwarding off.
    OvlTc,
    /// ovl, decap on TC ingress, IPv4 forwarding on in the hosts.
    OvlTcForwarding,
    /// ovl, decap in native (driver) XDP.
    OvlNative,
    /// ovl, decap in generic (skb) XDP.
    OvlGeneric,
    /// ovl on an encrypted network (WireGuard in the agent), decap on TC.
    OvlEncrypted,
}

impl PathId {
    /// Every path, in table order.
    pub const ALL: [PathId; 7] = [
        PathId::Bare,
        PathId::KernelVxlan,
        PathId::OvlTc,
        PathId::OvlTcForwarding,
        PathId::OvlNative,
        PathId::OvlGeneric,
        PathId::OvlEncrypted,
    ];

    /// Column heading.
    pub fn label(self) -> &'static str {
        match self {
            PathId::Bare => "bare underlay",
            PathId::KernelVxlan => "kernel vxlan",
            PathId::OvlTc => "ovl tc",
            PathId::OvlTcForwarding => "ovl tc +fwd",
            PathId::OvlNative => "ovl native XDP",
            PathId::OvlGeneric => "ovl generic XDP",
            PathId::OvlEncrypted => "ovl encrypted",
        }
    }

    /// Name on the command line (`--hold`).
    pub fn short(self) -> &'static str {
        match self {
            PathId::Bare => "bare",
            PathId::KernelVxlan => "kernel-vxlan",
            PathId::OvlTc => "tc",
            PathId::OvlTcForwarding => "tc-fwd",
            PathId::OvlNative => "native",
            PathId::OvlGeneric => "generic",
            PathId::OvlEncrypted => "encrypted",
        }
    }
}

/// Which way a metric improves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One reported figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// iperf3, 1 TCP stream.
    Tcp1Throughput,
    /// iperf3, 4 TCP streams.
    Tcp4Throughput,
    /// sockperf ping-pong, median round trip.
    RrLatencyP50,
    /// sockperf ping-pong, 99th percentile round trip.
    RrLatencyP99,
    /// sockperf ping-pong, round trips per second.
    RrTransactions,
    /// iperf3 -u -l 64, datagrams received per second.
    Udp64Rate,
    /// CPU of the client's core per GB received, 1 TCP stream.
    Tcp1SenderCpu,
    /// CPU of the server's core per GB received, 1 TCP stream.
    Tcp1ReceiverCpu,
    /// CPU of both cores per GB received, 1 TCP stream: which core does a
    /// piece of the work depends on where packets and ACKs arrive (on veth
    /// the receive path runs on the sending core), the sum does not.
    Tcp1BothCpu,
    /// CPU of the client's core per datagram received, UDP 64 B.
    Udp64SenderCpu,
    /// CPU of the server's core per datagram received, UDP 64 B.
    Udp64ReceiverCpu,
}

impl Metric {
    /// Every metric, in table order.
    pub const ALL: [Metric; 11] = [
        Metric::Tcp1Throughput,
        Metric::Tcp4Throughput,
        Metric::RrLatencyP50,
        Metric::RrLatencyP99,
        Metric::RrTransactions,
        Metric::Udp64Rate,
        Metric::Tcp1SenderCpu,
        Metric::Tcp1ReceiverCpu,
        Metric::Tcp1BothCpu,
        Metric::Udp64SenderCpu,
        Metric::Udp64ReceiverCpu,
    ];

    /// Row heading.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Tcp1Throughput => "TCP throughput, 1 stream",
            Metric::Tcp4Throughput => "TCP throughput, 4 streams",
            Metric::RrLatencyP50 => "TCP RR latency p50",
            Metric::RrLatencyP99 => "TCP RR latency p99",
            Metric::RrTransactions => "TCP RR transactions",
            Metric::Udp64Rate => "UDP 64 B received",
            Metric::Tcp1SenderCpu => "CPU, sender core, TCP 1 stream",
            Metric::Tcp1ReceiverCpu => "CPU, receiver core, TCP 1 stream",
            Metric::Tcp1BothCpu => "CPU, both cores, TCP 1 stream",
            Metric::Udp64SenderCpu => "CPU, sender core, UDP 64 B",
            Metric::Udp64ReceiverCpu => "CPU, receiver core, UDP 64 B",
        }
    }

    /// Unit of the formatted value.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Tcp1Throughput | Metric::Tcp4Throughput => "Gbit/s",
            Metric::RrLatencyP50 | Metric::RrLatencyP99 => "µs",
            Metric::RrTransactions => "trans/s",
            Metric::Udp64Rate => "kpps",
            Metric::Tcp1SenderCpu | Metric::Tcp1ReceiverCpu | Metric::Tcp1BothCpu => "CPU-s/GB",
            Metric::Udp64SenderCpu | Metric::Udp64ReceiverCpu => "CPU-ns/pkt",
        }
    }

    /// Which way is better.
    pub fn better(self) -> Better {
        match self {
            Metric::Tcp1Throughput
            | Metric::Tcp4Throughput
            | Metric::RrTransactions
            | Metric::Udp64Rate => Better::Higher,
            _ => Better::Lower,
        }
    }

    /// `value` (in the metric's unit) as the tables show it.
    pub fn format(self, value: f64) -> String {
        match self {
            Metric::Tcp1Throughput | Metric::Tcp4Throughput => format!("{value:.2}"),
            Metric::RrLatencyP50 | Metric::RrLatencyP99 | Metric::Udp64Rate => {
                format!("{value:.1}")
            }
            Metric::RrTransactions | Metric::Udp64SenderCpu | Metric::Udp64ReceiverCpu => {
                format!("{value:.0}")
            }
            Metric::Tcp1SenderCpu | Metric::Tcp1ReceiverCpu | Metric::Tcp1BothCpu => {
                format!("{value:.3}")
            }
        }
    }
}

/// The median of `values`; the mean of the middle two for an even count.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// `numerator / denominator`, when both exist and the denominator is not 0.
pub fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d != 0.0 => Some(n / d),
        _ => None,
    }
}

/// Every value measured, by underlay mode, path and metric, in run order.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    values: BTreeMap<(Underlay, PathId, Metric), Vec<f64>>,
}

impl Samples {
    /// Records one run's value.
    pub fn add(&mut self, underlay: Underlay, path: PathId, metric: Metric, value: f64) {
        self.values
            .entry((underlay, path, metric))
            .or_default()
            .push(value);
    }

    /// The runs of one figure, in run order.
    pub fn runs(&self, underlay: Underlay, path: PathId, metric: Metric) -> &[f64] {
        self.values
            .get(&(underlay, path, metric))
            .map_or(&[], Vec::as_slice)
    }

    /// The median of one figure's runs.
    pub fn median(&self, underlay: Underlay, path: PathId, metric: Metric) -> Option<f64> {
        median(self.runs(underlay, path, metric))
    }

    /// `path`'s median over `reference`'s for one metric and mode.
    pub fn ratio(
        &self,
        underlay: Underlay,
        metric: Metric,
        path: PathId,
        reference: PathId,
    ) -> Option<f64> {
        ratio(
            self.median(underlay, path, metric),
            self.median(underlay, reference, metric),
        )
    }

    /// The underlay modes that have any value.
    pub fn underlays(&self) -> Vec<Underlay> {
        Underlay::ALL
            .into_iter()
            .filter(|u| self.values.keys().any(|(mode, _, _)| mode == u))
            .collect()
    }

    /// The paths that have any value in `underlay`.
    pub fn paths(&self, underlay: Underlay) -> Vec<PathId> {
        PathId::ALL
            .into_iter()
            .filter(|p| {
                self.values
                    .keys()
                    .any(|(mode, path, _)| *mode == underlay && path == p)
            })
            .collect()
    }

    /// Forgets every value of `path` in `underlay`: once a path failed in
    /// a mode, none of its figures there may be reported.
    pub fn discard(&mut self, underlay: Underlay, path: PathId) {
        self.values
            .retain(|(mode, p, _), _| !(*mode == underlay && *p == path));
    }

    /// Every (mode, path, metric) with its runs, for the raw-data file.
    pub fn iter(&self) -> impl Iterator<Item = (&(Underlay, PathId, Metric), &Vec<f64>)> {
        self.values.iter()
    }
}

/// An ovl path compared with a reference path: one ratio column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Comparison {
    pub path: PathId,
    pub reference: PathId,
}

impl Comparison {
    /// ovl's default on veth (TC decap, hosts as configured: forwarding
    /// off) against the two baselines, then the other ovl variants.
    pub const ALL: [Comparison; 10] = [
        Comparison::new(PathId::OvlTc, PathId::KernelVxlan),
        Comparison::new(PathId::OvlTc, PathId::Bare),
        Comparison::new(PathId::OvlTcForwarding, PathId::KernelVxlan),
        Comparison::new(PathId::OvlTcForwarding, PathId::Bare),
        Comparison::new(PathId::OvlNative, PathId::KernelVxlan),
        Comparison::new(PathId::OvlNative, PathId::Bare),
        Comparison::new(PathId::OvlGeneric, PathId::KernelVxlan),
        Comparison::new(PathId::OvlGeneric, PathId::Bare),
        Comparison::new(PathId::OvlEncrypted, PathId::OvlTc),
        Comparison::new(PathId::OvlEncrypted, PathId::KernelVxlan),
    ];

    const fn new(path: PathId, reference: PathId) -> Self {
        Comparison { path, reference }
    }

    /// Column heading, e.g. `ovl tc / kernel vxlan`.
    pub fn label(self) -> String {
        format!("{} / {}", self.path.label(), self.reference.label())
    }
}

/// One kernel program timed on one frame by BPF_PROG_TEST_RUN.
#[derive(Clone, Debug, PartialEq)]
pub struct MicroRow {
    pub hook: String,
    pub program: String,
    pub case: String,
    pub frame_bytes: u64,
    pub samples: u64,
    pub single_median_ns: u64,
    pub single_p90_ns: u64,
    pub repeat: u64,
    pub repeat_mean_ns: u64,
    /// Whether the repeated runs took the same path as a single run (only
    /// when the program leaves its input unchanged).
    pub repeat_same_path: bool,
    pub repeat_last_action: u64,
}

/// One ovl program's kernel-measured cost during one measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct InSituRow {
    pub underlay: Underlay,
    pub path: PathId,
    pub test: String,
    /// Which host's agent runs the program, and its role in the test.
    pub host: String,
    pub program: String,
    /// Program invocations (one per GSO super-packet, not per segment).
    pub runs: u64,
    pub ns_per_run: f64,
}

/// The offload state one underlay link actually had in one mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffloadRow {
    pub underlay: Underlay,
    pub path: PathId,
    /// `host0:eth0`, `router:h1`, ...
    pub link: String,
    /// e.g. `tso on, gso on, gro off, tx on`.
    pub state: String,
}

/// A data path that did not deliver in one underlay mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub underlay: Underlay,
    pub path: PathId,
    /// The test (or check) that failed.
    pub test: String,
    /// Why, as the tool or check said it.
    pub message: String,
}

/// Everything one benchmark run reports.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub title: String,
    pub machine: Vec<(String, String)>,
    pub settings: Vec<(String, String)>,
    pub samples: Samples,
    pub failures: Vec<Failure>,
    pub micro: Vec<MicroRow>,
    pub in_situ: Vec<InSituRow>,
    pub offloads: Vec<OffloadRow>,
    /// The cipher's own rate, once per round of runs that measured ovl
    /// encrypted.
    pub cipher: Vec<CipherRate>,
    /// The machine's cores (the cipher's ceiling shares them).
    pub cores: usize,
    pub notes: Vec<String>,
}

/// Placeholder for a figure that was not measured.
const NOT_MEASURED: &str = "—";

/// Placeholder for every figure of a path that did not deliver.
const FAILED: &str = "**FAILED**";

impl Report {
    /// Whether `path` failed in `underlay`.
    pub fn failed(&self, underlay: Underlay, path: PathId) -> bool {
        self.failures
            .iter()
            .any(|f| f.underlay == underlay && f.path == path)
    }

    /// The underlay modes with values or failures.
    pub fn underlays(&self) -> Vec<Underlay> {
        let measured = self.samples.underlays();
        Underlay::ALL
            .into_iter()
            .filter(|u| measured.contains(u) || self.failures.iter().any(|f| f.underlay == *u))
            .collect()
    }

    /// The paths with values or a failure in `underlay`, in table order.
    pub fn paths(&self, underlay: Underlay) -> Vec<PathId> {
        let measured = self.samples.paths(underlay);
        PathId::ALL
            .into_iter()
            .filter(|p| measured.contains(p) || self.failed(underlay, *p))
            .collect()
    }

    /// The comparisons that have at least one ratio, or whose ovl path
    /// failed, in `underlay`.
    pub fn comparisons(&self, underlay: Underlay) -> Vec<Comparison> {
        Comparison::ALL
            .into_iter()
            .filter(|c| {
                self.failed(underlay, c.path)
                    || Metric::ALL.into_iter().any(|metric| {
                        self.samples
                            .ratio(underlay, metric, c.path, c.reference)
                            .is_some()
                    })
            })
            .collect()
    }

    /// The whole report as markdown.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# {}\n", self.title);
        md.push_str("## Machine\n\n");
        key_value_table(&mut md, &self.machine);
        md.push_str("\n## Settings\n\n");
        key_value_table(&mut md, &self.settings);
        if !self.failures.is_empty() {
            md.push_str(
                "\n## Failures\n\nThese data paths did not deliver traffic; no figure is \
                 reported for them in that underlay mode.\n\n\
                 | underlay | path | test | what happened |\n|---|---|---|---|\n",
            );
            for failure in &self.failures {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    failure.underlay.short(),
                    failure.path.label(),
                    failure.test,
                    failure.message.replace('\n', " ").replace('|', "\\|")
                );
            }
        }
        for underlay in self.underlays() {
            let _ = writeln!(md, "\n## {}\n", capitalise(underlay.label()));
            md.push_str(&self.values_table(underlay));
            md.push('\n');
            md.push_str(&self.ratios_table(underlay));
        }
        if !self.cipher.is_empty() {
            md.push_str("\n## The cipher's bound (ovl encrypted)\n\n");
            md.push_str(&self.cipher_table());
        }
        if !self.micro.is_empty() {
            md.push_str("\n## Kernel programs alone (BPF_PROG_TEST_RUN)\n\n");
            md.push_str(&self.micro_table());
        }
        if !self.in_situ.is_empty() {
            md.push_str("\n## ovl's programs under traffic (kernel BPF run-time statistics)\n\n");
            md.push_str(&self.in_situ_table());
        }
        if !self.notes.is_empty() {
            md.push_str("\n## Notes\n\n");
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
        }
        if !self.offloads.is_empty() {
            md.push_str("\n## Underlay offload state as measured\n\n");
            md.push_str(&self.offload_table());
        }
        md.push_str("\n## Every run\n\n");
        md.push_str(&self.runs_table());
        md
    }

    /// Medians: one row per metric, one column per path.
    pub fn values_table(&self, underlay: Underlay) -> String {
        let paths = self.paths(underlay);
        let mut md = String::from("| metric | unit |");
        for path in &paths {
            let _ = write!(md, " {} |", path.label());
        }
        md.push_str("\n|---|---|");
        md.push_str(&"---:|".repeat(paths.len()));
        md.push('\n');
        for metric in Metric::ALL {
            if paths
                .iter()
                .all(|p| self.samples.median(underlay, *p, metric).is_none())
            {
                continue;
            }
            let _ = write!(md, "| {} | {} |", metric.label(), metric.unit());
            for path in &paths {
                let cell = if self.failed(underlay, *path) {
                    FAILED.to_string()
                } else {
                    self.samples
                        .median(underlay, *path, metric)
                        .map_or_else(|| NOT_MEASURED.to_string(), |v| metric.format(v))
                };
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
        md
    }

    /// Ratios of ovl's medians to the references' medians.
    pub fn ratios_table(&self, underlay: Underlay) -> String {
        let comparisons = self.comparisons(underlay);
        let mut md = String::from("| ratio | better |");
        for comparison in &comparisons {
            let _ = write!(md, " {} |", comparison.label());
        }
        md.push_str("\n|---|---|");
        md.push_str(&"---:|".repeat(comparisons.len()));
        md.push('\n');
        for metric in Metric::ALL {
            let ratios: Vec<Option<f64>> = comparisons
                .iter()
                .map(|c| self.samples.ratio(underlay, metric, c.path, c.reference))
                .collect();
            if ratios.iter().all(Option::is_none) {
                continue;
            }
            let better = match metric.better() {
                Better::Higher => "higher",
                Better::Lower => "lower",
            };
            let _ = write!(md, "| {} | {better} |", metric.label());
            for (comparison, ratio) in comparisons.iter().zip(ratios) {
                let cell = if self.failed(underlay, comparison.path) {
                    FAILED.to_string()
                } else {
                    ratio.map_or_else(|| NOT_MEASURED.to_string(), |r| format!("{r:.2}"))
                };
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
        md
    }

    /// The cipher's medians, its ceiling on this machine, and that ceiling
    /// beside ovl tc and ovl encrypted's TCP 1 stream in each underlay.
    fn cipher_table(&self) -> String {
        let gbytes = |pick: fn(&CipherRate) -> f64| {
            let values: Vec<f64> = self.cipher.iter().map(pick).collect();
            median(&values).unwrap_or(0.0) / 1e9
        };
        let (seal, open) = (
            gbytes(|r| r.seal_bytes_per_s),
            gbytes(|r| r.open_bytes_per_s),
        );
        let ceiling = CipherRate {
            seal_bytes_per_s: seal * 1e9,
            open_bytes_per_s: open * 1e9,
        }
        .ceiling_bytes_per_s(self.cores)
            * 8.0
            / 1e9;
        let mut md = format!(
            "boringtun sealing and opening {} B packets (the crypto device's full-size \
             frame) on one thread, 1 s before each round of runs, median of {}: \
             **seal {seal:.2} GB/s, open {open:.2} GB/s per core**. Every byte of an \
             encrypted network is sealed on one host and opened on the other, and both \
             hosts share this machine's {} cores: with the cipher alone on every core \
             (no TCP, no device, no socket) at most **{ceiling:.2} Gbit/s** of packets \
             could cross. That ceiling is an upper bound on ovl encrypted in this run.\n\n\
             | underlay | ovl tc, TCP 1 stream | ovl encrypted | encrypted / ovl tc | \
             cipher ceiling / ovl tc |\n|---|---:|---:|---:|---:|\n",
            crate::cipher::PACKET_BYTES,
            self.cipher.len(),
            self.cores,
        );
        let metric = Metric::Tcp1Throughput;
        for underlay in self.underlays() {
            let plain = self.samples.median(underlay, PathId::OvlTc, metric);
            let encrypted = self.samples.median(underlay, PathId::OvlEncrypted, metric);
            let show = |v: Option<f64>, f: fn(f64) -> String| {
                v.map_or_else(|| NOT_MEASURED.to_string(), f)
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                underlay.short(),
                show(plain, |v| format!("{v:.2}")),
                show(encrypted, |v| format!("{v:.2}")),
                show(ratio(encrypted, plain), |v| format!("{v:.2}")),
                show(ratio(Some(ceiling), plain), |v| format!("{v:.2}")),
            );
        }
        md
    }

    fn micro_table(&self) -> String {
        let mut md = String::from(
            "| hook | program | case | frame B | ns/packet, median of single runs | p90 | \
             repeat mean ns |\n|---|---|---|---:|---:|---:|---|\n",
        );
        for row in &self.micro {
            let repeat = if row.repeat_same_path {
                format!("{} ({} runs)", row.repeat_mean_ns, row.repeat)
            } else {
                format!(
                    "n/a: reruns on its own output (last of {} returned {}, {} ns)",
                    row.repeat, row.repeat_last_action, row.repeat_mean_ns
                )
            };
            let _ = writeln!(
                md,
                "| {} | `{}` | {} | {} | {} | {} | {} |",
                row.hook,
                row.program,
                row.case,
                row.frame_bytes,
                row.single_median_ns,
                row.single_p90_ns,
                repeat
            );
        }
        md
    }

    fn in_situ_table(&self) -> String {
        let mut md = String::from(
            "| underlay | path | test | host | program | runs | ns/run |\n\
             |---|---|---|---|---|---:|---:|\n",
        );
        for row in &self.in_situ {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | `{}` | {} | {:.0} |",
                row.underlay.short(),
                row.path.label(),
                row.test,
                row.host,
                row.program,
                row.runs,
                row.ns_per_run
            );
        }
        md
    }

    fn offload_table(&self) -> String {
        let mut md = String::from("| underlay | path | link | state |\n|---|---|---|---|\n");
        for row in &self.offloads {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                row.underlay.short(),
                row.path.label(),
                row.link,
                row.state
            );
        }
        md
    }

    fn runs_table(&self) -> String {
        let mut md =
            String::from("| underlay | path | metric | runs | median |\n|---|---|---|---|---:|\n");
        for ((underlay, path, metric), runs) in self.samples.iter() {
            let runs_text: Vec<String> = runs.iter().map(|v| metric.format(*v)).collect();
            let median =
                median(runs).map_or_else(|| NOT_MEASURED.to_string(), |v| metric.format(v));
            let _ = writeln!(
                md,
                "| {} | {} | {} ({}) | {} | {} |",
                underlay.short(),
                path.label(),
                metric.label(),
                metric.unit(),
                runs_text.join(", "),
                median
            );
        }
        md
    }
}

fn key_value_table(md: &mut String, rows: &[(String, String)]) {
    md.push_str("| | |\n|---|---|\n");
    for (key, value) in rows {
        let _ = writeln!(md, "| {key} | {value} |");
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> Report {
        let mut samples = Samples::default();
        let offloads = Underlay::Offloads;
        for value in [10.0, 12.0, 11.0] {
            samples.add(offloads, PathId::Bare, Metric::Tcp1Throughput, value);
        }
        for value in [8.0, 7.0, 9.0] {
            samples.add(offloads, PathId::KernelVxlan, Metric::Tcp1Throughput, value);
        }
        for value in [6.0, 6.5, 5.5, 7.0] {
            samples.add(offloads, PathId::OvlTc, Metric::Tcp1Throughput, value);
        }
        for value in [40.0, 50.0, 45.0] {
            samples.add(offloads, PathId::KernelVxlan, Metric::RrLatencyP50, value);
        }
        for value in [30.0, 36.0, 33.0] {
            samples.add(offloads, PathId::OvlTc, Metric::RrLatencyP50, value);
        }
        Report {
            title: "ovl benchmark".to_string(),
            machine: vec![("kernel".to_string(), "6.18".to_string())],
            settings: vec![("runs".to_string(), "3".to_string())],
            samples,
            ..Report::default()
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn ratio_needs_both_sides_and_a_nonzero_reference() {
        assert_eq!(ratio(Some(6.0), Some(8.0)), Some(0.75));
        assert_eq!(ratio(Some(6.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(8.0)), None);
        assert_eq!(ratio(Some(6.0), None), None);
    }

    #[test]
    fn ratios_are_of_medians() {
        let report = sample_report();
        let samples = &report.samples;
        let offloads = Underlay::Offloads;
        // ovl tc median 6.25 (even count), kernel vxlan 8, bare 11.
        assert_eq!(
            samples.ratio(
                offloads,
                Metric::Tcp1Throughput,
                PathId::OvlTc,
                PathId::KernelVxlan
            ),
            Some(6.25 / 8.0)
        );
        assert_eq!(
            samples.ratio(
                offloads,
                Metric::Tcp1Throughput,
                PathId::OvlTc,
                PathId::Bare
            ),
            Some(6.25 / 11.0)
        );
        assert_eq!(
            samples.ratio(offloads, Metric::RrLatencyP50, PathId::OvlTc, PathId::Bare),
            None
        );
    }

    #[test]
    fn values_table_has_a_column_per_measured_path_and_dashes_for_gaps() {
        let table = sample_report().values_table(Underlay::Offloads);
        let expected = "\
| metric | unit | bare underlay | kernel vxlan | ovl tc |
|---|---|---:|---:|---:|
| TCP throughput, 1 stream | Gbit/s | 11.00 | 8.00 | 6.25 |
| TCP RR latency p50 | µs | — | 45.0 | 33.0 |
";
        assert_eq!(table, expected);
    }

    #[test]
    fn ratios_table_lists_only_comparisons_with_data() {
        let table = sample_report().ratios_table(Underlay::Offloads);
        let expected = "\
| ratio | better | ovl tc / kernel vxlan | ovl tc / bare underlay |
|---|---|---:|---:|
| TCP throughput, 1 stream | higher | 0.78 | 0.57 |
| TCP RR latency p50 | lower | 0.73 | — |
";
        assert_eq!(table, expected);
    }

    #[test]
    fn markdown_has_every_section_and_all_runs() {
        let md = sample_report().markdown();
        assert!(md.starts_with("# ovl benchmark\n"));
        assert!(md.contains("| kernel | 6.18 |"));
        assert!(md.contains("## Underlay with offloads (veth defaults)"));
        assert!(!md.contains("Wire-like"), "no runs, no section");
        assert!(md.contains(
            "| offloads | ovl tc | TCP throughput, 1 stream (Gbit/s) | 6.00, 6.50, 5.50, 7.00 | 6.25 |"
        ));
    }

    #[test]
    fn the_cipher_section_puts_its_ceiling_beside_ovl_tc() {
        let mut report = sample_report();
        assert!(
            !report.markdown().contains("cipher's bound"),
            "no cipher runs, no section"
        );
        for value in [2.0, 3.0, 2.5] {
            report.samples.add(
                Underlay::Offloads,
                PathId::OvlEncrypted,
                Metric::Tcp1Throughput,
                value,
            );
        }
        // Medians 1 and 1 GB/s on 2 cores: 1 GB/s sealed and opened, 8 Gbit/s.
        for (seal, open) in [(1.0e9, 1.2e9), (0.9e9, 1.0e9), (1.1e9, 0.8e9)] {
            report.cipher.push(CipherRate {
                seal_bytes_per_s: seal,
                open_bytes_per_s: open,
            });
        }
        report.cores = 2;
        let md = report.markdown();
        assert!(
            md.contains("**seal 1.00 GB/s, open 1.00 GB/s per core**"),
            "{md}"
        );
        assert!(md.contains("at most **8.00 Gbit/s**"), "{md}");
        // ovl tc's median is 6.25, ovl encrypted's 2.5.
        assert!(
            md.contains("| offloads | 6.25 | 2.50 | 0.40 | 1.28 |"),
            "{md}"
        );
    }

    #[test]
    fn a_failed_path_shows_failed_and_never_a_number() {
        let mut report = sample_report();
        let offloads = Underlay::Offloads;
        report
            .samples
            .add(offloads, PathId::OvlGeneric, Metric::Tcp1Throughput, 0.5);
        report
            .samples
            .add(offloads, PathId::OvlGeneric, Metric::Tcp1Throughput, 0.7);
        report.samples.discard(offloads, PathId::OvlGeneric);
        report.failures.push(Failure {
            underlay: offloads,
            path: PathId::OvlGeneric,
            test: "TCP 1 stream".to_string(),
            message: "moved 44 KB in 2 s".to_string(),
        });
        let values = report.values_table(offloads);
        assert!(values.contains("| ovl generic XDP |"));
        assert!(values.contains("| 11.00 | 8.00 | 6.25 | **FAILED** |"));
        assert!(!values.contains("0.60"));
        let ratios = report.ratios_table(offloads);
        assert!(
            ratios.contains("| ovl generic XDP / kernel vxlan | ovl generic XDP / bare underlay |")
        );
        assert!(ratios.contains("| 0.78 | 0.57 | **FAILED** | **FAILED** |"));
        let md = report.markdown();
        assert!(md.contains("| offloads | ovl generic XDP | TCP 1 stream | moved 44 KB in 2 s |"));
    }

    #[test]
    fn micro_rows_say_when_repeat_measured_another_path() {
        let mut report = sample_report();
        let row = MicroRow {
            hook: "XDP".to_string(),
            program: "ovl_xdp_decap".to_string(),
            case: "decap 64 B".to_string(),
            frame_bytes: 114,
            samples: 1000,
            single_median_ns: 510,
            single_p90_ns: 550,
            repeat: 100_000,
            repeat_mean_ns: 49,
            repeat_same_path: false,
            repeat_last_action: 2,
        };
        report.micro = vec![
            row.clone(),
            MicroRow {
                case: "pass-through".to_string(),
                repeat_same_path: true,
                repeat_mean_ns: 59,
                ..row
            },
        ];
        let md = report.markdown();
        assert!(md.contains(
            "| XDP | `ovl_xdp_decap` | decap 64 B | 114 | 510 | 550 | n/a: reruns on its own output (last of 100000 returned 2, 49 ns) |"
        ));
        assert!(md.contains("| pass-through | 114 | 510 | 550 | 59 (100000 runs) |"));
    }
}
