//! The underlay marks congestion on ovl's VXLAN (ECN CE in the outer
//! header): an ECN-capable packet reaches its container marked, one that is
//! not is dropped, as RFC 6040 §4.2 says, and counted `congestion`, never
//! `malformed`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{CONTAINER_IFACE, HOST_IFACE, Lab, Netns, TwoHosts, mac_for, ping, wait_until};

/// Marked frames per case.
const N: u64 = 5;

/// The ECN code points of the IPv4 TOS byte (RFC 3168 §5).
const NOT_ECT: u8 = 0b00;
const ECT0: u8 = 0b10;
const CE: u8 = 0b11;

/// Two hosts with a container each on one network, proven to work: host
/// A's container and address, host B's container's address.
fn world_with_traffic(lab: &Lab) -> Result<(TwoHosts, Netns, Ipv4Addr, Ipv4Addr)> {
    let world = TwoHosts::start(lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let (c1, ip1) = world.container(lab, 0, "uber-net", "c1")?;
    let (_c2, ip2) = world.container(lab, 1, "uber-net", "c2")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;
    Ok((world, c1, ip1, ip2))
}

/// Sends `N` VXLAN frames from host B's VTEP to host A, as a router on
/// the way that marked them congested would pass them on: outer TOS CE,
/// each carrying an ICMP echo request from `from` (host B's container) to
/// `to` (host A's) with inner ECN field `inner_ecn`. Built with scapy on
/// the router (where a congested queue would be), both MACs given.
fn send_marked_vxlan(world: &TwoHosts, from: Ipv4Addr, to: Ipv4Addr, inner_ecn: u8) -> Result<()> {
    let (host_a, host_b) = (&world.hosts[0], &world.hosts[1]);
    let gateway = host_a.gateway.context("routed host has a gateway")?;
    let router_iface = world.router.iface_with_addr(gateway)?;
    let router_mac = world.router.link_mac(&router_iface)?;
    let host_mac = host_a.netns.link_mac(HOST_IFACE)?;
    let script = format!(
        "from scapy.all import Ether, IP, UDP, ICMP, sendp\n\
         from scapy.layers.vxlan import VXLAN\n\
         frame = (Ether(src='{router_mac}', dst='{host_mac}')\n\
             / IP(src='{vtep_b}', dst='{vtep_a}', tos={CE})\n\
             / UDP(sport=40000, dport=4789)\n\
             / VXLAN(vni={vni}, flags=0x08)\n\
             / Ether(src='{from_mac}', dst='{to_mac}')\n\
             / IP(src='{from}', dst='{to}', tos={inner_ecn})\n\
             / ICMP())\n\
         sendp(frame, iface='{router_iface}', count={N}, verbose=False)\n",
        vtep_a = host_a.addr,
        vtep_b = host_b.addr,
        vni = world.ovl.inspect(&host_a.netns, "uber-net")?["vni"]
            .as_u64()
            .context("inspect has no vni")?,
        from_mac = mac_for(from),
        to_mac = mac_for(to),
    );
    // Debian's python3-scapy lives in the system interpreter, which a
    // user-level python3 (pyenv, venv) earlier in PATH would not see.
    world.router.exec(&["/usr/bin/python3", "-c", &script])?;
    Ok(())
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
    let (world, c1, ip1, ip2) = world_with_traffic(&lab)?;

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
