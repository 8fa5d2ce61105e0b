//! The resolver's counters: what became of each question, per network,
//! shared between the serving tasks (writers) and the local API and
//! metrics exporter (readers).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};

/// Questions of one network's containers, by outcome. Monotonic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsCounters {
    /// Answered from ovl's records (addresses, names, NXDOMAIN for names
    /// of no network the asker is on).
    pub answered: u64,
    /// Answered by an upstream resolver, relayed.
    pub forwarded: u64,
    /// Answered with an error of ovl's own: SERVFAIL when no upstream
    /// answered in time (or too many were pending), FORMERR for a
    /// malformed question, NOTIMP for other operations, REFUSED for a
    /// name that is not ovl's asked from a container whose networks are
    /// all `--internal` (no way out, so nothing is forwarded for it).
    pub failed: u64,
    /// Dropped unanswered by the per-container rate limit.
    pub rate_limited: u64,
    /// Not a question ovl could read: FORMERR when its header was one,
    /// dropped otherwise (too short, or an answer).
    pub malformed: u64,
}

/// What became of one question.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    Forwarded,
    Failed,
    RateLimited,
    Malformed,
}

/// The counters of every network, and how many namespaces are served.
#[derive(Clone, Default)]
pub struct Stats {
    by_network: Arc<Mutex<Counted>>,
    namespaces: Arc<AtomicU64>,
}

/// The counters by network name, and the VNI each name was last served
/// on.
#[derive(Default)]
struct Counted {
    counters: HashMap<String, DnsCounters>,
    served_on: HashMap<String, u32>,
}

impl Stats {
    /// Counts one question of `network`.
    pub fn count(&self, network: &str, outcome: Outcome) {
        let mut counted = self.by_network.lock().unwrap_or_else(|p| p.into_inner());
        let map = &mut counted.counters;
        let c = match map.get_mut(network) {
            Some(c) => c,
            None => map.entry(network.to_owned()).or_default(),
        };
        let field = match outcome {
            Outcome::Answered => &mut c.answered,
            Outcome::Forwarded => &mut c.forwarded,
            Outcome::Failed => &mut c.failed,
            Outcome::RateLimited => &mut c.rate_limited,
            Outcome::Malformed => &mut c.malformed,
        };
        *field += 1;
    }

    /// The counters of `network` (zero if it never asked).
    pub fn of(&self, network: &str) -> DnsCounters {
        self.by_network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counters
            .get(network)
            .copied()
            .unwrap_or_default()
    }

    /// Follows the networks this node serves (`served`: VNI → name) as
    /// the kernel's per-network counters do: those of a network it no
    /// longer serves, or now serves on another VNI (removed and made again
    /// under its name), start again from zero. Otherwise a network made
    /// again would show the questions of the one it replaced.
    pub fn keep_served(&self, served: &BTreeMap<u32, String>) {
        let now: HashMap<String, u32> = served
            .iter()
            .map(|(vni, name)| (name.clone(), *vni))
            .collect();
        let mut counted = self.by_network.lock().unwrap_or_else(|p| p.into_inner());
        let before = std::mem::replace(&mut counted.served_on, now);
        let Counted {
            counters,
            served_on,
        } = &mut *counted;
        counters.retain(|name, _| match (served_on.get(name), before.get(name)) {
            (None, _) => false,
            (Some(vni), Some(was)) => vni == was,
            // Counted before the node first served it: the same network.
            (Some(_), None) => true,
        });
    }

    /// Container namespaces the resolver listens in.
    pub fn namespaces(&self) -> u64 {
        self.namespaces.load(Ordering::Relaxed)
    }

    pub(super) fn set_namespaces(&self, n: usize) {
        self.namespaces.store(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_network_and_outcome() {
        let s = Stats::default();
        s.count("blue", Outcome::Answered);
        s.count("blue", Outcome::Answered);
        s.count("blue", Outcome::RateLimited);
        s.count("red", Outcome::Failed);
        assert_eq!(
            s.of("blue"),
            DnsCounters {
                answered: 2,
                rate_limited: 1,
                ..Default::default()
            }
        );
        assert_eq!(s.of("red").failed, 1);
        assert_eq!(s.of("green"), DnsCounters::default());
    }

    #[test]
    fn a_network_no_longer_served_or_served_on_another_vni_counts_from_zero() {
        let s = Stats::default();
        s.count("blue", Outcome::Answered);
        s.count("red", Outcome::Answered);
        s.count("green", Outcome::Answered);
        let served = |nets: &[(u32, &str)]| -> BTreeMap<u32, String> {
            nets.iter().map(|(v, n)| (*v, n.to_string())).collect()
        };
        // First served: what was counted before is theirs.
        s.keep_served(&served(&[(100, "blue"), (200, "red"), (300, "green")]));
        assert_eq!(s.of("blue").answered, 1);
        // red made again on another VNI; green no longer served.
        s.keep_served(&served(&[(100, "blue"), (201, "red")]));
        assert_eq!(s.of("blue").answered, 1);
        assert_eq!(s.of("red"), DnsCounters::default());
        assert_eq!(s.of("green"), DnsCounters::default());
        s.count("red", Outcome::Answered);
        s.keep_served(&served(&[(100, "blue"), (201, "red")]));
        assert_eq!(s.of("red").answered, 1);
    }
}
