//! Small files ovl keeps on disk (the agent's journal, the Docker
//! plugin's network IDs), replaced whole: a reader or a crash finds the
//! old content or the new, never a mix.

use std::{
    fs::{self, File},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Writes `bytes` to `path` through a temporary file beside it (mode
/// `mode`, synced) renamed over it, then syncs the directory so that the
/// rename is durable too.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)?;
    // A leftover temporary file keeps its old mode through `open`.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestDir;

    #[test]
    fn a_file_is_replaced_whole_with_its_mode() {
        let tmp = TestDir::new("files-replace");
        fs::create_dir_all(tmp.path()).unwrap();
        let path = tmp.path().join("x.json");
        replace(&path, b"one", 0o600).unwrap();
        // A leftover temporary file of a crash, world-readable.
        fs::write(tmp.path().join("x.json.tmp"), b"half").unwrap();
        fs::set_permissions(
            tmp.path().join("x.json.tmp"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        replace(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!tmp.path().join("x.json.tmp").exists());
    }
}
