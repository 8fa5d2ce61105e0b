// Locating the ovl binary under test: an explicit OVL_BIN, or the newest
// debug/release build in the workspace's target directory.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Environment variable naming the ovl binary to test explicitly.
pub const OVL_BIN_ENV: &str = "OVL_BIN";

/// The ovl binary scenarios run: `$OVL_BIN` if set, else whichever of
/// `<target>/debug/ovl` and `<target>/release/ovl` was built last, where
/// `<target>` is `$CARGO_TARGET_DIR` or the workspace's `target/`.
pub fn ovl_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(OVL_BIN_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{OVL_BIN_ENV}={} is not a file", path.display());
        }
        return Ok(path);
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("target"),
    };
    let candidates = [target.join("debug/ovl"), target.join("release/ovl")];
    let newest = candidates
        .iter()
        .filter_map(|path| Some((fs::metadata(path).ok()?.modified().ok()?, path)))
        .max_by_key(|(modified, _)| *modified);
    match newest {
        Some((_, path)) => Ok(path.clone()),
        None => bail!(
            "no ovl binary: neither {} nor {} exists; run `cargo xtask build` \
             (or set {OVL_BIN_ENV})",
            candidates[0].display(),
            candidates[1].display()
        ),
    }
}

/// Environment variable naming the `upgrade-test` build of the kernel
/// programs (`cargo xtask test` builds it and sets this).
pub const UPGRADE_OBJECT_ENV: &str = "OVL_UPGRADE_OBJECT";

/// The kernel object whose programs differ from the ones `ovl` embeds,
/// for upgrade scenarios: `$OVL_UPGRADE_OBJECT`.
pub fn upgrade_object() -> Result<PathBuf> {
    match std::env::var_os(UPGRADE_OBJECT_ENV) {
        Some(p) if Path::new(&p).is_file() => Ok(PathBuf::from(p)),
        Some(p) => bail!(
            "{UPGRADE_OBJECT_ENV}={} is not a file",
            Path::new(&p).display()
        ),
        None => bail!(
            "{UPGRADE_OBJECT_ENV} is not set: run the upgrade scenarios through `cargo xtask test`, which builds the upgrade-test variant of the kernel programs"
        ),
    }
}

/// The cargo workspace root: this crate lives in `<root>/tests`.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}
