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
        ICMP_ECHO_REQUEST, ICMP_ERROR_TOS, ICMP_EXC_TTL, ICMP_FRAG_NEEDED, ICMP_HDR_LEN,
        ICMP_TIME_EXCEEDED, IPPROTO_ICMP, IPV4_FRAG_MASK, IPV4_FRAG_OFFSET, IPV4_HDR_LEN,
        ORIGIN_TTL, checksum_replace16, internet_checksum,
    },
};

use crate::{egress::to_container, packet::Frame, stats};

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

/// What an ICMP error quotes of the packet it answers (RFC 792): its IPv4
/// header, options and all (a receiver finds the quoted transport header
/// by the quoted IHL), and the first 64 bits of its data. It is moved
/// within the packet, behind the error's headers, a word at a time.
struct Quote {
    /// The IPv4 header without its options.
    header: [u8; IPV4_HDR_LEN],
    /// 32-bit words of options after it.
    option_words: usize,
    /// The first 64 bits of data.
    data: [u8; 8],
}

impl Quote {
    /// The quote of the IPv4 packet at `ETH_HDR_LEN` of `frame`; `None`
    /// for a runt shorter than its header and 8 bytes.
    #[inline(always)]
    fn of(frame: &Frame) -> Option<Quote> {
        let header: [u8; IPV4_HDR_LEN] = frame.read(ETH_HDR_LEN).ok()?;
        let words = usize::from(header[0] & 0x0f);
        if header[0] >> 4 != 4 || words < 5 {
            return None;
        }
        let data: [u8; 8] = frame.read(ETH_HDR_LEN + words * 4).ok()?;
        Some(Quote {
            header,
            option_words: words - 5,
            data,
        })
    }

    /// Its length in bytes (a multiple of 4).
    #[inline(always)]
    fn len(&self) -> usize {
        IPV4_HDR_LEN + 4 * self.option_words + self.data.len()
    }

    /// Whether an ICMP error may be sent about the packet it quotes (RFC
    /// 1812 §4.3.2.7, RFC 1122 §3.2.2): not about an ICMP error, a packet
    /// to a broadcast or multicast address, or a fragment other than the
    /// first (the container's source address was checked on the way in).
    #[inline(always)]
    fn may_answer(&self) -> bool {
        let h = &self.header;
        let broadcast = h[16..20] == [0xff; 4];
        let multicast = h[16] >= 224;
        let later_fragment = u16::from_be_bytes([h[6], h[7]]) & IPV4_FRAG_OFFSET != 0;
        // The ICMP error types (RFC 792, 1812): destination unreachable,
        // source quench, redirect, time exceeded, parameter problem.
        let icmp_error = h[9] == IPPROTO_ICMP && matches!(self.data[0], 3 | 4 | 5 | 11 | 12);
        !(broadcast || multicast || later_fragment || icmp_error)
    }

    /// Moves it from `ETH_HDR_LEN` of `frame`, where the packet's IPv4
    /// header starts, to `to` further on: last word first, as the two
    /// overlap. Returns its one's complement sum (RFC 1071), not yet
    /// folded. A word at a time, through no buffer: a copy of a whole
    /// quote would overrun the programs' 512-byte stack. Unrolled with
    /// constant offsets: as a loop, LLVM turns the bounds checks into
    /// arithmetic on the packet's end, which the verifier refuses.
    #[inline(always)]
    fn move_to(&self, frame: &Frame, to: usize) -> Result<u32, DropReason> {
        let words = self.len() / 4;
        let mut sum = 0;
        macro_rules! move_words {
            ($($i:literal)*) => {$(
                if $i < words {
                    let word: [u8; 4] = frame.read(ETH_HDR_LEN + 4 * $i)?;
                    frame.write(to + 4 * $i, word)?;
                    sum += ones_sum(&word);
                }
            )*};
        }
        move_words!(16 15 14 13 12 11 10 9 8 7 6 5 4 3 2 1 0);
        Ok(sum)
    }
}

/// The one's complement sum of `bytes`, folded to 16 bits.
#[inline(always)]
fn ones_sum<const N: usize>(bytes: &[u8; N]) -> u32 {
    u32::from(!internet_checksum(bytes))
}

/// Rewrites the frame into an ICMP error from the container's gateway
/// that quotes it, and sends it back to the container. The offending
/// packet is counted dropped for `reason`; when no error may or can be
/// built (about an error or a broadcast, a runt) it is dropped for
/// `reason` without one.
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
    let quote = Quote::of(&Frame::of_skb(ctx)).ok_or(reason)?;
    if !quote.may_answer() {
        return Err(reason);
    }
    // Trims (or pads) the frame to the error's size, which also drops its
    // GSO state. Never shorter than the packet's headers and its checksum
    // offload's field (the helper refuses that: a TCP segment's is 18
    // bytes into its TCP header), since the error's headers come before a
    // quote of them.
    let frame_len = ETH_HDR_LEN + IPV4_HDR_LEN + ICMP_HDR_LEN + quote.len();
    // SAFETY: helper call on the program's own context.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, frame_len as u32, 0) };
    if rc != 0 {
        return Err(reason);
    }
    let _ = ctx.pull_data(frame_len as u32);
    let frame = Frame::of_skb(ctx);
    let quote_sum = quote.move_to(&frame, ETH_HDR_LEN + IPV4_HDR_LEN + ICMP_HDR_LEN)?;

    let mut message = [0u8; ICMP_HDR_LEN];
    message[0] = type_code[0];
    message[1] = type_code[1];
    message[4..8].copy_from_slice(&rest);
    let mut sum = ones_sum(&message) + quote_sum;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let check = (!(sum as u16)).to_be_bytes();
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
            (frame_len - ETH_HDR_LEN) as u16,
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
