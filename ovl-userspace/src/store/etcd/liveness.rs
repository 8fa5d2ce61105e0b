//! Node liveness in etcd: `/ovl/alive/<node>` under a lease that a thread
//! of its own keeps alive, granting a new one when the old one lapsed.

use std::{net::Ipv4Addr, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::{oneshot, watch};

use super::{
    EtcdStore, RETRY_PAUSE,
    codec::{AliveRecord, alive_key, json, node_key},
};
use crate::{
    model::Node,
    store::{StoreError, StoreUrl},
};

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

impl EtcdStore {
    /// Records the node and its liveness lease; a thread of its own keeps
    /// the lease alive and re-creates it (and the alive key) if it was lost.
    pub async fn register_node(
        &self,
        name: &str,
        vtep: Ipv4Addr,
        underlay_mtu: u32,
        ttl: Duration,
    ) -> Result<Liveness, StoreError> {
        crate::validate::node_name(name).map_err(crate::model::ModelError::from)?;
        // The key the node published survives re-registration (its agent
        // restarting, say): peers keep reaching it meanwhile.
        let wireguard = self.node_record(name).await?.and_then(|n| n.wireguard);
        let node = Node {
            name: name.to_owned(),
            vtep,
            underlay_mtu: Some(underlay_mtu),
            wireguard,
        };
        // The node's record, written by its agent alone: a second copy
        // changes nothing.
        self.repeatable("register node", |mut c| {
            let (key, record) = (node_key(name), json(&node));
            async move { c.put(key, record, None).await }
        })
        .await?;
        let ttl_secs = ttl.as_secs().max(1) as i64;
        let lease = self.grant_alive(&node, ttl_secs).await?;
        // What a re-registration puts back if `ovl node rm` removed the
        // record meanwhile; the agent publishes its key again itself.
        let node = Node {
            wireguard: None,
            ..node
        };
        let (tx, epochs) = watch::channel(0);
        let (stop, stopped) = oneshot::channel::<()>();
        let url = self.url.clone();
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
                        () = Self::keep_alive(&url, &node, ttl_secs, lease, tx) => {}
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

    /// Grants a lease and puts `node`'s alive key under it, and its record
    /// unless there is one: after the node's lease lapsed, `ovl node rm`
    /// may have removed it, and peers find a node's VTEP there.
    async fn grant_alive(&self, node: &Node, ttl_secs: i64) -> Result<i64, StoreError> {
        // A lease granted twice: the one not used lapses, holding nothing.
        let lease = self
            .repeatable("grant lease", |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await?
            .id();
        let alive = TxnOp::put(
            alive_key(&node.name),
            json(AliveRecord { vtep: node.vtep }),
            Some(PutOptions::new().with_lease(lease)),
        );
        let txn = Txn::new()
            .when([Compare::create_revision(
                node_key(&node.name),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(node_key(&node.name), json(node), None),
                alive.clone(),
            ])
            .or_else([alive]);
        // Puts (the record only if absent): a second copy changes nothing.
        let resp = self
            .repeatable("mark node alive", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            log::warn!(
                "node {} had been removed from the store (`ovl node rm`) while its lease \
                 had lapsed; registered it again",
                node.name
            );
        }
        Ok(lease)
    }

    /// The liveness thread's work: its own connection (whose I/O runs on
    /// this thread), then keep-alives for `lease` forever, granting a new
    /// lease (and telling the agent) if the old one expired meanwhile.
    async fn keep_alive(
        url: &StoreUrl,
        node: &Node,
        ttl_secs: i64,
        mut lease: i64,
        epochs: watch::Sender<u64>,
    ) {
        let name = &node.name;
        let store = (|| EtcdStore::connect(url))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(RETRY_PAUSE)
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .without_max_times(),
            )
            .notify(|e, pause| log::debug!("keep-alive of node {name}: {e}; again in {pause:?}"))
            .await
            .expect("retried without limit");
        let period = Duration::from_millis((ttl_secs as u64 * 1000 / 3).max(300));
        loop {
            if let Err(e) = store.hold_lease(lease, period).await {
                log::debug!("keep-alive of node {name}: {e}");
            }
            // The stream broke: etcd is down, or the lease is gone (expired
            // while we were cut off). Only the second needs a new lease.
            if store.lease_expired(lease).await {
                log::warn!("lease of node {name} expired; registering the node again");
                match store.grant_alive(node, ttl_secs).await {
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
        let mut c = self.client();
        let (mut keeper, mut responses) = self
            .call(c.member, "keep-alive", c.lease_keep_alive(lease))
            .await?;
        loop {
            self.call(c.member, "keep-alive", keeper.keep_alive())
                .await?;
            match self
                .call(c.member, "keep-alive reply", responses.message())
                .await?
            {
                Some(r) if r.ttl() > 0 => tokio::time::sleep(period).await,
                _ => return Ok(()),
            }
        }
    }

    /// True when etcd says `lease` no longer exists (false when it cannot
    /// be asked: an unreachable etcd is not an expired lease).
    async fn lease_expired(&self, lease: i64) -> bool {
        let mut c = self.client();
        match self
            .call(c.member, "lease TTL", c.lease_time_to_live(lease, None))
            .await
        {
            Ok(r) => r.ttl() <= 0,
            Err(StoreError::Etcd { detail, .. }) => detail.contains("lease not found"),
            Err(_) => false,
        }
    }
}
