//! Path MTU across the underlay (moby/libnetwork#2661's black hole): when a
//! link between the VTEPs is narrower than the hosts' own, the router's
//! ICMP "fragmentation needed" about ovl's VXLAN is read by the decap hook,
//! and the sending container is told the MTU less VXLAN's 50 bytes, so its
//! TCP shrinks its segments instead of stalling.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{Lab, TwoHosts, ping, wait_until};

/// Bytes sent over TCP from host A's container to host B's.
const TRANSFER: usize = 1 << 20;
/// The narrow link: the router's port toward host B.
const NARROW_MTU: &str = "1400";
const PORT: &str = "5001";

#[test]
fn a_1_mib_tcp_transfer_crosses_a_narrower_underlay_link() -> Result<()> {
    let lab = Lab::new("pmtu")?;
    let world = TwoHosts::start(&lab, "auto")?;
    world
        .ovl
        .create_network(&world.hosts[0].netns, "uber-net", "198.18.0.0/24", &[])?;
    let (c1, _) = world.container(&lab, 0, "uber-net", "c1")?;
    let (c2, ip2) = world.container(&lab, 1, "uber-net", "c2")?;
    wait_until(Duration::from_secs(10), || {
        Ok(ping(&c1, ip2, 1, &["-W", "1"])?.all_received())
    })?;
    let toward_b = world
        .router
        .iface_with_addr(std::net::Ipv4Addr::new(198, 51, 100, 1))?;
    world
        .router
        .ip(&["link", "set", &toward_b, "mtu", NARROW_MTU])?;

    let receiver = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.bind(('{ip2}', {PORT}))\n\
         s.listen(1)\n\
         print('listening', flush=True)\n\
         c, _ = s.accept()\n\
         n = 0\n\
         while True:\n    \
             b = c.recv(65536)\n    \
             if not b:\n        \
                 break\n    \
             n += len(b)\n\
         print('received', n, flush=True)\n"
    );
    let server = lab.spawn(&c2, &["/usr/bin/python3", "-c", &receiver], &[])?;
    wait_until(Duration::from_secs(10), || {
        Ok(server.stdout()?.contains("listening"))
    })
    .with_context(|| format!("receiver did not start:\n{}", server.output_report()))?;
    let sender = format!(
        "import socket\n\
         s = socket.create_connection(('{ip2}', {PORT}), timeout=5)\n\
         s.settimeout(30)\n\
         s.sendall(b'x' * {TRANSFER})\n\
         s.shutdown(socket.SHUT_WR)\n\
         s.recv(1)\n\
         print('sent', flush=True)\n"
    );
    let started = std::time::Instant::now();
    let out = c1.exec_unchecked(&["timeout", "40", "/usr/bin/python3", "-c", &sender])?;
    let took = started.elapsed();
    wait_until(Duration::from_secs(5), || {
        Ok(server.stdout()?.contains("received"))
    })
    .with_context(|| {
        format!(
            "the transfer did not complete in {took:?}: sender {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            server.output_report()
        )
    })?;
    let got = server.stdout()?;
    ensure!(
        got.contains(&format!("received {TRANSFER}\n")),
        "the receiver got a partial transfer: {got}"
    );
    eprintln!("1 MiB across a {NARROW_MTU}-byte link took {took:?}");

    // The sender's stack learned the path: 1400 less VXLAN's 50.
    let route = c1.ip(&["route", "get", &ip2.to_string()])?;
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    ensure!(
        route.contains("mtu 1350"),
        "c1 did not learn the path MTU:\n{route}"
    );
    let counted = world.counters(0, "uber-net")?;
    ensure!(
        counted.path_mtu > 0,
        "no packet was answered with frag-needed: {counted:?}"
    );
    let underlay = world
        .ovl
        .underlay(&world.hosts[0].netns, TwoHosts::NODES[0])?;
    let reports = underlay["path_mtu_reports"].as_u64().unwrap_or(0);
    ensure!(
        reports > 0,
        "host A's decap hook recorded no path MTU report: {underlay}"
    );
    world.stop()
}
