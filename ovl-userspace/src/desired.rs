//! What a node's kernel maps must hold, computed from the store's state:
//! a pure function from `State` to `Desired`, which the agent writes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ovl_common::{Endpoint as MapEndpoint, NetworkInfo};

use crate::model::{Location, State};

/// The map contents one node's state calls for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// VNI → what the kernel programs know of the network.
    pub networks: BTreeMap<u32, NetworkInfo>,
    /// (VNI, address) → endpoint.
    pub endpoints: BTreeMap<(u32, [u8; 4]), MapEndpoint>,
    /// (VNI, remote VTEP) pairs allowed to send.
    pub vteps: BTreeSet<(u32, [u8; 4])>,
    /// Host-side ifindex → VNI, for local containers.
    pub ifaces: BTreeMap<u32, u32>,
    /// Host-side interface names of local containers, by ifindex.
    pub iface_names: BTreeMap<u32, String>,
    /// Local endpoints whose veth does not exist (yet).
    pub missing_links: Vec<String>,
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
    let mut d = Desired::default();
    let here: std::collections::BTreeSet<&str> = state
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
        d.networks.insert(
            net.vni.get(),
            NetworkInfo {
                mtu: net.mtu,
                flags: 0,
            },
        );
    }
    for ep in state
        .endpoints
        .iter()
        .filter(|e| here.contains(e.network.as_str()))
    {
        let Ok(net) = state.network(&ep.network) else {
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
                d.ifaces.insert(ifindex, vni);
                d.iface_names.insert(ifindex, host_ifname.clone());
            }
            _ => {
                // A remote endpoint needs a known VTEP that is not us.
                let Some(remote) = state.vtep_of(ep) else {
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
                d.vteps.insert((vni, remote.octets()));
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    fn state() -> State {
        let mut s = State::default();
        for (name, vni) in [("blue", 100), ("red", 200)] {
            s.create_network(NetworkSpec {
                name: name.into(),
                subnet: "198.18.0.0/24".parse().unwrap(),
                vni: Some(vni),
                mtu: None,
            })
            .unwrap();
        }
        s.register_node("a", Ipv4Addr::new(192, 0, 2, 10));
        s.register_node("b", Ipv4Addr::new(198, 51, 100, 10));
        for (net, node, ns) in [("blue", "a", "c1"), ("blue", "b", "c2"), ("red", "b", "c3")] {
            s.add_container(ContainerSpec {
                network: net.into(),
                node: node.into(),
                netns: ns.into(),
                name: None,
                ip: None,
                owner: None,
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
        assert_eq!(d.ifaces, BTreeMap::from([(7, 100)]));
        // Red has no endpoint on a: a holds nothing of it.
        assert_eq!(d.networks.keys().copied().collect::<Vec<_>>(), vec![100]);
        assert!(!d.endpoints.keys().any(|(vni, _)| *vni == 200));
        assert_eq!(d.vteps, BTreeSet::from([(100, [198, 51, 100, 10])]));
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
        assert_eq!(d.vteps, BTreeSet::from([(100, [192, 0, 2, 10])]));
    }

    #[test]
    fn reserved_addresses_are_in_no_map() {
        let mut s = state();
        let r = s.reserve("blue", "b", None, "docker-ipam").unwrap();
        for (node, vtep) in [("a", [192, 0, 2, 10]), ("b", [198, 51, 100, 10])] {
            let d = desired(&s, node, Ipv4Addr::from(vtep), &|_| Some(7));
            assert!(
                !d.endpoints.contains_key(&(100, r.ip.octets())),
                "{node} maps a reservation"
            );
        }
    }

    #[test]
    fn endpoints_of_unknown_nodes_and_missing_veths_are_left_out() {
        let mut s = state();
        s.nodes.remove("b");
        let d = desired(&s, "a", Ipv4Addr::new(192, 0, 2, 10), &|_| None);
        assert!(d.endpoints.is_empty());
        assert!(d.vteps.is_empty());
        assert_eq!(d.missing_links.len(), 1);
        assert_eq!(d.networks.len(), 1);
    }
}
