//! The VXLAN UDP port is the cluster's to choose (flannel#2388,
//! cilium#21801: 4789 blocked or taken): set once in the store, every agent
//! follows, traffic flows on the new port — 8472 here, as Flannel and
//! Linux's own vxlan default use — and 4789 carries nothing.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{HOST_IFACE, Lab, TwoHosts, ping, wait_until};

const PORT: u16 = 8472;
const PINGS: usize = 3;

#[test]
fn a_cluster_on_port_8472_carries_its_overlay_there_and_nothing_on_4789() -> Result<()> {
    let lab = Lab::new("vxlanport")?;
    // TC decap: the capture on eth0 sees the received frames too.
    let world = TwoHosts::start(&lab, "tc")?;
    // A well-known port, and ephemeral ones (WireGuard's default among
    // them) are refused, saying why, and change nothing.
    for port in ["53", "51820", "49152"] {
        let err = world.refused(0, &["cluster", "set", "--vxlan-port", port])?;
        ensure!(
            err.contains("use 1024..=49151"),
            "cluster set --vxlan-port {port}: {err}"
        );
    }
    ensure!(
        world
            .run(1, &["cluster", "show"])?
            .contains("vxlan port: 4789")
    );
    let out = world.run(0, &["cluster", "set", "--vxlan-port", &PORT.to_string()])?;
    ensure!(out.contains("8472"), "cluster set said {out:?}");
    let shown = world.run(1, &["cluster", "show"])?;
    ensure!(
        shown.contains(&format!("vxlan port: {PORT}")),
        "cluster show: {shown}"
    );
    let host_a = &world.hosts[0];
    world
        .ovl
        .create_network(&host_a.netns, "uber-net", "198.18.0.0/24", &[])?;
    let vni = world.inspect(0, "uber-net")?["vni"]
        .as_u64()
        .context("inspect has no vni")?;
    let (c1, _) = world.container(&lab, 0, "uber-net", "c1")?;
    let (_c2, ip2) = world.container(&lab, 1, "uber-net", "c2")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;

    let pcap = lab.tempdir().join("port.pcap");
    let pcap_text = pcap.to_string_lossy().into_owned();
    let count = (2 * PINGS).to_string();
    let tshark = lab.spawn(
        &host_a.netns,
        &[
            "tshark",
            "-i",
            HOST_IFACE,
            "-f",
            "udp",
            "-c",
            &count,
            "-a",
            "duration:20",
            "-w",
            &pcap_text,
        ],
        &[],
    )?;
    wait_until(Duration::from_secs(15), || {
        Ok(tshark.stderr()?.contains("Capture started"))
    })
    .with_context(|| format!("tshark did not start:\n{}", tshark.output_report()))?;
    let r = ping(&c1, ip2, PINGS as u32, &["-i", "0.2", "-W", "2"])?;
    ensure!(
        r.all_received(),
        "A -> B lost packets on port {PORT}:\n{}",
        r.output
    );
    tshark.wait_timeout(Duration::from_secs(25))?;

    let decode_as = format!("udp.port=={PORT},vxlan");
    let out = ovl_tests::run(&[
        "tshark",
        "-r",
        &pcap_text,
        "-d",
        &decode_as,
        "-T",
        "fields",
        "-e",
        "udp.srcport",
        "-e",
        "udp.dstport",
        "-e",
        "vxlan.vni",
        "-e",
        "icmp.type",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    ensure!(rows.len() == 2 * PINGS, "captured:\n{text}");
    for row in &rows {
        ensure!(
            row.get(1) == Some(&PORT.to_string().as_str()),
            "a frame not to port {PORT}:\n{text}"
        );
        ensure!(
            row.first() != Some(&"4789"),
            "a frame from port 4789:\n{text}"
        );
        ensure!(
            row.get(2) == Some(&vni.to_string().as_str()),
            "tshark did not decode VXLAN with VNI {vni}:\n{text}"
        );
    }
    // Echo requests out, replies in: the dissector saw the inner ICMP.
    let types: Vec<&str> = rows.iter().filter_map(|r| r.get(3).copied()).collect();
    ensure!(
        types.iter().filter(|t| **t == "8").count() == PINGS
            && types.iter().filter(|t| **t == "0").count() == PINGS,
        "inner ICMP types {types:?}"
    );
    world.stop()
}
