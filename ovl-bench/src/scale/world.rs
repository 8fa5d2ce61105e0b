// The scale benchmark's world: N hosts on one switched underlay segment,
// one etcd on the same segment, and an `ovl attach` agent on every host.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ovl_tests::{
    Agent, Etcd, HOST_IFACE, Host, Lab, Netns, Ovl, SWITCH_BRIDGE, UNDERLAY_PREFIX_LEN, cidr,
    create_veth, wait_until,
};

/// etcd's address on the underlay segment (hosts are .10 and up).
pub const ETCD_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// How long every agent together gets to load its programs and reach the
/// store (they verify their programs at once on two shared cores).
const AGENTS_UP: Duration = Duration::from_secs(180);

/// Endpoints whose namespace does not exist stay registered this long
/// (`--gc-grace`, its maximum): the benchmark's endpoints have none.
pub const GC_GRACE: &str = "86400";

/// One node: its host and its agent.
pub struct Node {
    pub name: String,
    pub host: Host,
    pub agent: Agent,
}

impl Node {
    /// The node's VTEP (its underlay address).
    pub fn vtep(&self) -> Ipv4Addr {
        self.host.addr
    }
}

/// Everything the benchmark runs in; dropping it removes all of it.
pub struct World {
    pub nodes: Vec<Node>,
    pub etcd: Etcd,
    pub etcd_ns: Netns,
    pub ovl: Ovl,
    /// Last: dropped after the handles that point into it.
    pub lab: Lab,
}

impl World {
    /// Builds `n` hosts and etcd on one segment, then starts every agent
    /// and waits until each has read the store.
    pub fn build(n: usize) -> Result<World> {
        let lab = Lab::new("scale")?;
        let (switch, hosts) = lab.l2_hosts(n)?;
        let etcd_ns = lab.netns("etcd")?;
        create_veth(&etcd_ns, HOST_IFACE, &switch, "petcd")?;
        switch.ip(&["link", "set", "petcd", "master", SWITCH_BRIDGE, "up"])?;
        etcd_ns.ip(&[
            "addr",
            "add",
            &cidr(ETCD_ADDR, UNDERLAY_PREFIX_LEN),
            "dev",
            HOST_IFACE,
        ])?;
        etcd_ns.ip(&["link", "set", HOST_IFACE, "up"])?;
        let etcd = Etcd::start_in_memory(&lab, &etcd_ns, ETCD_ADDR)?;
        let ovl = Ovl::with_store(&lab, &etcd.url())?;
        let started = Instant::now();
        let mut nodes = Vec::with_capacity(n);
        for (i, host) in hosts.into_iter().enumerate() {
            let name = node_name(i);
            let agent = ovl.spawn_agent(&lab, &host, &name, "tc", &[("OVL_GC_GRACE", GC_GRACE)])?;
            nodes.push(Node { name, host, agent });
        }
        for node in &nodes {
            let left = AGENTS_UP.saturating_sub(started.elapsed());
            wait_until(left, || {
                if let Some(status) = node.agent.try_status()? {
                    bail!("exited ({status})");
                }
                Ok(node.agent.log()?.contains(" in step with "))
            })
            .with_context(|| {
                format!(
                    "agent {} did not reach the store:\n{}",
                    node.name,
                    node.agent.output_report()
                )
            })?;
        }
        eprintln!(
            "ovl-bench: scale: {n} agents in step with {} after {:.1} s",
            etcd.url(),
            started.elapsed().as_secs_f64()
        );
        Ok(World {
            nodes,
            etcd,
            etcd_ns,
            ovl,
            lab,
        })
    }

    /// Process ids of the agents, in node order.
    pub fn agent_pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.agent.pid()).collect()
    }

    /// Fails when an agent exited.
    pub fn check_agents(&self) -> Result<()> {
        for node in &self.nodes {
            if let Some(status) = node.agent.try_status()? {
                bail!(
                    "agent {} exited ({status}):\n{}",
                    node.name,
                    node.agent.output_report()
                );
            }
        }
        Ok(())
    }
}

/// The name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("node-{i:02}")
}
