// `cargo xtask bench-dns`: the containers' resolver measured on two routed
// hosts — answer latency, forwarding, throughput, a flood's cost to others.

//! Every figure comes from a client inside a container namespace asking
//! ovl's resolver at 127.0.0.11 (a Python UDP client pinned to one CPU,
//! the resolver's thread free to use the other):
//!
//! - latency of a name ovl answers (a container on the other host) and of
//!   a forwarded name (dnsmasq on the router), sequential questions;
//! - answers per second with 32 questions in flight and no rate limit
//!   (answers that carry an address; SERVFAIL, NXDOMAIN, REFUSED apart);
//! - a neighbour's latency while another container floods its resolver
//!   (the default per-container limit on);
//! - how long a disconnected endpoint keeps resolving after `ovl
//!   disconnect` returns (file store);
//! - how long the resolver is unreachable across an agent restart.
//!
//! Writes `bench/results/<date>-dns.md` and prints it.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use ovl_tests::{ChildHandle, DnsUpstream, Lab, Netns, TwoHosts, wait_until};
use serde_json::Value;

use crate::machine;

const NETWORK: &str = "bench-dns";
const SUBNET: &str = "198.18.0.0/24";
/// dnsmasq on the router (host A's gateway).
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const OUTSIDE: &str = "outside.example";
const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);
const CLIENT_CPU: &str = "0";
/// Pause between a latency probe's questions: 1000/s, under the limit.
const PAUSE_MS: &str = "1";
/// The per-container limit of the latency lab: above the probes' pace,
/// far below a flood's.
const RATE_LIMIT: &str = "2000";

/// The measuring client: `latency NAME N PAUSE_MS`, `throughput NAME SECONDS
/// WINDOW`, `flood SECONDS`, `until-nxdomain NAME TIMEOUT`, `gap SECONDS`.
/// Prints one JSON object.
const PROBE: &str = r#"
import json, os, select, socket, struct, sys, time
A = ("127.0.0.11", 53)
def query(name, qid):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", 1, 1)
def rcode(resp):
    return resp[3] & 0x0f
def has_address(resp):
    # NOERROR with at least one answer record: SERVFAIL (upstream down),
    # NXDOMAIN (name not known yet) or REFUSED are not the answer timed.
    return len(resp) >= 12 and rcode(resp) == 0 and struct.unpack(">H", resp[6:8])[0] > 0
mode = sys.argv[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if mode == "latency":
    name, n, pause = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) / 1000
    s.settimeout(1.0)
    rtts, lost, failed = [], 0, 0
    for i in range(n):
        time.sleep(pause)
        t = time.perf_counter()
        s.sendto(query(name, i & 0xffff), A)
        try:
            resp = s.recv(4096)
            if has_address(resp):
                rtts.append((time.perf_counter() - t) * 1e6)
            else:
                failed += 1
        except socket.timeout:
            lost += 1
    rtts.sort()
    pick = lambda p: rtts[min(len(rtts) - 1, int(len(rtts) * p))] if rtts else None
    print(json.dumps({"p50_us": pick(0.5), "p99_us": pick(0.99), "lost": lost, "failed": failed, "n": n}))
elif mode == "throughput":
    name, secs, window = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    s.setblocking(False)
    q = [query(name, i) for i in range(65536)]
    sent = got = failed = 0
    end = time.time() + secs
    for _ in range(window):
        s.sendto(q[sent & 0xffff], A); sent += 1
    while time.time() < end:
        r, _, _ = select.select([s], [], [], 0.2)
        if not r:
            for _ in range(window):
                s.sendto(q[sent & 0xffff], A); sent += 1
            continue
        while True:
            try:
                resp = s.recv(4096)
            except BlockingIOError:
                break
            if has_address(resp):
                got += 1
            else:
                failed += 1
            s.sendto(q[sent & 0xffff], A); sent += 1
    print(json.dumps({"answers_per_s": got / secs, "failed": failed, "sent": sent}))
elif mode == "flood":
    secs = float(sys.argv[2])
    q = [query("flood%d" % i, i) for i in range(1000)]
    sent = 0
    end = time.time() + secs
    while time.time() < end:
        for i in range(200):
            s.sendto(q[i], A)
        sent += 200
    print(json.dumps({"sent_per_s": sent / secs}))
elif mode == "until-nxdomain":
    name, timeout = sys.argv[2], float(sys.argv[3])
    s.settimeout(0.2)
    start = time.time()
    while time.time() - start < timeout:
        s.sendto(query(name, 7), A)
        try:
            if rcode(s.recv(4096)) == 3:
                print(json.dumps({"at": time.time()})); sys.exit(0)
        except socket.timeout:
            pass
        time.sleep(0.005)
    print(json.dumps({"at": None}))
elif mode == "gap":
    name, secs = sys.argv[2], float(sys.argv[3])
    s.settimeout(0.05)
    end = time.time() + secs
    longest, down_since = 0.0, None
    while time.time() < end:
        t = time.time()
        s.sendto(query(name, 9), A)
        try:
            s.recv(4096)
            if down_since is not None:
                longest = max(longest, t - down_since); down_since = None
        except (socket.timeout, ConnectionRefusedError):
            if down_since is None:
                down_since = t
        time.sleep(0.005)
    print(json.dumps({"longest_gap_s": longest}))
"#;

/// Runs the DNS benchmark; `quick` shortens every measurement.
pub fn run(quick: bool) -> Result<()> {
    let (n, secs) = if quick { (300, 1.0) } else { (3000, 5.0) };
    let mut rows: Vec<(String, String)> = Vec::new();

    {
        // Probes paced at 1000/s under a 2000/s limit.
        let lab = Lab::new("benchdns")?;
        let upstream = UPSTREAM.to_string();
        let env = [
            ("OVL_DNS_UPSTREAM", upstream.as_str()),
            ("OVL_DNS_RATE_LIMIT", RATE_LIMIT),
        ];
        let mut w = World::start(&lab, &env)?;
        let _dnsmasq = dnsmasq(&lab, &w.cluster.router)?;
        let own = probe(&w.client, &["latency", "web", &n.to_string(), PAUSE_MS])?;
        rows.push((
            "ovl's name (endpoint on the other host), p50 / p99".into(),
            latency(&own)?,
        ));
        let fwd = probe(&w.client, &["latency", OUTSIDE, &n.to_string(), PAUSE_MS])?;
        rows.push((
            "forwarded name (dnsmasq on the router), p50 / p99".into(),
            latency(&fwd)?,
        ));
        let idle = probe(&w.neighbour, &["latency", "web", &n.to_string(), PAUSE_MS])?;
        let flood = spawn_probe(&lab, &w.client, &["flood", &(secs + 2.0).to_string()])?;
        std::thread::sleep(Duration::from_millis(500));
        let busy = probe(&w.neighbour, &["latency", "web", &n.to_string(), PAUSE_MS])?;
        flood
            .wait_timeout(Duration::from_secs_f64(secs + 30.0))
            .context("flood did not end")?;
        let flooded: Value =
            serde_json::from_str(flood.stdout()?.trim()).with_context(|| flood.output_report())?;
        rows.push(("neighbour, idle, p50 / p99".into(), latency(&idle)?));
        rows.push((
            format!(
                "neighbour while another container floods ({:.0} q/s, limit {RATE_LIMIT}/s), p50 / p99",
                flooded["sent_per_s"].as_f64().unwrap_or(0.0)
            ),
            latency(&busy)?,
        ));
        let mut removals = Vec::new();
        for _ in 0..if quick { 2 } else { 5 } {
            removals.push(removal(&lab, &w)?);
        }
        removals.sort_by(f64::total_cmp);
        rows.push((
            "disconnect → NXDOMAIN on the other host, median (file store)".into(),
            format!("{:.1} ms", removals[removals.len() / 2] * 1e3),
        ));
        let gap = restart_gap(&lab, &mut w, &env)?;
        rows.push((
            "resolver unreachable across an agent restart (SIGTERM, start)".into(),
            format!("{:.0} ms", gap * 1e3),
        ));
    }
    {
        // No limit: what the resolver's one thread answers.
        let lab = Lab::new("benchdnstp")?;
        let w = World::start(&lab, &[("OVL_DNS_RATE_LIMIT", "0")])?;
        let tp = probe(&w.client, &["throughput", "web", &secs.to_string(), "32"])?;
        rows.push((
            "answers/s, one container, 32 in flight, no limit".into(),
            throughput(&tp)?,
        ));
    }

    let date = machine::utc_date();
    let mut md = format!(
        "# ovl DNS benchmark, {date}{}\n\nRelease build; client: Python UDP pinned to CPU {CLIENT_CPU} inside a container namespace, asking 127.0.0.11.\n\n| measurement | result |\n|---|---|\n",
        if quick { " (quick)" } else { "" }
    );
    for (what, value) in &rows {
        md.push_str(&format!("| {what} | {value} |\n"));
    }
    let dir = ovl_tests::workspace_root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!(
        "{date}-dns{}.md",
        if quick { "-quick" } else { "" }
    ));
    std::fs::write(&file, &md).with_context(|| format!("write {}", file.display()))?;
    println!("{md}");
    eprintln!("xtask: bench-dns: wrote {}", file.display());
    Ok(())
}

/// Two hosts, `web` on B, `client` and `neighbour` on A.
struct World {
    cluster: TwoHosts,
    client: Netns,
    neighbour: Netns,
    web: Netns,
}

impl World {
    fn start(lab: &Lab, env: &[(&str, &str)]) -> Result<World> {
        let cluster = TwoHosts::start_with_env(lab, "auto", env)?;
        cluster
            .ovl
            .create_network(&cluster.hosts[0].netns, NETWORK, SUBNET, &[])?;
        let web = container(lab, &cluster, 1, "web")?;
        let client = container(lab, &cluster, 0, "client")?;
        let neighbour = container(lab, &cluster, 0, "neighbour")?;
        let w = World {
            cluster,
            client,
            neighbour,
            web,
        };
        wait_until(Duration::from_secs(5), || {
            Ok(probe(&w.client, &["latency", "web", "1", "0"])?["p50_us"].is_f64())
        })
        .context("the resolver never answered")?;
        Ok(w)
    }
}

fn container(lab: &Lab, c: &TwoHosts, i: usize, name: &str) -> Result<Netns> {
    let ns = lab.container(name)?;
    c.ovl.connect(
        &c.hosts[i],
        TwoHosts::NODES[i],
        NETWORK,
        &ns,
        &["--name", name],
    )?;
    Ok(ns)
}

fn probe(ns: &Netns, args: &[&str]) -> Result<Value> {
    let mut argv = vec!["taskset", "-c", CLIENT_CPU, "python3", "-c", PROBE];
    argv.extend_from_slice(args);
    let out = ns.exec(&argv)?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("probe {args:?} printed {text}"))
}

fn spawn_probe(lab: &Lab, ns: &Netns, args: &[&str]) -> Result<ChildHandle> {
    let mut argv = vec!["taskset", "-c", CLIENT_CPU, "python3", "-c", PROBE];
    argv.extend_from_slice(args);
    lab.spawn(ns, &argv, &[])
}

/// p50 / p99 of the answers that carried an address, and how many of the
/// questions got none (no reply, or SERVFAIL, NXDOMAIN, REFUSED).
fn latency(v: &Value) -> Result<String> {
    let lost = v["lost"].as_u64().unwrap_or(0);
    let failed = v["failed"].as_u64().unwrap_or(0);
    let (Some(p50), Some(p99)) = (v["p50_us"].as_f64(), v["p99_us"].as_f64()) else {
        bail!("no answer with an address: {v}");
    };
    let mut s = format!("{p50:.0} µs / {p99:.0} µs");
    if lost > 0 {
        s.push_str(&format!(" ({lost} of {} unanswered)", v["n"]));
    }
    if failed > 0 {
        s.push_str(&format!(
            " ({failed} of {} answered without an address)",
            v["n"]
        ));
    }
    Ok(s)
}

/// Answers with an address per second, and how many replies carried none
/// (SERVFAIL, NXDOMAIN, REFUSED): those are not the resolver's throughput.
fn throughput(v: &Value) -> Result<String> {
    let failed = v["failed"].as_u64().unwrap_or(0);
    let rate = v["answers_per_s"].as_f64().unwrap_or(0.0);
    if rate <= 0.0 {
        bail!("no answer with an address: {v}");
    }
    let mut s = format!("{rate:.0}");
    if failed > 0 {
        s.push_str(&format!(
            " ({failed} of {} questions answered without an address)",
            v["sent"]
        ));
    }
    Ok(s)
}

fn dnsmasq(lab: &Lab, router: &Netns) -> Result<ChildHandle> {
    DnsUpstream {
        listen: UPSTREAM,
        known: &[(OUTSIDE, OUTSIDE_ADDR)],
        missing: &[],
        // Logging every question would be part of the forwarded latency.
        log_queries: false,
    }
    .start(lab, router)
}

/// Seconds from `ovl disconnect` of web returning to the client's first
/// NXDOMAIN for it (0 when it came first); web is connected again after.
fn removal(lab: &Lab, w: &World) -> Result<f64> {
    let c = &w.cluster;
    let watcher = spawn_probe(lab, &w.client, &["until-nxdomain", "web", "5"])?;
    std::thread::sleep(Duration::from_millis(500));
    c.run(1, &["disconnect", NETWORK, w.web.name()])?;
    let returned = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    watcher.wait_timeout(Duration::from_secs(10))?;
    let v: Value =
        serde_json::from_str(watcher.stdout()?.trim()).with_context(|| watcher.output_report())?;
    let at = v["at"].as_f64().context("web never became NXDOMAIN")?;
    c.ovl.connect(
        &c.hosts[1],
        TwoHosts::NODES[1],
        NETWORK,
        &w.web,
        &["--name", "web"],
    )?;
    wait_until(Duration::from_secs(5), || {
        Ok(probe(&w.client, &["latency", "web", "1", "0"])?["lost"] == 0)
    })?;
    Ok((at - returned).max(0.0))
}

/// The longest time the client's questions go unanswered while host A's
/// agent is stopped (SIGTERM) and started again.
fn restart_gap(lab: &Lab, w: &mut World, env: &[(&str, &str)]) -> Result<f64> {
    let World {
        cluster, client, ..
    } = w;
    let seen = std::thread::scope(|s| -> Result<Value> {
        let probing = s.spawn(|| probe(client, &["gap", "web", "6"]));
        std::thread::sleep(Duration::from_secs(1));
        cluster.agents.remove(0).terminate()?;
        let agent =
            cluster
                .ovl
                .attach_with_env(lab, &cluster.hosts[0], TwoHosts::NODES[0], "auto", env)?;
        cluster.agents.insert(0, agent);
        probing.join().expect("probe thread")
    })?;
    let gap = seen["longest_gap_s"].as_f64().context("gap")?;
    ensure!(gap > 0.0, "no gap seen: the restart was not observed");
    Ok(gap)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every question on the resolver's address with SERVFAIL,
    /// as the agent does when its upstream is down.
    const SERVFAIL_RESOLVER: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.11", 53))
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(4096)
    s.sendto(q[:2] + b"\x81\x82" + q[4:6] + b"\0" * 6 + q[12:], peer)
"#;

    /// A namespace of `lab` whose 127.0.0.11 answers SERVFAIL to all.
    /// Needs root (a namespace of its own) and python3.
    fn servfail_world(lab: &Lab) -> Result<(Netns, ChildHandle)> {
        let ns = lab.netns("client")?;
        let resolver = lab.spawn(&ns, &["python3", "-c", SERVFAIL_RESOLVER], &[])?;
        wait_until(Duration::from_secs(10), || {
            Ok(resolver.stdout()?.contains("ready"))
        })
        .with_context(|| resolver.output_report())?;
        Ok((ns, resolver))
    }

    #[test]
    fn latency_times_only_answers_with_an_address() -> Result<()> {
        let lab = Lab::new("dnsprobe")?;
        let (ns, _resolver) = servfail_world(&lab)?;
        let v = probe(&ns, &["latency", "web", "5", "0"])?;
        assert_eq!(v["failed"], 5, "{v}");
        assert_eq!(v["lost"], 0, "{v}");
        let error = latency(&v).expect_err("five SERVFAILs are no latency figure");
        assert!(
            format!("{error:#}").contains("no answer with an address"),
            "{error:#}"
        );
        Ok(())
    }

    #[test]
    fn throughput_counts_only_answers_with_an_address() -> Result<()> {
        let lab = Lab::new("dnstp")?;
        let (ns, _resolver) = servfail_world(&lab)?;
        let v = probe(&ns, &["throughput", "web", "0.5", "4"])?;
        assert_eq!(v["answers_per_s"], 0.0, "{v}");
        // Each of the window's questions got its SERVFAIL at least once.
        assert!(v["failed"].as_u64().is_some_and(|f| f >= 4), "{v}");
        let error = throughput(&v).expect_err("SERVFAILs per second are no throughput");
        assert!(
            format!("{error:#}").contains("no answer with an address"),
            "{error:#}"
        );
        Ok(())
    }
}
