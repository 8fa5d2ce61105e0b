//! `ovl network create` with several subnets, gateways and MTUs: what is
//! refused is refused clearly and leaves the store as it was; the MTU
//! follows the underlay the nodes report.

use anyhow::{Context, Result, ensure};
use ovl_tests::{Lab, Ovl};

/// Runs `ovl args...` expecting a refusal whose message contains `needle`.
fn refused(ovl: &Ovl, ns: &ovl_tests::Netns, args: &[&str], needle: &str) -> Result<()> {
    let out = ovl.run_unchecked(ns, "host-a", args)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "`ovl {}` succeeded; expected a refusal",
        args.join(" ")
    );
    ensure!(
        err.contains(needle),
        "`ovl {}` said {err:?}, expected it to mention {needle:?}",
        args.join(" ")
    );
    Ok(())
}

#[test]
fn bad_subnets_gateways_and_addresses_are_refused_and_the_store_is_unchanged() -> Result<()> {
    let lab = Lab::new("subnets")?;
    let ovl = Ovl::new(&lab)?;
    let (_router, hosts) = lab.routed_hosts(1)?;
    let ns = &hosts[0].netns;
    ovl.create_network(
        ns,
        "prod-net",
        "198.18.1.0/24",
        &["--subnet", "198.18.2.0/24", "--gateway", "198.18.2.254"],
    )?;
    let net = ovl.inspect(ns, "prod-net")?;
    let gateways: Vec<&str> = net["subnets"]
        .as_array()
        .context("subnets")?
        .iter()
        .filter_map(|p| p["gateway"].as_str())
        .collect();
    ensure!(
        gateways == ["198.18.1.1", "198.18.2.254"],
        "gateways {gateways:?}"
    );
    let c1 = lab.container("c1")?;
    let state_file = lab.tempdir().join("store/state.json");
    let before = std::fs::read(&state_file).context("state.json")?;

    refused(
        &ovl,
        ns,
        &[
            "network",
            "create",
            "x",
            "--subnet",
            "198.18.0.0/16",
            "--subnet",
            "198.18.4.0/24",
        ],
        "overlap",
    )?;
    refused(
        &ovl,
        ns,
        &[
            "network",
            "create",
            "x",
            "--subnet",
            "198.18.4.0/24",
            "--gateway",
            "198.18.5.1",
        ],
        "198.18.5.1 is in none of the network's subnets",
    )?;
    refused(
        &ovl,
        ns,
        &[
            "network",
            "create",
            "x",
            "--subnet",
            "198.18.4.0/24",
            "--gateway",
            "198.18.4.255",
        ],
        "broadcast",
    )?;
    refused(
        &ovl,
        ns,
        &["connect", "prod-net", c1.name(), "--ip", "198.18.3.7"],
        "198.18.3.7 is not a usable address of 198.18.1.0/24, 198.18.2.0/24",
    )?;
    refused(
        &ovl,
        ns,
        &["connect", "prod-net", c1.name(), "--ip", "198.18.2.254"],
        "not a usable address",
    )?;
    refused(
        &ovl,
        ns,
        &[
            "connect",
            "prod-net",
            c1.name(),
            "--subnet",
            "198.18.9.0/24",
        ],
        "not a subnet of this network",
    )?;
    let after = std::fs::read(&state_file).context("state.json")?;
    ensure!(before == after, "a refused command changed the store");
    ensure!(
        !c1.exec_unchecked(&["ip", "link", "show", "eth0"])?
            .status
            .success(),
        "a refused connect left an interface in the container"
    );
    Ok(())
}

#[test]
fn network_mtu_defaults_to_the_underlay_less_50_and_larger_is_refused() -> Result<()> {
    let lab = Lab::new("mtu-default")?;
    let ovl = Ovl::new(&lab)?;
    let (router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    // A jumbo-frame underlay.
    host.netns.ip(&["link", "set", "eth0", "mtu", "9000"])?;
    router.ip(&["link", "set", "h0", "mtu", "9000"])?;
    let agent = ovl.attach(&lab, host, "host-a", "auto")?;
    agent.wait_in_step()?;
    ovl.create_network(&host.netns, "jumbo", "198.18.0.0/24", &[])?;
    let mtu = ovl.inspect(&host.netns, "jumbo")?["mtu"].as_u64();
    ensure!(mtu == Some(8950), "default MTU on a 9000 underlay: {mtu:?}");
    refused(
        &ovl,
        &host.netns,
        &[
            "network",
            "create",
            "too-big",
            "--subnet",
            "198.18.1.0/24",
            "--mtu",
            "8951",
        ],
        "MTU 8951 does not fit node \"host-a\"",
    )?;
    let c1 = lab.container("c1")?;
    ovl.connect(host, "host-a", "jumbo", &c1, &[])?;
    ensure!(
        c1.link_mtu("eth0")? == 8950,
        "the container did not get MTU 8950"
    );
    agent.stop()
}
