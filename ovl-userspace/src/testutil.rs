//! Helpers the unit tests share: a scratch directory removed when the
//! test ends, whether it passed or panicked.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// Numbers the directories of this process, so parallel tests never share
/// one.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A directory path under the system's temp dir, unique to this process
/// and guard (`ovl-<tag>-<pid>-<n>`). It does not exist yet (tests that
/// check what creating it does create it themselves); dropping the guard
/// removes it with everything in it.
pub(crate) struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// A fresh path for `tag` (a word naming the test). A leftover of an
    /// earlier process with the same pid, one killed before its guards
    /// ran, is removed first.
    pub(crate) fn new(tag: &str) -> TestDir {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ovl-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        TestDir { path }
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // Never created (the test failed first) is fine.
        let _ = fs::remove_dir_all(&self.path);
    }
}
