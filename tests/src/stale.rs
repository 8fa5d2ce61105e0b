// Cleanup of labs whose test process died without unwinding (SIGKILL, OOM):
// their namespaces, the processes inside them, bpffs mounts and temp dirs.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cmd;
use crate::lab::{LAB_NAME_PREFIX, netns_admin};
use crate::process::{self, Signal};

/// Deletes what labs of dead test processes left behind: kills the
/// processes inside each stale `ovlt-*` namespace, deletes the namespace,
/// unmounts stale bpffs mounts and removes stale temp dirs. Returns how many
/// namespaces were deleted.
///
/// A leftover is stale when the pid embedded in its name
/// (`ovlt-<tag>-<pid>-...`) is no longer a running process; labs of live
/// test processes — including parallel test binaries — are left alone.
/// Names that do not follow the pattern are treated as stale.
pub fn remove_stale_labs() -> Result<usize> {
    remove_labs(is_stale, Reap::No)
}

/// Deletes every lab of this very process the same way, whatever state its
/// `Lab` guards are in: what an interrupted program does before it exits
/// (see [`remove_labs_on_interrupt`](crate::remove_labs_on_interrupt)).
pub(crate) fn remove_own_labs() -> Result<usize> {
    remove_labs(is_own, Reap::Children)
}

/// Deletes the namespaces (and the processes in them), cgroups, mounts and
/// temp dirs whose lab name `belongs`. Goes on past a leftover it cannot
/// remove (another thread may be removing the same lab) and reports every
/// such failure at the end.
fn remove_labs(belongs: fn(&str) -> bool, reap: Reap) -> Result<usize> {
    let mut removed = 0;
    let mut failures: Vec<String> = Vec::new();
    let mut note = |result: Result<()>| {
        if let Err(error) = result {
            failures.push(format!("{error:#}"));
        }
    };
    {
        let _admin = netns_admin();
        let listing = cmd::run(&["ip", "netns", "list"])?;
        // Lines look like `NAME (id: 3)` or just `NAME`.
        let names: Vec<String> = cmd::stdout_text(&listing)
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| belongs(name))
            .map(str::to_string)
            .collect();
        for name in names {
            note(kill_processes_in(&name, reap));
            match cmd::run(&["ip", "netns", "del", &name]) {
                Ok(_) => removed += 1,
                Err(error) => note(Err(error)),
            }
            crate::lab::remove_netns_etc(&name);
        }
    }

    // A namespace deleted before its lab dropped may have left its
    // /etc/netns entry (see `Lab::delete_netns_keeping_etc`).
    if let Ok(entries) = fs::read_dir(NETNS_ETC) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if belongs(&name) {
                crate::lab::remove_netns_etc(&name);
            }
        }
    }

    for name in lab_cgroups()? {
        if belongs(&name) {
            note(remove_cgroup_tree(&name));
        }
    }

    let temp_root = std::env::temp_dir();
    for mount in mount_points_under(&temp_root)? {
        if lab_dir_of(&temp_root, &mount).is_some_and(belongs) {
            let mount_text = mount.to_string_lossy().into_owned();
            note(cmd::run(&["umount", "-l", &mount_text]).map(drop));
        }
    }

    let entries =
        fs::read_dir(&temp_root).with_context(|| format!("cannot list {}", temp_root.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !belongs(&name) || !path.is_dir() {
            continue;
        }
        // Unmounting above was lazy but immediate for path lookup; a mount
        // that is somehow still there keeps the directory.
        if mount_points_under(&path)?.is_empty() {
            note(
                fs::remove_dir_all(&path)
                    .with_context(|| format!("cannot remove {}", path.display())),
            );
        }
    }
    if !failures.is_empty() {
        anyhow::bail!(
            "removed {removed} namespace(s), but: {}",
            failures.join("; ")
        );
    }
    Ok(removed)
}

/// Where `ip netns exec` finds per-namespace /etc files.
const NETNS_ETC: &str = "/etc/netns";

/// Whether [`kill_processes_in`] waits for the children it killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reap {
    /// Leave them to whoever waits for them (a lab's process handles).
    No,
    /// Wait for them: nobody else will (the process is about to exit).
    Children,
}

/// SIGKILLs every process whose network namespace is `netns_name`; with
/// `reap`, also waits for those that are this process's children (a lab's
/// spawned processes), so that none is left when the process exits.
pub(crate) fn kill_processes_in(netns_name: &str, reap: Reap) -> Result<()> {
    let output = cmd::run(&["ip", "netns", "pids", netns_name])?;
    let own_pid = std::process::id() as libc::pid_t;
    for pid in cmd::stdout_text(&output)
        .lines()
        .filter_map(|line| line.trim().parse::<libc::pid_t>().ok())
        .filter(|&pid| pid != own_pid)
    {
        match process::send(pid, Signal::Kill) {
            Err(error) if error.raw_os_error() != Some(libc::ESRCH) => {
                eprintln!("ovl-tests: cannot kill pid {pid} in {netns_name}: {error}")
            }
            // SAFETY: waitpid on a pid that is not our child fails with
            // ECHILD at once; ours dies of the SIGKILL just sent.
            _ if reap == Reap::Children => {
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            }
            _ => {}
        }
    }
    Ok(())
}

/// Where cgroup hierarchies are mounted: `/sys/fs/cgroup` itself (cgroup
/// v2) or one directory per v1 controller below it.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The roots of every cgroup hierarchy of this machine.
fn cgroup_hierarchies() -> Result<Vec<PathBuf>> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.procs").exists() {
        return Ok(vec![root.to_owned()]);
    }
    let mut out = Vec::new();
    let entries = fs::read_dir(root).with_context(|| format!("cannot list {CGROUP_ROOT}"))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.join("cgroup.procs").exists() {
            out.push(path);
        }
    }
    Ok(out)
}

/// Names of top-level cgroups a lab made (container runtimes' parents).
fn lab_cgroups() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for hierarchy in cgroup_hierarchies()? {
        let Ok(entries) = fs::read_dir(&hierarchy) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(LAB_NAME_PREFIX) && entry.path().is_dir() && !names.contains(&name)
            {
                names.push(name);
            }
        }
    }
    Ok(names)
}

/// Kills every process in the top-level cgroup `name` and its children,
/// in every hierarchy, and removes the cgroups (a container runtime's
/// `--cgroup-parent`, whose containers live outside the lab's namespaces
/// and process groups).
pub fn remove_cgroup_tree(name: &str) -> Result<()> {
    let mut dirs = Vec::new();
    for hierarchy in cgroup_hierarchies()? {
        let top = hierarchy.join(name);
        if top.is_dir() {
            collect_dirs(&top, &mut dirs);
        }
    }
    let own_pid = std::process::id() as libc::pid_t;
    for _ in 0..50 {
        let mut alive = false;
        for dir in &dirs {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs
                .lines()
                .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
            {
                if pid != own_pid {
                    alive = true;
                    let _ = process::send(pid, Signal::Kill);
                }
            }
        }
        // Deepest first: a cgroup with children cannot go.
        let mut left = false;
        for dir in dirs.iter().rev() {
            if dir.exists() && fs::remove_dir(dir).is_err() {
                left = true;
            }
        }
        if !left {
            return Ok(());
        }
        if alive {
            std::thread::sleep(std::time::Duration::from_millis(20));
        } else {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
    anyhow::bail!("cgroups still in use after killing their processes: {left:?}")
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// Mount points at or below `dir` in this process's mount namespace.
pub(crate) fn mount_points_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let table = fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    Ok(table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(unescape_mount_path)
        .filter(|mount| mount.starts_with(dir))
        .collect())
}

/// The pid in a lab name `ovlt-<tag>-<pid>-...`, if it has one.
fn owner_of(name: &str) -> Option<Option<libc::pid_t>> {
    let rest = name.strip_prefix(LAB_NAME_PREFIX)?;
    Some(
        rest.split('-')
            .nth(1)
            .and_then(|pid| pid.parse::<libc::pid_t>().ok()),
    )
}

/// Whether a name starting with the lab prefix belongs to a dead process.
fn is_stale(name: &str) -> bool {
    match owner_of(name) {
        None => false,
        Some(Some(pid)) => pid != std::process::id() as libc::pid_t && !process::is_alive(pid),
        Some(None) => true,
    }
}

/// Whether a name is one of this process's labs.
fn is_own(name: &str) -> bool {
    owner_of(name) == Some(Some(std::process::id() as libc::pid_t))
}

/// The first path component below `temp_root` of `path`, e.g. the lab
/// directory `ovlt-x-1-0` of `/tmp/ovlt-x-1-0/bpffs-3`.
fn lab_dir_of<'a>(temp_root: &Path, path: &'a Path) -> Option<&'a str> {
    path.strip_prefix(temp_root)
        .ok()?
        .components()
        .next()?
        .as_os_str()
        .to_str()
}

/// `/proc/self/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_live_owners_are_not_stale() {
        let own = format!("{LAB_NAME_PREFIX}tag-{}-0-router", std::process::id());
        assert!(!is_stale(&own));
        assert!(!is_stale("ovlt-tag-1-0-router"), "pid 1 is always alive");
        assert!(!is_stale("other-namespace"));
    }

    #[test]
    fn names_without_an_owner_pid_are_stale() {
        assert!(is_stale("ovlt-leftover"));
    }

    #[test]
    fn own_labs_are_those_named_with_this_pid() {
        let own = format!("{LAB_NAME_PREFIX}tag-{}-0-router", std::process::id());
        assert!(is_own(&own));
        assert!(!is_own("ovlt-tag-1-0-router"));
        assert!(!is_own("ovlt-leftover"));
        assert!(!is_own(&format!("other-tag-{}-0", std::process::id())));
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path("/tmp/a\\040b"),
            PathBuf::from("/tmp/a b")
        );
        assert_eq!(
            unescape_mount_path("/tmp/plain"),
            PathBuf::from("/tmp/plain")
        );
    }
}
