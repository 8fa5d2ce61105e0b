//! Every map of ovl's kernel programs, defined in one place. Names and
//! layouts come from ovl-common; all maps are pinned by name so the agent
//! and `ovl stats` find them under the node's pin directory.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
};
use ovl_common::{
    Endpoint, NetworkInfo, NodeConfig, UnderlayCounters, VniAddr, VniCounters, maps::capacity,
};

/// This node's underlay identity (one entry).
#[map(name = "OVL_CONFIG")]
pub static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// VNI → network: the networks this node serves.
#[map(name = "OVL_NETWORKS")]
pub static NETWORKS: HashMap<u32, NetworkInfo> = HashMap::pinned(capacity::NETWORKS, 0);

/// (VNI, IPv4) → endpoint.
#[map(name = "OVL_ENDPOINTS")]
pub static ENDPOINTS: HashMap<VniAddr, Endpoint> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// (VNI, remote VTEP address) pairs allowed to send VXLAN for that VNI.
#[map(name = "OVL_VTEPS")]
pub static VTEPS: HashMap<VniAddr, u32> = HashMap::pinned(capacity::VTEPS, 0);

/// Host-side ifindex of a local container veth → its VNI.
#[map(name = "OVL_IFACES")]
pub static IFACES: HashMap<u32, u32> = HashMap::pinned(capacity::IFACES, 0);

/// Per-VNI, per-CPU counters. Entries are created by the agent.
#[map(name = "OVL_STATS")]
pub static STATS: PerCpuHashMap<u32, VniCounters> =
    PerCpuHashMap::pinned(capacity::NETWORKS + 1, 0);

/// Node-wide per-CPU counters of the underlay hook (one entry).
#[map(name = "OVL_GLOBAL")]
pub static GLOBAL: PerCpuArray<UnderlayCounters> = PerCpuArray::pinned(1, 0);

/// ABI version of the build that filled these maps (read by the agent only).
#[map(name = "OVL_ABI")]
pub static ABI: Array<u32> = Array::pinned(1, 0);

/// This node's configuration; `None` until the agent has written it.
#[inline(always)]
pub fn node_config() -> Option<&'static NodeConfig> {
    let cfg = CONFIG.get(0)?;
    // The upgrade-test build differs by this check, never true in practice.
    if cfg!(feature = "upgrade-test") && cfg.underlay_mtu == 0 {
        return None;
    }
    if cfg.vtep == [0; 4] { None } else { Some(cfg) }
}

/// The endpoint `addr` of network `vni`.
#[inline(always)]
pub fn endpoint(vni: u32, addr: [u8; 4]) -> Option<Endpoint> {
    // SAFETY: the value is copied out before any other map operation.
    unsafe { ENDPOINTS.get(VniAddr { vni, addr }).copied() }
}

/// Network `vni`, when this node serves it.
#[inline(always)]
pub fn network(vni: u32) -> Option<NetworkInfo> {
    // SAFETY: the value is copied out immediately.
    unsafe { NETWORKS.get(vni).copied() }
}

/// True when `vtep` may send VXLAN for `vni`.
#[inline(always)]
pub fn vtep_allowed(vni: u32, vtep: [u8; 4]) -> bool {
    VTEPS.get_ptr(VniAddr { vni, addr: vtep }).is_some()
}

/// The VNI of the container veth whose host end is `ifindex`.
#[inline(always)]
pub fn iface_vni(ifindex: u32) -> Option<u32> {
    // SAFETY: the value is copied out immediately.
    unsafe { IFACES.get(ifindex).copied() }
}
