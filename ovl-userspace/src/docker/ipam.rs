//! Docker's IPAM driver calls, served from ovl's store so that addresses
//! are unique across hosts: a pool is an ovl network's subnet (a new one is
//! created, provisionally named, by RequestPool, with its `--ip-range`),
//! an address is reserved in the store by RequestAddress and freed by
//! ReleaseAddress. Docker asks for a network's gateway and auxiliary
//! addresses (`--aux-address`) between RequestPool and CreateNetwork; the
//! latter are kept by the network, named by CreateNetwork.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use axum::{body::Bytes, extract::State, response::Response};

use super::{
    Context, Ctx, answer,
    networks::{self, pending_name},
    options::{self, ADDRESS_SPACE},
    protocol::{self, Refusal, parse},
};
use crate::{
    ipam::{IpRange, IpamError, Subnet},
    model::{
        self, DockerPending, Endpoint, Location, ModelError, Network, NetworkSpec,
        State as OvlState,
    },
    store::{Scope, Store, StoreError},
};

/// Why a pool of a network of another driver (`-d bridge --ipam-driver
/// ovl`) has no addresses: Docker asks an IPAM driver for a pool before
/// it says which network driver it is for, so ovl cannot refuse it then,
/// and the pool's provisional ovl network is removed unused.
const OTHER_DRIVER: &str = "ovl's IPAM serves only networks of driver ovl: remove the network and create it with -d ovl --ipam-driver ovl";

/// Owner of an address Docker's IPAM reserved, before its CreateEndpoint.
pub const OWNER_IPAM: &str = "docker-ipam";

/// What the owner of a Docker endpoint's address starts with.
const ENDPOINT_OWNER_PREFIX: &str = "docker:";

/// Owner of the address of Docker endpoint `endpoint_id`.
pub fn owner_of(endpoint_id: &str) -> String {
    format!("{ENDPOINT_OWNER_PREFIX}{endpoint_id}")
}

/// The Docker endpoint whose address `owner` ([`owner_of`]) owns.
pub fn endpoint_of(owner: &str) -> Option<&str> {
    owner.strip_prefix(ENDPOINT_OWNER_PREFIX)
}

/// True for owners the Docker plugin gives.
pub fn is_docker_owner(owner: &str) -> bool {
    owner == OWNER_IPAM || endpoint_of(owner).is_some()
}

/// A pool as Docker names it: `<vni>:<subnet>`. The VNI identifies the
/// network through renames; the subnet catches a VNI reused by another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolId {
    pub vni: u32,
    pub subnet: Subnet,
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.vni, self.subnet)
    }
}

impl FromStr for PoolId {
    type Err = Refusal;
    fn from_str(s: &str) -> Result<PoolId, Refusal> {
        let bad = || Refusal::new(format!("pool {s:?} is not one of ovl's IPAM"));
        let (vni, subnet) = s.split_once(':').ok_or_else(bad)?;
        Ok(PoolId {
            vni: vni.parse().map_err(|_| bad())?,
            subnet: subnet.parse().map_err(|_| bad())?,
        })
    }
}

pub async fn capabilities(_: Ctx, _: Bytes) -> Response {
    protocol::reply(&protocol::IpamCapabilities {
        requires_mac_address: false,
        // The store keeps pools and addresses across dockerd restarts.
        requires_request_replay: false,
    })
}

pub async fn address_spaces(_: Ctx, _: Bytes) -> Response {
    protocol::reply(&protocol::AddressSpaces {
        local: ADDRESS_SPACE,
        global: ADDRESS_SPACE,
    })
}

const REQUEST_POOL: &str = "IpamDriver.RequestPool";

pub async fn request_pool(State(ctx): Ctx, body: Bytes) -> Response {
    answer(REQUEST_POOL, do_request_pool(&ctx, &body).await)
}

async fn do_request_pool(ctx: &Context, body: &[u8]) -> Result<Response, Refusal> {
    let req: protocol::RequestPool = parse(REQUEST_POOL, body)?;
    if req.address_space != ADDRESS_SPACE {
        return Err(Refusal::new(format!(
            "address space {:?} is not ovl's ({ADDRESS_SPACE})",
            req.address_space
        )));
    }
    if req.v6 {
        return Err(Refusal::new(
            "ovl networks are IPv4 only: create the network without --ipv6",
        ));
    }
    if req.pool.is_empty() {
        return Err(Refusal::new(
            "ovl's IPAM needs a --subnet (e.g. --subnet 198.18.0.0/24)",
        ));
    }
    let subnet: Subnet = req.pool.parse()?;
    let range = match req.sub_pool.as_str() {
        "" => None,
        r => Some(r.parse::<IpRange>()?),
    };
    if let Some(r) = range.filter(|r| !r.is_within(&subnet)) {
        return Err(Refusal::new(format!(
            "--ip-range {r} is not inside --subnet {subnet}; give a range of the subnet"
        )));
    }
    let mirror_of = options::pool_options(&req.options)?;
    let store = ctx.store.get().await?;
    let network = match mirror_of {
        Some(name) => {
            let state = store.load_in(Scope::Network(&name)).await?;
            let n = state.network(&name)?;
            let Some(own) = n.subnets.iter().find(|p| p.subnet == subnet) else {
                return Err(Refusal::new(format!(
                    "ovl network {name} has subnets {}, not {subnet}",
                    n.subnets_text()
                )));
            };
            // Without --ip-range the mirror takes the network's own.
            if range.is_some() && range != own.range {
                return Err(Refusal::new(format!(
                    "ovl network {name} gives addresses of {subnet} from {}, not from --ip-range {}",
                    own.range
                        .map_or("the whole subnet".to_owned(), |r| r.to_string()),
                    req.sub_pool
                )));
            }
            n.clone()
        }
        None => {
            let node = ctx.node.clone();
            let created = store
                .update_with(Scope::All, |s| {
                    s.check_subnet_free(&subnet)?;
                    let name = pending_name(&subnet);
                    s.create_network(NetworkSpec {
                        ranges: range.into_iter().collect(),
                        ..NetworkSpec::new(&name, subnet)
                    })?;
                    let n = s.networks.get_mut(&name).expect("created just above");
                    n.docker_pending = Some(DockerPending {
                        node: node.clone(),
                        network_id: None,
                    });
                    Ok(n.clone())
                })
                .await;
            match created {
                Err(StoreError::Rejected(ModelError::SubnetClash {
                    subnet,
                    network,
                    existing,
                })) if networks::pending_subnet(&network).is_some() => {
                    return Err(clash_with_creation(&store, subnet, &network, existing).await);
                }
                other => other?,
            }
        }
    };
    let pool = PoolId {
        vni: network.vni.get(),
        subnet,
    };
    log::info!("pool {pool} for network {}", network.name);
    Ok(protocol::reply(&protocol::PoolReply {
        pool_id: pool.to_string(),
        pool: subnet.to_string(),
        data: Default::default(),
    }))
}

/// Why `subnet` is refused when it overlaps `existing`, a pool Docker
/// asked for while creating a network (`pending`, still provisionally
/// named): the name says nothing to the user; the node does, and that
/// the pool is freed if that creation fails (two creations racing for
/// the same subnets, or a dockerd that died creating it, whose pools go
/// within seconds).
async fn clash_with_creation(
    store: &Store,
    subnet: Subnet,
    pending: &str,
    existing: Subnet,
) -> Refusal {
    let node = store.load_in(Scope::Networks).await.ok().and_then(|s| {
        s.networks
            .get(pending)
            .and_then(|n| n.docker_pending.as_ref())
            .map(|p| p.node.clone())
    });
    Refusal::new(format!(
        "subnet {subnet} overlaps {existing}, which Docker on node {} is creating a network with; pick another subnet, or try again once that creation is over (if it fails, its subnets are freed)",
        node.as_deref().unwrap_or("?")
    ))
}

const RELEASE_POOL: &str = "IpamDriver.ReleasePool";

pub async fn release_pool(State(ctx): Ctx, body: Bytes) -> Response {
    answer(RELEASE_POOL, do_release_pool(&ctx, &body).await)
}

/// Removes a network whose creation Docker gave up before CreateNetwork;
/// any other pool belongs to a network DeleteNetwork removes.
async fn do_release_pool(ctx: &Context, body: &[u8]) -> Result<Response, Refusal> {
    let req: protocol::ReleasePool = parse(RELEASE_POOL, body)?;
    let pool: PoolId = req.pool_id.parse()?;
    let store = ctx.store.get().await?;
    let node = ctx.node.clone();
    let abandoned = DockerPending {
        node,
        network_id: None,
    };
    let removed = store
        .update_with(Scope::All, |s| {
            let Some(n) = s
                .network_of_subnet(pool.vni, &pool.subnet)
                .filter(|n| n.docker_pending.as_ref() == Some(&abandoned))
            else {
                return Ok(None);
            };
            let name = n.name.clone();
            s.remove_network(&name).map(Some)
        })
        .await?;
    if let Some(n) = removed {
        log::info!("removed {} (Docker gave up creating it)", n.name);
    }
    Ok(protocol::ok())
}

const REQUEST_ADDRESS: &str = "IpamDriver.RequestAddress";

/// Renames of its network one address request follows before it gives up.
const MAX_RENAMES: u32 = 2;

pub async fn request_address(State(ctx): Ctx, body: Bytes) -> Response {
    answer(REQUEST_ADDRESS, do_request_address(&ctx, &body).await)
}

async fn do_request_address(ctx: &Context, body: &[u8]) -> Result<Response, Refusal> {
    let req: protocol::RequestAddress = parse(REQUEST_ADDRESS, body)?;
    let pool: PoolId = req.pool_id.parse()?;
    let wanted = match req.address.as_str() {
        "" => None,
        a => Some(
            a.parse::<Ipv4Addr>()
                .map_err(|_| Refusal::new(format!("{a:?} is not an IPv4 address")))?,
        ),
    };
    let store = ctx.store.get().await?;
    let state = store.load_in(Scope::All).await?;
    let network = served(&state, &pool)?.clone();
    if req
        .options
        .get(protocol::REQUEST_ADDRESS_TYPE)
        .map(String::as_str)
        == Some(protocol::GATEWAY_ADDRESS)
    {
        let gateway = gateway_for(ctx, &store, &network, &pool, wanted).await?;
        return Ok(address_reply(gateway, pool.subnet.prefix()));
    }
    let mut name = network.name.clone();
    match &network.docker_pending {
        Some(DockerPending {
            network_id: None, ..
        }) => {
            // Before CreateNetwork, Docker asks only for its gateway and
            // auxiliary addresses; the containers of a network of another
            // driver (which never gets one) ask for any address.
            let Some(ip) = wanted else {
                return Err(Refusal::new(format!(
                    "pool {pool} has no Docker network of driver ovl: {OTHER_DRIVER}"
                )));
            };
            return aux_address(&store, &network, &pool, ip).await;
        }
        Some(DockerPending {
            network_id: Some(id),
            ..
        }) => {
            // Docker lists the network by now: take its name first.
            match networks::name(ctx, &store, &network, id).await {
                Ok(Some(named)) => name = named.name,
                Ok(None) => {}
                Err(why) => log::warn!("{why}"),
            }
        }
        None => {}
    }
    let node = ctx.node.clone();
    // The network can still be renamed under us (the naming task after
    // CreateNetwork runs beside this call): a read under the old name
    // finds nothing, so look the pool's network up again and retry.
    let mut renames = 0;
    let (reserved, prefix) = loop {
        let reserving = store
            .update_with(Scope::Network(&name), |s| {
                let current = served(s, &pool)
                    .map_err(|_| ModelError::NoSuchNetwork(name.clone()))?
                    .name
                    .clone();
                reserve(s, &current, &node, wanted, &pool)
            })
            .await;
        match reserving {
            Err(StoreError::Rejected(ModelError::NoSuchNetwork(_))) if renames < MAX_RENAMES => {
                renames += 1;
                let networks = store.load_in(Scope::Networks).await?;
                let now = served(&networks, &pool)?.name.clone();
                log::debug!("pool {pool}: network {name} is {now} now");
                name = now;
            }
            other => break other?,
        }
    };
    log::info!("reserved {} on {}", reserved.ip, reserved.network);
    Ok(address_reply(reserved.ip, prefix))
}

/// Reserves `wanted`, or a free address, of `pool` in `network` for
/// Docker; returns it and its subnet's prefix. Docker asks a network's
/// first pool for every address, and goes on to the next pool only on its
/// own IPAM's "no addresses left", never on a remote IPAM's error: so when
/// the pool has no free address, one of the network's other subnets gives
/// it, as `ovl connect` would.
fn reserve(
    s: &mut OvlState,
    network: &str,
    node: &str,
    wanted: Option<Ipv4Addr>,
    pool: &PoolId,
) -> Result<(Endpoint, u8), ModelError> {
    let reserved = match s.reserve(network, node, wanted, Some(pool.subnet), OWNER_IPAM) {
        Err(
            ModelError::Ipam(IpamError::Exhausted(_)) | ModelError::AllFreeAddressesHeld { .. },
        ) if wanted.is_none() => s.reserve(network, node, None, None, OWNER_IPAM)?,
        other => other?,
    };
    let prefix = s
        .network(network)?
        .pool_of(reserved.ip)
        .map_or(pool.subnet.prefix(), |p| p.subnet.prefix());
    Ok((reserved, prefix))
}

/// The gateway of `pool`'s subnet. `--gateway` (`wanted`) sets it while
/// this node's Docker is still creating the network (Docker asks for the
/// gateway between RequestPool and CreateNetwork); on a network that
/// exists already it must be the one it has.
async fn gateway_for(
    ctx: &Context,
    store: &Store,
    network: &Network,
    pool: &PoolId,
    wanted: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, Refusal> {
    let current = network
        .subnets
        .iter()
        .find(|p| p.subnet == pool.subnet)
        .map(|p| p.gateway)
        .expect("served networks have the pool's subnet");
    let Some(wanted) = wanted.filter(|w| *w != current) else {
        return Ok(current);
    };
    let creating_here = network
        .docker_pending
        .as_ref()
        .is_some_and(|p| p.node == ctx.node && p.network_id.is_none());
    if !creating_here {
        options::gateway(wanted, current)?;
    }
    if !pool.subnet.is_host(wanted) {
        return Err(Refusal::new(format!(
            "--gateway {wanted} is not a host address of {}",
            pool.subnet
        )));
    }
    let name = network.name.clone();
    let subnet = pool.subnet;
    store
        .update_with(Scope::Network(&name), |s| {
            if s.endpoints_of(&name).any(|e| e.ip == wanted) {
                return Err(IpamError::InUse(wanted).into());
            }
            let n = s
                .networks
                .get_mut(&name)
                .ok_or_else(|| ModelError::NoSuchNetwork(name.clone()))?;
            if let Some(p) = n.subnets.iter_mut().find(|p| p.subnet == subnet) {
                p.gateway = wanted;
                // --gateway inside --ip-range takes one of its addresses.
                if let Some(range) = p.range
                    && !p.range_has_room(n.aux_addresses.values())
                {
                    return Err(ModelError::RangeWithoutRoom { range, subnet });
                }
            }
            Ok(())
        })
        .await?;
    log::info!("gateway {wanted} for {subnet} of {name}");
    Ok(wanted)
}

/// Keeps `ip` of `pool` as an auxiliary address of `network`, which
/// Docker is creating: named after the address until CreateNetwork names
/// it ([`name_aux_addresses`]).
async fn aux_address(
    store: &Store,
    network: &Network,
    pool: &PoolId,
    ip: Ipv4Addr,
) -> Result<Response, Refusal> {
    let name = network.name.clone();
    store
        .update_with(Scope::Network(&name), |s| {
            if let Some(e) = s.endpoints_of(&name).find(|e| e.ip == ip) {
                return Err(IpamError::InUse(e.ip).into());
            }
            let n = s
                .networks
                .get_mut(&name)
                .ok_or_else(|| ModelError::NoSuchNetwork(name.clone()))?;
            if n.aux_name(ip).is_none() {
                model::check_aux(&n.subnets, &n.aux_addresses, &ip.to_string(), ip)?;
                n.aux_addresses.insert(ip.to_string(), ip);
            }
            Ok(())
        })
        .await?;
    log::info!("auxiliary address {ip} of {name}");
    Ok(address_reply(ip, pool.subnet.prefix()))
}

/// Gives the auxiliary addresses Docker asked for while creating
/// `network` the names CreateNetwork carries (`named`: name, address);
/// one it did not ask for (outside every pool it asked) is added.
pub fn name_aux_addresses(
    network: &mut Network,
    named: &[(String, Ipv4Addr)],
) -> Result<(), ModelError> {
    for (name, ip) in named {
        if network.aux_addresses.get(name) == Some(ip) {
            continue;
        }
        network.aux_addresses.retain(|_, a| a != ip);
        model::check_aux(&network.subnets, &network.aux_addresses, name, *ip)?;
        network.aux_addresses.insert(name.clone(), *ip);
    }
    Ok(())
}

fn address_reply(ip: Ipv4Addr, prefix: u8) -> Response {
    protocol::reply(&protocol::AddressReply {
        address: format!("{ip}/{prefix}"),
        data: Default::default(),
    })
}

/// The network behind `pool`, or why there is none.
fn served<'a>(state: &'a OvlState, pool: &PoolId) -> Result<&'a Network, Refusal> {
    state
        .network_of_subnet(pool.vni, &pool.subnet)
        .ok_or_else(|| {
            Refusal::new(format!(
                "pool {pool} is not served by ovl: no ovl network has VNI {} and subnet {} (removed meanwhile? or {OTHER_DRIVER})",
                pool.vni, pool.subnet
            ))
        })
}

const RELEASE_ADDRESS: &str = "IpamDriver.ReleaseAddress";

pub async fn release_address(State(ctx): Ctx, body: Bytes) -> Response {
    answer(RELEASE_ADDRESS, do_release_address(&ctx, &body).await)
}

async fn do_release_address(ctx: &Context, body: &[u8]) -> Result<Response, Refusal> {
    let req: protocol::ReleaseAddress = parse(RELEASE_ADDRESS, body)?;
    let pool: PoolId = req.pool_id.parse()?;
    let ip: Ipv4Addr = req
        .address
        .parse()
        .map_err(|_| Refusal::new(format!("{:?} is not an IPv4 address", req.address)))?;
    let store = ctx.store.get().await?;
    let node = ctx.node.clone();
    let outcome = store
        .update_with(Scope::All, |s| {
            let Some(network) = s.network_of_subnet(pool.vni, &pool.subnet) else {
                return Ok(Released::NoNetwork);
            };
            if network.subnets.iter().any(|p| p.gateway == ip) {
                // The gateway is the network's, not an endpoint's.
                return Ok(Released::Gateway);
            }
            let creating_here = network
                .docker_pending
                .as_ref()
                .is_some_and(|p| p.node == node && p.network_id.is_none());
            if let Some(aux) = network.aux_name(ip) {
                // Docker gave up creating the network (or removes it).
                if !creating_here {
                    return Ok(Released::NotHeld);
                }
                let (network, aux) = (network.name.clone(), aux.to_owned());
                if let Some(n) = s.networks.get_mut(&network) {
                    n.aux_addresses.remove(&aux);
                }
                return Ok(Released::Freed(network));
            }
            let network = network.name.clone();
            let Some(e) = s
                .endpoints
                .iter()
                .find(|e| e.network == network && e.ip == ip)
            else {
                return Ok(Released::NotHeld);
            };
            let ours = matches!(&e.location, Location::Reserved { node: n } if *n == node)
                && e.owner.as_deref().is_some_and(is_docker_owner);
            if !ours {
                return Ok(Released::Other(format!("{:?}", e.location)));
            }
            s.remove_endpoint(&network, ip)?;
            Ok(Released::Freed(network))
        })
        .await?;
    match outcome {
        Released::Freed(network) => log::info!("released {ip} on {network}"),
        Released::Other(what) => log::warn!(
            "Docker released {ip} of pool {pool}, which is not a reservation of this node ({what}); kept"
        ),
        Released::NoNetwork | Released::Gateway | Released::NotHeld => {}
    }
    Ok(protocol::ok())
}

enum Released {
    Freed(String),
    NoNetwork,
    Gateway,
    NotHeld,
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_ids_round_trip_and_foreign_ones_are_refused() {
        let p = PoolId {
            vni: 4096,
            subnet: "198.18.0.0/24".parse().unwrap(),
        };
        assert_eq!(p.to_string(), "4096:198.18.0.0/24");
        assert_eq!(p.to_string().parse::<PoolId>().unwrap(), p);
        for bad in ["LocalDefault/172.17.0.0/16", "x:198.18.0.0/24", "4096"] {
            let e = bad.parse::<PoolId>().unwrap_err();
            assert!(e.message.contains("not one of ovl's"), "{}", e.message);
        }
    }

    #[test]
    fn a_full_pool_lends_an_address_of_the_networks_other_subnets() {
        let mut s = OvlState::default();
        s.create_network(NetworkSpec {
            subnets: vec![
                "198.18.0.0/29".parse().unwrap(),
                "198.18.1.0/28".parse().unwrap(),
            ],
            ..NetworkSpec::new("two", "198.18.0.0/29".parse().unwrap())
        })
        .unwrap();
        let pool = PoolId {
            vni: s.networks["two"].vni.get(),
            subnet: "198.18.0.0/29".parse().unwrap(),
        };
        let got: Vec<(Ipv4Addr, u8)> = (0..6)
            .map(|_| {
                let (e, prefix) = reserve(&mut s, "two", "a", None, &pool).unwrap();
                (e.ip, prefix)
            })
            .collect();
        assert_eq!(got[4], (Ipv4Addr::new(198, 18, 0, 6), 29));
        assert_eq!(got[5], (Ipv4Addr::new(198, 18, 1, 2), 28));
        // An address asked for stays the pool's business.
        let err = reserve(
            &mut s,
            "two",
            "a",
            Some(Ipv4Addr::new(198, 18, 0, 2)),
            &pool,
        )
        .unwrap_err();
        assert_eq!(
            err,
            ModelError::Ipam(IpamError::InUse(Ipv4Addr::new(198, 18, 0, 2)))
        );
    }

    #[test]
    fn docker_owners_are_recognised() {
        assert!(is_docker_owner(OWNER_IPAM));
        assert!(is_docker_owner(&owner_of("abc")));
        assert!(!is_docker_owner("cni:abc/eth0"));
    }
}
