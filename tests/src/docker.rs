// A dockerd per simulated host, started as runtimes.md records: in the
// host's network namespace, in a private mount namespace whose
// /etc/docker/plugins holds this host's ovl.spec; an offline busybox image.

//! [`Dockerd`] starts Debian's docker.io 20.10 daemon with its own data
//! root, exec root, socket, containerd namespace and cgroup parent, so labs
//! run in parallel. The lab removes its containers (through dockerd, then
//! by killing what is left in its cgroups) when it drops.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::Ipv4Addr,
    os::unix::{fs::symlink, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{
    Agent, ChildHandle, CleanupStage, Etcd, Host, Lab, Netns, Ovl, Signal, cmd, stale, wait_until,
};

/// Debian's docker.io client, not whatever else is first on PATH.
pub const DOCKER_CLI: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";
/// The busybox image every Dockerd imports.
pub const BUSYBOX_IMAGE: &str = "ovlt/busybox:1";
/// Where busybox-static installs its binary.
const BUSYBOX: &str = "/bin/busybox";
/// Applets the image offers as commands.
const APPLETS: [&str; 19] = [
    "sh", "ping", "sleep", "httpd", "wget", "ip", "cat", "dd", "md5sum", "wc", "hostname", "head",
    "ls", "echo", "sysctl", "timeout", "ps", "kill", "nslookup",
];
/// Mount targets the private mount namespace binds over; they must exist.
const SPEC_DIR: &str = "/etc/docker/plugins";
const SOCKET_DIR: &str = "/run/docker/plugins";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// How a dockerd is started.
#[derive(Clone, Copy, Debug, Default)]
pub struct DockerdOptions {
    /// `--live-restore`: containers keep running while dockerd is down.
    pub live_restore: bool,
    /// `--dns`: the daemon's default DNS servers for its containers
    /// (daemon.json's `dns`).
    pub dns: Option<&'static str>,
    /// dockerd's own defaults for the host's firewall and forwarding
    /// (`--iptables`, `--ip-forward`): it switches forwarding on and sets
    /// the policy of iptables' FORWARD chain to DROP. Off, the tests' hosts
    /// are left alone.
    pub firewall: bool,
    /// Docker's default bridge (`docker0`) with this address and prefix
    /// (`--bip`), as on a host with Docker's defaults; `None`: no bridge
    /// (`--bridge=none`).
    pub bridge: Option<&'static str>,
}

/// `docker network create -d ovl --ipam-driver ovl --subnet SUBNET
/// EXTRA... NAME`, as arguments of `docker`.
pub fn ovl_network_argv<'a>(name: &'a str, subnet: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec![
        "network",
        "create",
        "-d",
        "ovl",
        "--ipam-driver",
        "ovl",
        "--subnet",
        subnet,
    ];
    argv.extend_from_slice(extra);
    argv.push(name);
    argv
}

/// A dockerd running in one lab host's network namespace.
pub struct Dockerd {
    netns: Netns,
    /// Holds the host's private mount namespace (where dockerd's plugin
    /// directories, container rootfs and sandbox mounts live) across
    /// dockerd restarts: a dockerd started in a fresh one could not find
    /// the containers `--live-restore` kept running.
    mounts: ChildHandle,
    dir: PathBuf,
    socket: PathBuf,
    cgroup_parent: String,
    options: DockerdOptions,
    process: Option<ChildHandle>,
}

impl Dockerd {
    /// Starts dockerd for `host` (`role` names it: "host-a"), finding the
    /// `ovl` plugin at `plugin_socket`, waits until it answers and imports
    /// [`BUSYBOX_IMAGE`].
    pub fn start(
        lab: &Lab,
        host: &Host,
        role: &str,
        plugin_socket: &Path,
        options: DockerdOptions,
    ) -> Result<Dockerd> {
        let dir = lab.tempdir().join(format!("docker-{role}"));
        fs::create_dir_all(dir.join("plugins"))?;
        fs::create_dir_all(dir.join("no-sockets"))?;
        fs::write(
            dir.join("plugins/ovl.spec"),
            format!("unix://{}\n", plugin_socket.display()),
        )?;
        // Bind targets on the host; dockerd's private namespace covers them.
        fs::create_dir_all(SPEC_DIR)?;
        fs::create_dir_all(SOCKET_DIR)?;
        let cgroup_parent = format!("{}-{role}", lab.prefix());
        let mounts = hold_mount_namespace(lab, &host.netns, &dir)?;
        let mut dockerd = Dockerd {
            netns: host.netns.clone(),
            mounts,
            socket: dir.join("docker.sock"),
            dir,
            cgroup_parent: cgroup_parent.clone(),
            options,
            process: None,
        };
        let socket = dockerd.socket.clone();
        lab.on_cleanup(CleanupStage::BeforeProcesses, move || {
            remove_all_containers(&socket);
        });
        lab.on_cleanup(CleanupStage::AfterProcesses, move || {
            if let Err(e) = stale::remove_cgroup_tree(&cgroup_parent) {
                eprintln!("ovl-tests: {e:#}");
            }
        });
        dockerd.launch(lab)?;
        dockerd.import_busybox()?;
        Ok(dockerd)
    }

    /// The Engine API URL the ovl agent takes (`unix:///...`).
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The mount namespace dockerd runs in (`/proc/PID/ns/mnt`), where its
    /// containers' network namespaces are mounted.
    pub fn mount_namespace(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.mounts.pid()))
    }

    /// dockerd's own log so far.
    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.output_report())
            .unwrap_or_default()
    }

    fn launch(&mut self, lab: &Lab) -> Result<()> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut dockerd = format!(
            "exec {DOCKERD} --data-root {} --exec-root {} --pidfile {} -H unix://{} \
             --iptables={fw} --ip-forward={fw} \
             --exec-opt native.cgroupdriver=cgroupfs --cgroup-parent /{cg} \
             --containerd-namespace {cg} --containerd-plugins-namespace {cg}-plugins",
            d("data"),
            d("exec"),
            d("docker.pid"),
            self.socket.display(),
            cg = self.cgroup_parent,
            fw = self.options.firewall,
        );
        match self.options.bridge {
            Some(bip) => dockerd.push_str(&format!(" --bip {bip}")),
            None => dockerd.push_str(" --bridge=none"),
        }
        if self.options.live_restore {
            dockerd.push_str(" --live-restore");
        }
        if let Some(dns) = self.options.dns {
            dockerd.push_str(&format!(" --dns {dns}"));
        }
        // `ip netns exec` would mount a /sys without the cgroup hierarchies
        // ("Devices cgroup isn't mounted"): enter the network namespace and
        // the host's mount namespace only.
        let netns_path = format!("--net=/run/netns/{}", self.netns.name());
        let mnt_path = format!("--mount=/proc/{}/ns/mnt", self.mounts.pid());
        let argv = ["nsenter", &netns_path, &mnt_path, "sh", "-c", &dockerd];
        // Spawned from the root namespace: `nsenter` does the entering.
        let child = lab.spawn_here(&argv, &[])?;
        self.process = Some(child);
        let process = self.process.as_ref().expect("set just above");
        wait_until(STARTUP_TIMEOUT, || {
            Ok(process.try_status()?.is_some()
                || self.docker_unchecked(&["version"])?.status.success())
        })
        .with_context(|| format!("dockerd did not start:\n{}", process.output_report()))?;
        if let Some(status) = process.try_status()? {
            bail!("dockerd exited ({status}):\n{}", process.output_report());
        }
        Ok(())
    }

    fn import_busybox(&self) -> Result<()> {
        let rootfs = self.dir.join("rootfs");
        fs::create_dir_all(rootfs.join("bin"))?;
        fs::create_dir_all(rootfs.join("tmp"))?;
        fs::create_dir_all(rootfs.join("etc"))?;
        fs::copy(BUSYBOX, rootfs.join("bin/busybox"))
            .with_context(|| format!("copy {BUSYBOX}: is busybox-static installed?"))?;
        for applet in APPLETS {
            symlink("busybox", rootfs.join("bin").join(applet))?;
        }
        let tar = self.dir.join("rootfs.tar");
        cmd::run(&[
            "tar",
            "-C",
            &rootfs.display().to_string(),
            "-cf",
            &tar.display().to_string(),
            ".",
        ])?;
        self.docker(&["import", &tar.display().to_string(), BUSYBOX_IMAGE])?;
        Ok(())
    }

    /// `docker args...` against this dockerd; fails unless it exits 0.
    /// Returns stdout, trimmed.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = self.docker_unchecked(args)?;
        if !out.status.success() {
            bail!(
                "`docker {}` failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `docker args...` whatever its exit status.
    pub fn docker_unchecked(&self, args: &[&str]) -> Result<std::process::Output> {
        let host = format!("unix://{}", self.socket.display());
        let mut argv = vec![DOCKER_CLI, "-H", &host];
        argv.extend_from_slice(args);
        cmd::run_unchecked(&argv)
    }

    /// `docker-compose -p project -f file args...` against this dockerd;
    /// fails unless it exits 0. Returns stdout and stderr (Compose reports
    /// progress on stderr).
    pub fn compose(&self, project: &str, file: &Path, args: &[&str]) -> Result<String> {
        let file = file.display().to_string();
        let mut argv = vec!["docker-compose", "-p", project, "-f", &file];
        argv.extend_from_slice(args);
        let out = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .output()
            .with_context(|| format!("run {}: is docker-compose installed?", argv.join(" ")))?;
        ensure!(
            out.status.success(),
            "{}",
            cmd::describe_failure(&argv, &out)
        );
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Names of the networks `docker network ls` shows.
    pub fn network_names(&self) -> Result<Vec<String>> {
        let out = self.docker(&["network", "ls", "--format", "{{.Name}}"])?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// `docker network inspect NAME` as JSON (one network).
    pub fn inspect_network(&self, name: &str) -> Result<Value> {
        let out = self.docker(&["network", "inspect", name])?;
        let v: Value = serde_json::from_str(&out)?;
        v.get(0).cloned().context("empty inspect output")
    }

    /// Starts a busybox container `name` on `network` running `sleep`;
    /// returns it.
    pub fn run(&self, lab: &Lab, name: &str, network: &str, extra: &[&str]) -> Result<Container> {
        let mut args = vec!["run", "-d", "--name", name, "--network", network];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[BUSYBOX_IMAGE, "sleep", "100000"]);
        self.docker(&args)?;
        self.container(lab, name)
    }

    /// A running container, with its network namespace named in the lab.
    pub fn container(&self, lab: &Lab, name: &str) -> Result<Container> {
        let pid: u32 = self
            .docker(&["inspect", "-f", "{{.State.Pid}}", name])?
            .parse()
            .context("container pid")?;
        ensure!(pid != 0, "container {name} is not running");
        let netns = lab.attach_netns(&format!("{name}-{pid}"), pid)?;
        Ok(Container {
            name: name.to_owned(),
            netns,
        })
    }

    /// Docker's endpoints on network `network`: address → endpoint ID.
    pub fn endpoints(&self, network: &str) -> Result<BTreeMap<Ipv4Addr, String>> {
        let net = self.inspect_network(network)?;
        let mut out = BTreeMap::new();
        if let Some(containers) = net["Containers"].as_object() {
            for c in containers.values() {
                let ip = c["IPv4Address"]
                    .as_str()
                    .and_then(|a| a.split('/').next())
                    .context("IPv4Address")?
                    .parse()?;
                let id = c["EndpointID"].as_str().context("EndpointID")?.to_owned();
                out.insert(ip, id);
            }
        }
        Ok(out)
    }

    /// Stops dockerd with SIGTERM and waits (containers keep running with
    /// `--live-restore`).
    pub fn stop(&mut self) -> Result<()> {
        self.halt(Signal::Terminate)
    }

    /// Kills dockerd with SIGKILL (a crash).
    pub fn kill(&mut self) -> Result<()> {
        self.halt(Signal::Kill)?;
        // Its containerd dies with it, but this machine's pid 1 reaps
        // orphans late: meanwhile the zombie keeps its pid, and a dockerd
        // started then, finding that pid in containerd's pid file, waits for
        // it and gives up ("failed to start containerd"). The file names a
        // dead process either way.
        let pidfile = self.dir.join("exec/containerd/containerd.pid");
        let Ok(pid) = fs::read_to_string(&pidfile) else {
            return Ok(());
        };
        let stat = format!("/proc/{}/stat", pid.trim());
        // Killed on its parent's death, asynchronously: wait until it is.
        wait_until(Duration::from_secs(10), || {
            let Ok(stat) = fs::read_to_string(&stat) else {
                return Ok(true);
            };
            Ok(crate::process::stat_state(&stat) == Some('Z'))
        })
        .context("dockerd's containerd outlived it")?;
        fs::remove_file(&pidfile)?;
        Ok(())
    }

    fn halt(&mut self, signal: Signal) -> Result<()> {
        let process = self.process.take().context("dockerd is not running")?;
        process.signal(signal)?;
        process.wait_timeout(STOP_TIMEOUT)?;
        // Its containerd stops with it unless containers live on.
        Ok(())
    }

    /// Starts dockerd again on the same roots and waits until it answers.
    pub fn restart(&mut self, lab: &Lab) -> Result<()> {
        ensure!(self.process.is_none(), "dockerd still runs");
        self.launch(lab)
    }
}

/// Which store a [`DockerCluster`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded file store in the lab's temp dir.
    File,
    /// An etcd on the router (192.0.2.1:2379).
    Etcd,
}

/// Routed hosts, each with a dockerd and an ovl agent serving it the `ovl`
/// plugin: nodes "host-a", "host-b", ... in host order.
pub struct DockerCluster {
    pub ovl: Ovl,
    pub router: Netns,
    pub hosts: Vec<Host>,
    pub dockerds: Vec<Dockerd>,
    /// One agent per host; `None` while a test has it stopped.
    pub agents: Vec<Option<Agent>>,
    pub etcd: Option<Etcd>,
}

impl DockerCluster {
    /// Node names, in host order.
    pub const NODES: [&'static str; 3] = ["host-a", "host-b", "host-c"];

    /// `n` hosts on `store`, dockerds started with `options`.
    pub fn start(lab: &Lab, store: StoreKind, n: usize, options: DockerdOptions) -> Result<Self> {
        let (router, hosts) = lab.routed_hosts(n)?;
        let (ovl, etcd) = match store {
            StoreKind::File => (Ovl::new(lab)?, None),
            StoreKind::Etcd => {
                let addr = hosts[0].gateway.context("routed hosts have a gateway")?;
                let etcd = Etcd::start(lab, &router, addr)?;
                (Ovl::with_store(lab, &etcd.url())?, Some(etcd))
            }
        };
        let mut dockerds = Vec::new();
        let mut agents = Vec::new();
        for (host, node) in hosts.iter().zip(Self::NODES) {
            let dockerd =
                Dockerd::start(lab, host, node, &ovl.docker_plugin_socket(node), options)?;
            agents.push(Some(ovl.attach_docker(
                lab,
                host,
                node,
                &dockerd.url(),
                &dockerd.mount_namespace(),
            )?));
            dockerds.push(dockerd);
        }
        Ok(DockerCluster {
            ovl,
            router,
            hosts,
            dockerds,
            agents,
            etcd,
        })
    }

    /// `docker args...` on host `i`.
    pub fn docker(&self, i: usize, args: &[&str]) -> Result<String> {
        self.dockerds[i].docker(args)
    }

    /// `ovl args...` on host `i` as its node.
    pub fn ovl(&self, i: usize, args: &[&str]) -> Result<String> {
        self.ovl.run(&self.hosts[i].netns, Self::NODES[i], args)
    }

    /// The plugin socket of host `i`'s agent.
    pub fn plugin_socket(&self, i: usize) -> PathBuf {
        self.ovl.docker_plugin_socket(Self::NODES[i])
    }

    /// Stops host `i`'s agent (SIGTERM, clean exit).
    pub fn stop_agent(&mut self, i: usize) -> Result<()> {
        self.agents[i]
            .take()
            .context("the agent is not running")?
            .terminate()
    }

    /// Starts host `i`'s agent again.
    pub fn start_agent(&mut self, lab: &Lab, i: usize) -> Result<()> {
        ensure!(self.agents[i].is_none(), "the agent still runs");
        let node = Self::NODES[i];
        let d = &self.dockerds[i];
        self.agents[i] = Some(self.ovl.attach_docker(
            lab,
            &self.hosts[i],
            node,
            &d.url(),
            &d.mount_namespace(),
        )?);
        Ok(())
    }

    /// The endpoints the store holds for `network` on host `i` that the
    /// Docker plugin made: address → (owner, kind).
    pub fn ovl_endpoints(
        &self,
        i: usize,
        network: &str,
    ) -> Result<BTreeMap<Ipv4Addr, (String, String)>> {
        let net = self.ovl.inspect(&self.hosts[i].netns, network)?;
        let mut out = BTreeMap::new();
        for e in net["endpoints"].as_array().context("endpoints")? {
            let node = e["location"]["node"].as_str().unwrap_or_default();
            let owner = e["owner"].as_str().unwrap_or_default();
            if node != Self::NODES[i] || !owner.starts_with("docker") {
                continue;
            }
            let ip = e["ip"].as_str().context("ip")?.parse()?;
            let kind = e["location"]["kind"].as_str().unwrap_or_default();
            out.insert(ip, (owner.to_owned(), kind.to_owned()));
        }
        Ok(out)
    }

    /// Checks that on host `i` Docker and ovl agree on every endpoint of
    /// `network`: each Docker endpoint is an attached ovl endpoint owned by
    /// its ID, and ovl holds nothing else for Docker there.
    pub fn agree(&self, i: usize, network: &str) -> Result<()> {
        let docker = self.dockerds[i].endpoints(network)?;
        let ovl = self.ovl_endpoints(i, network)?;
        let want: BTreeMap<Ipv4Addr, (String, String)> = docker
            .iter()
            .map(|(ip, id)| (*ip, (format!("docker:{id}"), "container".to_owned())))
            .collect();
        ensure!(
            ovl == want,
            "host {i}: Docker has {docker:?} but ovl holds {ovl:?}"
        );
        Ok(())
    }

    /// Removes every container (while the agents still answer Docker's
    /// Leave), then stops every running agent cleanly.
    pub fn stop(self) -> Result<()> {
        for d in &self.dockerds {
            remove_all_containers(&d.socket);
        }
        for agent in self.agents.into_iter().flatten() {
            agent.stop()?;
        }
        Ok(())
    }
}

/// A container of a [`Dockerd`].
pub struct Container {
    pub name: String,
    /// Its network namespace, named in the lab (probes run in it).
    pub netns: Netns,
}

impl Container {
    /// The IPv4 address of its `eth0`.
    pub fn ip(&self) -> Result<Ipv4Addr> {
        let out = self
            .netns
            .ip(&["-o", "-4", "addr", "show", "dev", "eth0"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no IPv4 on eth0 of {}: {text}", self.name))
    }
}

/// Starts the process that holds a host's private mount namespace: this
/// host's `ovl.spec` bound over /etc/docker/plugins, and an empty
/// /run/docker/plugins so no other plugin socket on the machine is found.
fn hold_mount_namespace(lab: &Lab, netns: &Netns, dir: &Path) -> Result<ChildHandle> {
    let d = |p: &str| dir.join(p).display().to_string();
    let script = format!(
        "mount --bind {} {SPEC_DIR} && mount --bind {} {SOCKET_DIR} && exec sleep infinity",
        d("plugins"),
        d("no-sockets"),
    );
    let netns_path = format!("--net=/run/netns/{}", netns.name());
    let holder = lab.spawn_here(
        &[
            "nsenter",
            &netns_path,
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ],
        &[],
    )?;
    // Every step execs, so the pid is sleep's once the mounts are made.
    let exe = format!("/proc/{}/exe", holder.pid());
    wait_until(Duration::from_secs(5), || {
        Ok(holder.try_status()?.is_some()
            || fs::read_link(&exe)?.to_string_lossy().ends_with("sleep"))
    })?;
    if let Some(status) = holder.try_status()? {
        bail!(
            "the mount namespace of {netns} could not be set up ({status}):\n{}",
            holder.output_report()
        );
    }
    Ok(holder)
}

/// Removes every container of the dockerd on `socket`, if it answers.
fn remove_all_containers(socket: &Path) {
    let host = format!("unix://{}", socket.display());
    let Ok(out) = cmd::run_unchecked(&[DOCKER_CLI, "-H", &host, "ps", "-aq"]) else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if ids.is_empty() {
        return;
    }
    let mut argv = vec![DOCKER_CLI, "-H", &host, "rm", "-f"];
    argv.extend(ids.iter().map(String::as_str));
    if let Ok(out) = cmd::run_unchecked(&argv)
        && !out.status.success()
    {
        eprintln!(
            "ovl-tests: docker rm -f: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One call to a Docker plugin socket, as dockerd makes it: `POST /METHOD`
/// with a JSON body. Returns the HTTP status and the body.
pub fn plugin_call(socket: &Path, method: &str, body: &str) -> Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connect to the plugin socket {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    // One write of the whole request: `write!` on the stream writes piece
    // by piece, and a plugin that answers without reading the body (a 404)
    // may close the connection before the body's piece is written (EPIPE).
    let request = format!(
        "POST /{method} HTTP/1.1\r\nHost: plugin\r\n\
         Content-Type: application/vnd.docker.plugins.v1+json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, rest) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header end in {raw:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)?
    } else {
        rest.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").context("chunk size line")?;
        let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).context("short chunk")?);
        s = rest.get(size + 2..).context("chunk end")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n").unwrap(),
            "hello!"
        );
    }
}
