// ECN probes: UDP datagrams sent with a chosen TOS byte, a receiver that
// reports the TOS each one arrived with, and a router that marks CE.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result};

use crate::{ChildHandle, Lab, Netns};

/// The ECN code points of the IPv4 TOS byte (RFC 3168 §5).
pub const NOT_ECT: u8 = 0b00;
pub const ECT1: u8 = 0b01;
pub const ECT0: u8 = 0b10;
pub const CE: u8 = 0b11;
/// The ECN field of a TOS byte.
pub const ECN_MASK: u8 = 0b11;

/// A UDP receiver in a namespace that records, for each datagram sent by
/// [`send_udp_with_tos`], its tag, number and the TOS byte it arrived
/// with (`IP_RECVTOS`): what the receiving application sees.
pub struct TosReceiver {
    child: ChildHandle,
}

/// One datagram as the receiver saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub tag: String,
    pub seq: u64,
    pub tos: u8,
}

impl TosReceiver {
    /// Starts the receiver on `ip`:`port` in `ns`; returns once it listens.
    pub fn start(lab: &Lab, ns: &Netns, ip: Ipv4Addr, port: u16) -> Result<TosReceiver> {
        let script = format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)\n\
             s.bind(('{ip}', {port}))\n\
             print('listening', flush=True)\n\
             while True:\n\
             \x20   data, anc, _, _ = s.recvmsg(2048, socket.CMSG_SPACE(4))\n\
             \x20   tos = [c[2][0] for c in anc if c[0] == socket.IPPROTO_IP and c[1] == socket.IP_TOS]\n\
             \x20   tag, seq = data.decode(errors='replace').rstrip('.').split()[:2]\n\
             \x20   print('got', tag, seq, tos[0] if tos else -1, flush=True)\n"
        );
        let child = lab.spawn(ns, &["/usr/bin/python3", "-c", &script], &[])?;
        crate::wait_until(Duration::from_secs(10), || {
            Ok(child.stdout()?.contains("listening"))
        })
        .with_context(|| format!("UDP receiver did not start:\n{}", child.output_report()))?;
        Ok(TosReceiver { child })
    }

    /// Every datagram received so far, in order.
    pub fn received(&self) -> Result<Vec<Received>> {
        let out = self.child.stdout()?;
        out.lines()
            .filter_map(|l| l.strip_prefix("got "))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let parse = || -> Option<Received> {
                    Some(Received {
                        tag: (*f.first()?).to_owned(),
                        seq: f.get(1)?.parse().ok()?,
                        tos: f.get(2)?.parse().ok()?,
                    })
                };
                parse().with_context(|| format!("receiver line {l:?}"))
            })
            .collect()
    }

    /// The datagrams of `tag` received so far.
    pub fn tagged(&self, tag: &str) -> Result<Vec<Received>> {
        Ok(self
            .received()?
            .into_iter()
            .filter(|r| r.tag == tag)
            .collect())
    }
}

/// Sends `count` UDP datagrams of `size` bytes from `ns` to `dst`:`port`
/// with TOS byte `tos` (set on the socket: the kernel keeps a UDP
/// socket's ECN bits), 10 ms apart, each carrying `tag` and its number.
pub fn send_udp_with_tos(
    ns: &Netns,
    dst: Ipv4Addr,
    port: u16,
    tos: u8,
    tag: &str,
    count: u64,
    size: usize,
) -> Result<()> {
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, {tos})\n\
         for i in range({count}):\n\
         \x20   s.sendto(f'{tag} {{i}} '.encode().ljust({size}, b'.'), ('{dst}', {port}))\n\
         \x20   time.sleep(0.01)\n"
    );
    ns.exec(&["/usr/bin/python3", "-c", &script])?;
    Ok(())
}

/// The nftables table [`mark_congestion`] makes.
const CONGESTION_TABLE: &str = "ovl_test_congestion";

/// Makes router namespace `router` behave as a congested ECN router for
/// the UDP datagrams it forwards from `src` to `dst` port `dport`: it
/// marks every one CE (even a Not-ECT one, which a real router would drop
/// instead: that is how CE over Not-ECT is made to happen). The table goes
/// with the namespace, or with [`clear_congestion`].
pub fn mark_congestion(router: &Netns, src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Result<()> {
    let table = format!(
        "table ip {CONGESTION_TABLE} {{ chain congested {{ \
         type filter hook forward priority 0; policy accept; \
         ip saddr {src} ip daddr {dst} udp dport {dport} ip ecn set ce counter; }}; }}"
    );
    router
        .exec(&["nft", &table])
        .context("nft: mark CE on the router")?;
    Ok(())
}

/// Removes what [`mark_congestion`] installed in `router`.
pub fn clear_congestion(router: &Netns) -> Result<()> {
    router.exec(&["nft", "delete", "table", "ip", CONGESTION_TABLE])?;
    Ok(())
}
