// The benchmarked data paths, each on its own two routed hosts in its own
// lab: bare underlay, Docker-like kernel vxlan, and ovl in each decap mode.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ovl_tests::{Agent, Host, Lab, Netns, RefOverlayNode, TwoHosts, mac_for, ping, wait_until};

use crate::measure::Endpoints;
use crate::report::PathId;

/// The overlay network of the ovl paths.
const NETWORK: &str = "bench-net";
/// Overlay subnet: RFC 2544 benchmarking space.
const SUBNET: &str = "198.18.0.0/24";
/// VNI of the kernel vxlan reference (ovl allocates its own).
const REFERENCE_VNI: u32 = 4096;
/// Overlay addresses of the reference overlay's client and server.
const REFERENCE_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const REFERENCE_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// Prefix length of [`SUBNET`].
const SUBNET_PREFIX_LEN: u8 = 24;
/// How long a fresh path may take to deliver its first ping (agents
/// reconcile from the store asynchronously).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

/// One underlay veth end whose offloads the benchmark switches.
#[derive(Clone, Debug)]
pub struct UnderlayLink {
    pub netns: Netns,
    pub iface: String,
    /// `host0:eth0`, `router:h1`, ... for the report.
    pub label: String,
}

/// A data path ready to measure: its endpoints with servers listening, its
/// underlay links, and what keeps it alive. Field order is drop order: the
/// agents' handles go before the lab stops their processes.
pub struct Topology {
    pub path: PathId,
    pub endpoints: Endpoints,
    pub links: Vec<UnderlayLink>,
    /// ovl agents' pin directories, labelled by host role; empty for the
    /// reference paths.
    pub agent_pins: Vec<(String, PathBuf)>,
    _agents: Vec<Agent>,
    lab: Lab,
}

impl Topology {
    /// Builds `path` in a lab of its own and starts its servers.
    pub fn build(path: PathId) -> Result<Topology> {
        let lab = Lab::new(&format!("bench{}", tag(path)))?;
        let (router, hosts) = lab.routed_hosts(2)?;
        let [host_a, host_b]: [Host; 2] = hosts.try_into().map_err(|hosts: Vec<Host>| {
            anyhow::anyhow!("asked for 2 hosts, got {}", hosts.len())
        })?;
        let links = underlay_links(&router, &host_a, &host_b);
        let (endpoints, agents) = match path {
            PathId::Bare => (
                Endpoints {
                    client: host_a.netns.clone(),
                    server: host_b.netns.clone(),
                    server_addr: host_b.addr,
                },
                OvlAgents::default(),
            ),
            PathId::KernelVxlan => (kernel_vxlan(&lab, &host_a, &host_b)?, OvlAgents::default()),
            PathId::OvlTc => ovl(&lab, &host_a, &host_b, "tc", false, false)?,
            PathId::OvlTcForwarding => ovl(&lab, &host_a, &host_b, "tc", true, false)?,
            PathId::OvlNative => ovl(&lab, &host_a, &host_b, "native", false, false)?,
            PathId::OvlGeneric => ovl(&lab, &host_a, &host_b, "generic", false, false)?,
            PathId::OvlEncrypted => ovl(&lab, &host_a, &host_b, "tc", false, true)?,
        };
        wait_for_ping(&endpoints).with_context(|| format!("{} does not deliver", path.label()))?;
        endpoints.start_servers(&lab)?;
        Ok(Topology {
            path,
            endpoints,
            links,
            agent_pins: agents.pins,
            _agents: agents.agents,
            lab,
        })
    }

    /// The lab's name prefix, for messages.
    pub fn lab_prefix(&self) -> &str {
        self.lab.prefix()
    }

    /// Fails unless the client still reaches the server with ping.
    pub fn check_delivers(&self) -> Result<()> {
        wait_for_ping(&self.endpoints)
            .with_context(|| format!("{} stopped delivering", self.path.label()))
    }
}

/// A short lab tag per path (lab tags keep 10 characters).
fn tag(path: PathId) -> &'static str {
    match path {
        PathId::Bare => "bare",
        PathId::KernelVxlan => "kvx",
        PathId::OvlTc => "tc",
        PathId::OvlTcForwarding => "tcfw",
        PathId::OvlNative => "nat",
        PathId::OvlGeneric => "gen",
        PathId::OvlEncrypted => "enc",
    }
}

fn underlay_links(router: &Netns, host_a: &Host, host_b: &Host) -> Vec<UnderlayLink> {
    // routed_hosts names the router's port towards host i `h<i>`.
    let link = |netns: &Netns, iface: &str, label: String| UnderlayLink {
        netns: netns.clone(),
        iface: iface.to_string(),
        label,
    };
    vec![
        link(
            &host_a.netns,
            &host_a.iface,
            format!("host0:{}", host_a.iface),
        ),
        link(router, "h0", "router:h0".to_string()),
        link(router, "h1", "router:h1".to_string()),
        link(
            &host_b.netns,
            &host_b.iface,
            format!("host1:{}", host_b.iface),
        ),
    ]
}

/// Docker's data path: a bridge and a kernel vxlan device per host, remote
/// containers known statically (FDB + proxy-ARP neighbour entries).
fn kernel_vxlan(lab: &Lab, host_a: &Host, host_b: &Host) -> Result<Endpoints> {
    let mut node_a = RefOverlayNode::install(host_a, REFERENCE_VNI)?;
    let mut node_b = RefOverlayNode::install(host_b, REFERENCE_VNI)?;
    let client = node_a.add_container(lab, REFERENCE_CLIENT, SUBNET_PREFIX_LEN)?;
    let server = node_b.add_container(lab, REFERENCE_SERVER, SUBNET_PREFIX_LEN)?;
    node_a.add_remote(REFERENCE_SERVER, mac_for(REFERENCE_SERVER), host_b.addr)?;
    node_b.add_remote(REFERENCE_CLIENT, mac_for(REFERENCE_CLIENT), host_a.addr)?;
    Ok(Endpoints {
        client,
        server,
        server_addr: REFERENCE_SERVER,
    })
}

/// The agents of an ovl path and where each pins its maps.
#[derive(Default)]
struct OvlAgents {
    agents: Vec<Agent>,
    pins: Vec<(String, PathBuf)>,
}

/// ovl with an agent per host in decap `mode`; `forwarding` turns IPv4
/// forwarding on in both hosts (encapsulation then resolves next hops with
/// `bpf_fib_lookup` instead of handing packets to the kernel's routing);
/// `encrypted` makes the network an encrypted one (WireGuard between the
/// hosts, in the agents).
fn ovl(
    lab: &Lab,
    host_a: &Host,
    host_b: &Host,
    mode: &str,
    forwarding: bool,
    encrypted: bool,
) -> Result<(Endpoints, OvlAgents)> {
    if forwarding {
        for host in [host_a, host_b] {
            host.netns.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        }
    }
    let ovl = ovl_tests::Ovl::new(lab)?;
    // Internal: the benchmark's containers talk only to each other, and an
    // agent switches forwarding on the underlay on for external egress,
    // which would take "forwarding off" away from the measurement.
    let extra: &[&str] = if encrypted {
        &["--internal", "--encrypted"]
    } else {
        &["--internal"]
    };
    ovl.create_network(&host_a.netns, NETWORK, SUBNET, extra)?;
    let nodes = TwoHosts::NODES;
    let mut agents = Vec::new();
    for (host, node) in [host_a, host_b].into_iter().zip(nodes) {
        agents.push(
            ovl.attach(lab, host, node, mode)
                .with_context(|| format!("ovl attach --mode {mode} on {node}"))?,
        );
    }
    let client = lab.container("client")?;
    let server = lab.container("server")?;
    ovl.connect(host_a, nodes[0], NETWORK, &client, &[])?;
    let server_addr = ovl.connect(host_b, nodes[1], NETWORK, &server, &[])?;
    // The agent pins under <pin root>/<node>.
    let pins = vec![
        ("host0 (client)".to_string(), ovl.pin_root().join(nodes[0])),
        ("host1 (server)".to_string(), ovl.pin_root().join(nodes[1])),
    ];
    Ok((
        Endpoints {
            client,
            server,
            server_addr,
        },
        OvlAgents { agents, pins },
    ))
}

/// Waits for the client's first echo reply from the server.
fn wait_for_ping(endpoints: &Endpoints) -> Result<()> {
    let mut last = None;
    let reached = wait_until(CONVERGE_TIMEOUT, || {
        let result = ping(&endpoints.client, endpoints.server_addr, 1, &["-W", "1"])?;
        let ok = result.received > 0;
        last = Some(result.output);
        Ok(ok)
    });
    if let Err(error) = reached {
        bail!(
            "{} never answered a ping from {} within {CONVERGE_TIMEOUT:?}: {error:#}\n{}",
            endpoints.server_addr,
            endpoints.client,
            last.unwrap_or_default()
        );
    }
    Ok(())
}
