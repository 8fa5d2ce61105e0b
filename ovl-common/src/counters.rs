//! Counter layouts: the per-VNI per-CPU counters every data-path outcome is
//! counted in, the drop reasons indexing them, and node-wide counters.

/// Why a packet was dropped. The discriminant indexes [`VniCounters::drops`]
/// and is part of the ABI: append new reasons, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// No endpoint with that address on the network (or the endpoint is not
    /// where the packet would have to go, e.g. remote-to-remote), for a
    /// frame to a unicast MAC (broadcast and multicast are `Unsupported`).
    NoEndpoint = 0,
    /// VXLAN for a VNI this node does not serve.
    UnknownVni = 1,
    /// VXLAN from a source address that is not a VTEP of that network.
    UnknownVtep = 2,
    /// Truncated or malformed headers; VXLAN whose lengths disagree (a
    /// frame cut short, datagrams merged by UDP GRO on the underlay); IPv4
    /// a container sent whose frame does not hold the packet its header
    /// says (cut short, or a total length below the header's).
    Malformed = 3,
    /// Would not fit the way to the remote VTEP after encapsulation, and
    /// was sent without DF: ovl does not fragment (RFC 7348 §4.3; a DF
    /// packet is answered and counted as [`PathMtu`](Self::PathMtu)). Or
    /// received beyond the network's MTU.
    TooBig = 4,
    /// A frame ovl does not switch (IPv6, other EtherTypes, non-request ARP,
    /// broadcast and multicast to no endpoint, IPv4 fragments of VXLAN), or a packet the crypto device opened that
    /// is no VXLAN for this node (the host's stack never sees those).
    Unsupported = 5,
    /// No way to the destination: the kernel has no route to the VTEP, or
    /// the address is outside an `--internal` network's subnets.
    NoRoute = 6,
    /// A container sent with a source MAC or IPv4 address (or an ARP
    /// sender) that is not the one ovl assigned to its interface; or sent
    /// UDP to the VXLAN port (or a path MTU report about it) out through
    /// its gateway, which would reach another node as its own node's.
    SpoofedSource = 7,
    /// Routed through the gateway with a TTL of 1 or less; the sender got
    /// ICMP time exceeded from the gateway.
    TtlExceeded = 8,
    /// A DF packet larger than the way to the remote VTEP takes after
    /// encapsulation: the underlay's own MTU (less WireGuard's overhead
    /// for an encrypted network), its route's, or a smaller path MTU the
    /// underlay reported (ICMP fragmentation needed); the sender got ICMP
    /// fragmentation needed with that MTU less VXLAN's overhead.
    PathMtu = 9,
    /// A frame of an encrypted network that cannot be encrypted: the
    /// node's encrypting path is down (no agent, so no crypto device), or
    /// the peer's key is unknown. Never sent in clear.
    NoKey = 10,
    /// Clear VXLAN for an encrypted network from the underlay: encrypted
    /// networks are only accepted decrypted, from the crypto device.
    Unencrypted = 11,
    /// VXLAN that the underlay marked congested (outer ECN CE) around an
    /// inner packet that is not ECN-capable: RFC 6040 §4.2 drops it, as
    /// the congested router would have, since its sender would never hear
    /// of the mark. Underlay congestion, not a broken sender.
    Congestion = 12,
}

impl DropReason {
    /// Number of reasons; the length of [`VniCounters::drops`].
    pub const COUNT: usize = 13;
    /// Every reason, in index order.
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::NoEndpoint,
        DropReason::UnknownVni,
        DropReason::UnknownVtep,
        DropReason::Malformed,
        DropReason::TooBig,
        DropReason::Unsupported,
        DropReason::NoRoute,
        DropReason::SpoofedSource,
        DropReason::TtlExceeded,
        DropReason::PathMtu,
        DropReason::NoKey,
        DropReason::Unencrypted,
        DropReason::Congestion,
    ];

    /// The snake_case name used in `ovl stats` output and as the `reason`
    /// label of the drop metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::UnknownVni => "unknown_vni",
            DropReason::UnknownVtep => "unknown_vtep",
            DropReason::Malformed => "malformed",
            DropReason::TooBig => "too_big",
            DropReason::Unsupported => "unsupported",
            DropReason::NoRoute => "no_route",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::PathMtu => "path_mtu",
            DropReason::NoKey => "no_key",
            DropReason::Unencrypted => "unencrypted",
            DropReason::Congestion => "congestion",
        }
    }
}

/// Key of [`VniCounters`] for outcomes that cannot be attributed to a
/// network (malformed underlay frames, VXLAN for an unknown VNI). VNI 0 is
/// never given to a network.
pub const UNATTRIBUTED_VNI: u32 = 0;

/// Slot of `OVL_STATS` holding the counters of [`UNATTRIBUTED_VNI`]; the
/// agent gives each network one of the slots after it
/// (`NetworkInfo::stats_slot`).
pub const UNATTRIBUTED_SLOT: u32 = 0;

/// Per-VNI counters, one copy per CPU (summed by the agent).
/// Byte counters count inner Ethernet frames, as the containers see them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VniCounters {
    /// Frames encapsulated towards a remote VTEP.
    pub tx_packets: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Frames decapsulated and delivered to a local container.
    pub rx_packets: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames switched between two containers of this node.
    pub local_packets: u64,
    /// ARP requests answered by proxy.
    pub arp_replies: u64,
    /// Frames handed to the host's stack for an address outside the
    /// network's subnets (external egress, masqueraded by the host).
    pub egress_packets: u64,
    /// Drops, indexed by [`DropReason`].
    pub drops: [u64; DropReason::COUNT],
}
const _: () = assert!(core::mem::size_of::<VniCounters>() == 8 * (7 + DropReason::COUNT));

impl VniCounters {
    /// Adds another CPU's copy into this one.
    pub fn accumulate(&mut self, other: &VniCounters) {
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.local_packets += other.local_packets;
        self.arp_replies += other.arp_replies;
        self.egress_packets += other.egress_packets;
        for (sum, add) in self.drops.iter_mut().zip(other.drops.iter()) {
            *sum += *add;
        }
    }

    /// Drops counted for `reason`.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }
}

/// Node-wide counters of the underlay hook, one copy per CPU: the single
/// entry of `OVL_GLOBAL` (one lookup per packet bumps both).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct UnderlayCounters {
    /// Every frame the underlay ingress program saw.
    pub packets: u64,
    /// Frames that were not ovl's VXLAN and went on to the host stack.
    pub passed: u64,
    /// ICMP fragmentation-needed reports about ovl's own VXLAN that set a
    /// remote VTEP's path MTU.
    pub path_mtu_reports: u64,
}
const _: () = assert!(core::mem::size_of::<UnderlayCounters>() == 24);

impl UnderlayCounters {
    /// Adds another CPU's copy into this one.
    pub fn accumulate(&mut self, other: &UnderlayCounters) {
        self.packets += other.packets;
        self.passed += other.passed;
        self.path_mtu_reports += other.path_mtu_reports;
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for UnderlayCounters {}

#[cfg(feature = "user")]
unsafe impl aya::Pod for VniCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_index_in_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn drop_reason_names_are_distinct_snake_case_labels() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            let name = r.name();
            assert!(
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name:?}"
            );
            assert!(
                DropReason::ALL[..i].iter().all(|o| o.name() != name),
                "{name} twice"
            );
        }
    }

    #[test]
    fn accumulate_sums_every_field() {
        let mut a = VniCounters {
            tx_packets: 1,
            arp_replies: 2,
            ..Default::default()
        };
        a.drops[DropReason::TooBig as usize] = 3;
        let b = a;
        a.accumulate(&b);
        assert_eq!(a.tx_packets, 2);
        assert_eq!(a.arp_replies, 4);
        assert_eq!(a.drops_for(DropReason::TooBig), 6);
    }
}
