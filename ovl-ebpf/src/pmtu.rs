//! Path MTU discovery for ovl's own tunnel (RFC 1191): the host stack has
//! no socket for ovl's VXLAN and so learns nothing from an ICMP
//! "fragmentation needed" about it; the decap hook reads such reports and
//! records the path MTU to the VTEP the quoted packet was sent to.

use network_types::{ip::Ipv4Hdr, udp::UdpHdr};
use ovl_common::{
    NodeConfig,
    wire::{ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HDR_LEN, IPPROTO_UDP, IPV4_HDR_LEN},
};

use crate::{maps, packet::Frame};

/// Reads the ICMP message at `icmp_offset` of a packet to this VTEP and,
/// when it reports that one of ovl's own VXLAN packets was too big for the
/// path, records the reported MTU for that packet's VTEP. Returns whether
/// it did. The report is always left for the host stack too.
#[inline(always)]
pub fn learn(frame: &Frame, icmp_offset: usize, node: &NodeConfig) -> bool {
    let Ok(icmp) = frame.read::<[u8; ICMP_HDR_LEN]>(icmp_offset) else {
        return false;
    };
    if icmp[0] != ICMP_DEST_UNREACH || icmp[1] != ICMP_FRAG_NEEDED {
        return false;
    }
    let quoted_offset = icmp_offset + ICMP_HDR_LEN;
    let Ok(quoted) = frame.read::<Ipv4Hdr>(quoted_offset) else {
        return false;
    };
    // ovl's VXLAN: IHL 5, UDP, from this VTEP, to the cluster's port.
    if quoted.vihl != 0x45 || quoted.proto != IPPROTO_UDP || quoted.src_addr != node.vtep {
        return false;
    }
    let Ok(udp) = frame.read::<UdpHdr>(quoted_offset + IPV4_HDR_LEN) else {
        return false;
    };
    if udp.dst_port() != node.vxlan_port() {
        return false;
    }
    let mtu = u32::from(u16::from_be_bytes([icmp[6], icmp[7]]));
    // A router from before RFC 1191 reports 0; a report must be smaller
    // than the packet it refused, and than the link's own MTU.
    let quoted_len = u32::from(u16::from_be_bytes(quoted.tot_len));
    if mtu == 0 || mtu >= quoted_len || mtu >= node.underlay_mtu {
        return false;
    }
    maps::set_path_mtu(quoted.dst_addr, mtu);
    true
}
