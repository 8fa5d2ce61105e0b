// Driving ovl itself in a lab: a shared store (file or URL) and bpffs, agents
// as lab processes, and typed reads of `ovl stats --json`.

//! Every `ovl` call runs inside a host namespace with `OVL_STORE`,
//! `OVL_PIN_ROOT` and `OVL_NODE` set, exactly as a user would run it there.
//! The store is a file in the lab's temp dir ([`Ovl::new`]) or any store
//! URL, such as an etcd the lab runs ([`Ovl::with_store`]).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{ChildHandle, Host, Lab, Netns, Signal, ovl_binary, wait_until};

/// One ovl deployment inside a lab: its store and pin root.
pub struct Ovl {
    bin: PathBuf,
    /// The store URL every command and agent gets as `OVL_STORE`.
    store: String,
    pin_root: PathBuf,
    /// Where each node's API socket and agent state go (the lab's temp
    /// dir): parallel labs never share `/run/ovl` or `/var/lib/ovl`.
    run_dir: PathBuf,
}

/// A running `ovl attach`.
pub struct Agent {
    child: ChildHandle,
    /// Node name the agent runs as.
    pub node: String,
}

/// Per-network counters as `ovl stats --json` reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub local_packets: u64,
    pub arp_replies: u64,
    pub egress_packets: u64,
    pub no_endpoint: u64,
    pub unknown_vni: u64,
    pub unknown_vtep: u64,
    pub malformed: u64,
    pub too_big: u64,
    pub unsupported: u64,
    pub no_route: u64,
    pub spoofed_source: u64,
    pub ttl_exceeded: u64,
    pub path_mtu: u64,
    pub no_key: u64,
    pub unencrypted: u64,
    pub congestion: u64,
}

impl NetCounters {
    fn from_json(v: &Value) -> Result<Self> {
        let n = |k: &str| v[k].as_u64().with_context(|| format!("{k} missing in {v}"));
        let d = |k: &str| {
            v["drops"][k]
                .as_u64()
                .with_context(|| format!("drops.{k} missing in {v}"))
        };
        Ok(NetCounters {
            tx_packets: n("tx_packets")?,
            tx_bytes: n("tx_bytes")?,
            rx_packets: n("rx_packets")?,
            rx_bytes: n("rx_bytes")?,
            local_packets: n("local_packets")?,
            arp_replies: n("arp_replies")?,
            egress_packets: n("egress_packets")?,
            no_endpoint: d("no_endpoint")?,
            unknown_vni: d("unknown_vni")?,
            unknown_vtep: d("unknown_vtep")?,
            malformed: d("malformed")?,
            too_big: d("too_big")?,
            unsupported: d("unsupported")?,
            no_route: d("no_route")?,
            spoofed_source: d("spoofed_source")?,
            ttl_exceeded: d("ttl_exceeded")?,
            path_mtu: d("path_mtu")?,
            no_key: d("no_key")?,
            unencrypted: d("unencrypted")?,
            congestion: d("congestion")?,
        })
    }

    /// Sum of every drop reason.
    pub fn drops(&self) -> u64 {
        self.no_endpoint
            + self.unknown_vni
            + self.unknown_vtep
            + self.malformed
            + self.too_big
            + self.unsupported
            + self.no_route
            + self.spoofed_source
            + self.ttl_exceeded
            + self.path_mtu
            + self.no_key
            + self.unencrypted
            + self.congestion
    }
}

impl Ovl {
    /// A fresh store directory and bpffs in `lab`.
    pub fn new(lab: &Lab) -> Result<Ovl> {
        let store = lab.tempdir().join("store");
        Self::with_store(lab, &format!("file://{}", store.display()))
    }

    /// A fresh bpffs in `lab` and the store at `url` (`etcd://HOST:PORT`,
    /// `file:///PATH`, or a deliberately bad URL).
    pub fn with_store(lab: &Lab, url: &str) -> Result<Ovl> {
        Ok(Ovl {
            bin: ovl_binary()?,
            store: url.to_owned(),
            pin_root: lab.bpffs()?,
            run_dir: lab.tempdir().to_owned(),
        })
    }

    /// The same deployment (binary, pin root) pointed at another store
    /// URL: what a node with a mistyped `OVL_STORE` would run.
    pub fn using_store(&self, url: &str) -> Ovl {
        Ovl {
            bin: self.bin.clone(),
            store: url.to_owned(),
            pin_root: self.pin_root.clone(),
            run_dir: self.run_dir.clone(),
        }
    }

    /// The store URL commands and agents are given.
    pub fn store_url(&self) -> &str {
        &self.store
    }

    /// The `OVL_*` environment of node `node`.
    pub fn env(&self, node: &str) -> Vec<(String, String)> {
        vec![
            ("OVL_STORE".into(), self.store.clone()),
            ("OVL_PIN_ROOT".into(), self.pin_root.display().to_string()),
            ("OVL_NODE".into(), node.into()),
            // Lab agents serve Docker only where a test starts a dockerd
            // for them, never the machine's own.
            ("OVL_DOCKER_HOST".into(), "off".into()),
            (
                "OVL_API_SOCKET".into(),
                self.api_socket(node).display().to_string(),
            ),
            (
                "OVL_STATE_DIR".into(),
                self.state_dir(node).display().to_string(),
            ),
        ]
    }

    /// The agent state directory of node `node` (`OVL_STATE_DIR`).
    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("state-{node}"))
    }

    /// The API socket of node `node`'s agent.
    pub fn api_socket(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("api-{node}.sock"))
    }

    /// The pin directory of node `node`.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        self.pin_root.join(node)
    }

    fn argv(&self, node: &str, args: &[&str]) -> Vec<String> {
        self.argv_with_env(node, &[], args)
    }

    /// `env OVL_*=... EXTRA=... ovl args...`; `extra_env` comes last so
    /// it can also override an `OVL_*` variable.
    fn argv_with_env(&self, node: &str, extra_env: &[(&str, &str)], args: &[&str]) -> Vec<String> {
        let mut argv = vec!["env".to_owned()];
        argv.extend(self.env(node).into_iter().map(|(k, v)| format!("{k}={v}")));
        argv.extend(extra_env.iter().map(|(k, v)| format!("{k}={v}")));
        argv.push(self.bin.display().to_string());
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    /// Runs `ovl args...` in namespace `ns` as node `node`; fails unless it
    /// exits 0. Returns stdout.
    pub fn run(&self, ns: &Netns, node: &str, args: &[&str]) -> Result<String> {
        let argv = self.argv(node, args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = ns.exec(&argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ovl args...` and returns its output whatever the exit status.
    pub fn run_unchecked(
        &self,
        ns: &Netns,
        node: &str,
        args: &[&str],
    ) -> Result<std::process::Output> {
        let argv = self.argv(node, args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        ns.exec_unchecked(&argv)
    }

    /// Runs `ovl args...` with extra environment (overriding `OVL_*` too)
    /// and returns its output whatever the exit status.
    pub fn run_with_env_unchecked(
        &self,
        ns: &Netns,
        node: &str,
        extra_env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<std::process::Output> {
        let argv = self.argv_with_env(node, extra_env, args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        ns.exec_unchecked(&argv)
    }

    /// Starts `ovl args...` in the background in namespace `ns` as node
    /// `node`, as a process of `lab` (for a command a test kills half-way).
    pub fn spawn(&self, lab: &Lab, ns: &Netns, node: &str, args: &[&str]) -> Result<ChildHandle> {
        let argv = self.argv(node, args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        lab.spawn(ns, &argv, &[])
    }

    /// Starts `ovl attach eth0 --mode MODE` on `host` as `node` and waits
    /// until its maps are pinned and its decap hook is attached.
    pub fn attach(&self, lab: &Lab, host: &Host, node: &str, mode: &str) -> Result<Agent> {
        self.attach_with_env(lab, host, node, mode, &[])
    }

    /// [`attach`](Self::attach) with extra environment for the agent, such
    /// as `OVL_LEASE_TTL`.
    pub fn attach_with_env(
        &self,
        lab: &Lab,
        host: &Host,
        node: &str,
        mode: &str,
        extra_env: &[(&str, &str)],
    ) -> Result<Agent> {
        let agent = self.spawn_agent(lab, host, node, mode, extra_env)?;
        Self::wait_attached(agent)
    }

    fn wait_attached(agent: Agent) -> Result<Agent> {
        wait_until(Duration::from_secs(15), || {
            if let Some(status) = agent.child.try_status()? {
                bail!(
                    "ovl attach exited early ({status}):\n{}",
                    agent.child.output_report()
                );
            }
            Ok(agent.child.stderr()?.contains(" attached to "))
        })
        .with_context(|| {
            format!(
                "agent {} did not come up:\n{}",
                agent.node,
                agent.child.output_report()
            )
        })?;
        Ok(agent)
    }

    /// The Docker plugin socket of node `node`'s agent.
    pub fn docker_plugin_socket(&self, node: &str) -> PathBuf {
        self.run_dir.join(format!("plugin-{node}.sock"))
    }

    /// Starts `ovl attach eth0` on `host` as `node`, serving the Docker
    /// plugin on [`docker_plugin_socket`](Self::docker_plugin_socket) for
    /// the dockerd at `docker_url`, and waits until it is attached. It runs
    /// in the host's network namespace and in the mount namespace
    /// `mount_ns` (`/proc/PID/ns/mnt`) dockerd runs in, as on a real host
    /// where both share one: there it can open the containers' network
    /// namespaces (Docker's `SandboxKey` mounts) to serve their resolver.
    pub fn attach_docker(
        &self,
        lab: &Lab,
        host: &Host,
        node: &str,
        docker_url: &str,
        mount_ns: &Path,
    ) -> Result<Agent> {
        let socket = self.docker_plugin_socket(node).display().to_string();
        let argv = self.argv_with_env(
            node,
            &[
                ("OVL_DOCKER_HOST", docker_url),
                ("OVL_DOCKER_PLUGIN_SOCKET", &socket),
                ("RUST_LOG", "info"),
            ],
            &["attach", &host.iface, "--mode", "auto"],
        );
        let net = format!("--net=/run/netns/{}", host.netns.name());
        let mnt = format!("--mount={}", mount_ns.display());
        let mut full = vec!["nsenter", &net, &mnt];
        full.extend(argv.iter().map(String::as_str));
        let child = lab.spawn_here(&full, &[])?;
        Self::wait_attached(Agent {
            child,
            node: node.to_owned(),
        })
    }

    /// Starts `ovl attach eth0 --mode MODE` on `host` as `node` without
    /// waiting for it to attach (for agents expected to fail).
    pub fn spawn_agent(
        &self,
        lab: &Lab,
        host: &Host,
        node: &str,
        mode: &str,
        extra_env: &[(&str, &str)],
    ) -> Result<Agent> {
        let argv = self.argv_with_env(node, extra_env, &["attach", &host.iface, "--mode", mode]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let child = lab.spawn(&host.netns, &argv, &[("RUST_LOG", "info")])?;
        Ok(Agent {
            child,
            node: node.to_owned(),
        })
    }

    /// `ovl network create NAME --subnet SUBNET [extra...]`.
    pub fn create_network(
        &self,
        ns: &Netns,
        name: &str,
        subnet: &str,
        extra: &[&str],
    ) -> Result<()> {
        let mut args = vec!["network", "create", name, "--subnet", subnet];
        args.extend_from_slice(extra);
        self.run(ns, "-", &args).map(|_| ())
    }

    /// `ovl connect NETWORK CONTAINER [extra...]` on `host` as `node`;
    /// returns the address the container got.
    pub fn connect(
        &self,
        host: &Host,
        node: &str,
        network: &str,
        container: &Netns,
        extra: &[&str],
    ) -> Result<Ipv4Addr> {
        let mut args = vec!["connect", network, container.name()];
        args.extend_from_slice(extra);
        self.run(&host.netns, node, &args)?;
        let net = self.inspect(&host.netns, network)?;
        let ep = net["endpoints"]
            .as_array()
            .context("endpoints array")?
            .iter()
            .find(|e| e["location"]["netns"] == container.name() && e["location"]["node"] == node)
            .with_context(|| format!("{} not in inspect output {net}", container.name()))?;
        ep["ip"].as_str().context("ip")?.parse().context("parse ip")
    }

    /// `ovl network inspect NAME` as JSON.
    pub fn inspect(&self, ns: &Netns, network: &str) -> Result<Value> {
        let out = self.run(ns, "-", &["network", "inspect", network])?;
        serde_json::from_str(&out).with_context(|| format!("inspect output is not JSON: {out}"))
    }

    /// Counters of `network` on node `node` (read in `ns`).
    pub fn counters(&self, ns: &Netns, node: &str, network: &str) -> Result<NetCounters> {
        let out = self.run(ns, node, &["stats", "--json", "--network", network])?;
        let v: Value =
            serde_json::from_str(&out).with_context(|| format!("stats not JSON: {out}"))?;
        let row = v
            .as_array()
            .and_then(|a| a.first())
            .with_context(|| format!("no row in {out}"))?;
        NetCounters::from_json(row)
    }

    /// `ovl stats --underlay --json` of node `node`.
    pub fn underlay(&self, ns: &Netns, node: &str) -> Result<Value> {
        let out = self.run(ns, node, &["stats", "--underlay", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("stats not JSON: {out}"))
    }

    /// The pin root (bpffs) of this deployment.
    pub fn pin_root(&self) -> &std::path::Path {
        &self.pin_root
    }
}

impl Agent {
    /// Waits until the agent has registered its node and read the store
    /// (it attaches first and reaches the store in the background): what
    /// the store derives from the node's record, such as a new network's
    /// default MTU, holds from then on.
    pub fn wait_in_step(&self) -> Result<()> {
        wait_until(Duration::from_secs(10), || {
            Ok(self.child.stderr()?.contains(" in step with "))
        })
        .with_context(|| {
            format!(
                "agent {} did not reach its store:\n{}",
                self.node,
                self.child.output_report()
            )
        })
    }

    /// Stops the agent with SIGTERM and checks that it exits cleanly (its
    /// data path stays pinned and keeps forwarding).
    pub fn terminate(self) -> Result<()> {
        self.stop_with(Signal::Terminate)
    }

    /// Stops the agent with SIGINT and checks that it exits cleanly (its
    /// data path stays pinned and keeps forwarding).
    pub fn stop(self) -> Result<()> {
        self.stop_with(Signal::Interrupt)
    }

    fn stop_with(self, signal: Signal) -> Result<()> {
        self.child.signal(signal)?;
        let status = self.child.wait_timeout(Duration::from_secs(10))?;
        if !status.success() {
            bail!(
                "agent {} exited with {status}:\n{}",
                self.node,
                self.child.output_report()
            );
        }
        // A clean stop logs nothing alarming on its way out.
        let log = self.child.stderr()?;
        let alarms = shutdown_alarms(&log);
        if !alarms.is_empty() {
            bail!(
                "agent {} warned while stopping:\n{}\n{}",
                self.node,
                alarms.join("\n"),
                self.child.output_report()
            );
        }
        Ok(())
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The agent's log so far.
    pub fn log(&self) -> Result<String> {
        self.child.stderr()
    }

    /// Kills the agent without letting it clean up.
    pub fn kill(&self) -> Result<()> {
        self.child.signal(Signal::Kill)
    }

    /// Runs `f` with the agent frozen (SIGSTOP): whatever happens meanwhile
    /// reaches it in one burst when it goes on (SIGCONT, also when `f`
    /// fails).
    pub fn frozen<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.child.signal(Signal::Stop)?;
        // SIGSTOP takes each thread when it is next scheduled: on a loaded
        // machine the engine's threads can still handle a packet after
        // kill() returned. Wait until every thread is stopped.
        let stopped = wait_until(Duration::from_secs(10), || {
            all_threads_stopped(self.child.pid())
        });
        if let Err(e) = stopped {
            self.child.signal(Signal::Continue)?;
            return Err(e.context(format!("agent {} never stopped", self.child.pid())));
        }
        let result = f();
        self.child.signal(Signal::Continue)?;
        result
    }

    /// Waits up to `timeout` for the agent to exit; fails if it still runs.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        self.child.wait_timeout(timeout)
    }

    /// The exit status if the agent has exited, `None` while it runs.
    pub fn try_status(&self) -> Result<Option<ExitStatus>> {
        self.child.try_status()
    }

    /// Both output streams, labelled, for assertion messages.
    pub fn output_report(&self) -> String {
        self.child.output_report()
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in its
/// `/proc/PID/task/TID/stat`).
fn all_threads_stopped(pid: u32) -> Result<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("list the threads of {pid}"))?;
    for task in tasks {
        let stat = std::fs::read_to_string(task?.path().join("stat"))?;
        if crate::process::stat_state(&stat) != Some('T') {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The warnings and errors an agent logged after it was told to stop
/// (`log` is its stderr).
fn shutdown_alarms(log: &str) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    let stopping = lines
        .iter()
        .rposition(|l| l.ends_with("SIGINT: stopping") || l.ends_with("SIGTERM: stopping"));
    let Some(stopping) = stopping else {
        return Vec::new();
    };
    lines[stopping + 1..]
        .iter()
        .copied()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::shutdown_alarms;

    #[test]
    fn shutdown_alarms_are_the_warnings_after_the_stop() {
        let log = "[t WARN  ovl_userspace::agent] before\n\
                   [t INFO  ovl_userspace::agent] SIGINT: stopping\n\
                   [t INFO  ovl_userspace::agent] agent stopped\n\
                   [t WARN  netlink_proto::connection] failed to forward message\n";
        assert_eq!(
            shutdown_alarms(log),
            ["[t WARN  netlink_proto::connection] failed to forward message"]
        );
        assert!(shutdown_alarms("[t WARN  x] no stop yet\n").is_empty());
    }
}
