//! The desired state of every ovl network: networks, endpoints and nodes,
//! the identifiers that name them, and the rules every change obeys.
//! Stores persist a `State`; agents turn it into map entries.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use ovl_common::wire::{ENCAP_OVERHEAD, VNI_MAX, mac_for_ipv4};
use serde::{Deserialize, Serialize};

use crate::{
    ipam::{self, Subnet},
    release::{AddressConflict, GraceClock, Released, RestoreOutcome, Verdict},
    validate::{self, InvalidInput},
};

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
        "invalid endpoint name or alias {name:?}: {why}; use DNS labels (letters, digits, '-', '_'; 1-63 characters each, not starting or ending with '-') joined by dots, at most 253 characters"
    )]
    InvalidEndpointName { name: String, why: &'static str },
    #[error(
        "name {name:?} is already taken on network {network:?} by {holder} ({ip}); names and aliases are unique per network (ignoring case): pick another --name or --alias"
    )]
    NameTaken {
        name: String,
        network: String,
        holder: String,
        ip: Ipv4Addr,
    },
    #[error(transparent)]
    Ipam(#[from] ipam::IpamError),
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error(
        "subnet {subnet} contains {vtep}, the underlay address (VTEP) of node {node:?}: routing it into the overlay would cut the node off; pick another subnet"
    )]
    SubnetCoversVtep {
        subnet: Subnet,
        node: String,
        vtep: Ipv4Addr,
    },
    #[error(
        "{vtep} is the VTEP of ovl node {node:?}, which serves its own containers; `ovl endpoint add` is for hosts that run no ovl agent"
    )]
    VtepOfNode { vtep: Ipv4Addr, node: String },
    #[error(
        "{ip} on network {network:?} was freed {ago_s} s ago and is held back {left_s} s more (--address-grace) in case its holder was only cut off; pick another address or wait"
    )]
    AddressHeld {
        network: String,
        ip: Ipv4Addr,
        ago_s: u64,
        left_s: u64,
    },
    #[error(
        "no free address in {subnet} of network {network:?}: {held} freed address(es) are held back (--address-grace); wait for the grace to pass or disconnect stale endpoints"
    )]
    AllFreeAddressesHeld {
        network: String,
        subnet: Subnet,
        held: usize,
    },
    #[error("no node named {0:?}; list nodes with `ovl node ls`")]
    NoSuchNode(String),
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
    /// More names the endpoint answers to in its network's DNS; with the
    /// name, unique per network (ignoring case). Absent in stores written
    /// before aliases existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

impl Endpoint {
    /// The node hosting a container endpoint.
    pub fn node(&self) -> Option<&str> {
        match &self.location {
            Location::Container { node, .. } => Some(node),
            Location::Static { .. } => None,
        }
    }

    /// The endpoint's name and aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.aliases.iter().map(String::as_str))
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
    /// Addresses freed recently: held back from allocation for a while.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<Released>,
    /// Per node, the addresses it found taken when it put back its
    /// endpoints (its last attempt).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub conflicts: BTreeMap<String, Vec<AddressConflict>>,
    /// Now, and how long freed addresses are held back: set by the store
    /// before each change.
    #[serde(skip)]
    pub clock: GraceClock,
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
            released: Vec::new(),
            conflicts: BTreeMap::new(),
            clock: GraceClock::default(),
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
        validate::subnet(&spec.subnet)?;
        self.check_clear_of_vteps(&spec.subnet)?;
        if self.networks.contains_key(&spec.name) {
            return Err(ModelError::NetworkExists(spec.name));
        }
        let mtu = spec.mtu.unwrap_or(DEFAULT_UNDERLAY_MTU - ENCAP_OVERHEAD);
        if !(576..=9000).contains(&mtu) {
            return Err(ModelError::InvalidMtu(mtu));
        }
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
        };
        Ok(self.networks.entry(spec.name).or_insert(network))
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
        self.released.retain(|r| r.network != name);
        Ok(self.networks.remove(name).expect("presence checked above"))
    }

    /// Registers a container endpoint, allocating its address (IPAM) unless
    /// one is given. The host interface name is derived from network and
    /// address so it is stable and unique on the node.
    pub fn add_container(&mut self, spec: ContainerSpec) -> Result<Endpoint, ModelError> {
        validate::node_name(&spec.node)?;
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
        if let Some(name) = &spec.name {
            validate_endpoint_name(name)?;
        }
        let name = spec.name.unwrap_or_else(|| spec.netns.clone());
        self.check_names_free(&spec.network, None, [name.as_str()])?;
        let ip = self.allocate(&network, spec.ip)?;
        let endpoint = Endpoint {
            network: spec.network,
            name,
            ip,
            mac: MacAddr::for_ipv4(ip),
            location: Location::Container {
                node: spec.node,
                netns: spec.netns,
                host_ifname: host_ifname(network.vni, ip),
            },
            owner: spec.owner,
            aliases: Vec::new(),
        };
        self.endpoints.push(endpoint.clone());
        Ok(endpoint)
    }

    /// Gives endpoint `ip` of `network` a new name (if `name` is given) and
    /// these aliases (replacing its aliases), each a DNS name unique in the
    /// network. Refused, changing nothing, when one is invalid or taken.
    pub fn set_names(
        &mut self,
        network: &str,
        ip: Ipv4Addr,
        name: Option<String>,
        aliases: Vec<String>,
    ) -> Result<Endpoint, ModelError> {
        self.network(network)?;
        let pos = self
            .endpoints
            .iter()
            .position(|e| e.network == network && e.ip == ip)
            .ok_or_else(|| ModelError::NoSuchEndpoint {
                network: network.to_owned(),
                ip,
            })?;
        if let Some(name) = &name {
            validate_endpoint_name(name)?;
        }
        for alias in &aliases {
            validate_endpoint_name(alias)?;
        }
        let name = name.unwrap_or_else(|| self.endpoints[pos].name.clone());
        // An alias repeating the name or another alias adds nothing.
        let mut seen = std::collections::BTreeSet::from([name.to_ascii_lowercase()]);
        let aliases: Vec<String> = aliases
            .into_iter()
            .filter(|a| seen.insert(a.to_ascii_lowercase()))
            .collect();
        self.check_names_free(
            network,
            Some(ip),
            std::iter::once(name.as_str()).chain(aliases.iter().map(String::as_str)),
        )?;
        let ep = &mut self.endpoints[pos];
        ep.name = name;
        ep.aliases = aliases;
        Ok(ep.clone())
    }

    /// Fails when any of `names` is a name or alias of another endpoint of
    /// `network` than the one at `except`.
    fn check_names_free<'a>(
        &self,
        network: &str,
        except: Option<Ipv4Addr>,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ModelError> {
        for wanted in names {
            let holder = self
                .endpoints_of(network)
                .filter(|e| Some(e.ip) != except)
                .find(|e| e.names().any(|n| n.eq_ignore_ascii_case(wanted)));
            if let Some(e) = holder {
                return Err(ModelError::NameTaken {
                    name: wanted.to_owned(),
                    network: network.to_owned(),
                    holder: e.name.clone(),
                    ip: e.ip,
                });
            }
        }
        Ok(())
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
        validate::vtep(vtep)?;
        if let Some(n) = self.nodes.values().find(|n| n.vtep == vtep) {
            return Err(ModelError::VtepOfNode {
                vtep,
                node: n.name.clone(),
            });
        }
        if let Some(mac) = mac {
            validate::mac(mac)?;
        }
        if let Some(name) = &name {
            validate_endpoint_name(name)?;
        }
        let ip = self.allocate(&net, Some(ip))?;
        let name = name.unwrap_or_else(|| format!("static-{ip}"));
        self.check_names_free(network, None, [name.as_str()])?;
        let endpoint = Endpoint {
            network: network.to_owned(),
            name,
            ip,
            mac: mac.unwrap_or(MacAddr::for_ipv4(ip)),
            location: Location::Static { vtep },
            owner: None,
            aliases: Vec::new(),
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
            self.forget_release(&ep.network, ep.ip);
            self.endpoints.push(ep.clone());
        }
        free
    }

    /// Puts back `node`'s endpoints `wanted` that the store lost, where
    /// their address is still free (held back or not: the grace exists for
    /// this), and records the addresses taken meanwhile under the node
    /// (replacing what its previous attempt recorded).
    pub fn restore_endpoints(&mut self, node: &str, wanted: &[Endpoint]) -> RestoreOutcome {
        let mut out = RestoreOutcome::default();
        for ep in wanted.iter().filter(|e| e.node() == Some(node)) {
            let holder = self
                .endpoints
                .iter()
                .find(|e| e.network == ep.network && e.ip == ep.ip);
            let exists = self.networks.contains_key(&ep.network);
            match crate::release::judge(ep, holder, exists, self.clock.now_ms) {
                Verdict::Present => out.present += 1,
                Verdict::Restore => {
                    self.forget_release(&ep.network, ep.ip);
                    self.endpoints.push(ep.clone());
                    out.restored.push(ep.clone());
                }
                Verdict::NetworkGone => out.networks_gone.push(ep.clone()),
                Verdict::Conflict(c) => out.conflicts.push(c),
            }
        }
        if out.conflicts.is_empty() {
            self.conflicts.remove(node);
        } else {
            self.conflicts
                .insert(node.to_owned(), out.conflicts.clone());
        }
        out
    }

    /// Endpoints of node `name`.
    pub fn endpoints_of_node<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Endpoint> + 'a {
        self.endpoints
            .iter()
            .filter(move |e| e.node() == Some(name))
    }

    /// Removes node `name`: its record, its endpoints (their addresses are
    /// held back like any freed address) and its recorded conflicts.
    /// Whether the node is dead is the caller's to check.
    pub fn remove_node(&mut self, name: &str) -> Result<Vec<Endpoint>, ModelError> {
        if !self.nodes.contains_key(name) && self.endpoints_of_node(name).next().is_none() {
            return Err(ModelError::NoSuchNode(name.to_owned()));
        }
        let mut gone = Vec::new();
        while let Some(pos) = self.endpoints.iter().position(|e| e.node() == Some(name)) {
            gone.push(self.release(pos));
        }
        self.nodes.remove(name);
        self.conflicts.remove(name);
        Ok(gone)
    }

    /// Removes endpoint `pos` and holds its address back: its holder did
    /// not let go of it (its node died or was removed), it may only be cut
    /// off. Addresses let go of (`disconnect`, `endpoint rm`) are free at
    /// once.
    fn release(&mut self, pos: usize) -> Endpoint {
        let ep = self.endpoints.remove(pos);
        self.forget_release(&ep.network, ep.ip);
        self.released.push(Released::of(&ep, self.clock.now_ms));
        ep
    }

    fn forget_release(&mut self, network: &str, ip: Ipv4Addr) {
        self.released
            .retain(|r| !(r.network == network && r.ip == ip));
    }

    /// Picks an address of `network` for a new endpoint (`requested`, or
    /// the lowest free one), skipping addresses still held back after
    /// their release; an expired hold is dropped when its address is
    /// handed out again.
    fn allocate(
        &mut self,
        network: &Network,
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, ModelError> {
        let mut used: std::collections::BTreeSet<Ipv4Addr> =
            self.endpoints_of(&network.name).map(|e| e.ip).collect();
        let mut held = 0;
        for r in self.released.iter().filter(|r| r.network == network.name) {
            let Some(left) = self.clock.remaining(r) else {
                continue;
            };
            if requested == Some(r.ip) {
                return Err(ModelError::AddressHeld {
                    network: network.name.clone(),
                    ip: r.ip,
                    ago_s: self.clock.now_ms.saturating_sub(r.at_ms) / 1000,
                    left_s: left.as_secs_f64().ceil() as u64,
                });
            }
            held += usize::from(used.insert(r.ip));
        }
        let ip = match ipam::allocate(&network.subnet, &used, requested) {
            Err(ipam::IpamError::Exhausted(subnet)) if held > 0 => {
                return Err(ModelError::AllFreeAddressesHeld {
                    network: network.name.clone(),
                    subnet,
                    held,
                });
            }
            other => other?,
        };
        self.forget_release(&network.name, ip);
        Ok(ip)
    }

    /// Refuses `subnet` if it contains a registered node's VTEP.
    fn check_clear_of_vteps(&self, subnet: &Subnet) -> Result<(), ModelError> {
        match self.nodes.values().find(|n| subnet.contains(n.vtep)) {
            Some(n) => Err(ModelError::SubnetCoversVtep {
                subnet: *subnet,
                node: n.name.clone(),
                vtep: n.vtep,
            }),
            None => Ok(()),
        }
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
            Location::Container { .. } => None,
            Location::Static { vtep } => Some(*vtep),
        }
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

/// Checks that `name` can be asked for in DNS (RFC 1123 host names, plus
/// '_' as Docker allows in container names): labels of 1-63 characters
/// from [A-Za-z0-9_-], not starting or ending with '-', joined by dots,
/// at most 253 characters, and not an IPv4 address.
pub fn validate_endpoint_name(name: &str) -> Result<(), ModelError> {
    let bad = |why| {
        Err(ModelError::InvalidEndpointName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 253 {
        return bad("it is longer than 253 characters");
    }
    if name.parse::<Ipv4Addr>().is_ok() {
        return bad("it is an IPv4 address");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("it has an empty label (two dots in a row, or a dot at an end)");
        }
        if label.len() > 63 {
            return bad("a label is longer than 63 characters");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad("it has a character other than letters, digits, '-', '_' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
    }
    Ok(())
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

    fn named(net: &str, node: &str, ns: &str, name: &str) -> ContainerSpec {
        ContainerSpec {
            name: Some(name.into()),
            ..container(net, node, ns)
        }
    }

    #[test]
    fn names_and_aliases_are_unique_per_network_ignoring_case() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.create_network(spec("b", Some(7))).unwrap();
        let web = s.add_container(named("a", "n1", "c1", "web")).unwrap();
        s.set_names(
            "a",
            web.ip,
            None,
            vec!["www".into(), "WWW".into(), "web".into()],
        )
        .unwrap();
        assert_eq!(s.endpoints[0].aliases, vec!["www".to_string()]);
        let before = s.clone();
        for clash in ["web", "Web", "WWW"] {
            let err = s
                .add_container(named("a", "n2", "c2", clash))
                .expect_err("a taken name must be refused");
            assert!(
                matches!(&err, ModelError::NameTaken { holder, ip, .. } if holder == "web" && *ip == web.ip),
                "{err:?}"
            );
            assert!(err.to_string().contains("--name"), "{err}");
        }
        let other = s.add_container(named("a", "n2", "c2", "db")).unwrap();
        assert!(matches!(
            s.set_names("a", other.ip, None, vec!["www".into()]),
            Err(ModelError::NameTaken { .. })
        ));
        s.remove_container("a", "n2", "c2").unwrap();
        assert_eq!(s, before, "refusals changed nothing");
        // Another network has names of its own.
        s.add_container(named("b", "n2", "c3", "web")).unwrap();
    }

    #[test]
    fn endpoint_names_must_be_dns_names() {
        for good in [
            "web",
            "web-1",
            "my_app",
            "db.internal",
            "a1",
            "x".repeat(63).as_str(),
        ] {
            validate_endpoint_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            "-web",
            "web-",
            "we b",
            "web.",
            "a..b",
            "/run/netns/x",
            "198.18.0.2",
            "x".repeat(64).as_str(),
        ] {
            assert!(
                matches!(
                    validate_endpoint_name(bad),
                    Err(ModelError::InvalidEndpointName { .. })
                ),
                "{bad:?} accepted"
            );
        }
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        assert!(s.add_container(named("a", "n1", "c1", "bad name")).is_err());
        assert!(s.endpoints.is_empty());
        // A default name (the namespace) need not be a DNS name.
        s.add_container(container("a", "n1", "/proc/42/ns/net"))
            .unwrap();
    }

    #[test]
    fn endpoints_stored_before_aliases_load_without_them() {
        let old = r#"{"network":"a","name":"web","ip":"198.18.0.2","mac":"02:42:c6:12:00:02","location":{"kind":"static","vtep":"192.0.2.5"}}"#;
        let ep: Endpoint = serde_json::from_str(old).unwrap();
        assert!(ep.aliases.is_empty());
        assert!(!serde_json::to_string(&ep).unwrap().contains("aliases"));
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let c1 = s.add_container(container("a", "n1", "c1")).unwrap();
        s.set_names("a", c1.ip, Some("web".into()), vec!["www".into()])
            .unwrap();
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

    fn at(now_s: u64) -> GraceClock {
        GraceClock {
            now_ms: now_s * 1000,
            grace: std::time::Duration::from_secs(60),
        }
    }

    #[test]
    fn a_freed_address_is_held_back_for_the_grace_then_reused() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.clock = at(1000);
        let first = s.add_container(container("a", "n1", "c1")).unwrap();
        s.remove_node("n1").unwrap();
        // Held back: the next container gets another address, and asking
        // for the freed one names the grace.
        s.clock = at(1030);
        let other = s.add_container(container("a", "n2", "c2")).unwrap();
        assert_ne!(other.ip, first.ip);
        let mut asked = container("a", "n2", "c3");
        asked.ip = Some(first.ip);
        let err = s.add_container(asked.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::AddressHeld {
                    ago_s: 30,
                    left_s: 30,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("--address-grace"), "{err}");
        // Past the grace it is handed out again and its record dropped.
        s.clock = at(1060);
        assert_eq!(s.add_container(asked).unwrap().ip, first.ip);
        assert!(s.released.is_empty());
    }

    #[test]
    fn a_full_subnet_with_held_addresses_says_so() {
        let mut s = State::default();
        s.create_network(NetworkSpec {
            name: "small".into(),
            subnet: "198.18.0.0/29".parse().unwrap(),
            vni: None,
            mtu: None,
        })
        .unwrap();
        s.clock = at(5);
        s.add_container(container("small", "gone", "c0")).unwrap();
        for i in 1..5 {
            s.add_container(container("small", "n", &format!("c{i}")))
                .unwrap();
        }
        s.remove_node("gone").unwrap();
        let err = s.add_container(container("small", "n", "x")).unwrap_err();
        assert!(
            matches!(err, ModelError::AllFreeAddressesHeld { held: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn restoring_puts_back_free_addresses_and_records_taken_ones_under_the_node() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.clock = at(100);
        let mine: Vec<Endpoint> = (0..3)
            .map(|i| {
                s.add_container(container("a", "n1", &format!("c{i}")))
                    .unwrap()
            })
            .collect();
        s.remove_node("n1").unwrap();
        // Held back for n1, but explicitly taken by n2 after the grace.
        s.clock = at(200);
        let mut take = container("a", "n2", "thief");
        take.ip = Some(mine[1].ip);
        s.add_container(take).unwrap();
        let out = s.restore_endpoints("n1", &mine);
        assert_eq!(out.restored, vec![mine[0].clone(), mine[2].clone()]);
        assert_eq!(out.conflicts.len(), 1);
        assert_eq!(out.conflicts[0].holder_name, "thief");
        assert_eq!(s.conflicts["n1"], out.conflicts);
        // Again: the two are present, the conflict stays until it is gone.
        let again = s.restore_endpoints("n1", &mine);
        assert_eq!((again.present, again.conflicts.len()), (2, 1));
        s.remove_container("a", "n2", "thief").unwrap();
        s.clock = at(400);
        let healed = s.restore_endpoints("n1", &mine);
        assert_eq!(healed.restored, vec![mine[1].clone()]);
        assert!(!s.conflicts.contains_key("n1"));
    }

    #[test]
    fn removing_a_node_frees_its_endpoints_and_holds_their_addresses() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.register_node("n1", Ipv4Addr::new(192, 0, 2, 10));
        s.add_container(container("a", "n1", "c1")).unwrap();
        s.add_container(container("a", "n2", "c2")).unwrap();
        assert_eq!(s.remove_node("n1").unwrap().len(), 1);
        assert_eq!(s.endpoints.len(), 1);
        assert_eq!(s.released.len(), 1);
        assert!(!s.nodes.contains_key("n1"));
        assert_eq!(
            s.remove_node("n1"),
            Err(ModelError::NoSuchNode("n1".into()))
        );
    }

    #[test]
    fn bad_nodes_vteps_macs_and_subnets_are_refused_before_any_change() {
        let mut s = State::default();
        s.register_node("n1", Ipv4Addr::new(192, 0, 2, 10));
        let covering = NetworkSpec {
            subnet: "192.0.2.0/24".parse().unwrap(),
            ..spec("x", None)
        };
        assert!(matches!(
            s.create_network(covering),
            Err(ModelError::SubnetCoversVtep { .. })
        ));
        let multicast = NetworkSpec {
            subnet: "224.1.0.0/16".parse().unwrap(),
            ..spec("x", None)
        };
        assert!(matches!(
            s.create_network(multicast),
            Err(ModelError::Invalid(_))
        ));
        s.create_network(spec("a", None)).unwrap();
        let before = s.clone();
        let ip = Ipv4Addr::new(198, 18, 0, 9);
        assert!(matches!(
            s.add_container(container("a", "..", "c1")),
            Err(ModelError::Invalid(_))
        ));
        for vtep in [[0, 0, 0, 0], [224, 0, 0, 5], [127, 0, 0, 1]] {
            assert!(matches!(
                s.add_static("a", ip, None, Ipv4Addr::from(vtep), None),
                Err(ModelError::Invalid(_))
            ));
        }
        assert!(matches!(
            s.add_static("a", ip, None, Ipv4Addr::new(192, 0, 2, 10), None),
            Err(ModelError::VtepOfNode { .. })
        ));
        for mac in ["01:00:5e:00:00:01", "00:00:00:00:00:00"] {
            assert!(matches!(
                s.add_static(
                    "a",
                    ip,
                    Some(mac.parse().unwrap()),
                    Ipv4Addr::new(192, 0, 2, 50),
                    None
                ),
                Err(ModelError::Invalid(_))
            ));
        }
        assert_eq!(s, before);
    }

    #[test]
    fn an_address_let_go_of_is_free_at_once() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.clock = at(10);
        let ep = s.add_container(container("a", "n1", "c1")).unwrap();
        s.remove_container("a", "n1", "c1").unwrap();
        assert!(s.released.is_empty());
        assert_eq!(
            s.add_container(container("a", "n1", "c2")).unwrap().ip,
            ep.ip
        );
    }
}
