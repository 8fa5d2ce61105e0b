//! What the agent shows the outside world while it runs: its health, the
//! networks it serves with their endpoint counts, and which local
//! endpoints forward. Written by the agent's loop, read by the local API
//! and the metrics exporter; never the other way round.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

/// Endpoint counts of one network on this node.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkView {
    pub name: String,
    pub vni: u32,
    /// Endpoints on this node whose veth carries the egress hook.
    pub local_endpoints: u64,
    /// Endpoints behind other VTEPs, in this node's maps.
    pub remote_endpoints: u64,
}

/// The part of the view that changes while the agent runs.
#[derive(Debug, Default, Clone)]
pub struct Live {
    /// Whether the last request to the store succeeded.
    pub store_reachable: bool,
    /// When the agent last knew its view of the store was current.
    pub last_sync: Option<Instant>,
    /// Store revision of the last state applied to the maps.
    pub revision: u64,
    /// Networks this node serves, by VNI.
    pub networks: BTreeMap<u32, NetworkView>,
    /// Decap mode in use (after `auto` was resolved).
    pub mode: String,
    /// Local endpoints collected because their container was gone.
    pub collected_endpoints: u64,
    /// Local endpoints whose address (or given MAC) another endpoint took
    /// while this node was away (as of the last restore).
    pub address_conflicts: u64,
    /// The underlay's address since it changed under the running agent
    /// (none: still [`Identity::vtep`]).
    pub vtep: Option<Ipv4Addr>,
    /// Why nothing is decapsulated on the underlay now (gone, unreadable,
    /// or not hooked); none while it is hooked.
    pub underlay_problem: Option<String>,
}

/// Identity of the running agent, fixed at start.
#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    pub node: String,
    pub version: String,
    pub pid: u32,
    pub iface: String,
    pub vtep: Ipv4Addr,
    pub pin_dir: PathBuf,
    pub store: String,
}

/// The agent's shared view.
pub struct View {
    pub identity: Identity,
    pub started: SystemTime,
    live: RwLock<Live>,
    /// (VNI, address) of local endpoints that are in the maps and hooked.
    ready: watch::Sender<BTreeSet<(u32, Ipv4Addr)>>,
    /// Asks the loop to re-read the store and reconcile now.
    kick: mpsc::Sender<()>,
    /// The containers' resolver's counters.
    pub dns: crate::dns::Stats,
    /// The encrypting path (none if the node's key could not be loaded).
    crypto: RwLock<Option<Arc<crate::crypto::NodeCrypto>>>,
}

impl View {
    /// A view for `identity`; the receiver is the loop's end of the kick
    /// channel.
    pub fn new(identity: Identity) -> (Arc<View>, mpsc::Receiver<()>) {
        let (kick, kicks) = mpsc::channel(1);
        let view = View {
            identity,
            started: SystemTime::now(),
            live: RwLock::new(Live::default()),
            ready: watch::channel(BTreeSet::new()).0,
            kick,
            dns: crate::dns::Stats::default(),
            crypto: RwLock::new(None),
        };
        (Arc::new(view), kicks)
    }

    /// The view of an agent that runs nowhere (node n1 on eth0, no pins,
    /// no store), for unit tests of what reads a view.
    #[cfg(test)]
    pub fn unattached() -> (Arc<View>, mpsc::Receiver<()>) {
        View::new(Identity {
            node: "n1".into(),
            version: "test".into(),
            pid: 1,
            iface: "eth0".into(),
            vtep: Ipv4Addr::new(192, 0, 2, 10),
            pin_dir: "/nonexistent".into(),
            store: "file:///nonexistent".into(),
        })
    }

    /// A copy of the live part.
    pub fn live(&self) -> Live {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the live part.
    pub fn update(&self, f: impl FnOnce(&mut Live)) {
        f(&mut self.live.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// Publishes which local endpoints forward.
    pub fn set_ready(&self, ready: BTreeSet<(u32, Ipv4Addr)>) {
        self.ready.send_if_modified(|r| {
            let changed = *r != ready;
            *r = ready;
            changed
        });
    }

    /// The encrypting path the API reports on.
    pub fn crypto(&self) -> Option<Arc<crate::crypto::NodeCrypto>> {
        self.crypto
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Names the encrypting path (`None`: none).
    pub fn set_crypto(&self, crypto: Option<Arc<crate::crypto::NodeCrypto>>) {
        *self.crypto.write().unwrap_or_else(|p| p.into_inner()) = crypto;
    }

    /// Asks the loop to reconcile now (a pending request is enough).
    pub fn kick(&self) {
        let _ = self.kick.try_send(());
    }

    /// Waits up to `timeout` until endpoint `ip` of network `vni` forwards.
    pub async fn wait_ready(&self, vni: u32, ip: Ipv4Addr, timeout: Duration) -> bool {
        let mut rx = self.ready.subscribe();
        self.kick();
        let wait = rx.wait_for(|r| r.contains(&(vni, ip)));
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(_)))
    }

    /// Seconds since the view of the store was last known current.
    pub fn sync_age(&self) -> Option<f64> {
        self.live().last_sync.map(|t| t.elapsed().as_secs_f64())
    }
}
