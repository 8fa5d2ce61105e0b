//! The etcd key schema: which key holds what, values as versioned JSON,
//! the state as keys (`encode`) and one key's change applied to a decoded
//! state (`apply`), so a follower never re-decodes what did not change.
//!
//! | key | value |
//! |---|---|
//! | `/ovl/schema` | `1`, the layout version |
//! | `/ovl/networks/<name>` | the network: name, vni, subnet, mtu |
//! | `/ovl/vnis/<vni>` | `{"network": name}`: the VNI's owner (its own, or one it keeps from a network merged into it), so two networks never share one |
//! | `/ovl/endpoints/<network>/<ipv4>` | the endpoint: name, ip, mac, location; the key makes an address unique |
//! | `/ovl/released/<network>/<ipv4>` | when the address was freed and by whom: held back for the grace |
//! | `/ovl/nodes/<name>` | the node, its VTEP address and WireGuard key and port (kept after it dies) |
//! | `/ovl/alive/<name>` | present while the node's agent holds its lease |
//! | `/ovl/conflicts/<name>` | addresses the node found taken when it put back its endpoints |
//! | `/ovl/ports/<node>/<proto>/<port>/<host ip>` | the claim of a published port: the network and address of its endpoint |
//! | `/ovl/macs/<network>/<mac>` | the claim of a MAC an endpoint was given (not derived from its address): the endpoint's address |

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    model::{ClusterSettings, Endpoint, Location, MacAddr, Network, Node, SCHEMA_VERSION, State},
    ports::PublishedPort,
    release::{AddressConflict, Released},
    store::{Part, StoreError},
};

/// Every ovl key starts with this.
pub const KEY_PREFIX: &str = "/ovl/";
pub const SCHEMA_KEY: &str = "/ovl/schema";
pub const NETWORKS: &str = "/ovl/networks/";
pub const VNIS: &str = "/ovl/vnis/";
pub const ENDPOINTS: &str = "/ovl/endpoints/";
pub const RELEASED: &str = "/ovl/released/";
pub const NODES: &str = "/ovl/nodes/";
pub const ALIVE: &str = "/ovl/alive/";
pub const CONFLICTS: &str = "/ovl/conflicts/";
/// Claims of a network's endpoint names, one key per name (aliases are
/// shared and have none; an older ovl claimed them too, and such a claim
/// is taken over by the first endpoint called by that name): what makes
/// names unique across racing writers without every change of a network
/// colliding with every other (derived from the endpoints, never decoded).
pub const NAMES: &str = "/ovl/names/";
/// Claims of a container's attachment to a network, one key per (node,
/// namespace): a container connects to a network once (derived, like
/// [`NAMES`]).
pub const ATTACHMENTS: &str = "/ovl/attachments/";
/// Claims of published ports, one key per (node, protocol, host port,
/// host address, `0.0.0.0` for every address): a host port is published
/// once per node, whatever the network (derived, like [`NAMES`]).
pub const PORTS: &str = "/ovl/ports/";
/// Claims of the MACs endpoints were given (`connect --mac`), one key per
/// (network, MAC): a MAC is one endpoint's per network across racing
/// writers (derived, like [`NAMES`]). A MAC derived from an endpoint's
/// address needs none: its address key is unique already.
pub const MACS: &str = "/ovl/macs/";
/// Settings of the whole cluster (the VXLAN port); absent while default.
pub const CLUSTER_KEY: &str = "/ovl/cluster";

#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    schema: u32,
    #[serde(flatten)]
    value: T,
}

#[derive(Serialize, Deserialize)]
struct VniOwner {
    network: String,
}

/// The value of an index key: the address of the endpoint that holds the
/// name, attachment or MAC.
#[derive(Serialize, Deserialize)]
struct IndexOwner {
    ip: Ipv4Addr,
}

/// The value of a port claim: the endpoint that publishes it (of any
/// network of the node).
#[derive(Serialize, Deserialize)]
struct PortOwner {
    network: String,
    ip: Ipv4Addr,
}

/// The value of `/ovl/alive/<node>`.
#[derive(Serialize, Deserialize)]
pub struct AliveRecord {
    pub vtep: Ipv4Addr,
}

/// The value of `/ovl/conflicts/<node>`.
#[derive(Serialize, Deserialize)]
pub struct ConflictsRecord {
    pub conflicts: Vec<AddressConflict>,
}

/// `value` as versioned JSON.
pub fn json<T: Serialize>(value: T) -> Vec<u8> {
    serde_json::to_vec(&Versioned {
        schema: SCHEMA_VERSION,
        value,
    })
    .expect("model values serialise")
}

/// The value of `key`, refusing a newer schema.
pub fn parse<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    if let Some(found) = crate::store::newer_schema(bytes) {
        return Err(StoreError::EtcdNewer {
            key: key.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let v: Versioned<T> = serde_json::from_slice(bytes).map_err(|e| StoreError::EtcdValue {
        key: key.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(v.value)
}

pub fn network_key(name: &str) -> String {
    format!("{NETWORKS}{name}")
}

pub fn endpoint_key(network: &str, ip: Ipv4Addr) -> String {
    format!("{ENDPOINTS}{network}/{ip}")
}

pub fn released_key(network: &str, ip: Ipv4Addr) -> String {
    format!("{RELEASED}{network}/{ip}")
}

/// The claim of `name` (any case) in `network`.
pub fn name_key(network: &str, name: &str) -> String {
    format!("{NAMES}{network}/{}", name.to_ascii_lowercase())
}

/// The claim of a container's attachment to `network`.
pub fn attachment_key(network: &str, node: &str, netns: &str) -> String {
    format!("{ATTACHMENTS}{network}/{node}/{netns}")
}

/// The claim of MAC `mac` in `network`.
pub fn mac_key(network: &str, mac: MacAddr) -> String {
    format!("{MACS}{network}/{mac}")
}

/// The claim of published port `p` on `node`.
pub fn port_key(node: &str, p: &PublishedPort) -> String {
    format!(
        "{}{}",
        ports_prefix(node, p),
        p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)
    )
}

/// The claims of `p`'s protocol and host port on `node`, on any address.
pub fn ports_prefix(node: &str, p: &PublishedPort) -> String {
    format!("{PORTS}{node}/{}/{}/", p.protocol, p.host_port)
}

/// The claims endpoint `e` holds (when it is the first to hold them): its
/// name (aliases are shared, and claimed by none), its MAC if it was given
/// one, its attachment if it is a container's, and its published ports.
pub fn claims_of(e: &Endpoint) -> Vec<String> {
    let mut out = vec![name_key(&e.network, &e.name)];
    out.extend(e.given_mac().map(|mac| mac_key(&e.network, mac)));
    if let Location::Container { node, netns, .. } = &e.location {
        out.push(attachment_key(&e.network, node, netns));
        out.extend(e.ports.iter().map(|p| port_key(node, p)));
    }
    out
}

/// The value claim `key` of endpoint `e` holds.
pub fn claim_value_of(key: &str, e: &Endpoint) -> Vec<u8> {
    if key.starts_with(PORTS) {
        json(PortOwner {
            network: e.network.clone(),
            ip: e.ip,
        })
    } else {
        claim_value(e.ip)
    }
}

/// The endpoint a claim (`key`, holding `value`) points at, as its key.
pub fn holder_of(key: &str, value: &[u8]) -> Option<String> {
    if key.starts_with(PORTS) {
        let owner: PortOwner = parse(key, value).ok()?;
        return Some(endpoint_key(&owner.network, owner.ip));
    }
    let rest = key
        .strip_prefix(NAMES)
        .or_else(|| key.strip_prefix(ATTACHMENTS))
        .or_else(|| key.strip_prefix(MACS))?;
    let (network, _) = rest.split_once('/')?;
    let owner: IndexOwner = parse(key, value).ok()?;
    Some(endpoint_key(network, owner.ip))
}

/// The value of a claim held by the endpoint at `ip`.
pub fn claim_value(ip: Ipv4Addr) -> Vec<u8> {
    json(IndexOwner { ip })
}

/// Whether `key` is one of the derived claims ([`NAMES`], [`ATTACHMENTS`],
/// [`PORTS`], [`MACS`]).
pub fn is_index_key(key: &str) -> bool {
    key.starts_with(NAMES)
        || key.starts_with(ATTACHMENTS)
        || key.starts_with(PORTS)
        || key.starts_with(MACS)
}

pub fn alive_key(node: &str) -> String {
    format!("{ALIVE}{node}")
}

pub fn node_key(node: &str) -> String {
    format!("{NODES}{node}")
}

pub fn conflicts_key(node: &str) -> String {
    format!("{CONFLICTS}{node}")
}

/// The first key after every key that starts with `prefix` (etcd's range
/// end for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The network and address in `/ovl/<kind>/<network>/<ipv4>`.
pub fn network_and_ip(rest: &str) -> Option<(&str, Ipv4Addr)> {
    let (network, ip) = rest.rsplit_once('/')?;
    Some((network, ip.parse().ok()?))
}

/// The keys and values `update` may write: networks, their VNIs,
/// endpoints with their claims, released addresses
/// and the cluster's settings (nodes, liveness and conflicts have
/// writers of their own).
pub fn encode(state: &State) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for n in state.networks.values() {
        out.insert(network_key(&n.name), json(n));
        // The VNIs kept from networks merged into it are its too.
        let merged = n.kept_vnis.iter().map(|m| m.vni);
        for vni in std::iter::once(n.vni).chain(merged) {
            out.insert(
                format!("{VNIS}{vni}"),
                json(VniOwner {
                    network: n.name.clone(),
                }),
            );
        }
    }
    for e in &state.endpoints {
        out.insert(endpoint_key(&e.network, e.ip), json(e));
        // A name two endpoints hold (written before names were checked)
        // stays claimed by the first.
        out.entry(name_key(&e.network, &e.name))
            .or_insert_with(|| claim_value(e.ip));
        // Likewise a MAC two endpoints were given (written before MACs
        // were claimed).
        if let Some(mac) = e.given_mac() {
            out.entry(mac_key(&e.network, mac))
                .or_insert_with(|| claim_value(e.ip));
        }
        if let Location::Container { node, netns, .. } = &e.location {
            out.entry(attachment_key(&e.network, node, netns))
                .or_insert_with(|| claim_value(e.ip));
            for p in &e.ports {
                let key = port_key(node, p);
                let value = claim_value_of(&key, e);
                out.entry(key).or_insert(value);
            }
        }
    }
    for r in &state.released {
        out.insert(released_key(&r.network, r.ip), json(r));
    }
    if state.cluster != ClusterSettings::default() {
        out.insert(CLUSTER_KEY.to_owned(), json(state.cluster));
    }
    out
}

/// Rebuilds the state from keys and values read at `revision`. A value
/// that cannot be read is logged and skipped, or, for a reader that held
/// `last` before, keeps what `last` held for its key, as it would have had
/// the reader followed the change (see [`apply`]).
pub fn decode<'a>(
    revision: i64,
    kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    last: Option<&State>,
) -> State {
    let mut state = empty(revision);
    for (key, value) in kvs {
        if let Err(e) = try_apply(&mut state, key, Some(value)) {
            match last {
                Some(last) => {
                    log::error!("{e}; keeping what was read of it before");
                    keep(&mut state, key, last);
                }
                None => log::error!("{e}"),
            }
        }
    }
    state
}

fn empty(revision: i64) -> State {
    State {
        revision: revision.max(0) as u64,
        alive: Some(Default::default()),
        ..State::default()
    }
}

/// Copies what `last` holds for `key` into `state`.
fn keep(state: &mut State, key: &str, last: &State) {
    if let Some(name) = key.strip_prefix(NETWORKS) {
        if let Some(n) = last.networks.get(name) {
            state.networks.insert(name.to_owned(), n.clone());
        }
    } else if let Some((network, ip)) = key.strip_prefix(ENDPOINTS).and_then(network_and_ip) {
        let held = last.endpoints.iter();
        state
            .endpoints
            .extend(held.filter(|e| e.network == network && e.ip == ip).cloned());
    } else if let Some((network, ip)) = key.strip_prefix(RELEASED).and_then(network_and_ip) {
        let held = last.released.iter();
        state
            .released
            .extend(held.filter(|r| r.network == network && r.ip == ip).cloned());
    } else if let Some(name) = key.strip_prefix(NODES) {
        if let Some(n) = last.nodes.get(name) {
            state.nodes.insert(name.to_owned(), n.clone());
        }
    } else if key == CLUSTER_KEY {
        state.cluster = last.cluster;
    } else if let Some(name) = key.strip_prefix(CONFLICTS)
        && let Some(c) = last.conflicts.get(name)
    {
        state.conflicts.insert(name.to_owned(), c.clone());
    }
}

/// Applies one key's new value (`None`: deleted) to a decoded state. A
/// value that cannot be read is logged and skipped: the state keeps what
/// it held for the key (one bad key, written by hand or a broken tool,
/// must not take a network or a node off every data path). Returns the
/// part of the state the key belongs to.
pub fn apply<'k>(state: &mut State, key: &'k str, value: Option<&[u8]>) -> Part<'k> {
    if let Err(e) = try_apply(state, key, value) {
        log::error!("{e}; keeping what was read of it before");
    }
    part_of(key)
}

/// Whether `value` of `key` decodes, as [`apply`] would take it.
pub fn check(key: &str, value: &[u8]) -> Result<(), StoreError> {
    try_apply(&mut State::default(), key, Some(value))
}

/// The part of the decoded state `key` belongs to.
pub fn part_of(key: &str) -> Part<'_> {
    if let Some(name) = key.strip_prefix(NETWORKS) {
        Part::Network(name)
    } else if let Some(rest) = key.strip_prefix(ENDPOINTS) {
        match network_and_ip(rest) {
            Some((network, ip)) => Part::Endpoint(network, ip),
            None => Part::Nothing,
        }
    } else if key.starts_with(NODES) || key.starts_with(ALIVE) || key == CLUSTER_KEY {
        Part::Nodes
    } else if key.starts_with(RELEASED) || key.starts_with(CONFLICTS) {
        Part::Other
    } else {
        Part::Nothing
    }
}

/// Applies `key`'s new value to `state`; a value that cannot be read
/// changes nothing and is returned as the error.
fn try_apply(state: &mut State, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
    let mismatch = |what: &str| StoreError::EtcdValue {
        key: key.to_owned(),
        detail: format!("its value names another {what} than its key"),
    };
    if let Some(name) = key.strip_prefix(NETWORKS) {
        let new: Option<Network> = value.map(|v| parse(key, v)).transpose()?;
        if new.as_ref().is_some_and(|n| n.name != name) {
            return Err(mismatch("network"));
        }
        state.networks.remove(name);
        if let Some(n) = new {
            state.networks.insert(n.name.clone(), n);
        }
    } else if let Some(rest) = key.strip_prefix(ENDPOINTS) {
        let Some((network, ip)) = network_and_ip(rest) else {
            return Ok(());
        };
        let new: Option<Endpoint> = value.map(|v| parse(key, v)).transpose()?;
        if new
            .as_ref()
            .is_some_and(|e| e.network != network || e.ip != ip)
        {
            return Err(mismatch("endpoint"));
        }
        state
            .endpoints
            .retain(|e| !(e.ip == ip && e.network == network));
        state.endpoints.extend(new);
    } else if let Some(rest) = key.strip_prefix(RELEASED) {
        let Some((network, ip)) = network_and_ip(rest) else {
            return Ok(());
        };
        let new: Option<Released> = value.map(|v| parse(key, v)).transpose()?;
        if new
            .as_ref()
            .is_some_and(|r| r.network != network || r.ip != ip)
        {
            return Err(mismatch("address"));
        }
        state
            .released
            .retain(|r| !(r.ip == ip && r.network == network));
        state.released.extend(new);
    } else if let Some(name) = key.strip_prefix(NODES) {
        let new: Option<Node> = value.map(|v| parse(key, v)).transpose()?;
        state.nodes.remove(name);
        if let Some(n) = new {
            state.nodes.insert(name.to_owned(), n);
        }
    } else if let Some(name) = key.strip_prefix(ALIVE) {
        let alive = state.alive.get_or_insert_with(Default::default);
        if value.is_some() {
            alive.insert(name.to_owned());
        } else {
            alive.remove(name);
        }
    } else if key == CLUSTER_KEY {
        state.cluster = match value {
            Some(v) => parse(key, v)?,
            None => ClusterSettings::default(),
        };
    } else if is_index_key(key) {
        // Derived from the endpoints: nothing to decode.
    } else if let Some(name) = key.strip_prefix(CONFLICTS) {
        let new: Option<ConflictsRecord> = value.map(|v| parse(key, v)).transpose()?;
        state.conflicts.remove(name);
        if let Some(c) = new.filter(|c| !c.conflicts.is_empty()) {
            state.conflicts.insert(name.to_owned(), c.conflicts);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    fn sample() -> State {
        let mut s = State::default();
        s.create_network(NetworkSpec {
            vni: Some(4242),
            mtu: None,
            ..NetworkSpec::new("blue", "198.18.0.0/24".parse().unwrap())
        })
        .unwrap();
        for (node, ns) in [("a", "c1"), ("b", "c2")] {
            s.add_container(ContainerSpec {
                ports: Vec::new(),
                attacher: None,
                network: "blue".into(),
                node: node.into(),
                netns: ns.into(),
                name: None,
                ip: None,
                owner: None,
                subnet: None,
                mac: None,
            })
            .unwrap();
        }
        s.remove_node("a").unwrap();
        s
    }

    fn decode_map(m: &BTreeMap<String, Vec<u8>>) -> State {
        decode(1, m.iter().map(|(k, v)| (k.as_str(), v.as_slice())), None)
    }

    #[test]
    fn state_survives_encode_and_decode() {
        let s = sample();
        let back = decode_map(&encode(&s));
        assert_eq!(back.networks, s.networks);
        assert_eq!(back.endpoints, s.endpoints);
        assert_eq!(back.released, s.released);
        assert_eq!(back.alive, Some(Default::default()));
    }

    #[test]
    fn keys_follow_the_documented_schema() {
        let keys: Vec<String> = encode(&sample()).into_keys().collect();
        assert_eq!(
            keys,
            [
                "/ovl/attachments/blue/b/c2",
                "/ovl/endpoints/blue/198.18.0.3",
                "/ovl/names/blue/c2",
                "/ovl/networks/blue",
                "/ovl/released/blue/198.18.0.2",
                "/ovl/vnis/4242"
            ]
        );
        let v: serde_json::Value =
            serde_json::from_slice(&encode(&sample())["/ovl/networks/blue"]).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["vni"], 4242);
    }

    #[test]
    fn a_merged_networks_kept_vni_is_claimed_as_its_own() {
        let mut s = sample();
        s.create_network(NetworkSpec {
            vni: Some(4243),
            ..NetworkSpec::new("green", "198.18.1.0/24".parse().unwrap())
        })
        .unwrap();
        s.merge_network("blue", "green").unwrap();
        let kvs = encode(&s);
        let vnis: Vec<&str> = kvs
            .keys()
            .filter(|k| k.starts_with(VNIS))
            .map(String::as_str)
            .collect();
        assert_eq!(vnis, ["/ovl/vnis/4242", "/ovl/vnis/4243"]);
        let owner: serde_json::Value = serde_json::from_slice(&kvs["/ovl/vnis/4243"]).unwrap();
        assert_eq!(owner["network"], "blue");
        assert!(!kvs.contains_key("/ovl/networks/green"));
        assert_eq!(decode_map(&kvs).networks, s.networks);
    }

    #[test]
    fn applying_each_change_gives_the_state_a_full_decode_gives() {
        let mut kvs = encode(&sample());
        let mut followed = decode_map(&kvs);
        // A put of a new endpoint, a delete, a changed network, liveness.
        let mut changed = sample();
        changed
            .add_container(ContainerSpec {
                ports: Vec::new(),
                attacher: None,
                network: "blue".into(),
                node: "b".into(),
                netns: "c9".into(),
                name: None,
                ip: None,
                owner: None,
                subnet: None,
                mac: None,
            })
            .unwrap();
        changed.remove_container("blue", "b", "c2").unwrap();
        changed.networks.get_mut("blue").unwrap().mtu = 1400;
        let new = encode(&changed);
        for (k, v) in &new {
            if kvs.get(k) != Some(v) {
                apply(&mut followed, k, Some(v));
            }
        }
        for k in kvs.keys().filter(|k| !new.contains_key(*k)) {
            apply(&mut followed, k, None);
        }
        apply(&mut followed, "/ovl/alive/b", Some(b"{}"));
        kvs = new;
        kvs.insert("/ovl/alive/b".into(), b"{}".to_vec());
        let mut decoded = decode_map(&kvs);
        followed.endpoints.sort_by_key(|e| e.ip);
        decoded.endpoints.sort_by_key(|e| e.ip);
        followed.released.sort_by_key(|r| r.ip);
        decoded.released.sort_by_key(|r| r.ip);
        assert_eq!(followed, decoded);
        apply(&mut followed, "/ovl/alive/b", None);
        assert!(followed.alive.unwrap().is_empty());
    }

    #[test]
    fn unreadable_or_mismatched_values_are_skipped_not_fatal() {
        let ep = encode(&sample())["/ovl/endpoints/blue/198.18.0.3"].clone();
        let s = decode(
            1,
            [
                ("/ovl/networks/bad", b"{nope".as_slice()),
                ("/ovl/endpoints/blue/198.18.0.99", ep.as_slice()),
                ("/ovl/alive/a", b"{}".as_slice()),
            ],
            None,
        );
        assert!(s.networks.is_empty());
        assert!(s.endpoints.is_empty());
        assert!(s.alive.unwrap().contains("a"));
    }

    #[test]
    fn an_unreadable_value_over_a_good_one_keeps_the_good_one_followed_or_listed_again() {
        let mut kvs = encode(&sample());
        kvs.insert(
            "/ovl/nodes/b".into(),
            br#"{"schema":1,"name":"b","vtep":"198.51.100.10"}"#.to_vec(),
        );
        kvs.insert(
            CLUSTER_KEY.into(),
            br#"{"schema":1,"vxlan_port":8472}"#.to_vec(),
        );
        let good = decode_map(&kvs);
        let ep = "/ovl/endpoints/blue/198.18.0.3";
        let bad: [(&str, &[u8]); 5] = [
            ("/ovl/networks/blue", b"garbage"),
            ("/ovl/nodes/b", br#"{"schema":1}"#),
            (ep, br#"{"schema":1,"name":"x"}"#),
            ("/ovl/released/blue/198.18.0.3", b"[]"),
            (CLUSTER_KEY, b"{"),
        ];
        // Followed: each bad put leaves the state as it was.
        let mut followed = good.clone();
        for (k, v) in bad {
            apply(&mut followed, k, Some(v));
        }
        assert_eq!(followed, good);
        // Listed again (after a lost watch): the same.
        let mut listed = kvs.clone();
        for (k, v) in bad {
            listed.insert(k.into(), v.to_vec());
        }
        let pairs = || listed.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        let mut again = decode(1, pairs(), Some(&good));
        again.endpoints.sort_by_key(|e| e.ip);
        let mut want = good.clone();
        want.endpoints.sort_by_key(|e| e.ip);
        assert_eq!(again, want);
        // A deletion still deletes.
        apply(&mut followed, "/ovl/networks/blue", None);
        assert!(followed.networks.is_empty());
    }

    #[test]
    fn a_value_a_newer_ovl_wrote_asks_for_an_upgrade_not_a_deletion() {
        // Schema 2 may have changed anything: here, the VNI's type.
        let err = parse::<Network>(
            "/ovl/networks/blue",
            br#"{"schema":2,"name":"blue","vni":"4096"}"#,
        )
        .expect_err("refused")
        .to_string();
        assert!(
            err.contains("schema 2") && err.contains("upgrade ovl"),
            "{err}"
        );
        assert!(!err.contains("delete it"), "{err}");
    }

    #[test]
    fn values_written_before_several_subnets_still_decode() {
        // A network and a node as ovl stored them before this layout.
        let mut m = BTreeMap::new();
        m.insert(
            "/ovl/networks/uber-net".to_owned(),
            br#"{"schema":1,"name":"uber-net","vni":4096,"subnet":"198.18.0.0/24","mtu":1450}"#
                .to_vec(),
        );
        m.insert(
            "/ovl/nodes/host-a".to_owned(),
            br#"{"schema":1,"name":"host-a","vtep":"192.0.2.10"}"#.to_vec(),
        );
        let s = decode_map(&m);
        let n = &s.networks["uber-net"];
        assert_eq!(n.subnets_text(), "198.18.0.0/24");
        assert_eq!(n.subnets[0].gateway, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(s.nodes["host-a"].underlay_mtu, None);
        assert_eq!(s.cluster, ClusterSettings::default());
    }

    #[test]
    fn cluster_settings_live_under_one_key_only_when_set() {
        let mut s = State::default();
        assert!(!encode(&s).contains_key(CLUSTER_KEY));
        s.set_vxlan_port(8472).unwrap();
        let keys = encode(&s);
        let v: serde_json::Value = serde_json::from_slice(&keys[CLUSTER_KEY]).unwrap();
        assert_eq!(v["vxlan_port"], 8472);
        assert_eq!(v["schema"], 1);
        assert_eq!(decode_map(&keys).cluster.vxlan_port, 8472);
    }

    #[test]
    fn a_prefix_range_ends_after_its_last_key() {
        assert_eq!(prefix_end("/ovl/"), b"/ovl0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
