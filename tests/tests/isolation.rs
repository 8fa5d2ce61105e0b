//! Networks are isolated by VNI, not by address: two networks may use the
//! same subnet, even the same addresses, and never see each other's traffic.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Result, ensure};
use ovl_tests::{Lab, Netns, TwoHosts, mac_for, ping, wait_until};

/// The subnet both networks use.
const SUBNET: &str = "198.18.0.0/24";

/// An address that exists on "blue" only.
const BLUE_ONLY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);

/// Echo requests per probe.
const PINGS: u64 = 5;

/// Blue and red on both hosts with one container each per host.
struct TwinNetworks {
    world: TwoHosts,
    blue_a: (Netns, Ipv4Addr),
    blue_b: (Netns, Ipv4Addr),
    red_a: (Netns, Ipv4Addr),
    red_b: (Netns, Ipv4Addr),
}

impl TwinNetworks {
    fn start(lab: &Lab) -> Result<TwinNetworks> {
        let world = TwoHosts::start(lab, "auto")?;
        for network in ["blue", "red"] {
            world
                .ovl
                .create_network(&world.hosts[0].netns, network, SUBNET, &[])?;
        }
        let blue_a = world.container(lab, 0, "blue", "c1")?;
        let blue_b = world.container(lab, 1, "blue", "c2")?;
        let red_a = world.container(lab, 0, "red", "r1")?;
        let red_b = world.container(lab, 1, "red", "r2")?;
        // The point of the scenario: each red container has the address of
        // a blue one.
        ensure!(
            blue_a.1 == red_a.1 && blue_b.1 == red_b.1,
            "addresses differ: blue {} {}, red {} {}",
            blue_a.1,
            blue_b.1,
            red_a.1,
            red_b.1
        );
        for (from, to) in [(&blue_a, &blue_b), (&red_a, &red_b)] {
            wait_until(Duration::from_secs(10), || {
                Ok(ping(&from.0, to.1, 1, &["-W", "1"])?.all_received())
            })?;
        }
        Ok(TwinNetworks {
            world,
            blue_a,
            blue_b,
            red_a,
            red_b,
        })
    }
}

#[test]
fn same_subnet_on_two_networks_stays_isolated() -> Result<()> {
    let lab = Lab::new("iso-same")?;
    let twins = TwinNetworks::start(&lab)?;
    let world = &twins.world;

    // The same destination address reaches a different container on each
    // network, and only on the sender's network do counters move.
    for (sender, receiver, network, other) in [
        (&twins.blue_a, &twins.blue_b, "blue", "red"),
        (&twins.red_a, &twins.red_b, "red", "blue"),
    ] {
        let own_b = world.counters(1, network)?;
        let other_a = world.counters(0, other)?;
        let other_b = world.counters(1, other)?;
        let rx_in = receiver.0.link_counter("eth0", "rx_packets")?;
        let r = ping(
            &sender.0,
            receiver.1,
            PINGS as u32,
            &["-i", "0.05", "-W", "2"],
        )?;
        ensure!(r.all_received(), "{network} lost packets:\n{}", r.output);
        let delivered = world.counters(1, network)?.rx_packets - own_b.rx_packets;
        ensure!(
            delivered == PINGS,
            "{network} on host B delivered {delivered} frames, expected {PINGS}"
        );
        ensure!(
            receiver.0.link_counter("eth0", "rx_packets")? - rx_in >= PINGS,
            "the {network} container on host B did not receive the requests"
        );
        ensure!(
            world.counters(0, other)? == other_a && world.counters(1, other)? == other_b,
            "{other} counters moved while only {network} carried traffic"
        );
    }
    twins.world.stop()
}

#[test]
fn address_of_another_network_is_unreachable_and_counted_no_endpoint() -> Result<()> {
    let lab = Lab::new("iso-cross")?;
    let twins = TwinNetworks::start(&lab)?;
    let world = &twins.world;
    let blue_only = lab.container("c3")?;
    let ip = world.ovl.connect(
        &world.hosts[1],
        TwoHosts::NODES[1],
        "blue",
        &blue_only,
        &["--ip", &BLUE_ONLY.to_string()],
    )?;
    ensure!(ip == BLUE_ONLY, "asked for {BLUE_ONLY}, got {ip}");
    // Blue reaches it, so it is programmed on both hosts.
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&twins.blue_a.0, BLUE_ONLY, 1, &["-W", "1"])?.all_received())
    })?;

    let (red, _) = &twins.red_a;
    let red_a0 = world.counters(0, "red")?;
    let blue_b0 = world.counters(1, "blue")?;
    let target_rx0 = blue_only.link_counter("eth0", "rx_packets")?;

    // Nobody answers red's ARP for an address red does not have.
    let r = ping(red, BLUE_ONLY, 1, &["-W", "1"])?;
    ensure!(r.received == 0, "red reached blue's address:\n{}", r.output);
    // The kernel goes on asking after ping gives up; once it declares the
    // neighbour failed, red has seen every ARP request it will send.
    wait_until(Duration::from_secs(10), || {
        let out = red.ip(&["neigh", "show", &BLUE_ONLY.to_string(), "dev", "eth0"])?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("FAILED"))
    })?;
    let red_a1 = world.counters(0, "red")?;
    ensure!(
        red_a1.no_endpoint > red_a0.no_endpoint && red_a1.arp_replies == red_a0.arp_replies,
        "red's ARP for {BLUE_ONLY} was not refused as no_endpoint: {red_a0:?} -> {red_a1:?}"
    );

    // Even a sender that knows the MAC cannot cross: every IPv4 frame is
    // dropped on red, on the sending host, before any encapsulation.
    red.ip(&[
        "neigh",
        "replace",
        &BLUE_ONLY.to_string(),
        "lladdr",
        &mac_for(BLUE_ONLY).to_string(),
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    let r = ping(red, BLUE_ONLY, PINGS as u32, &["-i", "0.05", "-W", "1"])?;
    ensure!(r.received == 0, "red reached blue's address:\n{}", r.output);
    let red_a2 = world.counters(0, "red")?;
    ensure!(
        red_a2.no_endpoint - red_a1.no_endpoint == PINGS && red_a2.tx_packets == red_a0.tx_packets,
        "expected {PINGS} no_endpoint drops and no encapsulation on red: {red_a1:?} -> {red_a2:?}"
    );
    let blue_b1 = world.counters(1, "blue")?;
    ensure!(
        blue_b1.rx_packets == blue_b0.rx_packets,
        "blue on host B received {} frames from red",
        blue_b1.rx_packets - blue_b0.rx_packets
    );
    ensure!(
        blue_only.link_counter("eth0", "rx_packets")? == target_rx0,
        "{BLUE_ONLY} on blue received frames from red"
    );
    twins.world.stop()
}
