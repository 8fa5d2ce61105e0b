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
    /// `HashMap<VniAddr, u32>`: (VNI, remote VTEP) pairs allowed to send.
    pub const VTEPS: &str = "OVL_VTEPS";
    /// `HashMap<u32 ifindex, u32 VNI>`: host ends of local container veths.
    pub const IFACES: &str = "OVL_IFACES";
    /// `PerCpuHashMap<u32 VNI, VniCounters>`.
    pub const STATS: &str = "OVL_STATS";
    /// `PerCpuArray<UnderlayCounters>` with one entry.
    pub const GLOBAL: &str = "OVL_GLOBAL";
    /// `Array<u32>` with one entry: the [`ABI_VERSION`](super::ABI_VERSION)
    /// of the build that filled the maps pinned beside it (no program reads
    /// it; an agent compares it before reusing pinned maps).
    pub const ABI: &str = "OVL_ABI";
    /// Every map name ovl defines.
    pub const ALL: [&str; 8] = [
        CONFIG, NETWORKS, ENDPOINTS, VTEPS, IFACES, STATS, GLOBAL, ABI,
    ];
}

/// Version of the meaning of the maps' contents. Bump it whenever a map's
/// key or value changes meaning without changing size (a flag bit, a field
/// reused): an agent then refills fresh maps instead of reusing the pinned
/// ones. Size changes are detected without it.
pub const ABI_VERSION: u32 = 1;

/// Capacities of the hash maps.
pub mod capacity {
    /// Networks per node.
    pub const NETWORKS: u32 = 4096;
    /// Endpoints across all networks.
    pub const ENDPOINTS: u32 = 65536;
    /// (VNI, VTEP) pairs.
    pub const VTEPS: u32 = 65536;
    /// Local container interfaces.
    pub const IFACES: u32 = 4096;
}

/// What the kernel programs know of a network; the value of `OVL_NETWORKS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NetworkInfo {
    /// MTU of the network's container interfaces (L3 bytes).
    pub mtu: u32,
    /// `network_flags::*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<NetworkInfo>() == 8);

/// Bits of [`NetworkInfo::flags`].
pub mod network_flags {
    /// No way out of the overlay (Docker's `--internal`).
    pub const INTERNAL: u32 = 1 << 0;
    /// Traffic between hosts must leave only encrypted.
    pub const ENCRYPTED: u32 = 1 << 1;
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
    /// Explicit padding; always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 16);

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::VniAddr {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::NetworkInfo {}
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
}
