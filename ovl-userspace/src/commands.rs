//! What each `ovl` subcommand does, on top of the store, netlink and the
//! datapath. Each returns what it would print, so main stays a dispatcher.

use std::{collections::BTreeMap, net::Ipv4Addr, os::fd::AsFd, path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{
    api, attachment, bpffs, datapath, egress_nat,
    ipam::{Pool, Subnet},
    metrics::{self, NetworkStats},
    model::{Endpoint, KeptVni, Location, MacAddr, NetworkSpec},
    netlink,
    release::AddressConflict,
    store::{Scope, Store},
};

/// `ovl network create`.
pub async fn network_create(store: &Store, spec: NetworkSpec) -> Result<String> {
    let net = store
        .update_with(Scope::Networks, |s| s.create_network(spec.clone()).cloned())
        .await?;
    let subnets: Vec<String> = net
        .subnets
        .iter()
        .map(|p| match p.range {
            Some(range) => format!("{} gateway {} range {range}", p.subnet, p.gateway),
            None => format!("{} gateway {}", p.subnet, p.gateway),
        })
        .collect();
    let aux: Vec<String> = net
        .aux_addresses
        .iter()
        .map(|(name, ip)| format!(", auxiliary address {name}={ip}"))
        .collect();
    Ok(format!(
        "created network {} (VNI {}, subnet {}{}, MTU {}{})",
        net.name,
        net.vni,
        subnets.join(", subnet "),
        aux.concat(),
        net.mtu,
        match (net.internal, net.encrypted) {
            (true, true) => ", internal, encrypted",
            (true, false) => ", internal",
            (false, true) => ", encrypted",
            (false, false) => "",
        }
    ))
}

/// One row of `ovl network ls --json`.
#[derive(Serialize)]
struct NetworkRow<'a> {
    name: &'a str,
    vni: u32,
    subnets: Vec<String>,
    mtu: u32,
    endpoints: usize,
    internal: bool,
    encrypted: bool,
}

/// `ovl network ls`.
pub async fn network_ls(store: &Store, json: bool) -> Result<String> {
    let state = store.load().await?;
    let rows: Vec<NetworkRow> = state
        .networks
        .values()
        .map(|n| NetworkRow {
            name: &n.name,
            vni: n.vni.get(),
            subnets: n.subnets.iter().map(|p| p.subnet.to_string()).collect(),
            mtu: n.mtu,
            endpoints: state.endpoints_of(&n.name).count(),
            internal: n.internal,
            encrypted: n.encrypted,
        })
        .collect();
    if json {
        return Ok(serde_json::to_string_pretty(&rows).expect("rows serialise"));
    }
    // The subnets last: a network may have many, and a column after them
    // would not line up.
    let mut out = format!(
        "{:<20} {:>8} {:>5} {:>9}  {:<8}  {:<9}  {}\n",
        "NAME", "VNI", "MTU", "ENDPOINTS", "INTERNAL", "ENCRYPTED", "SUBNETS"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<20} {:>8} {:>5} {:>9}  {:<8}  {:<9}  {}\n",
            r.name,
            r.vni,
            r.mtu,
            r.endpoints,
            if r.internal { "yes" } else { "no" },
            if r.encrypted { "yes" } else { "no" },
            r.subnets.join(",")
        ));
    }
    Ok(out)
}

#[derive(Serialize)]
struct Inspect<'a> {
    name: &'a str,
    vni: u32,
    subnets: &'a [Pool],
    /// Addresses never given to an endpoint, by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    aux_addresses: &'a BTreeMap<String, Ipv4Addr>,
    mtu: u32,
    internal: bool,
    /// Traffic between nodes is encrypted (WireGuard).
    encrypted: bool,
    /// VNIs its subnets were named by before (a Docker network created
    /// with several subnets, or a VNI asked for): no other network gets
    /// them. Each with the subnets it named.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    kept_vnis: Vec<KeptVniView>,
    endpoints: Vec<&'a Endpoint>,
}

/// One VNI a network keeps, with the subnets it named.
#[derive(Serialize)]
struct KeptVniView {
    vni: u32,
    subnets: Vec<Subnet>,
}

/// The VNIs of `kept`, each once, in the order they were first kept.
fn kept_vni_views(kept: &[KeptVni]) -> Vec<KeptVniView> {
    let mut views: Vec<KeptVniView> = Vec::new();
    for k in kept {
        match views.iter_mut().find(|v| v.vni == k.vni.get()) {
            Some(v) => v.subnets.push(k.subnet),
            None => views.push(KeptVniView {
                vni: k.vni.get(),
                subnets: vec![k.subnet],
            }),
        }
    }
    views
}

/// `ovl network inspect`: the network and its endpoints as JSON.
pub async fn network_inspect(store: &Store, name: &str) -> Result<String> {
    let state = store.load_in(Scope::Network(name)).await?;
    let n = state.network(name)?;
    let view = Inspect {
        name: &n.name,
        vni: n.vni.get(),
        subnets: &n.subnets,
        aux_addresses: &n.aux_addresses,
        mtu: n.mtu,
        internal: n.internal,
        encrypted: n.encrypted,
        kept_vnis: kept_vni_views(&n.kept_vnis),
        endpoints: state.endpoints_of(name).collect(),
    };
    Ok(serde_json::to_string_pretty(&view).expect("inspect view serialises"))
}

/// `ovl network rm`.
pub async fn network_rm(store: &Store, name: &str) -> Result<String> {
    store
        .update_with(Scope::Network(name), |s| s.remove_network(name))
        .await?;
    Ok(format!("removed network {name}"))
}

/// How long `ovl connect` waits for the node's agent to forward for the
/// new endpoint.
const READY_WAIT: Duration = Duration::from_secs(2);

/// `ovl connect`: registers the endpoint, builds its veth (both rolled
/// back on failure), then waits until the node's agent forwards for it,
/// warning when no agent runs.
pub async fn connect(
    store: &Store,
    api_socket: &Path,
    req: &attachment::Request,
) -> Result<String> {
    let a = attachment::attach(store, req).await?;
    let (prefix, gateway) = a
        .network
        .pool_of(a.endpoint.ip)
        .map(|p| (p.subnet.prefix(), p.gateway))
        .context("IPAM gave an address outside the network's subnets")?;
    match attachment::wait_forwarding(api_socket, &req.network, a.endpoint.ip, READY_WAIT).await {
        Ok(attachment::Readiness::Forwarding) => {}
        Ok(attachment::Readiness::NoAgent) => say(format_args!(
            "warning: no ovl agent runs for node {} (nothing answers on {}): {} is registered, but nothing forwards for it until `ovl attach` runs on this node",
            req.node,
            api_socket.display(),
            a.endpoint.ip
        )),
        Ok(attachment::Readiness::NotYet) => say(format_args!(
            "warning: the agent of node {} did not report {} forwarding within {READY_WAIT:?}; see its log",
            req.node, a.endpoint.ip
        )),
        Err(e) => say(format_args!("warning: {e:#}")),
    }
    let resolver = match &a.resolv_conf {
        Some(path) => format!("{} ({})", crate::dns::RESOLVER_ADDR, path.display()),
        None => crate::dns::RESOLVER_ADDR.to_string(),
    };
    let published = match published_text(&a.endpoint.ports) {
        Some(ports) => format!("\npublishes: {ports}"),
        None => String::new(),
    };
    Ok(format!(
        "connected {} to {}: {} {}/{prefix} gateway {gateway} mac {} mtu {} (host side {})\nnames: {}; resolver {resolver}{published}",
        req.netns,
        req.network,
        a.ifname,
        a.endpoint.ip,
        a.endpoint.mac,
        a.network.mtu,
        a.host_ifname,
        a.endpoint.names().collect::<Vec<_>>().join(", ")
    ))
}

/// `ovl disconnect`: removes the veth (if still there) and the endpoint.
pub async fn disconnect(
    store: &Store,
    node: &str,
    network: &str,
    netns_name: &str,
) -> Result<String> {
    let ep = attachment::detach(store, node, network, netns_name).await?;
    Ok(format!(
        "disconnected {netns_name} ({}) from {network}",
        ep.ip
    ))
}

/// `ovl endpoint add`: an endpoint behind a VTEP that runs no ovl agent.
pub async fn endpoint_add(
    store: &Store,
    network: &str,
    ip: Ipv4Addr,
    vtep: Ipv4Addr,
    mac: Option<MacAddr>,
    name: Option<String>,
) -> Result<String> {
    let ep = store
        .update_with(Scope::Network(network), |s| {
            s.add_static(network, ip, mac, vtep, name.clone())
        })
        .await?;
    Ok(format!(
        "added {} ({}) on {network} behind VTEP {vtep}",
        ep.ip, ep.mac
    ))
}

/// `ovl endpoint rm`: removes a static endpoint (containers' are refused).
pub async fn endpoint_rm(store: &Store, network: &str, ip: Ipv4Addr) -> Result<String> {
    store
        .update_with(Scope::Network(network), |s| s.remove_static(network, ip))
        .await?;
    Ok(format!("removed {ip} from {network}"))
}

/// `ovl cluster show`: the settings every node shares.
pub async fn cluster_show(store: &Store) -> Result<String> {
    let state = store.load().await?;
    Ok(format!("vxlan port: {}", state.cluster.vxlan_port))
}

/// `ovl cluster set`: changes settings every node shares; each agent
/// applies them as it sees the change.
pub async fn cluster_set(store: &Store, vxlan_port: Option<u16>) -> Result<String> {
    let Some(port) = vxlan_port else {
        bail!("nothing to set; give --vxlan-port PORT");
    };
    store
        // All: the port is checked against every published port.
        .update_with(Scope::All, |s| s.set_vxlan_port(port))
        .await?;
    Ok(format!(
        "VXLAN port set to {port}: every agent sends to it and accepts only it from now on (allow UDP {port} between the nodes)"
    ))
}

/// One row of `ovl node ls --json`.
#[derive(Serialize)]
struct NodeRow<'a> {
    name: &'a str,
    vtep: std::net::Ipv4Addr,
    /// Whether its agent holds its lease; null where the store does not
    /// track liveness (the file store).
    alive: Option<bool>,
    /// Whether this machine holds the node's pins (its data path).
    pinned_here: bool,
    /// Addresses it found taken when it last put back its endpoints.
    conflicts: &'a [AddressConflict],
    /// The WireGuard key and port it published (encrypted networks).
    wireguard: Option<crate::crypto::NodeKey>,
}

/// `ovl node ls`: nodes, their VTEPs, whether their agent is alive (known
/// with etcd leases; with the file store, whether this machine holds the
/// node's pins) and the address conflicts they reported.
pub async fn node_ls(store: &Store, pin_root: &Path, json: bool) -> Result<String> {
    let state = store.load().await?;
    let rows: Vec<NodeRow> = state
        .nodes
        .values()
        .map(|n| NodeRow {
            name: &n.name,
            vtep: n.vtep,
            alive: state.alive.as_ref().map(|a| a.contains(&n.name)),
            pinned_here: bpffs::node_dir(pin_root, &n.name)
                .is_ok_and(|d| d.join(ovl_common::maps::names::STATS).exists()),
            conflicts: state.conflicts.get(&n.name).map_or(&[], Vec::as_slice),
            wireguard: n.wireguard,
        })
        .collect();
    if json {
        return Ok(serde_json::to_string_pretty(&rows).expect("rows serialise"));
    }
    let mut out = format!(
        "{:<20} {:<16} {:>9} {:<18} {:<44} {}\n",
        "NODE", "VTEP", "CONFLICTS", "ALIVE", "WIREGUARD KEY", "PORT"
    );
    for r in &rows {
        let alive = match (r.alive, r.pinned_here) {
            (Some(true), _) => "yes",
            (Some(false), _) => "no",
            (None, true) => "yes (pinned here)",
            (None, false) => "unknown",
        };
        let (key, port) = r.wireguard.map_or(("-".to_owned(), "-".to_owned()), |k| {
            (k.public_key.to_string(), k.port.to_string())
        });
        out.push_str(&format!(
            "{:<20} {:<16} {:>9} {alive:<18} {key:<44} {port}\n",
            r.name,
            r.vtep.to_string(),
            r.conflicts.len(),
        ));
    }
    for r in &rows {
        for c in r.conflicts {
            out.push_str(&format!("conflict on node {}: {c}\n", r.name));
        }
    }
    Ok(out)
}

/// `ovl node rm`: removes a dead node's registration and endpoints.
/// Refused while its agent is alive (etcd), or runs on this machine (the
/// file store, which does not track liveness).
pub async fn node_rm(store: &Store, pin_root: &Path, name: &str) -> Result<String> {
    let dir = bpffs::node_dir(pin_root, name)?;
    if matches!(store, Store::File(_))
        && dir.exists()
        && let Err(bpffs::LockError::Held { holder, .. }) = bpffs::NodeLock::acquire(&dir)
    {
        bail!(
            "node {name:?} has a running agent on this machine{holder}; stop it first (SIGTERM), then remove the node"
        );
    }
    let freed = store.remove_node(name).await?;
    Ok(format!(
        "removed node {name} and freed its {freed} endpoint(s); their addresses are held back for the address grace before reuse"
    ))
}

/// One row of `ovl endpoint ls --json`: the endpoint as stored.
#[derive(Serialize)]
struct EndpointRow<'a> {
    #[serde(flatten)]
    endpoint: &'a Endpoint,
    /// The VTEP its frames go to, when known (its node's, while alive).
    vtep: Option<std::net::Ipv4Addr>,
}

/// `ovl endpoint ls`: every endpoint, or those of one network.
pub async fn endpoint_ls(store: &Store, network: Option<&str>, json: bool) -> Result<String> {
    let state = match network {
        Some(n) => {
            let s = store.load_in(Scope::Network(n)).await?;
            s.network(n)?;
            s
        }
        None => store.load().await?,
    };
    let mut endpoints: Vec<&Endpoint> = state
        .endpoints
        .iter()
        .filter(|e| network.is_none_or(|n| e.network == n))
        .collect();
    endpoints.sort_by(|a, b| (&a.network, a.ip).cmp(&(&b.network, b.ip)));
    let rows: Vec<EndpointRow> = endpoints
        .into_iter()
        .map(|e| EndpointRow {
            endpoint: e,
            vtep: state.vtep_of(e),
        })
        .collect();
    if json {
        return Ok(serde_json::to_string_pretty(&rows).expect("rows serialise"));
    }
    let mut out = format!(
        "{:<20} {:<15} {:<17} {:<20} {}\n",
        "NETWORK", "IP", "MAC", "NAME", "WHERE"
    );
    for r in rows {
        let e = r.endpoint;
        let place = match &e.location {
            Location::Container { node, netns, .. } => format!("{netns} on {node}"),
            Location::Static { vtep } => format!("behind VTEP {vtep}"),
            Location::Reserved { node } => format!("reserved on {node} (Docker's IPAM)"),
        };
        let place = match published_text(&e.ports) {
            Some(ports) => format!("{place}; publishes {ports}"),
            None => place,
        };
        out.push_str(&format!(
            "{:<20} {:<15} {:<17} {:<20} {place}\n",
            e.network,
            e.ip.to_string(),
            e.mac.to_string(),
            e.name
        ));
    }
    Ok(out)
}

/// Published ports as `docker port` shows them, `0.0.0.0:8080->80/tcp`
/// comma-separated; `None` when there is none.
fn published_text(ports: &[crate::ports::PublishedPort]) -> Option<String> {
    (!ports.is_empty()).then(|| {
        ports
            .iter()
            .map(|p| p.mapping())
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// Says `line` on stderr after `ovl: `. A stderr nobody reads any more
/// (`ovl stats 2>&1 | head -1`, a full disk) loses the line; unlike
/// `eprintln!`, it never turns the command's outcome into a panic.
pub fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "ovl: {line}");
}

/// Says that no agent answered and the counters come from the pins.
fn say_read_from_pins(node: &str) {
    say(format_args!(
        "no agent runs for node {node}; counters read from its pinned maps (the data path still forwards)"
    ));
}

/// `ovl stats`: counters of this node's data path, per network. Asked of
/// the agent (which works from any mount namespace); with no agent
/// running, read from the pinned maps, which still forward and count, and
/// named from the store at `store_url` (opened only then).
pub async fn stats(
    store_url: &str,
    api_socket: &Path,
    node: &str,
    pin_root: &Path,
    network: Option<&str>,
    json: bool,
) -> Result<String> {
    let query = match network {
        Some(n) => format!("/v1/stats?network={}", url_escape(n)),
        None => "/v1/stats".to_owned(),
    };
    let rows: Vec<NetworkStats> = match api::Client::new(api_socket).get(&query).await {
        Ok(rows) => rows,
        Err(api::ClientError::NoAgent(_)) => {
            let store = Store::open(store_url).await?;
            let rows = pinned_stats(&store, node, pin_root, network).await?;
            say_read_from_pins(node);
            rows
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        return Ok(serde_json::to_string_pretty(&rows).expect("stats serialise"));
    }
    Ok(metrics::table(&rows))
}

async fn pinned_stats(
    store: &Store,
    node: &str,
    pin_root: &Path,
    network: Option<&str>,
) -> Result<Vec<NetworkStats>> {
    let state = store.load_in(Scope::Networks).await?;
    if let Some(name) = network {
        state.network(name)?;
    }
    let pin_dir = bpffs::node_dir(pin_root, node)?;
    let counters = datapath::read_counters(&pin_dir)?;
    // Every network, as the agent answers: one this node does not serve
    // has no counters, so zero.
    Ok(state
        .networks
        .values()
        .filter(|n| network.is_none_or(|want| want == n.name))
        .map(|n| {
            let c = counters.get(&n.vni.get()).copied().unwrap_or_default();
            NetworkStats::new(&n.name, n.vni.get(), &c)
        })
        .collect())
}

/// `ovl stats --underlay`: node-wide counters, from the agent or the pins.
pub async fn underlay_stats(
    api_socket: &Path,
    node: &str,
    pin_root: &Path,
    json: bool,
) -> Result<String> {
    let report: metrics::UnderlayStats =
        match api::Client::new(api_socket).get("/v1/stats/underlay").await {
            Ok(r) => r,
            Err(api::ClientError::NoAgent(_)) => {
                let pin_dir = bpffs::node_dir(pin_root, node)?;
                let counters = datapath::read_counters(&pin_dir)?;
                let global = datapath::read_global(&pin_dir)?;
                let orphan = counters
                    .get(&ovl_common::counters::UNATTRIBUTED_VNI)
                    .copied()
                    .unwrap_or_default();
                say_read_from_pins(node);
                metrics::UnderlayStats::new(&global, &orphan)
            }
            Err(e) => return Err(e.into()),
        };
    if json {
        return Ok(serde_json::to_string_pretty(&report).expect("stats serialise"));
    }
    Ok(report.to_string())
}

/// `ovl status`: the node agent's health in one screen.
pub async fn status(api_socket: &Path, node: &str, pin_root: &Path, json: bool) -> Result<String> {
    let h: api::Health = match api::Client::new(api_socket).get("/v1/health").await {
        Ok(h) => h,
        Err(api::ClientError::NoAgent(path)) => {
            let dir = bpffs::node_dir(pin_root, node)?;
            let links = datapath::LinkPins::of(&dir).list().unwrap_or_default();
            let pinned = if links.is_empty() {
                format!(
                    "no data path of node {node} is pinned under {}",
                    dir.display()
                )
            } else {
                format!(
                    "its data path ({} link(s) pinned under {}) keeps forwarding with the last state",
                    links.len(),
                    dir.display()
                )
            };
            bail!(
                "no ovl agent answers on {}; {pinned}. Start one with `ovl attach IFACE`",
                path.display()
            )
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        return Ok(serde_json::to_string_pretty(&h).expect("health serialises"));
    }
    let age = h
        .store
        .last_sync_age_seconds
        .map(|a| format!("{a:.1} s ago"))
        .unwrap_or_else(|| "never".into());
    let underlay = match &h.underlay_problem {
        None => format!("{} VTEP {}, decap {}", h.iface, h.vtep, h.mode),
        Some(why) => format!("{} DOWN: {why}", h.iface),
    };
    Ok(format!(
        "node:       {} (agent {} pid {}, up {} s)\n\
         underlay:   {underlay}\n\
         pins:       {}\n\
         store:      {} ({}, last sync {age}, revision {})\n\
         networks:   {}\n\
         endpoints:  {} local, {} remote",
        h.node,
        h.version,
        h.pid,
        h.uptime_seconds,
        h.pin_dir.display(),
        h.store.url,
        if h.store.reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        },
        h.store.revision,
        h.networks,
        h.local_endpoints,
        h.remote_endpoints
    ))
}

/// Removes ovl's XDP decap program from `iface` (index `idx`) where an
/// older ovl attached it the netlink way, without a link to pin; any other
/// program there is left alone and named. The kernel releases a link
/// unpinned a moment ago with deferred work: until then the program is
/// still seen, and netlink refuses with EBUSY, so that is retried briefly.
async fn clear_legacy_xdp(iface: &str, idx: u32) -> Result<Vec<String>> {
    let handle = netlink::connect()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut done = Vec::new();
    'attachments: for attached in netlink::xdp_attachments(&handle, idx).await? {
        let Some(prog) = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == attached.prog_id)
        else {
            continue; // unloaded since: gone with its link
        };
        let name = prog.name_as_str().unwrap_or_default().to_owned();
        if name != ovl_common::maps::programs::XDP_DECAP {
            done.push(format!(
                "left XDP program {name:?} (id {}) on {iface}: not ovl's",
                attached.prog_id
            ));
            continue;
        }
        let fd = prog
            .fd()
            .with_context(|| format!("open XDP program {} on {iface}", attached.prog_id))?;
        loop {
            // Gone with its link meanwhile (or replaced: not ours then).
            let still = netlink::xdp_attachments(&handle, idx).await?;
            if !still.contains(&attached) {
                continue 'attachments;
            }
            match netlink::clear_xdp(&handle, idx, attached, fd.as_fd()).await {
                Ok(()) => {
                    done.push(format!("removed XDP program from {iface}"));
                    continue 'attachments;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    log::debug!("XDP on {iface} still held ({e:#}); retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.context(format!("remove the XDP program from {iface}"))),
            }
        }
    }
    Ok(done)
}

/// Percent-encodes a query value (network names are [A-Za-z0-9_.-]; the
/// rest is escaped defensively).
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `ovl detach`: removes this node's data path — every pinned link (which
/// unhooks the programs), the maps and their pins — any ovl XDP program
/// left on `iface` the legacy netlink way, and the host's external egress
/// setup. Refused while an agent runs, and when the node's data path is
/// hooked to another interface than `iface` (nothing is changed then).
pub async fn detach(iface: &str, node: &str, pin_root: &Path, api_socket: &Path) -> Result<String> {
    let mut done = Vec::new();
    let dir = bpffs::node_dir(pin_root, node)?;
    let _lock = if dir.exists() {
        Some(bpffs::NodeLock::acquire(&dir).map_err(|e| match e {
            bpffs::LockError::Held { holder, .. } => anyhow::anyhow!(
                "an ovl agent{holder} runs for node {node}; stop it (SIGTERM) before `ovl detach`"
            ),
            other => other.into(),
        })?)
    } else {
        None
    };
    let given = netlink::ifindex(iface);
    let links = datapath::LinkPins::of(&dir);
    let hooked = links.list()?.into_iter().find_map(|pin| match pin {
        datapath::LinkPin::Decap { ifindex, .. } => Some(ifindex),
        datapath::LinkPin::Egress { .. } => None,
    });
    match (hooked, given) {
        (Some(h), Some(g)) if h == g => {}
        // The hooked interface is gone: its pins are all that is left.
        (Some(h), _) if netlink::ifname(h).is_none() => {}
        (Some(h), _) => bail!(
            "node {node}'s data path is hooked to {}, not {iface}; nothing was changed. Run \
             `ovl detach {0}` to remove it",
            netlink::ifname(h).unwrap_or_default()
        ),
        (None, None) if !dir.exists() => bail!(
            "there is no interface {iface} here (list them with `ip link`) and node {node} has \
             no data path pinned under {}; nothing was changed",
            dir.display()
        ),
        (None, _) => {}
    }
    if dir.exists() {
        let links = links.remove_all_and_wait(Duration::from_secs(5))?;
        bpffs::remove_node_dir(&dir)?;
        done.push(format!(
            "removed {links} link(s) and the pins under {}",
            dir.display()
        ));
    }
    match given {
        Some(idx) => done.extend(clear_legacy_xdp(iface, idx).await?),
        None => done.push(format!("interface {iface} does not exist here")),
    }
    done.extend(egress_nat::remove().context("remove the host's external egress setup")?);
    if api_socket.exists() {
        let _ = std::fs::remove_file(api_socket);
    }
    if done.is_empty() {
        done.push(format!("nothing of node {node} was left on {iface}"));
    }
    Ok(done.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NetworkSpec, State};

    #[test]
    fn inspect_shows_each_kept_vni_once_with_the_subnets_it_named() {
        let mut s = State::default();
        for (name, subnet) in [("a", "198.18.1.0/24"), ("b", "198.18.2.0/24")] {
            s.create_network(NetworkSpec::new(name, subnet.parse().unwrap()))
                .unwrap();
        }
        s.merge_network("a", "b").unwrap();
        let n = s.renumber_network("a", 5000).unwrap();
        let views = serde_json::to_value(kept_vni_views(&n.kept_vnis)).unwrap();
        assert_eq!(
            views,
            serde_json::json!([
                {"vni": 4097, "subnets": ["198.18.2.0/24"]},
                {"vni": 4096, "subnets": ["198.18.1.0/24", "198.18.2.0/24"]},
            ])
        );
    }
}
