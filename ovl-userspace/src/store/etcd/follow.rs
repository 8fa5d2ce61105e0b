//! Following the state: list once, then watch from the listed revision and
//! apply each event to the decoded state in place (nothing is decoded
//! twice). A lost watch (etcd restart, compaction, lost leader) means a
//! fresh list, retried with jittered exponential backoff.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use etcd_client::{EventType, WatchOptions};
use tokio::sync::watch;

use super::{
    EtcdStore, KEY_PREFIX, Range,
    codec::{apply, decode},
};
use crate::{
    model::State,
    store::{Followed, StoreError},
};

impl EtcdStore {
    /// Lists, then watches from the listed revision, publishing every
    /// change with the part it touched; re-lists after a compaction, a
    /// cancelled watch or an etcd outage (keeping the last state
    /// meanwhile), and publishes a re-listed state as whole.
    pub async fn subscribe(&self) -> Result<watch::Receiver<Followed>, StoreError> {
        let first = self.list_all().await?;
        let (tx, rx) = watch::channel(Followed::whole(first));
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                let from = tx.borrow().state.revision;
                match store.follow(from, &tx).await {
                    Ok(()) => return, // every receiver is gone
                    // Its readers went as the watch broke (a stopping
                    // agent drops the connection the watch runs on):
                    // nothing to warn about, nobody to follow for.
                    Err(_) if tx.is_closed() => return,
                    Err(e) => log::warn!("{e}; keeping the last known state and re-listing"),
                }
                // A value that cannot be read keeps what it was read as
                // before, as it would have, had the watch delivered it.
                let last = tx.borrow().state.clone();
                let relist = (|| store.list_keeping(&last))
                    .retry(
                        ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(200))
                            .with_max_delay(Duration::from_secs(5))
                            .with_jitter()
                            .without_max_times(),
                    )
                    .when(|_| !tx.is_closed())
                    .notify(|e, pause| log::debug!("{e}; listing again in {pause:?}"));
                match relist.await {
                    Ok(state) => {
                        log::info!(
                            "resynchronised with {} at revision {}",
                            store.describe(),
                            state.revision
                        );
                        if tx.send(Followed::whole(state)).is_err() {
                            return;
                        }
                    }
                    Err(_) => return, // every receiver is gone
                }
            }
        });
        Ok(rx)
    }

    /// Everything under `/ovl/`, decoded.
    async fn list_all(&self) -> Result<State, StoreError> {
        Ok(self
            .read(&[Range::Prefix(KEY_PREFIX.into())])
            .await?
            .state())
    }

    /// Everything under `/ovl/`, decoded for a reader that held `last`
    /// (see [`decode`]).
    pub async fn list_keeping(&self, last: &State) -> Result<State, StoreError> {
        let snap = self.read(&[Range::Prefix(KEY_PREFIX.into())]).await?;
        let kvs = snap
            .kvs
            .iter()
            .map(|(k, (v, _))| (k.as_str(), v.as_slice()));
        Ok(decode(snap.revision, kvs, Some(last)))
    }

    /// Applies watch events from revision `from + 1` on to the published
    /// state until the watch fails or every receiver is gone.
    async fn follow(&self, from: u64, tx: &watch::Sender<Followed>) -> Result<(), StoreError> {
        let mut c = self.client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from as i64 + 1);
        let mut stream = self
            .call(c.member, "watch /ovl/", c.watch(KEY_PREFIX, Some(opts)))
            .await?;
        let broken = |detail: String| StoreError::Etcd {
            endpoints: self.describe(),
            detail,
        };
        loop {
            let msg = tokio::select! {
                // Readers gone first: their going may be what breaks the
                // stream.
                biased;
                _ = tx.closed() => return Ok(()),
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                // The member went away (or cancelled the stream): the
                // watch starts again on the next one.
                Ok(None) => {
                    self.members.fail_over(c.member).await;
                    return Err(broken(self.members.naming(c.member, "watch stream ended")));
                }
                Err(e) => {
                    self.members.fail_over(c.member).await;
                    let what = self.members.naming(c.member, "watch");
                    return Err(broken(format!("{what}: {e}")));
                }
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                return Err(broken(format!(
                    "watch cancelled ({}compacted to revision {})",
                    if resp.cancel_reason().is_empty() {
                        String::new()
                    } else {
                        format!("{}; ", resp.cancel_reason())
                    },
                    resp.compact_revision()
                )));
            }
            if resp.events().is_empty() {
                continue;
            }
            let revision = resp.header().map_or(0, |h| h.revision()).max(0) as u64;
            tx.send_modify(|Followed { state, changes }| {
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key());
                    let part = match ev.event_type() {
                        EventType::Put => apply(state, &key, Some(kv.value())),
                        EventType::Delete => apply(state, &key, None),
                    };
                    let at = kv.mod_revision().max(0) as u64;
                    // Marked at the response's revision, never before the
                    // event's: a reader in between copies the part once
                    // more, none misses it.
                    changes.touch(part, at.max(revision));
                    state.revision = state.revision.max(at);
                }
                state.revision = state.revision.max(revision);
            });
        }
    }
}
