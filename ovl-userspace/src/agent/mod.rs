//! The node agent behind `ovl attach`: takes over the node's pinned data
//! path (or builds it), keeps its maps in step with the store, and serves
//! the local API and metrics. The data path never depends on it: programs
//! and maps stay pinned when it exits, however it exits.

mod gc;
mod host_ends;
mod ifindex;
mod journal;
mod reconcile;
pub mod service;
pub mod view;

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use backon::{ExponentialBuilder, Retryable};
use ovl_common::NodeConfig;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use self::{
    journal::{Journal, Memory},
    view::{Identity, View},
};
use crate::{
    api, bpffs, crypto,
    datapath::{Datapath, DecapMode, LinkPin, LinkPins, Maps},
    desired::Plans,
    docker, egress_nat, exporter,
    model::{Location, State},
    netlink::{self, Underlay},
    store::{Dirty, Followed, Registration, Store, StoreError, catch_up},
};

/// How often it checks that the store answers.
const STORE_PROBE: Duration = Duration::from_secs(2);
/// Applying store changes takes at most this share of a core: after an
/// apply that took t of CPU time, the next store change is looked at no
/// sooner than t × this factor later, and whatever changed meanwhile is
/// applied at once (the follower keeps the newest state and a log of what
/// changed). CPU time, not wall time: waiting for the disk (the journal's
/// fsync) or for a busy machine's CPU is not work to pause for, and
/// counting it stretched the pauses on exactly the machines that were
/// already slow. An apply of a few changed endpoints takes a fraction of a
/// millisecond at ten thousand endpoints (the scans of the state left in
/// it grow with its size), so the pause stays some milliseconds; applying
/// every change as it came, each recomputing everything, made twenty
/// agents on two cores starve etcd itself (bench --scale).
const APPLY_DUTY_FACTOR: u32 = 25;
/// How long a state read for a waiting `connect` takes precedence over
/// older states the follower still delivers.
const KICK_PRECEDENCE: Duration = Duration::from_secs(2);
/// Longest pause between two applies of store changes.
const APPLY_MAX_PAUSE: Duration = Duration::from_millis(500);
/// How long opening the store may take before the agent starts without it
/// (when it has a pinned data path to forward with).
const STORE_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Least time between two failed starts of the WireGuard engine (its port
/// taken by another program, say).
const CRYPTO_RETRY: Duration = Duration::from_secs(30);

/// What `ovl attach` was asked to do.
pub struct AgentOptions {
    pub iface: String,
    pub mode: DecapMode,
    pub node: String,
    pub pin_root: PathBuf,
    /// Lease TTL of the node's liveness (stores that track it).
    pub lease_ttl: Duration,
    /// The store URL.
    pub store_url: String,
    /// Unix socket of the local API.
    pub api_socket: PathBuf,
    /// Address of the Prometheus endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// Directory of this node's agent-local state.
    pub state_dir: PathBuf,
    /// How long a local endpoint's namespace must be gone before the
    /// endpoint is collected.
    pub gc_grace: Duration,
    /// The containers' resolver.
    pub dns: crate::dns::Options,
    /// Docker's plugin socket and Engine API, if Docker is to use ovl.
    pub docker: Option<docker::DockerOptions>,
    /// WireGuard UDP port of encrypted networks.
    pub wireguard_port: u16,
    /// Period of automatic WireGuard key rotation.
    pub key_rotation: Duration,
}

/// The store as the agent holds it once reachable.
struct Connected {
    store: Arc<Store>,
    _registration: Registration,
    /// What the node is registered with.
    vtep: std::net::Ipv4Addr,
    underlay_mtu: u32,
    updates: watch::Receiver<Followed>,
    reregistrations: watch::Receiver<u64>,
}

type Connecting = Pin<Box<dyn Future<Output = Connected> + Send>>;

/// Runs the agent until SIGINT/SIGTERM. On any exit the data path keeps
/// forwarding with the last state; `ovl detach` removes it.
pub async fn run(opts: AgentOptions) -> Result<()> {
    // First of all: a stop asked for while the agent starts (key
    // generation, the resolver, the crypto device take a while) waits for
    // the loop and ends it cleanly instead of killing the process midway.
    let signals = Signals {
        interrupt: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
        terminate: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
    };
    let handle = netlink::connect()?;
    let underlay = netlink::underlay(&handle, &opts.iface).await?;
    let pin_dir = bpffs::node_dir(&opts.pin_root, &opts.node)?;
    bpffs::prepare(&pin_dir)?;
    let Prelude {
        lock: _lock,
        created,
        api_listener,
        metrics_listener,
        journal,
        memory,
        store,
        docker_listener,
    } = prelude(&opts, &pin_dir).await?;

    let mut dp = match Datapath::load(&pin_dir) {
        Ok(dp) => dp,
        Err(e) => {
            abandon_start(&pin_dir, &opts.api_socket, None, created);
            return Err(e);
        }
    };
    let fresh = *dp.maps() == Maps::Created;
    let (view, kicks) = View::new(Identity {
        node: opts.node.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        iface: opts.iface.clone(),
        vtep: underlay.addr,
        pin_dir: pin_dir.clone(),
        store: opts.store_url.clone(),
    });
    let started = crate::dns::Service::start(&opts.dns, view.dns.clone())
        .and_then(|dns| Ok((dns, crate::next_hops::Resolver::new(&underlay)?)));
    let (dns, next_hops) = match started {
        Ok(s) => s,
        Err(e) => {
            abandon_start(&pin_dir, &opts.api_socket, Some(&mut dp), fresh);
            return Err(e);
        }
    };
    let mut agent = Agent {
        dns,
        node: opts.node.clone(),
        next_hops,
        underlay,
        dp,
        view,
        journal,
        memory,
        state: None,
        plans: Plans::default(),
        needs_whole: false,
        collector: gc::Collector::new(opts.gc_grace),
        next_gc: None,
        crypto: None,
        crypto_retry: None,
        ifindexes: ifindex::IfindexCache::default(),
        host_ends: host_ends::HostEnds::default(),
        next_hops_failing: false,
        netlink: handle,
        underlay_lost: false,
    };
    let started = agent.take_over(&opts, store.as_deref()).await;
    if let Err(e) = started {
        abandon_start(&pin_dir, &opts.api_socket, Some(&mut agent.dp), fresh);
        return Err(e);
    }

    agent.load_crypto(&opts);
    let api = api::serve(api_listener, api::AgentApi::new(agent.view.clone()));
    let api_task = tokio::spawn(api);
    let metrics_task =
        metrics_listener.map(|l| tokio::spawn(exporter::serve(l, agent.view.clone())));
    let docker_task = docker_listener.map(|l| {
        let store = docker::StoreHandle::new(&opts.store_url, store.clone());
        let (node, view, state_dir) = (
            opts.node.clone(),
            agent.view.clone(),
            opts.state_dir.clone(),
        );
        tokio::spawn(async move {
            docker::serve(l, node, store, view, &state_dir).await;
        })
    });

    service::ready(&format!(
        "node {} forwarding on {} (VTEP {}); store {}",
        opts.node, opts.iface, agent.underlay.addr, opts.store_url
    ));
    let result = agent.serve(&opts, store, kicks, signals).await;
    service::stopping();
    // Now, not when the last holder of the view lets it go: WireGuard's
    // socket closes and its device goes with the agent.
    if let Some(c) = &agent.crypto {
        c.stop();
    }
    // Stopped and waited for: nothing of theirs still runs (a Docker
    // reconcile pass, say) while the runtime shuts down.
    let tasks: Vec<_> = [Some(api_task), metrics_task, docker_task]
        .into_iter()
        .flatten()
        .collect();
    for t in &tasks {
        t.abort();
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::future::join_all(tasks),
    )
    .await;
    let _ = std::fs::remove_file(&opts.api_socket);
    log::info!(
        "agent stopped; the data path keeps forwarding with the last state (pins under {}). `ovl detach {}{}` removes it",
        pin_dir.display(),
        opts.iface,
        node_flag(&opts.node)
    );
    result
}

/// Undoes what a start that failed once the kernel was involved made: the
/// node's pins if nothing forwarded with them yet (`fresh`), or else the
/// maps staged to replace the pinned ones, and the API socket.
fn abandon_start(
    pin_dir: &std::path::Path,
    api_socket: &std::path::Path,
    dp: Option<&mut Datapath>,
    fresh: bool,
) {
    if fresh {
        if let Err(e) = bpffs::remove_node_dir(pin_dir) {
            log::warn!("{e:#}");
        }
    } else if let Some(dp) = dp {
        dp.discard_staged();
    }
    let _ = std::fs::remove_file(api_socket);
}

/// The signals that stop the agent, caught from its first instant.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

/// What the agent holds before it touches the kernel.
struct Prelude {
    lock: bpffs::NodeLock,
    /// The node's pin directory held no pins when the lock was taken:
    /// this start's to remove if it fails before anything forwards.
    created: bool,
    api_listener: tokio::net::UnixListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    journal: Journal,
    memory: Memory,
    store: Option<Arc<Store>>,
    docker_listener: Option<docker::Listener>,
}

/// Everything that can refuse to start without changing the kernel: the
/// node lock, the API and metrics listeners, the journal, the store.
async fn prelude(opts: &AgentOptions, pin_dir: &std::path::Path) -> Result<Prelude> {
    // Before anything else that could touch another agent's world: a
    // start refused here leaves the directory to the agent that holds it.
    let lock = bpffs::NodeLock::acquire(pin_dir)?;
    // Decided under the lock: an agent starting beside this one on a new
    // node may have pinned its maps since this one made the directory.
    let created = !bpffs::holds_pins(pin_dir);
    let rest = match api::bind(&opts.api_socket) {
        Ok(api_listener) => match after_bind(opts, pin_dir, !created).await {
            Ok(rest) => Ok((api_listener, rest)),
            Err(e) => {
                let _ = std::fs::remove_file(&opts.api_socket);
                Err(e)
            }
        },
        Err(e) => Err(e),
    };
    let (api_listener, (metrics_listener, journal, memory, store, docker_listener)) = match rest {
        Ok(r) => r,
        Err(e) => {
            if created {
                // Nothing was pinned yet: leave no directory behind either.
                let _ = bpffs::remove_node_dir(pin_dir);
            }
            return Err(e);
        }
    };
    Ok(Prelude {
        lock,
        created,
        api_listener,
        metrics_listener,
        journal,
        memory,
        store,
        docker_listener,
    })
}

type AfterBind = (
    Option<tokio::net::TcpListener>,
    Journal,
    Memory,
    Option<Arc<Store>>,
    Option<docker::Listener>,
);

/// Binds and opens what the agent serves and follows; `forwarding`: the
/// node has a pinned data path.
async fn after_bind(
    opts: &AgentOptions,
    pin_dir: &std::path::Path,
    forwarding: bool,
) -> Result<AfterBind> {
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("serve metrics on {addr}: address in use or not local; pick another --metrics ADDR:PORT")
        })?),
        None => None,
    };
    let (journal, memory) = Journal::open(&opts.state_dir)?;
    let docker_listener = opts
        .docker
        .as_ref()
        .map(docker::Listener::bind)
        .transpose()?;

    let pinned_decap = LinkPins::of(pin_dir)
        .list()?
        .into_iter()
        .any(|p| matches!(p, LinkPin::Decap { .. }));
    let store = match open_store(&opts.store_url).await {
        Ok(store) => Some(Arc::new(store)),
        Err(e @ StoreError::UnsupportedUrl(_)) => return Err(e.into()),
        Err(e) if pinned_decap => {
            log::warn!(
                "{e}; forwarding with the pinned state of node {} and retrying the store",
                opts.node
            );
            None
        }
        Err(e) => {
            return Err(anyhow!(e)).context(
                "cannot start: the store is unreachable and this node has no pinned data path to forward with",
            );
        }
    };
    if let Some(store) = &store
        && forwarding
    {
        refuse_a_blank_store(opts, store, &memory).await?;
    }
    Ok((metrics_listener, journal, memory, store, docker_listener))
}

/// Refuses a store that holds nothing at all (no network, no node) while
/// the node's data path forwards local containers the journal remembers:
/// a mistyped `--store`, or a store wiped or moved aside. Its empty state
/// would take every network off the data path; the agent stops instead,
/// and the data path forwards on. A store that cannot be read is left to
/// the start to report.
async fn refuse_a_blank_store(opts: &AgentOptions, store: &Store, memory: &Memory) -> Result<()> {
    if memory.endpoints.is_empty() {
        return Ok(());
    }
    // Network records and nodes only: no endpoint is read twice at start.
    let Ok(state) = store.load_in(crate::store::Scope::Networks).await else {
        return Ok(());
    };
    if !state.networks.is_empty() || !state.nodes.is_empty() {
        return Ok(());
    }
    let networks: std::collections::BTreeSet<&str> = memory
        .endpoints
        .values()
        .map(|e| e.network.as_str())
        .collect();
    bail!(
        "cannot start: the store {} holds no network and no node, while the data path of node {} forwards {} local container endpoint(s) of network(s) {}. A mistyped --store (OVL_STORE), or a store wiped or moved aside? Start with the store they came from; the data path forwards meanwhile. To start afresh with this store, remove the data path first: `ovl detach {}{}`",
        opts.store_url,
        opts.node,
        memory.endpoints.len(),
        networks.into_iter().collect::<Vec<_>>().join(", "),
        opts.iface,
        node_flag(&opts.node)
    )
}

fn node_flag(node: &str) -> String {
    format!(" --node {node}")
}

async fn open_store(url: &str) -> Result<Store, StoreError> {
    match tokio::time::timeout(STORE_OPEN_TIMEOUT, Store::open(url)).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Etcd {
            endpoints: url.to_owned(),
            detail: "connect timed out".into(),
        }),
    }
}

/// The agent's loop state.
struct Agent {
    node: String,
    underlay: Underlay,
    dp: Datapath,
    view: Arc<View>,
    journal: Journal,
    memory: Memory,
    /// The last state applied to the maps.
    state: Option<State>,
    /// What the maps hold for each network, as last applied.
    plans: Plans,
    /// The last apply failed part way: the next one looks at everything.
    needs_whole: bool,
    collector: gc::Collector,
    /// When an abandoned endpoint is next due for collection.
    next_gc: Option<Instant>,
    dns: crate::dns::Service,
    /// The encrypting path of encrypted networks (none if the node's key
    /// could not be loaded: those networks then drop, counted `no_key`).
    crypto: Option<Arc<crypto::NodeCrypto>>,
    /// After a failed start of the engine: not tried again before then.
    crypto_retry: Option<Instant>,
    /// Local veths' indexes, forgotten at every link notification.
    ifindexes: ifindex::IfindexCache,
    /// Host ends of local veths whose offloads were checked.
    host_ends: host_ends::HostEnds,
    /// Next hops the FIB helper cannot give (forwarding off).
    next_hops: crate::next_hops::Resolver,
    /// The last next-hop refresh failed (its error is logged once).
    next_hops_failing: bool,
    /// rtnetlink, to read the underlay again when it changes.
    netlink: rtnetlink::Handle,
    /// The underlay is gone or unreadable (reported once).
    underlay_lost: bool,
}

impl Agent {
    /// Makes this build's programs the ones forwarding: fills replacement
    /// maps first when the pinned ones do not fit, then swaps the programs
    /// into the pinned links, then hooks the underlay if it is not yet.
    async fn take_over(&mut self, opts: &AgentOptions, store: Option<&Store>) -> Result<()> {
        self.write_node_config()?;
        if let Maps::Replacing(mismatches) = self.dp.maps().clone() {
            let list = mismatches
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            let state = match store {
                Some(store) => store.load().await.map_err(|e| e.to_string()),
                None => Err("it is unreachable".to_owned()),
            };
            let state = state.map_err(|why| {
                anyhow!(
                    "the pinned maps of node {} do not fit this build ({list}), and new ones cannot be filled from the store before the switch ({why}); the old data path keeps forwarding. Start again when the store answers, or remove the old data path with `ovl detach {}{}`",
                    self.node,
                    opts.iface,
                    node_flag(&self.node)
                )
            })?;
            log::info!("pinned maps do not fit this build ({list}): filling new ones");
            self.apply(state)?;
        } else if let Some(store) = store {
            // Catch up with what changed while no agent ran before saying
            // so: the maps are shared with the programs already running.
            // Endpoints the store lost meanwhile (its lease expired, say) go
            // back first, so their entries are never removed in between.
            self.restore(store).await;
            match store.load().await {
                Ok(state) => {
                    // The pinned maps forward already: what this apply
                    // fails to do (a veth gone between its lookup and its
                    // hook, say) the loop's next apply does again, whole.
                    self.apply_logged(state);
                    self.view.update(|l| {
                        l.store_reachable = true;
                        l.last_sync = Some(Instant::now());
                    });
                }
                Err(e) => log::warn!("{e}; applying the store's state once it answers"),
            }
        }
        if self.state.is_none() {
            // No state from the store yet: the pinned maps forward on, and
            // the view (metrics, status) shows what they hold meanwhile.
            match reconcile::publish_pinned(&self.view.identity.pin_dir, &self.memory, &self.view) {
                Ok(n) => log::info!(
                    "forwarding with the pinned state of {n} network(s) until the store answers"
                ),
                Err(e) => log::warn!("cannot read the pinned networks for the view: {e:#}"),
            }
        }
        // Routes and neighbours may have changed while no agent watched.
        self.forget_next_hops("agent start");
        let adopted = self.dp.adopt_links()?;
        if !adopted.replaced.is_empty() {
            log::info!(
                "took over {} pinned link(s); programs replaced atomically",
                adopted.replaced.len()
            );
        }
        for gone in &adopted.removed {
            log::info!("removed {} (its interface is gone)", gone.file_name());
        }
        self.dp.promote()?;
        self.dp.record_abi()?;
        let (mode, driver) = self.hook_underlay(opts)?;
        log::info!(
            "node {} attached to {} ({driver}, VTEP {}, MTU {}) in {mode} mode; store {}",
            self.node,
            opts.iface,
            self.underlay.addr,
            self.underlay.mtu,
            opts.store_url
        );
        Ok(())
    }

    /// Hooks decapsulation on the underlay device the agent knows (at
    /// start, and again when an interface of its name is made anew) and
    /// switches UDP GRO forwarding off on it. Returns the mode hooked and
    /// the device's driver.
    fn hook_underlay(&mut self, opts: &AgentOptions) -> Result<(DecapMode, String)> {
        let iface = &opts.iface;
        let driver = netlink::driver(iface).unwrap_or_default();
        let mode = self
            .dp
            .hook_decap(iface, self.underlay.ifindex, opts.mode, &driver)?;
        self.view.update(|l| {
            l.mode = mode.to_string();
            l.underlay_problem = None;
        });
        // UDP GRO forwarding on the underlay would merge VXLAN datagrams
        // into batches decap cannot split (and drops as malformed).
        match netlink::disable_udp_forwarding_gro(iface) {
            Ok(off) if !off.is_empty() => log::info!(
                "switched {} off on {iface}: it merges VXLAN datagrams into batches ovl cannot deliver (switch it back with `ethtool -K {iface} ... on` after `ovl detach`)",
                off.join(", "),
            ),
            Ok(_) => {}
            Err(e) => log::warn!(
                "cannot check UDP GRO forwarding on {iface}: {e:#}; if it is on, VXLAN batches it merges are dropped as malformed",
            ),
        }
        Ok((mode, driver))
    }

    /// The underlay device (index) decapsulation is hooked on, as its
    /// pinned link says (none: unreadable, or no hook).
    fn hooked_on(&self) -> Option<u32> {
        match self.dp.decap_hook() {
            Ok(hook) => hook.map(|(_, ifindex)| ifindex),
            Err(e) => {
                log::warn!("cannot read the pinned decap hook: {e:#}");
                None
            }
        }
    }

    /// Loads the node's WireGuard key for the encrypting path (its engine
    /// starts with the first encrypted network: [`Agent::sync_crypto`]).
    /// The key is published once the store is reached.
    fn load_crypto(&mut self, opts: &AgentOptions) {
        let mut c =
            crypto::CryptoOptions::new(&opts.node, self.underlay.addr, opts.state_dir.join("keys"));
        c.underlay_mtu = self.underlay.mtu;
        c.port = opts.wireguard_port;
        c.rotate_every = opts.key_rotation;
        match crypto::NodeCrypto::load(c) {
            Ok(crypto) => {
                self.view.set_crypto(Some(crypto.clone()));
                self.crypto = Some(crypto);
            }
            Err(e) => log::error!(
                "encrypted networks cannot be served on this node: {e:#}; their packets are dropped (no_key)"
            ),
        }
    }

    /// Runs the encrypting path's engine (UDP socket, crypto device,
    /// threads) exactly while the last state has an encrypted network,
    /// and hooks its device into the data path. A failed start is logged
    /// and tried again at the first apply or store probe after
    /// [`CRYPTO_RETRY`].
    fn sync_crypto(&mut self) {
        let Some(c) = self.crypto.clone() else {
            return;
        };
        let wanted = self
            .state
            .as_ref()
            .is_some_and(|s| s.networks.values().any(|n| n.encrypted));
        if !wanted {
            c.set_problem(None);
            if c.stop() {
                log::info!(
                    "no encrypted network left: WireGuard stopped (socket closed, crypto device removed)"
                );
            }
            return;
        }
        if c.running() || self.crypto_retry.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let peers = self
            .state
            .as_ref()
            .map(|s| crypto::peers_of(s, &self.node))
            .unwrap_or_default();
        let started = c
            .start(&peers)
            .and_then(|(name, ifindex)| self.dp.hook_crypto(&name, ifindex));
        match started {
            Ok(()) => {
                self.crypto_retry = None;
                c.set_problem(None);
            }
            Err(e) => {
                c.stop();
                c.set_problem(Some(format!("{e:#}")));
                self.crypto_retry = Some(Instant::now() + CRYPTO_RETRY);
                log::error!(
                    "encrypted networks cannot be served on this node: {e:#}; their packets are dropped (no_key). Tried again in {} s",
                    CRYPTO_RETRY.as_secs()
                );
            }
        }
    }

    /// Writes the underlay as the agent knows it into the programs'
    /// config (`OVL_CONFIG`), keeping the store's VXLAN port an earlier
    /// agent applied.
    fn write_node_config(&mut self) -> Result<()> {
        let udp_port = self.dp.config()?.udp_port;
        self.dp.set_config(NodeConfig {
            vtep: self.underlay.addr.octets(),
            underlay_ifindex: self.underlay.ifindex,
            underlay_mtu: self.underlay.mtu,
            udp_port,
            _pad: 0,
        })
    }

    /// Reads the underlay again after a link or address notification. A
    /// new address or MTU goes into the programs' config and the next-hop
    /// resolver at once; the node's store record follows in
    /// [`register_underlay`](Self::register_underlay), the maps at the
    /// reapply that follows every link notification. An interface of the
    /// underlay's name made anew (deleted and added again, a NIC reset;
    /// `deleted`: the notifications since the last look say the
    /// underlay's index was deleted) is hooked again; a new address
    /// restarts WireGuard, whose socket is bound to the old one. (The
    /// whole reapply after it puts back what else a new device lost:
    /// egress's forwarding, say.)
    async fn follow_underlay(&mut self, opts: &AgentOptions, deleted: bool) {
        let iface = opts.iface.as_str();
        if deleted && netlink::ifindex(iface).is_some() {
            // Deleted and made anew since the last look, perhaps under its
            // old index, which the pinned hook still names: the hooks went
            // with the old device.
            log::info!("underlay {iface} was deleted and made anew");
            if let Err(e) = self.dp.forget_deleted_decap(self.underlay.ifindex) {
                log::warn!("cannot unpin the decap hook of the deleted {iface}: {e:#}");
            }
        }
        let now = if netlink::ifindex(iface).is_none() {
            // Its hooks went with it: unpinned, so that an interface made
            // anew under any index is hooked again.
            if let Err(e) = self.dp.forget_gone_decap() {
                log::warn!("cannot unpin the decap hook of the gone {iface}: {e:#}");
            }
            Err(anyhow!(
                "underlay {iface} (index {}) is gone: ovl's programs on it went with it and nothing is decapsulated or sent; the agent hooks an interface of that name when one is back",
                self.underlay.ifindex
            ))
        } else {
            netlink::underlay(&self.netlink, iface).await.map_err(|e| {
                anyhow!(
                    "cannot read underlay {iface} again: {e:#}; the data path keeps VTEP {} and MTU {} until it can",
                    self.underlay.addr,
                    self.underlay.mtu
                )
            })
        };
        let now = match now {
            Ok(now) => now,
            Err(e) => {
                if !self.underlay_lost {
                    self.underlay_lost = true;
                    log::error!("{e:#}");
                    let why = format!("{e:#}");
                    self.view.update(|l| l.underlay_problem = Some(why));
                }
                return;
            }
        };
        if std::mem::take(&mut self.underlay_lost) {
            log::info!("underlay {iface} is back (index {})", now.ifindex);
            if self.hooked_on() == Some(now.ifindex) {
                self.view.update(|l| l.underlay_problem = None);
            }
        }
        let was = std::mem::replace(&mut self.underlay, now);
        if was != self.underlay {
            let vtep = self.underlay.addr;
            self.view.update(|l| l.vtep = Some(vtep));
            let moved = self.write_node_config().and_then(|()| {
                if (was.addr, was.ifindex) != (self.underlay.addr, self.underlay.ifindex) {
                    self.next_hops = crate::next_hops::Resolver::new(&self.underlay)
                        .context("restart the next-hop resolver on the new underlay")?;
                }
                Ok(())
            });
            match moved {
                Ok(()) => log::info!(
                    "underlay {iface} changed: index {} -> {}, VTEP {} -> {}, MTU {} -> {}; the data path uses the new values",
                    was.ifindex,
                    self.underlay.ifindex,
                    was.addr,
                    self.underlay.addr,
                    was.mtu,
                    self.underlay.mtu
                ),
                Err(e) => log::error!(
                    "underlay {iface} changed (index {} -> {}, VTEP {} -> {}, MTU {} -> {}) but the data path could not follow: {e:#}; restart the agent (`ovl attach {iface}{}`)",
                    was.ifindex,
                    self.underlay.ifindex,
                    was.addr,
                    self.underlay.addr,
                    was.mtu,
                    self.underlay.mtu,
                    node_flag(&self.node)
                ),
            }
            self.forget_next_hops("the underlay changed");
        }
        if self.hooked_on() != Some(self.underlay.ifindex) {
            match self.hook_underlay(opts) {
                Ok((mode, driver)) => {
                    log::info!(
                        "underlay {iface} made anew (index {}, {driver}): decapsulation hooked again in {mode} mode",
                        self.underlay.ifindex
                    );
                }
                Err(e) => {
                    let why = format!(
                        "underlay {iface} made anew (index {}) cannot be hooked: {e:#}; nothing is decapsulated on it. Tried again at its next change, or restart the agent (`ovl attach {iface}{}`)",
                        self.underlay.ifindex,
                        node_flag(&self.node)
                    );
                    // Retried at every link notification: said once.
                    if self.view.live().underlay_problem.as_ref() != Some(&why) {
                        log::error!("{why}");
                        self.view.update(|l| l.underlay_problem = Some(why));
                    }
                }
            }
        }
        if let Some(c) = &self.crypto
            && c.set_underlay(self.underlay.addr, self.underlay.mtu)
        {
            log::info!(
                "starting WireGuard again on {} (its socket was bound to {})",
                self.underlay.addr,
                was.addr
            );
            self.crypto_retry = None;
            self.sync_crypto();
        }
    }

    /// Registers the node again when its VTEP or underlay MTU is not what
    /// it registered with (the underlay changed, or changed while the
    /// store was being reached); a failure is retried at the next store
    /// probe.
    async fn register_underlay(&self, c: &mut Connected, ttl: Duration) {
        let (vtep, mtu) = (self.underlay.addr, self.underlay.mtu);
        if (c.vtep, c.underlay_mtu) == (vtep, mtu) {
            return;
        }
        match c.store.register_node(&self.node, vtep, mtu, ttl).await {
            Ok(registration) => {
                log::info!(
                    "node {} registered again in {} with VTEP {vtep} and underlay MTU {mtu} (was {}, {})",
                    self.node,
                    c.store.describe(),
                    c.vtep,
                    c.underlay_mtu
                );
                c.reregistrations = registration.reregistrations();
                // The former registration's lease, if any, is left to
                // expire: the alive key is under the new one already.
                c._registration = registration;
                (c.vtep, c.underlay_mtu) = (vtep, mtu);
            }
            Err(e) => log::warn!(
                "node {} keeps VTEP {} and underlay MTU {} in the store for now: {e}; retrying in {STORE_PROBE:?}",
                self.node,
                c.vtep,
                c.underlay_mtu
            ),
        }
    }

    /// Puts back lost local endpoints and publishes how many addresses
    /// were found taken.
    async fn restore(&mut self, store: &Store) {
        if let Some(conflicts) = reconcile::restore_endpoints(store, &self.node, &self.memory).await
        {
            self.view.update(|l| l.address_conflicts = conflicts as u64);
        }
    }

    /// Applies `state`, read whole, to the kernel and keeps it as the last
    /// state (also when applying failed: a later reapply retries it, not
    /// an older one). Taken by value: a copy of tens of thousands of
    /// endpoints per change is measurable.
    fn apply(&mut self, state: State) -> Result<()> {
        self.state = Some(state);
        self.apply_changes(&Dirty::All)
    }

    /// Applies the last state to the kernel, looking again at what `dirty`
    /// covers (what changed since the last apply).
    fn apply_changes(&mut self, dirty: &Dirty) -> Result<()> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let dirty = if self.needs_whole { &Dirty::All } else { dirty };
        // This node's endpoints reach the journal before the maps:
        // `ovl connect` returns once its endpoint forwards, and an agent
        // killed after that must still put the endpoint back should the
        // node lose its lease before an agent runs again. The networks'
        // names wait for the maps: reconcile compares the new ones with
        // them (a VNI given to another network).
        if !dirty.is_empty() {
            reconcile::remember_endpoints(&mut self.memory, state, &self.node);
            self.journal.save_logged(&self.memory);
        }
        // Names first: a container's resolver is listening by the time its
        // endpoint is reported forwarding.
        let ifindexes = &self.ifindexes;
        self.dns.update(
            state,
            &self.node,
            &|name| ifindexes.get(name).is_some(),
            dirty,
        );
        let applied = reconcile::reconcile(
            &mut self.dp,
            state,
            &mut self.plans,
            dirty,
            &self.node,
            &self.underlay,
            &self.view,
            &mut self.host_ends,
            &|name| ifindexes.get(name),
            &self.memory.networks,
        );
        // Half written: the maps may differ from the plans anywhere.
        self.needs_whole = applied.is_err();
        self.sync_crypto();
        applied?;
        if dirty.is_empty() {
            return Ok(());
        }
        let Some(state) = &self.state else {
            return Ok(());
        };
        reconcile::remember_networks(&mut self.memory, state);
        if let Some(c) = &self.crypto {
            c.set_peers(&crypto::peers_of(state, &self.node));
        }
        self.journal.save_logged(&self.memory);
        Ok(())
    }

    fn apply_logged(&mut self, state: State) {
        if let Err(e) = self.apply(state) {
            log::error!("reconcile: {e:#}");
        }
    }

    /// Applies the last state again, all of it (the local links changed,
    /// or an earlier apply failed).
    fn reapply(&mut self) {
        if let Err(e) = self.apply_changes(&Dirty::All) {
            log::error!("reconcile: {e:#}");
        }
    }

    /// Catches up with the follower's state and applies what changed.
    /// Returns the CPU time it took.
    async fn follow(&mut self, c: &Connected) -> Duration {
        let alive_before = self.state.as_ref().and_then(|s| s.alive.clone());
        let started = thread_cpu_time();
        let dirty = catch_up(&mut self.state, &c.updates.borrow());
        let mut took = thread_cpu_time().saturating_sub(started);
        if let Some(now) = &self.state {
            reconcile::free_dead_nodes(&c.store, &self.node, alive_before.as_ref(), now).await;
        }
        self.view.update(|l| l.last_sync = Some(Instant::now()));
        // No await in an apply: it runs on this thread from start to end.
        let started = thread_cpu_time();
        if let Err(e) = self.apply_changes(&dirty) {
            log::error!("reconcile: {e:#}");
        }
        took += thread_cpu_time().saturating_sub(started);
        took
    }

    async fn serve(
        &mut self,
        opts: &AgentOptions,
        store: Option<Arc<Store>>,
        mut kicks: tokio::sync::mpsc::Receiver<()>,
        signals: Signals,
    ) -> Result<()> {
        // SAFETY: the logger owns the ring's descriptor and lives as long as
        // the AsyncFd that wraps it (the contract register_with_interest asks).
        let mut logs = unsafe {
            AsyncFd::register_with_interest(self.dp.logger()?, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow!("{e}"))
        .context("watch the kernel log ring")?;

        let mut connected: Option<Connected> = None;
        let mut connecting: Option<Connecting> = Some(Box::pin(connect(
            store,
            opts.store_url.clone(),
            opts.node.clone(),
            self.underlay.addr,
            self.underlay.mtu,
            opts.lease_ttl,
        )));
        let Signals {
            interrupt: mut sigint,
            terminate: mut sigterm,
        } = signals;
        // Container veths come and go under the agent (`ovl connect` makes
        // one just after registering it; a deleted namespace takes its own
        // along): the kernel says when, nothing is polled.
        let mut links = netlink::link_events(self.ifindexes.notifications())?;
        // The data path caches next hops to other VTEPs for at most a
        // second; a changed route or neighbour empties the cache at once.
        let mut paths = netlink::underlay_path_events(self.underlay.ifindex)?;
        // Where forwarding is off the agent resolves them for the data path.
        let mut next_hop_refresh = tokio::time::interval(crate::next_hops::REFRESH);
        next_hop_refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe = tokio::time::interval(STORE_PROBE);
        // Someone else may delete or change ovl's nftables table (an
        // operator's `nft flush ruleset`), and nothing says so.
        let mut egress_recheck = tokio::time::interval(egress_nat::RECHECK);
        egress_recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the next store change may be applied (see APPLY_DUTY_FACTOR).
        let mut hold: Option<Instant> = None;
        // The revision of a state read directly for a waiting `connect`,
        // and when.
        let mut kicked: Option<(u64, Instant)> = None;
        // A service manager's watchdog hears from the loop itself: a loop
        // stuck in one of its steps is restarted.
        let watchdog = service::watchdog_period();
        let mut alive = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = alive.tick(), if watchdog.is_some() => service::alive(),
                _ = sigint.recv() => { log::info!("SIGINT: stopping"); return Ok(()); }
                _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); return Ok(()); }
                guard = logs.readable_mut() => {
                    let mut guard = guard.context("kernel log ring")?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                c = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                    connecting = None;
                    self.on_connected(&c).await;
                    connected = Some(c);
                }
                () = sleep_until(hold), if hold.is_some() => hold = None,
                event = next_store_event(connected.as_mut()), if connected.is_some() && hold.is_none() => {
                    let c = connected.as_ref().expect("guarded");
                    match event? {
                        // A state older than one read directly for a
                        // waiting `connect` meanwhile would take away what
                        // that one added; for a short while it is skipped
                        // (after that the follower is trusted again, even
                        // if the store's revisions started over).
                        StoreEvent::Changed(revision)
                            if kicked.is_some_and(|(rev, at)| {
                                revision < rev && at.elapsed() < KICK_PRECEDENCE
                            }) => {}
                        StoreEvent::Changed(_) => {
                            kicked = None;
                            let took = self.follow(c).await;
                            hold = Some(Instant::now() + apply_pause(took));
                            self.collect_abandoned(connected.as_ref()).await;
                        }
                        StoreEvent::Reregistered => {
                            // `ovl node rm` may have removed the node's
                            // record, key and all, while it was cut off.
                            if let Some(crypto) = &self.crypto {
                                crypto.publish_to(c.store.clone(), &self.node);
                            }
                            self.restore(&c.store).await;
                        }
                    }
                }
                Some(()) = kicks.recv() => {
                    // Someone waits for an endpoint: read the store now rather
                    // than at the follower's next event.
                    match &connected {
                        Some(c) => match c.store.load_keeping(self.state.as_ref()).await {
                            Ok(state) => {
                                kicked = Some((state.revision, Instant::now()));
                                self.apply_logged(state);
                            }
                            Err(e) => log::warn!("{e}"),
                        },
                        None => self.reapply(),
                    }
                }
                _ = probe.tick(), if connected.is_some() => {
                    self.sync_crypto();
                    let c = connected.as_mut().expect("guarded");
                    self.register_underlay(c, opts.lease_ttl).await;
                    let ok = c.store.ping().await.is_ok();
                    self.view.update(|l| {
                        l.store_reachable = ok;
                        if ok {
                            l.last_sync = Some(Instant::now());
                        }
                    });
                }
                Some(event) = links.recv() => {
                    // One look for a burst of notifications.
                    let underlay = Some(self.underlay.ifindex);
                    let mut underlay_deleted = event.deleted == underlay;
                    while let Ok(event) = links.try_recv() {
                        underlay_deleted |= event.deleted == underlay;
                    }
                    self.ifindexes.invalidate();
                    // The underlay's address, MAC or MTU may have changed,
                    // or the device itself.
                    self.follow_underlay(opts, underlay_deleted).await;
                    if let Some(c) = connected.as_mut() {
                        self.register_underlay(c, opts.lease_ttl).await;
                    }
                    self.next_hops.forget();
                    self.dns.links_changed();
                    self.reapply();
                    self.collect_abandoned(connected.as_ref()).await;
                }
                Some(()) = paths.recv() => {
                    while paths.try_recv().is_ok() {}
                    self.forget_next_hops("a route or underlay neighbour changed");
                }
                _ = next_hop_refresh.tick() => self.refresh_next_hops().await,
                _ = egress_recheck.tick() => egress_nat::recheck(),
                () = sleep_until(self.next_gc), if self.next_gc.is_some() => {
                    self.next_gc = None;
                    self.collect_abandoned(connected.as_ref()).await;
                }
            }
        }
    }

    /// Empties the data path's next-hop cache (`why` says what changed).
    fn forget_next_hops(&mut self, why: &str) {
        self.next_hops.forget();
        match self.dp.clear_next_hops() {
            Ok(0) => {}
            Ok(n) => log::debug!("{why}: forgot {n} cached next hop(s)"),
            Err(e) => log::warn!(
                "{why}, but the next-hop cache could not be emptied (entries expire within a second): {e:#}"
            ),
        }
    }

    /// Resolves the next hops the kernel routes for the data path, and
    /// keeps those it resolved fresh.
    async fn refresh_next_hops(&mut self) {
        match self.next_hops.refresh(&mut self.dp).await {
            Ok(done) => {
                if self.next_hops_failing {
                    log::info!("next-hop refresh works again");
                }
                self.next_hops_failing = false;
                if done.dropped > 0 {
                    log::debug!(
                        "{} next hop(s) no longer resolved: the kernel routes them",
                        done.dropped
                    );
                }
                if done.retired > 0 {
                    log::debug!(
                        "{} next hop(s) expired unused: their VTEPs' traffic stopped",
                        done.retired
                    );
                }
                if done.nudged > 0 {
                    log::debug!(
                        "{} stale underlay neighbour(s) in use marked used: the kernel checks them",
                        done.nudged
                    );
                }
            }
            Err(e) if !self.next_hops_failing => {
                self.next_hops_failing = true;
                log::warn!(
                    "next-hop refresh failed: {e:#}; the kernel routes encapsulated packets meanwhile (slower, not lost)"
                );
            }
            Err(_) => {}
        }
    }

    /// Deletes from the store the local endpoints whose container has
    /// been gone for longer than the grace, and plans the next look.
    async fn collect_abandoned(&mut self, connected: Option<&Connected>) {
        let (Some(c), Some(state)) = (connected, &self.state) else {
            return;
        };
        let ifindexes = &self.ifindexes;
        let (due, next) = self
            .collector
            .scan(state, &self.node, Instant::now(), &|name| {
                ifindexes.get(name)
            });
        self.next_gc = next;
        let mut view_outdated = false;
        for ep in due {
            let Location::Container {
                netns, host_ifname, ..
            } = &ep.location
            else {
                continue;
            };
            // Taking a container's address away is decided on what the
            // kernel says now, not on the agent's cache of link names.
            if !gc::abandoned(&ep, &crate::netlink::ifindex) {
                log::warn!(
                    "not collecting endpoint {} ({}) of {}: its veth {host_ifname} is there after all; the agent's view of this host's links was out of date and is read again",
                    ep.ip,
                    ep.name,
                    ep.network
                );
                view_outdated = true;
                continue;
            }
            // What the container left on this host goes first, while the
            // endpoint still says whose it was: an agent stopped before the
            // store change finds the endpoint again (without a veth now),
            // one stopped after it would find nothing to say whose they are.
            let pair_removed = match crate::attachment::remove_unmoved_pair(host_ifname).await {
                Ok(removed) => {
                    // Its names may be made again at once (the address
                    // given to the next container): never answered from
                    // before the removal.
                    if removed {
                        self.ifindexes.invalidate();
                    }
                    removed
                }
                Err(e) => {
                    log::warn!("collecting endpoint {} of {}: {e:#}", ep.ip, ep.network);
                    continue;
                }
            };
            // A namespace that lives on may have other networks' endpoints,
            // which use its resolv.conf. One made anew under the name of a
            // gone one is connected only once this endpoint has left.
            let namespace_gone = gc::namespace_gone(&ep);
            if namespace_gone && let Err(e) = crate::dns::resolv_conf::remove(netns) {
                log::warn!("collecting endpoint {} of {}: {e:#}", ep.ip, ep.network);
            }
            let around = crate::store::Around {
                ip: Some(ep.ip),
                ..crate::store::Around::container(&ep.network, &self.node, netns)
            };
            match c
                .store
                .update_with(crate::store::Scope::Endpoint(around), |s| {
                    Ok(gc::collect(s, &ep))
                })
                .await
            {
                Ok(true) => {
                    let why = if pair_removed {
                        format!(
                            "the attach of {netns} that registered it died before moving its veth into the container; removed the pair {host_ifname} it left"
                        )
                    } else if namespace_gone {
                        format!("its namespace {netns} is gone without a disconnect")
                    } else {
                        format!(
                            "the attach of {netns} that registered it died before making its veth"
                        )
                    };
                    log::warn!(
                        "collected endpoint {} ({}) of {}: {why}",
                        ep.ip,
                        ep.name,
                        ep.network
                    );
                    self.view.update(|l| l.collected_endpoints += 1);
                }
                Ok(false) => log::debug!(
                    "not collecting endpoint {} of {}: the store no longer holds it as found (disconnected, or {netns} connected anew)",
                    ep.ip,
                    ep.network
                ),
                Err(e) => log::warn!("collecting endpoint {} of {}: {e}", ep.ip, ep.network),
            }
        }
        if view_outdated {
            self.ifindexes.invalidate();
            self.reapply();
        }
    }

    /// First contact with the store (at start, or after starting without
    /// it): catch up with everything that changed meanwhile.
    async fn on_connected(&mut self, c: &Connected) {
        let state = c.updates.borrow().state.clone();
        if let Some(crypto) = &self.crypto {
            crypto.publish_to(c.store.clone(), &self.node);
        }
        self.view.update(|l| {
            l.store_reachable = true;
            l.last_sync = Some(Instant::now());
        });
        // Endpoints of this node the store lost while the agent was away
        // (its lease expired, say) go back first, then everything applies.
        self.restore(&c.store).await;
        // Nodes that died while no agent watched (this one included, before
        // it started) still hold endpoints: free them now.
        reconcile::free_nodes_found_dead(&c.store, &self.node, &state).await;
        let state = c
            .store
            .load_keeping(self.state.as_ref())
            .await
            .unwrap_or(state);

        let revision = state.revision;
        self.apply_logged(state);
        log::info!(
            "in step with {} at revision {}",
            c.store.describe(),
            revision
        );
    }
}

/// Opens the store (unless given), registers the node and follows the
/// state, retrying with jittered exponential backoff until it works.
async fn connect(
    store: Option<Arc<Store>>,
    url: String,
    node: String,
    vtep: std::net::Ipv4Addr,
    underlay_mtu: u32,
    ttl: Duration,
) -> Connected {
    let mut store = store;
    let attempt = || {
        let given = store.take();
        let url = url.clone();
        let node = node.clone();
        async move {
            let store = match given {
                Some(s) => s,
                None => Arc::new(open_store(&url).await?),
            };
            let registration = store
                .register_node(&node, vtep, underlay_mtu, ttl)
                .await
                .map_err(|e| anyhow!(e).context(format!("register node {node}")))?;
            let updates = store.subscribe().await?;
            Ok::<_, anyhow::Error>(Connected {
                reregistrations: registration.reregistrations(),
                _registration: registration,
                vtep,
                underlay_mtu,
                updates,
                store,
            })
        }
    };
    let retry = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times(),
        )
        .notify(|e, pause| log::warn!("store: {e:#}; retrying in {pause:?}"));
    retry.await.expect("retried without limit")
}

/// How long to leave store changes alone after an apply that took `took`.
fn apply_pause(took: Duration) -> Duration {
    (took * APPLY_DUTY_FACTOR).min(APPLY_MAX_PAUSE)
}

/// What the store told the agent.
enum StoreEvent {
    /// The followed state changed; it is at this revision now.
    Changed(u64),
    /// The node registered again after losing its liveness: peers may have
    /// freed its endpoints meanwhile.
    Reregistered,
}

/// The next thing the store has to say.
async fn next_store_event(c: Option<&mut Connected>) -> Result<StoreEvent> {
    let c = c.expect("only polled while connected");
    tokio::select! {
        changed = c.updates.changed() => {
            changed.context("store follower stopped")?;
            Ok(StoreEvent::Changed(c.updates.borrow_and_update().state.revision))
        }
        () = next_reregistration(&mut c.reregistrations) => Ok(StoreEvent::Reregistered),
    }
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Resolves at `at` (never when there is no `at`).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the node registered again after losing its liveness.
async fn next_reregistration(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        // Liveness is not tracked: nothing will ever change.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applying_store_changes_takes_at_most_a_twenty_fifth_of_a_core_within_a_bound() {
        // Small clusters: an apply of a fraction of a millisecond holds the
        // next one back by a few milliseconds.
        assert_eq!(
            apply_pause(Duration::from_micros(200)),
            Duration::from_millis(5)
        );
        // A 4 ms apply (ten thousand endpoints) leaves the core alone for
        // 100 ms: at most 4 % of it spent applying, whatever the churn.
        let took = Duration::from_millis(4);
        let pause = apply_pause(took);
        assert_eq!(pause, Duration::from_millis(100));
        assert!(took.as_secs_f64() / (took + pause).as_secs_f64() < 0.04);
        // Never more than half a second, however slow the apply.
        assert_eq!(apply_pause(Duration::from_secs(1)), APPLY_MAX_PAUSE);
    }

    #[test]
    fn an_apply_is_measured_in_cpu_time_not_in_time_spent_waiting() {
        let before = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(50));
        let slept = thread_cpu_time().saturating_sub(before);
        assert!(slept < Duration::from_millis(10), "sleeping cost {slept:?}");
        let before = thread_cpu_time();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let busy = thread_cpu_time().saturating_sub(before);
        assert!(busy > Duration::ZERO && busy <= start.elapsed(), "{busy:?}");
    }
}
