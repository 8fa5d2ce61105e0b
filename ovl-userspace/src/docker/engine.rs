//! The part of Docker's Engine API the agent uses, over dockerd's Unix
//! socket: list, inspect, create and remove networks (the Docker side of
//! mirroring ovl networks, and what Docker still has when reconciling),
//! and inspect containers (their names and network aliases).

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

/// API version every request names: Docker 20.10's, which later daemons
/// still serve.
const API_VERSION: &str = "v1.41";
/// Bound on one request, so a hung dockerd delays a reconcile pass, never
/// stops it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why dockerd could not be asked, or refused.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unsupported Docker host {0:?}: use unix:///PATH (e.g. unix:///var/run/docker.sock)")]
    UnsupportedUrl(String),
    #[error("dockerd does not answer on {socket}: {detail}")]
    Unreachable { socket: PathBuf, detail: String },
    #[error("dockerd on {socket} refused {what}: {message}")]
    Refused {
        socket: PathBuf,
        what: String,
        message: String,
    },
}

/// A Docker network as the Engine API describes it.
#[derive(Clone, Debug, Deserialize)]
pub struct DockerNetwork {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Driver")]
    pub driver: String,
    #[serde(rename = "IPAM", default)]
    pub ipam: DockerIpam,
    /// Endpoints by container ID (`ep-<endpoint ID>` for endpoints in no
    /// container); filled by [`Engine::network`] only.
    #[serde(rename = "Containers", default)]
    pub containers: Option<BTreeMap<String, DockerEndpoint>>,
    #[serde(rename = "Options", default)]
    pub options: Option<BTreeMap<String, String>>,
}

impl DockerNetwork {
    /// The subnet of its first IPAM configuration, as Docker shows it.
    pub fn subnet(&self) -> Option<&str> {
        self.ipam
            .config
            .as_ref()
            .and_then(|c| c.first())
            .map(|c| c.subnet.as_str())
    }
}

/// A network's IPAM settings.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DockerIpam {
    #[serde(rename = "Driver", default)]
    pub driver: String,
    #[serde(rename = "Config", default)]
    pub config: Option<Vec<DockerIpamConfig>>,
}

/// One IPAM configuration (`--subnet`, `--gateway`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DockerIpamConfig {
    #[serde(rename = "Subnet", default)]
    pub subnet: String,
}

/// A network's endpoint as `docker network inspect` lists it.
#[derive(Clone, Debug, Deserialize)]
pub struct DockerEndpoint {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
    #[serde(rename = "IPv4Address", default)]
    pub ipv4_address: String,
}

/// A container as `GET /containers/ID/json` describes it (the parts ovl
/// reads).
#[derive(Clone, Debug, Deserialize)]
pub struct DockerContainer {
    #[serde(rename = "Id", default)]
    pub id: String,
    /// As Docker keeps it, with a leading `/` (see [`Self::name`]).
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "NetworkSettings", default)]
    pub network_settings: Option<ContainerNetworkSettings>,
}

impl DockerContainer {
    /// The name `docker ps` shows (`web`).
    pub fn name(&self) -> &str {
        self.name.trim_start_matches('/')
    }

    /// The container's settings on the network its endpoint `endpoint_id`
    /// is on, if it is still there.
    pub fn endpoint(&self, endpoint_id: &str) -> Option<&ContainerEndpoint> {
        self.network_settings
            .as_ref()?
            .networks
            .as_ref()?
            .values()
            .find(|e| e.endpoint_id == endpoint_id)
    }
}

/// A container's `NetworkSettings`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ContainerNetworkSettings {
    /// By network name.
    #[serde(rename = "Networks", default)]
    pub networks: Option<BTreeMap<String, ContainerEndpoint>>,
}

/// A container's settings on one network.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ContainerEndpoint {
    /// `--network-alias`es (Docker adds the short container ID on
    /// user-defined networks); `null` when none.
    #[serde(rename = "Aliases", default)]
    pub aliases: Option<Vec<String>>,
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
}

/// What `POST /networks/create` takes.
#[derive(Debug, Serialize)]
pub struct NetworkCreate<'a> {
    #[serde(rename = "Name")]
    pub name: &'a str,
    #[serde(rename = "CheckDuplicate")]
    pub check_duplicate: bool,
    #[serde(rename = "Driver")]
    pub driver: &'a str,
    #[serde(rename = "IPAM")]
    pub ipam: IpamCreate<'a>,
    #[serde(rename = "Internal")]
    pub internal: bool,
    #[serde(rename = "Options")]
    pub options: BTreeMap<&'a str, String>,
}

/// The IPAM part of [`NetworkCreate`].
#[derive(Debug, Serialize)]
pub struct IpamCreate<'a> {
    #[serde(rename = "Driver")]
    pub driver: &'a str,
    #[serde(rename = "Config")]
    pub config: Vec<BTreeMap<&'a str, String>>,
    #[serde(rename = "Options")]
    pub options: BTreeMap<&'a str, String>,
}

#[derive(Deserialize)]
struct Created {
    #[serde(rename = "Id")]
    id: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

/// A client of one dockerd's Engine API socket.
#[derive(Clone, Debug)]
pub struct Engine {
    socket: PathBuf,
}

impl Engine {
    /// The dockerd listening at `url` (`unix:///PATH`).
    pub fn from_url(url: &str) -> Result<Engine, EngineError> {
        match url.strip_prefix("unix://") {
            Some(path) if path.starts_with('/') => Ok(Engine {
                socket: PathBuf::from(path),
            }),
            _ => Err(EngineError::UnsupportedUrl(url.to_owned())),
        }
    }

    /// The socket it talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every Docker network (without endpoints).
    pub async fn networks(&self) -> Result<Vec<DockerNetwork>, EngineError> {
        let (_, body) = self
            .call(Method::GET, "/networks", None, "list networks")
            .await?;
        self.decode(&body, "list networks")
    }

    /// The network with ID (or name) `id`, with its endpoints; `None` if
    /// Docker has no such network.
    pub async fn network(&self, id: &str) -> Result<Option<DockerNetwork>, EngineError> {
        let what = format!("inspect network {id}");
        match self
            .call(Method::GET, &format!("/networks/{id}"), None, &what)
            .await
        {
            Ok((_, body)) => Ok(Some(self.decode(&body, &what)?)),
            Err(EngineError::Refused { message, .. }) if message.starts_with("404") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The container with ID (or name) `id`; `None` if Docker has no such
    /// container. Docker answers only once a container being started or
    /// connected is done (the request waits on the container's lock):
    /// never ask from inside a call Docker makes while starting it (Join).
    pub async fn container(&self, id: &str) -> Result<Option<DockerContainer>, EngineError> {
        let what = format!("inspect container {id}");
        match self
            .call(Method::GET, &format!("/containers/{id}/json"), None, &what)
            .await
        {
            Ok((_, body)) => Ok(Some(self.decode(&body, &what)?)),
            Err(EngineError::Refused { message, .. }) if message.starts_with("404") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a network; returns its ID.
    pub async fn create_network(&self, spec: &NetworkCreate<'_>) -> Result<String, EngineError> {
        let what = format!("create network {}", spec.name);
        let body = serde_json::to_vec(spec).expect("network spec serialises");
        let (_, body) = self
            .call(Method::POST, "/networks/create", Some(body), &what)
            .await?;
        Ok(self.decode::<Created>(&body, &what)?.id)
    }

    /// Removes network `id`; a network already gone is not an error.
    pub async fn remove_network(&self, id: &str) -> Result<(), EngineError> {
        let what = format!("remove network {id}");
        match self
            .call(Method::DELETE, &format!("/networks/{id}"), None, &what)
            .await
        {
            Ok(_) => Ok(()),
            Err(EngineError::Refused { message, .. }) if message.starts_with("404") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn decode<T: DeserializeOwned>(&self, body: &[u8], what: &str) -> Result<T, EngineError> {
        serde_json::from_slice(body).map_err(|e| EngineError::Refused {
            socket: self.socket.clone(),
            what: what.to_owned(),
            message: format!("unreadable answer: {e}"),
        })
    }

    /// One request; a non-2xx answer is [`EngineError::Refused`] with the
    /// status and Docker's message (`"404 Not Found: network x not found"`).
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<(StatusCode, Bytes), EngineError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, body, what)).await {
            Ok(r) => r,
            Err(_) => {
                Err(self.unreachable(format!("{what}: no answer within {REQUEST_TIMEOUT:?}")))
            }
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<(StatusCode, Bytes), EngineError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            self.unreachable(match e.kind() {
                ErrorKind::NotFound => "no socket there (is dockerd running?)".to_owned(),
                _ => e.to_string(),
            })
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| self.unreachable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("/{API_VERSION}{path}"))
            .header(hyper::header::HOST, "docker");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_owned());
            return Err(EngineError::Refused {
                socket: self.socket.clone(),
                what: what.to_owned(),
                message: format!("{status}: {message}"),
            });
        }
        Ok((status, bytes))
    }

    fn unreachable(&self, detail: String) -> EngineError {
        EngineError::Unreachable {
            socket: self.socket.clone(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unix_urls_are_taken() {
        assert_eq!(
            Engine::from_url("unix:///var/run/docker.sock")
                .unwrap()
                .socket(),
            Path::new("/var/run/docker.sock")
        );
        for bad in ["tcp://127.0.0.1:2375", "/var/run/docker.sock", "unix://rel"] {
            let e = Engine::from_url(bad).unwrap_err().to_string();
            assert!(e.contains("unix:///"), "{e}");
        }
    }

    #[test]
    fn inspect_output_of_docker_20_10_parses() {
        let json = r#"{"Name":"uber-net","Id":"5d1f","Created":"2026-12-02T10:00:00Z",
            "Scope":"local","Driver":"ovl","EnableIPv6":false,
            "IPAM":{"Driver":"ovl","Options":null,"Config":[{"Subnet":"198.18.0.0/24","Gateway":"198.18.0.1"}]},
            "Internal":false,"Attachable":false,"Ingress":false,"ConfigFrom":{"Network":""},"ConfigOnly":false,
            "Containers":{"ab12":{"Name":"c1","EndpointID":"e1","MacAddress":"02:42:c6:12:00:02",
            "IPv4Address":"198.18.0.2/24","IPv6Address":""}},"Options":{"com.docker.network.driver.mtu":"1450"},"Labels":{}}"#;
        let n: DockerNetwork = serde_json::from_str(json).unwrap();
        assert_eq!(n.subnet(), Some("198.18.0.0/24"));
        let eps = n.containers.unwrap();
        assert_eq!(eps["ab12"].endpoint_id, "e1");
        assert_eq!(eps["ab12"].ipv4_address, "198.18.0.2/24");
        let list = r#"[{"Name":"none","Id":"1","Driver":"null","IPAM":{"Driver":"default","Options":null,"Config":[]},"Containers":{},"Options":{}}]"#;
        let l: Vec<DockerNetwork> = serde_json::from_str(list).unwrap();
        assert_eq!(l[0].subnet(), None);
    }

    #[test]
    fn container_inspect_of_docker_20_10_parses() {
        let json = r#"{"Id":"9c1d2e3f4a5b6c7d","Created":"2026-12-03T10:00:00Z","Path":"sleep",
            "State":{"Status":"running","Running":true,"Pid":4242},"Name":"/web",
            "HostConfig":{"Dns":["127.0.0.12"]},
            "NetworkSettings":{"Bridge":"","SandboxID":"5e6f","SandboxKey":"/run/docker/netns/5e6f",
            "Networks":{"uber-net":{"IPAMConfig":null,"Links":null,"Aliases":["www","9c1d2e3f4a5b"],
            "NetworkID":"5d1f","EndpointID":"e1","Gateway":"","IPAddress":"198.18.0.3","IPPrefixLen":24,
            "MacAddress":"02:42:c6:12:00:03","DriverOpts":null},
            "other":{"Aliases":null,"NetworkID":"77","EndpointID":"e2"}}}}"#;
        let c: DockerContainer = serde_json::from_str(json).unwrap();
        assert_eq!(c.name(), "web");
        let on = c.endpoint("e1").unwrap();
        assert_eq!(
            on.aliases.as_deref(),
            Some(&["www".to_owned(), "9c1d2e3f4a5b".to_owned()][..])
        );
        assert_eq!(c.endpoint("e2").unwrap().aliases, None);
        assert!(c.endpoint("e3").is_none());
        let bare: DockerContainer =
            serde_json::from_str(r#"{"Id":"1","Name":"/x","NetworkSettings":{"Networks":null}}"#)
                .unwrap();
        assert!(bare.endpoint("e1").is_none());
    }
}
