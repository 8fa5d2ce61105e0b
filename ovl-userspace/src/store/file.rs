//! The embedded default store: one JSON file in a directory, changed under
//! an exclusive `flock` and replaced atomically (write, fsync, rename).

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use tokio::sync::watch;

use super::StoreError;
use crate::model::{ModelError, SCHEMA_VERSION, State};

/// How often a subscriber looks at the file for a new revision.
const POLL: std::time::Duration = std::time::Duration::from_millis(200);

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "state.lock";

/// State in `<dir>/state.json`, shared safely by every `ovl` process on
/// the machine.
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// A store rooted at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileStore { dir: dir.into() }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn read(&self) -> Result<State, StoreError> {
        let path = self.state_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => {
                return Err(StoreError::Io {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        let state: State =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if state.schema > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path,
                found: state.schema,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(state)
    }

    fn write(&self, state: &State) -> Result<(), StoreError> {
        let path = self.state_path();
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Io {
                action,
                path,
                source,
            }
        };
        let json = serde_json::to_vec_pretty(state).expect("State always serialises");
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&json).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("rename into", &path))?;
        // The rename is durable once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &self.dir))
    }

    fn lock(&self) -> Result<File, StoreError> {
        fs::create_dir_all(&self.dir).map_err(|source| StoreError::Io {
            action: "create store directory",
            path: self.dir.clone(),
            source,
        })?;
        let path = self.dir.join(LOCK_FILE);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Io {
                action: "open",
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on a descriptor we own; released when `f` closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let source = std::io::Error::last_os_error();
            return Err(StoreError::Io {
                action: "lock",
                path,
                source,
            });
        }
        Ok(f)
    }
}

impl FileStore {
    /// The current state.
    pub fn load(&self) -> Result<State, StoreError> {
        // Writers replace the file by rename, so a reader sees the old or the
        // new state whole, never a mix: no lock needed.
        self.read()
    }

    /// Applies `change` under the lock and commits it atomically.
    pub fn update(
        &self,
        change: &mut (dyn FnMut(&mut State) -> Result<(), ModelError> + Send),
    ) -> Result<State, StoreError> {
        let _lock = self.lock()?;
        let mut state = self.read()?;
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
    pub fn subscribe(&self) -> Result<watch::Receiver<State>, StoreError> {
        let first = self.load()?;
        let (tx, rx) = watch::channel(first);
        let store = FileStore::new(self.dir.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            loop {
                tick.tick().await;
                match store.load() {
                    Ok(s) if s.revision != tx.borrow().revision => {
                        if tx.send(s).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
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

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc};

    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ovl-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

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
                name: name.into(),
                subnet: "198.18.0.0/24".parse().unwrap(),
                vni: None,
                mtu: None,
            })
            .map(|_| ())
        })
    }

    #[test]
    fn committed_changes_persist_and_bump_revision() {
        let dir = tmpdir("persist");
        let store = FileStore::new(&dir);
        assert_eq!(store.load().unwrap().revision, 0);
        create(&store, "a").unwrap();
        let again = FileStore::new(&dir).load().unwrap();
        assert_eq!(again.revision, 1);
        assert!(again.networks.contains_key("a"));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejected_change_leaves_file_untouched() {
        let dir = tmpdir("reject");
        let store = FileStore::new(&dir);
        create(&store, "a").unwrap();
        let before = fs::read(dir.join(STATE_FILE)).unwrap();
        assert!(matches!(create(&store, "a"), Err(StoreError::Rejected(_))));
        assert_eq!(fs::read(dir.join(STATE_FILE)).unwrap(), before);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_file_is_reported_and_never_overwritten() {
        let dir = tmpdir("corrupt");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        let store = FileStore::new(&dir);
        let err = create(&store, "a").unwrap_err().to_string();
        assert!(err.contains("not valid ovl state"), "{err}");
        assert_eq!(fs::read(dir.join(STATE_FILE)).unwrap(), b"{not json");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn concurrent_writers_never_hand_out_the_same_address() {
        let dir = tmpdir("concurrent");
        let store = Arc::new(FileStore::new(&dir));
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
                                    netns: format!("c{j}"),
                                    name: None,
                                    ip: None,
                                    owner: None,
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
        fs::remove_dir_all(dir).unwrap();
    }
}
