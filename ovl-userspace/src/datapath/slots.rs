//! Which slot of `OVL_STATS` each network's counters live in: a network
//! keeps its slot (and counts) for as long as this node serves it.

use std::collections::{BTreeMap, BTreeSet};

use ovl_common::{counters::UNATTRIBUTED_SLOT, maps::capacity};

/// The slots of the networks `want`, given the slots `held` now: the
/// networks in both keep theirs; each new one gets a free slot, preferring
/// slots no network held (a slot let go now may still be counted in by
/// packets in flight). Returns the assignment and the slots newly given,
/// whose counters must be zeroed before any entry points at them. `None`
/// when there are more networks than slots.
pub fn assign(
    held: &BTreeMap<u32, u32>,
    want: &BTreeSet<u32>,
) -> Option<(BTreeMap<u32, u32>, Vec<u32>)> {
    let mut slots: BTreeMap<u32, u32> = held
        .iter()
        .filter(|(vni, _)| want.contains(vni))
        .map(|(vni, slot)| (*vni, *slot))
        .collect();
    let kept: BTreeSet<u32> = slots.values().copied().collect();
    let was_held: BTreeSet<u32> = held.values().copied().collect();
    let all = (0..capacity::STATS).filter(|s| *s != UNATTRIBUTED_SLOT);
    let mut free = all
        .clone()
        .filter(|s| !was_held.contains(s))
        .chain(all.filter(|s| was_held.contains(s) && !kept.contains(s)));
    let mut fresh = Vec::new();
    for vni in want {
        if slots.contains_key(vni) {
            continue;
        }
        let slot = free.next()?;
        slots.insert(*vni, slot);
        fresh.push(slot);
    }
    Some((slots, fresh))
}

/// The networks of `want` (VNI → name) whose VNI's slot counted another
/// network (`counted`: VNI → name of what it counted): a network removed
/// and another made on its VNI while no agent ran, or within one apply.
/// Their slots are given anew, zeroed, as for a new network. A VNI whose
/// former network is unknown keeps its slot.
pub fn renewed(counted: &BTreeMap<u32, String>, want: &BTreeMap<u32, String>) -> BTreeSet<u32> {
    want.iter()
        .filter(|(vni, name)| counted.get(vni).is_some_and(|was| was != *name))
        .map(|(vni, _)| *vni)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vni_that_now_belongs_to_another_network_is_renewed() {
        let counted = BTreeMap::from([(100, "blue".to_owned()), (200, "red".to_owned())]);
        let want = BTreeMap::from([
            (100, "green".to_owned()),
            (200, "red".to_owned()),
            (300, "new".to_owned()),
        ]);
        assert_eq!(renewed(&counted, &want), BTreeSet::from([100]));
        assert!(renewed(&BTreeMap::new(), &want).is_empty());
    }

    #[test]
    fn networks_keep_their_slots_and_new_ones_take_slots_nobody_held() {
        let held = BTreeMap::from([(100, 1), (200, 2)]);
        let (slots, fresh) = assign(&held, &BTreeSet::from([200, 300])).unwrap();
        // 200 keeps 2; 100's slot 1 was just let go, so 300 gets 3.
        assert_eq!(slots, BTreeMap::from([(200, 2), (300, 3)]));
        assert_eq!(fresh, vec![3]);
        let (slots, fresh) = assign(&slots, &BTreeSet::from([200, 300, 400])).unwrap();
        assert_eq!(slots[&400], 1);
        assert_eq!(fresh, vec![1]);
    }

    #[test]
    fn the_unattributed_slot_is_never_given_and_slots_run_out_at_capacity() {
        let want: BTreeSet<u32> = (1..capacity::STATS).collect();
        let (slots, fresh) = assign(&BTreeMap::new(), &want).unwrap();
        assert!(!slots.values().any(|s| *s == UNATTRIBUTED_SLOT));
        assert_eq!(fresh.len(), want.len());
        let distinct: BTreeSet<u32> = slots.values().copied().collect();
        assert_eq!(distinct.len(), want.len());
        let more: BTreeSet<u32> = (1..=capacity::STATS).collect();
        assert!(assign(&slots, &more).is_none());
    }

    #[test]
    fn when_only_just_freed_slots_are_left_they_are_reused() {
        let held: BTreeMap<u32, u32> = (1..capacity::STATS).map(|s| (s + 1000, s)).collect();
        let want: BTreeSet<u32> = (1..capacity::STATS).map(|s| s + 100_000).collect();
        let (slots, fresh) = assign(&held, &want).unwrap();
        assert_eq!(slots.len(), want.len());
        assert_eq!(fresh.len(), want.len());
    }
}
