//! What the agent's maps hold, kept in memory: the first sync of a map in a
//! process reads it whole (entries a previous agent left); every later sync
//! compares with this copy and writes or deletes only what differs. The
//! agent is the maps' only writer, so the copy stays true.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};

use anyhow::{Context, Result};
use aya::maps::{
    HashMap, MapData, PerCpuHashMap, PerCpuValues,
    lpm_trie::{Key as LpmKey, LpmTrie},
};

use super::SyncCount;

/// Map name → (key bytes → value bytes), and per-CPU maps' key sets.
#[derive(Default)]
pub struct Shadow {
    maps: StdHashMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    keys: StdHashMap<String, BTreeSet<u32>>,
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
            let mut have = BTreeMap::new();
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
        let want: BTreeMap<Vec<u8>, (K, V)> = want
            .into_iter()
            .map(|(k, v)| (bytemuck::bytes_of(&k).to_vec(), (k, v)))
            .collect();
        let mut count = SyncCount::default();
        let gone: Vec<Vec<u8>> = have
            .keys()
            .filter(|k| !want.contains_key(*k))
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
        for (kb, (k, v)) in want {
            let vb = bytemuck::bytes_of(&v);
            if have.get(&kb).is_some_and(|h| h.as_slice() == vb) {
                continue;
            }
            map.insert(k, v, 0)
                .with_context(|| format!("write {name}"))?;
            have.insert(kb, vb.to_vec());
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
            let mut have = BTreeMap::new();
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

    /// Makes per-CPU `map` (called `name`) have exactly the keys `want`,
    /// new ones with the value `zero` makes; values are never rewritten.
    pub fn sync_keys<V: aya::Pod>(
        &mut self,
        name: &str,
        map: &mut PerCpuHashMap<&mut MapData, u32, V>,
        want: &BTreeSet<u32>,
        zero: impl Fn() -> Result<PerCpuValues<V>>,
    ) -> Result<()> {
        if !self.keys.contains_key(name) {
            let have: BTreeSet<u32> = map
                .keys()
                .collect::<Result<_, _>>()
                .with_context(|| format!("list {name}"))?;
            self.keys.insert(name.to_owned(), have);
        }
        let have = self.keys.get_mut(name).expect("inserted above");
        let gone: Vec<u32> = have.difference(want).copied().collect();
        for k in gone {
            match map.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).with_context(|| format!("remove key {k} from {name}")),
            }
            have.remove(&k);
        }
        for k in want.difference(&have.clone()) {
            map.insert(k, zero()?, 0)
                .with_context(|| format!("create key {k} in {name}"))?;
            have.insert(*k);
        }
        Ok(())
    }
}
