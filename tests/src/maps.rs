// Reading an agent's pinned maps from outside, with bpftool: what the data
// path really holds, independent of what the agent logs.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{MacAddr, Ovl, cmd};

/// The endpoint map's pin name (`ovl_common::maps::names::ENDPOINTS`).
pub const ENDPOINTS_MAP: &str = "OVL_ENDPOINTS";

/// One entry of a node's `OVL_ENDPOINTS` map: the key (VNI, overlay
/// address) and where frames for it go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEndpoint {
    /// The network's VNI.
    pub vni: u32,
    /// The endpoint's overlay address.
    pub addr: Ipv4Addr,
    /// The MAC proxy ARP answers with.
    pub mac: MacAddr,
    /// Host end of the container veth when the endpoint is on this node;
    /// 0 when it is remote.
    pub ifindex: u32,
    /// The remote VTEP; 0.0.0.0 when the endpoint is local.
    pub vtep: Ipv4Addr,
}

impl MapEndpoint {
    /// True when the endpoint is on the node whose map this is.
    pub fn is_local(&self) -> bool {
        self.ifindex != 0
    }
}

/// The endpoint map pinned in `pin_dir`, keyed by (VNI, address).
///
/// bpftool prints maps without BTF as arrays of `"0x.."` bytes in memory
/// order: the key is `{vni: u32 host order, addr: [u8; 4]}`, the value
/// `{mac: [u8; 6], _pad: [u8; 2], ifindex: u32 host order, vtep: [u8; 4]}`
/// (the layouts of `ovl_common::{VniAddr, Endpoint}`).
pub fn dump_endpoints(pin_dir: &Path) -> Result<BTreeMap<(u32, Ipv4Addr), MapEndpoint>> {
    let mut map = BTreeMap::new();
    for (key, value) in dump_pinned(pin_dir, ENDPOINTS_MAP, 8, 16)? {
        let endpoint = MapEndpoint {
            vni: u32::from_ne_bytes([key[0], key[1], key[2], key[3]]),
            addr: Ipv4Addr::new(key[4], key[5], key[6], key[7]),
            mac: MacAddr([value[0], value[1], value[2], value[3], value[4], value[5]]),
            ifindex: u32::from_ne_bytes([value[8], value[9], value[10], value[11]]),
            vtep: Ipv4Addr::new(value[12], value[13], value[14], value[15]),
        };
        map.insert((endpoint.vni, endpoint.addr), endpoint);
    }
    Ok(map)
}

/// The next-hop cache's pin name (`ovl_common::maps::names::NEXT_HOPS`).
pub const NEXT_HOPS_MAP: &str = "OVL_NEXT_HOPS";

/// The MAC of the next hop each remote VTEP's packets go to, from the
/// next-hop cache pinned in `pin_dir`. An entry the kernel routes itself
/// has an all-zero MAC.
pub fn dump_next_hops(pin_dir: &Path) -> Result<BTreeMap<Ipv4Addr, MacAddr>> {
    Ok(dump_next_hop_entries(pin_dir)?
        .into_iter()
        .map(|(vtep, hop)| (vtep, hop.mac))
        .collect())
}

/// One entry of the next-hop cache, as the tests read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapNextHop {
    /// The next hop's MAC (all zero while the kernel routes).
    pub mac: MacAddr,
    /// `ovl_common::maps::next_hop_via`: 1 the FIB's answer, 2 kernel-routed,
    /// 3 resolved by the agent.
    pub via: u32,
    /// When it was written (CLOCK_MONOTONIC_COARSE, ns).
    pub learned_ns: u64,
}

/// The next-hop cache pinned in `pin_dir`, keyed by remote VTEP (layout of
/// `ovl_common::NextHop`: dmac 0..6, smac 6..12, ifindex 12..16, via
/// 16..20, mtu 20..24, learned_ns 24..32, little-endian).
pub fn dump_next_hop_entries(pin_dir: &Path) -> Result<BTreeMap<Ipv4Addr, MapNextHop>> {
    Ok(dump_pinned(pin_dir, NEXT_HOPS_MAP, 4, 32)?
        .into_iter()
        .map(|(key, v)| {
            let hop = MapNextHop {
                mac: MacAddr([v[0], v[1], v[2], v[3], v[4], v[5]]),
                via: u32::from_le_bytes([v[16], v[17], v[18], v[19]]),
                learned_ns: u64::from_le_bytes(v[24..32].try_into().expect("8 bytes")),
            };
            (Ipv4Addr::new(key[0], key[1], key[2], key[3]), hop)
        })
        .collect())
}

/// The node config map's pin name (`ovl_common::maps::names::CONFIG`).
pub const CONFIG_MAP: &str = "OVL_CONFIG";

/// The node's underlay as its programs see it: the single entry of
/// `OVL_CONFIG`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapNodeConfig {
    pub vtep: Ipv4Addr,
    pub underlay_ifindex: u32,
    pub underlay_mtu: u32,
    pub udp_port: u16,
}

/// The node config pinned in `pin_dir` (layout of `ovl_common::NodeConfig`:
/// vtep 0..4, underlay_ifindex 4..8, underlay_mtu 8..12, udp_port 12..14,
/// host order).
pub fn dump_node_config(pin_dir: &Path) -> Result<MapNodeConfig> {
    let entries = dump_pinned(pin_dir, CONFIG_MAP, 4, 16)?;
    let [(_, v)] = entries.as_slice() else {
        bail!("{CONFIG_MAP} has {} entries, expected 1", entries.len());
    };
    Ok(MapNodeConfig {
        vtep: Ipv4Addr::new(v[0], v[1], v[2], v[3]),
        underlay_ifindex: u32::from_ne_bytes([v[4], v[5], v[6], v[7]]),
        underlay_mtu: u32::from_ne_bytes([v[8], v[9], v[10], v[11]]),
        udp_port: u16::from_ne_bytes([v[12], v[13]]),
    })
}

/// The entries of map `name` pinned in `pin_dir` as (key, value) bytes,
/// each checked to be `key_len` and `value_len` long.
fn dump_pinned(
    pin_dir: &Path,
    name: &str,
    key_len: usize,
    value_len: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let pin = pin_dir.join(name);
    let pin_text = pin.to_string_lossy().into_owned();
    bpftool_dump(&pin)?
        .iter()
        .map(|entry| {
            let key = bytes(&entry["key"]).with_context(|| format!("key of {entry}"))?;
            let value = bytes(&entry["value"]).with_context(|| format!("value of {entry}"))?;
            ensure!(
                key.len() == key_len && value.len() == value_len,
                "unexpected sizes (key {}, value {}) in {entry} of {pin_text}",
                key.len(),
                value.len()
            );
            Ok((key, value))
        })
        .collect()
}

/// The entries of the map pinned at `pin`, as `bpftool -j map dump`
/// lists them.
pub(crate) fn bpftool_dump(pin: &Path) -> Result<Vec<Value>> {
    let pin_text = pin.to_string_lossy().into_owned();
    let out = cmd::run(&["bpftool", "-j", "map", "dump", "pinned", &pin_text])?;
    let dump: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool dump of {pin_text} is not JSON"))?;
    match dump {
        Value::Array(entries) => Ok(entries),
        other => bail!("bpftool dump of {pin_text} is not a list: {other}"),
    }
}

/// `["0x1f", "0x00", ...]` as bytes.
fn bytes(v: &Value) -> Result<Vec<u8>> {
    let Some(items) = v.as_array() else {
        bail!("not a byte array (was the map built with BTF?)");
    };
    items
        .iter()
        .map(|item| {
            let text = item.as_str().context("byte is not a string")?;
            let hex = text.trim_start_matches("0x");
            u8::from_str_radix(hex, 16).with_context(|| format!("bad byte {text:?}"))
        })
        .collect()
}

impl Ovl {
    /// The endpoint map of node `node`'s agent, read with bpftool from its
    /// pins (the pin root is visible from every namespace).
    pub fn endpoint_map(&self, node: &str) -> Result<BTreeMap<(u32, Ipv4Addr), MapEndpoint>> {
        dump_endpoints(&self.pin_root().join(node))
    }
}
