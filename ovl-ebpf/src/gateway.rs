//! Every subnet's gateway, in the data path: a frame a container sends to
//! the anycast gateway MAC is routed to an endpoint of any subnet of its
//! network (TTL − 1, MACs rewritten — never through the host stack), handed
//! to the host's stack when its destination is outside the network
//! (external egress), or answered (echo to the gateway, ICMP errors).

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use ovl_common::{
    DropReason, Iface,
    maps::{egress_mark, network_flags},
    wire::{
        ANYCAST_GATEWAY_MAC, ETH_HDR_LEN, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HDR_LEN,
        IPPROTO_ICMP, IPPROTO_UDP, IPV4_FRAG_OFFSET, IPV4_HDR_LEN, checksum_replace16,
    },
};

use crate::{
    egress::{Flow, to_container},
    encap, icmp, maps,
    packet::Frame,
    stats,
};

/// `PACKET_HOST` (uapi if_packet.h): the frame is for this host.
const PACKET_HOST: u32 = 0;

/// Routes the IPv4 packet `ip` that the container of `iface` (host end
/// `ifindex`) sent to its gateway; `flow` is its flow in the flow cache.
#[inline(always)]
pub fn forward(
    ctx: &TcContext,
    ifindex: u32,
    iface: &Iface,
    ip: &Ipv4Hdr,
    flow: &Flow,
) -> Result<i32, DropReason> {
    let vni = iface.vni;
    if let Some(dst) = flow.destination(vni) {
        if dst.ifindex == ifindex {
            // Its own address goes through its loopback, never here.
            return Err(DropReason::NoEndpoint);
        }
        if ip.ttl <= 1 {
            return icmp::time_exceeded(ctx, ifindex, iface);
        }
        let frame = Frame::of_skb(ctx);
        let routed = decrement_ttl(&frame, ip)?;
        let mut eth: EthHdr = frame.read(0)?;
        eth.src_addr = ANYCAST_GATEWAY_MAC;
        eth.dst_addr = dst.mac;
        frame.write(0, eth)?;
        if dst.is_local() {
            stats::local(iface.stats_slot, stats::gso_segs(ctx));
            return Ok(to_container(dst.ifindex));
        }
        let node = maps::node_config().ok_or(DropReason::NoRoute)?;
        return encap::to_remote(ctx, ifindex, iface, node, &dst, &routed, flow);
    }
    match maps::subnet_of(vni, ip.dst_addr) {
        Some(subnet) if subnet.gateway == ip.dst_addr => icmp::echo_reply(ctx, ifindex, iface, ip),
        Some(_) => Err(DropReason::NoEndpoint),
        None => to_host(ctx, ifindex, iface, ip),
    }
}

/// External egress (Docker's gwbridge role): the packet goes on to the
/// host's stack, marked with its network, where the host routes it and
/// masquerades it behind its own address; replies come back by the mark
/// conntrack keeps. The host's forwarding decrements the TTL.
#[inline(always)]
fn to_host(ctx: &TcContext, ifindex: u32, iface: &Iface, ip: &Ipv4Hdr) -> Result<i32, DropReason> {
    let vni = iface.vni;
    if iface.network_flags & network_flags::INTERNAL != 0 {
        return Err(DropReason::NoRoute);
    }
    if ip.ttl <= 1 {
        // The host would drop it and answer to an address it cannot route
        // back: the gateway answers instead, as the hop it is.
        return icmp::time_exceeded(ctx, ifindex, iface);
    }
    if claims_the_node(ctx, ip)? {
        return Err(DropReason::SpoofedSource);
    }
    ctx.set_mark(egress_mark(vni));
    // Sent to the gateway's MAC, the frame is "for another host" to the
    // stack, which would drop it.
    ctx.change_type(PACKET_HOST)
        .map_err(|_| DropReason::Malformed)?;
    stats::egress(iface.stats_slot, stats::gso_segs(ctx));
    Ok(TC_ACT_OK)
}

/// Whether `ip` would reach another node as its own node's VXLAN, or as
/// a report about it: UDP to the overlay's VXLAN port, or an ICMP
/// "fragmentation needed" quoting such UDP. Masqueraded behind this
/// node's address, the first would come from this node's VTEP, which the
/// other node trusts for every network this one serves: a container could
/// forge frames of any of them, from any source. The second (which
/// conntrack finds related to nothing and so leaves untranslated) would
/// teach the other node a path MTU no router reported (`pmtu::learn`).
/// Only the first fragment carries the port (a later one cannot overlap
/// it: its offset is 8 bytes at least); the later ones, alone, never
/// reassemble.
#[inline(always)]
fn claims_the_node(ctx: &TcContext, ip: &Ipv4Hdr) -> Result<bool, DropReason> {
    if u16::from_be_bytes(ip.frags) & IPV4_FRAG_OFFSET != 0 {
        return Ok(false);
    }
    let node = maps::node_config().ok_or(DropReason::NoRoute)?;
    let l4 = ETH_HDR_LEN + usize::from(ip.vihl & 0x0f) * 4;
    let frame = Frame::of_skb(ctx);
    match ip.proto {
        IPPROTO_UDP => {
            // Source and destination port; a first fragment too short to
            // hold them is malformed (the host would drop it too).
            let ports: [u8; 4] = frame.read(l4)?;
            Ok(u16::from_be_bytes([ports[2], ports[3]]) == node.vxlan_port())
        }
        IPPROTO_ICMP => {
            // ICMP header, the quoted IPv4 header (without options, as
            // decap reads it) and the quoted UDP ports; shorter is no
            // report decap would read.
            let Ok(report) = frame.read::<[u8; REPORT_LEN]>(l4) else {
                return Ok(false);
            };
            let quoted_port = u16::from_be_bytes([report[REPORT_LEN - 2], report[REPORT_LEN - 1]]);
            Ok(report[0] == ICMP_DEST_UNREACH
                && report[1] == ICMP_FRAG_NEEDED
                && report[ICMP_HDR_LEN + 9] == IPPROTO_UDP
                && quoted_port == node.vxlan_port())
        }
        _ => Ok(false),
    }
}

/// Bytes of an ICMP report decap reads: header, quoted IPv4 header, UDP
/// ports.
const REPORT_LEN: usize = ICMP_HDR_LEN + IPV4_HDR_LEN + 4;

/// Decrements the TTL of the IPv4 header at `ETH_HDR_LEN` (RFC 1812
/// §5.3.1), updating its checksum incrementally (RFC 1624); returns the
/// new header.
#[inline(always)]
fn decrement_ttl(frame: &Frame, ip: &Ipv4Hdr) -> Result<Ipv4Hdr, DropReason> {
    let mut routed = *ip;
    routed.ttl = ip.ttl - 1;
    let check = checksum_replace16(
        u16::from_be_bytes(ip.check),
        u16::from_be_bytes([ip.ttl, ip.proto]),
        u16::from_be_bytes([routed.ttl, ip.proto]),
    );
    routed.check = check.to_be_bytes();
    frame.write(ETH_HDR_LEN, routed)?;
    Ok(routed)
}
