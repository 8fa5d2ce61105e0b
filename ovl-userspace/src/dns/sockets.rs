//! Sockets inside a container's network namespace, as Docker's embedded
//! DNS has them: opened by a thread that enters the namespace for the
//! moment of `socket()` (a socket belongs to the namespace it was made in
//! for its whole life), then served from the agent's own process.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns;

/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// Pending TCP connections a listener holds.
const TCP_BACKLOG: i32 = 64;

/// The sockets of one namespace, not yet handed to a runtime.
pub struct NamespaceSockets {
    pub udp: Vec<std::net::UdpSocket>,
    pub tcp: Vec<std::net::TcpListener>,
}

/// Opens a UDP socket and a TCP listener on port 53 of each of `addrs`
/// inside namespace `ns` (a name or a path). Binding does not need the
/// namespace's loopback to be up yet (IP_FREEBIND): a front end may bring
/// it up after registering the endpoint.
pub fn open_in(ns: &str, addrs: &[Ipv4Addr]) -> Result<NamespaceSockets> {
    let _inside = netns::enter(ns)?;
    let mut out = NamespaceSockets {
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    for addr in addrs {
        let at = SocketAddr::V4(SocketAddrV4::new(*addr, DNS_PORT));
        let udp = bound(Type::DGRAM, Protocol::UDP, at)
            .with_context(|| format!("bind UDP {at} in namespace {ns}"))?;
        out.udp.push(udp.into());
        let tcp = bound(Type::STREAM, Protocol::TCP, at)
            .with_context(|| format!("bind TCP {at} in namespace {ns}"))?;
        tcp.listen(TCP_BACKLOG)
            .with_context(|| format!("listen on TCP {at} in namespace {ns}"))?;
        out.tcp.push(tcp.into());
    }
    Ok(out)
}

fn bound(ty: Type, proto: Protocol, at: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, ty, Some(proto))?;
    s.set_freebind_v4(true)?;
    // A listener of an agent that just exited may leave connections in
    // TIME_WAIT on this address. Never on UDP: there SO_REUSEADDR lets
    // two sockets share the address, the last one bound taking every
    // question — ovl's from a program already on it, or a program in the
    // container (ports below 1024 are anyone's in a Docker container)
    // from ovl.
    if ty == Type::STREAM {
        s.set_reuse_address(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(at))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP socket on `at` that asks to share it (SO_REUSEADDR), as a
    /// program in a container may.
    fn sharing_udp(at: SocketAddr) -> io::Result<Socket> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(at))?;
        Ok(s)
    }

    #[test]
    fn the_udp_address_is_shared_with_no_other_socket() {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        // Another program got there first: ovl does not slip in beside it.
        let theirs = sharing_udp(any).unwrap();
        let at = theirs.local_addr().unwrap().as_socket().unwrap();
        let err = bound(Type::DGRAM, Protocol::UDP, at).map(drop).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(theirs);
        // ovl got there first: a later socket cannot take its questions.
        let ours = bound(Type::DGRAM, Protocol::UDP, at).unwrap();
        let err = sharing_udp(at).map(drop).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(ours);
    }

    #[test]
    fn the_tcp_listener_binds_again_over_time_wait() {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let listener = bound(Type::STREAM, Protocol::TCP, any).unwrap();
        listener.listen(1).unwrap();
        let at = listener.local_addr().unwrap().as_socket().unwrap();
        // A connection closed by the listener's side leaves it in TIME_WAIT.
        let client = std::net::TcpStream::connect(at).unwrap();
        let accepted = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        drop(accepted);
        drop(listener);
        drop(client);
        bound(Type::STREAM, Protocol::TCP, at).unwrap();
    }
}
