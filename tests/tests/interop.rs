//! ovl speaks plain RFC 7348 VXLAN: a host running ovl and a host running
//! Docker's data path (bridge + kernel vxlan) share one overlay network.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Result, ensure};
use ovl_tests::{Lab, Ovl, RefOverlayNode, mac_for, ping, wait_until};

/// The VNI both sides are configured with by hand.
const VNI: u32 = 4242;

/// The kernel-vxlan container on host B; ovl's IPAM starts low in the
/// subnet, so this address is never handed out on host A.
const REF_CONTAINER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 50);

/// Echo requests per direction.
const PINGS: u64 = 5;

#[test]
fn ovl_host_and_kernel_vxlan_host_ping_both_ways() -> Result<()> {
    let lab = Lab::new("interop")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(2)?;
    let (host_a, host_b) = (&hosts[0], &hosts[1]);

    let agent = ovl.attach(&lab, host_a, "host-a", "auto")?;
    ovl.create_network(
        &host_a.netns,
        "mixed",
        "198.18.0.0/24",
        &["--vni", &VNI.to_string()],
    )?;
    let c1 = lab.container("c1")?;
    let ip1 = ovl.connect(host_a, "host-a", "mixed", &c1, &[])?;

    let mut reference = RefOverlayNode::install(host_b, VNI)?;
    let c2 = reference.add_container(&lab, REF_CONTAINER, 24)?;
    // Each side learns of the other through its own control plane: ovl's
    // store for host A, static FDB and neighbour entries for host B.
    ovl.run(
        &host_a.netns,
        "host-a",
        &[
            "endpoint",
            "add",
            "mixed",
            &REF_CONTAINER.to_string(),
            "--vtep",
            &host_b.addr.to_string(),
        ],
    )?;
    reference.add_remote(ip1, mac_for(ip1), host_a.addr)?;

    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, REF_CONTAINER, 1, &["-W", "1"])?.all_received())
    })?;
    let before = ovl.counters(&host_a.netns, "host-a", "mixed")?;
    let there = ping(&c1, REF_CONTAINER, PINGS as u32, &["-i", "0.2", "-W", "2"])?;
    ensure!(
        there.all_received(),
        "ovl -> kernel vxlan lost packets:\n{}",
        there.output
    );
    let back = ping(&c2, ip1, PINGS as u32, &["-i", "0.2", "-W", "2"])?;
    ensure!(
        back.all_received(),
        "kernel vxlan -> ovl lost packets:\n{}",
        back.output
    );
    let after = ovl.counters(&host_a.netns, "host-a", "mixed")?;

    // Host A's half of both directions went through ovl: its requests and
    // replies were encapsulated, the peer's decapsulated. Host B's ARP for
    // c1 is answered by its own proxy, so no ARP crosses the tunnel; c1 may
    // revalidate its neighbour entry, which ovl answers locally.
    let tx = after.tx_packets - before.tx_packets;
    let rx = after.rx_packets - before.rx_packets;
    ensure!(
        tx == 2 * PINGS && rx == 2 * PINGS,
        "host A encapsulated {tx} and decapsulated {rx} frames, expected {} each \
         ({before:?} -> {after:?})",
        2 * PINGS
    );
    ensure!(
        after.drops() == before.drops(),
        "drops on host A: {before:?} -> {after:?}"
    );
    agent.stop()
}
