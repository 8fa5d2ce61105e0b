//! The desired state of every ovl network: networks, endpoints and nodes,
//! the identifiers that name them, and the rules every change obeys.
//! Stores persist a `State`; agents turn it into map entries.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use ovl_common::wire::{ENCAP_OVERHEAD, VNI_MAX, mac_for_ipv4};
use serde::{Deserialize, Serialize};

use crate::ipam::{self, Subnet};

/// Version of the persisted schema; bumped when a migration is needed.
pub const SCHEMA_VERSION: u32 = 1;
/// First VNI handed out automatically (Docker's overlay starts there too).
pub const FIRST_AUTO_VNI: u32 = 4096;
/// Underlay MTU assumed when a network is created without `--mtu`.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;

/// Why a change to the state was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error(
        "network {0:?} already exists; pick another name or remove it with `ovl network rm {0}`"
    )]
    NetworkExists(String),
    #[error("no network named {0:?}; list networks with `ovl network ls`")]
    NoSuchNetwork(String),
    #[error("VNI {vni} is already used by network {network:?}; pass another --vni or omit it")]
    VniInUse { vni: Vni, network: String },
    #[error("every VNI from {FIRST_AUTO_VNI} to {VNI_MAX} is in use")]
    VnisExhausted,
    #[error(
        "network {name:?} still has {count} endpoint(s); disconnect them first (`ovl network inspect {name}`)"
    )]
    NetworkInUse { name: String, count: usize },
    #[error("invalid VNI {0}: VXLAN network identifiers are 1..={VNI_MAX}")]
    InvalidVni(u64),
    #[error("invalid MTU {0}: must be 576..=9000 bytes (the underlay needs {ENCAP_OVERHEAD} more)")]
    InvalidMtu(u32),
    #[error("invalid network name {0:?}: use 1-64 characters from [A-Za-z0-9_.-]")]
    InvalidName(String),
    #[error("namespace {netns:?} is already connected to network {network:?}")]
    AlreadyConnected { network: String, netns: String },
    #[error("namespace {netns:?} on node {node:?} is not connected to network {network:?}")]
    NotConnected {
        network: String,
        netns: String,
        node: String,
    },
    #[error("no endpoint {ip} on network {network:?}")]
    NoSuchEndpoint { network: String, ip: Ipv4Addr },
    #[error(
        "{ip} on network {network:?} is not a reservation of node {node:?}; nothing was changed"
    )]
    NotReserved {
        network: String,
        ip: Ipv4Addr,
        node: String,
    },
    #[error("subnet {subnet} overlaps network {network:?} ({existing}); pick another subnet")]
    SubnetClash {
        subnet: Subnet,
        network: String,
        existing: Subnet,
    },
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
}

/// A VXLAN network identifier (24 bits, never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Vni(u32);

impl Vni {
    /// The identifier as the kernel programs key it.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Vni {
    type Error = ModelError;
    fn try_from(v: u32) -> Result<Self, ModelError> {
        if v == 0 || v > VNI_MAX {
            return Err(ModelError::InvalidVni(u64::from(v)));
        }
        Ok(Vni(v))
    }
}

impl From<Vni> for u32 {
    fn from(v: Vni) -> u32 {
        v.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An Ethernet MAC address, written `02:42:c6:12:00:02`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The MAC ovl gives the container with address `ip`.
    pub const fn for_ipv4(ip: Ipv4Addr) -> Self {
        MacAddr(mac_for_ipv4(ip.octets()))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid MAC address {s:?}: expected six hex octets like 02:42:c6:12:00:02");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// An overlay network: one VNI, one subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub vni: Vni,
    pub subnet: Subnet,
    /// MTU of container interfaces on this network.
    pub mtu: u32,
    /// Set while a network made through Docker's plugin waits for the name
    /// Docker gave it (Docker's calls carry only its ID); the network then
    /// takes that name. Front ends do not show such a network to users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_pending: Option<DockerPending>,
}

/// A network Docker is creating on one node, named provisionally.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerPending {
    /// The node whose dockerd creates it.
    pub node: String,
    /// Docker's network ID on that node, once its CreateNetwork came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_id: Option<String>,
}

/// Where an endpoint's frames are sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Location {
    /// A container on an ovl node, connected with `ovl connect`.
    Container {
        node: String,
        /// Namespace the container's interface lives in.
        netns: String,
        /// Host end of its veth, on `node`.
        host_ifname: String,
    },
    /// An endpoint behind a VTEP that runs no ovl agent (a kernel vxlan
    /// device, say), registered with `ovl endpoint add`.
    Static { vtep: Ipv4Addr },
    /// An address a runtime's IPAM handed out on `node` for a container
    /// that is not attached yet (Docker's RequestAddress comes before its
    /// Join). It holds the address and forwards nothing.
    Reserved { node: String },
}

/// An address on a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub network: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub location: Location,
    /// Which front end made the endpoint and under what identity, e.g.
    /// `cni:<container id>/<ifname>` or `docker:<endpoint id>`; none for
    /// `ovl connect` and `ovl endpoint add`. Lets a runtime find, check and
    /// garbage-collect its own attachments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Endpoint {
    /// The node hosting a container endpoint.
    pub fn node(&self) -> Option<&str> {
        match &self.location {
            Location::Container { node, .. } | Location::Reserved { node } => Some(node),
            Location::Static { .. } => None,
        }
    }
}

/// An ovl node: a host whose agent is this VTEP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub vtep: Ipv4Addr,
}

/// Everything a store holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub schema: u32,
    /// Bumped by every committed change; agents compare it to notice one.
    pub revision: u64,
    pub networks: BTreeMap<String, Network>,
    pub endpoints: Vec<Endpoint>,
    pub nodes: BTreeMap<String, Node>,
    /// Nodes whose agent is alive, where the store tracks liveness (etcd
    /// leases); `None` where it does not (the file store).
    #[serde(skip)]
    pub alive: Option<std::collections::BTreeSet<String>>,
}

impl Default for State {
    fn default() -> Self {
        State {
            schema: SCHEMA_VERSION,
            revision: 0,
            networks: BTreeMap::new(),
            endpoints: Vec::new(),
            nodes: BTreeMap::new(),
            alive: None,
        }
    }
}

/// What `ovl network create` asks for.
#[derive(Clone, Debug)]
pub struct NetworkSpec {
    pub name: String,
    pub subnet: Subnet,
    pub vni: Option<u32>,
    pub mtu: Option<u32>,
}

/// What `ovl connect` asks for.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub network: String,
    pub node: String,
    pub netns: String,
    pub name: Option<String>,
    pub ip: Option<Ipv4Addr>,
    /// See [`Endpoint::owner`].
    pub owner: Option<String>,
}

impl State {
    /// The network called `name`.
    pub fn network(&self, name: &str) -> Result<&Network, ModelError> {
        self.networks
            .get(name)
            .ok_or_else(|| ModelError::NoSuchNetwork(name.to_owned()))
    }

    /// Endpoints of network `name`.
    pub fn endpoints_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Endpoint> + 'a {
        self.endpoints.iter().filter(move |e| e.network == name)
    }

    /// Creates a network, allocating a VNI when none is asked for.
    pub fn create_network(&mut self, spec: NetworkSpec) -> Result<&Network, ModelError> {
        validate_name(&spec.name)?;
        if self.networks.contains_key(&spec.name) {
            return Err(ModelError::NetworkExists(spec.name));
        }
        let mtu = check_mtu(spec.mtu.unwrap_or(DEFAULT_UNDERLAY_MTU - ENCAP_OVERHEAD))?;
        let vni = match spec.vni {
            Some(v) => {
                let vni = Vni::try_from(v)?;
                if let Some(n) = self.networks.values().find(|n| n.vni == vni) {
                    return Err(ModelError::VniInUse {
                        vni,
                        network: n.name.clone(),
                    });
                }
                vni
            }
            None => self.free_vni()?,
        };
        let network = Network {
            name: spec.name.clone(),
            vni,
            subnet: spec.subnet,
            mtu,
            docker_pending: None,
        };
        Ok(self.networks.entry(spec.name).or_insert(network))
    }

    /// Refuses `subnet` if it shares an address with any network's.
    pub fn check_subnet_free(&self, subnet: &Subnet) -> Result<(), ModelError> {
        match self.networks.values().find(|n| n.subnet.overlaps(subnet)) {
            Some(n) => Err(ModelError::SubnetClash {
                subnet: *subnet,
                network: n.name.clone(),
                existing: n.subnet,
            }),
            None => Ok(()),
        }
    }

    fn free_vni(&self) -> Result<Vni, ModelError> {
        let used: std::collections::BTreeSet<u32> =
            self.networks.values().map(|n| n.vni.get()).collect();
        (FIRST_AUTO_VNI..=VNI_MAX)
            .find(|v| !used.contains(v))
            .map(Vni)
            .ok_or(ModelError::VnisExhausted)
    }

    /// Removes a network that has no endpoints left.
    pub fn remove_network(&mut self, name: &str) -> Result<Network, ModelError> {
        self.network(name)?;
        let count = self.endpoints_of(name).count();
        if count > 0 {
            return Err(ModelError::NetworkInUse {
                name: name.to_owned(),
                count,
            });
        }
        Ok(self.networks.remove(name).expect("presence checked above"))
    }

    /// Registers a container endpoint, allocating its address (IPAM) unless
    /// one is given. The host interface name is derived from network and
    /// address so it is stable and unique on the node. An address the same
    /// owner reserved on the same node ([`State::reserve`]) is taken over:
    /// the reservation becomes the endpoint.
    pub fn add_container(&mut self, spec: ContainerSpec) -> Result<Endpoint, ModelError> {
        let network = self.network(&spec.network)?.clone();
        if self.endpoints.iter().any(|e| {
            e.network == spec.network
                && matches!(&e.location, Location::Container { node, netns, .. }
                    if *node == spec.node && *netns == spec.netns)
        }) {
            return Err(ModelError::AlreadyConnected {
                network: spec.network,
                netns: spec.netns,
            });
        }
        let reserved = spec.ip.and_then(|ip| {
            self.endpoints.iter().position(|e| {
                e.network == spec.network
                    && e.ip == ip
                    && e.owner.is_some()
                    && e.owner == spec.owner
                    && matches!(&e.location, Location::Reserved { node } if *node == spec.node)
            })
        });
        if let Some(pos) = reserved {
            self.endpoints.remove(pos);
        }
        let used = self.endpoints_of(&spec.network).map(|e| e.ip).collect();
        let ip = ipam::allocate(&network.subnet, &used, spec.ip)?;
        let endpoint = Endpoint {
            network: spec.network,
            name: spec.name.unwrap_or_else(|| spec.netns.clone()),
            ip,
            mac: MacAddr::for_ipv4(ip),
            location: Location::Container {
                node: spec.node,
                netns: spec.netns,
                host_ifname: host_ifname(network.vni, ip),
            },
            owner: spec.owner,
        };
        self.endpoints.push(endpoint.clone());
        Ok(endpoint)
    }

    /// Reserves an address of `network` on `node` for `owner` (the next free
    /// one unless `ip` is given), for a runtime whose IPAM hands addresses
    /// out before it attaches the container. The address is as taken as an
    /// endpoint's until [`State::add_container`] with the same owner takes
    /// it over, or [`State::remove_endpoint`] frees it.
    pub fn reserve(
        &mut self,
        network: &str,
        node: &str,
        ip: Option<Ipv4Addr>,
        owner: &str,
    ) -> Result<Endpoint, ModelError> {
        let net = self.network(network)?.clone();
        let used = self.endpoints_of(network).map(|e| e.ip).collect();
        let ip = ipam::allocate(&net.subnet, &used, ip)?;
        let endpoint = Endpoint {
            network: network.to_owned(),
            name: owner.to_owned(),
            ip,
            mac: MacAddr::for_ipv4(ip),
            location: Location::Reserved {
                node: node.to_owned(),
            },
            owner: Some(owner.to_owned()),
        };
        self.endpoints.push(endpoint.clone());
        Ok(endpoint)
    }

    /// Turns the container endpoint of `netns` on `node` back into a
    /// reservation of its address by the same owner (the container left,
    /// but the runtime's IPAM releases the address separately).
    pub fn release_to_reservation(
        &mut self,
        network: &str,
        node: &str,
        netns: &str,
    ) -> Result<Endpoint, ModelError> {
        let ep = self.remove_container(network, node, netns)?;
        let reserved = Endpoint {
            location: Location::Reserved {
                node: node.to_owned(),
            },
            ..ep
        };
        self.endpoints.push(reserved.clone());
        Ok(reserved)
    }

    /// Gives network `from` the name `to`, with its endpoints, and clears
    /// its pending Docker creation. VNI, subnet and addresses stay.
    pub fn rename_network(&mut self, from: &str, to: &str) -> Result<&Network, ModelError> {
        validate_name(to)?;
        self.network(from)?;
        if self.networks.contains_key(to) {
            return Err(ModelError::NetworkExists(to.to_owned()));
        }
        let mut net = self.networks.remove(from).expect("presence checked above");
        net.name = to.to_owned();
        net.docker_pending = None;
        for e in self.endpoints.iter_mut().filter(|e| e.network == from) {
            e.network = to.to_owned();
        }
        Ok(self.networks.entry(to.to_owned()).or_insert(net))
    }

    /// Registers an endpoint behind a VTEP that runs no ovl agent.
    pub fn add_static(
        &mut self,
        network: &str,
        ip: Ipv4Addr,
        mac: Option<MacAddr>,
        vtep: Ipv4Addr,
        name: Option<String>,
    ) -> Result<Endpoint, ModelError> {
        let net = self.network(network)?.clone();
        let used = self.endpoints_of(network).map(|e| e.ip).collect();
        let ip = ipam::allocate(&net.subnet, &used, Some(ip))?;
        let endpoint = Endpoint {
            network: network.to_owned(),
            name: name.unwrap_or_else(|| format!("static-{ip}")),
            ip,
            mac: mac.unwrap_or(MacAddr::for_ipv4(ip)),
            location: Location::Static { vtep },
            owner: None,
        };

        self.endpoints.push(endpoint.clone());
        Ok(endpoint)
    }

    /// Removes the endpoint of `netns` on `node` from `network`.
    pub fn remove_container(
        &mut self,
        network: &str,
        node: &str,
        netns: &str,
    ) -> Result<Endpoint, ModelError> {
        self.network(network)?;
        let pos = self
            .endpoints
            .iter()
            .position(|e| {
                e.network == network
                    && matches!(&e.location, Location::Container { node: n, netns: ns, .. }
                        if n == node && ns == netns)
            })
            .ok_or_else(|| ModelError::NotConnected {
                network: network.to_owned(),
                netns: netns.to_owned(),
                node: node.to_owned(),
            })?;
        Ok(self.endpoints.remove(pos))
    }

    /// Removes the endpoint with address `ip` from `network`.
    pub fn remove_endpoint(&mut self, network: &str, ip: Ipv4Addr) -> Result<Endpoint, ModelError> {
        self.network(network)?;
        let pos = self
            .endpoints
            .iter()
            .position(|e| e.network == network && e.ip == ip)
            .ok_or_else(|| ModelError::NoSuchEndpoint {
                network: network.to_owned(),
                ip,
            })?;
        Ok(self.endpoints.remove(pos))
    }

    /// Puts back an endpoint that was freed while its node was cut off, if
    /// its network still exists and its address is still free; returns
    /// whether it was restored.
    pub fn restore_endpoint(&mut self, ep: &Endpoint) -> bool {
        let free = self.networks.contains_key(&ep.network)
            && !self
                .endpoints
                .iter()
                .any(|e| e.network == ep.network && e.ip == ep.ip);
        if free {
            self.endpoints.push(ep.clone());
        }
        free
    }

    /// Records (or updates) a node and its VTEP address.
    pub fn register_node(&mut self, name: &str, vtep: Ipv4Addr) {
        self.nodes.insert(
            name.to_owned(),
            Node {
                name: name.to_owned(),
                vtep,
            },
        );
    }

    /// False when the store tracks liveness and `node`'s agent is gone.
    pub fn is_alive(&self, node: &str) -> bool {
        self.alive.as_ref().is_none_or(|a| a.contains(node))
    }

    /// The VTEP address that serves `endpoint`, when known.
    pub fn vtep_of(&self, endpoint: &Endpoint) -> Option<Ipv4Addr> {
        match &endpoint.location {
            Location::Container { node, .. } if self.is_alive(node) => {
                self.nodes.get(node).map(|n| n.vtep)
            }
            Location::Container { .. } | Location::Reserved { .. } => None,
            Location::Static { vtep } => Some(*vtep),
        }
    }
}

/// Checks a container MTU: 576..=9000 bytes.
pub fn check_mtu(mtu: u32) -> Result<u32, ModelError> {
    if (576..=9000).contains(&mtu) {
        Ok(mtu)
    } else {
        Err(ModelError::InvalidMtu(mtu))
    }
}

/// Name of the host end of a container veth: `ovl` + 8 hex digits of a
/// hash of (VNI, address), within the kernel's 15-character limit.
pub fn host_ifname(vni: Vni, ip: Ipv4Addr) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in vni.get().to_be_bytes().iter().chain(ip.octets().iter()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("ovl{h:08x}")
}

fn validate_name(name: &str) -> Result<(), ModelError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ModelError::InvalidName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, vni: Option<u32>) -> NetworkSpec {
        NetworkSpec {
            name: name.into(),
            subnet: "198.18.0.0/24".parse().unwrap(),
            vni,
            mtu: None,
        }
    }

    fn container(net: &str, node: &str, ns: &str) -> ContainerSpec {
        ContainerSpec {
            network: net.into(),
            node: node.into(),
            netns: ns.into(),
            name: None,
            ip: None,
            owner: None,
        }
    }

    #[test]
    fn vnis_are_allocated_from_4096_and_never_reused_while_taken() {
        let mut s = State::default();
        assert_eq!(s.create_network(spec("a", None)).unwrap().vni.get(), 4096);
        assert_eq!(
            s.create_network(spec("b", Some(4097))).unwrap().vni.get(),
            4097
        );
        assert_eq!(s.create_network(spec("c", None)).unwrap().vni.get(), 4098);
        s.remove_network("a").unwrap();
        assert_eq!(s.create_network(spec("d", None)).unwrap().vni.get(), 4096);
    }

    #[test]
    fn duplicate_vni_or_name_is_refused_and_state_untouched() {
        let mut s = State::default();
        s.create_network(spec("a", Some(7))).unwrap();
        let before = s.clone();
        assert!(matches!(
            s.create_network(spec("b", Some(7))),
            Err(ModelError::VniInUse { .. })
        ));
        assert!(matches!(
            s.create_network(spec("a", None)),
            Err(ModelError::NetworkExists(_))
        ));
        assert_eq!(
            s.create_network(spec("x", Some(0))).unwrap_err(),
            ModelError::InvalidVni(0)
        );
        assert!(s.create_network(spec("bad name", None)).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn default_mtu_is_underlay_minus_vxlan_overhead() {
        let mut s = State::default();
        assert_eq!(s.create_network(spec("a", None)).unwrap().mtu, 1450);
    }

    #[test]
    fn network_with_endpoints_cannot_be_removed() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.add_container(container("a", "n1", "c1")).unwrap();
        assert!(matches!(
            s.remove_network("a"),
            Err(ModelError::NetworkInUse { count: 1, .. })
        ));
        s.remove_container("a", "n1", "c1").unwrap();
        s.remove_network("a").unwrap();
    }

    #[test]
    fn containers_get_distinct_addresses_and_derived_macs() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let e1 = s.add_container(container("a", "n1", "c1")).unwrap();
        let e2 = s.add_container(container("a", "n2", "c2")).unwrap();
        assert_eq!(e1.ip, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(e2.ip, Ipv4Addr::new(198, 18, 0, 3));
        assert_eq!(e2.mac.to_string(), "02:42:c6:12:00:03");
        assert!(matches!(
            s.add_container(container("a", "n1", "c1")),
            Err(ModelError::AlreadyConnected { .. })
        ));
    }

    #[test]
    fn freed_endpoint_is_restored_only_while_its_address_is_free() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let ep = s.add_container(container("a", "n1", "c1")).unwrap();
        s.remove_container("a", "n1", "c1").unwrap();
        assert!(s.restore_endpoint(&ep));
        assert!(!s.restore_endpoint(&ep), "restored twice");
        s.remove_container("a", "n1", "c1").unwrap();
        let taken = s.add_container(container("a", "n2", "c9")).unwrap();
        assert_eq!(taken.ip, ep.ip);
        assert!(!s.restore_endpoint(&ep), "address was taken meanwhile");
    }

    #[test]
    fn a_reservation_holds_its_address_until_its_owner_takes_it_over() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let r = s.reserve("a", "n1", None, "docker:e1").unwrap();
        assert_eq!(r.ip, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(r.node(), Some("n1"));
        assert_eq!(s.vtep_of(&r), None, "a reservation forwards nothing");
        // Nobody else gets the address, nor may anyone else claim it.
        let other = s.add_container(container("a", "n2", "c2")).unwrap();
        assert_eq!(other.ip, Ipv4Addr::new(198, 18, 0, 3));
        let mut thief = container("a", "n2", "c3");
        thief.ip = Some(r.ip);
        thief.owner = Some("docker:e1".into());
        assert_eq!(
            s.add_container(thief),
            Err(ModelError::Ipam(ipam::IpamError::InUse(r.ip)))
        );
        // Its owner on its node takes it over.
        let mut mine = container("a", "n1", "/run/docker/netns/x");
        mine.ip = Some(r.ip);
        mine.owner = Some("docker:e1".into());
        let ep = s.add_container(mine).unwrap();
        assert_eq!(ep.ip, r.ip);
        assert!(matches!(ep.location, Location::Container { .. }));
        assert_eq!(s.endpoints_of("a").count(), 2);
        // Leaving the container keeps the address reserved.
        let back = s
            .release_to_reservation("a", "n1", "/run/docker/netns/x")
            .unwrap();
        assert_eq!(back.location, Location::Reserved { node: "n1".into() });
        assert_eq!(back.owner.as_deref(), Some("docker:e1"));
        s.remove_endpoint("a", r.ip).unwrap();
        assert_eq!(s.endpoints_of("a").count(), 1);
    }

    #[test]
    fn renaming_a_network_moves_its_endpoints_and_keeps_vni_and_addresses() {
        let mut s = State::default();
        s.create_network(spec("docker-pending", None)).unwrap();
        s.networks.get_mut("docker-pending").unwrap().docker_pending = Some(DockerPending {
            node: "n1".into(),
            network_id: Some("abc".into()),
        });
        s.create_network(spec("taken", None)).unwrap();
        let ep = s
            .add_container(container("docker-pending", "n1", "c1"))
            .unwrap();
        let before = s.clone();
        assert!(matches!(
            s.rename_network("docker-pending", "taken"),
            Err(ModelError::NetworkExists(_))
        ));
        assert!(s.rename_network("docker-pending", "bad name").is_err());
        assert_eq!(s, before);
        let net = s
            .rename_network("docker-pending", "uber-net")
            .unwrap()
            .clone();
        assert_eq!(net.vni, before.networks["docker-pending"].vni);
        assert_eq!(net.docker_pending, None);
        let moved: Vec<_> = s.endpoints_of("uber-net").collect();
        assert_eq!(moved.len(), 1);
        assert_eq!((moved[0].ip, moved[0].mac), (ep.ip, ep.mac));
        assert!(!s.networks.contains_key("docker-pending"));
    }

    #[test]
    fn networks_of_older_stores_load_without_the_docker_field() {
        let old = r#"{"name":"a","vni":4096,"subnet":"198.18.0.0/24","mtu":1450}"#;
        let net: Network = serde_json::from_str(old).unwrap();
        assert_eq!(net.docker_pending, None);
        assert!(!serde_json::to_string(&net).unwrap().contains("docker"));
    }

    #[test]
    fn host_ifname_fits_kernel_limit_and_differs_per_endpoint() {
        let a = host_ifname(Vni(4096), Ipv4Addr::new(198, 18, 0, 2));
        let b = host_ifname(Vni(4096), Ipv4Addr::new(198, 18, 0, 3));
        assert!(a.len() <= 15);
        assert_ne!(a, b);
    }

    #[test]
    fn mac_parses_and_prints_round_trip() {
        let m: MacAddr = "02:42:c6:12:00:02".parse().unwrap();
        assert_eq!(m.to_string(), "02:42:c6:12:00:02");
        assert!("02:42:c6:12:00".parse::<MacAddr>().is_err());
        assert!("02:42:c6:12:00:zz".parse::<MacAddr>().is_err());
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.add_container(container("a", "n1", "c1")).unwrap();
        s.add_static(
            "a",
            Ipv4Addr::new(198, 18, 0, 9),
            None,
            Ipv4Addr::new(192, 0, 2, 5),
            None,
        )
        .unwrap();
        s.register_node("n1", Ipv4Addr::new(192, 0, 2, 10));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<State>(&json).unwrap(), s);
    }
}
