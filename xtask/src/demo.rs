// `cargo xtask demo`: the README's main job, acted out in throwaway network
// namespaces — two routed hosts, one overlay network, two containers.

use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ovl_tests::{ChildHandle, Host, Lab, Netns, Signal, ping, ping_host, wait_until};

use crate::command;
use crate::workspace::{self, Profile};

/// The overlay network the demo creates.
const NETWORK: &str = "uber-net";

/// Its subnet: RFC 2544 benchmarking space, which the test library reserves
/// for overlays so nothing on a real network is ever addressed.
const SUBNET: &str = "198.18.0.0/24";

/// The underlay interface every agent attaches to.
const UNDERLAY_IFACE: &str = "eth0";

/// How long a container may wait for its address, and the first ping for
/// an answer: agents reconcile from the store asynchronously.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an agent may take to detach and exit after SIGINT.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// The name and alias c2 is connected with, as in README's walk-through.
const C2_NAME: &str = "web";
const C2_ALIAS: &str = "www";

/// Echo requests per direction in the final check.
const PING_COUNT: u32 = 3;

/// One ovl node of the demo: an underlay host and the environment every
/// `ovl` call on it gets.
struct Node {
    name: &'static str,
    host: Host,
    env: Vec<(&'static str, String)>,
}

impl Node {
    fn new(name: &'static str, host: Host, store_url: &str, pin_root: &Path) -> Self {
        // Socket and agent state in the lab's pin root's parent (the lab's
        // temp dir), so nothing of the demo outlives it.
        let lab_dir = pin_root.parent().unwrap_or(pin_root);
        let env = vec![
            ("OVL_STORE", store_url.to_string()),
            ("OVL_NODE", name.to_string()),
            ("OVL_PIN_ROOT", pin_root.display().to_string()),
            (
                "OVL_API_SOCKET",
                lab_dir.join(format!("{name}.sock")).display().to_string(),
            ),
            (
                "OVL_STATE_DIR",
                lab_dir.join(format!("state-{name}")).display().to_string(),
            ),
        ];

        Node { name, host, env }
    }

    fn env_refs(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(key, value)| (*key, value.as_str()))
            .collect()
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// A foreground `ovl attach` started on a node.
struct Agent {
    node: &'static str,
    process: ChildHandle,
}

/// Builds `ovl`, then walks through the main job in a lab that removes
/// every namespace, process and mount when it drops — on failure, Ctrl-C
/// and SIGTERM too.
pub fn run() -> Result<()> {
    // Ctrl-C must not leave the agents running in the lab's namespaces.
    ovl_tests::remove_labs_on_interrupt("xtask demo")?;
    let ovl = workspace::build_ovl(Profile::Debug)?;
    let ovl = ovl.to_str().context("the ovl binary's path is not UTF-8")?;

    let lab = Lab::new("demo")?;
    // The walk-through's failure, if any, is reported after the lab has
    // dropped, so it ends the output instead of the agents' log tails.
    let outcome = walk_through(&lab, ovl);
    drop(lab);
    outcome
}

fn walk_through(lab: &Lab, ovl: &str) -> Result<()> {
    heading("Underlay: two hosts in different subnets, joined by a router");
    let (_router, hosts) = lab.routed_hosts(2)?;
    let [host_a, host_b]: [Host; 2] = hosts
        .try_into()
        .map_err(|hosts: Vec<Host>| anyhow::anyhow!("asked for 2 hosts, got {}", hosts.len()))?;
    let pin_root = lab.bpffs()?;
    let store = lab.tempdir().join("store");
    fs::create_dir(&store).with_context(|| format!("cannot create {}", store.display()))?;
    // One shared file store plays the cluster's key-value store; the bpffs
    // is shared too, and each agent pins under its own node directory.
    let store_url = format!("file://{}", store.display());
    let nodes = [
        Node::new("host-a", host_a, &store_url, &pin_root),
        Node::new("host-b", host_b, &store_url, &pin_root),
    ];
    for node in &nodes {
        let env: Vec<String> = node.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{node}: netns {}, {} {}/{}, gateway {}",
            node.host.netns,
            node.host.iface,
            node.host.addr,
            node.host.prefix_len,
            node.host
                .gateway
                .map_or_else(|| "none".to_string(), |gateway| gateway.to_string()),
        );
        println!("{node}: every ovl call runs with {}", env.join(" "));
    }
    let [node_a, node_b] = &nodes;

    heading("Create the overlay network (stored once, seen by every node)");
    ovl_on(
        node_a,
        ovl,
        &["network", "create", NETWORK, "--subnet", SUBNET],
    )?;

    heading("Start an agent on each host: it attaches to the underlay NIC");
    let mut agents = Vec::new();
    for node in &nodes {
        println!("{node}$ ovl attach {UNDERLAY_IFACE} &");
        let process = lab.spawn(
            &node.host.netns,
            &[ovl, "attach", UNDERLAY_IFACE],
            &node.env_refs(),
        )?;
        agents.push(Agent {
            node: node.name,
            process,
        });
    }

    heading("Connect one container on each host");
    let c1 = lab.container("c1")?;
    let c2 = lab.container("c2")?;
    ovl_on(node_a, ovl, &["connect", NETWORK, c1.name()])?;
    ovl_on(
        node_b,
        ovl,
        &[
            "connect",
            NETWORK,
            c2.name(),
            "--name",
            C2_NAME,
            "--alias",
            C2_ALIAS,
        ],
    )?;
    let subnet = Subnet::parse(SUBNET)?;
    let c1_addr = overlay_address(&c1, subnet)?;
    let c2_addr = overlay_address(&c2, subnet)?;
    println!(
        "c1 ({}) is {c1_addr}; c2 ({}) is {c2_addr}",
        c1.name(),
        c2.name()
    );
    ovl_on(node_a, ovl, &["network", "inspect", NETWORK])?;

    heading("Wait until the agents have programmed the path");
    let unanswered = wait_for_reachability(&agents, &c1, c2_addr)?;
    if unanswered == 0 {
        println!("c1 reaches c2");
    } else {
        // Honest about the counters below: those pings were dropped by
        // host-a's data path, which did not know c2 yet.
        println!(
            "c1 reaches c2 (after {unanswered} unanswered ping(s), sent before host-a's agent \
             knew c2: counted below as no_endpoint)"
        );
    }

    heading("Ping across the overlay, both ways, then by name (the agents answer DNS)");
    ping_and_show(&c1, "c1", &c2_addr.to_string())?;
    ping_and_show(&c2, "c2", &c1_addr.to_string())?;
    ping_and_show(&c1, "c1", C2_NAME)?;
    ping_and_show(&c1, "c1", C2_ALIAS)?;

    heading("Per-host datapath counters");
    for node in &nodes {
        ovl_on(node, ovl, &["stats"])?;
    }

    heading("Stop the agents (SIGINT: exit 0; the data path keeps forwarding until `ovl detach`)");
    stop_agents(&agents)?;
    println!("\nDemo complete; removing the lab.");
    Ok(())
}

fn heading(title: &str) {
    println!("\n== {title}");
}

/// Runs `ovl ARGS` inside `node`'s namespace with its environment, echoing
/// the command and its output; fails unless it exits with status 0.
fn ovl_on(node: &Node, ovl: &str, args: &[&str]) -> Result<String> {
    println!("{node}$ ovl {}", args.join(" "));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node.host.netns.name(), ovl])
        .args(args)
        .envs(node.env_refs())
        .stdin(Stdio::null());
    let output = command::capture(&mut cmd)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    print_indented(&stdout);
    if !output.status.success() {
        bail!(
            "on {node}: `ovl {}` failed\n{}",
            args.join(" "),
            command::describe_failure(&cmd, &output)
        );
    }
    Ok(stdout)
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

/// An IPv4 subnet, for picking a container's overlay address out of the
/// addresses `ip` lists.
#[derive(Clone, Copy, Debug)]
struct Subnet {
    network: u32,
    mask: u32,
}

impl Subnet {
    fn parse(cidr: &str) -> Result<Self> {
        let (addr, len) = cidr
            .split_once('/')
            .context("CIDR without a prefix length")?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("bad address in {cidr}"))?;
        let len: u32 = len
            .parse()
            .with_context(|| format!("bad prefix length in {cidr}"))?;
        ensure!(len <= 32, "prefix length of {cidr} exceeds 32");
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        Ok(Subnet {
            network: u32::from(addr) & mask,
            mask,
        })
    }

    fn contains(self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask == self.network
    }
}

/// The address `ovl connect` gave the container, read from the container
/// itself: that is the address other containers must reach, whatever the
/// CLI prints.
fn overlay_address(container: &Netns, subnet: Subnet) -> Result<Ipv4Addr> {
    let mut found = None;
    wait_until(CONVERGE_TIMEOUT, || {
        found = container_addresses(container)?
            .into_iter()
            .find(|addr| subnet.contains(*addr));
        Ok(found.is_some())
    })
    .with_context(|| format!("container {container} got no address in {SUBNET}"))?;
    found.context("wait_until returned before an address was found")
}

/// Every IPv4 address configured in `netns` (`ip -o -4 addr show` lines
/// read `2: eth0    inet 198.18.0.2/24 brd ... scope global eth0`).
fn container_addresses(netns: &Netns) -> Result<Vec<Ipv4Addr>> {
    let output = netns.ip(&["-o", "-4", "addr", "show"])?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == "inet")?;
            let cidr = words.next()?;
            cidr.split('/').next()?.parse().ok()
        })
        .collect())
}

/// Pings until the first echo reply, failing early if an agent died.
/// Pings `to` from `from` until it answers; returns how many pings went
/// unanswered before.
fn wait_for_reachability(agents: &[Agent], from: &Netns, to: Ipv4Addr) -> Result<u32> {
    let mut exited_agent = None;
    let mut unanswered = 0;
    let reached = wait_until(CONVERGE_TIMEOUT, || {
        for agent in agents {
            if let Some(status) = agent.process.try_status()? {
                exited_agent = Some((agent, status));
                // Ends the wait: nothing will program the path any more.
                return Ok(true);
            }
        }
        let answered = ping(from, to, 1, &["-W", "1"])?.received > 0;
        unanswered += u32::from(!answered);
        Ok(answered)
    });
    if let Some((agent, status)) = exited_agent {
        bail!(
            "the agent on {} exited early with {status}\n{}",
            agent.node,
            agent.process.output_report()
        );
    }
    reached.with_context(|| format!("{to} never answered a ping within {CONVERGE_TIMEOUT:?}"))?;
    Ok(unanswered)
}

fn ping_and_show(from: &Netns, from_label: &str, to: &str) -> Result<()> {
    println!("{from_label}$ ping -c {PING_COUNT} {to}");
    let result = ping_host(from, to, PING_COUNT, &["-i", "0.2", "-W", "2"])?;
    print_indented(&result.output);
    ensure!(
        result.all_received(),
        "{from_label} -> {to}: {} sent, {} received, {} duplicates",
        result.transmitted,
        result.received,
        result.duplicates
    );
    Ok(())
}

/// SIGINT to every agent, then waits for each to exit; an agent that exits
/// non-zero or hangs fails the demo, with its output.
fn stop_agents(agents: &[Agent]) -> Result<()> {
    let mut failures = Vec::new();
    for agent in agents {
        println!(
            "{}$ kill -INT {}   # the ovl attach agent",
            agent.node,
            agent.process.pid()
        );
        if let Err(error) = agent.process.signal(Signal::Interrupt) {
            failures.push(format!("on {}: {error:#}", agent.node));
        }
    }
    for agent in agents {
        match agent.process.wait_timeout(DETACH_TIMEOUT) {
            Ok(status) if status.success() => println!("{}: agent exited ({status})", agent.node),
            Ok(status) => failures.push(format!(
                "the agent on {} exited with {status}\n{}",
                agent.node,
                agent.process.output_report()
            )),
            Err(error) => failures.push(format!("on {}: {error:#}", agent.node)),
        }
    }
    if !failures.is_empty() {
        bail!("stopping agents: {}", failures.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_contains_only_its_own_addresses() {
        let subnet = Subnet::parse(SUBNET).expect("the demo subnet parses");
        assert!(subnet.contains(Ipv4Addr::new(198, 18, 0, 2)));
        assert!(!subnet.contains(Ipv4Addr::new(198, 18, 1, 2)));
        assert!(!subnet.contains(Ipv4Addr::new(127, 0, 0, 1)));
        let everything = Subnet::parse("0.0.0.0/0").expect("/0 parses");
        assert!(everything.contains(Ipv4Addr::new(10, 1, 2, 3)));
    }
}
