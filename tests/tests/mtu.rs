//! The overlay MTU: containers get 1450 bytes (a 1500-byte underlay minus
//! 50 bytes of VXLAN headers), the largest unfragmented ping crosses, and
//! anything that would not fit the underlay never leaves the host: with DF
//! its sender is told the MTU that fits, without it is dropped.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{
    CONTAINER_IFACE, HOST_IFACE, Lab, NetCounters, Netns, OVERLAY_MTU, TwoHosts, UNDERLAY_MTU,
    dump_node_config, ping, wait_until,
};

/// IPv4 (20) + ICMP (8) header bytes in front of a ping payload.
const ICMP_HEADERS: u32 = 28;

/// The largest payload whose packet fits the overlay MTU: 1422.
const LARGEST_PAYLOAD: u32 = OVERLAY_MTU - ICMP_HEADERS;

/// Two hosts, one network, a container on each, reachable.
fn connected(lab: &Lab) -> Result<(TwoHosts, Netns, Netns, std::net::Ipv4Addr)> {
    let world = TwoHosts::start(lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let (c1, _) = world.container(lab, 0, "uber-net", "c1")?;
    let (c2, ip2) = world.container(lab, 1, "uber-net", "c2")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;
    Ok((world, c1, c2, ip2))
}

#[test]
fn container_mtu_is_1450_and_1422_byte_pings_cross_1423_are_refused() -> Result<()> {
    let lab = Lab::new("mtu-fit")?;
    let (world, c1, c2, ip2) = connected(&lab)?;
    for c in [&c1, &c2] {
        let mtu = c.link_mtu(CONTAINER_IFACE)?;
        ensure!(
            mtu == OVERLAY_MTU,
            "{c} has MTU {mtu}, expected {OVERLAY_MTU}"
        );
    }

    let largest = LARGEST_PAYLOAD.to_string();
    let r = ping(
        &c1,
        ip2,
        3,
        &["-M", "do", "-s", &largest, "-i", "0.2", "-W", "2"],
    )?;
    ensure!(
        r.all_received(),
        "{LARGEST_PAYLOAD}-byte pings lost:\n{}",
        r.output
    );

    // One byte more does not fit eth0 and DF forbids fragmenting: the
    // container's own stack refuses to send it, so ovl never sees it.
    let before = world.counters(0, "uber-net")?;
    let too_large = (LARGEST_PAYLOAD + 1).to_string();
    let ip2_text = ip2.to_string();
    let out = c1.exec_unchecked(&[
        "ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", &too_large, &ip2_text,
    ])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success() && text.contains("message too long"),
        "a {too_large}-byte ping was not refused locally ({}):\n{text}",
        out.status
    );
    let after = world.counters(0, "uber-net")?;
    ensure!(
        after.tx_packets == before.tx_packets && after.too_big == before.too_big,
        "the refused ping reached ovl: {before:?} -> {after:?}"
    );
    world.stop()
}

#[test]
fn oversized_frame_is_answered_with_frag_needed_or_dropped_without_df() -> Result<()> {
    let lab = Lab::new("mtu-big")?;
    let (world, c1, _c2, ip2) = connected(&lab)?;

    // A container that ignores the MTU it was given: both ends of its veth
    // raised to 1500 (a veth drops frames larger than its peer's MTU, so
    // the host end must take them for ovl to see them).
    let host_end = host_end_of(&c1, &world.hosts[0].netns)?;
    world.hosts[0]
        .netns
        .ip(&["link", "set", &host_end, "mtu", "1500"])?;
    c1.ip(&["link", "set", CONTAINER_IFACE, "mtu", "1500"])?;

    // 1450 bytes of payload: a 1478-byte packet, 1528 once encapsulated.
    // Without DF the sender allowed fragments, which ovl does not make.
    let (before, after) = dropped_as_too_big(&world, &c1, ip2, 5, 1450)?;
    ensure!(
        after.tx_packets == before.tx_packets,
        "oversized frames were encapsulated: {before:?} -> {after:?}"
    );
    // With DF its gateway tells it what fits, as a router would.
    told_frag_needed(&world, &c1, ip2, 1450, OVERLAY_MTU)?;
    world.stop()
}

#[test]
fn underlay_mtu_lowered_under_a_running_agent_reaches_store_and_data_path() -> Result<()> {
    let lab = Lab::new("mtu-moved")?;
    let (world, c1, _c2, ip2) = connected(&lab)?;
    let pins = world.ovl.pin_dir(TwoHosts::NODES[0]);
    let before = dump_node_config(&pins)?;
    ensure!(
        before.underlay_mtu == UNDERLAY_MTU,
        "OVL_CONFIG starts with {before:?}, expected MTU {UNDERLAY_MTU}"
    );

    // Host A's underlay shrinks while its agent runs (the router's end
    // too, so replies of the new size still come back).
    const LOWER: u32 = 1400;
    let lower = LOWER.to_string();
    world.hosts[0]
        .netns
        .ip(&["link", "set", HOST_IFACE, "mtu", &lower])?;
    world.router.ip(&["link", "set", "h0", "mtu", &lower])?;

    // (a) The node's record in the store says so.
    let state_file = lab.tempdir().join("store/state.json");
    let stored_mtu = || -> Result<Option<u64>> {
        let text = std::fs::read_to_string(&state_file)
            .with_context(|| format!("read {}", state_file.display()))?;
        let state: serde_json::Value = serde_json::from_str(&text)?;
        Ok(state["nodes"][TwoHosts::NODES[0]]["underlay_mtu"].as_u64())
    };
    wait_until(Duration::from_secs(5), || {
        Ok(stored_mtu()? == Some(u64::from(LOWER)))
    })
    .with_context(|| {
        format!(
            "the store kept underlay MTU {:?} for host-a; agent log:\n{}",
            stored_mtu(),
            world.agents[0].log().unwrap_or_default()
        )
    })?;

    // (b) The programs' config says so, the rest of it unchanged.
    wait_until(Duration::from_secs(5), || {
        Ok(dump_node_config(&pins)?.underlay_mtu == LOWER)
    })
    .with_context(|| format!("OVL_CONFIG kept {:?}", dump_node_config(&pins)))?;
    let after = dump_node_config(&pins)?;
    ensure!(
        after.vtep == before.vtep
            && after.underlay_ifindex == before.underlay_ifindex
            && after.udp_port == before.udp_port,
        "OVL_CONFIG changed beyond the MTU: {before:?} -> {after:?}"
    );

    // And the programs act on it: what filled 1500 bytes on the wire no
    // longer fits. The containers keep MTU 1450, so their DF packets of
    // that size are answered with the MTU that fits now (silently dropped
    // they would be a black hole for every TCP connection); what fits
    // 1400 crosses.
    const N: u64 = 3;
    told_frag_needed(
        &world,
        &c1,
        ip2,
        LARGEST_PAYLOAD,
        LOWER - (UNDERLAY_MTU - OVERLAY_MTU),
    )?;
    let fitting = (LOWER - (UNDERLAY_MTU - OVERLAY_MTU) - ICMP_HEADERS).to_string();
    let r = ping(
        &c1,
        ip2,
        N as u32,
        &["-M", "do", "-s", &fitting, "-i", "0.2", "-W", "2"],
    )?;
    ensure!(
        r.all_received(),
        "{fitting}-byte pings lost on the 1400-byte underlay:\n{}",
        r.output
    );
    world.stop()
}

/// `n` pings without DF of `payload` bytes from `c1` to `ip2`, none of
/// which may cross: each counted `too_big` on host A. The counters before
/// and after.
fn dropped_as_too_big(
    world: &TwoHosts,
    c1: &Netns,
    ip2: std::net::Ipv4Addr,
    n: u64,
    payload: u32,
) -> Result<(NetCounters, NetCounters)> {
    let before = world.counters(0, "uber-net")?;
    let size = payload.to_string();
    let r = ping(
        c1,
        ip2,
        n as u32,
        &["-M", "dont", "-s", &size, "-i", "0.05", "-W", "1"],
    )?;
    ensure!(
        r.received == 0,
        "a {payload}-byte payload crossed:\n{}",
        r.output
    );
    let after = world.counters(0, "uber-net")?;
    ensure!(
        after.too_big - before.too_big == n,
        "too_big moved by {}, expected {n}: {before:?} -> {after:?}",
        after.too_big - before.too_big
    );
    Ok((before, after))
}

/// One DF ping of `payload` bytes from `c1` to `ip2`, too big for the way
/// to host B: answered by c1's gateway with ICMP fragmentation needed
/// carrying `mtu`, counted once as `path_mtu` on host A and nothing else
/// dropped or sent, and learned by c1's stack as the path's MTU.
fn told_frag_needed(
    world: &TwoHosts,
    c1: &Netns,
    ip2: std::net::Ipv4Addr,
    payload: u32,
    mtu: u32,
) -> Result<()> {
    let before = world.counters(0, "uber-net")?;
    let size = payload.to_string();
    let dst = ip2.to_string();
    let out = c1.exec_unchecked(&[
        "ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", &size, &dst,
    ])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        text.contains(&format!("Frag needed and DF set (mtu = {mtu})")),
        "a {payload}-byte DF ping was not answered with frag needed (mtu {mtu}):\n{text}"
    );
    let after = world.counters(0, "uber-net")?;
    ensure!(
        after.path_mtu - before.path_mtu == 1
            && after.too_big == before.too_big
            && after.tx_packets == before.tx_packets,
        "expected exactly one path_mtu drop: {before:?} -> {after:?}"
    );
    let route = c1.ip(&["route", "get", &dst])?;
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    ensure!(
        route.contains(&format!("mtu {mtu}")),
        "{c1} did not learn the path MTU {mtu}:\n{route}"
    );
    Ok(())
}

/// The name, in `host`, of the host end of `container`'s eth0 veth.
fn host_end_of(container: &Netns, host: &Netns) -> Result<String> {
    let peer_index = container
        .exec(&["cat", "/sys/class/net/eth0/iflink"])
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())?;
    let out = host.ip(&["-o", "link", "show"])?;
    let links = String::from_utf8_lossy(&out.stdout).into_owned();
    links
        .lines()
        .find_map(|line| {
            let (index, rest) = line.split_once(": ")?;
            let name = rest.split([':', '@']).next()?;
            (index == peer_index).then(|| name.to_owned())
        })
        .with_context(|| format!("no link with index {peer_index} in {host}:\n{links}"))
}
