//! VXLAN decapsulation on the underlay (RFC 7348 §4.1): validation shared
//! by the XDP and TC hooks, then each hook's way to strip and deliver.

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action},
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_redirect_peer, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr, vxlan::VxlanHdr};
use ovl_common::{
    DropReason, Endpoint, NodeConfig,
    maps::{flow_cache::decap_slot, network_flags},
    wire::{
        ECN_CE, ECN_MASK, ECN_NOT_ECT, ETH_HDR_LEN, ETH_P_IP, IPPROTO_ICMP, IPPROTO_TCP,
        IPPROTO_UDP, IPV4_FRAG_MASK, IPV4_FRAG_OFFSET, IPV4_HDR_LEN, UDP_HDR_LEN, VXLAN_FLAG_I,
        checksum_replace16,
    },
};

use crate::{
    ipv4,
    maps::{self, DecapFlow},
    packet::Frame,
    pmtu, stats,
    verdict::{Dropped, OnVni, no_endpoint_for},
};

/// The headers decap reads when the outer IPv4 header has no options:
/// outer Ethernet, IPv4, UDP, VXLAN, inner Ethernet and IPv4. TC decap
/// pulls no more than that into the linear area (plus the options, when
/// there are any), so the payload of a TCP segment stays in the page
/// fragments it came in and GRO merges those into its neighbour's instead
/// of chaining whole segments (see BENCHMARKS.md, "Wire-like TCP 1
/// stream").
pub const HDR_LEN: u32 =
    (ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN + 8 + ETH_HDR_LEN + IPV4_HDR_LEN) as u32;

/// Bytes of options in the outer IPv4 header of `frame`: 0 when it has
/// none, or when the frame is no IPv4 (`inspect` leaves that to the host).
#[inline(always)]
pub fn outer_options_len(frame: &Frame) -> u32 {
    let Ok(eth) = frame.read::<EthHdr>(0) else {
        return 0;
    };
    match frame.read::<Ipv4Hdr>(ETH_HDR_LEN) {
        Ok(ip) if eth.ether_type == ETH_P_IP.to_be() && ip.vihl >> 4 == 4 => {
            u32::from(ip.vihl & 0x0f).saturating_sub(5) * 4
        }
        _ => 0,
    }
}

/// Padding a sender may add after a short inner IPv4 packet, to fill its
/// Ethernet frame to the 60-byte minimum (14 + 20 + 26).
const MAX_INNER_PADDING: usize = 26;

/// A validated VXLAN frame for a local container.
pub struct Delivery {
    /// The network.
    pub vni: u32,
    /// Host end of the destination container's veth.
    pub ifindex: u32,
    /// The destination container's MAC.
    pub mac: [u8; 6],
    /// Offset of the inner Ethernet header: bytes to strip.
    pub inner_offset: usize,
    /// The network's MTU.
    pub mtu: u32,
    /// The network's counters.
    pub slot: u32,
    /// The inner IPv4 protocol (TCP frames are the ones GRO merges).
    pub inner_proto: u8,
    /// The inner IPv4 packet's length (its header's total length).
    pub inner_len: u32,
}

/// Decides what to do with an underlay frame of `frame_len` bytes (linear
/// or not): `Ok(None)` when it is not VXLAN addressed to this VTEP (the
/// host stack gets it; an ICMP report of a smaller path MTU is read on the
/// way), a `Delivery` when it is valid VXLAN for a local endpoint, a drop
/// otherwise. `decrypted` says the frame comes from the agent's crypto
/// device (it arrived encrypted and authenticated); an encrypted network's
/// frames are accepted from there only, and nothing from there goes to
/// the host stack. A delivery's inner packet carries the congestion mark
/// of the outer header (RFC 6040).
#[inline(always)]
pub fn inspect(
    frame: &Frame,
    frame_len: u32,
    node: &NodeConfig,
    decrypted: bool,
) -> Result<Option<Delivery>, Dropped> {
    match inspect_vxlan(frame, frame_len, node, decrypted)? {
        // What the agent opened is VXLAN for a container here or nothing:
        // the host's stack would answer anything else outside the tunnel,
        // in clear (an ICMP error quoting it: VXLAN for the cluster's
        // previous port from a peer that has not switched yet, say).
        None if decrypted => Err(Dropped::unattributed(DropReason::Unsupported)),
        other => Ok(other),
    }
}

/// [`inspect`], but what is no VXLAN for this VTEP goes to the host
/// (`Ok(None)`) wherever it came from.
#[inline(always)]
fn inspect_vxlan(
    frame: &Frame,
    frame_len: u32,
    node: &NodeConfig,
    decrypted: bool,
) -> Result<Option<Delivery>, Dropped> {
    let vtep = node.vtep;
    let Ok(eth) = frame.read::<EthHdr>(0) else {
        return Ok(None);
    };
    if eth.ether_type != ETH_P_IP.to_be() {
        return Ok(None);
    }
    let Ok(ip) = frame.read::<Ipv4Hdr>(ETH_HDR_LEN) else {
        return Ok(None);
    };
    if ip.dst_addr != vtep || ip.vihl >> 4 != 4 {
        return Ok(None);
    }
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ihl < IPV4_HDR_LEN {
        return Ok(None);
    }
    let udp_off = ETH_HDR_LEN + ihl;
    // ovl switches whole packets only (and sends with DF, as RFC 7348
    // §4.3 asks). A first fragment that is VXLAN to this VTEP is refused,
    // counted (the host has no socket to reassemble it for); the later
    // ones carry no port to tell, and are the host's to time out.
    let frags = u16::from_be_bytes(ip.frags);
    if frags & IPV4_FRAG_MASK != 0 {
        let first = frags & IPV4_FRAG_OFFSET == 0;
        return match frame.read::<UdpHdr>(udp_off) {
            Ok(udp) if first && ip.proto == IPPROTO_UDP && udp.dst_port() == node.vxlan_port() => {
                Err(Dropped::unattributed(DropReason::Unsupported))
            }
            _ => Ok(None),
        };
    }
    if ip.proto == IPPROTO_ICMP {
        // Path MTU reports come from the underlay's routers. One the
        // crypto device opened came through a peer's tunnel, from no
        // router on the way (and `inspect` drops it): it teaches nothing.
        if !decrypted && pmtu::learn(frame, udp_off, node) {
            stats::path_mtu_report();
        }
        return Ok(None);
    }
    if ip.proto != IPPROTO_UDP {
        return Ok(None);
    }
    let Ok(udp) = frame.read::<UdpHdr>(udp_off) else {
        return Ok(None);
    };
    if udp.dst_port() != node.vxlan_port() {
        return Ok(None);
    }

    // VXLAN addressed to this VTEP: from here on every failure is a drop.
    // The outer lengths must agree with each other and with the frame, as
    // the host's IPv4 and UDP would check: a frame shorter than its IPv4
    // header says is cut, and a UDP length other than the IPv4 payload's
    // was not written by a VTEP.
    let vxlan_off = udp_off + UDP_HDR_LEN;
    let inner_offset = vxlan_off + 8;
    let claimed = usize::from(u16::from_be_bytes(ip.tot_len));
    if claimed < inner_offset + IPV4_HDR_LEN
        || usize::from(udp.len()) != claimed - ihl
        || claimed + ETH_HDR_LEN > frame_len as usize
    {
        return Err(Dropped::unattributed(DropReason::Malformed));
    }
    let vx: VxlanHdr = frame.read(vxlan_off).map_err(Dropped::unattributed)?;
    if vx.flags & VXLAN_FLAG_I == 0 {
        return Err(Dropped::unattributed(DropReason::Malformed));
    }
    let vni = vx.vni();
    // The inner frame's room: from its Ethernet header to the outer
    // packet's end.
    let inner_room = claimed + ETH_HDR_LEN - inner_offset;
    let outer = Outer {
        src_vtep: ip.src_addr,
        tos: ip.tos,
        inner_room,
    };
    if let Some(delivery) = cached_delivery(frame, vni, &outer, inner_offset, decrypted) {
        return Ok(Some(delivery));
    }
    // The sender's VTEP entry carries its network: one lookup for both.
    let Some(network) = maps::vtep(vni, ip.src_addr).map(|v| v.network) else {
        return Err(unknown_sender(vni, decrypted));
    };
    let slot = network.stats_slot;
    if network.flags & network_flags::ENCRYPTED != 0 && !decrypted {
        return Err(Dropped::on(vni, slot, DropReason::Unencrypted));
    }

    let inner_eth: EthHdr = frame.read(inner_offset).on_vni(vni, slot)?;
    if inner_eth.ether_type != ETH_P_IP.to_be() {
        return Err(Dropped::on(vni, slot, DropReason::Unsupported));
    }
    let inner_ip: Ipv4Hdr = frame.read(inner_offset + ETH_HDR_LEN).on_vni(vni, slot)?;
    if !whole_ipv4(&inner_ip, inner_room) {
        return Err(Dropped::on(vni, slot, DropReason::Malformed));
    }
    match maps::endpoint(vni, inner_ip.dst_addr) {
        Some(ep) if ep.is_local() => {
            carry_congestion_mark(frame, ip.tos, inner_offset, &inner_ip).on_vni(vni, slot)?;
            remember(vni, ip.src_addr, inner_ip.dst_addr);
            Ok(Some(Delivery {
                vni,
                ifindex: ep.ifindex,
                mac: ep.mac,
                inner_offset,
                mtu: network.mtu,
                slot,
                inner_proto: inner_ip.proto,
                inner_len: u32::from(u16::from_be_bytes(inner_ip.tot_len)),
            }))
        }
        _ => Err(Dropped::on(vni, slot, no_endpoint_for(inner_eth.dst_addr))),
    }
}

/// What decap reads of the outer headers beyond the VNI.
struct Outer {
    /// The sending VTEP.
    src_vtep: [u8; 4],
    /// The outer TOS byte, with its ECN field.
    tos: u8,
    /// Bytes from the inner Ethernet header to the outer packet's end.
    inner_room: usize,
}

/// Whether the inner packet `inner_ip` is whole: an IPv4 header (version
/// 4, at least 20 bytes, no longer than the packet it heads, as the
/// container's stack checks before anything else: what fails that would
/// be counted delivered and then dropped there) of a packet that fills
/// the `inner_room` bytes its outer headers leave it (with its Ethernet
/// header), but for a short frame's padding. More is a batch of datagrams
/// that UDP GRO on the underlay merged (`rx-udp-gro-forwarding`),
/// rewriting the outer lengths only: delivered, all but the first would
/// be lost while counted received. Less is a cut packet.
#[inline(always)]
fn whole_ipv4(inner_ip: &Ipv4Hdr, inner_room: usize) -> bool {
    ipv4::is_whole(inner_ip, inner_room)
        && inner_room - (ETH_HDR_LEN + ipv4::total_len(inner_ip)) <= MAX_INNER_PADDING
}

/// Carries a congestion mark of the outer header (its TOS `outer_tos`)
/// onto the inner packet `inner` (at `inner_offset` + Ethernet), RFC 6040
/// §4.2, normal mode: encapsulation copied the inner ECN field out, so a
/// router on the underlay marked the outer header instead of dropping.
/// An outer CE over an inner packet that is not ECN-capable is dropped as
/// the RFC says, counted as `Congestion` (its sender would never hear of
/// the mark; an operator should look at the underlay, not at senders).
#[inline(always)]
fn carry_congestion_mark(
    frame: &Frame,
    outer_tos: u8,
    inner_offset: usize,
    inner: &Ipv4Hdr,
) -> Result<(), DropReason> {
    if outer_tos & ECN_MASK != ECN_CE {
        return Ok(());
    }
    match inner.tos & ECN_MASK {
        ECN_CE => Ok(()),
        ECN_NOT_ECT => Err(DropReason::Congestion),
        _ => {
            let mut marked = *inner;
            marked.tos |= ECN_CE;
            let old = u16::from_be_bytes([inner.vihl, inner.tos]);
            let new = u16::from_be_bytes([marked.vihl, marked.tos]);
            marked.check =
                checksum_replace16(u16::from_be_bytes(inner.check), old, new).to_be_bytes();
            frame.write(inner_offset + ETH_HDR_LEN, marked)
        }
    }
}

/// The delivery this CPU cached for the flow of this frame (VXLAN of
/// network `vni` with outer headers `outer`, inner headers at
/// `inner_offset`), if the maps have not changed since: the two hash
/// lookups of `inspect` (sender VTEP, endpoint) made once per flow, CPU and
/// epoch instead of per frame. `None` sends the frame the whole way, which
/// also decides every drop (and marks congestion: rare, off the cache).
#[inline(always)]
fn cached_delivery(
    frame: &Frame,
    vni: u32,
    outer: &Outer,
    inner_offset: usize,
    decrypted: bool,
) -> Option<Delivery> {
    let src_vtep = outer.src_vtep;
    let inner_eth: EthHdr = frame.read(inner_offset).ok()?;
    if inner_eth.ether_type != ETH_P_IP.to_be() || outer.tos & ECN_MASK == ECN_CE {
        return None;
    }
    let inner_ip: Ipv4Hdr = frame.read(inner_offset + ETH_HDR_LEN).ok()?;
    if !whole_ipv4(&inner_ip, outer.inner_room) {
        return None;
    }
    let flow = maps::DECAP_FLOWS.get(decap_slot(vni, src_vtep, inner_ip.dst_addr))?;
    let hit = flow.epoch != 0
        && flow.epoch == maps::epoch()
        && flow.vni == vni
        && flow.src_vtep == src_vtep
        && flow.dst_addr == inner_ip.dst_addr
        // Clear VXLAN of an encrypted network is refused the whole way.
        && (flow.network_flags & network_flags::ENCRYPTED == 0 || decrypted);
    hit.then(|| Delivery {
        vni,
        ifindex: flow.ifindex,
        mac: flow.mac,
        inner_offset,
        mtu: flow.mtu,
        slot: flow.stats_slot,
        inner_proto: inner_ip.proto,
        inner_len: u32::from(u16::from_be_bytes(inner_ip.tot_len)),
    })
}

/// Caches the delivery of VXLAN of network `vni` from `src_vtep` for
/// `dst_addr`, which `inspect` has just decided, as the maps say it in the
/// current epoch: read after the epoch (`maps::epoch_fenced`), the entries
/// can be no older than it, whatever the frame itself was decided on.
#[inline(always)]
fn remember(vni: u32, src_vtep: [u8; 4], dst_addr: [u8; 4]) {
    let epoch = maps::epoch_fenced();
    if epoch == 0 {
        return;
    }
    let Some(network) = maps::vtep(vni, src_vtep).map(|v| v.network) else {
        return;
    };
    let Some(ep) = maps::endpoint(vni, dst_addr).filter(Endpoint::is_local) else {
        return;
    };
    let Some(flow) = maps::DECAP_FLOWS.get_ptr_mut(decap_slot(vni, src_vtep, dst_addr)) else {
        return;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        *flow = DecapFlow {
            epoch,
            vni,
            src_vtep,
            dst_addr,
            ifindex: ep.ifindex,
            mac: ep.mac,
            _pad: [0; 2],
            mtu: network.mtu,
            network_flags: network.flags,
            stats_slot: network.stats_slot,
        };
    }
}

/// Why VXLAN from a sender that is no VTEP of network `vni` is refused.
/// Off the fast path, the network's own entry tells a network this node
/// does not serve from an unknown sender, and clear VXLAN of an encrypted
/// network is refused as such, whoever sent it.
#[inline(always)]
fn unknown_sender(vni: u32, decrypted: bool) -> Dropped {
    match maps::network(vni) {
        None => Dropped::unattributed(DropReason::UnknownVni),
        Some(n) if n.flags & network_flags::ENCRYPTED != 0 && !decrypted => {
            Dropped::on(vni, n.stats_slot, DropReason::Unencrypted)
        }
        Some(n) => Dropped::on(vni, n.stats_slot, DropReason::UnknownVtep),
    }
}

/// XDP: strip the outer headers and redirect the inner frame to the
/// container's veth.
#[inline(always)]
pub fn deliver_xdp(ctx: &XdpContext, frame: &Frame, d: &Delivery) -> Result<u32, Dropped> {
    // The destination MAC is the endpoint's own, whatever the sender wrote.
    let mut inner_eth: EthHdr = frame.read(d.inner_offset).on_vni(d.vni, d.slot)?;
    inner_eth.dst_addr = d.mac;
    frame
        .write(d.inner_offset, inner_eth)
        .on_vni(d.vni, d.slot)?;
    // SAFETY: helper call on the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, d.inner_offset as i32) } != 0 {
        return Err(Dropped::on(d.vni, d.slot, DropReason::Malformed));
    }
    // A frame beyond the container's MTU (a GRO super-packet under generic
    // XDP, say) would be refused by the redirect after this program counted
    // it delivered: refuse it here, counted.
    let inner_len = (ctx.data_end() - ctx.data()) as u64;
    if inner_len > u64::from(d.mtu) + ETH_HDR_LEN as u64 {
        return Err(Dropped::on(d.vni, d.slot, DropReason::TooBig));
    }
    stats::rx(d.slot, 1, inner_len);
    // SAFETY: helper call; the action it returns is the program's verdict.
    Ok(unsafe { bpf_redirect(d.ifindex, 0) } as u32)
}

/// TC: strip the outer headers (keeping the socket buffer's GSO state
/// valid) and hand the frame to the container side of its veth.
#[inline(always)]
pub fn deliver_tc(ctx: &TcContext, frame: &Frame, d: &Delivery) -> Result<i32, Dropped> {
    // SAFETY: reading a field of the program's own context.
    let merged = unsafe { (*ctx.skb.skb).gso_size } != 0;
    // Read before the strip, which has the kernel count the segments anew.
    let packets = stats::gso_segs(ctx);
    // A single packet beyond the network's MTU (a sender ignoring it) would
    // be dropped by the veth after this program counted it delivered, as
    // in XDP: refuse it here, counted. (A super-packet's segments were
    // sized by its sender's MTU.)
    if !merged && d.inner_len > d.mtu {
        return Err(Dropped::on(d.vni, d.slot, DropReason::TooBig));
    }
    let inner_eth: EthHdr = frame.read(d.inner_offset).on_vni(d.vni, d.slot)?;
    // Everything between the outer Ethernet header (kept, rewritten below)
    // and the inner IPv4 header goes: outer IPv4, UDP, VXLAN, inner Ethernet.
    let strip = d.inner_offset as i32;
    ctx.adjust_room(
        -strip,
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )
    .map_err(|_| Dropped::on(d.vni, d.slot, DropReason::Malformed))?;
    let frame = Frame::of_skb(ctx);
    frame
        .write(
            0,
            EthHdr {
                dst_addr: d.mac,
                src_addr: inner_eth.src_addr,
                ether_type: ETH_P_IP.to_be(),
            },
        )
        .on_vni(d.vni, d.slot)?;
    stats::rx(d.slot, packets, u64::from(ctx.len()));
    // A TCP frame of wire size leaves through the host end of the veth, so
    // the container end's NAPI merges it with its neighbours (GRO) before
    // the container's stack sees it: the host end has TSO off for that
    // (veth_skb_is_eligible_for_gro). A GSO super-packet (an underlay with
    // offloads) is merged already, and that TSO-less egress would split
    // it; anything but TCP (UDP, ICMP) has nothing for GRO to merge, and
    // the queue and NAPI hop would only cost it: both go straight into the
    // container end's ingress. A UDP or ICMP flow takes one way only, so
    // the two cannot reorder it. A lone small TCP segment (request and
    // response traffic) goes straight in as well when nothing can still be
    // queued at the host end (`through_host_end`). (A TCP flow on
    // an underlay with offloads can mix super-packets and single segments,
    // which take different ways: a single segment queued at the host end
    // can be overtaken by the super-packet after it. TCP's reordering
    // detection takes that; how often it happens was not measured.)
    let via_host_end =
        !merged && d.inner_proto == IPPROTO_TCP && through_host_end(d.inner_len, d.mtu);
    // SAFETY: helper calls; the action they return is the program's verdict.
    Ok(unsafe {
        if via_host_end {
            bpf_redirect(d.ifindex, 0)
        } else {
            bpf_redirect_peer(d.ifindex, 0)
        }
    } as i32)
}

/// How long this CPU must have handed nothing to a container veth's host
/// end before a TCP segment with a little data may skip it. A frame queued
/// there waits for the container end's NAPI poll, which runs in the same
/// softirq pass once the underlay's poll in progress (at most 64 frames, a
/// few tens of microseconds) has ended; a frame sent straight in after
/// that cannot overtake it. What counts is the time since the last frame
/// queued, not since the last frame: once one pause has let a request or
/// a response through, its successors queue nothing and go straight in
/// however closely they follow (until bulk data or a bare acknowledgement
/// is queued again). 20 µs was measured too: request/response no better
/// here, bulk TCP ~1 % slower with more scattered reordering.
const HOST_END_IDLE_NS: u64 = 50_000;

/// The longest IPv4 and TCP headers (no IPv4 options, 40 bytes of TCP
/// options): a TCP packet no longer carries no data, or hardly any.
const MAX_TCP_HEADERS: u32 = IPV4_HDR_LEN as u32 + 60;

/// Whether a decapsulated TCP frame that is no super-packet goes through
/// the host end of its container veth, where GRO merges it with the
/// frames around it, rather than straight into the container. `len` is
/// its IPv4 length, `mtu` its network's.
///
/// - A full-size segment (bulk data): through the host end.
/// - A bare acknowledgement (no longer than the longest headers): through
///   the host end, because a bulk sender's TCP transmits from the core
///   that handles its acknowledgements: handled at once on the
///   decapsulating core, they move more of its transmissions there, and
///   its two cores' segments interleave on the wire (measured: 1.4× the
///   receiver's out-of-order segments and 2–4 % less throughput on the
///   wire-like underlay; BENCHMARKS.md, "Small TCP segments straight
///   in").
/// - Any other (a request's or a response's segment, the short tail of a
///   burst): straight in when this CPU has handed nothing to a host end
///   for [`HOST_END_IDLE_NS`], else through the host end, so it never
///   overtakes segments of its flow still queued there (TCP would take
///   that for loss).
///
/// Per CPU, not per flow: a frame this CPU queued for any container keeps
/// every flow on the host end, which costs no lookup and errs towards the
/// queue. Bulk data costs no clock read: the next other frame counts it
/// as sent just before itself. (A CPU stalled for longer than the idle
/// time between two such frames, the first still queued, would let the
/// second overtake it: one reordered segment.)
#[inline(always)]
fn through_host_end(len: u32, mtu: u32) -> bool {
    let Some(handoff) = maps::HANDOFF.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let handoff = unsafe { &mut *handoff };
    if len >= mtu {
        handoff.bulk_since = 1;
        return true;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let idle = handoff.bulk_since == 0
        && now.wrapping_sub(handoff.latest_ns) >= HOST_END_IDLE_NS
        && len > MAX_TCP_HEADERS;
    if !idle {
        handoff.bulk_since = 0;
        handoff.latest_ns = now;
    }
    !idle
}

/// The XDP action for a drop.
pub const XDP_DROP: u32 = xdp_action::XDP_DROP;
/// The XDP action for "not ours".
pub const XDP_PASS: u32 = xdp_action::XDP_PASS;
