//! Batches of UDP datagrams: many sealed messages leave in one
//! `sendmmsg`, many received ones come in with one `recvmmsg`. A system
//! call per packet is what a userspace data path pays most for.

use std::{
    io,
    mem::{self, MaybeUninit},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
};

/// Datagrams per batch.
pub const SLOTS: usize = 64;
/// Room per datagram: any underlay MTU ovl is used with (and every
/// WireGuard message built from a frame the crypto device hands over).
pub const SLOT: usize = 9216 + 64;

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Sets both socket buffers to `bytes`, beyond the sysctl limits (the
/// agent runs as root); falls back to what the limits allow.
pub fn enlarge_buffers(socket: &UdpSocket, bytes: usize) {
    let value = bytes as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for opt in [force, plain] {
            // SAFETY: setsockopt with a c_int value of the right size.
            let r = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&value as *const libc::c_int).cast(),
                    mem::size_of::<libc::c_int>() as u32,
                )
            };
            if r == 0 {
                break;
            }
        }
    }
}

/// `UDP_SEGMENT` and `UDP_GRO` (linux/udp.h), not in every libc.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most segments one `UDP_SEGMENT` send may carry, and most bytes.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65000;
/// Room for one received (possibly GRO-coalesced) datagram.
const RX_SLOT: usize = 65536;

/// Sets integer socket option `opt` at `level` to 1; false if refused.
fn turn_on(socket: &UdpSocket, level: libc::c_int, opt: libc::c_int) -> bool {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a c_int value of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as u32,
        ) == 0
    }
}

/// Asks the kernel to hand over coalesced runs of datagrams (one receive
/// for many, with their segment size); false where it cannot.
pub fn enable_gro(socket: &UdpSocket) -> bool {
    turn_on(socket, libc::SOL_UDP, UDP_GRO)
}

/// Asks the kernel for each received datagram's IPv4 TOS byte (an
/// `IP_TOS` control message), for its ECN field. A coalesced run has one
/// TOS: GRO merges only datagrams whose IPv4 headers match but for
/// length, identifier and checksum (`inet_gro_flush` in
/// include/net/gro.h, called for UDP by `udp_gro_receive_segment`).
pub fn enable_tos(socket: &UdpSocket) -> bool {
    turn_on(socket, libc::IPPROTO_IP, libc::IP_RECVTOS)
}

/// Datagrams waiting to be sent, each with the TOS byte of its IPv4
/// header. Runs of equal-size datagrams to one destination with one TOS
/// leave as one `UDP_SEGMENT` (GSO) send: one trip through the UDP/IP
/// stack for up to 64 of them, where the route can offload checksums (its
/// segments all get the one header's TOS).
pub struct Outgoing {
    arena: Vec<u8>,
    lens: Vec<usize>,
    dests: Vec<libc::sockaddr_in>,
    tos: Vec<u8>,
    /// Cleared when the kernel refuses segmentation offload (a route
    /// without checksum offload answers EIO): plain sends from then on.
    gso: bool,
}

impl Default for Outgoing {
    fn default() -> Self {
        Outgoing {
            arena: vec![0; SLOTS * SLOT],
            lens: Vec::with_capacity(SLOTS),
            dests: Vec::with_capacity(SLOTS),
            tos: Vec::with_capacity(SLOTS),
            gso: true,
        }
    }
}

/// Room for the control messages of one datagram or run: `UDP_SEGMENT`
/// (a u16) or `UDP_GRO` (an int) and `IP_TOS` (an int, or a byte as the
/// kernel writes it), each `CMSG_SPACE` at most 24 bytes on every platform
/// ovl runs on.
const CMSG_ROOM: usize = 64;

/// The control buffer of one message, aligned as a `cmsghdr` must be.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CMSG_ROOM]);

impl Default for Control {
    fn default() -> Self {
        Control([0; CMSG_ROOM])
    }
}

/// Appends one control message (`level`, `ty`, `value`) to `m`'s control
/// buffer, whose `msg_controllen` says how much of it is in use.
///
/// # Safety
/// `m.msg_hdr.msg_control` points to at least [`CMSG_ROOM`] writable bytes
/// and what is in use plus this message fits them.
unsafe fn push_cmsg<T: Copy>(m: &mut libc::mmsghdr, level: libc::c_int, ty: libc::c_int, value: T) {
    let size = mem::size_of::<T>() as u32;
    // SAFETY: the caller's promise: the next header lies inside the buffer.
    unsafe {
        let c = m
            .msg_hdr
            .msg_control
            .cast::<u8>()
            .add(m.msg_hdr.msg_controllen)
            .cast::<libc::cmsghdr>();
        (*c).cmsg_level = level;
        (*c).cmsg_type = ty;
        (*c).cmsg_len = libc::CMSG_LEN(size) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<T>(), value);
        m.msg_hdr.msg_controllen += libc::CMSG_SPACE(size) as usize;
    }
}

impl Outgoing {
    /// The buffer of the next datagram.
    pub fn slot(&mut self) -> &mut [u8] {
        let i = self.lens.len();
        &mut self.arena[i * SLOT..(i + 1) * SLOT]
    }

    /// Queues the first `len` bytes of [`slot`](Self::slot) for `to`, to
    /// leave with IPv4 TOS byte `tos`.
    pub fn commit(&mut self, len: usize, to: SocketAddr, tos: u8) {
        let SocketAddr::V4(to) = to else { return };
        self.lens.push(len);
        self.dests.push(sockaddr(to));
        self.tos.push(tos);
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// True when no slot is left.
    pub fn is_full(&self) -> bool {
        self.lens.len() == SLOTS
    }

    /// Runs `[start, end)` of queued datagrams that can share one send:
    /// one destination and TOS, every datagram as long as the first but
    /// the last (which may be shorter), within the GSO limits.
    fn runs(&self) -> Vec<(usize, usize)> {
        let n = self.lens.len();
        let mut runs = Vec::new();
        let mut i = 0;
        while i < n {
            let size = self.lens[i];
            let mut end = i + 1;
            let mut bytes = size;
            if self.gso {
                while end < n
                    && end - i < GSO_MAX_SEGMENTS
                    && self.dests[end].sin_addr.s_addr == self.dests[i].sin_addr.s_addr
                    && self.dests[end].sin_port == self.dests[i].sin_port
                    && self.tos[end] == self.tos[i]
                    && self.lens[end] <= size
                    && bytes + self.lens[end] <= GSO_MAX_BYTES
                {
                    bytes += self.lens[end];
                    end += 1;
                    if self.lens[end - 1] < size {
                        break;
                    }
                }
            }
            runs.push((i, end));
            i = end;
        }
        runs
    }

    /// Sends everything queued; returns how many datagrams the kernel
    /// refused.
    pub fn flush(&mut self, socket: &UdpSocket) -> usize {
        let refused = self.send_runs(socket);
        self.lens.clear();
        self.dests.clear();
        self.tos.clear();
        refused
    }

    /// Sends datagrams `[start, end)` one system call each; returns how
    /// many the kernel refused.
    fn send_singly(&self, socket: &UdpSocket, start: usize, end: usize) -> usize {
        (start..end)
            .filter(|&i| {
                let msg = &self.arena[i * SLOT..i * SLOT + self.lens[i]];
                send_datagram(socket, msg, self.dests[i], self.tos[i])
                    .inspect_err(|e| log::debug!("sendmsg: {e}"))
                    .is_err()
            })
            .count()
    }

    fn send_runs(&mut self, socket: &UdpSocket) -> usize {
        let runs = self.runs();
        let n = self.lens.len();
        let mut iovs: Vec<libc::iovec> = (0..n)
            .map(|i| libc::iovec {
                iov_base: self.arena[i * SLOT..].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            })
            .collect();
        let mut control = vec![Control::default(); runs.len()];
        // SAFETY: an all-zero mmsghdr is a valid "empty" header.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..runs.len()).map(|_| unsafe { mem::zeroed() }).collect();
        for (k, (m, &(start, end))) in msgs.iter_mut().zip(&runs).enumerate() {
            m.msg_hdr.msg_name = (&mut self.dests[start] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &mut iovs[start];
            m.msg_hdr.msg_iovlen = end - start;
            m.msg_hdr.msg_control = control[k].0.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = 0;
            // SAFETY: the control buffer has CMSG_ROOM bytes for this
            // message, room for both options.
            unsafe {
                // Always said, so the header's DSCP is 0 whatever the
                // socket's own TOS.
                push_cmsg(
                    m,
                    libc::IPPROTO_IP,
                    libc::IP_TOS,
                    libc::c_int::from(self.tos[start]),
                );
                if end - start > 1 {
                    push_cmsg(m, libc::SOL_UDP, UDP_SEGMENT, self.lens[start] as u16);
                }
            }
        }
        let mut done = 0;
        let mut refused = 0;
        while done < runs.len() {
            // SAFETY: `msgs[done..]` point into buffers alive until return.
            let r = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (runs.len() - done) as u32,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                let (start, end) = runs[done];
                match e.raw_os_error() {
                    // Segmentation refused on this route (one without
                    // checksum offload before Linux 6.11, or IPsec):
                    // this run goes one by one, and so does every later
                    // one (those of this batch after the same refusal,
                    // those of later batches at once).
                    Some(libc::EIO) if end - start > 1 => {
                        self.gso = false;
                        refused += self.send_singly(socket, start, end);
                    }
                    // A segment is beyond the path MTU (a router reported
                    // a smaller one): segmentation never fragments, a
                    // plain send does.
                    Some(libc::EMSGSIZE) if end - start > 1 => {
                        refused += self.send_singly(socket, start, end);
                    }
                    // This send failed: drop its datagrams, go on.
                    _ => {
                        log::debug!("sendmmsg: {e}");
                        refused += end - start;
                    }
                }
                done += 1;
            } else {
                done += r as usize;
            }
        }
        refused
    }
}

/// Sends one datagram `msg` to `to` with IPv4 TOS byte `tos`, outside a
/// batch.
pub fn send_one(socket: &UdpSocket, msg: &[u8], to: SocketAddr, tos: u8) -> io::Result<()> {
    let SocketAddr::V4(to) = to else {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    };
    send_datagram(socket, msg, sockaddr(to), tos)
}

/// Sends datagram `msg` to `dest` with IPv4 TOS byte `tos`.
fn send_datagram(
    socket: &UdpSocket,
    msg: &[u8],
    mut dest: libc::sockaddr_in,
    tos: u8,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr().cast_mut().cast(),
        iov_len: msg.len(),
    };
    let mut control = Control::default();
    // SAFETY: an all-zero mmsghdr is a valid "empty" header.
    let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
    m.msg_hdr.msg_name = (&mut dest as *mut libc::sockaddr_in).cast();
    m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as u32;
    m.msg_hdr.msg_iov = &mut iov;
    m.msg_hdr.msg_iovlen = 1;
    m.msg_hdr.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: one option in a control buffer of CMSG_ROOM bytes; the
    // kernel only reads the datagram through the iovec.
    let r = unsafe {
        push_cmsg(
            &mut m,
            libc::IPPROTO_IP,
            libc::IP_TOS,
            libc::c_int::from(tos),
        );
        libc::sendmsg(socket.as_raw_fd(), &m.msg_hdr, 0)
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Received datagrams, coalesced runs split back into their segments.
pub struct Incoming {
    arena: Vec<u8>,
    control: Vec<Control>,
    srcs: [libc::sockaddr_in; SLOTS],
    /// The IPv4 TOS byte each message came with (0 without `IP_RECVTOS`).
    tos: [u8; SLOTS],
    /// (offset in arena, length, source index) of every datagram.
    segments: Vec<(usize, usize, usize)>,
    truncated: usize,
}

impl Default for Incoming {
    fn default() -> Self {
        Incoming {
            arena: vec![0; SLOTS * RX_SLOT],
            control: vec![Control::default(); SLOTS],
            // SAFETY: all-zero sockaddr_in values are valid.
            srcs: unsafe { MaybeUninit::zeroed().assume_init() },
            tos: [0; SLOTS],
            segments: Vec::with_capacity(SLOTS * 4),
            truncated: 0,
        }
    }
}

impl Incoming {
    /// Receives what is queued on `socket` (without waiting), up to a
    /// batch; returns how many datagrams came.
    pub fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.segments.clear();
        self.truncated = 0;
        let mut iovs: Vec<libc::iovec> = (0..SLOTS)
            .map(|i| libc::iovec {
                iov_base: self.arena[i * RX_SLOT..].as_mut_ptr().cast(),
                iov_len: RX_SLOT,
            })
            .collect();
        // SAFETY: an all-zero mmsghdr is a valid "empty" header.
        let mut msgs: Vec<libc::mmsghdr> = (0..SLOTS).map(|_| unsafe { mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&mut self.srcs[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = self.control[i].0.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = CMSG_ROOM;
        }
        // SAFETY: every header points into buffers alive until return.
        let r = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                SLOTS as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        for (i, m) in msgs.iter().take(r as usize).enumerate() {
            let len = m.msg_len as usize;
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.truncated += 1;
                continue;
            }
            let mut size = len;
            self.tos[i] = 0;
            // SAFETY: walking the control messages the kernel wrote into
            // this message's control buffer.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                while !c.is_null() {
                    let data = libc::CMSG_DATA(c);
                    match ((*c).cmsg_level, (*c).cmsg_type) {
                        (libc::SOL_UDP, UDP_GRO) => {
                            let s = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                            if s > 0 {
                                size = s as usize;
                            }
                        }
                        // One byte (ip_cmsg_recv_tos).
                        (libc::IPPROTO_IP, libc::IP_TOS) => self.tos[i] = *data,
                        _ => {}
                    }
                    c = libc::CMSG_NXTHDR(&m.msg_hdr, c);
                }
            }
            let base = i * RX_SLOT;
            // An empty datagram is one datagram too (no message: the
            // engine counts it malformed), not nothing.
            if len == 0 {
                self.segments.push((base, 0, i));
            }
            let mut off = 0;
            while off < len {
                let seg = size.min(len - off);
                self.segments.push((base + off, seg, i));
                off += seg;
            }
        }
        Ok(self.segments.len() + self.truncated)
    }

    /// Datagrams that did not fit a slot in the last batch.
    pub fn truncated(&self) -> usize {
        self.truncated
    }

    /// How many datagrams the last batch held (after splitting).
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Datagram `k` of the last batch, its source and the TOS byte of
    /// its IPv4 header.
    pub fn get(&self, k: usize) -> (&[u8], SocketAddr, u8) {
        let (off, len, i) = self.segments[k];
        let s = &self.srcs[i];
        let ip = Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr));
        let from = SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(s.sin_port)));
        (&self.arena[off..off + len], from, self.tos[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_equal_sizes_to_one_destination_ending_at_a_shorter_one() {
        let a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let mut out = Outgoing::default();
        for (len, to) in [(100, a), (100, a), (60, a), (100, a), (100, b), (120, b)] {
            out.commit(len, to, 0);
        }
        assert_eq!(out.runs(), vec![(0, 3), (3, 4), (4, 5), (5, 6)]);
        out.gso = false;
        assert_eq!(out.runs().len(), 6);
    }

    #[test]
    fn runs_end_where_the_tos_changes() {
        let a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let mut out = Outgoing::default();
        for tos in [2, 2, 0, 0, 3, 2, 2] {
            out.commit(100, a, tos);
        }
        assert_eq!(out.runs(), vec![(0, 2), (2, 4), (4, 5), (5, 7)]);
    }

    #[test]
    fn each_datagram_arrives_with_the_tos_it_was_sent_with_with_or_without_gro() {
        for gro in [false, true] {
            let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
            assert!(enable_tos(&rx));
            if gro {
                assert!(enable_gro(&rx));
            }
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = rx.local_addr().unwrap();
            // Equal sizes: only the TOS keeps them apart. The DSCP bits
            // go as given (the engine gives ECN bits only).
            let sent: Vec<(u8, u8)> = [2u8, 2, 2, 0, 0, 3, 1, 1, 0xb8]
                .iter()
                .enumerate()
                .map(|(i, tos)| (i as u8, *tos))
                .collect();
            let mut out = Outgoing::default();
            for (i, tos) in &sent {
                out.slot()[..200].fill(*i);
                out.commit(200, to, *tos);
            }
            assert_eq!(out.flush(&tx), 0);
            send_one(&tx, &[0xee; 10], to, 3).unwrap();
            let mut inc = Incoming::default();
            let mut got = Vec::new();
            for _ in 0..200 {
                if inc.receive(&rx).is_ok() {
                    (0..inc.len()).for_each(|i| {
                        let (d, _, tos) = inc.get(i);
                        got.push((d[0], tos));
                    });
                }
                if got.len() == sent.len() + 1 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let mut want = sent.clone();
            want.push((0xee, 3));
            assert_eq!(got, want, "gro {gro}");
        }
    }

    #[test]
    fn coalesced_sends_arrive_as_their_datagrams_with_or_without_gro() {
        for gro in [false, true] {
            let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
            if gro {
                assert!(enable_gro(&rx));
            }
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let to = rx.local_addr().unwrap();
            let mut out = Outgoing::default();
            let lens = [300usize, 300, 300, 120];
            for (i, len) in lens.iter().enumerate() {
                out.slot()[..*len].fill(i as u8);
                out.commit(*len, to, 0);
            }
            assert_eq!(out.flush(&tx), 0);
            let mut inc = Incoming::default();
            let mut got = Vec::new();
            for _ in 0..200 {
                if inc.receive(&rx).is_ok() {
                    (0..inc.len()).for_each(|i| got.push(inc.get(i).0.to_vec()));
                }
                if got.len() == lens.len() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let want: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(i, len)| vec![i as u8; *len])
                .collect();
            assert_eq!(got, want, "gro {gro}");
        }
    }

    /// Runs `f` on a thread of its own in a network namespace of its own
    /// (gone with the thread, and all it holds) after each command of
    /// `setup` there: for routes unlike the host's. Root only, as the
    /// suite runs.
    fn in_own_netns<R: Send + 'static>(
        setup: &[&[&str]],
        f: impl FnOnce() -> R + Send + 'static,
    ) -> R {
        let setup: Vec<Vec<String>> = setup
            .iter()
            .map(|a| a.iter().map(|s| s.to_string()).collect())
            .collect();
        std::thread::spawn(move || {
            // SAFETY: unshare(2) moves only this thread.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "unshare: {}", io::Error::last_os_error());
            for args in &setup {
                // A child starts in its parent thread's namespace.
                let status = std::process::Command::new(&args[0])
                    .args(&args[1..])
                    .status()
                    .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
                assert!(status.success(), "{args:?}: {status}");
            }
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Every datagram that reaches `rx` within a second, up to `n`.
    fn receive_all(rx: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut inc = Incoming::default();
        let mut got = Vec::new();
        for _ in 0..200 {
            if inc.receive(rx).is_ok() {
                (0..inc.len()).for_each(|i| got.push(inc.get(i).0.to_vec()));
            }
            if got.len() >= n {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        got
    }

    #[test]
    fn a_run_beyond_the_path_mtu_leaves_one_datagram_at_a_time_fragmented() {
        // A 1200-byte path: a segmentation-offload send of 1400-byte
        // datagrams is refused (EMSGSIZE), a plain one fragmented.
        let (refused, got, gso) =
            in_own_netns(&[&["ip", "link", "set", "lo", "up", "mtu", "1200"]], || {
                let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
                let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
                let to = rx.local_addr().unwrap();
                let mut out = Outgoing::default();
                for (i, len) in [(0u8, 1400), (1, 1400), (2, 1400), (3, 100), (4, 100)] {
                    out.slot()[..len].fill(i);
                    out.commit(len, to, 0);
                }
                assert_eq!(out.runs(), vec![(0, 4), (4, 5)]);
                let refused = out.flush(&tx);
                (refused, receive_all(&rx, 5), out.gso)
            });
        assert_eq!(refused, 0);
        let want: Vec<Vec<u8>> = [(0u8, 1400), (1, 1400), (2, 1400), (3, 100), (4, 100)]
            .iter()
            .map(|&(i, len)| vec![i; len])
            .collect();
        assert_eq!(got, want);
        // Other paths still take segmentation offload.
        assert!(gso);
    }

    #[test]
    fn an_empty_datagram_is_received_as_one_empty_datagram() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[], rx.local_addr().unwrap()).unwrap();
        let got = receive_all(&rx, 1);
        assert_eq!(got, vec![Vec::<u8>::new()]);
    }

    #[test]
    fn a_batch_sent_is_the_batch_received_with_sources() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut out = Outgoing::default();
        for i in 0..5u8 {
            let slot = out.slot();
            slot[..3].copy_from_slice(&[i, i, i]);
            out.commit(3, to, 0);
        }
        assert_eq!(out.flush(&tx), 0);
        let mut inc = Incoming::default();
        let mut got = Vec::new();
        while got.len() < 5 {
            match inc.receive(&rx) {
                Ok(_) => (0..inc.len()).for_each(|i| {
                    let (d, from, _) = inc.get(i);
                    assert_eq!(from, tx.local_addr().unwrap());
                    got.push(d.to_vec());
                }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, (0..5u8).map(|i| vec![i, i, i]).collect::<Vec<_>>());
    }
}
