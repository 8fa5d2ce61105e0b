//! The embedded default store: one JSON file in a directory, changed under
//! an exclusive `flock` and replaced atomically (write, fsync, rename).
//! Both files are readable by their owner only: a lock file others can
//! open is a lock others can hold forever.

use std::{
    fs::{self, File, OpenOptions, Permissions},
    io::Write,
    os::{
        fd::AsRawFd,
        unix::fs::{OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{Followed, StoreError};
use crate::{
    model::{ModelError, SCHEMA_VERSION, State},
    release::{DEFAULT_ADDRESS_GRACE, GraceClock},
};

/// How often a subscriber looks at the file for a new revision.
const POLL: std::time::Duration = std::time::Duration::from_millis(200);

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "state.lock";
/// Mode of the state and lock files.
const FILE_MODE: u32 = 0o600;
/// How long a change waits for the lock by default.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a waiting change tries the lock again: soon at first (locks
/// are held for milliseconds), then less often.
const LOCK_POLL_FIRST: Duration = Duration::from_millis(1);
const LOCK_POLL_MAX: Duration = Duration::from_millis(20);

/// State in `<dir>/state.json`, shared safely by every `ovl` process on
/// the machine.
pub struct FileStore {
    dir: PathBuf,
    lock_timeout: Duration,
    address_grace: Duration,
}

impl FileStore {
    /// A store rooted at `dir` (created on first write), with the default
    /// lock timeout and address grace.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileStore {
            dir: dir.into(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            address_grace: DEFAULT_ADDRESS_GRACE,
        }
    }

    /// How long a change waits for another process's lock before failing.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// How long a freed address is held back.
    pub fn with_address_grace(mut self, grace: Duration) -> Self {
        self.address_grace = grace;
        self
    }

    /// How long a freed address is held back.
    pub fn address_grace(&self) -> Duration {
        self.address_grace
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn read(&self) -> Result<State, StoreError> {
        Ok(self.read_file()?.unwrap_or_default())
    }

    /// The state in the file, `None` when there is no file.
    fn read_file(&self) -> Result<Option<State>, StoreError> {
        let path = self.state_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(cause) => {
                return Err(StoreError::Io {
                    action: "read",
                    path,
                    cause,
                });
            }
        };
        if let Some(found) = super::newer_schema(&bytes) {
            return Err(StoreError::SchemaTooNew {
                path,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|cause| StoreError::Corrupt { path, cause })
    }

    fn write(&self, state: &State) -> Result<(), StoreError> {
        let path = self.state_path();
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |cause| StoreError::Io {
                action,
                path,
                cause,
            }
        };
        let json = serde_json::to_vec_pretty(state).expect("State always serialises");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        // A leftover temp file keeps its old mode through `open`.
        f.set_permissions(Permissions::from_mode(FILE_MODE))
            .map_err(io("chmod", &tmp))?;
        f.write_all(&json).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("rename into", &path))?;
        // The rename is durable once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &self.dir))
    }

    fn lock(&self) -> Result<File, StoreError> {
        fs::create_dir_all(&self.dir).map_err(|cause| StoreError::Io {
            action: "create store directory",
            path: self.dir.clone(),
            cause,
        })?;
        let path = self.dir.join(LOCK_FILE);
        let io = |action| {
            let path = path.clone();
            move |cause| StoreError::Io {
                action,
                path,
                cause,
            }
        };
        // Writable, so only who may write the store may lock it; the mode
        // is repaired for lock files an older ovl made world-readable.
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(io("open"))?;
        f.set_permissions(Permissions::from_mode(FILE_MODE))
            .map_err(io("chmod"))?;
        let started = Instant::now();
        let mut pause = LOCK_POLL_FIRST;
        loop {
            // SAFETY: flock on a descriptor we own; released when `f` closes.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(f);
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io("lock")(err));
            }
            if started.elapsed() >= self.lock_timeout {
                return Err(StoreError::LockTimeout {
                    path,
                    waited: self.lock_timeout,
                    holder: crate::bpffs::lock_holder(&f)
                        .map(describe_process)
                        .unwrap_or_else(|| "an unknown process".into()),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(LOCK_POLL_MAX);
        }
    }
}

impl FileStore {
    /// The current state.
    pub fn load(&self) -> Result<State, StoreError> {
        // Writers replace the file by rename, so a reader sees the old or the
        // new state whole, never a mix: no lock needed.
        self.read()
    }

    /// The current state, `None` when there is no file (a store never
    /// written, or its file moved aside).
    pub fn load_present(&self) -> Result<Option<State>, StoreError> {
        self.read_file()
    }

    /// Applies `change` under the lock and commits it atomically.
    pub fn update(
        &self,
        change: &mut (dyn FnMut(&mut State) -> Result<(), ModelError> + Send),
    ) -> Result<State, StoreError> {
        let _lock = self.lock()?;
        let mut state = self.read()?;
        state.clock = GraceClock::now(self.address_grace);
        change(&mut state)?;
        state.schema = SCHEMA_VERSION;
        state.revision += 1;
        self.write(&state)?;
        Ok(state)
    }

    /// `file:///dir`.
    pub fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    /// Polls the file and publishes each new revision.
    /// Each revision is read whole, and published so.
    pub fn subscribe(&self) -> Result<watch::Receiver<Followed>, StoreError> {
        let first = self.load()?;
        let (tx, rx) = watch::channel(Followed::whole(first));
        let store = FileStore::new(self.dir.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            let mut missing = false;
            loop {
                tick.tick().await;
                match store.read_file() {
                    Ok(Some(s)) if missing || s.revision != tx.borrow().state.revision => {
                        // A file written anew after one went counts its
                        // revisions from 1 again: any may be the last's.
                        let followed = if missing {
                            Followed::replacing(s)
                        } else {
                            Followed::whole(s)
                        };
                        missing = false;
                        if tx.send(followed).is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => missing = false,
                    // ovl never removes the file (every change renames a
                    // new one over it): one gone was moved aside or
                    // deleted by hand, and is no reason to take every
                    // network off the data path. The next change writes
                    // a new one, which is followed.
                    Ok(None) if tx.borrow().state.revision > 0 => {
                        if !missing {
                            log::warn!(
                                "{} is gone; keeping the last state (revision {}) until a change writes it anew",
                                store.state_path().display(),
                                tx.borrow().state.revision
                            );
                        }
                        missing = true;
                    }
                    Ok(None) => {}
                    Err(e) => log::warn!(
                        "cannot read {}: {e}; keeping the last state",
                        store.describe()
                    ),
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

/// `pid N (command line)` of a process, as far as /proc tells.
fn describe_process(pid: u32) -> String {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    if cmdline.is_empty() {
        format!("pid {pid}")
    } else {
        format!("pid {pid} ({cmdline})")
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc};

    use super::*;
    use crate::{
        model::{ContainerSpec, NetworkSpec},
        store::{Dirty, catch_up},
        testutil::TestDir,
    };

    fn update_with<T: Send>(
        store: &FileStore,
        mut change: impl FnMut(&mut State) -> Result<T, ModelError> + Send,
    ) -> Result<T, StoreError> {
        let mut out = None;
        store.update(&mut |s| {
            out = Some(change(s)?);
            Ok(())
        })?;
        Ok(out.unwrap())
    }

    fn create(store: &FileStore, name: &str) -> Result<State, StoreError> {
        store.update(&mut |s| {
            s.create_network(NetworkSpec {
                vni: None,
                ..NetworkSpec::new(name, "198.18.0.0/24".parse().unwrap())
            })
            .map(|_| ())
        })
    }

    #[test]
    fn committed_changes_persist_and_bump_revision() {
        let tmp = TestDir::new("store-persist");
        let dir = tmp.path();
        let store = FileStore::new(dir);
        assert_eq!(store.load().unwrap().revision, 0);
        create(&store, "a").unwrap();
        let again = FileStore::new(dir).load().unwrap();
        assert_eq!(again.revision, 1);
        assert!(again.networks.contains_key("a"));
    }

    #[test]
    fn rejected_change_leaves_file_untouched() {
        let tmp = TestDir::new("store-reject");
        let dir = tmp.path();
        let store = FileStore::new(dir);
        create(&store, "a").unwrap();
        let before = fs::read(dir.join(STATE_FILE)).unwrap();
        assert!(matches!(create(&store, "a"), Err(StoreError::Rejected(_))));
        assert_eq!(fs::read(dir.join(STATE_FILE)).unwrap(), before);
    }

    #[test]
    fn corrupt_file_is_reported_and_never_overwritten() {
        let tmp = TestDir::new("store-corrupt");
        let dir = tmp.path();
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        let store = FileStore::new(dir);
        let err = create(&store, "a").unwrap_err().to_string();
        assert!(err.contains("not valid ovl state"), "{err}");
        assert_eq!(fs::read(dir.join(STATE_FILE)).unwrap(), b"{not json");
    }

    #[test]
    fn concurrent_writers_never_hand_out_the_same_address() {
        let tmp = TestDir::new("store-concurrent");
        let dir = tmp.path();
        let store = Arc::new(FileStore::new(dir));
        create(&store, "a").unwrap();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    (0..5)
                        .map(|j| {
                            update_with(&store, |s| {
                                s.add_container(ContainerSpec {
                                    network: "a".into(),
                                    node: format!("n{i}"),
                                    // Distinct names: names are unique per network.
                                    netns: format!("c{i}-{j}"),
                                    name: None,
                                    ..ContainerSpec::default()
                                })
                            })
                            .unwrap()
                            .ip
                        })
                        .collect::<Vec<Ipv4Addr>>()
                })
            })
            .collect();
        let mut all: Vec<Ipv4Addr> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 40);
        assert_eq!(store.load().unwrap().endpoints.len(), 40);
    }

    #[tokio::test]
    async fn a_store_file_moved_aside_keeps_the_followed_state_until_the_next_change() {
        let tmp = TestDir::new("store-moved");
        let dir = tmp.path();
        let store = FileStore::new(dir);
        create(&store, "a").unwrap();
        let mut rx = store.subscribe().unwrap();
        let mut mine = Some(rx.borrow().state.clone());
        assert_eq!(mine.as_ref().unwrap().revision, 1);
        fs::rename(dir.join(STATE_FILE), dir.join("moved-aside.json")).unwrap();
        // Several polls later, the state is what it was.
        tokio::time::sleep(POLL * 4).await;
        assert!(!rx.has_changed().unwrap(), "{:?}", rx.borrow().state);
        // A reader that held a state (an agent asked to read now) keeps
        // it too; one that held none finds an empty store.
        let reader = crate::store::Store::File(FileStore::new(dir));
        let kept = reader.load_keeping(mine.as_ref()).await.unwrap();
        assert_eq!(kept.revision, 1);
        assert!(kept.networks.contains_key("a"), "{kept:?}");
        assert_eq!(reader.load_keeping(None).await.unwrap().revision, 0);
        // A change writes the file anew (the store as it now is): followed.
        create(&store, "b").unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("the new file is followed")
            .unwrap();
        // At the revision the reader's copy has: taken whole all the same.
        assert_eq!(rx.borrow().state.revision, 1);
        assert_eq!(catch_up(&mut mine, &rx.borrow()), Dirty::All);
        let names: Vec<String> = mine.unwrap().networks.into_keys().collect();
        assert_eq!(names, ["b"]);
    }

    #[test]
    fn state_and_lock_files_are_private_even_if_they_were_not() {
        let tmp = TestDir::new("store-mode");
        let dir = tmp.path();
        fs::create_dir_all(dir).unwrap();
        // An older ovl left a world-readable lock file.
        fs::write(dir.join(LOCK_FILE), b"").unwrap();
        fs::set_permissions(dir.join(LOCK_FILE), Permissions::from_mode(0o644)).unwrap();
        let store = FileStore::new(dir);
        create(&store, "a").unwrap();
        for f in [LOCK_FILE, STATE_FILE] {
            let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
        }
    }

    /// `flock FILE sleep 30` in a process group of its own. flock(1) takes
    /// the lock and forks `sleep`, which inherits it: killing flock alone
    /// would leave the lock held for 30 s. Dropping kills the whole group
    /// and reaps flock, passed or panicked.
    struct LockHolder {
        flock: std::process::Child,
    }

    impl LockHolder {
        fn spawn(file: &Path) -> LockHolder {
            use std::os::unix::process::CommandExt;
            let flock = std::process::Command::new("flock")
                .arg(file)
                .args(["sleep", "30"])
                .process_group(0)
                .spawn()
                .expect("run flock(1)");
            LockHolder { flock }
        }
    }

    impl Drop for LockHolder {
        fn drop(&mut self) {
            // process_group(0): the group's id is flock's pid.
            let group = libc::pid_t::try_from(self.flock.id()).expect("pids fit pid_t");
            // SAFETY: kill(2) on a process group we created; no memory involved.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = self.flock.wait();
        }
    }

    #[test]
    fn a_held_lock_times_out_naming_its_holder_and_changes_nothing() {
        let tmp = TestDir::new("store-locktimeout");
        let dir = tmp.path();
        let store = FileStore::new(dir).with_lock_timeout(Duration::from_millis(300));
        create(&store, "a").unwrap();
        // Another process holds the lock (as any user who could open the
        // file could, before it was private). Declared after `tmp`, so
        // dropped before it: the holders are dead before the dir goes.
        let holder = LockHolder::spawn(&dir.join(LOCK_FILE));
        let lock = File::open(dir.join(LOCK_FILE)).unwrap();
        let t0 = Instant::now();
        while crate::bpffs::lock_holder(&lock).is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "flock(1) never took the lock"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let before = fs::read(dir.join(STATE_FILE)).unwrap();
        let err = create(&store, "b").unwrap_err();
        drop(holder);
        let msg = err.to_string();
        assert!(matches!(err, StoreError::LockTimeout { .. }), "{msg}");
        assert!(msg.contains("pid ") && msg.contains("flock"), "{msg}");
        assert_eq!(fs::read(dir.join(STATE_FILE)).unwrap(), before);
    }
}
