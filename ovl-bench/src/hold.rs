// `ovl-bench --hold PATH`: one data path's lab, built as the benchmark
// builds it, kept up until Enter, for profiling by hand (perf, bpftool).

use std::io::BufRead;

use anyhow::{Context, Result};

use crate::measure::{CLIENT_CPU, IPERF_PORT, SERVER_CPU};
use crate::offloads;
use crate::report::{PathId, Underlay};
use crate::topology::Topology;

/// Builds `path` on `underlay`, prints how to drive it and waits for a line
/// on standard input; the lab is torn down when this returns.
pub fn run(path: PathId, underlay: Underlay) -> Result<()> {
    let topology = Topology::build(path).with_context(|| format!("building {}", path.label()))?;
    offloads::apply(&topology, underlay)?;
    topology.check_delivers()?;
    let endpoints = &topology.endpoints;
    println!(
        "{} on the {} underlay is up:",
        path.label(),
        underlay.short()
    );
    println!(
        "  client: ip netns exec {} taskset -c {CLIENT_CPU} iperf3 -c {} -p {IPERF_PORT} -t 10",
        endpoints.client.name(),
        endpoints.server_addr
    );
    println!(
        "  server: netns {} (iperf3 and sockperf listen, on CPU {SERVER_CPU})",
        endpoints.server.name()
    );
    for (role, pins) in &topology.agent_pins {
        println!("  agent {role}: pins in {}", pins.display());
    }
    println!("Press Enter to tear it down.");
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading standard input")?;
    Ok(())
}
