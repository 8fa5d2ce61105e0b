//! What a node's kernel maps must hold, computed from the store's state:
//! a pure function from `State` to `Desired`, which the agent writes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use ovl_common::{
    Endpoint as MapEndpoint, Iface, NetworkInfo, SubnetInfo, VtepInfo,
    counters::UNATTRIBUTED_SLOT,
    maps::{network_flags, vtep_flags},
};

use crate::model::{Endpoint, Location, Network, State};

/// The map contents one node's state calls for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// VNI → what the kernel programs know of the network.
    pub networks: BTreeMap<u32, NetworkInfo>,
    /// (VNI, subnet address, prefix length) → the subnet's gateway.
    pub subnets: BTreeMap<(u32, [u8; 4], u8), SubnetInfo>,
    /// (VNI, address) → endpoint.
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
}

/// Computes what node `node` (VTEP `vtep`) must hold. `ifindex_of`
/// resolves a host-side interface name on this node.
///
/// A node programs only the networks it has endpoints of (as Docker
/// programs only the overlays present on a host): a network's remote
/// endpoints and VTEPs cost a node nothing until one of its containers
/// joins it.
pub fn desired(
    state: &State,
    node: &str,
    vtep: Ipv4Addr,
    ifindex_of: &dyn Fn(&str) -> Option<u32>,
) -> Desired {
    let mut d = Desired {
        vxlan_port: state.cluster.vxlan_port,
        ..Desired::default()
    };
    let here: BTreeSet<&str> = state
        .endpoints
        .iter()
        .filter(|e| e.node() == Some(node))
        .map(|e| e.network.as_str())
        .collect();
    for net in state
        .networks
        .values()
        .filter(|n| here.contains(n.name.as_str()))
    {
        let vni = net.vni.get();
        d.networks.insert(vni, network_info(net));
        for pool in &net.subnets {
            d.subnets.insert(
                (vni, pool.subnet.network().octets(), pool.subnet.prefix()),
                SubnetInfo {
                    gateway: pool.gateway.octets(),
                },
            );
        }
    }
    // One hash lookup per endpoint instead of searches of the ordered
    // maps by name: with tens of thousands of endpoints this loop is most
    // of an apply.
    let served: HashMap<&str, &Network> = state
        .networks
        .iter()
        .filter(|(name, _)| here.contains(name.as_str()))
        .map(|(name, net)| (name.as_str(), net))
        .collect();
    let node_vteps: HashMap<&str, Option<Ipv4Addr>> = state
        .nodes
        .iter()
        .map(|(name, n)| (name.as_str(), state.is_alive(name).then_some(n.vtep)))
        .collect();
    let vtep_of = |ep: &Endpoint| match &ep.location {
        Location::Container { node, .. } => node_vteps.get(node.as_str()).copied().flatten(),
        Location::Reserved { .. } => None,
        Location::Static { vtep } => Some(*vtep),
    };
    for ep in &state.endpoints {
        let Some(net) = served.get(ep.network.as_str()) else {
            continue;
        };
        let vni = net.vni.get();
        let key = (vni, ep.ip.octets());
        match &ep.location {
            Location::Container {
                node: n,
                host_ifname,
                ..
            } if n == node => {
                let Some(ifindex) = ifindex_of(host_ifname) else {
                    d.missing_links.push(host_ifname.clone());
                    continue;
                };
                d.endpoints.insert(
                    key,
                    MapEndpoint {
                        mac: ep.mac.0,
                        _pad: [0; 2],
                        ifindex,
                        vtep: [0; 4],
                    },
                );
                let gateway = net.pool_of(ep.ip).map(|p| p.gateway.octets());
                d.ifaces.insert(
                    ifindex,
                    Iface {
                        vni,
                        addr: ep.ip.octets(),
                        // An address outside every subnet has no gateway to
                        // answer from; its container still switches.
                        gateway: gateway.unwrap_or([0; 4]),
                        mac: ep.mac.0,
                        _pad: [0; 2],
                        network_flags: network_info(net).flags,
                        // Filled in by `set_stats_slots`.
                        stats_slot: UNATTRIBUTED_SLOT,
                    },
                );
                d.iface_names.insert(ifindex, host_ifname.clone());
                if !net.internal {
                    d.egress.push(EgressEndpoint {
                        vni,
                        ip: ep.ip,
                        mac: ep.mac.0,
                        ifindex,
                        ifname: host_ifname.clone(),
                    });
                }
            }
            _ => {
                // A remote endpoint needs a known VTEP that is not us
                // (`State::vtep_of`, from the tables above).
                let Some(remote) = vtep_of(ep) else {
                    continue;
                };
                if remote == vtep {
                    continue;
                }
                d.endpoints.insert(
                    key,
                    MapEndpoint {
                        mac: ep.mac.0,
                        _pad: [0; 2],
                        ifindex: 0,
                        vtep: remote.octets(),
                    },
                );
                let entry = d.vteps.entry((vni, remote.octets())).or_insert(VtepInfo {
                    flags: vtep_flags::ALLOWED,
                    network: network_info(net),
                });
                let keyed = || {
                    ep.node()
                        .and_then(|n| state.nodes.get(n))
                        .is_some_and(|n| n.wireguard.is_some())
                };
                if net.encrypted && keyed() {
                    entry.flags |= vtep_flags::KEYED;
                }
            }
        }
    }
    d
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
}
