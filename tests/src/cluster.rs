// Routed hosts with an ovl agent each, on the file store (two hosts) or on
// an etcd that runs on the router (three hosts): the scenarios' worlds.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{Agent, Etcd, Host, Lab, NetCounters, Netns, Ovl};

/// Routed hosts (192.0.2.10, 198.51.100.10, 203.0.113.10 — as many as
/// asked) behind one router, one store, and an agent per host: nodes
/// "host-a", "host-b", "host-c", in that order.
pub struct Cluster {
    pub ovl: Ovl,
    pub router: Netns,
    pub hosts: Vec<Host>,
    /// One agent per host, in host order; a test that kills one takes it
    /// out before [`stop`](Self::stop).
    pub agents: Vec<Agent>,
}

/// Where a test's agents serve Prometheus metrics (`OVL_METRICS`), each
/// inside its host's namespace.
pub const AGENT_METRICS: &str = "127.0.0.1:9474";

/// Two hosts on the embedded file store: the fast path's starting point.
pub type TwoHosts = Cluster;

/// Two containers of one network on hosts A and B (see
/// [`Cluster::connected_pair`]).
pub struct Pair {
    pub c1: Netns,
    pub ip1: Ipv4Addr,
    pub c2: Netns,
    pub ip2: Ipv4Addr,
}

/// Three hosts sharing an etcd that runs on the router (192.0.2.1:2379,
/// reachable from every host): the starting point of the scenarios about
/// ovl as a cluster (allocation races, node failure, outages).
pub struct ThreeHosts {
    pub cluster: Cluster,
    pub etcd: Etcd,
}

impl Cluster {
    /// Node names, in host order.
    pub const NODES: [&'static str; 3] = ["host-a", "host-b", "host-c"];

    /// Two hosts, a file store and both agents in decap mode `mode`.
    pub fn start(lab: &Lab, mode: &str) -> Result<Cluster> {
        let (router, hosts) = lab.routed_hosts(2)?;
        Self::with_agents(lab, Ovl::new(lab)?, router, hosts, mode, &[])
    }

    /// [`start`](Self::start) with extra environment for every agent
    /// (`OVL_KEY_ROTATION` or `OVL_DNS_UPSTREAM`, say).
    pub fn start_with_env(lab: &Lab, mode: &str, env: &[(&str, &str)]) -> Result<Cluster> {
        let (router, hosts) = lab.routed_hosts(2)?;
        Self::with_agents(lab, Ovl::new(lab)?, router, hosts, mode, env)
    }

    /// Hosts `hosts` behind `router`, with an agent each on `ovl`'s store
    /// in decap mode `mode` and extra environment `env`.
    pub fn with_agents(
        lab: &Lab,
        ovl: Ovl,
        router: Netns,
        hosts: Vec<Host>,
        mode: &str,
        env: &[(&str, &str)],
    ) -> Result<Cluster> {
        let mut agents = Vec::new();
        for (host, node) in hosts.iter().zip(Self::NODES) {
            agents.push(ovl.attach_with_env(lab, host, node, mode, env)?);
        }
        // Each agent writes to the store as it starts (its node, its
        // WireGuard key): a test begins once they are done, so what it
        // sees change in the store is its own doing.
        for agent in &agents {
            agent.wait_in_step()?;
        }
        Ok(Cluster {
            ovl,
            router,
            hosts,
            agents,
        })
    }

    /// Runs `ovl args...` on host `i` as its node.
    pub fn run(&self, i: usize, args: &[&str]) -> Result<String> {
        self.ovl.run(&self.hosts[i].netns, Self::NODES[i], args)
    }

    /// Runs `ovl args...` on host `i` as its node, which must refuse it:
    /// returns what it said on stderr.
    pub fn refused(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = self
            .ovl
            .run_unchecked(&self.hosts[i].netns, Self::NODES[i], args)?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        anyhow::ensure!(
            !out.status.success(),
            "`ovl {}` on {} was not refused:\n{}{err}",
            args.join(" "),
            Self::NODES[i],
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(err)
    }

    /// Connects a new container on host `i` to `network`; returns it and
    /// its address.
    pub fn container(
        &self,
        lab: &Lab,
        i: usize,
        network: &str,
        hint: &str,
    ) -> Result<(Netns, Ipv4Addr)> {
        let c = lab.container(hint)?;
        let ip = self
            .ovl
            .connect(&self.hosts[i], Self::NODES[i], network, &c, &[])?;
        Ok((c, ip))
    }

    /// `ovl network inspect NETWORK`, run on host `i`.
    pub fn inspect(&self, i: usize, network: &str) -> Result<Value> {
        self.ovl.inspect(&self.hosts[i].netns, network)
    }

    /// Counters of `network` on host `i`.
    pub fn counters(&self, i: usize, network: &str) -> Result<NetCounters> {
        self.ovl
            .counters(&self.hosts[i].netns, Self::NODES[i], network)
    }

    /// `ovl node ls` run on host `i`, as (node, VTEP, alive) rows; alive
    /// reads as the table shows it ("yes", "no", "yes (pinned here)",
    /// "unknown").
    pub fn nodes(&self, i: usize) -> Result<Vec<(String, Ipv4Addr, String)>> {
        let out = self.run(i, &["node", "ls", "--json"])?;
        let rows: Value =
            serde_json::from_str(&out).with_context(|| format!("node ls is not JSON: {out}"))?;
        rows.as_array()
            .with_context(|| format!("node ls is not a list: {out}"))?
            .iter()
            .map(|r| {
                let name = r["name"].as_str().context("name")?.to_owned();
                let vtep = r["vtep"].as_str().context("vtep")?.parse()?;
                let alive = match (r["alive"].as_bool(), r["pinned_here"].as_bool()) {
                    (Some(true), _) => "yes",
                    (Some(false), _) => "no",
                    (None, Some(true)) => "yes (pinned here)",
                    (None, _) => "unknown",
                };
                Ok((name, vtep, alive.to_owned()))
            })
            .collect()
    }

    /// Network `network` (198.18.0.0/24) created from host A, container
    /// `c1` on host A and `c2` on host B, once c1's pings reach c2.
    pub fn connected_pair(&self, lab: &Lab, network: &str) -> Result<Pair> {
        self.ovl
            .create_network(&self.hosts[0].netns, network, "198.18.0.0/24", &[])?;
        let (c1, ip1) = self.container(lab, 0, network, "c1")?;
        let (c2, ip2) = self.container(lab, 1, network, "c2")?;
        crate::wait_until(std::time::Duration::from_secs(10), || {
            Ok(crate::ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
        })
        .context("c1 never reached c2")?;
        Ok(Pair { c1, ip1, c2, ip2 })
    }

    /// Host `i`'s agent's metrics, as Prometheus would scrape them (the
    /// agents started with `OVL_METRICS` = [`AGENT_METRICS`]).
    pub fn scrape(&self, i: usize) -> Result<String> {
        let out = self.hosts[i].netns.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{AGENT_METRICS}/metrics"),
        ])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sends `count` VXLAN frames (VNI `vni`) from the router straight onto
    /// host A's underlay link, outer IPv4 from `outer_src` with TOS
    /// `outer_tos` to host A's address, around the inner frame `inner`
    /// (scapy, from `Ether` on). Built with scapy and sent on the raw
    /// link, both MACs given, so the router's own stack adds nothing.
    pub fn send_vxlan_to_host_a(
        &self,
        outer_src: Ipv4Addr,
        outer_tos: u8,
        vni: u64,
        inner: &str,
        count: u64,
    ) -> Result<()> {
        let host_a = &self.hosts[0];
        let gateway = host_a.gateway.context("routed host has a gateway")?;
        let router_iface = self.router.iface_with_addr(gateway)?;
        let router_mac = self.router.link_mac(&router_iface)?;
        let host_mac = host_a.netns.link_mac(crate::HOST_IFACE)?;
        let script = format!(
            "from scapy.all import Ether, IP, UDP, ICMP, sendp\n\
             from scapy.layers.vxlan import VXLAN\n\
             frame = (Ether(src='{router_mac}', dst='{host_mac}')\n\
                 / IP(src='{outer_src}', dst='{vtep}', tos={outer_tos})\n\
                 / UDP(sport=40000, dport=4789)\n\
                 / VXLAN(vni={vni}, flags=0x08)\n\
                 / {inner})\n\
             sendp(frame, iface='{router_iface}', count={count}, verbose=False)\n",
            vtep = host_a.addr,
        );
        // Debian's python3-scapy lives in the system interpreter, which a
        // user-level python3 (pyenv, venv) earlier in PATH would not see.
        self.router.exec(&["/usr/bin/python3", "-c", &script])?;
        Ok(())
    }

    /// The host end of `container`'s veth on host `i`, as the agent lists
    /// it in `network inspect`.
    pub fn host_end(&self, i: usize, network: &str, container: &Netns) -> Result<String> {
        let net = self.inspect(i, network)?;
        net["endpoints"]
            .as_array()
            .context("endpoints")?
            .iter()
            .find(|e| e["location"]["netns"] == container.name())
            .and_then(|e| e["location"]["host_ifname"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("no host end for {} in {net}", container.name()))
    }

    /// SIGKILLs host `i`'s agent and waits until it is gone; its data path
    /// stays pinned. [`restart_agent`](Self::restart_agent) brings one back.
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        let agent = self.agents.remove(i);
        agent.kill()?;
        agent.wait_exit(std::time::Duration::from_secs(5))?;
        Ok(())
    }

    /// SIGTERMs host `i`'s agent and checks that it exits cleanly.
    pub fn terminate_agent(&mut self, i: usize) -> Result<()> {
        self.agents.remove(i).terminate()
    }

    /// Starts host `i`'s agent again (decap mode auto) with extra
    /// environment `env`, after [`kill_agent`](Self::kill_agent) or
    /// [`terminate_agent`](Self::terminate_agent).
    pub fn restart_agent(&mut self, lab: &Lab, i: usize, env: &[(&str, &str)]) -> Result<()> {
        let agent = self
            .ovl
            .attach_with_env(lab, &self.hosts[i], Self::NODES[i], "auto", env)?;
        self.agents.insert(i, agent);
        Ok(())
    }

    /// `ovl node ls` run on host `i`: each node's published WireGuard
    /// public key, if any.
    pub fn node_keys(
        &self,
        i: usize,
    ) -> Result<std::collections::BTreeMap<String, Option<String>>> {
        let out = self.run(i, &["node", "ls", "--json"])?;
        let rows: Value =
            serde_json::from_str(&out).with_context(|| format!("node ls is not JSON: {out}"))?;
        rows.as_array()
            .with_context(|| format!("node ls is not a list: {out}"))?
            .iter()
            .map(|r| {
                let name = r["name"].as_str().context("name")?.to_owned();
                let key = r["wireguard"]["public_key"].as_str().map(str::to_owned);
                Ok((name, key))
            })
            .collect()
    }

    /// Stops every agent still in [`agents`](Self::agents), checking that
    /// each exits cleanly.
    pub fn stop(self) -> Result<()> {
        for agent in self.agents {
            agent.stop()?;
        }
        Ok(())
    }
}

impl ThreeHosts {
    /// Node names, in host order.
    pub const NODES: [&'static str; 3] = Cluster::NODES;

    /// Builds the topology, starts etcd and the three agents (decap mode
    /// auto) with liveness leases of `lease_ttl` seconds.
    pub fn start(lab: &Lab, lease_ttl: u64) -> Result<ThreeHosts> {
        let (router, hosts) = lab.routed_hosts(Self::NODES.len())?;
        let etcd_addr = hosts[0]
            .gateway
            .context("routed hosts have a gateway on the router")?;
        let etcd = Etcd::start(lab, &router, etcd_addr)?;
        let ovl = Ovl::with_store(lab, &etcd.url())?;
        let ttl = lease_ttl.to_string();
        let cluster =
            Cluster::with_agents(lab, ovl, router, hosts, "auto", &[("OVL_LEASE_TTL", &ttl)])?;
        Ok(ThreeHosts { cluster, etcd })
    }

    /// Stops every agent still running, checking that each exits cleanly.
    pub fn stop(self) -> Result<()> {
        self.cluster.stop()
    }
}

impl std::ops::Deref for ThreeHosts {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for ThreeHosts {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}
