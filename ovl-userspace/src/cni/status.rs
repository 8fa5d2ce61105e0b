//! STATUS (spec 1.1): whether this node can serve ADD — the store answers,
//! the network exists and has a free address, and the node's agent runs
//! (without it new containers are registered but not forwarded).

use super::{
    error::{CniError, Code},
    settings::Settings,
};
use crate::{api, bpffs, model::ModelError};

/// STATUS: `Ok` when ADD can be served.
pub async fn status(s: &Settings) -> Result<(), CniError> {
    let unavailable = |details: String| CniError::new(Code::NotAvailable, details);
    let store = s.open_store().await.map_err(|e| match e.code {
        Code::InvalidConfig => e,
        _ => unavailable(format!("the store is unusable: {}", e.details)),
    })?;
    let mut state = store
        .load()
        .await
        .map_err(|e| unavailable(format!("the store is unreadable: {e}")))?;
    // ADD's own question, held-back addresses and all.
    state.clock = store.grace_clock();
    match state.free_address(&s.network) {
        Ok(_) => {}
        Err(e @ ModelError::NoSuchNetwork(_)) => return Err(unavailable(e.to_string())),
        Err(e) => return Err(unavailable(format!("network {}: {e}", s.network))),
    }
    match api::Client::new(&s.api_socket)
        .get::<api::Health>("/v1/health")
        .await
    {
        Ok(h) if h.store.reachable => Ok(()),
        Ok(_) => Err(unavailable(format!(
            "the agent of node {} cannot reach the store: new containers are not forwarded until it does",
            s.node
        ))),
        Err(api::ClientError::NoAgent(_)) => {
            let pinned = bpffs::node_dir(&s.pin_root, &s.node)
                .is_ok_and(|d| d.join(bpffs::LINKS_DIR).is_dir());
            if pinned {
                Err(unavailable(format!(
                    "no ovl agent answers on {}: containers attached earlier keep forwarding, new ones are not forwarded until `ovl attach` runs on node {}",
                    s.api_socket.display(),
                    s.node
                )))
            } else {
                Err(CniError::new(
                    Code::NotAvailableLimitedConnectivity,
                    format!(
                        "no ovl agent answers on {} and node {} has no data path under {}: containers here have no connectivity until `ovl attach` runs",
                        s.api_socket.display(),
                        s.node,
                        s.pin_root.display()
                    ),
                ))
            }
        }
        Err(e) => Err(unavailable(format!("the agent did not answer: {e}"))),
    }
}
