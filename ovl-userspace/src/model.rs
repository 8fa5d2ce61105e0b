//! The desired state of every ovl network: networks, endpoints and nodes,
//! the identifiers that name them, and the rules every change obeys.
//! Stores persist a `State`; agents turn it into map entries.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use ovl_common::wire::{
    ANYCAST_GATEWAY_MAC, ENCAP_OVERHEAD, VNI_MAX, VXLAN_PORT, WIREGUARD_OVERHEAD, mac_for_ipv4,
};
use serde::{Deserialize, Serialize};

use crate::{
    capacity,
    ipam::{self, IpRange, Pool, Subnet},
    ports::{self, PortError, Protocol, PublishedPort},
    release::{AddressConflict, GraceClock, Released, RestoreOutcome, Verdict},
    validate::{self, InvalidInput},
};

/// Version of the persisted schema; bumped when a migration is needed.
pub const SCHEMA_VERSION: u32 = 1;
/// First VNI handed out automatically (Docker's overlay starts there too).
pub const FIRST_AUTO_VNI: u32 = 4096;
/// Underlay MTU assumed when a network is created without `--mtu` and no
/// node has said what its underlay carries.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// Largest network MTU: a 9000-byte jumbo underlay less VXLAN's overhead
/// leaves 8950, and this bound leaves room for 9216-byte fabrics.
pub const MAX_MTU: u32 = 9000;
/// The VXLAN ports `ovl cluster set` takes, Docker's for its data path
/// (`--data-path-port`): above the well-known ports the hosts' own
/// services use, below the ephemeral ones their sockets are given.
pub const VXLAN_PORTS: std::ops::RangeInclusive<u16> = 1024..=49151;

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
    #[error(
        "MTU {mtu} does not fit node {node:?}: its underlay MTU {underlay_mtu} carries at most {} after {encapsulation}'s {overhead} bytes; pass --mtu {} or less, or omit it",
        underlay_mtu.saturating_sub(*overhead),
        underlay_mtu.saturating_sub(*overhead)
    )]
    MtuTooBig {
        mtu: u32,
        node: String,
        underlay_mtu: u32,
        /// What the underlay carries around a container's packet, and
        /// its bytes: an encrypted network's is VXLAN in WireGuard.
        encapsulation: &'static str,
        overhead: u32,
    },
    #[error("a network needs at least one --subnet")]
    NoSubnet,
    #[error("subnets {0} and {1} overlap; the subnets of one network must be disjoint")]
    OverlappingSubnets(Subnet, Subnet),
    #[error(
        "gateway {gateway} is in none of the network's subnets ({subnets}); each --gateway must be a host address of one of them"
    )]
    GatewayOutsideSubnets { gateway: Ipv4Addr, subnets: String },
    #[error(
        "gateway {gateway} is the network or broadcast address of {subnet}; pick a host address"
    )]
    GatewayNotHost { gateway: Ipv4Addr, subnet: Subnet },
    #[error("subnet {subnet} got two gateways, {first} and {second}; give at most one per subnet")]
    TwoGateways {
        subnet: Subnet,
        first: Ipv4Addr,
        second: Ipv4Addr,
    },
    #[error(
        "IP range {range} lies in none of the network's subnets ({subnets}); each --ip-range must be inside one of them"
    )]
    RangeOutsideSubnets { range: IpRange, subnets: String },
    #[error("subnet {subnet} got two IP ranges, {first} and {second}; give at most one per subnet")]
    TwoRanges {
        subnet: Subnet,
        first: IpRange,
        second: IpRange,
    },
    #[error(
        "IP range {range} of subnet {subnet} holds no address an endpoint could get (only the subnet's network, broadcast or gateway address); give a larger range"
    )]
    RangeWithoutRoom { range: IpRange, subnet: Subnet },
    #[error(
        "auxiliary address {name}={ip} would leave IP range {range} of subnet {subnet} no address an endpoint could get (the rest are its gateway or auxiliary addresses); give a larger --ip-range or keep an address of it free"
    )]
    AuxFillsRange {
        name: String,
        ip: Ipv4Addr,
        range: IpRange,
        subnet: Subnet,
    },
    #[error(
        "auxiliary address {name}={ip} is not a host address of the network's subnets ({subnets}) other than a gateway; give one that is"
    )]
    AuxNotAssignable {
        name: String,
        ip: Ipv4Addr,
        subnets: String,
    },
    #[error(
        "invalid auxiliary address name {0:?}: use 1-64 characters from [A-Za-z0-9_.-], the first a letter or digit"
    )]
    InvalidAuxName(String),
    #[error("auxiliary addresses {first} and {second} are both {ip}; give each address once")]
    AuxTwice {
        ip: Ipv4Addr,
        first: String,
        second: String,
    },
    #[error("auxiliary address name {0:?} is given twice; give each name once")]
    AuxNameTwice(String),
    #[error(
        "{ip} on network {network:?} is reserved as auxiliary address {name:?} (--aux-address) and is never given to an endpoint; pick another address"
    )]
    AuxAddress {
        network: String,
        ip: Ipv4Addr,
        name: String,
    },
    #[error("{0} is the MAC of ovl's gateways; give the endpoint another --mac")]
    GatewayMac(MacAddr),
    #[error(
        "{mac} is in 02:42:…, where ovl gives each container 02:42 + its IPv4 address ({own} for {ip}); give a MAC outside 02:42:… or none"
    )]
    MacOfOvl {
        mac: MacAddr,
        ip: Ipv4Addr,
        own: MacAddr,
    },
    #[error(
        "MAC {mac} is already used on network {network:?} by {holder} ({ip}); give another MAC or none"
    )]
    MacTaken {
        mac: MacAddr,
        network: String,
        holder: String,
        ip: Ipv4Addr,
    },
    #[error(
        "invalid VXLAN port {0}: use {first}..={last} (4789 is IANA's, 8472 Linux's and Flannel's); lower ports are the hosts' well-known services', higher ones their sockets' ephemeral ports, whose traffic decapsulation would take",
        first = VXLAN_PORTS.start(),
        last = VXLAN_PORTS.end()
    )]
    InvalidVxlanPort(u16),
    #[error("VXLAN port {port} is taken: {holder}; pick another")]
    VxlanPortTaken { port: u16, holder: String },
    #[error(
        "invalid network name {0:?}: use 1-64 characters from [A-Za-z0-9_.-], the first a letter or digit"
    )]
    InvalidName(String),
    #[error(
        "namespace {netns:?} is already connected to network {network:?}; disconnect it first (`ovl disconnect {network} {netns}`) to connect it again"
    )]
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
        "{ip} on network {network:?} is not a static endpoint (`ovl endpoint add`) but {holder}; nothing was changed"
    )]
    NotStatic {
        network: String,
        ip: Ipv4Addr,
        /// What holds it, and how to free it.
        holder: String,
    },
    #[error(
        "invalid endpoint name or alias {name:?}: {why}; use DNS labels (letters, digits, '-', '_'; 1-63 characters each, not starting or ending with '-') joined by dots, at most 253 characters"
    )]
    InvalidEndpointName { name: String, why: &'static str },
    #[error(
        "name {name:?} is already taken on network {network:?} by {holder} ({ip}); names are unique per network (ignoring case; aliases may be shared): pick another --name"
    )]
    NameTaken {
        name: String,
        network: String,
        holder: String,
        ip: Ipv4Addr,
    },
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
        "no free address in {subnets} of network {network:?}: {held} freed address(es) are held back (--address-grace); wait for the grace to pass or disconnect stale endpoints"
    )]
    AllFreeAddressesHeld {
        network: String,
        subnets: String,
        held: usize,
    },
    #[error("no node named {0:?}; list nodes with `ovl node ls`")]
    NoSuchNode(String),
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(
        "network {0:?} is internal: its containers have no way out of it, so none of their ports can be published; connect the container to a network that is not --internal to publish"
    )]
    PublishOnInternal(String),
    #[error(
        "{port} would take the overlay's own traffic to node {node:?} ({what} on UDP port {}) to the container; pick another host port",
        port.host_port
    )]
    PortOfOverlay {
        port: PublishedPort,
        node: String,
        what: &'static str,
    },
    #[error(transparent)]
    HostPortInUse(#[from] crate::ports::HostPortInUse),
    #[error(
        "{port} is already published on node {node:?} by {holder} ({ip} on network {network:?}); pick another host port, or disconnect that endpoint first"
    )]
    PortTaken {
        port: PublishedPort,
        node: String,
        holder: String,
        network: String,
        ip: Ipv4Addr,
    },
    #[error(
        "the cluster would hold {wanted} {what}, more than the {max} a node's {map} map holds (any node may serve every network); nothing was changed: {hint}",
        what = limit.what(),
        max = limit.limit(),
        map = limit.map(),
        hint = limit.hint()
    )]
    OverCapacity {
        limit: crate::capacity::Limit,
        wanted: usize,
    },
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

/// An overlay network: one VNI, one or more subnets routed to each other
/// by their gateways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NetworkRecord", into = "NetworkRecord")]
pub struct Network {
    pub name: String,
    pub vni: Vni,
    /// Its subnets and their gateways, in the order IPAM fills them;
    /// never empty, never overlapping.
    pub subnets: Vec<Pool>,
    /// MTU of container interfaces on this network.
    pub mtu: u32,
    /// No way out of the overlay (Docker's `--internal`): no default route,
    /// no external egress.
    pub internal: bool,
    /// Traffic between nodes leaves only encrypted (WireGuard).
    pub encrypted: bool,
    /// Addresses of the subnets never given to an endpoint, by name
    /// (Docker's `--aux-address`: a router or a host outside ovl that
    /// uses them).
    pub aux_addresses: BTreeMap<String, Ipv4Addr>,
    /// Set while a network made through Docker's plugin waits for the name
    /// Docker gave it (Docker's calls carry only its ID); the network then
    /// takes that name. Front ends do not show such a network to users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_pending: Option<DockerPending>,
    /// VNIs its subnets were named by before they were this network's
    /// under its VNI: those of networks merged into it
    /// ([`State::merge_network`]) and the one it had before it was
    /// renumbered ([`State::renumber_network`]). A front end named the
    /// subnets by them (Docker's pool IDs, `<vni>:<subnet>`), so they stay
    /// this network's, given to no other, for as long as it exists.
    pub kept_vnis: Vec<KeptVni>,
}

/// A VNI a network keeps for one of its subnets ([`Network::kept_vnis`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptVni {
    pub subnet: Subnet,
    pub vni: Vni,
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

/// How a network is stored. `subnets` holds every subnet; `subnet`, the
/// only field of networks stored before there could be several (and then
/// with the first address as gateway), is still written with the first
/// subnet so that ovl versions from before can use the network.
#[derive(Serialize, Deserialize)]
struct NetworkRecord {
    name: String,
    vni: Vni,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subnet: Option<Subnet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    subnets: Vec<Pool>,
    mtu: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    internal: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    encrypted: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    aux_addresses: BTreeMap<String, Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    docker_pending: Option<DockerPending>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    kept_vnis: Vec<KeptVni>,
}

impl TryFrom<NetworkRecord> for Network {
    type Error = String;
    fn try_from(r: NetworkRecord) -> Result<Self, String> {
        let subnets = if !r.subnets.is_empty() {
            r.subnets
        } else if let Some(subnet) = r.subnet {
            vec![Pool::of(subnet)]
        } else {
            return Err(format!("network {:?} has no subnet", r.name));
        };
        Ok(Network {
            name: r.name,
            vni: r.vni,
            subnets,
            mtu: r.mtu,
            internal: r.internal,
            encrypted: r.encrypted,
            aux_addresses: r.aux_addresses,
            docker_pending: r.docker_pending,
            kept_vnis: r.kept_vnis,
        })
    }
}

impl From<Network> for NetworkRecord {
    fn from(n: Network) -> Self {
        NetworkRecord {
            name: n.name,
            vni: n.vni,
            subnet: n.subnets.first().map(|p| p.subnet),
            subnets: n.subnets,
            mtu: n.mtu,
            internal: n.internal,
            encrypted: n.encrypted,
            aux_addresses: n.aux_addresses,
            docker_pending: n.docker_pending,
            kept_vnis: n.kept_vnis,
        }
    }
}

/// What a container's side of its veth gets besides its address: its
/// subnet's prefix and gateway, and the routes through that gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRoutes {
    /// Prefix length of the container's subnet (its on-link route).
    pub prefix: u8,
    /// The gateway of the container's subnet.
    pub gateway: Ipv4Addr,
    /// Destinations reached through the gateway: the default route (0/0)
    /// when the network leads out, else the network's other subnets.
    pub via_gateway: Vec<(Ipv4Addr, u8)>,
}

impl Network {
    /// The name of auxiliary address `ip`, if it is one.
    pub fn aux_name(&self, ip: Ipv4Addr) -> Option<&str> {
        self.aux_addresses
            .iter()
            .find(|(_, a)| **a == ip)
            .map(|(name, _)| name.as_str())
    }

    /// The pool whose subnet holds `ip`.
    pub fn pool_of(&self, ip: Ipv4Addr) -> Option<&Pool> {
        self.subnets.iter().find(|p| p.subnet.contains(ip))
    }

    /// The subnets, for people: "198.18.0.0/24,198.18.1.0/24".
    pub fn subnets_text(&self) -> String {
        self.subnets
            .iter()
            .map(|p| p.subnet.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The routes a container with address `ip` gets; `None` when `ip` is
    /// in none of the subnets.
    pub fn container_routes(&self, ip: Ipv4Addr) -> Option<ContainerRoutes> {
        let own = self.pool_of(ip)?;
        let via_gateway = if self.internal {
            self.subnets
                .iter()
                .filter(|p| p.subnet != own.subnet)
                .map(|p| (p.subnet.network(), p.subnet.prefix()))
                .collect()
        } else {
            vec![(Ipv4Addr::UNSPECIFIED, 0)]
        };
        Some(ContainerRoutes {
            prefix: own.subnet.prefix(),
            gateway: own.gateway,
            via_gateway,
        })
    }
}

/// Settings every node of the cluster shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// UDP destination port of the overlay's VXLAN.
    pub vxlan_port: u16,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            vxlan_port: VXLAN_PORT,
        }
    }
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
    /// More names the endpoint answers to in its network's DNS; with the
    /// name, unique per network (ignoring case). Absent in stores written
    /// before aliases existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Ports of a container published on its node's addresses (Docker's
    /// `-p`); absent in stores written before ports could be published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PublishedPort>,
    /// The process on the endpoint's node that registered it and builds
    /// its veth (absent in stores written before it was recorded, and for
    /// endpoints no front end attaches). A container endpoint whose veth
    /// was never finished and whose attacher is dead was left by an attach
    /// killed half-way: the next attach of its container and its node's
    /// agent reclaim it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attacher: Option<Attacher>,
}

/// A process on a node, told apart from a later one given the same pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attacher {
    pub pid: u32,
    /// When it started, in clock ticks since the node booted (the 22nd
    /// field of `/proc/PID/stat`).
    pub started: u64,
}

impl Endpoint {
    /// The node hosting a container endpoint.
    pub fn node(&self) -> Option<&str> {
        match &self.location {
            Location::Container { node, .. } | Location::Reserved { node } => Some(node),
            Location::Static { .. } => None,
        }
    }

    /// The endpoint's name and aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// Its MAC, when it was given one (`connect --mac`, `endpoint add
    /// --mac`) rather than the one ovl derives from its address: only
    /// such a MAC can be another endpoint's too ([`State::check_mac`]
    /// keeps given ones out of the derived block).
    pub fn given_mac(&self) -> Option<MacAddr> {
        (self.mac != MacAddr::for_ipv4(self.ip)).then_some(self.mac)
    }
}

/// An ovl node: a host whose agent is this VTEP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub vtep: Ipv4Addr,
    /// MTU of its underlay interface, as its agent last reported it
    /// (unknown for nodes registered by ovl versions from before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_mtu: Option<u32>,
    /// The node's WireGuard public key and port, once its agent published
    /// them (encrypted networks reach it only then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<crate::crypto::NodeKey>,
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
    /// Settings of the whole cluster (the defaults where never set).
    #[serde(default)]
    pub cluster: ClusterSettings,
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
    /// Endpoints the store holds that this state was read without (a read
    /// of one network counts the others' without reading them): the
    /// capacity checks count them too.
    #[serde(skip)]
    pub endpoints_elsewhere: usize,
    /// Addresses the store holds for endpoints this state was read without
    /// (a read of one endpoint lists its network's taken addresses as bare
    /// keys): never handed out, never counted as free.
    #[serde(skip)]
    pub addresses_elsewhere: BTreeMap<String, std::collections::BTreeSet<Ipv4Addr>>,
}

impl Default for State {
    fn default() -> Self {
        State {
            schema: SCHEMA_VERSION,
            revision: 0,
            networks: BTreeMap::new(),
            endpoints: Vec::new(),
            nodes: BTreeMap::new(),
            cluster: ClusterSettings::default(),
            alive: None,
            released: Vec::new(),
            conflicts: BTreeMap::new(),
            clock: GraceClock::default(),
            endpoints_elsewhere: 0,
            addresses_elsewhere: BTreeMap::new(),
        }
    }
}

/// What `ovl network create` asks for.
#[derive(Clone, Debug, Default)]
pub struct NetworkSpec {
    pub name: String,
    /// One or more subnets, in the order IPAM fills them.
    pub subnets: Vec<Subnet>,
    /// Gateways, each matched to the subnet that holds it; a subnet
    /// without one gets its first host address.
    pub gateways: Vec<Ipv4Addr>,
    /// IP ranges, each matched to the subnet that holds it; a subnet
    /// without one gives addresses from all of it.
    pub ranges: Vec<IpRange>,
    /// Addresses never given to an endpoint, by name.
    pub aux_addresses: Vec<(String, Ipv4Addr)>,
    pub vni: Option<u32>,
    pub mtu: Option<u32>,
    pub internal: bool,
    /// Encrypt traffic between nodes (WireGuard; 60 bytes less MTU).
    pub encrypted: bool,
}

impl NetworkSpec {
    /// A spec of one subnet and every default.
    pub fn new(name: &str, subnet: Subnet) -> Self {
        NetworkSpec {
            name: name.to_owned(),
            subnets: vec![subnet],
            ..NetworkSpec::default()
        }
    }
}

/// What `ovl connect` asks for.
#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    pub network: String,
    pub node: String,
    pub netns: String,
    pub name: Option<String>,
    pub ip: Option<Ipv4Addr>,
    /// See [`Endpoint::owner`].
    pub owner: Option<String>,
    /// Allocate from this subnet of the network.
    pub subnet: Option<Subnet>,
    /// Ports to publish on the node ([`Endpoint::ports`]).
    pub ports: Vec<PublishedPort>,
    /// The container's MAC [default: a reservation's taken over, else
    /// 02:42 + its address].
    pub mac: Option<MacAddr>,
    /// See [`Endpoint::attacher`].
    pub attacher: Option<Attacher>,
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
        for subnet in &spec.subnets {
            validate::subnet(subnet)?;
            self.check_clear_of_vteps(subnet)?;
        }
        if self.networks.contains_key(&spec.name) {
            return Err(ModelError::NetworkExists(spec.name));
        }
        capacity::network(self, spec.subnets.len())?;
        let subnets = pools(&spec.subnets, &spec.gateways, &spec.ranges)?;
        let aux_addresses = aux_addresses(&subnets, &spec.aux_addresses)?;
        let mtu = self.network_mtu(spec.mtu, spec.encrypted)?;
        let vni = match spec.vni {
            Some(v) => {
                let vni = Vni::try_from(v)?;
                if let Some(n) = self.vni_holder(vni) {
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
            subnets,
            mtu,
            docker_pending: None,
            internal: spec.internal,
            encrypted: spec.encrypted,
            aux_addresses,
            kept_vnis: Vec::new(),
        };
        Ok(self.networks.entry(spec.name).or_insert(network))
    }

    /// Refuses `subnet` if it shares an address with any subnet of any
    /// network (for front ends that name networks by subnet, as Docker's
    /// plugin does while Docker creates one).
    pub fn check_subnet_free(&self, subnet: &Subnet) -> Result<(), ModelError> {
        let clash = self.networks.values().find_map(|n| {
            n.subnets
                .iter()
                .find(|p| p.subnet.overlaps(subnet))
                .map(|p| (n, p.subnet))
        });
        match clash {
            Some((n, existing)) => Err(ModelError::SubnetClash {
                subnet: *subnet,
                network: n.name.clone(),
                existing,
            }),
            None => Ok(()),
        }
    }

    /// The MTU a new network gets: `asked` if every node's underlay carries
    /// it, else refused; without one, the smallest node underlay MTU less
    /// VXLAN's overhead (a network spans the cluster, so its narrowest
    /// node bounds it), or 1450 when no node has reported one yet. An
    /// encrypted network carries VXLAN inside WireGuard: 60 bytes more.
    pub fn network_mtu(&self, asked: Option<u32>, encrypted: bool) -> Result<u32, ModelError> {
        let overhead = ENCAP_OVERHEAD + if encrypted { WIREGUARD_OVERHEAD } else { 0 };
        let narrowest = self
            .nodes
            .values()
            .filter_map(|n| n.underlay_mtu.map(|m| (m, n.name.as_str())))
            .min();
        let mtu = match (asked, narrowest) {
            (Some(mtu), _) => mtu,
            (None, Some((underlay, _))) => underlay.saturating_sub(overhead).min(MAX_MTU),
            (None, None) => DEFAULT_UNDERLAY_MTU - overhead,
        };
        if !(576..=MAX_MTU).contains(&mtu) {
            return Err(ModelError::InvalidMtu(mtu));
        }
        if let Some((underlay_mtu, node)) = narrowest
            && mtu + overhead > underlay_mtu
        {
            return Err(ModelError::MtuTooBig {
                mtu,
                node: node.to_owned(),
                underlay_mtu,
                encapsulation: if encrypted {
                    "VXLAN in WireGuard"
                } else {
                    "VXLAN"
                },
                overhead,
            });
        }
        Ok(mtu)
    }

    /// Sets the cluster's VXLAN UDP port: one in [`VXLAN_PORTS`] that no
    /// node's WireGuard listens on and no container publishes (each would
    /// take the other's packets).
    pub fn set_vxlan_port(&mut self, port: u16) -> Result<(), ModelError> {
        if !VXLAN_PORTS.contains(&port) {
            return Err(ModelError::InvalidVxlanPort(port));
        }
        let taken = |holder: String| ModelError::VxlanPortTaken { port, holder };
        if let Some(n) = self
            .nodes
            .values()
            .find(|n| n.wireguard.is_some_and(|k| k.port == port))
        {
            return Err(taken(format!(
                "node {:?}'s WireGuard listens on it (encrypted networks)",
                n.name
            )));
        }
        let udp = |p: &PublishedPort| p.protocol == Protocol::Udp && p.host_port == port;
        if let Some(e) = self.endpoints.iter().find(|e| e.ports.iter().any(udp)) {
            return Err(taken(format!(
                "{} ({} on network {:?}) publishes it{}",
                e.name,
                e.ip,
                e.network,
                e.node()
                    .map(|n| format!(" on node {n:?}"))
                    .unwrap_or_default()
            )));
        }
        self.cluster.vxlan_port = port;
        Ok(())
    }

    /// The network that has VNI `vni`, as its own or kept
    /// ([`Network::kept_vnis`]).
    pub fn vni_holder(&self, vni: Vni) -> Option<&Network> {
        self.networks
            .values()
            .find(|n| n.vni == vni || n.kept_vnis.iter().any(|m| m.vni == vni))
    }

    /// The network a front end names by VNI `vni` and subnet `subnet`:
    /// the one with that VNI and subnet, or the one that keeps `vni` for
    /// `subnet` (merged into it, or its own before a renumber).
    pub fn network_of_subnet(&self, vni: u32, subnet: &Subnet) -> Option<&Network> {
        let own = self
            .networks
            .values()
            .find(|n| n.vni.get() == vni && n.subnets.iter().any(|p| p.subnet == *subnet));
        own.or_else(|| {
            self.networks.values().find(|n| {
                n.kept_vnis
                    .iter()
                    .any(|m| m.vni.get() == vni && m.subnet == *subnet)
            })
        })
    }

    /// Merges network `from` into network `into`: `into` takes its subnets
    /// (with their gateways and ranges) and auxiliary addresses, and keeps
    /// its VNI for those subnets ([`Network::kept_vnis`]); `from` goes.
    /// For a network a front end assembles from subnets it was given one
    /// at a time (Docker asks for each pool before saying which network
    /// they make). `from` must have no endpoints, and the subnets of both
    /// must not overlap. A network merged into itself stays as it is.
    pub fn merge_network(&mut self, into: &str, from: &str) -> Result<&Network, ModelError> {
        if into == from {
            return self.network(into);
        }
        let target = self.network(into)?;
        let source = self.network(from)?;
        let count = self.endpoints_of(from).count()
            + self.addresses_elsewhere.get(from).map_or(0, |a| a.len());
        if count > 0 {
            return Err(ModelError::NetworkInUse {
                name: from.to_owned(),
                count,
            });
        }
        for p in &source.subnets {
            if let Some(q) = target.subnets.iter().find(|q| q.subnet.overlaps(&p.subnet)) {
                return Err(ModelError::SubnetClash {
                    subnet: p.subnet,
                    network: into.to_owned(),
                    existing: q.subnet,
                });
            }
        }
        if let Some(name) = source
            .aux_addresses
            .keys()
            .find(|name| target.aux_addresses.contains_key(*name))
        {
            return Err(ModelError::AuxNameTwice(name.clone()));
        }
        let source = self.networks.remove(from).expect("presence checked above");
        self.released.retain(|r| r.network != from);
        let target = self.networks.get_mut(into).expect("presence checked above");
        target
            .kept_vnis
            .extend(source.subnets.iter().map(|p| KeptVni {
                subnet: p.subnet,
                vni: source.vni,
            }));
        target.kept_vnis.extend(source.kept_vnis);
        target.subnets.extend(source.subnets);
        target.aux_addresses.extend(source.aux_addresses);
        Ok(target)
    }

    /// Gives network `name` VNI `vni`, keeping the one it had for all of
    /// its subnets ([`Network::kept_vnis`]), so that whatever named one of
    /// them by network and VNI before still does: for a front end
    /// that learns the VNI asked for after it named the subnets by the one
    /// allocated (Docker's `vxlanid_list` comes with CreateNetwork, after
    /// the pools). `vni` must be free, or one the network keeps already.
    pub fn renumber_network(&mut self, name: &str, vni: u32) -> Result<&Network, ModelError> {
        let vni = Vni::try_from(vni)?;
        if let Some(holder) = self.vni_holder(vni).filter(|h| h.name != name) {
            return Err(ModelError::VniInUse {
                vni,
                network: holder.name.clone(),
            });
        }
        let n = self
            .networks
            .get_mut(name)
            .ok_or_else(|| ModelError::NoSuchNetwork(name.to_owned()))?;
        if n.vni != vni {
            // Every subnet was this network's under its VNI: each keeps it.
            let old = n.vni;
            n.kept_vnis.retain(|k| k.vni != vni);
            let subnets: Vec<Subnet> = n.subnets.iter().map(|p| p.subnet).collect();
            n.kept_vnis.extend(
                subnets
                    .into_iter()
                    .map(|subnet| KeptVni { subnet, vni: old }),
            );
            n.vni = vni;
        }
        Ok(n)
    }

    fn free_vni(&self) -> Result<Vni, ModelError> {
        let used: std::collections::BTreeSet<u32> = self
            .networks
            .values()
            .flat_map(|n| std::iter::once(n.vni).chain(n.kept_vnis.iter().map(|m| m.vni)))
            .map(Vni::get)
            .collect();
        (FIRST_AUTO_VNI..=VNI_MAX)
            .find(|v| !used.contains(v))
            .map(Vni)
            .ok_or(ModelError::VnisExhausted)
    }

    /// Removes a network that has no endpoints left.
    pub fn remove_network(&mut self, name: &str) -> Result<Network, ModelError> {
        self.network(name)?;
        let count = self.endpoints_of(name).count()
            + self.addresses_elsewhere.get(name).map_or(0, |a| a.len());
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
    /// address so it is stable and unique on the node. An address the same
    /// owner reserved on the same node ([`State::reserve`]) is taken over:
    /// the reservation becomes the endpoint.
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
        self.check_ports_free(&network, &spec.node, &spec.ports)?;
        let reserved = spec.ip.and_then(|ip| {
            self.endpoints.iter().position(|e| {
                e.network == spec.network
                    && e.ip == ip
                    && e.owner.is_some()
                    && e.owner == spec.owner
                    && matches!(&e.location, Location::Reserved { node } if *node == spec.node)
            })
        });
        if reserved.is_none() {
            // Taking a reservation over adds no endpoint.
            capacity::endpoints(self, 1)?;
        }
        let name = spec.name.unwrap_or_else(|| spec.netns.clone());
        // Checked with the reservation taken out (its address and MAC are
        // the endpoint's to take), and put back if refused.
        let reservation = reserved.map(|pos| self.endpoints.remove(pos));
        let mut checked = || {
            self.check_name_free(&spec.network, None, &name)?;
            let ip = self.allocate(&network, spec.ip, spec.subnet)?;
            let mac = spec.mac.unwrap_or_else(|| {
                reservation
                    .as_ref()
                    .map_or(MacAddr::for_ipv4(ip), |r| r.mac)
            });
            self.check_mac(&spec.network, mac, ip)?;
            Ok((ip, mac))
        };
        let (ip, mac) = match checked() {
            Ok(taken) => taken,
            Err(e) => {
                self.endpoints.extend(reservation);
                return Err(e);
            }
        };
        let endpoint = Endpoint {
            network: spec.network,
            name,
            ip,
            mac,
            location: Location::Container {
                node: spec.node,
                netns: spec.netns,
                host_ifname: host_ifname(network.vni, ip),
            },
            owner: spec.owner,
            aliases: Vec::new(),
            ports: spec.ports,
            attacher: spec.attacher,
        };
        self.endpoints.push(endpoint.clone());
        Ok(endpoint)
    }

    /// Whether endpoint `ip` of `network` may have MAC `mac`: a unicast
    /// address other than the gateways', outside the 02:42:… block ovl
    /// derives containers' MACs from (but for `ip`'s own), and no other
    /// endpoint's of the network.
    pub fn check_mac(&self, network: &str, mac: MacAddr, ip: Ipv4Addr) -> Result<(), ModelError> {
        validate::mac(mac)?;
        if mac == MacAddr(ANYCAST_GATEWAY_MAC) {
            return Err(ModelError::GatewayMac(mac));
        }
        let own = MacAddr::for_ipv4(ip);
        if mac.0[..2] == own.0[..2] && mac != own {
            return Err(ModelError::MacOfOvl { mac, ip, own });
        }
        match self
            .endpoints_of(network)
            .find(|e| e.mac == mac && e.ip != ip)
        {
            Some(e) => Err(ModelError::MacTaken {
                mac,
                network: network.to_owned(),
                holder: e.name.clone(),
                ip: e.ip,
            }),
            None => Ok(()),
        }
    }

    /// Whether a container of `network` on `node` may publish `ports`: the
    /// network leads out, the ports are well-formed, and no other
    /// container on the node publishes one of them (on the same address,
    /// or on every address).
    pub fn check_ports_free(
        &self,
        network: &Network,
        node: &str,
        ports: &[PublishedPort],
    ) -> Result<(), ModelError> {
        if ports.is_empty() {
            return Ok(());
        }
        if network.internal {
            return Err(ModelError::PublishOnInternal(network.name.clone()));
        }
        ports::validate(ports)?;
        // The overlay's own UDP ports on the node: a DNAT rule for one
        // would hand peers' VXLAN or WireGuard packets to the container.
        let wireguard = self
            .nodes
            .get(node)
            .and_then(|n| n.wireguard.as_ref())
            .map(|k| k.port);
        for p in ports.iter().filter(|p| p.protocol == Protocol::Udp) {
            let what = if p.host_port == self.cluster.vxlan_port {
                "its VXLAN"
            } else if Some(p.host_port) == wireguard {
                "its WireGuard, for encrypted networks"
            } else {
                continue;
            };
            return Err(ModelError::PortOfOverlay {
                port: *p,
                node: node.to_owned(),
                what,
            });
        }
        if let Some((p, e)) = ports
            .iter()
            .find_map(|p| self.port_holder(node, p).map(|e| (p, e)))
        {
            return Err(ModelError::PortTaken {
                port: *p,
                node: node.to_owned(),
                holder: e.name.clone(),
                network: e.network.clone(),
                ip: e.ip,
            });
        }
        Ok(())
    }

    /// The container of `node` that publishes a port taking `p`'s
    /// connections (same protocol and host port, on the same address or
    /// on every address), if any.
    fn port_holder(&self, node: &str, p: &PublishedPort) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| {
            matches!(&e.location, Location::Container { node: n, .. } if n == node)
                && e.ports.iter().any(|q| q.overlaps(p))
        })
    }

    /// Gives endpoint `ip` of `network` a new name (if `name` is given) and
    /// these aliases (replacing its aliases), each a DNS name: the name one
    /// no other endpoint of the network is called by, the aliases any
    /// (several endpoints with one alias share it, as with Docker's
    /// `--network-alias`: the name resolves to all of them). Refused,
    /// changing nothing, when one is invalid or the name is taken.
    pub fn set_names(
        &mut self,
        network: &str,
        ip: Ipv4Addr,
        name: Option<String>,
        aliases: Vec<String>,
    ) -> Result<Endpoint, ModelError> {
        let pos = self.endpoint_position(network, ip)?;
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
        self.check_name_free(network, Some(ip), &name)?;
        let ep = &mut self.endpoints[pos];
        ep.name = name;
        ep.aliases = aliases;
        Ok(ep.clone())
    }

    /// Fails when `name` is the name of another endpoint of `network` than
    /// the one at `except` (ignoring case). Names are unique per network;
    /// aliases are not, and a name may be another endpoint's alias.
    fn check_name_free(
        &self,
        network: &str,
        except: Option<Ipv4Addr>,
        name: &str,
    ) -> Result<(), ModelError> {
        let holder = self
            .endpoints_of(network)
            .filter(|e| Some(e.ip) != except)
            .find(|e| e.name.eq_ignore_ascii_case(name));
        match holder {
            Some(e) => Err(ModelError::NameTaken {
                name: name.to_owned(),
                network: network.to_owned(),
                holder: e.name.clone(),
                ip: e.ip,
            }),
            None => Ok(()),
        }
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
        within: Option<Subnet>,
        owner: &str,
    ) -> Result<Endpoint, ModelError> {
        let net = self.network(network)?.clone();
        capacity::endpoints(self, 1)?;
        let ip = self.allocate(&net, ip, within)?;
        let endpoint = Endpoint {
            network: network.to_owned(),
            name: owner.to_owned(),
            ip,
            mac: MacAddr::for_ipv4(ip),
            location: Location::Reserved {
                node: node.to_owned(),
            },
            owner: Some(owner.to_owned()),
            aliases: Vec::new(),
            ports: Vec::new(),
            attacher: None,
        };
        self.endpoints.push(endpoint.clone());
        Ok(endpoint)
    }

    /// Turns the container endpoint of `netns` on `node` back into a
    /// reservation of its address by the same owner (the container left,
    /// but the runtime's IPAM releases the address separately). Like every
    /// reservation it carries no names: the container's are free at once
    /// for whoever asks next.
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
            name: ep.owner.clone().unwrap_or(ep.name),
            aliases: Vec::new(),
            ports: Vec::new(),
            // Nothing is built for a reservation: no attach to reclaim.
            attacher: None,
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
        validate::vtep(vtep)?;
        if let Some(n) = self.nodes.values().find(|n| n.vtep == vtep) {
            return Err(ModelError::VtepOfNode {
                vtep,
                node: n.name.clone(),
            });
        }
        capacity::endpoints(self, 1)?;
        if let Some(name) = &name {
            validate_endpoint_name(name)?;
        }
        let ip = self.allocate(&net, Some(ip), None)?;
        if let Some(mac) = mac {
            // A container's own MAC (connect --mac) is no static's.
            self.check_mac(network, mac, ip)?;
        }
        let name = name.unwrap_or_else(|| format!("static-{ip}"));
        self.check_name_free(network, None, &name)?;
        let endpoint = Endpoint {
            network: network.to_owned(),
            name,
            ip,
            mac: mac.unwrap_or(MacAddr::for_ipv4(ip)),
            location: Location::Static { vtep },
            owner: None,
            aliases: Vec::new(),
            ports: Vec::new(),
            attacher: None,
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

    /// Removes `ep` if the store still holds it as it is: same network,
    /// address, location (node, namespace and host interface of a
    /// container) and attacher. Returns whether it did; an endpoint that
    /// took its address or its namespace since (attached anew, even at the
    /// same address) is left alone.
    pub fn remove_exact(&mut self, ep: &Endpoint) -> bool {
        let pos = self.endpoints.iter().position(|e| {
            e.network == ep.network
                && e.ip == ep.ip
                && e.location == ep.location
                && e.attacher == ep.attacher
        });
        pos.map(|p| self.endpoints.remove(p)).is_some()
    }

    /// Where the endpoint with address `ip` of `network` is in
    /// `endpoints`; an unknown network or endpoint is an error.
    fn endpoint_position(&self, network: &str, ip: Ipv4Addr) -> Result<usize, ModelError> {
        self.network(network)?;
        self.endpoints
            .iter()
            .position(|e| e.network == network && e.ip == ip)
            .ok_or_else(|| ModelError::NoSuchEndpoint {
                network: network.to_owned(),
                ip,
            })
    }

    /// Removes the static endpoint (`ovl endpoint add`) with address `ip`
    /// from `network`; a container's address or a runtime's reservation is
    /// refused: its node's agent would keep the container's interface and
    /// put the endpoint back.
    pub fn remove_static(&mut self, network: &str, ip: Ipv4Addr) -> Result<Endpoint, ModelError> {
        let pos = self.endpoint_position(network, ip)?;
        let e = &self.endpoints[pos];
        let holder = match &e.location {
            Location::Static { .. } => return Ok(self.endpoints.remove(pos)),
            Location::Container { node, netns, .. } => match &e.owner {
                Some(owner) => format!(
                    "container {} on node {node:?}, attached by a runtime ({owner}): detach it \
                     through that runtime (`docker network disconnect`, or its CNI DEL)",
                    e.name
                ),
                None => format!(
                    "container {} on node {node:?}: run `ovl disconnect {network} {netns}` on \
                     that node (or `ovl node rm {node}` if the node is gone)",
                    e.name
                ),
            },
            Location::Reserved { node } => format!(
                "an address a runtime's IPAM reserved on node {node:?} for a container not \
                 attached yet: that runtime releases it (or `ovl node rm {node}` if the node is \
                 gone)"
            ),
        };
        Err(ModelError::NotStatic {
            network: network.to_owned(),
            ip,
            holder,
        })
    }

    /// Removes the endpoint with address `ip` from `network`.
    pub fn remove_endpoint(&mut self, network: &str, ip: Ipv4Addr) -> Result<Endpoint, ModelError> {
        let pos = self.endpoint_position(network, ip)?;
        Ok(self.endpoints.remove(pos))
    }

    /// Puts back an endpoint that was freed while its node was cut off, if
    /// its network still exists and its address, MAC and name are still
    /// free; returns whether it was restored.
    pub fn restore_endpoint(&mut self, ep: &Endpoint) -> bool {
        let free = self.networks.contains_key(&ep.network)
            && !self
                .endpoints
                .iter()
                .any(|e| e.network == ep.network && e.ip == ep.ip)
            && self.mac_holder(ep).is_none()
            && self.check_name_free(&ep.network, None, &ep.name).is_ok();
        if free {
            self.forget_release(&ep.network, ep.ip);
            self.endpoints.push(ep.clone());
        }
        free
    }

    /// The endpoint of `ep`'s network at another address that has `ep`'s
    /// MAC, if any.
    fn mac_holder(&self, ep: &Endpoint) -> Option<&Endpoint> {
        self.endpoints
            .iter()
            .find(|e| e.network == ep.network && e.mac == ep.mac && e.ip != ep.ip)
    }

    /// The endpoints of `ep`'s network called by its name or one of the
    /// names it could be put back under instead.
    fn name_holders(&self, ep: &Endpoint) -> Vec<&Endpoint> {
        let names = crate::release::fallback_names(ep);
        self.endpoints
            .iter()
            .filter(|e| e.network == ep.network)
            .filter(|e| {
                e.name.eq_ignore_ascii_case(&ep.name)
                    || names.iter().any(|n| e.name.eq_ignore_ascii_case(n))
            })
            .collect()
    }

    /// Puts back `node`'s endpoints `wanted` that the store lost, where
    /// their address is still free (held back or not: the grace exists for
    /// this) and no other endpoint of the network took their MAC — under
    /// a fallback name where another took their name — and records the
    /// addresses, MACs (and names) taken meanwhile under the node
    /// (replacing what its previous attempt recorded).
    pub fn restore_endpoints(&mut self, node: &str, wanted: &[Endpoint]) -> RestoreOutcome {
        let mut out = RestoreOutcome::default();
        for ep in wanted.iter().filter(|e| e.node() == Some(node)) {
            let holder = self
                .endpoints
                .iter()
                .find(|e| e.network == ep.network && e.ip == ep.ip);
            let mac_holder = self.mac_holder(ep);
            let named = self.name_holders(ep);
            let network = self.networks.get(&ep.network);
            let verdict =
                crate::release::judge(ep, holder, mac_holder, &named, network, self.clock.now_ms);
            let ep = match verdict {
                Verdict::Restore => ep.clone(),
                Verdict::Rename(how) => {
                    let renamed = how.apply(ep);
                    out.renamed.push(how);
                    renamed
                }
                Verdict::Present => {
                    out.present += 1;
                    continue;
                }
                Verdict::NetworkGone => {
                    out.networks_gone.push(ep.clone());
                    continue;
                }
                Verdict::Superseded => continue,
                Verdict::Conflict(c) => {
                    out.conflicts.push(c);
                    continue;
                }
            };
            self.forget_release(&ep.network, ep.ip);
            let mut ep = ep;
            let taken: Vec<PublishedPort> = ep
                .ports
                .iter()
                .filter(|p| self.port_holder(node, p).is_some())
                .copied()
                .collect();
            ep.ports.retain(|p| !taken.contains(p));
            out.unpublished
                .extend(taken.into_iter().map(|p| (ep.clone(), p)));
            self.endpoints.push(ep.clone());
            out.restored.push(ep);
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

    /// The address a new endpoint of `network` would get now, or why it
    /// would get none: what [`State::add_container`] allocates, for a
    /// front end that only asks whether it could (CNI STATUS). Addresses
    /// held back count as taken, as there.
    pub fn free_address(&self, network: &str) -> Result<Ipv4Addr, ModelError> {
        self.pick(self.network(network)?, None, None)
    }

    /// Picks an address of `network` for a new endpoint ([`State::pick`]);
    /// an expired hold is dropped when its address is handed out again.
    fn allocate(
        &mut self,
        network: &Network,
        requested: Option<Ipv4Addr>,
        within: Option<Subnet>,
    ) -> Result<Ipv4Addr, ModelError> {
        let ip = self.pick(network, requested, within)?;
        self.forget_release(&network.name, ip);
        Ok(ip)
    }

    /// An address of `network` for a new endpoint (`requested`, or the
    /// lowest free one), skipping addresses still held back after their
    /// release.
    fn pick(
        &self,
        network: &Network,
        requested: Option<Ipv4Addr>,
        within: Option<Subnet>,
    ) -> Result<Ipv4Addr, ModelError> {
        if let Some((ip, name)) = requested.and_then(|ip| Some((ip, network.aux_name(ip)?))) {
            return Err(ModelError::AuxAddress {
                network: network.name.clone(),
                ip,
                name: name.to_owned(),
            });
        }
        let mut used: std::collections::BTreeSet<Ipv4Addr> =
            self.endpoints_of(&network.name).map(|e| e.ip).collect();
        used.extend(network.aux_addresses.values());
        used.extend(
            self.addresses_elsewhere
                .get(&network.name)
                .into_iter()
                .flatten(),
        );
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
            // Counted only where an address was asked for: a full
            // --subnet is full, whatever other subnets hold back; a full
            // --ip-range, whatever is held outside it.
            if used.insert(r.ip)
                && within.is_none_or(|w| w.contains(r.ip))
                && network.pool_of(r.ip).is_some_and(|p| p.gives_unasked(r.ip))
            {
                held += 1;
            }
        }
        match ipam::allocate(&network.subnets, &used, requested, within) {
            Err(ipam::IpamError::Exhausted(subnets)) if held > 0 => {
                Err(ModelError::AllFreeAddressesHeld {
                    network: network.name.clone(),
                    subnets,
                    held,
                })
            }
            other => Ok(other?),
        }
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

    /// Records (or updates) a node, its VTEP address and its underlay MTU.
    pub fn register_node(&mut self, name: &str, vtep: Ipv4Addr, underlay_mtu: Option<u32>) {
        // The key the node published survives its registering again.
        let wireguard = self.nodes.get(name).and_then(|n| n.wireguard);
        self.nodes.insert(
            name.to_owned(),
            Node {
                name: name.to_owned(),
                vtep,
                underlay_mtu,
                wireguard,
            },
        );
    }

    /// Records the WireGuard key node `name` publishes; false when the node
    /// is not registered.
    pub fn publish_node_key(&mut self, name: &str, key: crate::crypto::NodeKey) -> bool {
        match self.nodes.get_mut(name) {
            Some(n) => {
                n.wireguard = Some(key);
                true
            }
            None => false,
        }
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

/// The name of the container end of the veth with host end
/// `host_ifname` while it is still in the host's namespace (an attach
/// moves it into the container at once; Docker's waits there for Docker
/// to move).
pub fn unmoved_peer_ifname(host_ifname: &str) -> String {
    format!("{host_ifname}c")
}

/// Whether `name` is named as [`host_ifname`] names host ends: `ovl` and
/// 8 lowercase hex digits.
pub fn is_host_ifname(name: &str) -> bool {
    name.strip_prefix("ovl").is_some_and(|h| {
        h.len() == 8
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
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

/// The pools of a new network: `subnets` in order, disjoint, each with the
/// gateway of `gateways` it holds, or its first host address.
fn pools(
    subnets: &[Subnet],
    gateways: &[Ipv4Addr],
    ranges: &[IpRange],
) -> Result<Vec<Pool>, ModelError> {
    if subnets.is_empty() {
        return Err(ModelError::NoSubnet);
    }
    for (i, a) in subnets.iter().enumerate() {
        if let Some(b) = subnets[i + 1..].iter().find(|b| a.overlaps(b)) {
            return Err(ModelError::OverlappingSubnets(*a, *b));
        }
    }
    let mut pools: Vec<Pool> = subnets.iter().map(|s| Pool::of(*s)).collect();
    let mut given: Vec<Option<Ipv4Addr>> = vec![None; pools.len()];
    for gw in gateways {
        let Some(i) = pools.iter().position(|p| p.subnet.contains(*gw)) else {
            return Err(ModelError::GatewayOutsideSubnets {
                gateway: *gw,
                subnets: ipam::describe(&pools),
            });
        };
        let subnet = pools[i].subnet;
        if !subnet.is_host(*gw) {
            return Err(ModelError::GatewayNotHost {
                gateway: *gw,
                subnet,
            });
        }
        if let Some(first) = given[i] {
            return Err(ModelError::TwoGateways {
                subnet,
                first,
                second: *gw,
            });
        }
        given[i] = Some(*gw);
        pools[i].gateway = *gw;
    }
    for range in ranges {
        let Some(pool) = pools.iter_mut().find(|p| range.is_within(&p.subnet)) else {
            return Err(ModelError::RangeOutsideSubnets {
                range: *range,
                subnets: ipam::describe(&pools),
            });
        };
        if let Some(first) = pool.range {
            return Err(ModelError::TwoRanges {
                subnet: pool.subnet,
                first,
                second: *range,
            });
        }
        pool.range = Some(*range);
        if !pool.range_has_room([]) {
            return Err(ModelError::RangeWithoutRoom {
                range: *range,
                subnet: pool.subnet,
            });
        }
    }
    Ok(pools)
}

/// `NAME=IP`, an auxiliary address on the command line (Docker's form).
pub fn parse_aux_address(s: &str) -> Result<(String, Ipv4Addr), String> {
    let (name, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=IP (e.g. router=198.18.0.254)"))?;
    let ip = ip
        .parse()
        .map_err(|_| format!("{ip:?} in {s:?} is not an IPv4 address"))?;
    Ok((name.to_owned(), ip))
}

/// The auxiliary addresses `given` (name, address) of a network made of
/// `pools`, checked ([`check_aux`]).
fn aux_addresses(
    pools: &[Pool],
    given: &[(String, Ipv4Addr)],
) -> Result<BTreeMap<String, Ipv4Addr>, ModelError> {
    let mut out = BTreeMap::new();
    for (name, ip) in given {
        check_aux(pools, &out, name, *ip)?;
        out.insert(name.clone(), *ip);
    }
    Ok(out)
}

/// Whether auxiliary address `name` = `ip` may join those of a network
/// made of `pools` that has `aux` already: a name like a network's, each
/// name and address once, an address an endpoint could otherwise get, and
/// one that leaves its subnet's IP range an address to give.
pub fn check_aux(
    pools: &[Pool],
    aux: &BTreeMap<String, Ipv4Addr>,
    name: &str,
    ip: Ipv4Addr,
) -> Result<(), ModelError> {
    if name.len() > 64 || !is_docker_name(name) {
        return Err(ModelError::InvalidAuxName(name.to_owned()));
    }
    if aux.contains_key(name) {
        return Err(ModelError::AuxNameTwice(name.to_owned()));
    }
    if let Some((first, _)) = aux.iter().find(|(_, a)| **a == ip) {
        return Err(ModelError::AuxTwice {
            ip,
            first: first.clone(),
            second: name.to_owned(),
        });
    }
    let Some(pool) = pools.iter().find(|p| p.is_assignable(ip)) else {
        return Err(ModelError::AuxNotAssignable {
            name: name.to_owned(),
            ip,
            subnets: ipam::describe(pools),
        });
    };
    if let Some(range) = pool.range.filter(|r| r.contains(ip))
        && !pool.range_has_room(aux.values().chain([&ip]))
    {
        return Err(ModelError::AuxFillsRange {
            name: name.to_owned(),
            ip,
            range,
            subnet: pool.subnet,
        });
    }
    Ok(())
}

/// Checks a network name: 1-64 characters from `[A-Za-z0-9_.-]`.
pub fn validate_name(name: &str) -> Result<(), ModelError> {
    // Docker's rule, with a length: a name starting with `-` reads as an
    // option on every command line, and `.` or `..` as a path or an empty
    // DNS label.
    if name.len() <= 64 && is_docker_name(name) {
        Ok(())
    } else {
        Err(ModelError::InvalidName(name.to_owned()))
    }
}

/// Whether `name` is a letter or digit, then letters, digits, `_`, `.` or
/// `-` (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`): Docker's network names, and CNI's.
pub fn is_docker_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, vni: Option<u32>) -> NetworkSpec {
        NetworkSpec {
            vni,
            ..NetworkSpec::new(name, "198.18.0.0/24".parse().unwrap())
        }
    }

    #[test]
    fn network_names_start_with_a_letter_or_digit() {
        for good in ["a", "9", "uber-net", "web_1.prod", &"n".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-net",
            "_x",
            ".hidden",
            "a b",
            "a/b",
            &"n".repeat(65),
        ] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains("the first a letter or digit"), "{bad:?}: {e}");
        }
        let mut s = State::default();
        assert!(s.create_network(spec("..", None)).is_err());
        assert!(s.networks.is_empty());
    }

    fn container(net: &str, node: &str, ns: &str) -> ContainerSpec {
        ContainerSpec {
            network: net.into(),
            node: node.into(),
            netns: ns.into(),
            ..ContainerSpec::default()
        }
    }

    fn subnets(list: &[&str]) -> Vec<Subnet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn publishing(net: &str, node: &str, ns: &str, ports: &[&str]) -> ContainerSpec {
        ContainerSpec {
            ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
            ..container(net, node, ns)
        }
    }

    #[test]
    fn a_host_port_is_published_once_per_node_across_networks() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.create_network(spec("b", None)).unwrap();
        let web = s
            .add_container(publishing("a", "n1", "web", &["8080:80", "5353:53/udp"]))
            .unwrap();
        assert_eq!(web.ports.len(), 2);
        let before = s.clone();
        // Same port, another network with the same subnet, same node.
        let err = s
            .add_container(publishing("b", "n1", "web2", &["192.0.2.10:8080:80"]))
            .unwrap_err();
        assert!(
            matches!(&err, ModelError::PortTaken { holder, network, .. } if holder == "web" && network == "a"),
            "{err}"
        );
        assert!(
            err.to_string().contains("web") && err.to_string().contains("n1"),
            "{err}"
        );
        assert_eq!(s, before, "nothing changed");
        // Another protocol, another port, another node: free.
        s.add_container(publishing("b", "n1", "dns", &["8080:80/udp"]))
            .unwrap();
        s.add_container(publishing("b", "n2", "web3", &["8080:80"]))
            .unwrap();
        // Freed with its endpoint.
        s.remove_container("a", "n1", "web").unwrap();
        s.add_container(publishing("b", "n1", "web4", &["8080:80"]))
            .unwrap();
    }

    #[test]
    fn a_restored_endpoint_comes_back_without_the_ports_another_took_meanwhile() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let web = s
            .add_container(publishing("a", "n1", "web", &["8080:80", "9090:90"]))
            .unwrap();
        s.remove_container("a", "n1", "web").unwrap();
        // Another container of the node, at another address, takes a port.
        s.add_container(ContainerSpec {
            ip: Some(Ipv4Addr::new(198, 18, 0, 200)),
            ..publishing("a", "n1", "other", &["8080:81"])
        })
        .unwrap();
        let out = s.restore_endpoints("n1", std::slice::from_ref(&web));
        assert_eq!(out.restored.len(), 1);
        assert_eq!(out.restored[0].ports, vec!["9090:90".parse().unwrap()]);
        assert_eq!(out.unpublished.len(), 1);
        assert_eq!(out.unpublished[0].1, "8080:80".parse().unwrap());
        let back = s.endpoints.iter().find(|e| e.ip == web.ip).unwrap();
        assert_eq!(back.ports, out.restored[0].ports);
    }

    /// Network "a", and node "n1" whose WireGuard listens on `port`.
    fn network_a_and_node_n1_with_wireguard_on(port: u16) -> State {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.register_node("n1", Ipv4Addr::new(192, 0, 2, 10), Some(1500));
        s.publish_node_key(
            "n1",
            crate::crypto::NodeKey {
                public_key: crate::crypto::keys::PublicKey([7; 32]),
                port,
            },
        );
        s
    }

    #[test]
    fn the_overlays_own_udp_ports_are_not_published() {
        let mut s = network_a_and_node_n1_with_wireguard_on(51821);
        let before = s.clone();
        for (port, what) in [("51821:1/udp", "WireGuard"), ("4789:1/udp", "VXLAN")] {
            let err = s
                .add_container(publishing("a", "n1", "c1", &[port]))
                .unwrap_err();
            assert!(
                matches!(&err, ModelError::PortOfOverlay { node, .. } if node == "n1"),
                "{port}: {err}"
            );
            assert!(err.to_string().contains(what), "{err}");
        }
        assert_eq!(s, before, "nothing changed");
        // The same numbers over TCP, and on another node, are anyone's.
        s.add_container(publishing("a", "n1", "c1", &["51821:1", "4789:1"]))
            .unwrap();
        s.add_container(publishing("a", "n2", "c2", &["51821:1/udp"]))
            .unwrap();
    }

    #[test]
    fn the_vxlan_port_is_none_a_wireguard_listens_on_or_a_container_publishes() {
        let mut s = network_a_and_node_n1_with_wireguard_on(40000);
        s.add_container(publishing("a", "n2", "c2", &["8472:53/udp", "6081:80"]))
            .unwrap();
        let before = s.clone();
        for (port, holder) in [(40000, "node \"n1\"'s WireGuard"), (8472, "c2 (")] {
            let err = s.set_vxlan_port(port).unwrap_err();
            assert!(
                matches!(&err, ModelError::VxlanPortTaken { port: p, .. } if *p == port),
                "{port}: {err}"
            );
            assert!(err.to_string().contains(holder), "{err}");
        }
        assert_eq!(s, before, "nothing changed");
        // A TCP port of the same number is no VXLAN's.
        s.set_vxlan_port(6081).unwrap();
    }

    #[test]
    fn an_internal_network_publishes_nothing() {
        let mut s = State::default();
        s.create_network(NetworkSpec {
            internal: true,
            ..spec("closed", None)
        })
        .unwrap();
        let err = s
            .add_container(publishing("closed", "n1", "c1", &["8080:80"]))
            .unwrap_err();
        assert_eq!(err, ModelError::PublishOnInternal("closed".into()));
        assert!(err.to_string().contains("--internal"), "{err}");
        assert!(s.endpoints.is_empty());
    }

    #[test]
    fn one_endpoint_cannot_publish_a_host_port_twice() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let err = s
            .add_container(publishing("a", "n1", "c1", &["8080:80", "8080:81"]))
            .unwrap_err();
        assert!(
            matches!(err, ModelError::Port(PortError::Duplicate(..))),
            "{err}"
        );
    }

    #[test]
    fn endpoints_stored_before_published_ports_still_load() {
        let old = r#"{"network":"a","name":"c1","ip":"198.18.0.2","mac":"02:42:c6:12:00:02",
            "location":{"kind":"container","node":"n1","netns":"c1","host_ifname":"ovl1"}}"#;
        let e: Endpoint = serde_json::from_str(old).unwrap();
        assert!(e.ports.is_empty());
        let json = serde_json::to_string(&e).unwrap();
        assert!(!json.contains("ports"), "{json}");
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
    fn a_merged_network_keeps_the_vni_its_subnets_were_named_by() {
        let mut s = State::default();
        let one = |subnet: &str, gateway: &str, aux: &[(&str, &str)]| NetworkSpec {
            gateways: vec![gateway.parse().unwrap()],
            aux_addresses: aux
                .iter()
                .map(|(n, ip)| (n.to_string(), ip.parse().unwrap()))
                .collect(),
            ..NetworkSpec::new(&format!("p-{gateway}"), subnet.parse().unwrap())
        };
        s.create_network(one("198.18.1.0/24", "198.18.1.1", &[]))
            .unwrap();
        s.create_network(one(
            "198.18.2.0/24",
            "198.18.2.254",
            &[("nas", "198.18.2.9")],
        ))
        .unwrap();
        let (a, b) = ("p-198.18.1.1", "p-198.18.2.254");
        let sub2: Subnet = "198.18.2.0/24".parse().unwrap();
        assert_eq!(s.network_of_subnet(4097, &sub2).unwrap().name, b);

        let merged = s.merge_network(a, b).unwrap().clone();
        assert_eq!(merged.vni.get(), 4096);
        assert_eq!(merged.subnets_text(), "198.18.1.0/24,198.18.2.0/24");
        assert_eq!(merged.subnets[1].gateway, Ipv4Addr::new(198, 18, 2, 254));
        assert_eq!(merged.aux_addresses["nas"], Ipv4Addr::new(198, 18, 2, 9));
        assert_eq!(
            merged.kept_vnis,
            [KeptVni {
                subnet: sub2,
                vni: Vni(4097)
            }]
        );
        assert!(!s.networks.contains_key(b));
        // Named by either VNI, the subnet is the merged network's; its
        // old VNI is nobody else's while it exists.
        assert_eq!(s.network_of_subnet(4097, &sub2).unwrap().name, a);
        assert_eq!(s.network_of_subnet(4096, &sub2).unwrap().name, a);
        assert!(
            s.network_of_subnet(4097, &"198.18.1.0/24".parse().unwrap())
                .is_none()
        );
        assert_eq!(s.create_network(spec("c", None)).unwrap().vni.get(), 4098);
        assert_eq!(
            s.create_network(spec("d", Some(4097))).unwrap_err(),
            ModelError::VniInUse {
                vni: Vni(4097),
                network: a.to_owned()
            }
        );
        // Its endpoints get addresses of either subnet; it goes whole.
        let ep = s
            .add_container(ContainerSpec {
                ip: Some(Ipv4Addr::new(198, 18, 2, 5)),
                ..container(a, "n1", "c1")
            })
            .unwrap();
        assert_eq!(ep.mac, MacAddr::for_ipv4(ep.ip));
        s.remove_endpoint(a, ep.ip).unwrap();
        s.remove_network(a).unwrap();
        assert_eq!(s.create_network(spec("e", None)).unwrap().vni.get(), 4096);
        assert_eq!(s.create_network(spec("f", None)).unwrap().vni.get(), 4097);
    }

    #[test]
    fn a_renumbered_network_keeps_its_former_vni_for_its_subnets() {
        let mut s = State::default();
        let net = |name: &str, subnet: &str| NetworkSpec::new(name, subnet.parse().unwrap());
        s.create_network(net("a", "198.18.1.0/24")).unwrap();
        s.create_network(net("b", "198.18.2.0/24")).unwrap();
        s.create_network(net("other", "198.18.9.0/24")).unwrap();
        s.merge_network("a", "b").unwrap();
        let before = s.clone();
        for (vni, e) in [
            (
                4098,
                ModelError::VniInUse {
                    vni: Vni(4098),
                    network: "other".into(),
                },
            ),
            (0, ModelError::InvalidVni(0)),
        ] {
            assert_eq!(s.renumber_network("a", vni).unwrap_err(), e);
        }
        assert!(s.renumber_network("gone", 5000).is_err());
        assert_eq!(s, before);
        // Its own VNI: nothing changes.
        s.renumber_network("a", 4096).unwrap();
        assert_eq!(s, before);

        let (sub1, sub2): (Subnet, Subnet) = (
            "198.18.1.0/24".parse().unwrap(),
            "198.18.2.0/24".parse().unwrap(),
        );
        let n = s.renumber_network("a", 5000).unwrap().clone();
        assert_eq!(n.vni, Vni(5000));
        let kept = |list: &[(Subnet, u32)]| -> Vec<KeptVni> {
            list.iter()
                .map(|(subnet, vni)| KeptVni {
                    subnet: *subnet,
                    vni: Vni(*vni),
                })
                .collect()
        };
        assert_eq!(
            n.kept_vnis,
            kept(&[(sub2, 4097), (sub1, 4096), (sub2, 4096)])
        );
        let pairs = [
            (4096, &sub1),
            (4096, &sub2),
            (4097, &sub2),
            (5000, &sub1),
            (5000, &sub2),
        ];
        for (vni, subnet) in pairs {
            assert_eq!(s.network_of_subnet(vni, subnet).unwrap().name, "a");
        }
        // To a VNI it keeps: that one is its own again, and every name
        // it was given still finds it.
        let n = s.renumber_network("a", 4097).unwrap().clone();
        assert_eq!(
            n.kept_vnis,
            kept(&[(sub1, 4096), (sub2, 4096), (sub1, 5000), (sub2, 5000)])
        );
        for (vni, subnet) in pairs {
            assert_eq!(s.network_of_subnet(vni, subnet).unwrap().name, "a");
        }
        assert_eq!(
            s.create_network(net("c", "198.18.3.0/24"))
                .unwrap()
                .vni
                .get(),
            4098 + 1
        );
    }

    #[test]
    fn merging_refuses_endpoints_overlaps_and_twice_named_aux_addresses() {
        let mut s = State::default();
        let net = |name: &str, subnet: &str| NetworkSpec::new(name, subnet.parse().unwrap());
        s.create_network(NetworkSpec {
            aux_addresses: vec![("r".into(), Ipv4Addr::new(198, 18, 1, 9))],
            ..net("a", "198.18.1.0/24")
        })
        .unwrap();
        s.create_network(net("busy", "198.18.2.0/24")).unwrap();
        s.add_container(container("busy", "n1", "c1")).unwrap();
        s.create_network(net("wide", "198.18.0.0/16")).unwrap();
        s.create_network(NetworkSpec {
            aux_addresses: vec![("r".into(), Ipv4Addr::new(198, 18, 3, 9))],
            ..net("same-aux", "198.18.3.0/24")
        })
        .unwrap();
        let before = s.clone();
        assert!(matches!(
            s.merge_network("a", "busy"),
            Err(ModelError::NetworkInUse { count: 1, .. })
        ));
        assert!(matches!(
            s.merge_network("a", "wide"),
            Err(ModelError::SubnetClash { .. })
        ));
        assert_eq!(
            s.merge_network("a", "same-aux").unwrap_err(),
            ModelError::AuxNameTwice("r".into())
        );
        assert!(matches!(
            s.merge_network("a", "gone"),
            Err(ModelError::NoSuchNetwork(_))
        ));
        assert_eq!(s, before);
        // Into itself: nothing changes.
        s.merge_network("a", "a").unwrap();
        assert_eq!(s, before);
    }

    #[test]
    fn kept_vnis_survive_the_stored_form() {
        let mut s = State::default();
        s.create_network(NetworkSpec::new("a", "198.18.1.0/24".parse().unwrap()))
            .unwrap();
        s.create_network(NetworkSpec::new("b", "198.18.2.0/24".parse().unwrap()))
            .unwrap();
        let n = s.merge_network("a", "b").unwrap().clone();
        let text = serde_json::to_string(&n).unwrap();
        assert!(
            text.contains(r#""kept_vnis":[{"subnet":"198.18.2.0/24","vni":4097}]"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Network>(&text).unwrap(), n);
        // Networks without any are stored as before.
        let plain = NetworkSpec::new("c", "198.18.3.0/24".parse().unwrap());
        let c = s.create_network(plain).unwrap();
        assert!(!serde_json::to_string(c).unwrap().contains("kept_vnis"));
    }

    #[test]
    fn default_mtu_is_underlay_minus_vxlan_overhead() {
        let mut s = State::default();
        assert_eq!(s.create_network(spec("a", None)).unwrap().mtu, 1450);
        // Nodes that reported their underlay: the narrowest one decides.
        s.register_node("jumbo", Ipv4Addr::new(192, 0, 2, 10), Some(9000));
        assert_eq!(s.create_network(spec("b", None)).unwrap().mtu, 8950);
        s.register_node("old", Ipv4Addr::new(192, 0, 2, 11), None);
        s.register_node("thin", Ipv4Addr::new(192, 0, 2, 12), Some(1400));
        assert_eq!(s.create_network(spec("c", None)).unwrap().mtu, 1350);
    }

    #[test]
    fn encrypted_networks_leave_room_for_wireguard_and_say_so_in_json() {
        let mut s = State::default();
        let secret = |name: &str| NetworkSpec {
            encrypted: true,
            ..spec(name, None)
        };
        let net = s.create_network(secret("e")).unwrap().clone();
        assert_eq!((net.mtu, net.encrypted), (1390, true));
        assert_eq!(serde_json::to_value(&net).unwrap()["encrypted"], true);
        s.register_node("thin", Ipv4Addr::new(192, 0, 2, 12), Some(1400));
        assert_eq!(s.create_network(secret("f")).unwrap().mtu, 1290);
        // Plain networks keep their old JSON (no field) and read back plain.
        let plain = s.create_network(spec("p", None)).unwrap().clone();
        let json = serde_json::to_value(&plain).unwrap();
        assert!(json.get("encrypted").is_none());
        assert!(!serde_json::from_value::<Network>(json).unwrap().encrypted);
    }

    #[test]
    fn re_registering_a_node_keeps_its_published_key() {
        let mut s = State::default();
        let key = crate::crypto::NodeKey {
            public_key: crate::crypto::keys::PublicKey([7; 32]),
            port: 51820,
        };
        assert!(!s.publish_node_key("n1", key));
        s.register_node("n1", Ipv4Addr::new(192, 0, 2, 10), Some(1500));
        assert!(s.publish_node_key("n1", key));
        s.register_node("n1", Ipv4Addr::new(192, 0, 2, 11), Some(1500));
        assert_eq!(s.nodes["n1"].wireguard, Some(key));
        assert_eq!(s.nodes["n1"].vtep, Ipv4Addr::new(192, 0, 2, 11));
    }

    #[test]
    fn an_mtu_the_underlay_cannot_carry_is_refused_naming_the_node() {
        let mut s = State::default();
        s.register_node("thin", Ipv4Addr::new(192, 0, 2, 12), Some(1500));
        let before = s.clone();
        let err = s
            .create_network(NetworkSpec {
                mtu: Some(1451),
                ..spec("a", None)
            })
            .unwrap_err();
        assert!(matches!(err, ModelError::MtuTooBig { mtu: 1451, .. }));
        assert!(err.to_string().contains("\"thin\""), "{err}");
        assert!(err.to_string().contains("--mtu 1450"), "{err}");
        assert_eq!(s, before);
        // An encrypted network's packets carry WireGuard's 60 bytes more:
        // the MTU to pass is 1390, not the 1450 that was refused.
        let err = s
            .create_network(NetworkSpec {
                mtu: Some(1450),
                encrypted: true,
                ..spec("a", None)
            })
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("at most 1390 after VXLAN in WireGuard's 110 bytes")
                && err.to_string().contains("--mtu 1390"),
            "{err}"
        );
        assert_eq!(s, before);
        let ok = s.create_network(NetworkSpec {
            mtu: Some(1450),
            ..spec("a", None)
        });
        assert_eq!(ok.unwrap().mtu, 1450);
    }

    #[test]
    fn several_subnets_get_gateways_by_containment_and_default_first_hosts() {
        let mut s = State::default();
        let n = s
            .create_network(NetworkSpec {
                subnets: subnets(&["198.18.0.0/24", "198.18.1.0/24", "198.18.2.0/24"]),
                gateways: vec![Ipv4Addr::new(198, 18, 1, 254)],
                ..spec("a", None)
            })
            .unwrap()
            .clone();
        let gws: Vec<_> = n.subnets.iter().map(|p| p.gateway.to_string()).collect();
        assert_eq!(gws, ["198.18.0.1", "198.18.1.254", "198.18.2.1"]);
        // Allocation fills the first subnet; --subnet picks another.
        let e = s.add_container(container("a", "n", "c1")).unwrap();
        assert_eq!(e.ip, Ipv4Addr::new(198, 18, 0, 2));
        let e = s
            .add_container(ContainerSpec {
                subnet: Some("198.18.1.0/24".parse().unwrap()),
                ..container("a", "n", "c2")
            })
            .unwrap();
        assert_eq!(e.ip, Ipv4Addr::new(198, 18, 1, 1));
        let e = s
            .add_container(ContainerSpec {
                ip: Some(Ipv4Addr::new(198, 18, 2, 9)),
                ..container("a", "n", "c3")
            })
            .unwrap();
        assert_eq!(e.ip, Ipv4Addr::new(198, 18, 2, 9));
    }

    #[test]
    fn bad_subnets_and_gateways_are_refused_and_change_nothing() {
        let mut s = State::default();
        s.create_network(spec("ok", None)).unwrap();
        let before = s.clone();
        let cases = [
            (subnets(&[]), vec![], "at least one --subnet"),
            (
                subnets(&["198.18.0.0/16", "198.18.4.0/24"]),
                vec![],
                "overlap",
            ),
            (
                subnets(&["198.18.0.0/24"]),
                vec![Ipv4Addr::new(198, 18, 1, 1)],
                "in none of",
            ),
            (
                subnets(&["198.18.0.0/24"]),
                vec![Ipv4Addr::new(198, 18, 0, 255)],
                "broadcast",
            ),
            (
                subnets(&["198.18.0.0/24"]),
                vec![Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2)],
                "two gateways",
            ),
        ];
        for (subnets, gateways, needle) in cases {
            let err = s
                .create_network(NetworkSpec {
                    subnets,
                    gateways,
                    ..spec("x", None)
                })
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        }
        let err = s
            .add_container(ContainerSpec {
                ip: Some(Ipv4Addr::new(198, 19, 0, 2)),
                ..container("ok", "n", "c")
            })
            .unwrap_err();
        assert!(err.to_string().contains("not a usable address"), "{err}");
        let err = s
            .add_static(
                "ok",
                Ipv4Addr::new(198, 18, 0, 9),
                Some(MacAddr(ANYCAST_GATEWAY_MAC)),
                Ipv4Addr::new(192, 0, 2, 5),
                None,
            )
            .unwrap_err();
        assert!(err.to_string().contains("gateways"), "{err}");
        assert_eq!(s, before);
    }

    #[test]
    fn ip_ranges_and_aux_addresses_shape_what_endpoints_get() {
        let mut s = State::default();
        s.create_network(NetworkSpec {
            subnets: subnets(&["198.18.0.0/24", "198.18.1.0/24"]),
            ranges: vec!["198.18.0.128/30".parse().unwrap()],
            aux_addresses: vec![
                ("router".into(), Ipv4Addr::new(198, 18, 0, 129)),
                ("printer".into(), Ipv4Addr::new(198, 18, 0, 7)),
            ],
            ..spec("a", None)
        })
        .unwrap();
        let n = s.network("a").unwrap().clone();
        assert_eq!(n.aux_name(Ipv4Addr::new(198, 18, 0, 7)), Some("printer"));
        // The range's four addresses less the auxiliary one, then the
        // second subnet, which has no range.
        let got: Vec<Ipv4Addr> = (0..4)
            .map(|i| {
                s.add_container(container("a", "n", &format!("c{i}")))
                    .unwrap()
                    .ip
            })
            .collect();
        assert_eq!(
            got,
            [
                Ipv4Addr::new(198, 18, 0, 128),
                Ipv4Addr::new(198, 18, 0, 130),
                Ipv4Addr::new(198, 18, 0, 131),
                Ipv4Addr::new(198, 18, 1, 2),
            ]
        );
        // Asked for, an address outside the range is given (Docker's
        // rule); an auxiliary one never is, nor reserved or made static.
        let e = s
            .add_container(ContainerSpec {
                ip: Some(Ipv4Addr::new(198, 18, 0, 9)),
                ..container("a", "n", "asked")
            })
            .unwrap();
        assert_eq!(e.ip, Ipv4Addr::new(198, 18, 0, 9));
        let before = s.clone();
        let aux = Ipv4Addr::new(198, 18, 0, 129);
        let err = s
            .add_container(ContainerSpec {
                ip: Some(aux),
                ..container("a", "n", "aux")
            })
            .unwrap_err();
        assert!(
            err.to_string().contains("auxiliary address \"router\""),
            "{err}"
        );
        assert!(s.reserve("a", "n", Some(aux), None, "o").is_err());
        assert!(
            s.add_static("a", aux, None, Ipv4Addr::new(192, 0, 2, 9), None)
                .is_err()
        );
        assert_eq!(s, before);
        // A full range within a named subnet says which range is full.
        let err = s
            .add_container(ContainerSpec {
                subnet: Some("198.18.0.0/24".parse().unwrap()),
                ..container("a", "n", "more")
            })
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("198.18.0.0/24 (range 198.18.0.128/30)"),
            "{err}"
        );
        // Stored and read back, both stay; older records have neither.
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["networks"]["a"]["subnets"][0]["range"], "198.18.0.128/30");
        assert_eq!(
            v["networks"]["a"]["aux_addresses"]["router"],
            "198.18.0.129"
        );
        assert!(v["networks"]["a"]["subnets"][1].get("range").is_none());
        let again: State = serde_json::from_value(v).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn a_container_may_bring_its_own_mac_unless_another_has_it_or_it_is_ovls() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let mine = MacAddr([0x0a, 0, 0, 0, 0, 5]);
        let e = s
            .add_container(ContainerSpec {
                mac: Some(mine),
                ..container("a", "n", "c1")
            })
            .unwrap();
        assert_eq!((e.ip, e.mac), (Ipv4Addr::new(198, 18, 0, 2), mine));
        let before = s.clone();
        let ovls = MacAddr::for_ipv4(Ipv4Addr::new(198, 18, 0, 9));
        for (mac, needle) in [
            (mine, "already used on network \"a\" by c1"),
            (ovls, "where ovl gives each container 02:42"),
            (MacAddr(ANYCAST_GATEWAY_MAC), "MAC of ovl's gateways"),
            (MacAddr([1, 0, 0, 0, 0, 1]), "multicast"),
        ] {
            let err = s
                .add_container(ContainerSpec {
                    mac: Some(mac),
                    ..container("a", "n", "c2")
                })
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{mac}: {err}");
            // Nor may a static endpoint (ovl endpoint add --mac) have it.
            let err = s
                .add_static(
                    "a",
                    Ipv4Addr::new(198, 18, 0, 20),
                    Some(mac),
                    Ipv4Addr::new(192, 0, 2, 5),
                    None,
                )
                .unwrap_err();
            assert!(err.to_string().contains(needle), "static {mac}: {err}");
        }
        assert_eq!(s, before);
        // 02:42 + its own address is what it would get anyway.
        let e = s
            .add_container(ContainerSpec {
                ip: Some(Ipv4Addr::new(198, 18, 0, 9)),
                mac: Some(ovls),
                ..container("a", "n", "c3")
            })
            .unwrap();
        assert_eq!(e.mac, ovls);
        // A reservation's MAC (Docker's CreateEndpoint) is taken over.
        let r = s.reserve("a", "n", None, None, "docker:e1").unwrap();
        let theirs = MacAddr([0x0a, 0, 0, 0, 0, 6]);
        s.endpoints.iter_mut().find(|e| e.ip == r.ip).unwrap().mac = theirs;
        let e = s
            .add_container(ContainerSpec {
                ip: Some(r.ip),
                owner: Some("docker:e1".into()),
                ..container("a", "n", "c4")
            })
            .unwrap();
        assert_eq!(e.mac, theirs);
    }

    #[test]
    fn bad_ip_ranges_and_aux_addresses_are_refused_and_change_nothing() {
        let mut s = State::default();
        s.create_network(spec("ok", None)).unwrap();
        let before = s.clone();
        let ip = |d| Ipv4Addr::new(198, 18, 0, d);
        type Case<'a> = (&'a [&'a str], Vec<(&'a str, Ipv4Addr)>, &'a str);
        let cases: [Case; 10] = [
            // Auxiliary addresses taking the whole range leave endpoints
            // nothing, as an empty range would.
            (
                &["198.18.0.8/31"],
                vec![("r", ip(8)), ("s", ip(9))],
                "would leave IP range 198.18.0.8/31",
            ),
            (&["198.18.1.0/25"], vec![], "in none of"),
            (&["198.18.0.0/23"], vec![], "in none of"),
            (
                &["198.18.0.0/25", "198.18.0.128/25"],
                vec![],
                "two IP ranges",
            ),
            // Only the gateway: nothing left to give.
            (&["198.18.0.1/32"], vec![], "holds no address"),
            (&["198.18.0.255/32"], vec![], "holds no address"),
            (&[], vec![("r", ip(1))], "other than a gateway"),
            (&[], vec![("r", ip(255))], "not a host address"),
            (&[], vec![("r", ip(9)), ("s", ip(9))], "both 198.18.0.9"),
            (&[], vec![("-r", ip(9))], "invalid auxiliary address name"),
        ];
        for (ranges, aux, needle) in cases {
            let err = s
                .create_network(NetworkSpec {
                    ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
                    aux_addresses: aux.into_iter().map(|(n, ip)| (n.into(), ip)).collect(),
                    ..spec("x", None)
                })
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        }
        assert_eq!(s, before);
        for bad in ["router", "r=198.18.0", "r=x"] {
            assert!(parse_aux_address(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_aux_address("r=198.18.0.9"),
            Ok(("r".to_owned(), ip(9)))
        );
    }

    #[test]
    fn containers_get_a_default_route_or_on_internal_networks_the_other_subnets() {
        let mut s = State::default();
        for (name, internal) in [("out", false), ("in", true)] {
            s.create_network(NetworkSpec {
                subnets: subnets(&["198.18.0.0/24", "198.18.1.0/24", "198.18.2.0/25"]),
                internal,
                ..spec(name, None)
            })
            .unwrap();
        }
        let ip = Ipv4Addr::new(198, 18, 1, 7);
        let out = s.network("out").unwrap().container_routes(ip).unwrap();
        assert_eq!(out.prefix, 24);
        assert_eq!(out.gateway, Ipv4Addr::new(198, 18, 1, 1));
        assert_eq!(out.via_gateway, vec![(Ipv4Addr::UNSPECIFIED, 0)]);
        let inside = s.network("in").unwrap().container_routes(ip).unwrap();
        assert_eq!(
            inside.via_gateway,
            vec![
                (Ipv4Addr::new(198, 18, 0, 0), 24),
                (Ipv4Addr::new(198, 18, 2, 0), 25)
            ]
        );
        assert!(
            s.network("in")
                .unwrap()
                .container_routes(Ipv4Addr::new(203, 0, 113, 1))
                .is_none()
        );
    }

    #[test]
    fn networks_stored_before_several_subnets_still_load() {
        // A state.json written by ovl before this change: one `subnet`.
        let old = r#"{"schema":1,"revision":7,"networks":{"uber-net":{"name":"uber-net","vni":4096,"subnet":"198.18.0.0/24","mtu":1450}},"endpoints":[],"nodes":{"host-a":{"name":"host-a","vtep":"192.0.2.10"}}}"#;
        let s: State = serde_json::from_str(old).unwrap();
        let n = s.network("uber-net").unwrap();
        assert_eq!(n.subnets_text(), "198.18.0.0/24");
        assert_eq!(n.subnets[0].gateway, Ipv4Addr::new(198, 18, 0, 1));
        assert!(!n.internal);
        assert_eq!(s.cluster.vxlan_port, 4789);
        assert_eq!(s.nodes["host-a"].underlay_mtu, None);
        // Written back, it keeps `subnet` for the ovl versions from before.
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["networks"]["uber-net"]["subnet"], "198.18.0.0/24");
        assert_eq!(
            v["networks"]["uber-net"]["subnets"][0]["gateway"],
            "198.18.0.1"
        );
        let again: State = serde_json::from_value(v).unwrap();
        assert_eq!(again, s);
        // A record with neither field is refused, not invented.
        let bad = r#"{"name":"x","vni":5,"mtu":1450}"#;
        assert!(serde_json::from_str::<Network>(bad).is_err());
    }

    #[test]
    fn vxlan_ports_outside_dockers_data_path_range_are_refused() {
        let mut s = State::default();
        for port in [0, 53, 1023, 49152, 51820, 65535] {
            assert_eq!(
                s.set_vxlan_port(port),
                Err(ModelError::InvalidVxlanPort(port))
            );
        }
        assert_eq!(s.cluster.vxlan_port, 4789, "a refusal changes nothing");
        s.set_vxlan_port(8472).unwrap();
        assert_eq!(s.cluster.vxlan_port, 8472);
        s.set_vxlan_port(1024).unwrap();
        s.set_vxlan_port(49151).unwrap();
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
    fn only_the_very_endpoint_is_removed_exactly() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let old = s.add_container(container("a", "n1", "c1")).unwrap();
        s.remove_container("a", "n1", "c1").unwrap();
        // The namespace's new endpoint, at another address.
        let new = s
            .add_container(ContainerSpec {
                ip: Some(Ipv4Addr::new(198, 18, 0, 3)),
                ..container("a", "n1", "c1")
            })
            .unwrap();
        assert!(!s.remove_exact(&old));
        // Another container at the old address.
        let other = s.add_container(container("a", "n1", "c2")).unwrap();
        assert_eq!(other.ip, old.ip);
        assert!(!s.remove_exact(&old));
        assert!(s.remove_exact(&new));
        assert_eq!(s.endpoints, vec![other]);
    }

    #[test]
    fn a_reservation_holds_its_address_until_its_owner_takes_it_over() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let r = s.reserve("a", "n1", None, None, "docker:e1").unwrap();
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
        mine.name = Some("web".into());
        let ep = s.add_container(mine).unwrap();
        s.set_names("a", ep.ip, None, vec!["www".into()]).unwrap();
        assert_eq!(ep.ip, r.ip);
        assert!(matches!(ep.location, Location::Container { .. }));
        assert_eq!(s.endpoints_of("a").count(), 2);
        // Leaving the container keeps the address reserved.
        let back = s
            .release_to_reservation("a", "n1", "/run/docker/netns/x")
            .unwrap();
        assert_eq!(back.location, Location::Reserved { node: "n1".into() });
        assert_eq!(back.owner.as_deref(), Some("docker:e1"));
        assert!(
            back.aliases.is_empty() && back.name == "docker:e1",
            "a reservation holds no names: {back:?}"
        );
        s.set_names("a", other.ip, Some("web".into()), vec!["www".into()])
            .unwrap();
        s.remove_endpoint("a", r.ip).unwrap();
        assert_eq!(s.endpoints_of("a").count(), 1);
    }

    #[test]
    fn endpoint_rm_removes_static_endpoints_only() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let vtep = Ipv4Addr::new(192, 0, 2, 50);
        let st = s
            .add_static("a", Ipv4Addr::new(198, 18, 0, 9), None, vtep, None)
            .unwrap();
        let c = s
            .add_container(container("a", "n1", "/run/netns/c1"))
            .unwrap();
        let r = s.reserve("a", "n1", None, None, "docker:e1").unwrap();
        let before = s.clone();
        for (ip, says) in [
            (c.ip, "ovl disconnect a /run/netns/c1"),
            (r.ip, "reserved on node \"n1\""),
        ] {
            let e = s.remove_static("a", ip).unwrap_err();
            assert!(
                matches!(&e, ModelError::NotStatic { holder, .. } if e.to_string().contains(says)
                    && !holder.is_empty()),
                "{e}"
            );
        }
        assert_eq!(s, before, "a refused endpoint rm changed the state");
        assert_eq!(s.remove_static("a", st.ip).unwrap(), st);
        assert!(matches!(
            s.remove_static("a", st.ip),
            Err(ModelError::NoSuchEndpoint { .. })
        ));
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
        assert!(is_host_ifname(&a) && is_host_ifname(&b));
        for other in [
            "ovl",
            "ovl1234567",
            "ovl123456789",
            "ovlABCDEF12",
            "eth0",
            "xovl1234567",
        ] {
            assert!(!is_host_ifname(other), "{other}");
        }
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
    fn names_are_unique_per_network_ignoring_case_and_aliases_are_shared() {
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
        for clash in ["web", "Web"] {
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
        assert_eq!(
            s.set_names("a", other.ip, Some("WEB".into()), Vec::new())
                .unwrap_err(),
            ModelError::NameTaken {
                name: "WEB".into(),
                network: "a".into(),
                holder: "web".into(),
                ip: web.ip,
            }
        );
        s.remove_container("a", "n2", "c2").unwrap();
        assert_eq!(s, before, "refusals changed nothing");
        // An alias is shared (Docker's --network-alias), and a name may be
        // another's alias.
        let other = s.add_container(named("a", "n2", "c2", "WWW")).unwrap();
        let third = s.add_container(named("a", "n3", "c3", "db")).unwrap();
        let third = s
            .set_names("a", third.ip, None, vec!["www".into(), "Web".into()])
            .unwrap();
        assert_eq!(third.aliases, ["www", "Web"]);
        assert_eq!(other.name, "WWW");
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
        s.register_node("n1", Ipv4Addr::new(192, 0, 2, 10), Some(1500));
        s.set_vxlan_port(8472).unwrap();
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
    fn a_full_subnet_asked_for_is_full_whatever_other_subnets_hold_back() {
        let mut s = State::default();
        s.create_network(NetworkSpec {
            subnets: subnets(&["198.18.0.0/29", "198.18.0.8/29"]),
            ..NetworkSpec::new("two", "198.18.0.0/29".parse().unwrap())
        })
        .unwrap();
        s.clock = at(5);
        // An address of the second subnet held back after its node left.
        let mut gone = container("two", "gone", "g");
        gone.subnet = Some("198.18.0.8/29".parse().unwrap());
        s.add_container(gone).unwrap();
        s.remove_node("gone").unwrap();
        // The first subnet full (.2 to .6; .1 is its gateway).
        for i in 0..5 {
            s.add_container(container("two", "n", &format!("c{i}")))
                .unwrap();
        }
        let mut asked = container("two", "n", "x");
        asked.subnet = Some("198.18.0.0/29".parse().unwrap());
        let err = s.add_container(asked).unwrap_err();
        assert!(
            matches!(&err, ModelError::Ipam(ipam::IpamError::Exhausted(s)) if s == "198.18.0.0/29"),
            "{err:?}"
        );
    }

    #[test]
    fn a_full_ip_range_is_full_whatever_is_held_outside_it() {
        let mut s = State::default();
        s.create_network(NetworkSpec {
            ranges: vec!["198.18.0.128/31".parse().unwrap()],
            ..spec("r", None)
        })
        .unwrap();
        s.clock = at(5);
        // An address asked for outside the range, held back after its
        // node left: never one an endpoint asking for none would get.
        let mut gone = container("r", "gone", "g");
        gone.ip = Some(Ipv4Addr::new(198, 18, 0, 9));
        s.add_container(gone).unwrap();
        s.remove_node("gone").unwrap();
        for i in 0..2 {
            s.add_container(container("r", "n", &format!("c{i}")))
                .unwrap();
        }
        let err = s.add_container(container("r", "n", "x")).unwrap_err();
        assert!(
            matches!(&err, ModelError::Ipam(ipam::IpamError::Exhausted(t))
                if t == "198.18.0.0/24 (range 198.18.0.128/31)"),
            "{err:?}"
        );
        assert_eq!(s.free_address("r"), Err(err));
    }

    #[test]
    fn a_full_subnet_with_held_addresses_says_so() {
        let mut s = State::default();
        s.create_network(NetworkSpec {
            vni: None,
            mtu: None,
            ..NetworkSpec::new("small", "198.18.0.0/29".parse().unwrap())
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
        // Asked without allocating (CNI STATUS), the answer is the same.
        assert_eq!(s.free_address("small"), Err(err));
        s.clock = at(70);
        assert_eq!(s.free_address("small"), Ok(Ipv4Addr::new(198, 18, 0, 2)));
        assert!(!s.released.is_empty(), "asking frees no hold");
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
    fn restoring_leaves_out_an_endpoint_whose_own_mac_another_took_and_records_it() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.clock = at(100);
        let mac: MacAddr = "0a:00:5e:00:00:07".parse().unwrap();
        let mine = s
            .add_container(ContainerSpec {
                mac: Some(mac),
                ..container("a", "n1", "c1")
            })
            .unwrap();
        let plain = s.add_container(container("a", "n1", "c2")).unwrap();
        assert_eq!((mine.given_mac(), plain.given_mac()), (Some(mac), None));
        s.remove_node("n1").unwrap();
        // While n1 is away, a container of n2 is given its MAC (its
        // address is held back, the MAC is free).
        let thief = s
            .add_container(ContainerSpec {
                mac: Some(mac),
                ..container("a", "n2", "thief")
            })
            .unwrap();
        assert_ne!(thief.ip, mine.ip);
        let out = s.restore_endpoints("n1", &[mine.clone(), plain.clone()]);
        assert_eq!(out.restored, vec![plain.clone()]);
        assert_eq!(out.conflicts.len(), 1);
        let c = &out.conflicts[0];
        assert_eq!(
            (
                c.ip,
                c.holder_name.as_str(),
                c.mac.map(|m| (m.mac, m.holder_ip))
            ),
            (mine.ip, "thief", Some((mac, thief.ip)))
        );
        assert_eq!(s.conflicts["n1"], out.conflicts);
        let holders: Vec<&str> = s
            .endpoints
            .iter()
            .filter(|e| e.mac == mac)
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(holders, ["thief"], "one endpoint has the MAC");
        // One at a time, as the etcd store's own writers do, too.
        assert!(!s.restore_endpoint(&mine));
        // Once the thief is gone, the endpoint comes back with its MAC.
        s.remove_container("a", "n2", "thief").unwrap();
        let healed = s.restore_endpoints("n1", &[mine.clone(), plain]);
        assert_eq!((healed.restored, healed.present), (vec![mine], 1));
        assert!(!s.conflicts.contains_key("n1"));
    }

    #[test]
    fn restoring_puts_back_an_endpoint_whose_name_another_took_under_its_fallback() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.clock = at(100);
        let id = "4f9c2d1e7a3b5d6e7f8091a2b3c4d5e6";
        let mine = s
            .add_container(ContainerSpec {
                name: Some("db".into()),
                owner: Some(format!("docker:{id}")),
                ..container("a", "n1", "/run/docker/netns/0123")
            })
            .unwrap();
        let mine = s
            .set_names("a", mine.ip, None, vec!["database".into()])
            .unwrap();
        s.remove_node("n1").unwrap();
        // While n1 is away, a container of n2 is called db (its address
        // is held back, its MAC is derived from it: both stay free).
        let holder = s
            .add_container(ContainerSpec {
                name: Some("DB".into()),
                ..container("a", "n2", "t1")
            })
            .unwrap();
        assert_ne!(holder.ip, mine.ip);
        let out = s.restore_endpoints("n1", std::slice::from_ref(&mine));
        // Back, under its short endpoint ID, with its aliases (its old
        // name not among them).
        let back = Endpoint {
            name: "4f9c2d1e7a3b".into(),
            ..mine.clone()
        };
        assert_eq!(back.aliases, ["database"]);
        assert_eq!(out.restored, vec![back.clone()]);
        assert!(out.conflicts.is_empty(), "{:?}", out.conflicts);
        assert!(!s.conflicts.contains_key("n1"));
        let r = &out.renamed[..];
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            (r[0].from.as_str(), r[0].to.as_str(), r[0].holder_ip),
            ("db", "4f9c2d1e7a3b", holder.ip)
        );
        let text = r[0].to_string();
        for needle in [
            "a/198.18.0.2 (/run/docker/netns/0123) is back as 4f9c2d1e7a3b",
            "its name db is held by DB (t1 on n2) at 198.18.0.3",
            "reconnect it with another --name",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
        let called: Vec<Ipv4Addr> = s
            .endpoints
            .iter()
            .filter(|e| e.name.eq_ignore_ascii_case("db"))
            .map(|e| e.ip)
            .collect();
        assert_eq!(called, [holder.ip], "one endpoint is called db");
        assert_eq!(s.endpoints.iter().find(|e| e.ip == mine.ip), Some(&back));
        // The Docker plugin's naming pass, asked for the container's
        // names, leaves it as it is.
        let wanted = crate::attachment::naming::Wanted {
            name: "db".into(),
            aliases: vec!["database".into()],
        };
        let docker = crate::attachment::naming::choose(
            &s,
            "a",
            Some(&back),
            &wanted,
            crate::docker::short(id),
        );
        assert_eq!(
            (docker.name, docker.aliases),
            (back.name.clone(), back.aliases.clone())
        );
        // Next time it is present: the rename is reported once.
        let again = s.restore_endpoints("n1", std::slice::from_ref(&mine));
        assert_eq!((again.present, again.renamed.len()), (1, 0));
        // One at a time, as the etcd store's own writers do, a taken name
        // is refused.
        s.remove_container("a", "n1", "/run/docker/netns/0123")
            .unwrap();
        assert!(!s.restore_endpoint(&mine));
        assert!(s.restore_endpoint(&back));
    }

    #[test]
    fn an_address_its_node_handed_on_while_no_agent_watched_is_no_conflict() {
        // c1 disconnected while the agent was down, and c3 of the same
        // node connected at its address (and veth name); the agent comes
        // back remembering c1.
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        let c1 = s.add_container(container("a", "n1", "c1")).unwrap();
        s.remove_container("a", "n1", "c1").unwrap();
        let c3 = s.add_container(container("a", "n1", "c3")).unwrap();
        assert_eq!(c3.ip, c1.ip);
        let out = s.restore_endpoints("n1", &[c1]);
        assert_eq!(out, crate::release::RestoreOutcome::default());
        assert!(!s.conflicts.contains_key("n1"));
        assert_eq!(s.endpoints, vec![c3]);
    }

    #[test]
    fn removing_a_node_frees_its_endpoints_and_holds_their_addresses() {
        let mut s = State::default();
        s.create_network(spec("a", None)).unwrap();
        s.register_node("n1", Ipv4Addr::new(192, 0, 2, 10), None);
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
        s.register_node("n1", Ipv4Addr::new(192, 0, 2, 10), None);
        let covering = NetworkSpec {
            subnets: vec!["192.0.2.0/24".parse().unwrap()],
            ..spec("x", None)
        };
        assert!(matches!(
            s.create_network(covering),
            Err(ModelError::SubnetCoversVtep { .. })
        ));
        let multicast = NetworkSpec {
            subnets: vec!["224.1.0.0/16".parse().unwrap()],
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
