//! What the agent's maps hold, kept in memory: the first sync of a map in a
//! process reads it whole (entries a previous agent left); every later sync
//! compares with this copy and writes or deletes only what differs. The
//! agent is the maps' only writer, so the copy stays true.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet};

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
    parts: StdHashMap<String, Parts>,
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
            let have = read(name, map)?;
            self.maps.insert(name.to_owned(), have);
        }
        let have = self.maps.get_mut(name).expect("inserted above");
        write_diff(name, map, have, want)
    }

    /// Makes the entries of `map` (called `name`) in partition `part` hold
    /// exactly `want`, leaving the other partitions alone: a change of one
    /// network rewrites only that network's endpoints, not ten thousand.
    /// `part_of` says which partition a key is in; a map is synced either
    /// whole ([`Shadow::sync`]) or by partitions, never both.
    pub fn sync_part<K, V>(
        &mut self,
        name: &str,
        map: &mut HashMap<&mut MapData, K, V>,
        part_of: fn(&K) -> u32,
        part: u32,
        want: impl IntoIterator<Item = (K, V)>,
    ) -> Result<SyncCount>
    where
        K: aya::Pod + bytemuck::Pod,
        V: aya::Pod + bytemuck::Pod,
    {
        let parts = self.parts_of(name, map, part_of)?;
        let have = parts.entry(part).or_default();
        let count = write_diff(name, map, have, want)?;
        if have.is_empty() {
            parts.remove(&part);
        }
        Ok(count)
    }

    /// Removes every entry of `map` (called `name`, synced by partitions)
    /// outside the partitions `keep`.
    pub fn keep_parts<K, V>(
        &mut self,
        name: &str,
        map: &mut HashMap<&mut MapData, K, V>,
        part_of: fn(&K) -> u32,
        keep: &BTreeSet<u32>,
    ) -> Result<SyncCount>
    where
        K: aya::Pod + bytemuck::Pod,
        V: aya::Pod + bytemuck::Pod,
    {
        let parts = self.parts_of(name, map, part_of)?;
        let gone: Vec<u32> = parts
            .keys()
            .filter(|p| !keep.contains(p))
            .copied()
            .collect();
        let mut count = SyncCount::default();
        for part in gone {
            let have = parts.get_mut(&part).expect("listed above");
            count += write_diff(name, map, have, std::iter::empty())?;
            parts.remove(&part);
        }
        Ok(count)
    }

    /// The partitions of `map`, read from the kernel at first use.
    fn parts_of<K, V>(
        &mut self,
        name: &str,
        map: &mut HashMap<&mut MapData, K, V>,
        part_of: fn(&K) -> u32,
    ) -> Result<&mut Parts>
    where
        K: aya::Pod + bytemuck::Pod,
        V: aya::Pod + bytemuck::Pod,
    {
        if !self.parts.contains_key(name) {
            let mut parts = Parts::new();
            for (kb, vb) in read(name, map)? {
                let k: K = bytemuck::pod_read_unaligned(&kb);
                parts.entry(part_of(&k)).or_default().insert(kb, vb);
            }
            self.parts.insert(name.to_owned(), parts);
        }
        Ok(self.parts.get_mut(name).expect("inserted above"))
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

/// Entries by partition: partition → (key bytes → value bytes).
type Parts = BTreeMap<u32, StdHashMap<Vec<u8>, Vec<u8>>>;

/// Everything `map` (called `name`) holds, as bytes.
fn read<K, V>(name: &str, map: &HashMap<&mut MapData, K, V>) -> Result<StdHashMap<Vec<u8>, Vec<u8>>>
where
    K: aya::Pod + bytemuck::Pod,
    V: aya::Pod + bytemuck::Pod,
{
    let mut have = StdHashMap::new();
    for entry in map.iter() {
        let (k, v) = entry.with_context(|| format!("read {name}"))?;
        have.insert(
            bytemuck::bytes_of(&k).to_vec(),
            bytemuck::bytes_of(&v).to_vec(),
        );
    }
    Ok(have)
}

/// Makes `map` hold `want` where it now holds `have` (its shadow, updated
/// along): writes what differs, removes what is no longer wanted.
fn write_diff<K, V>(
    name: &str,
    map: &mut HashMap<&mut MapData, K, V>,
    have: &mut StdHashMap<Vec<u8>, Vec<u8>>,
    want: impl IntoIterator<Item = (K, V)>,
) -> Result<SyncCount>
where
    K: aya::Pod + bytemuck::Pod,
    V: aya::Pod + bytemuck::Pod,
{
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
