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
    let valid = valid_owners(conf)?;
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

/// The owners of the attachments the runtime lists as still in use. An
/// empty list (or `null`: no live sandbox) keeps none; without the key
/// every attachment would look stale, so GC is refused.
fn valid_owners(conf: &NetConf) -> Result<BTreeSet<String>, CniError> {
    Ok(conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| {
            CniError::config("GC needs \"cni.dev/valid-attachments\", the attachments still in use")
        })?
        .iter()
        .map(|a| env::owner(&a.container_id, &a.ifname))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: &str) -> NetConf {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn gc_keeps_the_listed_attachments_and_none_for_an_empty_or_null_list() {
        let listed = conf(
            r#"{"name":"n","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        );
        assert_eq!(
            valid_owners(&listed).unwrap(),
            BTreeSet::from([env::owner("c1", "eth0")])
        );
        let empty = conf(r#"{"name":"n","cni.dev/valid-attachments":[]}"#);
        assert_eq!(valid_owners(&empty).unwrap(), BTreeSet::new());
        // libcni encodes a nil Go slice (no live sandbox) as null.
        let null = conf(r#"{"name":"n","cni.dev/valid-attachments":null}"#);
        assert_eq!(valid_owners(&null).unwrap(), BTreeSet::new());
    }

    #[test]
    fn gc_without_the_list_is_refused_as_invalid_config() {
        let e = valid_owners(&conf(r#"{"name":"n"}"#)).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.details.contains("cni.dev/valid-attachments"), "{e}");
    }
}
