//! The underlay changes under a running overlay: host A's router takes a
//! new MAC, announced as a failover announces it (gratuitous ARP, which
//! updates A's neighbour entry). ovl's encapsulation caches the next hop
//! to each VTEP; it follows the change at once while its agent runs (the
//! agent empties the cache on the neighbour notification) and within the
//! cache's one-second lifetime while no agent runs. No packet keeps going
//! to the old MAC for longer.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ovl_tests::{MacAddr, Netns, Pair, TwoHosts, dump_next_hops, ping, wait_until};

/// Host A's router port and its address (see `routed_hosts`).
const ROUTER_PORT: &str = "h0";
const ROUTER_ADDR: &str = "192.0.2.1";
/// Host B's VTEP.
const VTEP_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

/// Gives A's router port `mac` and tells host A, as the router's
/// gratuitous ARP would.
fn move_router(router: &Netns, host_a: &Netns, mac: &str) -> Result<()> {
    router.ip(&["link", "set", ROUTER_PORT, "address", mac])?;
    host_a.ip(&[
        "neigh",
        "replace",
        ROUTER_ADDR,
        "lladdr",
        mac,
        "dev",
        "eth0",
        "nud",
        "reachable",
    ])?;
    Ok(())
}

/// The MAC A's encapsulation sends B's packets to, as text.
fn cached_mac(pins: &std::path::Path) -> Result<Option<String>> {
    Ok(dump_next_hops(pins)?.get(&VTEP_B).map(MacAddr::to_string))
}

#[test]
fn a_new_router_mac_is_followed_at_once_with_the_agent_and_within_a_second_without() -> Result<()> {
    let lab = ovl_tests::Lab::new("nexthop")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].netns.clone();
    let router = world.router.clone();
    let Pair { c1, ip2, .. } = world.connected_pair(&lab, "uber-net")?;
    let pins = world.ovl.pin_dir("host-a");
    let old = router.link_mac(ROUTER_PORT)?;
    // (Resolving the router's address was a neighbour change too, which
    // emptied the cache: a packet after it fills it again.)
    wait_until(Duration::from_secs(2), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received()
            && cached_mac(&pins)?.as_deref() == Some(old.as_str()))
    })
    .with_context(|| format!("A never cached the router's MAC {old}"))?;

    // With the agent: the notification empties the cache before the next
    // packet needs it.
    let second = "02:00:5e:00:01:02";
    move_router(&router, &host_a, second)?;
    wait_until(Duration::from_millis(500), || {
        Ok(!dump_next_hops(&pins)?.contains_key(&VTEP_B))
    })
    .context("the agent did not empty the next-hop cache after the neighbour changed")?;
    let r = ping(&c1, ip2, 1, &["-W", "1"])?;
    ensure!(
        r.all_received(),
        "first ping after the change:\n{}",
        r.output
    );
    let cached = cached_mac(&pins)?;
    ensure!(
        cached.as_deref() == Some(second),
        "A's cache after the change: {cached:?}"
    );

    // Without the agent: the entry expires within a second.
    world.kill_agent(0)?;
    let third = "02:00:5e:00:01:03";
    move_router(&router, &host_a, third)?;
    let moved = Instant::now();
    wait_until(Duration::from_secs(3), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })
    .context("no agent: the old router MAC was still used 3 s after the change")?;
    eprintln!("no agent: reached B {:?} after the change", moved.elapsed());
    let cached = cached_mac(&pins)?;
    ensure!(
        cached.as_deref() == Some(third),
        "A's cache without an agent: {cached:?}"
    );
    world.restart_agent(&lab, 0, &[])?;
    world.stop()
}
