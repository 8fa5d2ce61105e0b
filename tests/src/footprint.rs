// What ovl has made on a host and in its store, read from outside the way
// an operator would look: for tests that compare before and after.

//! A [`Footprint`] is a set of named parts, each a sorted list of lines
//! (entries counted, duplicates kept): the host's links and the programs
//! hooked on them, every pinned map's entries, the pin and state
//! directories, the agent's journal, nftables, iptables, policy rules,
//! routes and permanent neighbours, forwarding switches; or the store's
//! records. Two footprints differ exactly where something was left behind
//! or taken away.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{Host, Netns, Ovl, cmd, hooked_programs};

/// Pinned maps whose values move with traffic or time (counters, caches
/// stamped with when they were learnt, the agent's epoch): only their keys
/// are compared. Every other map is compared entry by entry, values too.
const VOLATILE_MAPS: [&str; 6] = [
    "OVL_STATS",
    "OVL_GLOBAL",
    "OVL_NEXT_HOPS",
    "OVL_PATH_MTU",
    "OVL_EPOCH",
    "OVL_CRYPTO",
];

/// Named parts, each a sorted list of lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    parts: BTreeMap<String, Vec<String>>,
}

impl Footprint {
    /// Sets part `part` to `lines` (in any order).
    pub fn insert(&mut self, part: impl Into<String>, mut lines: Vec<String>) {
        lines.sort();
        self.parts.insert(part.into(), lines);
    }

    /// The lines of part `part` (none if there is none).
    pub fn lines(&self, part: &str) -> &[String] {
        self.parts.get(part).map_or(&[], Vec::as_slice)
    }

    /// Removes part `part` and returns its lines (none if there was none).
    pub fn take(&mut self, part: &str) -> Vec<String> {
        self.parts.remove(part).unwrap_or_default()
    }

    /// Takes in every part of `other`, each named `<prefix>: <part>`.
    pub fn merge(&mut self, prefix: &str, other: Footprint) {
        for (part, lines) in other.parts {
            self.parts.insert(format!("{prefix}: {part}"), lines);
        }
    }

    /// Everything ovl keeps for node `node` on `host`: in the host's
    /// network namespace (links, hooks, nftables, iptables, rules, routes,
    /// permanent neighbours, forwarding), under its pin directory (every
    /// pin, every map's entries) and its state directory (files, the
    /// journal's endpoints and networks).
    pub fn of_node(ovl: &Ovl, host: &Host, node: &str) -> Result<Footprint> {
        let mut f = Footprint::default();
        let ns = &host.netns;
        let links = link_names(ns)?;
        for link in &links {
            let hooked = hooked_programs(ns, link)?
                .into_iter()
                .map(|p| format!("{} {}", p.hook, p.name))
                .collect();
            f.insert(format!("hooks on {link}"), hooked);
        }
        f.insert("links", links);
        f.insert(
            "nftables",
            lines(&ns.exec(&["nft", "list", "ruleset"])?)
                .into_iter()
                .map(|l| without_counters(&l))
                .collect(),
        );
        for table in ["filter", "nat", "mangle"] {
            f.insert(
                format!("iptables -t {table}"),
                lines(&ns.exec(&["iptables", "-w", "5", "-t", table, "-S"])?),
            );
        }
        f.insert("ip rule", lines(&ns.ip(&["-4", "rule", "show"])?));
        f.insert(
            "routes",
            lines(&ns.ip(&["-4", "route", "show", "table", "all"])?),
        );
        f.insert(
            "permanent neighbours",
            lines(&ns.ip(&["-4", "neigh", "show", "nud", "permanent"])?),
        );
        f.insert(
            "forwarding",
            lines(&ns.exec(&[
                "sysctl",
                "net.ipv4.ip_forward",
                "net.ipv4.conf.all.forwarding",
                "net.ipv4.conf.default.forwarding",
            ])?),
        );
        let pin_dir = ovl.pin_dir(node);
        let pins = files_under(&pin_dir)?;
        for pin in &pins {
            if !pin.contains('/') && pin.starts_with("OVL_") {
                f.insert(format!("map {pin}"), map_entries(&pin_dir.join(pin), pin)?);
            }
        }
        f.insert("pins", pins);
        let state_dir = ovl.state_dir(node);
        f.insert("state files", files_under(&state_dir)?);
        f.insert("journal", journal_lines(&state_dir.join("agent.json"))?);
        Ok(f)
    }

    /// The store's records as `ovl endpoint ls` and `ovl network ls` show
    /// them (asked in `ns`), and for a file store every record of its
    /// state file but the revision.
    pub fn of_store(ovl: &Ovl, ns: &Netns) -> Result<Footprint> {
        let mut f = Footprint::default();
        for (part, args) in [
            ("endpoint ls", ["endpoint", "ls", "--json"]),
            ("network ls", ["network", "ls", "--json"]),
        ] {
            let out = ovl.run(ns, "-", &args)?;
            let v: Value = serde_json::from_str(&out)
                .with_context(|| format!("`ovl {}` is not JSON: {out}", args.join(" ")))?;
            let rows = v
                .as_array()
                .with_context(|| format!("`ovl {}` is not a list: {out}", args.join(" ")))?;
            f.insert(part, rows.iter().map(Value::to_string).collect());
        }
        if let Some(dir) = ovl.store_url().strip_prefix("file://") {
            let path = Path::new(dir).join("state.json");
            let text = fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            let records = v
                .as_object()
                .with_context(|| format!("{} is not an object", path.display()))?;
            for (key, value) in records.iter().filter(|(k, _)| *k != "revision") {
                let rows = match value {
                    Value::Array(items) => items.iter().map(Value::to_string).collect(),
                    Value::Object(entries) => {
                        entries.iter().map(|(k, v)| format!("{k}: {v}")).collect()
                    }
                    other => vec![other.to_string()],
                };
                f.insert(format!("state.json {key}"), rows);
            }
        }
        Ok(f)
    }

    /// What differs from `before`, part by part: lines only `before` has
    /// (`-`), lines only `self` has (`+`), each as often as it is missing
    /// or extra. Empty when the two are the same.
    pub fn changes_since(&self, before: &Footprint) -> String {
        let mut out = String::new();
        let empty = Vec::new();
        let mut names: Vec<&String> = before.parts.keys().chain(self.parts.keys()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let old = before.parts.get(name).unwrap_or(&empty);
            let new = self.parts.get(name).unwrap_or(&empty);
            let (gone, added) = multiset_difference(old, new);
            if gone.is_empty() && added.is_empty() {
                continue;
            }
            let _ = writeln!(out, "{name} ({} before, {} now):", old.len(), new.len());
            for line in gone {
                let _ = writeln!(out, "  - {line}");
            }
            for line in added {
                let _ = writeln!(out, "  + {line}");
            }
        }
        out
    }
}

/// Lines of `old` missing from `new` and lines of `new` not in `old`, as
/// multisets; both inputs sorted.
fn multiset_difference<'a>(old: &'a [String], new: &'a [String]) -> (Vec<&'a str>, Vec<&'a str>) {
    let (mut i, mut j) = (0, 0);
    let (mut gone, mut added) = (Vec::new(), Vec::new());
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                gone.push(a.as_str());
                i += 1;
            }
            (Some(_), Some(b)) | (None, Some(b)) => {
                added.push(b.as_str());
                j += 1;
            }
            (Some(a), None) => {
                gone.push(a.as_str());
                i += 1;
            }
            (None, None) => unreachable!("the loop runs while one side has lines"),
        }
    }
    (gone, added)
}

/// The non-empty lines of a command's stdout, trimmed.
fn lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// An nftables line with its counters' numbers taken out: traffic moves
/// them, and only what the rules are matters.
fn without_counters(line: &str) -> String {
    let mut out = Vec::new();
    let mut words = line.split_whitespace().peekable();
    while let Some(word) = words.next() {
        out.push(word);
        if matches!(word, "packets" | "bytes") && words.peek().is_some() {
            words.next();
        }
    }
    out.join(" ")
}

/// The names of the links in `ns` (without `@peer`).
fn link_names(ns: &Netns) -> Result<Vec<String>> {
    let out = ns.ip(&["-o", "link", "show"])?;
    Ok(cmd::stdout_text(&out)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect())
}

/// Every file and directory below `dir`, relative to it (directories end
/// in `/`); none when `dir` does not exist.
fn files_under(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, "", &mut out)?;
    }
    Ok(out)
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if entry.file_type()?.is_dir() {
            out.push(format!("{name}/"));
            walk(&entry.path(), &format!("{name}/"), out)?;
        } else {
            out.push(name);
        }
    }
    Ok(())
}

/// The entries of the map pinned at `pin` as `key = value` lines (the
/// value left out for [`VOLATILE_MAPS`]), bytes in hex.
fn map_entries(pin: &Path, name: &str) -> Result<Vec<String>> {
    let entries = crate::maps::bpftool_dump(pin)?;
    let volatile = VOLATILE_MAPS.contains(&name);
    Ok(entries
        .iter()
        .map(|e| {
            let key = hex(&e["key"]);
            if volatile {
                key
            } else {
                let value = match &e["value"] {
                    Value::Null => e["values"].to_string(),
                    v => hex(v),
                };
                format!("{key} = {value}")
            }
        })
        .collect())
}

/// `["0x1f", "0x00", ...]` as `1f00...`; anything else as its JSON.
fn hex(v: &Value) -> String {
    match v.as_array() {
        Some(items) => items
            .iter()
            .map(|b| b.as_str().unwrap_or("?").trim_start_matches("0x"))
            .collect(),
        None => v.to_string(),
    }
}

/// The journal's endpoints and networks, one line each.
fn journal_lines(path: &Path) -> Result<Vec<String>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let mut out = Vec::new();
    for part in ["endpoints", "networks"] {
        for (k, value) in v[part].as_object().into_iter().flatten() {
            out.push(format!("{part} {k}: {value}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|l| (*l).to_owned()).collect()
    }

    #[test]
    fn differences_count_every_line() {
        let mut before = Footprint::default();
        before.insert("links", strings(&["eth0", "lo", "ovl1"]));
        let mut after = Footprint::default();
        after.insert("links", strings(&["eth0", "lo", "ovl2", "ovl2"]));
        after.insert("pins", strings(&["links/"]));
        let changes = after.changes_since(&before);
        assert_eq!(
            changes,
            "links (3 before, 4 now):\n  - ovl1\n  + ovl2\n  + ovl2\npins (0 before, 1 now):\n  + links/\n"
        );
        assert_eq!(before.changes_since(&before.clone()), "");
    }

    #[test]
    fn counters_are_left_out_of_nftables_lines() {
        assert_eq!(
            without_counters("ip saddr 198.18.0.2 counter packets 12 bytes 1008 masquerade"),
            "ip saddr 198.18.0.2 counter packets bytes masquerade"
        );
    }
}
