//! What the agent's maps hold, kept in memory: the first sync of a map in a
//! process reads it whole (entries a previous agent left); every later sync
//! compares with this copy and writes or deletes only what differs. The
//! agent is the maps' only writer, so the copy stays true.

use std::collections::{BTreeMap, HashMap as StdHashMap, HashSet};

use anyhow::{Context, Result};
use aya::maps::{
    HashMap, MapData,
    lpm_trie::{Key as LpmKey, LpmTrie},
};

use super::SyncCount;

/// Map name → (key bytes → value bytes). Hashed, not ordered: a sync
/// looks up every wanted key.
#[derive(Default)]
pub struct Shadow {
    maps: StdHashMap<String, StdHashMap<Vec<u8>, Vec<u8>>>,
}

impl Shadow {
    /// Makes `map` (called `name`) hold exactly `want`.
    pub fn sync<K, V>(
        &mut self,
        name: &str,
        map: &mut HashMap<&mut MapData, K, V>,
        want: impl IntoIterator<Item = (K, V)>,
    ) -> Result<SyncCount>
    where
        K: aya::Pod + bytemuck::Pod,
        V: aya::Pod + bytemuck::Pod,
    {
        if !self.maps.contains_key(name) {
            let mut have = StdHashMap::new();
            for entry in map.iter() {
                let (k, v) = entry.with_context(|| format!("read {name}"))?;
                have.insert(
                    bytemuck::bytes_of(&k).to_vec(),
                    bytemuck::bytes_of(&v).to_vec(),
                );
            }
            self.maps.insert(name.to_owned(), have);
        }
        let have = self.maps.get_mut(name).expect("inserted above");
        // Compared as byte slices, allocating nothing per entry: with tens
        // of thousands of entries a sync is mostly this comparison.
        let want: Vec<(K, V)> = want.into_iter().collect();
        let mut kept = 0;
        let mut writes = Vec::new();
        for (k, v) in &want {
            match have.get(bytemuck::bytes_of(k)) {
                Some(h) => {
                    kept += 1;
                    if h.as_slice() != bytemuck::bytes_of(v) {
                        writes.push((k, v));
                    }
                }
                None => writes.push((k, v)),
            }
        }
        let mut count = SyncCount::default();
        // Keys are unique in `want` (they come from maps), so fewer found
        // than held means some held ones are no longer wanted.
        if kept < have.len() {
            let wanted: HashSet<&[u8]> = want.iter().map(|(k, _)| bytemuck::bytes_of(k)).collect();
            let gone: Vec<Vec<u8>> = have
                .keys()
                .filter(|k| !wanted.contains(k.as_slice()))
                .cloned()
                .collect();
            for kb in gone {
                let k: K = bytemuck::pod_read_unaligned(&kb);
                match map.remove(&k) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e).with_context(|| format!("remove from {name}")),
                }
                have.remove(&kb);
                count.removed += 1;
            }
        }
        for (k, v) in writes {
            map.insert(*k, *v, 0)
                .with_context(|| format!("write {name}"))?;
            have.insert(
                bytemuck::bytes_of(k).to_vec(),
                bytemuck::bytes_of(v).to_vec(),
            );
            count.written += 1;
        }
        Ok(count)
    }

    /// Makes LPM trie `map` (called `name`) hold exactly `want`, given as
    /// (prefix length, key data, value).
    pub fn sync_trie<K, V>(
        &mut self,
        name: &str,
        map: &mut LpmTrie<&mut MapData, K, V>,
        want: impl IntoIterator<Item = (u32, K, V)>,
    ) -> Result<SyncCount>
    where
        K: aya::Pod + bytemuck::Pod,
        V: aya::Pod + bytemuck::Pod,
    {
        // Shadow keys: the prefix length's bytes, then the key data's.
        let bytes = |prefix: u32, k: &K| {
            let mut b = prefix.to_ne_bytes().to_vec();
            b.extend_from_slice(bytemuck::bytes_of(k));
            b
        };
        if !self.maps.contains_key(name) {
            let mut have = StdHashMap::new();
            for entry in map.iter() {
                let (k, v) = entry.with_context(|| format!("read {name}"))?;
                have.insert(
                    bytes(k.prefix_len(), &k.data()),
                    bytemuck::bytes_of(&v).to_vec(),
                );
            }
            self.maps.insert(name.to_owned(), have);
        }
        let have = self.maps.get_mut(name).expect("inserted above");
        let want: BTreeMap<Vec<u8>, (u32, K, V)> = want
            .into_iter()
            .map(|(p, k, v)| (bytes(p, &k), (p, k, v)))
            .collect();
        let mut count = SyncCount::default();
        let gone: Vec<Vec<u8>> = have
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for kb in gone {
            let prefix = u32::from_ne_bytes(kb[..4].try_into().expect("4 prefix bytes"));
            let k: K = bytemuck::pod_read_unaligned(&kb[4..]);
            match map.remove(&LpmKey::new(prefix, k)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).with_context(|| format!("remove from {name}")),
            }
            have.remove(&kb);
            count.removed += 1;
        }
        for (kb, (p, k, v)) in want {
            let vb = bytemuck::bytes_of(&v);
            if have.get(&kb).is_some_and(|h| h.as_slice() == vb) {
                continue;
            }
            map.insert(&LpmKey::new(p, k), v, 0)
                .with_context(|| format!("write {name}"))?;
            have.insert(kb, vb.to_vec());
            count.written += 1;
        }
        Ok(count)
    }
}
