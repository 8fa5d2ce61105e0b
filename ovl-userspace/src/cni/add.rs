//! ADD: the container gets an interface on the ovl network exactly as
//! `ovl connect` gives it one (same IPAM, MAC, MTU, veth), named
//! CNI_IFNAME, owned by `cni:<container id>/<ifname>` and named after the
//! pod, or its short container ID when that name is taken on the network
//! ([`attachment::naming`]); the result points the runtime at ovl's
//! resolver. Refused while the node's agent does not run.

use std::{net::Ipv4Addr, time::Duration};

use super::{
    env::Invocation,
    error::{CniError, Code},
    result, sandbox,
    settings::Settings,
    types::NetConf,
    version::SpecVersion,
};
use crate::{api, attachment, dns, model::MacAddr, netlink, ports::PublishedPort};

/// How long ADD waits for the node's agent to forward for the container
/// (as `ovl connect` does): the container starts right after ADD.
const READY_WAIT: Duration = Duration::from_secs(2);

/// ADD; returns the result JSON.
pub async fn add(
    inv: &Invocation,
    conf: &NetConf,
    s: &Settings,
    version: SpecVersion,
) -> Result<String, CniError> {
    let netns = inv.netns.as_deref().expect("ADD requires CNI_NETNS");
    sandbox::check(netns)?;
    let ip = requested_ip(inv, conf)?;
    let mac = requested_mac(inv, conf)?;
    let ports = requested_ports(conf)?;
    // Read before anything is made: a prevResult that is no CNI result
    // found only after attaching would leave the attachment behind.
    let prev = conf.prev_result.as_ref().map(result::parse).transpose()?;
    // Refused before anything is registered: the spec requires an error
    // when the container already has an interface by this name.
    if container_has(netns, &inv.ifname).await? {
        return Err(CniError::new(
            Code::InterfaceExists,
            format!(
                "the container ({netns}) already has an interface named {} (CNI_IFNAME); DEL the attachment first or choose another name",
                inv.ifname
            ),
        ));
    }
    let store = s.open_store().await?;
    let owner = inv.owner();
    let known = attachment::find_owned(&store, &s.node, &s.network, &owner)
        .await
        .map_err(|e| CniError::from_failure(&e))?;
    if let Some(ep) = known {
        return Err(CniError::new(
            Code::InterfaceExists,
            format!(
                "attachment {owner} already exists on network {} with address {}; DEL it first",
                s.network, ep.ip
            ),
        ));
    }
    let short_id = super::env::short_id(&inv.container_id);
    let name = inv
        .args
        .get("K8S_POD_NAME")
        .cloned()
        .unwrap_or_else(|| short_id.clone());
    let req = attachment::Request {
        network: s.network.clone(),
        node: s.node.clone(),
        netns: netns.to_owned(),
        ifname: Some(inv.ifname.clone()),
        name: Some(name),
        // Pod and container names are unique per namespace or per host,
        // not per ovl network: a clash is no reason to fail the pod.
        fallback_name: Some(short_id),
        aliases: Vec::new(),
        ip,
        subnet: None,
        owner: Some(owner),
        ports,
        mac,
    };
    require_agent(s).await?;
    let a = attachment::attach(&store, &req).await.map_err(|e| {
        let e = e.context(format!(
            "attach container {} ({}) to network {}",
            inv.container_id, inv.ifname, s.network
        ));
        CniError::from_failure(&e)
    })?;
    warn_unless_forwarding(s, &a).await;
    let host_mac = match netlink::connect() {
        Ok(h) => netlink::link_state(&h, &a.host_ifname)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.mac),
        Err(_) => None,
    };
    let dns = result::dns(conf.dns.as_ref(), &dns::container_dns());
    let ours = result::of_attachment(&a, netns, host_mac, dns);
    Ok(result::render(version, result::chain(prev, ours)))
}

/// An address the runtime asks for: the `ips` capability or `IP=` in
/// CNI_ARGS (the CNI conventions); one IPv4 address at most, which both
/// may name (in CIDR form or not).
fn requested_ip(inv: &Invocation, conf: &NetConf) -> Result<Option<Ipv4Addr>, CniError> {
    let mut asked: Vec<&str> = conf
        .runtime_config
        .as_ref()
        .map(|r| r.ips.iter().map(String::as_str).collect())
        .unwrap_or_default();
    if let Some(ip) = inv.args.get("IP") {
        asked.push(ip);
    }
    let mut addresses: Vec<Ipv4Addr> = asked
        .iter()
        .map(|one| {
            let addr = one.split_once('/').map_or(*one, |(a, _)| a);
            addr.parse().map_err(|_| {
                CniError::config(format!(
                    "requested address {one:?} is not an IPv4 address; ovl networks are IPv4"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    addresses.sort_unstable();
    addresses.dedup();
    match addresses.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => Err(CniError::config(format!(
            "{} addresses requested ({}); ovl gives a container one address per network",
            many.len(),
            asked.join(", ")
        ))),
    }
}

/// A MAC the runtime asks for: the `mac` capability or `MAC=` in
/// CNI_ARGS (the CNI conventions); both may name it, but not two.
fn requested_mac(inv: &Invocation, conf: &NetConf) -> Result<Option<MacAddr>, CniError> {
    let asked = conf.runtime_config.as_ref().and_then(|r| r.mac.as_deref());
    let parse = |text: &str| {
        text.parse::<MacAddr>()
            .map_err(|e| CniError::config(format!("requested MAC {text:?}: {e}")))
    };
    let from_config = asked.map(parse).transpose()?;
    let from_args = inv.args.get("MAC").map(|m| parse(m)).transpose()?;
    match (from_config, from_args) {
        (Some(a), Some(b)) if a != b => Err(CniError::config(format!(
            "two MACs requested ({a} in runtimeConfig, {b} in CNI_ARGS); give one"
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

/// The ports the runtime publishes: the `portMappings` capability.
fn requested_ports(conf: &NetConf) -> Result<Vec<PublishedPort>, CniError> {
    let mappings = conf
        .runtime_config
        .as_ref()
        .map(|r| r.port_mappings.as_slice())
        .unwrap_or_default();
    mappings
        .iter()
        .map(|m| {
            let text = format!(
                "{}{}:{}/{}",
                match m.host_ip.as_str() {
                    "" => String::new(),
                    ip => format!("{ip}:"),
                },
                m.host_port,
                m.container_port,
                if m.protocol.is_empty() {
                    "tcp"
                } else {
                    m.protocol.as_str()
                }
            );
            text.parse::<PublishedPort>()
                .map_err(|e| CniError::config(format!("portMappings: {e}")))
        })
        .collect()
}

/// Whether namespace `netns` has an interface called `ifname`.
async fn container_has(netns: &str, ifname: &str) -> Result<bool, CniError> {
    let inner = netlink::connect_in(netns).map_err(|e| CniError::from_failure(&e))?;
    netlink::link_state(&inner, ifname)
        .await
        .map(|l| l.is_some())
        .map_err(|e| CniError::from_failure(&e))
}

/// Refuses ADD (11, before anything is registered) while no agent runs on
/// the node: the container would come up with an interface nothing
/// forwards for, and runtimes show a plugin's warnings only when it fails
/// (podman drops a successful plugin's stderr). An agent that runs but is
/// slow or stopped is waited for after attaching ([`warn_unless_forwarding`]).
async fn require_agent(s: &Settings) -> Result<(), CniError> {
    match api::Client::new(&s.api_socket)
        .get::<api::Health>("/v1/health")
        .await
    {
        Err(api::ClientError::NoAgent(_)) => Err(CniError::new(
            Code::TryAgainLater,
            format!(
                "no ovl agent answers on {} for node {}: a container attached now would have no connectivity; start the agent with `ovl attach <interface>` on this host (or point \"apiSocket\" at its socket), then retry",
                s.api_socket.display(),
                s.node
            ),
        )),
        _ => Ok(()),
    }
}

/// The attachment is registered either way; the runtime's log says when
/// nothing forwards for it yet.
async fn warn_unless_forwarding(s: &Settings, a: &attachment::Attachment) {
    let ip = a.endpoint.ip;
    match attachment::wait_forwarding(&s.api_socket, &s.network, ip, READY_WAIT).await {
        Ok(attachment::Readiness::Forwarding) => {}
        Ok(attachment::Readiness::NoAgent) => log::warn!(
            "no ovl agent answers on {} for node {}: {ip} is registered, but nothing forwards for it until `ovl attach` runs",
            s.api_socket.display(),
            s.node
        ),
        Ok(attachment::Readiness::NotYet) => log::warn!(
            "the agent of node {} did not report {ip} forwarding within {READY_WAIT:?}",
            s.node
        ),
        Err(e) => log::warn!("{e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An invocation with `args` as CNI_ARGS.
    fn inv(args: &[(&str, &str)]) -> Invocation {
        Invocation {
            args: args
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Invocation::default()
        }
    }

    #[test]
    fn one_address_asked_for_through_ips_and_cni_args_is_one_address() {
        let conf: NetConf =
            serde_json::from_str(r#"{"name":"n","runtimeConfig":{"ips":["198.18.0.9/24"]}}"#)
                .unwrap();
        let same = inv(&[("IP", "198.18.0.9")]);
        assert_eq!(
            requested_ip(&same, &conf).unwrap(),
            Some(Ipv4Addr::new(198, 18, 0, 9))
        );
        let other = inv(&[("IP", "198.18.0.10")]);
        let e = requested_ip(&other, &conf).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.details.contains("2 addresses requested"), "{e}");
        let bad = inv(&[("IP", "198.18.0.300")]);
        assert!(
            requested_ip(&bad, &conf)
                .unwrap_err()
                .details
                .contains("300")
        );
    }

    #[test]
    fn a_mac_asked_for_through_the_capability_or_cni_args_is_one_mac() {
        let conf: NetConf =
            serde_json::from_str(r#"{"name":"n","runtimeConfig":{"mac":"0a:00:5e:00:00:05"}}"#)
                .unwrap();
        let plain: NetConf = serde_json::from_str(r#"{"name":"n"}"#).unwrap();
        let mac = MacAddr([0x0a, 0, 0x5e, 0, 0, 5]);
        assert_eq!(requested_mac(&inv(&[]), &conf).unwrap(), Some(mac));
        assert_eq!(requested_mac(&inv(&[]), &plain).unwrap(), None);
        let same = inv(&[("MAC", "0a:00:5e:00:00:05")]);
        assert_eq!(requested_mac(&same, &conf).unwrap(), Some(mac));
        assert_eq!(requested_mac(&same, &plain).unwrap(), Some(mac));
        let other = inv(&[("MAC", "0a:00:5e:00:00:06")]);
        let e = requested_mac(&other, &conf).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.details.contains("two MACs requested"), "{e}");
        let bad = inv(&[("MAC", "0a:00:5e")]);
        let e = requested_mac(&bad, &plain).unwrap_err();
        assert!(e.details.contains("0a:00:5e"), "{e}");
    }

    #[test]
    fn port_mappings_become_published_ports() {
        let conf: NetConf = serde_json::from_str(
            r#"{"name":"n","runtimeConfig":{"portMappings":[
                {"hostPort":8080,"containerPort":80,"protocol":"tcp"},
                {"hostPort":5353,"containerPort":53,"protocol":"udp","hostIP":"192.0.2.10"},
                {"hostPort":9090,"containerPort":90,"hostIP":""}]}}"#,
        )
        .unwrap();
        let want: Vec<PublishedPort> = ["8080:80", "192.0.2.10:5353:53/udp", "9090:90"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(requested_ports(&conf).unwrap(), want);
        let conf: NetConf = serde_json::from_str(
            r#"{"name":"n","runtimeConfig":{"portMappings":[
                {"hostPort":8080,"containerPort":80,"protocol":"sctp"}]}}"#,
        )
        .unwrap();
        let err = requested_ports(&conf).unwrap_err();
        assert!(format!("{err:?}").contains("sctp"), "{err:?}");
        // An IPv6 hostIP is refused as such, not as a malformed mapping.
        let conf: NetConf = serde_json::from_str(
            r#"{"name":"n","runtimeConfig":{"portMappings":[
                {"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"::"}]}}"#,
        )
        .unwrap();
        let err = requested_ports(&conf).unwrap_err();
        assert!(
            format!("{err:?}").contains("IPv4 host addresses only"),
            "{err:?}"
        );
    }
}
