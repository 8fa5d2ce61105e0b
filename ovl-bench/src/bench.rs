// `cargo xtask bench`: ovl against the bare underlay and Docker's kernel
// vxlan overlay on identical namespace topologies, plus its programs alone.

//! Builds release binaries, builds one two-host routed topology per data
//! path (each in its own lab, all alive at once so runs interleave), and
//! for each underlay mode (veth offloads on, then wire-like) measures every
//! path in turn — A B C A B C … — so slow drifts of a shared machine hit
//! every path alike. Each figure is the median of the runs. A path that
//! does not deliver fails the whole benchmark: no number is ever reported
//! for a path that did not work.
//!
//! Writes `bench/results/<date>[-quick|-tcp|-encrypted][-<underlay>].{md,json,png}`
//! (a bare date only for a full run of every underlay mode) and prints the
//! markdown on stdout.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::measure::{CLIENT_CPU, SERVER_CPU, TCP_MULTI_STREAMS};
use crate::report::{Failure, InSituRow, Metric, PathId, Report, Samples, Underlay};
use crate::topology::Topology;
use crate::{chart, cipher, machine, micro, offloads, progstats, report};

/// How long the cipher is measured alone before each round of runs that
/// measures ovl encrypted.
const CIPHER_SECONDS: Duration = Duration::from_secs(1);

/// What `cargo xtask bench` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// Fewer, shorter runs: a smoke test of the whole benchmark.
    pub quick: bool,
    /// Runs per figure, overriding the mode's default.
    pub runs: Option<u32>,
    /// Seconds per measurement, overriding the mode's default.
    pub seconds: Option<u32>,
    /// Only TCP throughput, for the reference paths and ovl's decap
    /// hooks on veth: a receive-path experiment's loop, not the published
    /// benchmark.
    pub tcp_only: bool,
    /// Only TCP 1 stream of ovl tc and ovl encrypted: the encrypting
    /// path's experiment loop, not the published benchmark.
    pub encrypted_only: bool,
    /// Only this underlay mode (default: every mode).
    pub underlay: Option<Underlay>,
}

/// One traffic test; several metrics come out of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Test {
    Tcp1,
    Tcp4,
    RequestResponse,
    Udp64,
}

impl Test {
    const ALL: [Test; 4] = [Test::Tcp1, Test::Tcp4, Test::RequestResponse, Test::Udp64];

    fn label(self) -> &'static str {
        match self {
            Test::Tcp1 => "TCP 1 stream",
            Test::Tcp4 => "TCP 4 streams",
            Test::RequestResponse => "TCP request/response",
            Test::Udp64 => "UDP 64 B",
        }
    }
}

/// How much to measure.
#[derive(Clone, Copy, Debug)]
struct Plan {
    quick: bool,
    tcp_only: bool,
    encrypted_only: bool,
    underlay: Option<Underlay>,
    runs: u32,
    seconds: u32,
    micro_samples: u32,
    micro_repeat: u32,
}

impl Plan {
    fn new(options: &Options) -> Result<Plan> {
        let (runs, seconds, micro_samples) = if options.quick {
            (3, 1, 5_000)
        } else {
            (3, 3, 20_000)
        };
        let plan = Plan {
            quick: options.quick,
            tcp_only: options.tcp_only,
            encrypted_only: options.encrypted_only,
            underlay: options.underlay,
            runs: options.runs.unwrap_or(runs),
            seconds: options.seconds.unwrap_or(seconds),
            micro_samples,
            micro_repeat: 100_000,
        };
        if plan.runs < 3 {
            bail!("--runs must be at least 3: every figure is a median of at least 3 runs");
        }
        if !(1..=crate::measure::MAX_SECONDS).contains(&plan.seconds) {
            bail!(
                "--seconds {} is out of range: give 1 to {} seconds per measurement",
                plan.seconds,
                crate::measure::MAX_SECONDS
            );
        }
        Ok(plan)
    }

    /// The tests each path gets. The reference paths and ovl's default
    /// get everything; the other ovl variants get what tells them apart
    /// (throughput, and small packets where XDP should shine) — in quick
    /// mode just one stream of TCP.
    /// Generic XDP gets nothing on the offloads underlay: it runs after
    /// GRO, and ovl refuses (as `too_big`) the super-packets it cannot
    /// redirect, so TCP cannot work there by design (README, decap hook).
    fn tests(self, path: PathId, underlay: Underlay) -> &'static [Test] {
        if self.underlay.is_some_and(|only| only != underlay) {
            return &[];
        }
        if self.encrypted_only {
            return if matches!(path, PathId::OvlTc | PathId::OvlEncrypted) {
                &[Test::Tcp1]
            } else {
                &[]
            };
        }
        if self.tcp_only {
            let measured = matches!(
                path,
                PathId::Bare | PathId::KernelVxlan | PathId::OvlTc | PathId::OvlNative
            );
            return if measured {
                &[Test::Tcp1, Test::Tcp4]
            } else {
                &[]
            };
        }
        if path == PathId::OvlGeneric && underlay == Underlay::Offloads {
            return &[];
        }
        match (path, self.quick) {
            (PathId::Bare | PathId::KernelVxlan | PathId::OvlTc, _) => &Test::ALL,
            (PathId::OvlEncrypted, false) => &Test::ALL,
            (PathId::OvlEncrypted, true) => &[Test::Tcp1],
            (PathId::OvlTcForwarding, false) => &Test::ALL,
            (PathId::OvlNative | PathId::OvlGeneric, false) => &[Test::Tcp1, Test::Udp64],
            (PathId::OvlTcForwarding | PathId::OvlNative | PathId::OvlGeneric, true) => {
                &[Test::Tcp1]
            }
        }
    }

    /// The tests repeated once per ovl path with the kernel timing its
    /// programs (which costs every program run a little: these runs are
    /// not part of the figures).
    fn in_situ_tests(self) -> &'static [Test] {
        if self.focused() {
            &[]
        } else if self.quick {
            &[Test::Udp64]
        } else {
            &[Test::Tcp1, Test::Udp64]
        }
    }

    /// Seconds of each in-situ run: the per-run cost needs no long run.
    fn in_situ_seconds(self) -> u32 {
        self.seconds.min(2)
    }

    /// A focused loop (`--tcp-only`, `--encrypted-only`): no
    /// micro-benchmark, no in-situ runs.
    fn focused(self) -> bool {
        self.tcp_only || self.encrypted_only
    }

    /// The flags that select this plan, as `cargo xtask bench` takes them.
    fn flags(self) -> String {
        let mode = if self.tcp_only {
            " --tcp-only"
        } else if self.encrypted_only {
            " --encrypted-only"
        } else if self.quick {
            " --quick"
        } else {
            ""
        };
        match self.underlay {
            Some(underlay) => format!("{mode} --underlay {}", underlay.short()),
            None => mode.to_string(),
        }
    }

    fn name(self) -> &'static str {
        if self.encrypted_only {
            "encrypted"
        } else if self.tcp_only {
            "tcp"
        } else if self.quick {
            "quick"
        } else {
            "full"
        }
    }

    /// The results' file name without extension: `<date>` only for a full
    /// run of every underlay mode, so that no partial run (one underlay,
    /// quick, focused) overwrites or passes for one.
    fn stem(self, date: &str) -> String {
        let mut stem = date.to_string();
        if self.name() != "full" {
            stem = format!("{stem}-{}", self.name());
        }
        if let Some(underlay) = self.underlay {
            stem = format!("{stem}-{}", underlay.short());
        }
        stem
    }

    /// The report's title.
    fn title(self, date: &str) -> String {
        match self.underlay {
            Some(underlay) => format!(
                "ovl benchmark, {date} ({} run, {} underlay only)",
                self.name(),
                underlay.short()
            ),
            None => format!("ovl benchmark, {date} ({} run)", self.name()),
        }
    }

    /// The underlay modes that have any test.
    fn underlays(self) -> Vec<Underlay> {
        Underlay::ALL
            .into_iter()
            .filter(|u| PathId::ALL.iter().any(|p| !self.tests(*p, *u).is_empty()))
            .collect()
    }

    /// Whether `path` has any test in any underlay mode (else its
    /// topology is not built).
    fn measures(self, path: PathId) -> bool {
        Underlay::ALL
            .iter()
            .any(|u| !self.tests(path, *u).is_empty())
    }
}

/// Runs the benchmark and writes its report.
pub fn run(options: Options) -> Result<()> {
    let started = Instant::now();
    crate::progstats::ensure_global_off()?;
    let plan = Plan::new(&options)?;
    let micro_binary = if plan.focused() {
        None
    } else {
        Some(micro::binary()?)
    };
    let build_time = started.elapsed();

    let machine = machine::describe();
    let date = machine::utc_date();
    let micro = match &micro_binary {
        None => Vec::new(),
        Some(binary) => {
            eprintln!("xtask: bench: kernel programs alone (BPF_PROG_TEST_RUN)");
            micro::run(binary, plan.micro_samples, plan.micro_repeat)?
        }
    };

    let measuring = Instant::now();
    let mut samples = Samples::default();
    let mut failures: Vec<Failure> = Vec::new();
    let mut offload_rows = Vec::new();
    let mut in_situ = Vec::new();
    let mut cipher = Vec::new();
    {
        let mut topologies = Vec::new();
        for path in PathId::ALL.into_iter().filter(|p| plan.measures(*p)) {
            eprintln!("xtask: bench: building {}", path.label());
            let topology =
                Topology::build(path).with_context(|| format!("building {}", path.label()))?;
            eprintln!(
                "xtask: bench: {} ready in lab {}",
                path.label(),
                topology.lab_prefix()
            );
            topologies.push(topology);
        }
        for underlay in plan.underlays() {
            for topology in &topologies {
                offloads::apply(topology, underlay)?;
                offload_rows.extend(offloads::read(topology, underlay)?);
                if let Err(error) = topology.check_delivers() {
                    fail(
                        &mut failures,
                        &mut samples,
                        underlay,
                        topology.path,
                        "ping",
                        &error,
                    );
                }
            }
            for run in 1..=plan.runs {
                if !plan.tests(PathId::OvlEncrypted, underlay).is_empty() {
                    cipher.push(
                        cipher::measure(CIPHER_SECONDS).context("measuring the cipher alone")?,
                    );
                }
                for test in Test::ALL {
                    for topology in &topologies {
                        let path = topology.path;
                        let failed = failures
                            .iter()
                            .any(|f| f.underlay == underlay && f.path == path);
                        if failed || !plan.tests(path, underlay).contains(&test) {
                            continue;
                        }
                        if let Err(error) =
                            measure(&mut samples, topology, underlay, test, plan.seconds)
                        {
                            let what = format!("{}, run {run}", test.label());
                            fail(&mut failures, &mut samples, underlay, path, &what, &error);
                        }
                    }
                }
                eprintln!(
                    "xtask: bench: {} run {run}/{} done ({:.0} s so far)",
                    underlay.short(),
                    plan.runs,
                    started.elapsed().as_secs_f64()
                );
            }
            let _stats = progstats::enable()?;
            for topology in &topologies {
                let path = topology.path;
                let failed = failures
                    .iter()
                    .any(|f| f.underlay == underlay && f.path == path);
                if failed
                    || topology.agent_pins.is_empty()
                    || plan.tests(path, underlay).is_empty()
                    || plan.in_situ_tests().is_empty()
                {
                    continue;
                }
                for test in plan.in_situ_tests() {
                    match program_costs(topology, underlay, *test, plan.in_situ_seconds()) {
                        Ok(rows) => in_situ.extend(rows),
                        Err(error) => {
                            let what = format!("{} with BPF statistics", test.label());
                            fail(&mut failures, &mut samples, underlay, path, &what, &error);
                        }
                    }
                }
            }
        }
        eprintln!("xtask: bench: removing the labs");
    }
    let measure_time = measuring.elapsed();

    let settings = settings(&plan);
    let mut report = Report {
        title: plan.title(&date),
        machine,
        settings,
        samples,
        failures,
        micro,
        in_situ,
        offloads: offload_rows,
        cipher,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        notes: Vec::new(),
    };
    report.notes = notes(&report, &plan, build_time, measure_time, started.elapsed());
    write_outputs(&report, &date, &plan)?;
    if !report.failures.is_empty() {
        let list: Vec<String> = report
            .failures
            .iter()
            .map(|f| {
                format!(
                    "{} ({}, {}): {}",
                    f.path.label(),
                    f.underlay.short(),
                    f.test,
                    f.message
                )
            })
            .collect();
        bail!(
            "{} data path(s) did not deliver traffic; no figure is reported for them:\n  {}",
            list.len(),
            list.join("\n  ")
        );
    }
    Ok(())
}

/// Records that `path` did not deliver in `underlay` and forgets its
/// figures there: a path that failed once has no trustworthy number.
fn fail(
    failures: &mut Vec<Failure>,
    samples: &mut Samples,
    underlay: Underlay,
    path: PathId,
    test: &str,
    error: &anyhow::Error,
) {
    let message = format!("{error:#}");
    eprintln!(
        "xtask: bench: FAILED: {} does not deliver ({}, {test}): {message}",
        path.label(),
        underlay.short()
    );
    samples.discard(underlay, path);
    failures.push(Failure {
        underlay,
        path,
        test: test.to_string(),
        message,
    });
}

/// One run of `test` on `topology`, recorded as samples.
fn measure(
    samples: &mut Samples,
    topology: &Topology,
    underlay: Underlay,
    test: Test,
    seconds: u32,
) -> Result<()> {
    let endpoints = &topology.endpoints;
    let path = topology.path;
    let mut record = |metric: Metric, value: f64| {
        samples.add(underlay, path, metric, value);
        value
    };
    let summary = match test {
        Test::Tcp1 | Test::Tcp4 => {
            let streams = if test == Test::Tcp1 {
                1
            } else {
                TCP_MULTI_STREAMS
            };
            let (tcp, cpu) = endpoints.tcp_throughput(seconds, streams)?;
            if test == Test::Tcp1 {
                let sender = record(
                    Metric::Tcp1SenderCpu,
                    tcp.cpu_seconds_per_gb(cpu.busy_seconds(CLIENT_CPU)),
                );
                let receiver = record(
                    Metric::Tcp1ReceiverCpu,
                    tcp.cpu_seconds_per_gb(cpu.busy_seconds(SERVER_CPU)),
                );
                record(Metric::Tcp1BothCpu, sender + receiver);
                format!(
                    "{:.2} Gbit/s",
                    record(Metric::Tcp1Throughput, tcp.gbit_per_s())
                )
            } else {
                format!(
                    "{:.2} Gbit/s",
                    record(Metric::Tcp4Throughput, tcp.gbit_per_s())
                )
            }
        }
        Test::RequestResponse => {
            let rr = endpoints.tcp_request_response(seconds)?;
            record(Metric::RrLatencyP50, rr.p50_us);
            record(Metric::RrLatencyP99, rr.p99_us);
            record(Metric::RrTransactions, rr.transactions_per_s);
            format!(
                "p50 {:.1} µs, p99 {:.1} µs, {:.0} trans/s",
                rr.p50_us, rr.p99_us, rr.transactions_per_s
            )
        }
        Test::Udp64 => {
            let (udp, cpu) = endpoints.udp_small(seconds)?;
            record(
                Metric::Udp64SenderCpu,
                udp.cpu_ns_per_packet(cpu.busy_seconds(CLIENT_CPU)),
            );
            record(
                Metric::Udp64ReceiverCpu,
                udp.cpu_ns_per_packet(cpu.busy_seconds(SERVER_CPU)),
            );
            format!("{:.1} kpps", record(Metric::Udp64Rate, udp.kpps()))
        }
    };
    eprintln!(
        "xtask: bench: {:>9} | {:<15} | {:<20} | {summary}",
        underlay.short(),
        path.label(),
        test.label()
    );
    Ok(())
}

/// One extra run of `test` on an ovl path with the kernel timing every
/// program run: ovl's programs' own cost under real traffic.
fn program_costs(
    topology: &Topology,
    underlay: Underlay,
    test: Test,
    seconds: u32,
) -> Result<Vec<InSituRow>> {
    let before = progstats::snapshot(&topology.agent_pins)?;
    match test {
        Test::Tcp1 => {
            topology.endpoints.tcp_throughput(seconds, 1)?;
        }
        Test::Udp64 => {
            topology.endpoints.udp_small(seconds)?;
        }
        Test::Tcp4 | Test::RequestResponse => bail!("no in-situ run of {}", test.label()),
    }
    let after = progstats::snapshot(&topology.agent_pins)?;
    Ok(progstats::delta(&before, &after)
        .into_iter()
        .map(|runs| InSituRow {
            underlay,
            path: topology.path,
            test: test.label().to_string(),
            host: runs.host,
            program: runs.program,
            runs: runs.runs,
            ns_per_run: runs.ns_per_run,
        })
        .collect())
}

fn settings(plan: &Plan) -> Vec<(String, String)> {
    let per_path: Vec<String> = PathId::ALL
        .iter()
        .filter(|path| plan.measures(**path))
        .map(|path| {
            let tests: Vec<&str> = Underlay::ALL
                .iter()
                .map(|u| plan.tests(*path, *u))
                .max_by_key(|tests| tests.len())
                .unwrap_or(&[])
                .iter()
                .map(|t| t.label())
                .collect();
            let offloads =
                if plan.tests(*path, Underlay::Offloads).is_empty() && plan.underlay.is_none() {
                    " (wire-like only: generic XDP cannot carry GRO super-packets)"
                } else {
                    ""
                };
            format!("{}: {}{offloads}", path.label(), tests.join(", "))
        })
        .collect();
    vec![
        ("mode".to_string(), format!("{} (`cargo xtask bench{}`)", plan.name(), plan.flags())),
        (
            "runs per figure".to_string(),
            format!("{}, interleaved across paths (A B C A B C …); figures are medians", plan.runs),
        ),
        ("seconds per measurement".to_string(), plan.seconds.to_string()),
        ("tests per path".to_string(), per_path.join("; ")),
        (
            "pinning".to_string(),
            format!("client `taskset -c {CLIENT_CPU}`, server `taskset -c {SERVER_CPU}`"),
        ),
        (
            "throughput".to_string(),
            format!("`iperf3 -c SERVER -t {0} -J` with `-P 1` and `-P {TCP_MULTI_STREAMS}`; receiver-side bytes", plan.seconds),
        ),
        (
            "request/response".to_string(),
            format!("`sockperf ping-pong --tcp -m 64 -t {} --full-rtt`: round-trip percentiles; transactions/s = replies / valid duration", plan.seconds),
        ),
        (
            "small packets".to_string(),
            format!("`iperf3 -u -l 64 -b 0 -t {}`: datagrams the server received per second", plan.seconds),
        ),
        (
            "CPU".to_string(),
            "/proc/stat per pinned core (user+nice+system+irq+softirq) over the client command, per GB or per datagram received".to_string(),
        ),
        (
            "programs under traffic".to_string(),
            format!(
                "one extra {} s run of {} per ovl path and underlay mode with BPF_ENABLE_STATS on \
                 (not part of the figures); run_time_ns / run_cnt per program from `bpftool prog show`",
                plan.in_situ_seconds(),
                plan.in_situ_tests()
                    .iter()
                    .map(|t| t.label())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        ),
        (
            "micro-benchmark".to_string(),
            format!(
                "{} single BPF_PROG_TEST_RUN calls per case (median), plus one call with repeat {}",
                plan.micro_samples, plan.micro_repeat
            ),
        ),
    ]
}

fn notes(
    report: &Report,
    plan: &Plan,
    build_time: std::time::Duration,
    measure_time: std::time::Duration,
    total_time: std::time::Duration,
) -> Vec<String> {
    let mut notes = vec![
        "Topology per path: two hosts on different /24s behind a router namespace \
         (`routed_hosts(2)`), MTU 1500. Bare underlay = host netns to host netns \
         (198.51.100.10), no container veth. Overlays = container to container, \
         MTU 1450, one VNI (1390 on the encrypted network, which carries VXLAN inside \
         WireGuard)."
            .to_string(),
        "`ovl encrypted`: an encrypted network (decap on TC): the egress program sends the \
         VXLAN frame to the agent's crypto device (a TAP), the agent seals it with boringtun \
         (ChaCha20-Poly1305) and sends it over UDP; the peer's agent opens it and writes it to \
         its crypto device, whose TC ingress decapsulates. The agents are not pinned to a core: \
         they share both with client and server."
            .to_string(),
        "IPv4 forwarding in the hosts is off (the namespace default) for every path \
         except `ovl tc +fwd`, where it is on and ovl's encapsulation resolves the next \
         hop with bpf_fib_lookup instead of handing the packet to the kernel's routing."
            .to_string(),
        "On veth, a receiver's softirq work (IP, TCP, and the decap hook) runs on the \
         core that transmitted: the 'sender core' CPU figures include most of the \
         receive path, the 'receiver core' mostly the copy to the application and ACKs. \
         The sender's TCP also transmits from the core its ACKs arrive on, the receiver's: \
         a path whose receiver sends more ACKs moves sender work onto that core. \
         'Both cores' is the sum, which no such move changes."
            .to_string(),
        "CPU figures are machine-wide per core: other work on the machine during a run \
         is included. Interleaving and medians spread such noise over every path."
            .to_string(),
    ];
    if let Some(exception) = offloads::path_exception(PathId::OvlNative) {
        notes.push(exception.to_string());
    }
    let overhead = |hook: &str| {
        report
            .micro
            .iter()
            .find(|row| {
                row.repeat_same_path
                    && row.hook.starts_with(hook)
                    && row.case.starts_with("pass-through")
            })
            .map(|row| row.single_median_ns as i64 - row.repeat_mean_ns as i64)
    };
    if let (Some(xdp), Some(tc)) = (overhead("XDP"), overhead("TC")) {
        notes.push(format!(
            "Micro-benchmark: BPF_PROG_TEST_RUN with repeat reruns a program on the packet \
             as the previous run left it, so for encap and decap it times a different path \
             (the last run's action shows it). Single runs time the real path but include \
             the test-run timer and colder caches: on the pass-through cases, which repeat \
             can time, single runs read {xdp} ns (XDP) and {tc} ns (TC) more than repeat. \
             The encapsulation's kernel routing with forwarding off (bpf_redirect_neigh) \
             happens after the program returns and is not in these figures."
        ));
    }
    if !report.in_situ.is_empty() {
        notes.push(
            "Programs under traffic: a run is one program invocation — for TCP one GSO \
             super-packet of up to 64 KB on the encapsulating side, for UDP 64 B one datagram. \
             The kernel's statistics add two clock reads to every run."
                .to_string(),
        );
    }
    notes.push(format!(
        "Wall time: {:.0} s building, {:.0} s measuring, {:.0} s in total ({} mode).",
        build_time.as_secs_f64(),
        measure_time.as_secs_f64(),
        total_time.as_secs_f64(),
        plan.name()
    ));
    notes
}

/// Writes the markdown, the raw runs as JSON and the chart under
/// `bench/results/`, and prints the markdown.
fn write_outputs(report: &Report, date: &str, plan: &Plan) -> Result<()> {
    let dir = ovl_tests::workspace_root().join("bench/results");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stem = plan.stem(date);
    let path = |ext: &str| -> PathBuf { dir.join(format!("{stem}.{ext}")) };
    // The chart draws ovl against the reference paths, which the
    // encrypted loop does not measure: its ratio is in the tables.
    let chart_path = (!plan.encrypted_only).then(|| path("png"));
    let mut markdown = report.markdown();
    if chart_path.is_some() {
        markdown.push_str(&format!("\n## Chart\n\n![ovl ratios]({stem}.png)\n"));
    }
    let raw = json!({
        "title": report.title,
        "machine": report.machine.iter().map(|(k, v)| json!({"what": k, "value": v})).collect::<Vec<_>>(),
        "samples": report.samples.iter().map(|((underlay, path, metric), runs)| json!({
            "underlay": underlay.short(),
            "path": path.label(),
            "metric": metric.label(),
            "unit": metric.unit(),
            "runs": runs,
            "median": report::median(runs),
        })).collect::<Vec<_>>(),
        "failures": report.failures.iter().map(|f| json!({
            "underlay": f.underlay.short(),
            "path": f.path.label(),
            "test": f.test,
            "message": f.message,
        })).collect::<Vec<_>>(),
        "programs_under_traffic": report.in_situ.iter().map(|row| json!({
            "underlay": row.underlay.short(),
            "path": row.path.label(),
            "test": row.test,
            "host": row.host,
            "program": row.program,
            "runs": row.runs,
            "ns_per_run": row.ns_per_run,
        })).collect::<Vec<_>>(),
        "cipher": report.cipher.iter().map(|rate| json!({
            "packet_bytes": cipher::PACKET_BYTES,
            "seal_bytes_per_s": rate.seal_bytes_per_s,
            "open_bytes_per_s": rate.open_bytes_per_s,
        })).collect::<Vec<_>>(),
        "cores": report.cores,
        "micro": report.micro.iter().map(|row| json!({
            "hook": row.hook,
            "program": row.program,
            "case": row.case,
            "frame_bytes": row.frame_bytes,
            "single_median_ns": row.single_median_ns,
            "single_p90_ns": row.single_p90_ns,
            "repeat": row.repeat,
            "repeat_mean_ns": row.repeat_mean_ns,
            "repeat_same_path": row.repeat_same_path,
        })).collect::<Vec<_>>(),
    });
    if let Some(chart_path) = &chart_path {
        chart::render(report, chart_path)?;
    }
    fs::write(path("md"), &markdown)
        .with_context(|| format!("cannot write {}", path("md").display()))?;
    fs::write(path("json"), serde_json::to_string_pretty(&raw)?)
        .with_context(|| format!("cannot write {}", path("json").display()))?;
    println!("{markdown}");
    eprintln!(
        "xtask: bench: wrote {}, {}{}",
        path("md").display(),
        path("json").display(),
        chart_path
            .map(|p| format!(" and {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "2026-12-06";

    fn plan(options: Options) -> Plan {
        Plan::new(&options).expect("valid options")
    }

    fn full() -> Options {
        Options {
            quick: false,
            runs: None,
            seconds: None,
            tcp_only: false,
            encrypted_only: false,
            underlay: None,
        }
    }

    #[test]
    fn a_plan_takes_one_second_to_an_hour_per_measurement() {
        for seconds in [1, crate::measure::MAX_SECONDS] {
            assert_eq!(
                plan(Options {
                    seconds: Some(seconds),
                    ..full()
                })
                .seconds,
                seconds
            );
        }
        for seconds in [0, crate::measure::MAX_SECONDS + 1, u32::MAX] {
            let error = Plan::new(&Options {
                seconds: Some(seconds),
                ..full()
            })
            .expect_err("refused");
            assert!(
                error.to_string().contains("give 1 to 3600 seconds"),
                "{error}"
            );
        }
    }

    #[test]
    fn a_run_of_one_underlay_never_takes_a_whole_runs_file_name() {
        assert_eq!(plan(full()).stem(DATE), DATE);
        assert_eq!(
            plan(Options {
                quick: true,
                ..full()
            })
            .stem(DATE),
            "2026-12-06-quick"
        );
        let wire_like = Some(Underlay::WireLike);
        assert_eq!(
            plan(Options {
                underlay: wire_like,
                ..full()
            })
            .stem(DATE),
            "2026-12-06-wire-like"
        );
        assert_eq!(
            plan(Options {
                quick: true,
                underlay: Some(Underlay::Offloads),
                ..full()
            })
            .stem(DATE),
            "2026-12-06-quick-offloads"
        );
        assert_eq!(
            plan(Options {
                tcp_only: true,
                underlay: wire_like,
                ..full()
            })
            .stem(DATE),
            "2026-12-06-tcp-wire-like"
        );
    }

    #[test]
    fn the_mode_line_gives_the_command_that_reruns_the_plan() {
        let one_underlay = plan(Options {
            quick: true,
            underlay: Some(Underlay::WireLike),
            ..full()
        });
        assert_eq!(one_underlay.flags(), " --quick --underlay wire-like");
        assert_eq!(plan(full()).flags(), "");
    }
}
