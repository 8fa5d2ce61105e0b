//! ovl against an etcd that checks who talks to it: TLS with client
//! certificates, and user/password authentication. The right credentials
//! work for commands and for an agent (whose keep-alives stay up past its
//! lease); a wrong CA, certificate, user or password fails in one line
//! that says what to fix; a password never appears on a command line.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ovl_tests::{Ca, Etcd, EtcdTls, Host, Lab, Ovl};

/// Liveness lease of the agents here, in seconds.
const LEASE_TTL: &str = "2";

/// Runs `ovl args...` on `host` with `env`; returns (success, stderr).
fn attempt(ovl: &Ovl, host: &Host, env: &[(&str, &str)], args: &[&str]) -> Result<(bool, String)> {
    let out = ovl.run_with_env_unchecked(&host.netns, "host-a", env, args)?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    ))
}

/// Expects `ovl network ls` with `env` to fail in one line containing
/// `needle`.
fn expect_refused(ovl: &Ovl, host: &Host, env: &[(&str, &str)], needle: &str) -> Result<()> {
    let (ok, stderr) = attempt(ovl, host, env, &["network", "ls"])?;
    ensure!(!ok, "succeeded with {env:?}");
    ensure!(
        stderr.lines().count() == 1 && stderr.contains(needle),
        "with {env:?} the error should be one line naming {needle:?}:\n{stderr}"
    );
    eprintln!("{env:?}: {stderr}");
    Ok(())
}

/// Starts an agent on `host` with `env` and checks that it stays alive in
/// etcd for two leases (its keep-alive connection authenticates too).
fn agent_stays_alive(lab: &Lab, ovl: &Ovl, host: &Host, env: &[(&str, &str)]) -> Result<()> {
    let mut env = env.to_vec();
    env.push(("OVL_LEASE_TTL", LEASE_TTL));
    let agent = ovl.attach_with_env(lab, host, "host-a", "auto", &env)?;
    std::thread::sleep(Duration::from_secs(5));
    let (ok, stderr) = attempt(ovl, host, &env, &["node", "ls", "--json"])?;
    ensure!(ok, "node ls: {stderr}");
    let out = ovl.run_with_env_unchecked(&host.netns, "host-a", &env, &["node", "ls", "--json"])?;
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        rows.as_array().is_some_and(|r| r
            .iter()
            .any(|n| n["name"] == "host-a" && n["alive"] == true)),
        "host-a not alive after two leases: {rows}\n{}",
        agent.output_report()
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.pid()))?;
    agent.stop()?;
    ensure!(
        !String::from_utf8_lossy(&cmdline).contains("s3cret"),
        "a password is on the agent's command line"
    );
    Ok(())
}

#[test]
fn etcd_over_tls_with_client_certificates_serves_ovl_and_wrong_certificates_fail_in_one_line()
-> Result<()> {
    let lab = Lab::new("etcd-tls")?;
    let (router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let addr = host.gateway.context("routed hosts have a gateway")?;
    let pki = lab.tempdir().join("pki");
    let ca = Ca::new(&pki, "ovl-ca")?;
    let rogue = Ca::new(&pki.join("rogue"), "rogue-ca")?;
    let client = ca.client("ovl")?;
    let rogue_client = rogue.client("ovl")?;
    let etcd = Etcd::start_tls(
        &lab,
        &router,
        addr,
        EtcdTls {
            server: ca.server("etcd", addr)?,
            client_ca: Some(ca.cert.clone()),
            server_ca: ca.cert.clone(),
            etcdctl: Some(ca.client("root")?),
        },
    )?;
    let tls_url = &*etcd.url();
    ensure!(tls_url.starts_with("etcds://"), "{tls_url}");
    let plain_url = format!("etcd://{}", etcd.endpoint());
    let ovl = Ovl::with_store(&lab, &plain_url)?;
    let cacert = &*ca.cert.display().to_string();
    let cert = &*client.cert.display().to_string();
    let key = &*client.key.display().to_string();
    let good = [
        ("OVL_STORE", tls_url),
        ("OVL_ETCD_CACERT", cacert),
        ("OVL_ETCD_CERT", cert),
        ("OVL_ETCD_KEY", key),
    ];

    // The finding: ovl spoke plain text only, which a TLS etcd refuses.
    expect_refused(&ovl, host, &[], "use etcds://")?;

    // The fix: etcds:// with the CA and a client certificate, from the
    // environment or from flags.
    let (ok, stderr) = attempt(
        &ovl,
        host,
        &good,
        &["network", "create", "blue", "--subnet", "198.18.0.0/24"],
    )?;
    ensure!(ok, "network create over TLS: {stderr}");
    let by_flags = [
        "--store",
        tls_url,
        "--etcd-cacert",
        cacert,
        "--etcd-cert",
        cert,
        "--etcd-key",
        key,
        "network",
        "ls",
        "--json",
    ];
    let out = ovl.run_with_env_unchecked(&host.netns, "host-a", &[], &by_flags)?;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ls: {}", String::from_utf8_lossy(&out.stderr)))?;
    ensure!(listed[0]["name"] == "blue", "{listed}");
    ensure!(
        etcd.keys("/ovl/networks/")? == ["/ovl/networks/blue"],
        "etcd does not hold the network"
    );

    // Wrong credentials: each fails in one line saying what to fix.
    let rogue_ca = &*rogue.cert.display().to_string();
    expect_refused(
        &ovl,
        host,
        &[
            ("OVL_STORE", tls_url),
            ("OVL_ETCD_CACERT", rogue_ca),
            ("OVL_ETCD_CERT", cert),
            ("OVL_ETCD_KEY", key),
        ],
        "--etcd-cacert",
    )?;
    expect_refused(
        &ovl,
        host,
        &[("OVL_STORE", tls_url), ("OVL_ETCD_CACERT", cacert)],
        "client certificate",
    )?;
    let rogue_cert = &*rogue_client.cert.display().to_string();
    let rogue_key = &*rogue_client.key.display().to_string();
    expect_refused(
        &ovl,
        host,
        &[
            ("OVL_STORE", tls_url),
            ("OVL_ETCD_CACERT", cacert),
            ("OVL_ETCD_CERT", rogue_cert),
            ("OVL_ETCD_KEY", rogue_key),
        ],
        "client certificate",
    )?;
    expect_refused(&ovl, host, &[("OVL_ETCD_CACERT", cacert)], "etcds://")?;
    expect_refused(
        &ovl,
        host,
        &[
            ("OVL_STORE", tls_url),
            ("OVL_ETCD_CACERT", "/nonexistent/ca.pem"),
        ],
        "/nonexistent/ca.pem",
    )?;

    agent_stays_alive(&lab, &ovl, host, &good)
}

#[test]
fn etcd_with_authentication_needs_the_right_user_and_password() -> Result<()> {
    let lab = Lab::new("etcd-auth")?;
    let (router, hosts) = lab.routed_hosts(1)?;
    let host = &hosts[0];
    let addr = host.gateway.context("routed hosts have a gateway")?;
    let mut etcd = Etcd::start(&lab, &router, addr)?;
    etcd.enable_auth("r00t", "ovl", "s3cret")?;
    let ovl = Ovl::with_store(&lab, &etcd.url())?;

    // The finding: ovl had no way to log in.
    expect_refused(&ovl, host, &[], "--etcd-user")?;
    expect_refused(
        &ovl,
        host,
        &[("OVL_ETCD_USER", "ovl"), ("OVL_ETCD_PASSWORD", "nope")],
        "wrong etcd user or password",
    )?;
    expect_refused(&ovl, host, &[("OVL_ETCD_USER", "ovl")], "OVL_ETCD_PASSWORD")?;
    // A password is never taken from the command line.
    let (ok, stderr) = attempt(
        &ovl,
        host,
        &[("OVL_ETCD_USER", "ovl")],
        &["--etcd-password", "s3cret", "network", "ls"],
    )?;
    ensure!(!ok && stderr.contains("--etcd-password"), "{stderr}");
    let in_url = format!("{}?user=ovl&password=s3cret", etcd.url());
    expect_refused(
        &ovl,
        host,
        &[("OVL_STORE", in_url.as_str())],
        "never goes in the store URL",
    )?;

    // The fix: the user with its password from the environment or a file.
    let login = [("OVL_ETCD_USER", "ovl"), ("OVL_ETCD_PASSWORD", "s3cret")];
    let (ok, stderr) = attempt(
        &ovl,
        host,
        &login,
        &["network", "create", "blue", "--subnet", "198.18.0.0/24"],
    )?;
    ensure!(ok, "network create with a login: {stderr}");
    let file = lab.tempdir().join("etcd-password");
    std::fs::write(&file, "s3cret\n")?;
    let shown = file.display().to_string();
    let with_password_file = |command: &[&str]| {
        let mut args = vec!["--etcd-user", "ovl", "--etcd-password-file", &shown];
        args.extend_from_slice(command);
        attempt(&ovl, host, &[], &args)
    };
    // Readable by others, it is refused, saying so.
    let (ok, stderr) = with_password_file(&["network", "ls"])?;
    ensure!(
        !ok && stderr.contains("chmod 600") && !stderr.contains("s3cret"),
        "a password file of mode 644: {stderr}"
    );
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let (ok, stderr) = with_password_file(&["network", "inspect", "blue"])?;
    ensure!(ok, "inspect with a password file: {stderr}");

    agent_stays_alive(&lab, &ovl, host, &login)
}
