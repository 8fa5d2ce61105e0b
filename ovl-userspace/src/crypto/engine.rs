//! The encrypting path's threads: frames from the crypto device are sealed
//! into WireGuard messages to their VTEP's node; messages from the UDP
//! socket are opened, checked and written back to the device; a timer
//! thread drives handshakes, keep-alives, rotation and retirement.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use boringtun::noise::{
    HandshakeInit, Packet, Tunn, TunnResult, errors::WireGuardError,
    handshake::parse_handshake_anon,
};
use ovl_common::wire::{ETH_HDR_LEN, ETH_P_IP, IPPROTO_UDP};
use tokio::sync::watch;

use super::{
    batch::{self, Incoming, Outgoing, SLOT, SLOTS},
    ecn::{self, Ecn},
    keys::{Identity, KeyFile, PublicKey},
    offload::{self, Coalescer, F_NEEDS_CSUM, GSO_NONE, MAX_FRAME, VNET_HDR_LEN, VnetHdr},
    peers::{Generation, Peer, PeerInfo, Table},
    stats::{Counters, CryptoDrop},
    tap::Tap,
};

/// How often timers run.
const TICK: Duration = Duration::from_millis(100);
/// How long blocking reads wait before looking at the stop flag.
const POLL_MS: i32 = 200;
/// Room for any frame the device hands over (a GSO super-packet with its
/// virtio-net header) plus WireGuard's overhead.
const BUF: usize = VNET_HDR_LEN + MAX_FRAME + 64;
/// After a rotation, peers get this long to read the new key from the
/// store and start the handshake themselves before this node does.
pub const PUBLISH_GRACE: Duration = Duration::from_secs(5);
/// An identity retired by a rotation still answers handshakes this long.
pub const RETIRE_AFTER: Duration = Duration::from_secs(600);
/// Packets wait this long for a handshake (WireGuard's Rekey-Attempt-Time,
/// after which it gives up).
const STAGED_FOR: Duration = Duration::from_secs(90);

/// WireGuard message types (the first byte of a message; three zero bytes
/// follow).
const MSG_INITIATION: u8 = 1;
const MSG_COOKIE_REPLY: u8 = 3;
const MSG_DATA: u8 = 4;
/// Size of a cookie reply: type, receiver index, 24-byte nonce, sealed
/// 16-byte cookie.
const COOKIE_REPLY_LEN: usize = 64;

/// This node's identities: the current one, and those a rotation retired
/// that still answer peers that have not switched yet.
pub struct Identities {
    pub current: Identity,
    pub retiring: Vec<(Identity, Instant)>,
}

impl Identities {
    /// Every identity held, the current one first.
    pub fn all(&self) -> impl Iterator<Item = &Identity> {
        std::iter::once(&self.current).chain(self.retiring.iter().map(|(i, _)| i))
    }

    /// Public keys of every identity held.
    pub fn held(&self) -> Vec<PublicKey> {
        self.all().map(Identity::public_key).collect()
    }

    /// Gives every identity held a new second's worth of handshakes. Each
    /// limiter starts a new second at most once a second, so calling this
    /// more often is harmless (boringtun's device calls it every second).
    pub fn reset_handshake_limits(&self) {
        for id in self.all() {
            id.limiter().reset_count();
        }
    }
}

/// What the node publishes for its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub key: PublicKey,
    pub port: u16,
}

/// What ends every rotation, the engine running or not: the next one due
/// at `next`, one more counted, and `key` published.
pub fn rotated(
    next_rotation: &Mutex<Instant>,
    next: Instant,
    counters: &Counters,
    published: &watch::Sender<Published>,
    key: PublicKey,
) {
    *lock(next_rotation) = next;
    Counters::add(&counters.rotations, 1);
    published.send_modify(|p| p.key = key);
}

/// State shared by the threads and the control side.
pub struct Engine {
    pub stop: AtomicBool,
    pub identities: RwLock<Identities>,
    pub table: RwLock<Table>,
    /// Shared with the engines before and after this one.
    pub counters: Arc<Counters>,
    pub socket: UdpSocket,
    pub tap: Tap,
    pub vtep: Ipv4Addr,
    pub port: u16,
    pub key_file: KeyFile,
    pub published: Arc<watch::Sender<Published>>,
    pub rotate_every: Duration,
    pub next_rotation: Arc<Mutex<Instant>>,
    /// The longest packet a message may carry, padding included: this
    /// node's underlay MTU less WireGuard's overhead (0: no padding). A
    /// peer on a narrower underlay lowers it for itself.
    pub pad_limit: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// WireGuard pads every packet it seals with zeros to a multiple of this
/// many bytes, as far as the MTU allows (whitepaper §5.4.6; kernel
/// WireGuard's `MESSAGE_PADDING_MULTIPLE`), so the wire tells packet
/// lengths only in 16-byte steps. boringtun does not pad; the engine does,
/// and receivers (boringtun and the kernel alike) trim a packet to its
/// IPv4 length.
const PADDING_MULTIPLE: usize = 16;

/// The longest packet a message may carry, padding included, on an
/// underlay of MTU `mtu`.
pub fn pad_limit(mtu: u32) -> usize {
    mtu.saturating_sub(ovl_common::wire::WIREGUARD_OVERHEAD) as usize
}

/// The length a packet of `len` bytes is sealed at: rounded up to
/// [`PADDING_MULTIPLE`], but not beyond `limit` (the longest packet whose
/// message fits the underlay), and never shorter than itself.
fn padded_len(len: usize, limit: usize) -> usize {
    len.next_multiple_of(PADDING_MULTIPLE).min(limit).max(len)
}

/// Waits until `fd` is readable or `POLL_MS` passed.
fn wait_readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, POLL_MS) > 0 }
}

/// The destination VTEP of a frame from the crypto device (its outer
/// IPv4 destination), without reading lengths: a GSO frame's outer length
/// is not the packet's.
fn vtep_of(frame: &[u8]) -> Option<Ipv4Addr> {
    let ip = frame.get(ETH_HDR_LEN..ETH_HDR_LEN + 20)?;
    if frame[12..14] != ETH_P_IP.to_be_bytes() || ip[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]))
}

/// Where the VXLAN packet in a frame from the crypto device goes: the IPv4
/// packet (outer header onwards) and its destination VTEP.
fn vxlan_of(frame: &[u8]) -> Option<(&[u8], Ipv4Addr)> {
    let ip = frame.get(ETH_HDR_LEN..)?;
    if frame.get(12..14)? != ETH_P_IP.to_be_bytes() || ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // A length shorter than the header is no packet (and the header's
    // fields would lie beyond it).
    let ip = ip.get(..len).filter(|ip| ip.len() >= 20)?;
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Some((ip, dst))
}

/// Checks a decrypted packet: UDP from `peer_vtep` to `vtep` (the decap
/// program behind the crypto device checks the rest: the cluster's VXLAN
/// port, the VNI, the sender as a VTEP of it).
fn is_vxlan_between(packet: &[u8], peer_vtep: Ipv4Addr, vtep: Ipv4Addr) -> bool {
    if packet.len() < 28 || packet[0] >> 4 != 4 || packet[9] != IPPROTO_UDP {
        return false;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if packet.get(ihl..ihl + 8).is_none() {
        return false;
    }
    packet[12..16] == peer_vtep.octets() && packet[16..20] == vtep.octets()
}

/// The drop a boringtun error stands for.
fn classify(e: &WireGuardError) -> CryptoDrop {
    match e {
        WireGuardError::InvalidAeadTag | WireGuardError::InvalidMac => CryptoDrop::AuthFailed,
        WireGuardError::DuplicateCounter
        | WireGuardError::InvalidCounter
        | WireGuardError::WrongTai64nTimestamp => CryptoDrop::Replayed,
        WireGuardError::WrongKey => CryptoDrop::UnknownKey,
        WireGuardError::WrongIndex
        | WireGuardError::NoCurrentSession
        | WireGuardError::UnexpectedPacket
        | WireGuardError::ConnectionExpired => CryptoDrop::UnknownSession,
        _ => CryptoDrop::Malformed,
    }
}

/// WireGuard message type of an outgoing message.
fn is_data(msg: &[u8]) -> bool {
    msg.first() == Some(&MSG_DATA)
}

/// The TOS byte of message `msg`, sealed from a packet whose ECN field
/// gave `tos`: a handshake the tunnel started in the packet's place (it
/// queued the packet) carries no packet, so it is not ECN-capable — its
/// receiver would ignore a congestion mark (RFC 3168 §6.1.1).
fn outer_tos(msg: &[u8], tos: u8) -> u8 {
    if is_data(msg) { tos } else { 0 }
}

/// What the MAC and load checks make of a handshake initiation, before any
/// Diffie-Hellman is spent on it.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    /// Its mac1 is for identity `n` of those checked, and that key's load
    /// allows answering it.
    For(usize),
    /// Its key is over its limit and the message carries no valid cookie
    /// (mac2): the first `len` bytes of the cookie buffer are the cookie
    /// reply to send back.
    Cookie(usize),
    /// Dropped, for this reason.
    Refused(CryptoDrop),
}

/// Checks initiation `msg` from `from` against each of `ids`' limiters, as
/// boringtun's device does before `parse_handshake_anon`: mac1 (keyed by
/// the receiver's public key) says which identity it is for at the cost of
/// a hash per identity, and that identity's limiter counts it and, under
/// load, wants proof of `from` (a cookie) first. A cookie reply is written
/// to `cookie`.
fn admit(
    ids: &[Identity],
    msg: &[u8],
    from: IpAddr,
    cookie: &mut [u8; COOKIE_REPLY_LEN],
) -> Admission {
    for (n, id) in ids.iter().enumerate() {
        match id.limiter().verify_packet(Some(from), msg, cookie) {
            Ok(_) => return Admission::For(n),
            Err(TunnResult::WriteToNetwork(reply)) => return Admission::Cookie(reply.len()),
            // Another identity's mac1, or none of them.
            Err(TunnResult::Err(WireGuardError::InvalidMac)) => {}
            Err(TunnResult::Err(e)) => return Admission::Refused(classify(&e)),
            Err(_) => return Admission::Refused(CryptoDrop::Malformed),
        }
    }
    Admission::Refused(CryptoDrop::AuthFailed)
}

/// The static key of the node that sent `init` to identity `mine`: the
/// Diffie-Hellman that [`admit`] guards.
fn initiator_of(mine: &Identity, init: &HandshakeInit) -> Option<PublicKey> {
    #[cfg(test)]
    tests::DIFFIE_HELLMANS.with(|n| n.set(n.get() + 1));
    parse_handshake_anon(mine.secret(), mine.public(), init)
        .ok()
        .map(|h| PublicKey(h.peer_static_public))
}

impl Engine {
    /// This node's current identity (a copy: no lock held after).
    fn current_identity(&self) -> Identity {
        self.identities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .clone()
    }

    /// This node's current public key.
    fn current_key(&self) -> PublicKey {
        self.identities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .public_key()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The longest packet a message to `peer` may carry, padding included.
    /// Padding must not make a message its receiver's underlay cannot
    /// take: a network's MTU fits the narrowest node, which need not be a
    /// multiple of 16 bytes away from it.
    fn pad_limit_for(&self, peer: &PeerInfo) -> usize {
        peer.underlay_mtu
            .map(pad_limit)
            .into_iter()
            .fold(self.pad_limit.load(Ordering::Relaxed), usize::min)
    }

    fn send(&self, msg: &[u8], to: SocketAddr) {
        if let Err(e) = self.socket.send_to(msg, to) {
            log::debug!("send to {to}: {e}");
            self.counters.dropped(CryptoDrop::IoError);
        }
    }

    /// Sends what a tunnel asked to send, counting it.
    fn emit(&self, msg: &[u8], to: SocketAddr, payload: usize) {
        self.count_out(msg, payload);
        self.send(msg, to);
    }

    /// Counts a message a tunnel produced.
    fn count_out(&self, msg: &[u8], payload: usize) {
        if is_data(msg) {
            if payload > 0 {
                Counters::add(&self.counters.tx_packets, 1);
                Counters::add(&self.counters.tx_bytes, payload as u64);
            }
        } else {
            Counters::add(&self.counters.handshakes_sent, 1);
        }
    }

    fn flush(&self, out: &mut Outgoing) {
        for _ in 0..out.flush(&self.socket) {
            self.counters.dropped(CryptoDrop::IoError);
        }
    }

    /// The transmit thread: device → seal → UDP. Reads every frame that
    /// is ready, then sends the batch with one system call.
    pub fn run_tx(&self) {
        let mut frame = vec![0u8; BUF];
        let mut scratch = vec![0u8; BUF];
        let mut segment = vec![0u8; BUF];
        let mut out = Outgoing::default();
        let fd = self.tap.file().as_raw_fd();
        // SAFETY: fcntl on a descriptor this engine owns.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let mut file = self.tap.file();
        while !self.stopped() {
            if !wait_readable(fd) {
                continue;
            }
            // Under sustained traffic the device is never empty: the stop
            // flag is looked at between frames too.
            while !self.stopped() {
                match file.read(&mut frame) {
                    Ok(n) => self.seal(&mut frame[..n], &mut out, &mut scratch, &mut segment),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if !self.stopped() {
                            log::error!("crypto device {}: {e}", self.tap.name());
                        }
                        return;
                    }
                }
                if out.is_full() {
                    self.flush(&mut out);
                }
            }
            self.flush(&mut out);
        }
    }

    /// Seals one frame from the device (virtio-net header first) for its
    /// VTEP's node, into the outgoing batch: a GSO super-packet as the
    /// train of wire-size frames it stands for, each its own message.
    fn seal(&self, frame: &mut [u8], out: &mut Outgoing, scratch: &mut [u8], segment: &mut [u8]) {
        if frame.len() < VNET_HDR_LEN {
            self.counters.dropped(CryptoDrop::Malformed);
            return;
        }
        let (hdr, frame) = frame.split_at_mut(VNET_HDR_LEN);
        let hdr = VnetHdr::parse(hdr);
        // Drops count wire-size packets, as the sealed ones do: a
        // super-packet as the packets it stands for.
        let segments = offload::segment_count(frame, &hdr);
        let Some(vtep) = vtep_of(frame) else {
            self.counters.dropped_n(CryptoDrop::NoKey, segments as u64);
            return;
        };
        let peer = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_vtep(vtep);
        let Some(peer) = peer else {
            self.counters.dropped_n(CryptoDrop::NoKey, segments as u64);
            return;
        };
        let mine = self.current_key();
        // The whole train fits the batch: no send under the peer's lock.
        if segments > SLOTS - out.len() && segments <= SLOTS {
            self.flush(out);
        }
        let mut p = lock(&peer);
        let to = p.endpoint();
        let limit = self.pad_limit_for(&p.info);
        let Some(sender) = p.sender(&mine, Instant::now()) else {
            self.counters.dropped_n(CryptoDrop::NoKey, segments as u64);
            return;
        };
        let generation = &mut p.gens[sender.index];
        let mut seal_one = |wire_frame: &[u8]| {
            let Some((packet, _)) = vxlan_of(wire_frame) else {
                self.counters.dropped(CryptoDrop::Malformed);
                return;
            };
            if out.is_full() {
                self.flush(out);
            }
            if generation.tunn.time_since_last_handshake().is_none() {
                self.stage(generation, packet, to, out);
            } else {
                self.seal_packet(&mut generation.tunn, packet, vtep, to, limit, out, scratch);
            }
        };
        if hdr.gso_type == GSO_NONE {
            if hdr.flags & F_NEEDS_CSUM != 0 && offload::complete_checksum(frame, &hdr).is_err() {
                self.counters.dropped(CryptoDrop::Malformed);
            } else {
                seal_one(frame);
            }
        } else if offload::split(frame, &hdr, segment, &mut seal_one).is_err() {
            log::debug!("cannot cut a GSO frame for {vtep}: {hdr:?}");
            self.counters
                .dropped_n(CryptoDrop::Malformed, segments as u64);
        }
        if sender.handshake_newest
            && let Some(n) = p.newest(&mine)
        {
            self.initiate(&mut p, n, to, scratch);
        }
    }

    /// Seals one VXLAN packet with `tunn` into the outgoing batch (or, too
    /// large for a slot, sends it at once), its ECN field copied to the
    /// message's outer header (RFC 6040 §4.1, as kernel WireGuard), padded
    /// as WireGuard pads ([`PADDING_MULTIPLE`]; `scratch` holds the padded
    /// copy), up to `limit` bytes. A packet too large for a slot goes
    /// unpadded: only networks with an MTU beyond 9 KiB have them.
    #[allow(clippy::too_many_arguments)]
    fn seal_packet(
        &self,
        tunn: &mut Tunn,
        packet: &[u8],
        vtep: Ipv4Addr,
        to: SocketAddr,
        limit: usize,
        out: &mut Outgoing,
        scratch: &mut [u8],
    ) {
        let tos = ecn::sealed_tos(packet);
        let payload = packet.len();
        let padded = padded_len(payload, limit);
        if padded + 32 <= SLOT {
            let sealed = if padded > payload {
                scratch[..payload].copy_from_slice(packet);
                scratch[payload..padded].fill(0);
                &scratch[..padded]
            } else {
                packet
            };
            let slot = out.slot();
            match tunn.encapsulate(sealed, slot) {
                TunnResult::WriteToNetwork(msg) => {
                    let (len, tos) = (msg.len(), outer_tos(msg, tos));
                    self.count_out(msg, payload);
                    out.commit(len, to, tos);
                }
                TunnResult::Err(e) => {
                    log::debug!("seal for {vtep}: {e:?}");
                    self.counters.dropped(CryptoDrop::IoError);
                }
                _ => {}
            }
        } else {
            match tunn.encapsulate(packet, scratch) {
                TunnResult::WriteToNetwork(msg) => {
                    self.count_out(msg, payload);
                    if let Err(e) = batch::send_one(&self.socket, msg, to, outer_tos(msg, tos)) {
                        log::debug!("send to {to}: {e}");
                        self.counters.dropped(CryptoDrop::IoError);
                    }
                }
                TunnResult::Err(e) => {
                    log::debug!("seal for {vtep}: {e:?}");
                    self.counters.dropped(CryptoDrop::IoError);
                }
                _ => {}
            }
        }
    }

    /// Keeps `packet` until tunnel `g` has a session, and starts its
    /// handshake unless one is under way (what boringtun would do with
    /// it, but the engine seals it later, as every other packet).
    fn stage(&self, g: &mut Generation, packet: &[u8], to: SocketAddr, out: &mut Outgoing) {
        for _ in 0..g.staged.push(packet, Instant::now()) {
            self.counters.dropped(CryptoDrop::NoKey);
        }
        if let TunnResult::WriteToNetwork(msg) =
            g.tunn.format_handshake_initiation(out.slot(), false)
        {
            let len = msg.len();
            Counters::add(&self.counters.handshakes_sent, 1);
            // A handshake carries no packet: not ECN-capable.
            out.commit(len, to, 0);
        }
    }

    /// Seals and sends what waited for tunnel `index` of `p`, once it has
    /// a session: each packet padded and with its ECN field on the wire,
    /// as if it had just come.
    fn send_staged(&self, p: &mut Peer, index: usize) {
        let Some(g) = p.gens.get(index) else { return };
        if g.staged.packets.is_empty() || g.tunn.time_since_last_handshake().is_none() {
            return;
        }
        let (to, limit) = (p.endpoint(), self.pad_limit_for(&p.info));
        let vtep = p.info.vtep;
        let g = &mut p.gens[index];
        let mut out = Outgoing::default();
        let mut scratch = vec![0u8; BUF];
        for packet in g.staged.take() {
            if out.is_full() {
                self.flush(&mut out);
            }
            self.seal_packet(
                &mut g.tunn,
                &packet,
                vtep,
                to,
                limit,
                &mut out,
                &mut scratch,
            );
        }
        self.flush(&mut out);
    }

    /// Starts (or keeps going) the handshake of tunnel `index` of `p`.
    fn initiate(&self, p: &mut Peer, index: usize, to: SocketAddr, out: &mut [u8]) {
        if let TunnResult::WriteToNetwork(msg) =
            p.gens[index].tunn.format_handshake_initiation(out, false)
        {
            Counters::add(&self.counters.handshakes_sent, 1);
            self.send(msg, to);
        }
    }

    /// The receive thread: UDP → open → check → device.
    pub fn run_rx(&self) {
        // Decrypted packets land after room for the virtio-net header and
        // the Ethernet header the device needs.
        let mut out = vec![0u8; BUF];
        let mut header = [0u8; ETH_HDR_LEN];
        header[..6].copy_from_slice(&self.tap.mac());
        header[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        header[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        out[VNET_HDR_LEN..VNET_HDR_LEN + ETH_HDR_LEN].copy_from_slice(&header);
        let fd = self.socket.as_raw_fd();
        let mut incoming = Incoming::default();
        let mut merger = Coalescer::new(self.tap.tunnel_gso());
        while !self.stopped() {
            if !wait_readable(fd) {
                continue;
            }
            // Under a flood the socket is never empty: the stop flag is
            // looked at between batches too.
            while !self.stopped() {
                match incoming.receive(&self.socket) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("WireGuard socket: {e}");
                        break;
                    }
                }
                for _ in 0..incoming.truncated() {
                    self.counters.dropped(CryptoDrop::Malformed);
                }
                for i in 0..incoming.len() {
                    let (msg, from, tos) = incoming.get(i);
                    self.open(msg, from, Ecn::of_tos(tos), &mut out, &mut merger);
                }
                // What this batch merged goes to the device now.
                let refused = merger.flush(&mut |f| self.write_frame(f));
                self.refused(refused);
            }
        }
    }

    /// Handles one received message, which came with ECN field `outer`.
    fn open(
        &self,
        msg: &[u8],
        from: SocketAddr,
        outer: Ecn,
        out: &mut [u8],
        merger: &mut Coalescer,
    ) {
        let index = match Tunn::parse_incoming_packet(msg) {
            Err(_) => {
                self.counters.dropped(CryptoDrop::Malformed);
                return;
            }
            Ok(Packet::HandshakeInit(init)) => {
                self.on_initiation(&init, msg, from, out, merger);
                return;
            }
            Ok(Packet::HandshakeResponse(r)) => r.receiver_idx,
            Ok(Packet::PacketCookieReply(c)) => c.receiver_idx,
            Ok(Packet::PacketData(d)) => d.receiver_idx,
        };
        let found = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_index(index);
        let Some((peer, id)) = found else {
            self.counters.dropped(CryptoDrop::UnknownSession);
            return;
        };
        let mut p = lock(&peer);
        let Some(g) = p.by_id(id) else {
            self.counters.dropped(CryptoDrop::UnknownSession);
            return;
        };
        self.decapsulate(&mut p, g, msg, from, outer, out, merger);
        self.send_staged(&mut p, g);
    }

    /// A handshake initiation: find which of this node's identities it is
    /// for (its mac1) and whether that key may answer now (its load, or a
    /// cookie), then which peer sent it (a Diffie-Hellman), then let that
    /// pair's tunnel answer.
    fn on_initiation(
        &self,
        init: &HandshakeInit,
        msg: &[u8],
        from: SocketAddr,
        out: &mut [u8],
        merger: &mut Coalescer,
    ) {
        let ids: Vec<Identity> = self
            .identities
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .all()
            .cloned()
            .collect();
        // Not written into `out`: the Ethernet header run_rx put in front
        // of every decrypted packet must stay.
        let mut cookie = [0u8; COOKIE_REPLY_LEN];
        let mine = match admit(&ids, msg, from.ip(), &mut cookie) {
            Admission::For(n) => &ids[n],
            Admission::Cookie(len) => {
                self.counters.dropped(CryptoDrop::UnderLoad);
                self.send(&cookie[..len], from);
                return;
            }
            Admission::Refused(why) => {
                self.counters.dropped(why);
                return;
            }
        };
        let Some(theirs) = initiator_of(mine, init) else {
            self.counters.dropped(CryptoDrop::AuthFailed);
            return;
        };
        let peer = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_key(&theirs);
        let Some(peer) = peer else {
            self.counters.dropped(CryptoDrop::UnknownKey);
            return;
        };
        let known = lock(&peer).by_keys(&mine.public_key(), &theirs).is_some();
        if !known {
            self.table
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .ensure_generation(&peer, mine, theirs, Instant::now());
        }
        // Found again under the lock it is used under: the timer thread
        // may have retired a tunnel in between, moving the others.
        let mut p = lock(&peer);
        let Some(index) = p.by_keys(&mine.public_key(), &theirs) else {
            self.counters.dropped(CryptoDrop::UnknownSession);
            return;
        };
        // A handshake opens to no packet: its ECN field means nothing.
        self.decapsulate(&mut p, index, msg, from, Ecn::NotEct, out, merger);
        self.send_staged(&mut p, index);
    }

    /// Runs a received message (outer ECN field `outer`) through tunnel
    /// `g` of `p` and acts on the outcome.
    #[allow(clippy::too_many_arguments)]
    fn decapsulate(
        &self,
        p: &mut Peer,
        g: usize,
        msg: &[u8],
        from: SocketAddr,
        outer: Ecn,
        out: &mut [u8],
        merger: &mut Coalescer,
    ) {
        let to = p.endpoint();
        let vtep = p.info.vtep;
        let tunn = &mut p.gens[g].tunn;
        // The Ethernet header run_rx wrote stays in front of what opens.
        let body = &mut out[VNET_HDR_LEN + ETH_HDR_LEN..];
        match tunn.decapsulate(Some(from.ip()), msg, body) {
            // The tunnel checked the handshake against its identity's
            // limiter too, found it over its limit since (or a response
            // under load) and wants a cookie from the sender first.
            TunnResult::WriteToNetwork(reply) if reply.first() == Some(&MSG_COOKIE_REPLY) => {
                self.counters.dropped(CryptoDrop::UnderLoad);
                self.send(reply, from);
            }
            TunnResult::WriteToNetwork(reply) => {
                if !is_data(msg) {
                    Counters::add(&self.counters.handshakes_received, 1);
                }
                // Handshake answers go where the initiation came from.
                let dest = if msg.first() == Some(&MSG_INITIATION) {
                    from
                } else {
                    to
                };
                self.emit(reply, dest, 0);
                // Packets boringtun queued itself (none: the engine stages
                // them) would go now.
                while let TunnResult::WriteToNetwork(m) = tunn.decapsulate(None, &[], body) {
                    let len = m.len().saturating_sub(32);
                    self.emit(m, to, len)
                }
            }
            TunnResult::WriteToTunnelV4(packet, _) => {
                let len = packet.len();
                if !is_vxlan_between(packet, vtep, self.vtep) {
                    self.counters.dropped(CryptoDrop::Spoofed);
                    return;
                }
                // The decap program behind the device carries the mark on
                // to the container's packet (its own RFC 6040 step).
                if ecn::carry_outer_mark(outer, packet).is_err() {
                    self.counters.dropped(CryptoDrop::Congestion);
                    return;
                }
                Counters::add(&self.counters.rx_packets, 1);
                Counters::add(&self.counters.rx_bytes, len as u64);
                let frame = &mut out[..VNET_HDR_LEN + ETH_HDR_LEN + len];
                let refused = merger.push(frame, &mut |f| self.write_frame(f));
                self.refused(refused);
            }
            TunnResult::WriteToTunnelV6(..) => self.counters.dropped(CryptoDrop::Spoofed),
            TunnResult::Done => {
                if !is_data(msg) {
                    Counters::add(&self.counters.handshakes_received, 1);
                }
            }
            TunnResult::Err(e) => {
                log::debug!("message from {from}: {e:?}");
                self.counters.dropped(classify(&e));
            }
        }
    }

    /// Writes one frame (virtio-net header first) to the device; false if
    /// it refused it.
    fn write_frame(&self, frame: &[u8]) -> bool {
        // A TAP takes a frame per write, whole or not at all.
        match self.tap.file().write_all(frame) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("write to {}: {e}", self.tap.name());
                false
            }
        }
    }

    /// Counts `packets` that waited for a handshake and will never leave
    /// (given up after [`STAGED_FOR`], or their tunnel, peer or engine
    /// went): dropped `no_key`, as packets with no session to seal them.
    pub fn give_up(&self, packets: usize) {
        self.counters.dropped_n(CryptoDrop::NoKey, packets as u64);
    }

    /// Counts decrypted packets the device refused.
    fn refused(&self, packets: usize) {
        for _ in 0..packets {
            self.counters.dropped(CryptoDrop::IoError);
        }
    }

    /// The timer thread: handshake retries, keep-alives, moving traffic to
    /// the newest tunnels, retiring old ones, and rotating on schedule.
    pub fn run_timers(self: &Arc<Self>) {
        let mut out = vec![0u8; BUF];
        while !self.stopped() {
            std::thread::sleep(TICK);
            self.tick(Instant::now(), &mut out);
        }
    }

    /// What the timers do at `now` (`out`: room for a message): every
    /// deadline of this node's own is measured against it. (boringtun's
    /// tunnels keep their own clock for handshake retries and
    /// keep-alives.)
    fn tick(&self, now: Instant, out: &mut [u8]) {
        if now >= *lock(&self.next_rotation) {
            match self.rotate() {
                Ok(k) => log::info!("rotated this node's WireGuard key on schedule: {k}"),
                Err(e) => log::error!("scheduled key rotation: {e:#}"),
            }
        }
        let (mine, held) = {
            let mut ids = self.identities.write().unwrap_or_else(|e| e.into_inner());
            ids.retiring.retain(|(_, until)| now < *until);
            // Nothing else resets the limiters: the tunnels share them
            // and leave that to their owner.
            ids.reset_handshake_limits();
            (ids.current.public_key(), ids.held())
        };
        let peers: Vec<Arc<Mutex<Peer>>> = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .peers()
            .cloned()
            .collect();
        let mut retired = Vec::new();
        for peer in peers {
            let mut p = lock(&peer);
            let to = p.endpoint();
            for g in &mut p.gens {
                if let TunnResult::WriteToNetwork(msg) = g.tunn.update_timers(out) {
                    let len = msg.len();
                    self.emit(msg, to, len.saturating_sub(32));
                }
                // Given up with the handshake, as boringtun gives up
                // its own queue.
                if g.tunn.time_since_last_handshake().is_none()
                    && g.staged
                        .since
                        .is_some_and(|t| now.duration_since(t) >= STAGED_FOR)
                {
                    self.give_up(g.staged.take().len());
                }
            }
            if let Some(s) = p.sender(&mine, now)
                && s.handshake_newest
                && let Some(n) = p.newest(&mine)
            {
                self.initiate(&mut p, n, to, out);
            }
            for g in p.retire(&mine, &held, now) {
                self.give_up(g.staged.len());
                retired.push(g.id);
            }
        }
        if !retired.is_empty() {
            self.table
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .forget(&retired);
        }
    }

    /// Makes a new identity current (stored first), keeps the old one
    /// answering for [`RETIRE_AFTER`], adds tunnels for the new one (which
    /// wait [`PUBLISH_GRACE`] for peers to start the handshake) and
    /// publishes the new key.
    pub fn rotate(&self) -> anyhow::Result<PublicKey> {
        let new = Identity::generate()?;
        self.key_file.store(&new)?;
        let now = Instant::now();
        {
            let mut ids = self.identities.write().unwrap_or_else(|e| e.into_inner());
            let old = std::mem::replace(&mut ids.current, new.clone());
            ids.retiring.push((old, now + RETIRE_AFTER));
        }
        {
            let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
            let peers: Vec<(Arc<Mutex<Peer>>, PublicKey)> = table
                .peers()
                .map(|p| (p.clone(), lock(p).info.key))
                .collect();
            for (peer, theirs) in peers {
                table.ensure_generation(&peer, &new, theirs, now + PUBLISH_GRACE);
            }
        }
        let key = new.public_key();
        rotated(
            &self.next_rotation,
            now + self.rotate_every,
            &self.counters,
            &self.published,
            key,
        );
        Ok(key)
    }

    /// Makes the tunnel table hold `peers`; peers whose key changed under a
    /// live session handshake on their new tunnel at once.
    pub fn set_peers(&self, peers: &[PeerInfo]) {
        let me = self.current_identity();
        let set = self
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_peers(peers, &me, Instant::now());
        self.give_up(set.unsent);
        self.handshake_newest(set.rekey, &me.public_key());
    }

    /// Starts the handshake of every peer this engine has no session
    /// with (it just started, or the peer just joined), unless one is
    /// under way: a peer that still holds a session with an earlier run of
    /// this node's engine would otherwise send into it, unheard, until its
    /// own timers gave up on it (15 s).
    pub fn handshake_sessionless(&self) {
        let mine = self.current_key();
        let sessionless: Vec<Arc<Mutex<Peer>>> = self
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .peers()
            .filter(|p| lock(p).gens.iter().all(|g| !g.live()))
            .cloned()
            .collect();
        self.handshake_newest(sessionless, &mine);
    }

    /// Starts (or, under way, leaves to its timers) the handshake of the
    /// newest tunnel of each of `peers` for this node's key `mine`.
    fn handshake_newest(&self, peers: Vec<Arc<Mutex<Peer>>>, mine: &PublicKey) {
        let mut out = vec![0u8; 256];
        for peer in peers {
            let mut p = lock(&peer);
            let to = p.endpoint();
            if let Some(n) = p.newest(mine) {
                self.initiate(&mut p, n, to, &mut out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::Cell,
        sync::atomic::{AtomicU32, Ordering},
    };

    use ovl_common::wire::VXLAN_PORT;

    use super::*;
    use crate::{
        crypto::{
            keys::{HANDSHAKES_PER_SECOND, KeyFile},
            peers::PeerInfo,
        },
        testutil::TestDir,
    };

    thread_local! {
        /// Diffie-Hellmans [`initiator_of`] ran on this thread.
        pub(super) static DIFFIE_HELLMANS: Cell<u64> = const { Cell::new(0) };
    }

    fn diffie_hellmans() -> u64 {
        DIFFIE_HELLMANS.with(Cell::get)
    }

    const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

    /// A UDP socket on the loopback that never blocks.
    fn socket() -> UdpSocket {
        let s = UdpSocket::bind((LOOPBACK, 0)).expect("bind a loopback UDP socket");
        s.set_nonblocking(true).expect("make it non-blocking");
        s
    }

    /// Every datagram waiting on `s` (loopback delivers before send
    /// returns).
    fn received(s: &UdpSocket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = s.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    /// A handshake initiation from `tunn` (again, with `again`).
    fn initiation(tunn: &mut Tunn, again: bool) -> Vec<u8> {
        let mut buf = [0u8; 256];
        match tunn.format_handshake_initiation(&mut buf, again) {
            TunnResult::WriteToNetwork(m) => m.to_vec(),
            other => panic!("no initiation: {other:?}"),
        }
    }

    /// A node's engine on the loopback with a crypto device of its own,
    /// its threads not started: the tests hand it messages as its receive
    /// thread would. A TAP needs CAP_NET_ADMIN: the test suite runs as
    /// root.
    struct Node {
        engine: Engine,
        out: Vec<u8>,
        merger: Coalescer,
        _keys: TestDir,
    }

    impl Node {
        fn new() -> Node {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("ovlt{}-{n}", std::process::id());
            let tap = Tap::create(&name, 1500)
                .unwrap_or_else(|e| panic!("create TAP {name} (root only): {e}"));
            let identity = Identity::generate().expect("kernel randomness");
            let keys = TestDir::new("engine-keys");
            let engine = Engine {
                stop: Default::default(),
                published: Arc::new(
                    watch::channel(Published {
                        key: identity.public_key(),
                        port: 0,
                    })
                    .0,
                ),
                identities: RwLock::new(Identities {
                    current: identity,
                    retiring: Vec::new(),
                }),
                table: Default::default(),
                counters: Default::default(),
                socket: UdpSocket::bind((LOOPBACK, 0)).expect("bind the engine's socket"),
                tap,
                vtep: LOOPBACK,
                port: 0,
                key_file: KeyFile::in_dir(keys.path()),
                rotate_every: Duration::from_secs(3600),
                next_rotation: Arc::new(Mutex::new(Instant::now() + Duration::from_secs(3600))),
                pad_limit: AtomicUsize::new(1440),
            };
            Node {
                engine,
                out: vec![0u8; BUF],
                merger: Coalescer::new(false),
                _keys: keys,
            }
        }

        /// This node's current identity.
        fn identity(&self) -> Identity {
            self.engine.identities.read().unwrap().current.clone()
        }

        /// Makes `peer` (key and socket) this node's only peer.
        fn add_peer(&self, peer: &Remote) {
            self.add_peer_on(peer, None);
        }

        /// Makes `peer` this node's only peer, on an underlay of MTU
        /// `underlay_mtu` (None: not reported).
        fn add_peer_on(&self, peer: &Remote, underlay_mtu: Option<u32>) {
            self.engine.set_peers(&[PeerInfo {
                node: "b".into(),
                vtep: LOOPBACK,
                key: peer.id.public_key(),
                port: peer.socket.local_addr().unwrap().port(),
                underlay_mtu,
            }]);
        }

        /// Completes a handshake `peer` starts, and the keep-alive after
        /// it: the node has a session to send with.
        fn connect(&mut self, peer: &mut Remote) {
            let init = initiation(&mut peer.tunn, false);
            self.receive(&init, &peer.socket);
            let replies = received(&peer.socket);
            assert_eq!(replies.len(), 1, "one handshake response");
            let keepalive = peer.open(&replies[0]).expect("the response completes");
            self.receive(&keepalive, &peer.socket);
        }

        /// Seals `packet` as the transmit thread would a frame the crypto
        /// device handed over (no offload), and sends it.
        fn seal(&self, packet: &[u8]) {
            let mut frame = vec![0u8; VNET_HDR_LEN + ETH_HDR_LEN];
            frame[VNET_HDR_LEN + 12..].copy_from_slice(&ETH_P_IP.to_be_bytes());
            frame.extend_from_slice(packet);
            self.seal_frame(&mut frame);
        }

        /// Seals `frame` (virtio-net header first) as the transmit thread
        /// would, and sends what it made.
        fn seal_frame(&self, frame: &mut [u8]) {
            let (mut scratch, mut segment) = (vec![0u8; BUF], vec![0u8; BUF]);
            let mut out = Outgoing::default();
            self.engine
                .seal(frame, &mut out, &mut scratch, &mut segment);
            self.engine.flush(&mut out);
        }

        /// The only peer's only tunnel, for a look at what it stages.
        fn with_tunnel<R>(&self, f: impl FnOnce(&Generation) -> R) -> R {
            let table = self.engine.table.read().unwrap();
            let peers: Vec<_> = table.peers().collect();
            assert_eq!(peers.len(), 1, "one peer");
            let p = lock(peers[0]);
            assert_eq!(p.gens.len(), 1, "one tunnel");
            f(&p.gens[0])
        }

        /// `msg` arrives from `from`'s address.
        fn receive(&mut self, msg: &[u8], from: &UdpSocket) {
            self.receive_marked(msg, from, Ecn::NotEct);
        }

        /// `msg` arrives from `from`'s address with ECN field `outer`.
        fn receive_marked(&mut self, msg: &[u8], from: &UdpSocket, outer: Ecn) {
            let from = from.local_addr().unwrap();
            self.engine
                .open(msg, from, outer, &mut self.out, &mut self.merger);
        }

        fn drops(&self, why: CryptoDrop) -> u64 {
            self.engine.counters.snapshot().drops[why.name()]
        }

        fn handshakes(&self) -> (u64, u64) {
            let c = self.engine.counters.snapshot();
            (c.handshakes_received, c.handshakes_sent)
        }
    }

    /// Another node: its key, the socket it speaks from, and its tunnel
    /// to a node's key (plain boringtun, as any WireGuard peer).
    struct Remote {
        id: Identity,
        socket: UdpSocket,
        tunn: Tunn,
    }

    impl Remote {
        fn new(to: &Identity) -> Remote {
            let id = Identity::generate().expect("kernel randomness");
            let tunn = Tunn::new(id.secret().clone(), *to.public(), None, None, 1, None);
            Remote {
                id,
                socket: socket(),
                tunn,
            }
        }

        /// Opens `msg` from the node; what its tunnel makes of it.
        fn open(&mut self, msg: &[u8]) -> Result<Vec<u8>, String> {
            let mut buf = vec![0u8; 2048];
            match self.tunn.decapsulate(Some(LOOPBACK.into()), msg, &mut buf) {
                TunnResult::WriteToNetwork(m) => Ok(m.to_vec()),
                TunnResult::Done => Ok(Vec::new()),
                other => Err(format!("{other:?}")),
            }
        }
    }

    #[test]
    fn random_initiations_cost_no_diffie_hellman_and_a_real_one_is_still_answered() {
        let mut node = Node::new();
        let attacker = socket();
        // Type 1 and the size of an initiation, random otherwise: mac1
        // does not verify for any key of the node.
        const N: u64 = 1000;
        let mut junk = [0u8; 148];
        for _ in 0..N {
            crate::random::fill(&mut junk).expect("kernel randomness");
            junk[..4].copy_from_slice(&[MSG_INITIATION, 0, 0, 0]);
            node.receive(&junk, &attacker);
        }
        assert_eq!(diffie_hellmans(), 0);
        assert_eq!(node.drops(CryptoDrop::AuthFailed), N);
        assert_eq!(node.drops(CryptoDrop::UnderLoad), 0);
        assert_eq!(node.handshakes(), (0, 0));
        assert!(received(&attacker).is_empty());

        // They used none of the key's budget either: a real peer's
        // initiation costs one Diffie-Hellman and is answered with a
        // response that completes its handshake.
        let mut peer = Remote::new(&node.identity());
        node.add_peer(&peer);
        let init = initiation(&mut peer.tunn, false);
        node.receive(&init, &peer.socket);
        assert_eq!(diffie_hellmans(), 1);
        assert_eq!(node.handshakes(), (1, 1));
        let replies = received(&peer.socket);
        assert_eq!(replies.len(), 1);
        assert_eq!((replies[0][0], replies[0].len()), (2, 92));
        let keepalive = peer.open(&replies[0]).expect("the response completes");
        assert_eq!(keepalive[0], MSG_DATA);
        assert_eq!(node.drops(CryptoDrop::AuthFailed), N);
    }

    #[test]
    fn initiations_over_the_limit_get_cookie_replies_which_let_a_real_peer_through() {
        let mut node = Node::new();
        let me = node.identity();
        let mut peer = Remote::new(&me);
        node.add_peer(&peer);
        let attacker = socket();

        // Initiations with a valid mac1, from keys no node publishes: each
        // would cost a Diffie-Hellman.
        const OVER: u64 = 20;
        let mut senders = Vec::new();
        for _ in 0..HANDSHAKES_PER_SECOND + OVER {
            let stranger = Identity::generate().expect("kernel randomness");
            let mut t = Tunn::new(stranger.secret().clone(), *me.public(), None, None, 1, None);
            let init = initiation(&mut t, false);
            senders.push(init[4..8].to_vec());
            node.receive(&init, &attacker);
        }
        // Within the limit: one each, which finds a key nobody publishes.
        assert_eq!(diffie_hellmans(), HANDSHAKES_PER_SECOND);
        assert_eq!(node.drops(CryptoDrop::UnknownKey), HANDSHAKES_PER_SECOND);
        // Over it: none, but a cookie reply to each initiation's sender.
        assert_eq!(node.drops(CryptoDrop::UnderLoad), OVER);
        let cookies = received(&attacker);
        assert_eq!(cookies.len() as u64, OVER);
        for (c, sender) in cookies
            .iter()
            .zip(&senders[HANDSHAKES_PER_SECOND as usize..])
        {
            assert_eq!((c[0], c.len()), (MSG_COOKIE_REPLY, COOKIE_REPLY_LEN));
            assert_eq!(c[4..8], sender[..]);
        }
        assert_eq!(node.handshakes(), (0, 0));

        // A real peer's initiation now gets a cookie too, not a response.
        let init = initiation(&mut peer.tunn, false);
        node.receive(&init, &peer.socket);
        let replies = received(&peer.socket);
        assert_eq!(replies.len(), 1);
        assert_eq!(
            (replies[0][0], replies[0].len()),
            (MSG_COOKIE_REPLY, COOKIE_REPLY_LEN)
        );
        assert_eq!(diffie_hellmans(), HANDSHAKES_PER_SECOND);
        assert_eq!(node.drops(CryptoDrop::UnderLoad), OVER + 1);
        assert_eq!(node.handshakes(), (0, 0));

        // The cookie proves its address: its next initiation carries it
        // (mac2) and is answered, load or not.
        assert_eq!(peer.open(&replies[0]), Ok(Vec::new()));
        let init = initiation(&mut peer.tunn, true);
        node.receive(&init, &peer.socket);
        assert_eq!(diffie_hellmans(), HANDSHAKES_PER_SECOND + 1);
        let replies = received(&peer.socket);
        assert_eq!(replies.len(), 1);
        assert_eq!((replies[0][0], replies[0].len()), (2, 92));
        assert_eq!(node.handshakes(), (1, 1));
        assert_eq!(node.drops(CryptoDrop::UnderLoad), OVER + 1);
        let keepalive = peer.open(&replies[0]).expect("the response completes");
        assert_eq!(keepalive[0], MSG_DATA);

        // A second on, the timer thread's reset gives the key a new
        // budget: a stranger's initiation is looked at again.
        std::thread::sleep(Duration::from_secs(1));
        node.engine
            .identities
            .read()
            .unwrap()
            .reset_handshake_limits();
        let stranger = Identity::generate().expect("kernel randomness");
        let mut t = Tunn::new(stranger.secret().clone(), *me.public(), None, None, 1, None);
        node.receive(&initiation(&mut t, false), &attacker);
        assert_eq!(diffie_hellmans(), HANDSHAKES_PER_SECOND + 2);
        assert_eq!(
            node.drops(CryptoDrop::UnknownKey),
            HANDSHAKES_PER_SECOND + 1
        );
        assert_eq!(node.drops(CryptoDrop::UnderLoad), OVER + 1);
        assert!(received(&attacker).is_empty());
    }

    #[test]
    fn an_initiation_to_a_retiring_key_costs_one_diffie_hellman_and_is_answered() {
        let mut node = Node::new();
        let old = node.identity();
        let mut peer = Remote::new(&old);
        node.add_peer(&peer);
        node.engine.rotate().expect("rotate the node's key");
        assert_ne!(node.identity().public_key(), old.public_key());

        // The peer has not read the new key yet: its mac1 names the old
        // one, whose limiter admits it, and only that key's
        // Diffie-Hellman is tried.
        let init = initiation(&mut peer.tunn, false);
        node.receive(&init, &peer.socket);
        assert_eq!(diffie_hellmans(), 1);
        let replies = received(&peer.socket);
        assert_eq!(replies.len(), 1);
        assert_eq!((replies[0][0], replies[0].len()), (2, 92));
        assert_eq!(node.handshakes(), (1, 1));
        assert_eq!(peer.open(&replies[0]).map(|k| k[0]), Ok(MSG_DATA));
    }

    /// A VXLAN packet from the loopback to itself (the test nodes' VTEP)
    /// whose IPv4 header has ECN field `ecn`.
    fn vxlan_packet(ecn: Ecn) -> Vec<u8> {
        vxlan_packet_of(ecn, 20 + 8 + 8 + 14 + 28)
    }

    /// [`vxlan_packet`] of `len` bytes.
    fn vxlan_packet_of(ecn: Ecn, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        let len = p.len() as u16;
        p[0] = 0x45;
        p[1] = ecn.bits();
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[8] = 64;
        p[9] = IPPROTO_UDP;
        p[12..16].copy_from_slice(&LOOPBACK.octets());
        p[16..20].copy_from_slice(&LOOPBACK.octets());
        let sum = offload::ones_sum(&p[..20]);
        p[10..12].copy_from_slice(&(!sum).to_be_bytes());
        p[22..24].copy_from_slice(&VXLAN_PORT.to_be_bytes());
        p[24..26].copy_from_slice(&(len - 20).to_be_bytes());
        p
    }

    #[test]
    fn a_congestion_mark_on_a_message_drops_only_a_packet_that_cannot_carry_it() {
        let mut node = Node::new();
        let mut peer = Remote::new(&node.identity());
        node.add_peer(&peer);
        let init = initiation(&mut peer.tunn, false);
        node.receive(&init, &peer.socket);
        let replies = received(&peer.socket);
        peer.open(&replies[0]).expect("the response completes");
        let mut seal = |packet: &[u8]| {
            let mut buf = vec![0u8; 2048];
            match peer.tunn.encapsulate(packet, &mut buf) {
                TunnResult::WriteToNetwork(m) => m.to_vec(),
                other => panic!("no transport message: {other:?}"),
            }
        };
        let rx = |node: &Node| node.engine.counters.snapshot().rx_packets;
        for (inner, outer, dropped) in [
            (Ecn::Ect0, Ecn::Ce, false),
            (Ecn::Ect1, Ecn::Ce, false),
            (Ecn::NotEct, Ecn::Ect0, false),
            (Ecn::NotEct, Ecn::Ce, true),
            (Ecn::NotEct, Ecn::NotEct, false),
        ] {
            let msg = seal(&vxlan_packet(inner));
            let (before, congestion) = (rx(&node), node.drops(CryptoDrop::Congestion));
            node.receive_marked(&msg, &peer.socket, outer);
            assert_eq!(
                (
                    rx(&node) - before,
                    node.drops(CryptoDrop::Congestion) - congestion
                ),
                if dropped { (0, 1) } else { (1, 0) },
                "{inner:?} inside {outer:?}"
            );
        }
    }

    #[test]
    fn padding_stops_at_the_underlay_mtu_of_the_peer_it_is_sealed_for() {
        // This node on a 1500-byte underlay pads up to 1440 bytes. A
        // network spanning a 1450-byte node has MTU 1340: its largest
        // VXLAN packet is 1390 bytes, which 16-byte steps would make 1392,
        // a 1452-byte datagram that node's underlay cannot take.
        for (peer_mtu, sealed) in [
            (Some(1450), 1390),
            (Some(9000), 1392),
            (None, 1392),
            (Some(1445), 1390),
        ] {
            let mut node = Node::new();
            let mut peer = Remote::new(&node.identity());
            node.add_peer_on(&peer, peer_mtu);
            node.connect(&mut peer);
            let packet = vxlan_packet_of(Ecn::NotEct, 1390);
            node.seal(&packet);
            let msgs = received(&peer.socket);
            assert_eq!(msgs.len(), 1, "peer MTU {peer_mtu:?}");
            assert_eq!(
                msgs[0].len(),
                sealed + 32,
                "a 1390-byte packet for a peer on MTU {peer_mtu:?}"
            );
            let mut buf = vec![0u8; 2048];
            match peer.tunn.decapsulate(None, &msgs[0], &mut buf) {
                TunnResult::WriteToTunnelV4(opened, _) => assert_eq!(opened, &packet[..]),
                other => panic!("not opened: {other:?}"),
            }
            let c = node.engine.counters.snapshot();
            assert_eq!((c.tx_packets, c.tx_bytes), (1, 1390));
        }
    }

    #[test]
    fn a_packet_that_waited_for_the_handshake_keeps_its_ecn_field_and_its_length() {
        let mut node = Node::new();
        let mut peer = Remote::new(&node.identity());
        assert!(batch::enable_tos(&peer.socket));
        node.add_peer(&peer);
        // No session yet: the tunnel queues the packet and sends an
        // initiation in its place.
        node.seal(&vxlan_packet(Ecn::Ce));
        let mut incoming = Incoming::default();
        let n = incoming.receive(&peer.socket).expect("the initiation");
        assert_eq!(n, 1);
        let (init, _, tos) = incoming.get(0);
        assert_eq!((init[0], init.len()), (MSG_INITIATION, 148));
        assert_eq!(tos, 0, "TOS of the initiation");
        let c = node.engine.counters.snapshot();
        assert_eq!((c.handshakes_sent, c.tx_packets), (1, 0));
        // With a session, the packet's ECN field is the message's.
        let init = init.to_vec();
        let mut buf = vec![0u8; 2048];
        let response = match peer.tunn.decapsulate(None, &init, &mut buf) {
            TunnResult::WriteToNetwork(m) => m.to_vec(),
            other => panic!("no response: {other:?}"),
        };
        node.receive(&response, &peer.socket);
        // The keep-alive that completes it, then the packet that waited,
        // padded, its own ECN field on the wire and its own length counted.
        assert_eq!(incoming.receive(&peer.socket).ok(), Some(2));
        let (keepalive, _, tos) = incoming.get(0);
        assert_eq!((keepalive[0], keepalive.len(), tos), (MSG_DATA, 32, 0));
        let (msg, _, tos) = incoming.get(1);
        assert_eq!(
            (msg[0], msg.len(), tos),
            (MSG_DATA, 80 + 32, Ecn::Ce.bits())
        );
        let mut buf = vec![0u8; 2048];
        match peer.tunn.decapsulate(None, msg, &mut buf) {
            TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p, &vxlan_packet(Ecn::Ce)[..]),
            other => panic!("not opened: {other:?}"),
        }
        let c = node.engine.counters.snapshot();
        assert_eq!((c.tx_packets, c.tx_bytes), (1, 78));
        node.seal(&vxlan_packet(Ecn::Ect0));
        incoming.receive(&peer.socket).expect("the sealed packet");
        let (msg, _, tos) = incoming.get(0);
        assert_eq!((msg[0], tos), (MSG_DATA, Ecn::Ect0.bits()));
    }

    /// The VXLAN packets `frame` (virtio-net header first) goes out as.
    fn packets_of(frame: &[u8]) -> Vec<Vec<u8>> {
        let hdr = VnetHdr::parse(frame);
        let mut buf = vec![0u8; BUF];
        let mut packets = Vec::new();
        offload::split(&frame[VNET_HDR_LEN..], &hdr, &mut buf, |f| {
            packets.push(vxlan_of(f).expect("a VXLAN frame").0.to_vec())
        })
        .expect("a super-packet the engine cuts");
        packets
    }

    #[test]
    fn a_super_packet_for_a_vtep_without_a_peer_is_dropped_as_the_packets_it_stands_for() {
        let node = Node::new();
        // No node publishes a key for this VTEP (this node has no peer).
        let mut frame = offload::tests::device_frame([198, 51, 100, 10], 3, 1000);
        node.seal_frame(&mut frame);
        assert_eq!(node.drops(CryptoDrop::NoKey), 3);
        // A frame without offload is one packet.
        node.seal(&vxlan_packet(Ecn::NotEct));
        assert_eq!(node.drops(CryptoDrop::NoKey), 4);
        let c = node.engine.counters.snapshot();
        assert_eq!((c.tx_packets, c.handshakes_sent), (0, 0));
    }

    #[test]
    fn packets_staged_for_a_peer_that_never_answers_are_given_up_after_staged_for_and_counted() {
        let node = Node::new();
        // The peer's node never answers: no handshake completes.
        let peer = Remote::new(&node.identity());
        node.add_peer(&peer);
        node.seal(&vxlan_packet(Ecn::NotEct));
        node.seal_frame(&mut offload::tests::device_frame(
            LOOPBACK.octets(),
            3,
            1000,
        ));
        node.seal(&vxlan_packet(Ecn::Ect0));
        // One initiation went for them all; they wait, a super-packet as
        // its packets.
        let sent = received(&peer.socket);
        assert_eq!(sent.len(), 1);
        assert_eq!((sent[0][0], sent[0].len()), (MSG_INITIATION, 148));
        let (staged, since) = node.with_tunnel(|g| (g.staged.len(), g.staged.since));
        assert_eq!(staged, 5);
        let since = since.expect("staged since the first packet came");

        // Just before STAGED_FOR they still wait.
        let mut out = vec![0u8; BUF];
        node.engine
            .tick(since + STAGED_FOR - Duration::from_millis(1), &mut out);
        assert_eq!(node.with_tunnel(|g| g.staged.len()), 5);
        assert_eq!(node.drops(CryptoDrop::NoKey), 0);

        // At STAGED_FOR they are given up, each counted once, and the
        // queue holds nothing (no memory either).
        node.engine.tick(since + STAGED_FOR, &mut out);
        assert_eq!(node.drops(CryptoDrop::NoKey), 5);
        node.with_tunnel(|g| {
            assert_eq!(g.staged.len(), 0);
            assert_eq!(g.staged.packets.capacity(), 0);
            assert_eq!(g.staged.since, None);
        });
        node.engine.tick(since + 2 * STAGED_FOR, &mut out);
        assert_eq!(node.drops(CryptoDrop::NoKey), 5);
        // None of them left.
        let c = node.engine.counters.snapshot();
        assert_eq!((c.tx_packets, c.tx_bytes), (0, 0));
        assert!(received(&peer.socket).iter().all(|m| m[0] != MSG_DATA));
    }

    #[test]
    fn a_train_whose_segmentation_send_is_refused_with_eio_goes_one_by_one_each_once() {
        let mut node = Node::new();
        let mut peer = Remote::new(&node.identity());
        node.add_peer(&peer);
        node.connect(&mut peer);
        let mut frame = offload::tests::device_frame(LOOPBACK.octets(), 4, 1000);
        let want = packets_of(&frame);
        assert_eq!(want.len(), 4);
        // The four messages are of one size to one peer: one run, one
        // segmentation-offload message of sendmmsg, which fails with EIO.
        with_single_sendmmsg_failing_eio(|| node.seal_frame(&mut frame));
        let msgs = received(&peer.socket);
        let opened: Vec<Vec<u8>> = msgs
            .iter()
            .map(|m| {
                let mut buf = vec![0u8; 2048];
                match peer.tunn.decapsulate(None, m, &mut buf) {
                    TunnResult::WriteToTunnelV4(p, _) => p.to_vec(),
                    other => panic!("not opened: {other:?}"),
                }
            })
            .collect();
        // Each packet crossed once, in order, and was counted once.
        assert_eq!(opened.len(), 4);
        for (got, want) in opened.iter().zip(&want) {
            // Opened packets keep the engine's zero padding.
            assert_eq!(&got[..want.len()], &want[..]);
        }
        let c = node.engine.counters.snapshot();
        assert_eq!(
            (c.tx_packets, c.tx_bytes),
            (4, want.iter().map(|p| p.len() as u64).sum::<u64>())
        );
        assert_eq!(node.drops(CryptoDrop::IoError), 0);
    }

    /// Runs `f` on a thread of its own whose `sendmmsg` calls of one
    /// message fail with EIO — what the kernel answers a UDP GSO send on
    /// a route it will not segment for (`udp_send_skb`: an IPsec route;
    /// before Linux 6.11 also a device without checksum offload). This
    /// kernel has no IPsec transform, and 6.11 segments in software for
    /// devices without checksum offload, so nothing but a seccomp filter
    /// makes the kernel answer so here. Plain `sendmsg`, and `sendmmsg` of
    /// several messages, go as ever. The filter ends with the thread.
    fn with_single_sendmmsg_failing_eio<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt,
            jf,
            k,
        };
        let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
        let ret = libc::BPF_RET | libc::BPF_K;
        // The low 32 bits of sendmmsg's third argument, vlen.
        let vlen = std::mem::offset_of!(libc::seccomp_data, args)
            + 2 * 8
            + if cfg!(target_endian = "big") { 4 } else { 0 };
        let mut program = [
            stmt(load, std::mem::offset_of!(libc::seccomp_data, nr) as u32),
            jeq(libc::SYS_sendmmsg as u32, 0, 3),
            stmt(load, vlen as u32),
            jeq(1, 0, 1),
            stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EIO as u32),
            stmt(ret, libc::SECCOMP_RET_ALLOW),
        ];
        std::thread::scope(|s| {
            s.spawn(|| {
                let prog = libc::sock_fprog {
                    len: program.len() as u16,
                    filter: program.as_mut_ptr(),
                };
                // SAFETY: prctl on this thread only, with a valid program.
                unsafe {
                    assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
                    assert_eq!(
                        libc::prctl(
                            libc::PR_SET_SECCOMP,
                            libc::SECCOMP_MODE_FILTER,
                            &prog as *const libc::sock_fprog
                        ),
                        0,
                        "seccomp: {}",
                        io::Error::last_os_error()
                    );
                }
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    #[test]
    fn a_frame_claiming_an_ipv4_length_below_its_header_is_dropped_not_a_crash() {
        let node = Node::new();
        let peer = Remote::new(&node.identity());
        node.add_peer(&peer);
        let mut packet = vxlan_packet(Ecn::NotEct);
        packet[2..4].copy_from_slice(&12u16.to_be_bytes());
        // What the transmit thread does with it (a panic would end it).
        node.seal(&packet);
        assert_eq!(node.drops(CryptoDrop::Malformed), 1);
        assert!(received(&peer.socket).is_empty());
        // The next frame goes as ever.
        node.seal(&vxlan_packet(Ecn::NotEct));
        let c = node.engine.counters.snapshot();
        assert_eq!(c.handshakes_sent, 1);
        assert_eq!(received(&peer.socket).len(), 1);
    }

    #[test]
    fn the_receive_thread_stops_between_batches_of_a_socket_that_never_empties() {
        let node = Node::new();
        // A flood the thread cannot drain before it is told to stop:
        // datagrams no WireGuard message parses from, each a drop.
        const FLOOD: u64 = 50_000;
        batch::enlarge_buffers(&node.engine.socket, 64 << 20);
        let to = node.engine.socket.local_addr().unwrap();
        let flooder = socket();
        let mut out = Outgoing::default();
        for _ in 0..FLOOD {
            out.commit(1, to, 0);
            if out.is_full() {
                assert_eq!(out.flush(&flooder), 0);
            }
        }
        assert_eq!(out.flush(&flooder), 0);
        let malformed = || node.engine.counters.snapshot().drops["malformed"];
        let at_stop = std::thread::scope(|s| {
            let rx = s.spawn(|| node.engine.run_rx());
            while malformed() == 0 {
                std::hint::spin_loop();
            }
            node.engine.stop.store(true, Ordering::Relaxed);
            let at_stop = malformed();
            rx.join().expect("the receive thread");
            at_stop
        });
        // It returned within the batch it was in, not once the flood was
        // drained (a flood that never ends would have held it forever).
        let handled = malformed();
        assert!(
            handled <= at_stop + SLOTS as u64 && handled < FLOOD,
            "{handled} of {FLOOD} handled, {at_stop} when told to stop"
        );
    }

    #[test]
    fn only_vxlan_between_the_authenticated_peer_and_this_node_passes() {
        let peer = Ipv4Addr::new(198, 51, 100, 10);
        let me = Ipv4Addr::new(192, 0, 2, 10);
        let mut p = vec![0u8; 60];
        p[0] = 0x45;
        p[9] = IPPROTO_UDP;
        p[12..16].copy_from_slice(&peer.octets());
        p[16..20].copy_from_slice(&me.octets());
        p[22..24].copy_from_slice(&VXLAN_PORT.to_be_bytes());
        assert!(is_vxlan_between(&p, peer, me));
        // Another node's VTEP as source: a peer speaking for someone else.
        assert!(!is_vxlan_between(&p, Ipv4Addr::new(203, 0, 113, 10), me));
        let mut to_other = p.clone();
        to_other[16..20].copy_from_slice(&[192, 0, 2, 99]);
        assert!(!is_vxlan_between(&to_other, peer, me));
        let mut tcp = p.clone();
        tcp[9] = 6;
        assert!(!is_vxlan_between(&tcp, peer, me));
        assert!(!is_vxlan_between(&p[..20], peer, me));
    }

    #[test]
    fn packets_are_padded_to_16_bytes_as_far_as_the_underlay_allows() {
        for (len, limit, want) in [
            (178, 1440, 192),
            (192, 1440, 192),
            (1, 1440, 16),
            (1440, 1440, 1440),
            // A 1445-byte underlay MTU leaves 1385 bytes: the last step
            // stops there.
            (1380, 1385, 1385),
            (1385, 1385, 1385),
            // Without a limit (not known yet) nothing is padded.
            (178, 0, 178),
        ] {
            assert_eq!(padded_len(len, limit), want, "{len} bytes, limit {limit}");
        }
    }

    #[test]
    fn frames_from_the_device_name_their_vtep() {
        let mut f = vec![0u8; 14 + 60];
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&60u16.to_be_bytes());
        f[30..34].copy_from_slice(&[198, 51, 100, 10]);
        let (ip, vtep) = vxlan_of(&f).unwrap();
        assert_eq!((ip.len(), vtep), (60, Ipv4Addr::new(198, 51, 100, 10)));
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(vxlan_of(&arp).is_none());
        assert!(vxlan_of(&f[..20]).is_none());
        // An IPv4 length shorter than its header names nothing.
        for len in [0u16, 19] {
            let mut short = f.clone();
            short[16..18].copy_from_slice(&len.to_be_bytes());
            assert!(vxlan_of(&short).is_none(), "IPv4 length {len}");
        }
    }

    #[test]
    fn boringtun_errors_map_to_drop_reasons() {
        assert_eq!(
            classify(&WireGuardError::InvalidAeadTag),
            CryptoDrop::AuthFailed
        );
        assert_eq!(
            classify(&WireGuardError::DuplicateCounter),
            CryptoDrop::Replayed
        );
        assert_eq!(
            classify(&WireGuardError::WrongTai64nTimestamp),
            CryptoDrop::Replayed
        );
        assert_eq!(classify(&WireGuardError::WrongKey), CryptoDrop::UnknownKey);
        assert_eq!(
            classify(&WireGuardError::NoCurrentSession),
            CryptoDrop::UnknownSession
        );
        assert_eq!(
            classify(&WireGuardError::InvalidPacket),
            CryptoDrop::Malformed
        );
    }
}
