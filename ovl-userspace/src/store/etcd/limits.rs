//! The cluster's capacity limits under concurrency: a change that ends
//! near a limit (`capacity::GUARD_MARGIN`) commits only if nothing of that
//! kind was created since it read, so racing changes that each fit cannot
//! pass the limit together. Far from a limit nothing is added: changes to
//! different networks never wait for each other.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp};

use super::codec::{ENDPOINTS, NETWORKS};
use crate::{capacity, model::State};

/// Compares to add to the commit turning `old` into `new` (encoded, read
/// at `revision`), whose result is `after`.
pub fn guards(
    revision: i64,
    old: &BTreeMap<String, Vec<u8>>,
    new: &BTreeMap<String, Vec<u8>>,
    after: &State,
) -> Vec<Compare> {
    let creates = |prefix: &str| {
        new.keys()
            .any(|k| k.starts_with(prefix) && !old.contains_key(k))
    };
    let none_created_since = |prefix: &str| {
        Compare::create_revision(prefix, CompareOp::Less, revision + 1).with_prefix()
    };
    let mut out = Vec::new();
    if creates(ENDPOINTS) && capacity::near_endpoint_limit(after) {
        out.push(none_created_since(ENDPOINTS));
    }
    if creates(NETWORKS) && capacity::near_network_limit(after) {
        out.push(none_created_since(NETWORKS));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str]) -> BTreeMap<String, Vec<u8>> {
        list.iter()
            .map(|k| (k.to_string(), b"{}".to_vec()))
            .collect()
    }

    #[test]
    fn only_changes_that_create_near_a_limit_are_guarded() {
        let old = keys(&["/ovl/networks/a", "/ovl/endpoints/a/198.18.0.2"]);
        let connect = keys(&[
            "/ovl/networks/a",
            "/ovl/endpoints/a/198.18.0.2",
            "/ovl/endpoints/a/198.18.0.3",
        ]);
        let disconnect = keys(&["/ovl/networks/a"]);
        let mut after = State::default();
        assert!(guards(7, &old, &connect, &after).is_empty(), "far from it");
        after.endpoints_elsewhere = capacity::ENDPOINTS - 1;
        assert_eq!(guards(7, &old, &connect, &after).len(), 1);
        assert!(guards(7, &old, &disconnect, &after).is_empty(), "frees");
        assert!(guards(7, &old, &old, &after).is_empty(), "creates nothing");
        let create = keys(&[
            "/ovl/networks/a",
            "/ovl/networks/b",
            "/ovl/endpoints/a/198.18.0.2",
        ]);
        let crowded = State {
            networks: (0..capacity::NETWORKS)
                .map(|i| (format!("n{i}"), dummy_network(i)))
                .collect(),
            ..State::default()
        };
        assert_eq!(guards(7, &old, &create, &crowded).len(), 1);
        assert!(guards(7, &old, &create, &State::default()).is_empty());
    }

    fn dummy_network(i: usize) -> crate::model::Network {
        crate::model::Network {
            name: format!("n{i}"),
            vni: crate::model::Vni::try_from(1 + i as u32).expect("small VNIs are valid"),
            subnets: Vec::new(),
            mtu: 1450,
            internal: false,
            encrypted: false,
            aux_addresses: Default::default(),
            docker_pending: None,
            kept_vnis: Vec::new(),
        }
    }
}
