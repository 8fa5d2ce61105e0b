//! The resolv.conf of namespaces made with `ip netns add NAME`: `ip netns
//! exec NAME` bind-mounts `/etc/netns/NAME/resolv.conf` over
//! `/etc/resolv.conf`, so writing that file points the namespace's
//! programs at ovl's resolver. The host's own /etc/resolv.conf is never
//! touched, and a file ovl did not write is never replaced or removed.

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::ContainerDns;

/// Where `ip netns exec` finds per-namespace /etc files.
pub const NETNS_ETC: &str = "/etc/netns";
/// First line of every resolv.conf ovl writes: what makes it ovl's.
const MARKER: &str = "# written by ovl";

/// What was done to a namespace's resolv.conf.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Written(PathBuf),
    Removed(PathBuf),
    /// The namespace is a path, not an `ip netns` name: its runtime owns
    /// its /etc (Docker, CNI runtimes); nothing to do.
    NotNamed,
    /// A resolv.conf ovl did not write is there: left alone.
    NotOurs(PathBuf),
    Absent,
}

/// The resolv.conf text for a container using `dns`.
pub fn render(dns: &ContainerDns) -> String {
    let mut out = format!(
        "{MARKER}: ovl's resolver in this namespace; removed with the namespace's last `ovl disconnect`\n"
    );
    for ns in &dns.nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !dns.search.is_empty() {
        out.push_str(&format!("search {}\n", dns.search.join(" ")));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    out
}

/// The search domains a resolv.conf text sets (its last `search` or
/// `domain` line, as the resolver reads it).
pub fn search_domains(text: &str) -> Vec<String> {
    let mut search = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let Some("search" | "domain") = words.next() {
            search = words.map(str::to_owned).collect();
        }
    }
    search
}

/// The `options` a resolv.conf text sets (all its `options` lines, as
/// the resolver reads them), but `ndots`: a container attached by ovl
/// asks bare names as they are ([`container_dns`](super::container_dns)).
pub fn options_but_ndots(text: &str) -> Vec<String> {
    let mut options = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("options") {
            options.extend(
                words
                    .take_while(|w| !w.starts_with(['#', ';']))
                    .filter(|w| !w.starts_with("ndots:"))
                    .map(str::to_owned),
            );
        }
    }
    options
}

/// Writes the resolv.conf of namespace `netns` (if it is an `ip netns`
/// name and no foreign file is there).
pub fn install(netns: &str, dns: &ContainerDns) -> Result<Change> {
    install_under(Path::new(NETNS_ETC), netns, dns)
}

/// Whether namespace `netns` has a resolv.conf ovl wrote.
pub fn is_ours(netns: &str) -> bool {
    file_of(Path::new(NETNS_ETC), netns).is_some_and(|p| matches!(ours(&p), Ok(Some(true))))
}

/// Removes the resolv.conf of namespace `netns` if ovl wrote it.
pub fn remove(netns: &str) -> Result<Change> {
    remove_under(Path::new(NETNS_ETC), netns)
}

fn file_of(root: &Path, netns: &str) -> Option<PathBuf> {
    let named = !netns.is_empty() && !netns.contains('/') && netns != "." && netns != "..";
    named.then(|| root.join(netns).join("resolv.conf"))
}

fn ours(path: &Path) -> io::Result<Option<bool>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.starts_with(MARKER))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn install_under(root: &Path, netns: &str, dns: &ContainerDns) -> Result<Change> {
    let Some(path) = file_of(root, netns) else {
        return Ok(Change::NotNamed);
    };
    if ours(&path).with_context(|| format!("read {}", path.display()))? == Some(false) {
        return Ok(Change::NotOurs(path));
    }
    let dir = path.parent().expect("a file under the root has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    // Whole or not at all: a reader never sees half a file.
    let tmp = dir.join(".resolv.conf.ovl");
    std::fs::write(&tmp, render(dns)).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replace {}", path.display()))?;
    Ok(Change::Written(path))
}

fn remove_under(root: &Path, netns: &str) -> Result<Change> {
    let Some(path) = file_of(root, netns) else {
        return Ok(Change::NotNamed);
    };
    match ours(&path).with_context(|| format!("read {}", path.display()))? {
        None => return Ok(Change::Absent),
        Some(false) => return Ok(Change::NotOurs(path)),
        Some(true) => {}
    }
    std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    // The directory goes too once nothing else is in it.
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(Change::Removed(path))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::testutil::TestDir;

    fn dns() -> ContainerDns {
        ContainerDns {
            nameservers: vec![Ipv4Addr::new(127, 0, 0, 11)],
            search: vec!["example.com".into()],
            options: vec!["ndots:0".into()],
        }
    }

    #[test]
    fn written_for_named_namespaces_and_removed_again() {
        let tmp = TestDir::new("netns-etc-named");
        let root = tmp.path();
        let path = root.join("c1/resolv.conf");
        assert_eq!(
            install_under(root, "c1", &dns()).unwrap(),
            Change::Written(path.clone())
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(MARKER), "{text}");
        assert!(text.contains("\nnameserver 127.0.0.11\n"), "{text}");
        assert!(text.contains("\nsearch example.com\n"), "{text}");
        assert!(text.contains("\noptions ndots:0\n"), "{text}");
        // Again (a second network): same file.
        install_under(root, "c1", &dns()).unwrap();
        assert_eq!(remove_under(root, "c1").unwrap(), Change::Removed(path));
        assert!(!root.join("c1").exists(), "empty directory removed");
        assert_eq!(remove_under(root, "c1").unwrap(), Change::Absent);
    }

    #[test]
    fn search_domains_come_from_the_last_search_or_domain_line() {
        assert_eq!(
            search_domains("domain a.example\nsearch b.example c.example\nnameserver 1.2.3.4\n"),
            vec!["b.example", "c.example"]
        );
        assert!(search_domains("nameserver 1.2.3.4\n").is_empty());
    }

    #[test]
    fn options_are_the_hosts_but_ndots() {
        let host = "options edns0 trust-ad\nnameserver 127.0.0.53\noptions ndots:5 timeout:1 # from DHCP\n";
        assert_eq!(
            options_but_ndots(host),
            vec!["edns0", "trust-ad", "timeout:1"]
        );
        assert!(options_but_ndots("nameserver 192.0.2.53\n").is_empty());
    }

    #[test]
    fn paths_and_foreign_files_are_left_alone() {
        let tmp = TestDir::new("netns-etc-foreign");
        let root = tmp.path();
        for ns in ["/var/run/docker/netns/abc", "..", ""] {
            assert_eq!(install_under(root, ns, &dns()).unwrap(), Change::NotNamed);
        }
        std::fs::create_dir_all(root.join("mine")).unwrap();
        let path = root.join("mine/resolv.conf");
        std::fs::write(&path, "nameserver 192.0.2.53\n").unwrap();
        assert_eq!(
            install_under(root, "mine", &dns()).unwrap(),
            Change::NotOurs(path.clone())
        );
        assert_eq!(
            remove_under(root, "mine").unwrap(),
            Change::NotOurs(path.clone())
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "nameserver 192.0.2.53\n"
        );
    }
}
