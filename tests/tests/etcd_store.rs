//! ovl over a real etcd: three routed hosts share one store on the router.
//! Networks made on one host serve containers on the others, racing
//! connects get distinct addresses (and one holder of a name or a MAC), a
//! dead node's endpoints leave every map and the store, a node returning
//! to an address (or a MAC) taken meanwhile reports the conflict and
//! leaves the newer owner alone, an etcd outage costs no
//! packet, commands ride out a leader killed or cut off (each write made
//! once), a disconnected endpoint is gone everywhere, and a bad store URL
//! leaves nothing attached.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ovl_tests::{
    AGENT_METRICS, CONTAINER_IFACE, Cluster, ETCD_PEER_PORT, EtcdCluster, HOST_IFACE, Host, Lab,
    Netns, Ovl, PingResult, ThreeHosts, hooked_programs, mac_for, ping, wait_until,
};
use serde_json::Value;

/// Liveness lease of every agent, in seconds: short, so node failure is
/// noticed within seconds.
const LEASE_TTL: u64 = 3;

/// The agent's liveness lease when not set (`--lease-ttl`), in seconds.
const DEFAULT_LEASE_TTL: u64 = 10;

/// The network every scenario uses.
const NETWORK: &str = "uber-net";

/// Its subnet: a /24 of the benchmarking range (RFC 2544).
const SUBNET: &str = "198.18.0.0/24";

/// How long a store change may take to reach every agent's maps.
const PROPAGATION: Duration = Duration::from_secs(10);

/// Host indexes in [`ThreeHosts`].
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Where a node's endpoint map sends frames for an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// Into a container veth on the node itself.
    Local,
    /// Encapsulated to this VTEP.
    Vtep(Ipv4Addr),
}

/// The endpoints of network `vni` in host `i`'s map (bpftool dump of its
/// pinned OVL_ENDPOINTS).
fn map_of(world: &Cluster, i: usize, vni: u32) -> Result<BTreeMap<Ipv4Addr, Via>> {
    Ok(world
        .ovl
        .endpoint_map(ThreeHosts::NODES[i])?
        .into_values()
        .filter(|e| e.vni == vni)
        .map(|e| {
            let via = if e.is_local() {
                Via::Local
            } else {
                Via::Vtep(e.vtep)
            };
            (e.addr, via)
        })
        .collect())
}

/// Where host `i` must send frames for an endpoint on host `owner`.
fn via(world: &Cluster, i: usize, owner: usize) -> Via {
    if i == owner {
        Via::Local
    } else {
        Via::Vtep(world.hosts[owner].addr)
    }
}

/// Waits until every host that has one of `endpoints` (address, owning
/// host) holds exactly them for network `vni`, each pointing the right way,
/// and every other host holds nothing of the network (a node programs
/// only the networks it has endpoints of).
fn wait_for_maps(world: &Cluster, vni: u32, endpoints: &[(Ipv4Addr, usize)]) -> Result<()> {
    let mut last = BTreeMap::new();
    wait_until(PROPAGATION, || {
        for i in 0..world.hosts.len() {
            let member = endpoints.iter().any(|&(_, owner)| owner == i);
            let want: BTreeMap<Ipv4Addr, Via> = endpoints
                .iter()
                .filter(|_| member)
                .map(|&(ip, owner)| (ip, via(world, i, owner)))
                .collect();
            let have = map_of(world, i, vni)?;
            if have != want {
                last.insert(i, have);
                return Ok(false);
            }
        }
        Ok(true)
    })
    .with_context(|| format!("maps never matched {endpoints:?}; last seen {last:?}"))
}

/// The network's VNI, as `ovl network inspect` on host `i` reports it.
/// Three hosts on etcd with agents, and the network created from host A.
/// Cuts host C off from etcd (reached through host A's gateway, which it
/// returns) past its lease, until the others see C dead and its endpoint
/// at `ip_c` freed.
fn cut_off_until_freed(world: &ThreeHosts, ip_c: Ipv4Addr) -> Result<Ipv4Addr> {
    let etcd_addr = world.hosts[A]
        .gateway
        .context("routed hosts have a gateway")?;
    let c = ThreeHosts::NODES[C];
    cut_off_from_etcd(world, C, etcd_addr, true)?;
    wait_until(Duration::from_secs(LEASE_TTL + 10), || {
        let listed = listed_endpoints(&world.inspect(A, NETWORK)?)?;
        Ok(node_is(world, A, c, "no")? && !listed.contains_key(&ip_c))
    })
    .context("C's endpoint was never freed while C was cut off")?;
    Ok(etcd_addr)
}

/// What [`given_away_while_cut_off`] made.
struct Away {
    /// A container on A, reaching the others.
    ca: Netns,
    /// C's container and its address (freed while C was cut off).
    cc: Netns,
    ip_c: Ipv4Addr,
    /// B's container, given what C's had.
    cb: Netns,
    ip_b: Ipv4Addr,
    /// Where C reaches etcd once its cut heals.
    etcd_addr: Ipv4Addr,
}

/// Containers on A and on C (connected with `c_args`); C cut off past its
/// lease until its endpoint is freed; then a container on B connected
/// with `b_args` (at another address: C's is held back).
fn given_away_while_cut_off(
    lab: &Lab,
    world: &ThreeHosts,
    c_args: &[&str],
    b_args: &[&str],
) -> Result<Away> {
    let (ca, ip_a) = world.container(lab, A, NETWORK, "ca")?;
    let cc = lab.container("cc")?;
    let ip_c = world
        .ovl
        .connect(&world.hosts[C], ThreeHosts::NODES[C], NETWORK, &cc, c_args)?;
    let vni = vni_of(world, A)?;
    wait_for_maps(world, vni, &[(ip_a, A), (ip_c, C)])?;
    let etcd_addr = cut_off_until_freed(world, ip_c)?;
    let cb = lab.container("cb")?;
    let ip_b = world
        .ovl
        .connect(&world.hosts[B], ThreeHosts::NODES[B], NETWORK, &cb, b_args)?;
    ensure!(ip_b != ip_c, "C's held-back {ip_c} was handed out");
    Ok(Away {
        ca,
        cc,
        ip_c,
        cb,
        ip_b,
        etcd_addr,
    })
}

/// Reconnects host C to etcd (at `etcd_addr`) and waits until the others
/// see it alive again with the conflicts it found; returns them.
fn heal_until_conflict(
    world: &ThreeHosts,
    etcd_addr: Ipv4Addr,
) -> Result<Vec<(String, Ipv4Addr, String)>> {
    let c = ThreeHosts::NODES[C];
    cut_off_from_etcd(world, C, etcd_addr, false)?;
    let mut seen = Vec::new();
    wait_until(Duration::from_secs(LEASE_TTL + 15), || {
        seen = conflicts_of(world, A, c)?;
        Ok(node_is(world, A, c, "yes")? && !seen.is_empty())
    })
    .with_context(|| format!("C came back without reporting a conflict; node ls: {seen:?}"))?;
    Ok(seen)
}

fn cluster_with_network(lab: &Lab) -> Result<ThreeHosts> {
    let world = ThreeHosts::start(lab, LEASE_TTL)?;
    world
        .ovl
        .create_network(&world.hosts[A].netns, NETWORK, SUBNET, &[])?;
    Ok(world)
}

fn vni_of(world: &Cluster, i: usize) -> Result<u32> {
    let vni = world.inspect(i, NETWORK)?["vni"]
        .as_u64()
        .context("inspect has no vni")?;
    Ok(u32::try_from(vni)?)
}

/// The endpoints `ovl network inspect` lists: address → (node, netns).
fn listed_endpoints(inspect: &Value) -> Result<BTreeMap<Ipv4Addr, (String, String)>> {
    let endpoints = inspect["endpoints"]
        .as_array()
        .with_context(|| format!("no endpoints array in {inspect}"))?;
    let mut listed = BTreeMap::new();
    for e in endpoints {
        let ip: Ipv4Addr = e["ip"]
            .as_str()
            .with_context(|| format!("no ip in {e}"))?
            .parse()?;
        let node = e["location"]["node"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let netns = e["location"]["netns"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        ensure!(
            listed.insert(ip, (node, netns)).is_none(),
            "{ip} listed twice in {inspect}"
        );
    }
    Ok(listed)
}

/// Waits until `from` gets an answer from `to`, then sends `count` more
/// echo requests that must all be answered.
fn expect_reachable(from: &Netns, to: Ipv4Addr, count: u32) -> Result<()> {
    wait_until(PROPAGATION, || {
        Ok(ping(from, to, 1, &["-W", "1"])?.all_received())
    })
    .with_context(|| format!("{from} never reached {to}"))?;
    let r = ping(from, to, count, &["-i", "0.1", "-W", "2"])?;
    ensure!(
        r.all_received(),
        "{from} -> {to} lost packets:\n{}",
        r.output
    );
    Ok(())
}

#[test]
fn network_created_on_host_a_carries_traffic_between_containers_on_b_and_c() -> Result<()> {
    let lab = Lab::new("etcd-3h")?;
    let world = cluster_with_network(&lab)?;
    let (cb, ip_b) = world.container(&lab, B, NETWORK, "cb")?;
    let (cc, ip_c) = world.container(&lab, C, NETWORK, "cc")?;

    // Every agent, A's too, learned both endpoints from etcd.
    let vni = vni_of(&world, A)?;
    wait_for_maps(&world, vni, &[(ip_b, B), (ip_c, C)])?;
    expect_reachable(&cb, ip_c, 5)?;
    expect_reachable(&cc, ip_b, 5)?;
    world.stop()
}

/// `ovl connect --mac` on etcd: the MAC another container of the network
/// was connected with, on another host, is refused naming the holder,
/// and the second container is not connected.
#[test]
fn a_mac_one_container_has_is_refused_to_another_on_etcd() -> Result<()> {
    let lab = Lab::new("etcd-mac")?;
    let world = cluster_with_network(&lab)?;
    let mac = "0a:00:5e:00:00:07";
    let cb = lab.container("cb")?;
    world.ovl.connect(
        &world.hosts[B],
        ThreeHosts::NODES[B],
        NETWORK,
        &cb,
        &["--mac", mac],
    )?;
    let cc = lab.container("cc")?;
    let err = world.refused(C, &["connect", NETWORK, cc.name(), "--mac", mac])?;
    ensure!(
        err.contains(&format!("{mac} is already used on network")) && err.contains(cb.name()),
        "{err}"
    );
    let eps = world.inspect(A, NETWORK)?["endpoints"].clone();
    ensure!(
        eps.as_array().map(Vec::len) == Some(1) && eps[0]["mac"] == mac,
        "{eps}"
    );
    world.stop()
}

/// The endpoints `ovl network inspect` on host `i` lists with `mac`, as
/// (address, netns).
fn holders_of_mac(world: &ThreeHosts, i: usize, mac: &str) -> Result<Vec<(Ipv4Addr, String)>> {
    let net = world.inspect(i, NETWORK)?;
    net["endpoints"]
        .as_array()
        .with_context(|| format!("no endpoints array in {net}"))?
        .iter()
        .filter(|e| e["mac"] == mac)
        .map(|e| {
            Ok((
                e["ip"].as_str().context("ip")?.parse()?,
                e["location"]["netns"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ))
        })
        .collect()
}

/// Runs every racer's `ovl connect NETWORK <its namespace> <its args>` on
/// its host at once and checks that exactly one won and every other was
/// refused saying `refusal` (and naming the winner, with `names_winner`);
/// returns the winner's namespace name.
fn exactly_one_connects(
    world: &ThreeHosts,
    racers: &[(usize, Netns, Vec<String>)],
    refusal: &str,
    names_winner: bool,
) -> Result<String> {
    let outcomes: Vec<(String, Result<String>)> = thread::scope(|s| {
        let handles: Vec<_> = racers
            .iter()
            .map(|(host, c, extra)| {
                s.spawn(move || {
                    let mut args = vec!["connect", NETWORK, c.name()];
                    args.extend(extra.iter().map(String::as_str));
                    (c.name().to_owned(), world.run(*host, &args))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a connect thread panicked"))
            .collect()
    });
    let winners: Vec<&String> = outcomes
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(n, _)| n)
        .collect();
    ensure!(
        winners.len() == 1,
        "{} of {} racers won: {outcomes:#?}",
        winners.len(),
        outcomes.len()
    );
    for (netns, r) in &outcomes {
        if let Err(e) = r {
            let e = format!("{e:#}");
            ensure!(
                e.contains(refusal) && (!names_winner || e.contains(winners[0].as_str())),
                "{netns} failed for another reason than {refusal:?}: {e}"
            );
        }
    }
    Ok(winners[0].clone())
}

/// Rounds of the MAC race, and the `ovl connect`s of each round (two per
/// host), each at an address of its own and all giving one MAC.
const MAC_ROUNDS: usize = 4;
const MAC_RACERS_PER_HOST: usize = 2;

/// A MAC is one endpoint's through its claim, whatever the moment: of
/// `ovl connect --mac` run at once on three hosts with one MAC (each at
/// another address), round after round, exactly one gets it, the others
/// are refused naming the MAC and leave nothing behind.
#[test]
fn racing_connects_giving_one_mac_on_three_hosts_leave_exactly_one_holder() -> Result<()> {
    let lab = Lab::new("etcd-mac-race")?;
    let world = cluster_with_network(&lab)?;
    for round in 0..MAC_ROUNDS {
        let mac = format!("0a:00:5e:00:01:{round:02x}");
        let mut racers: Vec<(usize, Netns, Vec<String>)> = Vec::new();
        for host in [A, B, C] {
            for k in 0..MAC_RACERS_PER_HOST {
                let ip = format!("198.18.0.{}", 10 + 10 * round + 3 * k + host);
                let args = vec!["--ip".into(), ip, "--mac".into(), mac.clone()];
                racers.push((host, lab.container(&format!("m{round}-{host}-{k}"))?, args));
            }
        }
        let winner = exactly_one_connects(
            &world,
            &racers,
            &format!("MAC {mac} is already used on network"),
            true,
        )
        .with_context(|| format!("round {round}, {mac}"))?;
        let holders = holders_of_mac(&world, A, &mac)?;
        ensure!(
            holders.len() == 1 && holders[0].1 == winner,
            "round {round}: {mac} should be {winner}'s alone: {holders:?}"
        );
    }
    // The losers left nothing: one endpoint per round.
    let listed = listed_endpoints(&world.inspect(B, NETWORK)?)?;
    ensure!(listed.len() == MAC_ROUNDS, "{listed:?}");
    world.stop()
}

/// Containers per host that connect at the same moment.
const RACERS_PER_HOST: usize = 20;

#[test]
fn sixty_concurrent_connects_on_three_hosts_get_distinct_reachable_addresses() -> Result<()> {
    let lab = Lab::new("etcd-race")?;
    let world = cluster_with_network(&lab)?;
    let (probe, probe_ip) = world.container(&lab, A, NETWORK, "probe")?;

    let mut racers: Vec<(usize, Netns)> = Vec::new();
    for host in [A, B, C] {
        for k in 0..RACERS_PER_HOST {
            racers.push((host, lab.container(&format!("r{host}-{k}"))?));
        }
    }
    // All 60 `ovl connect` processes start at once, each in its host's
    // namespace as that host's node, and race for addresses in etcd.
    let started = Instant::now();
    let outcomes: Vec<(String, Result<String>, Duration)> = thread::scope(|s| {
        let handles: Vec<_> = racers
            .iter()
            .map(|(host, c)| {
                let world = &world;
                s.spawn(move || {
                    let t0 = Instant::now();
                    let r = world.run(*host, &["connect", NETWORK, c.name()]);
                    (c.name().to_owned(), r, t0.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a connect thread panicked"))
            .collect()
    });
    let wall = started.elapsed();
    let slowest = outcomes.iter().map(|o| o.2).max().unwrap_or_default();
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|(name, r, _)| r.as_ref().err().map(|e| format!("{name}: {e:#}")))
        .collect();
    ensure!(
        failures.is_empty(),
        "{} of {} concurrent connects failed:\n{}",
        failures.len(),
        outcomes.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} concurrent connects done in {wall:?} (slowest {slowest:?})",
        outcomes.len()
    );

    // One endpoint per container, each on its own address, on the node
    // that connected it; the address is the one its interface carries.
    let listed = listed_endpoints(&world.inspect(A, NETWORK)?)?;
    ensure!(
        listed.len() == racers.len() + 1,
        "inspect lists {} endpoints for {} containers: {listed:?}",
        listed.len(),
        racers.len() + 1
    );
    let by_netns: BTreeMap<&str, (Ipv4Addr, &str)> = listed
        .iter()
        .map(|(ip, (node, netns))| (netns.as_str(), (*ip, node.as_str())))
        .collect();
    let mut addresses = Vec::new();
    for (host, c) in &racers {
        let &(ip, node) = by_netns
            .get(c.name())
            .with_context(|| format!("{c} is not listed: {listed:?}"))?;
        ensure!(
            node == ThreeHosts::NODES[*host],
            "{c} listed on {node}, connected on {}",
            ThreeHosts::NODES[*host]
        );
        let shown = c.exec(&["ip", "-4", "-o", "addr", "show", "dev", CONTAINER_IFACE])?;
        let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
        ensure!(
            shown.contains(&format!(" {ip}/24 ")),
            "{c} should carry {ip}/24:\n{shown}"
        );
        addresses.push((ip, *host));
    }
    let distinct: BTreeSet<Ipv4Addr> = addresses.iter().map(|a| a.0).collect();
    ensure!(
        distinct.len() == racers.len() && !distinct.contains(&probe_ip),
        "duplicate addresses among {addresses:?} (probe {probe_ip})"
    );

    let vni = vni_of(&world, A)?;
    let mut everyone = addresses.clone();
    everyone.push((probe_ip, A));
    wait_for_maps(&world, vni, &everyone)?;

    // One echo request per address, from the probe on host A, 20 at a time.
    let mut silent = Vec::new();
    for batch in addresses.chunks(RACERS_PER_HOST) {
        let results: Vec<(Ipv4Addr, Result<PingResult>)> = thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&(ip, _)| {
                    let probe = &probe;
                    s.spawn(move || (ip, ping(probe, ip, 1, &["-W", "2"])))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a ping thread panicked"))
                .collect()
        });
        for (ip, r) in results {
            match r {
                Ok(r) if r.all_received() => {}
                Ok(r) => silent.push(format!("{ip}: {}", r.output)),
                Err(e) => silent.push(format!("{ip}: {e:#}")),
            }
        }
    }
    ensure!(
        silent.is_empty(),
        "{} of {} addresses did not answer:\n{}",
        silent.len(),
        addresses.len(),
        silent.join("\n")
    );
    world.stop()
}

/// Names are unique through their claims, not by making every change of
/// a network collide: of twelve `connect`s on three hosts racing for one
/// name (in different cases), exactly one gets it, the others are refused
/// naming it and leave nothing behind; the name is free again once its
/// holder disconnects.
#[test]
fn racing_connects_for_one_name_on_three_hosts_leave_exactly_one_holder() -> Result<()> {
    const PER_HOST: usize = 4;
    let lab = Lab::new("etcd-names")?;
    let world = cluster_with_network(&lab)?;
    let mut racers: Vec<(usize, Netns, Vec<String>)> = Vec::new();
    for host in [A, B, C] {
        for k in 0..PER_HOST {
            let name = ["shared", "Shared", "SHARED", "sHaReD"][k];
            let args = vec!["--name".into(), name.into()];
            racers.push((host, lab.container(&format!("n{host}-{k}"))?, args));
        }
    }
    let winner = exactly_one_connects(&world, &racers, "is already taken on network", false)?;
    // Only the winner is registered.
    let listed = listed_endpoints(&world.inspect(B, NETWORK)?)?;
    let holders: Vec<&str> = listed.values().map(|(_, netns)| netns.as_str()).collect();
    ensure!(
        holders == [winner.as_str()],
        "the store should hold the winner {winner} alone: {listed:?}"
    );
    // Its disconnect frees the name (its claim goes with it).
    let (host, won, _) = racers
        .iter()
        .find(|(_, c, _)| c.name() == winner)
        .context("the winner is a racer")?;
    world.run(*host, &["disconnect", NETWORK, won.name()])?;
    let (host, next, _) = racers
        .iter()
        .find(|(_, c, _)| c.name() != winner)
        .context("a loser")?;
    world
        .run(
            *host,
            &["connect", NETWORK, next.name(), "--name", "SHARED"],
        )
        .with_context(|| format!("{next} should take the name its holder gave up"))?;
    world.stop()
}

#[test]
fn killed_agents_endpoints_leave_every_map_and_the_store_within_the_lease_ttl() -> Result<()> {
    let lab = Lab::new("etcd-kill")?;
    let mut world = cluster_with_network(&lab)?;
    let (ca, ip_a) = world.container(&lab, A, NETWORK, "ca")?;
    let (_cb, ip_b) = world.container(&lab, B, NETWORK, "cb")?;
    let (_cc1, ip_c1) = world.container(&lab, C, NETWORK, "cc1")?;
    let (_cc2, ip_c2) = world.container(&lab, C, NETWORK, "cc2")?;
    let vni = vni_of(&world, A)?;
    wait_for_maps(&world, vni, &[(ip_a, A), (ip_b, B), (ip_c1, C), (ip_c2, C)])?;
    expect_reachable(&ca, ip_c1, 1)?;

    let agent_c = world.agents.pop().context("host C's agent")?;
    ensure!(
        agent_c.node == ThreeHosts::NODES[C],
        "last agent is not C's"
    );
    agent_c.kill()?;
    agent_c.wait_exit(Duration::from_secs(5))?;
    let killed = Instant::now();

    // Within the lease TTL plus a few seconds (expiry is checked by etcd
    // about every 500 ms): A and B drop C's endpoints from their maps, the
    // store frees them, and C is listed as dead.
    let c_vtep = Via::Vtep(world.hosts[C].addr);
    let mut seen = String::new();
    wait_until(Duration::from_secs(LEASE_TTL + 5), || {
        let maps = [map_of(&world, A, vni)?, map_of(&world, B, vni)?];
        let listed = listed_endpoints(&world.inspect(B, NETWORK)?)?;
        seen = format!(
            "maps {maps:?}\nlisted {listed:?}\nnodes {:?}",
            world.nodes(A)?
        );
        let maps_clean = maps.iter().all(|m| m.values().all(|v| *v != c_vtep));
        let store_clean = listed
            .values()
            .all(|(node, _)| node != ThreeHosts::NODES[C]);
        let c_dead = node_is(&world, A, ThreeHosts::NODES[C], "no")?;
        Ok(maps_clean && store_clean && c_dead)
    })
    .with_context(|| format!("C still present after its agent died:\n{seen}"))?;
    eprintln!(
        "C's endpoints gone from maps and store {:?} after SIGKILL (lease TTL {LEASE_TTL} s)",
        killed.elapsed()
    );

    // Nothing else went: A and B keep each other, and still talk.
    for i in [A, B] {
        let want = BTreeMap::from([(ip_a, via(&world, i, A)), (ip_b, via(&world, i, B))]);
        let have = map_of(&world, i, vni)?;
        ensure!(
            have == want,
            "host {i}'s map is {have:?}, expected {want:?}"
        );
    }
    expect_reachable(&ca, ip_b, 3)?;
    for node in &ThreeHosts::NODES[..C] {
        ensure!(
            node_is(&world, B, node, "yes")?,
            "{node} should be listed alive: {:?}",
            world.nodes(B)?
        );
    }

    // C may only be cut off: its addresses are held back for the address
    // grace (60 s by default), not handed out at once to the next container
    // (which is what lowest-free allocation did), and asking for one by
    // name is refused, naming the grace.
    let (_ca2, ip_a2) = world.container(&lab, A, NETWORK, "ca2")?;
    ensure!(
        ip_a2 != ip_c1 && ip_a2 != ip_c2,
        "new container got {ip_a2}, one of dead C's addresses ({ip_c1}, {ip_c2}), within the grace"
    );
    let ca3 = lab.container("ca3")?;
    let ip = ip_c1.to_string();
    let asked = world.ovl.run_unchecked(
        &world.hosts[A].netns,
        ThreeHosts::NODES[A],
        &["connect", NETWORK, ca3.name(), "--ip", &ip],
    )?;
    let stderr = String::from_utf8_lossy(&asked.stderr);
    ensure!(
        !asked.status.success()
            && stderr.contains("held back")
            && stderr.contains("--address-grace"),
        "connect --ip {ip} within the grace: {} {stderr}",
        asked.status
    );
    // With no grace (an operator's choice) the address is free at once.
    let taken = world.ovl.run_with_env_unchecked(
        &world.hosts[A].netns,
        ThreeHosts::NODES[A],
        &[("OVL_ADDRESS_GRACE", "0")],
        &["connect", NETWORK, ca3.name(), "--ip", &ip],
    )?;
    ensure!(
        taken.status.success(),
        "connect --ip {ip} without grace failed: {}",
        String::from_utf8_lossy(&taken.stderr)
    );
    world.stop()
}

/// Cuts host `i` off from etcd, both ways, by blackholing traffic between
/// its VTEP and etcd's address on the router; VXLAN between the hosts is
/// forwarded by the router and flows on. `add` false heals the cut.
fn cut_off_from_etcd(world: &ThreeHosts, i: usize, etcd: Ipv4Addr, add: bool) -> Result<()> {
    let host = world.hosts[i].addr.to_string();
    let etcd = etcd.to_string();
    let verb = if add { "add" } else { "del" };
    for (from, to) in [(&host, &etcd), (&etcd, &host)] {
        world
            .router
            .ip(&["rule", verb, "from", from, "to", to, "blackhole"])?;
    }
    Ok(())
}

/// Whether `ovl node ls` on host `i` lists `node` with ALIVE `alive`.
fn node_is(world: &Cluster, i: usize, node: &str, alive: &str) -> Result<bool> {
    Ok(world
        .nodes(i)?
        .iter()
        .any(|(n, _, a)| n == node && a == alive))
}

#[test]
fn node_cut_off_from_etcd_beyond_its_lease_is_alive_and_reachable_once_the_cut_heals() -> Result<()>
{
    cut_off_beyond_the_lease("etcd-cut", false)
}

#[test]
fn node_removed_while_cut_off_registers_again_and_is_reachable_once_the_cut_heals() -> Result<()> {
    cut_off_beyond_the_lease("etcd-cut-rm", true)
}

/// Host C is cut off from etcd past its lease, declared dead, and (with
/// `remove`) removed by `ovl node rm` on A; once the cut heals, C's agent
/// must hold a lease again, be listed with its VTEP, and its container
/// must be reachable from A's.
fn cut_off_beyond_the_lease(lab: &str, remove: bool) -> Result<()> {
    let lab = Lab::new(lab)?;
    let world = cluster_with_network(&lab)?;
    let (ca, ip_a) = world.container(&lab, A, NETWORK, "ca")?;
    let (_cc, ip_c) = world.container(&lab, C, NETWORK, "cc")?;
    let vni = vni_of(&world, A)?;
    wait_for_maps(&world, vni, &[(ip_a, A), (ip_c, C)])?;
    expect_reachable(&ca, ip_c, 1)?;

    let etcd_addr = world.hosts[A]
        .gateway
        .context("routed hosts have a gateway")?;
    let c = ThreeHosts::NODES[C];
    cut_off_from_etcd(&world, C, etcd_addr, true)?;
    // Cut off past its lease, C is dead to the others (by design).
    wait_until(Duration::from_secs(LEASE_TTL + 5), || {
        node_is(&world, A, c, "no")
    })
    .context("C was never declared dead while cut off")?;
    if remove {
        let out = world.run(A, &["node", "rm", c])?;
        ensure!(out.contains(c), "node rm said: {out}");
        let nodes = world.nodes(A)?;
        ensure!(
            nodes.iter().all(|(n, _, _)| n != c),
            "{c} still listed after `ovl node rm`: {nodes:?}"
        );
    }
    cut_off_from_etcd(&world, C, etcd_addr, false)?;
    let healed = Instant::now();

    // C's agent still runs: once it reaches etcd again it must hold a
    // lease again, and its container must be reachable again.
    wait_until(Duration::from_secs(LEASE_TTL + 10), || {
        Ok(world
            .nodes(A)?
            .iter()
            .any(|(n, vtep, alive)| n == c && *vtep == world.hosts[C].addr && alive == "yes"))
    })
    .with_context(|| {
        format!(
            "C never came back alive after the cut healed; nodes {:?}",
            world.nodes(A)
        )
    })?;
    eprintln!("C alive again {:?} after the cut healed", healed.elapsed());
    wait_until(PROPAGATION, || {
        Ok(ping(&ca, ip_c, 1, &["-W", "1"])?.all_received())
    })
    .with_context(|| {
        format!(
            "C's container {ip_c} unreachable after C came back; store lists {:?}",
            world.inspect(A, NETWORK).map(|v| listed_endpoints(&v))
        )
    })?;
    world.stop()
}

/// The conflicts `ovl node ls --json` on host `i` lists for `node`:
/// (network, address, holder's name).
fn conflicts_of(
    world: &ThreeHosts,
    i: usize,
    node: &str,
) -> Result<Vec<(String, Ipv4Addr, String)>> {
    let out = world.run(i, &["node", "ls", "--json"])?;
    let rows: Value = serde_json::from_str(&out).with_context(|| format!("node ls: {out}"))?;
    let row = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == node))
        .with_context(|| format!("{node} not in node ls: {out}"))?;
    row["conflicts"]
        .as_array()
        .with_context(|| format!("no conflicts list in {row}"))?
        .iter()
        .map(|c| {
            Ok((
                c["network"].as_str().context("network")?.to_owned(),
                c["ip"].as_str().context("ip")?.parse()?,
                c["holder_name"].as_str().context("holder_name")?.to_owned(),
            ))
        })
        .collect()
}

#[test]
fn a_node_returning_to_an_address_taken_meanwhile_reports_the_conflict_and_the_new_owner_keeps_it()
-> Result<()> {
    let lab = Lab::new("etcd-taken")?;
    let world = cluster_with_network(&lab)?;
    let (ca, ip_a) = world.container(&lab, A, NETWORK, "ca")?;
    let (_cc, ip_c) = world.container(&lab, C, NETWORK, "cc")?;
    let vni = vni_of(&world, A)?;
    wait_for_maps(&world, vni, &[(ip_a, A), (ip_c, C)])?;
    expect_reachable(&ca, ip_c, 1)?;

    let etcd_addr = cut_off_until_freed(&world, ip_c)?;
    let c = ThreeHosts::NODES[C];

    // An operator without grace gives C's address to a new container on B.
    let cb = lab.container("cb")?;
    let ip = ip_c.to_string();
    let taken = world.ovl.run_with_env_unchecked(
        &world.hosts[B].netns,
        ThreeHosts::NODES[B],
        &[("OVL_ADDRESS_GRACE", "0")],
        &[
            "connect",
            NETWORK,
            cb.name(),
            "--ip",
            &ip,
            "--name",
            "newer",
        ],
    )?;
    ensure!(
        taken.status.success(),
        "connect --ip {ip} on B failed: {}",
        String::from_utf8_lossy(&taken.stderr)
    );
    let to_b = Via::Vtep(world.hosts[B].addr);
    wait_until(PROPAGATION, || {
        Ok(map_of(&world, A, vni)?.get(&ip_c) == Some(&to_b))
    })
    .context("A never sent C's old address to B")?;
    expect_reachable(&ca, ip_c, 3)?;

    // The cut heals: C comes back, finds its address taken, and says so
    // loudly (its log, `ovl node ls`, the conflict count of its agent).
    let seen = heal_until_conflict(&world, etcd_addr)?;
    ensure!(
        seen == vec![(NETWORK.to_owned(), ip_c, "newer".to_owned())],
        "C reported {seen:?}, expected {ip_c} of {NETWORK} held by newer"
    );
    let log = world.agents[C].log()?;
    ensure!(
        log.lines()
            .any(|l| l.contains("address conflict") && l.contains(&ip)),
        "C's agent never logged the conflict over {ip}:\n{log}"
    );
    let table = world.run(A, &["node", "ls"])?;
    ensure!(
        table.contains(&format!("conflict on node {c}")) && table.contains(&ip),
        "node ls does not show the conflict:\n{table}"
    );

    // The newer owner is left alone: the store keeps it on B, A's map
    // sends the address to B, C's no longer claims it (C, with no endpoint
    // of the network left, serves it no more), and its traffic flows on.
    let listed = listed_endpoints(&world.inspect(A, NETWORK)?)?;
    ensure!(
        listed.get(&ip_c).map(|(node, _)| node.as_str()) == Some(ThreeHosts::NODES[B]),
        "{ip_c} is listed as {:?} after C came back",
        listed.get(&ip_c)
    );
    wait_until(PROPAGATION, || {
        Ok(map_of(&world, C, vni)?.get(&ip_c) != Some(&Via::Local))
    })
    .with_context(|| {
        format!(
            "C's map still holds its old {ip_c}: {:?}",
            map_of(&world, C, vni)
        )
    })?;
    ensure!(
        map_of(&world, A, vni)?.get(&ip_c) == Some(&to_b),
        "A's map no longer sends {ip_c} to B"
    );
    expect_reachable(&ca, ip_c, 3)?;
    world.stop()
}

/// The story of an address taken while a node was away, told of a MAC:
/// C's container was given its own MAC; while C is cut off past its lease
/// its endpoint is freed (its address held back, its MAC free at once)
/// and a new container on B is given that MAC. C comes back, leaves that
/// endpoint out and says so, naming the MAC and its holder; the network
/// keeps one endpoint with the MAC, B's, which stays reachable.
#[test]
fn a_node_returning_to_a_mac_given_away_meanwhile_reports_the_conflict_and_the_new_owner_keeps_it()
-> Result<()> {
    let lab = Lab::new("etcd-mac-taken")?;
    let world = cluster_with_network(&lab)?;
    let mac = "0a:00:5e:00:02:01";
    // B gives the MAC to a new container (C's address is held back).
    let Away {
        ca,
        ip_c,
        cb,
        ip_b,
        etcd_addr,
        ..
    } = given_away_while_cut_off(
        &lab,
        &world,
        &["--mac", mac],
        &["--mac", mac, "--name", "newer"],
    )?;
    let c = ThreeHosts::NODES[C];
    expect_reachable(&ca, ip_b, 3)?;

    let seen = heal_until_conflict(&world, etcd_addr)?;
    ensure!(
        seen == vec![(NETWORK.to_owned(), ip_c, "newer".to_owned())],
        "C reported {seen:?}, expected the MAC of {ip_c} held by newer"
    );
    let rows: Value = serde_json::from_str(&world.run(A, &["node", "ls", "--json"])?)?;
    let recorded = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == c))
        .map(|r| r["conflicts"][0]["mac"].clone())
        .unwrap_or_default();
    ensure!(
        recorded["mac"] == mac && recorded["holder_ip"] == ip_b.to_string(),
        "the conflict does not name the MAC and its holder: {recorded}"
    );
    let table = world.run(A, &["node", "ls"])?;
    ensure!(
        table.contains(&format!("conflict on node {c}: MAC {mac}"))
            && table.contains(&format!(
                "held by newer ({} on host-b) at {ip_b}",
                cb.name()
            ))
            && table.contains("reconnect it with another MAC or none"),
        "node ls does not show the MAC conflict:\n{table}"
    );
    let log = world.agents[C].log()?;
    ensure!(
        log.lines()
            .any(|l| l.contains("MAC conflict") && l.contains(mac)),
        "C's agent never logged the conflict over {mac}:\n{log}"
    );

    // One endpoint has the MAC: B's, which keeps its traffic.
    let holders = holders_of_mac(&world, A, mac)?;
    ensure!(
        holders == [(ip_b, cb.name().to_owned())],
        "{mac} should be newer's alone: {holders:?}"
    );
    ensure!(
        !listed_endpoints(&world.inspect(A, NETWORK)?)?.contains_key(&ip_c),
        "C's endpoint {ip_c} was put back"
    );
    expect_reachable(&ca, ip_b, 3)?;
    world.stop()
}

/// The story told of a name: C's container is called db; while C is cut
/// off past its lease its endpoint is freed (its address held back, its
/// name free at once) and a new container on B is called db. C comes
/// back and puts its endpoint back under its namespace's name (a name is
/// no reason to cut a container off), saying so once; db stays B's alone,
/// and A's container reaches C's by its new name and B's by db.
#[test]
fn a_node_returning_to_a_name_given_away_meanwhile_puts_its_endpoint_back_under_a_fallback()
-> Result<()> {
    let lab = Lab::new("etcd-name-taken")?;
    let world = cluster_with_network(&lab)?;
    // B calls a new container db (C's address is held back).
    let Away {
        ca,
        cc,
        ip_c,
        cb,
        ip_b,
        etcd_addr,
    } = given_away_while_cut_off(&lab, &world, &["--name", "db"], &["--name", "db"])?;
    let c = ThreeHosts::NODES[C];

    cut_off_from_etcd(&world, C, etcd_addr, false)?;
    let fallback = cc.name();
    let names = || -> Result<Vec<(Ipv4Addr, String)>> {
        let net = world.inspect(A, NETWORK)?;
        net["endpoints"]
            .as_array()
            .with_context(|| format!("no endpoints in {net}"))?
            .iter()
            .map(|e| {
                Ok((
                    e["ip"].as_str().context("ip")?.parse()?,
                    e["name"].as_str().context("name")?.to_owned(),
                ))
            })
            .collect()
    };
    wait_until(Duration::from_secs(LEASE_TTL + 15), || {
        Ok(node_is(&world, A, c, "yes")? && names()?.contains(&(ip_c, fallback.to_owned())))
    })
    .with_context(|| format!("C's endpoint never came back as {fallback}: {:?}", names()))?;
    let called_db: Vec<Ipv4Addr> = names()?
        .into_iter()
        .filter(|(_, n)| n.eq_ignore_ascii_case("db"))
        .map(|(ip, _)| ip)
        .collect();
    ensure!(called_db == [ip_b], "db should be B's alone: {called_db:?}");
    let conflicts = conflicts_of(&world, A, c)?;
    ensure!(
        conflicts.is_empty(),
        "a rename recorded as a conflict: {conflicts:?}"
    );
    let log = world.agents[C].log()?;
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("name conflict"))
        .collect();
    ensure!(
        said.len() == 1
            && said[0].contains(&format!("is back as {fallback}"))
            && said[0].contains(&format!("held by db ({} on host-b) at {ip_b}", cb.name())),
        "C's agent did not say once that db is back as {fallback}:\n{log}"
    );

    // By name from A: the new name is C's container, db is B's.
    for (name, ip) in [(fallback, ip_c), ("db", ip_b)] {
        wait_until(PROPAGATION, || {
            let out = ca.exec_unchecked(&["ping", "-c", "1", "-W", "1", name])?;
            Ok(out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(&format!("({ip})")))
        })
        .with_context(|| format!("A's container never reached {name} at {ip}"))?;
    }
    world.stop()
}

/// Echo requests of the outage probe, 50 ms apart: 4 s of traffic.
const OUTAGE_PINGS: u32 = 80;

/// Echo requests sent before etcd is stopped (~1 s in).
const PINGS_BEFORE_OUTAGE: u64 = 20;

#[test]
fn etcd_outage_loses_no_packet_and_a_restarted_etcd_serves_new_endpoints() -> Result<()> {
    let lab = Lab::new("etcd-down")?;
    let mut world = cluster_with_network(&lab)?;
    let (cb, ip_b) = world.container(&lab, B, NETWORK, "cb")?;
    let (cc, ip_c) = world.container(&lab, C, NETWORK, "cc")?;
    let vni = vni_of(&world, A)?;
    wait_for_maps(&world, vni, &[(ip_b, B), (ip_c, C)])?;
    expect_reachable(&cb, ip_c, 1)?;
    let before = listed_endpoints(&world.inspect(A, NETWORK)?)?;

    let sent_before = cb.link_counter(CONTAINER_IFACE, "tx_packets")?;
    let mut stopped_at = None;
    let outage: Result<PingResult> = thread::scope(|s| {
        let pinger = s.spawn(|| ping(&cb, ip_c, OUTAGE_PINGS, &["-i", "0.05", "-W", "2"]));
        let stop = (|| -> Result<()> {
            wait_until(Duration::from_secs(5), || {
                let sent = cb.link_counter(CONTAINER_IFACE, "tx_packets")?;
                Ok(sent - sent_before >= PINGS_BEFORE_OUTAGE)
            })?;
            world.etcd.stop()?;
            stopped_at = Some(Instant::now());
            Ok(())
        })();
        let result = pinger.join().expect("the ping thread panicked");
        stop.and(result)
    });
    let outage = outage?;
    ensure!(
        outage.transmitted == OUTAGE_PINGS && outage.all_received(),
        "packets lost while etcd was down:\n{}",
        outage.output
    );
    let stopped_at = stopped_at.context("etcd was stopped")?;

    // The store really is down: a command fails, naming it.
    let down = world.ovl.run_unchecked(
        &world.hosts[B].netns,
        ThreeHosts::NODES[B],
        &["network", "ls"],
    )?;
    let stderr = String::from_utf8_lossy(&down.stderr);
    ensure!(
        !down.status.success() && stderr.contains(&world.etcd.url()),
        "`ovl network ls` with etcd down: {} {stderr}",
        down.status
    );
    // Keep it down past the lease TTL: a restart must not declare the
    // nodes dead and free their endpoints.
    let outage_min = Duration::from_secs(LEASE_TTL + 1);
    if let Some(rest) = outage_min.checked_sub(stopped_at.elapsed()) {
        thread::sleep(rest);
    }
    world.etcd.restart(&lab)?;
    eprintln!("etcd was down for {:?}", stopped_at.elapsed());

    let (ca, ip_a) = world.container(&lab, A, NETWORK, "ca")?;
    let restarted = Instant::now();
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&cb, ip_a, 1, &["-W", "1"])?.all_received())
    })
    .context("B's container never reached the container connected after the restart")?;
    eprintln!(
        "new endpoint on A reachable from B {:?} after its connect",
        restarted.elapsed()
    );

    let mut expected = before.clone();
    expected.insert(
        ip_a,
        (ThreeHosts::NODES[A].to_owned(), ca.name().to_owned()),
    );
    let after = listed_endpoints(&world.inspect(C, NETWORK)?)?;
    ensure!(
        after == expected,
        "endpoints changed across the outage: {before:?} -> {after:?}"
    );
    wait_for_maps(&world, vni, &[(ip_a, A), (ip_b, B), (ip_c, C)])?;
    let nodes = world.nodes(A)?;
    ensure!(
        nodes.iter().all(|(_, _, alive)| alive == "yes") && nodes.len() == 3,
        "every node should be alive after the restart: {nodes:?}"
    );
    expect_reachable(&cc, ip_b, 3)?;
    world.stop()
}

/// Three hosts, each running a member of one etcd cluster beside its
/// agent, as a small cluster is run; every agent and `ovl` command is
/// given all three members. Agents keep the default lease.
fn three_members(lab: &Lab) -> Result<(Cluster, EtcdCluster)> {
    let (router, hosts) = lab.routed_hosts(3)?;
    let places: Vec<(Netns, Ipv4Addr)> = hosts.iter().map(|h| (h.netns.clone(), h.addr)).collect();
    let etcd = EtcdCluster::start(lab, &places)?;
    let ovl = Ovl::with_store(lab, &etcd.url())?;
    let world = Cluster::with_agents(
        lab,
        ovl,
        router,
        hosts,
        "auto",
        &[("OVL_METRICS", AGENT_METRICS)],
    )?;
    Ok((world, etcd))
}

/// Host `i`'s agent's `ovl_store_failovers_total`.
fn fail_overs(world: &Cluster, i: usize) -> Result<u64> {
    let text = world.scrape(i)?;
    text.lines()
        .find_map(|l| l.strip_prefix("ovl_store_failovers_total "))
        .with_context(|| format!("no ovl_store_failovers_total in\n{text}"))?
        .trim()
        .parse()
        .context("ovl_store_failovers_total")
}

/// Every node alive as `ovl node ls` on each host lists them.
fn all_alive(world: &Cluster, when: &str) -> Result<()> {
    for i in [A, B, C] {
        let nodes = world.nodes(i)?;
        ensure!(
            nodes.len() == 3 && nodes.iter().all(|(_, _, alive)| alive == "yes"),
            "{when}, {} lists {nodes:?}",
            ThreeHosts::NODES[i]
        );
    }
    Ok(())
}

/// Cuts etcd member `m` (on host `m`) off from the other members, or heals
/// the cut: the router drops raft traffic to and from host `m`; clients
/// still reach the member.
fn cut_off_member(world: &Cluster, m: usize, cut: bool) -> Result<()> {
    let host = world.hosts[m].addr;
    let script = if cut {
        let mut s = "add table ip ovlt_partition\n\
             add chain ip ovlt_partition forward { type filter hook forward priority 0; }\n"
            .to_owned();
        for dir in ["saddr", "daddr"] {
            for port in ["sport", "dport"] {
                s.push_str(&format!(
                    "add rule ip ovlt_partition forward ip {dir} {host} tcp {port} {ETCD_PEER_PORT} drop\n"
                ));
            }
        }
        s
    } else {
        "delete table ip ovlt_partition\n".to_owned()
    };
    world.router.exec(&["nft", &script])?;
    Ok(())
}

/// etcd as operators run it: three members, every agent and `ovl` command
/// given all three. Killing the leader costs no packet, no node's lease
/// and no endpoint; connects and commands go on through the other two on
/// every host, and every agent follows them. The killed member, restarted,
/// catches up: once another member dies the cluster's quorum needs it.
#[test]
fn agents_on_a_three_member_etcd_ride_out_the_loss_of_a_member() -> Result<()> {
    let lab = Lab::new("etcd-3m")?;
    let (world, mut etcd) = three_members(&lab)?;
    world
        .ovl
        .create_network(&world.hosts[A].netns, NETWORK, SUBNET, &[])?;
    let (ca, ip_a) = world.container(&lab, A, NETWORK, "ca")?;
    let (cb, ip_b) = world.container(&lab, B, NETWORK, "cb")?;
    let vni = vni_of(&world, A)?;
    wait_for_maps(&world, vni, &[(ip_a, A), (ip_b, B)])?;
    expect_reachable(&ca, ip_b, 1)?;
    let before = listed_endpoints(&world.inspect(A, NETWORK)?)?;

    let leader = etcd.leader()?;
    let pings: Result<PingResult> = thread::scope(|s| {
        let pinger = s.spawn(|| ping(&ca, ip_b, OUTAGE_PINGS, &["-i", "0.05", "-W", "2"]));
        thread::sleep(Duration::from_secs(1));
        let killed = etcd.members[leader].kill();
        let result = pinger.join().expect("the ping thread panicked");
        killed.and(result)
    });
    let pings = pings?;
    let killed_at = Instant::now();
    ensure!(
        pings.transmitted == OUTAGE_PINGS && pings.all_received(),
        "packets lost while the etcd leader was killed:\n{}",
        pings.output
    );

    // Past every lease: each node kept its own alive through the others,
    // and each host's `ovl` reads the store with one member dead.
    let past_leases = Duration::from_secs(DEFAULT_LEASE_TTL + 2);
    if let Some(rest) = past_leases.checked_sub(killed_at.elapsed()) {
        thread::sleep(rest);
    }
    all_alive(
        &world,
        &format!("with etcd member {leader} (the leader) dead"),
    )?;
    let after = listed_endpoints(&world.inspect(C, NETWORK)?)?;
    ensure!(
        after == before,
        "endpoints changed when the etcd leader died: {before:?} -> {after:?}"
    );

    // A connect on the third host reaches every agent.
    let (cc, ip_c) = world.container(&lab, C, NETWORK, "cc")?;
    wait_for_maps(&world, vni, &[(ip_a, A), (ip_b, B), (ip_c, C)])?;
    expect_reachable(&ca, ip_c, 3)?;
    expect_reachable(&cb, ip_c, 3)?;

    // The killed member comes back; another one dies. The two left are a
    // quorum only with the returned member, so it must have caught up.
    etcd.members[leader].restart(&lab)?;
    let mut victim = etcd.leader()?;
    if victim == leader {
        victim = (leader + 1) % etcd.members.len();
    }
    etcd.members[victim].kill()?;
    let (ca2, ip_a2) = world.container(&lab, A, NETWORK, "ca2")?;
    wait_for_maps(&world, vni, &[(ip_a, A), (ip_b, B), (ip_c, C), (ip_a2, A)])?;
    expect_reachable(&cc, ip_a2, 3)?;
    expect_reachable(&ca2, ip_b, 3)?;
    world.stop()
}

/// A member cut off from the others (a partition) loses its leader and
/// stops serving ovl (ovl asks for a leader on every request): whoever
/// talked to it moves on. Each member in turn is cut off; each time a
/// connect on every host reaches every agent, and no node's lease lapses.
#[test]
fn agents_on_a_three_member_etcd_ride_out_a_member_cut_off_from_the_others() -> Result<()> {
    let lab = Lab::new("etcd-3p")?;
    let (world, etcd) = three_members(&lab)?;
    world
        .ovl
        .create_network(&world.hosts[A].netns, NETWORK, SUBNET, &[])?;
    let mut endpoints = Vec::new();
    let mut containers = Vec::new();
    for i in [A, B, C] {
        let (c, ip) = world.container(&lab, i, NETWORK, &format!("c{i}"))?;
        endpoints.push((ip, i));
        containers.push(c);
    }
    let vni = vni_of(&world, A)?;
    wait_for_maps(&world, vni, &endpoints)?;
    for i in [A, B, C] {
        ensure!(
            fail_overs(&world, i)? == 0,
            "{} moved between members before any failed",
            ThreeHosts::NODES[i]
        );
    }

    for m in [A, B, C] {
        cut_off_member(&world, m, true)?;
        // The member notices: it cannot answer a read needing a quorum.
        wait_until(Duration::from_secs(15), || {
            Ok(etcd.members[m].etcdctl(&["endpoint", "health"]).is_err())
        })
        .with_context(|| format!("etcd member {m} still healthy when cut off"))?;
        // And the others have a leader (they elect one if it was cut off).
        let leader = etcd.leader_of_all_but(Some(m))?;
        ensure!(leader != m, "the cut-off member {m} leads the others");
        for i in [A, B, C] {
            let (c, ip) = world.container(&lab, i, NETWORK, &format!("m{m}c{i}"))?;
            endpoints.push((ip, i));
            containers.push(c);
        }
        wait_for_maps(&world, vni, &endpoints)
            .with_context(|| format!("with etcd member {m} cut off"))?;
        let newest = containers.last().context("containers")?;
        expect_reachable(newest, endpoints[0].0, 2)?;
        all_alive(&world, &format!("with etcd member {m} cut off"))?;
        cut_off_member(&world, m, false)?;
        etcd.members[m].wait_healthy(Duration::from_secs(20))?;
    }
    // Each member was cut off in turn, so every agent's connections met a
    // cut-off member at least once, and moved on.
    for i in [A, B, C] {
        let n = fail_overs(&world, i)?;
        ensure!(
            n >= 1,
            "{} counted {n} moves between members",
            ThreeHosts::NODES[i]
        );
    }
    world.stop()
}

/// Containers each host's writer may connect while the leader dies and
/// is cut off (it stops early once the member faults are over).
const WRITES_PER_HOST: usize = 60;

/// One command of a writer, and how it ended.
struct Write {
    host: usize,
    command: Vec<String>,
    /// What it said on stderr (at log level info) if it failed.
    result: Result<(), String>,
    /// How often it moved on from a member that failed it, and how often
    /// it asked whether a commit a member failed had been made.
    fail_overs: usize,
    looked_up: usize,
}

/// What a writer on host `host` commands until `stop`: connects of its
/// containers, a disconnect of every third one, and (host A) a network
/// created every fourth step. Returns every command with its outcome.
fn write_until(
    world: &Cluster,
    host: usize,
    containers: &[Netns],
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<Write> {
    let mut writes = Vec::new();
    let mut run = |args: Vec<String>| {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = world.ovl.run_with_env_unchecked(
            &world.hosts[host].netns,
            ThreeHosts::NODES[host],
            &[("RUST_LOG", "info")],
            &argv,
        );
        let (result, said) = match out {
            Ok(o) => {
                let said = String::from_utf8_lossy(&o.stderr).into_owned();
                let result = if o.status.success() {
                    Ok(())
                } else {
                    Err(format!("{}: {said}", o.status))
                };
                (result, said)
            }
            Err(e) => (Err(format!("{e:#}")), String::new()),
        };
        writes.push(Write {
            host,
            command: args,
            result,
            fail_overs: said.matches("failed a request; talking to").count(),
            looked_up: said.matches("asking whether the change was made").count(),
        });
    };
    for (k, c) in containers.iter().enumerate() {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        run(vec!["connect".into(), NETWORK.into(), c.name().into()]);
        if k % 3 == 2 {
            run(vec![
                "disconnect".into(),
                NETWORK.into(),
                containers[k - 1].name().into(),
            ]);
        }
        if host == A && k % 4 == 0 {
            run(vec![
                "network".into(),
                "create".into(),
                format!("w{k}"),
                "--subnet".into(),
                format!("198.19.{k}.0/24"),
            ]);
        }
    }
    writes
}

/// The store's keys under `prefix`, as the members that run read them.
fn stored_keys(etcd: &EtcdCluster, prefix: &str) -> Result<Vec<String>> {
    let member = etcd
        .members
        .iter()
        .find(|m| m.is_running())
        .context("no etcd member runs")?;
    member.keys(prefix)
}

/// Commands from every host go on while the etcd leader is killed, and
/// again while the next leader is cut off from the others: each connect,
/// disconnect and network create succeeds, once (a write whose member
/// failed it is made again only if it had not committed), and the store
/// holds exactly what was commanded. The containers left connected reach
/// each other.
#[test]
fn writes_on_a_three_member_etcd_ride_out_a_leader_killed_and_cut_off() -> Result<()> {
    let lab = Lab::new("etcd-3w")?;
    let (world, mut etcd) = three_members(&lab)?;
    world
        .ovl
        .create_network(&world.hosts[A].netns, NETWORK, SUBNET, &[])?;
    let mut containers: Vec<Vec<Netns>> = Vec::new();
    for host in [A, B, C] {
        let mine = (0..WRITES_PER_HOST)
            .map(|k| lab.container(&format!("w{host}-{k}")))
            .collect::<Result<Vec<_>>>()?;
        containers.push(mine);
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (writes, faults): (Vec<Write>, Result<()>) = thread::scope(|s| {
        let writers: Vec<_> = [A, B, C]
            .into_iter()
            .map(|host| {
                let (world, mine, stop) = (&world, &containers[host], &stop);
                s.spawn(move || write_until(world, host, mine, stop))
            })
            .collect();
        let faults = (|| -> Result<()> {
            thread::sleep(Duration::from_secs(1));
            let leader = etcd.leader()?;
            etcd.members[leader].kill()?;
            let next = etcd.leader()?;
            thread::sleep(Duration::from_secs(2));
            etcd.members[leader].restart(&lab)?;
            cut_off_member(&world, next, true)?;
            let cut = (|| -> Result<()> {
                etcd.leader_of_all_but(Some(next))?;
                thread::sleep(Duration::from_secs(2));
                Ok(())
            })();
            cut_off_member(&world, next, false)?;
            cut?;
            etcd.members[next].wait_healthy(Duration::from_secs(20))?;
            // Writes after the faults, through a healed cluster.
            thread::sleep(Duration::from_secs(1));
            Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let writes = writers
            .into_iter()
            .flat_map(|w| w.join().expect("a writer thread panicked"))
            .collect();
        (writes, faults)
    });
    faults?;
    let failed: Vec<String> = writes
        .iter()
        .filter_map(|w| {
            w.result.as_ref().err().map(|e| {
                format!(
                    "{}: ovl {}: {e}",
                    ThreeHosts::NODES[w.host],
                    w.command.join(" ")
                )
            })
        })
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {} writes failed while the etcd leader was killed and cut off:\n{}",
        failed.len(),
        writes.len(),
        failed.join("\n")
    );
    eprintln!(
        "{} writes; their commands moved between members {} times and asked {} times whether a commit had been made",
        writes.len(),
        writes.iter().map(|w| w.fail_overs).sum::<usize>(),
        writes.iter().map(|w| w.looked_up).sum::<usize>()
    );

    // The store holds what was commanded: each container connected and
    // not disconnected, once, on its own node; each network created.
    // (Each container is connected once, so duplicates show in the list.)
    let mut expected: BTreeSet<(String, String)> = BTreeSet::new();
    let mut networks = BTreeSet::from([NETWORK.to_owned()]);
    for w in &writes {
        let node = ThreeHosts::NODES[w.host].to_owned();
        match w.command.first().map(String::as_str) {
            Some("connect") => {
                expected.insert((node, w.command[2].clone()));
            }
            Some("disconnect") => {
                expected.remove(&(node, w.command[2].clone()));
            }
            _ => {
                networks.insert(w.command[2].clone());
            }
        }
    }
    let mut listed: Vec<(String, String)> = listed_endpoints(&world.inspect(C, NETWORK)?)?
        .into_values()
        .collect();
    listed.sort();
    let expected: Vec<(String, String)> = expected.into_iter().collect();
    ensure!(
        listed == expected,
        "the store lists endpoints {listed:?}, commanded {expected:?}"
    );
    let endpoint_keys = stored_keys(&etcd, &format!("/ovl/endpoints/{NETWORK}/"))?;
    let attachment_keys = stored_keys(&etcd, &format!("/ovl/attachments/{NETWORK}/"))?;
    ensure!(
        endpoint_keys.len() == expected.len() && attachment_keys.len() == expected.len(),
        "{} endpoint keys and {} attachment claims for {} endpoints",
        endpoint_keys.len(),
        attachment_keys.len(),
        expected.len()
    );
    let stored: BTreeSet<String> = stored_keys(&etcd, "/ovl/networks/")?
        .iter()
        .filter_map(|k| k.strip_prefix("/ovl/networks/").map(str::to_owned))
        .collect();
    ensure!(
        stored == networks,
        "the store holds networks {stored:?}, commanded {networks:?}"
    );
    let vnis = stored_keys(&etcd, "/ovl/vnis/")?;
    ensure!(
        vnis.len() == networks.len(),
        "{} VNI claims for networks {networks:?}: {vnis:?}",
        vnis.len()
    );

    // The last container each host left connected reaches the others'.
    let last: Vec<(usize, &Netns)> = [A, B, C]
        .into_iter()
        .filter_map(|host| {
            containers[host]
                .iter()
                .rev()
                .find(|c| {
                    expected
                        .iter()
                        .any(|(n, ns)| n == ThreeHosts::NODES[host] && ns == c.name())
                })
                .map(|c| (host, c))
        })
        .collect();
    ensure!(last.len() == 3, "a host has no container left connected");
    let listed = listed_endpoints(&world.inspect(A, NETWORK)?)?;
    let ip_of = |c: &Netns| {
        listed
            .iter()
            .find(|(_, (_, ns))| ns == c.name())
            .map(|(ip, _)| *ip)
            .context("a connected container has no address")
    };
    for (i, (_, from)) in last.iter().enumerate() {
        let (_, to) = last[(i + 1) % last.len()];
        expect_reachable(from, ip_of(to)?, 3)?;
    }
    world.stop()
}

/// Echo requests sent to the removed address.
const PINGS_TO_REMOVED: u64 = 5;

#[test]
fn endpoint_disconnected_on_b_leaves_every_map_and_its_traffic_counts_as_no_endpoint() -> Result<()>
{
    let lab = Lab::new("etcd-disc")?;
    let world = cluster_with_network(&lab)?;
    let (ca, ip_a) = world.container(&lab, A, NETWORK, "ca")?;
    let (cb, ip_b) = world.container(&lab, B, NETWORK, "cb")?;
    let (_cc, ip_c) = world.container(&lab, C, NETWORK, "cc")?;
    let vni = vni_of(&world, A)?;
    wait_for_maps(&world, vni, &[(ip_a, A), (ip_b, B), (ip_c, C)])?;
    expect_reachable(&ca, ip_b, 1)?;

    world.run(B, &["disconnect", NETWORK, cb.name()])?;
    wait_for_maps(&world, vni, &[(ip_a, A), (ip_c, C)])?;
    let listed = listed_endpoints(&world.inspect(C, NETWORK)?)?;
    ensure!(
        !listed.contains_key(&ip_b),
        "{ip_b} still listed: {listed:?}"
    );

    // A permanent neighbour entry keeps ARP off the wire: each echo request
    // is one IPv4 frame into A's egress hook, which finds no endpoint for
    // it and drops it, counted once as no_endpoint on the network.
    ca.ip(&[
        "neigh",
        "replace",
        &ip_b.to_string(),
        "lladdr",
        &mac_for(ip_b).to_string(),
        "dev",
        CONTAINER_IFACE,
        "nud",
        "permanent",
    ])?;
    let a_before = world.counters(A, NETWORK)?;
    let b_before = world.counters(B, NETWORK)?;
    let r = ping(
        &ca,
        ip_b,
        PINGS_TO_REMOVED as u32,
        &["-i", "0.2", "-W", "1"],
    )?;
    ensure!(
        r.transmitted == PINGS_TO_REMOVED as u32 && r.received == 0,
        "the removed address answered or ping sent a different count:\n{}",
        r.output
    );
    let a_after = world.counters(A, NETWORK)?;
    let mut expected = a_before.clone();
    expected.no_endpoint += PINGS_TO_REMOVED;
    ensure!(
        a_after == expected,
        "A's counters should move by exactly +{PINGS_TO_REMOVED} no_endpoint: \
         {a_before:?} -> {a_after:?}"
    );
    ensure!(
        world.counters(B, NETWORK)? == b_before,
        "B's counters moved: nothing should have left A"
    );
    world.stop()
}

/// `network rm` on etcd: refused while an endpoint is left, then done
/// (its VNI key goes with it, so the VNI can be taken again). It once gave
/// up after 64 "conflicting" attempts: the VNI key was outside what the
/// change read.
#[test]
fn an_emptied_network_is_removed_and_its_vni_can_be_taken_again() -> Result<()> {
    let lab = Lab::new("etcd-netrm")?;
    let world = cluster_with_network(&lab)?;
    let vni = vni_of(&world, A)?;
    let (cb, _) = world.container(&lab, B, NETWORK, "cb")?;
    let refused =
        world
            .ovl
            .run_unchecked(&world.hosts[C].netns, "host-c", &["network", "rm", NETWORK])?;
    ensure!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("still has 1 endpoint"),
        "network rm with an endpoint left: {refused:?}"
    );
    world.run(B, &["disconnect", NETWORK, cb.name()])?;
    world.run(C, &["network", "rm", NETWORK])?;
    let listed = world.run(A, &["network", "ls"])?;
    ensure!(!listed.contains(NETWORK), "still listed: {listed}");
    world.run(
        A,
        &[
            "network",
            "create",
            "again",
            "--subnet",
            SUBNET,
            "--vni",
            &vni.to_string(),
        ],
    )?;
    ensure!(
        world.inspect(B, "again")?["vni"] == vni,
        "VNI {vni} not reused"
    );
    world.stop()
}

#[test]
fn agent_with_a_bad_etcd_url_fails_naming_it_and_leaves_nothing_attached() -> Result<()> {
    let lab = Lab::new("etcd-bad")?;
    let (router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let gateway = host.gateway.context("routed host has a gateway")?;
    let etcd = ovl_tests::Etcd::start(&lab, &router, gateway)?;
    let ovl = Ovl::with_store(&lab, &etcd.url())?;
    let node = "host-a";
    let pin_dir = ovl.pin_root().join(node);
    let ttl = LEASE_TTL.to_string();
    let env = [("OVL_LEASE_TTL", ttl.as_str())];

    // Not a URL at all; a router port nobody listens on (refused); an
    // address on host A's subnet that nobody has (no answer at all).
    for url in [
        "etcd://not a url",
        "etcd://192.0.2.1:1",
        "etcd://192.0.2.2:2379",
    ] {
        let agent = ovl
            .using_store(url)
            .spawn_agent(&lab, host, node, "auto", &env)?;
        let t0 = Instant::now();
        let status = agent
            .wait_exit(Duration::from_secs(20))
            .with_context(|| format!("agent with store {url} did not give up"))?;
        let stderr = agent.log()?;
        ensure!(
            !status.success(),
            "agent with store {url} exited successfully:\n{stderr}"
        );
        ensure!(
            stderr.contains(url),
            "the error for {url} does not name it:\n{stderr}"
        );
        eprintln!(
            "{url}: {status} after {:?}: {}",
            t0.elapsed(),
            stderr.trim()
        );
        expect_nothing_attached(host, &pin_dir)
            .with_context(|| format!("after the failed start with {url}"))?;
    }

    // The same checks see a working agent's hook and pins, and the host is
    // still fine for one.
    let agent = ovl.attach_with_env(&lab, host, node, "auto", &env)?;
    let programs = hooked_programs(&host.netns, HOST_IFACE)?;
    ensure!(
        programs.iter().any(|p| p.name.starts_with("ovl_")) && pin_dir.is_dir(),
        "a running agent should show: programs {programs:?}, pins {}",
        pin_dir.display()
    );
    agent.stop()?;
    ovl.run(&host.netns, node, &["detach", HOST_IFACE])?;
    expect_nothing_attached(host, &pin_dir).context("after stop and detach")
}

/// No XDP program on the host's underlay link (`ip -d link`), no XDP, TC
/// or TCX program hooked on it at all, no pin directory for the node.
fn expect_nothing_attached(host: &Host, pin_dir: &Path) -> Result<()> {
    let link = host.netns.ip(&["-d", "link", "show", HOST_IFACE])?;
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    ensure!(
        !link
            .split_whitespace()
            .any(|w| w.starts_with("xdp") || w.starts_with("prog/xdp")),
        "XDP left on {HOST_IFACE}:\n{link}"
    );
    let programs = hooked_programs(&host.netns, HOST_IFACE)?;
    ensure!(
        programs.is_empty(),
        "programs left on {HOST_IFACE}: {programs:?}"
    );
    ensure!(
        !pin_dir.exists(),
        "pin directory {} left behind",
        pin_dir.display()
    );
    Ok(())
}

#[test]
fn a_stored_value_ovl_cannot_read_is_named_at_once_not_retried() -> Result<()> {
    let lab = Lab::new("etcd-corrupt")?;
    let (router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let gateway = host.gateway.context("routed host has a gateway")?;
    let etcd = ovl_tests::Etcd::start(&lab, &router, gateway)?;
    let ovl = Ovl::with_store(&lab, &etcd.url())?;
    // Written by hand (or a broken tool) over a network's record.
    etcd.etcdctl(&["put", "/ovl/networks/blue", "not json"])?;

    let t0 = Instant::now();
    let out = ovl.run_unchecked(
        &host.netns,
        "host-a",
        &["network", "create", "blue", "--subnet", "198.18.5.0/24"],
    )?;
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && stderr.contains("etcd key /ovl/networks/blue holds a value ovl cannot read")
            && !stderr.contains("conflicting"),
        "create over an unreadable record ({took:?}): {stderr}"
    );
    ensure!(
        etcd.etcdctl(&["get", "/ovl/networks/blue", "--print-value-only"])?
            .trim()
            == "not json",
        "the unreadable record was changed"
    );
    // Other networks are unaffected by the bad key.
    ovl.create_network(&host.netns, "green", "198.18.6.0/24", &[])?;
    Ok(())
}

#[test]
fn an_agent_restarted_while_etcd_is_down_shows_what_its_pinned_maps_serve() -> Result<()> {
    let lab = Lab::new("etcd-down-view")?;
    let mut world = cluster_with_network(&lab)?;
    let (_cb, ip_b) = world.container(&lab, B, NETWORK, "cb")?;
    let (_cc, ip_c) = world.container(&lab, C, NETWORK, "cc")?;
    let vni = vni_of(&world, A)?;
    wait_for_maps(&world, vni, &[(ip_b, B), (ip_c, C)])?;

    // B's agent restarts while etcd is down: it forwards with its pinned
    // maps, and its status and metrics show what they serve, not nothing.
    world.etcd.stop()?;
    world.cluster.terminate_agent(B)?;
    let ttl = LEASE_TTL.to_string();
    world
        .cluster
        .restart_agent(&lab, B, &[("OVL_LEASE_TTL", &ttl)])?;
    let out = world.run(B, &["status", "--json"])?;
    let status: Value = serde_json::from_str(&out).with_context(|| format!("status: {out}"))?;
    ensure!(
        status["store"]["reachable"] == false
            && status["networks"] == 1
            && status["local_endpoints"] == 1
            && status["remote_endpoints"] == 1,
        "B's status with etcd down: {status}"
    );
    world.etcd.restart(&lab)?;
    world.stop()
}

/// Connects a container on B and one on C to network `marker` and waits
/// until both are in every map: B's and C's agents have then looked at
/// every store change made before.
fn seen_by_b_and_c(lab: &Lab, world: &ThreeHosts, marker: &str) -> Result<()> {
    let (_b, ip_b) = world.container(lab, B, marker, "mb")?;
    let (_c, ip_c) = world.container(lab, C, marker, "mc")?;
    let vni = u32::try_from(
        world.inspect(A, marker)?["vni"]
            .as_u64()
            .context("inspect has no vni")?,
    )?;
    wait_for_maps(world, vni, &[(ip_b, B), (ip_c, C)])
}

/// A network's and a node's record overwritten by hand (or by a broken
/// tool) with values ovl cannot read are reported and skipped: every agent
/// keeps what it read of them before, also when it lost its watch and
/// listed the store again. They once took the network, and the node's
/// endpoints, out of every map.
#[test]
fn unreadable_values_over_a_network_and_a_node_leave_every_map_and_the_traffic_alone() -> Result<()>
{
    let lab = Lab::new("etcd-handwritten")?;
    let mut world = cluster_with_network(&lab)?;
    let (cb, ip_b) = world.container(&lab, B, NETWORK, "cb")?;
    let (_cc, ip_c) = world.container(&lab, C, NETWORK, "cc")?;
    let vni = vni_of(&world, A)?;
    let served = [(ip_b, B), (ip_c, C)];
    wait_for_maps(&world, vni, &served)?;
    for (i, marker) in ["seen-1", "seen-2"].into_iter().enumerate() {
        let subnet = format!("198.19.{i}.0/24");
        world
            .ovl
            .create_network(&world.hosts[A].netns, marker, &subnet, &[])?;
    }

    let network_key = format!("/ovl/networks/{NETWORK}");
    world.etcd.etcdctl(&["put", &network_key, "not json"])?;
    world
        .etcd
        .etcdctl(&["put", "/ovl/nodes/host-c", r#"{"schema":1}"#])?;
    seen_by_b_and_c(&lab, &world, "seen-1")?;
    wait_for_maps(&world, vni, &served)?;
    expect_reachable(&cb, ip_c, 3)?;

    // etcd restarts: every agent lists the store again.
    world.etcd.stop()?;
    world.etcd.restart(&lab)?;
    seen_by_b_and_c(&lab, &world, "seen-2")?;
    wait_for_maps(&world, vni, &served)?;
    expect_reachable(&cb, ip_c, 3)?;
    world.stop()
}
