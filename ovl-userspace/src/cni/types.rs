//! The CNI wire documents ovl reads and writes, as the spec (1.0.0/1.1.0,
//! section 5 and section 2's GC input) defines them: plain serde types.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The request configuration on stdin: the spec's keys and ovl's own.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Absent means 0.1.0 (the key predates 0.2.0).
    #[serde(default)]
    pub cni_version: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "type")]
    pub plugin_type: Option<String>,

    /// The ovl network [default: `name`].
    #[serde(default)]
    pub network: Option<String>,
    /// Store URL, as `ovl --store` [default: `OVL_STORE`, then file:///var/lib/ovl].
    #[serde(default)]
    pub store: Option<String>,
    /// This node's name [default: `OVL_NODE`, then the hostname].
    #[serde(default)]
    pub node: Option<String>,
    /// The node agent's API socket [default: `OVL_API_SOCKET`, then /run/ovl/<node>.sock].
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// bpffs pin root [default: `OVL_PIN_ROOT`, then /sys/fs/bpf/ovl].
    #[serde(default)]
    pub pin_root: Option<PathBuf>,

    /// Well-known: passed through into the ADD result.
    #[serde(default)]
    pub dns: Option<Dns>,
    /// Well-known: ovl does no masquerading, so only `false` is accepted.
    #[serde(default)]
    pub ip_masq: Option<bool>,
    /// Capability arguments the runtime filled in (`ips`, `portMappings`).
    #[serde(default)]
    pub runtime_config: Option<RuntimeConfig>,
    /// The previous plugin's result (ADD in a chain, CHECK, DEL), kept as
    /// JSON so it can be passed on unchanged.
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// GC's list of attachments that are still valid: `None` only when
    /// the key is absent; `null` (libcni's encoding of a nil Go slice, when
    /// no sandbox is live) is an empty list.
    #[serde(
        default,
        rename = "cni.dev/valid-attachments",
        deserialize_with = "null_as_empty"
    )]
    pub valid_attachments: Option<Vec<GcAttachment>>,

    /// Every other key, checked by [`NetConf::unsupported_key`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// A present key's list, `null` read as an empty one (serde calls this only
/// for a present key; `default` makes an absent one `None`).
fn null_as_empty<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default()))
}

/// Keys the spec defines or runtimes insert that ovl reads nothing from.
const IGNORED_KEYS: [&str; 3] = ["capabilities", "args", "cniVersions"];

impl NetConf {
    /// The first key ovl does not understand, with its value. A typo such
    /// as `"stroe"` would otherwise silently select the default store.
    pub fn unsupported_key(&self) -> Option<(String, String)> {
        if self.ip_masq == Some(true) {
            return Some(("ipMasq".into(), "true".into()));
        }
        self.other
            .iter()
            .find(|(k, _)| !IGNORED_KEYS.contains(&k.as_str()) && !k.starts_with("cni.dev/"))
            .map(|(k, v)| (k.clone(), v.to_string()))
    }
}

/// `runtimeConfig`: capability arguments.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// The `ips` capability: addresses the runtime asks for, in CIDR form.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The `portMappings` capability (CNI conventions): ports to publish.
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    /// The `mac` capability (CNI conventions): the container's MAC.
    #[serde(default)]
    pub mac: Option<String>,
}

/// One entry of the `portMappings` capability, as the conventions (and
/// the reference `portmap` plugin) read it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u32,
    pub container_port: u32,
    /// `tcp` or `udp` [default: tcp].
    #[serde(default)]
    pub protocol: String,
    /// The host address to publish on [default: every address].
    #[serde(default, rename = "hostIP")]
    pub host_ip: String,
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub struct GcAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The ADD success result (section 5), without `cniVersion`, which the
/// output adds for the negotiated version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AddResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

/// An interface an attachment created.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The container's netns path; absent for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// An address an attachment assigned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR form, e.g. `198.18.0.2/24`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// Spec 0.3.x/0.4.0 only: the IP version ("4"); gone in 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A route an attachment created.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// CIDR form.
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

/// DNS settings (configuration and result).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// True when nothing is set (the result then omits `dns`).
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.as_deref().is_none_or(str::is_empty)
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// The error result (section 5): on stdout, with a non-zero exit.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResult {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

/// The VERSION result.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionResult {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_ovl_keys_and_finds_unknown_ones() {
        let c: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"n","type":"ovl","store":"etcd://h:1",
                "capabilities":{"ips":true},"cni.dev/foo":1,"stroe":"x"}"#,
        )
        .unwrap();
        assert_eq!(c.store.as_deref(), Some("etcd://h:1"));
        assert_eq!(
            c.unsupported_key(),
            Some(("stroe".to_owned(), "\"x\"".to_owned()))
        );
        let c: NetConf = serde_json::from_str(r#"{"name":"n","ipMasq":true}"#).unwrap();
        assert_eq!(c.unsupported_key().unwrap().0, "ipMasq");
        let c: NetConf =
            serde_json::from_str(r#"{"name":"n","ipMasq":false,"args":{"cni":{}}}"#).unwrap();
        assert_eq!(c.unsupported_key(), None);
    }

    #[test]
    fn result_omits_what_is_unset() {
        let r = AddResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                sandbox: Some("/run/netns/x".into()),
                ..Interface::default()
            }],
            ips: vec![IpConfig {
                address: "198.18.0.2/24".into(),
                interface: Some(0),
                ..IpConfig::default()
            }],
            ..AddResult::default()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],"ips":[{"address":"198.18.0.2/24","interface":0}]}"#
        );
    }
}
