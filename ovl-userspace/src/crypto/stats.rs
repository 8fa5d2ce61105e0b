//! Counters of the encrypting path, node-wide: what was encrypted and
//! decrypted, handshakes, and every drop by reason. Drops of received
//! messages belong to no network (a message that fails authentication or
//! replays cannot be opened to read its VNI), so they are counted here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// Why the encrypting path dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptoDrop {
    /// A transport message whose Poly1305 tag does not verify, or a
    /// handshake whose MACs or sealed fields do not (forged or corrupted).
    AuthFailed,
    /// A message already received (counter inside or behind the replay
    /// window, or a handshake with a timestamp not newer than the last).
    Replayed,
    /// A handshake from a static key no node publishes.
    UnknownKey,
    /// A message for a session this node does not have (unknown receiver
    /// index: random bytes, or a session long gone).
    UnknownSession,
    /// Not a WireGuard message, or too short for one.
    Malformed,
    /// Decrypted, but not VXLAN from the sending node's VTEP to this one:
    /// a peer may only speak for itself.
    Spoofed,
    /// A frame for a VTEP whose node publishes no key (sent by the kernel
    /// while this node's view was older), or not ovl's VXLAN at all.
    NoKey,
    /// The crypto device or the UDP socket refused a packet.
    IoError,
    /// A handshake message that came while its key was over its limit of
    /// handshakes a second, without a cookie proving its sender's address:
    /// answered with a cookie reply instead (WireGuard §5.4.7), with which
    /// a real peer sends it again.
    UnderLoad,
    /// A message the underlay marked congested (ECN CE on its outer
    /// header) around a VXLAN packet that is not ECN-capable: RFC 6040
    /// §4.2 drops it, as the congested router would have (the data path's
    /// `congestion`, one tunnel further out). Underlay congestion, not a
    /// broken sender.
    Congestion,
}

impl CryptoDrop {
    /// Every reason, in report order.
    pub const ALL: [CryptoDrop; 10] = [
        CryptoDrop::AuthFailed,
        CryptoDrop::Replayed,
        CryptoDrop::UnknownKey,
        CryptoDrop::UnknownSession,
        CryptoDrop::Malformed,
        CryptoDrop::Spoofed,
        CryptoDrop::NoKey,
        CryptoDrop::IoError,
        CryptoDrop::UnderLoad,
        CryptoDrop::Congestion,
    ];

    /// The snake_case name in `ovl stats --crypto`.
    pub const fn name(self) -> &'static str {
        match self {
            CryptoDrop::AuthFailed => "auth_failed",
            CryptoDrop::Replayed => "replayed",
            CryptoDrop::UnknownKey => "unknown_key",
            CryptoDrop::UnknownSession => "unknown_session",
            CryptoDrop::Malformed => "malformed",
            CryptoDrop::Spoofed => "spoofed",
            CryptoDrop::NoKey => "no_key",
            CryptoDrop::IoError => "io_error",
            CryptoDrop::UnderLoad => "under_load",
            CryptoDrop::Congestion => "congestion",
        }
    }
}

/// The live counters, bumped by the engine's threads.
#[derive(Default)]
pub struct Counters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub handshakes_sent: AtomicU64,
    pub handshakes_received: AtomicU64,
    pub rotations: AtomicU64,
    drops: [AtomicU64; CryptoDrop::ALL.len()],
}

impl Counters {
    /// Counts one drop.
    pub fn dropped(&self, why: CryptoDrop) {
        self.dropped_n(why, 1);
    }

    /// Counts `n` packets dropped for `why`.
    pub fn dropped_n(&self, why: CryptoDrop, n: u64) {
        self.drops[why as usize].fetch_add(n, Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// A consistent-enough copy for reports.
    pub fn snapshot(&self) -> CryptoCounters {
        CryptoCounters {
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            handshakes_sent: self.handshakes_sent.load(Relaxed),
            handshakes_received: self.handshakes_received.load(Relaxed),
            rotations: self.rotations.load(Relaxed),
            drops: CryptoDrop::ALL
                .iter()
                .map(|d| (d.name().to_owned(), self.drops[*d as usize].load(Relaxed)))
                .collect(),
        }
    }
}

/// The counters as reported (`GET /v1/crypto`, `ovl stats --crypto --json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CryptoCounters {
    /// WireGuard transport messages sent (one per VXLAN packet).
    pub tx_packets: u64,
    /// Their VXLAN bytes (IPv4 and up, before encryption).
    pub tx_bytes: u64,
    /// Transport messages decrypted and handed to the data path.
    pub rx_packets: u64,
    /// Their VXLAN bytes.
    pub rx_bytes: u64,
    /// Handshake initiations and responses sent.
    pub handshakes_sent: u64,
    /// Handshake messages received and accepted.
    pub handshakes_received: u64,
    /// Key rotations of this node.
    pub rotations: u64,
    /// Drops keyed by reason name, every reason present: received
    /// messages, or packets as `tx_packets` counts them (a super-packet
    /// from the crypto device as the wire-size packets it stands for).
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// What `ovl stats --crypto` shows: the node's identity and peers, and the
/// counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CryptoReport {
    /// This node's current public key.
    pub public_key: String,
    /// UDP port WireGuard listens on.
    pub port: u16,
    /// Name of the crypto device; none while no encrypted network exists
    /// (the engine is stopped), or while the engine cannot start.
    pub device: Option<String>,
    /// Why the engine cannot start, while the cluster has an encrypted
    /// network and it is tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Older identities still answered until peers switch.
    pub retiring_keys: Vec<String>,
    /// Peers, by node name.
    pub peers: Vec<PeerReport>,
    pub counters: CryptoCounters,
}

/// One peer as `ovl stats --crypto` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    pub node: String,
    pub endpoint: String,
    pub public_key: String,
    /// Seconds since the newest session with it was established.
    pub last_handshake_seconds: Option<f64>,
    /// Tunnels (one per pair of keys) still held with it.
    pub tunnels: usize,
}

impl std::fmt::Display for CryptoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.counters;
        writeln!(f, "public key:  {} (UDP {})", self.public_key, self.port)?;
        match (&self.device, &self.problem) {
            (Some(device), _) => writeln!(f, "device:      {device}")?,
            (None, Some(problem)) => writeln!(
                f,
                "device:      none: WireGuard cannot start ({problem}); the agent tries again, \
                 encrypted networks' packets are dropped (no_key) meanwhile"
            )?,
            (None, None) => writeln!(
                f,
                "device:      none (no encrypted network: WireGuard starts with the first)"
            )?,
        }
        for k in &self.retiring_keys {
            writeln!(f, "retiring:    {k}")?;
        }
        writeln!(
            f,
            "encrypted:   {} packets, {} bytes\ndecrypted:   {} packets, {} bytes\nhandshakes:  {} sent, {} received; {} rotation(s)",
            c.tx_packets,
            c.tx_bytes,
            c.rx_packets,
            c.rx_bytes,
            c.handshakes_sent,
            c.handshakes_received,
            c.rotations
        )?;
        let drops: Vec<String> = c
            .drops
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        writeln!(
            f,
            "drops:       {}",
            if drops.is_empty() {
                "-".to_owned()
            } else {
                drops.join(" ")
            }
        )?;
        writeln!(
            f,
            "{:<16} {:<22} {:<46} HANDSHAKE",
            "PEER", "ENDPOINT", "KEY"
        )?;
        for p in &self.peers {
            writeln!(
                f,
                "{:<16} {:<22} {:<46} {}",
                p.node,
                p.endpoint,
                p.public_key,
                p.last_handshake_seconds
                    .map(|s| format!("{s:.0} s ago"))
                    .unwrap_or_else(|| "-".into())
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_every_drop_reason() {
        let c = Counters::default();
        c.dropped(CryptoDrop::Replayed);
        c.dropped(CryptoDrop::Replayed);
        c.dropped(CryptoDrop::AuthFailed);
        let s = c.snapshot();
        assert_eq!(s.drops.len(), CryptoDrop::ALL.len());
        assert_eq!(s.drops["replayed"], 2);
        assert_eq!(s.drops["auth_failed"], 1);
        assert_eq!(s.drops["unknown_key"], 0);
        for (i, d) in CryptoDrop::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
    }
}
