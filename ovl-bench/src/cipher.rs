// The cipher's own rate on this machine, beside `ovl encrypted`: boringtun
// sealing and opening WireGuard transport messages of the size the crypto
// device carries, on one thread, with nothing else in the way (no device,
// no socket). Every byte of an encrypted network is sealed on one host and
// opened on the other; in the bench both hosts share the machine's cores,
// so this rate bounds what `ovl encrypted` can reach in the same run.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// The packet the agent seals per full-size frame: the VXLAN packet of a
/// 1390-byte inner packet (IPv4 20 + UDP 8 + VXLAN 8 + Ethernet 14 + 1390).
pub const PACKET_BYTES: usize = 1440;

/// Messages sealed, then opened, per round (opened in order: the receiver's
/// replay window takes each counter once).
const ROUND: usize = 256;

/// WireGuard's transport overhead: type, receiver, counter (16) and the tag.
const OVERHEAD: usize = 32;

/// One measurement: bytes of packet per second through each direction of
/// the cipher, on one core.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CipherRate {
    pub seal_bytes_per_s: f64,
    pub open_bytes_per_s: f64,
}

impl CipherRate {
    /// The most packet bytes per second that can be sealed *and* opened
    /// when the cipher has `cores` cores to itself and nothing else runs.
    pub fn ceiling_bytes_per_s(self, cores: usize) -> f64 {
        cores as f64 / (1.0 / self.seal_bytes_per_s + 1.0 / self.open_bytes_per_s)
    }
}

/// Seals and opens `PACKET_BYTES` packets between two tunnels for about
/// `duration`; fails if a message does not open to the packet sealed.
pub fn measure(duration: Duration) -> Result<CipherRate> {
    let (mut sender, mut receiver) = session()?;
    let packet = ipv4_packet(PACKET_BYTES);
    let mut messages = vec![0u8; ROUND * (PACKET_BYTES + OVERHEAD)];
    let mut opened = vec![0u8; PACKET_BYTES + OVERHEAD];
    let (mut sealing, mut opening, mut packets) = (Duration::ZERO, Duration::ZERO, 0usize);
    while sealing + opening < duration {
        let started = Instant::now();
        let mut lengths = [0usize; ROUND];
        for (slot, length) in messages
            .chunks_exact_mut(PACKET_BYTES + OVERHEAD)
            .zip(&mut lengths)
        {
            match sender.encapsulate(&packet, slot) {
                TunnResult::WriteToNetwork(msg) => *length = msg.len(),
                other => bail!("boringtun did not seal a packet: {other:?}"),
            }
        }
        let sealed = Instant::now();
        for (slot, length) in messages.chunks_exact(PACKET_BYTES + OVERHEAD).zip(lengths) {
            match receiver.decapsulate(None, &slot[..length], &mut opened) {
                TunnResult::WriteToTunnelV4(p, _) if p == packet.as_slice() => {}
                other => bail!("a sealed packet did not open to itself: {other:?}"),
            }
        }
        sealing += sealed - started;
        opening += sealed.elapsed();
        packets += ROUND;
    }
    let bytes = (packets * PACKET_BYTES) as f64;
    Ok(CipherRate {
        seal_bytes_per_s: bytes / sealing.as_secs_f64(),
        open_bytes_per_s: bytes / opening.as_secs_f64(),
    })
}

/// Two tunnels with a session: a full handshake, in memory.
fn session() -> Result<(Tunn, Tunn)> {
    let a = StaticSecret::from([1u8; 32]);
    let b = StaticSecret::from([2u8; 32]);
    let mut a_side = Tunn::new(a.clone(), PublicKey::from(&b), None, None, 1, None);
    let mut b_side = Tunn::new(b, PublicKey::from(&a), None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let init = match a_side.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => bail!("no handshake initiation: {other:?}"),
    };
    let response = match b_side.decapsulate(None, &init, &mut out) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => bail!("no handshake response: {other:?}"),
    };
    let keepalive = match a_side.decapsulate(None, &response, &mut out) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => bail!("no keepalive after the handshake: {other:?}"),
    };
    ensure!(
        matches!(
            b_side.decapsulate(None, &keepalive, &mut out),
            TunnResult::Done
        ),
        "the responder did not take the initiator's keepalive"
    );
    Ok((a_side, b_side))
}

/// An IPv4 packet of `len` bytes (boringtun checks the version and the
/// total length of what it opens) from 198.51.100.10 to 198.51.100.20.
fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut packet: Vec<u8> = (0..len).map(|i| i as u8).collect();
    packet[..20].copy_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 198, 51, 100, 10, 198, 51, 100, 20,
    ]);
    packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_shares_each_core_between_sealing_and_opening() {
        let rate = CipherRate {
            seal_bytes_per_s: 1e9,
            open_bytes_per_s: 1e9,
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1.0;
        assert!(close(rate.ceiling_bytes_per_s(1), 0.5e9));
        assert!(close(rate.ceiling_bytes_per_s(2), 1e9));
        let uneven = CipherRate {
            seal_bytes_per_s: 1e9,
            open_bytes_per_s: 3e9,
        };
        assert!(close(uneven.ceiling_bytes_per_s(1), 0.75e9));
    }

    #[test]
    fn a_measurement_opens_every_sealed_packet_to_itself() {
        let rate = measure(Duration::from_millis(20)).expect("measures");
        assert!(rate.seal_bytes_per_s > 0.0 && rate.open_bytes_per_s > 0.0);
        // Opening a message twice is a replay: the measurement would have
        // failed had the rounds not opened each counter once, in order.
        let (mut a, mut b) = session().unwrap();
        let packet = ipv4_packet(PACKET_BYTES);
        let mut msg = vec![0u8; PACKET_BYTES + OVERHEAD];
        let mut out = vec![0u8; PACKET_BYTES + OVERHEAD];
        let sealed = match a.encapsulate(&packet, &mut msg) {
            TunnResult::WriteToNetwork(m) => m.to_vec(),
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            b.decapsulate(None, &sealed, &mut out),
            TunnResult::WriteToTunnelV4(..)
        ));
        assert!(matches!(
            b.decapsulate(None, &sealed, &mut out),
            TunnResult::Err(_)
        ));
    }
}
