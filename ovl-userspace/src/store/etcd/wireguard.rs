//! The WireGuard part of a node record: the key and port a node publishes
//! for encrypted networks, written by that node's agent only (like the
//! rest of its record), and kept when the node registers again.

use super::{
    EtcdStore,
    codec::{json, node_key, parse},
};
use crate::{crypto::NodeKey, model::Node, store::StoreError};

impl EtcdStore {
    /// The record of node `name`, if registered.
    pub(super) async fn node_record(&self, name: &str) -> Result<Option<Node>, StoreError> {
        let mut c = self.client();
        let key = node_key(name);
        let resp = self
            .call(c.member, "read node", c.get(key.as_str(), None))
            .await?;
        resp.kvs()
            .first()
            .map(|kv| parse::<Node>(&key, kv.value()))
            .transpose()
    }

    /// Publishes node `name`'s WireGuard key and port in its record.
    pub async fn publish_node_key(&self, name: &str, key: NodeKey) -> Result<(), StoreError> {
        let Some(mut node) = self.node_record(name).await? else {
            return Err(StoreError::Rejected(crate::model::ModelError::NoSuchNode(
                name.to_owned(),
            )));
        };
        node.wireguard = Some(key);
        let mut c = self.client();
        self.call(
            c.member,
            "publish node key",
            c.put(node_key(name), json(&node), None),
        )
        .await
        .map(|_| ())
    }
}
