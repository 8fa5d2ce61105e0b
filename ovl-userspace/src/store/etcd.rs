//! The etcd v3 store: the state as versioned JSON values under `/ovl/`,
//! changed by compare-and-swap transactions, followed by list + watch, and
//! node liveness as a lease that the agent keeps alive.
//!
//! Key schema (every value is JSON with a `schema` field):
//!
//! | key | value |
//! |---|---|
//! | `/ovl/schema` | `1`, the layout version |
//! | `/ovl/networks/<name>` | the network: name, vni, subnet, mtu |
//! | `/ovl/vnis/<vni>` | `{"network": name}`: the VNI's owner, so two networks never share one |
//! | `/ovl/endpoints/<network>/<ipv4>` | the endpoint: name, ip, mac, location; the key makes an address unique |
//! | `/ovl/nodes/<name>` | the node and its VTEP address (kept after it dies) |
//! | `/ovl/alive/<name>` | present while the node's agent holds its lease |

use std::{collections::BTreeMap, future::Future, net::Ipv4Addr, time::Duration};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::{oneshot, watch};

use super::StoreError;
use crate::model::{Endpoint, ModelError, Network, Node, SCHEMA_VERSION, State};

/// Every ovl key starts with this.
pub const KEY_PREFIX: &str = "/ovl/";
const SCHEMA_KEY: &str = "/ovl/schema";
const NETWORKS: &str = "/ovl/networks/";
const VNIS: &str = "/ovl/vnis/";
const ENDPOINTS: &str = "/ovl/endpoints/";
const NODES: &str = "/ovl/nodes/";
const ALIVE: &str = "/ovl/alive/";

/// Bound on every unary request, so an unreachable etcd fails a command
/// instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Conflicting concurrent transactions are retried this often.
const MAX_ATTEMPTS: u32 = 64;
/// Pause before re-listing after etcd failed.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    schema: u32,
    #[serde(flatten)]
    value: T,
}

#[derive(Serialize, Deserialize)]
struct VniOwner {
    network: String,
}

#[derive(Serialize, Deserialize)]
struct AliveRecord {
    vtep: Ipv4Addr,
}

/// Keys with their values and mod revisions, as of one etcd revision.
#[derive(Clone, Default)]
struct Snapshot {
    revision: i64,
    kvs: BTreeMap<String, (Vec<u8>, i64)>,
}

/// A connection to an etcd cluster holding ovl's state.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// The comma-separated `host:port` list it was opened with.
    hosts: String,
}

/// Keeps `/ovl/alive/<node>` alive; dropping it stops the keep-alives, and
/// the lease then expires after its TTL (a clean agent restart within the
/// TTL keeps the node's endpoints).
///
/// The keep-alives run on a thread of their own, over a connection of their
/// own: the agent's loop blocks while it attaches programs (each attach
/// waits for the RTNL lock, seconds in all when dozens of containers start
/// at once), and a lease must not lapse — and peers free the node's
/// endpoints — because the node was busy.
pub struct Liveness {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    epochs: watch::Receiver<u64>,
}

impl Liveness {
    /// Changes each time the lease was lost and the node registered again;
    /// peers may have freed the node's endpoints meanwhile.
    pub fn reregistrations(&self) -> watch::Receiver<u64> {
        self.epochs.clone()
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        // The thread stops at its next await; the lease is left to expire.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn json<T: Serialize>(value: T) -> Vec<u8> {
    serde_json::to_vec(&Versioned {
        schema: SCHEMA_VERSION,
        value,
    })
    .expect("model values serialise")
}

fn parse<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let v: Versioned<T> = serde_json::from_slice(bytes).map_err(|e| StoreError::EtcdValue {
        key: key.to_owned(),
        detail: e.to_string(),
    })?;
    if v.schema > SCHEMA_VERSION {
        return Err(StoreError::EtcdValue {
            key: key.to_owned(),
            detail: format!(
                "schema {} is newer than this ovl's {SCHEMA_VERSION}; upgrade ovl",
                v.schema
            ),
        });
    }
    Ok(v.value)
}

/// The keys and values the state's networks and endpoints are stored as
/// (nodes are written by their agents, not through `update`).
fn encode(state: &State) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for n in state.networks.values() {
        out.insert(format!("{NETWORKS}{}", n.name), json(n));
        out.insert(
            format!("{VNIS}{}", n.vni),
            json(VniOwner {
                network: n.name.clone(),
            }),
        );
    }
    for e in &state.endpoints {
        out.insert(endpoint_key(&e.network, e.ip), json(e));
    }
    out
}

fn endpoint_key(network: &str, ip: Ipv4Addr) -> String {
    format!("{ENDPOINTS}{network}/{ip}")
}

/// Rebuilds the state from a snapshot. A value that cannot be read is
/// logged and skipped: one bad key must not take a node's data path down.
fn decode(snap: &Snapshot) -> State {
    let mut state = State {
        revision: snap.revision.max(0) as u64,
        ..State::default()
    };
    let mut alive = std::collections::BTreeSet::new();
    for (key, (value, _)) in &snap.kvs {
        let result = if key.starts_with(NETWORKS) {
            parse::<Network>(key, value).map(|n| {
                state.networks.insert(n.name.clone(), n);
            })
        } else if key.starts_with(ENDPOINTS) {
            parse::<Endpoint>(key, value).map(|e| state.endpoints.push(e))
        } else if key.starts_with(NODES) {
            parse::<Node>(key, value).map(|n| {
                state.nodes.insert(n.name.clone(), n);
            })
        } else if let Some(name) = key.strip_prefix(ALIVE) {
            alive.insert(name.to_owned());
            Ok(())
        } else {
            Ok(())
        };
        if let Err(e) = result {
            log::error!("{e}");
        }
    }
    state.alive = Some(alive);
    state
}

impl EtcdStore {
    /// Connects to `hosts` ("h1:2379,h2:2379") and checks that etcd answers.
    pub async fn connect(hosts: &str) -> Result<EtcdStore, StoreError> {
        for h in hosts.split(',') {
            if !is_host_port(h.trim()) {
                return Err(StoreError::UnsupportedUrl(format!(
                    "etcd://{hosts} (endpoint {h:?} is not HOST:PORT)"
                )));
            }
        }
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(|h| format!("http://{}", h.trim()))
            .collect();
        let describe = format!("etcd://{hosts}");
        let fail = |detail: String| StoreError::Etcd {
            endpoints: describe.clone(),
            detail,
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client =
            tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(&endpoints, Some(options)))
                .await
                .map_err(|_| fail("connect timed out".into()))?
                .map_err(|e| fail(e.to_string()))?;
        let store = EtcdStore {
            client,
            hosts: hosts.to_owned(),
        };
        store.ensure_schema().await?;
        Ok(store)
    }

    /// `etcd://host:port,...`.
    pub fn describe(&self) -> String {
        format!("etcd://{}", self.hosts)
    }

    async fn call<T, F>(&self, what: &str, fut: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Etcd {
                endpoints: self.describe(),
                detail: format!("{what}: {e}"),
            }),
            Err(_) => Err(StoreError::Etcd {
                endpoints: self.describe(),
                detail: format!("{what}: timed out"),
            }),
        }
    }

    async fn ensure_schema(&self) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(SCHEMA_KEY, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(SCHEMA_KEY, SCHEMA_VERSION.to_string(), None)])
            .or_else([TxnOp::get(SCHEMA_KEY, None)]);
        let resp = self.call("check the schema key", c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(());
        }
        for r in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(g) = r {
                if let Some(kv) = g.kvs().first() {
                    let found: u32 = kv.value_str().unwrap_or("0").trim().parse().unwrap_or(0);
                    if found > SCHEMA_VERSION {
                        return Err(StoreError::EtcdValue {
                            key: SCHEMA_KEY.into(),
                            detail: format!(
                                "layout version {found} is newer than this ovl's {SCHEMA_VERSION}; upgrade ovl"
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    async fn list(&self) -> Result<Snapshot, StoreError> {
        let mut c = self.client.clone();
        let resp = self
            .call(
                "list /ovl/",
                c.get(KEY_PREFIX, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    (kv.value().to_vec(), kv.mod_revision()),
                )
            })
            .collect();
        Ok(Snapshot { revision, kvs })
    }

    /// Checks that etcd answers: one read of the schema key.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        self.call("read the schema key", c.get(SCHEMA_KEY, None))
            .await
            .map(|_| ())
    }

    /// The current state.
    pub async fn load(&self) -> Result<State, StoreError> {
        Ok(decode(&self.list().await?))
    }

    /// Optimistic concurrency: read at revision R, apply `change`, and
    /// commit only if no key the change touches (nor the network its new
    /// endpoints join, nor the endpoints of a network it removes) changed
    /// since R; otherwise read again and retry. New keys must not exist,
    /// which is what makes VNIs and addresses unique across racing hosts.
    pub async fn update(
        &self,
        change: &mut (dyn FnMut(&mut State) -> Result<(), ModelError> + Send),
    ) -> Result<State, StoreError> {
        for attempt in 0..MAX_ATTEMPTS {
            let snap = self.list().await?;
            let before = decode(&snap);
            let mut after = before.clone();
            change(&mut after)?;
            let (old, new) = (encode(&before), encode(&after));
            let mod_rev = |k: &str| snap.kvs.get(k).map(|(_, r)| *r).unwrap_or(0);
            let mut compares = Vec::new();
            let mut ops = Vec::new();
            for (key, value) in &new {
                match old.get(key) {
                    Some(v) if v == value => continue,
                    Some(_) => compares.push(Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        mod_rev(key),
                    )),
                    None => {
                        compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0))
                    }
                }
                ops.push(TxnOp::put(key.as_str(), value.clone(), None));
                if let Some(rest) = key.strip_prefix(ENDPOINTS) {
                    let network = rest.split('/').next().unwrap_or_default();
                    let net_key = format!("{NETWORKS}{network}");
                    if old.contains_key(&net_key) && new.get(&net_key) == old.get(&net_key) {
                        compares.push(Compare::mod_revision(
                            net_key.as_str(),
                            CompareOp::Equal,
                            mod_rev(&net_key),
                        ));
                    }
                }
            }
            for key in old.keys().filter(|k| !new.contains_key(*k)) {
                compares.push(Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    mod_rev(key),
                ));
                ops.push(TxnOp::delete(key.as_str(), None));
                if let Some(network) = key.strip_prefix(NETWORKS) {
                    // No endpoint may have joined since we saw it empty.
                    let prefix = format!("{ENDPOINTS}{network}/");
                    compares.push(
                        Compare::create_revision(
                            prefix.as_str(),
                            CompareOp::Less,
                            snap.revision + 1,
                        )
                        .with_prefix(),
                    );
                }
            }
            if ops.is_empty() {
                return Ok(after);
            }
            let mut c = self.client.clone();
            let resp = self
                .call("commit", c.txn(Txn::new().when(compares).and_then(ops)))
                .await?;
            if resp.succeeded() {
                after.revision = resp.header().map(|h| h.revision()).unwrap_or(0).max(0) as u64;
                return Ok(after);
            }
            // Lost a race: back off a little (more with every retry) and
            // redo the change against what the winner wrote.
            let pause = 2 + u64::from(attempt) * 3 + u64::from(std::process::id() % 7);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        Err(StoreError::Contended(MAX_ATTEMPTS))
    }

    /// Records the node and its liveness lease; a thread of its own keeps
    /// the lease alive and re-creates it (and the alive key) if it was lost.
    pub async fn register_node(
        &self,
        name: &str,
        vtep: Ipv4Addr,
        ttl: Duration,
    ) -> Result<Liveness, StoreError> {
        let mut c = self.client.clone();
        let node = Node {
            name: name.to_owned(),
            vtep,
        };
        self.call(
            "register node",
            c.put(format!("{NODES}{name}"), json(&node), None),
        )
        .await?;
        let ttl_secs = ttl.as_secs().max(1) as i64;
        let lease = self.grant_alive(name, vtep, ttl_secs).await?;
        let (tx, epochs) = watch::channel(0);
        let (stop, stopped) = oneshot::channel::<()>();
        let hosts = self.hosts.clone();
        let name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name("ovl-liveness".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        log::error!("liveness of node {name}: cannot start a runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        () = Self::keep_alive(&hosts, &name, vtep, ttl_secs, lease, tx) => {}
                    }
                });
            })
            .map_err(|e| StoreError::Etcd {
                endpoints: self.describe(),
                detail: format!("start the keep-alive thread: {e}"),
            })?;
        Ok(Liveness {
            stop: Some(stop),
            thread: Some(thread),
            epochs,
        })
    }

    async fn grant_alive(
        &self,
        name: &str,
        vtep: Ipv4Addr,
        ttl_secs: i64,
    ) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let lease = self
            .call("grant lease", c.lease_grant(ttl_secs, None))
            .await?
            .id();
        let put = c.put(
            format!("{ALIVE}{name}"),
            json(AliveRecord { vtep }),
            Some(PutOptions::new().with_lease(lease)),
        );
        self.call("mark node alive", put).await?;
        Ok(lease)
    }

    /// The liveness thread's work: its own connection (whose I/O runs on
    /// this thread), then keep-alives for `lease` forever, granting a new
    /// lease (and telling the agent) if the old one expired meanwhile.
    async fn keep_alive(
        hosts: &str,
        name: &str,
        vtep: Ipv4Addr,
        ttl_secs: i64,
        mut lease: i64,
        epochs: watch::Sender<u64>,
    ) {
        let store = loop {
            match EtcdStore::connect(hosts).await {
                Ok(s) => break s,
                Err(e) => log::debug!("keep-alive of node {name}: {e}"),
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        };
        let period = Duration::from_millis((ttl_secs as u64 * 1000 / 3).max(300));
        loop {
            if let Err(e) = store.hold_lease(lease, period).await {
                log::debug!("keep-alive of node {name}: {e}");
            }
            // The stream broke: etcd is down, or the lease is gone (expired
            // while we were cut off). Only the second needs a new lease.
            if store.lease_expired(lease).await {
                log::warn!("lease of node {name} expired; registering the node again");
                match store.grant_alive(name, vtep, ttl_secs).await {
                    Ok(l) => {
                        lease = l;
                        epochs.send_modify(|e| *e += 1);
                    }
                    Err(e) => log::warn!("{e}"),
                }
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Sends keep-alives for `lease` every `period` until the stream fails.
    async fn hold_lease(&self, lease: i64, period: Duration) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let (mut keeper, mut responses) =
            self.call("keep-alive", c.lease_keep_alive(lease)).await?;
        loop {
            self.call("keep-alive", keeper.keep_alive()).await?;
            match self.call("keep-alive reply", responses.message()).await? {
                Some(r) if r.ttl() > 0 => tokio::time::sleep(period).await,
                _ => return Ok(()),
            }
        }
    }

    /// True when etcd says `lease` no longer exists (false when it cannot
    /// be asked: an unreachable etcd is not an expired lease).
    async fn lease_expired(&self, lease: i64) -> bool {
        let mut c = self.client.clone();
        match self
            .call("lease TTL", c.lease_time_to_live(lease, None))
            .await
        {
            Ok(r) => r.ttl() <= 0,
            Err(StoreError::Etcd { detail, .. }) => detail.contains("lease not found"),
            Err(_) => false,
        }
    }

    /// Deletes the endpoints of node `name` if it is still not alive.
    pub async fn forget_dead_node(&self, name: &str) -> Result<usize, StoreError> {
        let snap = self.list().await?;
        let state = decode(&snap);
        let gone: Vec<String> = state
            .endpoints
            .iter()
            .filter(|e| e.node() == Some(name))
            .map(|e| endpoint_key(&e.network, e.ip))
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let mut compares = vec![Compare::create_revision(
            format!("{ALIVE}{name}"),
            CompareOp::Equal,
            0,
        )];
        compares.extend(gone.iter().map(|k| {
            Compare::mod_revision(
                k.as_str(),
                CompareOp::Equal,
                snap.kvs.get(k).map(|(_, r)| *r).unwrap_or(0),
            )
        }));
        let ops: Vec<TxnOp> = gone
            .iter()
            .map(|k| TxnOp::delete(k.as_str(), None))
            .collect();
        let mut c = self.client.clone();
        let resp = self
            .call(
                "free a dead node's endpoints",
                c.txn(Txn::new().when(compares).and_then(ops)),
            )
            .await?;
        Ok(if resp.succeeded() { gone.len() } else { 0 })
    }

    /// Lists, then watches from the listed revision, publishing every
    /// change; re-lists after a compaction, a cancelled watch or an etcd
    /// outage (keeping the last state meanwhile).
    pub async fn subscribe(&self) -> Result<watch::Receiver<State>, StoreError> {
        let snap = self.list().await?;
        let (tx, rx) = watch::channel(decode(&snap));
        let store = self.clone();
        tokio::spawn(async move {
            let mut snap = snap;
            loop {
                match store.follow(&mut snap, &tx).await {
                    Ok(()) => return, // every receiver is gone
                    Err(e) => log::warn!("{e}; keeping the last known state and retrying"),
                }
                loop {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    if tx.is_closed() {
                        return;
                    }
                    match store.list().await {
                        Ok(s) => {
                            snap = s;
                            let _ = tx.send(decode(&snap));
                            log::info!(
                                "resynchronised with {} at revision {}",
                                store.describe(),
                                snap.revision
                            );
                            break;
                        }
                        Err(e) => log::debug!("{e}"),
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Applies watch events to `snap` until the watch fails or every
    /// receiver is gone.
    async fn follow(
        &self,
        snap: &mut Snapshot,
        tx: &watch::Sender<State>,
    ) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(snap.revision + 1);
        let mut stream = self
            .call("watch /ovl/", c.watch(KEY_PREFIX, Some(opts)))
            .await?;
        let broken = |detail: String| StoreError::Etcd {
            endpoints: self.describe(),
            detail,
        };
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tx.closed() => return Ok(()),
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return Err(broken("watch stream ended".into())),
                Err(e) => return Err(broken(format!("watch: {e}"))),
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                return Err(broken(format!(
                    "watch cancelled (compacted to revision {}); re-listing",
                    resp.compact_revision()
                )));
            }
            if resp.events().is_empty() {
                continue;
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match ev.event_type() {
                    EventType::Put => {
                        snap.kvs
                            .insert(key, (kv.value().to_vec(), kv.mod_revision()));
                    }
                    EventType::Delete => {
                        snap.kvs.remove(&key);
                    }
                }
                snap.revision = snap.revision.max(kv.mod_revision());
            }
            if let Some(h) = resp.header() {
                snap.revision = snap.revision.max(h.revision());
            }
            if tx.send(decode(snap)).is_err() {
                return Ok(());
            }
        }
    }
}

/// `host:port` with a plausible host and a numeric port.
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_[]:".contains(c))
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoints_must_be_host_and_port() {
        for good in [
            "192.0.2.1:2379",
            "etcd-1.example:2379",
            "[2001:db8::1]:2379",
        ] {
            assert!(super::is_host_port(good), "{good}");
        }
        for bad in [
            "not a url",
            "192.0.2.1",
            "192.0.2.1:0",
            ":2379",
            "h:port",
            "h/x:1",
        ] {
            assert!(!super::is_host_port(bad), "{bad}");
        }
    }

    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    fn snapshot_of(state: &State) -> Snapshot {
        let kvs = encode(state)
            .into_iter()
            .map(|(k, v)| (k, (v, 1)))
            .collect();
        Snapshot { revision: 1, kvs }
    }

    #[test]
    fn state_survives_encode_and_decode() {
        let mut s = State::default();
        s.create_network(NetworkSpec {
            name: "blue".into(),
            subnet: "198.18.0.0/24".parse().unwrap(),
            vni: None,
            mtu: None,
        })
        .unwrap();
        s.add_container(ContainerSpec {
            network: "blue".into(),
            node: "a".into(),
            netns: "c1".into(),
            name: None,
            ip: None,
            owner: None,
        })
        .unwrap();
        let back = decode(&snapshot_of(&s));
        assert_eq!(back.networks, s.networks);
        assert_eq!(back.endpoints, s.endpoints);
        assert_eq!(back.alive, Some(Default::default()));
    }

    #[test]
    fn keys_follow_the_documented_schema() {
        let mut s = State::default();
        s.create_network(NetworkSpec {
            name: "blue".into(),
            subnet: "198.18.0.0/24".parse().unwrap(),
            vni: Some(4242),
            mtu: None,
        })
        .unwrap();
        s.add_static(
            "blue",
            Ipv4Addr::new(198, 18, 0, 9),
            None,
            Ipv4Addr::new(192, 0, 2, 5),
            None,
        )
        .unwrap();
        let keys: Vec<String> = encode(&s).into_keys().collect();
        assert_eq!(
            keys,
            [
                "/ovl/endpoints/blue/198.18.0.9",
                "/ovl/networks/blue",
                "/ovl/vnis/4242"
            ]
        );
        let v: serde_json::Value =
            serde_json::from_slice(&encode(&s)["/ovl/networks/blue"]).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["vni"], 4242);
    }

    #[test]
    fn unreadable_values_are_skipped_not_fatal() {
        let mut snap = Snapshot::default();
        snap.kvs
            .insert("/ovl/networks/bad".into(), (b"{nope".to_vec(), 1));
        snap.kvs.insert("/ovl/alive/a".into(), (b"{}".to_vec(), 1));
        let s = decode(&snap);
        assert!(s.networks.is_empty());
        assert!(s.alive.unwrap().contains("a"));
    }
}
