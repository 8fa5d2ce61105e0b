//! The one code path that gives a container an interface on a network and
//! takes it away again, for every front end: `ovl connect`, the CNI plugin
//! and the Docker plugin. Registration in the store (with the names the
//! endpoint resolves as), the veth, the container's loopback and resolver
//! configuration, rollback on failure, and waiting until the node's agent
//! forwards for it.

pub mod attacher;
pub mod naming;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    api, dns,
    ipam::Subnet,
    model::{ContainerSpec, Endpoint, Location, MacAddr, ModelError, Network},
    netlink, netns,
    ports::PublishedPort,
    store::{Around, Scope, Store, StoreError},
};

/// What a front end asks for.
#[derive(Clone, Debug)]
pub struct Request {
    pub network: String,
    /// The node the container runs on (this machine).
    pub node: String,
    /// The container's network namespace: a name under /run/netns or a path.
    pub netns: String,
    /// The interface's name in the container [default: the first free `ethN`].
    pub ifname: Option<String>,
    /// Endpoint name [default: the namespace name].
    pub name: Option<String>,
    /// The name the endpoint takes when its name is invalid or another
    /// endpoint of the network holds it (a short container ID), with the
    /// aliases it can have ([`naming::choose`]); the clash is logged and
    /// the attachment goes ahead. Without one, such a name (or alias)
    /// refuses the attachment (`ovl connect --name`).
    pub fallback_name: Option<String>,
    /// More names the endpoint resolves as in the network's DNS.
    pub aliases: Vec<String>,
    /// Address to use instead of the next free one.
    pub ip: Option<Ipv4Addr>,
    /// The network's subnet to take the address from [default: the first
    /// with a free address].
    pub subnet: Option<Subnet>,
    /// The front end's identity for the attachment ([`Endpoint::owner`]).
    pub owner: Option<String>,
    /// Ports to publish on the node ([`Endpoint::ports`]).
    pub ports: Vec<PublishedPort>,
    /// The container's MAC [default: a reservation's taken over, else
    /// 02:42 + its address].
    pub mac: Option<MacAddr>,
}

/// Where the container's end of the veth goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Into [`Request::netns`], named [`Request::ifname`] (or the first free
    /// `ethN`), addressed and up: `ovl connect`, CNI.
    IntoNamespace,
    /// Left in the host's namespace with its MAC and MTU set, for a runtime
    /// that moves, renames and addresses it itself (Docker's Join answers
    /// with its name, [`Attachment::ifname`]). [`Request::netns`] only
    /// identifies the container; it is never opened.
    HostSide,
}

/// A container attached to a network.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub endpoint: Endpoint,
    pub network: Network,
    /// The interface's name inside the container (`eth0`, ...), or in the
    /// host's namespace for [`Placement::HostSide`].
    pub ifname: String,
    /// The host end of the veth.
    pub host_ifname: String,
    /// The IPv4 routes through the interface in the container (at least
    /// the subnet's), as the kernel holds them after the attachment; none
    /// for [`Placement::HostSide`] (the runtime addresses the interface).
    pub routes: Vec<netlink::Route4>,
    /// The resolv.conf written for the namespace (`ip netns` names only).
    pub resolv_conf: Option<PathBuf>,
}

/// Registers the endpoint (IPAM), then builds its veth into the container.
/// On any failure the registration is rolled back and no link is left.
pub async fn attach(store: &Store, req: &Request) -> Result<Attachment> {
    attach_placed(store, req, Placement::IntoNamespace).await
}

/// [`attach`], with the container end of the veth where `placement` says.
/// An address `req.owner` reserved on this node ([`State::reserve`]) is
/// taken over, and reserved again if the attachment fails.
///
/// [`State::reserve`]: crate::model::State::reserve
pub async fn attach_placed(
    store: &Store,
    req: &Request,
    placement: Placement,
) -> Result<Attachment> {
    if placement == Placement::IntoNamespace {
        netns::open(&req.netns)?;
    }
    check_host_addresses(req).await?;
    let registered = match register(store, req).await {
        Err(e @ StoreError::Rejected(ModelError::AlreadyConnected { .. })) => {
            match find(store, &req.node, &req.network, &req.netns).await? {
                Some(held) if unfinished_now(&held).await? => match held.attacher {
                    Some(a) if !attacher::is_gone(&a) => {
                        // The store's refusal stays the cause: front ends map it.
                        return Err(anyhow::Error::new(e).context(format!(
                            "{} is being connected to {} by process {} on this node, which has not finished its veth yet; wait for it (or stop it: its endpoint is then reclaimed)",
                            req.netns, req.network, a.pid
                        )));
                    }
                    Some(_) => reclaim(store, req, &held).await,
                    None => Err(e),
                },
                _ => Err(e),
            }
        }
        r => r,
    };
    let (endpoint, network, reservation) = registered?;
    let Location::Container { host_ifname, .. } = &endpoint.location else {
        unreachable!("add_container makes container endpoints")
    };
    let host_ifname = host_ifname.clone();
    let peer = crate::model::unmoved_peer_ifname(&host_ifname);
    let built = async {
        let routes = network
            .container_routes(endpoint.ip)
            .context("IPAM gave an address outside the network's subnets")?;
        let handle = netlink::connect()?;
        let ifname = netlink::create_container_link(
            &handle,
            &netlink::ContainerLink {
                host_ifname: &host_ifname,
                placement: match placement {
                    Placement::IntoNamespace => netlink::Placement::Namespace {
                        netns: &req.netns,
                        ifname: req.ifname.as_deref(),
                    },
                    Placement::HostSide => netlink::Placement::HostSide { peer: &peer },
                },
                ip: endpoint.ip,
                prefix: routes.prefix,
                mac: endpoint.mac,
                mtu: network.mtu,
                gateway: routes.gateway,
                via_gateway: &routes.via_gateway,
            },
        )
        .await?;
        if placement == Placement::HostSide {
            // Not in the container yet: the runtime moves and addresses it.
            return Ok((ifname, Vec::new()));
        }
        match container_routes(&req.netns, &ifname).await {
            Ok(routes) => Ok((ifname, routes)),
            Err(e) => {
                let _ = netlink::delete_link(&handle, &host_ifname).await;
                Err(e)
            }
        }
    }
    .await;
    match built {
        Ok((ifname, routes)) => Ok(Attachment {
            // A runtime that places the interface itself owns the
            // namespace, which may not even exist yet (Docker makes it
            // after Join): its loopback and resolv.conf are the runtime's.
            resolv_conf: match placement {
                Placement::IntoNamespace => resolver_setup(&req.netns).await,
                Placement::HostSide => None,
            },
            endpoint,
            network,
            ifname,
            host_ifname,
            routes,
        }),
        Err(e) => {
            let undo = store
                .update_with(Scope::Network(&req.network), |s| {
                    s.remove_container(&req.network, &req.node, &req.netns)?;
                    if let Some(r) = &reservation {
                        s.endpoints.push(r.clone());
                    }
                    Ok(())
                })
                .await;
            let kept = match (&undo, &reservation) {
                (Err(undo), _) => {
                    log::error!(
                        "could not roll back the registration of {}: {undo}",
                        req.netns
                    );
                    format!(
                        "its endpoint {} stays registered, as the store could not be changed \
                         back ({undo}); remove it with `ovl disconnect {} {}` on node {}",
                        endpoint.ip, req.network, req.netns, req.node
                    )
                }
                (Ok(()), Some(_)) => "its address stays reserved".to_owned(),
                (Ok(()), None) => "nothing was registered".to_owned(),
            };
            Err(e.context(format!("connect {} to {}; {kept}", req.netns, req.network)))
        }
    }
}

/// Registers `req` in place of `stale`, the record an attach of the same
/// container left when it was killed half-way, after removing what it
/// built of its veth.
async fn reclaim(
    store: &Store,
    req: &Request,
    stale: &Endpoint,
) -> Result<(Endpoint, Network, Option<Endpoint>), StoreError> {
    let Location::Container { host_ifname, .. } = &stale.location else {
        unreachable!("abandoned_attach holds only for container endpoints")
    };
    if let Err(e) = remove_host_link(host_ifname).await {
        log::warn!("{e:#}");
    }
    let attacher = stale
        .attacher
        .map_or(String::new(), |a| format!(" (pid {})", a.pid));
    log::warn!(
        "{} on {}: reclaiming endpoint {} of an attach that died before finishing its veth{attacher}",
        req.netns,
        req.network,
        stale.ip
    );
    register_replacing(store, req, Some(stale)).await
}

/// Whether `ep` was left by an attach killed half-way: the process that
/// registered it is dead ([`attacher::is_gone`]) and its veth was never
/// finished — the host end does not exist, or the pair is still whole in
/// the host's namespace (the container end never moved). `ifindex_of`
/// resolves a host interface. An endpoint recorded without an attacher is
/// never; nor is Docker's: its plugin reconciles those with dockerd, and
/// their container end waits in the host's namespace for Docker to move.
pub fn abandoned_attach(ep: &Endpoint, ifindex_of: &dyn Fn(&str) -> Option<u32>) -> bool {
    if ep
        .owner
        .as_deref()
        .is_some_and(crate::docker::is_docker_owner)
    {
        return false;
    }
    let (Location::Container { host_ifname, .. }, Some(attacher)) = (&ep.location, &ep.attacher)
    else {
        return false;
    };
    unfinished(host_ifname, ifindex_of) && attacher::is_gone(attacher)
}

/// Whether the veth with host end `host_ifname` was never finished for a
/// container: the host end does not exist, or the pair is still whole in
/// the host's namespace.
fn unfinished(host_ifname: &str, ifindex_of: &dyn Fn(&str) -> Option<u32>) -> bool {
    ifindex_of(host_ifname).is_none()
        || ifindex_of(&crate::model::unmoved_peer_ifname(host_ifname)).is_some()
}

/// Whether the veth of container endpoint `ep` (not Docker's) is
/// unfinished as this host sees it now: [`unfinished`], or its host end
/// still down — an attach raises it last, once the container end is
/// moved, named and addressed. Only an attach of the same container asks
/// (the agent looks for [`abandoned_attach`] alone: a host end an operator
/// set down is no reason for it to take a container's interface away).
async fn unfinished_now(ep: &Endpoint) -> Result<bool> {
    let Location::Container { host_ifname, .. } = &ep.location else {
        return Ok(false);
    };
    if ep
        .owner
        .as_deref()
        .is_some_and(crate::docker::is_docker_owner)
    {
        return Ok(false);
    }
    if unfinished(host_ifname, &netlink::ifindex) {
        return Ok(true);
    }
    let handle = netlink::connect()?;
    Ok(netlink::link_state(&handle, host_ifname)
        .await?
        .is_some_and(|l| !l.up))
}

/// Refuses a port published on an address this host does not have (its
/// rule, which takes packets to the host's own addresses, would never
/// match): one of the addresses its interfaces carry, not a broadcast or
/// multicast address a socket could bind to. Front ends run in the node's
/// own namespace.
async fn check_host_addresses(req: &Request) -> Result<()> {
    let wanted: Vec<_> = req.ports.iter().filter(|p| p.host_ip.is_some()).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let handle = netlink::connect()?;
    let own = netlink::host_ipv4_addresses(&handle).await?;
    for p in wanted {
        if let Some(ip) = p.host_ip
            && !own.contains(&ip)
        {
            anyhow::bail!(
                "{p} publishes on {ip}, which is not an address of this host (node {}); publish on one of its addresses, or on every address ({}:{}/{})",
                req.node,
                p.host_port,
                p.container_port,
                p.protocol
            );
        }
    }
    Ok(())
}

/// The store's half of [`attach`]: registers the container's endpoint
/// (IPAM, names), returning it, its network, and the reservation of its
/// address it took over, if any. Reads a few keys, not the network: the
/// cost of a connect does not grow with the network's size.
pub async fn register(
    store: &Store,
    req: &Request,
) -> Result<(Endpoint, Network, Option<Endpoint>), StoreError> {
    register_replacing(store, req, None).await
}

/// [`register`]; `replacing`, the record an attach of the same container
/// killed half-way left, goes in the same change if the store still holds
/// it as it was found.
async fn register_replacing(
    store: &Store,
    req: &Request,
    replacing: Option<&Endpoint>,
) -> Result<(Endpoint, Network, Option<Endpoint>), StoreError> {
    let attacher = attacher::current();
    let wanted = naming::Wanted {
        name: req.name.clone().unwrap_or_else(|| req.netns.clone()),
        aliases: req.aliases.clone(),
    };
    // The fallback's claim is read too: the choice between the names is
    // made on what the store holds, in the same change. (Aliases are
    // shared: nothing to read for them.)
    let names: Vec<String> = std::iter::once(&wanted.name)
        .chain(&req.fallback_name)
        .cloned()
        .collect();
    let around = Around {
        network: &req.network,
        attachment: Some((&req.node, &req.netns)),
        ip: req.ip,
        names: &names,
        allocates: req.ip.is_none(),
        ports: &req.ports,
    };
    // A MAC asked for must be no other endpoint's of the network
    // (State::check_mac): only the whole network's records show their MACs
    // (an older ovl's endpoints hold theirs without a claim). Its claim,
    // written with the endpoint, makes racers for the MAC collide.
    let scope = match req.mac {
        Some(_) => Scope::Network(&req.network),
        None => Scope::Endpoint(around),
    };
    let (endpoint, network, reservation, naming) = store
        .update_with(scope, |s| {
            if let Some(stale) = replacing {
                // Changed since it was found: attached anew meanwhile, and
                // add_container below refuses.
                s.remove_exact(stale);
            }
            let reservation = req.ip.and_then(|ip| {
                s.endpoints
                    .iter()
                    .find(|e| {
                        e.network == req.network
                            && e.ip == ip
                            && e.owner.is_some()
                            && e.owner == req.owner
                            && matches!(&e.location, Location::Reserved { node } if *node == req.node)
                    })
                    .cloned()
            });
            let naming = req.fallback_name.as_deref().map(|fallback| {
                naming::choose(s, &req.network, reservation.as_ref(), &wanted, fallback)
            });
            let (name, aliases) = match &naming {
                Some(n) => (Some(n.name.clone()), n.aliases.clone()),
                None => (req.name.clone(), req.aliases.clone()),
            };
            let ep = s.add_container(ContainerSpec {
                network: req.network.clone(),
                node: req.node.clone(),
                netns: req.netns.clone(),
                name,
                ip: req.ip,
                subnet: req.subnet,
                owner: req.owner.clone(),
                ports: req.ports.clone(),
                mac: req.mac,
                attacher,
            })?;
            // Last, once the store found the ports free of ovl's own: a
            // socket of this host's (front ends run in the node's own
            // namespace) would lose its clients to the container.
            crate::ports::check_free_on_host(&req.ports)?;
            let ep = if aliases.is_empty() {
                ep
            } else {
                s.set_names(&req.network, ep.ip, None, aliases)?
            };
            Ok((ep, s.network(&req.network)?.clone(), reservation, naming))
        })
        .await
        .map_err(|e| match e {
            // Each port is a claim and a guard: their number is what
            // outgrew the transaction.
            StoreError::TooLarge { ops, limit } if !req.ports.is_empty() => {
                StoreError::TooManyPorts {
                    ports: req.ports.len(),
                    ops,
                    limit,
                }
            }
            e => e,
        })?;
    if let Some(n) = naming.filter(|n| !n.refused.is_empty()) {
        log::warn!(
            "{} on {} ({}) does not get every name it asked for: {}; names are unique per ovl network, across hosts. It resolves as {}",
            req.owner.as_deref().unwrap_or(&req.netns),
            req.network,
            endpoint.ip,
            n.refused.join("; "),
            n.names_text()
        );
    }
    Ok((endpoint, network, reservation))
}

/// The store's half of [`detach`]: removes the endpoint of `netns` on
/// `node` from `network`, reading only it and its claims.
pub async fn unregister(
    store: &Store,
    node: &str,
    network: &str,
    netns: &str,
) -> Result<Endpoint, StoreError> {
    store
        .update_with(
            Scope::Endpoint(Around::container(network, node, netns)),
            |s| s.remove_container(network, node, netns),
        )
        .await
}

/// The IPv4 routes through interface `ifname` of namespace `netns`.
pub async fn container_routes(netns: &str, ifname: &str) -> Result<Vec<netlink::Route4>> {
    let inner = netlink::connect_in(netns)?;
    let index = netlink::link_state(&inner, ifname)
        .await?
        .with_context(|| format!("{ifname} vanished from namespace {netns:?}"))?
        .index;
    Ok(netlink::ipv4_routes(&inner)
        .await?
        .into_iter()
        .filter(|r| r.oif == Some(index))
        .collect())
}

/// The container endpoints on `node` in `network` whose owner starts with
/// `prefix` (a front end's attachments, e.g. every `cni:` one).
pub async fn owned(
    store: &Store,
    node: &str,
    network: &str,
    prefix: &str,
) -> Result<Vec<Endpoint>> {
    let state = store.load().await?;
    Ok(state
        .endpoints_of(network)
        .filter(|e| e.node() == Some(node))
        .filter(|e| e.owner.as_deref().is_some_and(|o| o.starts_with(prefix)))
        .cloned()
        .collect())
}

/// The container endpoint on `node` in `network` owned by exactly `owner`.
pub async fn find_owned(
    store: &Store,
    node: &str,
    network: &str,
    owner: &str,
) -> Result<Option<Endpoint>> {
    Ok(owned(store, node, network, owner)
        .await?
        .into_iter()
        .find(|e| e.owner.as_deref() == Some(owner)))
}

/// Points the container at ovl's resolver: its loopback up (the resolver
/// listens on 127.0.0.11) and, for an `ip netns` name, the resolv.conf
/// `ip netns exec` mounts. Neither is needed to forward: a failure is a
/// warning, not a failed attachment.
async fn resolver_setup(netns: &str) -> Option<PathBuf> {
    if let Err(e) = netlink::loopback_up(netns).await {
        log::warn!("{e:#}; names will not resolve in {netns}");
    }
    match dns::resolv_conf::install(netns, &dns::container_dns()) {
        Ok(dns::resolv_conf::Change::Written(path)) => Some(path),
        Ok(dns::resolv_conf::Change::NotOurs(path)) => {
            log::warn!(
                "{} exists and was not written by ovl: left as is; point it at nameserver {} for names to resolve",
                path.display(),
                dns::RESOLVER_ADDR
            );
            None
        }
        Ok(_) => None,
        Err(e) => {
            log::warn!("{e:#}; names will not resolve in {netns}");
            None
        }
    }
}

/// Renames endpoint `ip` of `network` and replaces its aliases (each
/// unique in the network); for a front end that learns a container's
/// names after attaching it (the Docker plugin, once Docker reports the
/// container's name and `--network-alias`es). Refused, changing nothing,
/// when a name is invalid or taken, or when the endpoint at `ip` is not
/// `owner`'s any more (it left, and its address may be another
/// container's by now).
pub async fn set_names(
    store: &Store,
    network: &str,
    ip: Ipv4Addr,
    owner: &str,
    name: Option<String>,
    aliases: Vec<String>,
) -> Result<Endpoint> {
    Ok(store
        .update_with(Scope::Network(network), |s| {
            let held = s
                .endpoints_of(network)
                .any(|e| e.ip == ip && e.owner.as_deref() == Some(owner));
            if !held {
                return Err(ModelError::NoSuchEndpoint {
                    network: network.to_owned(),
                    ip,
                });
            }
            s.set_names(network, ip, name.clone(), aliases.clone())
        })
        .await?)
}

/// The endpoint of namespace `netns` on `node` in `network`, if any.
pub async fn find(
    store: &Store,
    node: &str,
    network: &str,
    netns: &str,
) -> Result<Option<Endpoint>> {
    let state = store
        .load_in(Scope::Endpoint(Around::container(network, node, netns)))
        .await?;
    Ok(state
        .endpoints_of(network)
        .find(|e| matches!(&e.location, Location::Container { node: n, netns: ns, .. } if n == node && ns == netns))
        .cloned())
}

/// Removes the veth of `netns` on `node` (if still there) and its endpoint.
pub async fn detach(store: &Store, node: &str, network: &str, netns: &str) -> Result<Endpoint> {
    remove_link(store, node, network, netns).await?;
    let endpoint = unregister(store, node, network, netns).await?;
    release_resolv_conf(store, node, netns).await;
    Ok(endpoint)
}

/// Removes the resolv.conf ovl wrote for namespace `netns` once it has no
/// endpoint left on `node` (in any network: the only read of the whole
/// state, and only for `ip netns` names with ovl's file).
async fn release_resolv_conf(store: &Store, node: &str, netns: &str) {
    if !dns::resolv_conf::is_ours(netns) {
        return;
    }
    let still_attached = match store.load().await {
        Ok(state) => state.endpoints.iter().any(|e| {
            matches!(&e.location, Location::Container { node: n, netns: ns, .. } if n == node && ns == netns)
        }),
        Err(e) => {
            log::warn!("{e}; keeping the resolv.conf of {netns}");
            return;
        }
    };
    if !still_attached && let Err(e) = dns::resolv_conf::remove(netns) {
        log::warn!("{e:#}");
    }
}

/// Removes the veth of `netns` on `node` (if still there) and turns its
/// endpoint back into a reservation of the address by the same owner, for
/// a runtime whose IPAM releases addresses on its own (Docker's Leave
/// comes before its ReleaseAddress).
pub async fn detach_keeping_address(
    store: &Store,
    node: &str,
    network: &str,
    netns: &str,
) -> Result<Endpoint> {
    remove_link(store, node, network, netns).await?;
    Ok(store
        .update_with(Scope::Network(network), |s| {
            s.release_to_reservation(network, node, netns)
        })
        .await?)
}

async fn remove_link(store: &Store, node: &str, network: &str, netns: &str) -> Result<()> {
    if let Some(Endpoint {
        location: Location::Container { host_ifname, .. },
        ..
    }) = find(store, node, network, netns).await?
    {
        remove_host_link(&host_ifname).await?;
    }
    Ok(())
}

/// Deletes the veth pair with host end `host_ifname` if it is still whole
/// in the host's namespace (its container end never moved: what an attach
/// killed half-way leaves, [`abandoned_attach`]); a host end whose peer
/// is in a container is left alone. Returns whether a pair went.
pub async fn remove_unmoved_pair(host_ifname: &str) -> Result<bool> {
    let peer = crate::model::unmoved_peer_ifname(host_ifname);
    if netlink::ifindex(&peer).is_none() || netlink::ifindex(host_ifname).is_none() {
        return Ok(false);
    }
    let handle = netlink::connect()?;
    netlink::delete_link(&handle, host_ifname)
        .await
        .with_context(|| {
            format!("remove the veth pair {host_ifname} / {peer} a killed attach left")
        })?;
    Ok(true)
}

/// Deletes the host end of a container veth (and so the pair), if present.
pub async fn remove_host_link(host_ifname: &str) -> Result<()> {
    if netlink::ifindex(host_ifname).is_some() {
        let handle = netlink::connect()?;
        netlink::delete_link(&handle, host_ifname).await?;
    }
    Ok(())
}

/// Removes interface `ifname` of namespace `netns` (and so the host end of
/// its veth) when it is a container interface ovl made for `network` that
/// no endpoint records any more: the store lost the record (restored from
/// a backup, edited by hand) while the container kept the interface. A
/// runtime's release (CNI DEL) then releases the interface all the same,
/// as the CNI spec asks of DEL. Ovl's, with nothing left to doubt: a veth
/// whose MAC is ovl's for one of its addresses ([`MacAddr::for_ipv4`]),
/// peered both ways with a host interface named after the network's VNI
/// and that address ([`model::host_ifname`]) — or, the network itself
/// gone from the store, named as ovl names host ends. Anything else (no
/// such interface, another's, one a record still holds, a namespace that
/// is gone and took its interfaces along) is left alone: returns the host
/// end removed, if any.
///
/// [`MacAddr::for_ipv4`]: crate::model::MacAddr::for_ipv4
/// [`model::host_ifname`]: crate::model::host_ifname
pub async fn remove_unrecorded_link(
    store: &Store,
    network: &str,
    netns: &str,
    ifname: &str,
) -> Result<Option<String>> {
    if !netns::path_of(netns).exists() {
        return Ok(None);
    }
    let inner = netlink::connect_in(netns)?;
    let Some(link) = netlink::link_state(&inner, ifname).await? else {
        return Ok(None);
    };
    let Some(peer) = link.peer.filter(|_| link.veth) else {
        log::info!("{ifname} in {netns} is no veth: not ovl's, left alone");
        return Ok(None);
    };
    let host = netlink::connect()?;
    for (ip, _) in netlink::ipv4_addresses(&inner, link.index).await? {
        if link.mac != Some(crate::model::MacAddr::for_ipv4(ip)) {
            continue;
        }
        let Some(host_end) = netlink::ifname(peer) else {
            continue;
        };
        let state = store
            .load_in(Scope::Endpoint(Around {
                network,
                attachment: None,
                ip: Some(ip),
                names: &[],
                allocates: false,
                ports: &[],
            }))
            .await?;
        let named_ours = match state.network(network) {
            Ok(n) => host_end == crate::model::host_ifname(n.vni, ip),
            Err(_) => crate::model::is_host_ifname(&host_end),
        };
        let peered = netlink::link_state_by_index(&host, peer)
            .await
            .is_ok_and(|h| h.veth && h.peer == Some(link.index));
        if !(named_ours && peered) {
            continue;
        }
        if let Some(holder) = state.endpoints.iter().find(|e| {
            matches!(&e.location, Location::Container { host_ifname, .. } if *host_ifname == host_end)
        }) {
            log::warn!(
                "{ifname} in {netns} ({ip}) is the veth of endpoint {} ({}) of {}: left to it",
                holder.name,
                holder.ip,
                holder.network
            );
            return Ok(None);
        }
        netlink::delete_link(&host, &host_end).await?;
        return Ok(Some(host_end));
    }
    log::info!("{ifname} in {netns} is not an ovl interface of network {network}: left alone");
    Ok(None)
}

/// Whether the node's agent forwards for an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// In the agent's maps, its veth hooked.
    Forwarding,
    /// The agent runs but did not get there within the wait, or did not
    /// answer at all (stopped or hung: the reason is logged).
    NotYet,
    /// No agent answers on the node's API socket: the endpoint forwards
    /// once one runs.
    NoAgent,
}

/// Waits up to `timeout` until the agent on `api_socket` forwards for
/// address `ip` of `network`.
pub async fn wait_forwarding(
    api_socket: &Path,
    network: &str,
    ip: Ipv4Addr,
    timeout: Duration,
) -> Result<Readiness> {
    let query = format!(
        "/v1/endpoints/ready?network={network}&ip={ip}&timeout_ms={}",
        timeout.as_millis()
    );
    match api::Client::new(api_socket)
        .get_waiting::<api::Ready>(&query, timeout)
        .await
    {
        Ok(r) if r.ready => Ok(Readiness::Forwarding),
        Ok(_) => Ok(Readiness::NotYet),
        Err(api::ClientError::NoAgent(_)) => Ok(Readiness::NoAgent),
        Err(e @ api::ClientError::Unresponsive { .. }) => {
            log::warn!("{e}");
            Ok(Readiness::NotYet)
        }
        Err(e) => Err(e).context("ask the node's agent whether the endpoint forwards"),
    }
}
