//! The commands of the encrypting path, asked of the node's agent (the
//! only holder of the node's private key): `ovl node rotate-key` and
//! `ovl stats --crypto`.

use std::path::Path;

use anyhow::{Result, anyhow};

use super::stats::CryptoReport;
use crate::api::{self, ClientError, Rotated};

fn no_agent(e: ClientError, node: &str) -> anyhow::Error {
    match e {
        ClientError::NoAgent(socket) => anyhow!(
            "no ovl agent answers on {} — the node's key lives with its agent: start `ovl attach IFACE --node {node}` first",
            socket.display()
        ),
        other => other.into(),
    }
}

/// `ovl node rotate-key`: a new key pair for this node, published for its
/// peers; the old one keeps answering until they have switched.
pub async fn rotate_key(api_socket: &Path, node: &str) -> Result<String> {
    let r: Rotated = api::Client::new(api_socket)
        .post("/v1/crypto/rotate")
        .await
        .map_err(|e| no_agent(e, node))?;
    Ok(format!(
        "node {node} now has WireGuard key {}; peers switch to it as they read it from the store, the old key answers until then",
        r.public_key
    ))
}

/// `ovl stats --crypto`: this node's WireGuard identity, peers and
/// counters.
pub async fn stats(api_socket: &Path, node: &str, json: bool) -> Result<String> {
    let report: CryptoReport = api::Client::new(api_socket)
        .get("/v1/crypto")
        .await
        .map_err(|e| no_agent(e, node))?;
    if json {
        return Ok(serde_json::to_string_pretty(&report).expect("report serialises"));
    }
    Ok(report.to_string())
}
