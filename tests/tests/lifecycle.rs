//! The data path outlives its agent: a ping at 100 packets/s loses nothing
//! while the agent is killed, kept down, restarted, stopped and upgraded
//! to different programs; a TCP stream never stalls across a restart; what
//! changed in the store meanwhile is applied within a second of its
//! return; a second agent for the node is refused without harm; veths an
//! older agent made get the offload settings of this one.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ovl_tests::{
    AGENT_METRICS, BackgroundPing, Lab, Netns, Ovl, Pair, TwoHosts, bpf, dump_endpoints,
    iperf3_server, ping, upgrade_object, wait_until,
};
use serde_json::Value;

/// 100 packets/s, as the measurement.
const PING_INTERVAL: Duration = Duration::from_millis(10);

/// The program each pinned link of `pin_dir` runs: (pin file name, tag).
fn link_programs(pin_dir: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(pin_dir.join("links"))? {
        let path = entry?.path();
        let path_s = path.display().to_string();
        let link: Value = serde_json::from_slice(
            &ovl_tests::run(&["bpftool", "-j", "link", "show", "pinned", &path_s])?.stdout,
        )?;
        let id = link["prog_id"]
            .as_u64()
            .with_context(|| format!("no prog_id in {link}"))?
            .to_string();
        let prog: Value = serde_json::from_slice(
            &ovl_tests::run(&["bpftool", "-j", "prog", "show", "id", &id])?.stdout,
        )?;
        let tag = prog["tag"].as_str().context("no tag")?.to_owned();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        out.push((name, tag));
    }
    out.sort();
    Ok(out)
}

#[test]
fn ping_loses_nothing_while_the_agent_is_killed_restarted_stopped_and_upgraded() -> Result<()> {
    let lab = Lab::new("lc-ping")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].clone();
    let Pair { c1, ip2, .. } = world.connected_pair(&lab, "uber-net")?;
    let pin_dir = world.ovl.pin_dir("host-a");
    let tx_at_start = world.counters(0, "uber-net")?.tx_packets;

    // SIGKILL, kept down 3 s.
    let bg = BackgroundPing::start(&lab, &c1, ip2, 400, PING_INTERVAL)?;
    std::thread::sleep(Duration::from_millis(300));
    world.kill_agent(0)?;
    let status = world
        .ovl
        .run_unchecked(&host_a.netns, "host-a", &["status"])?;
    let said = String::from_utf8_lossy(&status.stderr);
    ensure!(
        !status.status.success()
            && said.contains("2 link(s) pinned")
            && said.contains("keeps forwarding"),
        "`ovl status` without an agent said: {said}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let r = bg.finish()?;
    ensure!(r.all_received(), "agent killed and down 3 s:\n{}", r.output);

    // Started again after the kill.
    let bg = BackgroundPing::start(&lab, &c1, ip2, 300, PING_INTERVAL)?;
    std::thread::sleep(Duration::from_millis(300));
    world.restart_agent(&lab, 0, &[])?;
    let r = bg.finish()?;
    ensure!(
        r.all_received(),
        "agent started after a kill:\n{}",
        r.output
    );
    ensure!(
        world.agents[0]
            .log()?
            .contains("took over 2 pinned link(s)"),
        "the new agent did not take over the pinned links:\n{}",
        world.agents[0].log()?
    );

    // SIGTERM, then started again.
    let bg = BackgroundPing::start(&lab, &c1, ip2, 300, PING_INTERVAL)?;
    std::thread::sleep(Duration::from_millis(300));
    world.terminate_agent(0)?;
    world.restart_agent(&lab, 0, &[])?;
    let r = bg.finish()?;
    ensure!(r.all_received(), "SIGTERM and restart:\n{}", r.output);

    // An upgrade to programs that differ.
    let before = link_programs(&pin_dir)?;
    let variant = upgrade_object()?;
    let variant = variant.display().to_string();
    let bg = BackgroundPing::start(&lab, &c1, ip2, 300, PING_INTERVAL)?;
    std::thread::sleep(Duration::from_millis(300));
    world.terminate_agent(0)?;
    world.restart_agent(&lab, 0, &[("OVL_EBPF_OBJECT", variant.as_str())])?;
    let r = bg.finish()?;
    ensure!(r.all_received(), "upgrade to other programs:\n{}", r.output);
    let after = link_programs(&pin_dir)?;
    ensure!(
        before.len() == 2 && after.len() == 2,
        "links before {before:?}, after {after:?}"
    );
    for ((link, old), (_, new)) in before.iter().zip(&after) {
        ensure!(
            old != new,
            "{link} still runs program tag {old} after the upgrade"
        );
    }

    // The counters lived through all of it (maps reused, never reset).
    let tx_now = world.counters(0, "uber-net")?.tx_packets;
    ensure!(
        tx_now >= tx_at_start + 1300,
        "A's tx went from {tx_at_start} to {tx_now}: counters were reset"
    );
    world.stop()
}

#[test]
fn tcp_stream_across_an_agent_restart_never_stalls() -> Result<()> {
    let lab = Lab::new("lc-tcp")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let Pair { c1, c2, ip2, .. } = world.connected_pair(&lab, "uber-net")?;
    iperf3_server(&lab, &c2)?;
    let ip2s = ip2.to_string();
    let client = lab.spawn(
        &c1,
        &[
            "iperf3", "-c", &ip2s, "-t", "4", "-i", "0.1", "-J", "-b", "200M",
        ],
        &[],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    world.terminate_agent(0)?;
    world.restart_agent(&lab, 0, &[])?;
    client.wait_timeout(Duration::from_secs(20))?;
    let report: Value = serde_json::from_str(&client.stdout()?)
        .with_context(|| format!("iperf3 output:\n{}", client.output_report()))?;
    let intervals = report["intervals"]
        .as_array()
        .context("no intervals in the iperf3 report")?;
    ensure!(intervals.len() >= 35, "{} intervals", intervals.len());
    for (i, iv) in intervals.iter().enumerate() {
        let bytes = iv["sum"]["bytes"].as_u64().unwrap_or(0);
        ensure!(
            bytes > 0,
            "interval {i} ({} s) carried no data: a stall of 100 ms or more",
            iv["sum"]["start"]
        );
    }
    world.stop()
}

#[test]
fn containers_that_came_and_went_while_the_agent_was_down_are_forwarded_within_a_second()
-> Result<()> {
    let lab = Lab::new("lc-down")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let Pair { c1, ip1, c2, .. } = world.connected_pair(&lab, "uber-net")?;

    world.kill_agent(0)?;
    // While A's agent is down: a new container on A, and c1 leaves.
    let (_c3, ip3) = world.container(&lab, 0, "uber-net", "c3")?;
    world.run(0, &["disconnect", "uber-net", c1.name()])?;

    world.restart_agent(&lab, 0, &[])?;
    let back = Instant::now();
    wait_until(Duration::from_secs(1), || {
        Ok(ping(&c2, ip3, 1, &["-W", "1"])?.all_received())
    })
    .context("c3 not reachable from B within 1 s of A's agent returning")?;
    eprintln!("c3 reachable {:?} after A's agent returned", back.elapsed());
    wait_until(Duration::from_secs(1), || {
        let a = dump_endpoints(&world.ovl.pin_dir("host-a"))?;
        let b = dump_endpoints(&world.ovl.pin_dir("host-b"))?;
        Ok(!a.keys().chain(b.keys()).any(|(_, ip)| *ip == ip1))
    })
    .context("c1 still in a map 1 s after A's agent returned")?;
    world.stop()
}

/// Fills TC ingress of `ifname` in `ns` with the most TCX programs the
/// kernel takes (63, each passing packets on), so that no further one can
/// be attached: a hook that fails, as one on a veth deleted between its
/// lookup and its attach does, but every time. The links last as long as
/// the descriptors returned.
fn fill_tcx_ingress(ns: &ovl_tests::Netns, ifname: &str) -> Result<Vec<OwnedFd>> {
    const MAX_PROGS: usize = 63;
    const TCX_NEXT: i32 = -1;
    let name = CString::new(ifname)?;
    ns.run_inside(|| {
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no {ifname} in {ns}");
        let mut links = Vec::new();
        for _ in 0..MAX_PROGS {
            let prog = bpf::load_trivial(bpf::ProgramKind::SchedCls, "next", TCX_NEXT)?;
            links.push(bpf::link_tcx_ingress(&prog, ifindex)?);
        }
        Ok(links)
    })?
}

#[test]
fn a_veth_that_cannot_be_hooked_when_the_agent_starts_does_not_stop_it() -> Result<()> {
    let lab = Lab::new("lc-unhook")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].netns.clone();
    let Pair { c2, ip1, .. } = world.connected_pair(&lab, "uber-net")?;

    // While A's agent is down, c3 and c4 are connected on A, and c3's veth
    // (hooked first: its index is lower) cannot take the egress hook.
    world.kill_agent(0)?;
    let (c3, _) = world.container(&lab, 0, "uber-net", "c3")?;
    let (_c4, ip4) = world.container(&lab, 0, "uber-net", "c4")?;
    let end = world.host_end(0, "uber-net", &c3)?;
    let _full = fill_tcx_ingress(&host_a, &end)?;

    world.restart_agent(&lab, 0, &[])?;
    let r = ping(&c2, ip1, 3, &["-i", "0.1", "-W", "1"])?;
    ensure!(
        r.all_received(),
        "B to A's c1 after the restart:\n{}\n{}",
        r.output,
        world.agents[0].output_report()
    );
    let r = ping(&c2, ip4, 3, &["-i", "0.1", "-W", "1"])?;
    ensure!(
        r.all_received(),
        "B to A's c4, hooked after c3 failed:\n{}\n{}",
        r.output,
        world.agents[0].output_report()
    );
    let log = world.agents[0].log()?;
    ensure!(
        log.contains(&format!("on {end}")),
        "the agent did not say which veth it could not hook:\n{log}"
    );
    world.stop()
}

/// Whether `ethtool -k` reads TCP segmentation offload on for `iface`.
fn tso_on(ns: &ovl_tests::Netns, iface: &str) -> Result<bool> {
    let out = ns.exec(&["ethtool", "-k", iface])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("tcp-segmentation-offload:"))
        .with_context(|| format!("no TSO line in ethtool -k {iface}:\n{text}"))?;
    Ok(line.contains(": on"))
}

#[test]
fn a_container_veth_left_with_tso_on_by_an_older_agent_gets_it_off_when_the_agent_starts()
-> Result<()> {
    let lab = Lab::new("lc-tso")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].netns.clone();
    let Pair { c1, c2, ip1, .. } = world.connected_pair(&lab, "uber-net")?;
    let end = world.host_end(0, "uber-net", &c1)?;
    ensure!(!tso_on(&host_a, &end)?, "{end} was made with TSO on");

    // What an agent before the GRO change left: the host end with TSO on.
    world.terminate_agent(0)?;
    host_a.exec(&["ethtool", "-K", &end, "tso", "on"])?;
    ensure!(tso_on(&host_a, &end)?, "ethtool did not turn TSO on");
    world.restart_agent(&lab, 0, &[])?;
    world.agents[0].wait_in_step()?;
    wait_until(Duration::from_secs(5), || Ok(!tso_on(&host_a, &end)?))
        .with_context(|| format!("{end} keeps TSO on:\n{}", world.agents[0].output_report()))?;
    let log = world.agents[0].log()?;
    ensure!(
        log.contains(&format!("turned TSO off on {end}")),
        "the agent did not say it changed {end}:\n{log}"
    );
    let r = ping(&c2, ip1, 3, &["-i", "0.1", "-W", "1"])?;
    ensure!(r.all_received(), "B to A after the change:\n{}", r.output);

    // Idempotent: a veth already in line is left alone, and said nothing of.
    world.terminate_agent(0)?;
    world.restart_agent(&lab, 0, &[])?;
    world.agents[0].wait_in_step()?;
    ensure!(!tso_on(&host_a, &end)?, "{end} has TSO on again");
    let log = world.agents[0].log()?;
    ensure!(
        !log.contains("turned TSO off"),
        "a restart with nothing to change changed something:\n{log}"
    );
    world.stop()
}

#[test]
fn a_second_agent_for_the_node_is_refused_and_the_first_keeps_forwarding() -> Result<()> {
    let lab = Lab::new("lc-second")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].clone();
    let Pair { c1, ip2, .. } = world.connected_pair(&lab, "uber-net")?;
    let links_before = link_programs(&world.ovl.pin_dir("host-a"))?;

    let bg = BackgroundPing::start(&lab, &c1, ip2, 200, PING_INTERVAL)?;
    let second = world
        .ovl
        .spawn_agent(&lab, &host_a, "host-a", "auto", &[])?;
    let status = second.wait_exit(Duration::from_secs(10))?;
    let log = second.log()?;
    ensure!(!status.success(), "the second agent ran:\n{log}");
    ensure!(
        log.contains("already runs for this node") && log.contains("pid"),
        "the refusal does not say why:\n{log}"
    );
    let r = bg.finish()?;
    ensure!(
        r.all_received(),
        "the second agent disturbed forwarding:\n{}",
        r.output
    );
    ensure!(
        link_programs(&world.ovl.pin_dir("host-a"))? == links_before,
        "the second agent changed the first one's links"
    );
    let status = world.run(0, &["status", "--json"])?;
    let health: Value = serde_json::from_str(&status)?;
    ensure!(
        health["pid"].as_u64() == Some(u64::from(world.agents[0].pid())),
        "the API socket is not the first agent's any more: {health}"
    );
    world.stop()
}

/// An agent started on a node whose data path forwards containers, with a
/// store that holds nothing at all (a mistyped path, a store wiped or moved
/// aside), stops with the reason instead of taking every network off the
/// data path, and writes nothing into that store; the data path forwards
/// on, and the agent starts again with the store it came from.
#[test]
fn an_agent_given_a_blank_store_refuses_to_start_and_the_data_path_forwards_on() -> Result<()> {
    let lab = Lab::new("lc-blank")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].clone();
    let Pair { c1, ip2, .. } = world.connected_pair(&lab, "uber-net")?;
    world.terminate_agent(0)?;

    let blank = lab.tempdir().join("blank-store");
    let url = format!("file://{}", blank.display());
    let bg = BackgroundPing::start(&lab, &c1, ip2, 200, PING_INTERVAL)?;
    let refused = world
        .ovl
        .spawn_agent(&lab, &host_a, "host-a", "auto", &[("OVL_STORE", &url)])?;
    let status = refused.wait_exit(Duration::from_secs(15))?;
    let log = refused.log()?;
    ensure!(!status.success(), "the agent ran on a blank store:\n{log}");
    ensure!(
        log.contains("holds no network and no node")
            && log.contains("uber-net")
            && log.contains("ovl detach eth0 --node host-a"),
        "the refusal does not say why or what to do:\n{log}"
    );
    ensure!(
        !blank.join("state.json").exists(),
        "the refused agent wrote into the blank store"
    );
    let r = bg.finish()?;
    ensure!(
        r.all_received(),
        "the data path stopped forwarding:\n{}",
        r.output
    );

    world.restart_agent(&lab, 0, &[])?;
    let r = ping(&c1, ip2, 3, &["-i", "0.2", "-W", "1"])?;
    ensure!(
        r.all_received(),
        "no forwarding after the start with the right store:\n{}",
        r.output
    );
    world.stop()
}

/// The endpoints `network` lists, as address → node.
fn listed(world: &ovl_tests::Cluster, i: usize, network: &str) -> Result<Vec<(String, String)>> {
    let net = world.inspect(i, network)?;
    Ok(net["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .map(|e| {
            (
                e["ip"].as_str().unwrap_or_default().to_owned(),
                e["location"]["node"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect())
}

#[test]
fn agent_down_longer_than_its_lease_gets_its_containers_back_with_their_addresses() -> Result<()> {
    const LEASE_TTL: u64 = 2;
    let lab = Lab::new("lc-lease")?;
    let mut world = ovl_tests::ThreeHosts::start(&lab, LEASE_TTL)?;
    let Pair {
        ip1: ip_a, c2: cb, ..
    } = world.connected_pair(&lab, "uber-net")?;

    world.kill_agent(0)?;
    // A is declared dead: its endpoint leaves the store and B's maps.
    wait_until(Duration::from_secs(LEASE_TTL + 8), || {
        let b = dump_endpoints(&world.ovl.pin_dir("host-b"))?;
        let gone_from_store = !listed(&world, 1, "uber-net")?
            .iter()
            .any(|(ip, _)| *ip == ip_a.to_string());
        Ok(gone_from_store && !b.keys().any(|(_, ip)| *ip == ip_a))
    })
    .context("A's endpoint was never freed after its lease")?;

    world.restart_agent(&lab, 0, &[("OVL_LEASE_TTL", "2")])?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&cb, ip_a, 1, &["-W", "1"])?.all_received())
    })
    .context("A's container unreachable after its agent came back")?;
    let ep = listed(&world, 1, "uber-net")?;
    ensure!(
        ep.contains(&(ip_a.to_string(), "host-a".to_owned())),
        "A's container does not have its address {ip_a} back: {ep:?}"
    );
    world.stop()
}

#[test]
fn agent_started_while_etcd_is_down_forwards_from_its_pins_and_catches_up() -> Result<()> {
    let lab = Lab::new("lc-noetcd")?;
    let mut world = ovl_tests::ThreeHosts::start(&lab, 10)?;
    let host_a = world.hosts[0].clone();
    let Pair {
        c1: ca,
        ip1: ip_a,
        c2: cb,
        ip2: ip_b,
    } = world.connected_pair(&lab, "uber-net")?;

    world.kill_agent(0)?;
    world.etcd.stop()?;
    let agent = world.ovl.attach(&lab, &host_a, "host-a", "auto")?;
    ensure!(
        agent.log()?.contains("retrying the store"),
        "the agent did not say it started without the store:\n{}",
        agent.log()?
    );
    world.agents.insert(0, agent);
    for (from, to) in [(&ca, ip_b), (&cb, ip_a)] {
        let r = ping(from, to, 5, &["-i", "0.1", "-W", "1"])?;
        ensure!(
            r.all_received(),
            "no forwarding during the outage:\n{}",
            r.output
        );
    }

    world.etcd.restart(&lab)?;
    world.etcd.wait_healthy(Duration::from_secs(15))?;
    let (_cc, ip_c) = world.container(&lab, 2, "uber-net", "cc")?;
    wait_until(Duration::from_secs(15), || {
        Ok(ping(&ca, ip_c, 1, &["-W", "1"])?.all_received())
    })
    .context("a container connected after etcd returned never became reachable from A")?;
    world.stop()
}

#[test]
fn an_endpoint_whose_namespace_was_deleted_without_disconnect_is_freed_after_the_grace()
-> Result<()> {
    let lab = Lab::new("lc-gc")?;
    let ovl = ovl_tests::Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let agent = ovl.attach_with_env(&lab, host, "host-a", "auto", &[("OVL_GC_GRACE", "2")])?;
    ovl.create_network(&host.netns, "uber-net", "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    let ip1 = ovl.connect(host, "host-a", "uber-net", &c1, &[])?;

    lab.remove_netns(&c1)?;
    let deleted = Instant::now();
    wait_until(Duration::from_secs(10), || {
        let net = ovl.inspect(&host.netns, "uber-net")?;
        Ok(net["endpoints"].as_array().is_some_and(|a| a.is_empty()))
    })
    .context("the abandoned endpoint was never freed")?;
    let took = deleted.elapsed();
    ensure!(
        took >= Duration::from_secs(2),
        "freed after {took:?}, before its 2 s grace"
    );
    ensure!(
        agent.log()?.contains(&format!("collected endpoint {ip1}")),
        "{}",
        agent.log()?
    );
    // The address is free again.
    let c2 = lab.container("c2")?;
    let ip2 = ovl.connect(host, "host-a", "uber-net", &c2, &[])?;
    ensure!(ip2 == ip1, "address {ip1} not reused (got {ip2})");
    agent.stop()
}

/// The resolv.conf `ovl connect` wrote for a namespace deleted without a
/// disconnect goes before the agent frees its endpoint in the store: an
/// agent killed between the two would otherwise leave a file nothing
/// removes (the store no longer says whose it is). Here the store's lock
/// is held meanwhile, so the agent's store change waits.
#[test]
fn the_resolv_conf_of_a_namespace_gone_without_disconnect_goes_before_its_endpoint() -> Result<()> {
    let lab = Lab::new("lc-resolv")?;
    let ovl = ovl_tests::Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let agent = ovl.attach_with_env(&lab, host, "host-a", "auto", &[("OVL_GC_GRACE", "1")])?;
    ovl.create_network(&host.netns, "uber-net", "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    let ip1 = ovl.connect(host, "host-a", "uber-net", &c1, &[])?;
    let resolv_conf = Path::new("/etc/netns").join(c1.name()).join("resolv.conf");
    ensure!(
        resolv_conf.exists(),
        "connect wrote no {}",
        resolv_conf.display()
    );

    let store = lab.tempdir().join("store");
    let lock = store.join("state.lock").display().to_string();
    let holder = lab.spawn_here(&["flock", &lock, "sleep", "5"], &[])?;
    wait_until(Duration::from_secs(5), || {
        Ok(!ovl_tests::run_unchecked(&["flock", "-n", &lock, "true"])?
            .status
            .success())
    })
    .with_context(|| format!("flock never took the lock:\n{}", holder.output_report()))?;
    lab.delete_netns_keeping_etc(&c1)?;
    let recorded = || -> Result<bool> {
        let state = std::fs::read_to_string(store.join("state.json"))?;
        Ok(state.contains(&format!("\"{ip1}\"")))
    };
    wait_until(Duration::from_secs(4), || Ok(!resolv_conf.exists()))
        .with_context(|| format!("{} outlived its namespace", resolv_conf.display()))?;
    ensure!(
        recorded()?,
        "the endpoint was freed before the lock was released"
    );
    holder.wait_timeout(Duration::from_secs(10))?;
    wait_until(Duration::from_secs(15), || Ok(!recorded()?)).with_context(|| {
        format!(
            "endpoint {ip1} never freed:\n{}",
            agent.log().unwrap_or_default()
        )
    })?;
    agent.stop()
}

#[test]
fn a_new_underlay_address_under_a_running_agent_is_followed_by_every_node() -> Result<()> {
    let lab = Lab::new("lc-readdr")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let Pair { c2, ip1, .. } = world.connected_pair(&lab, "uber-net")?;
    // Host A's address moves (DHCP, say).
    let new = std::net::Ipv4Addr::new(192, 0, 2, 20);
    world.hosts[0].move_address(new)?;

    // Every node learns A's new VTEP from the store, A's status shows it,
    // and B's container reaches A's again.
    wait_until(Duration::from_secs(10), || {
        Ok(world
            .nodes(1)?
            .iter()
            .any(|(n, vtep, _)| n == TwoHosts::NODES[0] && *vtep == new))
    })
    .with_context(|| format!("B never saw host-a at {new}: {:?}", world.nodes(1)))?;
    let status: Value = serde_json::from_str(&world.run(0, &["status", "--json"])?)?;
    ensure!(
        status["vtep"] == new.to_string(),
        "A's status after the move: {status}"
    );
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c2, ip1, 1, &["-W", "1"])?.all_received())
    })
    .with_context(|| {
        format!(
            "B's container never reached A's again:\n{}",
            world.agents[0].output_report()
        )
    })?;
    world.stop()
}

/// The index of `ns`'s eth0.
fn eth0_index(ns: &ovl_tests::Netns) -> Result<u64> {
    let link: Value = serde_json::from_slice(&ns.ip(&["-j", "link", "show", "eth0"])?.stdout)?;
    link[0]["ifindex"].as_u64().context("eth0's index")
}

/// Makes host A's underlay eth0 (just deleted) again, under `index` if
/// given, with its address, gateway and default route as before.
fn remake_underlay(world: &TwoHosts, index: Option<u64>) -> Result<()> {
    let host_a = &world.hosts[0];
    let ns = &host_a.netns;
    let gateway = host_a.gateway.context("routed hosts have a gateway")?;
    match index {
        None => ovl_tests::create_veth(ns, "eth0", &world.router, "h0")?,
        Some(index) => {
            ns.ip(&[
                "link",
                "add",
                "eth0",
                "index",
                &index.to_string(),
                "type",
                "veth",
                "peer",
                "name",
                "h0",
                "netns",
                world.router.name(),
            ])?;
        }
    }
    world
        .router
        .ip(&["addr", "add", &format!("{gateway}/24"), "dev", "h0"])?;
    world.router.ip(&["link", "set", "h0", "up"])?;
    ns.ip(&["addr", "add", &format!("{}/24", host_a.addr), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["route", "replace", "default", "via", &gateway.to_string()])?;
    Ok(())
}

/// Waits until the pair's containers reach each other both ways again
/// over host A's remade eth0, and checks it carries exactly one decap
/// program.
fn crossing_again(world: &TwoHosts, pair: &Pair) -> Result<()> {
    let ns = &world.hosts[0].netns;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&pair.c2, pair.ip1, 1, &["-W", "1"])?.all_received()
            && ping(&pair.c1, pair.ip2, 1, &["-W", "1"])?.all_received())
    })
    .with_context(|| {
        format!(
            "the containers never reached each other again over the remade eth0 (hooked: {:?}):\n{}",
            ovl_tests::hooked_programs(ns, "eth0"),
            world.agents[0].output_report()
        )
    })?;
    let hooked = ovl_tests::hooked_programs(ns, "eth0")?;
    ensure!(
        hooked.len() == 1 && hooked[0].name == "ovl_tc_decap",
        "the remade eth0 carries {hooked:?}"
    );
    Ok(())
}

#[test]
fn an_underlay_made_anew_under_a_running_agent_is_hooked_again() -> Result<()> {
    let lab = Lab::new("lc-remade")?;
    let world = TwoHosts::start_with_env(&lab, "auto", &[("OVL_METRICS", AGENT_METRICS)])?;
    let pair = world.connected_pair(&lab, "uber-net")?;
    let r = ping(&pair.c2, pair.ip1, 3, &["-i", "0.2", "-W", "1"])?;
    ensure!(r.all_received(), "before: {}", r.output);
    let ns = &world.hosts[0].netns;
    let before = eth0_index(ns)?;
    // External egress had the agent switch forwarding on for eth0.
    let forwarding = || -> Result<String> {
        Ok(String::from_utf8(
            ns.exec(&["cat", "/proc/sys/net/ipv4/conf/eth0/forwarding"])?
                .stdout,
        )?
        .trim()
        .to_owned())
    };
    ensure!(forwarding()? == "1", "eth0 does not forward before");

    // Host A's underlay goes (a NIC reset, a driver reload: the device and
    // everything hooked on it) and an interface of that name comes back
    // with the same address, under a new index.
    ns.ip(&["link", "del", "eth0"])?;
    // Meanwhile the agent says so: in its status and to Prometheus.
    let underlay_up = || -> Result<Option<String>> {
        Ok(world
            .scrape(0)?
            .lines()
            .find_map(|l| l.strip_prefix("ovl_underlay_up ").map(str::to_owned)))
    };
    wait_until(Duration::from_secs(5), || {
        Ok(underlay_up()?.as_deref() == Some("0"))
    })
    .with_context(|| format!("ovl_underlay_up while eth0 is gone: {:?}", underlay_up()))?;
    let status: Value = serde_json::from_str(&world.run(0, &["status", "--json"])?)?;
    ensure!(
        status["underlay_problem"]
            .as_str()
            .is_some_and(|p| p.contains("gone")),
        "A's status while eth0 is gone: {status}"
    );
    remake_underlay(&world, None)?;
    let after = eth0_index(ns)?;
    ensure!(
        after != before,
        "eth0 came back under its old index {before}"
    );

    // The agent hooks it again: both directions cross, and the new device
    // carries exactly one decap program.
    crossing_again(&world, &pair)?;
    let pins: Vec<String> = std::fs::read_dir(world.ovl.pin_dir(TwoHosts::NODES[0]).join("links"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    let decap: Vec<&String> = pins.iter().filter(|p| p.starts_with("decap")).collect();
    ensure!(
        decap.len() == 1 && decap[0].ends_with(&format!("-{after}")),
        "decap pins after the new eth0 (index {after}): {pins:?}"
    );
    // A new device starts with forwarding off: egress's is put back.
    wait_until(Duration::from_secs(5), || Ok(forwarding()? == "1"))
        .context("forwarding not switched on again for the new eth0")?;
    let status: Value = serde_json::from_str(&world.run(0, &["status", "--json"])?)?;
    ensure!(
        status.get("underlay_problem").is_none() && underlay_up()?.as_deref() == Some("1"),
        "A's status with the new eth0 hooked: {status}"
    );
    world.stop()
}

#[test]
fn an_underlay_deleted_and_made_anew_under_its_old_index_in_one_burst_is_hooked_again() -> Result<()>
{
    let lab = Lab::new("lc-sameindex")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let pair = world.connected_pair(&lab, "uber-net")?;
    let r = ping(&pair.c2, pair.ip1, 3, &["-i", "0.2", "-W", "1"])?;
    ensure!(r.all_received(), "before: {}", r.output);
    let ns = &world.hosts[0].netns;
    let before = eth0_index(ns)?;

    // While the agent looks away, eth0 goes and comes back under its old
    // index (as a tool that restores devices by index makes it): to a
    // look at the device it is the same, but it carries none of the old
    // one's hooks.
    world.agents[0].frozen(|| {
        ns.ip(&["link", "del", "eth0"])?;
        remake_underlay(&world, Some(before))
    })?;
    ensure!(
        eth0_index(ns)? == before,
        "eth0 came back under another index than {before}"
    );

    // The agent hooks it again: both directions cross, and the device
    // carries exactly one decap program.
    crossing_again(&world, &pair)?;
    world.stop()
}

#[test]
fn a_network_made_on_a_freed_vni_while_the_agent_was_down_counts_from_zero() -> Result<()> {
    let lab = Lab::new("lc-vnireuse")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let Pair { c1, c2, ip2, .. } = world.connected_pair(&lab, "blue")?;
    let r = ping(&c1, ip2, 5, &["-i", "0.1", "-W", "1"])?;
    ensure!(r.all_received(), "{}", r.output);
    let blue = world.counters(0, "blue")?;
    ensure!(blue.tx_packets >= 5, "blue counted nothing on A: {blue:?}");
    let vni = world.inspect(0, "blue")?["vni"]
        .as_u64()
        .context("blue's VNI")?
        .to_string();

    // While A's agent is down, blue goes and green is made on its VNI.
    world.kill_agent(0)?;
    world.run(0, &["disconnect", "blue", c1.name()])?;
    world.run(1, &["disconnect", "blue", c2.name()])?;
    world.run(0, &["network", "rm", "blue"])?;
    world.ovl.create_network(
        &world.hosts[0].netns,
        "green",
        "198.18.1.0/24",
        &["--vni", &vni],
    )?;
    let (_c3, _) = world.container(&lab, 0, "green", "c3")?;
    world.restart_agent(&lab, 0, &[])?;

    // Green's counters are its own, not blue's.
    let green = world.counters(0, "green")?;
    ensure!(
        green.tx_packets == 0 && green.rx_packets == 0,
        "green on VNI {vni} starts with blue's counts: {green:?} (blue had {blue:?})"
    );
    world.stop()
}

#[test]
fn an_address_handed_on_while_the_agent_was_down_is_no_conflict() -> Result<()> {
    let lab = Lab::new("lc-handon")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let Pair { c1, ip1, c2, .. } = world.connected_pair(&lab, "uber-net")?;
    // While A's agent is down, c1 leaves and c3 of the same node gets its
    // address (and with it the veth name c1 had).
    world.kill_agent(0)?;
    world.run(0, &["disconnect", "uber-net", c1.name()])?;
    let (_c3, ip3) = world.container(&lab, 0, "uber-net", "c3")?;
    ensure!(ip3 == ip1, "c3 got {ip3}, not c1's {ip1}");
    world.restart_agent(&lab, 0, &[])?;
    world.agents[0].wait_in_step()?;
    let r = ping(&c2, ip3, 3, &["-i", "0.2", "-W", "1"])?;
    ensure!(r.all_received(), "c3 unreachable:\n{}", r.output);
    let log = world.agents[0].log()?;
    ensure!(
        !log.contains("address conflict"),
        "the agent reported c1, cleanly disconnected, in conflict:\n{log}"
    );
    let nodes: Value = serde_json::from_str(&world.run(0, &["node", "ls", "--json"])?)?;
    ensure!(
        nodes.as_array().is_some_and(|n| n
            .iter()
            .all(|r| r["conflicts"].as_array().is_none_or(Vec::is_empty))),
        "conflicts recorded: {nodes}"
    );
    world.stop()
}

/// On the file store, a node's endpoints go while its agent is down by
/// `ovl node rm`; if meanwhile another container is given the MAC one of
/// them was given, the returning agent leaves that endpoint out and says
/// so (its log, `ovl node ls`), and the network keeps one endpoint with
/// the MAC.
#[test]
fn a_mac_given_away_while_the_node_was_removed_is_a_conflict_when_its_agent_returns() -> Result<()>
{
    let lab = Lab::new("lc-mac")?;
    let mac = "0a:00:5e:00:03:01";
    let (world, _c1, ip1, _c3, ip3) =
        given_away_while_removed(&lab, &["--mac", mac], &["--mac", mac, "--name", "newer"])?;

    let log = world.agents[0].log()?;
    ensure!(
        log.lines()
            .any(|l| l.contains("MAC conflict") && l.contains(mac) && l.contains("newer")),
        "the agent never reported {mac} held by newer:\n{log}"
    );
    let nodes: Value = serde_json::from_str(&world.run(0, &["node", "ls", "--json"])?)?;
    let conflicts = nodes
        .as_array()
        .and_then(|n| n.iter().find(|r| r["name"] == TwoHosts::NODES[0]))
        .map(|r| r["conflicts"].clone())
        .unwrap_or_default();
    ensure!(
        conflicts.as_array().map(Vec::len) == Some(1)
            && conflicts[0]["ip"] == ip1.to_string()
            && conflicts[0]["holder_name"] == "newer"
            && conflicts[0]["mac"]["mac"] == mac
            && conflicts[0]["mac"]["holder_ip"] == ip3.to_string(),
        "conflicts recorded: {nodes}"
    );
    let net = world.inspect(1, "uber-net")?;
    let holders: Vec<&Value> = net["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .filter(|e| e["mac"] == mac)
        .collect();
    ensure!(
        holders.len() == 1 && holders[0]["ip"] == ip3.to_string(),
        "{mac} should be newer's alone: {net}"
    );
    world.stop()
}

/// On the file store, a node's endpoints go while its agent is down by
/// `ovl node rm`; if meanwhile a container of the other node is called by
/// the name one of them had, the returning agent puts that endpoint back
/// under its fallback name (its namespace's, keeping its alias) and says so
/// once; the other keeps the name, and the returning container resolves
/// and answers under its new name.
#[test]
fn a_name_given_away_while_the_node_was_removed_is_a_rename_when_its_agent_returns() -> Result<()> {
    let lab = Lab::new("lc-name")?;
    let (world, c1, ip1, c3, ip3) = given_away_while_removed(
        &lab,
        &["--name", "db", "--alias", "database"],
        &["--name", "DB"],
    )?;

    let fallback = c1.name();
    let log = world.agents[0].log()?;
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("name conflict"))
        .collect();
    ensure!(
        said.len() == 1
            && said[0].contains(&format!("is back as {fallback}"))
            && said[0].contains(&format!("its name db is held by DB ({}", c3.name()))
            && said[0].contains(&format!("at {ip3}")),
        "the agent did not say once that db is back as {fallback}:\n{log}"
    );
    let net = world.inspect(1, "uber-net")?;
    let endpoints = net["endpoints"].as_array().context("endpoints")?;
    let called = |name: &str| -> Vec<&Value> {
        endpoints
            .iter()
            .filter(|e| {
                e["name"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .map(|e| &e["ip"])
            .collect()
    };
    ensure!(
        called("db") == [&Value::from(ip3.to_string())]
            && called(fallback) == [&Value::from(ip1.to_string())],
        "db should be DB's alone, c1 back as {fallback}: {net}"
    );
    let nodes: Value = serde_json::from_str(&world.run(0, &["node", "ls", "--json"])?)?;
    ensure!(
        nodes.as_array().is_some_and(|n| n
            .iter()
            .all(|r| r["conflicts"].as_array().is_none_or(Vec::is_empty))),
        "a rename recorded as a conflict: {nodes}"
    );

    // By name: c1 answers under its new name and its alias, db is the
    // holder's alone.
    let ip1s = ip1.to_string();
    wait_until(Duration::from_secs(10), || {
        Ok(addresses(&c3, fallback)? == [ip1s.as_str()])
    })
    .with_context(|| format!("{fallback} never resolved to {ip1} alone"))?;
    ensure!(addresses(&c3, "database")? == [ip1s.as_str()]);
    ensure!(addresses(&c1, "db")? == [ip3.to_string()]);
    let out = c3.exec(&["ping", "-c", "1", "-W", "2", fallback])?;
    let out = String::from_utf8_lossy(&out.stdout);
    ensure!(out.contains(&format!("({ip1})")), "ping {fallback}: {out}");
    world.stop()
}

/// Two hosts on the file store: c1 on host A connected to `uber-net` with
/// `c1_args`; A's agent killed and A removed (`ovl node rm`, which frees
/// c1's endpoint); c3 on B connected with `c3_args` (at another address:
/// c1's is held back); A's agent started again and in step. Returns the
/// world, c1 and c3 with their addresses.
fn given_away_while_removed(
    lab: &Lab,
    c1_args: &[&str],
    c3_args: &[&str],
) -> Result<(TwoHosts, Netns, Ipv4Addr, Netns, Ipv4Addr)> {
    let mut world = TwoHosts::start(lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    let ip1 = world.ovl.connect(
        &world.hosts[0],
        TwoHosts::NODES[0],
        "uber-net",
        &c1,
        c1_args,
    )?;
    wait_remembered(&world, 0, "uber-net", ip1)?;
    world.kill_agent(0)?;
    let out = world.run(1, &["node", "rm", TwoHosts::NODES[0]])?;
    ensure!(out.contains("freed its 1 endpoint"), "{out}");
    let c3 = lab.container("c3")?;
    let ip3 = world.ovl.connect(
        &world.hosts[1],
        TwoHosts::NODES[1],
        "uber-net",
        &c3,
        c3_args,
    )?;
    ensure!(ip3 != ip1, "c1's held-back {ip1} was handed out");
    world.restart_agent(lab, 0, &[])?;
    world.agents[0].wait_in_step()?;
    Ok((world, c1, ip1, c3, ip3))
}

/// Waits until host `i`'s agent remembers (its journal, `agent.json`)
/// endpoint `ip` of `network`: `ovl connect` returns once the endpoint
/// forwards, and the journal is written just after the maps, so an agent
/// killed right after a connect may not know the endpoint when it returns.
fn wait_remembered(
    world: &TwoHosts,
    i: usize,
    network: &str,
    ip: std::net::Ipv4Addr,
) -> Result<()> {
    let journal = journal_of(world, i)?;
    wait_until(Duration::from_secs(5), || {
        Ok(remembers(&journal, network, ip))
    })
    .with_context(|| format!("{} never remembered {network}/{ip}", journal.display()))
}

/// Host `i`'s agent journal, `<state dir>/agent.json`.
fn journal_of(world: &TwoHosts, i: usize) -> Result<std::path::PathBuf> {
    world
        .ovl
        .env(TwoHosts::NODES[i])
        .iter()
        .find(|(k, _)| k == "OVL_STATE_DIR")
        .map(|(_, v)| Path::new(v).join("agent.json"))
        .context("the lab gives every agent OVL_STATE_DIR")
}

/// Whether `journal` holds the endpoint `network/ip`.
fn remembers(journal: &Path, network: &str, ip: std::net::Ipv4Addr) -> bool {
    let key = format!("\"{network}/{ip}\"");
    std::fs::read_to_string(journal).is_ok_and(|j| j.contains(&key))
}

/// Containers connected one after another: each is in the agent's journal
/// by the time `ovl connect` returns (it returns once the agent forwards
/// for it), so an agent killed at any moment after that — its node then
/// losing its lease before it returns — puts the endpoint back.
#[test]
fn a_connected_container_is_in_the_journal_when_connect_returns() -> Result<()> {
    let lab = Lab::new("lc-journal")?;
    let world = TwoHosts::start(&lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let journal = journal_of(&world, 0)?;
    for n in 0..8 {
        let (_c, ip) = world.container(&lab, 0, "uber-net", &format!("c{n}"))?;
        ensure!(
            remembers(&journal, "uber-net", ip),
            "`ovl connect` returned for {ip} (container {n}) before the agent's journal held it"
        );
    }
    world.stop()
}

/// The IPv4 addresses `name` resolves to inside `ns` (`getent ahostsv4`),
/// each once, in order.
fn addresses(ns: &ovl_tests::Netns, name: &str) -> Result<Vec<String>> {
    let out = ns.exec_unchecked(&["getent", "ahostsv4", name])?;
    let mut seen = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(a) = line.split_whitespace().next()
            && !seen.iter().any(|s| s == a)
        {
            seen.push(a.to_owned());
        }
    }
    Ok(seen)
}

#[test]
fn a_state_dir_that_cannot_be_written_is_reported_once_with_what_it_costs() -> Result<()> {
    let lab = Lab::new("lc-rostate")?;
    let ovl = ovl_tests::Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let state = lab.tmpfs()?.display().to_string();
    ovl_tests::run(&["mount", "-o", "remount,ro", &state])?;
    let agent = ovl.attach_with_env(&lab, host, "host-a", "auto", &[("OVL_STATE_DIR", &state)])?;
    ovl.create_network(&host.netns, "uber-net", "198.18.0.0/24", &[])?;
    let pin_dir = ovl.pin_dir("host-a");
    for (n, hint) in ["c1", "c2", "c3"].into_iter().enumerate() {
        let c = lab.container(hint)?;
        ovl.connect(host, "host-a", "uber-net", &c, &[])?;
        // Each connect applied before the next: an apply, a save, each.
        wait_until(Duration::from_secs(5), || {
            Ok(dump_endpoints(&pin_dir)?.len() == n + 1)
        })
        .with_context(|| {
            format!(
                "{hint} never reached the maps:\n{}",
                agent.log().unwrap_or_default()
            )
        })?;
    }
    let log = agent.log()?;
    let said: Vec<&str> = log.lines().filter(|l| l.contains("agent.json")).collect();
    ensure!(
        said.len() == 1 && said[0].contains("not remembered") && said[0].contains("writable"),
        "the unwritable journal was reported {} time(s), not once with its cost:\n{}",
        said.len(),
        said.join("\n")
    );
    agent.stop()
}

/// IPv4 forwarding of `ifname` in `ns`.
fn forwarding(ns: &ovl_tests::Netns, ifname: &str) -> Result<String> {
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding");
    Ok(String::from_utf8_lossy(&ns.exec(&["cat", &path])?.stdout)
        .trim()
        .to_owned())
}

#[test]
fn an_agent_moved_to_another_underlay_moves_the_forwarding_it_switched_on() -> Result<()> {
    let lab = Lab::new("lc-moveul")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    world.connected_pair(&lab, "uber-net")?;
    let host_a = world.hosts[0].clone();
    let ns = host_a.netns.clone();
    ensure!(
        forwarding(&ns, "eth0")? == "1",
        "the agent did not switch eth0's forwarding on for external egress"
    );
    // Host A's node moves to another interface (eth1, its forwarding off).
    ns.ip(&[
        "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
    ])?;
    ns.ip(&["addr", "add", "203.0.113.77/32", "dev", "eth1"])?;
    ns.ip(&["link", "set", "eth1", "up"])?;
    ns.ip(&["link", "set", "eth1p", "up"])?;
    world.terminate_agent(0)?;
    let moved = ovl_tests::Host {
        iface: "eth1".into(),
        ..host_a.clone()
    };
    let agent = world.ovl.attach(&lab, &moved, "host-a", "auto")?;
    agent.wait_in_step()?;
    wait_until(Duration::from_secs(5), || {
        Ok(forwarding(&ns, "eth1")? == "1")
    })
    .with_context(|| {
        format!(
            "eth1's forwarding never went on:\n{}",
            agent.log().unwrap_or_default()
        )
    })?;
    let guard = String::from_utf8_lossy(
        &ns.exec(&["nft", "list", "chain", "ip", "ovl", "underlay_guard"])?
            .stdout,
    )
    .into_owned();
    ensure!(
        forwarding(&ns, "eth0")? == "0"
            && guard.contains("\"eth1\"")
            && !guard.contains("\"eth0\""),
        "after the move eth0 forwards ({}) and the guard is:\n{guard}",
        forwarding(&ns, "eth0")?
    );
    agent.terminate()?;
    world.run(0, &["detach", "eth1"])?;
    ensure!(
        forwarding(&ns, "eth1")? == "0",
        "`ovl detach eth1` left eth1 forwarding"
    );
    world.stop()
}

/// The next notification the agent sent to `socket`, as text.
fn notification(socket: &std::os::unix::net::UnixDatagram) -> Result<String> {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .context("no notification from the agent")?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Run as a systemd `Type=notify` service with a watchdog (the unit `ovl
/// systemd-unit` prints, which `systemd-analyze verify` accepts): the
/// agent says it is ready once it serves, with a status; says it is
/// alive at half the watchdog's period for as long as its loop turns,
/// and nothing while the process is stopped; says it is stopping when
/// told to stop.
#[test]
fn the_agent_tells_its_service_manager_it_is_ready_alive_and_stopping() -> Result<()> {
    let lab = Lab::new("sdnotify")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];

    let unit_file = lab.tempdir().join("ovl@eth0.service");
    std::fs::write(
        &unit_file,
        ovl.run(&host.netns, "host-a", &["systemd-unit"])?,
    )?;
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_file)
        .output()
        .context("run systemd-analyze")?;
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let path = lab.tempdir().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path)?;
    socket.set_read_timeout(Some(Duration::from_secs(15)))?;
    let path = path.display().to_string();
    let agent = ovl.attach_with_env(
        &lab,
        host,
        "host-a",
        "auto",
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")],
    )?;
    let ready = notification(&socket)?;
    ensure!(
        ready.lines().next() == Some("READY=1")
            && ready.contains("STATUS=node host-a forwarding on eth0 (VTEP 192.0.2.10)"),
        "the first notification: {ready:?}"
    );
    let status = ovl.run(&host.netns, "host-a", &["status"])?;
    ensure!(status.contains("host-a"), "status once ready: {status}");

    // Every 200 ms while it runs: 2 s hold at least 8.
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let count_alive = |over: Duration| -> Result<usize> {
        let until = Instant::now() + over;
        let mut n = 0;
        while Instant::now() < until {
            match notification(&socket) {
                Ok(m) if m == "WATCHDOG=1\n" => n += 1,
                Ok(m) => anyhow::bail!("unexpected notification {m:?}"),
                Err(_) => {}
            }
        }
        Ok(n)
    };
    let alive = count_alive(Duration::from_secs(2))?;
    ensure!(alive >= 8, "{alive} watchdog notifications in 2 s");
    // What was in flight as it stopped, then silence.
    let stopped = agent.frozen(|| {
        let _ = count_alive(Duration::from_millis(300))?;
        count_alive(Duration::from_secs(1))
    })?;
    ensure!(
        stopped == 0,
        "{stopped} watchdog notifications from a stopped agent"
    );

    agent.terminate()?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut last = String::new();
    while !last.contains("STOPPING=1") {
        last = notification(&socket).context("no STOPPING=1 after SIGTERM")?;
    }
    ensure!(
        last.contains("STATUS=stopping; the data path keeps forwarding"),
        "{last:?}"
    );
    Ok(())
}
