//! The agent's local API: HTTP/JSON on a Unix socket (default
//! `/run/ovl/<node>.sock`, mode 0600) — health and counters, and whether a
//! local endpoint forwards yet — plus the client the CLI uses to ask it.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/health` | [`Health`] |
//! | `GET /v1/stats[?network=NAME]` | `[NetworkStats]`, as `ovl stats --json` |
//! | `GET /v1/stats/underlay` | [`UnderlayStats`], as `ovl stats --underlay --json` |
//! | `GET /v1/endpoints/ready?network=NAME&ip=IP[&timeout_ms=N]` | `{"ready": bool}`: in the maps and hooked, waiting up to N ms (≤ 10 s) |
//! | `GET /v1/crypto` | [`CryptoReport`]: WireGuard identity, peers and counters, as `ovl stats --crypto --json` |
//! | `POST /v1/crypto/rotate` | [`Rotated`]: a new node key, as `ovl node rotate-key` |

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::Ipv4Addr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use axum::{
    Json, Router,
    extract::{Query, State, rejection::QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::net::{UnixListener, UnixStream};

use crate::{
    agent::view::View,
    crypto::{NodeCrypto, stats::CryptoReport},
    datapath,
    http_server::{self, Bounds, OverLimit},
    metrics::{NetworkStats, UnderlayStats},
};

/// Directory of the default API sockets.
pub const DEFAULT_SOCKET_DIR: &str = "/run/ovl";
/// Longest wait a ready query may ask for.
const MAX_READY_WAIT: Duration = Duration::from_secs(10);
/// How long a client gives the agent to answer, beyond the wait it asked
/// for: a stopped (SIGSTOP) or hung agent's socket still accepts
/// connections, and a CNI plugin or `ovl connect` must not wait forever.
const ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// The default API socket of `node`.
pub fn default_socket(node: &str) -> PathBuf {
    Path::new(DEFAULT_SOCKET_DIR).join(format!("{node}.sock"))
}

/// The agent's health, as `GET /v1/health` and `ovl status` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub node: String,
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub iface: String,
    pub vtep: Ipv4Addr,
    /// Decap mode in use.
    pub mode: String,
    /// Why the underlay carries nothing now (gone, unreadable, not
    /// hooked); absent while it is hooked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_problem: Option<String>,
    pub pin_dir: PathBuf,
    pub store: StoreHealth,
    pub networks: usize,
    pub local_endpoints: u64,
    pub remote_endpoints: u64,
}

/// The store as the agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreHealth {
    pub url: String,
    pub reachable: bool,
    /// Seconds since the agent last knew its view of the store current.
    pub last_sync_age_seconds: Option<f64>,
    /// Store revision applied to the maps.
    pub revision: u64,
}

/// What the agent's API serves from.
#[derive(Clone)]
pub struct AgentApi {
    view: Arc<View>,
}

impl AgentApi {
    /// The API of the agent whose view is `view`.
    pub fn new(view: Arc<View>) -> AgentApi {
        AgentApi { view }
    }

    fn router(self) -> Router {
        Router::new()
            .route("/v1/health", get(health))
            .route("/v1/stats", get(stats))
            .route("/v1/stats/underlay", get(underlay))
            .route("/v1/endpoints/ready", get(ready))
            .route("/v1/crypto", get(crypto_report))
            .route("/v1/crypto/rotate", post(crypto_rotate))
            .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
            .method_not_allowed_fallback(|method: axum::http::Method| async move {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!(
                        "{method} is not served here: POST /v1/crypto/rotate, GET every other route"
                    ),
                )
            })
            .with_state(self)
    }
}

/// An error answer: `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
        }
        (
            self.status,
            Json(Body {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// A query string that does not fit the route: 400 with what was wrong.
fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

/// The health report of the agent behind `view`.
pub fn health_of(view: &View) -> Health {
    let live = view.live();
    let id = &view.identity;
    Health {
        node: id.node.clone(),
        version: id.version.clone(),
        pid: id.pid,
        uptime_seconds: view.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        iface: id.iface.clone(),
        vtep: live.vtep.unwrap_or(id.vtep),
        mode: live.mode.clone(),
        underlay_problem: live.underlay_problem.clone(),
        pin_dir: id.pin_dir.clone(),
        store: StoreHealth {
            url: id.store.clone(),
            reachable: live.store_reachable,
            last_sync_age_seconds: view.sync_age(),
            revision: live.revision,
        },
        networks: live.networks.len(),
        local_endpoints: live.networks.values().map(|n| n.local_endpoints).sum(),
        remote_endpoints: live.networks.values().map(|n| n.remote_endpoints).sum(),
    }
}

async fn health(State(api): State<AgentApi>) -> Json<Health> {
    Json(health_of(&api.view))
}

#[derive(Deserialize)]
struct StatsQuery {
    network: Option<String>,
}

/// Counter rows of every network the agent knows (`served_only`: of those
/// with counters on this node, i.e. an endpoint here), by name.
pub fn network_rows(
    view: &View,
    network: Option<&str>,
    served_only: bool,
) -> Result<Vec<NetworkStats>, ApiError> {
    let live = view.live();
    if let Some(want) = network
        && !live.networks.values().any(|n| n.name == want)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no network named {want:?} on this node; list networks with `ovl network ls`"),
        ));
    }
    let counters = datapath::read_counters(&view.identity.pin_dir)?;
    let mut rows: Vec<NetworkStats> = live
        .networks
        .values()
        .filter(|n| network.is_none_or(|want| want == n.name))
        .filter(|n| !served_only || counters.contains_key(&n.vni))
        .map(|n| {
            let c = counters.get(&n.vni).copied().unwrap_or_default();
            NetworkStats {
                dns: view.dns.of(&n.name),
                ..NetworkStats::new(&n.name, n.vni, &c)
            }
        })
        .collect();
    rows.sort_by(|a, b| a.network.cmp(&b.network));
    Ok(rows)
}

async fn stats(
    State(api): State<AgentApi>,
    q: Result<Query<StatsQuery>, QueryRejection>,
) -> Result<Json<Vec<NetworkStats>>, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    Ok(Json(network_rows(&api.view, q.network.as_deref(), false)?))
}

/// The node-wide counters of the agent behind `view`.
pub fn underlay_of(view: &View) -> Result<UnderlayStats> {
    let pin_dir = &view.identity.pin_dir;
    let counters = datapath::read_counters(pin_dir)?;
    let global = datapath::read_global(pin_dir)?;
    let orphan = counters
        .get(&ovl_common::counters::UNATTRIBUTED_VNI)
        .copied()
        .unwrap_or_default();
    Ok(UnderlayStats::new(&global, &orphan))
}

async fn underlay(State(api): State<AgentApi>) -> Result<Json<UnderlayStats>, ApiError> {
    Ok(Json(underlay_of(&api.view)?))
}

fn crypto_of(api: &AgentApi) -> Result<Arc<NodeCrypto>, ApiError> {
    api.view.crypto().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this agent has no WireGuard key (see its log for why); encrypted networks drop their packets (no_key) on this node",
        )
    })
}

async fn crypto_report(State(api): State<AgentApi>) -> Result<Json<CryptoReport>, ApiError> {
    Ok(Json(crypto_of(&api)?.report()))
}

/// The answer to a key rotation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rotated {
    /// The node's new public key.
    pub public_key: String,
}

async fn crypto_rotate(State(api): State<AgentApi>) -> Result<Json<Rotated>, ApiError> {
    let crypto = crypto_of(&api)?;
    let key = tokio::task::spawn_blocking(move || crypto.rotate())
        .await
        .map_err(|e| anyhow::anyhow!("rotation task: {e}"))??;
    Ok(Json(Rotated {
        public_key: key.to_string(),
    }))
}

/// Least time between two kicks of one readiness wait.
const KICK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
struct ReadyQuery {
    network: String,
    ip: Ipv4Addr,
    timeout_ms: Option<u64>,
}

/// Whether an endpoint forwards, as `GET /v1/endpoints/ready` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    pub ready: bool,
}

async fn ready(
    State(api): State<AgentApi>,
    q: Result<Query<ReadyQuery>, QueryRejection>,
) -> Result<Json<Ready>, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(0)).min(MAX_READY_WAIT);
    let deadline = tokio::time::Instant::now() + timeout;
    // The network may be new to the agent: look it up again after a kick.
    // A kick makes the agent read the whole store: at most one a second
    // (a misspelled network must not keep it reading for the whole wait).
    let mut next_kick = tokio::time::Instant::now();
    let vni = loop {
        let live = api.view.live();
        if let Some(n) = live.networks.values().find(|n| n.name == q.network) {
            break Some(n.vni);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break None;
        }
        if now >= next_kick {
            api.view.kick();
            next_kick = now + KICK_INTERVAL;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let Some(vni) = vni else {
        return Ok(Json(Ready { ready: false }));
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    Ok(Json(Ready {
        ready: api.view.wait_ready(vni, q.ip, left).await,
    }))
}

/// Binds the API socket at `path`, mode 0600. A socket file left by a
/// killed agent (nobody answers on it) is replaced; a live one or any
/// other file there is refused, naming what to do.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create the API socket directory {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => bail!(
                    "another ovl agent answers on {}; stop it first, or give this one another --api-socket",
                    path.display()
                ),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    log::info!("replacing the stale API socket {}", path.display());
                    std::fs::remove_file(path)
                        .with_context(|| format!("remove the stale socket {}", path.display()))?;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("check the existing API socket {}", path.display())
                    });
                }
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; move it away or pass another --api-socket",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspect {}", path.display())),
    }
    // Made in a directory only this user may enter, restricted there, then
    // moved into place: under its name the socket never has a looser mode
    // (whatever the umask), and no symlink swapped in between bind and
    // chmod can turn the chmod onto another file.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} names no socket file", path.display()))?;
    let staging = dir.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // Left by a killed start of this same pid (a reused pid): ours to go.
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .with_context(|| format!("create {}", staging.display()))?;
    let tmp = staging.join("socket");
    let bound = (|| {
        let listener = UnixListener::bind(&tmp)
            .with_context(|| format!("listen on the API socket {}", path.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restrict {} to its owner", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("move the API socket into place at {}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    bound
}

/// Serves `api` on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, api: AgentApi) {
    serve_router(listener, api.router(), "API server").await
}

/// What a client of a local socket (ovl's commands, the CNI plugin,
/// Docker) may hold: connections beyond the limit wait in the backlog for
/// one to end, and one that sends no request (or stops half-way through
/// its headers) for 30 s, hyper's default, is closed.
const LOCAL_BOUNDS: Bounds = Bounds {
    max_connections: 128,
    over_limit: OverLimit::Queue,
    header_timeout: Duration::from_secs(30),
    lifetime: Duration::from_secs(300),
};

/// Serves `router` on a Unix `listener` until the task is dropped, within
/// [`LOCAL_BOUNDS`]; errors of single connections are the peer's and only
/// logged.
pub async fn serve_router(listener: UnixListener, router: Router, what: &'static str) {
    http_server::serve(listener, router, LOCAL_BOUNDS, what).await
}

/// A client of an agent's API socket.
pub struct Client {
    socket: PathBuf,
}

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent listens on the socket (no file, or a stale one).
    #[error("no ovl agent answers on {0}")]
    NoAgent(PathBuf),
    #[error("ask the agent on {socket}: {detail}")]
    Failed { socket: PathBuf, detail: String },
    /// Something accepted the connection but did not answer in time.
    #[error(
        "the ovl agent on {} accepted the connection but did not answer within {waited:?}: it is stopped, hung or overloaded; see its log",
        .socket.display()
    )]
    Unresponsive { socket: PathBuf, waited: Duration },
    /// The agent answered with an error.
    #[error("{0}")]
    Refused(String),
}

impl Client {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_owned(),
        }
    }

    /// `GET path_and_query`, decoded from JSON; [`ClientError::Unresponsive`]
    /// unless answered within a few seconds.
    pub async fn get<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, ClientError> {
        self.get_waiting(path_and_query, Duration::ZERO).await
    }

    /// `GET path_and_query` of a request that asks the agent to wait up to
    /// `wait` before answering (`timeout_ms`): given that much more time.
    pub async fn get_waiting<T: DeserializeOwned>(
        &self,
        path_and_query: &str,
        wait: Duration,
    ) -> Result<T, ClientError> {
        self.send(hyper::Method::GET, path_and_query, wait).await
    }

    /// `POST path_and_query` without a body, the answer decoded from JSON;
    /// [`ClientError::Unresponsive`] unless answered within a few seconds.
    pub async fn post<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, ClientError> {
        self.send(hyper::Method::POST, path_and_query, Duration::ZERO)
            .await
    }

    /// One exchange, connecting to reading the whole body, bounded by the
    /// agent's wait (as it caps it) plus [`ANSWER_MARGIN`].
    async fn send<T: DeserializeOwned>(
        &self,
        method: hyper::Method,
        path_and_query: &str,
        wait: Duration,
    ) -> Result<T, ClientError> {
        let waited = wait.min(MAX_READY_WAIT) + ANSWER_MARGIN;
        tokio::time::timeout(waited, self.exchange(method, path_and_query))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Unresponsive {
                    socket: self.socket.clone(),
                    waited,
                })
            })
    }

    async fn exchange<T: DeserializeOwned>(
        &self,
        method: hyper::Method,
        path_and_query: &str,
    ) -> Result<T, ClientError> {
        use http_body_util::{BodyExt, Empty};
        use hyper::{Request, body::Bytes};

        let fail = |detail: String| ClientError::Failed {
            socket: self.socket.clone(),
            detail,
        };
        let stream = match UnixStream::connect(&self.socket).await {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                return Err(ClientError::NoAgent(self.socket.clone()));
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| fail(e.to_string()))?;
        // Ends with the exchange, also when it is abandoned mid-way.
        let _conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, "ovl")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let msg = serde_json::from_slice::<BTreeMap<String, String>>(&body)
                .ok()
                .and_then(|m| m.get("error").cloned())
                .unwrap_or_else(|| format!("HTTP {status}"));
            return Err(ClientError::Refused(msg));
        }
        serde_json::from_slice(&body).map_err(|e| fail(format!("bad answer: {e}")))
    }
}

/// A task that does not outlive its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A socket whose owner accepts every connection (as the kernel does
    /// for a stopped agent) and then holds it: after reading the request,
    /// it writes `answer` (possibly nothing) and never more.
    fn stalled_agent(tag: &str, answer: &'static [u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ovl-api-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind a socket in the temp dir");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let _ = s.read(&mut request).await;
                let _ = s.write_all(answer).await;
                held.push(s);
            }
        });
        path
    }

    #[tokio::test]
    async fn the_socket_appears_only_private_and_leaves_nothing_beside_it() {
        let dir = crate::testutil::TestDir::new("api-bind");
        std::fs::create_dir_all(dir.path()).unwrap();
        let path = dir.path().join("agent.sock");
        let listener = bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let beside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, vec![std::ffi::OsString::from("agent.sock")]);
        // It answers under its final name.
        let (accepted, connected) =
            tokio::join!(listener.accept(), tokio::net::UnixStream::connect(&path));
        accepted.unwrap();
        connected.unwrap();
    }

    #[tokio::test]
    async fn waiting_for_an_unknown_network_kicks_the_agent_once_a_second() {
        let (view, mut kicks) = View::unattached();
        let counted = tokio::spawn(async move {
            let mut n = 0;
            while kicks.recv().await.is_some() {
                n += 1;
            }
            n
        });
        let q = ReadyQuery {
            network: "nope".into(),
            ip: Ipv4Addr::new(198, 18, 0, 2),
            timeout_ms: Some(1500),
        };
        let Json(r) = ready(State(AgentApi::new(view)), Ok(Query(q)))
            .await
            .expect("an unknown network is no error");
        assert!(!r.ready);
        // The view (and its sender) went with the handler.
        let n = counted.await.unwrap();
        assert_eq!(n, 2, "kicks in 1.5 s");
    }

    #[tokio::test]
    async fn an_agent_that_accepts_and_never_answers_is_reported_not_waited_for() {
        let silent = stalled_agent("silent", b"");
        let half = stalled_agent(
            "half",
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"node\"",
        );
        let (to_silent, to_half) = (Client::new(&silent), Client::new(&half));
        let (health, body, ready) = tokio::join!(
            to_silent.get::<Health>("/v1/health"),
            to_half.get::<Health>("/v1/health"),
            crate::attachment::wait_forwarding(
                &silent,
                "uber-net",
                Ipv4Addr::new(198, 18, 0, 2),
                Duration::from_millis(10),
            ),
        );
        for (what, answer) in [("no answer", health), ("half a body", body)] {
            let e = answer.expect_err(what).to_string();
            assert!(
                e.contains("did not answer within") && e.contains("ovl-api-"),
                "{what}: {e}"
            );
        }
        // The readiness question: not forwarding yet, as for a slow agent.
        assert_eq!(
            ready.expect("an unresponsive agent is no error"),
            crate::attachment::Readiness::NotYet
        );
        let _ = std::fs::remove_file(silent);
        let _ = std::fs::remove_file(half);
    }
}
