//! The bpffs directory a node pins its maps in: `<pin root>/<node>`.
//! Mounts a bpffs where none is (e.g. under `ip netns exec`, which hides
//! the host's /sys/fs/bpf) and removes a node's pins.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Default root of ovl's pins.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/ovl";
/// The conventional bpffs mount point.
const SYS_FS_BPF: &str = "/sys/fs/bpf";

/// The pin directory of `node` under `root`.
pub fn node_dir(root: &Path, node: &str) -> PathBuf {
    root.join(node)
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

/// Makes sure `dir` exists on a bpffs, mounting one if needed: at
/// /sys/fs/bpf when `dir` is below that empty mount point, else at `dir`.
pub fn prepare(dir: &Path) -> Result<()> {
    let sys_bpf = Path::new(SYS_FS_BPF);
    if dir.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        mount_bpffs(sys_bpf)?;
    }
    fs::create_dir_all(dir).with_context(|| format!("create pin directory {}", dir.display()))?;
    if !is_bpffs(dir) {
        mount_bpffs(dir)?;
    }
    Ok(())
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

/// Removes a node's pins (files, then the directory).
pub fn remove_node_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry?.path();
        fs::remove_file(&path).with_context(|| format!("unpin {}", path.display()))?;
    }
    fs::remove_dir(dir).with_context(|| format!("remove {}", dir.display()))
}
