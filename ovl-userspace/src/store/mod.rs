//! Where the desired state lives. One interface, one file per backend:
//! the embedded file store (one machine) and etcd (a cluster). Commands
//! and agents go through `Store`, selected by a URL.
//!
//! `Store` is an enum rather than a trait object because its operations
//! are async and async trait methods cannot be called through `dyn`.

mod etcd;
mod file;

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

pub use etcd::{EtcdStore, KEY_PREFIX};
pub use file::FileStore;
use tokio::sync::watch;

use crate::model::{ModelError, State};

/// Store failures. Each message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "unsupported store URL {0:?}: use file:///PATH (the embedded default) or etcd://HOST:PORT[,HOST:PORT...]"
    )]
    UnsupportedUrl(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "store file {path} is not valid ovl state ({source}); fix or move it aside — ovl will not overwrite it"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
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
    #[error(
        "etcd key {key} holds a value ovl cannot read ({detail}); fix or delete it with etcdctl"
    )]
    EtcdValue { key: String, detail: String },
    #[error("gave up after {0} conflicting concurrent changes; try again")]
    Contended(u32),
    /// The change broke a rule of the model; nothing was written.
    #[error(transparent)]
    Rejected(#[from] ModelError),
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
    /// Opens the store a URL names. For etcd, connects and checks that a
    /// request goes through, so a bad URL fails here, naming the endpoint.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        match url.split_once("://") {
            Some(("file", path)) if path.starts_with('/') => Ok(Store::File(FileStore::new(path))),
            Some(("etcd", hosts)) if !hosts.is_empty() => {
                Ok(Store::Etcd(Box::new(EtcdStore::connect(hosts).await?)))
            }
            _ => Err(StoreError::UnsupportedUrl(url.to_owned())),
        }
    }

    /// The current state.
    pub async fn load(&self) -> Result<State, StoreError> {
        match self {
            Store::File(f) => f.load(),
            Store::Etcd(e) => e.load().await,
        }
    }

    /// Applies `change` to the current state and commits the result as one
    /// atomic step; concurrent writers never both win a conflicting change.
    /// When `change` fails nothing is written. (`Send`, so that servers
    /// running requests on any thread can change the state.)
    pub async fn update(
        &self,
        change: &mut (dyn FnMut(&mut State) -> Result<(), ModelError> + Send),
    ) -> Result<State, StoreError> {
        match self {
            Store::File(f) => f.update(change),
            Store::Etcd(e) => e.update(change).await,
        }
    }

    /// Applies a change that produces a value, returning the value.
    pub async fn update_with<T: Send>(
        &self,
        mut change: impl FnMut(&mut State) -> Result<T, ModelError> + Send,
    ) -> Result<T, StoreError> {
        let mut out = None;
        self.update(&mut |s| {
            out = Some(change(s)?);
            Ok(())
        })
        .await?;
        Ok(out.expect("update succeeded, so the change ran and produced a value"))
    }

    /// Registers node `name` with VTEP `vtep`; with etcd, also as alive
    /// under a lease of `ttl` that the returned registration keeps alive.
    pub async fn register_node(
        &self,
        name: &str,
        vtep: Ipv4Addr,
        ttl: Duration,
    ) -> Result<Registration, StoreError> {
        match self {
            Store::File(f) => {
                f.update(&mut |s| {
                    s.register_node(name, vtep);
                    Ok(())
                })?;
                Ok(Registration::File)
            }
            Store::Etcd(e) => Ok(Registration::Etcd(e.register_node(name, vtep, ttl).await?)),
        }
    }

    /// Frees what dead node `name` held (its endpoints), unless it came
    /// back meanwhile. Only meaningful where liveness is tracked.
    pub async fn forget_dead_node(&self, name: &str) -> Result<usize, StoreError> {
        match self {
            Store::File(_) => Ok(0),
            Store::Etcd(e) => e.forget_dead_node(name).await,
        }
    }

    /// Follows the state: the receiver always holds the latest state seen.
    /// The first state is loaded before this returns. Read errors later on
    /// keep the last state (the data path keeps forwarding) and retry.
    pub async fn subscribe(&self) -> Result<watch::Receiver<State>, StoreError> {
        match self {
            Store::File(f) => f.subscribe(),
            Store::Etcd(e) => e.subscribe().await,
        }
    }

    /// Checks that the store answers (health probes).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::File(f) => f.load().map(|_| ()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_select_backends_or_fail_clearly() {
        assert!(Store::open("file:///tmp/x").await.is_ok());
        for bad in [
            "file://relative",
            "/var/lib/ovl",
            "consul://h:1",
            "",
            "etcd://",
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
