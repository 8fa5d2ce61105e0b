//! What ovl puts on the wire, as a third-party dissector reads it: standard
//! VXLAN (RFC 7348) between the two VTEPs, carrying the network's VNI.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{HOST_IFACE, Lab, TwoHosts, VXLAN_PORT, ping, wait_until};

/// Echo requests sent through the tunnel while the capture runs.
const PINGS: usize = 3;

/// ICMP types (RFC 792).
const ICMP_ECHO_REQUEST: &str = "8";
const ICMP_ECHO_REPLY: &str = "0";

/// One captured packet as tshark decodes it. Fields that occur once per
/// header (`ip.src`, `ip.dst`) come outer first, then inner.
#[derive(Debug)]
struct Row {
    udp_dst_port: String,
    vni: String,
    ip_src: Vec<String>,
    ip_dst: Vec<String>,
    icmp_type: String,
}

#[test]
fn underlay_capture_decodes_as_vxlan_with_the_network_vni() -> Result<()> {
    let lab = Lab::new("capture")?;
    // TC decap, not XDP: XDP runs before the kernel's packet taps, so a
    // capture on eth0 would miss the received (decapsulated) replies.
    let world = TwoHosts::start(&lab, "tc")?;
    let host_a = &world.hosts[0];
    let host_b = &world.hosts[1];
    world
        .ovl
        .create_network(&host_a.netns, "uber-net", "198.18.0.0/24", &[])?;
    let vni = world.ovl.inspect(&host_a.netns, "uber-net")?["vni"]
        .as_u64()
        .context("inspect has no vni")?;
    let (c1, ip1) = world.container(&lab, 0, "uber-net", "c1")?;
    let (_c2, ip2) = world.container(&lab, 1, "uber-net", "c2")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;

    let pcap = lab.tempdir().join("underlay.pcap");
    let pcap_text = pcap.to_string_lossy().into_owned();
    let filter = format!("udp port {VXLAN_PORT}");
    // Stopping on a packet count, not a signal: a capture interrupted
    // mid-way loses the packets still in the kernel's unretired ring
    // block. The duration bounds the wait if packets are missing.
    let count = (2 * PINGS).to_string();
    let tshark = lab.spawn(
        &host_a.netns,
        &[
            "tshark",
            "-i",
            HOST_IFACE,
            "-f",
            &filter,
            "-c",
            &count,
            "-a",
            "duration:20",
            "-w",
            &pcap_text,
        ],
        &[],
    )?;
    // "Capturing on" comes before the capture child has opened the
    // interface; "Capture started" once it has and packets are kept.
    wait_until(Duration::from_secs(15), || {
        Ok(tshark.stderr()?.contains("Capture started"))
    })
    .with_context(|| format!("tshark did not start:\n{}", tshark.output_report()))?;

    let r = ping(&c1, ip2, PINGS as u32, &["-i", "0.2", "-W", "2"])?;
    ensure!(r.all_received(), "A -> B lost packets:\n{}", r.output);

    let status = tshark.wait_timeout(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "tshark exited with {status}:\n{}",
        tshark.output_report()
    );

    let rows = decode(&host_a.netns, &pcap_text)?;
    let requests: Vec<&Row> = rows
        .iter()
        .filter(|row| row.icmp_type == ICMP_ECHO_REQUEST)
        .collect();
    let replies: Vec<&Row> = rows
        .iter()
        .filter(|row| row.icmp_type == ICMP_ECHO_REPLY)
        .collect();
    ensure!(
        requests.len() == PINGS && replies.len() == PINGS && rows.len() == 2 * PINGS,
        "expected {PINGS} requests and {PINGS} replies, decoded {rows:#?}"
    );
    for row in &rows {
        ensure!(
            row.udp_dst_port == VXLAN_PORT.to_string(),
            "not to the VXLAN port: {row:?}"
        );
        ensure!(
            row.vni == vni.to_string(),
            "VNI {} instead of the network's {vni}: {row:?}",
            row.vni
        );
    }
    let expect_path = |row: &Row, outer: (Ipv4Addr, Ipv4Addr), inner: (Ipv4Addr, Ipv4Addr)| {
        let want_src = [outer.0.to_string(), inner.0.to_string()];
        let want_dst = [outer.1.to_string(), inner.1.to_string()];
        ensure!(
            row.ip_src == want_src && row.ip_dst == want_dst,
            "expected outer {} -> {}, inner {} -> {}: {row:?}",
            outer.0,
            outer.1,
            inner.0,
            inner.1
        );
        Ok(())
    };
    for row in requests {
        expect_path(row, (host_a.addr, host_b.addr), (ip1, ip2))?;
    }
    for row in replies {
        expect_path(row, (host_b.addr, host_a.addr), (ip2, ip1))?;
    }
    world.stop()
}

/// Reads `pcap` back with tshark, port 4789 explicitly decoded as VXLAN.
fn decode(ns: &ovl_tests::Netns, pcap: &str) -> Result<Vec<Row>> {
    let decode_as = format!("udp.port=={VXLAN_PORT},vxlan");
    let out = ns.exec(&[
        "tshark",
        "-r",
        pcap,
        "-d",
        &decode_as,
        "-T",
        "fields",
        "-E",
        "separator=/t",
        "-E",
        "aggregator=,",
        "-e",
        "udp.dstport",
        "-e",
        "vxlan.vni",
        "-e",
        "ip.src",
        "-e",
        "ip.dst",
        "-e",
        "icmp.type",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let list = |field: &str| field.split(',').map(str::to_owned).collect::<Vec<_>>();
    text.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            ensure!(fields.len() == 5, "unexpected tshark row {line:?}");
            Ok(Row {
                udp_dst_port: fields[0].to_owned(),
                vni: fields[1].to_owned(),
                ip_src: list(fields[2]),
                ip_dst: list(fields[3]),
                icmp_type: fields[4].to_owned(),
            })
        })
        .collect()
}
