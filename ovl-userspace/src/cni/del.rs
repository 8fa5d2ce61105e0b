//! DEL: releases the attachment (veth and address) if it still exists.
//! Idempotent, as the spec requires: a DEL of something already gone, or
//! of a container whose namespace is gone, succeeds.

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
        log::info!("DEL {owner}: nothing attached on network {}", s.network);
        return Ok(());
    };
    release(&store, s, &ep).await
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
