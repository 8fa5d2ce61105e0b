//! Docker's network options mapped to ovl's, in one place: what ovl takes
//! from `docker network create` / `docker run`, and what it refuses — each
//! refusal names the option — until ovl has the feature. Switching one on
//! is setting its flag in [`FEATURES`] and mapping it where it is refused.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Deserialize;
use serde_json::Value;

use super::protocol::{IpamData, Refusal};
use crate::ports::{Protocol, PublishedPort};

/// `--opt com.docker.network.driver.mtu=N`: the containers' MTU.
pub const MTU: &str = "com.docker.network.driver.mtu";
/// Set by ovl agents on the Docker networks they mirror (as a driver and an
/// IPAM option): the name of the ovl network it is.
pub const MIRROR_OF: &str = "ovl.network";
/// Docker's overlay option for an encrypted network (`--opt encrypted`).
pub const ENCRYPTED: &str = "encrypted";
/// Docker's overlay option naming the VNIs of a network's subnets
/// (`--opt com.docker.network.driver.overlay.vxlanid_list=4200`).
pub const VXLANID_LIST: &str = "com.docker.network.driver.overlay.vxlanid_list";
/// Top-level CreateNetwork options Docker itself sets.
const GENERIC: &str = "com.docker.network.generic";
const ENABLE_IPV6: &str = "com.docker.network.enable_ipv6";
const INTERNAL: &str = "com.docker.network.internal";
/// CreateEndpoint option carrying `-p` port mappings.
const PORT_MAP: &str = "com.docker.network.portmap";
/// Address spaces of Docker's own IPAM: ovl's IPAM uses its own.
const DOCKER_ADDRESS_SPACES: [&str; 2] = ["LocalDefault", "GlobalDefault"];
/// The address space ovl's IPAM serves.
pub const ADDRESS_SPACE: &str = "ovl";

/// Which Docker features ovl maps on networks Docker creates.
pub struct Features {
    pub internal: bool,
    pub encrypted: bool,
    pub custom_gateway: bool,
}

/// What ovl supports now.
pub const FEATURES: Features = Features {
    internal: true,
    encrypted: true,
    custom_gateway: true,
};

/// What a CreateNetwork asks of ovl, once its options are understood.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NetworkOptions {
    /// `com.docker.network.driver.mtu`.
    pub mtu: Option<u32>,
    /// The ovl network a mirror stands for.
    pub mirror_of: Option<String>,
    /// `--internal`: no way out of the overlay.
    pub internal: bool,
    /// `--opt encrypted`: traffic between hosts only in WireGuard.
    pub encrypted: bool,
    /// `--opt com.docker.network.driver.overlay.vxlanid_list=N`: the VNI.
    pub vni: Option<u32>,
}

fn unsupported(what: &str, later: &str) -> Refusal {
    Refusal::new(format!(
        "ovl does not support {what} yet ({later}); create the network without it"
    ))
}

/// Reads CreateNetwork's options and pools, refusing what ovl cannot do.
pub fn network_options(
    options: &BTreeMap<String, Value>,
    ipv4: &[IpamData],
    ipv6: &[IpamData],
) -> Result<NetworkOptions, Refusal> {
    if let Some(first) = ipv4.first()
        && DOCKER_ADDRESS_SPACES.contains(&first.address_space.as_str())
    {
        return Err(Refusal::new(
            "-d ovl needs ovl's IPAM: add --ipam-driver ovl (Docker's default IPAM allocates per host and would hand out the same address on two hosts)",
        ));
    }
    if ipv4.is_empty() {
        return Err(Refusal::new(
            "no IPv4 pool: ovl networks need a --subnet (with --ipam-driver ovl)",
        ));
    }
    if !ipv6.is_empty() || options.get(ENABLE_IPV6).and_then(Value::as_bool) == Some(true) {
        return Err(Refusal::new(
            "ovl networks are IPv4 only: create the network without --ipv6",
        ));
    }
    let internal = options.get(INTERNAL).and_then(Value::as_bool) == Some(true);
    if internal && !FEATURES.internal {
        return Err(unsupported("--internal", "internal networks are coming"));
    }
    let generic: BTreeMap<String, Value> = match options.get(GENERIC) {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(m)) => m.clone().into_iter().collect(),
        Some(other) => {
            return Err(Refusal::malformed(format!(
                "{GENERIC} must be an object of options, not {other}"
            )));
        }
    };
    let mut out = NetworkOptions {
        internal,
        ..NetworkOptions::default()
    };
    for (key, value) in &generic {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match key.as_str() {
            MTU => {
                let mtu = text.parse::<u32>().map_err(|_| {
                    Refusal::new(format!(
                        "--opt {MTU}={text}: the MTU must be a number of bytes, e.g. 1450"
                    ))
                })?;
                out.mtu = Some(mtu);
            }
            MIRROR_OF => out.mirror_of = Some(text),
            VXLANID_LIST => out.vni = Some(vxlan_id(&text)?),
            ENCRYPTED if !FEATURES.encrypted => {
                return Err(unsupported("--opt encrypted", "encryption is coming"));
            }
            ENCRYPTED => match text.as_str() {
                "" | "true" => out.encrypted = true,
                "false" => {}
                _ => {
                    return Err(Refusal::new(format!(
                        "--opt {ENCRYPTED}={text}: give it without a value (or true/false)"
                    )));
                }
            },
            other => {
                return Err(Refusal::new(format!(
                    "unknown option --opt {other}={text}: ovl understands {MTU}, {VXLANID_LIST} and {ENCRYPTED}"
                )));
            }
        }
    }
    Ok(out)
}

/// The one VNI of a `vxlanid_list`. Docker's overlay gives each subnet a
/// VNI of its own; an ovl network is one VNI for all of its subnets.
fn vxlan_id(list: &str) -> Result<u32, Refusal> {
    let ids: Vec<&str> = list.split(',').map(str::trim).collect();
    let [id] = ids[..] else {
        return Err(Refusal::new(format!(
            "--opt {VXLANID_LIST}={list}: an ovl network has one VNI for all of its subnets; give one"
        )));
    };
    id.parse().map_err(|_| {
        Refusal::new(format!(
            "--opt {VXLANID_LIST}={list}: {id:?} is not a VNI (a number from 1 to 16777215)"
        ))
    })
}

/// Reads RequestPool's options (`--ipam-opt`): only the mirror marker.
pub fn pool_options(options: &BTreeMap<String, String>) -> Result<Option<String>, Refusal> {
    let mut mirror_of = None;
    for (key, value) in options {
        match key.as_str() {
            MIRROR_OF => mirror_of = Some(value.clone()),
            other => {
                return Err(Refusal::new(format!(
                    "unknown IPAM option --ipam-opt {other}={value}: ovl's IPAM takes none"
                )));
            }
        }
    }
    Ok(mirror_of)
}

/// Checks a requested gateway against the one ovl serves (for a network
/// that exists already, whose gateway cannot change).
pub fn gateway(requested: Ipv4Addr, served: Ipv4Addr) -> Result<(), Refusal> {
    if requested == served {
        return Ok(());
    }
    if FEATURES.custom_gateway {
        return Err(Refusal::new(format!(
            "--gateway {requested}: the ovl network's gateway is {served}; give that one or none"
        )));
    }
    Err(unsupported(
        &format!("--gateway {requested}"),
        &format!("the gateway is the subnet's first address, {served}"),
    ))
}

/// One of libnetwork's `types.PortBinding`s, as CreateEndpoint's
/// [`PORT_MAP`] carries `-p`: `IP`/`Port` the container's side, `HostIP`/
/// `HostPort`(`..HostPortEnd`) the host's.
#[derive(Debug, Deserialize)]
struct PortBinding {
    #[serde(rename = "Proto")]
    proto: u64,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "HostIP", default)]
    host_ip: String,
    #[serde(rename = "HostPort", default)]
    host_port: u16,
    #[serde(rename = "HostPortEnd", default)]
    host_port_end: u16,
}

/// Reads CreateEndpoint's options: the ports `-p` publishes (exposed ports
/// need nothing: every port of an overlay address is reachable in it).
pub fn endpoint_options(options: &BTreeMap<String, Value>) -> Result<Vec<PublishedPort>, Refusal> {
    let bindings: Vec<PortBinding> = match options.get(PORT_MAP) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            Refusal::malformed(format!("{PORT_MAP} is not a list of port bindings: {e}"))
        })?,
    };
    bindings
        .iter()
        .map(|b| {
            let protocol = Protocol::from_number(b.proto).ok_or_else(|| {
                Refusal::new(format!(
                    "-p ...:{}/{}: ovl publishes tcp and udp ports only",
                    b.port, b.proto
                ))
            })?;
            if b.host_port == 0 {
                return Err(Refusal::new(format!(
                    "-p {}/{protocol} without a host port: ovl publishes only on the host port given; write -p HOSTPORT:{}",
                    b.port, b.port
                )));
            }
            if b.host_port_end != 0 && b.host_port_end != b.host_port {
                return Err(Refusal::new(format!(
                    "-p {}-{}:{}/{protocol}: ovl publishes one host port per container port, not a range",
                    b.host_port, b.host_port_end, b.port
                )));
            }
            if b.port == 0 {
                return Err(Refusal::malformed("a port binding without a container port"));
            }
            let host_ip = match b.host_ip.as_str() {
                "" => None,
                text => Some(text.parse::<Ipv4Addr>().map_err(|_| {
                    Refusal::new(format!(
                        "-p {text}:{}:{}: ovl publishes on IPv4 host addresses only",
                        b.host_port, b.port
                    ))
                })?),
            };
            Ok(PublishedPort {
                protocol,
                host_ip: host_ip.filter(|ip| !ip.is_unspecified()),
                host_port: b.host_port,
                container_port: b.port,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(space: &str) -> IpamData {
        serde_json::from_value(json!({"AddressSpace": space, "Pool": "198.18.0.0/24",
            "Gateway": "198.18.0.1/24"}))
        .unwrap()
    }

    fn opts(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn mtu_and_mirror_marker_are_mapped() {
        let o = opts(json!({"com.docker.network.enable_ipv6": false,
            "com.docker.network.generic": {MTU: "1400", MIRROR_OF: "uber-net"}}));
        let got = network_options(&o, &[pool("ovl")], &[]).unwrap();
        assert_eq!(
            got,
            NetworkOptions {
                mtu: Some(1400),
                mirror_of: Some("uber-net".into()),
                internal: false,
                encrypted: false,
                vni: None,
            }
        );
    }

    #[test]
    fn internal_and_encrypted_are_mapped() {
        let o = opts(json!({INTERNAL: true, GENERIC: {"encrypted": ""}}));
        let got = network_options(&o, &[pool("ovl")], &[]).unwrap();
        assert!(got.internal && got.encrypted);
        let o = opts(json!({GENERIC: {"encrypted": "false"}}));
        let got = network_options(&o, &[pool("ovl")], &[]).unwrap();
        assert!(!got.internal && !got.encrypted);
        let o = opts(json!({GENERIC: {"encrypted": "maybe"}}));
        assert!(network_options(&o, &[pool("ovl")], &[]).is_err());
    }

    #[test]
    fn every_unsupported_option_is_refused_by_name() {
        let cases = [
            (json!({GENERIC: {"foo": "bar"}}), "foo=bar"),
            (json!({GENERIC: {MTU: "big"}}), "MTU must be a number"),
            (json!({ENABLE_IPV6: true, GENERIC: {}}), "--ipv6"),
        ];
        for (o, needle) in cases {
            let e = network_options(&opts(o.clone()), &[pool("ovl")], &[]).unwrap_err();
            assert!(e.message.contains(needle), "{o}: {}", e.message);
        }
        assert!(network_options(&BTreeMap::new(), &[pool("ovl"), pool("ovl")], &[]).is_ok());
        let e = network_options(&BTreeMap::new(), &[pool("LocalDefault")], &[]).unwrap_err();
        assert!(e.message.contains("--ipam-driver ovl"), "{}", e.message);
    }

    #[test]
    fn the_vxlanid_list_names_the_networks_one_vni() {
        let o = opts(json!({GENERIC: {VXLANID_LIST: "4200"}}));
        let got = network_options(&o, &[pool("ovl"), pool("ovl")], &[]).unwrap();
        assert_eq!(got.vni, Some(4200));
        for (list, needle) in [
            ("4200,4201", "one VNI for all of its subnets"),
            ("", "\"\" is not a VNI"),
            ("x42", "\"x42\" is not a VNI"),
        ] {
            let o = opts(json!({GENERIC: {VXLANID_LIST: list}}));
            let e = network_options(&o, &[pool("ovl")], &[]).unwrap_err();
            assert!(e.message.contains(needle), "{list:?}: {}", e.message);
        }
    }

    #[test]
    fn an_existing_networks_gateway_cannot_change() {
        let g = Ipv4Addr::new(198, 18, 0, 1);
        assert!(gateway(g, g).is_ok());
        let e = gateway(Ipv4Addr::new(198, 18, 0, 254), g).unwrap_err();
        assert!(
            e.message.contains("--gateway 198.18.0.254") && e.message.contains("198.18.0.1"),
            "{}",
            e.message
        );
    }

    #[test]
    fn published_ports_are_read_exposed_ones_ignored() {
        let none = endpoint_options(&opts(
            json!({"com.docker.network.endpoint.exposedports": [{"Proto":6,"Port":80}]}),
        ))
        .unwrap();
        assert!(none.is_empty());
        assert!(
            endpoint_options(&opts(json!({PORT_MAP: []})))
                .unwrap()
                .is_empty()
        );
        let got = endpoint_options(&opts(json!({PORT_MAP: [
            {"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080},
            {"Proto":17,"IP":"","Port":53,"HostIP":"192.0.2.10","HostPort":5353,"HostPortEnd":5353}
        ]})))
        .unwrap();
        let want: Vec<PublishedPort> = vec![
            "8080:80/tcp".parse().unwrap(),
            "192.0.2.10:5353:53/udp".parse().unwrap(),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn ports_ovl_cannot_publish_are_refused_saying_why() {
        let cases = [
            (
                json!({"Proto":6,"Port":80,"HostPort":0}),
                "without a host port",
            ),
            (
                json!({"Proto":6,"Port":80,"HostPort":8080,"HostPortEnd":8090}),
                "not a range",
            ),
            (
                json!({"Proto":132,"Port":80,"HostPort":8080}),
                "tcp and udp",
            ),
            (
                json!({"Proto":6,"Port":80,"HostIP":"::","HostPort":8080}),
                "IPv4",
            ),
        ];
        for (binding, needle) in cases {
            let e = endpoint_options(&opts(json!({PORT_MAP: [binding]}))).unwrap_err();
            assert!(e.message.contains(needle), "{binding}: {}", e.message);
        }
    }
}
