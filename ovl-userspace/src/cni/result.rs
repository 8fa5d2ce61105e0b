//! The ADD result: what an attachment made (host veth, container
//! interface, address, routes, the resolver to use), appended to a previous plugin's result
//! in a chain, and laid out for the negotiated spec version.

use serde_json::Value;

use super::{
    error::CniError,
    types::{AddResult, Dns, Interface, IpConfig, Route},
    version::SpecVersion,
};
use crate::{attachment::Attachment, dns::ContainerDns, model::MacAddr, netlink::Route4};

/// The result of `attachment`, whose container side lives in `sandbox`
/// (CNI_NETNS as given), with `dns` (see [`dns`]).
pub fn of_attachment(
    a: &Attachment,
    sandbox: &str,
    host_mac: Option<MacAddr>,
    dns: Dns,
) -> AddResult {
    let pool = a.network.pool_of(a.endpoint.ip);
    let host = Interface {
        name: a.host_ifname.clone(),
        mac: host_mac.map(|m| m.to_string()),
        mtu: Some(a.network.mtu),
        ..Interface::default()
    };
    let container = Interface {
        name: a.ifname.clone(),
        mac: Some(a.endpoint.mac.to_string()),
        mtu: Some(a.network.mtu),
        sandbox: Some(sandbox.to_owned()),
        ..Interface::default()
    };
    AddResult {
        interfaces: vec![host, container],
        ips: vec![IpConfig {
            address: format!(
                "{}/{}",
                a.endpoint.ip,
                pool.map(|p| p.subnet.prefix()).unwrap_or(32)
            ),
            gateway: pool.map(|p| p.gateway.to_string()),
            interface: Some(1),
            version: None,
        }],
        routes: a.routes.iter().map(route).collect(),
        dns,
    }
}

/// The result's `dns`: the configuration's when it says anything, else
/// ovl's resolver (`ovl`: [`dns::container_dns`], which the node's agent
/// serves in every container it forwards for), for the runtime to write
/// into the container's resolv.conf.
///
/// [`dns::container_dns`]: crate::dns::container_dns
pub fn dns(conf: Option<&Dns>, ovl: &ContainerDns) -> Dns {
    match conf {
        Some(d) if !d.is_empty() => d.clone(),
        _ => Dns {
            nameservers: ovl.nameservers.iter().map(ToString::to_string).collect(),
            domain: None,
            search: ovl.search.clone(),
            options: ovl.options.clone(),
        },
    }
}

/// A kernel route as the result lists it.
pub fn route(r: &Route4) -> Route {
    Route {
        dst: format!("{}/{}", r.dst, r.prefix),
        gw: r.gateway.map(|g| g.to_string()),
        scope: Some(u32::from(r.scope)),
        ..Route::default()
    }
}

/// Parses a `prevResult`.
pub fn parse(prev: &Value) -> Result<AddResult, CniError> {
    serde_json::from_value(prev.clone())
        .map_err(|e| CniError::decode(format!("prevResult is not a CNI result: {e}")))
}

/// `ours` appended to a previous plugin's result ([`parse`]d): interfaces
/// after its interfaces (our IP entries' indices shifted to match), IPs and
/// routes after its own, DNS filled in where it has none.
pub fn chain(prev: Option<AddResult>, ours: AddResult) -> AddResult {
    let Some(mut out) = prev else {
        return ours;
    };
    let shift = out.interfaces.len();
    out.interfaces.extend(ours.interfaces);
    out.ips.extend(ours.ips.into_iter().map(|mut ip| {
        ip.interface = ip.interface.map(|i| i + shift);
        ip
    }));
    out.routes.extend(ours.routes);
    if out.dns.is_empty() {
        out.dns = ours.dns;
    }
    out
}

/// The result JSON for `version`: `cniVersion` first; IP entries carry
/// `version: "4"` before 1.0.0; the interface fields (mtu, socketPath,
/// pciID) and route fields (mtu, advmss, priority, table, scope) that 1.1.0
/// added only from 1.1.0 on.
pub fn render(version: SpecVersion, mut r: AddResult) -> String {
    for ip in &mut r.ips {
        ip.version = version.legacy_layout().then(|| ip_version(&ip.address));
    }
    if version < SpecVersion::DETAILS_SINCE {
        for i in &mut r.interfaces {
            i.mtu = None;
            i.socket_path = None;
            i.pci_id = None;
        }
        for route in &mut r.routes {
            *route = Route {
                dst: std::mem::take(&mut route.dst),
                gw: route.gw.take(),
                ..Route::default()
            };
        }
    }
    let mut doc = serde_json::Map::new();
    doc.insert("cniVersion".into(), Value::String(version.to_string()));
    if let Value::Object(fields) = serde_json::to_value(&r).expect("a result serialises") {
        doc.extend(fields);
    }
    Value::Object(doc).to_string()
}

fn ip_version(cidr: &str) -> String {
    if cidr.contains(':') { "6" } else { "4" }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::error::Code;

    fn ours() -> AddResult {
        AddResult {
            interfaces: vec![
                Interface {
                    name: "ovl0011aabb".into(),
                    ..Interface::default()
                },
                Interface {
                    name: "eth0".into(),
                    sandbox: Some("/run/netns/c".into()),
                    ..Interface::default()
                },
            ],
            ips: vec![IpConfig {
                address: "198.18.0.2/24".into(),
                interface: Some(1),
                ..IpConfig::default()
            }],
            routes: vec![Route {
                dst: "198.18.0.0/24".into(),
                scope: Some(253),
                ..Route::default()
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn layout_follows_the_version() {
        let v = |s: &str| s.parse::<SpecVersion>().unwrap();
        let doc: Value = serde_json::from_str(&render(v("1.1.0"), ours())).unwrap();
        assert_eq!(doc["cniVersion"], "1.1.0");
        assert_eq!(doc["ips"][0]["interface"], 1);
        assert!(doc["ips"][0].get("version").is_none());
        assert_eq!(doc["routes"][0]["scope"], 253);
        assert!(doc.get("dns").is_none());

        let mut with_mtu = ours();
        with_mtu.interfaces[1].mtu = Some(1450);
        let doc: Value = serde_json::from_str(&render(v("1.1.0"), with_mtu.clone())).unwrap();
        assert_eq!(doc["interfaces"][1]["mtu"], 1450);
        let doc: Value = serde_json::from_str(&render(v("1.0.0"), with_mtu)).unwrap();
        assert!(doc["routes"][0].get("scope").is_none());
        assert!(doc["interfaces"][1].get("mtu").is_none());
        let doc: Value = serde_json::from_str(&render(v("0.4.0"), ours())).unwrap();
        assert_eq!(doc["ips"][0]["version"], "4");
    }

    #[test]
    fn dns_is_ovls_resolver_unless_the_configuration_names_one() {
        let ovl = ContainerDns {
            nameservers: vec![crate::dns::RESOLVER_ADDR],
            search: vec!["lab.example".into()],
            options: vec!["ndots:0".into()],
        };
        let d = dns(None, &ovl);
        assert_eq!(d.nameservers, ["127.0.0.11"]);
        assert_eq!(d.search, ["lab.example"]);
        assert_eq!(d.options, ["ndots:0"]);
        assert_eq!(
            dns(Some(&Dns::default()), &ovl),
            d,
            "an empty one says nothing"
        );
        let own = Dns {
            nameservers: vec!["198.18.0.1".into()],
            ..Dns::default()
        };
        assert_eq!(dns(Some(&own), &ovl), own, "the configuration's wins");
        let doc: Value = serde_json::from_str(&render(
            "1.0.0".parse().unwrap(),
            AddResult { dns: d, ..ours() },
        ))
        .unwrap();
        assert_eq!(
            doc["dns"],
            serde_json::json!({"nameservers": ["127.0.0.11"], "search": ["lab.example"], "options": ["ndots:0"]})
        );
    }

    #[test]
    fn a_chained_result_keeps_the_previous_one_and_shifts_indices() {
        let prev = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo", "sandbox": "/run/netns/c"}],
            "ips": [{"address": "127.0.0.1/8", "interface": 0}],
            "dns": {"nameservers": ["198.18.0.1"]}
        });
        let r = chain(Some(parse(&prev).unwrap()), ours());
        assert_eq!(r.interfaces.len(), 3);
        assert_eq!(r.ips[0].interface, Some(0));
        assert_eq!(r.ips[1].interface, Some(2));
        assert_eq!(r.interfaces[2].name, "eth0");
        assert_eq!(r.dns.nameservers, ["198.18.0.1"]);
        assert_eq!(chain(None, ours()), ours());
        let e = parse(&serde_json::json!({"ips": 3})).unwrap_err();
        assert_eq!(e.code, Code::Decode, "{e}");
    }
}
