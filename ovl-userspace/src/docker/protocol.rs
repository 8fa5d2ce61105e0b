//! libnetwork's remote plugin protocol (NetworkDriver and IpamDriver, as
//! Docker 20.10 speaks it): the JSON bodies of each call, and how answers
//! and refusals are sent — `{"Err": "..."}` with an error status, 404 for
//! methods ovl does not implement.

use std::collections::BTreeMap;

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The content type Docker's plugin client sends and expects.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// Options maps arrive as JSON objects, or `null` when Go's map was nil.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A refusal: the protocol's `{"Err": "..."}`, with an HTTP error status
/// (Docker's plugin client reads `Err` from any non-200 answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    /// The request was understood, but cannot be done.
    pub fn new(message: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }

    /// The request could not be read.
    pub fn malformed(message: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl<E: std::error::Error> From<E> for Refusal {
    fn from(e: E) -> Refusal {
        Refusal::new(e.to_string())
    }
}

#[derive(Serialize)]
struct ErrBody<'a> {
    #[serde(rename = "Err")]
    err: &'a str,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body =
            serde_json::to_vec(&ErrBody { err: &self.message }).expect("an error body serialises");
        (self.status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
    }
}

/// A successful answer with a JSON body.
pub fn reply<T: Serialize>(value: &T) -> Response {
    let body = serde_json::to_vec(value).expect("plugin answers serialise");
    (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// The empty success answer, `{}`.
pub fn ok() -> Response {
    reply(&serde_json::Map::new())
}

/// The 404 Docker reads as "not implemented by this plugin".
pub fn not_implemented(method: &str) -> Response {
    Refusal {
        status: StatusCode::NOT_FOUND,
        message: format!("{method} is not implemented by the ovl plugin"),
    }
    .into_response()
}

/// Reads the body of a call to `method`, refusing malformed JSON with a
/// message that names the method and what is wrong.
pub fn parse<T: DeserializeOwned>(method: &str, body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body)
        .map_err(|e| Refusal::malformed(format!("malformed {method} request: {e}")))
}

// --- Plugin and capabilities -------------------------------------------

/// `Plugin.Activate`.
#[derive(Serialize)]
pub struct Activation {
    #[serde(rename = "Implements")]
    pub implements: [&'static str; 2],
}

/// `NetworkDriver.GetCapabilities`.
#[derive(Serialize)]
pub struct DriverCapabilities {
    #[serde(rename = "Scope")]
    pub scope: &'static str,
    #[serde(rename = "ConnectivityScope")]
    pub connectivity_scope: &'static str,
}

/// `IpamDriver.GetCapabilities`.
#[derive(Serialize)]
pub struct IpamCapabilities {
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    #[serde(rename = "RequiresRequestReplay")]
    pub requires_request_replay: bool,
}

/// `IpamDriver.GetDefaultAddressSpaces`.
#[derive(Serialize)]
pub struct AddressSpaces {
    #[serde(rename = "LocalDefaultAddressSpace")]
    pub local: &'static str,
    #[serde(rename = "GlobalDefaultAddressSpace")]
    pub global: &'static str,
}

// --- IpamDriver ----------------------------------------------------------

/// `IpamDriver.RequestPool`.
#[derive(Debug, Deserialize)]
pub struct RequestPool {
    #[serde(rename = "AddressSpace")]
    pub address_space: String,
    #[serde(rename = "Pool", default)]
    pub pool: String,
    #[serde(rename = "SubPool", default)]
    pub sub_pool: String,
    #[serde(rename = "Options", default, deserialize_with = "nullable")]
    pub options: BTreeMap<String, String>,
    #[serde(rename = "V6", default)]
    pub v6: bool,
}

/// The answer to [`RequestPool`].
#[derive(Serialize)]
pub struct PoolReply {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Pool")]
    pub pool: String,
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

/// `IpamDriver.ReleasePool`.
#[derive(Debug, Deserialize)]
pub struct ReleasePool {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

/// `IpamDriver.RequestAddress`.
#[derive(Debug, Deserialize)]
pub struct RequestAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "Options", default, deserialize_with = "nullable")]
    pub options: BTreeMap<String, String>,
}

/// The answer to [`RequestAddress`]: the address in CIDR form.
#[derive(Serialize)]
pub struct AddressReply {
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

/// `IpamDriver.ReleaseAddress`.
#[derive(Debug, Deserialize)]
pub struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address")]
    pub address: String,
}

/// `RequestAddress` options key saying what the address is for.
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
/// ... and its value for a network's gateway.
pub const GATEWAY_ADDRESS: &str = "com.docker.network.gateway";

// --- NetworkDriver -------------------------------------------------------

/// One address pool of a network, as the IPAM driver gave it.
#[derive(Debug, Deserialize)]
pub struct IpamData {
    #[serde(rename = "AddressSpace", default)]
    pub address_space: String,
    #[serde(rename = "Pool", default)]
    pub pool: String,
    #[serde(rename = "Gateway", default)]
    pub gateway: String,
    #[serde(rename = "AuxAddresses", default, deserialize_with = "nullable")]
    pub aux_addresses: BTreeMap<String, String>,
}

/// `NetworkDriver.CreateNetwork`.
#[derive(Debug, Deserialize)]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "Options", default, deserialize_with = "nullable")]
    pub options: BTreeMap<String, Value>,
    #[serde(rename = "IPv4Data", default, deserialize_with = "nullable")]
    pub ipv4_data: Vec<IpamData>,
    #[serde(rename = "IPv6Data", default, deserialize_with = "nullable")]
    pub ipv6_data: Vec<IpamData>,
}

/// `NetworkDriver.DeleteNetwork`.
#[derive(Debug, Deserialize)]
pub struct DeleteNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

/// An endpoint's interface, as Docker's IPAM filled it.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct EndpointInterface {
    #[serde(rename = "Address", default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(
        rename = "AddressIPv6",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub address_ipv6: String,
    #[serde(
        rename = "MacAddress",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub mac_address: String,
}

/// `NetworkDriver.CreateEndpoint`.
#[derive(Debug, Deserialize)]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "Interface", default, deserialize_with = "nullable")]
    pub interface: EndpointInterface,
    #[serde(rename = "Options", default, deserialize_with = "nullable")]
    pub options: BTreeMap<String, Value>,
}

/// The answer to [`CreateEndpoint`].
#[derive(Serialize)]
pub struct EndpointReply {
    #[serde(rename = "Interface", skip_serializing_if = "Option::is_none")]
    pub interface: Option<EndpointInterface>,
}

/// `DeleteEndpoint`, `Leave`, `EndpointOperInfo` and the external
/// connectivity calls: a network and an endpoint.
#[derive(Debug, Deserialize)]
pub struct EndpointRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

/// The answer to `EndpointOperInfo`.
#[derive(Serialize)]
pub struct OperInfo {
    #[serde(rename = "Value")]
    pub value: BTreeMap<String, Value>,
}

/// `NetworkDriver.Join`.
#[derive(Debug, Deserialize)]
pub struct Join {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "SandboxKey")]
    pub sandbox_key: String,
}

/// The interface Docker moves into the container: `SrcName` in the host
/// namespace, renamed `DstPrefix` + index.
#[derive(Debug, Serialize)]
pub struct InterfaceName {
    #[serde(rename = "SrcName")]
    pub src_name: String,
    #[serde(rename = "DstPrefix")]
    pub dst_prefix: &'static str,
}

/// The answer to [`Join`].
#[derive(Debug, Serialize)]
pub struct JoinReply {
    #[serde(rename = "InterfaceName")]
    pub interface_name: InterfaceName,
    /// Without it Docker gives the container a second leg on its own
    /// gateway bridge.
    #[serde(rename = "DisableGatewayService")]
    pub disable_gateway_service: bool,
    /// The container's default gateway (the ovl network's gateway of its
    /// subnet), unless the network is internal.
    #[serde(rename = "Gateway", skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Routes through the gateway besides the default one: the other
    /// subnets of an internal network.
    #[serde(rename = "StaticRoutes", skip_serializing_if = "Vec::is_empty")]
    pub static_routes: Vec<StaticRoute>,
}

/// A route Docker adds in the container (libnetwork's `StaticRoute`).
#[derive(Debug, Serialize)]
pub struct StaticRoute {
    #[serde(rename = "Destination")]
    pub destination: String,
    /// libnetwork's `types.NEXTHOP`: through `next_hop`.
    #[serde(rename = "RouteType")]
    pub route_type: u8,
    #[serde(rename = "NextHop")]
    pub next_hop: String,
}

/// libnetwork's route type of a route through a next hop.
pub const ROUTE_NEXTHOP: u8 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_network_as_docker_20_10_sends_it() {
        let body = br#"{"NetworkID":"5d1f","Options":{"com.docker.network.enable_ipv6":false,
            "com.docker.network.generic":{"com.docker.network.driver.mtu":"1400"}},
            "IPv4Data":[{"AddressSpace":"ovl","Gateway":"198.18.0.1/24","Pool":"198.18.0.0/24"}],
            "IPv6Data":null}"#;
        let r: CreateNetwork = parse("NetworkDriver.CreateNetwork", body).unwrap();
        assert_eq!(r.network_id, "5d1f");
        assert_eq!(r.ipv4_data[0].gateway, "198.18.0.1/24");
        assert!(r.ipv6_data.is_empty());
        assert!(r.ipv4_data[0].aux_addresses.is_empty());
    }

    #[test]
    fn malformed_bodies_are_refused_naming_the_method_and_the_fault() {
        let e = parse::<Join>("NetworkDriver.Join", b"{\"NetworkID\": 1").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message
                .starts_with("malformed NetworkDriver.Join request"),
            "{}",
            e.message
        );
        let e = parse::<Join>("NetworkDriver.Join", br#"{"NetworkID":"n"}"#).unwrap_err();
        assert!(e.message.contains("EndpointID"), "{}", e.message);
    }

    #[test]
    fn answers_use_docker_field_names() {
        let join = JoinReply {
            interface_name: InterfaceName {
                src_name: "ovl1234abcdc".into(),
                dst_prefix: "eth",
            },
            disable_gateway_service: true,
            gateway: Some("198.18.0.1".into()),
            static_routes: vec![StaticRoute {
                destination: "198.18.1.0/24".into(),
                route_type: ROUTE_NEXTHOP,
                next_hop: "198.18.0.1".into(),
            }],
        };
        assert_eq!(
            serde_json::to_string(&join).unwrap(),
            r#"{"InterfaceName":{"SrcName":"ovl1234abcdc","DstPrefix":"eth"},"DisableGatewayService":true,"Gateway":"198.18.0.1","StaticRoutes":[{"Destination":"198.18.1.0/24","RouteType":0,"NextHop":"198.18.0.1"}]}"#
        );
        let ep = EndpointReply {
            interface: Some(EndpointInterface {
                mac_address: "02:42:c6:12:00:02".into(),
                ..Default::default()
            }),
        };
        assert_eq!(
            serde_json::to_string(&ep).unwrap(),
            r#"{"Interface":{"MacAddress":"02:42:c6:12:00:02"}}"#
        );
    }
}
