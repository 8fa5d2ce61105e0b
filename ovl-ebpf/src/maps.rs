//! Every map of ovl's kernel programs, defined in one place. Names and
//! layouts come from ovl-common; all maps are pinned by name so the agent
//! and `ovl stats` find them under the node's pin directory.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, DevMap, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
};
use ovl_common::{
    Endpoint, Iface, NetworkInfo, NextHop, NodeConfig, PathMtu, SubnetInfo, UnderlayCounters,
    VniAddr, VniCounters, VtepInfo,
    maps::{CRYPTO_DEVICE, capacity, flow_cache, subnet_key_bits},
    wire::{MIN_PATH_MTU, NEXT_HOP_TTL_NS, PATH_MTU_EXPIRY_NS},
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

/// (VNI, remote VTEP address) pairs allowed to send VXLAN for that VNI,
/// with their network.
#[map(name = "OVL_VTEPS")]
pub static VTEPS: HashMap<VniAddr, VtepInfo> = HashMap::pinned(capacity::VTEPS, 0);

/// Host-side ifindex of a local container veth → its network, address,
/// MAC and gateway. Written only by the agent: entries are allocated as it
/// adds them instead of all up front.
#[map(name = "OVL_IFACES")]
pub static IFACES: HashMap<u32, Iface> =
    HashMap::pinned(capacity::IFACES, bindings::BPF_F_NO_PREALLOC);

/// (VNI, subnet) → the subnet's gateway; longest-prefix matched.
#[map(name = "OVL_SUBNETS")]
pub static SUBNETS: LpmTrie<VniAddr, SubnetInfo> = LpmTrie::pinned(capacity::SUBNETS, 0);

/// Remote VTEP → the path MTU the underlay reported for it.
#[map(name = "OVL_PATH_MTU")]
pub static PATH_MTU: LruHashMap<[u8; 4], PathMtu> = LruHashMap::pinned(capacity::PATH_MTU, 0);

/// Remote VTEP → how packets to it leave, as the FIB last said.
#[map(name = "OVL_NEXT_HOPS")]
pub static NEXT_HOPS: LruHashMap<[u8; 4], NextHop> = LruHashMap::pinned(capacity::NEXT_HOPS, 0);

/// Per-network, per-CPU counters, in the slot the agent gave the network.
/// An array, not a hash by VNI: the slot comes with the entry a program
/// already read, and an array lookup costs no hashing.
#[map(name = "OVL_STATS")]
pub static STATS: PerCpuArray<VniCounters> = PerCpuArray::pinned(capacity::STATS, 0);

/// Node-wide per-CPU counters of the underlay hook (one entry).
#[map(name = "OVL_GLOBAL")]
pub static GLOBAL: PerCpuArray<UnderlayCounters> = PerCpuArray::pinned(1, 0);

/// Per CPU, what TC decap last handed to the host end of a container veth
/// (`decap::through_host_end`). The programs' own scratch: never pinned,
/// never read by the agent, empty after every load.
#[map(name = "OVL_HANDOFF")]
pub static HANDOFF: PerCpuArray<HostEndHandoff> = PerCpuArray::with_max_entries(1, 0);

/// The value of [`HANDOFF`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HostEndHandoff {
    /// Non-zero when full-size segments went to the host end since
    /// `latest_ns` was last brought up to date.
    pub bulk_since: u64,
    /// When a frame last went to the host end, as far as is known
    /// (`bpf_ktime_get_ns`): the last frame other than a full-size segment
    /// sent there, which also stands for the full-size ones before it.
    pub latest_ns: u64,
}

/// The epoch of the maps the flow caches copy from (see
/// `ovl_common::maps::names::EPOCH`): written by the agent only.
#[map(name = "OVL_EPOCH")]
pub static EPOCH: Array<u64> = Array::pinned(1, 0);

/// Per CPU, the verdicts of recent decapsulated flows
/// (`decap::cached_delivery`), in [`FLOW_SLOTS`] slots indexed by a hash
/// of the flow (`ovl_common::maps::flow_cache`). The programs' own
/// scratch, like [`HANDOFF`].
#[map(name = "OVL_DECAP_FLOWS")]
pub static DECAP_FLOWS: PerCpuArray<DecapFlow> = PerCpuArray::with_max_entries(FLOW_SLOTS, 0);

/// Per CPU, what container egress looked up for recent flows
/// (`egress::Flow`), slotted like [`DECAP_FLOWS`]; scratch too.
#[map(name = "OVL_EGRESS_FLOWS")]
pub static EGRESS_FLOWS: PerCpuArray<EgressFlow> = PerCpuArray::with_max_entries(FLOW_SLOTS, 0);

/// Slots of each flow cache per CPU (see `ovl_common::maps::flow_cache`).
pub const FLOW_SLOTS: u32 = flow_cache::SLOTS;

/// A decapsulation verdict: VXLAN of network `vni` from `src_vtep` for
/// `dst_addr` goes to the local endpoint behind `ifindex`, as the maps said
/// in `epoch`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DecapFlow {
    /// The epoch the maps were in when they were read; 0: an empty slot.
    pub epoch: u64,
    pub vni: u32,
    pub src_vtep: [u8; 4],
    pub dst_addr: [u8; 4],
    /// The endpoint's host-end ifindex and MAC.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The network's MTU, `network_flags` and counter slot.
    pub mtu: u32,
    pub network_flags: u32,
    pub stats_slot: u32,
}

/// What container egress looks up for frames from the container veth
/// whose host end is `ifindex` to `dst_addr`: the interface, the endpoint
/// and (for a remote one) the next hop to its VTEP, as the maps said in
/// `epoch`. Lookups only: every check on the frame itself (sources, sizes,
/// TTL) is made on every frame.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EgressFlow {
    /// The epoch the maps were in when they were read; 0: an empty slot.
    pub epoch: u64,
    pub ifindex: u32,
    pub dst_addr: [u8; 4],
    /// `OVL_IFACES`' entry for `ifindex`.
    pub iface: Iface,
    /// `OVL_ENDPOINTS`' entry for (`iface.vni`, `dst_addr`).
    pub dst: Endpoint,
    pub _pad: u32,
    /// `OVL_NEXT_HOPS`' entry for `dst.vtep` as a frame of the flow last
    /// found it (fresh then) or learned it; `learned_ns` 0 when none yet.
    /// It expires like the entry it copies.
    pub hop: NextHop,
}

/// ABI version of the build that filled these maps (read by the agent only).
#[map(name = "OVL_ABI")]
pub static ABI: Array<u32> = Array::pinned(1, 0);

/// The agent's crypto device (one entry). The kernel deletes the entry
/// when the device is unregistered, so an agent that died takes its
/// encrypted path with it instead of leaving a hole to send in clear.
#[map(name = "OVL_CRYPTO")]
pub static CRYPTO: DevMap = DevMap::pinned(1, 0);

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

/// `vtep` as a VTEP of network `vni`, with the network; `None` when it
/// may not send VXLAN for `vni`.
#[inline(always)]
pub fn vtep(vni: u32, vtep: [u8; 4]) -> Option<VtepInfo> {
    // SAFETY: the value is copied out immediately.
    unsafe { VTEPS.get(VniAddr { vni, addr: vtep }).copied() }
}

/// The `vtep_flags` of (`vni`, `vtep`); 0 when it is not a VTEP of it.
#[inline(always)]
pub fn vtep_flags(vni: u32, addr: [u8; 4]) -> u32 {
    vtep(vni, addr).map_or(0, |v| v.flags)
}

/// The container interface whose host end is `ifindex`.
#[inline(always)]
pub fn iface(ifindex: u32) -> Option<Iface> {
    // SAFETY: the value is copied out immediately.
    unsafe { IFACES.get(ifindex).copied() }
}

/// The subnet of network `vni` that holds `addr`, if any.
#[inline(always)]
pub fn subnet_of(vni: u32, addr: [u8; 4]) -> Option<SubnetInfo> {
    let key = Key::new(subnet_key_bits(32), VniAddr { vni, addr });
    SUBNETS.get(&key).copied()
}

/// The path MTU to `vtep` the underlay reported, while it holds.
#[inline(always)]
pub fn path_mtu(vtep: [u8; 4]) -> Option<u32> {
    // SAFETY: the value is copied out immediately.
    let reported = unsafe { PATH_MTU.get(vtep).copied() }?;
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    (now.wrapping_sub(reported.learned_ns) < PATH_MTU_EXPIRY_NS).then_some(reported.mtu)
}

/// Records a path MTU to `vtep` (raised to the floor ovl accepts).
#[inline(always)]
pub fn set_path_mtu(vtep: [u8; 4], mtu: u32) {
    let entry = PathMtu {
        mtu: if mtu < MIN_PATH_MTU {
            MIN_PATH_MTU
        } else {
            mtu
        },
        _pad: 0,
        // SAFETY: helper without arguments.
        learned_ns: unsafe { bpf_ktime_get_ns() },
    };
    // A full LRU map evicts the oldest entry; an error only loses a report.
    let _ = PATH_MTU.insert(vtep, entry, 0);
}

/// The cached next hop to `vtep`, while it is fresh; `now` is
/// `bpf_ktime_get_coarse_ns`.
#[inline(always)]
pub fn next_hop(vtep: [u8; 4], now: u64) -> Option<NextHop> {
    // SAFETY: the value is copied out immediately.
    let hop = unsafe { NEXT_HOPS.get(vtep).copied() }?;
    is_fresh(&hop, now).then_some(hop)
}

/// Whether a next hop (an entry of [`NEXT_HOPS`] or a copy of one) may
/// still be used at `now` (`bpf_ktime_get_coarse_ns`); one never learned
/// (`learned_ns` 0) may not.
#[inline(always)]
pub fn is_fresh(hop: &NextHop, now: u64) -> bool {
    hop.learned_ns != 0 && now.wrapping_sub(hop.learned_ns) < NEXT_HOP_TTL_NS
}

/// Caches the next hop to `vtep`.
#[inline(always)]
pub fn set_next_hop(vtep: [u8; 4], hop: &NextHop) {
    // A full LRU map evicts the oldest entry; an error only costs the next
    // packet another FIB lookup.
    let _ = NEXT_HOPS.insert(vtep, hop, 0);
}

/// The maps' epoch as last written, for checking a cached verdict: a plain
/// load (a verdict checked against an epoch an instant old is as good as
/// a lookup an instant old).
#[inline(always)]
pub fn epoch() -> u64 {
    EPOCH.get(0).copied().unwrap_or(0)
}

/// The maps' epoch, read so that no map lookup after it can see the maps
/// as they were before it: an atomic read-modify-write, a full barrier on
/// every architecture (on x86 loads are ordered anyway; on arm64 a lookup
/// could otherwise read an entry older than the epoch it is cached with,
/// and keep it until the next change). For filling a cache only, which
/// happens once per flow and epoch.
#[inline(always)]
pub fn epoch_fenced() -> u64 {
    match EPOCH.get_ptr_mut(0) {
        // SAFETY: the map value is 8-byte aligned, lives as long as the
        // program, and is only ever accessed atomically or by the agent's
        // whole-value writes.
        // (`AtomicU64::fetch_add` is not offered on BPF, whose target has
        // no compare-and-swap; LLVM emits this as BPF's atomic fetch-or
        // of 0.)
        Some(ptr) => unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(ptr, 0) },
        None => 0,
    }
}

/// Interface index of the crypto device, while there is one.
#[inline(always)]
pub fn crypto_device() -> Option<u32> {
    CRYPTO.get_ifindex(CRYPTO_DEVICE).filter(|i| *i != 0)
}
