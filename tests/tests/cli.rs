//! The `ovl` command line on bad input and after failures: clear errors,
//! untouched state, and cleanup after an agent that was killed.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{Host, Lab, Netns, Ovl, Pair, TwoHosts, bpf, ping, wait_until};

/// One host ("host-a") with network uber-net and container c1 connected
/// to it; returns the host, the container and its address.
fn one_host_with_container(lab: &Lab, ovl: &Ovl) -> Result<(Host, Netns, Ipv4Addr)> {
    let (_router, mut hosts) = lab.routed_hosts(1)?;
    let host = hosts.remove(0);
    ovl.create_network(&host.netns, "uber-net", "198.18.0.0/24", &[])?;
    let c1 = lab.container("c1")?;
    let ip = ovl.connect(&host, "host-a", "uber-net", &c1, &[])?;
    Ok((host, c1, ip))
}

#[test]
fn bad_input_is_refused_with_a_clear_message_and_changes_nothing() -> Result<()> {
    let lab = Lab::new("cli-bad")?;
    let ovl = Ovl::new(&lab)?;
    let (host, c1, c1_ip) = one_host_with_container(&lab, &ovl)?;
    let ns = &host.netns;
    let c1_ip = c1_ip.to_string();
    let disconnect_c1 = format!("ovl disconnect uber-net {}", c1.name());
    let state_file = lab.tempdir().join("store/state.json");
    let before = std::fs::read(&state_file).context("state.json")?;

    // (arguments, a piece of the message that must name the problem)
    let cases: &[(&[&str], &str)] = &[
        // A container's address is not `ovl endpoint rm`'s: its agent
        // would keep the veth and put the endpoint back.
        (&["endpoint", "rm", "uber-net", &c1_ip], &disconnect_c1),
        // Any file that opens is not a namespace.
        (
            &["connect", "uber-net", "/tmp"],
            "/tmp is not a network namespace",
        ),
        (
            &["network", "create", "x", "--subnet", "198.18.0.1/24"],
            "host bits",
        ),
        (
            &["network", "create", "x", "--subnet", "nonsense"],
            "nonsense",
        ),
        (
            &[
                "network",
                "create",
                "x",
                "--subnet",
                "198.18.1.0/24",
                "--vni",
                "0",
            ],
            "VNI 0",
        ),
        (
            &[
                "network",
                "create",
                "x",
                "--subnet",
                "198.18.1.0/24",
                "--vni",
                "16777216",
            ],
            "16777216",
        ),
        (
            &[
                "network",
                "create",
                "x",
                "--subnet",
                "198.18.1.0/24",
                "--mtu",
                "100",
            ],
            "MTU 100",
        ),
        (
            &["network", "create", "uber-net", "--subnet", "198.18.1.0/24"],
            "already exists",
        ),
        (
            &["network", "create", "bad name", "--subnet", "198.18.1.0/24"],
            "network name",
        ),
        (&["network", "rm", "uber-net"], "still has 1 endpoint"),
        (&["network", "rm", "nope"], "no network named"),
        (&["connect", "nope", c1.name()], "no network named"),
        (
            &["connect", "uber-net", "ovlt-no-such-netns"],
            "ip netns add",
        ),
        (&["connect", "uber-net", c1.name()], "already connected"),
        (
            &[
                "endpoint",
                "add",
                "uber-net",
                "203.0.113.5",
                "--vtep",
                "192.0.2.99",
            ],
            "not a usable address",
        ),
        (
            &[
                "endpoint",
                "add",
                "uber-net",
                "198.18.0.2",
                "--vtep",
                "192.0.2.99",
            ],
            "already in use",
        ),
        (
            &[
                "endpoint",
                "add",
                "uber-net",
                "198.18.0.7",
                "--vtep",
                "192.0.2.99",
                "--mac",
                "zz",
            ],
            "MAC",
        ),
        (
            &["disconnect", "uber-net", "ovlt-never-connected"],
            "not connected",
        ),
        (&["--store", "consul://x:1", "network", "ls"], "etcd://"),
        (&["attach", "eth0", "--mode", "turbo"], "turbo"),
    ];
    for (args, needle) in cases {
        let out = ovl.run_unchecked(ns, "host-a", args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "`ovl {}` succeeded", args.join(" "));
        ensure!(
            stderr.contains(needle),
            "`ovl {}`: error does not mention {needle:?}:\n{stderr}",
            args.join(" ")
        );
    }
    let after = std::fs::read(&state_file)?;
    ensure!(before == after, "a refused command changed the store");
    // Nothing half-made either: the refused connect left no second veth.
    let links = String::from_utf8_lossy(&ns.ip(&["-o", "link", "show"])?.stdout).into_owned();
    // Host ends are named ovlXXXXXXXX (`N: ovl…@ifM:` in the listing).
    ensure!(links.matches(": ovl").count() == 1, "host links:\n{links}");
    Ok(())
}

#[test]
fn detach_cleans_up_after_a_killed_agent_and_a_new_one_takes_over() -> Result<()> {
    let lab = Lab::new("cli-detach")?;
    let mut world = TwoHosts::start(&lab, "native")?;
    let host_a = world.hosts[0].clone();
    let Pair { c1, ip2, .. } = world.connected_pair(&lab, "uber-net")?;

    world.kill_agent(0)?;
    let pins = world.ovl.pin_root().join("host-a");
    ensure!(pins.exists(), "a killed agent cannot have removed its pins");
    // The data path outlives its agent.
    let r = ping(&c1, ip2, 5, &["-i", "0.2", "-W", "1"])?;
    ensure!(
        r.all_received(),
        "traffic stopped with the agent:\n{}",
        r.output
    );

    // A detach naming another interface (a typo, or the wrong one) is
    // refused and changes nothing: the data path stays hooked to eth0.
    host_a.netns.ip(&[
        "link", "add", "eht0", "type", "veth", "peer", "name", "eht1",
    ])?;
    for wrong in ["eht0", "nosuch0"] {
        let out = world
            .ovl
            .run_unchecked(&host_a.netns, "host-a", &["detach", wrong])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && stderr.contains("hooked to eth0")
                && stderr.contains("ovl detach eth0"),
            "`ovl detach {wrong}`: {stderr}"
        );
        ensure!(pins.exists(), "`ovl detach {wrong}` removed the pins");
        let r = ping(&c1, ip2, 2, &["-i", "0.2", "-W", "1"])?;
        ensure!(
            r.all_received(),
            "traffic stopped after `ovl detach {wrong}`:\n{}",
            r.output
        );
    }

    let out = world
        .ovl
        .run(&host_a.netns, "host-a", &["detach", "eth0"])?;
    ensure!(out.contains("removed 2 link(s)"), "detach said:\n{out}");
    ensure!(!pins.exists(), "pins still at {}", pins.display());
    wait_until(Duration::from_secs(5), || {
        Ok(!ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })
    .context("traffic still flows after detach")?;
    let link = String::from_utf8_lossy(&host_a.netns.ip(&["-d", "link", "show", "eth0"])?.stdout)
        .into_owned();
    ensure!(!link.contains("xdp"), "XDP left on eth0:\n{link}");
    // Another tool's XDP program on the interface is not ovl's to remove;
    // one of an older ovl, attached the netlink way (no link), is.
    for (name, ours) in [("not_ovl", false), ("ovl_xdp_decap", true)] {
        let pinned = xdp_pass_program(&lab, name)?;
        host_a.netns.ip(&[
            "link",
            "set",
            "dev",
            "eth0",
            "xdpgeneric",
            "pinned",
            &pinned.display().to_string(),
        ])?;
        let out = world
            .ovl
            .run(&host_a.netns, "host-a", &["detach", "eth0"])?;
        let said = if ours {
            "removed XDP program from eth0".to_owned()
        } else {
            format!("left XDP program {name:?}")
        };
        ensure!(out.contains(&said), "detach with {name} said:\n{out}");
        let link =
            String::from_utf8_lossy(&host_a.netns.ip(&["-d", "link", "show", "eth0"])?.stdout)
                .into_owned();
        ensure!(
            link.contains(&format!("name {name} ")) != ours,
            "detach with {name} on eth0 left:\n{link}"
        );
        if !ours {
            host_a
                .netns
                .ip(&["link", "set", "dev", "eth0", "xdpgeneric", "off"])?;
        }
    }
    let stats = world
        .ovl
        .run_unchecked(&host_a.netns, "host-a", &["stats"])?;
    ensure!(
        !stats.status.success() && String::from_utf8_lossy(&stats.stderr).contains("ovl attach"),
        "stats without an agent: {}",
        String::from_utf8_lossy(&stats.stderr)
    );

    world
        .agents
        .insert(0, world.ovl.attach(&lab, &host_a, "host-a", "native")?);
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;
    world.stop()
}

/// Loads an XDP program called `name` that passes every packet, as another
/// tool (or an older ovl) would, and pins it in a bpffs of the lab's: its
/// pin's path.
fn xdp_pass_program(lab: &Lab, name: &str) -> Result<std::path::PathBuf> {
    const XDP_PASS: i32 = 2;
    let pin = lab.bpffs()?.join(name);
    let prog = bpf::load_trivial(bpf::ProgramKind::Xdp, name, XDP_PASS)
        .with_context(|| format!("load an XDP program called {name}"))?;
    bpf::pin(&prog, &pin)?;
    Ok(pin)
}

#[test]
fn an_agent_that_fails_to_load_its_programs_leaves_no_pins_and_no_socket() -> Result<()> {
    let lab = Lab::new("cli-badload")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, mut hosts) = lab.routed_hosts(1)?;
    let host = hosts.remove(0);
    // Not a BPF object: the start fails loading the kernel programs, after
    // the node's directory and the API socket were made.
    let out = ovl.run_with_env_unchecked(
        &host.netns,
        "host-a",
        &[("OVL_EBPF_OBJECT", "/etc/hostname")],
        &["attach", "eth0"],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("kernel programs"),
        "attach with a bad object: {stderr}"
    );
    let pins = ovl.pin_dir("host-a");
    ensure!(!pins.exists(), "a failed start left {}", pins.display());
    let socket = ovl.api_socket("host-a");
    ensure!(!socket.exists(), "a failed start left {}", socket.display());
    Ok(())
}

#[test]
fn disconnect_removes_the_interface_and_the_endpoint() -> Result<()> {
    let lab = Lab::new("cli-disc")?;
    let ovl = Ovl::new(&lab)?;
    let (host, c1, ip) = one_host_with_container(&lab, &ovl)?;
    let ns = &host.netns;
    ensure!(c1.link_mtu("eth0")? == 1450, "container MTU");
    let out = ovl.run(ns, "host-a", &["disconnect", "uber-net", c1.name()])?;
    ensure!(out.contains(&ip.to_string()), "disconnect said: {out}");
    ensure!(
        c1.exec_unchecked(&["ip", "link", "show", "eth0"])?
            .status
            .code()
            != Some(0),
        "eth0 still in the container"
    );
    let net = ovl.inspect(ns, "uber-net")?;
    ensure!(
        net["endpoints"].as_array().is_some_and(|a| a.is_empty()),
        "endpoint still registered: {net}"
    );
    let links = String::from_utf8_lossy(&ns.ip(&["-o", "link", "show"])?.stdout).into_owned();
    ensure!(!links.contains(": ovl"), "host veth left:\n{links}");
    // The address is free again.
    let again = ovl.connect(&host, "host-a", "uber-net", &c1, &[])?;
    ensure!(again == ip, "address {ip} was not freed (got {again})");
    Ok(())
}

#[test]
fn connect_returns_once_the_endpoint_forwards_and_warns_when_no_agent_runs() -> Result<()> {
    let lab = Lab::new("cli-ready")?;
    let mut world = TwoHosts::start(&lab, "auto")?;
    let host_a = world.hosts[0].clone();
    world
        .ovl
        .create_network(&host_a.netns, "uber-net", "198.18.0.0/24", &[])?;
    let (_c1, ip1) = world.container(&lab, 0, "uber-net", "c1")?;
    // Each new container's very first packet, sent as soon as `ovl connect`
    // returns, is switched: the agent had hooked it before the return.
    for i in 0..5 {
        let (c, _) = world.container(&lab, 0, "uber-net", &format!("n{i}"))?;
        let r = ping(&c, ip1, 1, &["-W", "1"])?;
        ensure!(
            r.all_received(),
            "first ping right after connect #{i} failed:\n{}",
            r.output
        );
    }

    world.kill_agent(0)?;
    let late = lab.container("late")?;
    let out = world.ovl.run_unchecked(
        &host_a.netns,
        "host-a",
        &["connect", "uber-net", late.name()],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "connect without an agent failed: {stderr}"
    );
    ensure!(
        stderr.contains("no ovl agent runs for node host-a") && stderr.contains("ovl attach"),
        "no warning that nothing forwards: {stderr}"
    );
    world.stop()
}

/// Runs `ovl args...` in `ns` as host-a with its stderr a pipe whose
/// reader is gone, as in `ovl stats 2>&1 | head -1` once head has its line.
fn run_with_stderr_unread(ovl: &Ovl, ns: &Netns, args: &[&str]) -> Result<std::process::Output> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    std::process::Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(ovl_tests::ovl_binary()?)
        .args(args)
        .envs(ovl.env("host-a"))
        .stderr(writer)
        .output()
        .context("run ovl")
}

#[test]
fn a_stderr_nobody_reads_changes_no_outcome() -> Result<()> {
    let lab = Lab::new("cli-epipe")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let ns = &hosts[0].netns;
    let agent = ovl.attach(&lab, &hosts[0], "host-a", "auto")?;
    ovl.create_network(ns, "uber-net", "198.18.0.0/24", &[])?;
    agent.stop()?;
    // A warning on stderr (no agent), the counters on stdout: success.
    let out = run_with_stderr_unread(&ovl, ns, &["stats"])?;
    ensure!(
        out.status.code() == Some(0) && String::from_utf8_lossy(&out.stdout).contains("uber-net"),
        "`ovl stats` with an unread stderr: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    // A refusal on stderr: failure (1), not a panic (101).
    let out = run_with_stderr_unread(&ovl, ns, &["network", "inspect", "nope"])?;
    ensure!(
        out.status.code() == Some(1),
        "`ovl network inspect nope` with an unread stderr: {}",
        out.status
    );
    Ok(())
}

#[test]
fn cni_conflist_refuses_names_no_network_or_runtime_takes() -> Result<()> {
    let lab = Lab::new("cli-conf")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let ns = &hosts[0].netns;
    // (arguments, a piece of the message that must name the problem)
    let cases: &[(&[&str], &str)] = &[
        (&["cni", "conflist", ""], "invalid network name \"\""),
        (&["cni", "conflist", "a b"], "invalid network name \"a b\""),
        (
            &["cni", "conflist", "uber-net", "--name", ""],
            "invalid CNI network name \"\"",
        ),
        // A name runtimes refuse is no network name either.
        (
            &["cni", "conflist", "--", "-net"],
            "the first a letter or digit",
        ),
        (
            &["cni", "conflist", "uber-net", "--name=-net"],
            "pass --name NAME",
        ),
    ];
    for (args, needle) in cases {
        let out = ovl.run_unchecked(ns, "host-a", args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1) && out.stdout.is_empty() && err.contains(needle),
            "`ovl {}`: {}, stdout {:?}, stderr lacks {needle:?}: {err}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let list: serde_json::Value = serde_json::from_str(&ovl.run(
        ns,
        "host-a",
        &["cni", "conflist", "--name", "net", "uber-net"],
    )?)?;
    ensure!(
        list["name"] == "net" && list["plugins"][0]["network"] == "uber-net",
        "{list}"
    );
    Ok(())
}

/// `ovl connect uber-net NETNS` under strace, tracing its `syscall`
/// calls into `output`, with `inject` (strace's `-e inject=` of it).
fn strace_connect_argv(
    ovl: &Ovl,
    netns: &Netns,
    output: &str,
    syscall: &str,
    inject: Option<String>,
) -> Result<Vec<String>> {
    let mut argv = vec!["env".to_owned()];
    argv.extend(
        ovl.env("host-a")
            .into_iter()
            .map(|(k, v)| format!("{k}={v}")),
    );
    argv.extend(["strace", "-f", "-qq", "-o", output, "-e"].map(str::to_owned));
    argv.push(format!("trace={syscall}"));
    if let Some(inject) = inject {
        argv.extend(["-e".to_owned(), format!("inject={syscall}:{inject}")]);
    }
    argv.push(ovl_tests::ovl_binary()?.display().to_string());
    argv.extend(["connect", "uber-net", netns.name()].map(str::to_owned));
    Ok(argv)
}

/// Which `socket()` call of `ovl connect` (counted from 1) is the netlink
/// socket it opens to build the veth, right after the store has registered
/// the endpoint: read from a whole connect of a scratch container, as the
/// calls before it depend on the store (etcd's connections). The next one
/// is the socket it sets the new pair's offloads through, before it moves
/// the container end. No hook in ovl: the moments are its system calls.
fn veth_socket_call(lab: &Lab, ovl: &Ovl, host: &Host) -> Result<u32> {
    let scratch = lab.container("scratch")?;
    let trace = lab.tempdir().join("connect.strace");
    let trace_text = trace.display().to_string();
    let argv = strace_connect_argv(ovl, &scratch, &trace_text, "socket", None)?;
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    host.netns.exec(&argv)?;
    let text = std::fs::read_to_string(&trace)?;
    let calls: Vec<&str> = text.lines().filter(|l| l.contains("socket(")).collect();
    let netlink = calls
        .iter()
        .position(|l| l.contains("AF_NETLINK"))
        .with_context(|| format!("no netlink socket in {text}"))?;
    ovl.run(
        &host.netns,
        "host-a",
        &["disconnect", "uber-net", scratch.name()],
    )?;
    Ok(u32::try_from(netlink)? + 1)
}

/// `ovl connect uber-net NETNS`, sent `signal` at its `nth` `socket()`.
fn connect_interrupted_argv(
    ovl: &Ovl,
    netns: &Netns,
    signal: &str,
    nth: u32,
) -> Result<Vec<String>> {
    strace_connect_argv(
        ovl,
        netns,
        "/dev/null",
        "socket",
        Some(format!("signal={signal}:when={nth}")),
    )
}

/// The endpoints of namespace `netns` in the store (`ovl network
/// inspect`), with the pid of the process that registered each.
fn recorded(ovl: &Ovl, host: &Host, netns: &Netns) -> Result<Vec<(Ipv4Addr, Option<u32>)>> {
    let net = ovl.inspect(&host.netns, "uber-net")?;
    let mut out = Vec::new();
    for e in net["endpoints"].as_array().context("endpoints")? {
        if e["location"]["netns"] == netns.name() {
            let ip = e["ip"].as_str().context("ip")?.parse()?;
            let pid = e["attacher"]["pid"].as_u64().map(|p| p as u32);
            out.push((ip, pid));
        }
    }
    Ok(out)
}

/// The names of the links in namespace `ns`.
fn host_links(ns: &Netns) -> Result<Vec<String>> {
    let out = ns.ip(&["-o", "link", "show"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect())
}

/// The links of `ns` that are not in `before`.
fn links_since(ns: &Netns, before: &[String]) -> Result<Vec<String>> {
    Ok(host_links(ns)?
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect())
}

/// Runs `argv`, an `ovl connect` of `netns` on `host` killed half-way,
/// which must leave `left` links in the host (the pair, or its host end),
/// the endpoint recorded and no eth0 in the container; then a plain
/// connect must attach the container, leaving just its host end.
fn killed_then_reconnected(
    ovl: &Ovl,
    host: &Host,
    netns: &Netns,
    argv: &[String],
    left: usize,
) -> Result<()> {
    let before = host_links(&host.netns)?;
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    host.netns.exec_unchecked(&argv)?;
    let made = links_since(&host.netns, &before)?;
    ensure!(
        made.len() == left && recorded(ovl, host, netns)?.len() == 1 && !has_eth0(netns)?,
        "the kill left {made:?} in the host, {:?} in the store",
        recorded(ovl, host, netns)?
    );
    ovl.connect(host, "host-a", "uber-net", netns, &[])?;
    let now = links_since(&host.netns, &before)?;
    ensure!(
        now.len() == 1 && has_eth0(netns)? && recorded(ovl, host, netns)?.len() == 1,
        "{netns} reconnected: {now:?} in the host"
    );
    Ok(())
}

fn has_eth0(netns: &Netns) -> Result<bool> {
    let out = ovl_tests::run_unchecked(&["ip", "-n", netns.name(), "link", "show", "eth0"])?;
    Ok(out.status.success())
}

/// `ovl connect` killed between registering the endpoint and making its
/// veth leaves the address held by a record that points at nothing. The
/// next connect of the same container reclaims it; without one, the
/// node's agent frees it after its grace (`--gc-grace`). An attach still
/// in progress (its process alive, here stopped) is never taken: a
/// second connect is refused naming it, the agent leaves it, and it
/// finishes once it goes on.
#[test]
fn a_connect_killed_before_its_veth_is_reclaimed_and_one_in_progress_is_not() -> Result<()> {
    let lab = Lab::new("cli-killed")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, mut hosts) = lab.routed_hosts(1)?;
    killed_connects_are_reclaimed(&lab, &ovl, &hosts.remove(0))
}

/// The same with the etcd store: the reclaim is one transaction that
/// removes the old record and its claims and registers anew.
#[test]
fn a_connect_killed_before_its_veth_is_reclaimed_with_etcd() -> Result<()> {
    let lab = Lab::new("cli-killed-etcd")?;
    let (router, mut hosts) = lab.routed_hosts(1)?;
    let host = hosts.remove(0);
    let gateway = host.gateway.context("routed host has a gateway")?;
    let etcd = ovl_tests::Etcd::start(&lab, &router, gateway)?;
    let ovl = Ovl::with_store(&lab, &etcd.url())?;
    killed_connects_are_reclaimed(&lab, &ovl, &host)
}

fn killed_connects_are_reclaimed(lab: &Lab, ovl: &Ovl, host: &Host) -> Result<()> {
    ovl.create_network(&host.netns, "uber-net", "198.18.0.0/24", &[])?;
    let veth = veth_socket_call(lab, ovl, host)?;

    // No agent yet: nothing but the next connect can reclaim c1's record.
    let c1 = lab.container("c1")?;
    let argv = connect_interrupted_argv(ovl, &c1, "SIGKILL", veth)?;
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let killed = host.netns.exec_unchecked(&argv)?;
    ensure!(
        !killed.status.success(),
        "the connect was not killed: {killed:?}"
    );
    let left = recorded(ovl, host, &c1)?;
    ensure!(
        left.len() == 1 && !has_eth0(&c1)?,
        "the kill left {left:?}, eth0 in c1: {}",
        has_eth0(&c1)?
    );
    let ip = ovl.connect(host, "host-a", "uber-net", &c1, &[])?;
    ensure!(
        recorded(ovl, host, &c1)?.len() == 1 && has_eth0(&c1)?,
        "c1 reconnected: {:?}",
        recorded(ovl, host, &c1)?
    );
    let shown =
        String::from_utf8_lossy(&c1.ip(&["-o", "addr", "show", "eth0"])?.stdout).into_owned();
    ensure!(shown.contains(&format!("{ip}/24")), "{shown}");

    // Killed with the pair made, its container end still in the host's
    // namespace: the next connect removes the pair and attaches anew.
    let c4 = lab.container("c4")?;
    let argv = connect_interrupted_argv(ovl, &c4, "SIGKILL", veth + 1)?;
    killed_then_reconnected(ovl, host, &c4, &argv, 2)?;

    // Killed at its first setns(), entering the container to name and
    // address the end it has just moved there: the host end is still down.
    // The next connect removes the pair and attaches anew.
    let c5 = lab.container("c5")?;
    let argv = strace_connect_argv(
        ovl,
        &c5,
        "/dev/null",
        "setns",
        Some("signal=SIGKILL:when=1".to_owned()),
    )?;
    killed_then_reconnected(ovl, host, &c5, &argv, 1)?;

    // The agent, with a grace of 1 s.
    let _agent = ovl.attach_with_env(
        lab,
        host,
        "host-a",
        "auto",
        &[
            ("OVL_GC_GRACE", "1"),
            ("RUST_LOG", "info,ovl_userspace::agent=debug"),
        ],
    )?;
    // c3's connect stopped right after registering: in progress.
    let c3 = lab.container("c3")?;
    let argv = connect_interrupted_argv(ovl, &c3, "SIGSTOP", veth)?;
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let stopped = lab.spawn(&host.netns, &argv, &[])?;
    let mut attacher = None;
    wait_until(Duration::from_secs(10), || {
        attacher = recorded(ovl, host, &c3)?.first().and_then(|(_, pid)| *pid);
        Ok(attacher.is_some())
    })
    .with_context(|| {
        format!(
            "c3's connect registered nothing:\n{}",
            stopped.output_report()
        )
    })?;
    let attacher = attacher.context("c3's attacher")?;
    // c2's killed after it: the agent frees its address after the grace
    // (c3's, registered first, has passed by then as well).
    let c2 = lab.container("c2")?;
    let before = host_links(&host.netns)?;
    let argv = connect_interrupted_argv(ovl, &c2, "SIGKILL", veth)?;
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    host.netns.exec_unchecked(&argv)?;
    ensure!(
        recorded(ovl, host, &c2)?.len() == 1 && host_links(&host.netns)? == before,
        "c2's connect was not killed between registering and making its veth: {:?}, links {:?}",
        recorded(ovl, host, &c2)?,
        host_links(&host.netns)?
    );
    wait_until(Duration::from_secs(20), || {
        Ok(recorded(ovl, host, &c2)?.is_empty())
    })
    .context("the agent never freed the address of c2's killed connect")?;

    // c6's killed with its pair made, the container end still in the
    // host's namespace, and the container goes: no connect of c6 will come.
    // The agent removes the pair and frees the address after the grace.
    let c6 = lab.container("c6")?;
    let before = host_links(&host.netns)?;
    let argv = connect_interrupted_argv(ovl, &c6, "SIGKILL", veth + 1)?;
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    host.netns.exec_unchecked(&argv)?;
    let made = links_since(&host.netns, &before)?;
    ensure!(
        made.len() == 2 && recorded(ovl, host, &c6)?.len() == 1,
        "c6's connect was not killed with its pair whole: {made:?}, {:?}",
        recorded(ovl, host, &c6)?
    );
    lab.remove_netns(&c6)?;
    wait_until(Duration::from_secs(20), || {
        Ok(recorded(ovl, host, &c6)?.is_empty() && host_links(&host.netns)? == before)
    })
    .with_context(|| {
        format!(
            "the agent left what c6's killed connect made: {:?} in the store, {:?} in the host",
            recorded(ovl, host, &c6),
            links_since(&host.netns, &before)
        )
    })?;

    ensure!(
        recorded(ovl, host, &c3)?.len() == 1,
        "the agent took the endpoint of an attach in progress"
    );
    let again = ovl.run_unchecked(&host.netns, "host-a", &["connect", "uber-net", c3.name()])?;
    let err = String::from_utf8_lossy(&again.stderr).into_owned();
    ensure!(
        !again.status.success() && err.contains(&format!("by process {attacher}")),
        "a second connect of c3 during the first: {again:?}"
    );
    ovl_tests::run(&["kill", "-CONT", &attacher.to_string()])?;
    let status = stopped.wait_timeout(Duration::from_secs(20))?;
    ensure!(
        status.success() && has_eth0(&c3)?,
        "c3's connect did not finish once let go:\n{}",
        stopped.output_report()
    );
    Ok(())
}
