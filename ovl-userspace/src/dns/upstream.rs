//! Forwarding the names ovl does not own to the host's resolvers, with
//! hickory's client (a fresh random source port and ID per question over
//! UDP, answers checked against the question) and one deadline for the
//! whole attempt: servers are tried in order, each with an equal share of
//! the time left.

use std::{net::SocketAddr, path::Path, time::Duration};

use futures_util::StreamExt;
use hickory_net::{
    NetError,
    runtime::TokioRuntimeProvider,
    tcp::TcpClientStream,
    udp::UdpClientStream,
    xfer::{DnsExchange, DnsHandle},
};
use hickory_proto::op::{DnsRequest, DnsRequestOptions, Message, Query, ResponseCode};

/// Where the host's resolvers are listed.
pub const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// EDNS payload advertised upstream (the DNS Flag Day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// A question to forward, as the container asked it.
#[derive(Clone, Debug)]
pub struct Question {
    pub query: Query,
    pub recursion_desired: bool,
    pub dnssec_ok: bool,
    /// CD: the asker validates DNSSEC itself and wants the data even if
    /// the upstream's validation fails.
    pub checking_disabled: bool,
    /// AD in a question: the asker understands AD in the answer (RFC 6840
    /// 5.7; glibc's `trust-ad`), which a validating upstream then sets.
    pub authentic_data: bool,
}

/// Why no upstream answer came.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream resolver is configured")]
    NoUpstream,
    #[error("no upstream resolver answered within {0:?}")]
    Timeout(Duration),
    #[error("upstream {server}: {detail}")]
    Failed { server: SocketAddr, detail: String },
}

/// The upstream resolvers and their UDP exchanges.
pub struct Upstreams {
    servers: Vec<(SocketAddr, DnsExchange<TokioRuntimeProvider>)>,
    provider: TokioRuntimeProvider,
}

impl Upstreams {
    /// Exchanges with `servers`; their background work is spawned on the
    /// current runtime, which must be the one that later asks.
    pub fn new(servers: &[SocketAddr], budget: Duration) -> Upstreams {
        let provider = TokioRuntimeProvider::new();
        let servers = servers
            .iter()
            .map(|addr| {
                let udp = UdpClientStream::builder(*addr, provider.clone())
                    .with_timeout(Some(budget))
                    .exchange();
                (*addr, udp)
            })
            .collect();
        Upstreams { servers, provider }
    }

    /// The servers, in the order they are asked.
    pub fn servers(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|(addr, _)| *addr).collect()
    }

    /// Asks the servers in order, over TCP if `tcp`, within `budget`. A
    /// SERVFAIL or REFUSED moves on to the next server (and is returned if
    /// it was the last word); any other answer is returned as it came.
    pub async fn ask(
        &self,
        q: &Question,
        tcp: bool,
        budget: Duration,
    ) -> Result<Message, UpstreamError> {
        if self.servers.is_empty() {
            return Err(UpstreamError::NoUpstream);
        }
        let deadline = tokio::time::Instant::now() + budget;
        let mut last_answer = None;
        let mut last_error = UpstreamError::Timeout(budget);
        for (i, (addr, udp)) in self.servers.iter().enumerate() {
            let left = (self.servers.len() - i) as u32;
            let share = deadline.saturating_duration_since(tokio::time::Instant::now()) / left;
            if share.is_zero() {
                break;
            }
            let asked = tokio::time::timeout(share, self.ask_one(*addr, udp, q, tcp, share)).await;
            match asked {
                Ok(Ok(answer)) => {
                    let code = answer.metadata.response_code;
                    if matches!(code, ResponseCode::ServFail | ResponseCode::Refused) {
                        last_answer = Some(answer);
                        continue;
                    }
                    return Ok(answer);
                }
                Ok(Err(e)) => {
                    last_error = UpstreamError::Failed {
                        server: *addr,
                        detail: e.to_string(),
                    }
                }
                Err(_) => {}
            }
        }
        last_answer.ok_or(last_error)
    }

    async fn ask_one(
        &self,
        addr: SocketAddr,
        udp: &DnsExchange<TokioRuntimeProvider>,
        q: &Question,
        tcp: bool,
        timeout: Duration,
    ) -> Result<Message, NetError> {
        let mut options = DnsRequestOptions::default();
        options.recursion_desired = q.recursion_desired;
        options.use_edns = true;
        options.edns_payload_len = EDNS_PAYLOAD;
        options.edns_set_dnssec_ok = q.dnssec_ok;
        let mut request = DnsRequest::from_query(q.query.clone(), options);
        request.metadata.checking_disabled = q.checking_disabled;
        request.metadata.authentic_data = q.authentic_data;
        let response = if tcp {
            let exchange =
                TcpClientStream::exchange(addr, None, timeout, None, self.provider.clone()).await?;
            exchange.send(request).next().await
        } else {
            udp.send(request).next().await
        };
        match response {
            Some(r) => Ok(r?.into_message()),
            None => Err(NetError::from("the exchange ended without an answer")),
        }
    }
}

/// Parses an upstream given as `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse().map_err(|_| {
        format!("invalid DNS upstream {s:?}: give an address (192.0.2.53) or address and port (192.0.2.53:5353)")
    })
}

/// The nameservers listed in `resolv.conf` at `path`, on port 53; none
/// when it cannot be read.
pub fn from_resolv_conf(path: &Path) -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    nameservers(&text)
}

fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => {
                    // An IPv6 zone (fe80::1%eth0) cannot be expressed here.
                    addr.parse::<std::net::IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, 53))
                }
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_are_read_from_resolv_conf_lines() {
        let text = "# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver  2001:db8::1 \noptions ndots:2\nnameserver fe80::1%eth0\nnameserver bogus\n";
        assert_eq!(
            nameservers(text),
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
        assert!(from_resolv_conf(Path::new("/nonexistent/resolv.conf")).is_empty());
    }

    #[test]
    fn upstreams_parse_with_or_without_port() {
        assert_eq!(
            parse_upstream("192.0.2.53"),
            Ok("192.0.2.53:53".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("192.0.2.53:5353"),
            Ok("192.0.2.53:5353".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("2001:db8::1"),
            Ok("[2001:db8::1]:53".parse().unwrap())
        );
        assert!(
            parse_upstream("dns.example")
                .unwrap_err()
                .contains("192.0.2.53:5353")
        );
    }
}
