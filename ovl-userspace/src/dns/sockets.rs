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
    // TIME_WAIT on this address.
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(at))?;
    Ok(s)
}
