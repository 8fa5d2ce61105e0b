//! The host firewall's say over what ovl forwards. External egress and
//! published ports are forwarded by the host, through the FORWARD chain of
//! its iptables; dockerd sets that chain's policy to DROP when it switches
//! forwarding on (its default), and hardened hosts do the same, which
//! would drop every packet of them. Docker's own overlay gets through with
//! rules for docker_gwbridge that Docker adds; ovl appends rules that
//! accept what ovl marked as its networks' own (the egress program marks
//! what containers send out, the published-port rules what comes in, and
//! conntrack restores the mark on replies) — as narrowly as Docker's: into
//! ovl's veths (`ovl+`), out of them on connections already accepted, and
//! new connections of containers only out of the underlay. A container
//! reaches no other interface of the host that way, so Docker's bridge
//! networks stay as isolated from ovl's containers as from each other
//! (Docker drops what one of its bridges sends into another).
//!
//! Through the `iptables` command, so that the rules land in whichever
//! backend the host's iptables (and Docker) use. Appended, so every rule
//! before them — the administrator's, `DOCKER-USER`'s, Docker's own —
//! still decides first; they only keep the policy from dropping ovl's
//! traffic. A host without iptables has no such chain to get through
//! (nftables tables of its own are the administrator's: README,
//! "External egress").

use std::process::{Command, Output};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use ovl_common::maps::{EGRESS_MARK_BASE, EGRESS_MARK_MASK};

/// The chain the rules go into.
const CHAIN: &str = "FORWARD";

/// The interfaces of ovl's containers, as iptables matches them (host ends
/// of veths are `ovl` and eight hex digits, `model::host_ifname`).
const VETHS: &str = "ovl+";

/// The comments that name the rules as ovl's (one word each, so that
/// `iptables -S` shows them unquoted).
const INTO_CONTAINERS: &str = "ovl-into-containers";
const FROM_CONTAINERS: &str = "ovl-from-containers";
const EGRESS: &str = "ovl-egress";

fn mark() -> String {
    format!("{EGRESS_MARK_BASE:#x}/{EGRESS_MARK_MASK:#x}")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// The rules for `underlay`, as `iptables` takes them after the chain:
/// into the containers (replies, published ports, the hairpin); out of
/// them on accepted connections (a published port's answers, wherever its
/// client came from); and their new connections out of the underlay
/// (external egress).
fn rules(underlay: &str) -> Vec<Vec<String>> {
    let ours = format!("-m mark --mark {} -m comment --comment", mark());
    [
        format!("-o {VETHS} {ours} {INTO_CONTAINERS} -j ACCEPT"),
        format!(
            "-i {VETHS} -m conntrack --ctstate RELATED,ESTABLISHED {ours} {FROM_CONTAINERS} -j ACCEPT"
        ),
        format!("-i {VETHS} -o {underlay} {ours} {EGRESS} -j ACCEPT"),
    ]
    .iter()
    .map(|rule| rule.split_whitespace().map(str::to_owned).collect())
    .collect()
}

/// Runs `iptables -w 5 <op> FORWARD <rule>`; `None` when there is no
/// `iptables` to run.
fn iptables(op: &str, rule: &[String]) -> Result<Option<Output>> {
    let mut args = strings(&["-w", "5", op, CHAIN]);
    args.extend_from_slice(rule);
    match Command::new("iptables").args(&args).output() {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("cannot run iptables"),
    }
}

/// Whether `rule` is in the chain (`None`: no iptables here).
fn present(rule: &[String]) -> Result<Option<bool>> {
    Ok(iptables("-C", rule)?.map(|out| out.status.success()))
}

/// Runs `iptables <op> FORWARD <rule>` (`-A`, `-D`), which must succeed.
fn change(op: &str, rule: &[String]) -> Result<()> {
    let out = iptables(op, rule)?.context("iptables went away")?;
    if !out.status.success() {
        bail!(
            "iptables {op} {CHAIN} {}: {}",
            rule.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// ovl's rules in the chain as `iptables -S` lists them, each as the
/// arguments after the chain (one-word comments need no unquoting).
fn listed() -> Result<Vec<Vec<String>>> {
    let out = match Command::new("iptables")
        .args(["-w", "5", "-S", CHAIN])
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("cannot run iptables"),
    };
    if !out.status.success() {
        bail!(
            "iptables -S {CHAIN}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let ours = [INTO_CONTAINERS, FROM_CONTAINERS, EGRESS];
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("-A {CHAIN} ")))
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter(|words| {
            words
                .windows(2)
                .any(|w| w[0] == "--comment" && ours.contains(&w[1].as_str()))
        })
        .collect())
}

/// Whether `rule` (as [`listed`] returns it) is ovl's egress rule for
/// another underlay than `underlay`. Compared by the out-interface alone:
/// `iptables -S` may list a rule's words in another order than they were
/// given.
fn egress_elsewhere(rule: &[String], underlay: &str) -> bool {
    let word_after = |key: &str| rule.windows(2).find(|w| w[0] == key).map(|w| w[1].as_str());
    word_after("--comment") == Some(EGRESS) && word_after("-o") != Some(underlay)
}

/// Appends the rules for `underlay` the chain lacks, and deletes ovl's
/// rules for another underlay.
pub fn ensure(underlay: &str) -> Result<()> {
    let want = rules(underlay);
    let mut added = 0;
    for rule in &want {
        match present(rule)? {
            None => return Ok(()),
            Some(true) => continue,
            Some(false) => {}
        }
        change("-A", rule)?;
        added += 1;
    }
    if added > 0 {
        for stale in listed()?.iter().filter(|r| egress_elsewhere(r, underlay)) {
            change("-D", stale)?;
        }
        log::info!(
            "appended to the host firewall's {CHAIN} chain {added} rule(s) accepting what ovl \
             marked ({}) into its containers, out of them on their connections, and their \
             external egress out of {underlay}",
            mark()
        );
    }
    Ok(())
}

/// [`ensure`], saying once when it fails (and what that costs) and once
/// when it works again.
pub fn ensure_logged(underlay: &str) {
    static FAILING: Mutex<Option<String>> = Mutex::new(None);
    let outcome = ensure(underlay).map_err(|e| format!("{e:#}"));
    let mut failing = FAILING.lock().unwrap_or_else(|p| p.into_inner());
    match outcome {
        Ok(()) => {
            if failing.take().is_some() {
                log::info!("the host firewall's {CHAIN} rules for ovl are in place again");
            }
        }
        Err(e) => {
            if failing.as_deref() != Some(e.as_str()) {
                log::warn!(
                    "{e}; where the {CHAIN} chain's policy drops (dockerd sets one), containers \
                     have no way out and published ports no way in: accept what is marked \
                     {EGRESS_MARK_BASE:#x}/{EGRESS_MARK_MASK:#x} there"
                );
            }
            *failing = Some(e);
        }
    }
}

/// Deletes ovl's rules (every copy of them), for `ovl detach`. Returns
/// what it did.
pub fn remove() -> Result<Option<String>> {
    let mut removed = 0;
    for rule in listed()? {
        change("-D", &rule)?;
        removed += 1;
    }
    Ok((removed > 0)
        .then(|| format!("removed ovl's {removed} rule(s) from the host firewall's {CHAIN} chain")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn only_the_egress_rule_of_another_underlay_is_stale() {
        // As `iptables -S FORWARD` lists them (after `-A FORWARD`).
        let egress = words(
            "-i ovl+ -o eth0 -m mark --mark 0x6f000000/0xff000000 -m comment --comment ovl-egress -j ACCEPT",
        );
        assert!(!egress_elsewhere(&egress, "eth0"));
        assert!(egress_elsewhere(&egress, "eth1"));
        let into = words(
            "-o ovl+ -m mark --mark 0x6f000000/0xff000000 -m comment --comment ovl-into-containers -j ACCEPT",
        );
        assert!(!egress_elsewhere(&into, "eth1"));
        for rule in rules("eth0") {
            assert!(!egress_elsewhere(&rule, "eth0"), "{rule:?}");
        }
    }
}
