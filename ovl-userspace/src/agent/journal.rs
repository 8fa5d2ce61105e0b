//! The agent's node-local memory, kept outside the store: this node's
//! endpoints as last seen (to put back what peers freed while the node was
//! cut off or its agent down) and the networks' names (to label counters
//! while the store is unreachable). One JSON file, replaced atomically.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::Endpoint;

const FILE: &str = "agent.json";

/// What the journal holds.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// This node's endpoints, keyed by "network/address".
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Network names by VNI.
    pub networks: BTreeMap<u32, String>,
}

impl Memory {
    /// The key of an endpoint in [`Memory::endpoints`].
    pub fn key(network: &str, ip: Ipv4Addr) -> String {
        format!("{network}/{ip}")
    }
}

/// The journal file of one node, `<state dir>/agent.json`.
pub struct Journal {
    path: PathBuf,
    last: Memory,
    /// The last save failed (and said so): failures are reported once,
    /// not at every apply, until one succeeds again.
    failing: bool,
}

impl Journal {
    /// Opens the journal in `dir` (created 0700 if missing) and reads what
    /// it holds. An unreadable journal is reported and treated as empty: it
    /// is a cache of the store, never the truth.
    pub fn open(dir: &Path) -> Result<(Journal, Memory)> {
        fs::create_dir_all(dir)
            .with_context(|| format!("create the agent state directory {}", dir.display()))?;
        let path = dir.join(FILE);
        let memory = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                log::warn!("ignoring unreadable {} ({e})", path.display());
                Memory::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Memory::default(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        Ok((
            Journal {
                path,
                last: memory.clone(),
                failing: false,
            },
            memory,
        ))
    }

    /// [`save`](Self::save)s `memory`, saying once when the journal cannot
    /// be written (and what that costs) and once when it can again.
    pub fn save_logged(&mut self, memory: &Memory) {
        match self.save(memory) {
            Ok(()) => {
                if std::mem::take(&mut self.failing) {
                    log::info!("{} is written again", self.path.display());
                }
            }
            Err(e) if !self.failing => {
                self.failing = true;
                log::warn!(
                    "{e:#}; this node's endpoints are not remembered until it can be written, so those the store loses while the node is cut off or its agent down are not put back. Make {} writable (or pass another --state-dir)",
                    self.path.parent().unwrap_or(&self.path).display()
                );
            }
            Err(_) => {}
        }
    }

    /// Writes `memory` if it differs from what was written last.
    pub fn save(&mut self, memory: &Memory) -> Result<()> {
        if *memory == self.last {
            return Ok(());
        }
        let json = serde_json::to_vec_pretty(memory).expect("the journal serialises");
        crate::files::replace(&self.path, &json, 0o600)
            .with_context(|| format!("write {}", self.path.display()))?;
        self.last = memory.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Location, MacAddr},
        testutil::TestDir,
    };

    #[test]
    fn journal_round_trips_and_survives_garbage() {
        let tmp = TestDir::new("journal");
        let dir = tmp.path();
        let (mut j, m) = Journal::open(dir).unwrap();
        assert_eq!(m, Memory::default());
        let ip = Ipv4Addr::new(198, 18, 0, 2);
        let mut m = Memory::default();
        m.networks.insert(4096, "blue".into());
        m.endpoints.insert(
            Memory::key("blue", ip),
            Endpoint {
                ports: Vec::new(),
                attacher: None,
                network: "blue".into(),
                name: "c1".into(),
                ip,
                mac: MacAddr::for_ipv4(ip),
                location: Location::Container {
                    node: "a".into(),
                    netns: "c1".into(),
                    host_ifname: "ovl1".into(),
                },
                owner: None,
                aliases: vec!["www".into()],
            },
        );
        j.save(&m).unwrap();
        assert_eq!(Journal::open(dir).unwrap().1, m);
        fs::write(dir.join(FILE), b"{not json").unwrap();
        assert_eq!(Journal::open(dir).unwrap().1, Memory::default());
    }
}
