//! What a node's kernel maps must hold, computed from the store's state:
//! per served network a plan ([`Plans`]) the agent keeps between applies
//! and updates by what changed; `desired` (tests) computes everything
//! afresh, the reference the kept plans are held to.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use ovl_common::{
    Endpoint as MapEndpoint, Iface, NetworkInfo, SubnetInfo, VtepInfo,
    counters::UNATTRIBUTED_SLOT,
    maps::{network_flags, vtep_flags},
};

use crate::{
    model::{Endpoint, Location, Network, State},
    store::Dirty,
};

/// The map contents one node's state calls for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// VNI → what the kernel programs know of the network.
    pub networks: BTreeMap<u32, NetworkInfo>,
    /// (VNI, subnet address, prefix length) → the subnet's gateway.
    pub subnets: BTreeMap<(u32, [u8; 4], u8), SubnetInfo>,
    /// (VNI, address) → endpoint; filled only by `desired` (the agent
    /// writes endpoints per network, from the plans).
    pub endpoints: BTreeMap<(u32, [u8; 4]), MapEndpoint>,
    /// (VNI, remote VTEP) pairs allowed to send, each with its network's
    /// entry; those of encrypted networks whose node published a WireGuard
    /// key are `KEYED` (the only ones an encrypted network sends to).
    pub vteps: BTreeMap<(u32, [u8; 4]), VtepInfo>,
    /// Host-side ifindex → the local container interface behind it.
    pub ifaces: BTreeMap<u32, Iface>,
    /// Host-side interface names of local containers, by ifindex.
    pub iface_names: BTreeMap<u32, String>,
    /// Local endpoints whose veth does not exist (yet).
    pub missing_links: Vec<String>,
    /// Local containers of networks that lead out of the overlay: the
    /// host's return path for their external egress.
    pub egress: Vec<EgressEndpoint>,
    /// The cluster's VXLAN UDP port.
    pub vxlan_port: u16,
}

impl Desired {
    /// Puts each network's slot of `OVL_STATS` (VNI → slot, as the map
    /// writer assigned them: they persist in the maps, not in the store)
    /// into the network's entry and every entry that copies it.
    pub fn set_stats_slots(&mut self, slots: &BTreeMap<u32, u32>) {
        let slot = |vni: &u32| slots.get(vni).copied().unwrap_or(UNATTRIBUTED_SLOT);
        for (vni, net) in self.networks.iter_mut() {
            net.stats_slot = slot(vni);
        }
        for ((vni, _), vtep) in self.vteps.iter_mut() {
            vtep.network.stats_slot = slot(vni);
        }
        for iface in self.ifaces.values_mut() {
            iface.stats_slot = slot(&iface.vni);
        }
    }
}

/// A local container whose traffic to the world outside its network goes
/// through the host (masqueraded) and comes back to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressEndpoint {
    pub vni: u32,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// Host end of its veth.
    pub ifindex: u32,
    pub ifname: String,
    /// Its ports published on this node.
    pub ports: Vec<crate::ports::PublishedPort>,
    /// Its network's subnets: no client from outside the host has an
    /// address in them, so a published port takes no packet from one.
    pub subnets: Vec<crate::ipam::Subnet>,
}

/// Computes what node `node` (VTEP `vtep`) must hold. `ifindex_of`
/// resolves a host-side interface name on this node.
///
/// A node programs only the networks it has endpoints of (as Docker
/// programs only the overlays present on a host): a network's remote
/// endpoints and VTEPs cost a node nothing until one of its containers
/// joins it.
#[cfg(test)]
pub fn desired(
    state: &State,
    node: &str,
    vtep: Ipv4Addr,
    ifindex_of: &dyn Fn(&str) -> Option<u32>,
) -> Desired {
    let mut plans = Plans::default();
    plans.update(state, node, vtep, ifindex_of, &Dirty::All);
    plans.merged(state.cluster.vxlan_port)
}

/// What one network a node serves puts in its maps.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NetworkPlan {
    pub vni: u32,
    pub info: NetworkInfo,
    /// (VNI, subnet address, prefix length) → the subnet's gateway.
    pub subnets: BTreeMap<(u32, [u8; 4], u8), SubnetInfo>,
    /// Address → endpoint, local and remote.
    pub endpoints: BTreeMap<[u8; 4], MapEndpoint>,
    /// Remote VTEPs allowed to send → how many endpoints are behind each.
    pub vteps: BTreeMap<[u8; 4], usize>,
    /// Those of `vteps` an encrypted network sends to (their node
    /// published a WireGuard key).
    pub keyed_vteps: BTreeSet<[u8; 4]>,
    /// Local containers: host-side ifindex → interface, and names.
    pub ifaces: BTreeMap<u32, Iface>,
    pub iface_names: BTreeMap<u32, String>,
    pub missing_links: Vec<String>,
    pub egress: Vec<EgressEndpoint>,
    /// Endpoints of the network on this node (forwarding or not): the
    /// node serves the network while there is one.
    here: usize,
}

impl NetworkPlan {
    /// Endpoints on this node (forwarding through a local veth).
    pub fn local_endpoints(&self) -> impl Iterator<Item = [u8; 4]> + '_ {
        self.endpoints
            .iter()
            .filter(|(_, e)| e.is_local())
            .map(|(ip, _)| *ip)
    }

    /// A plan of `net` without endpoints.
    fn new(net: &Network) -> NetworkPlan {
        let vni = net.vni.get();
        let mut p = NetworkPlan {
            vni,
            info: network_info(net),
            ..NetworkPlan::default()
        };
        for pool in &net.subnets {
            p.subnets.insert(
                (vni, pool.subnet.network().octets(), pool.subnet.prefix()),
                SubnetInfo {
                    gateway: pool.gateway.octets(),
                },
            );
        }
        p
    }

    /// Adds what endpoint `ep` of `net` puts in the maps of the node `ctx`
    /// describes.
    fn add(&mut self, ctx: &Context<'_>, net: &Network, ep: &Endpoint) {
        let vni = self.vni;
        let ip = ep.ip.octets();
        if ep.node() == Some(ctx.node) {
            self.here += 1;
        }
        match &ep.location {
            Location::Container {
                node: n,
                host_ifname,
                ..
            } if n == ctx.node => {
                let Some(ifindex) = (ctx.ifindex_of)(host_ifname) else {
                    self.missing_links.push(host_ifname.clone());
                    return;
                };
                self.endpoints.insert(
                    ip,
                    MapEndpoint {
                        mac: ep.mac.0,
                        _pad: [0; 2],
                        ifindex,
                        vtep: [0; 4],
                    },
                );
                let gateway = net.pool_of(ep.ip).map(|p| p.gateway.octets());
                self.ifaces.insert(
                    ifindex,
                    Iface {
                        vni,
                        addr: ip,
                        // An address outside every subnet has no gateway to
                        // answer from; its container still switches.
                        gateway: gateway.unwrap_or([0; 4]),
                        mac: ep.mac.0,
                        _pad: [0; 2],
                        network_flags: self.info.flags,
                        // Filled in by `Desired::set_stats_slots`.
                        stats_slot: UNATTRIBUTED_SLOT,
                    },
                );
                self.iface_names.insert(ifindex, host_ifname.clone());
                if !net.internal {
                    self.egress.push(EgressEndpoint {
                        vni,
                        ip: ep.ip,
                        mac: ep.mac.0,
                        ifindex,
                        ifname: host_ifname.clone(),
                        ports: ep.ports.clone(),
                        subnets: net.subnets.iter().map(|p| p.subnet).collect(),
                    });
                }
            }
            _ => {
                // A remote endpoint needs a known VTEP that is not us.
                let Some((Some(remote), keyed)) = ctx.remote_of(ep) else {
                    return;
                };
                if remote == ctx.vtep {
                    return;
                }
                let remote = remote.octets();
                self.endpoints.insert(
                    ip,
                    MapEndpoint {
                        mac: ep.mac.0,
                        _pad: [0; 2],
                        ifindex: 0,
                        vtep: remote,
                    },
                );
                *self.vteps.entry(remote).or_default() += 1;
                if net.encrypted && keyed {
                    self.keyed_vteps.insert(remote);
                }
            }
        }
    }

    /// Takes back what [`NetworkPlan::add`] added for `ep`.
    fn remove(&mut self, ctx: &Context<'_>, ep: &Endpoint) {
        if ep.node() == Some(ctx.node) {
            self.here = self.here.saturating_sub(1);
        }
        let Some(entry) = self.endpoints.remove(&ep.ip.octets()) else {
            // In no map: a local one without its veth, or nothing at all.
            if let Location::Container {
                node, host_ifname, ..
            } = &ep.location
                && node == ctx.node
                && let Some(at) = self.missing_links.iter().position(|n| n == host_ifname)
            {
                self.missing_links.swap_remove(at);
            }
            return;
        };
        if entry.is_local() {
            self.ifaces.remove(&entry.ifindex);
            self.iface_names.remove(&entry.ifindex);
            self.egress.retain(|e| e.ip != ep.ip);
        } else if let Some(n) = self.vteps.get_mut(&entry.vtep) {
            *n -= 1;
            if *n == 0 {
                self.vteps.remove(&entry.vtep);
                self.keyed_vteps.remove(&entry.vtep);
            }
        }
    }
}

/// The plans of the networks a node serves, kept between applies: an
/// apply recomputes only what changed (an endpoint's entries, or a
/// network whose record changed), not ten thousand endpoints.
#[derive(Debug, Default)]
pub struct Plans {
    by_network: BTreeMap<String, NetworkPlan>,
}

/// Node-wide facts every network's plan reads.
struct Context<'a> {
    node: &'a str,
    vtep: Ipv4Addr,
    /// Node name → its VTEP while alive, and whether it published a
    /// WireGuard key. One hash lookup per endpoint instead of searches of
    /// the ordered maps by name.
    nodes: HashMap<&'a str, (Option<Ipv4Addr>, bool)>,
    ifindex_of: &'a dyn Fn(&str) -> Option<u32>,
}

impl Context<'_> {
    /// As `State::vtep_of`: a known node that is alive, or a static VTEP;
    /// with whether it is keyed.
    fn remote_of(&self, ep: &Endpoint) -> Option<(Option<Ipv4Addr>, bool)> {
        match &ep.location {
            Location::Container { node, .. } => self.nodes.get(node.as_str()).copied(),
            Location::Reserved { .. } => None,
            Location::Static { vtep } => Some((Some(*vtep), false)),
        }
    }
}

impl Plans {
    /// Brings the plans in line with `state` where `dirty` says it changed
    /// (see [`desired`]): a network covered whole is planned again from
    /// its endpoints, a changed endpoint's entries are taken back and
    /// added anew. Returns the VNIs whose endpoint entries may have
    /// changed (a network's, and the old one of a network that went or
    /// took another VNI).
    pub fn update(
        &mut self,
        state: &State,
        node: &str,
        vtep: Ipv4Addr,
        ifindex_of: &dyn Fn(&str) -> Option<u32>,
        dirty: &Dirty,
    ) -> BTreeSet<u32> {
        let mut touched = BTreeSet::new();
        if dirty.is_empty() {
            return touched;
        }
        let ctx = Context {
            node,
            vtep,
            nodes: state
                .nodes
                .iter()
                .map(|(name, n)| {
                    (
                        name.as_str(),
                        (
                            state.is_alive(name).then_some(n.vtep),
                            n.wireguard.is_some(),
                        ),
                    )
                })
                .collect(),
            ifindex_of,
        };
        // Planned anew: networks covered whole, and networks not served
        // until now that one of the changes brings to this node.
        let mut whole: BTreeSet<String> = match dirty {
            Dirty::All => self
                .by_network
                .keys()
                .chain(state.networks.keys())
                .cloned()
                .collect(),
            Dirty::Some { networks, .. } => networks.clone(),
        };
        for name in dirty.networks_with_endpoint_changes() {
            let arrives = || {
                dirty
                    .endpoints_of(name)
                    .iter()
                    .any(|c| c.after.as_ref().is_some_and(|e| e.node() == Some(node)))
            };
            if !self.by_network.contains_key(name) && arrives() {
                whole.insert(name.to_owned());
            }
        }
        for name in dirty.networks_with_endpoint_changes() {
            if whole.contains(name) {
                continue;
            }
            let (Some(plan), Some(net)) = (self.by_network.get_mut(name), state.networks.get(name))
            else {
                continue;
            };
            for change in dirty.endpoints_of(name) {
                if let Some(before) = &change.before {
                    plan.remove(&ctx, before);
                }
                if let Some(after) = &change.after {
                    plan.add(&ctx, net, after);
                }
            }
            touched.insert(plan.vni);
            if plan.here == 0 {
                self.by_network.remove(name);
            }
        }
        if whole.is_empty() {
            return touched;
        }
        for name in &whole {
            if let Some(old) = self.by_network.remove(name) {
                touched.insert(old.vni);
            }
            if let Some(net) = state.networks.get(name) {
                self.by_network.insert(name.clone(), NetworkPlan::new(net));
            }
        }
        for ep in &state.endpoints {
            if !whole.contains(&ep.network) {
                continue;
            }
            let (Some(plan), Some(net)) = (
                self.by_network.get_mut(&ep.network),
                state.networks.get(&ep.network),
            ) else {
                continue;
            };
            plan.add(&ctx, net, ep);
        }
        // Networks with no endpoint here are not served.
        for name in &whole {
            match self.by_network.get(name) {
                Some(p) if p.here == 0 => {
                    self.by_network.remove(name);
                }
                Some(p) => {
                    touched.insert(p.vni);
                }
                None => {}
            }
        }
        touched
    }

    /// The served networks' plans, by network name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &NetworkPlan)> {
        self.by_network.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// The plan of the network with VNI `vni`, if served.
    pub fn of_vni(&self, vni: u32) -> Option<&NetworkPlan> {
        self.by_network.values().find(|p| p.vni == vni)
    }

    /// Every plan in one [`Desired`], endpoints included (tests; the agent
    /// writes the plans themselves).
    #[cfg(test)]
    pub fn merged(&self, vxlan_port: u16) -> Desired {
        let mut d = Desired {
            vxlan_port,
            ..Desired::default()
        };
        self.merge_small_into(&mut d);
        for p in self.by_network.values() {
            d.endpoints
                .extend(p.endpoints.iter().map(|(ip, e)| ((p.vni, *ip), *e)));
        }
        d
    }

    /// Everything but the endpoints (whose map the agent writes per
    /// network): a few entries per network and per local container.
    pub fn merge_small_into(&self, d: &mut Desired) {
        for p in self.by_network.values() {
            let vni = p.vni;
            d.networks.insert(vni, p.info);
            d.subnets.extend(p.subnets.iter().map(|(k, v)| (*k, *v)));
            d.vteps.extend(p.vteps.keys().map(|v| {
                let mut flags = vtep_flags::ALLOWED;
                if p.keyed_vteps.contains(v) {
                    flags |= vtep_flags::KEYED;
                }
                (
                    (vni, *v),
                    VtepInfo {
                        flags,
                        network: p.info,
                    },
                )
            }));
            d.ifaces.extend(p.ifaces.iter().map(|(k, v)| (*k, *v)));
            d.iface_names
                .extend(p.iface_names.iter().map(|(k, v)| (*k, v.clone())));
            d.missing_links.extend(p.missing_links.iter().cloned());
            d.egress.extend(p.egress.iter().cloned());
        }
        d.missing_links.sort();
        d.egress.sort_by_key(|e| (e.vni, e.ip));
    }
}

/// What the kernel programs know of `net`: its `OVL_NETWORKS` entry, and
/// the copy of it in every entry derived from the network (VTEPs, local
/// interfaces), so a change of the network rewrites all of them.
fn network_info(net: &Network) -> NetworkInfo {
    let mut flags = 0;
    if net.internal {
        flags |= network_flags::INTERNAL;
    }
    if net.encrypted {
        flags |= network_flags::ENCRYPTED;
    }
    NetworkInfo {
        mtu: net.mtu,
        flags,
        // Filled in by `Desired::set_stats_slots`.
        stats_slot: UNATTRIBUTED_SLOT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    fn state() -> State {
        let mut s = State::default();
        for (name, vni) in [("blue", 100), ("red", 200)] {
            s.create_network(NetworkSpec {
                vni: Some(vni),
                internal: name == "red",
                ..NetworkSpec::new(name, "198.18.0.0/24".parse().unwrap())
            })
            .unwrap();
        }
        s.register_node("a", Ipv4Addr::new(192, 0, 2, 10), None);
        s.register_node("b", Ipv4Addr::new(198, 51, 100, 10), None);
        for (net, node, ns) in [("blue", "a", "c1"), ("blue", "b", "c2"), ("red", "b", "c3")] {
            s.add_container(ContainerSpec {
                network: net.into(),
                node: node.into(),
                netns: ns.into(),
                ..ContainerSpec::default()
            })
            .unwrap();
        }
        s
    }

    #[test]
    fn local_endpoints_point_at_veths_remote_ones_at_vteps() {
        let s = state();
        let d = desired(&s, "a", Ipv4Addr::new(192, 0, 2, 10), &|_| Some(7));
        let c1 = d.endpoints[&(100, [198, 18, 0, 2])];
        assert_eq!((c1.ifindex, c1.vtep), (7, [0; 4]));
        let c2 = d.endpoints[&(100, [198, 18, 0, 3])];
        assert_eq!((c2.ifindex, c2.vtep), (0, [198, 51, 100, 10]));
        assert_eq!(c2.mac, [0x02, 0x42, 198, 18, 0, 3]);
        assert_eq!(
            d.ifaces,
            BTreeMap::from([(
                7,
                Iface {
                    vni: 100,
                    addr: [198, 18, 0, 2],
                    gateway: [198, 18, 0, 1],
                    mac: [0x02, 0x42, 198, 18, 0, 2],
                    _pad: [0; 2],
                    network_flags: 0,
                    stats_slot: UNATTRIBUTED_SLOT,
                }
            )])
        );
        // Red has no endpoint on a: a holds nothing of it.
        assert_eq!(d.networks.keys().copied().collect::<Vec<_>>(), vec![100]);
        assert!(!d.endpoints.keys().any(|(vni, _)| *vni == 200));
        assert_eq!(
            d.vteps.keys().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([(100, [198, 51, 100, 10])])
        );
        // Each VTEP entry carries its network's entry, for decapsulation.
        assert_eq!(
            d.vteps[&(100, [198, 51, 100, 10])].network,
            d.networks[&100]
        );
    }

    #[test]
    fn a_node_programs_every_network_it_has_an_endpoint_of() {
        let s = state();
        let d = desired(&s, "b", Ipv4Addr::new(198, 51, 100, 10), &|_| Some(9));
        assert_eq!(
            d.networks.keys().copied().collect::<Vec<_>>(),
            vec![100, 200]
        );
        // Same address on another network is another key.
        let c1 = d.endpoints[&(100, [198, 18, 0, 2])];
        let c3 = d.endpoints[&(200, [198, 18, 0, 2])];
        assert_eq!((c1.ifindex, c1.vtep), (0, [192, 0, 2, 10]));
        assert_eq!((c3.ifindex, c3.vtep), (9, [0; 4]));
        assert_eq!(
            d.vteps.keys().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([(100, [192, 0, 2, 10])])
        );
    }

    #[test]
    fn stats_slots_reach_every_entry_that_copies_the_network() {
        let s = state();
        let mut d = desired(&s, "b", Ipv4Addr::new(198, 51, 100, 10), &|_| Some(9));
        d.set_stats_slots(&BTreeMap::from([(100, 7), (200, 3)]));
        assert_eq!(d.networks[&100].stats_slot, 7);
        assert_eq!(d.networks[&200].stats_slot, 3);
        assert!(
            d.vteps
                .iter()
                .all(|((vni, _), v)| v.network == d.networks[vni])
        );
        assert!(!d.vteps.is_empty());
        assert!(
            d.ifaces
                .values()
                .all(|i| i.stats_slot == d.networks[&i.vni].stats_slot)
        );
    }

    #[test]
    fn reserved_addresses_are_in_no_map() {
        let mut s = state();
        let r = s.reserve("blue", "b", None, None, "docker-ipam").unwrap();
        for (node, vtep) in [("a", [192, 0, 2, 10]), ("b", [198, 51, 100, 10])] {
            let d = desired(&s, node, Ipv4Addr::from(vtep), &|_| Some(7));
            assert!(
                !d.endpoints.contains_key(&(100, r.ip.octets())),
                "{node} maps a reservation"
            );
        }
    }

    #[test]
    fn subnets_internal_flags_and_egress_follow_the_networks() {
        let s = state();
        let d = desired(&s, "b", Ipv4Addr::new(198, 51, 100, 10), &|_| Some(9));
        assert_eq!(d.networks[&100].flags, 0);
        assert_eq!(d.networks[&200].flags, network_flags::INTERNAL);
        assert_eq!(
            d.subnets[&(200, [198, 18, 0, 0], 24)].gateway,
            [198, 18, 0, 1]
        );
        // c2 (blue) leads out; c3 (red, internal) does not.
        let egress: Vec<_> = d.egress.iter().map(|e| (e.vni, e.ip)).collect();
        assert_eq!(egress, vec![(100, Ipv4Addr::new(198, 18, 0, 3))]);
        assert_eq!(d.vxlan_port, 4789);
    }

    #[test]
    fn endpoints_of_unknown_nodes_and_missing_veths_are_left_out() {
        let mut s = state();
        s.nodes.remove("b");
        let d = desired(&s, "a", Ipv4Addr::new(192, 0, 2, 10), &|_| None);
        assert!(d.endpoints.is_empty());
        assert!(d.vteps.is_empty());
        assert!(d.egress.is_empty());
        assert_eq!(d.missing_links.len(), 1);
        assert_eq!(d.networks.len(), 1);
    }

    #[test]
    fn encrypted_networks_are_flagged_and_send_only_to_keyed_vteps() {
        let mut s = state();
        s.create_network(NetworkSpec {
            vni: Some(300),
            encrypted: true,
            ..NetworkSpec::new("secret", "198.18.1.0/24".parse().unwrap())
        })
        .unwrap();
        s.register_node("c", Ipv4Addr::new(203, 0, 113, 10), None);
        for (node, ns) in [("a", "s1"), ("b", "s2"), ("c", "s3")] {
            s.add_container(ContainerSpec {
                network: "secret".into(),
                node: node.into(),
                netns: ns.into(),
                ..ContainerSpec::default()
            })
            .unwrap();
        }
        let key = crate::crypto::NodeKey {
            public_key: crate::crypto::keys::PublicKey([1; 32]),
            port: 51820,
        };
        assert!(s.publish_node_key("b", key));
        let d = desired(&s, "a", Ipv4Addr::new(192, 0, 2, 10), &|_| Some(7));
        assert_eq!(d.networks[&300].flags, network_flags::ENCRYPTED);
        assert_eq!(d.networks[&100].flags, 0);
        // The local interfaces carry their network's flags, for egress.
        for iface in d.ifaces.values() {
            assert_eq!(iface.network_flags, d.networks[&iface.vni].flags);
        }
        assert!(d.ifaces.values().any(|i| i.vni == 300));
        // c has published no key yet: allowed as a VTEP, but not keyed.
        assert_eq!(
            d.vteps[&(300, [203, 0, 113, 10])].flags,
            vtep_flags::ALLOWED
        );
        let keyed: BTreeSet<_> = d
            .vteps
            .iter()
            .filter(|(_, v)| v.flags & vtep_flags::KEYED != 0)
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(keyed, BTreeSet::from([(300, [198, 51, 100, 10])]));
        // The VTEP entries of the encrypted network say so to decapsulation.
        assert_eq!(
            d.vteps[&(300, [203, 0, 113, 10])].network.flags,
            network_flags::ENCRYPTED
        );
    }

    #[test]
    fn plans_kept_between_changes_equal_plans_made_afresh() {
        use crate::store::{Followed, Part, catch_up};
        let vtep = Ipv4Addr::new(198, 51, 100, 10);
        // Every veth but c6's (blue's fifth address) exists, each with its
        // own index.
        let no_veth = crate::model::host_ifname(
            crate::model::Vni::try_from(100).unwrap(),
            Ipv4Addr::new(198, 18, 0, 5),
        );
        let ifindex_of =
            move |name: &str| (name != no_veth).then(|| name.bytes().map(u32::from).sum::<u32>());
        let mut theirs = Followed::whole(state());
        theirs.state.alive = Some(["a".to_owned(), "b".to_owned()].into());
        // Blue is encrypted and a keyed: a's VTEP is one blue sends to.
        theirs.state.networks.get_mut("blue").unwrap().encrypted = true;
        let key = crate::crypto::NodeKey {
            public_key: crate::crypto::keys::PublicKey([1; 32]),
            port: 51820,
        };
        assert!(theirs.state.publish_node_key("a", key));
        let mut mine = None;
        let mut plans = Plans::default();
        let dirty = catch_up(&mut mine, &theirs);
        plans.update(mine.as_ref().unwrap(), "b", vtep, &ifindex_of, &dirty);
        let d = plans.merged(4789);
        assert_eq!(
            d.vteps[&(100, [192, 0, 2, 10])].flags,
            vtep_flags::ALLOWED | vtep_flags::KEYED
        );
        assert_eq!(d.egress.len(), 1, "c2 leads out");
        let add = |s: &mut State, net: &str, node: &str, ns: &str| {
            s.add_container(ContainerSpec {
                network: net.into(),
                node: node.into(),
                netns: ns.into(),
                ..ContainerSpec::default()
            })
            .unwrap()
        };
        // A container leaves; the key its change touched.
        let leave = |s: &mut State, net: &str, node: &str, ns: &str| {
            let e = s.remove_container(net, node, ns).unwrap();
            (net.to_owned(), Some(e.ip))
        };
        type Change = Box<dyn Fn(&mut State) -> Vec<(String, Option<Ipv4Addr>)>>;
        let changes: Vec<(&str, Change)> = vec![
            (
                "a remote endpoint joins blue",
                Box::new(move |s| vec![("blue".into(), Some(add(s, "blue", "a", "c4").ip))]),
            ),
            (
                "a local one without its veth yet, and one more remote",
                Box::new(move |s| {
                    let local = add(s, "blue", "b", "c6").ip;
                    assert_eq!(local, Ipv4Addr::new(198, 18, 0, 5));
                    let remote = add(s, "blue", "a", "c7").ip;
                    vec![("blue".into(), Some(local)), ("blue".into(), Some(remote))]
                }),
            ),
            (
                "a remote endpoint leaves blue",
                Box::new(move |s| vec![leave(s, "blue", "a", "c1")]),
            ),
            (
                "b's last container on red leaves: b stops serving red",
                Box::new(move |s| vec![leave(s, "red", "b", "c3")]),
            ),
            (
                "a remote endpoint joins red, which b does not serve",
                Box::new(move |s| vec![("red".into(), Some(add(s, "red", "a", "c8").ip))]),
            ),
            (
                "b's first container on red: b serves red again",
                Box::new(move |s| vec![("red".into(), Some(add(s, "red", "b", "c9").ip))]),
            ),
            (
                "a's last endpoints leave blue: its VTEP goes, keyed and all",
                Box::new(move |s| vec![leave(s, "blue", "a", "c4"), leave(s, "blue", "a", "c7")]),
            ),
            (
                "b's container without its veth leaves blue (c2 keeps it served)",
                Box::new(move |s| vec![leave(s, "blue", "b", "c6")]),
            ),
            (
                "blue's record changes",
                Box::new(|s| {
                    s.networks.get_mut("blue").unwrap().encrypted = false;
                    vec![("blue".into(), None)]
                }),
            ),
            (
                "b's last container on blue, with its veth, leaves",
                Box::new(move |s| vec![leave(s, "blue", "b", "c2")]),
            ),
            (
                "blue goes, endpoints and all",
                Box::new(|s| {
                    let mut parts: Vec<(String, Option<Ipv4Addr>)> = s
                        .endpoints
                        .iter()
                        .filter(|e| e.network == "blue")
                        .map(|e| ("blue".into(), Some(e.ip)))
                        .collect();
                    s.endpoints.retain(|e| e.network != "blue");
                    s.networks.remove("blue");
                    parts.push(("blue".into(), None));
                    parts
                }),
            ),
        ];
        for (rev, (what, change)) in (11..).zip(changes) {
            for (network, ip) in change(&mut theirs.state) {
                let part = match ip {
                    Some(ip) => Part::Endpoint(&network, ip),
                    None => Part::Network(&network),
                };
                theirs.changes.touch(part, rev);
            }
            theirs.state.revision = rev;
            let dirty = catch_up(&mut mine, &theirs);
            assert!(!matches!(dirty, Dirty::All), "{what}: {dirty:?}");
            let copy = mine.as_ref().unwrap();
            plans.update(copy, "b", vtep, &ifindex_of, &dirty);
            assert_eq!(
                plans.merged(copy.cluster.vxlan_port),
                desired(copy, "b", vtep, &ifindex_of),
                "after: {what}"
            );
        }
        assert_eq!(
            plans.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            vec!["red"]
        );
    }

    #[test]
    fn a_plan_not_looked_at_again_keeps_what_it_had() {
        // What a dirty set leaves out is not recomputed: the set must name
        // every network that changed (the follower's change log does).
        let mut s = state();
        let vtep = Ipv4Addr::new(198, 51, 100, 10);
        let mut plans = Plans::default();
        plans.update(&s, "b", vtep, &|_| Some(9), &Dirty::All);
        s.remove_container("blue", "a", "c1").unwrap();
        plans.update(&s, "b", vtep, &|_| Some(9), &Dirty::networks(["red"]));
        assert_eq!(plans.of_vni(100).unwrap().endpoints.len(), 2);
        plans.update(&s, "b", vtep, &|_| Some(9), &Dirty::networks(["blue"]));
        assert_eq!(plans.of_vni(100).unwrap().endpoints.len(), 1);
    }
}
