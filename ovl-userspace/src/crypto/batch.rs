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

/// Datagrams waiting to be sent.
pub struct Outgoing {
    arena: Vec<u8>,
    lens: Vec<usize>,
    dests: Vec<libc::sockaddr_in>,
}

impl Default for Outgoing {
    fn default() -> Self {
        Outgoing {
            arena: vec![0; SLOTS * SLOT],
            lens: Vec::with_capacity(SLOTS),
            dests: Vec::with_capacity(SLOTS),
        }
    }
}

impl Outgoing {
    /// The buffer of the next datagram.
    pub fn slot(&mut self) -> &mut [u8] {
        let i = self.lens.len();
        &mut self.arena[i * SLOT..(i + 1) * SLOT]
    }

    /// Queues the first `len` bytes of [`slot`](Self::slot) for `to`.
    pub fn commit(&mut self, len: usize, to: SocketAddr) {
        let SocketAddr::V4(to) = to else { return };
        self.lens.push(len);
        self.dests.push(sockaddr(to));
    }

    /// True when no slot is left.
    pub fn is_full(&self) -> bool {
        self.lens.len() == SLOTS
    }

    /// Sends everything queued; returns how many datagrams the kernel
    /// refused.
    pub fn flush(&mut self, socket: &UdpSocket) -> usize {
        let n = self.lens.len();
        let mut iovs: Vec<libc::iovec> = (0..n)
            .map(|i| libc::iovec {
                iov_base: self.arena[i * SLOT..].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            })
            .collect();
        // SAFETY: an all-zero mmsghdr is a valid "empty" header.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&mut self.dests[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut done = 0;
        let mut refused = 0;
        while done < n {
            // SAFETY: `msgs[done..]` point into buffers alive until return.
            let r = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (n - done) as u32,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first datagram of the rest failed: drop it, go on.
                log::debug!("sendmmsg: {e}");
                refused += 1;
                done += 1;
            } else {
                done += r as usize;
            }
        }
        self.lens.clear();
        self.dests.clear();
        refused
    }
}

/// Received datagrams.
pub struct Incoming {
    arena: Vec<u8>,
    lens: [usize; SLOTS],
    truncated: [bool; SLOTS],
    srcs: [libc::sockaddr_in; SLOTS],
    count: usize,
}

impl Default for Incoming {
    fn default() -> Self {
        Incoming {
            arena: vec![0; SLOTS * SLOT],
            lens: [0; SLOTS],
            truncated: [false; SLOTS],
            // SAFETY: all-zero sockaddr_in values are valid.
            srcs: unsafe { MaybeUninit::zeroed().assume_init() },
            count: 0,
        }
    }
}

impl Incoming {
    /// Receives what is queued on `socket` (without waiting), up to a
    /// batch; returns how many datagrams came.
    pub fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = (0..SLOTS)
            .map(|i| libc::iovec {
                iov_base: self.arena[i * SLOT..].as_mut_ptr().cast(),
                iov_len: SLOT,
            })
            .collect();
        // SAFETY: an all-zero mmsghdr is a valid "empty" header.
        let mut msgs: Vec<libc::mmsghdr> = (0..SLOTS).map(|_| unsafe { mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&mut self.srcs[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
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
            self.count = 0;
            return Err(io::Error::last_os_error());
        }
        self.count = r as usize;
        for (i, m) in msgs.iter().take(self.count).enumerate() {
            self.lens[i] = m.msg_len as usize;
            self.truncated[i] = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(self.count)
    }

    /// Datagram `i` of the last batch and its source; `None` when it did
    /// not fit a slot.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if self.truncated[i] {
            return None;
        }
        let s = &self.srcs[i];
        let ip = Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr));
        let from = SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(s.sin_port)));
        Some((&self.arena[i * SLOT..i * SLOT + self.lens[i]], from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_sent_is_the_batch_received_with_sources() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut out = Outgoing::default();
        for i in 0..5u8 {
            let slot = out.slot();
            slot[..3].copy_from_slice(&[i, i, i]);
            out.commit(3, to);
        }
        assert_eq!(out.flush(&tx), 0);
        let mut inc = Incoming::default();
        let mut got = Vec::new();
        while got.len() < 5 {
            match inc.receive(&rx) {
                Ok(n) => (0..n).for_each(|i| {
                    let (d, from) = inc.get(i).unwrap();
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
