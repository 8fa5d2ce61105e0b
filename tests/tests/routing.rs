//! One network, two subnets, as `docker network create -d overlay --subnet
//! A --subnet B` makes: containers in either subnet reach each other on the
//! same host and across hosts, routed by their gateway in eBPF — one hop
//! in traceroute, one less TTL — and the gateway itself answers.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{Lab, Netns, TwoHosts, ping, wait_until};

const NETWORK: &str = "prod-net";
const SUBNET_1: &str = "198.18.1.0/24";
const SUBNET_2: &str = "198.18.2.0/24";
const GATEWAY_1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

/// A container on host `host`, in subnet `subnet` of the network.
struct Member {
    name: &'static str,
    netns: Netns,
    ip: Ipv4Addr,
}

/// Two hosts, the two-subnet network, and a container of each subnet on
/// each host: a1, a2 on host A; b1, b2 on host B (digit = subnet).
fn world(lab: &Lab) -> Result<(TwoHosts, Vec<Member>)> {
    let world = TwoHosts::start(lab, "auto")?;
    world.ovl.create_network(
        &world.hosts[0].netns,
        NETWORK,
        SUBNET_1,
        &["--subnet", SUBNET_2],
    )?;
    let mut members = Vec::new();
    for (name, host, subnet) in [
        ("a1", 0, SUBNET_1),
        ("a2", 0, SUBNET_2),
        ("b1", 1, SUBNET_1),
        ("b2", 1, SUBNET_2),
    ] {
        let netns = lab.container(name)?;
        let ip = world.ovl.connect(
            &world.hosts[host],
            TwoHosts::NODES[host],
            NETWORK,
            &netns,
            &["--subnet", subnet],
        )?;
        members.push(Member { name, netns, ip });
    }
    Ok((world, members))
}

/// The TTL of the first echo reply in ping's output (`ttl=63`).
fn reply_ttl(output: &str) -> Option<u8> {
    output
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ttl=")?.parse().ok())
}

#[test]
fn containers_of_two_subnets_on_two_hosts_all_reach_each_other_through_the_gateway() -> Result<()> {
    let lab = Lab::new("routing")?;
    let (world, members) = world(&lab)?;
    for m in &members {
        let in_subnet_2 = m.name.ends_with('2');
        let want = if in_subnet_2 {
            "198.18.2."
        } else {
            "198.18.1."
        };
        ensure!(
            m.ip.to_string().starts_with(want),
            "{} got {} outside its subnet",
            m.name,
            m.ip
        );
    }
    // Every pair, both ways (the first ping of a pair also waits for the
    // agents to have the endpoints).
    for from in &members {
        for to in members.iter().filter(|t| t.name != from.name) {
            wait_until(Duration::from_secs(10), || {
                Ok(ping(&from.netns, to.ip, 1, &["-W", "1"])?.all_received())
            })
            .with_context(|| format!("{} -> {} ({})", from.name, to.name, to.ip))?;
            let r = ping(&from.netns, to.ip, 3, &["-i", "0.2", "-W", "1"])?;
            ensure!(
                r.all_received(),
                "{} -> {} lost packets:\n{}",
                from.name,
                to.name,
                r.output
            );
            // A reply crossed the gateway once when the subnets differ.
            let routed = from.name.as_bytes()[1] != to.name.as_bytes()[1];
            let ttl = reply_ttl(&r.output).context("no ttl in ping output")?;
            let want = if routed { 63 } else { 64 };
            ensure!(
                ttl == want,
                "{} -> {}: reply TTL {ttl}, expected {want} ({}):\n{}",
                from.name,
                to.name,
                if routed { "routed" } else { "same subnet" },
                r.output
            );
        }
    }
    // The gateway answers echo itself.
    let r = ping(&members[0].netns, GATEWAY_1, 2, &["-i", "0.2", "-W", "1"])?;
    ensure!(r.all_received(), "gateway did not answer:\n{}", r.output);
    // Routed between hosts and on one host, counted where they left.
    let a = world.counters(0, NETWORK)?;
    ensure!(
        a.tx_packets > 0 && a.local_packets > 0,
        "host A counted no traffic: {a:?}"
    );
    ensure!(a.drops() == 0, "host A dropped: {a:?}");
    world.stop()
}

#[test]
fn traceroute_across_subnets_shows_exactly_the_gateway() -> Result<()> {
    let lab = Lab::new("traceroute")?;
    let (world, members) = world(&lab)?;
    let (a1, b2) = (&members[0], &members[3]);
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&a1.netns, b2.ip, 1, &["-W", "1"])?.all_received())
    })?;
    let before = world.counters(0, NETWORK)?;
    let dst = b2.ip.to_string();
    // UDP probes, one per hop, numeric: hop 1 must be the gateway (it
    // answers TTL 1 with time exceeded), hop 2 the destination.
    let out = a1
        .netns
        .exec(&["traceroute", "-n", "-q", "1", "-w", "2", "-m", "5", &dst])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let hops: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    ensure!(hops.len() == 2, "expected 2 hops:\n{text}");
    ensure!(
        hops[0].get(1) == Some(&GATEWAY_1.to_string().as_str()),
        "hop 1 is not the gateway {GATEWAY_1}:\n{text}"
    );
    ensure!(
        hops[1].get(1) == Some(&dst.as_str()),
        "hop 2 is not {dst}:\n{text}"
    );
    let after = world.counters(0, NETWORK)?;
    ensure!(
        after.ttl_exceeded > before.ttl_exceeded,
        "the gateway's answer was not counted: {before:?} -> {after:?}"
    );
    world.stop()
}
