//! Where the plugin finds ovl: the network, store, node, agent socket and
//! pin root, from the configuration, else the `OVL_*` variables, else the
//! defaults — the order in which ovl's commands resolve the same options.

use std::path::PathBuf;

use super::{error::CniError, types::NetConf};
use crate::{api, bpffs::DEFAULT_PIN_ROOT, store::Store};

/// The store `ovl` uses when none is named.
pub const DEFAULT_STORE: &str = "file:///var/lib/ovl";

/// The resolved options of one invocation.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The ovl network.
    pub network: String,
    pub store_url: String,
    pub node: String,
    pub api_socket: PathBuf,
    pub pin_root: PathBuf,
}

impl Settings {
    /// Resolves every option; `get` reads the environment.
    pub fn resolve(
        conf: &NetConf,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, CniError> {
        let env = |k: &str| get(k).filter(|v| !v.is_empty());
        let network = conf
            .network
            .clone()
            .or_else(|| conf.name.clone())
            .unwrap_or_default();
        let node = match conf.node.clone().or_else(|| env("OVL_NODE")) {
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .map_err(|e| {
                    CniError::config(format!(
                        "no \"node\" in the configuration and the hostname is unreadable ({e}); set \"node\""
                    ))
                })?,
        };
        if node.is_empty() {
            return Err(CniError::config("\"node\" is empty"));
        }
        let api_socket = conf
            .api_socket
            .clone()
            .or_else(|| env("OVL_API_SOCKET").map(PathBuf::from))
            .unwrap_or_else(|| api::default_socket(&node));
        Ok(Settings {
            network,
            store_url: conf
                .store
                .clone()
                .or_else(|| env("OVL_STORE"))
                .unwrap_or_else(|| DEFAULT_STORE.to_owned()),
            node,
            api_socket,
            pin_root: conf
                .pin_root
                .clone()
                .or_else(|| env("OVL_PIN_ROOT").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT)),
        })
    }

    /// Opens the store: a bad URL is an invalid configuration (7), an
    /// unreachable store a condition to retry (11).
    pub async fn open_store(&self) -> Result<Store, CniError> {
        Store::open(&self.store_url).await.map_err(CniError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_wins_over_environment_over_defaults() {
        let conf: NetConf = serde_json::from_str(r#"{"name":"uber-net","node":"host-a"}"#).unwrap();
        let env = |k: &str| match k {
            "OVL_NODE" => Some("from-env".to_owned()),
            "OVL_STORE" => Some("etcd://e:2379".to_owned()),
            _ => None,
        };
        let s = Settings::resolve(&conf, &env).unwrap();
        assert_eq!(s.network, "uber-net");
        assert_eq!(s.node, "host-a");
        assert_eq!(s.store_url, "etcd://e:2379");
        assert_eq!(s.api_socket, PathBuf::from("/run/ovl/host-a.sock"));
        assert_eq!(s.pin_root, PathBuf::from(DEFAULT_PIN_ROOT));

        let conf: NetConf =
            serde_json::from_str(r#"{"name":"cni-name","network":"uber-net"}"#).unwrap();
        let s = Settings::resolve(&conf, &|_| None).unwrap();
        assert_eq!(s.network, "uber-net");
        assert_eq!(s.store_url, DEFAULT_STORE);
    }
}
