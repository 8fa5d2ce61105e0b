//! Protocol constants of the frames ovl parses and builds, named after the
//! RFC fields they come from (RFC 7348 VXLAN, RFC 791 IPv4, RFC 826 ARP).

/// IANA-assigned VXLAN UDP destination port (RFC 7348 §5).
pub const VXLAN_PORT: u16 = 4789;
/// Length of the VXLAN header (RFC 7348 §5).
pub const VXLAN_HDR_LEN: usize = 8;
/// The "I" flag: the VNI field is valid (RFC 7348 §5, first octet 0x08).
pub const VXLAN_FLAG_I: u8 = 0x08;
/// Largest VNI: the field is 24 bits wide.
pub const VNI_MAX: u32 = 0x00ff_ffff;

/// Ethernet header without VLAN tag.
pub const ETH_HDR_LEN: usize = 14;
/// IPv4 header without options (IHL = 5).
pub const IPV4_HDR_LEN: usize = 20;
/// UDP header.
pub const UDP_HDR_LEN: usize = 8;
/// ARP packet for Ethernet/IPv4 (RFC 826).
pub const ARP_ETH_IPV4_LEN: usize = 28;

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// IPv4 protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IPv4 protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IPv4 protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;

/// ICMP echo reply (RFC 792).
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMP destination unreachable (RFC 792).
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Code of "fragmentation needed and DF set" (RFC 792, RFC 1191 §4).
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// The ECN field of the IPv4 TOS byte (RFC 3168 §5) and its code points.
pub const ECN_MASK: u8 = 0b11;
pub const ECN_NOT_ECT: u8 = 0b00;
pub const ECN_ECT1: u8 = 0b01;
pub const ECN_ECT0: u8 = 0b10;
pub const ECN_CE: u8 = 0b11;
/// IPv4 "don't fragment" flag (RFC 791), in the flags/offset field.
pub const IPV4_DF: u16 = 0x4000;
/// IPv4 "more fragments" flag and fragment offset: non-zero in any fragment.
pub const IPV4_FRAG_MASK: u16 = 0x3fff;
/// IPv4 fragment offset: non-zero in any fragment but the first.
pub const IPV4_FRAG_OFFSET: u16 = 0x1fff;
/// ICMP echo request (RFC 792).
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP time exceeded (RFC 792).
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// Code of "time to live exceeded in transit" (RFC 792).
pub const ICMP_EXC_TTL: u8 = 0;
/// ICMP header: type, code, checksum and the 4-byte rest of header.
pub const ICMP_HDR_LEN: usize = 8;
/// TTL of the IPv4 packets ovl originates (ICMP errors and echo replies).
pub const ORIGIN_TTL: u8 = 64;
/// Type of service of ICMP errors: internetwork control (RFC 1812 §4.3.2.5).
pub const ICMP_ERROR_TOS: u8 = 0xc0;

/// The MAC every network's gateway answers with ("anycast gateway": the
/// same on every node, so a container's gateway is wherever it runs).
/// Outside the 02:42 range of container MACs, so it is never an endpoint's.
pub const ANYCAST_GATEWAY_MAC: [u8; 6] = [0x02, 0x6f, 0x76, 0x6c, 0x67, 0x77];

/// Smallest path MTU ovl accepts from the underlay, as Linux's
/// `net.ipv4.route.min_pmtu`: smaller reports are raised to it, so forged
/// ICMP cannot shrink the overlay to nothing.
pub const MIN_PATH_MTU: u32 = 552;
/// How long a reported path MTU holds before larger packets are tried
/// again, as Linux's `net.ipv4.route.mtu_expires` (600 s).
pub const PATH_MTU_EXPIRY_NS: u64 = 600 * 1_000_000_000;
/// How long encapsulation trusts a cached next hop (`OVL_NEXT_HOPS`)
/// before it asks the FIB again: the bound on following a changed route or
/// neighbour MAC when no agent runs to empty the cache at once.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;
/// ARP opcode: request.
pub const ARP_OP_REQUEST: u16 = 1;
/// ARP opcode: reply.
pub const ARP_OP_REPLY: u16 = 2;
/// ARP hardware type: Ethernet.
pub const ARP_HTYPE_ETHER: u16 = 1;

/// Bytes in front of the inner IPv4 packet on the underlay wire beyond the
/// inner Ethernet header: outer IPv4 + UDP + VXLAN + inner Ethernet.
/// This is what encapsulation inserts between the (re-used) Ethernet header
/// and the inner IPv4 header.
pub const ENCAP_INSERT_LEN: usize = IPV4_HDR_LEN + UDP_HDR_LEN + VXLAN_HDR_LEN + ETH_HDR_LEN;
/// Whole overhead of VXLAN over IPv4 on the underlay L3 MTU: an inner
/// packet of `mtu - ENCAP_OVERHEAD` bytes fills an underlay packet of `mtu`.
pub const ENCAP_OVERHEAD: u32 = ENCAP_INSERT_LEN as u32;
/// Offset of the inner Ethernet header in an encapsulated frame.
pub const INNER_ETH_OFFSET: usize = ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN + VXLAN_HDR_LEN;

/// Default UDP port of WireGuard (the encrypted networks' transport).
pub const WIREGUARD_PORT: u16 = 51820;
/// WireGuard transport data message overhead: type, receiver index and
/// counter (16 bytes) plus the Poly1305 tag (16 bytes).
pub const WIREGUARD_DATA_OVERHEAD: u32 = 32;
/// What carrying a VXLAN packet in WireGuard adds on the underlay: outer
/// IPv4 + UDP + the data message overhead. An encrypted network's
/// container MTU is the underlay MTU less this and [`ENCAP_OVERHEAD`].
pub const WIREGUARD_OVERHEAD: u32 = (IPV4_HDR_LEN + UDP_HDR_LEN) as u32 + WIREGUARD_DATA_OVERHEAD;

/// Range of UDP source ports used for flow entropy (RFC 7348 §5: dynamic
/// port range 49152-65535).
pub const VXLAN_SRC_PORT_MIN: u16 = 49152;
/// Number of ports in the source-port range.
pub const VXLAN_SRC_PORT_SPAN: u32 = 16384;

/// Time to live of outer IPv4 headers.
pub const OUTER_TTL: u8 = 64;

/// Maps a flow hash into the VXLAN source-port range.
#[inline(always)]
pub const fn vxlan_src_port(flow_hash: u32) -> u16 {
    // Fold the high bits in so hashes that differ only there still spread.
    let h = flow_hash ^ (flow_hash >> 16);
    VXLAN_SRC_PORT_MIN + (h % VXLAN_SRC_PORT_SPAN) as u16
}

/// Locally administered MAC that ovl gives a container: 02:42 followed by
/// its IPv4 address, as Docker does for overlay endpoints.
#[inline(always)]
pub const fn mac_for_ipv4(addr: [u8; 4]) -> [u8; 6] {
    [0x02, 0x42, addr[0], addr[1], addr[2], addr[3]]
}

/// One's-complement checksum of an IPv4 header given as ten 16-bit words
/// read in network order (RFC 791, RFC 1071).
#[inline(always)]
pub const fn ipv4_checksum(words: &[u16; 10]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 10 {
        sum += words[i] as u32;
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// A one's-complement checksum after one 16-bit word it covers changed
/// from `old` to `new` (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub const fn checksum_replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The one's-complement checksum of `N` bytes (RFC 1071); `N` is even.
#[inline(always)]
pub const fn internet_checksum<const N: usize>(bytes: &[u8; N]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        sum += ((bytes[i] as u32) << 8) | bytes[i + 1] as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_replace_matches_a_full_recompute() {
        // The RFC 1071 example header, TTL 64 -> 63.
        let mut h = [
            0x45u8, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let check = u16::from_be_bytes([h[10], h[11]]);
        let new = checksum_replace16(check, 0x4011, 0x3f11);
        h[8] = 0x3f;
        h[10..12].copy_from_slice(&new.to_be_bytes());
        assert_eq!(internet_checksum(&h), 0);
        // Every TTL, and a word that wraps the sum.
        for ttl in 1..=255u16 {
            let mut h2 = h;
            h2[8] = ttl as u8;
            h2[10..12].copy_from_slice(&[0, 0]);
            let c = internet_checksum(&h2);
            let d = checksum_replace16(c, ttl << 8 | 0x11, (ttl - 1) << 8 | 0x11);
            h2[8] = (ttl - 1) as u8;
            h2[10..12].copy_from_slice(&d.to_be_bytes());
            assert_eq!(internet_checksum(&h2), 0, "ttl {ttl}");
        }
    }

    #[test]
    fn internet_checksum_verifies_to_zero_over_a_checksummed_header() {
        let h = [
            0x45u8, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0);
    }

    #[test]
    fn gateway_mac_is_no_container_mac() {
        assert_ne!(ANYCAST_GATEWAY_MAC[..2], mac_for_ipv4([0; 4])[..2]);
        assert_eq!(
            ANYCAST_GATEWAY_MAC[0] & 0x03,
            0x02,
            "unicast, locally administered"
        );
    }

    #[test]
    fn ipv4_checksum_matches_rfc1071_example_header() {
        // 45 00 00 73 00 00 40 00 40 11 [b8 61] c0 a8 00 01 c0 a8 00 c7
        let words = [
            0x4500, 0x0073, 0x0000, 0x4000, 0x4011, 0x0000, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        assert_eq!(ipv4_checksum(&words), 0xb861);
    }

    #[test]
    fn src_port_stays_in_dynamic_range() {
        for h in [0u32, 1, 0xffff, 0x1_0000, 0xdead_beef, u32::MAX] {
            let p = vxlan_src_port(h);
            assert!(p >= VXLAN_SRC_PORT_MIN, "{p}");
        }
        assert_ne!(vxlan_src_port(1), vxlan_src_port(2));
    }

    #[test]
    fn container_mac_embeds_address() {
        assert_eq!(mac_for_ipv4([198, 18, 0, 2]), [0x02, 0x42, 198, 18, 0, 2]);
    }

    #[test]
    fn overhead_is_fifty_bytes() {
        assert_eq!(ENCAP_OVERHEAD, 50);
        assert_eq!(INNER_ETH_OFFSET, 50);
    }

    #[test]
    fn encrypted_networks_fit_1390_in_a_1500_underlay() {
        // 1500 - 60 (IPv4, UDP, WireGuard) = 1440, a multiple of WireGuard's
        // 16-byte padding block; less VXLAN's 50 leaves 1390.
        assert_eq!(1500 - WIREGUARD_OVERHEAD - ENCAP_OVERHEAD, 1390);
        assert_eq!((1500 - WIREGUARD_OVERHEAD) % 16, 0);
    }
}
