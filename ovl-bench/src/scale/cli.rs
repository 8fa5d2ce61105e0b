// Real `ovl connect` runs during the scale benchmark: a container
// namespace, the command as a user runs it on its node, and the time until
// every other node's map holds the endpoint.

use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc::UnboundedReceiver;

use super::load::Fleet;
use super::prober::{Expect, GIVE_UP, Outcome, Probe};
use super::world::World;

/// One real connect.
#[derive(Clone, Debug)]
pub struct CliSample {
    /// How long `ovl connect` ran (it returns once its own node forwards).
    pub command: Duration,
    /// From starting `ovl connect` until every other node's map held the
    /// endpoint; `None` if some node never did.
    pub all: Option<Duration>,
}

/// Tags of these probes, apart from the churn's.
const TAG_BASE: u64 = 1 << 62;

/// Runs `ovl connect` `n` times, on nodes and networks in turn, each with
/// a fresh container namespace; disconnects and removes each after.
pub async fn connects(
    world: &World,
    fleet: &Arc<Mutex<Fleet>>,
    probes: &mpsc::Sender<Probe>,
    outcomes: &mut UnboundedReceiver<Outcome>,
    n: usize,
) -> Result<Vec<CliSample>> {
    let mut samples = Vec::with_capacity(n);
    let nets = lock(fleet).network_count();
    for s in 0..n {
        let j = s % world.nodes.len();
        let k = s % nets;
        let node = &world.nodes[j];
        let (vni, network) = {
            let f = lock(fleet);
            let (vni, name) = f.network(k);
            (vni, name.to_owned())
        };
        let ip = lock(fleet)
            .take_address(k)
            .context("no free address for a real connect")?;
        let container = world.lab.container(&format!("cli{s}"))?;
        let others: Vec<usize> = (0..world.nodes.len()).filter(|i| *i != j).collect();
        let tag = TAG_BASE + 2 * s as u64;
        let started = Instant::now();
        // Watched from before the command starts: other nodes may well
        // have the endpoint before `ovl connect` returns.
        send(
            probes,
            Probe {
                tag,
                vni,
                ip,
                expect: Expect::Points(node.vtep()),
                started,
                nodes: others.clone(),
            },
        )?;
        world.ovl.run(
            &node.host.netns,
            &node.name,
            &[
                "connect",
                &network,
                container.name(),
                "--ip",
                &ip.to_string(),
            ],
        )?;
        let command = started.elapsed();
        let reached = wait(outcomes, tag).await?;
        samples.push(CliSample {
            command,
            all: reached.all,
        });
        world.ovl.run(
            &node.host.netns,
            &node.name,
            &["disconnect", &network, container.name()],
        )?;
        send(
            probes,
            Probe {
                tag: tag + 1,
                vni,
                ip,
                expect: Expect::Gone(node.vtep()),
                started: Instant::now(),
                nodes: others,
            },
        )?;
        let gone = wait(outcomes, tag + 1).await?;
        world.lab.remove_netns(&container)?;
        if gone.all.is_none() {
            bail!("the disconnect of {ip} never reached every node");
        }
        lock(fleet).release(k, ip);
    }
    Ok(samples)
}

fn send(probes: &mpsc::Sender<Probe>, probe: Probe) -> Result<()> {
    probes
        .send(probe)
        .map_err(|_| anyhow::anyhow!("the prober stopped"))
}

async fn wait(outcomes: &mut UnboundedReceiver<Outcome>, tag: u64) -> Result<Outcome> {
    let deadline = Instant::now() + GIVE_UP + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, outcomes.recv()).await {
            Ok(Some(o)) if o.probe.tag == tag => return Ok(o),
            Ok(Some(_)) => continue,
            _ => bail!("the prober gave no outcome for a real connect"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
