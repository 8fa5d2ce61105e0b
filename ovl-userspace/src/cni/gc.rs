//! GC (spec 1.1): releases this node's CNI attachments on the network that
//! the runtime no longer lists in `cni.dev/valid-attachments`. Endpoints of
//! other front ends (`ovl connect`, Docker) and other nodes are never
//! touched. Keeps going past failures and reports them all.

use std::collections::BTreeSet;

use super::{
    del,
    env::{self, OWNER_PREFIX},
    error::{CniError, Code},
    settings::Settings,
    types::NetConf,
};
use crate::attachment;

/// GC of this node's attachments on the network.
pub async fn gc(conf: &NetConf, s: &Settings) -> Result<(), CniError> {
    // Without the list every attachment would look stale: refuse.
    let valid: BTreeSet<String> = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| {
            CniError::config("GC needs \"cni.dev/valid-attachments\", the attachments still in use")
        })?
        .iter()
        .map(|a| env::owner(&a.container_id, &a.ifname))
        .collect();
    let store = s.open_store().await?;
    let ours = attachment::owned(&store, &s.node, &s.network, OWNER_PREFIX)
        .await
        .map_err(|e| CniError::from_failure(&e))?;
    let mut failures = Vec::new();
    let mut worst = Code::Internal;
    for ep in ours {
        let owner = ep.owner.clone().unwrap_or_default();
        if valid.contains(&owner) {
            continue;
        }
        match del::release(&store, s, &ep).await {
            Ok(()) => log::info!("GC released {owner} ({}) on network {}", ep.ip, s.network),
            Err(e) => {
                if e.code == Code::TryAgainLater {
                    worst = Code::TryAgainLater;
                }
                failures.push(format!("{owner} ({}): {}", ep.ip, e.details));
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            worst,
            format!("could not release {}", failures.join("; ")),
        ))
    }
}
