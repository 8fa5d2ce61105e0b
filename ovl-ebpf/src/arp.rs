//! Proxy ARP (RFC 826): a container's request for an address of its own
//! network is answered in place from the endpoint map; nothing is flooded.

use network_types::{arp::ArpHdr, eth::EthHdr};
use ovl_common::{
    DropReason,
    wire::{ARP_HTYPE_ETHER, ARP_OP_REPLY, ARP_OP_REQUEST, ETH_HDR_LEN, ETH_P_IP},
};

use crate::{maps, packet::Frame};

/// Turns the ARP request in `frame` into the reply the target would send.
/// On success the frame is ready to be sent back to the requester.
#[inline(always)]
pub fn answer_request(frame: &Frame, vni: u32) -> Result<(), DropReason> {
    let arp: ArpHdr = frame.read(ETH_HDR_LEN)?;
    if arp.htype() != ARP_HTYPE_ETHER || arp.ptype() != ETH_P_IP || arp.hlen != 6 || arp.plen != 4 {
        return Err(DropReason::Unsupported);
    }
    // Replies and gratuitous announcements have no answer to give.
    if arp.oper() != ARP_OP_REQUEST || arp.tpa == arp.spa {
        return Err(DropReason::Unsupported);
    }
    let target = maps::endpoint(vni, arp.tpa).ok_or(DropReason::NoEndpoint)?;

    let mut reply = arp;
    reply.set_oper(ARP_OP_REPLY);
    reply.sha = target.mac;
    reply.spa = arp.tpa;
    reply.tha = arp.sha;
    reply.tpa = arp.spa;
    frame.write(ETH_HDR_LEN, reply)?;

    let mut eth: EthHdr = frame.read(0)?;
    eth.dst_addr = arp.sha;
    eth.src_addr = target.mac;
    frame.write(0, eth)
}
