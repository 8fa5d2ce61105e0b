//! The resolver's counters: what became of each question, per network,
//! shared between the serving tasks (writers) and the local API and
//! metrics exporter (readers).

use std::{
    collections::HashMap,
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
    by_network: Arc<Mutex<HashMap<String, DnsCounters>>>,
    namespaces: Arc<AtomicU64>,
}

impl Stats {
    /// Counts one question of `network`.
    pub fn count(&self, network: &str, outcome: Outcome) {
        let mut map = self.by_network.lock().unwrap_or_else(|p| p.into_inner());
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
            .get(network)
            .copied()
            .unwrap_or_default()
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
}
