//! Bringing the kernel in line with the store: maps and egress hooks from
//! the desired state, and the store-side duties of a node (putting back
//! its endpoints that peers freed, freeing the endpoints of dead nodes).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use anyhow::Result;
use ovl_common::wire::ENCAP_OVERHEAD;

use super::{
    host_ends::HostEnds,
    journal::Memory,
    view::{NetworkView, View},
};
use crate::{
    datapath::{self, Datapath, SyncCount},
    desired::{Desired, Plans},
    egress_nat,
    model::{Endpoint, Location, State},
    netlink::{self, Underlay},
    store::{Dirty, Store},
};

/// Brings maps, egress hooks and the host ends' offloads in line with
/// `state`, and publishes the result in `view`. Only the networks `dirty`
/// covers are planned again (`plans` keeps the others'), and only their
/// endpoint entries compared with the map. `ifindex_of` resolves a host
/// interface name; `known_names` are the networks' names by VNI as the
/// journal last recorded them (a VNI now another network's gets its
/// counters anew).
#[allow(clippy::too_many_arguments)]
pub fn reconcile(
    dp: &mut Datapath,
    state: &State,
    plans: &mut Plans,
    dirty: &Dirty,
    node: &str,
    underlay: &Underlay,
    view: &View,
    host_ends: &mut HostEnds,
    ifindex_of: &dyn Fn(&str) -> Option<u32>,
    known_names: &BTreeMap<u32, String>,
) -> Result<()> {
    let touched = plans.update(state, node, underlay.addr, ifindex_of, dirty);
    if dirty.is_empty() {
        view.update(|live| live.revision = state.revision);
        return Ok(());
    }
    let mut want = Desired {
        vxlan_port: state.cluster.vxlan_port,
        ..Desired::default()
    };
    plans.merge_small_into(&mut want);
    for (vni, net) in want.networks.iter().filter(|(v, _)| touched.contains(v)) {
        if net.mtu + ENCAP_OVERHEAD > underlay.mtu {
            log::warn!(
                "network with VNI {vni} has MTU {}; with VXLAN's {ENCAP_OVERHEAD} bytes that exceeds {}'s MTU {} — large packets will be dropped as too_big",
                net.mtu,
                underlay.name,
                underlay.mtu
            );
        }
    }
    // Counters and networks first, endpoints last: a packet never finds an
    // endpoint whose network has no counters.
    let names: BTreeMap<u32, String> = state
        .networks
        .values()
        .filter(|n| want.networks.contains_key(&n.vni.get()))
        .map(|n| (n.vni.get(), n.name.clone()))
        .collect();
    let slots = dp.sync_stats(&names, known_names)?;
    view.dns.keep_served(&names);
    want.set_stats_slots(&slots);
    dp.sync_networks(&want.networks)?;
    dp.sync_vteps(&want.vteps)?;
    dp.sync_subnets(&want.subnets)?;
    dp.sync_ifaces(&want.ifaces)?;
    if dp.set_vxlan_port(want.vxlan_port)? {
        log::info!("VXLAN now on UDP port {}", want.vxlan_port);
    }
    let mut changed = SyncCount::default();
    let total: usize = plans.iter().map(|(_, p)| p.endpoints.len()).sum();
    // A whole apply also removes what no network of this node holds (an
    // earlier agent's entries); otherwise only the touched networks'
    // entries are compared.
    let vnis: BTreeSet<u32> = match dirty {
        Dirty::All => {
            let served: BTreeSet<u32> = plans.iter().map(|(_, p)| p.vni).collect();
            changed += dp.keep_network_endpoints(&served)?;
            served
        }
        Dirty::Some { .. } => touched,
    };
    for vni in vnis {
        let entries = plans
            .of_vni(vni)
            .into_iter()
            .flat_map(|p| p.endpoints.iter().map(|(ip, e)| (*ip, *e)));
        changed += dp.sync_network_endpoints(vni, entries)?;
    }
    if changed.written + changed.removed > 0 {
        log::info!(
            "endpoints: {} written, {} removed ({total} total)",
            changed.written,
            changed.removed,
        );
    }

    let hooked = dp.egress_ifindexes()?;
    for gone in hooked.iter().filter(|i| !want.ifaces.contains_key(i)) {
        dp.unhook_egress(*gone)?;
        log::info!("container egress unhooked from ifindex {gone}");
    }
    // One veth that cannot be hooked (gone since its lookup) leaves the
    // others hooked; the first failure is returned at the end, so the
    // caller applies whole again.
    let mut unhooked: Option<anyhow::Error> = None;
    for (ifindex, name) in &want.iface_names {
        if hooked.contains(ifindex) {
            continue;
        }
        match dp.hook_egress(name, *ifindex) {
            Ok(()) => log::info!("container egress hooked on {name}"),
            Err(e) if unhooked.is_none() => unhooked = Some(e),
            Err(e) => log::warn!("{e:#}; retried at the next apply"),
        }
    }
    host_ends.ensure_tso_off(&want.iface_names);
    for name in &want.missing_links {
        log::debug!("local endpoint interface {name} does not exist yet");
    }

    publish(state, plans, view);
    // Last: the host's side of external egress runs nft and ip, slower than
    // the map writes the containers' traffic waits for.
    egress_nat::ensure_logged(&underlay.name, &want.egress, matches!(dirty, Dirty::All));
    unhooked.map_or(Ok(()), Err)
}

/// Publishes what the maps now hold: network endpoint counts and which
/// local endpoints forward.
fn publish(state: &State, plans: &Plans, view: &View) {
    let mut networks: BTreeMap<u32, NetworkView> = state
        .networks
        .values()
        .map(|n| {
            let vni = n.vni.get();
            (
                vni,
                NetworkView {
                    name: n.name.clone(),
                    vni,
                    ..NetworkView::default()
                },
            )
        })
        .collect();
    let mut ready = BTreeSet::new();
    for (_, plan) in plans.iter() {
        let local: Vec<[u8; 4]> = plan.local_endpoints().collect();
        if let Some(net) = networks.get_mut(&plan.vni) {
            net.local_endpoints = local.len() as u64;
            net.remote_endpoints = (plan.endpoints.len() - local.len()) as u64;
        }
        ready.extend(local.into_iter().map(|ip| (plan.vni, Ipv4Addr::from(ip))));
    }
    view.update(|live| {
        live.networks = networks;
        live.revision = state.revision;
    });
    view.set_ready(ready);
}

/// Publishes the networks the pinned maps serve, before any state came
/// from the store (an agent started while the store is unreachable): their
/// names from the journal (`vni-N` for one it does not know), their
/// endpoint counts from the endpoint map. Returns how many.
pub fn publish_pinned(pin_dir: &Path, memory: &Memory, view: &View) -> Result<usize> {
    let mut networks: BTreeMap<u32, NetworkView> = datapath::read_counters(pin_dir)?
        .into_keys()
        .filter(|vni| *vni != ovl_common::counters::UNATTRIBUTED_VNI)
        .map(|vni| {
            let name = memory
                .networks
                .get(&vni)
                .cloned()
                .unwrap_or_else(|| format!("vni-{vni}"));
            (
                vni,
                NetworkView {
                    name,
                    vni,
                    ..NetworkView::default()
                },
            )
        })
        .collect();
    for (key, ep) in datapath::read_endpoints(pin_dir)? {
        if let Some(n) = networks.get_mut(&key.vni) {
            if ep.is_local() {
                n.local_endpoints += 1;
            } else {
                n.remote_endpoints += 1;
            }
        }
    }
    let count = networks.len();
    view.update(|live| live.networks = networks);
    Ok(count)
}

/// Adds `node`'s endpoints in `state` to `memory` and forgets those whose
/// veth is gone.
pub fn remember_endpoints(memory: &mut Memory, state: &State, node: &str) {
    let current: BTreeMap<String, &Endpoint> = state
        .endpoints
        .iter()
        .filter(|e| e.node() == Some(node))
        .map(|e| (Memory::key(&e.network, e.ip), e))
        .collect();
    // An endpoint gone from the store is still ours while its veth exists
    // (one just registered may not have its veth yet, so those in the
    // store are kept regardless).
    memory
        .endpoints
        .retain(|k, e| current.contains_key(k) || host_link_exists(e));
    // Copied only when new or changed: most applies change none of ours.
    for (key, e) in current {
        if memory.endpoints.get(&key) != Some(e) {
            memory.endpoints.insert(key, e.clone());
        }
    }
}

/// Records the networks' names by VNI.
pub fn remember_networks(memory: &mut Memory, state: &State) {
    memory.networks = state
        .networks
        .values()
        .map(|n| (n.vni.get(), n.name.clone()))
        .collect();
}

fn host_link_exists(e: &Endpoint) -> bool {
    match &e.location {
        Location::Container { host_ifname, .. } => netlink::ifindex(host_ifname).is_some(),
        Location::Static { .. } | Location::Reserved { .. } => false,
    }
}

/// Puts back this node's endpoints that the store no longer has (peers
/// freed them while the node was cut off or its agent down), where the
/// container's veth still exists and the address is still free. The store
/// decides in batched transactions against what it holds now, and records
/// addresses (and MACs given with `--mac`) taken meanwhile as conflicts
/// under the node (`ovl node ls`);
/// they are logged loudly and counted. An endpoint whose name another
/// took meanwhile is put back under a fallback name, which is logged
/// once. Returns how many conflicts there are.
pub async fn restore_endpoints(store: &Store, node: &str, memory: &Memory) -> Option<usize> {
    let candidates: Vec<Endpoint> = memory
        .endpoints
        .values()
        .filter(|e| host_link_exists(e))
        .cloned()
        .collect();
    if candidates.is_empty() {
        return Some(0);
    }
    match store.restore_endpoints(node, &candidates).await {
        Ok(out) => {
            if !out.restored.is_empty() {
                log::info!(
                    "restored {} local endpoint(s) the store had lost",
                    out.restored.len()
                );
            }
            for r in &out.renamed {
                log::warn!("name conflict: {r}");
            }
            for c in &out.conflicts {
                log::error!(
                    "{} conflict: {c}; this node's container keeps its interface but cannot be reached until it is reconnected (the newer owner is left alone)",
                    c.what()
                );
            }
            for (e, port) in &out.unpublished {
                log::warn!(
                    "endpoint {} ({}) of {} is back without publishing {port}: another container of this node publishes it now; reconnect it to publish",
                    e.ip,
                    e.name,
                    e.network
                );
            }
            for e in &out.networks_gone {
                log::warn!(
                    "endpoint {} ({}) not restored: network {} was removed meanwhile",
                    e.ip,
                    e.name,
                    e.network
                );
            }
            Some(out.conflicts.len())
        }
        Err(e) => {
            log::warn!("restoring local endpoints failed: {e}");
            None
        }
    }
}

/// Frees the endpoints of every node the store lists as dead (other than
/// `me`): nodes that died while no agent was watching.
pub async fn free_nodes_found_dead(store: &Store, me: &str, state: &State) {
    for node in state
        .nodes
        .keys()
        .filter(|n| *n != me && !state.is_alive(n))
    {
        if !state.endpoints.iter().any(|e| e.node() == Some(node)) {
            continue;
        }
        match store.forget_dead_node(node).await {
            Ok(n) => log::info!("node {node} was found dead; freed its {n} endpoint(s)"),
            Err(e) => {
                log::warn!("node {node} was found dead, but freeing its endpoints failed: {e}")
            }
        }
    }
}

/// Nodes that just died (alive in `was`, not in `now`'s liveness) still
/// own endpoints in the store; free them (every agent may try: the store
/// only deletes while the node stays dead).
pub async fn free_dead_nodes(store: &Store, me: &str, was: Option<&BTreeSet<String>>, now: &State) {
    let (Some(was), Some(now)) = (was, &now.alive) else {
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
