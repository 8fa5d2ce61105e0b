//! Published ports, Docker's `-p` through docker_gwbridge: a client
//! anywhere reaching host A's address and port reaches the container's
//! port, which sees the client's own address; a container reaching it
//! through its host's address (hairpin) does too, from any network, and is
//! seen as the host; a host port is published once per host; a container
//! that leaves takes its rule and connections along; an internal network
//! publishes nothing.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{ChildHandle, Lab, Netns, Signal, TwoHosts, wait_until};

const NETWORK: &str = "web";
/// Host A's underlay address: where the ports are published.
const HOST_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Host B's underlay address: the client, one routed hop away.
const HOST_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

/// A TCP server in `c` on every address, port `port`, that greets every
/// connection with `greeting` and prints the peer's address.
fn tcp_server(lab: &Lab, c: &Netns, port: u16, greeting: &str) -> Result<ChildHandle> {
    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port}))\n\
         s.listen(8)\n\
         print('listening', flush=True)\n\
         while True:\n\
         \x20   conn, peer = s.accept()\n\
         \x20   print('peer', peer[0], flush=True)\n\
         \x20   conn.sendall(b'{greeting}\\n')\n\
         \x20   conn.close()\n"
    );
    let server = lab.spawn(c, &["/usr/bin/python3", "-c", &script], &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(server.stdout()?.contains("listening"))
    })
    .with_context(|| format!("TCP server did not start:\n{}", server.output_report()))?;
    Ok(server)
}

/// A UDP server in `c` on `ip`:`port` that answers each datagram with
/// `pong ` and the datagram, and prints the peer's address. (Port 53 on
/// every address is not free: ovl's resolver has 127.0.0.11:53.)
fn udp_server(lab: &Lab, c: &Netns, ip: Ipv4Addr, port: u16) -> Result<ChildHandle> {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{ip}', {port}))\n\
         print('listening', flush=True)\n\
         while True:\n\
         \x20   data, peer = s.recvfrom(512)\n\
         \x20   print('peer', peer[0], flush=True)\n\
         \x20   s.sendto(b'pong ' + data, peer)\n"
    );
    let server = lab.spawn(c, &["/usr/bin/python3", "-c", &script], &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(server.stdout()?.contains("listening"))
    })
    .with_context(|| format!("UDP server did not start:\n{}", server.output_report()))?;
    Ok(server)
}

/// What a TCP connection from `from` to `addr`:`port` receives (empty
/// when it failed).
fn fetch(from: &Netns, addr: Ipv4Addr, port: u16) -> Result<String> {
    let out = from.exec_unchecked(&["nc", "-w", "3", &addr.to_string(), &port.to_string()])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The answer to one UDP datagram `ping` from `from` to `addr`:`port`
/// (empty when none came within 3 s).
fn udp_exchange(from: &Netns, addr: Ipv4Addr, port: u16) -> Result<String> {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         s.sendto(b'ping', ('{addr}', {port}))\n\
         try:\n\
         \x20   print(s.recv(512).decode())\n\
         except socket.timeout:\n\
         \x20   pass\n"
    );
    let out = from.exec(&["/usr/bin/python3", "-c", &script])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nft list table ip ovl` on `host`.
fn ovl_table(host: &Netns) -> Result<String> {
    let out = host.exec(&["nft", "list", "table", "ip", "ovl"])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The DNAT rules of chain `published` on `host`.
fn published_rules(host: &Netns) -> Result<Vec<String>> {
    let out = host.exec(&["nft", "list", "chain", "ip", "ovl", "published"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("dnat to"))
        .map(|l| l.trim().to_owned())
        .collect())
}

/// Conntrack entries on `host` whose replies come from `ip`.
fn connections_to(host: &Netns, ip: Ipv4Addr) -> Result<Vec<String>> {
    let out = host.exec_unchecked(&["conntrack", "-L", "-r", &ip.to_string()])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("src={ip} ")))
        .map(str::to_owned)
        .collect())
}

/// Waits until `server` has printed `peer ADDR` `n` times.
fn wait_peers(server: &ChildHandle, addr: Ipv4Addr, n: usize) -> Result<()> {
    let line = format!("peer {addr}\n");
    wait_until(Duration::from_secs(5), || {
        Ok(server.stdout()?.matches(&line).count() >= n)
    })
    .with_context(|| {
        format!(
            "the server did not see {addr} {n} time(s):\n{}",
            server.output_report()
        )
    })
}

#[test]
fn a_published_port_reaches_the_container_with_the_clients_address_until_it_leaves() -> Result<()> {
    let lab = Lab::new("published")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let (host_a, host_b) = (&world.hosts[0].netns.clone(), &world.hosts[1].netns.clone());
    world
        .ovl
        .create_network(host_a, NETWORK, "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    let out = world.run(
        0,
        &[
            "connect",
            NETWORK,
            c1.name(),
            "--publish",
            "8080:80",
            "--publish",
            "5353:53/udp",
        ],
    )?;
    ensure!(
        out.contains("publishes: 0.0.0.0:8080->80/tcp, 0.0.0.0:5353->53/udp"),
        "connect did not say what it publishes:\n{out}"
    );
    let ip1: Ipv4Addr = "198.18.0.2".parse()?;
    let web = tcp_server(&lab, &c1, 80, "hello from c1")?;
    let dns = udp_server(&lab, &c1, ip1, 53)?;

    // From host B, across the router: the container answers and sees
    // host B's own address (no SNAT).
    let mut got = String::new();
    wait_until(Duration::from_secs(10), || {
        got = fetch(host_b, HOST_A, 8080)?;
        Ok(got.contains("hello from c1"))
    })
    .with_context(|| format!("host B got {got:?} from {HOST_A}:8080"))?;
    wait_peers(&web, HOST_B, 1)?;
    let answer = udp_exchange(host_b, HOST_A, 5353)?;
    ensure!(
        answer.contains("pong ping"),
        "UDP to {HOST_A}:5353 got {answer:?}:\n{}",
        dns.output_report()
    );
    wait_peers(&dns, HOST_B, 1)?;
    // From host A itself, to its own underlay address.
    let got = fetch(host_a, HOST_A, 8080)?;
    ensure!(got.contains("hello from c1"), "host A got {got:?}");
    wait_peers(&web, HOST_A, 1)?;
    let listing = world.run(0, &["endpoint", "ls"])?;
    ensure!(
        listing.contains("publishes 0.0.0.0:8080->80/tcp, 0.0.0.0:5353->53/udp"),
        "endpoint ls does not show the ports:\n{listing}"
    );

    // Another container on host A may not take the port (on any address
    // of the host): refused, naming the holder, changing nothing.
    let table = ovl_table(host_a)?;
    let endpoints = world.run(0, &["endpoint", "ls", "--json"])?;
    let c2 = lab.container("c2")?;
    // An address host A does not have, its subnet's broadcast address or
    // a multicast one (a socket may bind to either): its rule would never
    // match.
    for foreign in ["203.0.113.99", "192.0.2.255", "224.0.0.251"] {
        let err = world.refused(
            0,
            &[
                "connect",
                NETWORK,
                c2.name(),
                "--publish",
                &format!("{foreign}:8081:80"),
            ],
        )?;
        ensure!(
            err.contains("not an address of this host"),
            "a port on {foreign} was published: {err}"
        );
    }
    let err = world.refused(
        0,
        &[
            "connect",
            NETWORK,
            c2.name(),
            "--publish",
            &format!("{HOST_A}:8080:8080"),
        ],
    )?;
    ensure!(
        err.contains("already published") && err.contains("c1"),
        "a second publisher of 8080 was not refused naming c1: {err}"
    );
    ensure!(
        world.run(0, &["endpoint", "ls", "--json"])? == endpoints,
        "the refused connect changed the store"
    );
    ensure!(
        ovl_table(host_a)? == table,
        "the refused connect changed nft"
    );

    // The agent restarts: the port keeps working; a rule lost meanwhile
    // comes back, once.
    world.terminate_agent(0)?;
    ensure!(
        fetch(host_b, HOST_A, 8080)?.contains("hello from c1"),
        "the port stopped working with the agent"
    );
    host_a.exec(&["nft", "flush", "chain", "ip", "ovl", "published"])?;
    world.restart_agent(&lab, 0, &[])?;
    world.agents[0].wait_in_step()?;
    let mut rules = Vec::new();
    wait_until(Duration::from_secs(10), || {
        rules = published_rules(host_a)?;
        Ok(rules.len() == 2)
    })
    .with_context(|| format!("after the restart the rules are {rules:#?}"))?;
    ensure!(
        fetch(host_b, HOST_A, 8080)?.contains("hello from c1"),
        "the port does not work after the agent's restart"
    );
    ensure!(
        !connections_to(host_a, ip1)?.is_empty(),
        "no conntrack entry of the published port: the check below would prove nothing"
    );

    // Leaving takes the rules and the connections along; the port is shut.
    world.run(0, &["disconnect", NETWORK, c1.name()])?;
    let mut left = Vec::new();
    wait_until(Duration::from_secs(5), || {
        left = published_rules(host_a)?;
        Ok(left.is_empty())
    })
    .with_context(|| format!("rules left after disconnect: {left:#?}"))?;
    wait_until(Duration::from_secs(5), || {
        left = connections_to(host_a, ip1)?;
        Ok(left.is_empty())
    })
    .with_context(|| format!("connections of {ip1} left after disconnect: {left:#?}"))?;
    let got = fetch(host_b, HOST_A, 8080)?;
    ensure!(got.is_empty(), "{HOST_A}:8080 still answers: {got:?}");
    // The port is free for another container now.
    world.run(0, &["connect", NETWORK, c2.name(), "--publish", "8080:80"])?;
    world.stop()
}

/// A UDP client in `from` sending `ping` from port `sport` to `addr`:`port`
/// every half millisecond until stopped: a flow that never pauses.
fn udp_flood(
    lab: &Lab,
    from: &Netns,
    sport: u16,
    addr: Ipv4Addr,
    port: u16,
) -> Result<ChildHandle> {
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', {sport}))\n\
         while True:\n\
         \x20   s.sendto(b'ping', ('{addr}', {port}))\n\
         \x20   time.sleep(0.0005)\n"
    );
    lab.spawn(from, &["/usr/bin/python3", "-c", &script], &[])
}

/// The network on host A and its container c1 at 198.18.0.2 publishing
/// 5353→53/udp, where a UDP server answers: (c1, its address, the server).
fn publishing_udp(lab: &Lab, world: &TwoHosts) -> Result<(Netns, Ipv4Addr, ChildHandle)> {
    world
        .ovl
        .create_network(&world.hosts[0].netns, NETWORK, "198.18.0.0/24", &[])?;
    let ip1: Ipv4Addr = "198.18.0.2".parse()?;
    let c1 = lab.container("c1")?;
    world.run(
        0,
        &[
            "connect",
            NETWORK,
            c1.name(),
            "--ip",
            &ip1.to_string(),
            "--publish",
            "5353:53/udp",
        ],
    )?;
    let server = udp_server(lab, &c1, ip1, 53)?;
    Ok((c1, ip1, server))
}

/// The network on host A with two subnets, its container c1 at 198.18.0.2
/// publishing 8080→80 and 5353→53/udp, where a TCP and a UDP server
/// answer: (c1, the TCP server, the UDP server).
fn publishing_both(lab: &Lab, world: &TwoHosts) -> Result<(Netns, ChildHandle, ChildHandle)> {
    world.ovl.create_network(
        &world.hosts[0].netns,
        NETWORK,
        "198.18.0.0/24",
        &["--subnet", "198.18.1.0/24"],
    )?;
    let c1 = lab.container("c1")?;
    world.run(
        0,
        &[
            "connect",
            NETWORK,
            c1.name(),
            "--ip",
            "198.18.0.2",
            "--publish",
            "8080:80",
            "--publish",
            "5353:53/udp",
        ],
    )?;
    let web = tcp_server(lab, &c1, 80, "hello from c1")?;
    let dns = udp_server(lab, &c1, "198.18.0.2".parse()?, 53)?;
    Ok((c1, web, dns))
}

#[test]
fn containers_reach_a_published_port_through_their_hosts_address() -> Result<()> {
    let lab = Lab::new("publishedhairpin")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let host_a = &world.hosts[0].netns.clone();
    let (c1, web, dns) = publishing_both(&lab, &world)?;
    // Another network, and one sharing the publisher's subnet: its client
    // has the server's own address, so only the client's network tells
    // where the replies go.
    world
        .ovl
        .create_network(host_a, "other", "198.18.4.0/24", &[])?;
    world
        .ovl
        .create_network(host_a, "twin", "198.18.0.0/24", &[])?;
    let mut clients = Vec::new();
    for (network, ip, what) in [
        (NETWORK, "198.18.0.3", "in the server's subnet"),
        (NETWORK, "198.18.1.5", "in the network's other subnet"),
        ("other", "198.18.4.2", "in another network"),
        (
            "twin",
            "198.18.0.2",
            "at the server's address in another network",
        ),
    ] {
        let c = lab.container(network)?;
        world.run(0, &["connect", network, c.name(), "--ip", ip])?;
        clients.push((c, ip, what));
    }

    // Each reaches c1 through host A's address, TCP and UDP, with real
    // data both ways; c1 sees host A's address (the connection is
    // translated both ways, so its replies go back through the host).
    for (n, (c, ip, what)) in clients.iter().enumerate() {
        let mut got = String::new();
        wait_until(Duration::from_secs(10), || {
            got = fetch(c, HOST_A, 8080)?;
            Ok(got.contains("hello from c1"))
        })
        .with_context(|| format!("a container {what} ({ip}) got {got:?} from {HOST_A}:8080"))?;
        wait_peers(&web, HOST_A, n + 1)?;
        let answer = udp_exchange(c, HOST_A, 5353)?;
        ensure!(
            answer.contains("pong ping"),
            "UDP from a container {what} ({ip}) to {HOST_A}:5353 got {answer:?}:\n{}",
            dns.output_report()
        );
        wait_peers(&dns, HOST_A, n + 1)?;
    }
    for server in [&web, &dns] {
        ensure!(
            !server.stdout()?.contains("peer 198.18."),
            "the server saw a container's own address, so its replies bypass the host:\n{}",
            server.output_report()
        );
    }
    // With reverse-path filtering on, a container of the server's network
    // still reaches it: both directions are routed by that network's
    // table, which has both containers' routes. (Other networks' clients
    // do not: the host veths have no address, and a source the packet's
    // table routes elsewhere fails even loose filtering.)
    host_a.exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"])?;
    let (same, ip, _) = &clients[0];
    let got = fetch(same, HOST_A, 8080)?;
    ensure!(
        got.contains("hello from c1"),
        "with rp_filter on, {ip} got {got:?} from {HOST_A}:8080"
    );
    host_a.exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])?;

    // Publishing opens the published port, nothing else: the other
    // network's container reaches neither c1 itself nor a port c1 did
    // not publish, and an internal network's container nothing.
    let unpublished = tcp_server(&lab, &c1, 81, "unpublished")?;
    let (other, _, _) = &clients[2];
    ensure!(
        fetch(other, "198.18.0.2".parse()?, 80)?.is_empty(),
        "another network's container reached c1 on the overlay"
    );
    ensure!(
        fetch(other, HOST_A, 81)?.is_empty(),
        "another network's container reached c1's unpublished port"
    );
    world
        .ovl
        .create_network(host_a, "sealed", "198.18.6.0/24", &["--internal"])?;
    let sealed = lab.container("sealed")?;
    world.run(0, &["connect", "sealed", sealed.name()])?;
    ensure!(
        fetch(&sealed, HOST_A, 8080)?.is_empty(),
        "an internal network's container reached a published port"
    );
    ensure!(
        !unpublished.stdout()?.contains("peer"),
        "c1's unpublished port was reached:\n{}",
        unpublished.output_report()
    );
    world.stop()
}

#[test]
fn a_containers_connection_another_dnat_sends_away_is_masqueraded_as_before() -> Result<()> {
    let lab = Lab::new("publishedhpdnat")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let host_a = &world.hosts[0].netns.clone();
    let (_c1, _web, _dns) = publishing_both(&lab, &world)?;
    // The host's own DNAT (a service address, as kube-proxy makes) sends
    // a container's connection to the router: that connection is no
    // hairpin, and goes out masqueraded behind host A.
    let router: Ipv4Addr = "198.51.100.1".parse()?;
    let server = lab.python_tcp_server(
        &world.router,
        router,
        8080,
        "print('peer', peer[0], flush=True)\nc.sendall(b'hello from the router\\n')\nc.close()",
    )?;
    let service: Ipv4Addr = "203.0.113.80".parse()?;
    host_a.exec(&[
        "nft",
        &format!(
            "add table ip service; \
             add chain ip service nat {{ type nat hook prerouting priority dstnat - 10; }}; \
             add rule ip service nat ip daddr {service} tcp dport 80 dnat to {router}:8080"
        ),
    ])?;
    let c2 = lab.container("c2")?;
    world.run(0, &["connect", NETWORK, c2.name(), "--ip", "198.18.0.3"])?;
    let mut got = String::new();
    wait_until(Duration::from_secs(10), || {
        got = fetch(&c2, service, 80)?;
        Ok(got.contains("hello from the router"))
    })
    .with_context(|| {
        format!(
            "c2 got {got:?} from {service}:80:\n{}",
            server.output_report()
        )
    })?;
    wait_peers(&server, HOST_A, 1)?;
    world.stop()
}

#[test]
fn a_hairpin_clients_connections_leave_with_it() -> Result<()> {
    let lab = Lab::new("publishedhpgone")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let host_a = &world.hosts[0].netns.clone();
    let (_c1, _web, dns) = publishing_both(&lab, &world)?;
    world
        .ovl
        .create_network(host_a, "other", "198.18.4.0/24", &[])?;
    let ip: Ipv4Addr = "198.18.4.2".parse()?;
    let client = lab.container("client")?;
    world.run(
        0,
        &["connect", "other", client.name(), "--ip", &ip.to_string()],
    )?;
    let flood = udp_flood(&lab, &client, 40000, HOST_A, 5353)?;
    wait_peers(&dns, HOST_A, 1)?;
    let opened = |ip: Ipv4Addr| -> Result<Vec<String>> {
        let out = host_a.exec_unchecked(&["conntrack", "-L", "-s", &ip.to_string()])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("dport=5353"))
            .map(str::to_owned)
            .collect())
    };
    ensure!(
        !opened(ip)?.is_empty(),
        "no conntrack entry of the hairpin flow: the check below would prove nothing"
    );

    // Its translations, which carry the server's mark, go with it: a
    // container that takes its address later inherits none.
    flood.signal(ovl_tests::Signal::Kill)?;
    world.run(0, &["disconnect", "other", client.name()])?;
    let mut left = Vec::new();
    wait_until(Duration::from_secs(5), || {
        left = opened(ip)?;
        Ok(left.is_empty())
    })
    .with_context(|| format!("connections of {ip} left after disconnect: {left:#?}"))?;
    world.stop()
}

#[test]
fn a_container_on_another_host_reaches_a_published_port_as_its_host() -> Result<()> {
    let lab = Lab::new("publishedremote")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let (_c1, web, dns) = publishing_both(&lab, &world)?;
    let c2 = lab.container("c2")?;
    world.run(1, &["connect", NETWORK, c2.name(), "--ip", "198.18.0.3"])?;
    let mut got = String::new();
    wait_until(Duration::from_secs(10), || {
        got = fetch(&c2, HOST_A, 8080)?;
        Ok(got.contains("hello from c1"))
    })
    .with_context(|| format!("c2 on host B got {got:?} from {HOST_A}:8080"))?;
    wait_peers(&web, HOST_B, 1)?;
    let answer = udp_exchange(&c2, HOST_A, 5353)?;
    ensure!(
        answer.contains("pong ping"),
        "UDP from c2 on host B to {HOST_A}:5353 got {answer:?}:\n{}",
        dns.output_report()
    );
    wait_peers(&dns, HOST_B, 1)?;
    world.stop()
}

#[test]
fn a_udp_flow_arriving_while_its_container_leaves_does_not_follow_its_address() -> Result<()> {
    let lab = Lab::new("publishedflow")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let (host_a, host_b) = (&world.hosts[0].netns.clone(), &world.hosts[1].netns.clone());
    let (c1, ip1, dns) = publishing_udp(&lab, &world)?;
    let flood = udp_flood(&lab, host_b, 40000, HOST_A, 5353)?;
    wait_peers(&dns, HOST_B, 1)?;

    // The container leaves while the flow goes on: its rule goes, and no
    // translation of the flow stays behind.
    world.run(0, &["disconnect", NETWORK, c1.name()])?;
    let mut left = Vec::new();
    wait_until(Duration::from_secs(5), || {
        left = published_rules(host_a)?;
        Ok(left.is_empty())
    })
    .with_context(|| format!("rules left after disconnect: {left:#?}"))?;
    std::thread::sleep(Duration::from_secs(1));
    let stale = connections_to(host_a, ip1)?;

    // A container that takes the address and publishes nothing gets none
    // of the flow.
    let c2 = lab.container("c2")?;
    world.run(0, &["connect", NETWORK, c2.name(), "--ip", "198.18.0.2"])?;
    let other = udp_server(&lab, &c2, ip1, 53)?;
    std::thread::sleep(Duration::from_secs(2));
    flood.signal(ovl_tests::Signal::Kill)?;
    ensure!(
        stale.is_empty(),
        "translations of the flow outlived their container: {stale:#?}"
    );
    ensure!(
        !other.stdout()?.contains("peer"),
        "the container that took {ip1} receives the flow it never published:\n{}",
        other.output_report()
    );
    world.stop()
}

#[test]
fn a_published_port_takes_nothing_from_outside_in_an_overlay_peers_name() -> Result<()> {
    let lab = Lab::new("publishedspoof")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let host_b = &world.hosts[1].netns.clone();
    let (_c1, _, dns) = publishing_udp(&lab, &world)?;
    let ip2: Ipv4Addr = "198.18.0.3".parse()?;
    let c2 = lab.container("c2")?;
    world.run(
        1,
        &["connect", NETWORK, c2.name(), "--ip", &ip2.to_string()],
    )?;
    // An unpublished port of c2, on host B: where c1's answers to a
    // datagram in c2's name would go, across the overlay.
    let peer = udp_server(&lab, &c2, ip2, 4444)?;
    let mut answer = String::new();
    wait_until(Duration::from_secs(10), || {
        answer = udp_exchange(host_b, HOST_A, 5353)?;
        Ok(answer.contains("pong ping"))
    })
    .with_context(|| format!("UDP to {HOST_A}:5353 got {answer:?}"))?;

    // The router (any machine of the underlay) sends in c2's name.
    let spoof = format!(
        "from scapy.all import IP, UDP, send\n\
         send(IP(src='{ip2}', dst='{HOST_A}') / UDP(sport=4444, dport=5353) / b'spoofed', count=3, verbose=0)\n"
    );
    world.router.exec(&["/usr/bin/python3", "-c", &spoof])?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        !dns.stdout()?.contains(&format!("peer {ip2}")),
        "c1 took datagrams from outside as c2's:\n{}",
        dns.output_report()
    );
    ensure!(
        !peer.stdout()?.contains("peer"),
        "c1's answers to the spoofed datagrams reached c2's unpublished port:\n{}",
        peer.output_report()
    );
    world.stop()
}

#[test]
fn the_overlays_own_udp_ports_are_not_published() -> Result<()> {
    let lab = Lab::new("publishedwg")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].netns.clone();
    world
        .ovl
        .create_network(&host_a, NETWORK, "198.18.0.0/24", &[])?;
    world
        .ovl
        .create_network(&host_a, "sealed", "198.18.4.0/24", &["--encrypted"])?;
    // A container on the encrypted network has host A publish its
    // WireGuard port.
    let sealed = lab.container("sealed")?;
    world.run(0, &["connect", "sealed", sealed.name()])?;
    let mut wireguard = None;
    wait_until(Duration::from_secs(15), || {
        let nodes: serde_json::Value =
            serde_json::from_str(&world.run(0, &["node", "ls", "--json"])?)?;
        wireguard = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == "host-a")
            .and_then(|n| n["wireguard"]["port"].as_u64());
        Ok(wireguard.is_some())
    })
    .context("host A did not publish its WireGuard port")?;
    let wireguard = wireguard.context("checked above")?;

    let c1 = lab.container("c1")?;
    let table = ovl_table(&host_a)?;
    let endpoints = world.run(0, &["endpoint", "ls", "--json"])?;
    for (port, what) in [
        (format!("{wireguard}:{wireguard}/udp"), "WireGuard"),
        ("4789:4789/udp".to_owned(), "VXLAN"),
    ] {
        let err = world.refused(0, &["connect", NETWORK, c1.name(), "--publish", &port])?;
        ensure!(
            err.contains(what) && err.contains("another host port"),
            "--publish {port} was not refused as the overlay's {what}: {err}"
        );
    }
    ensure!(
        world.run(0, &["endpoint", "ls", "--json"])? == endpoints,
        "a refused connect changed the store"
    );
    ensure!(
        ovl_table(&host_a)? == table,
        "a refused connect changed nft"
    );
    world.stop()
}

/// A host port a server of the host itself listens on (an `sshd`, a
/// `docker-proxy` of Docker's bridge) is not published: its rule would
/// hand that server's clients to the container. Refused at connect,
/// naming how to find the server, changing nothing; the server keeps its
/// clients; once it stops, the port is published.
#[test]
fn a_port_a_host_server_listens_on_is_not_taken_from_it() -> Result<()> {
    let lab = Lab::new("publishedhost")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let (host_a, host_b) = (&world.hosts[0].netns.clone(), &world.hosts[1].netns.clone());
    world
        .ovl
        .create_network(host_a, NETWORK, "198.18.0.0/24", &[])?;
    // A container already publishing: the table to compare exists.
    let c0 = lab.container("c0")?;
    world.run(0, &["connect", NETWORK, c0.name(), "--publish", "8080:80"])?;
    let host_tcp = tcp_server(&lab, host_a, 2222, "hello from host A")?;
    let host_udp = udp_server(&lab, host_a, Ipv4Addr::UNSPECIFIED, 5300)?;
    let c1 = lab.container("c1")?;
    let table = ovl_table(host_a)?;
    let endpoints = world.run(0, &["endpoint", "ls", "--json"])?;
    for (port, served) in [
        ("2222:22", "tcp port 2222"),
        (&format!("{HOST_A}:2222:22"), "tcp port 2222 on 192.0.2.10"),
        ("5300:53/udp", "udp port 5300"),
    ] {
        let err = world.refused(0, &["connect", NETWORK, c1.name(), "--publish", port])?;
        ensure!(
            err.contains(&format!("already serves {served}")) && err.contains("ss -lntup"),
            "--publish {port} was not refused for the host's server: {err}"
        );
    }
    ensure!(
        world.run(0, &["endpoint", "ls", "--json"])? == endpoints,
        "a refused connect changed the store"
    );
    ensure!(ovl_table(host_a)? == table, "a refused connect changed nft");
    let got = fetch(host_b, HOST_A, 2222)?;
    ensure!(
        got.contains("hello from host A"),
        "host B got {got:?} from host A's own server"
    );
    let answer = udp_exchange(host_b, HOST_A, 5300)?;
    ensure!(
        answer.contains("pong ping"),
        "host A's own UDP server answered {answer:?}"
    );

    // The server gone, the port is the container's.
    for server in [host_tcp, host_udp] {
        server.signal(Signal::Kill)?;
        server.wait_timeout(Duration::from_secs(10))?;
    }
    world.run(0, &["connect", NETWORK, c1.name(), "--publish", "2222:22"])?;
    let _web = tcp_server(&lab, &c1, 22, "hello from c1")?;
    let mut got = String::new();
    wait_until(Duration::from_secs(10), || {
        got = fetch(host_b, HOST_A, 2222)?;
        Ok(got.contains("hello from c1"))
    })
    .with_context(|| format!("host B got {got:?} from {HOST_A}:2222"))?;
    world.stop()
}

#[test]
fn networks_sharing_a_subnet_each_publish_to_their_own_container() -> Result<()> {
    let lab = Lab::new("publishedtwo")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let (host_a, host_b) = (&world.hosts[0].netns.clone(), &world.hosts[1].netns.clone());
    let mut servers = Vec::new();
    for (net, port) in [("red", 8081u16), ("blue", 8082)] {
        world
            .ovl
            .create_network(host_a, net, "198.18.0.0/24", &[])?;
        let c = lab.container(net)?;
        let publish = format!("{port}:80");
        world.run(0, &["connect", net, c.name(), "--publish", &publish])?;
        servers.push(tcp_server(&lab, &c, 80, &format!("hello from {net}"))?);
    }
    // Both containers are 198.18.0.2, each in its network's table.
    for (net, port) in [("red", 8081u16), ("blue", 8082)] {
        let mut got = String::new();
        wait_until(Duration::from_secs(10), || {
            got = fetch(host_b, HOST_A, port)?;
            Ok(!got.is_empty())
        })
        .with_context(|| format!("nothing answered on {HOST_A}:{port}"))?;
        ensure!(
            got.contains(&format!("hello from {net}")),
            "{HOST_A}:{port} reached another container than {net}'s: {got:?}"
        );
    }
    for server in &servers {
        wait_peers(server, HOST_B, 1)?;
    }

    // `ovl detach` takes the published ports away with the rest.
    ensure!(
        !connections_to(host_a, "198.18.0.2".parse()?)?.is_empty(),
        "no conntrack entry of a published port: the check below would prove nothing"
    );
    world.terminate_agent(0)?;
    let out = world.run(0, &["detach", "eth0"])?;
    ensure!(out.contains("nftables table ip ovl"), "detach said:\n{out}");
    let left = connections_to(host_a, "198.18.0.2".parse()?)?;
    ensure!(left.is_empty(), "connections left after detach: {left:#?}");
    let got = fetch(host_b, HOST_A, 8081)?;
    ensure!(
        got.is_empty(),
        "{HOST_A}:8081 answers after detach: {got:?}"
    );
    world.stop()
}

#[test]
fn an_internal_network_publishes_nothing() -> Result<()> {
    let lab = Lab::new("publishedint")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let host_a = &world.hosts[0].netns;
    world
        .ovl
        .create_network(host_a, NETWORK, "198.18.0.0/24", &["--internal"])?;
    let c1 = lab.container("c1")?;
    let err = world.refused(0, &["connect", NETWORK, c1.name(), "--publish", "8080:80"])?;
    ensure!(
        err.contains("internal") && err.contains("published"),
        "an internal network published a port: {err}"
    );
    let listing = world.run(0, &["endpoint", "ls", "--json"])?;
    ensure!(
        !listing.contains(c1.name()),
        "the refused connect left an endpoint:\n{listing}"
    );
    world.stop()
}

#[test]
fn with_etcd_a_host_port_is_claimed_once_per_node_across_networks() -> Result<()> {
    let lab = Lab::new("publishedetcd")?;
    let world = ovl_tests::ThreeHosts::start(&lab, 10)?;
    let host_a = world.hosts[0].netns.clone();
    for net in ["red", "blue"] {
        world
            .ovl
            .create_network(&host_a, net, "198.18.0.0/24", &[])?;
    }
    let c1 = lab.container("c1")?;
    world.run(0, &["connect", "red", c1.name(), "--publish", "8080:80"])?;
    let claims = world.etcd.keys("/ovl/ports/")?;
    ensure!(
        claims == ["/ovl/ports/host-a/tcp/8080/0.0.0.0"],
        "the published port's claim: {claims:?}"
    );
    let c2 = lab.container("c2")?;
    let err = world.refused(
        0,
        &[
            "connect",
            "blue",
            c2.name(),
            "--publish",
            &format!("{HOST_A}:8080:80"),
        ],
    )?;
    ensure!(
        err.contains("already published") && err.contains("\"red\""),
        "blue's container took red's host port on host A: {err}"
    );
    // Another node publishes the same port freely.
    let c3 = lab.container("c3")?;
    world.run(1, &["connect", "blue", c3.name(), "--publish", "8080:80"])?;
    // Freed with the endpoint: now blue's container on host A may take it.
    world.run(0, &["disconnect", "red", c1.name()])?;
    let claims = world.etcd.keys("/ovl/ports/")?;
    ensure!(
        claims == ["/ovl/ports/host-b/tcp/8080/0.0.0.0"],
        "the disconnect left claims: {claims:?}"
    );
    world.run(0, &["connect", "blue", c2.name(), "--publish", "8080:80"])?;

    // More ports than one etcd transaction holds (`-p 9000-9069:...`):
    // refused saying how many fit, with nothing stored.
    let c4 = lab.container("c4")?;
    let mut args = vec!["connect".to_owned(), "red".to_owned(), c4.name().to_owned()];
    for port in 9000..9070 {
        args.extend(["--publish".to_owned(), format!("{port}:{port}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let before = world.etcd.keys("/ovl/")?;
    let err = world.refused(0, &args)?;
    ensure!(
        err.contains("publishing 70 ports") && err.contains("at most about 60 ports"),
        "70 ports on etcd were not refused saying how many fit: {err}"
    );
    ensure!(
        world.etcd.keys("/ovl/")? == before,
        "the refused connect changed the store"
    );
    world.stop()
}

#[test]
fn a_container_of_another_network_cannot_answer_in_a_published_ports_name() -> Result<()> {
    let lab = Lab::new("publishedforge")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let (host_a, host_b) = (&world.hosts[0].netns.clone(), &world.hosts[1].netns.clone());
    let (_c1, ip1, dns) = publishing_udp(&lab, &world)?;
    // A network sharing the subnet, whose container has c1's very address:
    // it can send from c1's address and published port, as c1 answers.
    world
        .ovl
        .create_network(host_a, "twin", "198.18.0.0/24", &[])?;
    let twin = lab.container("twin")?;
    world.run(
        0,
        &["connect", "twin", twin.name(), "--ip", &ip1.to_string()],
    )?;

    // A client on host B asks c1 once and then prints whatever reaches its
    // port, with where it came from.
    let client_port = 40001;
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', {client_port}))\n\
         s.settimeout(1)\n\
         while True:\n\
         \x20   s.sendto(b'ping', ('{HOST_A}', 5353))\n\
         \x20   try:\n\
         \x20       data, peer = s.recvfrom(512)\n\
         \x20       print('from', peer[0], peer[1], data.decode(), flush=True)\n\
         \x20       break\n\
         \x20   except socket.timeout:\n\
         \x20       pass\n\
         s.settimeout(None)\n\
         while True:\n\
         \x20   data, peer = s.recvfrom(512)\n\
         \x20   print('from', peer[0], peer[1], data.decode(), flush=True)\n"
    );
    let client = lab.spawn(host_b, &["/usr/bin/python3", "-c", &script], &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(client.stdout()?.contains("pong ping"))
    })
    .with_context(|| format!("c1 did not answer:\n{}", client.output_report()))?;
    wait_peers(&dns, HOST_B, 1)?;

    // The twin sends what c1's answer would look like: from c1's address
    // and port to the client.
    let forge = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{ip1}', 53))\n\
         for _ in range(3):\n\
         \x20   s.sendto(b'forged', ('{HOST_B}', {client_port}))\n"
    );
    twin.exec(&["/usr/bin/python3", "-c", &forge])?;
    std::thread::sleep(Duration::from_secs(2));
    let got = client.stdout()?;
    client.signal(ovl_tests::Signal::Kill)?;
    ensure!(
        !got.contains(&format!("from {HOST_A} 5353 forged")),
        "another network's container answered in the name of {HOST_A}:5353:\n{got}"
    );
    // They were dropped as such, and counted.
    let out = host_a.exec(&["nft", "list", "chain", "ip", "ovl", "foreign_replies"])?;
    let chain = String::from_utf8_lossy(&out.stdout);
    ensure!(
        chain.contains("counter packets 3 "),
        "the forged answers were not counted as foreign replies:\n{chain}"
    );
    world.stop()
}

#[test]
fn an_agent_replaces_the_table_an_agent_of_another_version_left() -> Result<()> {
    let lab = Lab::new("publishedupgrade")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = &world.hosts[0].netns.clone();
    let (_c1, _web, _dns) = publishing_both(&lab, &world)?;
    let current = "ct status dnat ct original zone != 0 ip daddr . meta mark @endpoints snat to";
    let table = ovl_table(host_a)?;
    ensure!(
        table.contains(current),
        "no hairpin rule to replace:\n{table}"
    );

    // The agent stops and one of the first hairpin's version left its
    // table: the same chains, but a hairpin rule that translated every
    // DNAT'd connection of a container (another DNAT's too), and no mark
    // of which version wrote it.
    world.terminate_agent(0)?;
    let old: String = ovl_table(host_a)?
        .replace(current, "ct status dnat ct original zone != 0 snat to")
        .lines()
        .map(|l| match l.find(" comment \"ovl table ") {
            Some(at) => l[..at].to_owned(),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let file = lab.tempdir().join("old-table.nft");
    std::fs::write(&file, format!("{old}\n"))?;
    host_a.exec(&["nft", "delete", "table", "ip", "ovl"])?;
    host_a.exec(&["nft", "-f", &file.to_string_lossy()])?;
    ensure!(
        !ovl_table(host_a)?.contains(current),
        "the older table was not loaded"
    );

    // The agent that starts replaces it.
    world.restart_agent(&lab, 0, &[])?;
    let mut now = String::new();
    wait_until(Duration::from_secs(10), || {
        now = ovl_table(host_a)?;
        Ok(now.contains(current))
    })
    .with_context(|| format!("the older table's rules stayed:\n{now}"))?;
    world.stop()
}

#[test]
fn networks_whose_vnis_differ_by_65536_keep_their_connections_apart() -> Result<()> {
    let lab = Lab::new("publishedzones")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let (host_a, host_b) = (&world.hosts[0].netns.clone(), &world.hosts[1].netns.clone());
    let (c1, ip1, _dns) = publishing_udp(&lab, &world)?;
    let vni: u32 = world.inspect(0, NETWORK)?["vni"]
        .as_u64()
        .context("no VNI")?
        .try_into()?;
    // Another network with the same subnet, whose VNI has the same low 16
    // bits, and a container at c1's address.
    let far_vni = (vni + 65536).to_string();
    world
        .ovl
        .create_network(host_a, "far", "198.18.0.0/24", &["--vni", &far_vni])?;
    let far = lab.container("far")?;
    world.run(0, &["connect", "far", far.name(), "--ip", &ip1.to_string()])?;

    // Both send from one address and port to one server on host B, which
    // answers once it has heard both: each must get its own answer.
    let server = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{HOST_B}', 7000))\n\
         print('listening', flush=True)\n\
         got = []\n\
         while len(got) < 2:\n\
         \x20   data, peer = s.recvfrom(512)\n\
         \x20   print('peer', peer, data, flush=True)\n\
         \x20   got.append((data, peer))\n\
         for data, peer in got:\n\
         \x20   s.sendto(b'pong ' + data, peer)\n"
    );
    let server = lab.spawn(host_b, &["/usr/bin/python3", "-c", &server], &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(server.stdout()?.contains("listening"))
    })?;
    let client = |c: &Netns, name: &str| {
        let script = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('{ip1}', 40000))\n\
             s.settimeout(4)\n\
             s.sendto(b'{name}', ('{HOST_B}', 7000))\n\
             try:\n\
             \x20   while True:\n\
             \x20       print(s.recv(512).decode(), flush=True)\n\
             except socket.timeout:\n\
             \x20   pass\n"
        );
        lab.spawn(c, &["/usr/bin/python3", "-c", &script], &[])
    };
    let web = client(&c1, NETWORK)?;
    std::thread::sleep(Duration::from_millis(500));
    let other = client(&far, "far")?;
    for c in [&web, &other] {
        c.wait_timeout(Duration::from_secs(10))?;
    }
    for (c, own, foreign) in [(&web, NETWORK, "far"), (&other, "far", NETWORK)] {
        let got = c.stdout()?;
        ensure!(
            got.contains(&format!("pong {own}")) && !got.contains(&format!("pong {foreign}\n")),
            "{own}'s container got {got:?} (the server saw {:?})",
            server.stdout()?
        );
    }

    // The far network's container reaches c1's published port through
    // host A's address (hairpin): the replies go by its own network.
    let answer = udp_exchange(&far, HOST_A, 5353)?;
    ensure!(
        answer.contains("pong ping"),
        "a container of network far got {answer:?} from {HOST_A}:5353"
    );
    world.stop()
}
