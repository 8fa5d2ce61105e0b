//! The whole chain from build to teardown: the kernel programs embedded in
//! `ovl` load, attach in native XDP mode, count every frame in their maps,
//! keep counting after the agent stops (the data path outlives it), and
//! leave neither hook nor pins behind after `ovl detach`.

use anyhow::{Context, Result, ensure};
use ovl_tests::{HOST_IFACE, Lab, Netns, Ovl, ping};
use serde_json::Value;

/// Echo requests the router sends to the host.
const N: u64 = 25;

#[test]
fn native_xdp_program_counts_exactly_the_packets_sent() -> Result<()> {
    let lab = Lab::new("native")?;
    let ovl = Ovl::new(&lab)?;
    let (router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let gateway = host.gateway.context("routed host has a gateway")?;
    let router_iface = router.iface_with_addr(gateway)?;

    // Permanent neighbours both ways: no ARP on the wire, so the frames the
    // hook sees are exactly the echo requests.
    let host_mac = host.netns.link_mac(HOST_IFACE)?;
    let router_mac = router.link_mac(&router_iface)?;
    router.ip(&[
        "neigh",
        "replace",
        &host.addr.to_string(),
        "lladdr",
        &host_mac,
        "dev",
        &router_iface,
        "nud",
        "permanent",
    ])?;
    host.netns.ip(&[
        "neigh",
        "replace",
        &gateway.to_string(),
        "lladdr",
        &router_mac,
        "dev",
        HOST_IFACE,
        "nud",
        "permanent",
    ])?;

    let node = "host-a";
    let agent = ovl.attach(&lab, host, node, "native")?;
    let link = link_details(&host.netns)?;
    ensure!(
        xdp_marks(&link) == ["xdp", "prog/xdp"],
        "no native XDP program on {HOST_IFACE}:\n{link}"
    );
    ensure!(
        agent.log()?.contains("in native mode"),
        "agent did not report native mode:\n{}",
        agent.log()?
    );
    let pin_dir = ovl.pin_root().join(node);
    ensure!(
        pin_dir.is_dir(),
        "no pin directory {} while attached",
        pin_dir.display()
    );

    let before = ovl.underlay(&host.netns, node)?;
    let r = ping(&router, host.addr, N as u32, &["-i", "0.02", "-W", "2"])?;
    ensure!(
        r.all_received(),
        "router -> host lost packets:\n{}",
        r.output
    );
    let after = ovl.underlay(&host.netns, node)?;
    let moved = |key: &str| -> Result<u64> {
        let at = |v: &Value| v[key].as_u64().with_context(|| format!("{key} in {v}"));
        Ok(at(&after)? - at(&before)?)
    };
    ensure!(
        moved("underlay_packets")? == N && moved("underlay_passed")? == N,
        "expected +{N} seen and passed: {before} -> {after}"
    );

    agent.stop()?;
    let link = link_details(&host.netns)?;
    ensure!(
        xdp_marks(&link) == ["xdp", "prog/xdp"],
        "the XDP hook went with the agent:\n{link}"
    );
    let before = ovl.underlay(&host.netns, node)?;
    let r = ping(&router, host.addr, N as u32, &["-i", "0.02", "-W", "2"])?;
    ensure!(
        r.all_received(),
        "router -> host without agent:\n{}",
        r.output
    );
    let after = ovl.underlay(&host.netns, node)?;
    ensure!(
        after["underlay_packets"].as_u64() == before["underlay_packets"].as_u64().map(|b| b + N),
        "the pinned program did not count +{N} without its agent: {before} -> {after}"
    );

    ovl.run(&host.netns, node, &["detach", HOST_IFACE])?;
    let link = link_details(&host.netns)?;
    ensure!(
        xdp_marks(&link).is_empty(),
        "XDP still attached after `ovl detach`:\n{link}"
    );
    ensure!(
        !pin_dir.exists(),
        "pins left behind in {}",
        pin_dir.display()
    );
    Ok(())
}

/// `ip -d link show eth0` in `ns`.
fn link_details(ns: &Netns) -> Result<String> {
    let out = ns.ip(&["-d", "link", "show", HOST_IFACE])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The words of `ip -d link` output that report an XDP program: `xdp`
/// (native), `xdpgeneric`, `xdpoffload` or `xdpmulti` after the MTU, and
/// `prog/xdp...` on the program's own line.
fn xdp_marks(link: &str) -> Vec<&str> {
    link.split_whitespace()
        .filter(|word| word.starts_with("xdp") || word.starts_with("prog/xdp"))
        .collect()
}
