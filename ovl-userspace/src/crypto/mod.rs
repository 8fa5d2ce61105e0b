//! Encrypted networks: the node's WireGuard engine. Frames of encrypted
//! networks reach it through the crypto device (a TAP the egress program
//! redirects into), leave sealed in WireGuard transport messages over UDP,
//! and come back opened into the same device, whose TC ingress runs the
//! decap program. The kernel only accepts an encrypted network's VXLAN
//! from that device, and drops (`no_key`) what it cannot hand to it.
//!
//! The agent calls a narrow API: [`Crypto::start`], [`Crypto::device`],
//! [`Crypto::set_peers`] from each store state, [`Crypto::publish_to`] once
//! the store answers, [`Crypto::handle`] for the local API; dropping it
//! stops the engine and removes the device.

mod batch;
pub mod cli;
mod ecn;
mod engine;
pub mod keys;
pub mod metrics;
mod offload;
mod peers;
pub mod stats;
mod tap;

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ovl_common::wire::WIREGUARD_PORT;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use self::peers::PeerInfo;
use self::{
    engine::{Engine, Identities, Published, pad_limit},
    keys::{KeyFile, PublicKey},
    stats::{CryptoReport, PeerReport},
    tap::Tap,
};
use crate::{model::State, store::Store};

/// Default period of automatic key rotation (as Docker's overlay).
pub const DEFAULT_ROTATION: Duration = Duration::from_secs(12 * 3600);

/// Socket buffer of the WireGuard socket, each way. The default (208 KiB)
/// overflows under a TCP burst the receiving thread has not caught up
/// with yet (measured: every such drop was a TCP retransmission).
const SOCKET_BUFFER: usize = 8 << 20;

/// What a node publishes in the store for its peers (the node record's
/// `wireguard` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeKey {
    /// Current WireGuard public key.
    pub public_key: PublicKey,
    /// UDP port its WireGuard listens on, at the node's VTEP address.
    pub port: u16,
}

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct CryptoOptions {
    /// Node name (names the crypto device).
    pub node: String,
    /// This node's VTEP address: WireGuard listens there.
    pub vtep: Ipv4Addr,
    /// WireGuard UDP port.
    pub port: u16,
    /// Directory of the private key file (created 0700).
    pub key_dir: PathBuf,
    /// Period of automatic key rotation.
    pub rotate_every: Duration,
    /// The underlay's MTU: messages are padded up to it, never beyond.
    pub underlay_mtu: u32,
}

impl CryptoOptions {
    /// Defaults for `node` at `vtep` with keys in `key_dir`.
    pub fn new(node: &str, vtep: Ipv4Addr, key_dir: PathBuf) -> CryptoOptions {
        CryptoOptions {
            node: node.to_owned(),
            vtep,
            port: WIREGUARD_PORT,
            key_dir,
            rotate_every: DEFAULT_ROTATION,
            underlay_mtu: 1500,
        }
    }
}

/// Name of node `node`'s crypto device: `ovlwg` and 8 hex digits of a hash
/// of the name (stable, within the 15-character limit).
pub fn device_name(node: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in node.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("ovlwg{h:08x}")
}

/// The running engine.
pub struct Crypto {
    engine: Arc<Engine>,
    threads: Vec<JoinHandle<()>>,
    publisher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What the local API may do with the engine.
#[derive(Clone)]
pub struct CryptoHandle {
    engine: Arc<Engine>,
}

impl CryptoHandle {
    /// Identity, peers and counters.
    pub fn report(&self) -> CryptoReport {
        report(&self.engine)
    }

    /// Rotates this node's key now; returns the new public key.
    pub fn rotate(&self) -> Result<PublicKey> {
        self.engine.rotate()
    }
}

impl Crypto {
    /// Loads (or makes, on first start) the node's key, creates the crypto
    /// device and the UDP socket, and starts the threads.
    pub fn start(opts: &CryptoOptions) -> Result<Crypto> {
        let key_file = KeyFile::in_dir(&opts.key_dir);
        let (identity, made) = key_file.load_or_create()?;
        if made {
            log::info!(
                "made this node's WireGuard key pair (public {}; private in {}, root only)",
                identity.public_key(),
                key_file.path().display()
            );
        }
        let socket =
            UdpSocket::bind(SocketAddrV4::new(opts.vtep, opts.port)).with_context(|| {
                format!(
                    "listen for WireGuard on {}:{} (in use? pick another with --wireguard-port)",
                    opts.vtep, opts.port
                )
            })?;
        batch::enlarge_buffers(&socket, SOCKET_BUFFER);
        if !batch::enable_gro(&socket) {
            log::info!("UDP GRO unavailable: WireGuard messages are received one by one");
        }
        if !batch::enable_tos(&socket) {
            log::warn!(
                "IP_RECVTOS refused: congestion marks (ECN) on WireGuard messages are not carried"
            );
        }
        let name = device_name(&opts.node);
        // Wire frames fit the underlay, GSO super-packets reach 64 KiB: the
        // largest MTU leaves room for both.
        let tap = Tap::create(&name, 65521)
            .with_context(|| format!("create the crypto device {name}"))?;
        let published = watch::channel(Published {
            key: identity.public_key(),
            port: opts.port,
        })
        .0;
        let engine = Arc::new(Engine {
            stop: Default::default(),
            identities: RwLock::new(Identities {
                current: identity,
                retiring: Vec::new(),
            }),
            table: Default::default(),
            counters: Default::default(),
            socket,
            tap,
            vtep: opts.vtep,
            port: opts.port,
            key_file,
            published,
            rotate_every: opts.rotate_every,
            next_rotation: Mutex::new(Instant::now() + opts.rotate_every),
            pad_limit: AtomicUsize::new(pad_limit(opts.underlay_mtu)),
        });
        metrics::set_current(&engine);
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .with_context(|| format!("start thread {name}"))
        };
        let e = engine.clone();
        threads.push(spawn("ovl-crypto-tx", Box::new(move || e.run_tx()))?);
        let e = engine.clone();
        threads.push(spawn("ovl-crypto-rx", Box::new(move || e.run_rx()))?);
        let e = engine.clone();
        threads.push(spawn("ovl-crypto-timer", Box::new(move || e.run_timers()))?);
        log::info!(
            "encrypted networks: WireGuard on {}:{}, crypto device {name}",
            opts.vtep,
            opts.port
        );
        Ok(Crypto {
            engine,
            threads,
            publisher: Mutex::new(None),
        })
    }

    /// The crypto device: name and ifindex.
    pub fn device(&self) -> (&str, u32) {
        (self.engine.tap.name(), self.engine.tap.ifindex())
    }

    /// What to publish for peers now.
    pub fn node_key(&self) -> NodeKey {
        let p = self.engine.published.borrow();
        NodeKey {
            public_key: p.key,
            port: p.port,
        }
    }

    /// Handle for the local API.
    pub fn handle(&self) -> CryptoHandle {
        CryptoHandle {
            engine: self.engine.clone(),
        }
    }

    /// Follows a new underlay MTU: messages are padded up to it.
    pub fn set_underlay_mtu(&self, mtu: u32) {
        self.engine
            .pad_limit
            .store(pad_limit(mtu), Ordering::Relaxed);
    }

    /// Makes the engine talk to exactly `peers`.
    pub fn set_peers(&self, peers: &[PeerInfo]) {
        self.engine.set_peers(peers);
    }

    /// Publishes the node's key in `store` now and after every rotation,
    /// retrying until it is written (replaces an earlier publisher).
    pub fn publish_to(&self, store: Arc<Store>, node: &str) {
        let mut rx = self.engine.published.subscribe();
        let node = node.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let p = rx.borrow_and_update().clone();
                let key = NodeKey {
                    public_key: p.key,
                    port: p.port,
                };
                loop {
                    match store.publish_node_key(&node, key).await {
                        Ok(()) => {
                            log::info!("published WireGuard key {} of node {node}", key.public_key);
                            break;
                        }
                        Err(e) => {
                            log::warn!("publishing the WireGuard key of node {node}: {e}");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        if let Some(old) = self
            .publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task)
        {
            old.abort();
        }
    }
}

impl Drop for Crypto {
    fn drop(&mut self) {
        self.engine.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self
            .publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The device goes with the engine's threads, not with the last
        // holder of the engine (an API request, a metrics scrape): a new
        // engine may want its name at once.
        self.engine.tap.release();
    }
}

/// Starts the encrypting path for the agent and hooks its device into the
/// data path. A failure is logged, not fatal: plain networks keep working,
/// encrypted ones drop their packets (`no_key`) on this node.
pub fn start_for_agent(
    opts: &crate::agent::AgentOptions,
    underlay: &crate::netlink::Underlay,
    dp: &mut crate::datapath::Datapath,
) -> Option<Crypto> {
    let mut c = CryptoOptions::new(&opts.node, underlay.addr, opts.state_dir.join("keys"));
    c.underlay_mtu = underlay.mtu;
    c.port = opts.wireguard_port;
    c.rotate_every = opts.key_rotation;
    let started = Crypto::start(&c).and_then(|crypto| {
        let (name, ifindex) = crypto.device();
        dp.hook_crypto(name, ifindex)?;
        Ok(crypto)
    });
    match started {
        Ok(crypto) => Some(crypto),
        Err(e) => {
            log::error!(
                "encrypted networks cannot be served on this node: {e:#}; their packets are dropped (no_key)"
            );
            None
        }
    }
}

/// The peers of node `me` in `state`: every other node that publishes a
/// key (so a node joining later is reached as soon as it publishes).
pub fn peers_of(state: &State, me: &str) -> Vec<PeerInfo> {
    state
        .nodes
        .values()
        .filter(|n| n.name != me)
        .filter_map(|n| {
            let key = n.wireguard?;
            Some(PeerInfo {
                node: n.name.clone(),
                vtep: n.vtep,
                key: key.public_key,
                port: key.port,
                underlay_mtu: n.underlay_mtu,
            })
        })
        .collect()
}

pub(crate) fn report(engine: &Engine) -> CryptoReport {
    let ids = engine.identities.read().unwrap_or_else(|e| e.into_inner());
    let table = engine.table.read().unwrap_or_else(|e| e.into_inner());
    let mut peers: Vec<PeerReport> = table
        .peers()
        .map(|p| {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            PeerReport {
                node: p.info.node.clone(),
                endpoint: p.endpoint().to_string(),
                public_key: p.info.key.to_string(),
                last_handshake_seconds: p
                    .gens
                    .iter()
                    .filter_map(|g| g.tunn.time_since_last_handshake())
                    .min()
                    .map(|d| d.as_secs_f64()),
                tunnels: p.gens.len(),
            }
        })
        .collect();
    peers.sort_by(|a, b| a.node.cmp(&b.node));
    CryptoReport {
        public_key: ids.current.public_key().to_string(),
        port: engine.port,
        device: engine.tap.name().to_owned(),
        retiring_keys: ids
            .retiring
            .iter()
            .map(|(i, _)| i.public_key().to_string())
            .collect(),
        peers,
        counters: engine.counters.snapshot(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_engine_frees_its_device_name_while_a_handle_still_holds_it() {
        // The agent starts the engine anew when its underlay address
        // changes, under the same device name, while an API request or a
        // metrics scrape may still hold the old engine for a moment.
        let keys = crate::testutil::TestDir::new("crypto-restart");
        let node = format!("restart-{}", std::process::id());
        let mut opts = CryptoOptions::new(&node, Ipv4Addr::LOCALHOST, keys.path().to_owned());
        opts.port = 0;
        let first = Crypto::start(&opts).expect("start the engine (root only)");
        let held = first.handle();
        drop(first);
        let second = Crypto::start(&opts).expect("start it again under the same name");
        let (name, ifindex) = second.device();
        assert_eq!(name, device_name(&node));
        assert_ne!(ifindex, 0);
        // The old engine's report still answers.
        assert_eq!(held.report().device, device_name(&node));
        drop(second);
        drop(held);
    }

    #[test]
    fn device_names_fit_and_differ_per_node() {
        let a = device_name("host-a");
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, device_name("host-b"));
        assert_eq!(a, device_name("host-a"));
    }
}
