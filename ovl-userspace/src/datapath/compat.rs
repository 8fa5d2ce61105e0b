//! Whether a node's pinned maps fit this build: each pinned map's type,
//! key size, value size and capacity against the object's definition, and
//! the ABI version recorded in `OVL_ABI` against this build's.

use std::{fmt, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData, MapInfo};
use aya_obj::{Object, maps::PinningType};
use ovl_common::{
    DropReason, VniCounters,
    maps::{ABI_VERSION, names},
};

/// One way a pinned map differs from what this build expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The map's name (its pin's file name).
    pub map: String,
    /// What differs, e.g. "value size 104, this build expects 112".
    pub detail: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.map, self.detail)
    }
}

/// Names of the maps the object pins by name.
pub fn pinned_map_names(object: &[u8]) -> Result<Vec<String>> {
    let obj = Object::parse(object).context("parse ovl's kernel object")?;
    let mut names: Vec<String> = obj
        .maps
        .iter()
        .filter(|(_, m)| m.pinning() == PinningType::ByName)
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    Ok(names)
}

/// Compares the maps pinned in `pin_dir` with the object's. Maps not
/// pinned yet are not mismatches (they are created); an empty list means
/// every pinned map can be reused as it is.
pub fn check(pin_dir: &Path, object: &[u8]) -> Result<Vec<Mismatch>> {
    let obj = Object::parse(object).context("parse ovl's kernel object")?;
    let mut out = Vec::new();
    let mut any_pinned = false;
    let mut sorted: Vec<_> = obj.maps.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (name, def) in sorted {
        if def.pinning() != PinningType::ByName {
            continue;
        }
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        any_pinned = true;
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("read the pinned map {}", path.display()))?;
        let mut push = |what: &str, have: u32, want: u32| {
            if have != want {
                out.push(Mismatch {
                    map: name.clone(),
                    detail: format!("{what} {have}, this build expects {want}"),
                });
            }
        };
        let have_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        push("map type", have_type, def.map_type());
        push("key size", info.key_size(), def.key_size());
        push("value size", info.value_size(), def.value_size());
        push("capacity", info.max_entries(), def.max_entries());
        // Counters of another layout: say what they count, and what happens
        // to them.
        if name == names::STATS
            && info.value_size() != def.value_size()
            && let Some(last) = out.last_mut()
        {
            last.detail
                .push_str(&format!(" — {}", counters_layout(info.value_size())));
        }
    }
    if any_pinned && out.is_empty() {
        match pinned_abi(pin_dir)? {
            Some(v) if v == ABI_VERSION => {}
            Some(v) => out.push(Mismatch {
                map: names::ABI.into(),
                detail: format!("ABI version {v}, this build expects {ABI_VERSION}"),
            }),
            None => out.push(Mismatch {
                map: names::ABI.into(),
                detail: format!(
                    "no ABI version recorded (pins of an older ovl), this build expects {ABI_VERSION}"
                ),
            }),
        }
    }
    Ok(out)
}

/// The ABI version recorded beside the pins, if any.
fn pinned_abi(pin_dir: &Path) -> Result<Option<u32>> {
    let path = pin_dir.join(names::ABI);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    let arr: Array<_, u32> = Array::try_from(Map::Array(data))
        .with_context(|| format!("{} is not ovl's ABI record", path.display()))?;
    let v = arr
        .get(&0, 0)
        .with_context(|| format!("read {}", path.display()))?;
    // A zero is a record that was created but never written: a load that
    // was interrupted before the agent filled its maps.
    Ok((v != 0).then_some(v))
}

/// Says what per-network counters (`OVL_STATS`) of `value_size`-byte
/// values count, against this build's: builds differ there by their number
/// of drop reasons (appended, never renumbered), and new maps start every
/// counter from zero.
pub fn counters_layout(value_size: u32) -> String {
    let ours = core::mem::size_of::<VniCounters>();
    let fixed = ours - 8 * DropReason::COUNT;
    let theirs = value_size as usize;
    let reasons = match theirs.checked_sub(fixed) {
        Some(rest) if rest % 8 == 0 => format!("{} drop reasons", rest / 8),
        _ => "another layout".to_owned(),
    };
    format!(
        "counters of {reasons}, this build counts {}: new maps restart them at zero",
        DropReason::COUNT
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_fewer_drop_reasons_are_named_as_such() {
        let ours = core::mem::size_of::<VniCounters>() as u32;
        assert_eq!(
            counters_layout(ours - 8),
            format!(
                "counters of {} drop reasons, this build counts {}: new maps restart them at zero",
                DropReason::COUNT - 1,
                DropReason::COUNT
            )
        );
        assert!(counters_layout(4).starts_with("counters of another layout"));
    }
}
