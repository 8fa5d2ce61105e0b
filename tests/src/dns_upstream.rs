// A DNS server for a lab's resolvers to forward to: dnsmasq in one of the
// lab's namespaces, answering a fixed set of names and nothing from the host.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;
use crate::probe::wait_until;
use crate::{ChildHandle, Lab};

/// How long dnsmasq may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the upstream knows: `known` names answer with their address,
/// `missing` names are NXDOMAIN, every other name is REFUSED (no
/// resolv.conf, no hosts file: nothing of the machine's leaks in).
#[derive(Clone, Debug)]
pub struct DnsUpstream<'a> {
    /// The address dnsmasq binds (port 53, UDP and TCP); it must be one of
    /// the namespace's own.
    pub listen: Ipv4Addr,
    pub known: &'a [(&'a str, Ipv4Addr)],
    pub missing: &'a [&'a str],
    /// Every question on dnsmasq's stderr (`query[A] NAME from ADDR`), for
    /// a test that checks what was asked; off where its cost would be
    /// measured.
    pub log_queries: bool,
}

impl DnsUpstream<'_> {
    /// Starts dnsmasq in `ns` as a process of `lab` and returns once it
    /// listens on `listen`:53.
    pub fn start(&self, lab: &Lab, ns: &Netns) -> Result<ChildHandle> {
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".to_string(),
            "--no-resolv".to_string(),
            "--no-hosts".to_string(),
            "--bind-interfaces".to_string(),
            format!("--listen-address={}", self.listen),
            "--port=53".to_string(),
            "--pid-file=".to_string(),
        ];
        if self.log_queries {
            args.push("--log-queries".to_string());
            args.push("--log-facility=-".to_string());
        }
        args.extend(
            self.known
                .iter()
                .map(|(name, addr)| format!("--address=/{name}/{addr}")),
        );
        // An empty address: dnsmasq answers NXDOMAIN for the name.
        args.extend(
            self.missing
                .iter()
                .map(|name| format!("--address=/{name}/")),
        );
        let mut argv = vec!["dnsmasq"];
        argv.extend(args.iter().map(String::as_str));
        let child = lab.spawn(ns, &argv, &[])?;
        // Listening, not a guess of how long it takes to start.
        let socket = format!("{}:53 ", self.listen);
        wait_until(LISTEN_TIMEOUT, || {
            let out = ns.exec(&["ss", "-Hlun"])?;
            Ok(String::from_utf8_lossy(&out.stdout).contains(&socket))
        })
        .with_context(|| {
            format!(
                "dnsmasq never listened on {}:53 in {ns}\n{}",
                self.listen,
                child.output_report()
            )
        })?;
        Ok(child)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dig @ADDR NAME` in `ns`: its status line's status and its answers.
    fn ask(ns: &Netns, server: Ipv4Addr, name: &str) -> Result<(String, Vec<String>)> {
        let server = format!("@{server}");
        let out = ns.exec(&["dig", "+tries=1", "+time=2", &server, name])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = text
            .split("status: ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .with_context(|| format!("dig printed no status:\n{text}"))?
            .to_string();
        let short = ns.exec(&["dig", "+tries=1", "+time=2", "+short", &server, name])?;
        let answers = String::from_utf8_lossy(&short.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        Ok((status, answers))
    }

    /// Needs root (a namespace of its own), dnsmasq and dig.
    #[test]
    fn the_upstream_answers_known_names_denies_missing_ones_and_refuses_the_rest() -> Result<()> {
        let lab = Lab::new("dnsup")?;
        let ns = lab.netns("router")?;
        let listen = Ipv4Addr::LOCALHOST;
        let known = Ipv4Addr::new(203, 0, 113, 7);
        let upstream = DnsUpstream {
            listen,
            known: &[("known.example", known)],
            missing: &["missing.example"],
            log_queries: true,
        }
        .start(&lab, &ns)?;
        assert_eq!(
            ask(&ns, listen, "known.example")?,
            ("NOERROR".to_string(), vec![known.to_string()])
        );
        assert_eq!(ask(&ns, listen, "missing.example")?.0, "NXDOMAIN");
        assert_eq!(ask(&ns, listen, "other.example")?.0, "REFUSED");
        let log = upstream.stderr()?;
        assert!(
            log.contains("query[A] known.example from 127.0.0.1"),
            "{}",
            upstream.output_report()
        );
        Ok(())
    }
}
