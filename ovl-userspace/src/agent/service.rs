//! What the agent tells a service manager (systemd's `Type=notify`,
//! `WatchdogSec=`; see `dist/ovl@.service`): ready once the data path
//! forwards and every socket the agent serves is listening — units
//! ordered after it (dockerd, containerd, kubelet) start only then —,
//! stopping when it stops, and alive while its loop turns. Without
//! `NOTIFY_SOCKET` nothing is sent.

use std::{path::Path, time::Duration};

use anyhow::{Result, bail};
use sd_notify::NotifyState;

/// The unit systemd runs the agent with, as shipped.
const UNIT: &str = include_str!("../../../dist/ovl@.service");
/// Its command line, with the binary where `cargo install` or a package
/// would put it.
const SHIPPED_EXEC: &str = "ExecStart=/usr/local/bin/ovl attach %i";

/// The template unit `ovl@.service`, running the binary at `exe`.
pub fn unit(exe: &Path) -> Result<String> {
    let Some(path) = exe.to_str() else {
        bail!(
            "{} is no UTF-8 path: install ovl under a plain path (e.g. /usr/local/bin/ovl)",
            exe.display()
        );
    };
    // systemd would split, expand or unquote these on the command line.
    if !exe.is_absolute()
        || path
            .chars()
            .any(|c| c.is_whitespace() || "%$\\\"'".contains(c))
    {
        bail!(
            "{path} cannot stand in a unit's ExecStart as it is: install ovl under an absolute path without spaces, %, $, quotes or backslashes (e.g. /usr/local/bin/ovl)"
        );
    }
    debug_assert!(UNIT.contains(SHIPPED_EXEC));
    Ok(UNIT.replace(SHIPPED_EXEC, &format!("ExecStart={path} attach %i")))
}

fn tell(what: &str, states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("cannot tell the service manager the agent is {what}: {e}");
    }
}

/// The agent serves: its data path forwards, its sockets listen.
pub(super) fn ready(status: &str) {
    tell("ready", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The agent is stopping (the data path keeps forwarding).
pub(super) fn stopping() {
    tell(
        "stopping",
        &[
            NotifyState::Stopping,
            NotifyState::Status("stopping; the data path keeps forwarding"),
        ],
    );
}

/// How often to say the loop is alive: half the manager's watchdog
/// timeout, as sd_watchdog_enabled(3) advises; `None` without one.
pub(super) fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|t| !t.is_zero())
        .map(|t| t / 2)
}

/// The loop is alive.
pub(super) fn alive() {
    tell("alive", &[NotifyState::Watchdog]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_the_binary_it_is_asked_for_and_refuses_paths_systemd_would_mangle() {
        let unit = unit(Path::new("/opt/ovl/bin/ovl")).unwrap();
        assert!(
            unit.contains("\nExecStart=/opt/ovl/bin/ovl attach %i\n"),
            "{unit}"
        );
        assert!(unit.contains("\nType=notify\n") && unit.contains("Before=docker.service"));
        for bad in [
            "/opt/my ovl/ovl",
            "/opt/100%/ovl",
            "relative/ovl",
            "/opt/$HOME/ovl",
        ] {
            let err = super::unit(Path::new(bad)).unwrap_err().to_string();
            assert!(err.contains("/usr/local/bin/ovl"), "{bad}: {err}");
        }
    }
}
