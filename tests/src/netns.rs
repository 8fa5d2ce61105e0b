// A handle on one network namespace made by a `Lab`: runs commands inside it
// and reads link facts from it. It owns nothing; the `Lab` deletes it.

use std::fmt;
use std::process::Output;

use anyhow::{Context, Result};

use crate::cmd;

/// A named network namespace (`/run/netns/<name>`), created and deleted by a
/// [`Lab`](crate::Lab). Cloning copies the name only.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Wraps an existing namespace name; the caller keeps responsibility for
    /// deleting it. Labs use this for the namespaces they create.
    pub fn from_name(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// The namespace name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `argv` inside the namespace (`ip netns exec NAME argv...`) and
    /// fails, with the command line and output in the message, unless it
    /// exits with status 0.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        cmd::run(&self.exec_argv(argv))
    }

    /// Runs `argv` inside the namespace and returns its output whatever the
    /// exit status (for probes where failure is an expected outcome).
    pub fn exec_unchecked(&self, argv: &[&str]) -> Result<Output> {
        cmd::run_unchecked(&self.exec_argv(argv))
    }

    /// Runs `ip -n NAME args...`: cheaper than [`exec`](Self::exec) because
    /// `ip` switches namespace itself without a new mount namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut argv = vec!["ip", "-n", self.name.as_str()];
        argv.extend_from_slice(args);
        cmd::run(&argv)
    }

    /// Sets sysctl `key` (dotted form, e.g. `net.ipv4.ip_forward`) to
    /// `value` inside the namespace; `/proc/sys/net` is per namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// The MTU of `iface` in this namespace.
    pub fn link_mtu(&self, iface: &str) -> Result<u32> {
        let mtu = self.read_sysfs_number(&format!("/sys/class/net/{iface}/mtu"))?;
        u32::try_from(mtu).with_context(|| format!("MTU of {iface} in {self} out of range: {mtu}"))
    }

    /// One of the kernel's per-link counters of `iface`, named as in
    /// `/sys/class/net/IFACE/statistics/` (`rx_packets`, `tx_dropped`, ...).
    pub fn link_counter(&self, iface: &str, counter: &str) -> Result<u64> {
        self.read_sysfs_number(&format!("/sys/class/net/{iface}/statistics/{counter}"))
    }

    /// The argv that runs `argv` inside this namespace.
    pub(crate) fn exec_argv<'a>(&'a self, argv: &[&'a str]) -> Vec<&'a str> {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(argv);
        full
    }

    /// The interface in this namespace that carries IPv4 address `addr`.
    pub fn iface_with_addr(&self, addr: std::net::Ipv4Addr) -> Result<String> {
        let out = self.ip(&["-o", "-4", "addr", "show"])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let needle = format!(" {addr}/");
        text.lines()
            .find(|line| line.contains(&needle))
            .and_then(|line| line.split_whitespace().nth(1))
            .map(str::to_owned)
            .with_context(|| format!("no interface with {addr} in {self}:\n{text}"))
    }

    /// The MAC address of `iface` in this namespace, as sysfs prints it.
    pub fn link_mac(&self, iface: &str) -> Result<String> {
        let out = self.exec(&["cat", &format!("/sys/class/net/{iface}/address")])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    // `ip netns exec` remounts /sys for the target namespace, so sysfs must
    // be read through it rather than from this process.
    fn read_sysfs_number(&self, path: &str) -> Result<u64> {
        let output = self.exec(&["cat", path])?;
        let text = cmd::stdout_text(&output);
        text.trim()
            .parse()
            .with_context(|| format!("{path} in {self} is not a number: {text:?}"))
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Netns {
    /// Runs `f` on a thread of its own that has entered this namespace, so
    /// every socket `f` opens (and every thread it starts) lives there:
    /// how a test talks to a server of the lab from its own process.
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let ns = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a namespace descriptor we own; it only
                // changes this thread's network namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(anyhow::anyhow!(
                        "enter {path}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread inside {path} panicked"))?
        })
    }
}
