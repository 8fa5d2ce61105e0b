//! IPv4 headers as a receiving stack checks them before anything else
//! (RFC 791; Linux's `ip_rcv_core`), for decap's inner packets and the
//! packets containers send.

use network_types::ip::Ipv4Hdr;
use ovl_common::wire::{ETH_HDR_LEN, IPV4_HDR_LEN};

/// The packet's length as its header says it (its total length).
#[inline(always)]
pub fn total_len(ip: &Ipv4Hdr) -> usize {
    usize::from(u16::from_be_bytes(ip.tot_len))
}

/// Whether the packet `ip` heads is whole in an Ethernet frame of
/// `frame_len` bytes: an IPv4 header (version 4, at least 20 bytes) no
/// longer than the packet, which the frame holds after its Ethernet
/// header. What fails this a receiving stack drops; the bytes after the
/// packet (padding) it trims.
#[inline(always)]
pub fn is_whole(ip: &Ipv4Hdr, frame_len: usize) -> bool {
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    let total_len = total_len(ip);
    ip.vihl >> 4 == 4
        && header_len >= IPV4_HDR_LEN
        && total_len >= header_len
        && ETH_HDR_LEN + total_len <= frame_len
}
