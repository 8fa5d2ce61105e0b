//! Service discovery for containers: a resolver inside every local
//! container's network namespace (127.0.0.11:53 and 127.0.0.12:53, UDP and
//! TCP) that answers the names, aliases and reverse names of the endpoints
//! on the asker's networks from the store's state, and forwards every
//! other name to the host's resolvers (those /etc/resolv.conf lists,
//! followed as it changes, unless `--dns-upstream` names them).
//!
//! The agent drives it: [`Service::start`], then [`Service::update`] with
//! every state it applies. Front ends ask [`container_dns`] what to put in
//! a container's resolv.conf (the CNI result, `/etc/netns/NAME`), and
//! Docker is pointed at [`DOCKER_FORWARD_ADDR`] (see the README).
//!
//! It runs on a runtime (thread) of its own: a container flooding its
//! resolver slows neither the agent's loop nor its API.

mod limit;
pub mod records;
pub mod resolv_conf;
mod server;
mod sockets;
mod stats;
mod upstream;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context, Result};

use self::{
    records::Records,
    server::{Limits, Namespace, Shared},
    upstream::Upstreams,
};
pub use self::{
    stats::{DnsCounters, Stats},
    upstream::{HOST_RESOLV_CONF, parse_upstream},
};
use crate::{model::State, store::Dirty};

/// Where containers find ovl's resolver, as Docker's embedded DNS sits at
/// the same address in its containers.
pub const RESOLVER_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
/// The resolver's second address: in a Docker container 127.0.0.11:53 is
/// redirected to Docker's own resolver, which forwards names it does not
/// know to the container's `--dns` servers from inside the container's
/// namespace; `--dns 127.0.0.12` makes those questions reach ovl.
pub const DOCKER_FORWARD_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 12);
/// Every address the resolver listens on in each namespace.
const LISTEN_ADDRS: [Ipv4Addr; 2] = [RESOLVER_ADDR, DOCKER_FORWARD_ADDR];
/// Default per-container limit, questions per second.
pub const DEFAULT_RATE_LIMIT: u32 = 500;
/// How long a forwarded question may take in all before SERVFAIL: less
/// than a stub resolver's first timeout (glibc's is 5 s), so the asker
/// gets an answer rather than retrying.
const FORWARD_BUDGET: Duration = Duration::from_secs(2);
/// How often served namespaces are checked for having been deleted (our
/// sockets would otherwise keep a deleted namespace, and its veth, alive).
const NAMESPACE_CHECK: Duration = Duration::from_millis(500);
/// How often the host's resolv.conf is read again for its nameservers
/// (a DHCP client or NetworkManager rewrites it while the agent runs).
const RESOLV_CONF_CHECK: Duration = Duration::from_secs(2);

/// How the agent's resolver is set up (`ovl attach` options).
#[derive(Clone, Debug)]
pub struct Options {
    /// Off: no sockets in containers, nothing else changes.
    pub enabled: bool,
    /// Upstream resolvers; empty: the nameservers of the host's
    /// /etc/resolv.conf, followed as it changes.
    pub upstreams: Vec<SocketAddr>,
    /// Questions per second per container (bursts of twice that); 0: none.
    pub rate_limit: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            enabled: true,
            upstreams: Vec::new(),
            rate_limit: DEFAULT_RATE_LIMIT,
        }
    }
}

/// What a container's resolver configuration holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerDns {
    pub nameservers: Vec<Ipv4Addr>,
    /// Search domains (the host's).
    pub search: Vec<String>,
    /// resolv.conf options.
    pub options: Vec<String>,
}

/// The resolver configuration of a container attached by ovl (not a
/// Docker container, whose resolv.conf is Docker's): ovl's resolver, and
/// the host's search domains and options, as Docker keeps them, but
/// `ndots:0` (as Docker sets it) so a bare name is asked as is before any
/// search domain is tried.
pub fn container_dns() -> ContainerDns {
    let host = std::fs::read_to_string(HOST_RESOLV_CONF).unwrap_or_default();
    container_dns_from(&host)
}

/// [`container_dns`] for a host whose resolv.conf says `host`.
fn container_dns_from(host: &str) -> ContainerDns {
    let mut options = resolv_conf::options_but_ndots(host);
    options.push("ndots:0".into());
    ContainerDns {
        nameservers: vec![RESOLVER_ADDR],
        search: resolv_conf::search_domains(host),
        options,
    }
}

/// The address to give Docker as a container's (or the daemon's) `--dns`
/// so that Docker's embedded resolver forwards ovl's names to ovl.
pub fn docker_dns_server() -> Ipv4Addr {
    DOCKER_FORWARD_ADDR
}

/// The agent's resolver: off, or running.
pub struct Service {
    running: Option<Running>,
}

struct Running {
    rt: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    served: Arc<Mutex<HashMap<String, Served>>>,
    /// Namespaces whose sockets could not be opened (warned about once).
    unservable: HashSet<String>,
}

/// The sockets of one namespace, as tasks; dropping it closes them.
struct Served {
    /// (device, inode) of the namespace when it was opened.
    identity: (u64, u64),
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Service {
    /// Starts the resolver's runtime and upstream exchanges (or nothing,
    /// when disabled). Counters go to `stats`.
    pub fn start(opts: &Options, stats: Stats) -> Result<Service> {
        if !opts.enabled {
            log::info!("DNS: disabled (--no-dns); containers get no resolver from ovl");
            return Ok(Service { running: None });
        }
        raise_fd_limit();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ovl-dns")
            .enable_all()
            .build()
            .context("start the DNS resolver's runtime")?;
        let servers = if opts.upstreams.is_empty() {
            upstream::from_resolv_conf(Path::new(HOST_RESOLV_CONF))
        } else {
            opts.upstreams.clone()
        };
        let upstreams = {
            let _in = rt.enter();
            Upstreams::new(&servers, FORWARD_BUDGET)
        };
        if servers.is_empty() {
            log::warn!(
                "DNS: no upstream resolver (none in {HOST_RESOLV_CONF}, no --dns-upstream): names other than ovl's get SERVFAIL"
            );
        }
        let limit = match opts.rate_limit {
            0 => "no per-container limit".to_owned(),
            n => format!("at most {n} questions/s per container"),
        };
        log::info!(
            "DNS: resolver on {RESOLVER_ADDR} and {DOCKER_FORWARD_ADDR} port 53 in every local container; other names go to {}; {limit}",
            describe(&servers)
        );
        let shared = Arc::new(Shared {
            records: RwLock::new(Arc::new(Records::default())),
            upstreams: RwLock::new(Arc::new(upstreams)),
            stats,
            limits: Limits {
                rate: opts.rate_limit,
                forwards: 64,
                connections: 16,
                forward_budget: FORWARD_BUDGET,
                tcp_idle: Duration::from_secs(5),
            },
        });
        let served = Arc::new(Mutex::new(HashMap::new()));
        rt.spawn(forget_deleted_namespaces(served.clone(), shared.clone()));
        if opts.upstreams.is_empty() {
            rt.spawn(follow_resolv_conf(
                Path::new(HOST_RESOLV_CONF).to_owned(),
                shared.clone(),
            ));
        }
        Ok(Service {
            running: Some(Running {
                rt: Some(rt),
                shared,
                served,
                unservable: HashSet::new(),
            }),
        })
    }

    /// Answers from `state` from now on (node `node`'s view), and listens
    /// in exactly the namespaces of its local containers. `link_exists`
    /// says whether a host interface exists (the agent's cache: asking the
    /// kernel for every local endpoint at every change costs more than the
    /// rest of the update). A namespace that could not be opened is tried
    /// again only after [`links_changed`](Self::links_changed). Only the
    /// networks `dirty` covers are built again; the others' records are
    /// those of the last update.
    pub fn update(
        &mut self,
        state: &State,
        node: &str,
        link_exists: &dyn Fn(&str) -> bool,
        dirty: &Dirty,
    ) {
        let Some(r) = &mut self.running else {
            return;
        };
        if dirty.is_empty() {
            return;
        }
        let prev = r
            .shared
            .records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let records = Records::rebuild(&prev, state, node, link_exists, dirty);
        let wanted: BTreeSet<String> = records.namespaces().map(str::to_owned).collect();
        *r.shared.records.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(records);
        let mut served = r.served.lock().unwrap_or_else(|p| p.into_inner());
        served.retain(|ns, _| wanted.contains(ns));
        r.unservable.retain(|ns| wanted.contains(ns));
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|ns| !served.contains_key(*ns) && !r.unservable.contains(*ns))
            .collect();
        for ns in missing {
            match r.open(ns) {
                Ok(s) => {
                    served.insert(ns.clone(), s);
                    r.unservable.remove(ns);
                }
                Err(e) => {
                    if r.unservable.insert(ns.clone()) {
                        if Path::new(ns).exists() {
                            log::warn!(
                                "DNS: cannot listen in namespace {ns}: {e:#}; its containers get no answers from ovl"
                            );
                        } else {
                            log::debug!("DNS: namespace {ns} is gone: {e:#}");
                        }
                    }
                }
            }
        }
        r.shared.stats.set_namespaces(served.len());
    }
}

impl Service {
    /// A host link came, went or moved (a container's veth with it): the
    /// namespaces that could not be opened are tried again at the next
    /// update.
    pub fn links_changed(&mut self) {
        if let Some(r) = &mut self.running {
            r.unservable.clear();
        }
    }
}

impl Running {
    fn open(&self, ns: &str) -> Result<Served> {
        let identity = identity_of(ns).with_context(|| format!("namespace {ns}"))?;
        let sockets = sockets::open_in(ns, &LISTEN_ADDRS)?;
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the service");
        let _in = rt.enter();
        let namespace = Arc::new(Namespace::new(ns.to_owned(), &self.shared.limits));
        let mut tasks = Vec::new();
        for udp in sockets.udp {
            let udp = tokio::net::UdpSocket::from_std(udp).context("register a UDP socket")?;
            let task = server::serve_udp(udp, namespace.clone(), self.shared.clone());
            tasks.push(rt.spawn(task).abort_handle());
        }
        for tcp in sockets.tcp {
            let tcp = tokio::net::TcpListener::from_std(tcp).context("register a TCP listener")?;
            let task = server::serve_tcp(tcp, namespace.clone(), self.shared.clone());
            tasks.push(rt.spawn(task).abort_handle());
        }
        Ok(Served { identity, tasks })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's task would panic.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// (device, inode) of the namespace file at `ns`: a deleted namespace's
/// file is gone, a re-created one is another inode.
fn identity_of(ns: &str) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(ns)?;
    Ok((m.dev(), m.ino()))
}

/// Closes the sockets of namespaces deleted without a disconnect (`ip
/// netns del`, a container's process gone): sockets hold their namespace,
/// so without this it, and the container's veth, would never be freed.
async fn forget_deleted_namespaces(
    served: Arc<Mutex<HashMap<String, Served>>>,
    shared: Arc<Shared>,
) {
    loop {
        tokio::time::sleep(NAMESPACE_CHECK).await;
        let mut served = served.lock().unwrap_or_else(|p| p.into_inner());
        served.retain(|ns, s| {
            let same = identity_of(ns).is_ok_and(|id| id == s.identity);
            if !same {
                log::info!("DNS: namespace {ns} was deleted; closed its resolver sockets");
            }
            same
        });
        shared.stats.set_namespaces(served.len());
    }
}

/// Reads `path` every [`RESOLV_CONF_CHECK`] and forwards to the
/// nameservers it lists from then on. A file that lists none (being
/// rewritten, or broken) keeps the last ones: a host without resolvers
/// is not a state worth following into SERVFAIL for every name.
async fn follow_resolv_conf(path: std::path::PathBuf, shared: Arc<Shared>) {
    let mut warned_empty = false;
    loop {
        tokio::time::sleep(RESOLV_CONF_CHECK).await;
        let now = upstream::from_resolv_conf(&path);
        let had = shared.upstreams().servers();
        if now.is_empty() {
            if !had.is_empty() && !warned_empty {
                log::warn!(
                    "DNS: {} lists no nameserver now; still forwarding to {}",
                    path.display(),
                    describe(&had)
                );
                warned_empty = true;
            }
            continue;
        }
        warned_empty = false;
        if now != had {
            log::info!(
                "DNS: {} changed; other names go to {} (were {})",
                path.display(),
                describe(&now),
                describe(&had)
            );
            let upstreams = Upstreams::new(&now, FORWARD_BUDGET);
            *shared.upstreams.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(upstreams);
        }
    }
}

fn describe(servers: &[SocketAddr]) -> String {
    if servers.is_empty() {
        return "nowhere".into();
    }
    servers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each served namespace costs four descriptors: raise the soft limit to
/// the hard one, as Go programs (dockerd) do at start.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                log::debug!(
                    "raise the descriptor limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_keep_the_hosts_search_domains_and_options_with_ndots_0() {
        // systemd-resolved's stub file, with a DHCP search domain and an
        // ndots of its own.
        let host = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\noptions ndots:2 single-request-reopen\n";
        let dns = container_dns_from(host);
        assert_eq!(dns.nameservers, vec![RESOLVER_ADDR]);
        assert_eq!(dns.search, vec!["corp.example"]);
        assert_eq!(
            dns.options,
            vec!["edns0", "trust-ad", "single-request-reopen", "ndots:0"]
        );
        assert_eq!(container_dns_from("").options, vec!["ndots:0"]);
    }
}
