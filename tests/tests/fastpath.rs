//! The VXLAN fast path between two hosts on different underlay subnets:
//! reachability both ways, one overlay hop, exact per-VNI counters.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ovl_tests::{Lab, Netns, Pair, TwoHosts, iperf3_server, ping, wait_until};
use serde_json::Value;

#[test]
fn containers_on_two_subnets_ping_both_ways_in_one_overlay_hop() -> Result<()> {
    let lab = Lab::new("fp-ping")?;
    let world = TwoHosts::start(&lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let (c1, ip1) = world.container(&lab, 0, "uber-net", "c1")?;
    let (c2, ip2) = world.container(&lab, 1, "uber-net", "c2")?;

    // The agents pick the new endpoints up from the store.
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;
    let there = ping(&c1, ip2, 5, &["-i", "0.2", "-W", "2"])?;
    ensure!(
        there.all_received(),
        "A -> B lost packets:\n{}",
        there.output
    );
    let back = ping(&c2, ip1, 5, &["-i", "0.2", "-W", "2"])?;
    ensure!(back.all_received(), "B -> A lost packets:\n{}", back.output);

    // One hop: the router between the underlay subnets is invisible.
    let trace = c1.exec(&["traceroute", "-n", "-w", "2", "-q", "1", &ip2.to_string()])?;
    let trace = String::from_utf8_lossy(&trace.stdout).into_owned();
    let hops: Vec<&str> = trace.lines().skip(1).collect();
    ensure!(
        hops.len() == 1 && hops[0].contains(&ip2.to_string()),
        "traceroute:\n{trace}"
    );

    world.stop()
}

#[test]
fn pings_move_tx_and_rx_by_exactly_their_number_on_their_vni_only() -> Result<()> {
    let lab = Lab::new("fp-count")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let ns = &world.hosts[0].netns;
    world.ovl.create_network(ns, "blue", "198.18.0.0/24", &[])?;
    world.ovl.create_network(ns, "red", "198.18.1.0/24", &[])?;
    let (c1, _) = world.container(&lab, 0, "blue", "c1")?;
    let (_c2, ip2) = world.container(&lab, 1, "blue", "c2")?;
    let (_r1, _) = world.container(&lab, 0, "red", "r1")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;

    let a0 = world.counters(0, "blue")?;
    let b0 = world.counters(1, "blue")?;
    let red_a0 = world.counters(0, "red")?;
    let red_b0 = world.counters(1, "red")?;
    const N: u64 = 20;
    let r = ping(&c1, ip2, N as u32, &["-i", "0.05", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    let a1 = world.counters(0, "blue")?;
    let b1 = world.counters(1, "blue")?;

    // Requests leave A and arrive at B; replies the other way. ARP was
    // answered before the baseline (the neighbour entry is fresh).
    ensure!(
        a1.tx_packets - a0.tx_packets == N,
        "A tx moved {} ({a0:?} -> {a1:?})",
        a1.tx_packets - a0.tx_packets
    );
    ensure!(
        a1.rx_packets - a0.rx_packets == N,
        "A rx moved {}",
        a1.rx_packets - a0.rx_packets
    );
    ensure!(
        b1.rx_packets - b0.rx_packets == N,
        "B rx moved {}",
        b1.rx_packets - b0.rx_packets
    );
    ensure!(
        b1.tx_packets - b0.tx_packets == N,
        "B tx moved {}",
        b1.tx_packets - b0.tx_packets
    );
    // 84-byte IPv4 echo + 14-byte Ethernet header, both ways.
    ensure!(
        a1.tx_bytes - a0.tx_bytes == N * 98,
        "A tx bytes {}",
        a1.tx_bytes - a0.tx_bytes
    );
    ensure!(
        b1.rx_bytes - b0.rx_bytes == N * 98,
        "B rx bytes {}",
        b1.rx_bytes - b0.rx_bytes
    );
    ensure!(
        a1.drops() == a0.drops() && b1.drops() == b0.drops(),
        "drops moved: {a1:?} {b1:?}"
    );
    ensure!(
        a0.arp_replies >= 1 && b0.arp_replies >= 1,
        "proxy ARP answered nothing: {a0:?} {b0:?}"
    );
    ensure!(world.counters(0, "red")? == red_a0, "red moved on A");
    ensure!(world.counters(1, "red")? == red_b0, "red moved on B");
    world.stop()
}

#[test]
fn containers_on_one_host_are_switched_locally() -> Result<()> {
    let lab = Lab::new("fp-local")?;
    let world = TwoHosts::start(&lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let (c1, _) = world.container(&lab, 0, "uber-net", "c1")?;
    let (_c3, ip3) = world.container(&lab, 0, "uber-net", "c3")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip3, 1, &["-W", "1"])?.all_received())
    })?;
    let before = world.counters(0, "uber-net")?;
    let r = ping(&c1, ip3, 10, &["-i", "0.05", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    let after = world.counters(0, "uber-net")?;
    ensure!(
        after.local_packets - before.local_packets == 20,
        "local moved {}",
        after.local_packets - before.local_packets
    );
    ensure!(
        after.tx_packets == before.tx_packets,
        "local traffic was encapsulated"
    );
    world.stop()
}

/// Decapsulated TCP enters the container end's queue of the CPU that
/// decapsulated it: the agent gives a container's veth a queue per CPU and
/// has the host end pick its transmit queue by CPU (XPS), so each CPU's
/// segments are merged (GRO) by their own NAPI before the two CPUs'
/// streams meet. Host A sends from one CPU at a time (the whole path runs
/// on the sender's CPU, veth to veth); most of what c2 receives must come
/// in on that CPU's queue.
#[test]
fn decapsulated_tcp_takes_the_container_queue_of_the_cpu_that_decapsulated_it() -> Result<()> {
    let cpus = std::thread::available_parallelism()
        .context("count the CPUs")?
        .get();
    // With one CPU the container's veth gets one queue and every frame
    // lands on it whichever CPU decapsulated it: nothing would be proven.
    ensure!(
        cpus >= 2,
        "this test needs at least 2 CPUs to show a queue per CPU; it has {cpus}"
    );
    let lab = Lab::new("fp-xps")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let Pair { c1, c2, ip2, .. } = world.connected_pair(&lab, "uber-net")?;
    let queues = rx_queue_packets(&c2)?;
    // A queue per CPU, up to the agent's cap (MAX_CONTAINER_QUEUES in
    // ovl-userspace's netlink.rs).
    ensure!(
        queues.len() == cpus.min(16),
        "c2's eth0 has {} receive queues on a machine of {cpus} CPUs",
        queues.len()
    );
    world.hosts[0]
        .netns
        .exec(&["ethtool", "-K", "eth0", "tso", "off", "gso", "off"])?;
    for cpu in 0..cpus.min(2) {
        iperf3_server(&lab, &c2)?;
        let before = rx_queue_packets(&c2)?;
        c1.exec(&[
            "taskset",
            "-c",
            &cpu.to_string(),
            "iperf3",
            "-c",
            &ip2.to_string(),
            "-n",
            "4M",
        ])?;
        std::thread::sleep(Duration::from_millis(200));
        let moved: Vec<u64> = rx_queue_packets(&c2)?
            .iter()
            .zip(&before)
            .map(|(after, before)| after - before)
            .collect();
        let total: u64 = moved.iter().sum();
        ensure!(
            total > 1000 && moved[cpu] * 2 > total,
            "sending from CPU {cpu}, c2's receive queues took {moved:?} frames"
        );
    }
    world.stop()
}

/// Frames each receive queue of `ns`'s eth0 (a veth end) has polled, in
/// queue order (`ethtool -S`: `rx_queue_N_xdp_packets`, which counts every
/// frame the queue's NAPI takes, XDP or not).
fn rx_queue_packets(ns: &Netns) -> Result<Vec<u64>> {
    let out = ns.exec(&["ethtool", "-S", "eth0"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut queues = Vec::new();
    for line in text.lines() {
        let Some((name, value)) = line.trim().split_once(": ") else {
            continue;
        };
        let Some(queue) = name
            .strip_prefix("rx_queue_")
            .and_then(|rest| rest.strip_suffix("_xdp_packets"))
        else {
            continue;
        };
        let queue: usize = queue
            .parse()
            .with_context(|| format!("queue in {line:?}"))?;
        ensure!(
            queue == queues.len(),
            "ethtool -S lists queue {queue} out of order:\n{text}"
        );
        queues.push(
            value
                .parse()
                .with_context(|| format!("count in {line:?}"))?,
        );
    }
    ensure!(
        !queues.is_empty(),
        "no receive queue counters in ethtool -S:\n{text}"
    );
    Ok(queues)
}

/// Packets `ifname` in `ns` has transmitted.
fn tx_packets(ns: &Netns, ifname: &str) -> Result<u64> {
    let out = ns.exec(&["ip", "-s", "-j", "link", "show", "dev", ifname])?;
    let links: Value = serde_json::from_slice(&out.stdout).context("ip -j link")?;
    links[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .with_context(|| format!("no tx packets for {ifname}: {links}"))
}

/// A counter of `/proc/net/<file>` in `ns` (`table` is the line's prefix,
/// such as `Ip` or `IpExt`).
fn snmp(ns: &Netns, file: &str, table: &str, field: &str) -> Result<u64> {
    let out = ns.exec(&["cat", &format!("/proc/net/{file}")])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{table}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (rows.next(), rows.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no {table} table in /proc/net/{file}:\n{text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == field)
        .and_then(|(_, value)| value.parse().ok())
        .with_context(|| format!("no {table} {field} in /proc/net/{file}:\n{text}"))
}

#[test]
fn decapsulated_bulk_tcp_is_merged_at_the_host_end_and_the_rest_goes_straight_in() -> Result<()> {
    let lab = Lab::new("fp-gro")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let Pair { c1, c2, ip2, .. } = world.connected_pair(&lab, "uber-net")?;
    let host_b = &world.hosts[1].netns;
    let end = world.host_end(1, "uber-net", &c2)?;

    // Pings into c2 skip the host end: it transmits none of them (a
    // neighbour probe answered by proxy ARP may cross it).
    const N: u64 = 20;
    let before = tx_packets(host_b, &end)?;
    let r = ping(&c1, ip2, N as u32, &["-i", "0.05", "-W", "2"])?;
    ensure!(r.all_received(), "{}", r.output);
    let crossed = tx_packets(host_b, &end)? - before;
    ensure!(
        crossed <= 2,
        "{crossed} of {N} decapsulated pings crossed the host end {end}"
    );

    // A request/response exchange, one small message at a time with
    // pauses between: each request's segment goes straight in too (GRO
    // would have nothing to merge it with); only what carries no data
    // (handshake, bare acknowledgements) crosses the host end.
    const MESSAGES: u64 = 50;
    let _echo = lab.python_tcp_server(&c2, ip2, ECHO_PORT, ECHO)?;
    let (before, segments) = (
        tx_packets(host_b, &end)?,
        snmp(&c2, "snmp", "Tcp", "InSegs")?,
    );
    c1.exec(&["/usr/bin/python3", "-c", &echo_client(ip2, MESSAGES)])?;
    std::thread::sleep(Duration::from_millis(200));
    let crossed = tx_packets(host_b, &end)? - before;
    let segments = snmp(&c2, "snmp", "Tcp", "InSegs")? - segments;
    ensure!(
        segments >= MESSAGES && crossed + MESSAGES <= segments + 2,
        "{crossed} of the {segments} segments c2 received in a request/response \
         exchange of {MESSAGES} messages crossed the host end {end}: requests \
         were queued there"
    );

    // TCP of wire size (host A segments before sending: TSO and GSO off
    // on its underlay) crosses the host end, and c2's GRO merges it.
    world.hosts[0]
        .netns
        .exec(&["ethtool", "-K", "eth0", "tso", "off", "gso", "off"])?;
    iperf3_server(&lab, &c2)?;
    let before = tx_packets(host_b, &end)?;
    let (skbs, segments) = (
        snmp(&c2, "snmp", "Ip", "InReceives")?,
        snmp(&c2, "netstat", "IpExt", "InNoECTPkts")?,
    );
    const BYTES: u64 = 4 << 20;
    c1.exec(&["iperf3", "-c", &ip2.to_string(), "-n", &BYTES.to_string()])?;
    // iperf3 -n ends the test once the client has sent the last byte, so
    // the server may close before it reads the tail: of 4 MiB (at least
    // 2974 frames of 1410 bytes), ask for a third. Then let the last
    // frames in flight land before counting.
    let least = BYTES / 1410 / 3;
    let received = || snmp(&c2, "netstat", "IpExt", "InNoECTPkts").map(|n| n - segments);
    wait_until(Duration::from_secs(5), || Ok(received()? >= least))
        .with_context(|| format!("c2 received fewer than {least} segments"))?;
    std::thread::sleep(Duration::from_millis(200));
    let crossed = tx_packets(host_b, &end)? - before;
    let skbs = snmp(&c2, "snmp", "Ip", "InReceives")? - skbs;
    let segments = received()?;
    // Every segment c2 received crossed the host end but iperf3's few
    // control messages (a little data after a pause, as above); a
    // neighbour probe may add one or two.
    ensure!(
        crossed + 10 >= segments && crossed <= segments + 2,
        "{crossed} frames crossed the host end {end}; c2 received {segments} segments"
    );
    ensure!(
        skbs * 2 < segments,
        "c2's stack saw {skbs} packets for {segments} segments: GRO merged too little"
    );
    world.stop()
}

/// Port of the request/response test's echo server.
const ECHO_PORT: u16 = 7007;

/// What the request/response test's server does with its connection:
/// echo it until the client closes it.
const ECHO: &str = "while True:\n    \
                        d = c.recv(4096)\n    \
                        if not d:\n        \
                            break\n    \
                        c.sendall(d)";

/// A Python client sending `messages` 64-byte requests to the echo server
/// on `ip`, 20 ms apart, each answered before the next; fails on a short
/// or wrong answer.
fn echo_client(ip: std::net::Ipv4Addr, messages: u64) -> String {
    format!(
        "import socket, time\n\
         c = socket.create_connection(('{ip}', {ECHO_PORT}), timeout=5)\n\
         c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n\
         for i in range({messages}):\n    \
             m = bytes([i % 256]) * 64\n    \
             c.sendall(m)\n    \
             got = b''\n    \
             while len(got) < 64:\n        \
                 d = c.recv(64 - len(got))\n        \
                 assert d, 'connection closed after %d answers' % i\n        \
                 got += d\n    \
             assert got == m, 'answer %d differs' % i\n    \
             time.sleep(0.02)\n\
         c.close()\n"
    )
}

#[test]
fn the_agent_switches_off_udp_gro_forwarding_on_the_underlay() -> Result<()> {
    let lab = Lab::new("fp-udpgro")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].netns.clone();
    let features = || -> Result<String> {
        let out = host_a.exec(&["ethtool", "-k", "eth0"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("rx-udp-gro-forwarding:") || l.starts_with("rx-gro-list:"))
            .collect::<Vec<_>>()
            .join(", "))
    };
    world.terminate_agent(0)?;
    host_a.exec(&[
        "ethtool",
        "-K",
        "eth0",
        "rx-udp-gro-forwarding",
        "on",
        "rx-gro-list",
        "on",
    ])?;
    ensure!(
        features()? == "rx-gro-list: on, rx-udp-gro-forwarding: on",
        "the test could not switch them on: {}",
        features()?
    );
    // They would merge VXLAN datagrams into batches decap drops.
    world.restart_agent(&lab, 0, &[])?;
    world.agents[0].wait_in_step()?;
    ensure!(
        features()? == "rx-gro-list: off, rx-udp-gro-forwarding: off",
        "after attach: {}",
        features()?
    );
    let log = world.agents[0].log()?;
    ensure!(
        log.contains("switched rx-udp-gro-forwarding, rx-gro-list off on eth0")
            || log.contains("switched rx-gro-list, rx-udp-gro-forwarding off on eth0"),
        "the agent did not say so:\n{log}"
    );
    world.stop()
}

#[test]
fn a_containers_own_vxlan_tunnel_carries_tcp_across_ovl() -> Result<()> {
    let lab = Lab::new("fp-nested")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let Pair { c1, ip1, c2, ip2 } = world.connected_pair(&lab, "uber-net")?;
    // Each container runs a VXLAN tunnel of its own to the other (as kind
    // or Docker in Docker would), over ovl's network.
    for (c, local, remote, inner) in [
        (&c1, ip1, ip2, "198.19.255.1/30"),
        (&c2, ip2, ip1, "198.19.255.2/30"),
    ] {
        c.ip(&[
            "link",
            "add",
            "in0",
            "type",
            "vxlan",
            "id",
            "42",
            "local",
            &local.to_string(),
            "remote",
            &remote.to_string(),
            "dstport",
            "4790",
            "dev",
            "eth0",
        ])?;
        c.ip(&["addr", "add", inner, "dev", "in0"])?;
        c.ip(&["link", "set", "in0", "up"])?;
    }
    let inner_b = std::net::Ipv4Addr::new(198, 19, 255, 2);
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, inner_b, 1, &["-W", "1"])?.all_received())
    })
    .context("no ping through the containers' own tunnel")?;

    // TCP through it: checksum offload and segmentation of a packet that
    // is encapsulated already when ovl encapsulates it.
    let before = world.counters(0, "uber-net")?;
    iperf3_server(&lab, &c2)?;
    let out = c1.exec(&[
        "iperf3",
        "-c",
        "198.19.255.2",
        "-t",
        "2",
        "-J",
        "--connect-timeout",
        "5000",
    ])?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3: {}", String::from_utf8_lossy(&out.stdout)))?;
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    ensure!(
        received >= 1 << 20,
        "{received} bytes crossed the containers' own tunnel in 2 s"
    );
    let after = world.counters(0, "uber-net")?;
    ensure!(
        after.drops() == before.drops(),
        "host A dropped frames of the tunnel: {:?} -> {:?}",
        before.drops(),
        after.drops()
    );
    world.stop()
}

/// Bulk TCP over an underlay with offloads crosses as GSO super-packets
/// (one encapsulation, one decapsulation each): the receiver's rx counts
/// what the sender's tx counted, wire-size packets, both ways, not the
/// super-packets they arrived in.
#[test]
fn super_packets_are_counted_as_their_segments_on_both_sides() -> Result<()> {
    let lab = Lab::new("fp-segs")?;
    let world = TwoHosts::start(&lab, "tc")?;
    let Pair { c1, c2, ip2, .. } = world.connected_pair(&lab, "uber-net")?;
    iperf3_server(&lab, &c2)?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;
    let (a0, b0) = (
        world.counters(0, "uber-net")?,
        world.counters(1, "uber-net")?,
    );
    let out = c1.exec(&["iperf3", "-c", &ip2.to_string(), "-n", "8M", "-J"])?;
    let report: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J")?;
    // Everything in flight has landed once iperf3's control exchange is
    // over; a moment more for the last acknowledgements.
    std::thread::sleep(Duration::from_millis(300));
    let (a1, b1) = (
        world.counters(0, "uber-net")?,
        world.counters(1, "uber-net")?,
    );
    let sent = a1.tx_packets - a0.tx_packets;
    // iperf3 -n ends once the client has written the last byte: what the
    // server read is what surely crossed (at most 1398 bytes a segment).
    let received = report["end"]["sum_received"]["bytes"]
        .as_u64()
        .context("iperf3's received bytes")?;
    ensure!(
        received > 0 && sent >= received / 1398,
        "A counted {sent} packets sent for {received} bytes received"
    );
    ensure!(
        b1.rx_packets - b0.rx_packets == sent,
        "B counted {} packets received, A {sent} sent",
        b1.rx_packets - b0.rx_packets
    );
    ensure!(
        a1.rx_packets - a0.rx_packets == b1.tx_packets - b0.tx_packets,
        "A counted {} acknowledgements received, B {} sent",
        a1.rx_packets - a0.rx_packets,
        b1.tx_packets - b0.tx_packets
    );
    ensure!(
        a1.drops() == a0.drops() && b1.drops() == b0.drops(),
        "drops moved: {a1:?} {b1:?}"
    );
    world.stop()
}
