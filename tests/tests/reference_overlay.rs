// Scenario: Docker's own overlay data path (bridge + kernel vxlan) carries
// container traffic between two hosts in different subnets.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};
use ovl_tests::{CONTAINER_IFACE, Lab, OVERLAY_MTU, REF_VXLAN, RefOverlayNode, mac_for, ping};

/// The VNI both hosts use.
const VNI: u32 = 4096;

/// Container A on host 0 and container B on host 1, one overlay /24.
const CONTAINER_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CONTAINER_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const OVERLAY_PREFIX_LEN: u8 = 24;

/// Requests per direction; every one must be answered.
const PINGS: u32 = 3;

#[test]
fn reference_overlay_pings_across_router() -> Result<()> {
    let lab = Lab::new("refov")?;
    let (_router, hosts) = lab.routed_hosts(2)?;
    let (host_a, host_b) = (&hosts[0], &hosts[1]);

    let mut node_a = RefOverlayNode::install(host_a, VNI)?;
    let mut node_b = RefOverlayNode::install(host_b, VNI)?;
    let container_a = node_a.add_container(&lab, CONTAINER_A, OVERLAY_PREFIX_LEN)?;
    let container_b = node_b.add_container(&lab, CONTAINER_B, OVERLAY_PREFIX_LEN)?;
    node_a.add_remote(CONTAINER_B, mac_for(CONTAINER_B), host_b.addr)?;
    node_b.add_remote(CONTAINER_A, mac_for(CONTAINER_A), host_a.addr)?;

    // Docker's MTU: the underlay's 1500 minus 50 bytes of VXLAN headers.
    for container in [&container_a, &container_b] {
        ensure!(container.link_mtu(CONTAINER_IFACE)? == OVERLAY_MTU);
    }

    let flags = ["-W", "2", "-i", "0.2"];
    let a_to_b = ping(&container_a, CONTAINER_B, PINGS, &flags)?;
    ensure!(
        a_to_b.all_received(),
        "A -> B lost packets:\n{}",
        a_to_b.output
    );
    let b_to_a = ping(&container_b, CONTAINER_A, PINGS, &flags)?;
    ensure!(
        b_to_a.all_received(),
        "B -> A lost packets:\n{}",
        b_to_a.output
    );

    // The replies really crossed the tunnel: each vxlan device sent at least
    // its own container's requests and replies.
    for (host, name) in [(host_a, "A"), (host_b, "B")] {
        let sent = host.netns.link_counter(REF_VXLAN, "tx_packets")?;
        ensure!(
            sent >= 2 * u64::from(PINGS),
            "{REF_VXLAN} on host {name} sent only {sent} packets"
        );
    }
    Ok(())
}
