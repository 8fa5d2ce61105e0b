//! Docker on ovl: two hosts, each with its own dockerd (Debian's docker.io
//! 20.10) and an ovl agent serving it the `ovl` network and IPAM driver.
//! A network created with `docker network create -d ovl` on one host
//! appears on the other; containers on both hosts talk through ovl's data
//! path; addresses come from ovl's store; restarts of dockerd and of the
//! agent keep traffic flowing and leave Docker and ovl agreeing; every bad
//! request to the plugin socket is refused with `{"Err": ...}` and changes
//! nothing.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use ovl_tests::{
    BackgroundPing, DockerCluster, DockerContainer, DockerdOptions, Lab, NetCounters, StoreKind,
    dump_endpoints, ovl_network_argv, ping, plugin_call, wait_until,
};
use serde_json::Value;

const NET: &str = "uber-net";
const SUBNET: &str = "198.18.0.0/24";
/// "Within a few seconds", as the issue puts it.
const VISIBLE_WITHIN: Duration = Duration::from_secs(5);
/// The agent releases what Docker lost after 5 s of absence; passes run
/// every 2 s.
const RECONCILE_WITHIN: Duration = Duration::from_secs(12);

fn create_network(world: &DockerCluster, i: usize, name: &str, subnet: &str) -> Result<String> {
    world.docker(i, &ovl_network_argv(name, subnet, &[]))
}

/// Host `i`'s dockerd must refuse [`ovl_network_argv`]'s network, saying
/// `needle`.
fn create_refused(
    world: &DockerCluster,
    i: usize,
    name: &str,
    subnet: &str,
    extra: &[&str],
    needle: &str,
) -> Result<()> {
    let argv = ovl_network_argv(name, subnet, extra);
    let out = world.dockerds[i].docker_unchecked(&argv)?;
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success() && msg.contains(needle),
        "{argv:?}: {msg}"
    );
    Ok(())
}

/// Waits until host `i`'s `docker network ls` does (or does not) list
/// `name`; returns how long that took.
fn wait_listed(world: &DockerCluster, i: usize, name: &str, listed: bool) -> Result<Duration> {
    let t0 = Instant::now();
    wait_until(VISIBLE_WITHIN, || {
        Ok(world.dockerds[i].network_names()?.iter().any(|n| n == name) == listed)
    })
    .with_context(|| {
        format!(
            "{name} {} host {i}'s docker network ls within {VISIBLE_WITHIN:?}",
            if listed {
                "never appeared in"
            } else {
                "stayed in"
            }
        )
    })?;
    Ok(t0.elapsed())
}

/// The store's networks, as `ovl network ls` lists them (names only).
fn ovl_networks(world: &DockerCluster) -> Result<Vec<String>> {
    Ok(world
        .ovl(0, &["network", "ls"])?
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

fn counters(world: &DockerCluster, i: usize) -> Result<NetCounters> {
    world
        .ovl
        .counters(&world.hosts[i].netns, DockerCluster::NODES[i], NET)
}

/// Moves 1 MiB over TCP from container `from` (busybox httpd) to `to`
/// (busybox wget) and checks it arrived intact.
fn tcp_transfer(
    world: &DockerCluster,
    (i, from): (usize, &DockerContainer),
    (j, to): (usize, &DockerContainer),
    port: u16,
) -> Result<()> {
    let serve = format!(
        "dd if=/dev/urandom of=/tmp/out bs=1024 count=1024 2>/dev/null; \
         httpd -p {port} -h /tmp; md5sum < /tmp/out"
    );
    let sum = world.docker(i, &["exec", &from.name, "sh", "-c", &serve])?;
    let fetch = format!(
        "wget -q -O /tmp/in http://{}:{port}/out && md5sum < /tmp/in",
        from.ip()?
    );
    let got = world.docker(j, &["exec", &to.name, "sh", "-c", &fetch])?;
    ensure!(
        got == sum,
        "{} -> {}: 1 MiB arrived as {got}, sent {sum}",
        from.name,
        to.name
    );
    Ok(())
}

/// Checks the container's only interfaces are `lo` and `eth0`, with the
/// address, MAC and MTU ovl gives.
fn check_interface(c: &DockerContainer, ip: Ipv4Addr) -> Result<()> {
    ensure!(c.ip()? == ip, "{} has {} not {ip}", c.name, c.ip()?);
    let o = ip.octets();
    let mac = format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    ensure!(c.netns.link_mac("eth0")? == mac, "{} MAC", c.name);
    ensure!(c.netns.link_mtu("eth0")? == 1450, "{} MTU", c.name);
    let links = c.netns.ip(&["-o", "link", "show"])?;
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .collect();
    ensure!(
        names == ["lo", "eth0"],
        "{} has interfaces {names:?} (no gateway leg expected)",
        c.name
    );
    // The default route goes through the ovl network's gateway, as with
    // `ovl connect` (Join's answer carries it).
    let routes = c.netns.ip(&["-4", "route", "show", "default"])?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    ensure!(
        routes.contains("default via 198.18.0.1 dev eth0"),
        "{} routes: {routes}",
        c.name
    );
    Ok(())
}

/// The user's story on two hosts: create on A, visible on B; a container
/// on each; ping and TCP both ways; exact counters; `docker rm` frees the
/// address; `docker network rm` refused with containers left, then done;
/// unsupported options refused; an ovl-made network appears in Docker.
fn two_hosts_story(tag: &str, store: StoreKind) -> Result<()> {
    let lab = Lab::new(tag)?;
    let world = DockerCluster::start(&lab, store, 2, DockerdOptions::default())?;

    // Create on A; the ovl network exists under Docker's name at once, and
    // B's dockerd lists it within seconds.
    create_network(&world, 0, NET, SUBNET)?;
    wait_until(Duration::from_secs(2), || {
        Ok(ovl_networks(&world)?.contains(&NET.to_owned()))
    })
    .context("the ovl network never took Docker's name")?;
    let net = world.ovl.inspect(&world.hosts[0].netns, NET)?;
    ensure!(
        net["subnets"][0]["subnet"] == SUBNET
            && net["mtu"] == 1450
            && net["vni"].as_u64() >= Some(4096),
        "{net}"
    );
    let took = wait_listed(&world, 1, NET, true)?;
    eprintln!("docker network create on A: listed on B after {took:?}");
    // Docker shows a gateway only where one was given: the mirror names
    // the one ovl keeps (the subnet's first address).
    for (i, gateway) in [(0, Value::Null), (1, Value::from("198.18.0.1"))] {
        let d = world.dockerds[i].inspect_network(NET)?;
        let cfg = &d["IPAM"]["Config"][0];
        ensure!(
            d["Driver"] == "ovl"
                && d["IPAM"]["Driver"] == "ovl"
                && cfg["Subnet"] == SUBNET
                && cfg["Gateway"] == gateway,
            "host {i}: {d}"
        );
    }

    // A container on each host: addresses from ovl's store, unique across
    // hosts; MAC 02:42+IP, MTU 1450, no second leg.
    let c1 = world.dockerds[0].run(&lab, "c1", NET, &[])?;
    let c2 = world.dockerds[1].run(&lab, "c2", NET, &[])?;
    let (ip1, ip2) = (Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3));
    check_interface(&c1, ip1)?;
    check_interface(&c2, ip2)?;
    world.agree(0, NET)?;
    world.agree(1, NET)?;

    // Ping both ways; after ARP is settled, exact per-VNI deltas.
    wait_until(Duration::from_secs(5), || {
        Ok(ping(&c1.netns, ip2, 1, &["-W", "1"])?.all_received())
    })?;
    ensure!(ping(&c2.netns, ip1, 1, &["-W", "1"])?.all_received());
    let (a0, b0) = (counters(&world, 0)?, counters(&world, 1)?);
    const N: u64 = 10;
    let there = ping(&c1.netns, ip2, N as u32, &["-i", "0.05", "-W", "2"])?;
    let back = ping(&c2.netns, ip1, N as u32, &["-i", "0.05", "-W", "2"])?;
    ensure!(there.all_received(), "A -> B:\n{}", there.output);
    ensure!(back.all_received(), "B -> A:\n{}", back.output);
    let (a1, b1) = (counters(&world, 0)?, counters(&world, 1)?);
    for (host, before, after) in [("A", &a0, &a1), ("B", &b0, &b1)] {
        ensure!(
            after.tx_packets - before.tx_packets == 2 * N
                && after.rx_packets - before.rx_packets == 2 * N
                && after.tx_bytes - before.tx_bytes == 2 * N * 98
                && after.drops() == before.drops(),
            "{host}: {before:?} -> {after:?}"
        );
    }

    // TCP both ways.
    tcp_transfer(&world, (0, &c1), (1, &c2), 5001)?;
    tcp_transfer(&world, (1, &c2), (0, &c1), 5002)?;

    // docker rm frees the address everywhere; the next container gets it.
    world.docker(1, &["rm", "-f", "c2"])?;
    let vni = net["vni"].as_u64().context("vni")? as u32;
    wait_until(Duration::from_secs(5), || {
        let gone_a = !dump_endpoints(&world.ovl.pin_dir("host-a"))?.contains_key(&(vni, ip2));
        let gone_b = !dump_endpoints(&world.ovl.pin_dir("host-b"))?.contains_key(&(vni, ip2));
        Ok(gone_a && gone_b && world.ovl_endpoints(1, NET)?.is_empty())
    })
    .context("c2's endpoint stayed after docker rm")?;
    let c3 = world.dockerds[0].run(&lab, "c3", NET, &[])?;
    ensure!(
        c3.ip()? == ip2,
        "c3 got {} instead of c2's freed {ip2}",
        c3.ip()?
    );
    world.agree(0, NET)?;
    // Docker's embedded DNS still answers for containers of its own host.
    world.docker(0, &["exec", "c3", "ping", "-c", "1", "-W", "2", "c1"])?;

    // docker network rm with containers left: Docker refuses on the host
    // that has them. Elsewhere Docker 20.10 only logs the driver's refusal
    // and drops its own network: ovl keeps the network (and the containers
    // on A their connectivity) and puts it back in that host's Docker.
    let before = world.ovl.inspect(&world.hosts[0].netns, NET)?;
    let refused = world.dockerds[0].docker_unchecked(&["network", "rm", NET])?;
    let msg = String::from_utf8_lossy(&refused.stderr).into_owned();
    ensure!(
        !refused.status.success() && msg.contains("active endpoints"),
        "network rm on A with its containers: {msg}"
    );
    world.docker(1, &["network", "rm", NET])?;
    ensure!(
        world.ovl.inspect(&world.hosts[0].netns, NET)? == before,
        "a refused rm changed the store"
    );
    let took = wait_listed(&world, 1, NET, true)?;
    eprintln!("docker network rm on B with containers on A: back on B after {took:?}");
    ensure!(ping(&c1.netns, c3.ip()?, 1, &["-W", "1"])?.all_received());

    // Options ovl does not support are refused clearly; nothing is left.
    let networks = ovl_networks(&world)?;
    for (args, needle) in [
        (vec!["--opt", "encrypted=maybe"], "--opt encrypted=maybe"),
        (vec!["--opt", "vxlan=42"], "unknown option --opt vxlan=42"),
        (
            vec![
                "--opt",
                "com.docker.network.driver.overlay.vxlanid_list=5042,5043",
            ],
            "one VNI for all of its subnets",
        ),
        (vec!["--gateway", "198.18.1.255"], "not a host address"),
        (
            vec!["--ip-range", "198.18.1.1/32"],
            "holds no address an endpoint could get",
        ),
        (
            vec!["--aux-address", "x=198.18.1.255"],
            "is not a host address of the network's subnets",
        ),
        (vec!["--ipv6", "--subnet", "2001:db8::/64"], "IPv4 only"),
    ] {
        create_refused(&world, 1, "odd-net", "198.18.1.0/24", &args, needle)?;
    }
    // The VNI another network has.
    let taken = format!(
        "com.docker.network.driver.overlay.vxlanid_list={}",
        vni_of(&world, NET)?
    );
    let needle = format!("already used by network \"{NET}\"; give another VNI or omit the option");
    create_refused(
        &world,
        1,
        "odd-net",
        "198.18.1.0/24",
        &["--opt", &taken],
        &needle,
    )?;
    let out = world.dockerds[1].docker_unchecked(&[
        "network",
        "create",
        "-d",
        "ovl",
        "--subnet",
        "198.18.1.0/24",
        "odd-net",
    ])?;
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success() && msg.contains("--ipam-driver ovl"),
        "default IPAM: {msg}"
    );
    let out = world.dockerds[1].docker_unchecked(&[
        "network",
        "create",
        "-d",
        "ovl",
        "--ipam-driver",
        "ovl",
        "--subnet",
        "198.18.0.128/25",
        "odd-net",
    ])?;
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success() && msg.contains("overlaps network \"uber-net\""),
        "subnet clash: {msg}"
    );
    ensure!(
        ovl_networks(&world)? == networks,
        "a refused create left something"
    );
    ensure!(
        !world.dockerds[1]
            .network_names()?
            .contains(&"odd-net".to_owned())
    );

    // --internal, --opt encrypted and --gateway map to ovl's network.
    world.docker(
        1,
        &[
            "network",
            "create",
            "-d",
            "ovl",
            "--ipam-driver",
            "ovl",
            "--subnet",
            "198.18.1.0/24",
            "--gateway",
            "198.18.1.254",
            "--internal",
            "--opt",
            "encrypted",
            "secret-net",
        ],
    )?;
    wait_until(Duration::from_secs(2), || {
        Ok(ovl_networks(&world)?.contains(&"secret-net".to_owned()))
    })
    .context("secret-net never took Docker's name")?;
    let secret = world.ovl.inspect(&world.hosts[0].netns, "secret-net")?;
    ensure!(
        secret["internal"] == true
            && secret["encrypted"] == true
            && secret["mtu"] == 1390
            && secret["subnets"][0]["gateway"] == "198.18.1.254",
        "secret-net in ovl: {secret}"
    );
    world.docker(1, &["network", "rm", "secret-net"])?;
    wait_until(Duration::from_secs(2), || {
        Ok(!ovl_networks(&world)?.contains(&"secret-net".to_owned()))
    })
    .context("docker network rm left secret-net in ovl")?;

    // --ip picks the address; a --mac-address in the block ovl derives
    // containers' MACs from is refused.
    let c5 = world.dockerds[1].run(&lab, "c5", NET, &["--ip", "198.18.0.50"])?;
    ensure!(c5.ip()? == Ipv4Addr::new(198, 18, 0, 50), "--ip ignored");
    let out = world.dockerds[1].docker_unchecked(&[
        "run",
        "-d",
        "--name",
        "c6",
        "--network",
        NET,
        "--mac-address",
        "02:42:00:00:00:01",
        ovl_tests::BUSYBOX_IMAGE,
        "sleep",
        "1000",
    ])?;
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success() && msg.contains("where ovl gives each container 02:42"),
        "--mac-address: {msg}"
    );
    world.docker(1, &["rm", "-f", "c5", "c6"])?;
    world.agree(1, NET)?;

    // With its containers gone, the network goes from B, everywhere.
    world.docker(0, &["rm", "-f", "c1", "c3"])?;
    world.docker(1, &["network", "rm", NET])?;
    ensure!(!ovl_networks(&world)?.contains(&NET.to_owned()));
    let took = wait_listed(&world, 0, NET, false)?;
    eprintln!("docker network rm on B: gone from A after {took:?}");

    // A network made with ovl appears in every Docker, with each of its
    // subnets.
    world.ovl(
        0,
        &[
            "network",
            "create",
            "blue",
            "--subnet",
            "198.18.5.0/24",
            "--subnet",
            "198.18.7.0/24",
        ],
    )?;
    for i in 0..2 {
        let took = wait_listed(&world, i, "blue", true)?;
        eprintln!("ovl network create: listed on host {i} after {took:?}");
        let d = world.dockerds[i].inspect_network("blue")?;
        let subnets: Vec<&Value> = d["IPAM"]["Config"]
            .as_array()
            .map(|c| c.iter().map(|c| &c["Subnet"]).collect())
            .unwrap_or_default();
        ensure!(
            subnets == [&Value::from("198.18.5.0/24"), &Value::from("198.18.7.0/24")],
            "blue on host {i}: {d}"
        );
    }
    // The MTU option sets the containers' MTU.
    world.docker(
        1,
        &[
            "network",
            "create",
            "-d",
            "ovl",
            "--ipam-driver",
            "ovl",
            "--subnet",
            "198.18.6.0/24",
            "--opt",
            "com.docker.network.driver.mtu=1400",
            "small",
        ],
    )?;
    let s1 = world.dockerds[1].run(&lab, "s1", "small", &[])?;
    ensure!(s1.netns.link_mtu("eth0")? == 1400, "MTU option ignored");
    // One container in each subnet, on different hosts: routed through
    // ovl's gateways.
    let b1 = world.dockerds[0].run(&lab, "b1", "blue", &[])?;
    let b2 = world.dockerds[1].run(&lab, "b2", "blue", &["--ip", "198.18.7.10"])?;
    let dst = b2.ip()?;
    ensure!(dst == Ipv4Addr::new(198, 18, 7, 10), "b2 has {dst}");
    wait_until(Duration::from_secs(5), || {
        Ok(ping(&b1.netns, dst, 1, &["-W", "1"])?.all_received())
    })?;
    world.stop()
}

#[test]
fn docker_on_two_hosts_with_the_file_store() -> Result<()> {
    two_hosts_story("dk-file", StoreKind::File)
}

#[test]
fn docker_on_two_hosts_with_etcd() -> Result<()> {
    two_hosts_story("dk-etcd", StoreKind::Etcd)
}

/// The VNI of ovl network `name`.
fn vni_of(world: &DockerCluster, name: &str) -> Result<u64> {
    world.ovl.inspect(&world.hosts[0].netns, name)?["vni"]
        .as_u64()
        .context("vni")
}

/// Restarting dockerd (live-restore) or the agent keeps running
/// containers' traffic flowing, and afterwards Docker and ovl agree on
/// every endpoint; what a dying dockerd left half-done is released.
#[test]
fn restarts_keep_traffic_and_leave_docker_and_ovl_agreeing() -> Result<()> {
    let lab = Lab::new("dk-restart")?;
    let mut world = DockerCluster::start(
        &lab,
        StoreKind::File,
        2,
        DockerdOptions {
            live_restore: true,
            ..DockerdOptions::default()
        },
    )?;
    create_network(&world, 0, NET, SUBNET)?;
    wait_listed(&world, 1, NET, true)?;
    let c1 = world.dockerds[0].run(&lab, "c1", NET, &[])?;
    let c2 = world.dockerds[1].run(&lab, "c2", NET, &[])?;
    let (ip1, ip2) = (c1.ip()?, c2.ip()?);
    wait_until(Duration::from_secs(5), || {
        Ok(ping(&c1.netns, ip2, 1, &["-W", "1"])?.all_received())
    })?;

    // dockerd on A goes down and comes back under a 10/s ping.
    let probe = BackgroundPing::start(&lab, &c1.netns, ip2, 40, Duration::from_millis(100))?;
    world.dockerds[0].stop()?;
    std::thread::sleep(Duration::from_millis(500));
    world.dockerds[0].restart(&lab)?;
    let r = probe.finish()?;
    ensure!(r.all_received(), "across dockerd's restart:\n{}", r.output);
    ensure!(
        world.docker(0, &["inspect", "-f", "{{.State.Running}}", "c1"])? == "true",
        "c1 did not survive dockerd's restart"
    );
    world.agree(0, NET)?;
    world.agree(1, NET)?;
    // The restarted dockerd still drives the plugin.
    let c4 = world.dockerds[0].run(&lab, "c4", NET, &[])?;
    wait_until(Duration::from_secs(5), || {
        Ok(ping(&c4.netns, ip2, 1, &["-W", "1"])?.all_received())
    })?;

    // The agent on B goes down and comes back under a 10/s ping.
    let probe = BackgroundPing::start(&lab, &c2.netns, ip1, 40, Duration::from_millis(100))?;
    world.stop_agent(1)?;
    std::thread::sleep(Duration::from_millis(500));
    world.start_agent(&lab, 1)?;
    let r = probe.finish()?;
    ensure!(
        r.all_received(),
        "across the agent's restart:\n{}",
        r.output
    );
    world.agree(0, NET)?;
    world.agree(1, NET)?;

    // A dockerd that died right after its RequestAddress: the reservation
    // is released by the next reconcile.
    let pool = format!("{}:{SUBNET}", vni_of(&world, NET)?);
    let body = serde_json::json!({"PoolID": pool, "Address": "", "Options": {}});
    let reply = answered(&world, 0, "IpamDriver.RequestAddress", &body)?;
    let leaked: Ipv4Addr = reply["Address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("Address")?
        .parse()?;
    ensure!(
        world
            .ovl_endpoints(0, NET)?
            .get(&leaked)
            .map(|(_, k)| k.as_str())
            == Some("reserved"),
        "{leaked} not reserved"
    );
    let t0 = Instant::now();
    wait_until(RECONCILE_WITHIN, || {
        Ok(!world.ovl_endpoints(0, NET)?.contains_key(&leaked))
    })
    .context("an address reserved for a dead dockerd was never released")?;
    eprintln!("orphaned reservation released after {:?}", t0.elapsed());
    world.agree(0, NET)?;

    // dockerd killed in the middle of a `docker run`: once it is back and
    // the agent reconciled, Docker and ovl agree and nothing leaked.
    let held = world.ovl_endpoints(0, NET)?.len();
    let url = world.dockerds[0].url();
    let run = lab.spawn_here(
        &[
            ovl_tests::DOCKER_CLI,
            "-H",
            &url,
            "run",
            "-d",
            "--name",
            "c9",
            "--network",
            NET,
            ovl_tests::BUSYBOX_IMAGE,
            "sleep",
            "100000",
        ],
        &[],
    )?;
    // Killed the moment the store shows an address reserved and not yet
    // attached (read straight from the file store: `ovl` is too slow to
    // catch it), or once the run got further.
    let state_file = std::path::PathBuf::from(
        world
            .ovl
            .store_url()
            .strip_prefix("file://")
            .context("file store")?,
    )
    .join("state.json");
    let reserved_on_a = || -> Result<bool> {
        let state: Value = serde_json::from_slice(&std::fs::read(&state_file)?)?;
        Ok(state["endpoints"].as_array().is_some_and(|eps| {
            eps.iter()
                .any(|e| e["location"]["kind"] == "reserved" && e["location"]["node"] == "host-a")
        }))
    };
    wait_until(Duration::from_secs(10), || {
        Ok(reserved_on_a()? || world.ovl_endpoints(0, NET)?.len() > held)
    })
    .context("docker run never reached ovl")?;
    world.dockerds[0].kill()?;
    let _ = run.wait_timeout(Duration::from_secs(10));
    eprintln!(
        "ovl held for A when dockerd died: {:?}",
        world.ovl_endpoints(0, NET)?
    );
    world.dockerds[0].restart(&lab)?;
    let t0 = Instant::now();
    wait_until(RECONCILE_WITHIN, || Ok(world.agree(0, NET).is_ok())).with_context(|| {
        format!(
            "{:#}",
            world
                .agree(0, NET)
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("?"))
        )
    })?;
    eprintln!(
        "Docker and ovl agree {:?} after dockerd came back",
        t0.elapsed()
    );
    world.agree(1, NET)?;
    ensure!(ping(&c1.netns, ip2, 3, &["-i", "0.2", "-W", "2"])?.all_received());
    world.stop()
}

/// What a bad request must not change: the store's networks, VNIs and
/// endpoints (etcd keys and values) and the host's links.
fn snapshot(world: &DockerCluster) -> Result<(String, String)> {
    let etcd = world.etcd.as_ref().context("etcd store")?;
    let mut keys = String::new();
    for prefix in ["/ovl/networks/", "/ovl/vnis/", "/ovl/endpoints/"] {
        keys.push_str(&etcd.etcdctl(&["get", "--prefix", prefix])?);
    }
    let links = world.hosts[0].netns.ip(&["-o", "link", "show"])?;
    let links = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .collect::<Vec<_>>()
        .join(" ");
    Ok((keys, links))
}

/// Calls host `i`'s plugin as dockerd does and returns its answer, which
/// must be a success.
fn answered(world: &DockerCluster, i: usize, method: &str, body: &Value) -> Result<Value> {
    let (status, reply) = plugin_call(&world.plugin_socket(i), method, &body.to_string())?;
    ensure!(status == 200, "{method} {body}: {status} {reply}");
    serde_json::from_str(&reply).with_context(|| format!("{method}: answer is not JSON: {reply}"))
}

/// Calls the plugin and checks the answer is an error with `status` whose
/// `{"Err": ...}` contains `needle`.
fn refused(
    world: &DockerCluster,
    method: &str,
    body: &str,
    status: u16,
    needle: &str,
) -> Result<()> {
    let (got, reply) = plugin_call(&world.plugin_socket(0), method, body)?;
    let err: Value = serde_json::from_str(&reply)
        .with_context(|| format!("{method}: answer is not JSON: {reply}"))?;
    let err = err["Err"].as_str().unwrap_or_default();
    ensure!(
        got == status && err.contains(needle),
        "{method} {body}: got {got} {reply}, expected {status} with Err containing {needle:?}"
    );
    Ok(())
}

/// Every bad request the issue lists, sent to the plugin socket as dockerd
/// would: each is answered `{"Err": "..."}` naming the problem, and the
/// store and the host's links are exactly as before.
#[test]
fn plugin_refuses_bad_requests_and_changes_nothing() -> Result<()> {
    let lab = Lab::new("dk-bad")?;
    let mut world = DockerCluster::start(&lab, StoreKind::Etcd, 1, DockerdOptions::default())?;
    create_network(&world, 0, NET, SUBNET)?;
    wait_until(Duration::from_secs(2), || {
        Ok(ovl_networks(&world)?.contains(&NET.to_owned()))
    })?;
    let id = world.docker(0, &["network", "inspect", "-f", "{{.Id}}", NET])?;
    let pool = format!("{}:{SUBNET}", vni_of(&world, NET)?);
    let before = snapshot(&world)?;
    let endpoint = "de".repeat(32);
    let cases = [
        (
            "NetworkDriver.CreateNetwork",
            r#"{"NetworkID":"f00d","Options":{"com.docker.network.generic":{"color":"blue"}},
               "IPv4Data":[{"AddressSpace":"ovl","Pool":"198.18.9.0/24","Gateway":"198.18.9.1/24"}]}"#
                .to_owned(),
            500,
            "unknown option --opt color=blue",
        ),
        (
            "IpamDriver.RequestPool",
            r#"{"AddressSpace":"ovl","Pool":"198.18.0.0/16","SubPool":"","Options":{},"V6":false}"#
                .to_owned(),
            500,
            "overlaps network \"uber-net\"",
        ),
        (
            "IpamDriver.RequestAddress",
            r#"{"PoolID":"9999:198.18.9.0/24","Address":"","Options":{}}"#.to_owned(),
            500,
            "not served by ovl",
        ),
        (
            "IpamDriver.RequestAddress",
            r#"{"PoolID":"LocalDefault/172.17.0.0/16","Address":"","Options":{}}"#.to_owned(),
            500,
            "not one of ovl's IPAM",
        ),
        (
            "NetworkDriver.Join",
            format!(
                r#"{{"NetworkID":"{id}","EndpointID":"{endpoint}","SandboxKey":"/var/run/docker/netns/1","Options":{{}}}}"#
            ),
            500,
            "no endpoint dededededede on network uber-net",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            format!(
                r#"{{"NetworkID":"{id}","EndpointID":"{endpoint}","Interface":{{"Address":"198.18.0.77/24"}},"Options":{{}}}}"#
            ),
            500,
            "198.18.0.77 on network \"uber-net\" is not a reservation of node \"host-a\"",
        ),
        (
            "NetworkDriver.CreateNetwork",
            "{not json".to_owned(),
            400,
            "malformed NetworkDriver.CreateNetwork request",
        ),
        (
            "IpamDriver.RequestAddress",
            r#"{"PoolID":7}"#.to_owned(),
            400,
            "malformed IpamDriver.RequestAddress request",
        ),
        (
            "NetworkDriver.Frobnicate",
            "{}".to_owned(),
            404,
            "not implemented",
        ),
    ];
    for (method, body, status, needle) in &cases {
        refused(&world, method, body, *status, needle)?;
        ensure!(
            snapshot(&world)? == before,
            "{method} {body} changed something"
        );
    }

    // While the store is unreachable: refused, naming it; nothing changes.
    world.etcd.as_mut().context("etcd")?.stop()?;
    let body = format!(r#"{{"PoolID":"{pool}","Address":"","Options":{{}}}}"#);
    refused(&world, "IpamDriver.RequestAddress", &body, 500, "etcd at")?;
    world.etcd.as_mut().context("etcd")?.restart(&lab)?;
    ensure!(
        snapshot(&world)? == before,
        "a request during the outage changed something"
    );

    // And the plugin still works.
    let c1 = world.dockerds[0].run(&lab, "c1", NET, &[])?;
    ensure!(
        c1.ip()? == Ipv4Addr::new(198, 18, 0, 2),
        "c1 got {}",
        c1.ip()?
    );
    world.stop()
}

/// What Docker containers are given as `--dns`: ovl's resolver's second
/// address (in a Docker container 127.0.0.11 is Docker's own resolver,
/// which forwards the names it does not know there).
const OVL_DNS: &str = "127.0.0.12";

/// What `nslookup` in a container got for a name.
#[derive(Debug, PartialEq, Eq)]
enum Lookup {
    Addresses(Vec<Ipv4Addr>),
    NxDomain,
    /// Anything else: the output.
    Failed(String),
}

/// `nslookup NAME [SERVER]` in container `container` of host `i` (through
/// its resolv.conf, Docker's resolver, unless `server` is given).
fn lookup(
    world: &DockerCluster,
    i: usize,
    container: &str,
    name: &str,
    server: Option<&str>,
) -> Result<Lookup> {
    let mut argv = vec!["exec", container, "nslookup", name];
    argv.extend(server);
    let out = world.dockerds[i].docker_unchecked(&argv)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("NXDOMAIN") {
        return Ok(Lookup::NxDomain);
    }
    // Answers follow the `Name:` line; the server's own `Address:` line
    // above it carries a port.
    let addrs: Vec<Ipv4Addr> = text
        .lines()
        .skip_while(|l| !l.starts_with("Name:"))
        .filter_map(|l| l.strip_prefix("Address:"))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    Ok(if addrs.is_empty() {
        Lookup::Failed(text)
    } else {
        Lookup::Addresses(addrs)
    })
}

/// Waits until `nslookup` in `container` on host `i` gets `want`; returns
/// how long that took.
fn wait_lookup(
    world: &DockerCluster,
    (i, container): (usize, &str),
    name: &str,
    server: Option<&str>,
    want: &Lookup,
    within: Duration,
) -> Result<Duration> {
    let t0 = Instant::now();
    let mut last = Lookup::Failed(String::new());
    wait_until(within, || {
        last = lookup(world, i, container, name, server)?;
        Ok(last == *want)
    })
    .with_context(|| {
        format!(
            "{name} in {container} on host {i}: wanted {want:?} within {within:?}, got {last:?}"
        )
    })?;
    Ok(t0.elapsed())
}

/// The endpoint of `network` at `ip` in the store.
fn ovl_endpoint(world: &DockerCluster, network: &str, ip: Ipv4Addr) -> Result<Value> {
    let net = world.ovl.inspect(&world.hosts[0].netns, network)?;
    net["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .find(|e| e["ip"] == ip.to_string())
        .cloned()
        .with_context(|| format!("no endpoint {ip} in {net}"))
}

/// Docker Compose with an ovl network: `docker-compose up --scale web=3`
/// creates the project's network with driver and IPAM `ovl` (Compose's
/// labels and all) and gives every replica the service's name as an
/// alias; a container on another host resolves `web` through ovl's
/// resolver to all three replicas, each first in turn, and reaches each;
/// `docker-compose down` removes the network from ovl. Before: only the
/// first replica held the alias `web` (aliases were unique).
#[test]
fn docker_compose_replicas_share_their_service_name_across_hosts() -> Result<()> {
    let lab = Lab::new("dk-compose")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 2, DockerdOptions::default())?;
    let file = lab.tempdir().join("compose.yml");
    let image = ovl_tests::BUSYBOX_IMAGE;
    std::fs::write(
        &file,
        format!(
            r#"version: "2.4"
services:
  web:
    image: {image}
    command: ["sleep", "100000"]
networks:
  default:
    driver: ovl
    ipam:
      driver: ovl
      config:
        - subnet: 198.18.60.0/24
"#
        ),
    )?;
    let (project, net) = ("ovlcompose", "ovlcompose_default");
    world.dockerds[0].compose(project, &file, &["up", "-d", "--scale", "web=3"])?;
    wait_until(VISIBLE_WITHIN, || {
        Ok(ovl_networks(&world)?.contains(&net.to_owned()))
    })?;
    let replicas: Vec<Ipv4Addr> = world.dockerds[0].endpoints(net)?.into_keys().collect();
    ensure!(replicas.len() == 3, "replicas at {replicas:?}");
    wait_listed(&world, 1, net, true)?;
    let client = world.dockerds[1].run(&lab, "dkc-client", net, &["--dns", OVL_DNS])?;
    // Through Docker's resolver on B, which knows none of them and asks
    // ovl's.
    let web = || -> Result<Option<Vec<Ipv4Addr>>> {
        Ok(match lookup(&world, 1, "dkc-client", "web", None)? {
            Lookup::Addresses(a) => Some(a),
            _ => None,
        })
    };
    let sorted = |mut a: Vec<Ipv4Addr>| {
        a.sort();
        a
    };
    wait_until(Duration::from_secs(10), || {
        Ok(web()?.map(sorted) == Some(replicas.clone()))
    })
    .with_context(|| format!("web never resolved to {replicas:?}"))?;
    let mut firsts = BTreeSet::new();
    for _ in 0..30 {
        let got = web()?.context("web stopped resolving")?;
        ensure!(sorted(got.clone()) == replicas, "web: {got:?}");
        firsts.insert(got[0]);
    }
    ensure!(firsts.len() == 3, "30 answers put only {firsts:?} first");
    for ip in &replicas {
        ensure!(
            ping(&client.netns, *ip, 1, &["-W", "2"])?.all_received(),
            "dkc-client does not reach replica {ip}"
        );
    }
    world.docker(1, &["rm", "-f", "dkc-client"])?;
    world.dockerds[0].compose(project, &file, &["down"])?;
    wait_until(VISIBLE_WITHIN, || {
        Ok(!ovl_networks(&world)?.contains(&net.to_owned()))
    })
    .context("docker-compose down left the network in ovl")?;
    world.stop()
}

/// Issue 9's name resolution: a container's Docker name and
/// `--network-alias`es are its names in ovl's DNS, so containers on
/// different hosts find each other by name (through Docker's resolver,
/// which forwards to ovl's at `--dns 127.0.0.12`); a removed container's
/// names go with it.
#[test]
fn docker_containers_resolve_each_other_by_name_across_hosts() -> Result<()> {
    let lab = Lab::new("dk-names")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 2, DockerdOptions::default())?;
    create_network(&world, 0, NET, SUBNET)?;
    wait_listed(&world, 1, NET, true)?;

    let web = world.dockerds[1].run(
        &lab,
        "web",
        NET,
        &["--network-alias", "www", "--dns", OVL_DNS],
    )?;
    let named_from = Instant::now();
    let client = world.dockerds[0].run(&lab, "client", NET, &["--dns", OVL_DNS])?;
    let (web_ip, client_ip) = (web.ip()?, client.ip()?);

    // From A, web (on B) resolves by name and alias.
    wait_lookup(
        &world,
        (0, "client"),
        "web",
        None,
        &Lookup::Addresses(vec![web_ip]),
        Duration::from_secs(5),
    )?;
    eprintln!(
        "web resolves on A {:?} after `docker run` on B returned (client started meanwhile)",
        named_from.elapsed()
    );
    for name in ["www", "web.uber-net"] {
        ensure!(
            lookup(&world, 0, "client", name, None)? == Lookup::Addresses(vec![web_ip]),
            "{name}: {:?}",
            lookup(&world, 0, "client", name, None)?
        );
    }
    let id = world.docker(1, &["inspect", "-f", "{{.Id}}", "web"])?;
    let ep = ovl_endpoint(&world, NET, web_ip)?;
    ensure!(
        ep["name"] == "web" && ep["aliases"] == serde_json::json!(["www", &id[..12]]),
        "web's endpoint: {ep}"
    );
    // And the other way round.
    wait_lookup(
        &world,
        (1, "web"),
        "client",
        None,
        &Lookup::Addresses(vec![client_ip]),
        Duration::from_secs(5),
    )?;

    // Ping by name, from a running container and from a new one.
    let out = world.docker(0, &["exec", "client", "ping", "-c", "1", "-W", "2", "web"])?;
    ensure!(
        out.contains(&format!("({web_ip})")) && out.contains("1 packets received"),
        "{out}"
    );
    let out = world.docker(
        0,
        &[
            "run",
            "--rm",
            "--network",
            NET,
            "--dns",
            OVL_DNS,
            ovl_tests::BUSYBOX_IMAGE,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "www",
        ],
    )?;
    ensure!(
        out.contains(&format!("({web_ip})")) && out.contains("1 packets received"),
        "{out}"
    );

    // docker rename: the endpoint follows at the agent's next pass.
    world.docker(0, &["rename", "client", "client2"])?;
    let took = wait_lookup(
        &world,
        (1, "web"),
        "client2",
        None,
        &Lookup::Addresses(vec![client_ip]),
        Duration::from_secs(5),
    )?;
    eprintln!("client2 resolves on B {took:?} after `docker rename` on A");
    ensure!(
        lookup(&world, 1, "web", "client", None)? == Lookup::NxDomain,
        "the old name stayed"
    );

    // docker rm -f web: its names go with its endpoint.
    world.docker(1, &["rm", "-f", "web"])?;
    let gone = wait_lookup(
        &world,
        (0, "client2"),
        "web",
        None,
        &Lookup::NxDomain,
        Duration::from_secs(2),
    )?;
    eprintln!("web NXDOMAIN on A {gone:?} after `docker rm -f web` returned on B");
    ensure!(
        lookup(&world, 0, "client2", "www", None)? == Lookup::NxDomain,
        "www outlived web"
    );
    world.stop()
}

/// Docker's names are unique per daemon, ovl's per network across hosts:
/// a container named like one on another host keeps the names it can have,
/// the clash is said once (not at every reconcile pass), and the name is
/// its own as soon as the other container is gone.
#[test]
fn a_docker_name_another_host_holds_is_said_once_and_taken_when_freed() -> Result<()> {
    let lab = Lab::new("dk-clash")?;
    // The daemons point every container at ovl's resolver (daemon.json's
    // "dns"), rather than each container with --dns.
    let daemon_dns = DockerdOptions {
        dns: Some(OVL_DNS),
        ..DockerdOptions::default()
    };
    let world = DockerCluster::start(&lab, StoreKind::File, 2, daemon_dns)?;
    create_network(&world, 0, NET, SUBNET)?;
    wait_listed(&world, 1, NET, true)?;
    let b_web = world.dockerds[1].run(&lab, "web", NET, &[])?;
    let b_ip = b_web.ip()?;
    wait_until(Duration::from_secs(5), || {
        Ok(ovl_endpoint(&world, NET, b_ip)?["name"] == "web")
    })
    .context("B's web never got its name")?;

    // A second `web`, on A, also known as web-a.
    let a_web = world.dockerds[0].run(&lab, "web", NET, &["--network-alias", "web-a"])?;
    let a_ip = a_web.ip()?;
    // ovl's resolver (asked directly: Docker's would answer A's own web)
    // keeps web for B's and knows A's by its other names.
    wait_lookup(
        &world,
        (0, "web"),
        "web-a",
        Some(OVL_DNS),
        &Lookup::Addresses(vec![a_ip]),
        Duration::from_secs(5),
    )?;
    ensure!(
        lookup(&world, 0, "web", "web", Some(OVL_DNS))? == Lookup::Addresses(vec![b_ip]),
        "web should stay B's"
    );
    let a_ep = ovl_endpoint(&world, NET, a_ip)?;
    let short_endpoint = world.dockerds[0].endpoints(NET)?[&a_ip][..12].to_owned();
    ensure!(a_ep["name"] == short_endpoint, "A's web: {a_ep}");

    // Said once, however many passes run (every 2 s, and on every store
    // change: another container comes and goes meanwhile).
    let other = world.dockerds[1].run(&lab, "other", NET, &[])?;
    // (Through Docker's resolver, which forwards what it does not know to
    // the daemon's --dns.)
    wait_lookup(
        &world,
        (0, "web"),
        "other",
        None,
        &Lookup::Addresses(vec![other.ip()?]),
        Duration::from_secs(5),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    world.docker(1, &["rm", "-f", &other.name])?;
    std::thread::sleep(Duration::from_secs(3));
    let log = world.agents[0].as_ref().context("agent A")?.log()?;
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("does not get every name"))
        .collect();
    ensure!(
        said.len() == 1
            && said[0].contains(&format!(
                "web is held by endpoint web ({b_ip} on node host-b)"
            )),
        "the clash should be said once, clearly:\n{log}"
    );
    let written = log
        .lines()
        .filter(|l| l.contains(&format!("container web on {NET} ({a_ip}) resolves as")))
        .count();
    ensure!(written == 1, "names written {written} times:\n{log}");

    // B's web goes: A's takes the name.
    world.docker(1, &["rm", "-f", "web"])?;
    let took = wait_lookup(
        &world,
        (0, "web"),
        "web",
        Some(OVL_DNS),
        &Lookup::Addresses(vec![a_ip]),
        Duration::from_secs(5),
    )?;
    eprintln!("A's web took the name {took:?} after B's was removed");
    let log = world.agents[0].as_ref().context("agent A")?.log()?;
    ensure!(
        log.contains(&format!(
            "container web on {NET} has every name it has in Docker now"
        )),
        "{log}"
    );
    world.stop()
}

#[test]
fn a_port_published_with_docker_run_p_is_reached_from_outside_the_host() -> Result<()> {
    let lab = Lab::new("dk-ports")?;
    let world = DockerCluster::start(&lab, StoreKind::Etcd, 1, DockerdOptions::default())?;
    let etcd = world.etcd.as_ref().context("an etcd store")?;
    create_network(&world, 0, NET, SUBNET)?;
    let web = world.dockerds[0].run(&lab, "web", NET, &["-p", "8080:80"])?;
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
    // The router is outside host A: it reaches host A's address.
    let host_a = "192.0.2.10";
    let fetch = format!(
        "import urllib.request\n\
         print(urllib.request.urlopen('http://{host_a}:8080/index.html', timeout=3).read().decode())"
    );
    let mut got = String::new();
    wait_until(Duration::from_secs(10), || {
        let out = world
            .router
            .exec_unchecked(&["/usr/bin/python3", "-c", &fetch])?;
        got = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(got.contains("hello from web"))
    })
    .with_context(|| format!("{host_a}:8080 answered {got:?}"))?;

    let ep = ovl_endpoint(&world, NET, web.ip()?)?;
    ensure!(
        ep["ports"]
            == serde_json::json!([{"protocol": "tcp", "host_port": 8080, "container_port": 80}]),
        "ovl's endpoint of web: {ep}"
    );
    // `docker port` shows nothing: Docker 20.10 drops a remote driver's
    // port map (README, "With Docker"); ovl lists it.
    let listing = world.ovl(0, &["endpoint", "ls", "--network", NET])?;
    ensure!(
        listing.contains("publishes 0.0.0.0:8080->80/tcp"),
        "ovl endpoint ls: {listing}"
    );

    ensure!(
        etcd.keys("/ovl/ports/")? == ["/ovl/ports/host-a/tcp/8080/0.0.0.0"],
        "the port's claim: {:?}",
        etcd.keys("/ovl/ports/")?
    );

    // Removing the container unpublishes the port, and frees its claim
    // (Leave turns the endpoint back into a reservation).
    world.docker(0, &["rm", "-f", "web"])?;
    ensure!(
        etcd.keys("/ovl/ports/")?.is_empty(),
        "claims left: {:?}",
        etcd.keys("/ovl/ports/")?
    );
    let table = world.hosts[0]
        .netns
        .exec(&["nft", "list", "chain", "ip", "ovl", "published"])?;
    let mut rules = String::from_utf8_lossy(&table.stdout).into_owned();
    wait_until(Duration::from_secs(5), || {
        let out = world.hosts[0]
            .netns
            .exec(&["nft", "list", "chain", "ip", "ovl", "published"])?;
        rules = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(!rules.contains("dport 8080"))
    })
    .with_context(|| format!("the rule outlived the container:\n{rules}"))?;
    world.stop()
}

/// `docker run -p 8080:80` on a host with Docker's defaults (its
/// firewall, its bridge, its userland proxy): Docker serves its own
/// bridge's published ports on the host's loopback too (`curl
/// localhost:8080`), and so does ovl. A container on the network still
/// cannot reach the host's loopback through its veth.
#[test]
fn a_port_published_with_docker_run_p_is_reached_from_the_host_through_localhost() -> Result<()> {
    let lab = Lab::new("dk-localhost")?;
    let world = DockerCluster::start(
        &lab,
        StoreKind::File,
        1,
        DockerdOptions {
            firewall: true,
            bridge: Some("198.19.255.1/24"),
            ..DockerdOptions::default()
        },
    )?;
    create_network(&world, 0, NET, SUBNET)?;
    let serve = |name: &str| {
        format!("mkdir -p /www && echo hello from {name} > /www/index.html && httpd -p 80 -h /www")
    };
    let web = world.dockerds[0].run(&lab, "web", NET, &["-p", "8080:80"])?;
    world.docker(0, &["exec", "web", "sh", "-c", &serve("web")])?;
    world.dockerds[0].run(&lab, "bridged", "bridge", &["-p", "8090:80"])?;
    world.docker(0, &["exec", "bridged", "sh", "-c", &serve("bridged")])?;
    let host = &world.hosts[0].netns;
    let get = |port: u16| -> Result<String> {
        let fetch = format!(
            "import urllib.request\n\
             print(urllib.request.urlopen('http://127.0.0.1:{port}/index.html', timeout=3).read().decode())"
        );
        let out = host.exec_unchecked(&["/usr/bin/python3", "-c", &fetch])?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    let mut got = String::new();
    wait_until(Duration::from_secs(10), || {
        got = get(8090)?;
        Ok(got.contains("hello from bridged"))
    })
    .with_context(|| {
        format!(
            "Docker's own bridge is not served on localhost: the test would prove nothing: {got}"
        )
    })?;
    wait_until(Duration::from_secs(10), || {
        got = get(8080)?;
        Ok(got.contains("hello from web"))
    })
    .with_context(|| format!("127.0.0.1:8080 on host A answered {got:?}"))?;
    // The rest of the loopback stays the host's own services' (a resolver
    // on 127.0.0.53): one there on the same port still gets its clients.
    let _own = lab.python_tcp_server(
        host,
        Ipv4Addr::new(127, 0, 0, 2),
        8080,
        "c.sendall(b'the host itself\\n')\nc.close()",
    )?;
    let out = host.exec_unchecked(&["nc", "-w", "3", "127.0.0.2", "8080"])?;
    let own = String::from_utf8_lossy(&out.stdout);
    ensure!(
        own.contains("the host itself"),
        "127.0.0.2:8080 did not reach the host's own service there: {own:?}"
    );

    // A UDP service on the host's loopback (a syslog, a statsd: nothing
    // needs to answer), and web sending to it through its gateway as a
    // crafted packet would (its own loopback takes 127/8 otherwise):
    // nothing of it may arrive. The host's own datagram after it ends the
    // listening.
    let port = "9999";
    let listen = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('127.0.0.1', {port}))\n\
         print('listening', flush=True)\n\
         while True:\n\
         \x20   data, peer = s.recvfrom(100)\n\
         \x20   print(data, peer, flush=True)\n\
         \x20   if data.startswith(b'the host'):\n\
         \x20       break\n"
    );
    let server = lab.spawn(host, &["/usr/bin/python3", "-c", &listen], &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(server.stdout()?.contains("listening"))
    })
    .with_context(|| format!("UDP server did not start:\n{}", server.output_report()))?;
    let gateway = "198.18.0.1";
    for argv in [
        &["sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1"][..],
        &[
            "ip", "route", "add", "default", "via", gateway, "dev", "eth0", "table", "100",
        ],
        &[
            "ip",
            "rule",
            "add",
            "pref",
            "10",
            "to",
            "127.0.0.1",
            "lookup",
            "100",
        ],
        &["ip", "rule", "del", "pref", "0", "lookup", "local"],
        &["ip", "rule", "add", "pref", "20", "lookup", "local"],
    ] {
        web.netns.exec(argv)?;
    }
    let route = web.netns.ip(&["route", "get", "127.0.0.1"])?;
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    ensure!(
        route.contains(&format!("via {gateway}")),
        "web does not send 127.0.0.1 to its gateway: the test would prove nothing: {route}"
    );
    web.netns.exec(&[
        "sh",
        "-c",
        &format!("echo from web | nc -u -w 1 127.0.0.1 {port}"),
    ])?;
    host.exec(&[
        "sh",
        "-c",
        &format!("echo the host | nc -u -w 1 127.0.0.1 {port}"),
    ])?;
    let mut got = String::new();
    wait_until(Duration::from_secs(10), || {
        got = server.stdout()?;
        Ok(got.contains("the host"))
    })
    .with_context(|| format!("the host's own datagram did not arrive: {got}"))?;
    ensure!(
        !got.contains("from web"),
        "a container reached a service on the host's loopback:\n{got}"
    );
    world.stop()
}

/// `--ipam-driver ovl` on a network of another driver: Docker asks for the
/// pool before it says which driver the network is for, so the network is
/// made; but a container on it is refused saying that ovl's IPAM serves
/// only `-d ovl` networks (at once, and after the agent removed the pool's
/// unused provisional network), and nothing is left in ovl's store.
#[test]
fn a_network_of_another_driver_on_ovls_ipam_is_told_to_use_the_ovl_driver() -> Result<()> {
    let lab = Lab::new("dk-ipam")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 1, DockerdOptions::default())?;
    world.docker(
        0,
        &[
            "network",
            "create",
            "-d",
            "bridge",
            "--ipam-driver",
            "ovl",
            "--subnet",
            "198.18.7.0/24",
            "bridged",
        ],
    )?;
    let refused = || -> Result<String> {
        let out = world.dockerds[0].docker_unchecked(&[
            "run",
            "--rm",
            "--network",
            "bridged",
            ovl_tests::BUSYBOX_IMAGE,
            "true",
        ])?;
        ensure!(!out.status.success(), "a container ran on bridged");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let first = refused()?;
    ensure!(first.contains("create it with -d ovl"), "at once: {first}");
    wait_until(RECONCILE_WITHIN, || {
        Ok(!ovl_networks(&world)?
            .iter()
            .any(|n| n.starts_with("docker-pending-")))
    })
    .context("the pool's provisional network stayed")?;
    let later = refused()?;
    ensure!(
        later.contains("create it with -d ovl"),
        "after the provisional network went: {later}"
    );
    world.stop()
}

/// A network ovl made with two subnets appears in Docker with both pools.
/// Docker asks the first pool for every address and moves on only on its
/// own IPAM's "no addresses left", never on a remote IPAM's error: once the
/// first subnet is full, `docker run` still gets an address — from the
/// second subnet, routed to the first by ovl's gateways — and `docker rm`
/// frees it.
#[test]
fn docker_run_takes_the_next_subnet_once_the_first_is_full() -> Result<()> {
    let lab = Lab::new("dk-2sub")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 1, DockerdOptions::default())?;
    let net = "dk2-net";
    world.ovl(
        0,
        &[
            "network",
            "create",
            net,
            "--subnet",
            "198.18.20.0/29",
            "--subnet",
            "198.18.21.0/29",
        ],
    )?;
    wait_listed(&world, 0, net, true)?;
    let first = world.dockerds[0].run(&lab, "dk2-first", net, &[])?;
    let first_ip = Ipv4Addr::new(198, 18, 20, 2);
    ensure!(first.ip()? == first_ip, "dk2-first got {}", first.ip()?);
    // The rest of the first subnet: endpoints behind a VTEP without ovl.
    for last in 3..=6 {
        let ip = format!("198.18.20.{last}");
        world.ovl(0, &["endpoint", "add", net, &ip, "--vtep", "192.0.2.99"])?;
    }
    let second = world.dockerds[0].run(&lab, "dk2-second", net, &[])?;
    let second_ip = Ipv4Addr::new(198, 18, 21, 2);
    ensure!(second.ip()? == second_ip, "dk2-second got {}", second.ip()?);
    let addr = second
        .netns
        .ip(&["-o", "-4", "addr", "show", "dev", "eth0"])?;
    let addr = String::from_utf8_lossy(&addr.stdout).into_owned();
    ensure!(addr.contains("198.18.21.2/29"), "dk2-second eth0: {addr}");
    let routes = second.netns.ip(&["-4", "route", "show", "default"])?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    ensure!(
        routes.contains("default via 198.18.21.1 dev eth0"),
        "dk2-second routes: {routes}"
    );
    ensure!(
        ping(&second.netns, first_ip, 1, &["-W", "2"])?.all_received(),
        "dk2-second does not reach dk2-first across the subnets"
    );
    world.agree(0, net)?;
    world.docker(0, &["rm", "-f", "dk2-second"])?;
    let held = world.ovl_endpoints(0, net)?;
    ensure!(
        !held.contains_key(&second_ip),
        "docker rm left {second_ip} held: {held:?}"
    );
    world.agree(0, net)?;
    world.stop()
}

/// A network Docker creates with several subnets is one ovl network: one
/// VNI, each subnet with its own gateway, IP range and auxiliary
/// addresses, and containers in different subnets on different hosts
/// reach each other through ovl's gateways. Docker asked ovl's IPAM for
/// each pool before it said which network they make, so the later
/// subnets' pools are named by the VNIs of the provisional networks they
/// were asked under: those keep serving `--ip` and `docker rm` on the
/// creating host, and no other network gets those VNIs until the network
/// goes. Docker overlay's `vxlanid_list` option gives it its VNI (then
/// the first pool's is kept too). Before: refused ("several --subnet",
/// "unknown option").
#[test]
fn a_docker_network_with_several_subnets_is_one_ovl_network() -> Result<()> {
    let lab = Lab::new("dk-msub")?;
    let world = DockerCluster::start(&lab, StoreKind::Etcd, 2, DockerdOptions::default())?;
    let net = "dkm-net";
    let extra = [
        "--subnet",
        "198.18.41.0/24",
        "--subnet",
        "198.18.42.0/24",
        "--gateway",
        "198.18.41.254",
        "--ip-range",
        "198.18.42.64/26",
        "--aux-address",
        "router=198.18.42.65",
        "--opt",
        "com.docker.network.driver.overlay.vxlanid_list=5042",
    ];
    world.docker(0, &ovl_network_argv(net, "198.18.40.0/24", &extra))?;
    wait_until(VISIBLE_WITHIN, || {
        Ok(ovl_networks(&world)?.contains(&net.to_owned()))
    })?;
    let networks = ovl_networks(&world)?;
    ensure!(networks == [net], "ovl has networks {networks:?}");
    let inspect = world.ovl.inspect(&world.hosts[0].netns, net)?;
    let pools: Vec<(String, String, String)> = inspect["subnets"]
        .as_array()
        .context("subnets")?
        .iter()
        .map(|p| {
            let text = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
            (text("subnet"), text("gateway"), text("range"))
        })
        .collect();
    let pool = |subnet: &str, gateway: &str, range: &str| {
        (subnet.to_owned(), gateway.to_owned(), range.to_owned())
    };
    // Docker's CLI passes the subnets in no fixed order (it gathers them
    // in a Go map): the first it names is the network's first.
    let mut sorted = pools.clone();
    sorted.sort();
    ensure!(
        sorted
            == [
                pool("198.18.40.0/24", "198.18.40.1", ""),
                pool("198.18.41.0/24", "198.18.41.254", ""),
                pool("198.18.42.0/24", "198.18.42.1", "198.18.42.64/26"),
            ],
        "{inspect}"
    );
    // What a container that asks for no address gets: the first free
    // address of the first subnet (of its range, in the last one).
    let first_free: Ipv4Addr = match pools[0].0.as_str() {
        "198.18.40.0/24" => "198.18.40.2",
        "198.18.41.0/24" => "198.18.41.1",
        _ => "198.18.42.64",
    }
    .parse()?;
    ensure!(
        inspect["aux_addresses"] == serde_json::json!({"router": "198.18.42.65"}),
        "{inspect}"
    );
    // The VNI asked for; the three allocated to the pools are kept, each
    // listed once with the subnets it named (the first pool's, all three:
    // they were its network's when it was renumbered).
    let kept_list = inspect["kept_vnis"].as_array().context("kept_vnis")?;
    let kept: Vec<u64> = kept_list.iter().filter_map(|m| m["vni"].as_u64()).collect();
    let named: Vec<usize> = kept_list
        .iter()
        .map(|m| m["subnets"].as_array().map_or(0, Vec::len))
        .collect();
    ensure!(
        inspect["vni"] == 5042
            && kept.iter().collect::<BTreeSet<_>>().len() == 3
            && !kept.contains(&5042)
            && named == [1, 1, 3],
        "{inspect}"
    );

    // Host A: the first pool's first free address, then --ip in every
    // subnet (two of whose pools Docker names by the kept VNIs).
    let a1 = world.dockerds[0].run(&lab, "dkm-a1", net, &[])?;
    ensure!(
        a1.ip()? == first_free,
        "dkm-a1 got {}, not {first_free}",
        a1.ip()?
    );
    let a2 = world.dockerds[0].run(&lab, "dkm-a2", net, &["--ip", "198.18.42.100"])?;
    let a3 = world.dockerds[0].run(&lab, "dkm-a3", net, &["--ip", "198.18.41.7"])?;
    let a4 = world.dockerds[0].run(&lab, "dkm-a4", net, &["--ip", "198.18.40.7"])?;
    run_refused(
        &world,
        0,
        net,
        "dkm-x",
        &["--ip", "198.18.42.65"],
        "reserved as auxiliary address \"router\"",
    )?;
    // Host B, through its mirror of the network.
    wait_listed(&world, 1, net, true)?;
    let b1 = world.dockerds[1].run(&lab, "dkm-b1", net, &["--ip", "198.18.41.9"])?;
    let routes = b1.netns.ip(&["-4", "route", "show", "default"])?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    ensure!(
        routes.contains("default via 198.18.41.254 dev eth0"),
        "dkm-b1 routes: {routes}"
    );
    for (from, to) in [(&b1, &a1), (&b1, &a2), (&b1, &a4), (&a2, &a3), (&a1, &b1)] {
        ensure!(
            ping(&from.netns, to.ip()?, 1, &["-W", "2"])?.all_received(),
            "{} does not reach {} ({})",
            from.name,
            to.name,
            to.ip()?
        );
    }
    world.agree(0, net)?;
    world.agree(1, net)?;
    world.docker(0, &["rm", "-f", "dkm-a2"])?;
    let held = world.ovl_endpoints(0, net)?;
    ensure!(
        !held.contains_key(&Ipv4Addr::new(198, 18, 42, 100)),
        "docker rm left 198.18.42.100 held: {held:?}"
    );

    // The kept VNIs are the network's as long as it exists.
    let probe = |vni: u64| {
        world.ovl.run_unchecked(
            &world.hosts[0].netns,
            DockerCluster::NODES[0],
            &[
                "network",
                "create",
                "dkm-probe",
                "--subnet",
                "198.18.43.0/24",
                "--vni",
                &vni.to_string(),
            ],
        )
    };
    let out = probe(kept[0])?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success() && said.contains(net),
        "VNI {} of {net} given again: {said}",
        kept[0]
    );
    for name in ["dkm-a1", "dkm-a3", "dkm-a4"] {
        world.docker(0, &["rm", "-f", name])?;
    }
    world.docker(1, &["rm", "-f", "dkm-b1"])?;
    world.docker(0, &["network", "rm", net])?;
    wait_until(VISIBLE_WITHIN, || {
        Ok(!ovl_networks(&world)?.contains(&net.to_owned()))
    })?;
    for vni in kept {
        let out = probe(vni)?;
        ensure!(
            out.status.success(),
            "VNI {vni} still taken after {net} went: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        world.ovl(0, &["network", "rm", "dkm-probe"])?;
    }
    world.stop()
}

/// The agent's grace before it gives up pools dockerd asked for without
/// a CreateNetwork (5 s), and a little more.
const ABANDONED_AFTER: Duration = Duration::from_secs(7);

/// Docker asks for a network's pools one after the other, each with its
/// gateway, before CreateNetwork names the network they make: with many
/// subnets, or a slow store, that takes longer than the grace after which
/// the agent removes pools a dockerd gave up (a real `docker network
/// create` with 70 subnets did, here). Pools Docker keeps adding to are
/// not given up: Docker's calls, sent to the plugin as dockerd sends them,
/// come a second apart for longer than the grace, and CreateNetwork finds
/// every pool. Before: the first pools were removed as abandoned ("no
/// pool of ovl's IPAM for 198.18.45.0/24").
#[test]
fn pools_docker_keeps_adding_to_are_not_given_up_before_create_network() -> Result<()> {
    let lab = Lab::new("dk-slow")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 1, DockerdOptions::default())?;
    let call = |method: &str, body: Value| answered(&world, 0, method, &body);
    let subnets: Vec<String> = (45..53).map(|i| format!("198.18.{i}.0/24")).collect();
    let step = ABANDONED_AFTER / (subnets.len() as u32 - 1);
    let mut pools = Vec::new();
    for (i, subnet) in subnets.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(step);
        }
        let pool = call(
            "IpamDriver.RequestPool",
            serde_json::json!({"AddressSpace": "ovl", "Pool": subnet, "SubPool": "",
                "Options": {}, "V6": false}),
        )?;
        let gateway = call(
            "IpamDriver.RequestAddress",
            serde_json::json!({"PoolID": pool["PoolID"], "Address": "",
                "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
        )?;
        pools.push(serde_json::json!({"AddressSpace": "ovl", "Pool": subnet,
            "Gateway": gateway["Address"]}));
    }
    let id = "5107".repeat(16);
    call(
        "NetworkDriver.CreateNetwork",
        serde_json::json!({"NetworkID": id, "IPv4Data": pools,
            "Options": {"com.docker.network.generic": {}}}),
    )?;
    let net = world
        .ovl
        .inspect(&world.hosts[0].netns, "docker-pending-198.18.45.0-24")?;
    ensure!(subnets_of(&net)? == subnets, "{net}");
    call(
        "NetworkDriver.DeleteNetwork",
        serde_json::json!({"NetworkID": id}),
    )?;
    let left = ovl_networks(&world)?;
    ensure!(left.is_empty(), "left in ovl: {left:?}");
    world.stop()
}

/// A network Docker creates with many subnets on the etcd store: each
/// pool's provisional network is several keys (the network, its VNI
/// claim, its endpoint, name and release prefixes), so merging them all in
/// one transaction would pass etcd's 128 operations from some 25 subnets
/// on. 30 subnets make one ovl network, which keeps the 29 other VNIs, and
/// `docker network rm` leaves no key of it. Before: refused ("the change
/// needs 146 operations in one etcd transaction ... make it in smaller
/// steps", which a Docker user cannot).
#[test]
fn a_docker_network_with_thirty_subnets_is_created_on_etcd() -> Result<()> {
    let lab = Lab::new("dk-many")?;
    let world = DockerCluster::start(&lab, StoreKind::Etcd, 1, DockerdOptions::default())?;
    let net = "dkmany-net";
    let subnets = many_subnets(30, 56);
    world.docker(
        0,
        &ovl_network_argv(net, &subnets[0], &more_subnets(&subnets)),
    )?;
    wait_until(VISIBLE_WITHIN, || {
        Ok(ovl_networks(&world)?.contains(&net.to_owned()))
    })?;
    let inspect = world.ovl.inspect(&world.hosts[0].netns, net)?;
    let mut got = subnets_of(&inspect)?;
    got.sort();
    let mut want = subnets.clone();
    want.sort();
    ensure!(got == want, "{inspect}");
    let kept: BTreeSet<u64> = inspect["kept_vnis"]
        .as_array()
        .context("kept_vnis")?
        .iter()
        .filter_map(|k| k["vni"].as_u64())
        .collect();
    ensure!(kept.len() == 29, "{inspect}");
    world.docker(0, &["network", "rm", net])?;
    no_network_in_etcd(&world)?;
    world.stop()
}

/// The subnets of a network as `ovl network inspect` shows it, in its
/// order.
fn subnets_of(inspect: &Value) -> Result<Vec<String>> {
    Ok(inspect["subnets"]
        .as_array()
        .context("subnets")?
        .iter()
        .filter_map(|p| p["subnet"].as_str().map(str::to_owned))
        .collect())
}

/// `n` /28 subnets from 198.18.`third`.0 on.
fn many_subnets(n: usize, third: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("198.18.{}.{}/28", third + i / 16, (i % 16) * 16))
        .collect()
}

/// `--subnet S` for every subnet of `subnets` but the first (which
/// [`ovl_network_argv`] takes).
fn more_subnets(subnets: &[String]) -> Vec<&str> {
    subnets[1..]
        .iter()
        .flat_map(|s| ["--subnet", s.as_str()])
        .collect()
}

/// The etcd store holds no network and no VNI claim.
fn no_network_in_etcd(world: &DockerCluster) -> Result<()> {
    let etcd = world.etcd.as_ref().context("etcd")?;
    let left = etcd.keys("/ovl/networks/")?;
    let claims = etcd.keys("/ovl/vnis/")?;
    ensure!(
        left.is_empty() && claims.is_empty(),
        "left: {left:?} {claims:?}"
    );
    Ok(())
}

/// Each subnet of a network Docker creates keeps the VNI its pool was
/// given, a claim that naming and removing the network rewrite in one
/// etcd transaction: past 64 subnets the creation is refused, naming
/// `ovl network create` (whose networks keep no VNI per subnet), and
/// nothing is left in ovl's store. Before: 65 subnets were taken, and
/// from about 124 the network could be neither named (never mirrored)
/// nor removed (`docker network rm` left it in ovl for good).
#[test]
fn a_docker_network_with_more_than_64_subnets_is_refused() -> Result<()> {
    let lab = Lab::new("dk-toomany")?;
    let world = DockerCluster::start(&lab, StoreKind::Etcd, 1, DockerdOptions::default())?;
    let subnets = many_subnets(65, 64);
    let needle = "65 subnets: a network Docker creates has at most 64 (each keeps the VNI ovl gave its pool); make it with `ovl network create";
    create_refused(
        &world,
        0,
        "dktm-net",
        &subnets[0],
        &more_subnets(&subnets),
        needle,
    )?;
    no_network_in_etcd(&world)?;
    world.stop()
}

/// Two creations racing for a subnet: the pool one Docker asked for (sent
/// to the plugin as dockerd sends it) refuses the other's `docker network
/// create`, naming the node that is creating a network with it rather
/// than its provisional ovl name, and saying the subnet is freed if that
/// creation fails; once Docker gives the pool back, the create goes
/// through. Before: "overlaps network "docker-pending-198.18.58.0-24"".
#[test]
fn a_subnet_another_docker_creation_holds_is_refused_naming_its_node() -> Result<()> {
    let lab = Lab::new("dk-race2")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 1, DockerdOptions::default())?;
    let subnet = "198.18.58.0/24";
    let body = serde_json::json!({"AddressSpace": "ovl", "Pool": subnet, "SubPool": "",
        "Options": {}, "V6": false});
    let pool = answered(&world, 0, "IpamDriver.RequestPool", &body)?;
    let needle = "overlaps 198.18.58.0/24, which Docker on node host-a is creating a network with; pick another subnet, or try again once that creation is over (if it fails, its subnets are freed)";
    create_refused(&world, 0, "dkr2-net", subnet, &[], needle)?;
    let body = serde_json::json!({"PoolID": pool["PoolID"]});
    answered(&world, 0, "IpamDriver.ReleasePool", &body)?;
    create_network(&world, 0, "dkr2-net", subnet)?;
    world.stop()
}

/// `ovl connect` and Docker's RequestAddress racing on the etcd store for
/// a network's last free addresses go through one allocation: each
/// address is handed out once, exactly as many requests win as there were
/// addresses, and the rest are refused as exhausted. Round after round,
/// once everything is given back, nothing is left held.
#[test]
fn connect_and_docker_ipam_racing_for_the_last_addresses_never_share_one() -> Result<()> {
    let lab = Lab::new("dk-race")?;
    let world = DockerCluster::start(&lab, StoreKind::Etcd, 1, DockerdOptions::default())?;
    let net = "dkrace-net";
    world.ovl(0, &["network", "create", net, "--subnet", "198.18.22.0/29"])?;
    let pool = format!("{}:198.18.22.0/29", vni_of(&world, net)?);
    let request = format!(r#"{{"PoolID":"{pool}","Address":"","Options":{{}}}}"#);
    let containers = (0..4)
        .map(|i| lab.container(&format!("race{i}")))
        .collect::<Result<Vec<_>>>()?;
    let all: Vec<Ipv4Addr> = (2..=6).map(|d| Ipv4Addr::new(198, 18, 22, d)).collect();
    for round in 0..3 {
        // (won, what) per contender: four connects, four Docker requests.
        let outcomes: Vec<Result<(bool, String)>> = std::thread::scope(|s| {
            let connects = containers.iter().map(|c| {
                let world = &world;
                s.spawn(move || -> Result<(bool, String)> {
                    let out = world.ovl.run_unchecked(
                        &world.hosts[0].netns,
                        DockerCluster::NODES[0],
                        &["connect", net, c.name()],
                    )?;
                    Ok((
                        out.status.success(),
                        String::from_utf8_lossy(&out.stderr).into_owned(),
                    ))
                })
            });
            let requests = (0..4).map(|_| {
                let (world, request) = (&world, &request);
                s.spawn(move || -> Result<(bool, String)> {
                    let (status, reply) = plugin_call(
                        &world.plugin_socket(0),
                        "IpamDriver.RequestAddress",
                        request,
                    )?;
                    Ok((status == 200, reply))
                })
            });
            let handles: Vec<_> = connects.chain(requests).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a contender panicked"))
                .collect()
        });
        let outcomes = outcomes.into_iter().collect::<Result<Vec<_>>>()?;
        let won = outcomes.iter().filter(|(w, _)| *w).count();
        ensure!(
            won == all.len(),
            "round {round}: {won} of 8 won five addresses: {outcomes:?}"
        );
        for (_, what) in outcomes.iter().filter(|(w, _)| !*w) {
            ensure!(
                what.contains("no free address left in 198.18.22.0/29"),
                "round {round}: a loser was refused otherwise: {what}"
            );
        }
        // Docker's replies and the connected namespaces name each address
        // once, and the store holds exactly those.
        let mut given: Vec<Ipv4Addr> = Vec::new();
        for (_, reply) in outcomes[4..].iter().filter(|(w, _)| *w) {
            let v: Value = serde_json::from_str(reply)?;
            let cidr = v["Address"].as_str().context("Address")?;
            given.push(cidr.trim_end_matches("/29").parse()?);
        }
        let inspect = world.ovl.inspect(&world.hosts[0].netns, net)?;
        let endpoints = inspect["endpoints"].as_array().context("endpoints")?;
        for c in &containers {
            if let Some(e) = endpoints
                .iter()
                .find(|e| e["location"]["netns"] == c.name())
            {
                given.push(e["ip"].as_str().context("ip")?.parse()?);
            }
        }
        given.sort();
        ensure!(given == all, "round {round}: handed out {given:?}");
        let mut held: Vec<Ipv4Addr> = endpoints
            .iter()
            .map(|e| e["ip"].as_str().unwrap_or_default().parse())
            .collect::<Result<_, _>>()?;
        held.sort();
        ensure!(held == all, "round {round}: the store holds {held:?}");
        // Everything given back: disconnects and Docker's releases.
        for c in &containers {
            let _ = world.ovl.run_unchecked(
                &world.hosts[0].netns,
                DockerCluster::NODES[0],
                &["disconnect", net, c.name()],
            )?;
        }
        for ip in &all {
            let body = format!(r#"{{"PoolID":"{pool}","Address":"{ip}"}}"#);
            plugin_call(&world.plugin_socket(0), "IpamDriver.ReleaseAddress", &body)?;
        }
        let left = world.ovl.inspect(&world.hosts[0].netns, net)?["endpoints"].clone();
        ensure!(
            left.as_array().is_none_or(Vec::is_empty),
            "round {round}: left held: {left}"
        );
    }
    world.stop()
}

/// A Docker network's addresses as Docker's users meet them: a /29 with
/// `--gateway` on its last host gives exactly five containers .1 to .5 and
/// refuses the sixth naming the subnet; `--ip` of the gateway, the network
/// or broadcast address or a taken one is refused saying why; an address
/// `docker rm` freed can be asked for at once. Docker and ovl agree after.
/// `docker run` of container `name` on network `net` of host `i` with
/// `extra` arguments, which must fail saying `needle`; the container
/// Docker may have left created is removed.
fn run_refused(
    world: &DockerCluster,
    i: usize,
    net: &str,
    name: &str,
    extra: &[&str],
    needle: &str,
) -> Result<()> {
    let mut argv = vec!["run", "-d", "--name", name, "--network", net];
    argv.extend_from_slice(extra);
    argv.extend_from_slice(&[ovl_tests::BUSYBOX_IMAGE, "sleep", "600"]);
    let out = world.dockerds[i].docker_unchecked(&argv)?;
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success() && msg.contains(needle),
        "{argv:?}: {msg}"
    );
    world.docker(i, &["rm", "-f", name])?;
    Ok(())
}

#[test]
fn docker_addresses_stop_at_the_subnets_usable_ones() -> Result<()> {
    let lab = Lab::new("dk-full")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 1, DockerdOptions::default())?;
    let net = "dkfull-net";
    world.docker(
        0,
        &[
            "network",
            "create",
            "-d",
            "ovl",
            "--ipam-driver",
            "ovl",
            "--subnet",
            "198.18.23.0/29",
            "--gateway",
            "198.18.23.6",
            net,
        ],
    )?;
    wait_until(VISIBLE_WITHIN, || {
        Ok(ovl_networks(&world)?.contains(&net.to_owned()))
    })?;
    for last in 1..=5 {
        let c = world.dockerds[0].run(&lab, &format!("dkfull-{last}"), net, &[])?;
        ensure!(
            c.ip()? == Ipv4Addr::new(198, 18, 23, last),
            "dkfull-{last} got {}",
            c.ip()?
        );
    }
    let refused =
        |name: &str, extra: &[&str], needle: &str| run_refused(&world, 0, net, name, extra, needle);
    refused("dkfull-6", &[], "no free address left in 198.18.23.0/29")?;
    for ip in ["198.18.23.6", "198.18.23.0", "198.18.23.7"] {
        refused("dkfull-x", &["--ip", ip], "is not a usable address of")?;
    }
    refused("dkfull-x", &["--ip", "198.18.23.2"], "already in use")?;
    world.docker(0, &["rm", "-f", "dkfull-3"])?;
    let again = world.dockerds[0].run(&lab, "dkfull-again", net, &["--ip", "198.18.23.3"])?;
    ensure!(
        again.ip()? == Ipv4Addr::new(198, 18, 23, 3),
        "{}",
        again.ip()?
    );
    world.agree(0, net)?;
    world.stop()
}

/// `--ip-range` and `--aux-address` of `docker network create` (Docker
/// asks ovl's IPAM for the gateway and the auxiliary addresses before
/// CreateNetwork names them): containers get addresses from the range
/// only, never an auxiliary one, and a full range says so. A creation
/// Docker gives up leaves no network and no address behind. A network
/// made by `ovl network create` with a range shows it in Docker and gives
/// Docker's containers addresses from it.
#[test]
fn ip_ranges_and_aux_addresses_of_docker_networks_are_kept() -> Result<()> {
    let lab = Lab::new("dk-range")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 1, DockerdOptions::default())?;
    let net = "dkr-net";
    let options = [
        "--ip-range",
        "198.18.30.128/30",
        "--gateway",
        "198.18.30.254",
        "--aux-address",
        "router=198.18.30.129",
        "--aux-address",
        "nas=198.18.30.7",
    ];
    let subnet = "198.18.30.0/24";
    // Refused after the IPAM calls: nothing of it stays in ovl's store.
    let bad = [&options[..], &["--opt", "color=blue"]].concat();
    create_refused(&world, 0, "dkr-bad", subnet, &bad, "color=blue")?;
    let ls = world.ovl(0, &["network", "ls", "--json"])?;
    ensure!(!ls.contains(subnet), "left behind: {ls}");

    world.docker(0, &ovl_network_argv(net, subnet, &options))?;
    wait_until(VISIBLE_WITHIN, || {
        Ok(ovl_networks(&world)?.contains(&net.to_owned()))
    })?;
    let inspect: Value = serde_json::from_str(&world.ovl(0, &["network", "inspect", net])?)?;
    let pool = &inspect["subnets"][0];
    ensure!(
        pool["range"] == "198.18.30.128/30" && pool["gateway"] == "198.18.30.254",
        "{inspect}"
    );
    ensure!(
        inspect["aux_addresses"]
            == serde_json::json!({"router": "198.18.30.129", "nas": "198.18.30.7"}),
        "{inspect}"
    );
    let mut got = Vec::new();
    for name in ["dkr-1", "dkr-2", "dkr-3"] {
        got.push(world.dockerds[0].run(&lab, name, net, &[])?.ip()?);
    }
    ensure!(
        got == [
            Ipv4Addr::new(198, 18, 30, 128),
            Ipv4Addr::new(198, 18, 30, 130),
            Ipv4Addr::new(198, 18, 30, 131)
        ],
        "{got:?}"
    );
    let refused =
        |name: &str, extra: &[&str], needle: &str| run_refused(&world, 0, net, name, extra, needle);
    refused(
        "dkr-4",
        &[],
        "no free address left in 198.18.30.0/24 (range 198.18.30.128/30)",
    )?;
    refused(
        "dkr-x",
        &["--ip", "198.18.30.7"],
        "reserved as auxiliary address \"nas\"",
    )?;
    world.agree(0, net)?;
    for name in ["dkr-1", "dkr-2", "dkr-3"] {
        world.docker(0, &["rm", "-f", name])?;
    }
    world.docker(0, &["network", "rm", net])?;
    wait_until(VISIBLE_WITHIN, || {
        Ok(!ovl_networks(&world)?.contains(&net.to_owned()))
    })?;

    // Made by ovl: Docker's mirror shows the range and takes addresses
    // from it.
    let mirror = "dkr-mirror";
    world.ovl(
        0,
        &[
            "network",
            "create",
            mirror,
            "--subnet",
            "198.18.31.0/24",
            "--ip-range",
            "198.18.31.64/26",
            "--aux-address",
            "gw2=198.18.31.64",
        ],
    )?;
    wait_listed(&world, 0, mirror, true)?;
    let range = world.docker(
        0,
        &[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.IPRange}}{{end}}",
            mirror,
        ],
    )?;
    ensure!(
        range == "198.18.31.64/26",
        "Docker shows IP range {range:?}"
    );
    let c = world.dockerds[0].run(&lab, "dkr-m", mirror, &[])?;
    ensure!(
        c.ip()? == Ipv4Addr::new(198, 18, 31, 65),
        "dkr-m got {}",
        c.ip()?
    );
    world.agree(0, mirror)?;
    world.stop()
}

/// A Docker network whose --ip-range its --gateway or --aux-address
/// addresses fill would give no container an address: refused at
/// creation, naming the range, and nothing of it stays in ovl's store.
#[test]
fn docker_refuses_an_ip_range_its_gateway_or_aux_addresses_fill() -> Result<()> {
    let lab = Lab::new("dk-rfull")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 1, DockerdOptions::default())?;
    let cases: [&[&str]; 2] = [
        &[
            "--ip-range",
            "198.18.33.8/31",
            "--aux-address",
            "a=198.18.33.8",
            "--aux-address",
            "b=198.18.33.9",
        ],
        &["--ip-range", "198.18.33.9/32", "--gateway", "198.18.33.9"],
    ];
    for extra in cases {
        let needle = "no address an endpoint could get";
        create_refused(&world, 0, "dkrf-net", "198.18.33.0/24", extra, needle)?;
        let ls = world.ovl(0, &["network", "ls", "--json"])?;
        ensure!(!ls.contains("198.18.33.0/24"), "{extra:?} left: {ls}");
        ensure!(
            !world.dockerds[0]
                .network_names()?
                .iter()
                .any(|n| n == "dkrf-net"),
            "{extra:?}: Docker kept dkrf-net"
        );
    }
    // A mirror of an ovl network takes no --aux-address; refused, it
    // keeps no address Docker asked for on the way.
    world.ovl(
        0,
        &[
            "network",
            "create",
            "dkrf-ovl",
            "--subnet",
            "198.18.34.0/24",
        ],
    )?;
    let mirror = [
        "--ipam-opt",
        "ovl.network=dkrf-ovl",
        "--opt",
        "ovl.network=dkrf-ovl",
        "--aux-address",
        "a=198.18.34.9",
    ];
    let needle = "auxiliary addresses";
    create_refused(&world, 0, "dkrf-mirror", "198.18.34.0/24", &mirror, needle)?;
    let eps = world.ovl(0, &["endpoint", "ls", "--network", "dkrf-ovl", "--json"])?;
    ensure!(eps.trim() == "[]", "left behind: {eps}");
    world.stop()
}

/// `docker run --mac-address`: the container's interface has that MAC, a
/// container on the other host reaches it through ovl's data path (its
/// ARP answered with that MAC, decapsulated frames addressed to it), and
/// a second container asking for the same MAC on the network is refused,
/// naming the holder.
#[test]
fn a_docker_container_keeps_the_mac_address_it_is_run_with() -> Result<()> {
    let lab = Lab::new("dk-mac")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 2, DockerdOptions::default())?;
    let net = "dkmac-net";
    create_network(&world, 0, net, "198.18.32.0/24")?;
    wait_listed(&world, 1, net, true)?;
    let mac = "0a:00:5e:00:00:05";
    let c1 = world.dockerds[0].run(&lab, "dkmac-1", net, &["--mac-address", mac])?;
    let link = c1.netns.ip(&["-o", "link", "show", "dev", "eth0"])?;
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    ensure!(link.contains(&format!("link/ether {mac}")), "{link}");
    let ip1 = c1.ip()?;
    let c2 = world.dockerds[1].run(&lab, "dkmac-2", net, &[])?;
    wait_until(Duration::from_secs(5), || {
        Ok(ping(&c2.netns, ip1, 1, &["-W", "1"])?.all_received())
    })?;
    let back = ping(&c1.netns, c2.ip()?, 3, &["-i", "0.2", "-W", "2"])?;
    ensure!(back.all_received(), "{}", back.output);
    let neigh = c2.netns.ip(&["neigh", "show", &ip1.to_string()])?;
    let neigh = String::from_utf8_lossy(&neigh.stdout).into_owned();
    ensure!(neigh.contains(mac), "dkmac-2 resolved {ip1} as {neigh}");
    let ep = ovl_endpoint(&world, net, ip1)?;
    ensure!(ep["mac"] == mac, "{ep}");

    run_refused(
        &world,
        1,
        net,
        "dkmac-3",
        &["--mac-address", mac],
        &format!("MAC {mac} is already used"),
    )?;
    world.agree(0, net)?;
    world.agree(1, net)?;
    world.stop()
}

/// Waits until a ping from `c` to `ip` is answered; the last one's
/// output if none is within `within`.
fn wait_reaches(c: &DockerContainer, ip: Ipv4Addr, within: Duration) -> Result<()> {
    let mut last = None;
    wait_until(within, || {
        let got = ping(&c.netns, ip, 1, &["-W", "1"])?;
        let ok = got.all_received();
        last = Some(got);
        Ok(ok)
    })
    .with_context(|| format!("the last ping: {last:?}"))
}

/// The IPv4 addresses of the interfaces in `c`, by interface name.
fn addresses(c: &DockerContainer) -> Result<Vec<(String, Ipv4Addr)>> {
    let out = c.netns.ip(&["-o", "-4", "addr", "show"])?;
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let (Some(dev), Some(at)) = (words.get(1), words.iter().position(|w| *w == "inet"))
            && *dev != "lo"
            && let Some(ip) = words.get(at + 1).and_then(|a| a.split('/').next())
        {
            found.push(((*dev).to_owned(), ip.parse()?));
        }
    }
    Ok(found)
}

/// `docker network connect` and `disconnect` on a running container, as
/// on Docker's overlay: a container on one ovl network joins a second
/// (a new interface, its address from ovl, traffic to a container of that
/// network on the other host), leaves the first (interface, endpoint and
/// map entries gone, the second still carrying traffic), and a `docker
/// restart` brings it back on the network it kept.
#[test]
fn a_running_container_joins_and_leaves_networks_with_docker_network_connect() -> Result<()> {
    const SECOND: &str = "second-net";
    let lab = Lab::new("dk-netconn")?;
    let world = DockerCluster::start(&lab, StoreKind::File, 2, DockerdOptions::default())?;
    create_network(&world, 0, NET, SUBNET)?;
    create_network(&world, 0, SECOND, "198.18.8.0/24")?;
    wait_listed(&world, 1, SECOND, true)?;
    let peer = world.dockerds[1].run(&lab, "peer", SECOND, &[])?;
    let peer_ip = peer.ip()?;
    let mover = world.dockerds[0].run(&lab, "mover", NET, &[])?;
    let first_ip = mover.ip()?;

    world.docker(0, &["network", "connect", SECOND, "mover"])?;
    let joined = addresses(&mover)?;
    let second_ip = joined
        .iter()
        .find(|(_, ip)| ip.octets()[2] == 8)
        .map(|(_, ip)| *ip)
        .with_context(|| format!("mover has no address on {SECOND}: {joined:?}"))?;
    ensure!(
        joined.len() == 2 && joined.iter().any(|(_, ip)| *ip == first_ip),
        "mover's interfaces after the connect: {joined:?}"
    );
    // Host B learns the new endpoint from the store, as any peer.
    wait_reaches(&mover, peer_ip, VISIBLE_WITHIN)
        .with_context(|| format!("mover -> peer on {SECOND}"))?;
    ensure!(
        world.ovl_endpoints(0, SECOND)?.contains_key(&second_ip),
        "ovl holds no endpoint {second_ip} on {SECOND}"
    );
    world.agree(0, SECOND)?;
    world.agree(0, NET)?;

    world.docker(0, &["network", "disconnect", NET, "mover"])?;
    let left = addresses(&mover)?;
    ensure!(
        left.len() == 1 && left[0].1 == second_ip,
        "mover's interfaces after the disconnect: {left:?}"
    );
    wait_until(RECONCILE_WITHIN, || {
        Ok(!world.ovl_endpoints(0, NET)?.contains_key(&first_ip))
    })
    .with_context(|| format!("ovl still holds {first_ip} on {NET}"))?;
    world.agree(0, NET)?;
    let vni = vni_of(&world, NET)?;
    ensure!(
        !world
            .ovl
            .endpoint_map("host-a")?
            .keys()
            .any(|(v, ip)| u64::from(*v) == vni && *ip == first_ip),
        "host A's endpoint map still holds {first_ip}"
    );
    let r = ping(&mover.netns, peer_ip, 3, &["-i", "0.2", "-W", "2"])?;
    ensure!(
        r.all_received(),
        "mover -> peer after leaving {NET}:\n{}",
        r.output
    );

    world.docker(0, &["restart", "-t", "0", "mover"])?;
    let mover = world.dockerds[0].container(&lab, "mover")?;
    let back = addresses(&mover)?;
    ensure!(
        back.len() == 1 && back[0].1.octets()[2] == 8,
        "mover's interfaces after the restart: {back:?}"
    );
    wait_reaches(&mover, peer_ip, VISIBLE_WITHIN).context("mover -> peer after the restart")?;
    world.agree(0, SECOND)?;
    world.stop()
}

/// A host's boot, as far as Docker and ovl see it: dockerd (no
/// live-restore) stops its containers, and the agent stops too; the
/// agent starts first, as its unit orders it (`Before=docker.service`:
/// a dockerd that finds no plugin leaves the container stopped, "legacy
/// plugin: ... no such file or directory"), then dockerd, which restarts
/// the `--restart=always` container on the ovl network. The container is
/// back on the network, reaches its peer on the other host, and Docker
/// and ovl agree.
#[test]
fn a_restart_always_container_is_back_on_its_network_after_a_boot() -> Result<()> {
    let lab = Lab::new("dk-boot")?;
    let mut world = DockerCluster::start(&lab, StoreKind::File, 2, DockerdOptions::default())?;
    create_network(&world, 0, NET, SUBNET)?;
    wait_listed(&world, 1, NET, true)?;
    let peer = world.dockerds[1].run(&lab, "peer", NET, &[])?;
    let peer_ip = peer.ip()?;
    let web = world.dockerds[0].run(&lab, "web", NET, &["--restart=always"])?;
    let web_ip = web.ip()?;
    let r = ping(&web.netns, peer_ip, 1, &["-W", "2"])?;
    ensure!(r.all_received(), "web -> peer before:\n{}", r.output);

    world.dockerds[0].stop()?;
    world.stop_agent(0)?;
    world.start_agent(&lab, 0)?;
    world.dockerds[0].restart(&lab)?;

    let mut running = String::new();
    wait_until(Duration::from_secs(60), || {
        running = world.docker(
            0,
            &[
                "inspect",
                "-f",
                "{{.State.Running}} {{.RestartCount}} {{.State.Error}}",
                "web",
            ],
        )?;
        Ok(running.starts_with("true"))
    })
    .with_context(|| format!("web after the boot: {running}\n{}", world.dockerds[0].log()))?;
    let web = world.dockerds[0].container(&lab, "web")?;
    wait_reaches(&web, peer_ip, RECONCILE_WITHIN).context("web -> peer after the boot")?;
    eprintln!("web was {web_ip}, is {}", web.ip()?);
    wait_until(RECONCILE_WITHIN, || Ok(world.agree(0, NET).is_ok()))
        .with_context(|| format!("{:?}", world.agree(0, NET)))?;
    world.stop()
}
