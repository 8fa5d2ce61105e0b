//! The host firewall's say over what ovl forwards. External egress and
//! published ports are forwarded by the host, through the FORWARD chain of
//! its iptables; dockerd sets that chain's policy to DROP when it switches
//! forwarding on (its default), and hardened hosts do the same, which
//! would drop every packet of them. Docker's own overlay gets through with
//! rules for docker_gwbridge that Docker adds; ovl appends one rule that
//! accepts what ovl marked as its networks' own (the egress program marks
//! what containers send out, the published-port rules what comes in, and
//! conntrack restores the mark on replies).
//!
//! Through the `iptables` command, so that the rule lands in whichever
//! backend the host's iptables (and Docker) use. Appended, so every rule
//! before it — the administrator's, `DOCKER-USER`'s — still decides first;
//! it only keeps the policy from dropping ovl's traffic. A host without
//! iptables has no such chain to get through (nftables tables of its own
//! are the administrator's: README, "External egress").

use std::process::{Command, Output};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use ovl_common::maps::{EGRESS_MARK_BASE, EGRESS_MARK_MASK};

/// The chain the rule goes into.
const CHAIN: &str = "FORWARD";

/// What names the rule as ovl's (and what `iptables -S` shows).
const COMMENT: &str = "ovl: forward its networks' external egress and published ports";

/// The rule, as `iptables` takes it after the chain.
fn rule() -> Vec<String> {
    [
        "-m",
        "mark",
        "--mark",
        &format!("{EGRESS_MARK_BASE:#x}/{EGRESS_MARK_MASK:#x}"),
        "-m",
        "comment",
        "--comment",
        COMMENT,
        "-j",
        "ACCEPT",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `iptables -w <op> FORWARD <rule>`; `None` when there is no
/// `iptables` to run.
fn iptables(op: &str) -> Result<Option<Output>> {
    let mut args = vec![
        "-w".to_owned(),
        "5".to_owned(),
        op.to_owned(),
        CHAIN.to_owned(),
    ];
    args.extend(rule());
    match Command::new("iptables").args(&args).output() {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("cannot run iptables"),
    }
}

/// Whether the rule is in the chain (`None`: no iptables here).
fn present() -> Result<Option<bool>> {
    Ok(iptables("-C")?.map(|out| out.status.success()))
}

/// Appends the rule unless the chain has it.
pub fn ensure() -> Result<()> {
    if present()? != Some(false) {
        return Ok(());
    }
    let out = iptables("-A")?.context("iptables went away")?;
    if !out.status.success() {
        bail!(
            "iptables -A {CHAIN} (accepting what ovl marked): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    log::info!(
        "appended to the host firewall's {CHAIN} chain a rule accepting ovl's external egress \
         and published ports (marked {EGRESS_MARK_BASE:#x}/{EGRESS_MARK_MASK:#x})"
    );
    Ok(())
}

/// [`ensure`], saying once when it fails (and what that costs) and once
/// when it works again.
pub fn ensure_logged() {
    static FAILING: Mutex<Option<String>> = Mutex::new(None);
    let outcome = ensure().map_err(|e| format!("{e:#}"));
    let mut failing = FAILING.lock().unwrap_or_else(|p| p.into_inner());
    match outcome {
        Ok(()) => {
            if failing.take().is_some() {
                log::info!("the host firewall's {CHAIN} rule for ovl is in place again");
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

/// Deletes the rule (every copy of it), for `ovl detach`. Returns what it
/// did.
pub fn remove() -> Result<Option<String>> {
    let mut removed = 0;
    while present()? == Some(true) {
        let out = iptables("-D")?.context("iptables went away")?;
        if !out.status.success() {
            bail!(
                "iptables -D {CHAIN} (ovl's rule): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        removed += 1;
    }
    Ok((removed > 0).then(|| format!("removed ovl's rule from the host firewall's {CHAIN} chain")))
}
