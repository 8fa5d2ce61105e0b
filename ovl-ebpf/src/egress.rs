//! Container egress, at TC ingress of the host end of a container's veth:
//! source checks (anti-spoofing), proxy ARP, then same-node switching,
//! encapsulation to the remote VTEP, or the gateway for frames sent to it.

use aya_ebpf::{helpers::bpf_redirect_peer, programs::TcContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use ovl_common::{
    DropReason, Endpoint, Iface, NextHop,
    maps::flow_cache::egress_slot,
    wire::{ANYCAST_GATEWAY_MAC, ETH_HDR_LEN, ETH_P_ARP, ETH_P_IP},
};

use crate::{
    arp, encap, gateway, ipv4,
    maps::{self, EgressFlow},
    packet::Frame,
    stats,
    verdict::no_endpoint_for,
};

/// Headers egress reads: Ethernet, IPv4 with options, TCP data offset.
/// Frames shorter than that fail the bounds checks of what they lack and
/// count as malformed.
pub const MAX_HDR_LEN: u32 = (ETH_HDR_LEN + 60 + 20) as u32;

/// Switches one frame (headers in `frame`) the container of `iface` sent
/// from the veth whose host end is `ifindex`; `flow` is the frame's flow
/// in this CPU's flow cache ([`Flow::of`]).
#[inline(always)]
pub fn switch(
    ctx: &TcContext,
    frame: &Frame,
    ifindex: u32,
    iface: &Iface,
    flow: &Flow,
) -> Result<i32, DropReason> {
    let eth: EthHdr = frame.read(0)?;
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
    // A packet its frame does not hold whole (cut short, or lengths that
    // lie) would be counted switched or sent only for the stack it
    // reaches to drop it: the container's, or the remote VTEP's decap. A
    // GSO super-packet's total length is its whole length too, up to 64
    // KiB (BIG TCP's beyond, whose headers say 0, ovl does not carry: its
    // outer headers have 16-bit lengths too).
    if !ipv4::is_whole(&ip, ctx.len() as usize) {
        return Err(DropReason::Malformed);
    }
    if ip.src_addr != iface.addr {
        return Err(DropReason::SpoofedSource);
    }
    if eth.dst_addr == ANYCAST_GATEWAY_MAC {
        return gateway::forward(ctx, ifindex, iface, &ip, flow);
    }
    let dst = flow
        .destination(iface.vni)
        .ok_or(no_endpoint_for(eth.dst_addr))?;
    if dst.is_local() {
        if dst.ifindex == ifindex {
            return Err(DropReason::NoEndpoint);
        }
        let mut eth = eth;
        eth.dst_addr = dst.mac;
        frame.write(0, eth)?;
        stats::local(iface.stats_slot, stats::gso_segs(ctx));
        return Ok(to_container(dst.ifindex));
    }
    let node = maps::node_config().ok_or(DropReason::NoRoute)?;
    encap::to_remote(ctx, ifindex, iface, node, &dst, &ip, flow)
}

/// A frame's flow in this CPU's egress flow cache: frames from the
/// container veth whose host end is `ifindex` to the IPv4 address
/// `dst_addr`, and what the cache held for them when the frame came, if
/// the maps have not changed since. The hash lookups of egress
/// (`OVL_IFACES`, `OVL_ENDPOINTS`, `OVL_NEXT_HOPS`) are made once per flow,
/// CPU and epoch (and next hop lifetime) instead of per frame.
pub struct Flow {
    ifindex: u32,
    dst_addr: [u8; 4],
    /// Its slot in [`maps::EGRESS_FLOWS`].
    slot: u32,
    cached: Option<EgressFlow>,
}

impl Flow {
    /// The flow of `frame`, from the host end `ifindex`. A frame that is no
    /// IPv4 has none (nothing cached, nothing to cache).
    #[inline(always)]
    pub fn of(frame: &Frame, ifindex: u32) -> Flow {
        let Some(dst_addr) = ipv4_destination(frame) else {
            return Flow {
                ifindex,
                dst_addr: [0; 4],
                slot: egress_slot(ifindex, [0; 4]),
                cached: None,
            };
        };
        let slot = egress_slot(ifindex, dst_addr);
        let cached = maps::EGRESS_FLOWS
            .get(slot)
            .filter(|f| f.holds(ifindex, dst_addr))
            .copied();
        Flow {
            ifindex,
            dst_addr,
            slot,
            cached,
        }
    }

    /// The interface the cache holds (`OVL_IFACES`' entry for `ifindex`).
    #[inline(always)]
    pub fn iface(&self) -> Option<Iface> {
        self.cached.map(|f| f.iface)
    }

    /// The endpoint of network `vni` the frame is for (`vni` is the
    /// interface's): the cache's, else looked up, and then cached.
    #[inline(always)]
    pub fn destination(&self, vni: u32) -> Option<Endpoint> {
        if let Some(f) = self.cached {
            return Some(f.dst);
        }
        let dst = maps::endpoint(vni, self.dst_addr)?;
        self.remember();
        Some(dst)
    }

    /// The next hop the cache holds for the destination's VTEP; check it
    /// with `maps::is_fresh` (`learned_ns` 0: none).
    #[inline(always)]
    pub fn hop(&self) -> NextHop {
        self.cached.map_or(NextHop::default(), |f| f.hop)
    }

    /// Caches the interface behind `ifindex` and its network's endpoint
    /// `dst_addr` as the maps say them in the current epoch: read after
    /// the epoch (`maps::epoch_fenced`), the entries can be no older than
    /// it, whatever the frame itself was switched on. The next hop follows
    /// ([`remember_hop`](Self::remember_hop)).
    #[inline(always)]
    fn remember(&self) {
        let epoch = maps::epoch_fenced();
        if epoch == 0 {
            return;
        }
        let Some(iface) = maps::iface(self.ifindex) else {
            return;
        };
        let Some(dst) = maps::endpoint(iface.vni, self.dst_addr) else {
            return;
        };
        let Some(slot) = maps::EGRESS_FLOWS.get_ptr_mut(self.slot) else {
            return;
        };
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            *slot = EgressFlow {
                epoch,
                ifindex: self.ifindex,
                dst_addr: self.dst_addr,
                iface,
                dst,
                _pad: 0,
                hop: NextHop::default(),
            };
        }
    }

    /// Caches `hop`, which a frame of this flow to `vtep` just found fresh
    /// in `OVL_NEXT_HOPS` or learned from the FIB, if the flow's slot holds
    /// the flow in the current epoch with `vtep` as its destination's. A
    /// copy is no older than the entry it copies, which the agent renews
    /// the epoch after changing, so it is used no longer than the entry
    /// would have been.
    #[inline(always)]
    pub fn remember_hop(&self, vtep: [u8; 4], hop: &NextHop) {
        let Some(slot) = maps::EGRESS_FLOWS.get_ptr_mut(self.slot) else {
            return;
        };
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        let slot = unsafe { &mut *slot };
        if slot.holds(self.ifindex, self.dst_addr) && slot.dst.vtep == vtep {
            slot.hop = *hop;
        }
    }
}

/// The IPv4 destination of `frame`, if it is IPv4.
#[inline(always)]
fn ipv4_destination(frame: &Frame) -> Option<[u8; 4]> {
    let eth: EthHdr = frame.read(0).ok()?;
    if eth.ether_type != ETH_P_IP.to_be() {
        return None;
    }
    let ip: Ipv4Hdr = frame.read(ETH_HDR_LEN).ok()?;
    Some(ip.dst_addr)
}

impl EgressFlow {
    /// Whether this slot holds the flow from `ifindex` to `dst_addr` in the
    /// maps' current epoch.
    #[inline(always)]
    fn holds(&self, ifindex: u32, dst_addr: [u8; 4]) -> bool {
        self.epoch != 0
            && self.epoch == maps::epoch()
            && self.ifindex == ifindex
            && self.dst_addr == dst_addr
    }
}

/// Hands a frame to the container end of the veth whose host end is
/// `ifindex` (straight into its ingress, skipping the host backlog).
#[inline(always)]
pub fn to_container(ifindex: u32) -> i32 {
    // SAFETY: helper call; the action it returns is the program's verdict.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}
