//! CHECK: the attachment is still as ADD made it — the endpoint in the
//! store, the host veth (present and up), the container interface (up,
//! MAC, MTU, address), what prevResult lists, and the agent forwarding for
//! it.

use std::time::Duration;

use super::{
    env::Invocation,
    error::{CniError, Code},
    result, sandbox,
    settings::Settings,
    types::NetConf,
};
use crate::{
    attachment::{self, Readiness},
    model::Location,
    netlink,
};

/// Convergence allowed for the agent right after an ADD (the spec asks
/// CHECK to tolerate being called immediately after ADD).
const READY_WAIT: Duration = Duration::from_secs(1);

fn failed(details: String) -> CniError {
    CniError::new(Code::CheckFailed, details)
}

/// CHECK; `Ok` when the attachment is as ADD made it.
pub async fn check(inv: &Invocation, conf: &NetConf, s: &Settings) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::config("CHECK needs prevResult, the result of the ADD being checked")
    })?;
    let prev = result::parse(prev)?;
    let netns = inv.netns.as_deref().expect("CHECK requires CNI_NETNS");
    sandbox::check(netns)?;
    let store = s.open_store().await?;
    let owner = inv.owner();
    let ep = attachment::find_owned(&store, &s.node, &s.network, &owner)
        .await
        .map_err(|e| CniError::from_failure(&e))?
        .ok_or_else(|| {
            failed(format!(
                "the store has no endpoint {owner} on network {} of node {}",
                s.network, s.node
            ))
        })?;
    let state = store.load().await?;
    let network = state
        .network(&s.network)
        .map_err(|e| failed(e.to_string()))?;
    let Location::Container {
        netns: recorded,
        host_ifname,
        ..
    } = &ep.location
    else {
        return Err(failed(format!("endpoint {owner} is not a container")));
    };
    if recorded != netns {
        return Err(failed(format!(
            "endpoint {owner} is recorded in namespace {recorded}, CNI_NETNS is {netns}"
        )));
    }
    let inner = netlink::connect_in(netns).map_err(|e| CniError::from_failure(&e))?;
    let ifname = &inv.ifname;
    let link = netlink::link_state(&inner, ifname)
        .await
        .map_err(|e| CniError::from_failure(&e))?
        .ok_or_else(|| failed(format!("the container has no interface {ifname}")))?;
    if !link.up {
        return Err(failed(format!("{ifname} in the container is down")));
    }
    if link.mac != Some(ep.mac) {
        return Err(failed(format!(
            "{ifname} has MAC {}, the endpoint {}",
            link.mac.map_or("none".into(), |m| m.to_string()),
            ep.mac
        )));
    }
    if link.mtu != Some(network.mtu) {
        return Err(failed(format!(
            "{ifname} has MTU {}, the network {}",
            link.mtu.map_or("none".into(), |m| m.to_string()),
            network.mtu
        )));
    }
    let host = netlink::connect().map_err(|e| CniError::from_failure(&e))?;
    let host_link = netlink::link_state(&host, host_ifname)
        .await
        .map_err(|e| CniError::from_failure(&e))?
        .ok_or_else(|| failed(format!("the host end {host_ifname} of the veth is gone")))?;
    // A veth carries nothing while either end is down: the container's
    // side shows NO-CARRIER and every packet to or from it is lost.
    if !host_link.up {
        return Err(failed(format!(
            "the host end {host_ifname} of the veth is down: the container has no connectivity; `ip link set {host_ifname} up`"
        )));
    }
    let prefix = network
        .pool_of(ep.ip)
        .map(|p| p.subnet.prefix())
        .ok_or_else(|| failed(format!("{} is in none of the network's subnets", ep.ip)))?;
    let want = (ep.ip, prefix);
    let addrs = netlink::ipv4_addresses(&inner, link.index)
        .await
        .map_err(|e| CniError::from_failure(&e))?;
    if !addrs.contains(&want) {
        return Err(failed(format!(
            "{ifname} lacks its address {}/{}",
            want.0, want.1
        )));
    }

    let cidr = format!("{}/{}", want.0, want.1);
    let listed = prev
        .interfaces
        .iter()
        .position(|i| i.name == *ifname && i.sandbox.as_deref() == Some(netns))
        .ok_or_else(|| failed(format!("prevResult lists no interface {ifname} in {netns}")))?;
    if !prev
        .ips
        .iter()
        .any(|ip| ip.interface == Some(listed) && ip.address == cidr)
    {
        return Err(failed(format!(
            "prevResult does not list {cidr} on {ifname}"
        )));
    }
    let routes = netlink::ipv4_routes(&inner)
        .await
        .map_err(|e| CniError::from_failure(&e))?;
    for r in &prev.routes {
        let present = routes.iter().any(|k| {
            let k = result::route(k);
            k.dst == r.dst && (r.gw.is_none() || k.gw == r.gw)
        });
        if !present {
            return Err(failed(format!(
                "the container lacks the route to {} listed in prevResult",
                r.dst
            )));
        }
    }

    match attachment::wait_forwarding(&s.api_socket, &s.network, ep.ip, READY_WAIT).await {
        Ok(Readiness::Forwarding) => Ok(()),
        Ok(Readiness::NotYet) => Err(failed(format!(
            "the agent of node {} does not forward for {}",
            s.node, ep.ip
        ))),
        Ok(Readiness::NoAgent) => {
            log::warn!(
                "no ovl agent answers on {}: whether {} forwards is unknown",
                s.api_socket.display(),
                ep.ip
            );
            Ok(())
        }
        Err(e) => Err(CniError::from_failure(&e)),
    }
}
