//! The underlay changes under a running overlay: host A's router takes a
//! new MAC, announced as a failover announces it (gratuitous ARP, which
//! updates A's neighbour entry). ovl's encapsulation caches the next hop
//! to each VTEP; it follows the change at once while its agent runs (the
//! agent empties the cache on the neighbour notification) and within the
//! cache's one-second lifetime while no agent runs. No packet keeps going
//! to the old MAC for longer. A router that changes its MAC without
//! announcing it is found out too: the kernel probes A's entry for it
//! because the agent marks it used.
//!
//! Where forwarding is off (an `--internal` network only) the FIB helper
//! refuses and the kernel routes every encapsulated packet; the agent then
//! resolves the next hop itself and keeps it fresh while it carries
//! traffic (and removes it once it does not), and without the agent the
//! kernel routes again within the cache's lifetime.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ovl_tests::{
    MacAddr, MapNextHop, Netns, Pair, TwoHosts, dump_next_hop_entries, dump_next_hops, ping,
    wait_until,
};

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

/// `ovl_common::maps::next_hop_via` values.
const FIB_RESOLVED: u32 = 1;
const KERNEL_ROUTED: u32 = 2;
const AGENT_RESOLVED: u32 = 3;

/// A's cache entry for B's VTEP.
fn entry(pins: &std::path::Path) -> Result<Option<MapNextHop>> {
    Ok(dump_next_hop_entries(pins)?.get(&VTEP_B).copied())
}

/// Makes host A's neighbour layer check its entries within seconds
/// instead of tens of seconds: reachable for about a second, a second's
/// delay before the unicast probes, probes 300 ms apart.
fn fast_neighbour_checks(host_a: &Netns) -> Result<()> {
    for (key, value) in [
        ("base_reachable_time_ms", "1000"),
        ("delay_first_probe_time", "1"),
        ("retrans_time_ms", "300"),
    ] {
        host_a.sysctl(&format!("net.ipv4.neigh.eth0.{key}"), value)?;
    }
    Ok(())
}

/// The router takes `mac` without a word: no gratuitous ARP, and no ARP
/// request to host A either (it keeps A's MAC as a permanent entry, else
/// its own requests would carry the new MAC to A). A's neighbour entry
/// for the router must be used for the kernel to probe it, and cached
/// next hops (the FIB's or the agent's) send past the neighbour layer:
/// only the agent marking the neighbour used makes it probe (without
/// that this fails, with forwarding on and off). The probe fails, and the
/// router's new MAC is found and used.
fn silent_router_move_is_followed(
    world: &TwoHosts,
    c1: &Netns,
    ip2: Ipv4Addr,
    mac: &str,
    cached: impl Fn() -> Result<Option<MapNextHop>>,
) -> Result<()> {
    let host_a = &world.hosts[0];
    let a_mac = host_a.netns.link_mac(&host_a.iface)?;
    world.router.ip(&[
        "neigh",
        "replace",
        &host_a.addr.to_string(),
        "lladdr",
        &a_mac,
        "dev",
        ROUTER_PORT,
        "nud",
        "permanent",
    ])?;
    world
        .router
        .ip(&["link", "set", ROUTER_PORT, "address", mac])?;
    let moved = Instant::now();
    wait_until(Duration::from_secs(10), || {
        Ok(ping(c1, ip2, 1, &["-W", "1"])?.all_received()
            && cached()?.is_some_and(|h| h.mac.to_string() == mac))
    })
    .with_context(|| {
        format!(
            "the router's unannounced MAC {mac} was not followed in 10 s: {:?}",
            cached()
        )
    })?;
    eprintln!(
        "unannounced router MAC followed after {:?}",
        moved.elapsed()
    );
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
    fast_neighbour_checks(&host_a)?;
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

    // Forwarding is on here: the entry is the FIB's answer.
    silent_router_move_is_followed(&world, &c1, ip2, "02:00:5e:00:01:04", || {
        Ok(entry(&pins)?.filter(|h| h.via == FIB_RESOLVED))
    })?;

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

#[test]
fn without_forwarding_the_agent_resolves_the_next_hop_and_without_the_agent_the_kernel_routes()
-> Result<()> {
    let lab = ovl_tests::Lab::new("nexthop-int")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].netns.clone();
    let router = world.router.clone();
    fast_neighbour_checks(&host_a)?;
    // Only an --internal network: the agent leaves forwarding off, so the
    // FIB helper refuses on A's underlay.
    world
        .ovl
        .create_network(&host_a, "int-net", "198.18.0.0/24", &["--internal"])?;
    let (c1, _) = world.container(&lab, 0, "int-net", "c1")?;
    let (_c2, ip2) = world.container(&lab, 1, "int-net", "c2")?;
    let forwarding = host_a.exec(&["cat", "/proc/sys/net/ipv4/conf/eth0/forwarding"])?;
    ensure!(
        String::from_utf8_lossy(&forwarding.stdout).trim() == "0",
        "forwarding is on in host A: the test needs it off"
    );
    let pins = world.ovl.pin_dir("host-a");
    let old = router.link_mac(ROUTER_PORT)?;
    let resolved = |mac: &str| -> Result<Option<MapNextHop>> {
        Ok(entry(&pins)?.filter(|h| h.via == AGENT_RESOLVED && h.mac.to_string() == mac))
    };
    wait_until(Duration::from_secs(5), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received() && resolved(&old)?.is_some())
    })
    .with_context(|| {
        format!(
            "the agent never resolved B's next hop to the router {old}: {:?}",
            entry(&pins)
        )
    })?;

    // Kept fresh while the agent runs: two seconds on (twice the cache's
    // lifetime) it is still the agent's entry, written again meanwhile.
    let first = resolved(&old)?.context("gone")?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        ping(&c1, ip2, 1, &["-W", "1"])?.all_received(),
        "ping after 2 s"
    );
    let later = resolved(&old)?.with_context(|| format!("not the agent's: {:?}", entry(&pins)))?;
    ensure!(
        later.learned_ns >= first.learned_ns + 1_000_000_000,
        "not rewritten: {first:?} then {later:?}"
    );

    silent_router_move_is_followed(&world, &c1, ip2, "02:00:5e:00:01:04", || {
        Ok(entry(&pins)?.filter(|h| h.via == AGENT_RESOLVED))
    })?;

    // An announced new router MAC: forgotten at once, resolved again.
    let second = "02:00:5e:00:01:02";
    move_router(&router, &host_a, second)?;
    wait_until(Duration::from_secs(2), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received() && resolved(second)?.is_some())
    })
    .with_context(|| format!("after the router moved: {:?}", entry(&pins)))?;

    // Steady traffic across the end of the entry's lease (10 s from the
    // upgrade just above): the agent lets it expire once, the program
    // marks it kernel-routed again at the next packet, and the agent
    // takes it over with a new lease; not a packet is lost.
    let steady = ping(&c1, ip2, 280, &["-i", "0.05", "-W", "1"])?;
    ensure!(
        steady.all_received(),
        "packets lost across the end of a lease: {steady:?}"
    );
    ensure!(
        resolved(second)?.is_some(),
        "not the agent's after 14 s of traffic: {:?}",
        entry(&pins)
    );

    // Traffic stops: the agent keeps the entry for the rest of its lease,
    // then lets it expire and removes it: an idle VTEP's next hop (and
    // its neighbour) is not kept alive.
    let idle = Instant::now();
    wait_until(Duration::from_secs(14), || Ok(entry(&pins)?.is_none())).with_context(|| {
        format!(
            "an idle VTEP's next hop is still kept 14 s on: {:?}",
            entry(&pins)
        )
    })?;
    eprintln!("idle next hop removed after {:?}", idle.elapsed());
    ensure!(
        ping(&c1, ip2, 1, &["-W", "1"])?.all_received(),
        "ping after the idle next hop was removed"
    );

    // Without the agent nobody rewrites the entry: within about a second
    // the program asks again and the kernel routes (all-zero MAC), and
    // packets keep crossing, to the router's new MAC too.
    world.kill_agent(0)?;
    let killed = Instant::now();
    wait_until(Duration::from_secs(3), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received()
            && entry(&pins)?.is_some_and(|h| h.via == KERNEL_ROUTED && h.mac == MacAddr([0; 6])))
    })
    .with_context(|| format!("no agent: still {:?} 3 s on", entry(&pins)))?;
    eprintln!(
        "no agent: kernel-routed {:?} after the kill",
        killed.elapsed()
    );
    let third = "02:00:5e:00:01:03";
    move_router(&router, &host_a, third)?;
    ensure!(
        ping(&c1, ip2, 1, &["-W", "1"])?.all_received(),
        "no agent: the kernel's routing did not follow the router's new MAC"
    );

    // A new agent takes over the resolving.
    world.restart_agent(&lab, 0, &[])?;
    wait_until(Duration::from_secs(5), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received() && resolved(third)?.is_some())
    })
    .with_context(|| format!("the new agent did not resolve: {:?}", entry(&pins)))?;
    world.stop()
}
