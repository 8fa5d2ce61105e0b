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

/// How the store records namespace `name` given on a command line: a bare
/// name (under /run/netns) as it is, a path made absolute (not resolved:
/// the same argument always gives the same record), so that the agent and
/// later commands, whatever their working directory, find the same file.
pub fn normalise(name: &str) -> Result<String> {
    if !name.contains('/') {
        return Ok(name.to_owned());
    }
    let abs = std::path::absolute(name)
        .with_context(|| format!("make the namespace path {name:?} absolute"))?;
    abs.into_os_string()
        .into_string()
        .map_err(|p| anyhow::anyhow!("namespace path {p:?} is not UTF-8; give another path"))
}

/// `statfs` magic of nsfs, the filesystem behind namespace files.
const NSFS_MAGIC: libc::c_long = 0x6e73_6673;
/// `NS_GET_NSTYPE` (linux/nsfs.h: `_IO(0xb7, 0x3)`): a namespace file's
/// kind, as a `CLONE_NEW*` flag.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Whether `file` is a network namespace (`ip netns add`'s files,
/// `/proc/PID/ns/net`), not any other file or kind of namespace.
pub fn is_network_namespace(file: &File) -> bool {
    // SAFETY: fstatfs fills the zeroed struct for a descriptor we own.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 || fs.f_type != NSFS_MAGIC {
        return false;
    }
    // SAFETY: an argument-less ioctl on a descriptor we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    kind == libc::CLONE_NEWNET
}

/// Opens namespace `name`, with an error that says how to create it, and
/// refuses a file that is not a network namespace.
pub fn open(name: &str) -> Result<File> {
    let path = path_of(name);
    let file = File::open(&path).with_context(|| {
        format!(
            "network namespace {name:?} not found at {}; create it with `ip netns add {name}`",
            path.display()
        )
    })?;
    if !is_network_namespace(&file) {
        bail!(
            "{} is not a network namespace; give a name under {NETNS_DIR} (`ip netns add NAME`) \
             or a namespace file such as /proc/PID/ns/net",
            path.display()
        );
    }
    Ok(file)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_network_namespace_files_are_network_namespaces() {
        let open = |p: &str| File::open(p).unwrap();
        assert!(is_network_namespace(&open("/proc/self/ns/net")));
        assert!(!is_network_namespace(&open("/proc/self/ns/mnt")));
        assert!(!is_network_namespace(&open("/etc/hostname")));
        assert!(!is_network_namespace(&open("/tmp")));
        let e = super::open("/tmp").unwrap_err().to_string();
        assert!(e.contains("not a network namespace"), "{e}");
    }

    #[test]
    fn names_stay_and_paths_become_absolute() {
        assert_eq!(normalise("c1").unwrap(), "c1");
        assert_eq!(normalise("/run/netns/c1").unwrap(), "/run/netns/c1");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            normalise("./ns/c1").unwrap(),
            cwd.join("ns/c1").display().to_string()
        );
    }
}
