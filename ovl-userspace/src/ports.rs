//! Published ports (Docker's `-p`): a container port reachable on its
//! node's addresses. The type, its `[HOSTIP:]HOSTPORT:CPORT[/PROTO]` text
//! form, and the rules a set of them obeys; `egress_nat` installs them.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

/// The transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The name nftables, conntrack and Docker use.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// The IANA protocol number (Docker's portmap option carries it).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// The protocol of IANA number `n`, if ovl publishes it.
    pub fn from_number(n: u64) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = PortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(PortError::Protocol(s.to_owned())),
        }
    }
}

/// A container port published on its node: connections to `host_port`
/// on `host_ip` (every local address of the node when `None`) reach the
/// container's `container_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublishedPort {
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
}

impl PublishedPort {
    /// Whether `self` and `other` would take the same connections: one
    /// protocol and host port, on one address or on every address.
    pub fn overlaps(&self, other: &PublishedPort) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }

    /// As `docker port` shows it: `0.0.0.0:8080->80/tcp` (`0.0.0.0` for
    /// every address).
    pub fn mapping(&self) -> String {
        format!(
            "{}:{}->{}/{}",
            self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            self.host_port,
            self.container_port,
            self.protocol
        )
    }
}

/// `[HOSTIP:]HOSTPORT:CPORT/PROTO`, as `docker run -p` takes it.
impl fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

impl FromStr for PublishedPort {
    type Err = PortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PortError::Syntax(s.to_owned());
        let (ports, protocol) = match s.rsplit_once('/') {
            Some((ports, proto)) => (ports, proto.parse()?),
            None => (s, Protocol::Tcp),
        };
        // The ports are the last two fields: an IPv6 host address has
        // colons of its own.
        let mut fields = ports.rsplitn(3, ':');
        let (container_port, host_port, host_ip) = match (fields.next(), fields.next()) {
            (Some(container), Some(host)) => (container, host, fields.next()),
            _ => return Err(bad()),
        };
        let host_ip = match host_ip {
            None => None,
            Some(ip) => match ip.parse::<Ipv4Addr>() {
                Ok(ip) => Some(ip),
                Err(_) if ip.trim_matches(['[', ']']).parse::<Ipv6Addr>().is_ok() => {
                    return Err(PortError::Ipv6(ip.to_owned()));
                }
                Err(_) => return Err(bad()),
            },
        };
        // Digits only: `u16::from_str` also takes a leading `+`, which
        // Docker refuses.
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
            Err(_) if p.contains('-') => Err(PortError::Range(s.to_owned())),
            _ => Err(PortError::Port(p.to_owned())),
        };
        Ok(PublishedPort {
            protocol,
            // 0.0.0.0 is Docker's way to say every address.
            host_ip: host_ip.filter(|ip| !ip.is_unspecified()),
            host_port: port(host_port)?,
            container_port: port(container_port)?,
        })
    }
}

/// A published port that is not well-formed, or a set that contradicts
/// itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortError {
    #[error(
        "invalid published port {0:?}: write [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp], e.g. 8080:80 or 192.0.2.10:5353:53/udp"
    )]
    Syntax(String),
    #[error("invalid port {0:?}: ports are 1..=65535")]
    Port(String),
    #[error(
        "{0} is an IPv6 address: ovl publishes on IPv4 host addresses only; give an IPv4 address of the host, or none for every address"
    )]
    Ipv6(String),
    #[error(
        "{0:?} publishes a range of ports: ovl publishes one host port per container port; give each port its own --publish"
    )]
    Range(String),
    #[error("invalid protocol {0:?}: ovl publishes tcp and udp ports")]
    Protocol(String),
    #[error(
        "{0} cannot be published: ovl publishes no port for the host's loopback alone; publish on every address (the host reaches it on 127.0.0.1 too) or on another address of the host"
    )]
    Loopback(PublishedPort),
    #[error(
        "{0} is a multicast or broadcast address, not an address of the host; publish on one of the host's addresses or on every address"
    )]
    NotUnicast(Ipv4Addr),
    #[error("{0} and {1} take the same host port; publish each host port once")]
    Duplicate(PublishedPort, PublishedPort),
}

/// Checks one endpoint's published ports: host addresses that can take
/// connections, and no host port twice.
pub fn validate(ports: &[PublishedPort]) -> Result<(), PortError> {
    for (i, p) in ports.iter().enumerate() {
        if let Some(ip) = p.host_ip {
            if ip.is_loopback() {
                return Err(PortError::Loopback(*p));
            }
            if ip.is_multicast() || ip.is_broadcast() {
                return Err(PortError::NotUnicast(ip));
            }
        }
        if let Some(q) = ports[..i].iter().find(|q| q.overlaps(p)) {
            return Err(PortError::Duplicate(*q, *p));
        }
    }
    Ok(())
}

/// A host port a socket of the node already serves: its rule would take
/// that server's clients from outside (and from the host itself, on
/// `127.0.0.1`) to the container — an `sshd` on 22, a `docker-proxy` of
/// Docker's own bridge.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{port} cannot be published: a socket on this host already serves {protocol} port {host_port}{on} (`ss -lntup 'sport = :{host_port}'` names its process), and the container would take its clients; stop that server or publish another host port",
    protocol = port.protocol,
    host_port = port.host_port,
    on = port.host_ip.map(|ip| format!(" on {ip}")).unwrap_or_default()
)]
pub struct HostPortInUse {
    pub port: PublishedPort,
}

/// Refuses the first of `ports` a socket of this host (the caller's
/// namespace) already serves, found as a server starting on it would
/// find it: by binding a socket of its protocol to its address and port.
/// TCP binds with `SO_REUSEADDR`, so only a listener (or a socket bound
/// without it) is in the way, not connections that linger closed; UDP
/// binds without, as any socket bound there takes its datagrams. Another
/// error than `EADDRINUSE` says nothing about the port: it passes.
pub fn check_free_on_host(ports: &[PublishedPort]) -> Result<(), HostPortInUse> {
    use socket2::{Domain, Socket, Type};
    for p in ports {
        let addr =
            std::net::SocketAddrV4::new(p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), p.host_port);
        let socket = match p.protocol {
            Protocol::Tcp => Socket::new(Domain::IPV4, Type::STREAM, None)
                .and_then(|s| s.set_reuse_address(true).map(|()| s)),
            Protocol::Udp => Socket::new(Domain::IPV4, Type::DGRAM, None),
        };
        let bound = socket.and_then(|s| s.bind(&addr.into()));
        if let Err(e) = bound {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return Err(HostPortInUse { port: *p });
            }
            log::debug!("cannot look whether {p} is in use on this host: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(s: &str) -> PublishedPort {
        s.parse().unwrap()
    }

    #[test]
    fn a_port_a_host_socket_serves_is_refused_and_free_once_it_closes() {
        use std::net::{TcpListener, TcpStream, UdpSocket};
        let every = |protocol, host_port| PublishedPort {
            protocol,
            host_ip: None,
            host_port,
            container_port: 80,
        };
        // A listener on every address, on one address, dual-stack IPv6.
        for at in ["0.0.0.0:0", "127.0.0.1:0", "[::]:0"] {
            let server = TcpListener::bind(at).unwrap();
            let port = every(Protocol::Tcp, server.local_addr().unwrap().port());
            let err = check_free_on_host(&[port]).unwrap_err();
            assert_eq!(err, HostPortInUse { port }, "{at}");
            assert!(err.to_string().contains("ss -lntup"), "{err}");
            // The same port number over UDP is another port.
            check_free_on_host(&[every(Protocol::Udp, port.host_port)]).unwrap();
        }
        let server = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = every(Protocol::Udp, server.local_addr().unwrap().port());
        assert!(check_free_on_host(&[port]).is_err());
        drop(server);
        check_free_on_host(&[port]).unwrap();
        // A server gone whose connection lingers closed (TIME_WAIT on the
        // side that closed first): free, as for a server starting anew.
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let (accepted, _) = server.accept().unwrap();
        drop(accepted);
        drop(server);
        drop(client);
        check_free_on_host(&[every(Protocol::Tcp, addr.port())]).unwrap();
    }

    #[test]
    fn docker_style_port_specs_parse() {
        assert_eq!(
            port("8080:80"),
            PublishedPort {
                protocol: Protocol::Tcp,
                host_ip: None,
                host_port: 8080,
                container_port: 80
            }
        );
        assert_eq!(
            port("192.0.2.10:5353:53/UDP"),
            PublishedPort {
                protocol: Protocol::Udp,
                host_ip: Some(Ipv4Addr::new(192, 0, 2, 10)),
                host_port: 5353,
                container_port: 53
            }
        );
        assert_eq!(port("0.0.0.0:1:65535/tcp").host_ip, None);
        assert_eq!(
            port("192.0.2.10:5353:53/udp").to_string(),
            "192.0.2.10:5353:53/udp"
        );
        assert_eq!(port("8080:80").mapping(), "0.0.0.0:8080->80/tcp");
    }

    #[test]
    fn malformed_port_specs_are_refused_saying_the_form() {
        for bad in [
            "80",
            "a:b:c:d",
            "x.y:80:80",
            "8080:80/sctp",
            "0:80",
            "8080:65536",
            ":80",
            "+8080:80",
            "8080:+80/udp",
        ] {
            let err = bad.parse::<PublishedPort>().unwrap_err();
            assert!(
                matches!(
                    err,
                    PortError::Syntax(_) | PortError::Port(_) | PortError::Protocol(_)
                ),
                "{bad}: {err}"
            );
        }
        assert!(
            "80".parse::<PublishedPort>()
                .unwrap_err()
                .to_string()
                .contains("HOSTPORT:CONTAINERPORT")
        );
    }

    #[test]
    fn ipv6_host_addresses_and_ranges_are_refused_saying_so() {
        for v6 in ["[::]:8080:80", ":::8080:80/udp", "2001:db8::1:8080:80"] {
            let err = v6.parse::<PublishedPort>().unwrap_err();
            assert!(matches!(err, PortError::Ipv6(_)), "{v6}: {err}");
            assert!(
                err.to_string().contains("IPv4 host addresses only"),
                "{err}"
            );
        }
        for range in ["8080-8081:80-81", "8080:80-81", "192.0.2.10:1-2:1-2/udp"] {
            let err = range.parse::<PublishedPort>().unwrap_err();
            assert!(matches!(err, PortError::Range(_)), "{range}: {err}");
            assert!(err.to_string().contains("its own --publish"), "{err}");
        }
    }

    #[test]
    fn one_host_port_is_published_once_per_address_and_protocol() {
        assert!(validate(&[port("8080:80"), port("8080:80/udp"), port("8081:80")]).is_ok());
        assert!(validate(&[port("192.0.2.10:80:80"), port("198.51.100.10:80:81")]).is_ok());
        assert!(matches!(
            validate(&[port("8080:80"), port("192.0.2.10:8080:81")]),
            Err(PortError::Duplicate(..))
        ));
        assert!(matches!(
            validate(&[port("8080:80"), port("8080:81")]),
            Err(PortError::Duplicate(..))
        ));
        assert!(matches!(
            validate(&[port("127.0.0.1:8080:80")]),
            Err(PortError::Loopback(_))
        ));
        assert!(matches!(
            validate(&[port("224.0.0.1:8080:80")]),
            Err(PortError::NotUnicast(_))
        ));
    }

    #[test]
    fn records_without_a_host_address_omit_it() {
        let json = serde_json::to_string(&port("8080:80")).unwrap();
        assert_eq!(
            json,
            r#"{"protocol":"tcp","host_port":8080,"container_port":80}"#
        );
        assert_eq!(
            serde_json::from_str::<PublishedPort>(&json).unwrap(),
            port("8080:80")
        );
    }
}
