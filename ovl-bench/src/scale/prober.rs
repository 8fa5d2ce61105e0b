// Watching other nodes' maps for one change: a thread that polls the
// pinned endpoint maps of the nodes still missing a change and reports
// when the last of them has it.

use std::net::Ipv4Addr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::mpsc::UnboundedSender;

use super::maps::NodeMap;

/// How often pending changes are looked for: the resolution of every
/// propagation time.
pub const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// A change is given up on after this long.
pub const GIVE_UP: Duration = Duration::from_secs(30);

/// What a node's map must show once a change reached it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// An entry for the endpoint, pointing at this VTEP.
    Points(Ipv4Addr),
    /// No entry pointing at this VTEP (the endpoint left it).
    Gone(Ipv4Addr),
}

/// One change to follow.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The caller's tag, returned with the outcome.
    pub tag: u64,
    pub vni: u32,
    pub ip: Ipv4Addr,
    pub expect: Expect,
    /// When the change was asked for (before the store was written).
    pub started: Instant,
    /// Indexes (into the prober's maps) of the nodes that must show it.
    pub nodes: Vec<usize>,
}

/// When a change reached every node it had to.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub probe: Probe,
    /// From `started` until the last node showed it; `None` when it was
    /// given up on after [`GIVE_UP`] (then `missing` says where).
    pub all: Option<Duration>,
    /// From `started` until the first node showed it.
    pub first: Option<Duration>,
    /// Nodes that never showed it.
    pub missing: Vec<usize>,
}

/// The polling thread.
pub struct Prober {
    probes: Option<mpsc::Sender<Probe>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Prober {
    /// Starts polling `maps`; outcomes go to `outcomes`.
    pub fn start(maps: Vec<NodeMap>, outcomes: UnboundedSender<Outcome>) -> Prober {
        let (tx, rx) = mpsc::channel::<Probe>();
        let thread = std::thread::spawn(move || poll(&maps, &rx, &outcomes));
        Prober {
            probes: Some(tx),
            thread: Some(thread),
        }
    }

    /// A sender of probes, for tasks that make changes.
    pub fn sender(&self) -> mpsc::Sender<Probe> {
        self.probes.clone().expect("the prober runs until stopped")
    }

    /// Stops polling once every probe sent so far has an outcome.
    pub fn stop(mut self) -> Result<()> {
        self.probes = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("the prober thread panicked"),
            None => Ok(()),
        }
    }
}

struct Pending {
    probe: Probe,
    left: Vec<usize>,
    first: Option<Duration>,
}

fn poll(
    maps: &[NodeMap],
    probes: &mpsc::Receiver<Probe>,
    outcomes: &UnboundedSender<Outcome>,
) -> Result<()> {
    let mut pending: Vec<Pending> = Vec::new();
    let mut open = true;
    loop {
        // Block for work when there is none; otherwise take what came.
        if pending.is_empty() {
            if !open {
                return Ok(());
            }
            match probes.recv() {
                Ok(p) => pending.push(new_pending(p)),
                Err(_) => return Ok(()),
            }
        }
        loop {
            match probes.try_recv() {
                Ok(p) => pending.push(new_pending(p)),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let mut i = 0;
        while i < pending.len() {
            let now = Instant::now();
            let p = &mut pending[i];
            let (vni, ip, expect) = (p.probe.vni, p.probe.ip, p.probe.expect);
            let mut error = None;
            p.left.retain(|n| match maps[*n].vtep_of(vni, ip) {
                Ok(seen) => !shows(seen, expect),
                Err(e) => {
                    error = Some(e);
                    true
                }
            });
            if let Some(e) = error {
                return Err(e);
            }
            let elapsed = now.duration_since(p.probe.started);
            if p.left.len() < p.probe.nodes.len() && p.first.is_none() {
                p.first = Some(elapsed);
            }
            let done = p.left.is_empty();
            if done || elapsed > GIVE_UP {
                let p = pending.swap_remove(i);
                // The receiver may be gone when the benchmark stops early.
                let _ = outcomes.send(Outcome {
                    all: done.then_some(elapsed),
                    first: p.first,
                    missing: p.left,
                    probe: p.probe,
                });
            } else {
                i += 1;
            }
        }
        if !pending.is_empty() {
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

fn new_pending(probe: Probe) -> Pending {
    Pending {
        left: probe.nodes.clone(),
        probe,
        first: None,
    }
}

/// Whether a map entry (`None`: none; `Some(None)`: a local endpoint;
/// `Some(Some(vtep))`: behind `vtep`) is what `expect` waits for.
fn shows(seen: Option<Option<Ipv4Addr>>, expect: Expect) -> bool {
    match expect {
        Expect::Points(vtep) => seen == Some(Some(vtep)),
        Expect::Gone(vtep) => seen != Some(Some(vtep)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_counts_only_when_it_points_at_the_expected_vtep() {
        let a = Ipv4Addr::new(192, 0, 2, 10);
        let b = Ipv4Addr::new(192, 0, 2, 11);
        assert!(shows(Some(Some(a)), Expect::Points(a)));
        assert!(!shows(Some(Some(b)), Expect::Points(a)));
        assert!(!shows(None, Expect::Points(a)));
        assert!(!shows(Some(None), Expect::Points(a)));
        assert!(shows(None, Expect::Gone(a)));
        assert!(shows(Some(Some(b)), Expect::Gone(a)));
        assert!(!shows(Some(Some(a)), Expect::Gone(a)));
    }
}
