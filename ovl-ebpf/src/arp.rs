//! Proxy ARP (RFC 826): a container's request for an address of its own
//! network — an endpoint, or a subnet's gateway — is answered in place from
//! the maps (a probe for one of them too: a conflict, RFC 5227); nothing is
//! flooded.

use network_types::{arp::ArpHdr, eth::EthHdr};
use ovl_common::{
    DropReason, Iface,
    wire::{
        ANYCAST_GATEWAY_MAC, ARP_HTYPE_ETHER, ARP_OP_REPLY, ARP_OP_REQUEST, ETH_HDR_LEN, ETH_P_IP,
    },
};

use crate::{maps, packet::Frame};

/// The sender protocol address of an ARP probe (RFC 5227).
const PROBE_SENDER: [u8; 4] = [0; 4];

/// Turns the ARP request in `frame`, sent by the container of `iface`,
/// into the reply the target would send. On success the frame is ready to
/// be sent back to the requester.
#[inline(always)]
pub fn answer_request(frame: &Frame, iface: &Iface) -> Result<(), DropReason> {
    let arp: ArpHdr = frame.read(ETH_HDR_LEN)?;
    if arp.htype() != ARP_HTYPE_ETHER || arp.ptype() != ETH_P_IP || arp.hlen != 6 || arp.plen != 4 {
        return Err(DropReason::Unsupported);
    }
    // A sender claiming another MAC or address would poison the caches of
    // whoever learns from it. An ARP probe (RFC 5227 §2.1.1: sender
    // address 0.0.0.0, sent before an address is used, by `arping -D` and
    // address conflict detection) claims no address, and no receiver
    // learns from it.
    let probe = arp.spa == PROBE_SENDER;
    if arp.sha != iface.mac || (arp.spa != iface.addr && !probe) {
        return Err(DropReason::SpoofedSource);
    }
    // Replies and gratuitous announcements have no answer to give, nor
    // has a probe for the container's own address: no one else holds it.
    if arp.oper() != ARP_OP_REQUEST || arp.tpa == arp.spa || arp.tpa == iface.addr {
        return Err(DropReason::Unsupported);
    }
    let target_mac = target_mac(iface.vni, arp.tpa)?;

    let mut reply = arp;
    reply.set_oper(ARP_OP_REPLY);
    reply.sha = target_mac;
    reply.spa = arp.tpa;
    reply.tha = arp.sha;
    reply.tpa = arp.spa;
    frame.write(ETH_HDR_LEN, reply)?;

    let mut eth: EthHdr = frame.read(0)?;
    eth.dst_addr = arp.sha;
    eth.src_addr = target_mac;
    frame.write(0, eth)
}

/// The MAC that answers for `addr` on network `vni`: an endpoint's own, or
/// the anycast gateway MAC for a subnet's gateway.
#[inline(always)]
fn target_mac(vni: u32, addr: [u8; 4]) -> Result<[u8; 6], DropReason> {
    if let Some(ep) = maps::endpoint(vni, addr) {
        return Ok(ep.mac);
    }
    match maps::subnet_of(vni, addr) {
        Some(subnet) if subnet.gateway == addr => Ok(ANYCAST_GATEWAY_MAC),
        _ => Err(DropReason::NoEndpoint),
    }
}
