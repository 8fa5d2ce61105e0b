//! Encrypted networks: the node's WireGuard engine. Frames of encrypted
//! networks reach it through the crypto device (a TAP the egress program
//! redirects into), leave sealed in WireGuard transport messages over UDP,
//! and come back opened into the same device, whose TC ingress runs the
//! decap program. The kernel only accepts an encrypted network's VXLAN
//! from that device, and drops (`no_key`) what it cannot hand to it.
//!
//! The agent calls a narrow API on [`NodeCrypto`]: [`NodeCrypto::load`]
//! at its start, [`NodeCrypto::publish_to`] once the store answers (peers
//! learn the key before any encrypted network exists),
//! [`NodeCrypto::start`] and [`NodeCrypto::stop`] as the cluster gains its
//! first encrypted network and loses its last, [`NodeCrypto::set_peers`]
//! from each store state; the local API reports and rotates through it.

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
    stats::{Counters, CryptoReport, PeerReport},
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

/// The node's encrypting path. The key lives as long as the agent: it is
/// published in the store from the start, so peers know it before the
/// first encrypted network exists. The engine (UDP socket, crypto device,
/// three threads) runs only while the cluster has an encrypted network:
/// [`NodeCrypto::start`] and [`NodeCrypto::stop`]. Counters and the
/// rotation schedule outlive any one run of the engine.
pub struct NodeCrypto {
    opts: Mutex<CryptoOptions>,
    key_file: KeyFile,
    published: Arc<watch::Sender<Published>>,
    counters: Arc<Counters>,
    next_rotation: Arc<Mutex<Instant>>,
    /// The running engine. Starts, stops and rotations hold this lock, so
    /// a rotation never stores a key that an engine starting beside it
    /// does not use.
    engine: Mutex<Option<Crypto>>,
    publisher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Why the engine the cluster wants cannot start (the agent retries).
    problem: Mutex<Option<String>>,
}

/// A running engine; dropping it stops the threads and removes the
/// device.
struct Crypto {
    engine: Arc<Engine>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeCrypto {
    /// Loads (or makes, on first start) the node's key. Nothing listens
    /// yet.
    pub fn load(opts: CryptoOptions) -> Result<Arc<NodeCrypto>> {
        let key_file = KeyFile::in_dir(&opts.key_dir);
        let (identity, made) = key_file.load_or_create()?;
        if made {
            log::info!(
                "made this node's WireGuard key pair (public {}; private in {}, root only)",
                identity.public_key(),
                key_file.path().display()
            );
        }
        let published = watch::channel(Published {
            key: identity.public_key(),
            port: opts.port,
        })
        .0;
        let node = Arc::new(NodeCrypto {
            next_rotation: Arc::new(Mutex::new(Instant::now() + opts.rotate_every)),
            opts: Mutex::new(opts),
            key_file,
            published: Arc::new(published),
            counters: Default::default(),
            engine: Mutex::new(None),
            publisher: Mutex::new(None),
            problem: Mutex::new(None),
        });
        metrics::set_current(&node);
        Ok(node)
    }

    /// Whether the engine runs.
    pub fn running(&self) -> bool {
        lock(&self.engine).is_some()
    }

    /// Starts the engine unless it runs: creates the crypto device and the
    /// UDP socket, with a tunnel to each of `peers` before the threads
    /// start (a peer's handshake can come as soon as the socket listens),
    /// and handshakes with them. Returns the device's name and index.
    pub fn start(&self, peers: &[PeerInfo]) -> Result<(String, u32)> {
        let mut slot = lock(&self.engine);
        if let Some(c) = slot.as_ref() {
            return Ok(c.device());
        }
        let opts = lock(&self.opts).clone();
        let crypto = Crypto::start(&opts, self, peers)?;
        let device = crypto.device();
        *slot = Some(crypto);
        Ok(device)
    }

    /// Stops the engine, if it runs: its socket closes and its device goes.
    /// Returns whether it ran.
    pub fn stop(&self) -> bool {
        // Dropped outside the lock: joining the threads takes a moment.
        let stopped = lock(&self.engine).take();
        stopped.is_some()
    }

    /// Follows a new underlay: messages are padded up to its MTU, and the
    /// socket is bound to its address. Returns whether the engine must be
    /// started again (it ran, bound to the old address: it is stopped).
    pub fn set_underlay(&self, vtep: Ipv4Addr, mtu: u32) -> bool {
        let moved = {
            let mut opts = lock(&self.opts);
            let moved = opts.vtep != vtep;
            opts.vtep = vtep;
            opts.underlay_mtu = mtu;
            moved
        };
        if let Some(c) = lock(&self.engine).as_ref() {
            c.engine.pad_limit.store(pad_limit(mtu), Ordering::Relaxed);
        }
        moved && self.stop()
    }

    /// Records why the engine the cluster wants cannot start (`None`:
    /// nothing stands in its way), for the report.
    pub fn set_problem(&self, problem: Option<String>) {
        *lock(&self.problem) = problem;
    }

    /// Makes the engine, if it runs, talk to exactly `peers`, and
    /// handshake at once with those it has no session with.
    pub fn set_peers(&self, peers: &[PeerInfo]) {
        if let Some(c) = lock(&self.engine).as_ref() {
            c.engine.set_peers(peers);
            c.engine.handshake_sessionless();
        }
    }

    /// What to publish for peers now.
    pub fn node_key(&self) -> NodeKey {
        let p = self.published.borrow();
        NodeKey {
            public_key: p.key,
            port: p.port,
        }
    }

    /// Identity, peers and counters.
    pub fn report(&self) -> CryptoReport {
        if let Some(c) = lock(&self.engine).as_ref() {
            return report(&c.engine);
        }
        let key = self.node_key();
        CryptoReport {
            public_key: key.public_key.to_string(),
            port: key.port,
            device: None,
            problem: lock(&self.problem).clone(),
            retiring_keys: Vec::new(),
            peers: Vec::new(),
            counters: self.counters.snapshot(),
        }
    }

    /// Rotates this node's key now; returns the new public key. With the
    /// engine stopped the new key is stored and published, and the engine
    /// starts with it.
    pub fn rotate(&self) -> Result<PublicKey> {
        let slot = lock(&self.engine);
        if let Some(c) = slot.as_ref() {
            return c.engine.rotate();
        }
        let new = keys::Identity::generate()?;
        self.key_file.store(&new)?;
        let key = new.public_key();
        engine::rotated(
            &self.next_rotation,
            Instant::now() + lock(&self.opts).rotate_every,
            &self.counters,
            &self.published,
            key,
        );
        Ok(key)
    }

    /// Publishes the node's key in `store` now and after every rotation,
    /// retrying until it is written (replaces an earlier publisher).
    pub fn publish_to(&self, store: Arc<Store>, node: &str) {
        let mut rx = self.published.subscribe();
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
        if let Some(old) = lock(&self.publisher).replace(task) {
            old.abort();
        }
    }
}

impl Drop for NodeCrypto {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.publisher).take() {
            t.abort();
        }
    }
}

impl Crypto {
    /// Creates the crypto device and the UDP socket of `node`'s engine
    /// with the key its key file holds now and tunnels to `peers`, starts
    /// the threads and handshakes with the peers.
    fn start(opts: &CryptoOptions, node: &NodeCrypto, peers: &[PeerInfo]) -> Result<Crypto> {
        let (identity, _) = node.key_file.load_or_create()?;
        // The file is the truth (replaced by hand, say): peers learn it.
        node.published.send_if_modified(|p| {
            let changed = p.key != identity.public_key();
            p.key = identity.public_key();
            changed
        });
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
        let engine = Arc::new(Engine {
            stop: Default::default(),
            identities: RwLock::new(Identities {
                current: identity,
                retiring: Vec::new(),
            }),
            table: Default::default(),
            counters: node.counters.clone(),
            socket,
            tap,
            vtep: opts.vtep,
            port: opts.port,
            key_file: KeyFile::in_dir(&opts.key_dir),
            published: node.published.clone(),
            rotate_every: opts.rotate_every,
            next_rotation: node.next_rotation.clone(),
            pad_limit: AtomicUsize::new(pad_limit(opts.underlay_mtu)),
        });
        // Before the receive thread runs: an initiation from a peer that
        // comes first would otherwise find no tunnel and be dropped as
        // from a key no node publishes.
        engine.set_peers(peers);
        // Made first, so that a thread that cannot start stops the others.
        let mut crypto = Crypto {
            engine: engine.clone(),
            threads: Vec::new(),
        };
        let e = engine.clone();
        let tx: Box<dyn FnOnce() + Send> = Box::new(move || e.run_tx());
        let e = engine.clone();
        let rx: Box<dyn FnOnce() + Send> = Box::new(move || e.run_rx());
        let timers: Box<dyn FnOnce() + Send> = Box::new(move || engine.run_timers());
        for (name, f) in [
            ("ovl-crypto-tx", tx),
            ("ovl-crypto-rx", rx),
            ("ovl-crypto-timer", timers),
        ] {
            let thread = std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .with_context(|| format!("start thread {name}"))?;
            crypto.threads.push(thread);
        }
        crypto.engine.handshake_sessionless();
        log::info!(
            "encrypted networks: WireGuard on {}:{}, crypto device {name}",
            opts.vtep,
            opts.port
        );
        Ok(crypto)
    }

    /// The crypto device: name and ifindex.
    fn device(&self) -> (String, u32) {
        (self.engine.tap.name().to_owned(), self.engine.tap.ifindex())
    }
}

impl Drop for Crypto {
    fn drop(&mut self) {
        self.engine.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // What still waited for a handshake goes with the engine.
        let unsent = self
            .engine
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .unsent();
        self.engine.give_up(unsent);
        // The device goes with the engine's threads, not with the last
        // holder of the engine (a report being made): a new engine may
        // want its name at once.
        self.engine.tap.release();
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
        device: Some(engine.tap.name().to_owned()),
        problem: None,
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

    /// Node `node`-<pid>'s crypto on loopback (and that name), its key made
    /// in a fresh directory (`tag`, kept while it is held), its engine on a
    /// port the kernel picks; not started.
    fn loaded(
        tag: &str,
        node: &str,
    ) -> (crate::testutil::TestDir, String, std::sync::Arc<NodeCrypto>) {
        let keys = crate::testutil::TestDir::new(tag);
        let node = format!("{node}-{}", std::process::id());
        let mut opts = CryptoOptions::new(&node, Ipv4Addr::LOCALHOST, keys.path().to_owned());
        opts.port = 0;
        let crypto = NodeCrypto::load(opts).expect("make the key");
        (keys, node, crypto)
    }

    #[test]
    fn the_engine_stops_and_starts_again_under_its_name_with_its_key_and_counters() {
        // The agent stops the engine when the last encrypted network goes,
        // and starts it again for the next one, or when the underlay's
        // address changes.
        let (_keys, node, crypto) = loaded("crypto-restart", "restart");
        let key = crypto.node_key();
        assert!(!crypto.running());
        assert_eq!(crypto.report().device, None);
        let (name, ifindex) = crypto.start(&[]).expect("start the engine (root only)");
        assert_eq!(name, device_name(&node));
        assert_eq!(crate::netlink::ifindex(&name), Some(ifindex));
        assert_eq!(crypto.start(&[]).expect("running already").1, ifindex);
        assert!(crypto.stop());
        assert!(!crypto.stop(), "stopped twice");
        assert_eq!(
            crate::netlink::ifindex(&name),
            None,
            "the device outlived its engine"
        );
        // Rotated while stopped: stored, published, and the next engine's.
        let rotated = crypto.rotate().expect("rotate while stopped");
        assert_ne!(rotated, key.public_key);
        assert_eq!(crypto.node_key().public_key, rotated);
        let (again, _) = crypto
            .start(&[])
            .expect("start it again under the same name");
        assert_eq!(again, name);
        let report = crypto.report();
        assert_eq!(report.public_key, rotated.to_string());
        assert_eq!(report.device, Some(name));
        assert_eq!(report.counters.rotations, 1, "counters outlive the engine");
        assert!(crypto.stop());
    }

    #[test]
    fn packets_waiting_for_a_handshake_when_the_engine_stops_are_counted_dropped() {
        let (_keys, _, crypto) = loaded("crypto-stop-staged", "staged");
        crypto.start(&[]).expect("start the engine (root only)");
        let peer = keys::Identity::generate().expect("a peer's key");
        let vtep = Ipv4Addr::new(198, 51, 100, 10);
        crypto.set_peers(&[PeerInfo {
            node: "b".into(),
            vtep,
            key: peer.public_key(),
            port: 51820,
            underlay_mtu: None,
        }]);
        {
            let engine = lock(&crypto.engine);
            let table = engine
                .as_ref()
                .expect("running")
                .engine
                .table
                .read()
                .unwrap();
            let p = table.by_vtep(vtep).expect("the peer");
            let mut p = lock(&p);
            for _ in 0..4 {
                p.gens[0].staged.push(&[0u8; 100], Instant::now());
            }
        }
        assert!(crypto.stop());
        assert_eq!(crypto.report().counters.drops["no_key"], 4);
    }

    #[test]
    fn a_peers_handshake_that_comes_as_the_engine_starts_is_answered() {
        // The peer learned of this node first: its initiation comes as
        // soon as the socket listens, before anything else the agent does.
        let (_keys, _, crypto) = loaded("crypto-first-handshake", "first");
        let peer = keys::Identity::generate().expect("a peer's key");
        let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("peer socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a read timeout");
        let info = PeerInfo {
            node: "b".into(),
            vtep: Ipv4Addr::LOCALHOST,
            key: peer.public_key(),
            port: socket.local_addr().unwrap().port(),
            underlay_mtu: None,
        };
        crypto.start(&[info]).expect("start the engine (root only)");
        let to = lock(&crypto.engine)
            .as_ref()
            .expect("running")
            .engine
            .socket
            .local_addr()
            .unwrap();
        let mut tunn = boringtun::noise::Tunn::new(
            peer.secret().clone(),
            crypto.node_key().public_key.x25519(),
            None,
            None,
            1,
            None,
        );
        let mut buf = vec![0u8; 2048];
        let init = match tunn.format_handshake_initiation(&mut buf, false) {
            boringtun::noise::TunnResult::WriteToNetwork(m) => m.to_vec(),
            other => panic!("no initiation: {other:?}"),
        };
        socket.send_to(&init, to).expect("send the initiation");
        // The engine's own initiation (it starts with this peer) and the
        // response to the peer's.
        let mut types = Vec::new();
        while !types.contains(&2) {
            let n = socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no response after {types:?}: {e}"));
            types.push(buf[0]);
            assert!(n > 0);
        }
        let report = crypto.report();
        assert_eq!(report.counters.drops["unknown_key"], 0);
        assert_eq!(report.counters.handshakes_received, 1);
        assert!(crypto.stop());
    }

    #[test]
    fn device_names_fit_and_differ_per_node() {
        let a = device_name("host-a");
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, device_name("host-b"));
        assert_eq!(a, device_name("host-a"));
    }
}
