// `cargo xtask bench --scale`: ovl's control plane at cluster scale — many
// agents on one etcd, thousands of endpoints, then a steady churn.

//! Builds N hosts with an agent each and one real etcd (`world`), fills the
//! store with endpoints in growing steps (`load`), and at each step
//! measures: how long a connect or disconnect takes to reach every other
//! node's pinned endpoint map (`prober`, polling the maps themselves), a
//! real `ovl connect` the same way, agent and etcd CPU and memory idle and
//! under churn, and etcd's requests and bytes (`usage`). Writes
//! `bench/results/<date>-scale[-quick].{md,json}` (`report`).
//!
//! The endpoints are registered through the store exactly as `ovl connect`
//! registers them, without a veth: 10,000 network namespaces are more than
//! this machine should build, and a node's maps hold a remote endpoint the
//! same whether a veth exists behind it or not. Each node owns an equal
//! share of every network, so every node serves every network (a node
//! programs only networks it has endpoints of) and its map holds every
//! endpoint but its own. Agents run with the longest `--gc-grace`, so the
//! namespace-less endpoints stay.

mod cli;
mod load;
mod maps;
mod prober;
mod report;
mod usage;
mod world;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ovl_userspace::store::Store;

use self::load::{Fleet, NodeSlot};
use self::maps::NodeMap;
use self::prober::Prober;
use self::report::{ScaleReport, Step, Window};
use self::usage::{CpuWindow, EtcdCounters, MachineWindow};
use self::world::World;

/// What `--scale` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// A smaller, shorter run: a check that it works, not figures to quote.
    pub quick: bool,
}

/// How much to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    pub nodes: usize,
    /// Endpoints at each step, growing.
    pub steps: Vec<usize>,
    pub per_network: usize,
    /// Seconds of the idle window and of the churn.
    pub idle_seconds: u64,
    pub churn_seconds: u64,
    /// Changes per second under churn: half connects, half disconnects
    /// ("100 connects+disconnects per second").
    pub rate: u32,
    /// After the last step, churn once more at this rate (changes per
    /// second): where the machine's limit is.
    pub stress_rate: Option<u32>,
    /// Real `ovl connect` runs per step.
    pub cli_samples: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                nodes: 5,
                steps: vec![200, 500, 1000],
                per_network: 100,
                idle_seconds: 3,
                churn_seconds: 5,
                rate: 50,
                stress_rate: None,
                cli_samples: 3,
            }
        } else {
            Plan {
                quick,
                nodes: 20,
                steps: vec![1000, 5000, 10_000],
                per_network: 500,
                idle_seconds: 10,
                churn_seconds: 30,
                rate: 100,
                stress_rate: Some(200),
                cli_samples: 10,
            }
        }
    }
}

/// How long the maps get to hold what the store says after a step.
const CONVERGE: Duration = Duration::from_secs(300);

/// Pause before the idle window: the last watch events are applied and
/// the agents' logs written.
const SETTLE: Duration = Duration::from_secs(3);

/// Runs the scale benchmark and writes its report.
pub fn run(options: Options) -> Result<()> {
    let started = Instant::now();
    let plan = Plan::new(options.quick);
    let machine = crate::machine::describe();
    let date = crate::machine::utc_date();
    eprintln!(
        "ovl-bench: scale: {} nodes, steps {:?} endpoints, churn of {} changes/s for {} s",
        plan.nodes, plan.steps, plan.rate, plan.churn_seconds
    );
    let world = World::build(plan.nodes)?;
    let steps = world
        .etcd_ns
        .run_inside(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(measure(&world, &plan))
        })
        .context("inside etcd's namespace")??;
    let report = ScaleReport {
        title: format!(
            "ovl control plane at scale, {date} ({} run)",
            if plan.quick { "quick" } else { "full" }
        ),
        machine,
        plan: plan.clone(),
        steps,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    drop(world);
    report::write(&report, &date)
}

async fn measure(world: &World, plan: &Plan) -> Result<Vec<Step>> {
    let store = Arc::new(Store::open(&world.etcd.url()).await?);
    // Churn speaks for each node through a connection of its own, as the
    // nodes' own commands would: one process's changes to a network take
    // turns, different nodes' race in etcd.
    let mut node_stores = Vec::new();
    for _ in &world.nodes {
        node_stores.push(Arc::new(Store::open(&world.etcd.url()).await?));
    }
    let nodes: Vec<NodeSlot> = world
        .nodes
        .iter()
        .map(|n| NodeSlot {
            name: n.name.clone(),
            vtep: n.vtep(),
        })
        .collect();
    let fleet = Arc::new(Mutex::new(Fleet::new(nodes, plan.per_network)));
    let open_maps = || -> Result<Vec<NodeMap>> {
        world
            .nodes
            .iter()
            .map(|n| NodeMap::open(&world.ovl.pin_dir(&n.name)))
            .collect()
    };
    let counting = open_maps()?;
    let (out_tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    let prober = Prober::start(open_maps()?, out_tx);
    let probes = prober.sender();
    let agents = world.agent_pids();
    let etcd_pid = world.etcd.pid().context("etcd is not running")?;
    let mut pids = agents.clone();
    pids.push(etcd_pid);
    let endpoint = world.etcd.endpoint();

    let mut steps = Vec::new();
    for &target in &plan.steps {
        eprintln!("ovl-bench: scale: growing to {target} endpoints");
        let fill_started = Instant::now();
        load::grow(&store, &fleet, target).await?;
        let fill_seconds = fill_started.elapsed().as_secs_f64();
        let converge_seconds = converge(&counting, &store, &fleet, CONVERGE).await? + fill_seconds;
        world.check_agents()?;
        eprintln!(
            "ovl-bench: scale: {target} endpoints written in {fill_seconds:.1} s, in every map after {converge_seconds:.1} s"
        );

        tokio::time::sleep(SETTLE).await;
        let idle = window(&pids, &world.etcd_ns, &endpoint, async {
            tokio::time::sleep(Duration::from_secs(plan.idle_seconds)).await;
            Ok(())
        })
        .await?;
        let rss_idle = memory(&agents)?;
        let etcd_rss_idle = usage::memory_kib(etcd_pid)?.0;

        let cli = cli::connects(world, &fleet, &probes, &mut outcomes, plan.cli_samples).await?;

        // One lock at a time: guards in one expression live to its end.
        let (endpoints, networks) = {
            let f = lock(&fleet);
            (f.total(), f.network_count())
        };
        let mut step = Step {
            endpoints,
            networks,
            rate: plan.rate,
            fill_seconds,
            converge_seconds,
            idle,
            rss_idle_kib: rss_idle.iter().map(|m| m.0).collect(),
            etcd_rss_idle_kib: etcd_rss_idle,
            cli,
            ..Step::default()
        };
        let last = target == *plan.steps.last().expect("steps are not empty");
        let rates = std::iter::once(plan.rate).chain(plan.stress_rate.filter(|_| last));
        for (i, rate) in rates.enumerate() {
            if i > 0 {
                // The stress run: same endpoints, same idle figures.
                let mut stress = step.clone();
                stress.rate = rate;
                stress.cli = Vec::new();
                steps.push(std::mem::replace(&mut step, stress));
            }
            eprintln!(
                "ovl-bench: scale: churn at {} endpoints, {rate} changes/s for {} s",
                step.endpoints, plan.churn_seconds
            );
            let mut churned = None;
            step.busy = window(&pids, &world.etcd_ns, &endpoint, async {
                churned = Some(
                    load::churn(
                        &node_stores,
                        &fleet,
                        &probes,
                        &mut outcomes,
                        rate,
                        Duration::from_secs(plan.churn_seconds),
                    )
                    .await?,
                );
                Ok(())
            })
            .await?;
            step.churn = churned.expect("set by the churn window");
            let rss_churn = memory(&agents)?;
            step.rss_churn_kib = rss_churn.iter().map(|m| m.0).collect();
            step.hwm_kib = rss_churn.iter().map(|m| m.1).collect();
            step.etcd_rss_churn_kib = usage::memory_kib(etcd_pid)?.0;
            // Nothing lost: every map holds exactly what the store says.
            step.after_churn_seconds = converge(&counting, &store, &fleet, CONVERGE).await?;
            world.check_agents()?;
            step.etcd = EtcdCounters::scrape(&world.etcd_ns, &endpoint)?;
            eprintln!("ovl-bench: scale: {}", report::one_line(&step));
        }
        steps.push(step);
    }
    drop(probes);
    prober.stop()?;
    Ok(steps)
}

/// Waits until every node's map holds exactly what the store says it
/// should: every endpoint but the node's own (they have no veth, so it
/// maps none of them). The store, not the fleet, is the truth here: a
/// change whose commit the client saw fail may still have been applied.
/// Says so when the two differ. Returns how long it took.
async fn converge(
    maps: &[NodeMap],
    store: &Store,
    fleet: &Arc<Mutex<Fleet>>,
    timeout: Duration,
) -> Result<f64> {
    let started = Instant::now();
    let state = store
        .load()
        .await
        .context("read the store to check the maps against")?;
    let (nodes, fleet_total) = {
        let f = lock(fleet);
        (f.node_names(), f.total())
    };
    if fleet_total != state.endpoints.len() {
        eprintln!(
            "ovl-bench: scale: the store holds {} endpoints, the load generator counted {fleet_total}",
            state.endpoints.len()
        );
    }
    loop {
        let mut behind = Vec::new();
        for (i, map) in maps.iter().enumerate() {
            let have: usize = map.count_by_vni()?.values().sum();
            let want = state.endpoints.len() - state.endpoints_of_node(&nodes[i]).count();
            if have != want {
                behind.push(format!("node {i}: {have} of {want}"));
            }
        }
        if behind.is_empty() {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > timeout {
            bail!(
                "the maps did not reach the store's state within {timeout:?}: {}",
                behind.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `work` while measuring CPU of `pids` and etcd's traffic.
async fn window(
    pids: &[u32],
    etcd_ns: &ovl_tests::Netns,
    endpoint: &str,
    work: impl std::future::Future<Output = Result<()>>,
) -> Result<Window> {
    let before = EtcdCounters::scrape(etcd_ns, endpoint)?;
    let cpu = CpuWindow::start(pids)?;
    let own = CpuWindow::start(&[std::process::id()])?;
    let machine = MachineWindow::start()?;
    work.await?;
    let machine_cpu = machine.percent()?;
    let load = usage::load_average();
    let mut percent = cpu.percent()?;
    let seconds = cpu.seconds();
    let after = EtcdCounters::scrape(etcd_ns, endpoint)?;
    let etcd_cpu = percent.pop().expect("etcd's pid is last");
    Ok(Window {
        seconds,
        agent_cpu: percent,
        etcd_cpu,
        bench_cpu: own.percent()?[0],
        machine_cpu,
        load,
        etcd: after.rates_since(&before, seconds),
    })
}

/// (RSS, peak RSS) in KiB of each of `pids`.
fn memory(pids: &[u32]) -> Result<Vec<(u64, u64)>> {
    pids.iter().map(|p| usage::memory_kib(*p)).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
