//! The store seen from the command line: input that could escape the pin
//! root or cannot work on the wire, and networks or endpoints beyond what a
//! node's kernel maps hold, are refused before anything changes; the
//! file store's files are private and a held lock times out naming its
//! holder; listings in JSON; a dead node removed with `ovl node rm`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ovl_tests::{Host, Lab, Ovl, TwoHosts, ping, wait_until};
use serde_json::Value;

/// Runs `ovl args...` on `host` as `node`; returns (success, stderr).
fn attempt(ovl: &Ovl, host: &Host, node: &str, args: &[&str]) -> Result<(bool, String)> {
    let out = ovl.run_unchecked(&host.netns, node, args)?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    ))
}

/// Expects every case (arguments, piece of the message) to fail naming the
/// problem, leaving `state_file` byte for byte as it was.
fn expect_refused(
    ovl: &Ovl,
    host: &Host,
    node: &str,
    state_file: &Path,
    cases: &[(&[&str], &str)],
) -> Result<()> {
    let before = std::fs::read(state_file).context("state file")?;
    for (args, needle) in cases {
        let (ok, stderr) = attempt(ovl, host, node, args)?;
        ensure!(
            !ok && stderr.contains(needle),
            "`ovl {}` should fail naming {needle:?}: {stderr}",
            args.join(" ")
        );
        ensure!(
            std::fs::read(state_file)? == before,
            "`ovl {}` changed the store",
            args.join(" ")
        );
    }
    Ok(())
}

#[test]
fn node_names_that_would_escape_the_pin_root_are_refused_before_any_path_is_built() -> Result<()> {
    let lab = Lab::new("st-node")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    ovl.create_network(&host.netns, "uber-net", "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    // What `--node ..` named before: the pin root's parent, where other
    // tools keep files that `ovl detach` would have removed as pins.
    let parent = ovl.pin_root().parent().context("pin root has a parent")?;
    let sentinel = parent.join("other-tool-pin");
    std::fs::write(&sentinel, b"not ovl's")?;
    let state = lab.tempdir().join("store/state.json");
    let long = "n".repeat(64);
    for node in ["..", "", "a/b", "/", "../other", long.as_str(), "-x"] {
        expect_refused(
            &ovl,
            host,
            node,
            &state,
            &[
                (&["detach", "eth0"], "invalid node name"),
                (&["connect", "uber-net", c1.name()], "invalid node name"),
                (&["stats"], "invalid node name"),
            ],
        )?;
    }
    ensure!(sentinel.exists(), "a file outside the pin root was removed");
    // Commands that do not act as a node do not care.
    let (ok, stderr) = attempt(&ovl, host, "..", &["network", "ls"])?;
    ensure!(ok, "network ls with an odd --node: {stderr}");
    Ok(())
}

#[test]
fn vteps_macs_and_subnets_that_cannot_work_are_refused_and_listings_come_as_json() -> Result<()> {
    let lab = Lab::new("st-valid")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let a = &world.hosts[0];
    let ovl = &world.ovl;
    ovl.create_network(&a.netns, "uber-net", "198.18.0.0/24", &[])?;
    let state = lab.tempdir().join("store/state.json");
    let b_vtep = world.hosts[1].addr.to_string();
    let create = |subnet: &str| -> Vec<String> {
        ["network", "create", "x", "--subnet", subnet]
            .map(str::to_owned)
            .to_vec()
    };
    let add = |extra: &[&str]| -> Vec<String> {
        ["endpoint", "add", "uber-net", "198.18.0.50"]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect()
    };
    let owned: Vec<(Vec<String>, &str)> = vec![
        (create("224.1.0.0/24"), "multicast"),
        (create("239.0.0.0/8"), "multicast"),
        (create("127.0.0.0/16"), "loopback"),
        (create("0.0.0.0/8"), "this network"),
        (create("255.255.255.0/24"), "broadcast"),
        // host-a's underlay address lies in it
        (create("192.0.2.0/24"), "VTEP"),
        (add(&["--vtep", "0.0.0.0"]), "unspecified"),
        (add(&["--vtep", "224.0.0.1"]), "multicast"),
        (add(&["--vtep", "127.0.0.1"]), "loopback"),
        (add(&["--vtep", "255.255.255.255"]), "broadcast"),
        (add(&["--vtep", &b_vtep]), "VTEP of ovl node \"host-b\""),
        (
            add(&["--vtep", "203.0.113.50", "--mac", "01:00:5e:00:00:01"]),
            "multicast",
        ),
        (
            add(&["--vtep", "203.0.113.50", "--mac", "00:00:00:00:00:00"]),
            "all zeros",
        ),
    ];
    let args: Vec<Vec<&str>> = owned
        .iter()
        .map(|(a, _)| a.iter().map(String::as_str).collect())
        .collect();
    let cases: Vec<(&[&str], &str)> = args
        .iter()
        .zip(&owned)
        .map(|(a, (_, needle))| (a.as_slice(), *needle))
        .collect();
    expect_refused(ovl, a, "host-a", &state, &cases)?;

    // What is right goes through, and the listings say it as JSON.
    ovl.create_network(&a.netns, "blue", "198.19.0.0/24", &[])?;
    let (_c1, ip1) = world.container(&lab, 0, "uber-net", "c1")?;
    world.run(
        0,
        &[
            "endpoint",
            "add",
            "blue",
            "198.19.0.9",
            "--vtep",
            "203.0.113.50",
        ],
    )?;
    let json = |args: &[&str]| -> Result<Value> {
        let out = world.run(0, args)?;
        serde_json::from_str(&out).with_context(|| format!("`ovl {}`: {out}", args.join(" ")))
    };
    let networks = json(&["network", "ls", "--json"])?;
    ensure!(
        networks.as_array().map(Vec::len) == Some(2)
            && networks[0]["name"] == "blue"
            && networks[0]["endpoints"] == 1
            && networks[1]["name"] == "uber-net"
            && networks[1]["endpoints"] == 1
            && networks[1]["subnets"][0] == "198.18.0.0/24",
        "network ls --json: {networks}"
    );
    let all = json(&["endpoint", "ls", "--json"])?;
    ensure!(
        all.as_array().map(Vec::len) == Some(2),
        "endpoint ls: {all}"
    );
    let mine = json(&["endpoint", "ls", "--network", "uber-net", "--json"])?;
    ensure!(
        mine.as_array().map(Vec::len) == Some(1)
            && mine[0]["ip"] == ip1.to_string()
            && mine[0]["location"]["node"] == "host-a"
            && mine[0]["vtep"] == a.addr.to_string(),
        "endpoint ls --network uber-net: {mine}"
    );
    let table = world.run(0, &["endpoint", "ls"])?;
    ensure!(
        table.contains("behind VTEP 203.0.113.50")
            && table.contains("c1")
            && table.contains("on host-a"),
        "endpoint ls:\n{table}"
    );
    let (ok, stderr) = attempt(ovl, a, "host-a", &["endpoint", "ls", "--network", "nope"])?;
    ensure!(!ok && stderr.contains("no network named"), "{stderr}");
    let nodes = json(&["node", "ls", "--json"])?;
    ensure!(
        nodes.as_array().map(Vec::len) == Some(2)
            && nodes[0]["name"] == "host-a"
            && nodes[0]["alive"].is_null()
            && nodes[0]["pinned_here"] == true
            && nodes[0]["conflicts"].as_array().is_some_and(Vec::is_empty),
        "node ls --json: {nodes}"
    );
    world.stop()
}

/// Whether user nobody can take a shared flock on `path` (it needs to
/// open the file for that).
fn nobody_can_lock(path: &Path) -> Result<bool> {
    let out = ovl_tests::run_unchecked(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "flock",
        "--shared",
        "--nonblock",
        &path.display().to_string(),
        "true",
    ])?;
    Ok(out.status.success())
}

#[test]
fn the_file_store_is_private_and_a_held_lock_times_out_naming_its_holder() -> Result<()> {
    let lab = Lab::new("st-lock")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    ovl.create_network(&host.netns, "uber-net", "198.18.0.0/24", &[])?;
    let dir = lab.tempdir().join("store");
    let lock = dir.join("state.lock");
    let state = dir.join("state.json");
    // Other users may walk to the store (as to /var/lib/ovl).
    for d in [lab.tempdir(), dir.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }

    // The finding: a lock file others may open lets any user hold it.
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644))?;
    ensure!(
        nobody_can_lock(&lock)?,
        "the repro needs nobody to reach the lock"
    );
    // The fix: the next change makes both files private again.
    ovl.create_network(&host.netns, "blue", "198.19.0.0/24", &[])?;
    for f in [&lock, &state] {
        let mode = std::fs::metadata(f)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "{} has mode {mode:o}", f.display());
    }
    ensure!(!nobody_can_lock(&lock)?, "nobody can still lock the store");

    // A process that holds the lock makes changes give up after the lock
    // timeout, naming it, and changes nothing.
    let holder = lab.spawn(
        &host.netns,
        &["flock", &lock.display().to_string(), "sleep", "60"],
        &[],
    )?;
    let lock_file = std::fs::File::open(&lock)?;
    wait_until(Duration::from_secs(5), || {
        let locks = std::fs::read_to_string("/proc/locks")?;
        let ino = std::os::unix::fs::MetadataExt::ino(&lock_file.metadata()?);
        Ok(locks.contains(&format!(":{ino} ")))
    })
    .context("flock(1) never took the lock")?;
    let before = std::fs::read(&state)?;
    let url = format!("file://{}?lock-timeout=1", dir.display());
    let t0 = Instant::now();
    let out = ovl.using_store(&url).run_unchecked(
        &host.netns,
        "host-a",
        &["network", "create", "red", "--subnet", "198.18.1.0/24"],
    )?;
    let waited = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "created while the lock was held");
    ensure!(
        stderr.contains("is held by pid")
            && stderr.contains("flock")
            && stderr.contains(&holder.pid().to_string()),
        "the message should name the holder (pid {}): {stderr}",
        holder.pid()
    );
    ensure!(
        waited < Duration::from_secs(5),
        "gave up only after {waited:?}"
    );
    ensure!(std::fs::read(&state)? == before, "the store changed");
    eprintln!("gave up after {waited:?}: {}", stderr.trim());
    Ok(())
}

#[test]
fn a_node_is_removed_with_node_rm_only_once_its_agent_is_gone() -> Result<()> {
    let lab = Lab::new("st-noderm")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let a = world.hosts[0].clone();
    world
        .ovl
        .create_network(&a.netns, "uber-net", "198.18.0.0/24", &[])?;
    let (_cb, ip_b) = world.container(&lab, 1, "uber-net", "cb")?;
    // host-b's agent runs on this machine: refused, naming it.
    let (ok, stderr) = attempt(&world.ovl, &a, "host-a", &["node", "rm", "host-b"])?;
    ensure!(!ok && stderr.contains("running agent"), "{stderr}");
    let (ok, stderr) = attempt(&world.ovl, &a, "host-a", &["node", "rm", ".."])?;
    ensure!(!ok && stderr.contains("invalid node name"), "{stderr}");
    // Once it is stopped (its data path stays pinned, its lock released),
    // the node and its endpoint go; the address is held back.
    let agent_b = world.agents.remove(1);
    agent_b.stop()?;
    let out = world.run(0, &["node", "rm", "host-b"])?;
    ensure!(out.contains("freed its 1 endpoint"), "{out}");
    let nodes = world.nodes(0)?;
    ensure!(
        nodes.iter().all(|(n, _, _)| n != "host-b"),
        "host-b still listed: {nodes:?}"
    );
    let net = world.inspect(0, "uber-net")?;
    ensure!(
        net["endpoints"].as_array().is_some_and(Vec::is_empty),
        "host-b's endpoint still registered: {net}"
    );
    let (_ca, ip_a) = world.container(&lab, 0, "uber-net", "ca")?;
    ensure!(
        ip_a != ip_b,
        "host-b's address {ip_b} was handed out again at once"
    );
    let (ok, stderr) = attempt(&world.ovl, &a, "host-a", &["node", "rm", "host-b"])?;
    ensure!(!ok && stderr.contains("no node named"), "{stderr}");
    world.stop()
}

#[test]
fn a_network_or_endpoint_beyond_the_kernel_maps_is_refused_by_name_and_writes_nothing() -> Result<()>
{
    use std::net::Ipv4Addr;
    let lab = Lab::new("st-cap")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    ovl.create_network(&host.netns, "uber-net", "198.18.0.0/27", &[])?;
    let state_file = lab.tempdir().join("store/state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_file)?)?;

    // A cluster at the 4096 networks of a node's OVL_NETWORKS (a /27 each:
    // they fill 198.18.0.0/15), with 16 endpoints each: the 65536 of its
    // OVL_ENDPOINTS (written as ovl writes its file store).
    let template = state["networks"]["uber-net"].clone();
    let mut endpoints = Vec::new();
    for i in 0..4096u32 {
        let subnet = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i << 5));
        let name = if i == 0 {
            "uber-net".to_owned()
        } else {
            format!("n{i}")
        };
        if i > 0 {
            let mut n = template.clone();
            n["name"] = Value::from(name.clone());
            n["vni"] = Value::from(4096 + i);
            n["subnet"] = Value::from(format!("{subnet}/27"));
            n["subnets"] = serde_json::json!([{
                "subnet": format!("{subnet}/27"),
                "gateway": Ipv4Addr::from(u32::from(subnet) + 1).to_string(),
            }]);
            state["networks"][&name] = n;
        }
        for h in 0..16u32 {
            let ip = Ipv4Addr::from(u32::from(subnet) + 2 + h);
            let [a, b, c, d] = ip.octets();
            endpoints.push(serde_json::json!({
                "network": name,
                "name": format!("static-{ip}"),
                "ip": ip.to_string(),
                "mac": format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}"),
                "location": {"kind": "static", "vtep": "203.0.113.50"},
            }));
        }
    }
    state["endpoints"] = Value::from(endpoints);
    std::fs::write(&state_file, serde_json::to_vec(&state)?)?;
    let listed = ovl.run(&host.netns, "host-a", &["endpoint", "ls", "--json"])?;
    let listed: Value = serde_json::from_str(&listed)?;
    ensure!(
        listed.as_array().map(Vec::len) == Some(65536),
        "the seeded store does not hold 65536 endpoints"
    );

    let c1 = lab.container("c1")?;
    expect_refused(
        &ovl,
        host,
        "host-a",
        &state_file,
        &[
            (
                &["network", "create", "one-more", "--subnet", "198.19.0.0/24"],
                "4097 networks, more than the 4096 a node's OVL_NETWORKS map holds",
            ),
            (
                &[
                    "endpoint",
                    "add",
                    "uber-net",
                    "198.18.0.20",
                    "--vtep",
                    "203.0.113.50",
                ],
                "65537 endpoints (all networks together, reservations included), more than the 65536 a node's OVL_ENDPOINTS map holds",
            ),
            (
                &["connect", "uber-net", c1.name()],
                "more than the 65536 a node's OVL_ENDPOINTS map holds",
            ),
        ],
    )?;
    // Nothing was built for the refused connect either.
    let links = c1.ip(&["-o", "link", "show"])?;
    let links = String::from_utf8_lossy(&links.stdout);
    ensure!(
        links.lines().count() == 1,
        "the container got a link: {links}"
    );

    // Room made, the same change works.
    ovl.run(
        &host.netns,
        "host-a",
        &["endpoint", "rm", "n7", "198.18.0.226"],
    )?;
    ovl.run(
        &host.netns,
        "host-a",
        &[
            "endpoint",
            "add",
            "uber-net",
            "198.18.0.20",
            "--vtep",
            "203.0.113.50",
        ],
    )?;
    Ok(())
}

/// The file store's `state.json` moved aside (or deleted) by hand under
/// running agents: they keep forwarding with the last state, and follow
/// the store the next change writes anew. It once took every network off
/// every node's maps at once.
#[test]
fn a_store_file_moved_aside_keeps_the_data_path_until_a_change_writes_it_anew() -> Result<()> {
    let lab = Lab::new("store-moved")?;
    let world = TwoHosts::start(&lab, "auto")?;
    let pair = world.connected_pair(&lab, "blue")?;
    let vni = world.inspect(0, "blue")?["vni"]
        .as_u64()
        .context("inspect has no vni")?;
    let entries = |node: &str| -> Result<usize> {
        Ok(world
            .ovl
            .endpoint_map(node)?
            .keys()
            .filter(|(v, _)| u64::from(*v) == vni)
            .count())
    };
    let dir = Path::new(
        world
            .ovl
            .store_url()
            .strip_prefix("file://")
            .context("a file store")?,
    )
    .to_owned();
    std::fs::rename(dir.join("state.json"), dir.join("moved-aside.json"))?;

    // A readiness wait makes an agent read the store at once rather than
    // at its follower's next look: a missing file is no empty store there
    // either. (One `ovl connect` waiting as the file went took every
    // network off its node's maps.)
    for (i, node) in TwoHosts::NODES.iter().take(2).enumerate() {
        let socket = world.ovl.api_socket(node).display().to_string();
        let out = world.hosts[i].netns.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--unix-socket",
            &socket,
            "http://ovl/v1/endpoints/ready?network=none&ip=198.18.0.99&timeout_ms=300",
        ])?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).contains(r#""ready":false"#),
            "{node}'s readiness answer: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Several of the agents' looks at the file later (one each 200 ms).
    std::thread::sleep(Duration::from_secs(2));
    let r = ping(&pair.c1, pair.ip2, 3, &["-i", "0.2", "-W", "1"])?;
    ensure!(
        r.all_received(),
        "c1 -> c2 with the store file gone:\n{}",
        r.output
    );
    for node in TwoHosts::NODES.iter().take(2) {
        ensure!(entries(node)? == 2, "{node}'s map lost blue's endpoints");
    }

    // The next change writes the store anew, without blue: followed.
    world
        .ovl
        .create_network(&world.hosts[0].netns, "green", "198.18.1.0/24", &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(entries(TwoHosts::NODES[0])? == 0 && entries(TwoHosts::NODES[1])? == 0)
    })
    .context("the agents never followed the store written anew")?;
    world.stop()
}
