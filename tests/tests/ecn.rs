//! The underlay marks congestion on ovl's VXLAN (ECN CE in the outer
//! header): an ECN-capable packet reaches its container marked, one that is
//! not is dropped, as RFC 6040 §4.2 says, and counted `congestion`, never
//! `malformed`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{
    CE, CONTAINER_IFACE, ECT0, Lab, NOT_ECT, Netns, Pair, TwoHosts, mac_for, wait_until,
};

/// Marked frames per case.
const N: u64 = 5;

/// Sends `N` VXLAN frames from host B's VTEP to host A, as a router on
/// the way that marked them congested would pass them on: outer TOS CE,
/// each carrying an ICMP echo request from `from` (host B's container) to
/// `to` (host A's) with inner ECN field `inner_ecn`.
fn send_marked_vxlan(world: &TwoHosts, from: Ipv4Addr, to: Ipv4Addr, inner_ecn: u8) -> Result<()> {
    let vni = world.inspect(0, "uber-net")?["vni"]
        .as_u64()
        .context("inspect has no vni")?;
    let inner = format!(
        "Ether(src='{}', dst='{}') / IP(src='{from}', dst='{to}', tos={inner_ecn}) / ICMP()",
        mac_for(from),
        mac_for(to)
    );
    world.send_vxlan_to_host_a(world.hosts[1].addr, CE, vni, &inner, N)
}

/// IPv4 packets with a CE mark that `ns`'s stack received
/// (`IpExt: InCEPkts` of /proc/net/netstat).
fn ce_received(ns: &Netns) -> Result<u64> {
    let out = ns.exec(&["cat", "/proc/net/netstat"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ip_ext = text.lines().filter(|l| l.starts_with("IpExt:"));
    let (names, values) = (
        ip_ext.next().context("no IpExt names")?,
        ip_ext.next().context("no IpExt values")?,
    );
    let at = names
        .split_whitespace()
        .position(|n| n == "InCEPkts")
        .context("no InCEPkts")?;
    values
        .split_whitespace()
        .nth(at)
        .context("short IpExt values")?
        .parse()
        .context("InCEPkts")
}

#[test]
fn underlay_congestion_marks_ecn_capable_packets_and_drops_the_rest_as_congestion() -> Result<()> {
    let lab = Lab::new("ecn-ce")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let Pair { c1, ip1, ip2, .. } = world.connected_pair(&lab, "uber-net")?;

    // Not ECN-capable: dropped, counted `congestion` and nothing else.
    let before = world.counters(0, "uber-net")?;
    let rx_before = c1.link_counter(CONTAINER_IFACE, "rx_packets")?;
    send_marked_vxlan(&world, ip2, ip1, NOT_ECT)?;
    // Counters are written before the drop returns, so once the sender is
    // done they are final; polling only tolerates a slow scapy exit.
    let mut after = before.clone();
    wait_until(Duration::from_secs(5), || {
        after = world.counters(0, "uber-net")?;
        Ok(after.congestion - before.congestion >= N)
    })
    .with_context(|| format!("congestion did not reach +{N}: {before:?} -> {after:?}"))?;
    let mut expected = before.clone();
    expected.congestion += N;
    ensure!(
        after == expected,
        "more than congestion moved (malformed, or a delivery): {before:?} -> {after:?}"
    );
    // Nothing else reaches c1 meanwhile (IPv6 is off on both ends of its
    // veth), so any frame it received is a marked one.
    let delivered = c1.link_counter(CONTAINER_IFACE, "rx_packets")? - rx_before;
    ensure!(
        delivered == 0,
        "the container received {delivered} frames while {N} were dropped"
    );

    // ECN-capable: delivered, the mark carried onto the inner packet.
    let before = world.counters(0, "uber-net")?;
    let ce_before = ce_received(&c1)?;
    send_marked_vxlan(&world, ip2, ip1, ECT0)?;
    let mut ce = ce_before;
    wait_until(Duration::from_secs(5), || {
        ce = ce_received(&c1)?;
        Ok(ce - ce_before >= N)
    })
    .with_context(|| format!("c1 received {} packets marked CE, {N} sent", ce - ce_before))?;
    let after = world.counters(0, "uber-net")?;
    ensure!(
        after.rx_packets - before.rx_packets >= N
            && after.congestion == before.congestion
            && after.malformed == before.malformed,
        "marked ECN-capable packets: {before:?} -> {after:?}"
    );
    world.stop()
}
