//! Container egress, at TC ingress of the host end of a container's veth:
//! source checks (anti-spoofing), proxy ARP, then same-node switching,
//! encapsulation to the remote VTEP, or the gateway for frames sent to it.

use aya_ebpf::{helpers::bpf_redirect_peer, programs::TcContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use ovl_common::{
    DropReason, Endpoint, Iface,
    wire::{ANYCAST_GATEWAY_MAC, ETH_HDR_LEN, ETH_P_ARP, ETH_P_IP},
};

use crate::{
    arp, encap, gateway,
    maps::{self, EgressFlow},
    packet::Frame,
    stats,
};

/// Headers egress reads: Ethernet, IPv4 with options, TCP data offset.
/// Frames shorter than that fail the bounds checks of what they lack and
/// count as malformed.
pub const MAX_HDR_LEN: u32 = (ETH_HDR_LEN + 60 + 20) as u32;

/// Switches one frame (headers in `frame`) the container of `iface` sent
/// from the veth whose host end is `ifindex`. `cached` is the endpoint
/// this CPU's flow cache holds for the frame's IPv4 destination, if any
/// ([`cached_flow`]).
#[inline(always)]
pub fn switch(
    ctx: &TcContext,
    frame: &Frame,
    ifindex: u32,
    iface: &Iface,
    cached: Option<Endpoint>,
) -> Result<i32, DropReason> {
    let eth: EthHdr = frame.read(0)?;
    let vni = iface.vni;
    if eth.src_addr != iface.mac {
        return Err(DropReason::SpoofedSource);
    }

    if eth.ether_type == ETH_P_ARP.to_be() {
        arp::answer_request(frame, iface)?;
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
        return gateway::forward(ctx, ifindex, iface, &ip, cached);
    }
    let dst = destination(ifindex, vni, ip.dst_addr, cached).ok_or(DropReason::NoEndpoint)?;
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

/// The interface and destination endpoint this CPU cached for the flow of
/// `frame` (an IPv4 frame from the veth whose host end is `ifindex`), if
/// the maps have not changed since: the two hash lookups of egress
/// (`OVL_IFACES`, `OVL_ENDPOINTS`) made once per flow, CPU and epoch
/// instead of per frame. `None` looks them up.
#[inline(always)]
pub fn cached_flow(frame: &Frame, ifindex: u32) -> Option<EgressFlow> {
    let eth: EthHdr = frame.read(0).ok()?;
    if eth.ether_type != ETH_P_IP.to_be() {
        return None;
    }
    let ip: Ipv4Hdr = frame.read(ETH_HDR_LEN).ok()?;
    let flow = maps::EGRESS_FLOWS.get(flow_slot(ifindex, ip.dst_addr))?;
    let hit = flow.epoch != 0
        && flow.epoch == maps::epoch()
        && flow.ifindex == ifindex
        && flow.dst_addr == ip.dst_addr;
    hit.then_some(*flow)
}

/// The endpoint `dst_addr` of network `vni`, for a frame from the host end
/// `ifindex`: `cached` when the flow cache had it, else looked up, and
/// then cached.
#[inline(always)]
pub fn destination(
    ifindex: u32,
    vni: u32,
    dst_addr: [u8; 4],
    cached: Option<Endpoint>,
) -> Option<Endpoint> {
    if cached.is_some() {
        return cached;
    }
    let dst = maps::endpoint(vni, dst_addr)?;
    remember(ifindex, dst_addr);
    Some(dst)
}

/// Caches the interface behind `ifindex` and its network's endpoint
/// `dst_addr` as the maps say them in the current epoch: read after the
/// epoch (`maps::epoch_fenced`), the entries can be no older than it,
/// whatever the frame itself was switched on.
#[inline(always)]
fn remember(ifindex: u32, dst_addr: [u8; 4]) {
    let epoch = maps::epoch_fenced();
    if epoch == 0 {
        return;
    }
    let Some(iface) = maps::iface(ifindex) else {
        return;
    };
    let Some(dst) = maps::endpoint(iface.vni, dst_addr) else {
        return;
    };
    let Some(flow) = maps::EGRESS_FLOWS.get_ptr_mut(flow_slot(ifindex, dst_addr)) else {
        return;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        *flow = EgressFlow {
            epoch,
            ifindex,
            dst_addr,
            iface,
            dst,
            _pad: 0,
        };
    }
}

/// The slot of [`maps::EGRESS_FLOWS`] for a flow.
#[inline(always)]
fn flow_slot(ifindex: u32, dst_addr: [u8; 4]) -> u32 {
    maps::flow_slot(ifindex ^ u32::from_ne_bytes(dst_addr).rotate_left(16))
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
