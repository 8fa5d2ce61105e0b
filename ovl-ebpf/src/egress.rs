//! Container egress, at TC ingress of the host end of a container's veth:
//! source checks (anti-spoofing), proxy ARP, then same-node switching,
//! encapsulation to the remote VTEP, or the gateway for frames sent to it.

use aya_ebpf::{helpers::bpf_redirect_peer, programs::TcContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use ovl_common::{
    DropReason, Iface,
    wire::{ANYCAST_GATEWAY_MAC, ETH_HDR_LEN, ETH_P_ARP, ETH_P_IP},
};

use crate::{arp, encap, gateway, maps, packet::Frame, stats};

/// Headers egress reads: Ethernet, IPv4 with options, TCP data offset.
const MAX_HDR_LEN: u32 = (ETH_HDR_LEN + 60 + 20) as u32;

/// Switches one frame the container of `iface` sent from the veth whose
/// host end is `ifindex`.
#[inline(always)]
pub fn switch(ctx: &TcContext, ifindex: u32, iface: &Iface) -> Result<i32, DropReason> {
    // Make the headers readable with direct packet access; frames shorter
    // than that fail the bounds checks below and count as malformed.
    let frame = Frame::of_skb_headers(ctx, MAX_HDR_LEN);
    let eth: EthHdr = frame.read(0)?;
    let vni = iface.vni;
    if eth.src_addr != iface.mac {
        return Err(DropReason::SpoofedSource);
    }

    if eth.ether_type == ETH_P_ARP.to_be() {
        arp::answer_request(&frame, iface)?;
        stats::arp_reply(iface.stats_slot);
        return Ok(to_container(ifindex));
    }
    if eth.ether_type != ETH_P_IP.to_be() {
        return Err(DropReason::Unsupported);
    }

    let ip: Ipv4Hdr = frame.read(ETH_HDR_LEN)?;
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return Err(DropReason::Malformed);
    }
    if ip.src_addr != iface.addr {
        return Err(DropReason::SpoofedSource);
    }
    if eth.dst_addr == ANYCAST_GATEWAY_MAC {
        return gateway::forward(ctx, ifindex, iface, &ip);
    }
    let dst = maps::endpoint(vni, ip.dst_addr).ok_or(DropReason::NoEndpoint)?;
    if dst.is_local() {
        if dst.ifindex == ifindex {
            return Err(DropReason::NoEndpoint);
        }
        let mut eth = eth;
        eth.dst_addr = dst.mac;
        frame.write(0, eth)?;
        stats::local(iface.stats_slot, gso_segs(ctx));
        return Ok(to_container(dst.ifindex));
    }
    let node = maps::node_config().ok_or(DropReason::NoRoute)?;
    encap::to_remote(ctx, ifindex, iface, node, &dst, &ip)
}

/// Segments the frame stands for (a GSO super-packet counts as many).
#[inline(always)]
pub fn gso_segs(ctx: &TcContext) -> u64 {
    // SAFETY: reading a field of the program's own context.
    u64::from(unsafe { (*ctx.skb.skb).gso_segs }.max(1))
}

/// Hands a frame to the container end of the veth whose host end is
/// `ifindex` (straight into its ingress, skipping the host backlog).
#[inline(always)]
pub fn to_container(ifindex: u32) -> i32 {
    // SAFETY: helper call; the action it returns is the program's verdict.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}
