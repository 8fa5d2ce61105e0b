//! Docker's network driver calls: networks (created or mirrored), endpoints
//! (binding the address IPAM reserved to Docker's endpoint ID), and Join /
//! Leave, which attach and detach the container through ovl's one
//! attachment path with the veth left in the host namespace for Docker.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use axum::{body::Bytes, extract::State, response::Response};

use super::{
    Context, Ctx, Known, answer,
    ipam::{self, OWNER_IPAM, owner_of},
    names,
    networks::{self, resolve, short},
    options,
    protocol::{self, Refusal, parse},
};
use crate::{
    attachment::{self, Placement},
    ipam::Subnet,
    model::{Endpoint, Location, MacAddr, ModelError, Network, State as OvlState, check_mtu},
    store::{Scope, Store, StoreError},
};

/// How long Join waits for the agent's maps to hold the new endpoint, so
/// the container's first packet already forwards.
const READY_WAIT: Duration = Duration::from_secs(2);
/// What Docker renames the interface to, plus an index (`eth0`).
const CONTAINER_IFNAME_PREFIX: &str = "eth";

pub async fn capabilities(_: Ctx, _: Bytes) -> Response {
    // "global" would make Docker 20.10 ask for a swarm manager; ovl's store
    // does what swarm would (see runtimes.md).
    protocol::reply(&protocol::DriverCapabilities {
        scope: "local",
        connectivity_scope: "global",
    })
}

const CREATE_NETWORK: &str = "NetworkDriver.CreateNetwork";

/// Subnets of a network Docker creates: each keeps the VNI its pool was
/// asked under ([`Network::kept_vnis`]), a claim on the etcd store that
/// renaming and removing the network rewrite in one transaction, which
/// etcd bounds at 128 operations (beyond some 120 subnets the network
/// could be neither named nor removed).
const MAX_DOCKER_SUBNETS: usize = 64;

pub async fn create_network(State(ctx): Ctx, body: Bytes) -> Response {
    answer(CREATE_NETWORK, do_create_network(&ctx, &body).await)
}

async fn do_create_network(ctx: &Arc<Context>, body: &[u8]) -> Result<Response, Refusal> {
    let req: protocol::CreateNetwork = parse(CREATE_NETWORK, body)?;
    let opts = options::network_options(&req.options, &req.ipv4_data, &req.ipv6_data)?;
    let mut pools = Vec::new();
    let mut aux = Vec::new();
    for pool in &req.ipv4_data {
        if pool.address_space != options::ADDRESS_SPACE {
            return Err(Refusal::new(format!(
                "address space {:?} is not ovl's: create the network with --ipam-driver ovl",
                pool.address_space
            )));
        }
        let subnet: Subnet = pool.pool.parse()?;
        pools.push((subnet, cidr_address(&pool.gateway)?));
        for (name, cidr) in &pool.aux_addresses {
            let ip = cidr_address(cidr)?.ok_or_else(|| {
                Refusal::malformed(format!("auxiliary address {name} has no address"))
            })?;
            aux.push((name.clone(), ip));
        }
    }
    if let Some(mtu) = opts.mtu {
        check_mtu(mtu).map_err(StoreError::from)?;
    }
    let store = ctx.store.get().await?;
    if let Some(name) = opts.mirror_of {
        let state = store.load_in(Scope::Network(&name)).await?;
        let n = state.network(&name).map_err(StoreError::from)?;
        if !aux.is_empty() {
            return Err(Refusal::new(format!(
                "ovl network {name} takes auxiliary addresses from `ovl network create --aux-address` only; create the Docker network without --aux-address"
            )));
        }
        let same_pools = pools.len() == n.subnets.len()
            && pools.iter().all(|(subnet, gw)| {
                n.subnets
                    .iter()
                    .any(|p| p.subnet == *subnet && gw.is_none_or(|g| g == p.gateway))
            });
        if !same_pools
            || opts.mtu.is_some_and(|m| m != n.mtu)
            || opts.internal != n.internal
            || opts.vni.is_some_and(|v| v != n.vni.get())
        {
            return Err(Refusal::new(format!(
                "ovl network {name} has VNI {}, subnets {} (gateways {}), MTU {}{}; the Docker network must match",
                n.vni,
                n.subnets_text(),
                n.subnets
                    .iter()
                    .map(|p| p.gateway.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                n.mtu,
                if n.internal { ", internal" } else { "" },
            )));
        }
        ctx.remember(&req.network_id, Known::of(n));
        log::info!(
            "Docker network {} mirrors ovl network {name}",
            short(&req.network_id)
        );
        return Ok(protocol::ok());
    }
    if pools.len() > MAX_DOCKER_SUBNETS {
        return Err(Refusal::new(format!(
            "{} subnets: a network Docker creates has at most {MAX_DOCKER_SUBNETS} (each keeps the VNI ovl gave its pool); make it with `ovl network create NAME --subnet ...`, which appears in Docker with every subnet",
            pools.len()
        )));
    }
    let subnet = pools[0].0;
    let node = ctx.node.clone();
    let id = req.network_id.clone();
    let create = |s: &mut OvlState| -> Result<Network, ModelError> {
        let mtu = s.network_mtu(opts.mtu, opts.encrypted)?;
        // Docker asked for each pool on its own, before saying which
        // network they make: the first pool's provisional network
        // takes the others' subnets (and keeps their VNIs, by which
        // Docker names their pools).
        let name = pending_here(s, &node, &subnet)?;
        for (other, _) in &pools[1..] {
            let from = pending_here(s, &node, other)?;
            s.merge_network(&name, &from)?;
        }
        // A VNI asked for (vxlanid_list) replaces the one allocated,
        // which the network keeps: Docker named the pool by it.
        if let Some(vni) = opts.vni {
            s.renumber_network(&name, vni)?;
        }
        let pending = s.networks.get_mut(&name).expect("found just above");
        for (subnet, gateway) in &pools {
            // IPAM's RequestAddress for the gateway set it already.
            if let Some(gw) = *gateway
                && pending
                    .subnets
                    .iter()
                    .all(|p| p.subnet != *subnet || p.gateway != gw)
            {
                return Err(ModelError::GatewayOutsideSubnets {
                    gateway: gw,
                    subnets: subnet.to_string(),
                });
            }
        }
        ipam::name_aux_addresses(pending, &aux)?;
        networks::bind(pending, &node, &id);
        pending.mtu = mtu;
        pending.internal = opts.internal;
        pending.encrypted = opts.encrypted;
        Ok(pending.clone())
    };
    let refusal = |e: StoreError| match e {
        StoreError::Rejected(ModelError::NoSuchNetwork(name)) => Refusal::new(format!(
            "no pool of ovl's IPAM for {} on this node: create the network with --ipam-driver ovl",
            networks::pending_subnet(&name).unwrap_or(name)
        )),
        // The model's advice names `ovl network create --vni`.
        StoreError::Rejected(ModelError::VniInUse { vni, network }) => Refusal::new(format!(
            "--opt {}={vni}: VNI {vni} is {}; give another VNI or omit the option",
            options::VXLANID_LIST,
            match networks::pending_subnet(&network) {
                Some(subnet) => format!("taken by a network Docker is creating with {subnet}"),
                None => format!("already used by network {network:?}"),
            }
        )),
        e => Refusal::from(e),
    };
    // Tried on what the store holds first, so that a creation ovl refuses
    // changes nothing; then each later pool joins the first in a change
    // of its own: one change merging them all would outgrow an etcd
    // transaction (each provisional network is several keys) from some
    // 25 subnets on. The creation then finds them merged.
    let mut trial = store.load_in(Scope::All).await?;
    create(&mut trial).map_err(|e| refusal(e.into()))?;
    for (other, _) in &pools[1..] {
        store
            .update_with(Scope::All, |s| {
                let name = pending_here(s, &node, &subnet)?;
                let from = pending_here(s, &node, other)?;
                s.merge_network(&name, &from).map(|_| ())
            })
            .await
            .map_err(refusal)?;
    }
    let net = store
        .update_with(Scope::All, create)
        .await
        .map_err(refusal)?;
    ctx.remember(&req.network_id, Known::of(&net));
    log::info!(
        "Docker creates network {} on {}: VNI {}, MTU {}{}{}",
        short(&req.network_id),
        net.subnets_text(),
        net.vni,
        net.mtu,
        if net.internal { ", internal" } else { "" },
        if net.encrypted { ", encrypted" } else { "" },
    );
    tokio::spawn(networks::name_soon(ctx.clone(), req.network_id));
    Ok(protocol::ok())
}

/// The provisional network this node's dockerd asked ovl's IPAM for with
/// a pool of `subnet`, not yet bound to a Docker network.
fn pending_here(s: &OvlState, node: &str, subnet: &Subnet) -> Result<String, ModelError> {
    s.networks
        .values()
        .find(|n| {
            n.subnets.iter().any(|p| p.subnet == *subnet)
                && n.docker_pending
                    .as_ref()
                    .is_some_and(|p| p.node == node && p.network_id.is_none())
        })
        .map(|n| n.name.clone())
        .ok_or_else(|| ModelError::NoSuchNetwork(networks::pending_name(subnet)))
}

/// The address of a CIDR string (`198.18.0.1/24`), if not empty.
fn cidr_address(cidr: &str) -> Result<Option<Ipv4Addr>, Refusal> {
    if cidr.is_empty() {
        return Ok(None);
    }
    let addr = cidr.split_once('/').map_or(cidr, |(a, _)| a);
    addr.parse()
        .map(Some)
        .map_err(|_| Refusal::new(format!("{cidr:?} is not an IPv4 address")))
}

const DELETE_NETWORK: &str = "NetworkDriver.DeleteNetwork";

pub async fn delete_network(State(ctx): Ctx, body: Bytes) -> Response {
    answer(DELETE_NETWORK, do_delete_network(&ctx, &body).await)
}

/// How long after refusing a DeleteNetwork the mirror is checked again:
/// Docker 20.10 only logs a driver's refusal and deletes its network
/// anyway, so the agent puts it back.
const REMIRROR_AFTER: Duration = Duration::from_millis(300);

async fn do_delete_network(ctx: &Arc<Context>, body: &[u8]) -> Result<Response, Refusal> {
    let req: protocol::DeleteNetwork = parse(DELETE_NETWORK, body)?;
    let store = ctx.store.get().await?;
    let Some(net) = resolve(ctx, &store, &req.network_id).await? else {
        // Not (or no longer) an ovl network: nothing of ovl's to remove.
        ctx.forget(&req.network_id);
        return Ok(protocol::ok());
    };
    let removed = store
        .update_with(Scope::Network(&net.name), |s| {
            if s.network(&net.name)?.vni != net.vni {
                return Ok(false);
            }
            s.remove_network(&net.name).map(|_| true)
        })
        .await;
    match removed {
        Ok(removed) => {
            ctx.forget(&req.network_id);
            if removed {
                log::info!("removed ovl network {} (docker network rm)", net.name);
            }
            Ok(protocol::ok())
        }
        Err(StoreError::Rejected(ModelError::NoSuchNetwork(_))) => Ok(protocol::ok()),
        Err(StoreError::Rejected(ModelError::NetworkInUse { count, .. })) => {
            let again = ctx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(REMIRROR_AFTER).await;
                again.nudge.notify_one();
            });
            let state = store.load().await?;
            Err(Refusal::new(format!(
                "network {} has {count} active endpoint(s) on {}; remove those containers first",
                net.name,
                holders(&state, &net.name)
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// The nodes holding endpoints of `network`, for messages.
fn holders(state: &OvlState, network: &str) -> String {
    let mut nodes: Vec<&str> = state
        .endpoints_of(network)
        .map(|e| e.node().unwrap_or("a static VTEP"))
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes.join(", ")
}

/// The ovl network of a Docker network ID, or a refusal saying there is
/// none.
async fn network_of(ctx: &Context, store: &Store, docker_id: &str) -> Result<Network, Refusal> {
    resolve(ctx, store, docker_id).await?.ok_or_else(|| {
        Refusal::new(format!(
            "network {} is not an ovl network this node knows (removed meanwhile?)",
            short(docker_id)
        ))
    })
}

/// The endpoint Docker endpoint `endpoint_id` holds on this node.
fn endpoint_of<'a>(
    state: &'a OvlState,
    node: &str,
    network: &'a str,
    endpoint_id: &str,
) -> Option<&'a Endpoint> {
    let owner = owner_of(endpoint_id);
    state
        .endpoints_of(network)
        .find(|e| e.owner.as_deref() == Some(owner.as_str()) && e.node() == Some(node))
}

const CREATE_ENDPOINT: &str = "NetworkDriver.CreateEndpoint";

pub async fn create_endpoint(State(ctx): Ctx, body: Bytes) -> Response {
    answer(CREATE_ENDPOINT, do_create_endpoint(&ctx, &body).await)
}

async fn do_create_endpoint(ctx: &Context, body: &[u8]) -> Result<Response, Refusal> {
    let req: protocol::CreateEndpoint = parse(CREATE_ENDPOINT, body)?;
    let ports = options::endpoint_options(&req.options)?;
    if !req.interface.address_ipv6.is_empty() {
        return Err(Refusal::new(
            "ovl networks are IPv4 only: run the container without an IPv6 address",
        ));
    }
    let Some(ip) = cidr_address(&req.interface.address)? else {
        return Err(Refusal::new(
            "the endpoint has no IPv4 address: ovl networks need --ipam-driver ovl",
        ));
    };
    // `docker run --mac-address`, or 02:42 + the address.
    let mac = match req.interface.mac_address.as_str() {
        "" => MacAddr::for_ipv4(ip),
        text => text
            .parse::<MacAddr>()
            .map_err(|e| Refusal::new(format!("--mac-address {text}: {e}")))?,
    };
    let store = ctx.store.get().await?;
    let net = network_of(ctx, &store, &req.network_id).await?;
    let node = ctx.node.clone();
    let owner = owner_of(&req.endpoint_id);
    store
        .update_with(Scope::Network(&net.name), |s| {
            let not_reserved = || ModelError::NotReserved {
                network: net.name.clone(),
                ip,
                node: node.clone(),
            };
            let e = s
                .endpoints
                .iter_mut()
                .find(|e| e.network == net.name && e.ip == ip)
                .ok_or_else(not_reserved)?;
            let ours = matches!(&e.location, Location::Reserved { node: n } if *n == node);
            let free = matches!(e.owner.as_deref(), Some(o) if o == OWNER_IPAM || o == owner);
            if !ours || !free {
                return Err(not_reserved());
            }
            e.owner = Some(owner.clone());
            e.name = short(&req.endpoint_id).to_owned();
            // Join's attachment takes the reservation's MAC over.
            e.mac = mac;
            // Published at Join, which attaches the container (and
            // checks the node's other containers); kept until then.
            e.ports = ports.clone();
            let e = e.clone();
            s.check_mac(&net.name, mac, ip)?;
            // Refused early where the state at hand shows the clash.
            s.check_ports_free(&net, &node, &e.ports)
        })
        .await?;
    log::info!(
        "endpoint {} is {ip} on {}",
        short(&req.endpoint_id),
        net.name
    );
    let interface = req
        .interface
        .mac_address
        .is_empty()
        .then(|| protocol::EndpointInterface {
            mac_address: mac.to_string(),
            ..Default::default()
        });
    Ok(protocol::reply(&protocol::EndpointReply { interface }))
}

const DELETE_ENDPOINT: &str = "NetworkDriver.DeleteEndpoint";

pub async fn delete_endpoint(State(ctx): Ctx, body: Bytes) -> Response {
    answer(DELETE_ENDPOINT, do_delete_endpoint(&ctx, &body).await)
}

/// The address stays reserved until ReleaseAddress; a container still
/// attached (no Leave came) is detached first.
async fn do_delete_endpoint(ctx: &Context, body: &[u8]) -> Result<Response, Refusal> {
    let req: protocol::EndpointRef = parse(DELETE_ENDPOINT, body)?;
    let store = ctx.store.get().await?;
    let Some(net) = resolve(ctx, &store, &req.network_id).await? else {
        return Ok(protocol::ok());
    };
    leave_network(ctx, &store, &net, &req.endpoint_id).await?;
    Ok(protocol::ok())
}

/// Docker 20.10 reads a remote driver's answer as untyped JSON, so a
/// port map in it never reaches `docker port` (its own drivers hand it
/// typed values): there is nothing useful to say.
pub async fn oper_info(_: Ctx, body: Bytes) -> Response {
    answer(
        "NetworkDriver.EndpointOperInfo",
        parse::<protocol::EndpointRef>("NetworkDriver.EndpointOperInfo", &body).map(|_| {
            protocol::reply(&protocol::OperInfo {
                value: Default::default(),
            })
        }),
    )
}

const JOIN: &str = "NetworkDriver.Join";

pub async fn join(State(ctx): Ctx, body: Bytes) -> Response {
    answer(JOIN, do_join(&ctx, &body).await)
}

async fn do_join(ctx: &Arc<Context>, body: &[u8]) -> Result<Response, Refusal> {
    let req: protocol::Join = parse(JOIN, body)?;
    if req.sandbox_key.is_empty() {
        return Err(Refusal::malformed("Join without a SandboxKey"));
    }
    let store = ctx.store.get().await?;
    let net = network_of(ctx, &store, &req.network_id).await?;
    let state = store.load().await?;
    let Some(ep) = endpoint_of(&state, &ctx.node, &net.name, &req.endpoint_id) else {
        return Err(Refusal::new(format!(
            "no endpoint {} on network {} of node {}: Docker's CreateEndpoint did not reach ovl, or the endpoint was released",
            short(&req.endpoint_id),
            net.name,
            ctx.node
        )));
    };
    let attached = match &ep.location {
        Location::Container {
            netns, host_ifname, ..
        } if *netns == req.sandbox_key => {
            // Joined already (Docker retried): the same answer again.
            format!("{host_ifname}c")
        }
        Location::Reserved { .. } => {
            let a = attachment::attach_placed(
                &store,
                &attachment::Request {
                    network: net.name.clone(),
                    node: ctx.node.clone(),
                    netns: req.sandbox_key.clone(),
                    ifname: None,
                    name: Some(short(&req.endpoint_id).to_owned()),
                    fallback_name: None,
                    ip: Some(ep.ip),
                    owner: Some(owner_of(&req.endpoint_id)),
                    subnet: None,
                    aliases: Vec::new(),
                    ports: ep.ports.clone(),
                    mac: None,
                },
                Placement::HostSide,
            )
            .await
            .map_err(|e| Refusal::new(format!("{e:#}")))?;
            a.ifname
        }
        other => {
            return Err(Refusal::new(format!(
                "endpoint {} is attached elsewhere ({other:?})",
                short(&req.endpoint_id)
            )));
        }
    };
    if !ctx.view.wait_ready(net.vni.get(), ep.ip, READY_WAIT).await {
        log::warn!(
            "{} on {} is attached but the agent did not report it forwarding within {READY_WAIT:?}",
            ep.ip,
            net.name
        );
    }
    log::info!(
        "endpoint {} joined {} as {} ({})",
        short(&req.endpoint_id),
        net.name,
        ep.ip,
        attached
    );
    // Docker tells the container's name only once it has started, after
    // this answer (asking now would wait on the container Docker is
    // starting): learn it in the background.
    tokio::spawn(names::after_join(
        ctx.clone(),
        req.network_id.clone(),
        net.name.clone(),
        req.endpoint_id.clone(),
    ));
    let (gateway, static_routes) = join_routes(&net, ep.ip);
    Ok(protocol::reply(&protocol::JoinReply {
        interface_name: protocol::InterfaceName {
            src_name: attached,
            dst_prefix: CONTAINER_IFNAME_PREFIX,
        },
        disable_gateway_service: true,
        gateway,
        static_routes,
    }))
}

/// What Join tells Docker to route in the container: the same routes
/// `ovl connect` sets (`Network::container_routes`), as a default gateway
/// and static routes.
fn join_routes(net: &Network, ip: Ipv4Addr) -> (Option<String>, Vec<protocol::StaticRoute>) {
    let Some(routes) = net.container_routes(ip) else {
        return (None, Vec::new());
    };
    let mut gateway = None;
    let mut statics = Vec::new();
    for (dst, len) in routes.via_gateway {
        if len == 0 {
            gateway = Some(routes.gateway.to_string());
        } else {
            statics.push(protocol::StaticRoute {
                destination: format!("{dst}/{len}"),
                route_type: protocol::ROUTE_NEXTHOP,
                next_hop: routes.gateway.to_string(),
            });
        }
    }
    (gateway, statics)
}

const LEAVE: &str = "NetworkDriver.Leave";

pub async fn leave(State(ctx): Ctx, body: Bytes) -> Response {
    answer(LEAVE, do_leave(&ctx, &body).await)
}

async fn do_leave(ctx: &Context, body: &[u8]) -> Result<Response, Refusal> {
    let req: protocol::EndpointRef = parse(LEAVE, body)?;
    let store = ctx.store.get().await?;
    let net = network_of(ctx, &store, &req.network_id).await?;
    leave_network(ctx, &store, &net, &req.endpoint_id).await?;
    Ok(protocol::ok())
}

/// Detaches the container of `endpoint_id` if it is attached, keeping its
/// address reserved for Docker's ReleaseAddress.
async fn leave_network(
    ctx: &Context,
    store: &Store,
    net: &Network,
    endpoint_id: &str,
) -> Result<(), Refusal> {
    let state = store.load().await?;
    if let Some(Endpoint {
        location: Location::Container { netns, .. },
        ip,
        ..
    }) = endpoint_of(&state, &ctx.node, &net.name, endpoint_id)
    {
        attachment::detach_keeping_address(store, &ctx.node, &net.name, netns)
            .await
            .map_err(|e| Refusal::new(format!("{e:#}")))?;
        log::info!(
            "endpoint {} left {} ({ip} stays reserved until Docker releases it)",
            short(endpoint_id),
            net.name
        );
    }
    Ok(())
}

/// Port publishing and the gateway's connectivity are Docker's bridge
/// business; ovl's networks have neither (CreateEndpoint refused `-p`).
pub async fn external_connectivity(_: Ctx, body: Bytes) -> Response {
    answer(
        "NetworkDriver.ExternalConnectivity",
        parse::<protocol::EndpointRef>("NetworkDriver.ExternalConnectivity", &body)
            .map(|_| protocol::ok()),
    )
}

/// Node discovery is the store's job here.
pub async fn discovery(_: Ctx, _: Bytes) -> Response {
    protocol::ok()
}
