//! Per-VNI counters as `ovl stats` shows them: a table for people, JSON
//! for machines (an array of objects with integer fields).

use std::collections::BTreeMap;

use ovl_common::{DropReason, UnderlayCounters, VniCounters};

use crate::dns::DnsCounters;
use serde::{Deserialize, Serialize};

/// Counters of one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStats {
    pub network: String,
    pub vni: u32,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub local_packets: u64,
    pub arp_replies: u64,
    /// Frames handed to the host for external egress.
    pub egress_packets: u64,
    /// Drops keyed by reason name, every reason present.
    pub drops: BTreeMap<String, u64>,
    /// The network's containers' DNS questions, by outcome (zero when no
    /// agent runs: they live in the agent).
    #[serde(default)]
    pub dns: DnsCounters,
}

impl NetworkStats {
    /// Builds the report row of `network` from summed counters.
    pub fn new(network: &str, vni: u32, c: &VniCounters) -> Self {
        NetworkStats {
            network: network.to_owned(),
            vni,
            tx_packets: c.tx_packets,
            tx_bytes: c.tx_bytes,
            rx_packets: c.rx_packets,
            rx_bytes: c.rx_bytes,
            local_packets: c.local_packets,
            arp_replies: c.arp_replies,
            egress_packets: c.egress_packets,
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name().to_owned(), c.drops_for(*r)))
                .collect(),
            dns: DnsCounters::default(),
        }
    }
}

/// Node-wide counters: what the underlay hook saw, and drops that belong
/// to no network (malformed VXLAN, unknown VNIs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayStats {
    pub underlay_packets: u64,
    pub underlay_passed: u64,
    /// ICMP reports of a smaller path MTU to a remote VTEP.
    pub path_mtu_reports: u64,
    pub drops: BTreeMap<String, u64>,
}

impl UnderlayStats {
    /// Builds the report from the `OVL_GLOBAL` sums and the unattributed
    /// bucket of `OVL_STATS`.
    pub fn new(underlay: &UnderlayCounters, unattributed: &VniCounters) -> Self {
        UnderlayStats {
            underlay_packets: underlay.packets,
            underlay_passed: underlay.passed,
            path_mtu_reports: underlay.path_mtu_reports,
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name().to_owned(), unattributed.drops_for(*r)))
                .collect(),
        }
    }
}

impl std::fmt::Display for UnderlayStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let drops: Vec<String> = self
            .drops
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        write!(
            f,
            "underlay frames seen: {}\npassed to the host:   {}\npath MTU reports:     {}\nunattributed drops:   {}",
            self.underlay_packets,
            self.underlay_passed,
            self.path_mtu_reports,
            if drops.is_empty() {
                "-".to_owned()
            } else {
                drops.join(" ")
            }
        )
    }
}

/// Renders rows as an aligned table; drops list only non-zero reasons.
pub fn table(rows: &[NetworkStats]) -> String {
    let mut out = format!(
        "{:<16} {:>8} {:>10} {:>12} {:>10} {:>12} {:>8} {:>6} {:>8} {:>20}  {}\n",
        "NETWORK",
        "VNI",
        "TX_PKTS",
        "TX_BYTES",
        "RX_PKTS",
        "RX_BYTES",
        "LOCAL",
        "ARP",
        "EGRESS",
        "DNS ANS/FWD/FAIL",
        "DROPS"
    );
    for r in rows {
        let drops: Vec<String> = r
            .drops
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.push_str(&format!(
            "{:<16} {:>8} {:>10} {:>12} {:>10} {:>12} {:>8} {:>6} {:>8} {:>20}  {}\n",
            r.network,
            r.vni,
            r.tx_packets,
            r.tx_bytes,
            r.rx_packets,
            r.rx_bytes,
            r.local_packets,
            r.arp_replies,
            r.egress_packets,
            format!("{}/{}/{}", r.dns.answered, r.dns.forwarded, r.dns.failed),
            if drops.is_empty() {
                "-".to_owned()
            } else {
                drops.join(" ")
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_integer_counters_and_every_drop_reason() {
        let mut c = VniCounters {
            tx_packets: 3,
            rx_bytes: 300,
            ..Default::default()
        };
        c.drops[DropReason::UnknownVtep as usize] = 2;
        let v = serde_json::to_value(vec![NetworkStats::new("blue", 4096, &c)]).unwrap();
        assert_eq!(v[0]["network"], "blue");
        assert_eq!(v[0]["vni"], 4096);
        assert_eq!(v[0]["tx_packets"], 3);
        assert_eq!(v[0]["rx_bytes"], 300);
        assert_eq!(v[0]["drops"]["unknown_vtep"], 2);
        assert_eq!(v[0]["drops"].as_object().unwrap().len(), DropReason::COUNT);
    }

    #[test]
    fn table_lists_only_nonzero_drops() {
        let mut c = VniCounters::default();
        c.drops[DropReason::TooBig as usize] = 1;
        let t = table(&[NetworkStats::new("blue", 4096, &c)]);
        assert!(t.contains("too_big=1"), "{t}");
        assert!(!t.contains("no_endpoint"), "{t}");
    }
}
