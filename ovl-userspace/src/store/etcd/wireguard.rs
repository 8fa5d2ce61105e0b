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
        let key = node_key(name);
        let resp = self
            .repeatable("read node", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
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
        // The node's record, written by its agent alone: a second copy
        // changes nothing.
        self.repeatable("publish node key", |mut c| {
            let (key, record) = (node_key(name), json(&node));
            async move { c.put(key, record, None).await }
        })
        .await
        .map(|_| ())
    }
}
