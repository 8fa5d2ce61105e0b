//! Decap trusts only VTEPs of the frame's own network: crafted VXLAN from a
//! machine on the underlay that is not one, or for a VNI this node does not
//! serve, is dropped and counted under its reason. Nor can a container
//! borrow its node's VTEP: VXLAN it sends out through its gateway is
//! dropped before the host would masquerade it behind the VTEP's address.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{CONTAINER_IFACE, Lab, NetCounters, Netns, TwoHosts, mac_for, ping, wait_until};
use serde_json::Value;

/// Crafted frames per test.
const N: u64 = 5;

/// A VNI no network has: ovl allocates from 4096 up.
const UNSERVED_VNI: u32 = 999;

/// The overlay address the forged frames claim to come from.
const FORGED_SOURCE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);

/// Two hosts with a container each on one network, proven to work; the
/// network's VNI and host A's container.
fn world_with_traffic(lab: &Lab) -> Result<(TwoHosts, u32, Netns, Ipv4Addr)> {
    let world = TwoHosts::start(lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let vni = world.ovl.inspect(&world.hosts[0].netns, "uber-net")?["vni"]
        .as_u64()
        .context("inspect has no vni")?;
    let (c1, ip1) = world.container(lab, 0, "uber-net", "c1")?;
    let (_c2, ip2) = world.container(lab, 1, "uber-net", "c2")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;
    Ok((world, u32::try_from(vni)?, c1, ip1))
}

/// Sends `N` VXLAN frames with VNI `vni` from the router (192.0.2.1, on
/// host A's subnet but no VTEP) to host A, each carrying an ICMP echo
/// request for `victim`. Built with scapy and sent on the raw link, so the
/// router's own stack adds nothing (no ARP: both MACs are given).
fn send_forged_vxlan(world: &TwoHosts, vni: u32, victim: Ipv4Addr) -> Result<()> {
    let gateway = world.hosts[0]
        .gateway
        .context("routed host has a gateway")?;
    let inner = format!(
        "Ether(src='{}', dst='{}') / IP(src='{FORGED_SOURCE}', dst='{victim}') / ICMP()",
        mac_for(FORGED_SOURCE),
        mac_for(victim)
    );
    world.send_vxlan_to_host_a(gateway, 0, u64::from(vni), &inner, N)
}

#[test]
fn vxlan_from_a_non_vtep_is_dropped_and_counted_unknown_vtep() -> Result<()> {
    let lab = Lab::new("spoof-vtep")?;
    let (world, vni, c1, ip1) = world_with_traffic(&lab)?;
    let before = world.counters(0, "uber-net")?;
    let rx_before = c1.link_counter(CONTAINER_IFACE, "rx_packets")?;

    send_forged_vxlan(&world, vni, ip1)?;

    // Counters are written before the drop returns, so once the sender is
    // done they are final; polling only tolerates a slow scapy exit.
    let mut after = before.clone();
    wait_until(Duration::from_secs(5), || {
        after = world.counters(0, "uber-net")?;
        Ok(after.unknown_vtep - before.unknown_vtep >= N)
    })
    .with_context(|| format!("unknown_vtep did not reach +{N}: {before:?} -> {after:?}"))?;
    ensure!(
        after.unknown_vtep - before.unknown_vtep == N,
        "unknown_vtep moved by {}, expected {N}",
        after.unknown_vtep - before.unknown_vtep
    );
    let mut expected = before.clone();
    expected.unknown_vtep += N;
    ensure!(
        after == expected,
        "more than unknown_vtep moved (a forged frame was delivered or answered): \
         {before:?} -> {after:?}"
    );
    // Nothing else reaches c1 meanwhile (IPv6 is off on both ends of its
    // veth; the network's counters moved by the drops only), so any frame
    // it received is a forged one.
    let delivered = c1.link_counter(CONTAINER_IFACE, "rx_packets")? - rx_before;
    ensure!(
        delivered == 0,
        "the container received {delivered} frames while {N} were forged for it"
    );
    world.stop()
}

#[test]
fn vxlan_for_an_unknown_vni_is_dropped_unattributed() -> Result<()> {
    let lab = Lab::new("spoof-vni")?;
    let (world, _vni, _c1, ip1) = world_with_traffic(&lab)?;
    let host_a = &world.hosts[0];
    let node_a = TwoHosts::NODES[0];
    let network_before = world.counters(0, "uber-net")?;
    let before = world.ovl.underlay(&host_a.netns, node_a)?;

    send_forged_vxlan(&world, UNSERVED_VNI, ip1)?;

    let unknown_vni = |v: &Value| v["drops"]["unknown_vni"].as_u64().unwrap_or(0);
    let seen = |v: &Value| v["underlay_packets"].as_u64().unwrap_or(0);
    let mut after = before.clone();
    wait_until(Duration::from_secs(5), || {
        after = world.ovl.underlay(&host_a.netns, node_a)?;
        Ok(unknown_vni(&after) - unknown_vni(&before) >= N)
    })
    .with_context(|| format!("unknown_vni did not reach +{N}: {before} -> {after}"))?;
    ensure!(
        unknown_vni(&after) - unknown_vni(&before) == N,
        "unknown_vni moved by {}, expected {N}: {before} -> {after}",
        unknown_vni(&after) - unknown_vni(&before)
    );
    ensure!(
        seen(&after) - seen(&before) >= N,
        "the underlay hook saw fewer than {N} frames: {before} -> {after}"
    );
    // A VNI nobody serves is nobody's: the network's counters stay put.
    ensure!(
        world.counters(0, "uber-net")? == network_before,
        "the forged frames were charged to a network"
    );
    world.stop()
}

/// Network "a" on host A and its container "attacker", whose gateway
/// answers (and is in its ARP cache before anything is counted).
fn attacker_on_host_a(lab: &Lab, world: &TwoHosts) -> Result<Netns> {
    world
        .ovl
        .create_network(&world.hosts[0].netns, "a", "198.18.0.0/24", &[])?;
    let (attacker, _) = world.container(lab, 0, "a", "attacker")?;
    ensure!(
        ping(&attacker, Ipv4Addr::new(198, 18, 0, 1), 1, &["-W", "1"])?.all_received(),
        "the attacker's gateway does not answer"
    );
    Ok(attacker)
}

/// Waits until network "a"'s `spoofed_source` on host A has moved by `N`
/// from `before`, and checks that nothing else moved (a datagram went
/// out); `harm` says what the forgeries did, for the failure message.
fn only_spoofed_source_moved(
    world: &TwoHosts,
    before: &NetCounters,
    harm: impl Fn() -> String,
) -> Result<()> {
    let mut after = before.clone();
    wait_until(Duration::from_secs(5), || {
        after = world.counters(0, "a")?;
        Ok(after.spoofed_source - before.spoofed_source >= N)
    })
    .with_context(|| {
        format!(
            "spoofed_source did not reach +{N} ({}): {before:?} -> {after:?}",
            harm()
        )
    })?;
    let mut expected = before.clone();
    expected.spoofed_source += N;
    // Its ARP for the gateway, should the entry have gone stale, is honest.
    expected.arp_replies = after.arp_replies;
    ensure!(
        after == expected,
        "more than spoofed_source moved by {N} (a datagram went out): {before:?} -> {after:?}"
    );
    Ok(())
}

/// A container's own UDP socket, sending to another node's VXLAN port
/// through its gateway: the host's masquerade would give the datagrams its
/// VTEP's address, and the other node would take them for its VXLAN. The
/// attacker, on network "a", forges frames of network "b" (which its node
/// serves for a bystander) for a container of "b" on the other node.
#[test]
fn vxlan_a_container_sends_through_its_gateway_is_dropped_as_spoofed() -> Result<()> {
    let lab = Lab::new("spoof-egress")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let host_a = &world.hosts[0].netns;
    let attacker = attacker_on_host_a(&lab, &world)?;
    world
        .ovl
        .create_network(host_a, "b", "198.18.1.0/24", &[])?;
    let vni_b = world.ovl.inspect(host_a, "b")?["vni"]
        .as_u64()
        .context("inspect has no vni")?;
    let (bystander, ip_bystander) = world.container(&lab, 0, "b", "bystander")?;
    let (victim, ip_victim) = world.container(&lab, 1, "b", "victim")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&bystander, ip_victim, 1, &["-W", "1"])?.all_received())
    })?;
    let before = world.counters(0, "a")?;
    let rx_before = victim.link_counter(CONTAINER_IFACE, "rx_packets")?;

    let script = format!(
        "import socket\n\
         from scapy.all import Ether, IP, ICMP\n\
         from scapy.layers.vxlan import VXLAN\n\
         inner = Ether(src='{}', dst='{}') / IP(src='{ip_bystander}', dst='{ip_victim}') / ICMP()\n\
         payload = bytes(VXLAN(vni={vni_b}, flags=0x08) / inner)\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for _ in range({N}):\n    s.sendto(payload, ('{}', 4789))\n",
        mac_for(ip_bystander),
        mac_for(ip_victim),
        world.hosts[1].addr,
    );
    attacker.exec(&["/usr/bin/python3", "-c", &script])?;
    only_spoofed_source_moved(&world, &before, || {
        let delivered = victim
            .link_counter(CONTAINER_IFACE, "rx_packets")
            .map(|rx| rx - rx_before);
        format!("the victim received {delivered:?} frames")
    })?;
    let delivered = victim.link_counter(CONTAINER_IFACE, "rx_packets")? - rx_before;
    ensure!(
        delivered == 0,
        "the victim on network b received {delivered} frames a container of network a forged"
    );
    world.stop()
}

/// Nor a report about the node's VXLAN: an ICMP "fragmentation needed" a
/// container sends out through its gateway, quoting VXLAN from another
/// node, would teach that node a path MTU no router reported (and its
/// containers' larger packets without DF would be dropped).
#[test]
fn a_path_mtu_report_a_container_forges_is_dropped_as_spoofed() -> Result<()> {
    let lab = Lab::new("spoof-pmtu")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let attacker = attacker_on_host_a(&lab, &world)?;
    let (node_b, host_b) = (TwoHosts::NODES[1], &world.hosts[1]);
    let reports = |v: &Value| v["path_mtu_reports"].as_u64().unwrap_or(0);
    let reports_before = reports(&world.ovl.underlay(&host_b.netns, node_b)?);
    let before = world.counters(0, "a")?;

    let script = format!(
        "from scapy.all import IP, ICMP, UDP, send\n\
         quoted = IP(src='{}', dst='{}', len=1500) / UDP(sport=51000, dport=4789)\n\
         send(IP(dst='{}') / ICMP(type=3, code=4, nexthopmtu=1300) / quoted, count={N}, verbose=False)\n",
        host_b.addr, world.hosts[0].addr, host_b.addr,
    );
    attacker.exec(&["/usr/bin/python3", "-c", &script])?;
    only_spoofed_source_moved(&world, &before, || {
        let learned = world
            .ovl
            .underlay(&host_b.netns, node_b)
            .map(|v| reports(&v) - reports_before);
        format!("host B learned {learned:?} reports")
    })?;
    let learned = reports(&world.ovl.underlay(&host_b.netns, node_b)?) - reports_before;
    ensure!(
        learned == 0,
        "host B learned {learned} path MTU reports a container forged"
    );
    world.stop()
}
