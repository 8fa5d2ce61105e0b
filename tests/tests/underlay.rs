// Scenario: the underlay topologies connect their hosts — routed hosts through
// the router, switched hosts on one segment — with IPv6 kept silent.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};
use ovl_tests::{HOST_IFACE, Lab, UNDERLAY_MTU, ping};

#[test]
fn routed_hosts_reach_each_other_through_router() -> Result<()> {
    let lab = Lab::new("routed")?;
    let (router, hosts) = lab.routed_hosts(3)?;
    for from in &hosts {
        ensure!(from.netns.link_mtu(HOST_IFACE)? == UNDERLAY_MTU);
        for to in hosts.iter().filter(|to| to.addr != from.addr) {
            let result = ping(&from.netns, to.addr, 1, &["-W", "2"])?;
            ensure!(
                result.all_received(),
                "{} -> {}:\n{}",
                from.addr,
                to.addr,
                result.output
            );
        }
    }
    // IPv6 is off, so nothing but the test's own traffic is on the wire.
    let ipv6 = router.exec(&["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"])?;
    ensure!(String::from_utf8_lossy(&ipv6.stdout).trim() == "1");
    Ok(())
}

#[test]
fn l2_hosts_share_one_segment() -> Result<()> {
    let lab = Lab::new("l2")?;
    let (_switch, hosts) = lab.l2_hosts(3)?;
    let addrs: Vec<Ipv4Addr> = hosts.iter().map(|host| host.addr).collect();
    ensure!(
        addrs
            == [
                Ipv4Addr::new(192, 0, 2, 10),
                Ipv4Addr::new(192, 0, 2, 11),
                Ipv4Addr::new(192, 0, 2, 12)
            ]
    );
    let result = ping(&hosts[0].netns, hosts[2].addr, 2, &["-W", "2", "-i", "0.2"])?;
    ensure!(result.all_received(), "{}", result.output);
    Ok(())
}
