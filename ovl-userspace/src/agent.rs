//! The node agent behind `ovl attach`: loads and attaches the programs,
//! turns the store's state into map entries (store → desired → maps) and
//! keeps them in step until told to stop, then removes what it made.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};
use ovl_common::{NodeConfig, maps::names, wire::ENCAP_OVERHEAD};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    bpffs,
    datapath::{Datapath, DecapMode},
    desired::desired,
    model::{Location, State},
    netlink,
    store::Store,
};

/// How often it re-checks local interfaces even without store changes
/// (a container veth may be deleted or re-created under it).
const RESYNC: Duration = Duration::from_secs(2);
/// How soon it looks again for a local endpoint's veth that did not exist
/// yet: `ovl connect` registers the endpoint a moment before the link.
const LINK_RETRY: Duration = Duration::from_millis(50);

/// What `ovl attach` was asked to do.
pub struct AgentOptions {
    pub iface: String,
    pub mode: DecapMode,
    pub node: String,
    pub pin_root: PathBuf,
    /// Lease TTL of the node's liveness (stores that track it).
    pub lease_ttl: Duration,
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(opts: AgentOptions, store: &Store) -> Result<()> {
    let handle = netlink::connect()?;
    let underlay = netlink::underlay(&handle, &opts.iface).await?;
    let driver = netlink::driver(&opts.iface).unwrap_or_default();
    let pin_dir = bpffs::node_dir(&opts.pin_root, &opts.node);
    bpffs::prepare(&pin_dir)?;
    let restarting = std::fs::read_dir(&pin_dir).is_ok_and(|mut d| d.next().is_some());

    let mut dp = match Datapath::load(&pin_dir) {
        Ok(dp) => dp,
        Err(e) => {
            // Pins made by this failed load would look like a running agent.
            if !restarting {
                let _ = bpffs::remove_node_dir(&pin_dir);
            }
            return Err(e);
        }
    };
    // From here on, leave nothing behind on any exit path.
    let result = serve(&opts, store, &mut dp, &underlay, &driver).await;
    if let Err(e) = dp.detach_decap() {
        log::warn!("detach decap program: {e:#}");
    }
    for ifindex in dp.egress_ifindexes().collect::<Vec<_>>() {
        dp.detach_egress(ifindex);
    }
    drop(dp);
    if let Err(e) = bpffs::remove_node_dir(&pin_dir) {
        log::warn!("remove pins: {e:#}");
    }
    log::info!(
        "detached from {}; pins under {} removed",
        opts.iface,
        pin_dir.display()
    );
    result
}

async fn serve(
    opts: &AgentOptions,
    store: &Store,
    dp: &mut Datapath,
    underlay: &netlink::Underlay,
    driver: &str,
) -> Result<()> {
    // SAFETY: the logger owns the ring's descriptor and lives as long as
    // the AsyncFd that wraps it (the contract register_with_interest asks).
    let mut logs =
        unsafe { AsyncFd::register_with_interest(dp.logger()?, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("watch the kernel log ring")?;
    dp.set_config(NodeConfig {
        vtep: underlay.addr.octets(),
        underlay_ifindex: underlay.ifindex,
        underlay_mtu: underlay.mtu,
        _pad: 0,
    })?;
    let registration = store
        .register_node(&opts.node, underlay.addr, opts.lease_ttl)
        .await
        .with_context(|| format!("register node {} in {}", opts.node, store.describe()))?;
    let mut reregistrations = registration.reregistrations();
    let mut updates = store.subscribe().await?;
    let mut state = updates.borrow_and_update().clone();
    // Every endpoint of this node seen so far whose veth still exists: what
    // to put back if peers freed them while this node was cut off from the
    // store (`ovl disconnect` deletes the veth, so it drops out of here).
    let mut mine = BTreeMap::new();
    remember_local_endpoints(&mut mine, &state, &opts.node);
    let mut links_missing = reconcile(dp, &state, opts, underlay)?;

    let mode = dp.attach_decap(&opts.iface, opts.mode, driver)?;
    log::info!(
        "node {} attached to {} ({driver}, VTEP {}, MTU {}) in {mode} mode; store {}",
        opts.node,
        opts.iface,
        underlay.addr,
        underlay.mtu,
        store.describe()
    );

    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut resync = tokio::time::interval(RESYNC);
    let mut link_retry = tokio::time::interval(LINK_RETRY);
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT: detaching"); return Ok(()); }
            _ = sigterm.recv() => { log::info!("SIGTERM: detaching"); return Ok(()); }
            guard = logs.readable_mut() => {
                let mut guard = guard.context("kernel log ring")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            changed = updates.changed() => {
                changed.context("store follower stopped")?;
                let fresh = updates.borrow_and_update().clone();
                free_dead_nodes(store, &opts.node, &state, &fresh).await;
                state = fresh;
                remember_local_endpoints(&mut mine, &state, &opts.node);
                links_missing = reconcile_logged(dp, &state, opts, underlay);
            }
            () = next_reregistration(&mut reregistrations) => {
                remember_local_endpoints(&mut mine, &state, &opts.node);
                restore_endpoints(store, mine.values()).await;
            }
            _ = link_retry.tick(), if links_missing => {
                links_missing = reconcile_logged(dp, &state, opts, underlay);
            }
            _ = resync.tick() => {
                links_missing = reconcile_logged(dp, &state, opts, underlay);
            }
        }
    }
}

/// Adds `node`'s endpoints in `state` to `mine` and forgets those whose
/// veth is gone, keyed by (network, address).
fn remember_local_endpoints(
    mine: &mut BTreeMap<(String, Ipv4Addr), crate::model::Endpoint>,
    state: &State,
    node: &str,
) {
    let current: BTreeMap<_, _> = state
        .endpoints
        .iter()
        .filter(|e| e.node() == Some(node))
        .map(|e| ((e.network.clone(), e.ip), e.clone()))
        .collect();
    // An endpoint gone from the store is still ours while its veth exists
    // (one just registered may not have its veth yet, so those in the
    // store are kept regardless).
    mine.retain(|k, e| current.contains_key(k) || host_link_exists(e));
    mine.extend(current);
}

fn host_link_exists(e: &crate::model::Endpoint) -> bool {
    match &e.location {
        Location::Container { host_ifname, .. } => netlink::ifindex(host_ifname).is_some(),
        Location::Static { .. } => false,
    }
}

/// Resolves when the node registered again after losing its liveness.
async fn next_reregistration(rx: &mut tokio::sync::watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        // Liveness is not tracked: nothing will ever change.
        std::future::pending::<()>().await;
    }
}

/// Puts back this node's endpoints that peers freed while it was cut off,
/// where the container's veth still exists and the address is still free.
async fn restore_endpoints(store: &Store, mine: impl Iterator<Item = &crate::model::Endpoint>) {
    let present: Vec<_> = mine.filter(|e| host_link_exists(e)).cloned().collect();
    let restored = store
        .update_with(|s| Ok(present.iter().filter(|e| s.restore_endpoint(e)).count()))
        .await;
    match restored {
        Ok(n) => log::info!(
            "registered again; restored {n} of {} local endpoint(s)",
            present.len()
        ),
        Err(e) => log::warn!("registered again, but restoring local endpoints failed: {e}"),
    }
}

fn reconcile_logged(
    dp: &mut Datapath,
    state: &State,
    opts: &AgentOptions,
    underlay: &netlink::Underlay,
) -> bool {
    reconcile(dp, state, opts, underlay).unwrap_or_else(|e| {
        log::error!("reconcile: {e:#}");
        false
    })
}

/// Nodes that just died still own endpoints in the store; free them (every
/// agent may try: the store only deletes while the node stays dead).
async fn free_dead_nodes(store: &Store, me: &str, before: &State, after: &State) {
    let (Some(was), Some(now)) = (&before.alive, &after.alive) else {
        return;
    };
    // Our own liveness lapsing is the liveness thread's to repair.
    for node in was.difference(now).filter(|n| *n != me) {
        match store.forget_dead_node(node).await {
            Ok(0) => log::info!("node {node} is gone"),
            Ok(n) => log::info!("node {node} is gone; freed its {n} endpoint(s)"),
            Err(e) => log::warn!("node {node} is gone, but freeing its endpoints failed: {e}"),
        }
    }
}

/// Brings maps and egress hooks in line with `state`. Returns whether a
/// local endpoint's veth does not exist yet (`ovl connect` registers the
/// endpoint before it creates the link), so the caller retries soon.
fn reconcile(
    dp: &mut Datapath,
    state: &State,
    opts: &AgentOptions,
    underlay: &netlink::Underlay,
) -> Result<bool> {
    let want = desired(state, &opts.node, underlay.addr, &netlink::ifindex);
    for (vni, net) in &want.networks {
        let mtu = net.mtu;
        if mtu + ENCAP_OVERHEAD > underlay.mtu {
            log::warn!(
                "network with VNI {vni} has MTU {mtu}; with VXLAN's {ENCAP_OVERHEAD} bytes that exceeds {}'s MTU {} — large packets will be dropped as too_big",
                underlay.name,
                underlay.mtu
            );
        }
    }
    // Counters and networks first, endpoints last: a packet never finds an
    // endpoint whose network has no counters.
    dp.sync_stats(want.networks.keys().copied())?;
    dp.sync_networks(&want.networks)?;
    dp.sync_vteps(&want.vteps)?;
    dp.sync_u32_map(names::IFACES, &want.ifaces)?;
    let changed = dp.sync_endpoints(&want.endpoints)?;
    if changed.written + changed.removed > 0 {
        log::info!(
            "endpoints: {} written, {} removed ({} total)",
            changed.written,
            changed.removed,
            want.endpoints.len()
        );
    }

    let attached: BTreeSet<u32> = dp.egress_ifindexes().collect();
    for gone in attached.iter().filter(|i| !want.ifaces.contains_key(i)) {
        dp.detach_egress(*gone);
    }
    for (ifindex, name) in &want.iface_names {
        if !attached.contains(ifindex) {
            dp.attach_egress(name, *ifindex)?;
            log::info!("container egress hooked on {name}");
        }
    }
    for name in &want.missing_links {
        log::debug!("local endpoint interface {name} does not exist yet");
    }
    Ok(!want.missing_links.is_empty())
}
