//! Segmentation offload through the crypto device: the virtio-net header
//! that comes with every frame, TCP-in-VXLAN super-packets cut into wire
//! frames before sealing, and opened frames merged back (GRO's job).
//!
//! The device carries ovl's VXLAN: the egress program encapsulates before
//! it redirects into the device, so a container's TCP super-packet arrives
//! as one UDP-tunnel GSO frame (outer Ethernet, IPv4, UDP, VXLAN, inner
//! Ethernet, IPv4, TCP and up to 64 KiB of payload). Linux ≥ 6.17 lets a
//! TAP say so in the tunnel variant of the header
//! (`virtio_net_hdr_v1_hash_tunnel`, `TUN_F_UDP_TUNNEL_GSO`): the agent
//! cuts it as the kernel's `skb_udp_tunnel_segment` would, and on the way
//! in writes merged runs of one flow's segments the same way, so the decap
//! program and the container's TCP see one packet instead of ~45.

use ovl_common::wire::{ETH_HDR_LEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP, UDP_HDR_LEN};

/// Size of `struct virtio_net_hdr_v1_hash_tunnel` (linux/virtio_net.h):
/// the device's header once `TUNSETVNETHDRSZ` set it.
pub const VNET_HDR_LEN: usize = 24;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start +
/// csum_offset` holds only the pseudo-header sum; the rest is the
/// receiver's job.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4`: the GSO packet is inside a UDP
/// tunnel over IPv4.
pub const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
/// `VIRTIO_NET_HDR_GSO_ECN`: the flow uses ECN (no effect on cutting).
pub const GSO_ECN: u8 = 0x80;

/// TCP header flags (RFC 9293 §3.1) the segmenter and merger look at.
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
/// Offsets in an IPv4 header (RFC 791).
const IP_TOT_LEN: usize = 2;
const IP_ID: usize = 4;
const IP_FRAG: usize = 6;
const IP_PROTO: usize = 9;
const IP_CHECK: usize = 10;
const IP_SRC: usize = 12;
/// "More fragments" and the fragment offset: a fragment cannot be merged.
const IP_MF_OFFSET: u16 = 0x3fff;
/// Offsets in a TCP header (RFC 9293).
const TCP_SEQ: usize = 4;
const TCP_DOFF: usize = 12;
const TCP_FLAGS: usize = 13;
const TCP_CHECK: usize = 16;
const TCP_HDR_MIN: usize = 20;
/// Offsets in a UDP header (RFC 768).
const UDP_LEN: usize = 4;
const UDP_CHECK: usize = 6;
/// Outer headers ovl's encapsulation writes: Ethernet, IPv4 without
/// options, UDP, VXLAN, inner Ethernet.
const OUTER_IP: usize = ETH_HDR_LEN;
const OUTER_UDP: usize = OUTER_IP + 20;
const INNER_IP: usize = OUTER_UDP + UDP_HDR_LEN + 8 + ETH_HDR_LEN;
const INNER_TCP: usize = INNER_IP + 20;
/// Largest frame the device takes or gives: IPv4's 16-bit total length
/// bounds the outer packet.
pub const MAX_FRAME: usize = ETH_HDR_LEN + 65535;

/// The virtio-net header of one frame (little endian on the wire: the
/// tunnel variant exists only for VIRTIO_F_VERSION_1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    /// Offset of the outer transport (UDP) header.
    pub outer_th_offset: u16,
    /// Offset of the inner network (IPv4) header.
    pub inner_nh_offset: u16,
}

impl VnetHdr {
    /// Reads the header at the start of `b` (at least [`VNET_HDR_LEN`]).
    pub fn parse(b: &[u8]) -> VnetHdr {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            // 10: num_buffers; 12..20: hash value, report, padding.
            outer_th_offset: le(20),
            inner_nh_offset: le(22),
        }
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn emit(&self, b: &mut [u8]) {
        b[..VNET_HDR_LEN].fill(0);
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[20..22].copy_from_slice(&self.outer_th_offset.to_le_bytes());
        b[22..24].copy_from_slice(&self.inner_nh_offset.to_le_bytes());
    }

    /// The GSO type without the ECN bit.
    fn gso(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }
}

/// Why a frame from the device cannot be sent as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadError {
    /// Its header names a GSO type the agent never asked for, or offsets
    /// outside the frame.
    Unsupported,
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn put16(b: &mut [u8], i: usize, v: u16) {
    b[i..i + 2].copy_from_slice(&v.to_be_bytes());
}

/// One's-complement sum of `data` (RFC 1071) as 16-bit network-order
/// words, folded to 16 bits, not complemented. The sum is independent of
/// byte order (RFC 1071 §2(B)): it adds native 32-bit words and swaps once.
pub fn ones_sum(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc += u64::from(u32::from_ne_bytes(tail));
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    let native = acc as u16;
    if cfg!(target_endian = "little") {
        native.swap_bytes()
    } else {
        native
    }
}

/// One's-complement addition of two folded sums.
fn add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// Sum of the IPv4 pseudo-header (RFC 9293 §3.1) of the packet whose
/// IPv4 header starts at `ip`, for an L4 length of `l4_len`.
fn pseudo_sum(frame: &[u8], ip: usize, l4_len: usize) -> u16 {
    let addrs = ones_sum(&frame[ip + IP_SRC..ip + IP_SRC + 8]);
    let proto_len = u32::from(frame[ip + IP_PROTO]) + l4_len as u32;
    add(
        addrs,
        add((proto_len & 0xffff) as u16, (proto_len >> 16) as u16),
    )
}

/// Rewrites the checksum of the IPv4 header at `ip` (no options: `ihl`
/// bytes).
fn ipv4_recheck(frame: &mut [u8], ip: usize, ihl: usize) {
    put16(frame, ip + IP_CHECK, 0);
    let sum = ones_sum(&frame[ip..ip + ihl]);
    put16(frame, ip + IP_CHECK, !sum);
}

/// Finishes a checksum the sender left partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`):
/// the field at `csum_start + csum_offset` holds the pseudo-header sum, the
/// covered data runs from `csum_start` to the end of `frame` (what
/// `skb_checksum_help` does).
pub fn complete_checksum(frame: &mut [u8], hdr: &VnetHdr) -> Result<(), OffloadError> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > frame.len() {
        return Err(OffloadError::Unsupported);
    }
    let sum = !ones_sum(&frame[start..]);
    // A zero result is sent as all ones (a zero UDP checksum means none).
    put16(frame, at, if sum == 0 { 0xffff } else { sum });
    Ok(())
}

/// Where the headers of a TCP-in-VXLAN GSO frame are.
struct Layout {
    outer_ip: usize,
    outer_ihl: usize,
    outer_udp: usize,
    inner_ip: usize,
    inner_ihl: usize,
    tcp: usize,
    /// End of the TCP header: where the payload starts.
    payload: usize,
}

impl Layout {
    fn of(frame: &[u8], hdr: &VnetHdr) -> Result<Layout, OffloadError> {
        let bad = OffloadError::Unsupported;
        let outer_udp = usize::from(hdr.outer_th_offset);
        let inner_ip = usize::from(hdr.inner_nh_offset);
        let tcp = usize::from(hdr.csum_start);
        if frame.len() < tcp + TCP_HDR_MIN
            || outer_udp < OUTER_IP + 20
            || inner_ip < outer_udp + UDP_HDR_LEN
            || tcp < inner_ip + 20
            || be16(frame, 12) != ETH_P_IP
            || frame[OUTER_IP] >> 4 != 4
            || frame[OUTER_IP + IP_PROTO] != IPPROTO_UDP
            || frame[inner_ip] >> 4 != 4
            || frame[inner_ip + IP_PROTO] != IPPROTO_TCP
        {
            return Err(bad);
        }
        let outer_ihl = usize::from(frame[OUTER_IP] & 0x0f) * 4;
        let inner_ihl = usize::from(frame[inner_ip] & 0x0f) * 4;
        let doff = usize::from(frame[tcp + TCP_DOFF] >> 4) * 4;
        if OUTER_IP + outer_ihl != outer_udp || inner_ip + inner_ihl != tcp || doff < TCP_HDR_MIN {
            return Err(bad);
        }
        let payload = tcp + doff;
        if payload > frame.len() {
            return Err(bad);
        }
        Ok(Layout {
            outer_ip: OUTER_IP,
            outer_ihl,
            outer_udp,
            inner_ip,
            inner_ihl,
            tcp,
            payload,
        })
    }
}

/// How many frames [`split`] makes of `frame` with header `hdr`: one for
/// a frame without GSO (or one it cannot cut). The header's `hdr_len` is
/// no help: the kernel puts the length of the socket buffer's linear part
/// there, which may hold payload too.
pub fn segment_count(frame: &[u8], hdr: &VnetHdr) -> usize {
    let mss = usize::from(hdr.gso_size);
    if hdr.gso() == GSO_NONE || mss == 0 {
        return 1;
    }
    match Layout::of(frame, hdr) {
        Ok(l) => (frame.len() - l.payload).div_ceil(mss).max(1),
        Err(_) => 1,
    }
}

/// Cuts `frame` (a TCP-in-VXLAN GSO frame from the device, header `hdr`)
/// into frames of at most `gso_size` TCP payload bytes, each built in
/// `buf` and handed to `each` whole: lengths, IPv4 identifiers and
/// checksums of both IPv4 headers, the outer UDP length (its checksum
/// zero, as RFC 7348 §5 allows and ovl's encapsulation writes), TCP
/// sequence numbers, FIN and PSH on the last frame only, CWR on the first
/// only, and a complete TCP checksum — what the kernel's GSO would have
/// sent. Returns how many frames it made.
pub fn split(
    frame: &[u8],
    hdr: &VnetHdr,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    if hdr.gso() != GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4 || hdr.gso_size == 0 {
        return Err(OffloadError::Unsupported);
    }
    let l = Layout::of(frame, hdr)?;
    let mss = usize::from(hdr.gso_size);
    let headers = &frame[..l.payload];
    let payload = &frame[l.payload..];
    if l.payload + mss > buf.len() {
        return Err(OffloadError::Unsupported);
    }
    let outer_id = be16(frame, l.outer_ip + IP_ID);
    let inner_id = be16(frame, l.inner_ip + IP_ID);
    let seq = be32(frame, l.tcp + TCP_SEQ);
    let flags = frame[l.tcp + TCP_FLAGS];
    let count = payload.len().div_ceil(mss).max(1);
    for (i, chunk) in payload.chunks(mss).enumerate().chain(
        // A GSO frame without payload (never sent by TCP) still goes out once.
        (payload.is_empty()).then_some((0, &payload[..0])),
    ) {
        let len = l.payload + chunk.len();
        let seg = &mut buf[..len];
        seg[..l.payload].copy_from_slice(headers);
        seg[l.payload..].copy_from_slice(chunk);
        let n = i as u16;
        put16(seg, l.outer_ip + IP_TOT_LEN, (len - l.outer_ip) as u16);
        put16(seg, l.outer_ip + IP_ID, outer_id.wrapping_add(n));
        ipv4_recheck(seg, l.outer_ip, l.outer_ihl);
        put16(seg, l.outer_udp + UDP_LEN, (len - l.outer_udp) as u16);
        put16(seg, l.outer_udp + UDP_CHECK, 0);
        put16(seg, l.inner_ip + IP_TOT_LEN, (len - l.inner_ip) as u16);
        put16(seg, l.inner_ip + IP_ID, inner_id.wrapping_add(n));
        ipv4_recheck(seg, l.inner_ip, l.inner_ihl);
        let seq_i = seq.wrapping_add((i * mss) as u32);
        seg[l.tcp + TCP_SEQ..l.tcp + TCP_SEQ + 4].copy_from_slice(&seq_i.to_be_bytes());
        let mut f = flags;
        if i + 1 < count {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        seg[l.tcp + TCP_FLAGS] = f;
        let tcp_len = len - l.tcp;
        put16(seg, l.tcp + TCP_CHECK, 0);
        let sum = add(
            pseudo_sum(seg, l.inner_ip, tcp_len),
            ones_sum(&seg[l.tcp..]),
        );
        put16(seg, l.tcp + TCP_CHECK, !sum);
        each(seg);
    }
    Ok(count)
}

/// A run of one flow's segments being merged: the first frame's headers
/// and every payload so far, after room for the virtio-net header.
struct Run {
    buf: Vec<u8>,
    /// Bytes of `buf` in use (header room included).
    len: usize,
    /// Frame length of the first segment's headers (up to the payload).
    headers: usize,
    mss: usize,
    segments: usize,
    next_seq: u32,
    /// A segment shorter than `mss` or with PSH ended the run.
    closed: bool,
}

/// Merges opened VXLAN frames of one TCP flow that follow each other into
/// one GSO frame for the device, as GRO would (same headers but lengths,
/// identifiers, checksums and PSH; consecutive sequence numbers; equal
/// payload sizes but the last; only ACK and PSH set). Frames it cannot
/// merge pass through in order with their flow.
pub struct Coalescer {
    runs: Vec<Run>,
    open: usize,
    /// The device takes GSO over UDP tunnels (else every frame passes).
    enabled: bool,
}

/// Runs held at once (flows merged in one batch).
const RUNS: usize = 8;

impl Coalescer {
    /// A merger; `enabled` false passes every frame through.
    pub fn new(enabled: bool) -> Coalescer {
        Coalescer {
            runs: (0..RUNS)
                .map(|_| Run {
                    buf: vec![0; VNET_HDR_LEN + MAX_FRAME],
                    len: 0,
                    headers: 0,
                    mss: 0,
                    segments: 0,
                    next_seq: 0,
                    closed: true,
                })
                .collect(),
            open: 0,
            enabled,
        }
    }

    /// Takes one Ethernet frame that starts at `buf[VNET_HDR_LEN..]`
    /// (the room before it is for the header), to be written with
    /// `write` (header included) now or at the next [`flush`](Self::flush).
    /// `write` returns false when the device refused a frame; returns how
    /// many of the frames pushed were refused (a merged frame stands for
    /// all its segments).
    pub fn push(&mut self, buf: &mut [u8], write: &mut impl FnMut(&[u8]) -> bool) -> usize {
        let frame = &buf[VNET_HDR_LEN..];
        // At most one run per connection is open: frames of a connection
        // leave in the order they came.
        let held = (0..self.open).find(|k| same_connection(&self.runs[*k], frame));
        let Some(seg) = self.enabled.then(|| mergeable(frame)).flatten() else {
            // Whatever this frame is (a FIN, a retransmission, not TCP),
            // what its connection has held goes first.
            let refused = held.map_or(0, |k| self.finish(k, write));
            VnetHdr::default().emit(buf);
            return refused + usize::from(!write(buf));
        };
        let mut refused = 0;
        if let Some(k) = held {
            let run = &mut self.runs[k];
            let fits = run.len + seg.payload_len <= run.buf.len();
            if !run.closed
                && seg.seq == run.next_seq
                && seg.payload_len <= run.mss
                && fits
                && same_flow(run, frame)
            {
                run.buf[run.len..run.len + seg.payload_len]
                    .copy_from_slice(&frame[seg.payload_off..seg.payload_off + seg.payload_len]);
                run.len += seg.payload_len;
                run.segments += 1;
                run.next_seq = seg.seq.wrapping_add(seg.payload_len as u32);
                let psh = frame[INNER_TCP + TCP_FLAGS] & TCP_PSH;
                run.buf[VNET_HDR_LEN + INNER_TCP + TCP_FLAGS] |= psh;
                run.closed = seg.payload_len < run.mss || psh != 0;
                return if run.closed { self.finish(k, write) } else { 0 };
            }
            refused += self.finish(k, write);
        }
        if self.open == RUNS {
            refused += self.finish(0, write);
        }
        let k = self.open;
        let run = &mut self.runs[k];
        let len = VNET_HDR_LEN + seg.payload_off + seg.payload_len;
        run.buf[VNET_HDR_LEN..len].copy_from_slice(&frame[..len - VNET_HDR_LEN]);
        run.len = len;
        run.headers = seg.payload_off;
        run.mss = seg.payload_len;
        run.segments = 1;
        run.next_seq = seg.seq.wrapping_add(seg.payload_len as u32);
        run.closed = frame[INNER_TCP + TCP_FLAGS] & TCP_PSH != 0;
        self.open += 1;
        if run.closed {
            refused += self.finish(k, write);
        }
        refused
    }

    /// Writes every run held; returns how many frames were refused.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8]) -> bool) -> usize {
        let mut refused = 0;
        while self.open > 0 {
            refused += self.finish(0, write);
        }
        refused
    }

    /// Writes run `k` (as a GSO frame if it merged more than one segment)
    /// and removes it, keeping the others in order.
    fn finish(&mut self, k: usize, write: &mut impl FnMut(&[u8]) -> bool) -> usize {
        let run = &mut self.runs[k];
        if run.segments == 1 {
            VnetHdr::default().emit(&mut run.buf);
        } else {
            let frame = &mut run.buf[VNET_HDR_LEN..run.len];
            let len = frame.len();
            put16(frame, OUTER_IP + IP_TOT_LEN, (len - OUTER_IP) as u16);
            ipv4_recheck(frame, OUTER_IP, 20);
            put16(frame, OUTER_UDP + UDP_LEN, (len - OUTER_UDP) as u16);
            put16(frame, OUTER_UDP + UDP_CHECK, 0);
            put16(frame, INNER_IP + IP_TOT_LEN, (len - INNER_IP) as u16);
            ipv4_recheck(frame, INNER_IP, 20);
            // NEEDS_CSUM: the field holds the pseudo-header sum only.
            let pseudo = pseudo_sum(frame, INNER_IP, len - INNER_TCP);
            put16(frame, INNER_TCP + TCP_CHECK, pseudo);
            VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
                hdr_len: run.headers as u16,
                gso_size: run.mss as u16,
                csum_start: INNER_TCP as u16,
                csum_offset: TCP_CHECK as u16,
                outer_th_offset: OUTER_UDP as u16,
                inner_nh_offset: INNER_IP as u16,
            }
            .emit(&mut run.buf);
        }
        let refused = if write(&run.buf[..run.len]) {
            0
        } else {
            run.segments
        };
        run.closed = true;
        let done = self.runs.remove(k);
        self.runs.push(done);
        self.open -= 1;
        refused
    }
}

/// A frame the merger can take: where its payload is and its sequence
/// number.
struct Segment {
    payload_off: usize,
    payload_len: usize,
    seq: u32,
}

/// The TCP segment in a VXLAN frame, if GRO could merge it: outer and
/// inner IPv4 without options and not fragmented, TCP with payload and
/// only ACK (and PSH) set.
fn mergeable(frame: &[u8]) -> Option<Segment> {
    if frame.len() < INNER_TCP + TCP_HDR_MIN
        || be16(frame, 12) != ETH_P_IP
        || frame[OUTER_IP] != 0x45
        || frame[OUTER_IP + IP_PROTO] != IPPROTO_UDP
        || be16(frame, OUTER_IP + IP_FRAG) & IP_MF_OFFSET != 0
        || be16(frame, INNER_IP - 2) != ETH_P_IP
        || frame[INNER_IP] != 0x45
        || frame[INNER_IP + IP_PROTO] != IPPROTO_TCP
        || be16(frame, INNER_IP + IP_FRAG) & IP_MF_OFFSET != 0
        || frame[INNER_TCP + TCP_FLAGS] & !TCP_PSH != TCP_ACK
    {
        return None;
    }
    let doff = usize::from(frame[INNER_TCP + TCP_DOFF] >> 4) * 4;
    let end = INNER_IP + usize::from(be16(frame, INNER_IP + IP_TOT_LEN));
    let payload_off = INNER_TCP + doff;
    if doff < TCP_HDR_MIN
        || end > frame.len()
        || end != OUTER_IP + usize::from(be16(frame, OUTER_IP + IP_TOT_LEN))
        || payload_off >= end
    {
        return None;
    }
    Some(Segment {
        payload_off,
        payload_len: end - payload_off,
        seq: be32(frame, INNER_TCP + TCP_SEQ),
    })
}

/// Whether `frame` belongs to the connection of `run`: the same tunnel
/// (outer addresses, UDP ports, VNI) and inner addresses and ports.
fn same_connection(run: &Run, frame: &[u8]) -> bool {
    let first = &run.buf[VNET_HDR_LEN..];
    let ranges = [
        (OUTER_IP + IP_SRC, OUTER_UDP + UDP_LEN),
        (OUTER_UDP + UDP_HDR_LEN + 4, OUTER_UDP + UDP_HDR_LEN + 7),
        (INNER_IP + IP_SRC, INNER_TCP + 4),
    ];
    frame.len() >= INNER_TCP + 4
        && frame[INNER_IP + IP_PROTO] == IPPROTO_TCP
        && frame[INNER_IP] == 0x45
        && ranges.iter().all(|&(a, b)| first[a..b] == frame[a..b])
}

/// Whether `frame` continues `run`'s headers: everything but lengths,
/// identifiers, checksums, sequence number and PSH equal.
fn same_flow(run: &Run, frame: &[u8]) -> bool {
    let first = &run.buf[VNET_HDR_LEN..VNET_HDR_LEN + run.headers];
    if frame.len() < run.headers {
        return false;
    }
    let eq = |a: usize, b: usize| first[a..b] == frame[a..b];
    // Outer Ethernet; outer IPv4 version to TOS, flags to protocol,
    // addresses; UDP ports; VXLAN, inner Ethernet, inner IPv4 version to
    // TOS; inner flags to protocol, addresses; TCP ports; ACK to window
    // but PSH; urgent pointer and options.
    let tcp_flags = INNER_TCP + TCP_FLAGS;
    eq(0, OUTER_IP + 2)
        && eq(OUTER_IP + IP_FRAG, OUTER_IP + IP_CHECK)
        && eq(OUTER_IP + IP_SRC, OUTER_UDP + UDP_LEN)
        && eq(OUTER_UDP + UDP_HDR_LEN, INNER_IP + 2)
        && eq(INNER_IP + IP_FRAG, INNER_IP + IP_CHECK)
        && eq(INNER_IP + IP_SRC, INNER_TCP + TCP_SEQ)
        && eq(INNER_TCP + 8, tcp_flags)
        && first[tcp_flags] & !TCP_PSH == frame[tcp_flags] & !TCP_PSH
        && eq(tcp_flags + 1, INNER_TCP + TCP_CHECK)
        && eq(INNER_TCP + 18, run.headers)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// RFC 1071 the slow way: 16-bit big-endian words.
    fn naive_sum(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            s += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn ones_sum_matches_rfc_1071_for_every_length_and_alignment() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 73 + 11) as u8).collect();
        for start in 0..4 {
            for len in 0..260 {
                let d = &data[start..start + len];
                assert_eq!(ones_sum(d), naive_sum(d), "start {start} len {len}");
            }
        }
        // The RFC 1071 §3 example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(
            ones_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
            hdr_len: 120,
            gso_size: 1338,
            csum_start: 84,
            csum_offset: 16,
            outer_th_offset: 34,
            inner_nh_offset: 64,
        };
        let mut b = [0xaau8; VNET_HDR_LEN];
        h.emit(&mut b);
        assert_eq!(VnetHdr::parse(&b), h);
        assert_eq!(b[..4], [1, 0x21, 120, 0]);
        assert_eq!(b[10..20], [0; 10]);
    }

    const OUTER_SRC: [u8; 4] = [192, 0, 2, 10];
    const OUTER_DST: [u8; 4] = [198, 51, 100, 10];
    const INNER_SRC: [u8; 4] = [10, 1, 0, 2];
    const INNER_DST: [u8; 4] = [10, 1, 0, 3];
    const TS_OPTION: [u8; 12] = [1, 1, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0x56, 0x78];

    /// A TCP-in-VXLAN frame as ovl's encapsulation builds it, with a
    /// timestamp option, `payload` bytes from `seq`, TCP flags `flags`,
    /// complete checksums (outer UDP zero).
    fn vxlan_tcp(payload: &[u8], seq: u32, flags: u8, id: u16) -> Vec<u8> {
        let mut f = vec![0u8; INNER_TCP + 32];
        f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xbb]);
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        ipv4_header(&mut f, OUTER_IP, IPPROTO_UDP, OUTER_SRC, OUTER_DST);
        put16(&mut f, OUTER_UDP, 50000);
        put16(&mut f, OUTER_UDP + 2, 4789);
        f[OUTER_UDP + 8] = 0x08;
        f[OUTER_UDP + 8 + 4..OUTER_UDP + 8 + 7].copy_from_slice(&[0, 0, 42]);
        let ieth = OUTER_UDP + 16;
        f[ieth..ieth + 6].copy_from_slice(&[0x02, 0x42, 10, 1, 0, 3]);
        f[ieth + 6..ieth + 12].copy_from_slice(&[0x02, 0x42, 10, 1, 0, 2]);
        f[ieth + 12..ieth + 14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        ipv4_header(&mut f, INNER_IP, IPPROTO_TCP, INNER_SRC, INNER_DST);
        put16(&mut f, INNER_IP + IP_ID, id);
        put16(&mut f, INNER_TCP, 40000);
        put16(&mut f, INNER_TCP + 2, 5201);
        f[INNER_TCP + 4..INNER_TCP + 8].copy_from_slice(&seq.to_be_bytes());
        f[INNER_TCP + 8..INNER_TCP + 12].copy_from_slice(&7u32.to_be_bytes());
        f[INNER_TCP + TCP_DOFF] = 8 << 4;
        f[INNER_TCP + TCP_FLAGS] = flags;
        put16(&mut f, INNER_TCP + 14, 502);
        f[INNER_TCP + 20..INNER_TCP + 32].copy_from_slice(&TS_OPTION);
        f.extend_from_slice(payload);
        let len = f.len();
        put16(&mut f, OUTER_IP + IP_TOT_LEN, (len - OUTER_IP) as u16);
        put16(&mut f, OUTER_UDP + UDP_LEN, (len - OUTER_UDP) as u16);
        put16(&mut f, INNER_IP + IP_TOT_LEN, (len - INNER_IP) as u16);
        ipv4_recheck(&mut f, OUTER_IP, 20);
        ipv4_recheck(&mut f, INNER_IP, 20);
        let sum = add(
            pseudo_sum(&f, INNER_IP, len - INNER_TCP),
            ones_sum(&f[INNER_TCP..]),
        );
        put16(&mut f, INNER_TCP + TCP_CHECK, !sum);
        f
    }

    /// An IPv4 header without options at `at` of `f`: DF, TTL 64,
    /// `proto`, `src` to `dst` (lengths, ID and checksum are the caller's).
    fn ipv4_header(f: &mut [u8], at: usize, proto: u8, src: [u8; 4], dst: [u8; 4]) {
        f[at] = 0x45;
        f[at + IP_FRAG] = 0x40;
        f[at + 8] = 64;
        f[at + IP_PROTO] = proto;
        f[at + 12..at + 16].copy_from_slice(&src);
        f[at + 16..at + 20].copy_from_slice(&dst);
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + 7) as u8).collect()
    }

    /// A frame whose checksums all verify (RFC 1071: the sum over the
    /// covered data, checksum included, is all ones).
    fn assert_checksums_verify(f: &[u8]) {
        assert_eq!(ones_sum(&f[OUTER_IP..OUTER_IP + 20]), 0xffff, "outer IPv4");
        assert_eq!(ones_sum(&f[INNER_IP..INNER_IP + 20]), 0xffff, "inner IPv4");
        let tcp = add(
            pseudo_sum(f, INNER_IP, f.len() - INNER_TCP),
            ones_sum(&f[INNER_TCP..]),
        );
        assert_eq!(tcp, 0xffff, "TCP");
    }

    /// The GSO frame the device hands over for `data` from `seq`: the
    /// kernel's form, with partial TCP checksum and bogus outer lengths.
    fn super_packet(data: &[u8], seq: u32, flags: u8, mss: u16) -> (Vec<u8>, VnetHdr) {
        let mut f = vxlan_tcp(data, seq, flags, 100);
        let pseudo = pseudo_sum(&f, INNER_IP, f.len() - INNER_TCP);
        put16(&mut f, INNER_TCP + TCP_CHECK, pseudo);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
            hdr_len: (INNER_TCP + 32) as u16,
            gso_size: mss,
            csum_start: INNER_TCP as u16,
            csum_offset: TCP_CHECK as u16,
            outer_th_offset: OUTER_UDP as u16,
            inner_nh_offset: INNER_IP as u16,
        };
        (f, h)
    }

    /// What the crypto device hands over for a TCP super-packet of
    /// `segments` full segments of `mss` bytes to VTEP `vtep`: its
    /// virtio-net header, then the frame.
    pub(crate) fn device_frame(vtep: [u8; 4], segments: usize, mss: u16) -> Vec<u8> {
        let (mut f, h) = super_packet(&payload(segments * usize::from(mss)), 1, TCP_ACK, mss);
        // The outer destination address follows the source.
        f[OUTER_IP + IP_SRC + 4..OUTER_IP + IP_SRC + 8].copy_from_slice(&vtep);
        ipv4_recheck(&mut f, OUTER_IP, 20);
        let mut frame = vec![0u8; VNET_HDR_LEN];
        h.emit(&mut frame);
        frame.extend_from_slice(&f);
        frame
    }

    #[test]
    fn a_tcp_in_vxlan_super_packet_splits_into_the_frames_the_kernel_would_send() {
        let data = payload(3 * 1000 + 345);
        let seq = 0xffff_fc00; // wraps inside the run
        let (f, mut h) = super_packet(&data, seq, TCP_ACK | TCP_PSH | TCP_CWR, 1000);
        assert_eq!(segment_count(&f, &h), 4);
        // The kernel's hdr_len is the linear part, here the whole frame.
        h.hdr_len = f.len() as u16;
        assert_eq!(segment_count(&f, &h), 4);
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        let n = split(&f, &h, &mut buf, |s| got.push(s.to_vec())).unwrap();
        assert_eq!(n, 4);
        assert_eq!(got.len(), 4);
        for (i, s) in got.iter().enumerate() {
            let chunk = &data[i * 1000..((i + 1) * 1000).min(data.len())];
            let last = i == 3;
            let mut flags = TCP_ACK;
            if last {
                flags |= TCP_PSH;
            }
            if i == 0 {
                flags |= TCP_CWR;
            }
            // The frame the sender would have built for this chunk alone.
            let mut want = vxlan_tcp(
                chunk,
                seq.wrapping_add(i as u32 * 1000),
                flags,
                100 + i as u16,
            );
            put16(&mut want, OUTER_IP + IP_ID, i as u16);
            ipv4_recheck(&mut want, OUTER_IP, 20);
            assert_eq!(s, &want, "segment {i}");
            assert_checksums_verify(s);
        }
    }

    #[test]
    fn splitting_refuses_what_it_was_not_asked_to_carry() {
        let (f, mut h) = super_packet(&payload(3000), 1, TCP_ACK, 1000);
        let mut buf = vec![0u8; 65536];
        h.gso_type = GSO_TCPV4; // no tunnel
        assert!(split(&f, &h, &mut buf, |_| {}).is_err());
        h.gso_type = GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4;
        h.csum_start = f.len() as u16; // TCP header past the end
        assert!(split(&f, &h, &mut buf, |_| {}).is_err());
    }

    #[test]
    fn a_partial_checksum_is_completed_as_the_kernel_would() {
        let mut want = vxlan_tcp(&payload(301), 9, TCP_ACK, 5);
        let mut f = want.clone();
        let pseudo = pseudo_sum(&f, INNER_IP, f.len() - INNER_TCP);
        put16(&mut f, INNER_TCP + TCP_CHECK, pseudo);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: INNER_TCP as u16,
            csum_offset: TCP_CHECK as u16,
            ..Default::default()
        };
        complete_checksum(&mut f, &h).unwrap();
        assert_eq!(f, want);
        want.truncate(INNER_TCP);
        assert!(complete_checksum(&mut want, &h).is_err());
    }

    /// Pushes `frames` through a merger and returns what it wrote.
    fn coalesce(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut c = Coalescer::new(true);
        let mut written = Vec::new();
        let mut write = |b: &[u8]| {
            written.push(b.to_vec());
            true
        };
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME];
        for f in frames {
            buf[VNET_HDR_LEN..VNET_HDR_LEN + f.len()].copy_from_slice(f);
            assert_eq!(c.push(&mut buf[..VNET_HDR_LEN + f.len()], &mut write), 0);
        }
        assert_eq!(c.flush(&mut write), 0);
        written
    }

    #[test]
    fn consecutive_segments_of_a_flow_merge_into_the_super_packet_they_came_from() {
        let data = payload(4 * 1200 + 17);
        let (f, h) = super_packet(&data, 5000, TCP_ACK | TCP_PSH, 1200);
        let mut buf = vec![0u8; 65536];
        let mut segments = Vec::new();
        split(&f, &h, &mut buf, |s| segments.push(s.to_vec())).unwrap();
        let written = coalesce(&segments);
        assert_eq!(written.len(), 1);
        let hdr = VnetHdr::parse(&written[0]);
        assert_eq!(
            hdr,
            VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
                hdr_len: (INNER_TCP + 32) as u16,
                gso_size: 1200,
                csum_start: INNER_TCP as u16,
                csum_offset: TCP_CHECK as u16,
                outer_th_offset: OUTER_UDP as u16,
                inner_nh_offset: INNER_IP as u16,
            }
        );
        let merged = &written[0][VNET_HDR_LEN..];
        // Same bytes as the original super-packet, with its lengths and
        // checksums made right for the whole (the identifiers are the
        // first segment's: those of the original).
        let mut want = f.clone();
        let len = want.len();
        put16(&mut want, OUTER_IP + IP_TOT_LEN, (len - OUTER_IP) as u16);
        ipv4_recheck(&mut want, OUTER_IP, 20);
        assert_eq!(merged, &want[..]);
        assert_eq!(ones_sum(&merged[INNER_IP..INNER_IP + 20]), 0xffff);
        // And it splits again into the very same frames.
        let mut again = Vec::new();
        split(merged, &hdr, &mut buf, |s| again.push(s.to_vec())).unwrap();
        assert_eq!(again, segments);
    }

    #[test]
    fn segments_merge_only_with_segments_of_the_same_congestion_mark() {
        use crate::crypto::ecn::{Ecn, carry_outer_mark};
        // ECT(0) VXLAN, as encapsulation copies an ECT(0) inner packet's
        // field out; the middle two came with CE on the WireGuard message.
        let segments: Vec<Vec<u8>> = (0..5u32)
            .map(|i| {
                let mut f = vxlan_tcp(&payload(1000), 100 + i * 1000, TCP_ACK, i as u16);
                f[OUTER_IP + 1] = Ecn::Ect0.bits();
                ipv4_recheck(&mut f, OUTER_IP, 20);
                if i == 2 || i == 3 {
                    carry_outer_mark(Ecn::Ce, &mut f[OUTER_IP..]).unwrap();
                }
                f
            })
            .collect();
        let written = coalesce(&segments);
        let tos: Vec<(u16, u8)> = written
            .iter()
            .map(|w| (VnetHdr::parse(w).gso_size, w[VNET_HDR_LEN + OUTER_IP + 1]))
            .collect();
        assert_eq!(tos, vec![(1000, 0b10), (1000, 0b11), (0, 0b10)]);
        for w in &written {
            let f = &w[VNET_HDR_LEN..];
            assert_eq!(ones_sum(&f[OUTER_IP..OUTER_IP + 20]), 0xffff);
        }
    }

    #[test]
    fn what_gro_would_not_merge_passes_through_in_flow_order() {
        let a = vxlan_tcp(&payload(1000), 100, TCP_ACK, 1);
        let gap = vxlan_tcp(&payload(1000), 3100, TCP_ACK, 2); // not 1100
        let fin = vxlan_tcp(&[], 4100, TCP_ACK | TCP_FIN, 3);
        let mut other_ack = vxlan_tcp(&payload(1000), 1100, TCP_ACK, 4);
        other_ack[INNER_TCP + 8] ^= 1; // another acknowledgment number
        let mut written = coalesce(&[a.clone(), gap.clone(), other_ack.clone(), fin.clone()]);
        for w in &mut written {
            assert_eq!(VnetHdr::parse(w), VnetHdr::default());
            w.drain(..VNET_HDR_LEN);
        }
        assert_eq!(written, vec![a, gap, other_ack, fin]);
    }

    #[test]
    fn a_short_or_pushed_segment_ends_a_run_and_flows_merge_apart() {
        let s = |seq, n, flags, port: u16| {
            let mut f = vxlan_tcp(&payload(n), seq, flags, 0);
            put16(&mut f, INNER_TCP, port);
            // Checksums do not matter to the merger; lengths do.
            f
        };
        let frames = vec![
            s(0, 1000, TCP_ACK, 1),
            s(0, 1000, TCP_ACK, 2),
            s(1000, 1000, TCP_ACK, 1),
            s(1000, 500, TCP_ACK, 2),            // short: flow 2 ends here
            s(2000, 1000, TCP_ACK | TCP_PSH, 1), // PSH: flow 1 ends here
            s(1500, 1000, TCP_ACK, 2),
            s(3000, 1000, TCP_ACK, 1),
        ];
        let written = coalesce(&frames);
        let summary: Vec<(u16, u16, u16, bool)> = written
            .iter()
            .map(|w| {
                let h = VnetHdr::parse(w);
                let f = &w[VNET_HDR_LEN..];
                (
                    be16(f, INNER_TCP),
                    be16(f, INNER_IP + IP_TOT_LEN) - 52,
                    h.gso_size,
                    f[INNER_TCP + TCP_FLAGS] & TCP_PSH != 0,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (2, 1500, 1000, false),
                (1, 3000, 1000, true),
                (2, 1000, 0, false),
                (1, 1000, 0, false),
            ]
        );
    }
}
