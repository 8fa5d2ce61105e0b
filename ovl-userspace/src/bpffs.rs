//! The bpffs directory a node pins its maps and links in:
//! `<pin root>/<node>/` with `links/` below it. Owns where pins live, the
//! one-agent-per-node lock on that directory, and removing a node's pins.

use std::{
    ffi::CString,
    fs::{self, File},
    os::{fd::AsRawFd, linux::fs::MetadataExt, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Default root of ovl's pins.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/ovl";
/// The conventional bpffs mount point.
const SYS_FS_BPF: &str = "/sys/fs/bpf";
/// Sub-directory of a node's pin directory that holds its bpf_links.
pub const LINKS_DIR: &str = "links";

/// The pin directory of `node` under `root`; a name that is not one safe
/// path component (`..`, `a/b`, empty) is refused, so no node's directory
/// is ever outside the pin root.
pub fn node_dir(root: &Path, node: &str) -> Result<PathBuf, crate::validate::InvalidInput> {
    crate::validate::node_name(node)?;
    Ok(root.join(node))
}

/// True when `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// The nearest existing ancestor of `path` (or `path` itself).
fn existing_ancestor(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
}

/// Makes sure `dir` (a node's pin directory) exists on a bpffs. Under the
/// conventional /sys/fs/bpf a bpffs is mounted there if none is (as
/// systemd does at boot); any other pin root must already be on one.
pub fn prepare(dir: &Path) -> Result<()> {
    let sys_bpf = Path::new(SYS_FS_BPF);
    if dir.starts_with(sys_bpf) {
        if !is_bpffs(sys_bpf) {
            mount_bpffs(sys_bpf)?;
            if root_mount_is_private() {
                log::warn!(
                    "mounted a bpffs at {SYS_FS_BPF} in a private mount namespace (e.g. `ip netns exec`): its pins, and with them the data path, vanish when this process exits. Run the agent with `nsenter --net=...` instead, or pass --pin-root on a bpffs mounted in the host's mount namespace"
                );
            }
        }
    } else if !is_bpffs(existing_ancestor(dir)) {
        bail!(
            "pin root {} is not on a bpffs; mount one (`mount -t bpf bpf {}`) or use the default --pin-root {DEFAULT_PIN_ROOT}",
            dir.parent().unwrap_or(dir).display(),
            dir.parent().unwrap_or(dir).display()
        );
    }
    fs::create_dir_all(dir.join(LINKS_DIR))
        .with_context(|| format!("create pin directory {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!(
            "{} is not on a bpffs; mount one there or pass another --pin-root",
            dir.display()
        );
    }
    Ok(())
}

/// True when this process's root mount only receives mounts from another
/// namespace (`ip netns exec` makes it so): mounts made here stay here.
fn root_mount_is_private() -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // Fields: id parent major:minor root mountpoint options optional... - fs
    info.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(4) == Some(&"/")
            && fields
                .iter()
                .skip(6)
                .take_while(|f| **f != "-")
                .all(|f| !f.starts_with("shared:"))
    })
}

fn mount_bpffs(at: &Path) -> Result<()> {
    log::info!("mounting a bpffs at {}", at.display());
    let target = CString::new(at.as_os_str().as_bytes()).context("pin path has a NUL byte")?;
    let fstype = c"bpf";
    // SAFETY: mount(2) with valid NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mount bpffs at {}: {}; mount one yourself (`mount -t bpf bpf {}`) or pass --pin-root",
            at.display(),
            std::io::Error::last_os_error(),
            at.display()
        );
    }
    Ok(())
}

/// Removes a node's pins: links (which detaches them), maps, directories.
pub fn remove_node_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            remove_node_dir(&path)?;
        } else {
            fs::remove_file(&path).with_context(|| format!("unpin {}", path.display()))?;
        }
    }
    fs::remove_dir(dir).with_context(|| format!("remove {}", dir.display()))
}

/// Whether `dir` holds a pin, in it or below it (an unreadable directory
/// counts as holding one: never removed by a guess).
pub fn holds_pins(dir: &Path) -> bool {
    match fs::read_dir(dir) {
        Ok(entries) => entries.into_iter().any(|e| match e {
            Ok(e) => {
                let path = e.path();
                !path.is_dir() || holds_pins(&path)
            }
            Err(_) => true,
        }),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

/// Exclusive ownership of a node's pin directory: one agent (or `ovl
/// detach`) per node at a time. Released when dropped or when the process
/// dies, however it dies.
#[derive(Debug)]
pub struct NodeLock {
    _dir: File,
}

/// Why a node's pin directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another ovl agent{holder} already runs for this node (it holds {dir}); stop it first, or give this one another --node"
    )]
    Held { dir: PathBuf, holder: String },
    #[error("lock {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How long [`NodeLock::acquire`] waits on a holder /proc/locks no longer
/// shows.
const GONE_HOLDER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl NodeLock {
    /// Takes the lock on `dir` without waiting for a holder that runs. A
    /// holder that has gone by the time /proc/locks is read (an agent just
    /// killed: a child it was starting holds its descriptors until that
    /// child's exec closes them) is given up to [`GONE_HOLDER_WAIT`].
    pub fn acquire(dir: &Path) -> Result<NodeLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_owned(),
            source,
        };
        let file = File::open(dir).map_err(io)?;
        let deadline = std::time::Instant::now() + GONE_HOLDER_WAIT;
        // SAFETY: flock on a descriptor we own; released when it closes.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            let holder = lock_holder(&file);
            if holder.is_some() || std::time::Instant::now() >= deadline {
                return Err(LockError::Held {
                    dir: dir.to_owned(),
                    holder: holder
                        .map(|pid| format!(" (pid {pid})"))
                        .unwrap_or_default(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(NodeLock { _dir: file })
    }
}

/// The pid holding a flock on `file`, from /proc/locks.
pub(crate) fn lock_holder(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let (dev, ino) = (meta.st_dev(), meta.st_ino());
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let locks = fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF"
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, id) = (f.get(1)?, f.get(4)?, f.get(5)?);
        let mut parts = id.split(':');
        let maj = u32::from_str_radix(parts.next()?, 16).ok()?;
        let min = u32::from_str_radix(parts.next()?, 16).ok()?;
        let i: u64 = parts.next()?.parse().ok()?;
        (*kind == "FLOCK" && maj == major && min == minor && i == ino)
            .then(|| pid.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestDir;

    #[test]
    fn a_directory_holds_pins_when_a_file_is_in_it_or_below() {
        let tmp = TestDir::new("holds-pins");
        let dir = tmp.path().join("node");
        assert!(!holds_pins(&dir), "missing");
        fs::create_dir_all(dir.join(LINKS_DIR)).unwrap();
        assert!(!holds_pins(&dir), "as prepare leaves it");
        fs::write(dir.join(LINKS_DIR).join("decap"), b"").unwrap();
        assert!(holds_pins(&dir), "a link pinned");
    }

    #[test]
    fn a_second_lock_on_a_node_directory_is_refused_naming_the_holder() {
        let tmp = TestDir::new("lock-test");
        let dir = tmp.path();
        fs::create_dir_all(dir).unwrap();
        let first = NodeLock::acquire(dir).unwrap();
        let err = NodeLock::acquire(dir).unwrap_err().to_string();
        assert!(
            err.contains("already runs") && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        NodeLock::acquire(dir).unwrap();
    }

    #[test]
    fn a_pin_root_off_bpffs_is_refused_with_the_mount_command() {
        let dir = std::env::temp_dir().join(format!("ovl-notbpf-{}/node", std::process::id()));
        let err = prepare(&dir).unwrap_err().to_string();
        assert!(err.contains("mount -t bpf bpf"), "{err}");
        assert!(!dir.exists(), "nothing created");
    }
}
