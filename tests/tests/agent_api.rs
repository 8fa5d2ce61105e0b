//! The running agent seen from outside: `ovl stats` through its API socket
//! from another mount namespace, its Prometheus metrics as promtool and a
//! real Prometheus server see them, and start-up faults it must refuse (or
//! repair) without touching a data path.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ovl_tests::{
    BackgroundPing, HOST_IFACE, Host, Lab, Netns, Ovl, Pair, TwoHosts, hooked_programs, ping,
    wait_until, workspace_root,
};
use serde_json::Value;

/// Where a test's agent serves metrics, inside its host namespace.
const METRICS: &str = ovl_tests::AGENT_METRICS;

/// Two hosts with an agent each, a network and a container on each.
struct World {
    ovl: Ovl,
    hosts: Vec<Host>,
    agents: Vec<ovl_tests::Agent>,
    c1: Netns,
    ip2: Ipv4Addr,
}

/// Two hosts with an agent each (host A's with `env_a`), a network and a
/// container on each that reach each other.
fn two_hosts_with_env(lab: &Lab, env_a: &[(&str, &str)], node_a: &str) -> Result<World> {
    let ovl = Ovl::new(lab)?;
    let (_router, hosts) = lab.routed_hosts(2)?;
    let a = ovl.attach_with_env(lab, &hosts[0], node_a, "auto", env_a)?;
    let b = ovl.attach(lab, &hosts[1], "host-b", "auto")?;
    ovl.create_network(&hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    let c2 = lab.container("c2")?;
    ovl.connect(&hosts[0], node_a, "uber-net", &c1, &[])?;
    let ip2 = ovl.connect(&hosts[1], "host-b", "uber-net", &c2, &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;
    Ok(World {
        ovl,
        hosts,
        agents: vec![a, b],
        c1,
        ip2,
    })
}

#[test]
fn stats_under_ip_netns_exec_reach_an_agent_that_uses_the_default_pin_root() -> Result<()> {
    let lab = Lab::new("api-stats")?;
    // The default pin root lives in /sys, which `ip netns exec` replaces:
    // the agent's bpffs there is its own. A node name of the lab's keeps
    // it apart from any other ovl on the machine.
    let node = format!("{}-a", lab.prefix());
    let env = [("OVL_PIN_ROOT", "/sys/fs/bpf/ovl")];
    let World {
        ovl,
        hosts,
        agents,
        c1,
        ip2,
    } = two_hosts_with_env(&lab, &env, &node)?;
    let ns = &hosts[0].netns;
    let pins_seen = ns.exec_unchecked(&["test", "-e", &format!("/sys/fs/bpf/ovl/{node}")])?;
    ensure!(
        !pins_seen.status.success(),
        "this namespace's /sys shows the agent's pins; the API would not be needed"
    );

    let stats = |ovl: &Ovl| -> Result<(u64, String)> {
        let out = ovl.run_with_env_unchecked(
            ns,
            &node,
            &env,
            &["stats", "--json", "--network", "uber-net"],
        )?;
        ensure!(
            out.status.success(),
            "ovl stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let tx = v[0]["tx_packets"]
            .as_u64()
            .with_context(|| format!("{v}"))?;
        Ok((tx, String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let (before, _) = stats(&ovl)?;
    let r = ping(&c1, ip2, 20, &["-i", "0.05", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    let (after, stderr) = stats(&ovl)?;
    ensure!(
        after - before == 20,
        "tx moved {} for 20 pings",
        after - before
    );
    ensure!(
        !stderr.contains("no agent"),
        "stats fell back to the pins instead of asking the agent: {stderr}"
    );
    for a in agents {
        a.stop()?;
    }
    Ok(())
}

/// Runs `ovl attach` on `host` as `node` with `env` and expects it to fail
/// with a message containing every one of `needles`, leaving no program on
/// the underlay and no pin directory for the node.
fn expect_refused(
    lab: &Lab,
    ovl: &Ovl,
    host: &Host,
    node: &str,
    env: &[(&str, &str)],
    needles: &[&str],
) -> Result<String> {
    let agent = ovl.spawn_agent(lab, host, node, "auto", env)?;
    let status = agent.wait_exit(Duration::from_secs(15))?;
    let log = agent.log()?;
    ensure!(!status.success(), "the agent started:\n{log}");
    for needle in needles {
        ensure!(log.contains(needle), "the error lacks {needle:?}:\n{log}");
    }
    let programs = hooked_programs(&host.netns, HOST_IFACE)?;
    ensure!(
        programs.is_empty(),
        "programs left on {HOST_IFACE}: {programs:?}"
    );
    ensure!(
        !ovl.pin_dir(node).exists(),
        "pin directory {} left behind",
        ovl.pin_dir(node).display()
    );
    Ok(log)
}

#[test]
fn start_up_faults_are_refused_clearly_and_attach_nothing() -> Result<()> {
    let lab = Lab::new("api-faults")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];

    // A pin root that is not a bpffs.
    let plain = lab.tempdir().join("plain");
    std::fs::create_dir(&plain)?;
    let plain_s = plain.display().to_string();
    expect_refused(
        &lab,
        &ovl,
        host,
        "host-a",
        &[("OVL_PIN_ROOT", plain_s.as_str())],
        &["is not on a bpffs", "mount -t bpf bpf"],
    )?;
    ensure!(
        std::fs::read_dir(&plain)?.next().is_none(),
        "something was created in {plain_s}"
    );

    // Something that is not a socket where the API socket goes.
    let socket = ovl.api_socket("host-a");
    std::fs::write(&socket, b"not a socket")?;
    expect_refused(&lab, &ovl, host, "host-a", &[], &["is not a socket"])?;
    ensure!(
        std::fs::read(&socket)? == b"not a socket",
        "the file was touched"
    );
    std::fs::remove_file(&socket)?;

    // --metrics on an address in use.
    let squatter = lab.spawn(
        &host.netns,
        &[
            "python3",
            "-c",
            "import socket,time; s=socket.socket(); s.bind(('127.0.0.1', 9474)); s.listen(); time.sleep(120)",
        ],
        &[],
    )?;
    wait_until(Duration::from_secs(5), || {
        let ss = host.netns.exec(&["ss", "-ltn"])?;
        Ok(String::from_utf8_lossy(&ss.stdout).contains("127.0.0.1:9474"))
    })?;
    expect_refused(
        &lab,
        &ovl,
        host,
        "host-a",
        &[("OVL_METRICS", METRICS)],
        &["serve metrics on 127.0.0.1:9474", "address in use"],
    )?;
    ensure!(!socket.exists(), "the API socket was left behind");
    squatter.signal(ovl_tests::Signal::Kill)?;

    // A stale socket left by a killed agent is replaced.
    let stale = format!(
        "import socket; s=socket.socket(socket.AF_UNIX); s.bind('{}')",
        socket.display()
    );
    ovl_tests::run(&["python3", "-c", &stale])?;
    let agent = ovl.attach(&lab, host, "host-a", "auto")?;
    ensure!(
        agent.log()?.contains("replacing the stale API socket"),
        "{}",
        agent.log()?
    );
    let health: Value =
        serde_json::from_str(&ovl.run(&host.netns, "host-a", &["status", "--json"])?)?;
    ensure!(
        health["node"] == "host-a" && health["store"]["reachable"] == true,
        "{health}"
    );
    agent.stop()
}

/// `bpftool -j map show pinned PATH`.
fn map_info(path: &std::path::Path) -> Result<Value> {
    let p = path.display().to_string();
    Ok(serde_json::from_slice(
        &ovl_tests::run(&["bpftool", "-j", "map", "show", "pinned", &p])?.stdout,
    )?)
}

/// Two hosts forwarding between c1 (host A) and c2 (host B), then host
/// A's agent stopped (its data path forwards on): the world, host A, the
/// pair.
fn pair_with_a_stopped(lab: &Lab) -> Result<(TwoHosts, Host, Pair)> {
    let mut world = TwoHosts::start(lab, "auto")?;
    let host_a = world.hosts[0].clone();
    let pair = world.connected_pair(lab, "uber-net")?;
    world.terminate_agent(0)?;
    Ok((world, host_a, pair))
}

#[test]
fn pins_of_an_incompatible_build_are_replaced_without_a_gap_or_refused_when_they_cannot_be()
-> Result<()> {
    let lab = Lab::new("api-compat")?;
    let (mut world, host_a, Pair { c1, ip2, .. }) = pair_with_a_stopped(&lab)?;

    // What an older build with another layout would have pinned: an
    // interface map with 8-byte values. The running programs keep the map
    // they hold; only the pin changes.
    let pin_dir = world.ovl.pin_dir("host-a");
    let ifaces = pin_dir.join("OVL_IFACES");
    std::fs::remove_file(&ifaces)?;
    let ifaces_s = ifaces.display().to_string();
    ovl_tests::run(&[
        "bpftool",
        "map",
        "create",
        &ifaces_s,
        "type",
        "hash",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "16",
        "name",
        "OVL_IFACES",
    ])?;

    // The store cannot be read: the new agent refuses, the old data path
    // keeps forwarding and its pins stay.
    let state = lab.tempdir().join("store/state.json");
    let saved = std::fs::read(&state)?;
    std::fs::write(&state, b"{ not ovl state")?;
    let links_before = std::fs::read_dir(pin_dir.join("links"))?.count();
    let refused = world
        .ovl
        .spawn_agent(&lab, &host_a, "host-a", "auto", &[])?;
    let status = refused.wait_exit(Duration::from_secs(15))?;
    let log = refused.log()?;
    ensure!(!status.success(), "started over unfillable maps:\n{log}");
    for needle in [
        "OVL_IFACES: value size 8, this build expects 28",
        "ovl detach eth0 --node host-a",
    ] {
        ensure!(log.contains(needle), "the refusal lacks {needle:?}:\n{log}");
    }
    let r = ping(&c1, ip2, 10, &["-i", "0.05", "-W", "1"])?;
    ensure!(r.all_received(), "the old data path stopped:\n{}", r.output);
    ensure!(
        !pin_dir.join("next").exists()
            && std::fs::read_dir(pin_dir.join("links"))?.count() == links_before,
        "the refused start changed the pins"
    );

    // With the store back, the new agent fills new maps and switches to
    // them under a running ping.
    std::fs::write(&state, saved)?;
    let bg = BackgroundPing::start(&lab, &c1, ip2, 300, Duration::from_millis(10))?;
    std::thread::sleep(Duration::from_millis(300));
    world.restart_agent(&lab, 0, &[])?;
    let r = bg.finish()?;
    ensure!(
        r.all_received(),
        "the switch to new maps lost packets:\n{}",
        r.output
    );
    ensure!(
        world.agents[0].log()?.contains("do not fit this build"),
        "{}",
        world.agents[0].log()?
    );
    let info = map_info(&ifaces)?;
    // 28 bytes: ovl_common::Iface (VNI, address, gateway, MAC, network
    // flags, counter slot).
    ensure!(info["bytes_value"] == 28, "OVL_IFACES still {info}");
    ensure!(!pin_dir.join("next").exists(), "staging maps left behind");
    world.stop()
}

#[test]
fn counters_pinned_by_a_build_with_one_drop_reason_fewer_are_explained_then_replaced() -> Result<()>
{
    let lab = Lab::new("api-counters")?;
    let (mut world, host_a, Pair { c1, ip2, .. }) = pair_with_a_stopped(&lab)?;

    // What a build before the last drop reason pinned: per-network
    // counters one u64 shorter. The running programs keep the map they
    // hold; only the pin changes.
    let pin_dir = world.ovl.pin_dir("host-a");
    let stats = pin_dir.join("OVL_STATS");
    let info = map_info(&stats)?;
    let (new_size, slots) = match (info["bytes_value"].as_u64(), info["max_entries"].as_u64()) {
        (Some(v), Some(n)) => (v, n),
        _ => bail!("OVL_STATS: {info}"),
    };
    let old_size = new_size - 8;
    std::fs::remove_file(&stats)?;
    let (stats_s, old_s, slots_s) = (
        stats.display().to_string(),
        old_size.to_string(),
        slots.to_string(),
    );
    ovl_tests::run(&[
        "bpftool",
        "map",
        "create",
        &stats_s,
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        &old_s,
        "entries",
        &slots_s,
        "name",
        "OVL_STATS",
    ])?;

    // With no agent, `ovl stats` reads the pins: it says why it cannot.
    let out = world
        .ovl
        .run_unchecked(&host_a.netns, "host-a", &["stats"])?;
    let said = String::from_utf8_lossy(&out.stderr);
    for needle in [
        format!("value size {old_size}, this build reads {new_size}"),
        "drop reasons".to_owned(),
        "An agent of this build replaces it".to_owned(),
    ] {
        ensure!(
            !out.status.success() && said.contains(&needle),
            "`ovl stats` over older counters lacks {needle:?}: {said}"
        );
    }

    // The new agent fills new maps, switches under a running ping, and
    // says why the counters start again.
    let bg = BackgroundPing::start(&lab, &c1, ip2, 300, Duration::from_millis(10))?;
    std::thread::sleep(Duration::from_millis(300));
    world.restart_agent(&lab, 0, &[])?;
    let r = bg.finish()?;
    ensure!(
        r.all_received(),
        "the switch to new counters lost packets:\n{}",
        r.output
    );
    let log = world.agents[0].log()?;
    let needle =
        format!("OVL_STATS: value size {old_size}, this build expects {new_size} — counters of");
    ensure!(
        log.contains(&needle),
        "the agent's log lacks {needle:?}:\n{log}"
    );
    ensure!(
        map_info(&stats)?["bytes_value"] == new_size,
        "OVL_STATS still {}",
        map_info(&stats)?
    );
    // Counting again, from zero (no more than the ping's frames since the
    // switch), every reason listed (`congestion` too).
    let before = world.counters(0, "uber-net")?;
    let r = ping(&c1, ip2, 10, &["-i", "0.05", "-W", "1"])?;
    ensure!(r.all_received(), "after the switch:\n{}", r.output);
    let after = world.counters(0, "uber-net")?;
    ensure!(
        before.tx_packets <= 300
            && after.tx_packets >= before.tx_packets + 10
            && after.drops() == before.drops(),
        "counters after the switch: {before:?} -> {after:?}"
    );
    world.stop()
}

/// `curl -s URL` inside `ns`.
fn curl(ns: &Netns, url: &str) -> Result<String> {
    let out = ns.exec(&["curl", "-sS", "--max-time", "5", url])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prometheus's answer for an instant query, as one number.
fn prom_value(ns: &Netns, query: &str) -> Result<Option<f64>> {
    let out = ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-G",
        "http://127.0.0.1:9090/api/v1/query",
        "--data-urlencode",
        &format!("query={query}"),
    ])?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}", String::from_utf8_lossy(&out.stdout)))?;
    if v["status"] != "success" {
        bail!("query {query} failed: {v}");
    }
    Ok(v["data"]["result"]
        .as_array()
        .and_then(|r| r.first())
        .and_then(|s| s["value"][1].as_str())
        .and_then(|n| n.parse().ok()))
}

#[test]
fn prometheus_scrapes_the_agent_and_counts_exactly_the_pings_sent() -> Result<()> {
    let lab = Lab::new("api-prom")?;
    let World {
        ovl,
        hosts,
        agents,
        c1,
        ip2,
    } = two_hosts_with_env(&lab, &[("OVL_METRICS", METRICS)], "host-a")?;
    let ns = &hosts[0].netns;
    // A network with no endpoint on host A: A has no counters of it and
    // exports none. The connect after it returns once A's agent forwards
    // for c3, so A has read the store with idle-net in it.
    ovl.create_network(ns, "idle-net", "198.18.9.0/24", &[])?;
    let c3 = lab.container("c3")?;
    ovl.connect(&hosts[0], "host-a", "uber-net", &c3, &[])?;

    // promtool accepts the exposition as it is.
    let text = curl(ns, &format!("http://{METRICS}/metrics"))?;
    let file = lab.tempdir().join("metrics.txt");
    std::fs::write(&file, &text)?;
    let check = ovl_tests::run_unchecked(&[
        "sh",
        "-c",
        &format!("promtool check metrics < {}", file.display()),
    ])?;
    ensure!(
        check.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    for line in [
        "# TYPE ovl_network_tx_packets_total counter",
        "ovl_network_drops_total{network=\"uber-net\",reason=\"no_endpoint\",vni=\"4096\"}",
        "ovl_network_drops_total{network=\"uber-net\",reason=\"congestion\",vni=\"4096\"} 0",
        "ovl_underlay_drops_total{reason=\"congestion\"} 0",
        "ovl_network_endpoints{location=\"local\",network=\"uber-net\",vni=\"4096\"} 2",
        "ovl_store_up 1",
        "ovl_store_failovers_total 0",
        "ovl_store_commits_looked_up_total 0",
        "ovl_underlay_up 1",
        "ovl_store_last_sync_age_seconds ",
        "ovl_agent_info{decap_mode=\"tc\",node=\"host-a\",underlay=\"eth0\"",
    ] {
        ensure!(text.contains(line), "no {line:?} in\n{text}");
    }
    ensure!(
        !text.contains("idle-net"),
        "host A exports a network it does not serve:\n{text}"
    );

    // The dashboard shipped in docs/ refers only to metrics that exist.
    let dashboard = std::fs::read_to_string(workspace_root().join("docs/grafana-dashboard.json"))?;
    let dashboard: Value = serde_json::from_str(&dashboard).context("dashboard JSON")?;
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().context("expr")?.to_owned());
        }
    }
    ensure!(!exprs.is_empty(), "no queries in the dashboard");
    for expr in &exprs {
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("ovl_"))
        {
            ensure!(
                text.contains(&format!("# TYPE {name} ")),
                "the dashboard queries {name}, which the agent does not export"
            );
        }
    }

    // A real Prometheus scrapes it every second.
    let config = lab.tempdir().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ovl\n    static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )?;
    let config_arg = format!("--config.file={}", config.display());
    let tsdb_arg = format!(
        "--storage.tsdb.path={}",
        lab.tempdir().join("tsdb").display()
    );
    lab.spawn(
        ns,
        &[
            "prometheus",
            &config_arg,
            &tsdb_arg,
            "--web.listen-address=127.0.0.1:9090",
        ],
        &[],
    )?;
    let query = "ovl_network_tx_packets_total{network=\"uber-net\"}";
    let current = |ovl: &Ovl| -> Result<f64> {
        Ok(ovl.counters(ns, "host-a", "uber-net")?.tx_packets as f64)
    };
    let mut seen = None;
    wait_until(Duration::from_secs(30), || {
        seen = prom_value(ns, query)?;
        Ok(seen == Some(current(&ovl)?))
    })
    .with_context(|| format!("Prometheus never caught up with the agent (last {seen:?})"))?;
    let before = seen.context("baseline")?;
    let r = ping(&c1, ip2, 20, &["-i", "0.05", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    wait_until(Duration::from_secs(15), || {
        seen = prom_value(ns, query)?;
        Ok(seen == Some(before + 20.0))
    })
    .with_context(|| {
        format!(
            "Prometheus shows {seen:?}, expected {} after 20 pings",
            before + 20.0
        )
    })?;
    ensure!(prom_value(ns, "ovl_store_up")? == Some(1.0), "store not up");
    for a in agents {
        a.stop()?;
    }
    Ok(())
}

#[test]
fn the_api_answers_bad_requests_with_a_json_error_and_keeps_serving() -> Result<()> {
    let lab = Lab::new("api-bad")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let agent = ovl.attach(&lab, host, "host-a", "auto")?;
    let socket = ovl.api_socket("host-a").display().to_string();
    let ask = |path: &str| -> Result<(String, Value)> {
        let out = host.netns.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "15",
            "--unix-socket",
            &socket,
            "-w",
            "\n%{http_code}",
            &format!("http://ovl{path}"),
        ])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').context("no status line")?;
        let body: Value =
            serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
        Ok((code.to_owned(), body))
    };
    for (path, code, needle) in [
        ("/v1/nothing", "404", "no such route"),
        ("/v1/endpoints/ready?network=x&ip=not-an-ip", "400", "ip"),
        ("/v1/endpoints/ready", "400", "network"),
        ("/v1/stats?network=nope", "404", "no network named \"nope\""),
    ] {
        let (got, body) = ask(path)?;
        ensure!(got == code, "{path}: HTTP {got}, expected {code}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        ensure!(
            msg.contains(needle),
            "{path}: error {body} lacks {needle:?}"
        );
    }
    // A route asked with the wrong method: 405, with a JSON error too.
    let out = host.netns.exec(&[
        "curl",
        "-sS",
        "-X",
        "POST",
        "--unix-socket",
        &socket,
        "-w",
        "\n%{http_code}",
        "http://ovl/v1/health",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("no status line")?;
    let body: Value = serde_json::from_str(body).with_context(|| format!("not JSON: {body:?}"))?;
    ensure!(
        code == "405" && body["error"].as_str().is_some_and(|e| e.contains("POST")),
        "POST /v1/health: HTTP {code} {body}"
    );
    // An endpoint of an unknown network is simply not ready, after the wait.
    let (got, body) = ask("/v1/endpoints/ready?network=nope&ip=198.18.0.9&timeout_ms=200")?;
    ensure!(got == "200" && body["ready"] == false, "{got} {body}");
    let (got, body) = ask("/v1/health")?;
    ensure!(got == "200" && body["node"] == "host-a", "{got} {body}");
    agent.stop()
}

/// Connections to the API socket that send nothing (a hung or leaking
/// client) must not take the agent's descriptors, which its store reads,
/// netlink and DNS share: with its open-file limit lowered to 256 and 400
/// silent connections held, host A's agent still applies a container that
/// joins on host B (c1 reaches it), logs no descriptor shortage, and
/// answers `ovl status` once they are gone.
#[test]
fn silent_api_connections_do_not_starve_the_agent_of_descriptors() -> Result<()> {
    let lab = Lab::new("api-fds")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(2)?;
    let a = ovl.attach(&lab, &hosts[0], "host-a", "auto")?;
    let b = ovl.attach(&lab, &hosts[1], "host-b", "auto")?;
    ovl.create_network(&hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    ovl.connect(&hosts[0], "host-a", "uber-net", &c1, &[])?;
    ovl_tests::run(&["prlimit", "--pid", &a.pid().to_string(), "--nofile=256:256"])?;
    let socket = ovl.api_socket("host-a");
    let held = (0..400)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket))
        .collect::<std::io::Result<Vec<_>>>()
        .context("connect to the API socket")?;
    let c2 = lab.container("c2")?;
    let ip2 = ovl.connect(&hosts[1], "host-b", "uber-net", &c2, &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })
    .with_context(|| {
        format!(
            "host A's agent did not apply c2 while 400 silent connections were held:\n{}",
            a.log().unwrap_or_default()
        )
    })?;
    let log = a.log()?;
    ensure!(
        !log.contains("Too many open files"),
        "the agent ran out of descriptors:\n{log}"
    );
    drop(held);
    let status = ovl.run(&hosts[0].netns, "host-a", &["status"])?;
    ensure!(status.contains("host-a"), "{status}");
    a.stop()?;
    b.stop()
}

/// Whether `dig NAME` inside `ns` (one try, its resolv.conf's resolver)
/// got an answer with status NOERROR.
fn resolves(ns: &Netns, name: &str) -> Result<bool> {
    let out = ns.exec_unchecked(&["dig", "+tries=1", "+time=3", name])?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("status: NOERROR"))
}

/// Host A's agent's metrics (served on [`METRICS`] in its namespace).
fn scrape(ns: &Netns) -> Result<String> {
    curl(ns, &format!("http://{METRICS}/metrics"))
}

#[test]
fn a_network_made_again_under_its_name_counts_dns_questions_from_zero() -> Result<()> {
    let lab = Lab::new("api-dnsre")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let ns = &host.netns;
    let agent = ovl.attach_with_env(&lab, host, "host-a", "auto", &[("OVL_METRICS", METRICS)])?;
    let c1 = lab.container("c1")?;
    // web made three times: on VNI 5000, again on another VNI, and again
    // on that same VNI.
    for (round, vni) in ["5000", "5001", "5001"].into_iter().enumerate() {
        ovl.create_network(ns, "web", "198.18.0.0/24", &["--vni", vni])?;
        ovl.connect(host, "host-a", "web", &c1, &["--name", "c1"])?;
        // Nothing was asked on this network yet: zero in `ovl stats` and
        // in the metrics, as its traffic counters.
        let stats: Value = serde_json::from_str(&ovl.run(
            ns,
            "host-a",
            &["stats", "--json", "--network", "web"],
        )?)?;
        ensure!(
            stats[0]["dns"]["answered"] == 0 && stats[0]["tx_packets"] == 0,
            "round {round}: web (VNI {vni}) starts with counts:\n{stats:#}"
        );
        let series =
            format!("ovl_dns_queries_total{{network=\"web\",outcome=\"answered\",vni=\"{vni}\"}}");
        let text = scrape(ns)?;
        ensure!(
            text.contains(&format!("{series} 0\n")),
            "round {round}: no `{series} 0` in\n{text}"
        );
        // One question answered from ovl's names (asked until the resolver
        // listens: unanswered ones are not counted) counts one.
        wait_until(Duration::from_secs(10), || resolves(&c1, "c1"))
            .with_context(|| format!("round {round}: c1 never resolved"))?;
        let text = scrape(ns)?;
        ensure!(
            text.contains(&format!("{series} 1\n")),
            "round {round}: no `{series} 1` in\n{text}"
        );
        ovl.run(ns, "host-a", &["disconnect", "web", c1.name()])?;
        ovl.run(ns, "-", &["network", "rm", "web"])?;
        // Host A no longer serves web once it exports none of it.
        wait_until(Duration::from_secs(10), || {
            Ok(!scrape(ns)?.contains("network=\"web\""))
        })
        .with_context(|| format!("round {round}: host A still exports web"))?;
    }
    agent.stop()
}

#[test]
fn stats_without_an_agent_list_the_networks_the_agent_listed() -> Result<()> {
    let lab = Lab::new("api-pinrows")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let ns = &host.netns;
    let agent = ovl.attach(&lab, host, "host-a", "auto")?;
    // uber-net is served here (two containers that talk), idle-net not.
    ovl.create_network(ns, "uber-net", "198.18.0.0/24", &[])?;
    ovl.create_network(ns, "idle-net", "198.18.9.0/24", &[])?;
    let c1 = lab.container("c1")?;
    let c2 = lab.container("c2")?;
    ovl.connect(host, "host-a", "uber-net", &c1, &[])?;
    let ip2 = ovl.connect(host, "host-a", "uber-net", &c2, &[])?;
    let r = ping(&c1, ip2, 5, &["-i", "0.05", "-W", "1"])?;
    ensure!(r.all_received(), "{}", r.output);
    // (network, VNI, local frames) of each row of `ovl stats --json`.
    let rows = |args: &[&str]| -> Result<Vec<(String, u64, u64)>> {
        let mut argv = vec!["stats", "--json"];
        argv.extend_from_slice(args);
        let out = ovl.run(ns, "host-a", &argv)?;
        let v: Value = serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))?;
        v.as_array()
            .with_context(|| format!("not an array: {v}"))?
            .iter()
            .map(|r| {
                Ok((
                    r["network"].as_str().context("network")?.to_owned(),
                    r["vni"].as_u64().context("vni")?,
                    r["local_packets"].as_u64().context("local_packets")?,
                ))
            })
            .collect()
    };
    let asked = rows(&[])?;
    let idle_asked = rows(&["--network", "idle-net"])?;
    ensure!(
        asked.len() == 2 && asked[1].0 == "uber-net" && asked[1].2 >= 10,
        "the agent's rows: {asked:?}"
    );
    agent.stop()?;
    // Read from the pins: the same networks, counted on (a neighbour's
    // ARP refresh may have crossed since).
    let same = |a: &[(String, u64, u64)], b: &[(String, u64, u64)]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(a, b)| a.0 == b.0 && a.1 == b.1 && b.2 >= a.2)
    };
    let pinned = rows(&[])?;
    ensure!(
        same(&asked, &pinned),
        "with the agent: {asked:?}\nfrom the pins: {pinned:?}"
    );
    let idle_pinned = rows(&["--network", "idle-net"])?;
    ensure!(
        idle_asked.len() == 1 && same(&idle_asked, &idle_pinned),
        "`--network idle-net` with the agent: {idle_asked:?}\nfrom the pins: {idle_pinned:?}"
    );
    Ok(())
}

#[test]
fn the_agent_says_where_it_serves_metrics_when_it_chose_the_port() -> Result<()> {
    let lab = Lab::new("api-mport")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let ns = &hosts[0].netns;
    let agent = ovl.attach_with_env(
        &lab,
        &hosts[0],
        "host-a",
        "auto",
        &[("OVL_METRICS", "127.0.0.1:0")],
    )?;
    // Said as its metrics server starts, just after it attached.
    let mut url = None;
    wait_until(Duration::from_secs(5), || {
        url = agent
            .log()?
            .split_whitespace()
            .find(|w| w.starts_with("http://127.0.0.1:") && w.ends_with("/metrics"))
            .map(str::to_owned);
        Ok(url.is_some())
    })
    .with_context(|| {
        format!(
            "the agent does not say where its metrics are:\n{}",
            agent.log().unwrap_or_default()
        )
    })?;
    let url = url.context("waited for")?;
    ensure!(
        !url.contains(":0/"),
        "the port asked for, not the one bound: {url}"
    );
    let text = curl(ns, &url)?;
    ensure!(text.contains("ovl_agent_info{"), "{url} answered:\n{text}");
    agent.stop()
}

#[test]
fn stats_of_a_running_agent_do_not_need_the_store() -> Result<()> {
    let lab = Lab::new("api-nostore")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let ns = &host.netns;
    let agent = ovl.attach(&lab, host, "host-a", "auto")?;
    ovl.create_network(ns, "uber-net", "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    ovl.connect(host, "host-a", "uber-net", &c1, &[])?;
    // The store out of reach of this command (nothing listens there), as
    // in an etcd outage: the agent still answers for its counters.
    let unreachable = [("OVL_STORE", "etcd://127.0.0.1:1")];
    for (args, needle) in [
        (&["stats", "--json"][..], "\"network\": \"uber-net\""),
        (
            &["stats", "--underlay", "--json"][..],
            "\"underlay_packets\"",
        ),
    ] {
        let out = ovl.run_with_env_unchecked(ns, "host-a", &unreachable, args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.contains(needle),
            "`ovl {}` with the store unreachable: {}\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without the agent, naming the pinned counters needs the store: said.
    agent.stop()?;
    let out = ovl.run_with_env_unchecked(ns, "host-a", &unreachable, &["stats"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("etcd://127.0.0.1:1"),
        "`ovl stats` with neither agent nor store: {}\n{err}",
        out.status
    );
    Ok(())
}
