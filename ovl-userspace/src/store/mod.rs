//! Where the desired state lives. One interface, one file per backend:
//! the embedded file store (one machine) and etcd (a cluster). Commands
//! and agents go through `Store`, selected by a URL.
//!
//! `Store` is an enum rather than a trait object because its operations
//! are async and async trait methods cannot be called through `dyn`.

mod etcd;
mod file;
mod followed;
pub mod options;

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

pub use etcd::{
    EtcdStore, KEY_PREFIX, commits_looked_up as etcd_commits_looked_up,
    fail_overs as etcd_fail_overs,
};
pub use file::FileStore;
pub use followed::{ChangeLog, Changed, Dirty, EndpointChange, Followed, Part, catch_up};
pub use options::{EtcdAccess, StoreOptions, StoreUrl};
use tokio::sync::watch;

use crate::{
    model::{Endpoint, ModelError, State},
    ports::PublishedPort,
    release::{DEFAULT_ADDRESS_GRACE, GraceClock, RestoreOutcome},
};

/// What a change reads, and so the only part of the store it may change
/// (it may always create keys that do not exist yet). The narrower, the
/// cheaper: a change to one network never reads the others' endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every network record and every node: creating a network.
    Networks,
    /// One network, its endpoints and held-back addresses, and every node.
    Network(&'a str),
    /// One endpoint of a network and the keys that decide whether a change
    /// to it may commit: connecting or disconnecting a container. What it
    /// reads does not grow with the network (but for which addresses are
    /// taken, as bare keys, when it hands out an address).
    Endpoint(Around<'a>),
    /// Everything.
    All,
}

/// What [`Scope::Endpoint`] reads of network `network`: its record and
/// held-back addresses; the claim of `attachment` and of each of `names`
/// and, on the attachment's node, every claim of each of `ports`' host
/// ports;
/// the endpoint at `ip`; with `allocates`, which addresses are taken; and
/// every endpoint those claims point at, with their own claims. A claim a
/// change writes that this scope did not read is guarded as absent: if it
/// exists after all, the commit fails rather than overwrite it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Around<'a> {
    pub network: &'a str,
    /// The container's attachment: (node, namespace).
    pub attachment: Option<(&'a str, &'a str)>,
    /// An address the change asks for or looks at.
    pub ip: Option<Ipv4Addr>,
    /// The names the endpoint will hold.
    pub names: &'a [String],
    /// Whether the change picks a free address.
    pub allocates: bool,
    /// The ports the container publishes: the claims of each (on any
    /// address of the node) are read.
    pub ports: &'a [PublishedPort],
}

impl<'a> Around<'a> {
    /// An existing container endpoint, found by its attachment.
    pub fn container(network: &'a str, node: &'a str, netns: &'a str) -> Around<'a> {
        Around {
            network,
            attachment: Some((node, netns)),
            ip: None,
            names: &[],
            allocates: false,
            ports: &[],
        }
    }
}

/// Store failures. Each message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "unsupported store URL {0:?}: use file:///PATH (the embedded default), etcd://HOST:PORT[,HOST:PORT...] or etcds://... (TLS)"
    )]
    UnsupportedUrl(String),
    /// A store option (flag, environment or URL query) is wrong.
    #[error("{0}")]
    BadOption(String),
    #[error(
        "store lock {path} is held by {holder}; gave up after {waited:?}. If that process hangs, stop it"
    )]
    LockTimeout {
        path: PathBuf,
        waited: Duration,
        holder: String,
    },
    #[error(
        "node {0:?} is alive (its agent holds its lease); stop its agent first, or wait until its lease lapses"
    )]
    NodeAlive(String),
    #[error("{action} {path}: {cause}{}", io_hint(cause))]
    Io {
        action: &'static str,
        path: PathBuf,
        /// Shown in the message, not as a source: it would be said twice.
        cause: std::io::Error,
    },
    #[error(
        "store file {path} is not valid ovl state ({cause}); fix or move it aside — ovl will not overwrite it"
    )]
    Corrupt {
        path: PathBuf,
        /// Shown in the message, not as a source: it would be said twice.
        cause: serde_json::Error,
    },
    #[error(
        "store file {path} has schema version {found}, this ovl understands {supported}; upgrade ovl"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "etcd at {endpoints} is unreachable or failing ({detail}); check that it runs and the URL is right"
    )]
    Etcd { endpoints: String, detail: String },
    /// etcd answered, but refused who we are (TLS or authentication).
    #[error("etcd at {endpoints} refused the connection: {detail}")]
    EtcdAccess { endpoints: String, detail: String },
    /// etcd failed while committing a change, and whether the change was
    /// made cannot be told.
    #[error(
        "etcd failed while committing the change and cannot tell whether it was made ({cause}; {detail}); look at the store (ovl network ls / ovl network inspect) before running the command again"
    )]
    EtcdOutcomeUnknown { cause: String, detail: String },
    #[error(
        "the change needs {ops} operations in one etcd transaction, more than etcd's limit of {limit}; make it in smaller steps"
    )]
    TooLarge { ops: usize, limit: usize },
    /// A connect publishing too many ports for one transaction: unlike
    /// other changes, it cannot be made in steps.
    #[error(
        "publishing {ports} ports needs {ops} operations in one etcd transaction, more than etcd's limit of {limit}: with the etcd store a container publishes at most about {max} ports; publish fewer (a smaller -p range) or spread them over several containers",
        max = (limit - 8) / 2
    )]
    TooManyPorts {
        ports: usize,
        ops: usize,
        limit: usize,
    },
    #[error(
        "etcd key {key} holds a value ovl cannot read ({detail}); fix or delete it with etcdctl"
    )]
    EtcdValue { key: String, detail: String },
    #[error(
        "etcd key {key} holds a value of schema {found}, newer than this ovl's {supported}: a newer ovl wrote it; upgrade ovl (and leave the key alone)"
    )]
    EtcdNewer {
        key: String,
        found: u32,
        supported: u32,
    },
    #[error("gave up after {0} conflicting concurrent changes; try again")]
    Contended(u32),
    /// The change broke a rule of the model; nothing was written.
    #[error(transparent)]
    Rejected(#[from] ModelError),
}

/// The schema version a stored JSON object names, when it is newer than
/// this ovl's: a newer ovl may have changed more than this one can read,
/// and such a value is to be read by upgrading, never fixed or deleted.
pub(crate) fn newer_schema(bytes: &[u8]) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct Schema {
        schema: u32,
    }
    serde_json::from_slice::<Schema>(bytes)
        .ok()
        .map(|s| s.schema)
        .filter(|v| *v > crate::model::SCHEMA_VERSION)
}

/// What to do about a file store's I/O error, where that is clear.
fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "; the file store is changed as root (or as a user who may write its directory): run ovl with sudo, or give --store file:///a/directory/you/own"
        }
        std::io::ErrorKind::ReadOnlyFilesystem => {
            "; the store's file system is read-only: give --store a writable directory"
        }
        std::io::ErrorKind::StorageFull => "; the store's file system is full: free space",
        _ => "",
    }
}

/// A backend holding the `State`.
pub enum Store {
    File(FileStore),
    Etcd(Box<EtcdStore>),
}

/// Keeps an agent's node registered (and, with etcd, alive) while held.
pub enum Registration {
    /// The file store does not track liveness.
    File,
    /// The etcd lease behind `/ovl/alive/<node>`, kept alive by a thread.
    Etcd(etcd::Liveness),
}

impl Registration {
    /// Changes each time the node had to register again after losing its
    /// liveness; never changes where liveness is not tracked.
    pub fn reregistrations(&self) -> watch::Receiver<u64> {
        match self {
            Registration::File => watch::channel(0).1,
            Registration::Etcd(l) => l.reregistrations(),
        }
    }
}

impl Store {
    /// Opens the store a URL names (with its options: see
    /// [`options`]). For etcd, connects and checks that a request goes
    /// through, so a bad URL or credential fails here, naming the endpoint.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let url = StoreUrl::parse(url)?;
        let grace = url.options.address_grace.unwrap_or(DEFAULT_ADDRESS_GRACE);
        match url.scheme.as_str() {
            "file" => {
                let mut f = FileStore::new(&url.location).with_address_grace(grace);
                if let Some(t) = url.options.lock_timeout {
                    f = f.with_lock_timeout(t);
                }
                Ok(Store::File(f))
            }
            _ => Ok(Store::Etcd(Box::new(EtcdStore::connect(&url).await?))),
        }
    }

    /// The clock a change made now judges held-back addresses by: the
    /// wall clock and this store's `--address-grace`.
    pub fn grace_clock(&self) -> GraceClock {
        GraceClock::now(match self {
            Store::File(f) => f.address_grace(),
            Store::Etcd(e) => e.address_grace(),
        })
    }

    /// The current state, all of it.
    pub async fn load(&self) -> Result<State, StoreError> {
        self.load_in(Scope::All).await
    }

    /// The current state, all of it, for a reader that held `last`: what
    /// cannot be read keeps what `last` held for it, as it does for a
    /// follower ([`subscribe`](Self::subscribe)). In etcd that is a value;
    /// the file store is read whole or not at all, and a file gone (moved
    /// aside or deleted by hand: ovl never removes it) is no empty store
    /// until a change writes it anew.
    pub async fn load_keeping(&self, last: Option<&State>) -> Result<State, StoreError> {
        match (self, last) {
            (Store::Etcd(e), Some(last)) => e.list_keeping(last).await,
            (Store::File(f), Some(last)) => match blocking(|| f.load_present())? {
                Some(state) => Ok(state),
                None if last.revision > 0 => Ok(last.clone()),
                None => Ok(State::default()),
            },
            _ => self.load().await,
        }
    }

    /// The part of the state `scope` covers (the file store reads it all).
    pub async fn load_in(&self, scope: Scope<'_>) -> Result<State, StoreError> {
        match self {
            Store::File(f) => blocking(|| f.load()),
            Store::Etcd(e) => e.load(scope).await,
        }
    }

    /// Applies `change` to the part of the state `scope` covers and commits
    /// the result as one atomic step; concurrent writers never both win a
    /// conflicting change. When `change` fails nothing is written. (`Send`,
    /// so that servers running requests on any thread can change the state.)
    pub async fn update(
        &self,
        scope: Scope<'_>,
        change: &mut (dyn FnMut(&mut State) -> Result<(), ModelError> + Send),
    ) -> Result<State, StoreError> {
        match self {
            Store::File(f) => blocking(|| f.update(change)),
            Store::Etcd(e) => e.update(scope, change).await,
        }
    }

    /// Applies a change that produces a value, returning the value.
    pub async fn update_with<T: Send>(
        &self,
        scope: Scope<'_>,
        mut change: impl FnMut(&mut State) -> Result<T, ModelError> + Send,
    ) -> Result<T, StoreError> {
        let mut out = None;
        self.update(scope, &mut |s| {
            out = Some(change(s)?);
            Ok(())
        })
        .await?;
        Ok(out.expect("update succeeded, so the change ran and produced a value"))
    }

    /// Puts back `node`'s endpoints `wanted` that the store lost (peers
    /// freed them while the node was cut off), where their address is
    /// still free; returns what was restored and which addresses another
    /// endpoint holds now. Those conflicts are recorded under the node
    /// (`ovl node ls`), replacing what its previous attempt recorded. Any
    /// number of endpoints: etcd gets them in transactions within its limits.
    pub async fn restore_endpoints(
        &self,
        node: &str,
        wanted: &[Endpoint],
    ) -> Result<RestoreOutcome, StoreError> {
        match self {
            Store::File(f) => {
                let mut out = RestoreOutcome::default();
                blocking(|| {
                    f.update(&mut |s| {
                        out = s.restore_endpoints(node, wanted);
                        Ok(())
                    })
                })?;
                Ok(out)
            }
            Store::Etcd(e) => e.restore_endpoints(node, wanted).await,
        }
    }

    /// Registered nodes whose agent is not alive, where liveness is
    /// tracked (none elsewhere). An agent starting up frees what they hold
    /// with [`forget_dead_node`](Self::forget_dead_node).
    pub async fn dead_nodes(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Store::File(_) => Ok(Vec::new()),
            Store::Etcd(e) => e.dead_nodes().await,
        }
    }

    /// Removes node `name` from the store: its endpoints (their addresses
    /// held back like any freed address), its registration and recorded
    /// conflicts. Refused while the node is alive (etcd); with the file
    /// store, the caller checks that no agent runs for it. Returns the
    /// number of endpoints freed.
    pub async fn remove_node(&self, name: &str) -> Result<usize, StoreError> {
        crate::validate::node_name(name).map_err(ModelError::from)?;
        match self {
            Store::File(f) => {
                let mut n = 0;
                blocking(|| {
                    f.update(&mut |s| {
                        n = s.remove_node(name)?.len();
                        Ok(())
                    })
                })?;
                Ok(n)
            }
            Store::Etcd(e) => e.remove_node(name).await,
        }
    }

    /// Registers node `name` with VTEP `vtep` and its underlay's MTU; with
    /// etcd, also as alive under a lease of `ttl` that the returned
    /// registration keeps alive.
    pub async fn register_node(
        &self,
        name: &str,
        vtep: Ipv4Addr,
        underlay_mtu: u32,
        ttl: Duration,
    ) -> Result<Registration, StoreError> {
        match self {
            Store::File(f) => {
                blocking(|| {
                    f.update(&mut |s| {
                        crate::validate::node_name(name)?;
                        s.register_node(name, vtep, Some(underlay_mtu));
                        Ok(())
                    })
                })?;
                Ok(Registration::File)
            }
            Store::Etcd(e) => Ok(Registration::Etcd(
                e.register_node(name, vtep, underlay_mtu, ttl).await?,
            )),
        }
    }

    /// Publishes node `name`'s WireGuard public key and port in its node
    /// record, for peers to reach it on encrypted networks.
    pub async fn publish_node_key(
        &self,
        name: &str,
        key: crate::crypto::NodeKey,
    ) -> Result<(), StoreError> {
        match self {
            Store::File(f) => {
                let mut found = false;
                blocking(|| {
                    f.update(&mut |s| {
                        found = s.publish_node_key(name, key);
                        Ok(())
                    })
                })?;
                if found {
                    Ok(())
                } else {
                    Err(StoreError::Rejected(crate::model::ModelError::NoSuchNode(
                        name.to_owned(),
                    )))
                }
            }
            Store::Etcd(e) => e.publish_node_key(name, key).await,
        }
    }

    /// Frees what dead node `name` held (its endpoints, their addresses
    /// held back), unless it comes back meanwhile: deleted in batches that
    /// each check the node is still dead. Only meaningful where liveness is
    /// tracked.
    pub async fn forget_dead_node(&self, name: &str) -> Result<usize, StoreError> {
        match self {
            Store::File(_) => Ok(0),
            Store::Etcd(e) => e.forget_dead_node(name).await,
        }
    }

    /// Follows the state: the receiver always holds the latest state seen,
    /// with what changed in it since (see [`ChangeLog`]). The first state
    /// is loaded before this returns. Read errors later on keep the last
    /// state (the data path keeps forwarding) and retry.
    pub async fn subscribe(&self) -> Result<watch::Receiver<Followed>, StoreError> {
        match self {
            Store::File(f) => f.subscribe(),
            Store::Etcd(e) => e.subscribe().await,
        }
    }

    /// Checks that the store answers (health probes).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::File(f) => blocking(|| f.load()).map(|_| ()),
            Store::Etcd(e) => e.ping().await,
        }
    }

    /// A short description for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            Store::File(f) => f.describe(),
            Store::Etcd(e) => e.describe(),
        }
    }
}

/// Runs `work`, which may block (the file store waits for its lock, up to
/// its lock timeout, by sleeping), without holding up the runtime's other
/// tasks: on a multi-threaded runtime (the agent's) the worker hands its
/// tasks to another thread meanwhile. A current-thread runtime (one CLI
/// command) has no other task to hold up.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denied_file_store_says_so_once_and_what_to_do() {
        let e = anyhow::Error::from(StoreError::Io {
            action: "create store directory",
            path: "/var/lib/ovl".into(),
            cause: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        let text = format!("{e:#}");
        assert_eq!(text.matches("permission denied").count(), 1, "{text}");
        assert!(text.contains("sudo") && text.contains("--store"), "{text}");
    }

    #[test]
    fn changes_waiting_for_the_file_stores_lock_hold_up_no_other_task() {
        use std::{
            os::fd::AsRawFd,
            sync::{
                Arc,
                atomic::{AtomicUsize, Ordering},
                mpsc,
            },
        };
        let dir = crate::testutil::TestDir::new("store-wait");
        std::fs::create_dir_all(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let url = format!("file://{}?lock-timeout=30", dir.path().display());
        let store = Arc::new(rt.block_on(Store::open(&url)).unwrap());
        rt.block_on(store.update(Scope::All, &mut |_| Ok(())))
            .unwrap();
        // Another process's change holds the lock.
        let held = std::fs::File::open(dir.path().join("state.lock")).unwrap();
        // SAFETY: flock on a descriptor this test owns.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);

        // As many changes as the runtime has workers wait for it...
        let started = Arc::new(AtomicUsize::new(0));
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let (store, started) = (store.clone(), started.clone());
                rt.spawn(async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    store.update(Scope::All, &mut |_| Ok(())).await
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while started.load(Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the changes never ran"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // ...and another task still runs meanwhile.
        let (tx, rx) = mpsc::channel();
        rt.spawn(async move { tx.send(()) });
        let ran = rx.recv_timeout(Duration::from_secs(10)).is_ok();
        drop(held);
        for w in waiting {
            rt.block_on(w).unwrap().unwrap();
        }
        assert!(ran, "every worker was asleep waiting for the file lock");
    }

    #[test]
    fn an_unreadable_store_file_says_why_once_and_a_newer_one_asks_for_an_upgrade() {
        let dir = crate::testutil::TestDir::new("store-unreadable");
        std::fs::create_dir_all(dir.path()).unwrap();
        let store = FileStore::new(dir.path());
        let file = dir.path().join("state.json");
        std::fs::write(&file, b"{\"schema\": 1, \"revision\"").unwrap();
        let text = format!("{:#}", anyhow::Error::from(store.load().unwrap_err()));
        assert_eq!(text.matches("EOF while parsing").count(), 1, "{text}");
        assert!(text.contains("fix or move it aside"), "{text}");
        // A newer ovl's file, whatever else it changed: upgrade, do not
        // move it aside.
        std::fs::write(&file, b"{\"schema\": 2, \"networks\": []}").unwrap();
        let text = store.load().unwrap_err().to_string();
        assert!(
            text.contains("schema version 2") && text.contains("upgrade ovl"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn urls_select_backends_or_fail_clearly() {
        assert!(Store::open("file:///tmp/x").await.is_ok());
        for bad in [
            "file://relative",
            "/var/lib/ovl",
            "consul://h:1",
            "",
            "etcd://",
            "etcds://?cacert=/x",
        ] {
            let err = Store::open(bad)
                .await
                .err()
                .expect("must be refused")
                .to_string();
            assert!(
                err.contains("file:///PATH") && err.contains("etcd://"),
                "{err}"
            );
        }
    }
}
