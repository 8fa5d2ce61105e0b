//! ovl on a host whose firewall forwards nothing by default, as Docker
//! leaves one: dockerd (with its default `--iptables`) sets the policy of
//! iptables' FORWARD chain to DROP when it switches forwarding on. A
//! container's way out and its published ports still work, as Docker's own
//! overlay works through docker_gwbridge, and `ovl detach` takes ovl's
//! rules away again.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{
    BUSYBOX_IMAGE, DockerCluster, Dockerd, DockerdOptions, Lab, Netns, StoreKind, TwoHosts,
    ovl_network_argv, wait_until,
};

const NETWORK: &str = "web";
/// The router's address on host B's subnet: outside every overlay.
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SERVER_PORT: u16 = 8080;
/// Host A's underlay address: where the container's port is published.
const HOST_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Docker's default bridge where a test has one (`--bip`): outside the
/// overlay's 198.18.0.0/24.
const DOCKER_BRIDGE: &str = "198.19.255.1/24";

/// What a TCP connection from `from` to `addr`:`port` receives (empty
/// when it failed).
fn fetch(from: &Netns, addr: Ipv4Addr, port: u16) -> Result<String> {
    let out = from.exec_unchecked(&["nc", "-w", "3", &addr.to_string(), &port.to_string()])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The rules of iptables' FORWARD chain on `host` (`iptables -S FORWARD`).
fn forward_rules(host: &Netns) -> Result<String> {
    let out = host.exec(&["iptables", "-w", "-S", "FORWARD"])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_forward_policy_of_drop_keeps_egress_and_published_ports_working() -> Result<()> {
    let lab = Lab::new("fw-drop")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let (host_a, host_b) = (&world.hosts[0].netns.clone(), &world.hosts[1].netns.clone());
    // What dockerd does on a host where it switched forwarding on.
    host_a.exec(&["iptables", "-w", "-P", "FORWARD", "DROP"])?;
    world
        .ovl
        .create_network(host_a, NETWORK, "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    world.run(0, &["connect", NETWORK, c1.name(), "--publish", "8080:80"])?;

    // Out: the container reaches a server beyond the router.
    let greeting = "hello from outside";
    let serve = format!("c.sendall(b'{greeting}\\n')\nc.close()");
    let _server = lab.python_tcp_server(&world.router, SERVER, SERVER_PORT, &serve)?;
    let mut got = String::new();
    wait_until(Duration::from_secs(10), || {
        got = fetch(&c1, SERVER, SERVER_PORT)?;
        Ok(got.contains(greeting))
    })
    .with_context(|| {
        format!(
            "the container got {got:?} from {SERVER}:{SERVER_PORT}; FORWARD:\n{}",
            forward_rules(host_a).unwrap_or_default()
        )
    })?;

    // In: host B reaches the container's published port.
    let script = "import socket\n\
                  s = socket.socket()\n\
                  s.bind(('0.0.0.0', 80))\n\
                  s.listen(8)\n\
                  print('listening', flush=True)\n\
                  while True:\n\
                  \x20   conn, peer = s.accept()\n\
                  \x20   conn.sendall(b'hello from c1\\n')\n\
                  \x20   conn.close()\n";
    let web = lab.spawn(&c1, &["/usr/bin/python3", "-c", script], &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(web.stdout()?.contains("listening"))
    })
    .with_context(|| format!("TCP server did not start:\n{}", web.output_report()))?;
    wait_until(Duration::from_secs(10), || {
        got = fetch(host_b, HOST_A, 8080)?;
        Ok(got.contains("hello from c1"))
    })
    .with_context(|| {
        format!(
            "host B got {got:?} from {HOST_A}:8080; FORWARD:\n{}",
            forward_rules(host_a).unwrap_or_default()
        )
    })?;

    // ovl's rules, after the policy's own rules (none here): into its
    // veths, out of them on accepted connections, egress out of eth0.
    let rules = forward_rules(host_a)?;
    let ours: Vec<&str> = rules.lines().filter(|l| l.contains("ovl-")).collect();
    ensure!(
        ours.len() == 3
            && ours
                .iter()
                .all(|r| r.contains("0x6f000000/0xff000000") && r.contains("ACCEPT"))
            && ours.iter().any(|r| r.contains("-o eth0")),
        "FORWARD holds {} rule(s) of ovl's:\n{rules}",
        ours.len()
    );

    // `ovl detach` takes it away, and leaves the policy as it found it.
    let agent = world.agents.remove(0);
    agent.stop()?;
    let out = world.run(0, &["detach", "eth0"])?;
    ensure!(out.contains("FORWARD"), "detach said:\n{out}");
    let rules = forward_rules(host_a)?;
    ensure!(
        rules.trim() == "-P FORWARD DROP",
        "FORWARD after ovl detach:\n{rules}"
    );
    world.stop()
}

/// One host whose dockerd runs on its default firewall, with Docker's
/// bridge at `bridge` (`--bip`) or none, and ovl's agent.
fn docker_host(lab: &Lab, bridge: Option<&'static str>) -> Result<DockerCluster> {
    DockerCluster::start(
        lab,
        StoreKind::File,
        1,
        DockerdOptions {
            firewall: true,
            bridge,
            ..DockerdOptions::default()
        },
    )
}

/// The same with a real dockerd on its defaults, which sets the policy
/// itself: a container Docker runs on an ovl network reaches the router.
#[test]
fn a_container_docker_runs_on_its_default_firewall_has_its_way_out() -> Result<()> {
    let lab = Lab::new("fw-docker")?;
    let world = docker_host(&lab, None)?;
    let host = &world.hosts[0].netns;
    let rules = forward_rules(host)?;
    ensure!(
        rules.lines().next() == Some("-P FORWARD DROP"),
        "dockerd did not set FORWARD's policy to DROP: the test would prove nothing\n{rules}"
    );
    world.docker(0, &ovl_network_argv(NETWORK, "198.18.0.0/24", &[]))?;
    let gateway = world.hosts[0]
        .gateway
        .context("routed hosts have a gateway")?;
    let out = docker_ping(&world.dockerds[0], NETWORK, gateway);
    ensure!(
        out.as_ref().is_ok_and(|o| o.contains("3 packets received")),
        "a container on {NETWORK} could not ping {gateway} through its host: {out:?}; FORWARD:\n{}",
        forward_rules(host).unwrap_or_default()
    );
    world.docker(0, &["network", "rm", NETWORK])?;
    world.stop()
}

/// What `ping -c 3` from a container of `dockerd` on `network` to `addr`
/// said (`Err`: it failed).
fn docker_ping(dockerd: &Dockerd, network: &str, addr: Ipv4Addr) -> Result<String> {
    dockerd.docker(&[
        "run",
        "--rm",
        "--network",
        network,
        BUSYBOX_IMAGE,
        "ping",
        "-c",
        "3",
        "-W",
        "2",
        &addr.to_string(),
    ])
}

/// ovl switched the underlay's forwarding on (guarded: it forwards
/// nothing but replies to ovl's connections) before a dockerd on its
/// defaults started, which switches the whole host's forwarding on for its
/// own bridge. The host forwards by its owner's choice now: the guard must
/// not cut Docker's bridge containers off, and `ovl detach` must not
/// switch the underlay's forwarding off under them.
#[test]
fn a_dockerd_started_after_ovl_switched_forwarding_on_keeps_its_bridge_working() -> Result<()> {
    let lab = Lab::new("fw-guard")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host = world.hosts[0].clone();
    let router = host.gateway.context("routed hosts have a gateway")?;
    world
        .ovl
        .create_network(&host.netns, NETWORK, "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    world.run(0, &["connect", NETWORK, c1.name()])?;
    let guard = |netns: &Netns| -> Result<bool> {
        let out = netns.exec_unchecked(&["nft", "list", "chain", "ip", "ovl", "underlay_guard"])?;
        Ok(out.status.success())
    };
    wait_until(Duration::from_secs(10), || guard(&host.netns)).context(
        "ovl did not switch the underlay's forwarding on with its guard: the test would prove nothing",
    )?;

    let dockerd = Dockerd::start(
        &lab,
        &host,
        "host-a",
        &world.ovl.docker_plugin_socket("host-a"),
        DockerdOptions {
            firewall: true,
            bridge: Some(DOCKER_BRIDGE),
            ..DockerdOptions::default()
        },
    )?;
    let mut got = Err(anyhow::anyhow!("not run"));
    let reached = wait_until(Duration::from_secs(20), || {
        got = docker_ping(&dockerd, "bridge", router);
        Ok(got.as_ref().is_ok_and(|o| o.contains("3 packets received")))
    });
    ensure!(
        reached.is_ok(),
        "a container on Docker's bridge could not ping {router}: {got:?}; ovl's table:\n{}",
        host.netns
            .exec_unchecked(&["nft", "list", "table", "ip", "ovl"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    );
    // ovl's own container still has its way out.
    let out = c1.exec_unchecked(&["ping", "-c", "1", "-W", "2", &router.to_string()])?;
    ensure!(
        out.status.success(),
        "c1 lost its way out: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // `ovl detach` leaves the host's forwarding as its owner set it.
    let agent = world.agents.remove(0);
    agent.stop()?;
    world.run(0, &["detach", "eth0"])?;
    let got = docker_ping(&dockerd, "bridge", router);
    ensure!(
        got.as_ref().is_ok_and(|o| o.contains("3 packets received")),
        "after ovl detach a container on Docker's bridge could not ping {router}: {got:?}"
    );
    world.stop()
}

/// What a TCP connection from a container of `dockerd` on `network` to
/// `addr`:80 got (busybox's nc, an HTTP request for /index.html).
fn docker_fetch(dockerd: &Dockerd, network: &str, addr: Ipv4Addr) -> Result<String> {
    let request =
        format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 {addr} 80");
    let out = dockerd.docker_unchecked(&[
        "run",
        "--rm",
        "--network",
        network,
        BUSYBOX_IMAGE,
        "sh",
        "-c",
        &request,
    ])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Docker keeps its networks apart on a host (what one bridge sends into
/// another is dropped), and Docker's own overlay containers reach other
/// networks only through docker_gwbridge, isolated the same way. ovl's
/// containers must not get past that isolation: the host forwards their
/// external egress and published ports, not their connections into
/// Docker's bridges.
#[test]
fn a_container_on_an_ovl_network_cannot_reach_dockers_bridge_networks() -> Result<()> {
    let lab = Lab::new("fw-isolate")?;
    let world = docker_host(&lab, Some(DOCKER_BRIDGE))?;
    let dockerd = &world.dockerds[0];
    let web = dockerd.run(&lab, "web", "bridge", &[])?;
    world.docker(
        0,
        &[
            "exec",
            "web",
            "sh",
            "-c",
            "mkdir -p /www && echo hello from web > /www/index.html && httpd -p 80 -h /www",
        ],
    )?;
    let web_ip = web.ip()?;
    // Docker's baseline: its default bridge reaches web, another bridge
    // network does not.
    let got = docker_fetch(dockerd, "bridge", web_ip)?;
    ensure!(
        got.contains("hello from web"),
        "web does not answer on Docker's bridge: {got:?}"
    );
    world.docker(
        0,
        &["network", "create", "--subnet", "198.19.254.0/24", "other"],
    )?;
    let got = docker_fetch(dockerd, "other", web_ip)?;
    ensure!(
        !got.contains("hello from web"),
        "Docker does not isolate its networks here: the test would prove nothing"
    );

    world.docker(0, &ovl_network_argv(NETWORK, "198.18.0.0/24", &[]))?;

    // The container has its way out...
    let router = world.hosts[0]
        .gateway
        .context("routed hosts have a gateway")?;
    let out = docker_ping(dockerd, NETWORK, router);
    ensure!(
        out.as_ref().is_ok_and(|o| o.contains("3 packets received")),
        "a container on {NETWORK} could not ping {router}: {out:?}"
    );
    // ...but not into Docker's bridge.
    let got = docker_fetch(dockerd, NETWORK, web_ip)?;
    ensure!(
        !got.contains("hello from web"),
        "a container on {NETWORK} reached {web_ip} on Docker's bridge: {got:?}; FORWARD:\n{}",
        forward_rules(&world.hosts[0].netns).unwrap_or_default()
    );
    world.docker(0, &["network", "rm", NETWORK])?;
    world.stop()
}
