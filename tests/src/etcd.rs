// etcd servers inside a lab namespace, for scenarios that run ovl's etcd
// store: one member, or a cluster of several; each started, stopped and
// restarted on its own data dir.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::{CertFiles, ChildHandle, Lab, Netns, Signal, wait_until};

/// TLS on etcd's client port.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The server's certificate (for the address it listens on).
    pub server: CertFiles,
    /// The CA whose client certificates etcd accepts; with it, a client
    /// without such a certificate is refused (`--client-cert-auth`).
    pub client_ca: Option<PathBuf>,
    /// The CA that signed `server`, for etcdctl.
    pub server_ca: PathBuf,
    /// etcdctl's own client certificate.
    pub etcdctl: Option<CertFiles>,
}

/// The client port etcd listens on (its registered default).
pub const ETCD_CLIENT_PORT: u16 = 2379;

/// The peer URL of a lone member: raft between members never leaves the
/// namespace, so it stays on loopback.
const PEER_URL: &str = "http://127.0.0.1:2380";

/// The port a cluster's members talk raft on, each on its own address.
pub const ETCD_PEER_PORT: u16 = 2380;

/// A lone member's name; the data dir remembers it, so a restart reuses it.
const MEMBER_NAME: &str = "ovlt";

/// How long a fresh or restarted etcd gets to elect itself and answer.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long etcd gets to exit after SIGTERM or SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on one etcdctl request, so a probe of a stopped server is quick.
const ETCDCTL_TIMEOUT: &str = "2s";

/// An etcd server the lab runs in `netns`, serving clients on
/// `addr:2379`. The lab kills it when it drops; [`stop`](Self::stop) and
/// [`restart`](Self::restart) model an outage of the store.
pub struct Etcd {
    netns: Netns,
    addr: Ipv4Addr,
    data_dir: PathBuf,
    process: Option<ChildHandle>,
    tls: Option<EtcdTls>,
    /// `USER:PASSWORD` etcdctl logs in with, once authentication is on.
    etcdctl_user: Option<String>,
    member: Member,
}

/// Who a server is in its cluster.
#[derive(Clone, Debug)]
struct Member {
    name: String,
    peer_url: String,
    /// Every member, `NAME=PEER_URL,…` (etcd's `--initial-cluster`).
    initial_cluster: String,
}

impl Member {
    fn alone() -> Member {
        Member {
            name: MEMBER_NAME.to_owned(),
            peer_url: PEER_URL.to_owned(),
            initial_cluster: format!("{MEMBER_NAME}={PEER_URL}"),
        }
    }
}

impl Etcd {
    /// Starts etcd in `netns` listening on `addr` (an address of that
    /// namespace), with a fresh data dir in the lab's temp dir, and waits
    /// until it is healthy.
    pub fn start(lab: &Lab, netns: &Netns, addr: Ipv4Addr) -> Result<Etcd> {
        Self::start_with(lab, netns, addr, None)
    }

    /// [`start`](Self::start) serving TLS on the client port.
    pub fn start_tls(lab: &Lab, netns: &Netns, addr: Ipv4Addr, tls: EtcdTls) -> Result<Etcd> {
        Self::start_with(lab, netns, addr, Some(tls))
    }

    /// [`start`](Self::start) with the data dir on a tmpfs of the lab: no
    /// commit waits for the machine's disk. For benchmarks on a shared
    /// virtual disk, where fsyncs measure the other tenants' writes.
    pub fn start_in_memory(lab: &Lab, netns: &Netns, addr: Ipv4Addr) -> Result<Etcd> {
        let data_dir = lab.tmpfs()?.join(format!("etcd-{}", netns.name()));
        Self::start_at(lab, netns, addr, None, data_dir)
    }

    fn start_with(lab: &Lab, netns: &Netns, addr: Ipv4Addr, tls: Option<EtcdTls>) -> Result<Etcd> {
        let data_dir = lab.tempdir().join(format!("etcd-{}", netns.name()));
        Self::start_at(lab, netns, addr, tls, data_dir)
    }

    fn start_at(
        lab: &Lab,
        netns: &Netns,
        addr: Ipv4Addr,
        tls: Option<EtcdTls>,
        data_dir: PathBuf,
    ) -> Result<Etcd> {
        let mut etcd = Self::unstarted(netns, addr, tls, data_dir, Member::alone())?;
        etcd.launch(lab)?;
        Ok(etcd)
    }

    fn unstarted(
        netns: &Netns,
        addr: Ipv4Addr,
        tls: Option<EtcdTls>,
        data_dir: PathBuf,
        member: Member,
    ) -> Result<Etcd> {
        ensure!(
            !data_dir.exists(),
            "an etcd already uses {} in this lab",
            data_dir.display()
        );
        Ok(Etcd {
            netns: netns.clone(),
            addr,
            data_dir,
            process: None,
            tls,
            etcdctl_user: None,
            member,
        })
    }

    /// `HOST:PORT` of the client endpoint, as etcdctl takes it.
    pub fn endpoint(&self) -> String {
        format!("{}:{ETCD_CLIENT_PORT}", self.addr)
    }

    /// The store URL ovl takes: `etcd://HOST:PORT`, or `etcds://` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.endpoint())
    }

    /// `http(s)://HOST:PORT`.
    fn client_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.endpoint())
    }

    /// Turns on authentication: user `root` with `root_password`, then a
    /// user `user` with `password` whose role may read and write `/ovl/`
    /// only (what an operator gives ovl). etcdctl logs in as root from now.
    pub fn enable_auth(&mut self, root_password: &str, user: &str, password: &str) -> Result<()> {
        self.etcdctl(&["user", "add", "root", "--new-user-password", root_password])?;
        self.etcdctl(&["role", "add", "ovl-rw"])?;
        self.etcdctl(&[
            "role",
            "grant-permission",
            "ovl-rw",
            "readwrite",
            "/ovl/",
            "--prefix=true",
        ])?;
        self.etcdctl(&["user", "add", user, "--new-user-password", password])?;
        self.etcdctl(&["user", "grant-role", user, "ovl-rw"])?;
        self.etcdctl(&["auth", "enable"])?;
        self.etcdctl_user = Some(format!("root:{root_password}"));
        Ok(())
    }

    /// The member's data dir (kept across stop and restart).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process
            .as_ref()
            .filter(|p| matches!(p.try_status(), Ok(None)))
            .map(ChildHandle::pid)
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(|p| matches!(p.try_status(), Ok(None)))
    }

    /// Stops the server with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) -> Result<()> {
        self.halt(Signal::Terminate)
    }

    /// Kills the server with SIGKILL (a crash) and waits for it to exit.
    pub fn kill(&mut self) -> Result<()> {
        self.halt(Signal::Kill)
    }

    /// Starts the server again on the same data dir (same member, same
    /// keys and leases) and waits until it is healthy.
    pub fn restart(&mut self, lab: &Lab) -> Result<()> {
        ensure!(
            !self.is_running(),
            "etcd at {} is still running",
            self.endpoint()
        );
        self.launch(lab)
    }

    /// Runs `etcdctl --endpoints HOST:PORT args...` (API v3) inside the
    /// server's namespace; fails unless it exits 0. Returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let endpoint = self.client_url();
        let command_timeout = format!("--command-timeout={ETCDCTL_TIMEOUT}");
        let mut argv: Vec<String> = [
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            "--endpoints",
            endpoint.as_str(),
            "--dial-timeout",
            ETCDCTL_TIMEOUT,
            command_timeout.as_str(),
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some(tls) = &self.tls {
            argv.push(format!("--cacert={}", tls.server_ca.display()));
            if let Some(c) = &tls.etcdctl {
                argv.push(format!("--cert={}", c.cert.display()));
                argv.push(format!("--key={}", c.key.display()));
            }
        }
        if let Some(user) = &self.etcdctl_user {
            argv.push(format!("--user={user}"));
        }
        let mut argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        argv.extend_from_slice(args);
        let out = self.netns.exec(&argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The value of Prometheus metric `name` (summed over its label sets)
    /// from the server's `/metrics` (plain-text servers only).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let url = format!("{}/metrics", self.client_url());
        let out = self.netns.exec(&["curl", "-sf", "--max-time", "5", &url])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut total = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if key == name || key.starts_with(&format!("{name}{{")) {
                *total.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        total.with_context(|| format!("etcd at {url} exports no {name}"))
    }

    /// The keys under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let out = self.etcdctl(&["get", "--prefix", "--keys-only", prefix])?;
        let mut keys: Vec<String> = out
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Waits until `etcdctl endpoint health` succeeds; fails at once if
    /// the server exited.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let process = self.process.as_ref().context("etcd is not running")?;
        wait_until(timeout, || {
            if let Some(status) = process.try_status()? {
                bail!(
                    "etcd exited ({status}) while starting:\n{}",
                    process.output_report()
                );
            }
            self.etcdctl(&["endpoint", "health"])?;
            Ok(true)
        })
        .with_context(|| format!("etcd at {} never became healthy", self.endpoint()))
    }

    fn launch(&mut self, lab: &Lab) -> Result<()> {
        self.spawn(lab)?;
        self.wait_healthy(STARTUP_TIMEOUT)
    }

    /// Starts the server without waiting for it: a cluster's first member
    /// is healthy only once a quorum runs.
    fn spawn(&mut self, lab: &Lab) -> Result<()> {
        let client_url = self.client_url();
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let member = &self.member;
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(tls) = &self.tls {
            tls_args.push(format!("--cert-file={}", tls.server.cert.display()));
            tls_args.push(format!("--key-file={}", tls.server.key.display()));
            if let Some(ca) = &tls.client_ca {
                tls_args.push("--client-cert-auth".into());
                tls_args.push(format!("--trusted-ca-file={}", ca.display()));
            }
        }
        let mut argv = vec![
            "etcd",
            "--name",
            &member.name,
            "--data-dir",
            &data_dir,
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &member.peer_url,
            "--initial-advertise-peer-urls",
            &member.peer_url,
            "--initial-cluster",
            &member.initial_cluster,
        ];
        argv.extend(tls_args.iter().map(String::as_str));
        self.process = Some(lab.spawn(&self.netns, &argv, &[])?);
        Ok(())
    }

    /// The member's raft ID, and the ID of the leader it follows
    /// (`etcdctl endpoint status`).
    fn member_and_leader(&self) -> Result<(u64, u64)> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        let status: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("etcdctl endpoint status printed {out}"))?;
        let status = &status[0]["Status"];
        let id = |v: &serde_json::Value| {
            v.as_u64()
                .with_context(|| format!("no member IDs in endpoint status {out}"))
        };
        Ok((id(&status["header"]["member_id"])?, id(&status["leader"])?))
    }

    fn halt(&mut self, signal: Signal) -> Result<()> {
        let process = self.process.as_ref().context("etcd is not running")?;
        process.signal(signal)?;
        // etcd re-raises SIGTERM after its cleanup, so a graceful stop ends
        // "killed by signal" too: any exit will do.
        process.wait_timeout(STOP_TIMEOUT)?;
        Ok(())
    }
}

/// An etcd cluster of several members, each serving clients and its
/// peers on its own address, as operators run etcd: a member may die or be
/// cut off, and the cluster serves on while a quorum runs.
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts a member at each of `places` (a namespace and an address of
    /// it) and waits until every one is healthy.
    pub fn start(lab: &Lab, places: &[(Netns, Ipv4Addr)]) -> Result<EtcdCluster> {
        let name = |i: usize| format!("{MEMBER_NAME}{i}");
        let peer_url = |addr: &Ipv4Addr| format!("http://{addr}:{ETCD_PEER_PORT}");
        let initial_cluster = places
            .iter()
            .enumerate()
            .map(|(i, (_, addr))| format!("{}={}", name(i), peer_url(addr)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(places.len());
        for (i, (netns, addr)) in places.iter().enumerate() {
            let member = Member {
                name: name(i),
                peer_url: peer_url(addr),
                initial_cluster: initial_cluster.clone(),
            };
            let data_dir = lab.tempdir().join(format!("etcd-{}-{i}", netns.name()));
            let mut etcd = Etcd::unstarted(netns, *addr, None, data_dir, member)?;
            etcd.spawn(lab)?;
            members.push(etcd);
        }
        for etcd in &members {
            etcd.wait_healthy(STARTUP_TIMEOUT)?;
        }
        Ok(EtcdCluster { members })
    }

    /// The store URL ovl takes, naming every member:
    /// `etcd://HOST:PORT,HOST:PORT,…`.
    pub fn url(&self) -> String {
        let endpoints: Vec<String> = self.members.iter().map(Etcd::endpoint).collect();
        format!("etcd://{}", endpoints.join(","))
    }

    /// The index of the member that leads, once the running members agree
    /// on one (an election may be under way).
    pub fn leader(&self) -> Result<usize> {
        self.leader_of_all_but(None)
    }

    /// [`leader`](Self::leader) as the running members other than `cut`
    /// (a member cut off from them) agree.
    pub fn leader_of_all_but(&self, cut: Option<usize>) -> Result<usize> {
        let mut last = String::new();
        let mut found = None;
        wait_until(STARTUP_TIMEOUT, || {
            let mut ids = Vec::new();
            let mut leaders = BTreeSet::new();
            for (i, etcd) in self.members.iter().enumerate() {
                if etcd.is_running() && Some(i) != cut {
                    let (id, leader) = etcd.member_and_leader()?;
                    ids.push(Some(id));
                    leaders.insert(leader);
                } else {
                    ids.push(None);
                }
            }
            found = match (leaders.len(), leaders.first()) {
                (1, Some(&leader)) => ids.iter().position(|id| *id == Some(leader)),
                _ => None,
            };
            last = format!("members {ids:?} follow {leaders:?}");
            Ok(found.is_some())
        })
        .with_context(|| format!("the running etcd members never agreed on a leader: {last}"))?;
        found.context("a leader")
    }
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("netns", &self.netns.name())
            .field("endpoint", &self.endpoint())
            .field("data_dir", &self.data_dir)
            .field("running", &self.is_running())
            .finish()
    }
}
