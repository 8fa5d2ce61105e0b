//! Network namespaces by name: entering one for the current thread and
//! returning to where the thread was, however the work in between ends.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// Where `ip netns add` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The file behind namespace `name` (a name under /run/netns or a path).
pub fn path_of(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        Path::new(NETNS_DIR).join(name)
    }
}

/// Opens namespace `name`, with an error that says how to create it.
pub fn open(name: &str) -> Result<File> {
    let path = path_of(name);
    File::open(&path).with_context(|| {
        format!(
            "network namespace {name:?} not found at {}; create it with `ip netns add {name}`",
            path.display()
        )
    })
}

/// While alive, the current thread is in another network namespace; on
/// drop it returns to the one it came from.
pub struct Entered {
    home: File,
}

/// Moves the current thread into namespace `name`.
pub fn enter(name: &str) -> Result<Entered> {
    let home = File::open("/proc/thread-self/ns/net").context("open current network namespace")?;
    let target = open(name)?;
    setns(&target).with_context(|| format!("enter network namespace {name:?}"))?;
    Ok(Entered { home })
}

impl Drop for Entered {
    fn drop(&mut self) {
        // Staying in the wrong namespace would silently misconfigure
        // everything that follows: that is not recoverable.
        setns(&self.home).expect("return to the original network namespace");
    }
}

fn setns(ns: &File) -> Result<()> {
    // SAFETY: setns on a namespace descriptor we own.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(std::io::Error::last_os_error());
    }
    Ok(())
}
