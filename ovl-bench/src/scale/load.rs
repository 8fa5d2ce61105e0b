// The endpoints of the scale benchmark: networks filled in batched store
// changes, then a churn of connects and disconnects at a fixed rate, each
// followed on every other node's maps by the prober.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ovl_userspace::{
    attachment::{self, Request},
    model::{ContainerSpec, Location, NetworkSpec, State},
    store::{Around, Scope, Store},
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use super::prober::{Expect, GIVE_UP, Outcome, Probe};

/// Endpoints per store change while filling: each new endpoint costs
/// three puts (its key, its name's and its attachment's claims) and four
/// compares (those and its address's release record), the change one
/// more (the network), so 30 stay within etcd's 128.
const FILL_BATCH: usize = 30;

/// Fill changes in flight at once.
const FILL_PARALLEL: usize = 4;

/// Each network is a /22 (1021 host addresses after the gateway).
const NETWORK_PREFIX: u8 = 22;
const NETWORK_SIZE: u32 = 1 << (32 - NETWORK_PREFIX);

/// First network's base address; network k is k /22s further.
const FIRST_NETWORK: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);

/// Most networks that fit 198.18.0.0/15 as /22s.
pub const MAX_NETWORKS: usize = 128;

/// Churn operations in flight at once; a tick finding this many skips
/// (the achieved rate says so).
const MAX_IN_FLIGHT: usize = 256;

/// One node as the load sees it.
#[derive(Clone, Debug)]
pub struct NodeSlot {
    pub name: String,
    pub vtep: Ipv4Addr,
}

/// A registered endpoint the benchmark made.
#[derive(Clone, Debug)]
struct Member {
    ip: Ipv4Addr,
    node: usize,
    netns: String,
}

/// One network of the benchmark.
struct NetworkSlot {
    name: String,
    vni: u32,
    /// Addresses for new endpoints (never one whose removal some node has
    /// not shown yet).
    free: VecDeque<Ipv4Addr>,
    /// Endpoints churn may remove, oldest first.
    churnable: VecDeque<Member>,
    /// Endpoints in the store now.
    count: usize,
}

/// The networks and endpoints the benchmark made so far.
pub struct Fleet {
    nodes: Vec<NodeSlot>,
    per_network: usize,
    networks: Vec<NetworkSlot>,
    /// Registered endpoints per node.
    per_node: Vec<usize>,
    next_tag: u64,
}

/// How one churn operation went.
#[derive(Clone, Debug)]
pub struct OpTimes {
    /// From asking the store to its commit.
    pub commit: Duration,
    /// From asking the store until every other node showed it; `None`
    /// when some node never did.
    pub all: Option<Duration>,
    /// From asking the store until the first other node showed it.
    pub first: Option<Duration>,
}

/// What a churn run did.
#[derive(Clone, Debug, Default)]
pub struct ChurnResult {
    pub connects: Vec<OpTimes>,
    pub disconnects: Vec<OpTimes>,
    /// Operations the store refused or that failed, with the reason.
    pub errors: Vec<String>,
    /// Ticks skipped because too many operations were in flight.
    pub skipped: u64,
    /// Seconds during which operations were issued.
    pub seconds: f64,
}

impl ChurnResult {
    /// Changes committed per second (connects and disconnects together).
    pub fn changes_per_second(&self) -> f64 {
        (self.connects.len() + self.disconnects.len()) as f64 / self.seconds.max(1e-9)
    }
}

impl Fleet {
    /// No networks yet, on `nodes`, `per_network` endpoints each.
    pub fn new(nodes: Vec<NodeSlot>, per_network: usize) -> Fleet {
        Fleet {
            per_node: vec![0; nodes.len()],
            nodes,
            per_network,
            networks: Vec::new(),
            next_tag: 0,
        }
    }

    /// Endpoints registered now.
    pub fn total(&self) -> usize {
        self.networks.iter().map(|n| n.count).sum()
    }

    /// Networks made so far.
    pub fn network_count(&self) -> usize {
        self.networks.len()
    }

    /// VNI and name of network `k`.
    pub fn network(&self, k: usize) -> (u32, &str) {
        (self.networks[k].vni, &self.networks[k].name)
    }

    /// The nodes' names, in order.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Takes a free address of network `k` for a change made outside the
    /// churn; give it back with [`release`](Self::release).
    pub fn take_address(&mut self, k: usize) -> Option<Ipv4Addr> {
        self.networks[k].free.pop_front()
    }

    /// Gives back an address taken with [`take_address`](Self::take_address).
    pub fn release(&mut self, k: usize, ip: Ipv4Addr) {
        self.networks[k].free.push_back(ip);
    }
}

/// Adds networks of `fleet.per_network` endpoints until there are `total`
/// endpoints. Each node gets an equal share of every network, the first
/// `nodes` endpoints of a network one per node: those stay for good, so
/// every node always serves every network.
pub async fn grow(store: &Arc<Store>, fleet: &Arc<Mutex<Fleet>>, total: usize) -> Result<()> {
    loop {
        let (k, per_network, nodes) = {
            let f = lock(fleet);
            if f.total() >= total {
                return Ok(());
            }
            if f.networks.len() >= MAX_NETWORKS {
                bail!("{total} endpoints need more than {MAX_NETWORKS} networks");
            }
            (f.networks.len(), f.per_network, f.nodes.clone())
        };
        let name = format!("scale-{k:03}");
        let base = u32::from(FIRST_NETWORK) + k as u32 * NETWORK_SIZE;
        let subnet = format!("{}/{NETWORK_PREFIX}", Ipv4Addr::from(base));
        let spec = NetworkSpec {
            // No way out: the benchmark measures the control plane, not
            // the host's egress set-up.
            internal: true,
            ..NetworkSpec::new(&name, subnet.parse().context("benchmark subnet")?)
        };
        let vni = store
            .update_with(Scope::Networks, |s| {
                s.create_network(spec.clone()).map(|n| n.vni.get())
            })
            .await
            .with_context(|| format!("create network {name}"))?;
        // base+1 is the gateway; hosts run to base+size-2.
        let mut free: VecDeque<Ipv4Addr> = (base + 2..base + NETWORK_SIZE - 1)
            .map(Ipv4Addr::from)
            .collect();
        let members: Vec<Member> = (0..per_network)
            .map(|i| Member {
                ip: free
                    .pop_front()
                    .expect("a /22 holds more than a network's share"),
                node: i % nodes.len(),
                netns: format!("fill-{k}-{i}"),
            })
            .collect();
        let mut batches = JoinSet::new();
        for chunk in members.chunks(FILL_BATCH) {
            while batches.len() >= FILL_PARALLEL {
                batches.join_next().await.expect("not empty")??;
            }
            let specs: Vec<ContainerSpec> = chunk
                .iter()
                .map(|m| container(&name, &nodes[m.node].name, &m.netns, m.ip))
                .collect();
            let (store, name) = (store.clone(), name.clone());
            batches.spawn(async move {
                store
                    .update_with(Scope::Network(&name), |s| {
                        for spec in &specs {
                            s.add_container(spec.clone())?;
                        }
                        Ok(())
                    })
                    .await
                    .with_context(|| format!("fill network {name}"))
            });
        }
        while let Some(done) = batches.join_next().await {
            done??;
        }
        let mut f = lock(fleet);
        for m in &members {
            f.per_node[m.node] += 1;
        }
        let anchors = nodes.len();
        f.networks.push(NetworkSlot {
            name,
            vni,
            free,
            churnable: members.into_iter().skip(anchors).collect(),
            count: per_network,
        });
    }
}

/// Makes `rate` changes per second for `duration`, half connects, half
/// disconnects: tick t connects a new endpoint to network t mod N on a
/// node that turns with t, and disconnects that network's oldest
/// churnable endpoint, each through the store connection of the node it
/// is made for (`stores[i]` for node i). Each change goes to the prober,
/// which says when every other node shows it.
pub async fn churn(
    stores: &[Arc<Store>],
    fleet: &Arc<Mutex<Fleet>>,
    probes: &mpsc::Sender<Probe>,
    outcomes: &mut UnboundedReceiver<Outcome>,
    rate: u32,
    duration: Duration,
) -> Result<ChurnResult> {
    let (n_nets, n_nodes) = {
        let f = lock(fleet);
        (f.networks.len(), f.nodes.len())
    };
    if stores.len() != n_nodes {
        bail!("churn needs one store connection per node");
    }
    if n_nets == 0 {
        bail!("churn needs networks");
    }
    let commits: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = JoinSet::new();
    let mut result = ChurnResult::default();
    let mut kinds = std::collections::HashMap::new();
    let mut outcomes_seen = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2) / rate.max(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut t: usize = 0;
    while started.elapsed() < duration {
        tokio::select! {
            _ = tick.tick() => {}
            Some(o) = outcomes.recv() => {
                recycle(fleet, &o);
                outcomes_seen.push(o);
                continue;
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                done.context("a churn task panicked")?;
                continue;
            }
        }
        if tasks.len() + 2 > MAX_IN_FLIGHT {
            result.skipped += 1;
            continue;
        }
        let k = t % n_nets;
        let node = (t + t / n_nets) % n_nodes;
        t += 1;
        let (name, vni, ip, victim, nodes, tags) = {
            let mut f = lock(fleet);
            let Some(ip) = f.networks[k].free.pop_front() else {
                result.skipped += 1;
                continue;
            };
            let victim = f.networks[k].churnable.pop_front();
            let tags = (f.next_tag, f.next_tag + 1);
            f.next_tag += 2;
            (
                f.networks[k].name.clone(),
                f.networks[k].vni,
                ip,
                victim,
                f.nodes.clone(),
                tags,
            )
        };
        // Connect.
        let member = Member {
            ip,
            node,
            // Unique across every churn of the run.
            netns: format!("churn-{}", tags.0 / 2),
        };
        kinds.insert(tags.0, true);
        let request = Request {
            ports: Vec::new(),
            network: name.clone(),
            node: nodes[node].name.clone(),
            netns: member.netns.clone(),
            ifname: None,
            name: None,
            fallback_name: None,
            aliases: Vec::new(),
            ip: Some(ip),
            subnet: None,
            owner: None,
            mac: None,
        };
        let others: Vec<usize> = (0..n_nodes).filter(|i| *i != node).collect();
        let probe = Probe {
            tag: tags.0,
            vni,
            ip,
            expect: Expect::Points(nodes[node].vtep),
            started: Instant::now(),
            nodes: others,
        };
        let ctx = OpContext {
            store: stores[node].clone(),
            probes: probes.clone(),
            commits: commits.clone(),
            errors: errors.clone(),
        };
        let fleet_c = fleet.clone();
        tasks.spawn(async move {
            let ok = ctx.run(probe, Op::Connect(request)).await;
            let mut f = lock(&fleet_c);
            if ok {
                f.networks[k].churnable.push_back(member);
                f.networks[k].count += 1;
                f.per_node[node] += 1;
            } else {
                f.networks[k].free.push_back(ip);
            }
        });
        // Disconnect.
        if let Some(victim) = victim {
            let vnode = victim.node;
            kinds.insert(tags.1, false);
            let others: Vec<usize> = (0..n_nodes).filter(|i| *i != vnode).collect();
            let probe = Probe {
                tag: tags.1,
                vni,
                ip: victim.ip,
                expect: Expect::Gone(nodes[vnode].vtep),
                started: Instant::now(),
                nodes: others,
            };
            let (net, node_name) = (
                lock(fleet).networks[k].name.clone(),
                nodes[vnode].name.clone(),
            );
            let ctx = OpContext {
                store: stores[vnode].clone(),
                probes: probes.clone(),
                commits: commits.clone(),
                errors: errors.clone(),
            };
            let fleet_c = fleet.clone();
            let op = Op::Disconnect {
                network: net,
                node: node_name,
                netns: victim.netns.clone(),
            };
            tasks.spawn(async move {
                let ok = ctx.run(probe, op).await;
                let mut f = lock(&fleet_c);
                if ok {
                    f.networks[k].count -= 1;
                    f.per_node[vnode] -= 1;
                } else {
                    f.networks[k].churnable.push_front(victim);
                }
            });
        }
    }
    result.seconds = started.elapsed().as_secs_f64();
    while let Some(done) = tasks.join_next().await {
        done.context("a churn task panicked")?;
    }
    // Every committed change has a probe; wait for all their outcomes.
    let committed = lock(&commits).len();
    let deadline = Instant::now() + GIVE_UP + Duration::from_secs(5);
    while outcomes_seen.len() < committed {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, outcomes.recv()).await {
            Ok(Some(o)) => {
                recycle(fleet, &o);
                outcomes_seen.push(o);
            }
            _ => bail!(
                "the prober reported {} of {committed} changes",
                outcomes_seen.len()
            ),
        }
    }
    let commit_of: std::collections::HashMap<u64, Duration> =
        lock(&commits).iter().copied().collect();
    for o in outcomes_seen {
        let tag = o.probe.tag;
        let Some(commit) = commit_of.get(&tag).copied() else {
            continue;
        };
        let times = OpTimes {
            commit,
            all: o.all,
            first: o.first,
        };
        if !o.missing.is_empty() {
            lock(&errors).push(format!(
                "{} {} of VNI {} never showed on {} node(s)",
                if kinds[&tag] {
                    "connect of"
                } else {
                    "disconnect of"
                },
                o.probe.ip,
                o.probe.vni,
                o.missing.len()
            ));
        }
        if kinds[&tag] {
            result.connects.push(times);
        } else {
            result.disconnects.push(times);
        }
    }
    result.errors = std::mem::take(&mut *lock(&errors));
    Ok(result)
}

/// An address whose removal every other node shows may be handed out again.
fn recycle(fleet: &Arc<Mutex<Fleet>>, o: &Outcome) {
    if let (Expect::Gone(_), true) = (o.probe.expect, o.missing.is_empty()) {
        let mut f = lock(fleet);
        if let Some(net) = f.networks.iter_mut().find(|n| n.vni == o.probe.vni) {
            net.free.push_back(o.probe.ip);
        }
    }
}

/// What a churn task needs.
struct OpContext {
    store: Arc<Store>,
    probes: mpsc::Sender<Probe>,
    commits: Arc<Mutex<Vec<(u64, Duration)>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

/// One change of the churn: the store's half of `ovl connect` or `ovl
/// disconnect` (no veth: the nodes are agents without containers).
enum Op {
    Connect(Request),
    Disconnect {
        network: String,
        node: String,
        netns: String,
    },
}

impl Op {
    /// The network, node and namespace it changes.
    fn target(&self) -> (&str, &str, &str) {
        match self {
            Op::Connect(r) => (&r.network, &r.node, &r.netns),
            Op::Disconnect {
                network,
                node,
                netns,
            } => (network, node, netns),
        }
    }
}

impl OpContext {
    /// Commits `op` through the code path `ovl connect` and `ovl
    /// disconnect` take, then hands `probe` to the prober. Returns whether
    /// the change was committed. A commit that failed on the client's side
    /// (a timeout, a lost connection) may still have been applied by etcd:
    /// then the endpoint is read again, so that the fleet follows the
    /// store and not the client's view of it.
    async fn run(&self, mut probe: Probe, op: Op) -> bool {
        let started = Instant::now();
        probe.started = started;
        let (network, node, netns) = op.target();
        let done = match &op {
            Op::Connect(req) => attachment::register(&self.store, req).await.map(|_| ()),
            Op::Disconnect { .. } => attachment::unregister(&self.store, node, network, netns)
                .await
                .map(|_| ()),
        };
        let error = match done {
            Ok(()) => {
                lock(&self.commits).push((probe.tag, started.elapsed()));
                // The prober only stops once every sender is gone.
                let _ = self.probes.send(probe);
                return true;
            }
            Err(e) => e,
        };
        let wanted = matches!(op, Op::Connect(_));
        let around = Around::container(network, node, netns);
        match self.store.load_in(Scope::Endpoint(around)).await {
            Ok(state) if holds(&state, node, netns) == wanted => {
                // Applied though the client saw it fail: its propagation
                // is not timed (its start is unknown), but the fleet
                // counts it.
                lock(&self.errors).push(format!(
                    "{network}: applied although the client saw: {error}"
                ));
                true
            }
            Ok(_) => {
                lock(&self.errors).push(format!("{network}: {error}"));
                false
            }
            Err(again) => {
                lock(&self.errors).push(format!(
                    "{network}: {error}; and whether it was applied could not be read: {again}"
                ));
                false
            }
        }
    }
}

/// Whether `state` holds the endpoint of container `netns` on `node`.
fn holds(state: &State, node: &str, netns: &str) -> bool {
    state
        .endpoints_of_node(node)
        .any(|e| matches!(&e.location, Location::Container { netns: n, .. } if n == netns))
}

/// What `ovl connect` registers for a container `netns` on `node`.
fn container(network: &str, node: &str, netns: &str, ip: Ipv4Addr) -> ContainerSpec {
    ContainerSpec {
        ports: Vec::new(),
        attacher: None,
        network: network.into(),
        node: node.into(),
        netns: netns.into(),
        name: None,
        ip: Some(ip),
        owner: None,
        subnet: None,
        mac: None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
