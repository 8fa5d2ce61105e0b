// ovl on a host for months: containers come and go, some without a
// disconnect, connects and agents die at bad moments. Nothing may pile up.

//! One scenario: two hosts with agents, three networks, a few hundred
//! random steps, each host's at the same time as the other's (seeded:
//! `OVL_CHURN_SEED` replays each host's steps), with host A's agent
//! SIGKILLed and started again three times, then everything
//! disconnected. Every host must be back to its footprint before the churn
//! — every pinned map's entries, links, hooks, nftables, iptables, rules,
//! routes, pins, state files — and so must the store, the resolv.conf
//! files, the agents' open descriptors and their DNS; containers connected
//! last must reach each other and find each other by name.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ovl_tests::{
    AGENT_METRICS, Agent, ChildHandle, Cluster, DnsUpstream, Footprint, Lab, Netns, Signal,
    TwoHosts, ping, wait_until,
};

/// The networks: a plain one, one of two routed subnets, an internal one
/// (no egress NAT, no published ports).
const NETWORKS: [(&str, &str, &[&str]); 3] = [
    ("red", "198.18.0.0/24", &[]),
    ("blue", "198.18.1.0/24", &["--subnet", "198.18.2.0/24"]),
    ("green", "198.18.3.0/24", &["--internal"]),
];

/// The maps that hold what a node serves: empty while it has no endpoint.
const SERVING_MAPS: [&str; 5] = [
    "OVL_NETWORKS",
    "OVL_SUBNETS",
    "OVL_ENDPOINTS",
    "OVL_VTEPS",
    "OVL_IFACES",
];

/// Random steps on each host after the warm-up, both hosts at once
/// (`OVL_CHURN_STEPS` for a longer soak).
const STEPS_PER_HOST: usize = 100;

/// Host A's agent is SIGKILLed at these steps of host A and started again
/// [`AGENT_DOWN_STEPS`] steps later; host B's runs throughout, so its open
/// descriptors can be compared with its own before the churn.
const AGENT_KILLS: [usize; 3] = [20, 50, 80];
const AGENT_DOWN_STEPS: usize = 8;

/// The agents collect an abandoned endpoint after this (`--gc-grace`, s).
const GC_GRACE: &str = "1";

/// Where the router's DNS answers what ovl forwards (REFUSED, at once):
/// names of gone containers must be ovl's NXDOMAIN, not an upstream's
/// timeout.
const UPSTREAM_DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// A xorshift generator: steps replayable from the seed a failure prints.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// What the churn did so far, shared with the test's failure message.
#[derive(Clone, Default)]
struct Steps(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Steps {
    fn push(&self, step: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(step);
    }

    fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }
}

/// What the test believes of a container's attachment to a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attached {
    /// `ovl connect` succeeded.
    Yes,
    /// `ovl connect` was killed: anything from nothing to all of it.
    Unsure,
}

/// A container of the churn: a namespace on the churner's host.
struct Container {
    netns: Netns,
    networks: BTreeMap<&'static str, Attached>,
}

/// The churn on one host, with its own containers and random steps.
struct Churner<'a> {
    lab: &'a Lab,
    world: &'a TwoHosts,
    host: usize,
    /// Host A's agent while the churn kills and starts it (the cluster
    /// holds host B's).
    agent: Option<Agent>,
    agent_env: &'a [(&'static str, String)],
    rng: Rng,
    containers: Vec<Container>,
    /// Containers made so far.
    made: usize,
    /// Every name and alias ever given on a network.
    names: BTreeMap<&'static str, BTreeSet<String>>,
    next_port: u16,
    /// How long a whole `ovl connect` takes here: killed ones die within.
    connect_time: Duration,
    log: Steps,
}

impl Churner<'_> {
    fn node(&self) -> &'static str {
        Cluster::NODES[self.host]
    }

    fn new_container(&mut self) -> Result<usize> {
        // Never a name again: a name's endpoint is its until collected.
        self.made += 1;
        let netns = self
            .lab
            .container(&format!("{}{}", ["a", "b"][self.host], self.made))?;
        self.containers.push(Container {
            netns,
            networks: BTreeMap::new(),
        });
        Ok(self.containers.len() - 1)
    }

    /// The `ovl connect` arguments for container `c` on `network`: now and
    /// then a published port (not on the internal network) and a shared
    /// alias.
    fn connect_args(&mut self, c: usize, network: &'static str) -> Vec<String> {
        let mut args: Vec<String> = ["connect", network, self.containers[c].netns.name()]
            .map(str::to_owned)
            .into();
        let names = self.names.entry(network).or_default();
        names.insert(self.containers[c].netns.name().to_owned());
        if network != "green" && self.rng.chance(30) {
            self.next_port += 1;
            args.extend(["--publish".to_owned(), format!("{}:80", self.next_port)]);
        }
        if self.rng.chance(30) {
            let alias = format!("{network}-svc");
            names.insert(alias.clone());
            args.extend(["--alias".to_owned(), alias]);
        }
        args
    }

    /// Runs `ovl args...` on the churner's host, whatever its outcome.
    fn ovl(&self, args: &[&str]) -> Result<std::process::Output> {
        let ns = &self.world.hosts[self.host].netns;
        self.world.ovl.run_unchecked(ns, self.node(), args)
    }

    fn connect(&mut self, c: usize, network: &'static str) -> Result<()> {
        let args = self.connect_args(c, network);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.world.run(self.host, &args)?;
        self.log
            .push(format!("  {}", out.lines().next().unwrap_or_default()));
        self.containers[c].networks.insert(network, Attached::Yes);
        Ok(())
    }

    /// `ovl connect` of container `c` to `network`, SIGKILLed after a
    /// random part of the time a whole one takes.
    fn killed_connect(&mut self, c: usize, network: &'static str) -> Result<()> {
        let args = self.connect_args(c, network);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let delay = self
            .connect_time
            .mul_f64(self.rng.below(1000) as f64 / 1000.0);
        let ns = &self.world.hosts[self.host].netns;
        let child = self.world.ovl.spawn(self.lab, ns, self.node(), &args)?;
        std::thread::sleep(delay);
        kill(&child)?;
        self.containers[c]
            .networks
            .insert(network, Attached::Unsure);
        self.log.push(format!(
            "{}: killed the connect of {} to {network} after {delay:?}",
            self.node(),
            self.containers[c].netns
        ));
        Ok(())
    }

    /// Connects container `c` to `network` again after a killed connect:
    /// the next connect reclaims what it left, or finds it finished.
    fn reconnect(&mut self, c: usize, network: &'static str) -> Result<()> {
        let args = self.connect_args(c, network);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ovl(&args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() || err.contains("already connected"),
            "reconnecting {} to {network} after its connect was killed: {}\n{err}",
            self.containers[c].netns,
            out.status
        );
        self.containers[c].networks.insert(network, Attached::Yes);
        Ok(())
    }

    fn disconnect(&mut self, c: usize, network: &'static str) -> Result<()> {
        let container = &self.containers[c];
        let args = ["disconnect", network, container.netns.name()];
        match container.networks.get(network) {
            Some(Attached::Yes) => {
                self.world.run(self.host, &args)?;
            }
            _ => {
                // A killed connect may have registered nothing, or the
                // agent may have collected what it left.
                let out = self.ovl(&args)?;
                let err = String::from_utf8_lossy(&out.stderr);
                ensure!(
                    out.status.success() || err.contains("not connected"),
                    "disconnecting {} from {network} after its connect was killed: {}\n{err}",
                    container.netns,
                    out.status
                );
            }
        }
        self.containers[c].networks.remove(network);
        Ok(())
    }

    /// The container goes away without a disconnect.
    fn vanish(&mut self, c: usize) -> Result<()> {
        let container = self.containers.remove(c);
        self.lab.delete_netns_keeping_etc(&container.netns)?;
        Ok(())
    }

    /// Disconnects every container from every network it may be on and
    /// deletes it.
    fn disconnect_all(&mut self) -> Result<()> {
        for c in (0..self.containers.len()).rev() {
            let networks: Vec<&'static str> = self.containers[c].networks.keys().copied().collect();
            for network in networks {
                self.disconnect(c, network)?;
            }
            self.vanish(c)?;
        }
        Ok(())
    }

    /// A network container `c` is not on, if any.
    fn other_network(&mut self, c: usize) -> Option<&'static str> {
        let free: Vec<&'static str> = NETWORKS
            .iter()
            .map(|(n, _, _)| *n)
            .filter(|n| !self.containers[c].networks.contains_key(n))
            .collect();
        (!free.is_empty()).then(|| free[self.rng.below(free.len())])
    }

    /// SIGKILLs host A's agent; its data path stays pinned.
    fn kill_agent(&mut self) -> Result<()> {
        let agent = self.agent.take().context("host A's agent is running")?;
        self.log.push(format!("{}: SIGKILL the agent", self.node()));
        agent.kill()?;
        agent.wait_exit(Duration::from_secs(5))?;
        Ok(())
    }

    /// Starts host A's agent again.
    fn start_agent(&mut self) -> Result<()> {
        self.log
            .push(format!("{}: start the agent again", self.node()));
        let env: Vec<(&str, &str)> = self
            .agent_env
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let agent = self.world.ovl.attach_with_env(
            self.lab,
            &self.world.hosts[self.host],
            self.node(),
            "auto",
            &env,
        )?;
        agent.wait_in_step()?;
        self.agent = Some(agent);
        Ok(())
    }

    /// `steps` random steps; host A's agent is killed at [`AGENT_KILLS`]
    /// and started again [`AGENT_DOWN_STEPS`] later.
    fn churn(&mut self, steps: usize) -> Result<()> {
        let mut restart_at = None;
        for step in 0..steps {
            if self.agent.is_some() && AGENT_KILLS.contains(&step) {
                self.kill_agent()?;
                restart_at = Some(step + AGENT_DOWN_STEPS);
            }
            if restart_at == Some(step) {
                self.start_agent()?;
                restart_at = None;
            }
            self.step()
                .with_context(|| format!("{} step {step}", self.node()))?;
        }
        if restart_at.is_some() {
            self.start_agent()?;
        }
        Ok(())
    }

    /// One random step.
    fn step(&mut self) -> Result<()> {
        let node = self.node();
        let roll = self.rng.below(100);
        if self.containers.is_empty() || roll < 25 {
            let c = self.new_container()?;
            let network = self
                .other_network(c)
                .context("a new container is on none")?;
            self.log.push(format!(
                "{node}: connect new {} to {network}",
                self.containers[c].netns
            ));
            return self.connect(c, network);
        }
        let c = self.rng.below(self.containers.len());
        let name = self.containers[c].netns.to_string();
        let on: Vec<(&'static str, Attached)> = self.containers[c]
            .networks
            .iter()
            .map(|(n, a)| (*n, *a))
            .collect();
        match roll {
            25..45 => match self.other_network(c) {
                Some(network) => {
                    self.log
                        .push(format!("{node}: connect {name} to {network}"));
                    self.connect(c, network)
                }
                None => Ok(()),
            },
            45..65 if !on.is_empty() => {
                let (network, attached) = on[self.rng.below(on.len())];
                self.log
                    .push(format!("{node}: disconnect {name} from {network}"));
                if attached == Attached::Unsure && self.rng.chance(50) {
                    self.log.push("  (by connecting it again first)".into());
                    self.reconnect(c, network)?;
                }
                self.disconnect(c, network)
            }
            65..80 => {
                self.log
                    .push(format!("{node}: delete {name} without a disconnect"));
                self.vanish(c)
            }
            80..95 => {
                let c = match self.rng.chance(50) {
                    true => c,
                    false => self.new_container()?,
                };
                match self.other_network(c) {
                    Some(network) => self.killed_connect(c, network),
                    None => Ok(()),
                }
            }
            _ => match on.iter().find(|(_, a)| *a == Attached::Unsure) {
                Some((network, _)) => {
                    self.log
                        .push(format!("{node}: reconnect {name} to {network}"));
                    self.reconnect(c, network)
                }
                None => Ok(()),
            },
        }
    }
}

/// SIGKILLs `child` unless it has finished, and reaps it.
fn kill(child: &ChildHandle) -> Result<()> {
    if child.try_status()?.is_none()
        && let Err(e) = child.signal(Signal::Kill)
        && child.try_status()?.is_none()
    {
        return Err(e);
    }
    child.wait_timeout(Duration::from_secs(10))?;
    Ok(())
}

/// Host `i`'s footprint and its agent's (the kinds of its open descriptors
/// and the gauges it exports). The data path's caches of the ways to other
/// nodes fill and empty with traffic: only what they cache is checked,
/// here — other nodes' VTEPs, one entry each at most.
fn footprint(world: &TwoHosts, i: usize, agent_pid: Option<u32>) -> Result<Footprint> {
    let mut f = Footprint::of_node(&world.ovl, &world.hosts[i], Cluster::NODES[i])?;
    let others: Vec<String> = (0..world.hosts.len())
        .filter(|&h| h != i)
        .map(|h| {
            let vtep = world.hosts[h].addr.octets();
            vtep.iter().map(|b| format!("{b:02x}")).collect()
        })
        .collect();
    for cache in ["map OVL_NEXT_HOPS", "map OVL_PATH_MTU"] {
        let vteps = f.take(cache);
        let mut unique = vteps.clone();
        unique.dedup();
        ensure!(
            unique.len() == vteps.len() && vteps.iter().all(|v| others.contains(v)),
            "{} {cache} holds {vteps:?}: not only other nodes' VTEPs {others:?}",
            Cluster::NODES[i]
        );
    }
    if let Some(pid) = agent_pid {
        // Before the scrape below, whose connection the agent may not have
        // closed yet.
        f.insert("agent descriptors", descriptor_kinds(pid)?);
    }
    let metrics = world.scrape(i)?;
    let gauges = metrics
        .lines()
        .filter(|l| {
            [
                "ovl_network_endpoints",
                "ovl_dns_namespaces",
                "ovl_address_conflicts",
            ]
            .iter()
            .any(|g| l.starts_with(g))
        })
        .map(str::to_owned)
        .collect();
    f.insert("agent gauges", gauges);
    Ok(f)
}

/// What each open descriptor of process `pid` is: a path, or the kind of
/// a socket, pipe or anonymous inode (their inode numbers left out). The
/// fewest of a few looks: a question in flight (a forwarded DNS query, an
/// API call) holds a socket for a moment.
fn descriptor_kinds(pid: u32) -> Result<Vec<String>> {
    let dir = format!("/proc/{pid}/fd");
    let mut fewest: Option<Vec<String>> = None;
    for _ in 0..5 {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
            let Ok(target) = std::fs::read_link(entry?.path()) else {
                continue; // closed meanwhile
            };
            let target = target.to_string_lossy().into_owned();
            out.push(match target.split_once(":[") {
                Some((kind, _)) => kind.to_owned(),
                None => target,
            });
        }
        if fewest.as_ref().is_none_or(|f| out.len() < f.len()) {
            fewest = Some(out);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(fewest.unwrap_or_default())
}

/// The host's and the store's footprints, and the lab's resolv.conf files.
fn everything(world: &TwoHosts, lab: &Lab) -> Result<Footprint> {
    let mut all = Footprint::of_store(&world.ovl, &world.hosts[0].netns)?;
    for i in 0..world.hosts.len() {
        // Host A's agent is a new process after the churn; the cluster
        // holds host B's alone meanwhile.
        let pid = (i == 1).then(|| world.agents[0].pid());
        all.merge(Cluster::NODES[i], footprint(world, i, pid)?);
    }
    let etc: Vec<String> = std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(lab.prefix()))
        .collect();
    all.insert("/etc/netns", etc);
    Ok(all)
}

/// The names among `names` the resolver of `ns` answers, asked in one
/// `dig`.
fn resolved(ns: &Netns, names: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    let mut argv = vec!["dig", "+tries=1", "+time=3", "+noall", "+answer"];
    argv.extend(names.iter().map(String::as_str));
    let out = ns.exec(&argv)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| n.trim_end_matches('.').to_owned())
        .collect())
}

#[test]
fn nothing_ovl_makes_outlives_hundreds_of_containers_killed_connects_and_agent_restarts()
-> Result<()> {
    let steps = Steps::default();
    let lab = Lab::new("churn")?;
    run_churn(&lab, &steps).with_context(|| format!("the churn's steps:\n{}", steps.text()))
}

fn run_churn(lab: &Lab, steps: &Steps) -> Result<()> {
    let started = Instant::now();
    let (router, hosts) = lab.routed_hosts(2)?;
    let _upstream = DnsUpstream {
        listen: UPSTREAM_DNS,
        known: &[],
        missing: &[],
        log_queries: false,
    }
    .start(lab, &router)?;
    let agent_env: Vec<(&str, String)> = vec![
        ("OVL_GC_GRACE", GC_GRACE.to_owned()),
        ("OVL_METRICS", AGENT_METRICS.to_owned()),
        ("OVL_DNS_UPSTREAM", UPSTREAM_DNS.to_string()),
    ];
    let env: Vec<(&str, &str)> = agent_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut world =
        Cluster::with_agents(lab, ovl_tests::Ovl::new(lab)?, router, hosts, "auto", &env)?;
    for (name, subnet, extra) in NETWORKS {
        world
            .ovl
            .create_network(&world.hosts[0].netns, name, subnet, extra)?;
    }
    let seed = match std::env::var("OVL_CHURN_SEED") {
        Ok(s) => s.parse().context("OVL_CHURN_SEED is a number")?,
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64
                | 1
        }
    };
    eprintln!("churn seed {seed} (OVL_CHURN_SEED replays each host's steps)");
    steps.push(format!("seed {seed}"));
    let per_host = match std::env::var("OVL_CHURN_STEPS") {
        Ok(n) => n.parse().context("OVL_CHURN_STEPS is a number")?,
        Err(_) => STEPS_PER_HOST,
    };
    // Host A's agent is the churn's to kill and start; the cluster keeps
    // host B's, which runs throughout.
    let agent_a = world.agents.remove(0);
    let agent_a = churn_and_settle(lab, &world, agent_a, &agent_env, seed, per_host, steps)?;
    world.agents.insert(0, agent_a);
    eprintln!("back to the start in {:?} in all", started.elapsed());
    world.stop()
}

/// The warm-up, the baseline, the churn on both hosts at once, the last
/// containers' traffic and names, and the comparison with the baseline;
/// returns host A's agent.
fn churn_and_settle(
    lab: &Lab,
    world: &TwoHosts,
    agent_a: Agent,
    agent_env: &[(&'static str, String)],
    seed: u64,
    per_host: usize,
    steps: &Steps,
) -> Result<Agent> {
    let started = Instant::now();
    let mut churners: Vec<Churner> = (0..2)
        .map(|host| Churner {
            lab,
            world,
            host,
            agent: None,
            agent_env,
            rng: Rng(seed.wrapping_add(host as u64).max(1)),
            containers: Vec::new(),
            made: 0,
            names: BTreeMap::new(),
            next_port: 20000,
            connect_time: Duration::ZERO,
            log: steps.clone(),
        })
        .collect();
    churners[0].agent = Some(agent_a);

    // Warm-up: a container of each network on each host, reaching each
    // other, then gone: what ovl keeps per node or per network whatever
    // its containers (next hops) is there before.
    let mut timed = Vec::new();
    for churner in churners.iter_mut() {
        for (network, _, _) in NETWORKS {
            let c = churner.new_container()?;
            let t = Instant::now();
            churner.connect(c, network)?;
            timed.push(t.elapsed());
        }
    }
    let connect_time = timed.iter().sum::<Duration>() / timed.len() as u32;
    for (i, (network, _, _)) in NETWORKS.iter().enumerate() {
        pings(&churners, (0, i), (1, i), network)?;
    }
    for churner in churners.iter_mut() {
        churner.disconnect_all()?;
        churner.names.clear();
        churner.connect_time = connect_time;
    }
    // A node serves only the networks it has endpoints of; the baseline
    // is taken once the agents have applied the last disconnects (the
    // same twice in a row).
    let mut before = Footprint::default();
    let mut last = None;
    let settled = wait_until(Duration::from_secs(10), || {
        before = everything(world, lab)?;
        let unserved = SERVING_MAPS.iter().all(|m| {
            Cluster::NODES[..2]
                .iter()
                .all(|n| before.lines(&format!("{n}: map {m}")).is_empty())
        });
        let same = last.as_ref() == Some(&before);
        last = Some(before.clone());
        Ok(unserved && same)
    });
    if settled.is_err() {
        bail!("with no container left, a node still serves a network:\n{before:#?}");
    }
    eprintln!(
        "warmed up in {:?}; a connect takes {connect_time:?}",
        started.elapsed()
    );

    let churn_started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let running: Vec<_> = churners
            .iter_mut()
            .map(|churner| scope.spawn(move || churner.churn(per_host)))
            .collect();
        for thread in running {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a churn thread panicked"))??;
        }
        Ok(())
    })?;
    eprintln!(
        "{per_host} steps on each host in {:?}: {} containers left",
        churn_started.elapsed(),
        churners.iter().map(|c| c.containers.len()).sum::<usize>()
    );

    // The containers connected last reach each other, by address and by
    // name, once every other is gone; no name of a container gone resolves.
    let mut asked: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for churner in churners.iter_mut() {
        churner.disconnect_all()?;
        for (network, names) in &churner.names {
            asked
                .entry(network)
                .or_default()
                .extend(names.iter().cloned());
        }
        let c = churner.new_container()?;
        for (network, _, _) in NETWORKS {
            let name = churner.containers[c].netns.name().to_owned();
            churner
                .world
                .run(churner.host, &["connect", network, &name])?;
            churner.containers[c]
                .networks
                .insert(network, Attached::Yes);
        }
    }
    let want: BTreeSet<String> = churners
        .iter()
        .map(|c| c.containers[0].netns.name().to_owned())
        .collect();
    for (network, _, _) in NETWORKS {
        pings(&churners, (0, 0), (1, 0), network)?;
        pings(&churners, (1, 0), (0, 0), network)?;
        let mut asked = asked.get(network).cloned().unwrap_or_default();
        asked.extend(want.iter().cloned());
        let mut got = BTreeSet::new();
        // The agents collect the containers gone without a disconnect
        // within their grace.
        let settled = wait_until(Duration::from_secs(10), || {
            got = resolved(&churners[0].containers[0].netns, &asked)?;
            Ok(got == want)
        });
        if settled.is_err() {
            bail!(
                "names on {network}: resolved though gone {:?}, not resolved {:?}",
                got.difference(&want).collect::<Vec<_>>(),
                want.difference(&got).collect::<Vec<_>>()
            );
        }
    }

    // Everything disconnected, every container gone, the grace passed.
    for churner in churners.iter_mut() {
        churner.disconnect_all()?;
    }
    let mut after = Footprint::default();
    let settled = wait_until(Duration::from_secs(20), || {
        after = everything(world, lab)?;
        Ok(after == before)
    });
    if settled.is_err() {
        bail!(
            "after {per_host} steps on each host ovl left this behind:\n{}",
            after.changes_since(&before),
        );
    }
    churners[0]
        .agent
        .take()
        .context("host A's agent runs after the churn")
}

/// Container `a` (churner, index) reaches `b` on `network`.
fn pings(churners: &[Churner], a: (usize, usize), b: (usize, usize), network: &str) -> Result<()> {
    let from = &churners[a.0].containers[a.1].netns;
    let to = &churners[b.0].containers[b.1].netns;
    let addr = address_of(churners[0].world, to, network)?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(from, addr, 1, &["-W", "1"])?.all_received())
    })
    .with_context(|| format!("{from} never reached {to} ({addr}) on {network}"))
}

/// The address `container` has on `network`, as the store says.
fn address_of(world: &TwoHosts, container: &Netns, network: &str) -> Result<Ipv4Addr> {
    let net = world.inspect(0, network)?;
    net["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .find(|e| e["location"]["netns"] == container.name())
        .and_then(|e| e["ip"].as_str())
        .with_context(|| format!("{container} is not on {network}: {net}"))?
        .parse()
        .context("an endpoint's address")
}
