//! DEL: releases the attachment (veth and address) if it still exists.
//! Idempotent, as the spec requires: a DEL of something already gone, or
//! of a container whose namespace is gone, succeeds. The container's
//! interface goes even when the store lost the endpoint's record: the spec
//! asks DEL to release all it can.

use super::{env::Invocation, error::CniError, settings::Settings};
use crate::{attachment, model::ModelError, store::StoreError};

/// DEL of the invocation's attachment.
pub async fn del(inv: &Invocation, s: &Settings) -> Result<(), CniError> {
    // An unreachable store fails the DEL (code 11): succeeding would leave
    // the address held with nobody left to release it.
    let store = s.open_store().await?;
    let owner = inv.owner();
    let found = attachment::find_owned(&store, &s.node, &s.network, &owner)
        .await
        .map_err(|e| CniError::from_failure(&e))?;
    let Some(ep) = found else {
        return del_unrecorded(inv, s, &store).await;
    };
    release(&store, s, &ep).await
}

/// DEL of an attachment the store has no record of: its interface, if
/// the container still has one that ovl made
/// ([`attachment::remove_unrecorded_link`]).
async fn del_unrecorded(
    inv: &Invocation,
    s: &Settings,
    store: &crate::store::Store,
) -> Result<(), CniError> {
    let owner = inv.owner();
    let Some(netns) = inv.netns.as_deref() else {
        log::info!("DEL {owner}: nothing attached on network {}", s.network);
        return Ok(());
    };
    match attachment::remove_unrecorded_link(store, &s.network, netns, &inv.ifname).await {
        Ok(Some(host_end)) => {
            log::warn!(
                "DEL {owner}: the store has no endpoint for it on network {}, but {} in {netns} was ovl's: removed it (host end {host_end})",
                s.network,
                inv.ifname
            );
            Ok(())
        }
        Ok(None) => {
            log::info!("DEL {owner}: nothing attached on network {}", s.network);
            Ok(())
        }
        Err(e) => Err(CniError::from_failure(&e.context(format!(
            "DEL {owner}: remove {} of {netns}, which the store has no endpoint for",
            inv.ifname
        )))),
    }
}

/// Removes the veth (if still there) and the endpoint of `ep`; an endpoint
/// that went away meanwhile counts as released.
pub async fn release(
    store: &crate::store::Store,
    s: &Settings,
    ep: &crate::model::Endpoint,
) -> Result<(), CniError> {
    let crate::model::Location::Container { netns, .. } = &ep.location else {
        return Ok(());
    };
    match attachment::detach(store, &s.node, &s.network, netns).await {
        Ok(_) => Ok(()),
        Err(e) if gone(&e) => Ok(()),
        Err(e) => Err(CniError::from_failure(&e)),
    }
}

fn gone(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StoreError>(),
            Some(StoreError::Rejected(
                ModelError::NotConnected { .. } | ModelError::NoSuchNetwork(_)
            ))
        ) || matches!(
            c.downcast_ref::<ModelError>(),
            Some(ModelError::NotConnected { .. } | ModelError::NoSuchNetwork(_))
        )
    })
}
