//! Anti-spoofing on container egress: a container can send only with the
//! MAC and IPv4 address ovl gave it. Frames claiming another container's
//! address, a forged MAC or a forged ARP sender are dropped and counted as
//! `spoofed_source`, and nobody receives them; honest traffic flows on.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{CONTAINER_IFACE, Lab, Netns, TwoHosts, mac_for, ping, wait_until};

/// Frames of each forged kind.
const N: u64 = 5;

/// A MAC no container has.
const FORGED_MAC: &str = "02:42:de:ad:be:ef";

#[test]
fn frames_with_another_source_are_dropped_counted_and_reach_nobody() -> Result<()> {
    let lab = Lab::new("src-spoof")?;
    let world = TwoHosts::start(&lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, "tenant", "198.18.0.0/24", &[])?;
    // c1 forges; c2 (host B) is impersonated; c3 (host A) is the target.
    let (c1, ip1) = world.container(&lab, 0, "tenant", "c1")?;
    let (c2, ip2) = world.container(&lab, 1, "tenant", "c2")?;
    let (c3, ip3) = world.container(&lab, 0, "tenant", "c3")?;
    for to in [ip2, ip3] {
        wait_until(Duration::from_secs(10), || {
            Ok(ping(&c1, to, 1, &["-W", "1"])?.all_received())
        })?;
    }
    let before = world.counters(0, "tenant")?;
    let rx = |c: &Netns| c.link_counter(CONTAINER_IFACE, "rx_packets");
    let (rx2, rx3) = (rx(&c2)?, rx(&c3)?);

    let own_mac = mac_for(ip1);
    let target_mac = mac_for(ip3);
    let script = format!(
        "from scapy.all import Ether, IP, ICMP, ARP, sendp\n\
         another_ip = Ether(src='{own_mac}', dst='{target_mac}') / IP(src='{ip2}', dst='{ip3}') / ICMP()\n\
         forged_mac = Ether(src='{FORGED_MAC}', dst='{target_mac}') / IP(src='{ip1}', dst='{ip3}') / ICMP()\n\
         forged_arp = Ether(src='{own_mac}', dst='ff:ff:ff:ff:ff:ff') / ARP(op=1, hwsrc='{own_mac}', psrc='{ip2}', pdst='{ip3}')\n\
         sendp([another_ip, forged_mac, forged_arp], iface='{CONTAINER_IFACE}', count={N}, verbose=False)\n"
    );
    c1.exec(&["/usr/bin/python3", "-c", &script])?;

    let mut after = before.clone();
    wait_until(Duration::from_secs(5), || {
        after = world.counters(0, "tenant")?;
        Ok(after.spoofed_source - before.spoofed_source >= 3 * N)
    })
    .with_context(|| {
        format!(
            "spoofed_source did not reach +{}: {before:?} -> {after:?}",
            3 * N
        )
    })?;
    let mut expected = before.clone();
    expected.spoofed_source += 3 * N;
    ensure!(
        after == expected,
        "more than spoofed_source moved (a forged frame was switched or answered): {before:?} -> {after:?}"
    );
    ensure!(
        rx(&c2)? == rx2 && rx(&c3)? == rx3,
        "a forged frame arrived: c2 rx {rx2} -> {}, c3 rx {rx3} -> {}",
        rx(&c2)?,
        rx(&c3)?
    );
    // The target's neighbour table did not learn the forged sender.
    let neigh = c3.ip(&["neigh", "show"])?;
    let neigh = String::from_utf8_lossy(&neigh.stdout).into_owned();
    ensure!(
        !neigh.contains(&format!("{ip2} dev {CONTAINER_IFACE} lladdr {own_mac}")),
        "c3 learned c2's address at c1's MAC:\n{neigh}"
    );

    // Honest traffic is untouched.
    for (to, name) in [(ip2, "c2"), (ip3, "c3")] {
        let r = ping(&c1, to, 3, &["-i", "0.2", "-W", "1"])?;
        ensure!(r.all_received(), "c1 -> {name} lost packets:\n{}", r.output);
    }
    let last = world.counters(0, "tenant")?;
    ensure!(
        last.spoofed_source == after.spoofed_source,
        "honest traffic counted as spoofed: {after:?} -> {last:?}"
    );
    world.stop()
}
