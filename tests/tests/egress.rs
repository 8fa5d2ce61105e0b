//! External egress, Docker's gwbridge role: a container reaches addresses
//! outside its network through its host, masqueraded behind the host's
//! underlay address, and the replies come back; an `--internal` network
//! has no way out; a container that leaves takes its translations along.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{Lab, Netns, TwoHosts, ping, wait_until};

const NETWORK: &str = "web";
/// The router's address on host B's subnet: outside every overlay, one
/// routed hop beyond host A's underlay.
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SERVER_PORT: u16 = 8080;
/// Host A's underlay address, which the outside world must see.
const HOST_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Host B's underlay address: beyond the router, on its far link.
const HOST_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const GREETING: &str = "hello from outside";

/// Two hosts, the network (`extra` flags), a container on host A.
fn world(lab: &Lab, extra: &[&str]) -> Result<(TwoHosts, Netns, Ipv4Addr)> {
    let world = TwoHosts::start(lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, NETWORK, "198.18.0.0/24", extra)?;
    let (c1, ip1) = world.container(lab, 0, NETWORK, "c1")?;
    Ok((world, c1, ip1))
}

/// Whether one echo request from `c` to the server beyond the router is
/// answered (within 1 s): the container's way out works.
fn reaches_server(c: &Netns) -> Result<bool> {
    Ok(ping(c, SERVER, 1, &["-W", "1"])?.all_received())
}

/// IPv4 forwarding on the underlay of host `host`: "1" or "0".
fn underlay_forwarding(host: &Netns) -> Result<String> {
    let out = host.exec(&["sysctl", "-n", "net.ipv4.conf.eth0.forwarding"])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A TCP server on the router that accepts one connection, prints the
/// peer's address and greets it.
fn start_server(lab: &Lab, world: &TwoHosts) -> Result<ovl_tests::ChildHandle> {
    let serve = format!(
        "print('peer', peer[0], flush=True)\n\
         c.sendall(b'{GREETING}\\n')\n\
         c.close()"
    );
    lab.python_tcp_server(&world.router, SERVER, SERVER_PORT, &serve)
}

/// `nc` from `c` to the server: what it received (empty when it failed).
fn fetch(c: &Netns) -> Result<String> {
    let out = c.exec_unchecked(&[
        "nc",
        "-w",
        "3",
        &SERVER.to_string(),
        &SERVER_PORT.to_string(),
    ])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A PATH whose `nft` runs shell line `first`, then the real nft: a
/// directory `name` of the lab's holds the wrapper.
fn wrapped_nft(lab: &Lab, name: &str, first: &str) -> Result<String> {
    let real_nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("nft is not installed")?;
    let bin = lab.tempdir().join(name);
    std::fs::create_dir_all(&bin)?;
    let nft = bin.join("nft");
    std::fs::write(
        &nft,
        format!("#!/bin/sh\n{first}\nexec {real_nft} \"$@\"\n"),
    )?;
    std::fs::set_permissions(&nft, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    ))
}

/// Conntrack entries in `host` whose original source is `ip`.
fn translations_of(host: &Netns, ip: Ipv4Addr) -> Result<Vec<String>> {
    let out = host.exec_unchecked(&["conntrack", "-L", "-s", &ip.to_string()])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("src={ip} ")))
        .map(str::to_owned)
        .collect())
}

/// Conntrack entries in `host` carrying ovl's egress mark (any network's:
/// ovl-common's `EGRESS_MARK_BASE` under `EGRESS_MARK_MASK`).
fn marked_translations(host: &Netns) -> Result<Vec<String>> {
    let out = host.exec(&["conntrack", "-L", "-m", "0x6f000000/0xff000000"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// Source and destination addresses of the first `count` packets
/// matching capture filter `filter` that tshark sees on the router's link
/// toward host B while `send` runs (once the capture has started).
fn on_the_far_link(
    lab: &Lab,
    world: &TwoHosts,
    filter: &str,
    count: usize,
    send: impl FnOnce() -> Result<()>,
) -> Result<Vec<(String, String)>> {
    let pcap = lab
        .tempdir()
        .join(format!("far-{}.pcap", filter.replace(' ', "-")));
    let pcap_text = pcap.to_string_lossy().into_owned();
    let far_link = world.router.iface_with_addr(SERVER)?;
    let tshark = lab.spawn(
        &world.router,
        &[
            "tshark",
            "-i",
            &far_link,
            "-f",
            filter,
            "-c",
            &count.to_string(),
            "-a",
            "duration:20",
            "-w",
            &pcap_text,
        ],
        &[],
    )?;
    wait_until(Duration::from_secs(15), || {
        Ok(tshark.stderr()?.contains("Capture started"))
    })
    .with_context(|| format!("tshark did not start:\n{}", tshark.output_report()))?;
    send()?;
    tshark.wait_timeout(Duration::from_secs(25))?;
    let out = ovl_tests::run(&[
        "tshark", "-r", &pcap_text, "-T", "fields", "-e", "ip.src", "-e", "ip.dst",
    ])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (s, d) = l.split_once('\t')?;
            Some((s.to_owned(), d.to_owned()))
        })
        .collect())
}

/// Source and destination addresses of the ICMP packets tshark sees on
/// the router's link toward host B while `c` pings the server 3 times.
fn icmp_on_the_far_link(lab: &Lab, world: &TwoHosts, c: &Netns) -> Result<Vec<(String, String)>> {
    on_the_far_link(lab, world, "icmp", 6, || {
        // The server is the router itself: its own replies leave on no
        // link, so ping a host behind it instead — host B's underlay
        // address.
        let r = ping(c, HOST_B, 3, &["-i", "0.2", "-W", "2"])?;
        ensure!(r.all_received(), "pings to host B were lost:\n{}", r.output);
        Ok(())
    })
}

#[test]
fn a_container_reaches_the_underlay_masqueraded_and_leaves_no_translation_behind() -> Result<()> {
    let lab = Lab::new("egress")?;
    let (world, c1, ip1) = world(&lab, &[])?;
    let host_a = &world.hosts[0].netns;
    wait_until(Duration::from_secs(10), || reaches_server(&c1))
        .context("the container never reached the router")?;

    let server = start_server(&lab, &world)?;
    let got = fetch(&c1)?;
    ensure!(
        got.contains(GREETING),
        "nc got {got:?}:\n{}",
        server.output_report()
    );
    wait_until(Duration::from_secs(5), || {
        Ok(server.stdout()?.contains("peer"))
    })?;
    let peer = server.stdout()?;
    ensure!(
        peer.contains(&format!("peer {HOST_A}\n")),
        "the server saw another source than host A's {HOST_A}: {peer}"
    );

    // ICMP too: on the wire beyond host A only host A's address shows.
    let before = world.counters(0, NETWORK)?;
    let packets = icmp_on_the_far_link(&lab, &world, &c1)?;
    let after = world.counters(0, NETWORK)?;
    ensure!(packets.len() == 6, "captured {packets:?}");
    for (src, dst) in &packets {
        ensure!(
            src == &HOST_A.to_string() || dst == &HOST_A.to_string(),
            "a packet not from or to host A: {src} -> {dst}"
        );
        ensure!(
            !src.starts_with("198.18.") && !dst.starts_with("198.18."),
            "an overlay address left host A: {src} -> {dst}"
        );
    }
    // Egress counts what the container sends out of its network: the 3
    // echo requests (the replies come back through the host's stack).
    ensure!(
        after.egress_packets - before.egress_packets == 3,
        "3 echo requests left, egress counted {}: {before:?} -> {after:?}",
        after.egress_packets - before.egress_packets
    );
    ensure!(
        !translations_of(host_a, ip1)?.is_empty(),
        "no conntrack entry for {ip1} on host A: the check below would prove nothing"
    );

    world.run(0, &["disconnect", NETWORK, c1.name()])?;
    let mut left = Vec::new();
    wait_until(Duration::from_secs(5), || {
        left = translations_of(host_a, ip1)?;
        Ok(left.is_empty())
    })
    .with_context(|| format!("translations of {ip1} left after disconnect: {left:#?}"))?;
    let set = host_a.exec(&["nft", "list", "set", "ip", "ovl", "endpoints"])?;
    let set = String::from_utf8_lossy(&set.stdout).into_owned();
    ensure!(
        !set.contains(&ip1.to_string()),
        "{ip1} is still masqueraded:\n{set}"
    );
    let routes = host_a.ip(&["route", "show", "table", "all"])?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    ensure!(
        !routes.contains(&ip1.to_string()),
        "a route to {ip1} is left:\n{routes}"
    );
    world.stop()
}

/// Packets of ovl's egress that conntrack took for invalid, as nft counts
/// them in the chain that drops them.
fn invalid_dropped(host: &Netns) -> Result<u64> {
    let out = host.exec(&["nft", "list", "chain", "ip", "ovl", "invalid"])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_once("counter packets ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no counter in chain invalid:\n{text}"))
}

/// A container's packet that conntrack cannot place (here a TCP segment
/// with both SYN and FIN) gets no translation: forwarded as it is, it would
/// carry the container's overlay address onto the underlay. The host drops
/// it, and the container's next, valid packet leaves masqueraded.
#[test]
fn a_packet_conntrack_takes_for_invalid_never_leaves_untranslated() -> Result<()> {
    let lab = Lab::new("egress-inv")?;
    let (world, c1, _ip1) = world(&lab, &[])?;
    let host_a = &world.hosts[0].netns;
    wait_until(Duration::from_secs(10), || reaches_server(&c1))
        .context("the container never reached the router")?;
    let dropped_before = invalid_dropped(host_a)?;
    let before = world.counters(0, NETWORK)?;
    // In order on one path: had the invalid segment left, it would be the
    // first packet to port 9 on the far link.
    let script = format!(
        "from scapy.all import IP, TCP, send\n\
         send(IP(dst='{HOST_B}') / TCP(sport=40002, dport=9, flags='SF'), verbose=False)\n\
         send(IP(dst='{HOST_B}') / TCP(sport=40001, dport=9, flags='S'), verbose=False)\n"
    );
    let first = on_the_far_link(&lab, &world, "tcp dst port 9", 1, || {
        c1.exec(&["/usr/bin/python3", "-c", &script])?;
        Ok(())
    })?;
    ensure!(
        first == [(HOST_A.to_string(), HOST_B.to_string())],
        "the first segment to port 9 beyond host A was {first:?}, not the valid SYN from \
         {HOST_A}: an overlay source means the invalid segment left untranslated"
    );
    let after = world.counters(0, NETWORK)?;
    ensure!(
        after.egress_packets - before.egress_packets == 2,
        "both segments should have been handed to the host: {before:?} -> {after:?}"
    );
    let dropped = invalid_dropped(host_a)? - dropped_before;
    ensure!(
        dropped == 1,
        "the host dropped {dropped} invalid packets of ovl's egress, not 1"
    );
    world.stop()
}

#[test]
fn an_internal_network_has_no_way_out() -> Result<()> {
    let lab = Lab::new("internal")?;
    let (world, c1, _ip1) = world(&lab, &["--internal"])?;
    // The overlay itself works.
    let (_c2, ip2) = world.container(&lab, 1, NETWORK, "c2")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;
    let routes = c1.ip(&["route", "show"])?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    ensure!(
        !routes.contains("default"),
        "a container of an internal network got a default route:\n{routes}"
    );
    // Even a container that adds one itself gets nowhere: ovl drops it.
    c1.ip(&["route", "add", "default", "via", "198.18.0.1"])?;
    let before = world.counters(0, NETWORK)?;
    let _server = start_server(&lab, &world)?;
    let r = ping(&c1, SERVER, 3, &["-i", "0.2", "-W", "1"])?;
    ensure!(
        r.received == 0,
        "an internal container reached {SERVER}:\n{}",
        r.output
    );
    let pinged = world.counters(0, NETWORK)?;
    ensure!(
        pinged.no_route - before.no_route == 3 && pinged.egress_packets == before.egress_packets,
        "3 echo requests, not each dropped as no_route: {before:?} -> {pinged:?}"
    );
    ensure!(
        !fetch(&c1)?.contains(GREETING),
        "an internal container opened a connection to {SERVER}"
    );
    // nc's SYN, and as many retransmissions as fit its timeout.
    let after = world.counters(0, NETWORK)?;
    ensure!(
        after.no_route > pinged.no_route && after.egress_packets == before.egress_packets,
        "nc's SYNs were not dropped as no_route: {pinged:?} -> {after:?}"
    );
    world.stop()
}

#[test]
fn egress_survives_the_agent_and_ovl_detach_removes_it() -> Result<()> {
    let lab = Lab::new("egress-dt")?;
    let (mut world, c1, _ip1) = world(&lab, &[])?;
    let host_a = world.hosts[0].netns.clone();
    wait_until(Duration::from_secs(10), || reaches_server(&c1))?;
    let forwarding = || underlay_forwarding(&host_a);
    ensure!(
        forwarding()? == "1",
        "the agent did not switch forwarding on"
    );

    // The agent dies: what it installed keeps working.
    let agent = world.agents.remove(0);
    agent.kill()?;
    agent.wait_exit(Duration::from_secs(5))?;
    let _server = start_server(&lab, &world)?;
    ensure!(
        fetch(&c1)?.contains(GREETING),
        "no external egress without the agent"
    );

    // The fetch above left translations carrying ovl's mark: the check
    // after detach has something to find gone.
    ensure!(
        !marked_translations(&host_a)?.is_empty(),
        "no conntrack entry with ovl's mark before detach: the check below would prove nothing"
    );
    let out = world.run(0, &["detach", "eth0"])?;
    ensure!(out.contains("nftables table ip ovl"), "detach said:\n{out}");
    let tables = host_a.exec(&["nft", "list", "tables"])?;
    let tables = String::from_utf8_lossy(&tables.stdout).into_owned();
    ensure!(!tables.contains("ovl"), "nft tables left: {tables}");
    let rules = host_a.ip(&["rule", "show"])?;
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    ensure!(!rules.contains("1000:"), "ovl's rules left:\n{rules}");
    ensure!(
        forwarding()? == "0",
        "forwarding on eth0 was not switched back off"
    );
    let tracked = marked_translations(&host_a)?;
    ensure!(tracked.is_empty(), "ovl's translations left:\n{tracked:#?}");
    world.stop()
}

#[test]
fn forwarding_is_switched_on_only_once_its_guard_is_in_place() -> Result<()> {
    let lab = Lab::new("egress-fw")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].netns.clone();
    let forwarding = || underlay_forwarding(&host_a);
    ensure!(
        forwarding()? == "0",
        "forwarding on before anything led out"
    );

    // A's agent finds an `nft` that lists tables but fails to load a
    // ruleset (as on a kernel without NAT).
    let path = wrapped_nft(
        &lab,
        "failing-nft",
        "case \" $* \" in *' -f '*) echo 'nft: NAT not supported here' >&2; exit 1;; esac",
    )?;
    world.terminate_agent(0)?;
    world.restart_agent(&lab, 0, &[("PATH", &path)])?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, NETWORK, "198.18.0.0/24", &[])?;
    let (_c1, _) = world.container(&lab, 0, NETWORK, "c1")?;
    wait_until(Duration::from_secs(10), || {
        Ok(world.agents[0]
            .log()?
            .contains("external egress cannot be set up"))
    })
    .with_context(|| format!("no egress failure:\n{}", world.agents[0].output_report()))?;
    ensure!(
        forwarding()? == "0",
        "nft failed, yet forwarding on eth0 was switched on (with no guard)"
    );

    // With nft back, the guard goes in, then forwarding on; detach undoes it.
    world.terminate_agent(0)?;
    world.restart_agent(&lab, 0, &[])?;
    wait_until(Duration::from_secs(10), || Ok(forwarding()? == "1"))
        .context("the agent did not switch forwarding on once nft worked")?;
    let table = host_a.exec(&["nft", "list", "table", "ip", "ovl"])?;
    ensure!(
        String::from_utf8_lossy(&table.stdout).contains("underlay_guard"),
        "forwarding on without the guard chain"
    );
    world.terminate_agent(0)?;
    world.run(0, &["detach", "eth0"])?;
    ensure!(forwarding()? == "0", "detach left forwarding on");
    world.stop()
}

/// Whether host `host` has ovl's table with its underlay guard.
fn guarded_table(host: &Netns) -> Result<bool> {
    let out = host.exec_unchecked(&["nft", "list", "table", "ip", "ovl"])?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("chain underlay_guard"))
}

/// An operator's `nft flush ruleset` (what `systemctl restart nftables`
/// runs on Debian) deletes ovl's table and says nothing to the agent, but
/// leaves the forwarding ovl switched on: the agent puts the table back,
/// guard included (also a guard deleted alone), without waiting for a
/// container to come or go, and `ovl detach` still switches that
/// forwarding off.
#[test]
fn a_table_an_operator_flushed_comes_back_with_its_guard() -> Result<()> {
    let lab = Lab::new("egress-flush")?;
    let (mut world, c1, _ip1) = world(&lab, &[])?;
    let host_a = world.hosts[0].netns.clone();
    wait_until(Duration::from_secs(10), || reaches_server(&c1))?;
    ensure!(
        underlay_forwarding(&host_a)? == "1" && guarded_table(&host_a)?,
        "the agent did not switch forwarding on behind its guard"
    );

    // Nothing comes or goes: only the agent's own look brings it back.
    host_a.exec(&["nft", "flush", "ruleset"])?;
    wait_until(Duration::from_secs(30), || reaches_server(&c1)).with_context(|| {
        format!(
            "no way out after the flush:
{}",
            world.agents[0].output_report()
        )
    })?;
    let _server = start_server(&lab, &world)?;
    ensure!(fetch(&c1)?.contains(GREETING), "no TCP out after the flush");
    ensure!(
        guarded_table(&host_a)?,
        "the table came back without its guard: eth0 forwards whatever arrives"
    );

    // Flushed again, then a container comes: the table it brings back is
    // guarded too.
    host_a.exec(&["nft", "flush", "ruleset"])?;
    let (c2, _) = world.container(&lab, 0, NETWORK, "c2")?;
    wait_until(Duration::from_secs(10), || reaches_server(&c2))?;
    ensure!(
        guarded_table(&host_a)?,
        "the table a new container brought back has no guard: eth0 forwards whatever arrives"
    );

    // The guard alone deleted comes back too.
    host_a.exec(&["nft", "delete", "chain", "ip", "ovl", "underlay_guard"])?;
    wait_until(Duration::from_secs(30), || guarded_table(&host_a))
        .context("the guard deleted alone did not come back: eth0 forwards whatever arrives")?;

    world.terminate_agent(0)?;
    world.run(0, &["detach", "eth0"])?;
    ensure!(
        underlay_forwarding(&host_a)? == "0",
        "detach left the forwarding ovl switched on"
    );
    world.stop()
}

/// Deletes host A's `fwmark → table` rule of the network, as
/// systemd-networkd does to rules it did not make; returns the mark.
fn delete_rule(world: &TwoHosts) -> Result<u64> {
    let vni = world.inspect(0, NETWORK)?["vni"]
        .as_u64()
        .context("no VNI")?;
    // ovl-common's EGRESS_MARK_BASE: the mark and the table's number.
    let mark = 0x6f00_0000 | vni;
    let m = mark.to_string();
    world.hosts[0]
        .netns
        .ip(&["rule", "del", "priority", "1000", "fwmark", &m, "table", &m])?;
    Ok(mark)
}

/// A rule deleted while no agent ran leaves its table of return routes:
/// `ovl detach` removes that table too.
#[test]
fn detach_removes_a_return_table_whose_rule_is_gone() -> Result<()> {
    let lab = Lab::new("egress-dtrt")?;
    let (mut world, c1, ip1) = world(&lab, &[])?;
    wait_until(Duration::from_secs(10), || reaches_server(&c1))?;
    world.terminate_agent(0)?;
    delete_rule(&world)?;
    world.run(0, &["detach", "eth0"])?;
    let routes = world.hosts[0]
        .netns
        .ip(&["route", "show", "table", "all"])?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    ensure!(
        !routes.contains(&ip1.to_string()),
        "a route to {ip1} is left after detach:\n{routes}"
    );
    world.stop()
}

/// The underlay is gone (a NIC unplugged, a driver unloaded) when the
/// operator detaches: its forwarding went with it, and the rest goes too.
#[test]
fn detach_removes_egress_after_the_underlay_is_gone() -> Result<()> {
    let lab = Lab::new("egress-dtgone")?;
    let (mut world, c1, ip1) = world(&lab, &[])?;
    let host_a = world.hosts[0].netns.clone();
    wait_until(Duration::from_secs(10), || reaches_server(&c1))?;
    world.terminate_agent(0)?;
    host_a.ip(&["link", "del", "eth0"])?;
    let out = world.run(0, &["detach", "eth0"])?;
    ensure!(out.contains("nftables table ip ovl"), "detach said:\n{out}");
    let tables = host_a.exec(&["nft", "list", "tables"])?;
    let tables = String::from_utf8_lossy(&tables.stdout).into_owned();
    ensure!(!tables.contains("ovl"), "nft tables left: {tables}");
    let rules = host_a.ip(&["rule", "show"])?;
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    ensure!(!rules.contains("1000:"), "ovl's rules left:\n{rules}");
    let routes = host_a.ip(&["route", "show", "table", "all"])?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    ensure!(
        !routes.contains(&ip1.to_string()),
        "a route to {ip1} is left after detach:\n{routes}"
    );
    world.stop()
}

/// systemd-networkd deletes the routing policy rules it did not make
/// whenever it reconfigures (`ManageForeignRoutingPolicyRules=`, on by
/// default), ovl's `fwmark → table` rule among them: replies then find no
/// way back to their container. The agent puts the rule back by itself.
#[test]
fn a_rule_someone_deleted_comes_back() -> Result<()> {
    let lab = Lab::new("egress-rule")?;
    let (world, c1, _ip1) = world(&lab, &[])?;
    let host_a = world.hosts[0].netns.clone();
    let reached = || reaches_server(&c1);
    wait_until(Duration::from_secs(10), reached)?;
    let mark = delete_rule(&world)?;
    let rule = format!("fwmark {mark:#x} lookup {mark}");
    let mut rules = String::new();
    wait_until(Duration::from_secs(30), || {
        let out = host_a.ip(&["rule", "show", "priority", "1000"])?;
        rules = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(rules.contains(&rule))
    })
    .with_context(|| format!("the rule did not come back: {rules:?}"))?;
    ensure!(reached()?, "no way back with the rule back");
    world.stop()
}

/// `sysctl net.ipv4.ip_forward=0` (a hardening profile's, on a host that
/// forwarded) switches forwarding off on every device, the container
/// veths too, with nothing telling the agent: it switches theirs on again.
#[test]
fn forwarding_switched_off_everywhere_comes_back_on_the_veths() -> Result<()> {
    let lab = Lab::new("egress-ipfwd")?;
    let (world, c1, _ip1) = world(&lab, &[])?;
    let host_a = world.hosts[0].netns.clone();
    let reached = || reaches_server(&c1);
    wait_until(Duration::from_secs(10), reached)?;
    let veth = world.host_end(0, NETWORK, &c1)?;
    let veth_forwarding = || -> Result<String> {
        let key = format!("net.ipv4.conf.{veth}.forwarding");
        let out = host_a.exec(&["sysctl", "-n", &key])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // The host forwarded; then it is told not to (only a change of
    // `all` reaches the devices).
    host_a.exec(&["sysctl", "-w", "net.ipv4.ip_forward=1"])?;
    host_a.exec(&["sysctl", "-w", "net.ipv4.ip_forward=0"])?;
    wait_until(Duration::from_secs(30), || Ok(veth_forwarding()? == "1"))
        .context("forwarding on the container's veth stayed off")?;
    // An apply that read the underlay's forwarding just before it went
    // off may set the veth's first: the next look (10 s) sets the
    // underlay's.
    wait_until(Duration::from_secs(25), reached)
        .context("no way out with the veth forwarding again")?;
    world.stop()
}

/// A UDP server on the router that waits for two datagrams, then answers
/// each sender with `echo:` and what it sent, and prints the peers.
const UDP_PAIR_SERVER: &str = "import socket\n\
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
s.bind(('198.51.100.1', 9000))\n\
print('listening', flush=True)\n\
got = [s.recvfrom(100) for _ in range(2)]\n\
for data, peer in got:\n\
\x20   print('peer', peer[0], peer[1], data.decode(), flush=True)\n\
\x20   s.sendto(b'echo:' + data, peer)\n";

/// A UDP client that sends `text` from port 5000 to the pair server and
/// prints what comes back within 10 s.
fn udp_client(text: &str) -> String {
    format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', 5000))\n\
         s.settimeout(10)\n\
         s.sendto(b'{text}', ('198.51.100.1', 9000))\n\
         print('sent', flush=True)\n\
         try:\n\
         \x20   print('got', s.recv(100).decode(), flush=True)\n\
         except socket.timeout:\n\
         \x20   print('nothing', flush=True)\n"
    )
}

#[test]
fn networks_sharing_a_subnet_keep_their_translations_apart() -> Result<()> {
    let lab = Lab::new("egress-zone")?;
    let world = TwoHosts::start(&lab, "auto")?;
    for net in ["blue", "red"] {
        world
            .ovl
            .create_network(&world.hosts[0].netns, net, "198.18.0.0/24", &[])?;
    }
    let (blue, blue_ip) = world.container(&lab, 0, "blue", "cb")?;
    let (red, red_ip) = world.container(&lab, 0, "red", "cr")?;
    ensure!(
        blue_ip == red_ip,
        "{blue_ip} and {red_ip}: the test needs one address"
    );
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&blue, SERVER, 1, &["-W", "1"])?.all_received()
            && ping(&red, SERVER, 1, &["-W", "1"])?.all_received())
    })
    .with_context(|| format!("no egress for both:\n{}", world.agents[0].output_report()))?;

    // Same address, same port, same destination, one after the other; the
    // server answers both once it has both.
    let server = lab.spawn(
        &world.router,
        &["/usr/bin/python3", "-c", UDP_PAIR_SERVER],
        &[],
    )?;
    wait_until(Duration::from_secs(10), || {
        Ok(server.stdout()?.contains("listening"))
    })?;
    let from_blue = lab.spawn(&blue, &["/usr/bin/python3", "-c", &udp_client("blue")], &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(from_blue.stdout()?.contains("sent"))
    })?;
    let from_red = lab.spawn(&red, &["/usr/bin/python3", "-c", &udp_client("red")], &[])?;
    for c in [&from_blue, &from_red] {
        c.wait_timeout(Duration::from_secs(20))?;
    }
    ensure!(
        from_blue.stdout()?.contains("got echo:blue")
            && from_red.stdout()?.contains("got echo:red"),
        "each container must get its own answer:\nblue: {}\nred: {}\nserver: {}",
        from_blue.stdout()?,
        from_red.stdout()?,
        server.stdout()?
    );
    // Two translations, so two source ports at the server.
    let ports: std::collections::BTreeSet<String> = server
        .stdout()?
        .lines()
        .filter_map(|l| l.strip_prefix("peer 192.0.2.10 "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    ensure!(ports.len() == 2, "source ports at the server: {ports:?}");
    world.stop()
}

/// Conntrack entries in `host` of TCP connections from `ip` to the server.
fn connections_to_the_server(host: &Netns, ip: Ipv4Addr) -> Result<Vec<String>> {
    Ok(translations_of(host, ip)?
        .into_iter()
        .filter(|l| l.starts_with("tcp") && l.contains(&format!("dport={SERVER_PORT} ")))
        .collect())
}

#[test]
fn an_address_taken_over_while_no_agent_ran_does_not_inherit_translations() -> Result<()> {
    let lab = Lab::new("egress-reuse")?;
    let (mut world, c1, ip1) = world(&lab, &[])?;
    let host_a = world.hosts[0].clone();
    wait_until(Duration::from_secs(10), || reaches_server(&c1))?;
    let server = start_server(&lab, &world)?;
    ensure!(
        fetch(&c1)?.contains(GREETING),
        "nc failed:\n{}",
        server.output_report()
    );
    // The closed connection stays tracked (TIME_WAIT, 2 minutes).
    ensure!(
        !connections_to_the_server(&host_a.netns, ip1)?.is_empty(),
        "no conntrack entry of c1's connection: the check below would prove nothing"
    );

    // With the agent down, c1 leaves and c2 takes its address.
    let agent = world.agents.remove(0);
    agent.kill()?;
    agent.wait_exit(Duration::from_secs(5))?;
    world.run(0, &["disconnect", NETWORK, c1.name()])?;
    let (c2, ip2) = world.container(&lab, 0, NETWORK, "c2")?;
    ensure!(ip2 == ip1, "c2 got {ip2}, not c1's {ip1}");
    ensure!(
        !connections_to_the_server(&host_a.netns, ip1)?.is_empty(),
        "c1's translations went without an agent: the check below would prove nothing"
    );

    world
        .agents
        .insert(0, world.ovl.attach(&lab, &host_a, "host-a", "auto")?);
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c2, SERVER, 1, &["-W", "1"])?.all_received())
    })
    .context("c2 never reached the router")?;
    let left = connections_to_the_server(&host_a.netns, ip1)?;
    ensure!(
        left.is_empty(),
        "c2 holds {ip1} with c1's translations:\n{left:#?}"
    );
    world.stop()
}

#[test]
fn a_node_without_external_egress_runs_no_nft_on_link_events() -> Result<()> {
    let lab = Lab::new("egress-quiet")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].netns.clone();
    // An `nft` that notes each run before it does it.
    let runs = lab.tempdir().join("nft-runs");
    let path = wrapped_nft(
        &lab,
        "counting-nft",
        &format!("echo \"$*\" >> {}", runs.display()),
    )?;
    world.terminate_agent(0)?;
    world.restart_agent(&lab, 0, &[("PATH", &path)])?;
    // Only an internal network here: nothing leads out of host A.
    world
        .ovl
        .create_network(&host_a, NETWORK, "198.18.0.0/24", &["--internal"])?;
    let (_c1, _) = world.container(&lab, 0, NETWORK, "c1")?;
    let count = || -> Result<usize> {
        Ok(std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count())
    };
    // Settled: the start's own check (and any after the connect) done.
    std::thread::sleep(Duration::from_secs(2));
    let before = count()?;
    // Other tools' links come and go (container runtimes' veths).
    for i in 0..10 {
        let (a, b) = (format!("qa{i}"), format!("qb{i}"));
        host_a.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        host_a.ip(&["link", "del", &a])?;
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = count()?;
    ensure!(
        after == before,
        "{} nft runs on link events of other links:\n{}",
        after - before,
        std::fs::read_to_string(&runs).unwrap_or_default()
    );
    world.stop()
}

/// One container's veth that cannot take its return route (its host end
/// down: a connect killed before it raised it, or an operator) costs
/// only that container its way out: a container connected after it
/// reaches the outside, and the agent's log names the failing veth. It
/// once failed the whole batch of return routes, and every container
/// connected meanwhile got none.
#[test]
fn a_veth_that_cannot_take_its_return_route_costs_only_its_own_container() -> Result<()> {
    let lab = Lab::new("egress-down")?;
    let (mut world, c1, _ip1) = world(&lab, &[])?;
    wait_until(Duration::from_secs(10), || reaches_server(&c1))?;
    let (c2, _ip2) = world.container(&lab, 0, NETWORK, "c2")?;
    let down = world.host_end(0, NETWORK, &c2)?;
    world.hosts[0].netns.ip(&["link", "set", &down, "down"])?;
    // A new agent installs every return route again, c2's first.
    world.kill_agent(0)?;
    world.restart_agent(&lab, 0, &[])?;
    let (c3, _ip3) = world.container(&lab, 0, NETWORK, "c3")?;
    wait_until(Duration::from_secs(10), || reaches_server(&c3))
        .context("c3 has no way out while c2's host end is down")?;
    ensure!(reaches_server(&c1)?, "c1 lost its way out");
    let log = world.agents[0].log()?;
    ensure!(
        log.contains("external egress cannot be set up") && log.contains(&down),
        "the agent did not name {down}:\n{log}"
    );
    world.stop()
}
