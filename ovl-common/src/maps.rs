//! Map names, sizes and the key/value structs stored in them. The kernel
//! programs define the maps (ovl-ebpf `maps.rs`); the agent fills them.

/// Program names (kernel limit: 15 characters).
pub mod programs {
    /// XDP on the underlay NIC: VXLAN decapsulation.
    pub const XDP_DECAP: &str = "ovl_xdp_decap";
    /// TC ingress on the underlay NIC: VXLAN decapsulation (the XDP
    /// program's twin, for underlays where XDP costs offloads).
    pub const TC_DECAP: &str = "ovl_tc_decap";
    /// TC ingress on the host end of a container veth: container egress.
    pub const TC_EGRESS: &str = "ovl_tc_egress";
    /// Every program name.
    pub const ALL: [&str; 3] = [XDP_DECAP, TC_DECAP, TC_EGRESS];
}

/// Map names (kernel limit: 15 characters). They are also the file names
/// of the pins under the node's pin directory.
pub mod names {
    /// `Array<NodeConfig>` with one entry.
    pub const CONFIG: &str = "OVL_CONFIG";
    /// `HashMap<u32 VNI, NetworkInfo>`: the networks this node serves.
    pub const NETWORKS: &str = "OVL_NETWORKS";
    /// `HashMap<VniAddr, Endpoint>`: every endpoint of every network.
    pub const ENDPOINTS: &str = "OVL_ENDPOINTS";
    /// `HashMap<VniAddr, VtepInfo>`: (VNI, remote VTEP) pairs allowed to
    /// send, with [`vtep_flags`](super::vtep_flags) and a copy of the
    /// network's entry.
    pub const VTEPS: &str = "OVL_VTEPS";
    /// `HashMap<u32 ifindex, Iface>`: host ends of local container veths.
    pub const IFACES: &str = "OVL_IFACES";
    /// `LpmTrie<VniAddr, SubnetInfo>`: every subnet of every network,
    /// keyed by (VNI, subnet address) with prefix length 32 + the subnet's.
    pub const SUBNETS: &str = "OVL_SUBNETS";
    /// `LruHashMap<[u8; 4] VTEP, PathMtu>`: path MTUs to remote VTEPs that
    /// the underlay reported smaller than the link's.
    pub const PATH_MTU: &str = "OVL_PATH_MTU";
    /// `LruHashMap<[u8; 4] VTEP, NextHop>`: how encapsulated packets to a
    /// remote VTEP leave — device, our MAC, the next hop's MAC — as the
    /// FIB said at most [`NEXT_HOP_TTL_NS`](crate::wire::NEXT_HOP_TTL_NS)
    /// ago. Filled by the encapsulation program; the agent empties it when
    /// the underlay's routes or neighbours change.
    pub const NEXT_HOPS: &str = "OVL_NEXT_HOPS";
    /// `PerCpuArray<VniCounters>` of [`capacity::STATS`](super::capacity::STATS)
    /// slots: slot [`UNATTRIBUTED_SLOT`](crate::counters::UNATTRIBUTED_SLOT)
    /// and one per network, which the agent assigns and records in the
    /// network's [`NetworkInfo::stats_slot`](super::NetworkInfo) (readers
    /// find a network's counters through `OVL_NETWORKS`).
    pub const STATS: &str = "OVL_STATS";
    /// `PerCpuArray<UnderlayCounters>` with one entry.
    pub const GLOBAL: &str = "OVL_GLOBAL";
    /// `Array<u32>` with one entry: the [`ABI_VERSION`](super::ABI_VERSION)
    /// of the build that filled the maps pinned beside it (no program reads
    /// it; an agent compares it before reusing pinned maps).
    pub const ABI: &str = "OVL_ABI";
    /// `DevMap` with one entry ([`CRYPTO_DEVICE`](super::CRYPTO_DEVICE)):
    /// the agent's crypto device, where frames of encrypted networks go to
    /// be encrypted and come back decrypted. The kernel deletes the entry
    /// when the device goes (the agent exited): encrypted networks then
    /// fail closed.
    pub const CRYPTO: &str = "OVL_CRYPTO";
    /// `Array<u64>` with one entry: the epoch of the maps the programs'
    /// flow caches copy from (`OVL_VTEPS`, `OVL_ENDPOINTS`, `OVL_NETWORKS`,
    /// `OVL_IFACES`). The agent writes a fresh random value after every
    /// change to any of them, and once when it loads; a cached verdict of
    /// another epoch is not used. 0 (never written) turns the caches off.
    pub const EPOCH: &str = "OVL_EPOCH";
    /// Every map name ovl defines.
    pub const ALL: [&str; 13] = [
        CONFIG, NETWORKS, ENDPOINTS, VTEPS, IFACES, SUBNETS, PATH_MTU, NEXT_HOPS, STATS, GLOBAL,
        ABI, CRYPTO, EPOCH,
    ];
}

/// Version of the meaning of the maps' contents. Bump it whenever a map's
/// key or value changes meaning without changing size (a flag bit, a field
/// reused): an agent then refills fresh maps instead of reusing the pinned
/// ones. Size changes are detected without it.
pub const ABI_VERSION: u32 = 2;

/// Index of the crypto device in `OVL_CRYPTO`.
pub const CRYPTO_DEVICE: u32 = 0;

/// Where the per-CPU flow caches (`OVL_DECAP_FLOWS`, `OVL_EGRESS_FLOWS`,
/// unpinned) keep a flow: computed by the programs, and by tests that
/// need two flows in one slot.
pub mod flow_cache {
    /// log2 of [`SLOTS`].
    const SLOT_BITS: u32 = 10;
    /// Slots of each flow cache per CPU (a power of two): flows whose
    /// hashes meet share one and take turns. 1024 keep a thousand flows
    /// per CPU mostly apart (`ovl-microbench`'s many-flows cases) at 96 KiB
    /// (egress) and 48 KiB (decap) per CPU.
    pub const SLOTS: u32 = 1 << SLOT_BITS;

    /// The decap cache's slot for VXLAN of network `vni` from `src_vtep`
    /// to the inner IPv4 destination `dst_addr`.
    #[inline(always)]
    pub fn decap_slot(vni: u32, src_vtep: [u8; 4], dst_addr: [u8; 4]) -> u32 {
        slot(
            dst_addr,
            vni.wrapping_mul(0x9e37_79b1) ^ u32::from_be_bytes(src_vtep),
        )
    }

    /// The egress cache's slot for frames from the container veth whose
    /// host end is `ifindex` to the IPv4 destination `dst_addr`.
    #[inline(always)]
    pub fn egress_slot(ifindex: u32, dst_addr: [u8; 4]) -> u32 {
        slot(dst_addr, ifindex)
    }

    /// The slot for a flow to `dst_addr` from whatever `source` folds.
    ///
    /// Fibonacci hashing of the destination as a number, offset by a full
    /// mix of the source: the addresses IPAM hands out one after another
    /// then land in distinct slots for as long as there are slots, where a
    /// random hash would pile a third of them up (birthday collisions);
    /// different sources start at unrelated offsets.
    #[inline(always)]
    fn slot(dst_addr: [u8; 4], source: u32) -> u32 {
        u32::from_be_bytes(dst_addr)
            .wrapping_add(mix(source))
            .wrapping_mul(0x9e37_79b1)
            >> (32 - SLOT_BITS)
    }

    /// MurmurHash3's 32-bit finaliser: every input bit moves about half
    /// the output bits.
    #[inline(always)]
    fn mix(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }

    #[cfg(test)]
    mod tests {
        extern crate std;
        use std::collections::BTreeSet;

        use super::*;

        #[test]
        fn addresses_in_order_take_distinct_slots_while_there_are_enough() {
            let slots: BTreeSet<u32> = (0..SLOTS)
                .map(|i| egress_slot(7, (0xc612_1000 + i).to_be_bytes()))
                .collect();
            // Fibonacci hashing spreads a run of keys evenly, not
            // perfectly: most of them, where a random hash keeps 63 %.
            assert!(slots.len() as u32 > SLOTS * 4 / 5, "{} slots", slots.len());
            let quarter: BTreeSet<u32> = (0..SLOTS / 4)
                .map(|i| decap_slot(4096, [198, 51, 100, 10], (0xc612_2000 + i).to_be_bytes()))
                .collect();
            assert_eq!(quarter.len() as u32, SLOTS / 4);
            assert!(slots.iter().all(|s| *s < SLOTS));
        }
    }
}

/// Capacities of the hash maps.
pub mod capacity {
    /// Networks per node.
    pub const NETWORKS: u32 = 4096;
    /// Endpoints across all networks.
    pub const ENDPOINTS: u32 = 65536;
    /// (VNI, VTEP) pairs.
    pub const VTEPS: u32 = 65536;
    /// Local container interfaces: as many as endpoints, so that the
    /// cluster's endpoint limit (which the store checks before any change)
    /// bounds a node's own interfaces too. Allocated as they are added
    /// (`BPF_F_NO_PREALLOC`), not up front: a node holds few.
    pub const IFACES: u32 = 65536;
    /// Subnets across all networks.
    pub const SUBNETS: u32 = 16384;
    /// Remote VTEPs with a reported path MTU (least recently used go).
    pub const PATH_MTU: u32 = 16384;
    /// Remote VTEPs with a cached next hop (least recently used go).
    pub const NEXT_HOPS: u32 = 16384;
    /// Counter slots: one per network, and the unattributed one.
    pub const STATS: u32 = NETWORKS + 1;
}

/// What the kernel programs know of a network; the value of `OVL_NETWORKS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NetworkInfo {
    /// MTU of the network's container interfaces (L3 bytes).
    pub mtu: u32,
    /// `network_flags::*` bits.
    pub flags: u32,
    /// The network's slot of `OVL_STATS` (1..[`capacity::STATS`]): the
    /// programs count its packets there, with no lookup by VNI.
    pub stats_slot: u32,
}
const _: () = assert!(core::mem::size_of::<NetworkInfo>() == 12);

/// Bits of [`NetworkInfo::flags`].
pub mod network_flags {
    /// No way out of the overlay (Docker's `--internal`).
    pub const INTERNAL: u32 = 1 << 0;
    /// Traffic between hosts must leave only encrypted.
    pub const ENCRYPTED: u32 = 1 << 1;
}

/// The mark ovl's egress program gives a packet of network `vni` that it
/// hands to the host's stack (external egress); the host's NAT and policy
/// routing recognise ovl's packets and their network by it.
pub const fn egress_mark(vni: u32) -> u32 {
    EGRESS_MARK_BASE | (vni & EGRESS_VNI_MASK)
}
/// High byte of every [`egress_mark`] (0x6f, "o").
pub const EGRESS_MARK_BASE: u32 = 0x6f00_0000;
/// The bits of a mark that say it is ovl's.
pub const EGRESS_MARK_MASK: u32 = 0xff00_0000;
/// The bits of a mark that carry the VNI.
pub const EGRESS_VNI_MASK: u32 = 0x00ff_ffff;

/// A (VNI, remote VTEP) pair allowed to send VXLAN; the value of
/// `OVL_VTEPS`. It carries a copy of the network's `OVL_NETWORKS` entry so
/// that decapsulation reads one hash map per packet instead of two: the
/// agent derives both from the same network, and rewrites every VTEP
/// entry of a network whose entry changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VtepInfo {
    /// `vtep_flags::*` bits.
    pub flags: u32,
    /// The network, as its `OVL_NETWORKS` entry holds it.
    pub network: NetworkInfo,
}
const _: () = assert!(core::mem::size_of::<VtepInfo>() == 16);

/// Bits of [`VtepInfo::flags`].
pub mod vtep_flags {
    /// The VTEP may send VXLAN for the VNI (every entry has it).
    pub const ALLOWED: u32 = 1 << 0;
    /// The VTEP's node published a WireGuard key: frames of an encrypted
    /// network may go to it (through the crypto device).
    pub const KEYED: u32 = 1 << 1;
}

/// A (VNI, IPv4 address) pair: the key of endpoints and of allowed VTEPs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VniAddr {
    /// VXLAN network identifier, host order.
    pub vni: u32,
    /// IPv4 address, network order.
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<VniAddr>() == 8);

/// Where an endpoint lives and which MAC it answers to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Endpoint {
    /// The container's MAC address.
    pub mac: [u8; 6],
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
    /// Host end of the container's veth when the endpoint is on this node;
    /// 0 when it is remote.
    pub ifindex: u32,
    /// Underlay address of the VTEP that hosts the endpoint, network order;
    /// all zero when the endpoint is local.
    pub vtep: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 16);

impl Endpoint {
    /// True when the endpoint is on this node.
    #[inline(always)]
    pub const fn is_local(&self) -> bool {
        self.ifindex != 0
    }
}

/// A local container's interface as ovl configured it; the value of
/// `OVL_IFACES`, keyed by the host end's ifindex. Frames the container
/// sends must carry exactly this MAC and IPv4 address as their source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Iface {
    /// The network.
    pub vni: u32,
    /// The container's IPv4 address, network order.
    pub addr: [u8; 4],
    /// The gateway of the container's subnet, network order: the source of
    /// the ICMP errors ovl answers it with.
    pub gateway: [u8; 4],
    /// The container's MAC address.
    pub mac: [u8; 6],
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
    /// The network's `network_flags`, a copy of its `OVL_NETWORKS` entry's:
    /// container egress (encapsulation's encrypted check, external
    /// egress's internal check) reads them here instead of looking the
    /// network up per packet. The agent rewrites the interfaces of a
    /// network whose entry changes.
    pub network_flags: u32,
    /// The network's `stats_slot`, copied the same way: egress counts in
    /// it.
    pub stats_slot: u32,
}
const _: () = assert!(core::mem::size_of::<Iface>() == 28);

/// A subnet of a network; the value of `OVL_SUBNETS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SubnetInfo {
    /// The subnet's gateway address, network order (answered in the data
    /// path: ARP, ICMP echo).
    pub gateway: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<SubnetInfo>() == 4);

/// Prefix length of an `OVL_SUBNETS` key for a subnet of `prefix` bits:
/// the key's data is a [`VniAddr`] whose whole VNI must match.
pub const fn subnet_key_bits(prefix: u8) -> u32 {
    32 + prefix as u32
}

/// A path MTU the underlay reported for a remote VTEP; the value of
/// `OVL_PATH_MTU`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PathMtu {
    /// Largest underlay packet (L3 bytes) that reaches the VTEP.
    pub mtu: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// When it was reported (`bpf_ktime_get_ns`); older than
    /// [`PATH_MTU_EXPIRY_NS`](crate::wire::PATH_MTU_EXPIRY_NS) it is ignored.
    pub learned_ns: u64,
}
const _: () = assert!(core::mem::size_of::<PathMtu>() == 16);

/// How encapsulated packets to one remote VTEP leave this node; the value
/// of `OVL_NEXT_HOPS`, a cache of the FIB and neighbour tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NextHop {
    /// The next hop's MAC (the VTEP's, or its router's).
    pub dmac: [u8; 6],
    /// This node's MAC on `ifindex`.
    pub smac: [u8; 6],
    /// The device packets leave by.
    pub ifindex: u32,
    /// A `next_hop_via` value.
    pub via: u32,
    /// The route's MTU (L3 bytes); larger packets take the FIB again.
    pub mtu: u32,
    /// When the FIB (or the agent) answered (`bpf_ktime_get_coarse_ns`,
    /// CLOCK_MONOTONIC_COARSE); older than
    /// [`NEXT_HOP_TTL_NS`](crate::wire::NEXT_HOP_TTL_NS) it is asked again.
    pub learned_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);

/// Values of [`NextHop::via`].
pub mod next_hop_via {
    /// Next hop and MACs known: straight out of `ifindex`.
    pub const RESOLVED: u32 = 1;
    /// The FIB helper refuses to work without IPv4 forwarding on the
    /// underlay: the kernel routes and resolves each packet itself.
    pub const KERNEL_ROUTED: u32 = 2;
    /// Resolved by the agent from the kernel's route and neighbour tables
    /// where the FIB helper refuses (forwarding off): straight out of
    /// `ifindex`, like [`RESOLVED`]. The agent rewrites such entries while
    /// it runs; without it they expire like any other and the kernel
    /// routes again. (A new value, not a new meaning: programs older than
    /// it take it for `KERNEL_ROUTED`, which is safe, so `ABI_VERSION`
    /// stays; every agent empties the cache when it starts anyway.)
    pub const AGENT_RESOLVED: u32 = 3;
}

/// This node's underlay identity; the single entry of `OVL_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NodeConfig {
    /// This VTEP's underlay IPv4 address, network order. All zero means
    /// "not configured": the programs then pass/drop without switching.
    pub vtep: [u8; 4],
    /// Underlay interface index.
    pub underlay_ifindex: u32,
    /// Underlay L3 MTU: an encapsulated packet may be at most this long.
    pub underlay_mtu: u32,
    /// The cluster's VXLAN UDP port, host order; 0 (as written by agents
    /// before the port was configurable) means the IANA port 4789.
    pub udp_port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 16);

impl NodeConfig {
    /// The UDP destination port of ovl's VXLAN.
    #[inline(always)]
    pub const fn vxlan_port(&self) -> u16 {
        if self.udp_port == 0 {
            crate::wire::VXLAN_PORT
        } else {
            self.udp_port
        }
    }
}

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::VniAddr {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::NetworkInfo {}
    unsafe impl aya::Pod for super::VtepInfo {}
    unsafe impl aya::Pod for super::Iface {}
    unsafe impl aya::Pod for super::SubnetInfo {}
    unsafe impl aya::Pod for super::PathMtu {}
    unsafe impl aya::Pod for super::NextHop {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_fit_the_object_name_limit() {
        for n in names::ALL.iter().chain(programs::ALL.iter()) {
            assert!(n.len() <= 15, "{n} is longer than 15 characters");
        }
    }

    #[test]
    fn egress_marks_carry_the_vni_under_ovls_byte() {
        assert_eq!(egress_mark(4096), 0x6f00_1000);
        assert_eq!(
            egress_mark(0x00ff_ffff) & EGRESS_MARK_MASK,
            EGRESS_MARK_BASE
        );
        assert_eq!(egress_mark(4096) & EGRESS_VNI_MASK, 4096);
    }

    #[test]
    fn a_zero_port_is_the_iana_vxlan_port() {
        let mut cfg = NodeConfig::default();
        assert_eq!(cfg.vxlan_port(), 4789);
        cfg.udp_port = 8472;
        assert_eq!(cfg.vxlan_port(), 8472);
    }
}
