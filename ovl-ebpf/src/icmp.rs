//! ICMP the gateway originates (RFC 792): errors for packets it cannot
//! forward (time exceeded, fragmentation needed), written over the
//! offending packet and sent back to the container that sent it, and echo
//! replies for the gateway's own address.

use aya_ebpf::{helpers::bpf_skb_change_tail, programs::TcContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use ovl_common::{
    DropReason, Iface,
    wire::{
        ANYCAST_GATEWAY_MAC, ETH_HDR_LEN, ETH_P_IP, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY,
        ICMP_ECHO_REQUEST, ICMP_ERROR_FRAME_LEN, ICMP_ERROR_TOS, ICMP_EXC_TTL, ICMP_FRAG_NEEDED,
        ICMP_HDR_LEN, ICMP_QUOTE_LEN, ICMP_TIME_EXCEEDED, IPPROTO_ICMP, IPV4_FRAG_MASK,
        IPV4_FRAG_OFFSET, IPV4_HDR_LEN, ORIGIN_TTL, checksum_replace16, internet_checksum,
    },
};

use crate::{egress::to_container, packet::Frame, stats};

/// Bytes of an ICMP error message: header and quote.
const ICMP_ERROR_LEN: usize = ICMP_HDR_LEN + ICMP_QUOTE_LEN;

/// Answers a packet whose TTL ran out at the gateway with ICMP time
/// exceeded (what makes the gateway a hop in traceroute), counted as a
/// `ttl_exceeded` drop.
#[inline(always)]
pub fn time_exceeded(ctx: &TcContext, ifindex: u32, iface: &Iface) -> Result<i32, DropReason> {
    send_error(
        ctx,
        ifindex,
        iface,
        [ICMP_TIME_EXCEEDED, ICMP_EXC_TTL],
        [0; 4],
        DropReason::TtlExceeded,
    )
}

/// Answers a packet too large for the path to its VTEP with ICMP
/// fragmentation needed carrying `mtu` (RFC 1191 §4), counted as a
/// `path_mtu` drop: the container's stack then sends smaller packets.
#[inline(always)]
pub fn frag_needed(
    ctx: &TcContext,
    ifindex: u32,
    iface: &Iface,
    mtu: u16,
) -> Result<i32, DropReason> {
    let [hi, lo] = mtu.to_be_bytes();
    send_error(
        ctx,
        ifindex,
        iface,
        [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED],
        [0, 0, hi, lo],
        DropReason::PathMtu,
    )
}

/// Whether an ICMP error may be sent about the packet whose IPv4 header
/// (no options) and first 8 bytes are `quote` (RFC 1812 §4.3.2.7, RFC 1122
/// §3.2.2): not about an ICMP error, a packet to a broadcast or multicast
/// address, or a fragment other than the first (the container's source
/// address was checked on the way in).
#[inline(always)]
fn may_answer(quote: &[u8; ICMP_QUOTE_LEN]) -> bool {
    let dst_first_octet = quote[16];
    let broadcast = quote[16..20] == [0xff; 4];
    let multicast = dst_first_octet >= 224;
    let later_fragment = u16::from_be_bytes([quote[6], quote[7]]) & IPV4_FRAG_OFFSET != 0;
    // The ICMP error types (RFC 792, 1812): destination unreachable, source
    // quench, redirect, time exceeded, parameter problem.
    let icmp_error = quote[9] == IPPROTO_ICMP && matches!(quote[IPV4_HDR_LEN], 3 | 4 | 5 | 11 | 12);
    !(broadcast || multicast || later_fragment || icmp_error)
}

/// Rewrites the frame into an ICMP error from the container's gateway
/// that quotes it, and sends it back to the container. The offending
/// packet is counted dropped for `reason`; when no error can be built (IP
/// options, a runt) it is dropped for `reason` without one.
#[inline(always)]
fn send_error(
    ctx: &TcContext,
    ifindex: u32,
    iface: &Iface,
    type_code: [u8; 2],
    rest: [u8; 4],
    reason: DropReason,
) -> Result<i32, DropReason> {
    // Counted as the packets it stands for, read before the rewrite drops
    // its GSO state.
    let packets = stats::gso_segs(ctx);
    let frame = Frame::of_skb(ctx);
    let quote: [u8; ICMP_QUOTE_LEN] = frame.read(ETH_HDR_LEN).map_err(|_| reason)?;
    // Only headers without options: the quote is then exactly header + 8.
    if quote[0] != 0x45 || !may_answer(&quote) {
        return Err(reason);
    }
    // Trims (or pads) the frame to the error's size; also drops GSO state.
    // SAFETY: helper call on the program's own context.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, ICMP_ERROR_FRAME_LEN as u32, 0) };
    if rc != 0 {
        return Err(reason);
    }
    let _ = ctx.pull_data(ICMP_ERROR_FRAME_LEN as u32);
    let frame = Frame::of_skb(ctx);

    let mut message = [0u8; ICMP_ERROR_LEN];
    message[0] = type_code[0];
    message[1] = type_code[1];
    message[4..8].copy_from_slice(&rest);
    message[ICMP_HDR_LEN..].copy_from_slice(&quote);
    let check = internet_checksum(&message).to_be_bytes();
    message[2] = check[0];
    message[3] = check[1];

    frame.write(
        0,
        EthHdr {
            dst_addr: iface.mac,
            src_addr: ANYCAST_GATEWAY_MAC,
            ether_type: ETH_P_IP.to_be(),
        },
    )?;
    frame.write(
        ETH_HDR_LEN,
        ipv4_header(
            (IPV4_HDR_LEN + ICMP_ERROR_LEN) as u16,
            ICMP_ERROR_TOS,
            iface.gateway,
            iface.addr,
        ),
    )?;
    frame.write(ETH_HDR_LEN + IPV4_HDR_LEN, message)?;
    stats::drop(iface.stats_slot, reason, packets);
    Ok(to_container(ifindex))
}

/// Answers an ICMP echo request to the gateway's address in place; any
/// other packet for the gateway is not for ovl to take.
#[inline(always)]
pub fn echo_reply(
    ctx: &TcContext,
    ifindex: u32,
    iface: &Iface,
    ip: &Ipv4Hdr,
) -> Result<i32, DropReason> {
    if ip.proto != IPPROTO_ICMP
        || ip.vihl != 0x45
        || u16::from_be_bytes(ip.frags) & IPV4_FRAG_MASK != 0
    {
        return Err(DropReason::Unsupported);
    }
    let frame = Frame::of_skb(ctx);
    let l4 = ETH_HDR_LEN + IPV4_HDR_LEN;
    let mut icmp: [u8; 4] = frame.read(l4)?;
    if icmp[0] != ICMP_ECHO_REQUEST || icmp[1] != 0 {
        return Err(DropReason::Unsupported);
    }
    let check = checksum_replace16(
        u16::from_be_bytes([icmp[2], icmp[3]]),
        u16::from_be_bytes([ICMP_ECHO_REQUEST, 0]),
        u16::from_be_bytes([ICMP_ECHO_REPLY, 0]),
    )
    .to_be_bytes();
    icmp[0] = ICMP_ECHO_REPLY;
    icmp[2] = check[0];
    icmp[3] = check[1];
    frame.write(l4, icmp)?;

    let mut reply = ipv4_header(
        u16::from_be_bytes(ip.tot_len),
        ip.tos,
        ip.dst_addr,
        ip.src_addr,
    );
    reply.id = ip.id;
    reply.check = ipv4_check(&reply);
    frame.write(ETH_HDR_LEN, reply)?;
    frame.write(
        0,
        EthHdr {
            dst_addr: iface.mac,
            src_addr: ANYCAST_GATEWAY_MAC,
            ether_type: ETH_P_IP.to_be(),
        },
    )?;
    stats::local(iface.stats_slot, 1);
    Ok(to_container(ifindex))
}

/// An ICMP-carrying IPv4 header (IHL 5, TTL 64) with a valid checksum.
#[inline(always)]
fn ipv4_header(tot_len: u16, tos: u8, src: [u8; 4], dst: [u8; 4]) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        vihl: 0x45,
        tos,
        tot_len: tot_len.to_be_bytes(),
        id: [0; 2],
        frags: [0; 2],
        ttl: ORIGIN_TTL,
        proto: IPPROTO_ICMP,
        check: [0; 2],
        src_addr: src,
        dst_addr: dst,
    };
    ip.check = ipv4_check(&ip);
    ip
}

/// The header checksum of `ip` (whose own checksum field is ignored).
#[inline(always)]
fn ipv4_check(ip: &Ipv4Hdr) -> [u8; 2] {
    let mut bytes = [0u8; IPV4_HDR_LEN];
    bytes[0] = ip.vihl;
    bytes[1] = ip.tos;
    bytes[2..4].copy_from_slice(&ip.tot_len);
    bytes[4..6].copy_from_slice(&ip.id);
    bytes[6..8].copy_from_slice(&ip.frags);
    bytes[8] = ip.ttl;
    bytes[9] = ip.proto;
    bytes[12..16].copy_from_slice(&ip.src_addr);
    bytes[16..20].copy_from_slice(&ip.dst_addr);
    internet_checksum(&bytes).to_be_bytes()
}
