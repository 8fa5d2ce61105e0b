//! ovl as a Docker network driver and IPAM driver: libnetwork's remote
//! plugin protocol on a Unix socket served by the node agent, and the
//! agent's duties towards its dockerd (mirroring ovl networks, naming the
//! networks Docker creates, releasing what Docker no longer has).
//!
//! How Docker's objects map to ovl's:
//!
//! | Docker | ovl |
//! |---|---|
//! | a network of driver `ovl` (any host) | the ovl network of the same name; Docker's network IDs differ per host and are never stored |
//! | its IPAM pool (PoolID `<vni>:<subnet>`) | the network's subnet |
//! | a network being created (Docker gives no name) | a network named `docker-pending-<subnet>` with [`DockerPending`](crate::model::DockerPending), renamed as soon as dockerd lists it |
//! | the later pools of a network created with several subnets | provisional networks of their own until CreateNetwork merges them into the first pool's, which keeps their VNIs ([`kept_vnis`](crate::model::Network::kept_vnis)): Docker's PoolIDs for them name those VNIs |
//! | RequestAddress | a [`Location::Reserved`](crate::model::Location::Reserved) endpoint (owner `docker-ipam`) |
//! | CreateEndpoint | the reservation's owner becomes `docker:<endpoint ID>` |
//! | Join / Leave | the reservation becomes a container endpoint (veth left in the host namespace for Docker to move) and back |
//! | the container's name and `--network-alias`es (learnt from dockerd after Join) | the endpoint's name and aliases in ovl's DNS |
//! | ReleaseAddress | the reservation is freed |

mod driver;
mod engine;
mod ipam;
mod names;
mod networks;
mod options;
mod protocol;
mod sync;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use axum::{Router, body::Bytes, extract::State, response::Response, routing::post};
use tokio::{net::UnixListener, sync::OnceCell};

pub use self::engine::{Engine, EngineError};
pub use self::ipam::{endpoint_of, is_docker_owner};
pub use self::networks::short;
use self::protocol::Refusal;
use crate::{agent::view::View, api, model::Network, store::Store};

/// Where dockerd looks for plugin sockets; `ovl.sock` there registers the
/// driver `ovl` without a spec file.
pub const DEFAULT_PLUGIN_SOCKET: &str = "/run/docker/plugins/ovl.sock";
/// The name Docker knows the driver and the IPAM driver by (`-d ovl`,
/// `--ipam-driver ovl`): the plugin's socket or spec file must be called
/// `ovl.sock` / `ovl.spec`.
pub const DRIVER: &str = "ovl";
/// Bound on opening the store for a plugin call.
const STORE_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// dockerd's Engine API where a host's dockerd serves it by default.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// What `ovl attach --docker-host` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerOptions {
    /// dockerd's Engine API (`unix:///var/run/docker.sock`).
    pub host: String,
    /// Where the plugin listens.
    pub plugin_socket: PathBuf,
}

impl DockerOptions {
    /// The Docker integration `--docker-host HOST` asks for: `auto` (the
    /// default) is dockerd at `default_socket` when that socket exists as
    /// the agent starts (a host running Docker gets the plugin without a
    /// flag), `off` is none, anything else is dockerd's URL.
    pub fn resolve(
        host: &str,
        default_socket: &Path,
        plugin_socket: PathBuf,
    ) -> Option<DockerOptions> {
        let host = match host {
            "off" => return None,
            "auto" => {
                use std::os::unix::fs::FileTypeExt;
                let socket =
                    std::fs::metadata(default_socket).is_ok_and(|m| m.file_type().is_socket());
                if !socket {
                    log::info!(
                        "docker: no dockerd socket at {}: the Docker plugin is off (--docker-host URL turns it on)",
                        default_socket.display()
                    );
                    return None;
                }
                format!("unix://{}", default_socket.display())
            }
            url => url.to_owned(),
        };
        Some(DockerOptions {
            host,
            plugin_socket,
        })
    }
}

/// The plugin's bound socket; the socket file goes when it is dropped.
pub struct Listener {
    listener: Option<UnixListener>,
    path: PathBuf,
    engine: Engine,
}

impl Listener {
    /// Checks the Docker host URL and binds the plugin socket (mode 0600; a
    /// stale socket is replaced, a live one or any other file refused).
    pub fn bind(opts: &DockerOptions) -> Result<Listener> {
        let engine = Engine::from_url(&opts.host)?;
        let listener = api::bind(&opts.plugin_socket)?;
        Ok(Listener {
            listener: Some(listener),
            path: opts.plugin_socket.clone(),
            engine,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The store, opened on first use when the agent started without it.
pub struct StoreHandle {
    url: String,
    store: OnceCell<Arc<Store>>,
}

impl StoreHandle {
    /// The agent's store if it has one, else one opened from `url` on use.
    pub fn new(url: &str, store: Option<Arc<Store>>) -> StoreHandle {
        StoreHandle {
            url: url.to_owned(),
            store: match store {
                Some(s) => OnceCell::new_with(Some(s)),
                None => OnceCell::new(),
            },
        }
    }

    /// The store, or a refusal saying it cannot be reached.
    pub async fn get(&self) -> Result<Arc<Store>, Refusal> {
        self.store
            .get_or_try_init(|| async {
                match tokio::time::timeout(STORE_OPEN_TIMEOUT, Store::open(&self.url)).await {
                    Ok(Ok(s)) => Ok(Arc::new(s)),
                    Ok(Err(e)) => Err(Refusal::new(e.to_string())),
                    Err(_) => Err(Refusal::new(format!(
                        "the store {} does not answer; check that it runs",
                        self.url
                    ))),
                }
            })
            .await
            .cloned()
    }
}

/// What every plugin call and the reconcile loop share.
pub struct Context {
    /// This node.
    pub node: String,
    pub store: StoreHandle,
    pub view: Arc<View>,
    pub engine: Engine,
    /// Docker network ID on this node → the ovl network, as learnt.
    networks: KnownNetworks,
    /// Wakes the reconcile loop (a network was created or named).
    nudge: tokio::sync::Notify,
    /// Containers' names as learnt from dockerd.
    names: names::Memory,
}

/// An ovl network a Docker network ID was found to be: name and VNI (a
/// network of that name with another VNI is another network).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Known {
    name: String,
    vni: u32,
}

/// The Docker network IDs learnt, kept in the agent's state directory
/// across its restarts: dockerd restarts its containers as it starts (a
/// boot) and asks the plugin to attach them before it answers its own
/// API, so an ID that needed dockerd to be resolved would never be (the
/// container stays stopped: "CreateEndpoint: dockerd does not answer").
struct KnownNetworks {
    /// `None`: kept in memory only (tests).
    path: Option<PathBuf>,
    map: Mutex<BTreeMap<String, Known>>,
}

impl KnownNetworks {
    const FILE: &str = "docker-networks.json";

    /// Those kept in `dir` (none when there is no file; an unreadable
    /// one is said and taken as none: dockerd answers the rest again).
    fn open(dir: Option<&Path>) -> KnownNetworks {
        let path = dir.map(|d| d.join(Self::FILE));
        let map = match path.as_deref().map(std::fs::read) {
            Some(Ok(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                log::warn!(
                    "ignoring unreadable {} ({e}): Docker networks are looked up in dockerd again",
                    path.as_deref().unwrap_or(Path::new("")).display()
                );
                BTreeMap::new()
            }),
            _ => BTreeMap::new(),
        };
        KnownNetworks {
            path,
            map: Mutex::new(map),
        }
    }

    fn get(&self, docker_id: &str) -> Option<Known> {
        self.lock().get(docker_id).cloned()
    }

    /// Applies `change`, and writes the file if it says it changed
    /// anything.
    fn change(&self, change: impl FnOnce(&mut BTreeMap<String, Known>) -> bool) {
        let mut map = self.lock();
        if !change(&mut map) {
            return;
        }
        let Some(path) = &self.path else {
            return;
        };
        let json = serde_json::to_vec_pretty(&*map).expect("known networks serialise");
        if let Err(e) = crate::files::replace(path, &json, 0o600) {
            log::warn!(
                "cannot write {} ({e}): after an agent restart, dockerd starting its containers before it answers finds their networks unknown",
                path.display()
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Known>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Known {
    fn of(n: &Network) -> Known {
        Known {
            name: n.name.clone(),
            vni: n.vni.get(),
        }
    }
}

impl Context {
    fn remember(&self, docker_id: &str, known: Known) {
        self.networks
            .change(|m| m.insert(docker_id.to_owned(), known.clone()).as_ref() != Some(&known));
    }

    fn known(&self, docker_id: &str) -> Option<Known> {
        self.networks.get(docker_id)
    }

    fn forget(&self, docker_id: &str) {
        self.networks.change(|m| m.remove(docker_id).is_some());
    }
}

/// Serves the plugin on `listener` and keeps dockerd and the store in step,
/// until the task is dropped.
/// What it learnt of dockerd's networks is kept in `state_dir`.
pub async fn serve(
    mut listener: Listener,
    node: String,
    store: StoreHandle,
    view: Arc<View>,
    state_dir: &Path,
) {
    let ctx = Arc::new(Context {
        node,
        store,
        view,
        engine: listener.engine.clone(),
        networks: KnownNetworks::open(Some(state_dir)),
        nudge: tokio::sync::Notify::new(),
        names: names::Memory::default(),
    });
    log::info!(
        "Docker plugin `{DRIVER}` on {}; dockerd at {}",
        listener.path.display(),
        ctx.engine.socket().display()
    );
    let socket = listener.listener.take().expect("taken once, here");
    // One task: when the agent stops it, the reconciling stops with the
    // serving, not while the runtime shuts down under it.
    tokio::select! {
        () = sync::run(ctx.clone()) => {}
        () = api::serve_router(socket, router(ctx), "Docker plugin") => {}
    }
    drop(listener);
}

type Ctx = State<Arc<Context>>;

fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/NetworkDriver.GetCapabilities", post(driver::capabilities))
        .route("/NetworkDriver.CreateNetwork", post(driver::create_network))
        .route("/NetworkDriver.DeleteNetwork", post(driver::delete_network))
        .route(
            "/NetworkDriver.CreateEndpoint",
            post(driver::create_endpoint),
        )
        .route(
            "/NetworkDriver.DeleteEndpoint",
            post(driver::delete_endpoint),
        )
        .route("/NetworkDriver.EndpointOperInfo", post(driver::oper_info))
        .route("/NetworkDriver.Join", post(driver::join))
        .route("/NetworkDriver.Leave", post(driver::leave))
        .route(
            "/NetworkDriver.ProgramExternalConnectivity",
            post(driver::external_connectivity),
        )
        .route(
            "/NetworkDriver.RevokeExternalConnectivity",
            post(driver::external_connectivity),
        )
        .route("/NetworkDriver.DiscoverNew", post(driver::discovery))
        .route("/NetworkDriver.DiscoverDelete", post(driver::discovery))
        .route("/IpamDriver.GetCapabilities", post(ipam::capabilities))
        .route(
            "/IpamDriver.GetDefaultAddressSpaces",
            post(ipam::address_spaces),
        )
        .route("/IpamDriver.RequestPool", post(ipam::request_pool))
        .route("/IpamDriver.ReleasePool", post(ipam::release_pool))
        .route("/IpamDriver.RequestAddress", post(ipam::request_address))
        .route("/IpamDriver.ReleaseAddress", post(ipam::release_address))
        .fallback(|uri: axum::http::Uri| async move {
            protocol::not_implemented(uri.path().trim_start_matches('/'))
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            use axum::response::IntoResponse;
            Refusal {
                status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
                message: format!("{method}: plugin calls are POSTs"),
            }
            .into_response()
        })
        .with_state(ctx)
}

async fn activate(_: Ctx, _: Bytes) -> Response {
    protocol::reply(&protocol::Activation {
        implements: ["NetworkDriver", "IpamDriver"],
    })
}

/// Answers a call: its result, or its refusal (logged: Docker shows only
/// part of it to its user).
fn answer(method: &str, result: Result<Response, Refusal>) -> Response {
    use axum::response::IntoResponse;
    match result {
        Ok(r) => r,
        Err(refusal) => {
            log::warn!("Docker {method} refused: {}", refusal.message);
            refusal.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestDir;

    /// What the plugin answers to the raw HTTP `request`.
    async fn exchange(request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tmp = TestDir::new("docker-router");
        std::fs::create_dir_all(tmp.path()).unwrap();
        let path = tmp.path().join("plugin.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (view, _kicks) = View::unattached();
        let ctx = Arc::new(Context {
            node: "n1".into(),
            store: StoreHandle::new("file:///nonexistent", None),
            view,
            engine: Engine::from_url("unix:///nonexistent.sock").unwrap(),
            networks: KnownNetworks::open(None),
            nudge: tokio::sync::Notify::new(),
            names: names::Memory::default(),
        });
        let server = tokio::spawn(api::serve_router(listener, router(ctx), "test plugin"));
        let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut got = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut got)).await;
        server.abort();
        got
    }

    #[tokio::test]
    async fn a_call_with_the_wrong_method_is_refused_in_the_protocol() {
        let got =
            exchange(b"GET /Plugin.Activate HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await;
        assert!(got.starts_with("HTTP/1.1 405"), "{got}");
        let body = got.split("\r\n\r\n").nth(1).unwrap_or_default();
        let err: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        assert!(
            err["Err"].as_str().is_some_and(|e| e.contains("POST")),
            "{got}"
        );
    }

    #[test]
    fn docker_host_auto_serves_docker_only_where_its_socket_is() {
        let tmp = TestDir::new("docker-auto");
        let dir = tmp.path();
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("docker.sock");
        let plugin = PathBuf::from("/run/x/ovl.sock");
        assert_eq!(
            DockerOptions::resolve("auto", &socket, plugin.clone()),
            None,
            "no dockerd"
        );
        std::fs::write(&socket, "").unwrap();
        assert_eq!(
            DockerOptions::resolve("auto", &socket, plugin.clone()),
            None,
            "a file that is no socket is no dockerd"
        );
        std::fs::remove_file(&socket).unwrap();
        let _live = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(
            DockerOptions::resolve("auto", &socket, plugin.clone()),
            Some(DockerOptions {
                host: format!("unix://{}", socket.display()),
                plugin_socket: plugin.clone(),
            })
        );
        assert_eq!(DockerOptions::resolve("off", &socket, plugin.clone()), None);
        assert_eq!(
            DockerOptions::resolve("unix:///run/d.sock", &socket, plugin.clone()).map(|o| o.host),
            Some("unix:///run/d.sock".to_owned())
        );
    }
}
