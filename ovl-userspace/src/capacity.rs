//! The kernel maps' capacities as limits of the whole cluster, checked by
//! the model before a change is written. Any node may serve every network
//! (it serves those it has a container on), so one node's maps must be able
//! to hold what the whole cluster holds: at most
//! [`NETWORKS`] networks with [`SUBNETS`] subnets between them, and
//! [`ENDPOINTS`] endpoints (reservations included), which also bounds the
//! (VNI, VTEP) pairs of `OVL_VTEPS` (each needs an endpoint) and a node's
//! own interfaces in `OVL_IFACES` (each is an endpoint).

use ovl_common::maps::{capacity, names};

use crate::model::{ModelError, State};

/// Networks in the cluster: `OVL_NETWORKS` (and `OVL_STATS`) of a node.
pub const NETWORKS: usize = capacity::NETWORKS as usize;
/// Subnets of every network together: `OVL_SUBNETS` of a node.
pub const SUBNETS: usize = capacity::SUBNETS as usize;
/// Endpoints in the cluster: `OVL_ENDPOINTS` of a node.
pub const ENDPOINTS: usize = capacity::ENDPOINTS as usize;

// Every map keyed by an endpoint holds at least as many as OVL_ENDPOINTS.
const _: () = assert!(capacity::VTEPS >= capacity::ENDPOINTS);
const _: () = assert!(capacity::IFACES >= capacity::ENDPOINTS);

/// Which limit a change would pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Networks,
    Subnets,
    Endpoints,
}

impl Limit {
    /// What is counted, for people.
    pub fn what(self) -> &'static str {
        match self {
            Limit::Networks => "networks",
            Limit::Subnets => "subnets (all networks together)",
            Limit::Endpoints => "endpoints (all networks together, reservations included)",
        }
    }

    /// The most the cluster may hold.
    pub fn limit(self) -> usize {
        match self {
            Limit::Networks => NETWORKS,
            Limit::Subnets => SUBNETS,
            Limit::Endpoints => ENDPOINTS,
        }
    }

    /// The node map that sets it.
    pub fn map(self) -> &'static str {
        match self {
            Limit::Networks => names::NETWORKS,
            Limit::Subnets => names::SUBNETS,
            Limit::Endpoints => names::ENDPOINTS,
        }
    }

    /// What to do instead.
    pub fn hint(self) -> &'static str {
        match self {
            Limit::Networks => "remove a network first (`ovl network ls`, `ovl network rm`)",
            Limit::Subnets => "remove a network or give the new one fewer subnets",
            Limit::Endpoints => {
                "disconnect containers or remove endpoints first (`ovl endpoint ls`)"
            }
        }
    }
}

/// Refuses a change that would make the cluster hold `wanted` of `limit`.
fn check(limit: Limit, wanted: usize) -> Result<(), ModelError> {
    if wanted > limit.limit() {
        return Err(ModelError::OverCapacity { limit, wanted });
    }
    Ok(())
}

/// Room for `adding` more endpoints, counting those `state` was read
/// without ([`State::endpoints_elsewhere`]).
pub fn endpoints(state: &State, adding: usize) -> Result<(), ModelError> {
    check(
        Limit::Endpoints,
        state.endpoints.len() + state.endpoints_elsewhere + adding,
    )
}

/// Room for one more network with `subnets` subnets (`state` holds every
/// network: creating one reads them all).
pub fn network(state: &State, subnets: usize) -> Result<(), ModelError> {
    check(Limit::Networks, state.networks.len() + 1)?;
    let held: usize = state.networks.values().map(|n| n.subnets.len()).sum();
    check(Limit::Subnets, held + subnets)
}

/// How close to a limit `state` is: changes within this many of one are
/// committed by the etcd store only if nothing of that kind was created
/// meanwhile, so racing changes cannot pass a limit together.
pub const GUARD_MARGIN: usize = 1024;

/// Whether `state` (after a change) is within [`GUARD_MARGIN`] of the
/// endpoint limit.
pub fn near_endpoint_limit(state: &State) -> bool {
    state.endpoints.len() + state.endpoints_elsewhere + GUARD_MARGIN > ENDPOINTS
}

/// Whether `state` (after a change) is within [`GUARD_MARGIN`] of the
/// network or subnet limits.
pub fn near_network_limit(state: &State) -> bool {
    let subnets: usize = state.networks.values().map(|n| n.subnets.len()).sum();
    state.networks.len() + GUARD_MARGIN / 16 > NETWORKS || subnets + GUARD_MARGIN / 4 > SUBNETS
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        ipam::Pool,
        model::{ContainerSpec, Network, NetworkSpec, Vni},
    };

    fn container(netns: &str) -> ContainerSpec {
        ContainerSpec {
            network: "a".into(),
            node: "n1".into(),
            netns: netns.into(),
            ..ContainerSpec::default()
        }
    }

    #[test]
    fn an_endpoint_beyond_the_maps_is_refused_by_name_and_changes_nothing() {
        let mut s = State::default();
        s.create_network(NetworkSpec::new("a", "198.18.0.0/24".parse().unwrap()))
            .unwrap();
        // What a read of network "a" alone learns of the others.
        s.endpoints_elsewhere = ENDPOINTS - 2;
        s.add_container(container("c1")).unwrap();
        let r = s.reserve("a", "n1", None, None, "docker:e1").unwrap();
        let full = s.clone();
        let err = s.add_container(container("c2")).unwrap_err();
        assert_eq!(
            err,
            ModelError::OverCapacity {
                limit: Limit::Endpoints,
                wanted: ENDPOINTS + 1
            }
        );
        let text = err.to_string();
        for needle in ["65537", "65536", "OVL_ENDPOINTS", "nothing was changed"] {
            assert!(text.contains(needle), "{needle:?} missing in {text}");
        }
        let vtep = Ipv4Addr::new(203, 0, 113, 50);
        let ip = Ipv4Addr::new(198, 18, 0, 50);
        assert!(matches!(
            s.add_static("a", ip, None, vtep, None),
            Err(ModelError::OverCapacity { .. })
        ));
        assert!(matches!(
            s.reserve("a", "n1", None, None, "docker:e2"),
            Err(ModelError::OverCapacity { .. })
        ));
        assert_eq!(s, full);
        // Taking a reservation over adds nothing: allowed when full.
        let mut mine = container("/run/docker/netns/x");
        mine.ip = Some(r.ip);
        mine.owner = Some("docker:e1".into());
        assert_eq!(s.add_container(mine).unwrap().ip, r.ip);
        // A disconnect makes room again.
        s.remove_container("a", "n1", "c1").unwrap();
        s.add_container(container("c2")).unwrap();
    }

    #[test]
    fn a_network_beyond_the_maps_is_refused_by_name_and_changes_nothing() {
        let mut s = State::default();
        for i in 0..NETWORKS as u32 {
            let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 8 * i;
            let subnet = format!("{}/29", Ipv4Addr::from(base));
            s.create_network(NetworkSpec::new(&format!("n{i}"), subnet.parse().unwrap()))
                .unwrap();
        }
        let full = s.clone();
        let err = s
            .create_network(NetworkSpec::new("more", "198.19.0.0/24".parse().unwrap()))
            .unwrap_err();
        assert_eq!(
            err,
            ModelError::OverCapacity {
                limit: Limit::Networks,
                wanted: NETWORKS + 1
            }
        );
        assert!(err.to_string().contains("OVL_NETWORKS"), "{err}");
        assert_eq!(s, full);
        s.remove_network("n7").unwrap();
        s.create_network(NetworkSpec::new("more", "198.19.0.0/24".parse().unwrap()))
            .unwrap();
    }

    #[test]
    fn subnets_beyond_the_maps_are_refused() {
        let mut s = State::default();
        // Four networks of 4095 subnets: 16380 of 16384.
        for n in 0..4u32 {
            let subnets = (0..4095u32)
                .map(|i| {
                    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + ((n * 4096 + i) << 4);
                    Pool::of(format!("{}/28", Ipv4Addr::from(base)).parse().unwrap())
                })
                .collect();
            let name = format!("big{n}");
            s.networks.insert(
                name.clone(),
                Network {
                    name,
                    vni: Vni::try_from(100 + n).unwrap(),
                    subnets,
                    mtu: 1450,
                    internal: false,
                    encrypted: false,
                    aux_addresses: Default::default(),
                    docker_pending: None,
                    kept_vnis: Vec::new(),
                },
            );
        }
        let spec = |count: u32| NetworkSpec {
            subnets: (0..count)
                .map(|i| format!("198.18.{i}.0/24").parse().unwrap())
                .collect(),
            ..NetworkSpec::new("more", "198.18.0.0/24".parse().unwrap())
        };
        let before = s.clone();
        let err = s.create_network(spec(5)).unwrap_err();
        assert_eq!(
            err,
            ModelError::OverCapacity {
                limit: Limit::Subnets,
                wanted: SUBNETS + 1
            }
        );
        assert!(err.to_string().contains("OVL_SUBNETS"), "{err}");
        assert_eq!(s, before);
        s.create_network(spec(4)).unwrap();
    }

    #[test]
    fn changes_near_a_limit_are_the_ones_the_etcd_store_guards() {
        let mut s = State::default();
        assert!(!near_endpoint_limit(&s) && !near_network_limit(&s));
        s.endpoints_elsewhere = ENDPOINTS - GUARD_MARGIN;
        assert!(!near_endpoint_limit(&s));
        s.endpoints_elsewhere += 1;
        assert!(near_endpoint_limit(&s));
    }
}
