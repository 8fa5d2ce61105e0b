// The endpoint maps of every node, read from their pins: the exact signal
// of what each node's data path forwards to, one lookup per question.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData, MapError};
use ovl_common::{Endpoint, VniAddr, maps::names};

/// One node's pinned `OVL_ENDPOINTS`, opened once.
pub struct NodeMap {
    map: HashMap<MapData, VniAddr, Endpoint>,
}

impl NodeMap {
    /// The endpoint map pinned under `pin_dir` (a node's pin directory).
    pub fn open(pin_dir: &Path) -> Result<NodeMap> {
        let path = pin_dir.join(names::ENDPOINTS);
        let data =
            MapData::from_pin(&path).with_context(|| format!("open pinned {}", path.display()))?;
        let map = HashMap::try_from(Map::HashMap(data))
            .with_context(|| format!("{} is not a hash map", path.display()))?;
        Ok(NodeMap { map })
    }

    /// The VTEP this node sends (`vni`, `ip`) to: `Some(None)` for a local
    /// endpoint, `None` when the map has no such entry.
    pub fn vtep_of(&self, vni: u32, ip: Ipv4Addr) -> Result<Option<Option<Ipv4Addr>>> {
        let key = VniAddr {
            vni,
            addr: ip.octets(),
        };
        match self.map.get(&key, 0) {
            Ok(ep) if ep.is_local() => Ok(Some(None)),
            Ok(ep) => Ok(Some(Some(Ipv4Addr::from(ep.vtep)))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("look up OVL_ENDPOINTS"),
        }
    }

    /// Entries per VNI (one pass over the map).
    pub fn count_by_vni(&self) -> Result<BTreeMap<u32, usize>> {
        let mut out = BTreeMap::new();
        for key in self.map.keys() {
            let key = key.context("list OVL_ENDPOINTS")?;
            *out.entry(key.vni).or_default() += 1;
        }
        Ok(out)
    }
}
