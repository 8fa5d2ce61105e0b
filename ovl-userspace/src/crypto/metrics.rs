//! The encrypting path's counters in the agent's Prometheus metrics:
//! `ovl_crypto_*`, of this process's encrypting path (none: no series),
//! counted across the runs of its engine.

use std::sync::{Arc, RwLock, Weak};

use anyhow::Result;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use super::NodeCrypto;

/// The encrypting path of this process, for the exporter (which is handed
/// only the agent's view): set when the agent loads its key, gone with it.
static CURRENT: RwLock<Option<Weak<NodeCrypto>>> = RwLock::new(None);

/// Records `crypto` as this process's.
pub(super) fn set_current(crypto: &Arc<NodeCrypto>) {
    *CURRENT.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(crypto));
}

fn current() -> Option<Arc<NodeCrypto>> {
    CURRENT
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(Weak::upgrade)
}

/// Adds the `ovl_crypto_*` series to `reg`, when the agent has its key.
pub fn export(reg: &Registry) -> Result<()> {
    let Some(crypto) = current() else {
        return Ok(());
    };
    let c = crypto.counters.snapshot();
    let vec = |name: &str, help: &str, label: &str| -> Result<IntCounterVec> {
        let v = IntCounterVec::new(Opts::new(name, help), &[label])?;
        reg.register(Box::new(v.clone()))?;
        Ok(v)
    };
    let packets = vec(
        "ovl_crypto_packets_total",
        "VXLAN packets sealed into (tx) and opened from (rx) WireGuard transport messages.",
        "direction",
    )?;
    packets.with_label_values(&["tx"]).inc_by(c.tx_packets);
    packets.with_label_values(&["rx"]).inc_by(c.rx_packets);
    let bytes = vec(
        "ovl_crypto_bytes_total",
        "Bytes of those VXLAN packets (IPv4 and up).",
        "direction",
    )?;
    bytes.with_label_values(&["tx"]).inc_by(c.tx_bytes);
    bytes.with_label_values(&["rx"]).inc_by(c.rx_bytes);
    let handshakes = vec(
        "ovl_crypto_handshakes_total",
        "WireGuard handshake messages sent and received.",
        "direction",
    )?;
    handshakes
        .with_label_values(&["tx"])
        .inc_by(c.handshakes_sent);
    handshakes
        .with_label_values(&["rx"])
        .inc_by(c.handshakes_received);
    let drops = vec(
        "ovl_crypto_drops_total",
        "Packets the encrypting path dropped, by reason (authentication, replay, unknown key or session, ...).",
        "reason",
    )?;
    for (reason, n) in &c.drops {
        drops.with_label_values(&[reason.as_str()]).inc_by(*n);
    }
    let rotations = IntCounter::new(
        "ovl_crypto_key_rotations_total",
        "WireGuard key rotations of this node.",
    )?;
    reg.register(Box::new(rotations.clone()))?;
    rotations.inc_by(c.rotations);
    Ok(())
}
