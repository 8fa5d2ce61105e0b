//! Which ovl network a Docker network ID of this node is, and naming the
//! networks Docker creates: its CreateNetwork carries an ID but no name,
//! so the network is made under a provisional name and renamed as soon as
//! dockerd lists it.

use std::time::Duration;

use super::{Context, Known, protocol::Refusal};
use crate::{
    ipam::Subnet,
    model::{DockerPending, ModelError, Network, State},
    store::{Scope, Store, StoreError},
};

/// Provisional names start with this.
pub const PENDING_PREFIX: &str = "docker-pending-";
/// How long a new network is looked for in dockerd's list after its
/// CreateNetwork (Docker lists it right after our answer).
const NAMING_WAIT: Duration = Duration::from_secs(10);
const NAMING_POLL: Duration = Duration::from_millis(50);

/// The provisional name of a network Docker creates with `subnet`
/// (unique: subnets of networks made through Docker never overlap).
pub fn pending_name(subnet: &Subnet) -> String {
    format!("{PENDING_PREFIX}{}-{}", subnet.network(), subnet.prefix())
}

/// The subnet a provisional name stands for, as Docker writes it
/// (`198.18.0.0/24`).
pub fn pending_subnet(name: &str) -> Option<String> {
    let (network, prefix) = name.strip_prefix(PENDING_PREFIX)?.rsplit_once('-')?;
    Some(format!("{network}/{prefix}"))
}

/// The network being created by this node's dockerd under `docker_id`.
pub fn pending_of<'a>(state: &'a State, node: &str, docker_id: &str) -> Option<&'a Network> {
    state.networks.values().find(|n| {
        n.docker_pending
            .as_ref()
            .is_some_and(|p| p.node == node && p.network_id.as_deref() == Some(docker_id))
    })
}

/// The ovl network behind Docker network `docker_id` of this node, if it
/// is one; a network still under its provisional name is named first
/// when dockerd already lists it.
pub async fn resolve(
    ctx: &Context,
    store: &Store,
    docker_id: &str,
) -> Result<Option<Network>, Refusal> {
    let state = store.load().await?;
    if let Some(k) = ctx.known(docker_id)
        && let Some(n) = state.networks.get(&k.name).filter(|n| n.vni.get() == k.vni)
    {
        return Ok(Some(n.clone()));
    }
    if let Some(pending) = pending_of(&state, &ctx.node, docker_id) {
        let pending = pending.clone();
        return Ok(Some(match name(ctx, store, &pending, docker_id).await {
            Ok(Some(named)) => named,
            Ok(None) => pending,
            Err(why) => {
                log::warn!("{why}");
                pending
            }
        }));
    }
    let Some(docker) = ctx.engine.network(docker_id).await? else {
        return Ok(None);
    };
    let found = state
        .networks
        .get(&docker.name)
        .filter(|n| docker.subnet() == first_subnet(n).as_deref());
    if let Some(n) = found {
        ctx.remember(docker_id, Known::of(n));
    }
    Ok(found.cloned())
}

/// The first subnet of `n`, as Docker shows the first of a network's.
pub fn first_subnet(n: &Network) -> Option<String> {
    n.subnets.first().map(|p| p.subnet.to_string())
}

/// Renames `pending` after the Docker network `docker_id` if dockerd lists
/// it; returns the renamed network, or `None` while dockerd does not list
/// it yet. An error says why the name cannot be taken (another ovl network
/// has it, say); the provisional name keeps working meanwhile.
pub async fn name(
    ctx: &Context,
    store: &Store,
    pending: &Network,
    docker_id: &str,
) -> Result<Option<Network>, String> {
    let docker = match ctx.engine.network(docker_id).await {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(None),
        Err(e) => {
            log::debug!("naming {}: {e}", pending.name);
            return Ok(None);
        }
    };
    let expected = pending.docker_pending.clone();
    let renamed = store
        .update_with(Scope::All, |s| {
            let current = s.network(&pending.name)?;
            if current.vni != pending.vni || current.docker_pending != expected {
                // Renamed or replaced meanwhile: nothing to do.
                return Err(ModelError::NoSuchNetwork(pending.name.clone()));
            }
            s.rename_network(&pending.name, &docker.name).cloned()
        })
        .await;
    match renamed {
        Ok(n) => {
            ctx.remember(docker_id, Known::of(&n));
            ctx.nudge.notify_one();
            log::info!(
                "Docker network {} ({}) is ovl network {} (VNI {}, subnets {})",
                docker.name,
                short(docker_id),
                n.name,
                n.vni,
                n.subnets_text()
            );
            Ok(Some(n))
        }
        Err(StoreError::Rejected(ModelError::NoSuchNetwork(_))) => Ok(None),
        Err(e) => Err(format!(
            "Docker network {} ({}) keeps the ovl name {}: {e}",
            docker.name,
            short(docker_id),
            pending.name
        )),
    }
}

/// Names the network Docker is creating under `docker_id` as soon as
/// dockerd lists it (right after CreateNetwork is answered).
pub async fn name_soon(ctx: std::sync::Arc<Context>, docker_id: String) {
    let Ok(store) = ctx.store.get().await else {
        return;
    };
    let deadline = tokio::time::Instant::now() + NAMING_WAIT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(NAMING_POLL).await;
        let Ok(state) = store.load().await else {
            continue;
        };
        let Some(pending) = pending_of(&state, &ctx.node, &docker_id).cloned() else {
            return; // named, or removed
        };
        match name(&ctx, &store, &pending, &docker_id).await {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(why) => {
                // Waiting will not change it; the reconcile loop says it again.
                log::error!("{why}");
                return;
            }
        }
    }
}

/// Marks `pending` as the network of `docker_id`.
pub fn bind(pending: &mut Network, node: &str, docker_id: &str) {
    pending.docker_pending = Some(DockerPending {
        node: node.to_owned(),
        network_id: Some(docker_id.to_owned()),
    });
}

/// The first 12 characters of a Docker ID, as Docker prints it.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisional_names_are_valid_ovl_names() {
        let n = pending_name(&"198.18.0.0/24".parse().unwrap());
        assert_eq!(n, "docker-pending-198.18.0.0-24");
        assert_eq!(pending_subnet(&n).as_deref(), Some("198.18.0.0/24"));
        assert_eq!(pending_subnet("uber-net"), None);
        let mut s = State::default();
        s.create_network(crate::model::NetworkSpec::new(
            &n,
            "198.18.0.0/24".parse().unwrap(),
        ))
        .unwrap();
    }
}
