//! What happens to an address after its endpoint goes: it is held back for
//! a grace period (its holder may only be cut off, and come back), and a
//! node that puts back its endpoints learns which addresses were taken.

use std::{
    net::Ipv4Addr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::model::{
    Endpoint, Location, MacAddr, Network, host_ifname as host_ifname_for, validate_endpoint_name,
};

/// How long a freed address is held back by default: longer than any
/// sensible liveness lease (default 10 s), so a node that was cut off for
/// a while finds its addresses free when it returns.
pub const DEFAULT_ADDRESS_GRACE: Duration = Duration::from_secs(60);

/// An address freed at `at_ms` (milliseconds since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    pub network: String,
    pub ip: Ipv4Addr,
    pub at_ms: u64,
    /// The endpoint that held it, for `ovl endpoint ls` and logs.
    pub name: String,
    /// Its node, for container endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Released {
    /// The record of `endpoint` freed at `at_ms`.
    pub fn of(endpoint: &Endpoint, at_ms: u64) -> Released {
        Released {
            network: endpoint.network.clone(),
            ip: endpoint.ip,
            at_ms,
            name: endpoint.name.clone(),
            node: endpoint.node().map(str::to_owned),
        }
    }
}

/// The time a change happens at and how long freed addresses are held
/// back; the store sets it before each change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraceClock {
    pub now_ms: u64,
    pub grace: Duration,
}

impl GraceClock {
    /// The wall clock now, holding addresses back for `grace`.
    pub fn now(grace: Duration) -> GraceClock {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        GraceClock { now_ms, grace }
    }

    /// How much longer `r` is held back, if it still is.
    pub fn remaining(&self, r: &Released) -> Option<Duration> {
        if self.grace.is_zero() {
            return None;
        }
        let until = r
            .at_ms
            .saturating_add(u64::try_from(self.grace.as_millis()).unwrap_or(u64::MAX));
        (self.now_ms < until).then(|| Duration::from_millis(until - self.now_ms))
    }
}

/// A node came back and found one of its addresses — or, with its
/// address free, the MAC its endpoint was given (`connect --mac`), or its
/// name and every fallback name ([`fallback_names`]) — held by another
/// endpoint of the network: the newer owner keeps it, the node's
/// container is cut off until it is reconnected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressConflict {
    pub network: String,
    pub ip: Ipv4Addr,
    /// The returning node's endpoint that lost the address.
    pub name: String,
    pub netns: String,
    /// Who holds the address (or the MAC) now.
    pub holder_name: String,
    pub holder: Location,
    /// When the conflict was found (ms since the Unix epoch).
    pub at_ms: u64,
    /// Set when it is the endpoint's MAC, not its address, that the
    /// holder has (absent in records of address conflicts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<HeldMac>,
    /// Set when its address and MAC are free but its name and every
    /// fallback name are held (the holder: its name's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub name_held: bool,
}

/// The MAC of a [`AddressConflict`] over a MAC, and where its holder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMac {
    pub mac: MacAddr,
    /// The holder's address (the returning endpoint's is free).
    pub holder_ip: Ipv4Addr,
}

impl AddressConflict {
    /// What the returning endpoint lost: "address", "MAC" or "name".
    pub fn what(&self) -> &'static str {
        match (self.mac, self.name_held) {
            (Some(_), _) => "MAC",
            (None, true) => "name",
            (None, false) => "address",
        }
    }
}

/// `name` of the endpoint at `location`, said with where it is.
fn described(name: &str, location: &Location) -> String {
    match location {
        Location::Container { node, netns, .. } => format!("{name} ({netns} on {node})"),
        Location::Static { vtep } => format!("{name} (behind VTEP {vtep})"),
        Location::Reserved { node } => format!("{name} (reserved by Docker on {node})"),
    }
}

impl std::fmt::Display for AddressConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let holder = described(&self.holder_name, &self.holder);
        match &self.mac {
            None if self.name_held => write!(
                f,
                "name {} of {}/{} ({}) is held by {holder}, and so is each name it could be called instead: {} was not put back; reconnect it with another --name (or disconnect the holder first and reconnect it)",
                self.name, self.network, self.ip, self.netns, self.name
            ),
            None => write!(
                f,
                "{}/{} of {} ({}) is held by {holder}",
                self.network, self.ip, self.name, self.netns
            ),
            Some(m) => write!(
                f,
                "MAC {} of {}/{} {} ({}) is held by {holder} at {}: {} was not put back; reconnect it with another MAC or none (or disconnect the holder first and reconnect it with this one)",
                m.mac, self.network, self.ip, self.name, self.netns, m.holder_ip, self.name
            ),
        }
    }
}

/// A node came back and found the name of one of its endpoints (its
/// address and MAC free) held by another endpoint of the network: the
/// holder keeps the name, the endpoint is put back under `to`, its first
/// free [`fallback_names`], with its aliases (its old name is not made one:
/// it would resolve to both, the clash this avoids).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renamed {
    pub network: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    /// The name it had, which the holder has now.
    pub from: String,
    /// The name it is put back under.
    pub to: String,
    /// The holder of `from` (its name, as it spells it).
    pub holder_name: String,
    pub holder_ip: Ipv4Addr,
    pub holder: Location,
}

impl Renamed {
    /// `wanted` as it is put back: under its new name.
    pub fn apply(&self, wanted: &Endpoint) -> Endpoint {
        Endpoint {
            name: self.to.clone(),
            ..wanted.clone()
        }
    }
}

impl std::fmt::Display for Renamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "endpoint {}/{} ({}) is back as {}: its name {} is held by {} at {}, which keeps it; to have a name of your choice, reconnect it with another --name (or disconnect the holder first and reconnect it with --name {})",
            self.network,
            self.ip,
            self.netns,
            self.to,
            self.from,
            described(&self.holder_name, &self.holder),
            self.holder_ip,
            self.from
        )
    }
}

/// The names, in order, an endpoint whose name another holds may be put
/// back under: a Docker endpoint's short endpoint ID (what the plugin's
/// naming falls back to, `docker::names`), a CNI attachment's short
/// container ID (as `cni::add`'s), any other container its namespace's
/// base name; then, for all, its address as a name (`ep-198-18-0-5`),
/// which no other endpoint is given unless asked for. Only valid names
/// other than its own, once each.
pub fn fallback_names(e: &Endpoint) -> Vec<String> {
    let owner = e.owner.as_deref().unwrap_or_default();
    let first = if let Some(id) = crate::docker::endpoint_of(owner) {
        Some(crate::docker::short(id).to_owned())
    } else if let Some(rest) = owner.strip_prefix(crate::cni::env::OWNER_PREFIX) {
        let container = rest.rsplit_once('/').map_or(rest, |(c, _)| c);
        Some(crate::cni::env::short_id(container))
    } else {
        match &e.location {
            Location::Container { netns, .. } => std::path::Path::new(netns)
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned),
            Location::Static { .. } | Location::Reserved { .. } => None,
        }
    };
    let by_address = format!("ep-{}", e.ip.to_string().replace('.', "-"));
    let mut out: Vec<String> = Vec::new();
    for name in first.into_iter().chain([by_address]) {
        let fresh = !name.eq_ignore_ascii_case(&e.name)
            && !out.iter().any(|o| o.eq_ignore_ascii_case(&name));
        if fresh && validate_endpoint_name(&name).is_ok() {
            out.push(name);
        }
    }
    out
}

/// Whether `wanted` fits `network` as it is now: its address lies in one
/// of the subnets, and a container's veth is named for the network's VNI.
/// A network removed and created again under the same name may have other
/// subnets and another VNI: the endpoint is not its.
fn fits(wanted: &Endpoint, network: &Network) -> bool {
    network.pool_of(wanted.ip).is_some()
        && match &wanted.location {
            Location::Container { host_ifname, .. } => {
                *host_ifname == host_ifname_for(network.vni, wanted.ip)
            }
            Location::Static { .. } | Location::Reserved { .. } => true,
        }
}

/// Both are containers of one node with one host veth name: a node has
/// one interface of that name, so it is `holder`'s now.
fn same_veth(holder: &Endpoint, wanted: &Endpoint) -> bool {
    match (&holder.location, &wanted.location) {
        (
            Location::Container {
                node: a,
                host_ifname: x,
                ..
            },
            Location::Container {
                node: b,
                host_ifname: y,
                ..
            },
        ) => a == b && x == y,
        _ => false,
    }
}

/// What to do with one endpoint a node wants back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The store still has it: nothing to do.
    Present,
    /// Its address is free: put it back.
    Restore,
    /// Its network was removed meanwhile (or removed and created again
    /// under its name, with subnets or a VNI it does not fit).
    NetworkGone,
    /// A newer container of the same node holds its address, and with it
    /// the veth both are named for: the wanted one was disconnected (or
    /// its namespace deleted) and the address handed on while no agent
    /// watched. Nothing to put back, and nobody lost anything.
    Superseded,
    /// Its address and MAC are free, another endpoint has its name: put
    /// it back under a fallback name ([`Renamed::apply`]).
    Rename(Renamed),
    /// Another endpoint holds its address, or its MAC, or its name and
    /// every fallback name.
    Conflict(AddressConflict),
}

/// Judges `wanted` against what holds its address now (`holder`), the
/// endpoint of its network at another address that has its MAC now
/// (`mac_holder`), the endpoints of its network called by its name or
/// one of its [`fallback_names`] now (`named`; others are ignored), and
/// its network as it is now (`network`, none if removed). Two endpoints
/// of one network with one MAC would each take the other's frames: a MAC
/// taken meanwhile is a conflict like an address. A name is unique per
/// network but no reason to cut a container off: with its name taken
/// meanwhile it comes back under a fallback, as a new attachment would
/// (`attachment::naming`).
pub fn judge(
    wanted: &Endpoint,
    holder: Option<&Endpoint>,
    mac_holder: Option<&Endpoint>,
    named: &[&Endpoint],
    network: Option<&Network>,
    now_ms: u64,
) -> Verdict {
    if !network.is_some_and(|n| fits(wanted, n)) {
        return Verdict::NetworkGone;
    }
    let conflict = |h: &Endpoint, mac: Option<HeldMac>| AddressConflict {
        network: wanted.network.clone(),
        ip: wanted.ip,
        name: wanted.name.clone(),
        netns: netns_of(wanted),
        holder_name: h.name.clone(),
        holder: h.location.clone(),
        at_ms: now_ms,
        mac,
        name_held: false,
    };
    let holder_of_name = |name: &str| {
        named
            .iter()
            .find(|e| e.ip != wanted.ip && e.name.eq_ignore_ascii_case(name))
            .copied()
    };
    match (holder, mac_holder) {
        (Some(h), _) if h.location == wanted.location => Verdict::Present,
        (Some(h), _) if same_veth(h, wanted) => Verdict::Superseded,
        (Some(h), _) => Verdict::Conflict(conflict(h, None)),
        (None, Some(h)) if h.mac == wanted.mac && h.ip != wanted.ip => {
            if same_container(h, wanted) {
                // The container itself was connected anew at another
                // address, keeping its MAC, while no agent watched.
                Verdict::Superseded
            } else {
                Verdict::Conflict(conflict(
                    h,
                    Some(HeldMac {
                        mac: wanted.mac,
                        holder_ip: h.ip,
                    }),
                ))
            }
        }
        (None, _) => match holder_of_name(&wanted.name) {
            None => Verdict::Restore,
            // The container itself was connected anew at another address
            // under its name while no agent watched.
            Some(h) if same_container(h, wanted) => Verdict::Superseded,
            Some(h) => match fallback_names(wanted)
                .into_iter()
                .find(|n| holder_of_name(n).is_none())
            {
                Some(to) => Verdict::Rename(Renamed {
                    network: wanted.network.clone(),
                    ip: wanted.ip,
                    netns: netns_of(wanted),
                    from: wanted.name.clone(),
                    to,
                    holder_name: h.name.clone(),
                    holder_ip: h.ip,
                    holder: h.location.clone(),
                }),
                None => Verdict::Conflict(AddressConflict {
                    name_held: true,
                    ..conflict(h, None)
                }),
            },
        },
    }
}

/// The namespace of a container's endpoint (empty for others).
fn netns_of(e: &Endpoint) -> String {
    match &e.location {
        Location::Container { netns, .. } => netns.clone(),
        Location::Static { .. } | Location::Reserved { .. } => String::new(),
    }
}

/// Both are the endpoints of one container namespace on one node.
fn same_container(a: &Endpoint, b: &Endpoint) -> bool {
    match (&a.location, &b.location) {
        (
            Location::Container {
                node: n1,
                netns: s1,
                ..
            },
            Location::Container {
                node: n2,
                netns: s2,
                ..
            },
        ) => n1 == n2 && s1 == s2,
        _ => false,
    }
}

/// What putting back a node's endpoints did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// Put back (under their new name, those renamed).
    pub restored: Vec<Endpoint>,
    /// Put back under a fallback name: another endpoint has theirs now.
    pub renamed: Vec<Renamed>,
    /// Still in the store: nothing done.
    pub present: usize,
    /// Taken by another endpoint meanwhile (recorded under the node).
    pub conflicts: Vec<AddressConflict>,
    /// Their network was removed meanwhile.
    pub networks_gone: Vec<Endpoint>,
    /// Published ports of endpoints put back that another endpoint of
    /// their node publishes now: each endpoint came back without them.
    pub unpublished: Vec<(Endpoint, crate::ports::PublishedPort)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MacAddr;

    /// Network "n" as created with `vni` and `subnet`.
    fn network(vni: u32, subnet: &str) -> Network {
        let mut s = crate::model::State::default();
        s.create_network(crate::model::NetworkSpec {
            vni: Some(vni),
            ..crate::model::NetworkSpec::new("n", subnet.parse().unwrap())
        })
        .unwrap()
        .clone()
    }

    fn ep(node: &str, netns: &str) -> Endpoint {
        let ip = Ipv4Addr::new(198, 18, 0, 5);
        Endpoint {
            ports: Vec::new(),
            attacher: None,
            network: "n".into(),
            name: netns.into(),
            ip,
            mac: MacAddr::for_ipv4(ip),
            location: Location::Container {
                node: node.into(),
                netns: netns.into(),
                host_ifname: crate::model::host_ifname(4096.try_into().unwrap(), ip),
            },
            owner: None,
            aliases: Vec::new(),
        }
    }

    #[test]
    fn grace_holds_an_address_until_it_expires() {
        let r = Released::of(&ep("a", "c1"), 10_000);
        let clock = |now_ms| GraceClock {
            now_ms,
            grace: Duration::from_secs(60),
        };
        assert_eq!(clock(10_000).remaining(&r), Some(Duration::from_secs(60)));
        assert_eq!(clock(69_999).remaining(&r), Some(Duration::from_millis(1)));
        assert_eq!(clock(70_000).remaining(&r), None);
        assert_eq!(GraceClock::default().remaining(&r), None);
    }

    #[test]
    fn a_returning_endpoint_is_restored_kept_or_reported_in_conflict() {
        let mine = ep("a", "c1");
        let net = network(4096, "198.18.0.0/24");
        let net = Some(&net);
        assert_eq!(judge(&mine, None, None, &[], net, 1), Verdict::Restore);
        assert_eq!(
            judge(&mine, Some(&mine), None, &[], net, 1),
            Verdict::Present
        );
        assert_eq!(judge(&mine, None, None, &[], None, 1), Verdict::NetworkGone);
        // Removed and created again under its name: another subnet, or
        // another VNI (its veth named for the old one) is another network.
        for again in [
            network(4096, "198.18.7.0/24"),
            network(4097, "198.18.0.0/24"),
        ] {
            assert_eq!(
                judge(&mine, None, None, &[], Some(&again), 1),
                Verdict::NetworkGone,
                "{again:?}"
            );
        }
        // A newer container of the same node at that address has the
        // veth now: the wanted one was disconnected, nothing is lost.
        assert_eq!(
            judge(&mine, Some(&ep("a", "c2")), None, &[], net, 1),
            Verdict::Superseded
        );
        let Verdict::Conflict(c) = judge(&mine, Some(&ep("b", "c9")), None, &[], net, 7) else {
            panic!("a foreign holder is a conflict");
        };
        assert_eq!(
            (c.netns.as_str(), c.holder_name.as_str(), c.at_ms),
            ("c1", "c9", 7)
        );
        assert!(c.to_string().contains("held by c9 (c9 on b)"), "{c}");
    }

    #[test]
    fn a_returning_endpoint_whose_own_mac_another_took_is_a_conflict_naming_the_mac() {
        let net = network(4096, "198.18.0.0/24");
        let net = Some(&net);
        let mac: MacAddr = "0a:00:5e:00:00:07".parse().unwrap();
        let mine = Endpoint {
            mac,
            ..ep("a", "c1")
        };
        // Another container of the network, at another address, has it.
        let mut thief = ep("b", "c9");
        thief.ip = Ipv4Addr::new(198, 18, 0, 9);
        thief.mac = mac;
        let Verdict::Conflict(c) = judge(&mine, None, Some(&thief), &[], net, 7) else {
            panic!("a MAC another endpoint has is a conflict");
        };
        assert_eq!(
            c.mac,
            Some(HeldMac {
                mac,
                holder_ip: thief.ip
            })
        );
        assert_eq!((c.what(), c.holder_name.as_str()), ("MAC", "c9"));
        let text = c.to_string();
        for needle in [
            "MAC 0a:00:5e:00:00:07 of n/198.18.0.5 c1 (c1)",
            "held by c9 (c9 on b) at 198.18.0.9",
            "reconnect it with another MAC or none",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
        // An address conflict says nothing of MACs.
        let Verdict::Conflict(c) = judge(&mine, Some(&thief), Some(&thief), &[], net, 7) else {
            panic!("a held address is a conflict");
        };
        assert_eq!((c.mac, c.what()), (None, "address"));
        // The same container, connected anew at another address with its
        // MAC while no agent watched, supersedes it.
        let mut again = mine.clone();
        again.ip = thief.ip;
        assert_eq!(
            judge(&mine, None, Some(&again), &[], net, 7),
            Verdict::Superseded
        );
        // A holder of another MAC (or none) leaves it free.
        thief.mac = MacAddr::for_ipv4(thief.ip);
        assert_eq!(
            judge(&mine, None, Some(&thief), &[], net, 7),
            Verdict::Restore
        );
        // A conflict recorded before MACs were judged still reads.
        let old = r#"{"network":"n","ip":"198.18.0.5","name":"c1","netns":"c1","holder_name":"c9","holder":{"kind":"static","vtep":"192.0.2.9"},"at_ms":7}"#;
        let c: AddressConflict = serde_json::from_str(old).unwrap();
        assert_eq!(c.mac, None);
    }

    #[test]
    fn a_returning_endpoint_falls_back_to_its_short_id_netns_or_address_as_a_name() {
        let docker = Endpoint {
            owner: Some("docker:4f9c2d1e7a3b5d6e7f80".into()),
            ..ep("a", "/run/docker/netns/0123")
        };
        assert_eq!(fallback_names(&docker), ["4f9c2d1e7a3b", "ep-198-18-0-5"]);
        let cni = Endpoint {
            owner: Some("cni:9e8d7c6b5a4f3e2d1c0b/eth1".into()),
            ..ep("a", "/var/run/netns/cni-1234")
        };
        assert_eq!(fallback_names(&cni), ["9e8d7c6b5a4f", "ep-198-18-0-5"]);
        let plain = Endpoint {
            name: "web".into(),
            ..ep("a", "/run/netns/blue")
        };
        assert_eq!(fallback_names(&plain), ["blue", "ep-198-18-0-5"]);
        // A namespace whose name is no valid name, or is its own name,
        // leaves its address.
        let odd = Endpoint {
            name: "web".into(),
            ..ep("a", "/run/netns/my ns")
        };
        assert_eq!(fallback_names(&odd), ["ep-198-18-0-5"]);
        let same = Endpoint {
            name: "C1".into(),
            ..ep("a", "/run/netns/c1")
        };
        assert_eq!(fallback_names(&same), ["ep-198-18-0-5"]);
    }

    #[test]
    fn a_returning_endpoint_whose_name_another_took_is_renamed_or_in_conflict() {
        let net = network(4096, "198.18.0.0/24");
        let net = Some(&net);
        let mine = Endpoint {
            name: "db".into(),
            aliases: vec!["database".into()],
            ..ep("a", "/run/netns/c1")
        };
        let mut holder = ep("b", "t1");
        holder.ip = Ipv4Addr::new(198, 18, 0, 9);
        holder.name = "DB".into();
        // Another called otherwise, or only by an alias, is no clash.
        let other = Endpoint {
            name: "web".into(),
            aliases: vec!["db".into()],
            ..holder.clone()
        };
        assert_eq!(
            judge(&mine, None, None, &[&other], net, 7),
            Verdict::Restore
        );

        let Verdict::Rename(how) = judge(&mine, None, None, &[&holder], net, 7) else {
            panic!("a name another has is a rename");
        };
        let back = how.apply(&mine);
        assert_eq!(
            back,
            Endpoint {
                name: "c1".into(),
                ..mine.clone()
            },
            "its netns's name, its aliases kept"
        );
        assert_eq!(
            (how.from.as_str(), how.to.as_str(), how.holder_ip),
            ("db", "c1", holder.ip)
        );
        assert!(
            how.to_string()
                .contains("its name db is held by DB (t1 on b) at 198.18.0.9"),
            "{how}"
        );
        // Its first fallback held as well: its address.
        let c1 = Endpoint {
            name: "c1".into(),
            ..other.clone()
        };
        let Verdict::Rename(how) = judge(&mine, None, None, &[&holder, &c1], net, 7) else {
            panic!("a rename");
        };
        assert_eq!(how.apply(&mine).name, "ep-198-18-0-5");
        // Every fallback held: a name conflict.
        let by_ip = Endpoint {
            name: "EP-198-18-0-5".into(),
            ..other.clone()
        };
        let Verdict::Conflict(c) = judge(&mine, None, None, &[&holder, &c1, &by_ip], net, 7) else {
            panic!("nothing left to call it: a conflict");
        };
        assert_eq!((c.what(), c.holder_name.as_str()), ("name", "DB"));
        assert!(
            c.to_string().contains("reconnect it with another --name"),
            "{c}"
        );
        // The same container, connected anew under its name at another
        // address while no agent watched, supersedes it.
        let again = Endpoint {
            ip: holder.ip,
            ..mine.clone()
        };
        assert_eq!(
            judge(&mine, None, None, &[&again], net, 7),
            Verdict::Superseded
        );
        // The endpoint itself (at its address) is no holder of its name.
        assert_eq!(judge(&mine, None, None, &[&mine], net, 7), Verdict::Restore);
    }
}
