//! Bulk TCP through the overlay: GSO super-packets are encapsulated and
//! decapsulated without loss, so TCP runs without retransmitting.
//! Throughput is recorded (run with --nocapture), never asserted.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{Lab, TwoHosts, iperf3_server, ping, wait_until};
use serde_json::Value;

/// Seconds the client sends for.
const SECONDS: &str = "5";

/// Payload bytes per TCP segment: the 1450-byte MTU minus IPv4 (20), TCP
/// (20) and timestamp option (12) headers.
const SEGMENT_PAYLOAD: f64 = 1398.0;

#[test]
fn iperf3_tcp_crosses_the_overlay_without_a_retransmission_storm() -> Result<()> {
    let lab = Lab::new("iperf")?;
    let world = TwoHosts::start(&lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let (c1, _) = world.container(&lab, 0, "uber-net", "c1")?;
    let (c2, ip2) = world.container(&lab, 1, "uber-net", "c2")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;

    // One test, then the server exits by itself.
    let server = iperf3_server(&lab, &c2)?;

    let ip2_text = ip2.to_string();
    let out = c1.exec(&["iperf3", "-c", &ip2_text, "-t", SECONDS, "-J"])?;
    let report: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    let sent = &report["end"]["sum_sent"];
    let received = &report["end"]["sum_received"];
    let bytes_sent = sent["bytes"].as_f64().context("end.sum_sent.bytes")?;
    let bytes_received = received["bytes"]
        .as_f64()
        .context("end.sum_received.bytes")?;
    let sender_bps = sent["bits_per_second"]
        .as_f64()
        .context("end.sum_sent.bits_per_second")?;
    let receiver_bps = received["bits_per_second"]
        .as_f64()
        .context("end.sum_received.bits_per_second")?;
    let retransmits = sent["retransmits"]
        .as_u64()
        .context("end.sum_sent.retransmits")?;
    let segments = bytes_sent / SEGMENT_PAYLOAD;
    println!(
        "iperf3 over ovl: sender {:.2} Gbit/s, receiver {:.2} Gbit/s, {:.0} MB received, \
         {retransmits} retransmits in ~{segments:.0} segments",
        sender_bps / 1e9,
        receiver_bps / 1e9,
        bytes_received / 1e6,
    );

    ensure!(bytes_received > 0.0, "nothing arrived: {report}");
    // Relative, not absolute: the segment count scales with how fast this
    // machine is. Inside one kernel nothing is lost but what the overlay
    // drops or corrupts; a broken encap (a segment too large for the
    // underlay, a bad checksum) loses every packet of a kind and pushes
    // the rate to tens of percent, while 1% leaves room for a loaded CI
    // machine's backlog overflows.
    ensure!(
        (retransmits as f64) < segments / 100.0,
        "{retransmits} retransmits in ~{segments:.0} segments (over 1%)"
    );
    server
        .wait_timeout(Duration::from_secs(10))
        .context("iperf3 server did not exit after its one test")?;
    world.stop()
}
