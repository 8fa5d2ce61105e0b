//! What happens to an address after its endpoint goes: it is held back for
//! a grace period (its holder may only be cut off, and come back), and a
//! node that puts back its endpoints learns which addresses were taken.

use std::{
    net::Ipv4Addr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::model::{Endpoint, Location, MacAddr, Network, host_ifname as host_ifname_for};

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
/// address free, the MAC its endpoint was given (`connect --mac`) — held
/// by another endpoint of the network: the newer owner keeps it, the
/// node's container is cut off until it is reconnected.
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
}

/// The MAC of a [`AddressConflict`] over a MAC, and where its holder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMac {
    pub mac: MacAddr,
    /// The holder's address (the returning endpoint's is free).
    pub holder_ip: Ipv4Addr,
}

impl AddressConflict {
    /// What the returning endpoint lost: "address" or "MAC".
    pub fn what(&self) -> &'static str {
        match self.mac {
            Some(_) => "MAC",
            None => "address",
        }
    }
}

impl std::fmt::Display for AddressConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let holder = match &self.holder {
            Location::Container { node, netns, .. } => {
                format!("{} ({netns} on {node})", self.holder_name)
            }
            Location::Static { vtep } => format!("{} (behind VTEP {vtep})", self.holder_name),
            Location::Reserved { node } => {
                format!("{} (reserved by Docker on {node})", self.holder_name)
            }
        };
        match &self.mac {
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
    /// Another endpoint holds its address, or its MAC.
    Conflict(AddressConflict),
}

/// Judges `wanted` against what holds its address now (`holder`), the
/// endpoint of its network at another address that has its MAC now
/// (`mac_holder`), and its network as it is now (`network`, none if
/// removed). Two endpoints of one network with one MAC would each take
/// the other's frames: a MAC taken meanwhile is a conflict like an
/// address.
pub fn judge(
    wanted: &Endpoint,
    holder: Option<&Endpoint>,
    mac_holder: Option<&Endpoint>,
    network: Option<&Network>,
    now_ms: u64,
) -> Verdict {
    if !network.is_some_and(|n| fits(wanted, n)) {
        return Verdict::NetworkGone;
    }
    let conflict = |h: &Endpoint, mac: Option<HeldMac>| {
        Verdict::Conflict(AddressConflict {
            network: wanted.network.clone(),
            ip: wanted.ip,
            name: wanted.name.clone(),
            netns: match &wanted.location {
                Location::Container { netns, .. } => netns.clone(),
                Location::Static { .. } | Location::Reserved { .. } => String::new(),
            },
            holder_name: h.name.clone(),
            holder: h.location.clone(),
            at_ms: now_ms,
            mac,
        })
    };
    match (holder, mac_holder) {
        (Some(h), _) if h.location == wanted.location => Verdict::Present,
        (Some(h), _) if same_veth(h, wanted) => Verdict::Superseded,
        (Some(h), _) => conflict(h, None),
        (None, Some(h)) if h.mac == wanted.mac && h.ip != wanted.ip => {
            if same_container(h, wanted) {
                // The container itself was connected anew at another
                // address, keeping its MAC, while no agent watched.
                Verdict::Superseded
            } else {
                conflict(
                    h,
                    Some(HeldMac {
                        mac: wanted.mac,
                        holder_ip: h.ip,
                    }),
                )
            }
        }
        (None, _) => Verdict::Restore,
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
    /// Put back.
    pub restored: Vec<Endpoint>,
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
        assert_eq!(judge(&mine, None, None, net, 1), Verdict::Restore);
        assert_eq!(judge(&mine, Some(&mine), None, net, 1), Verdict::Present);
        assert_eq!(judge(&mine, None, None, None, 1), Verdict::NetworkGone);
        // Removed and created again under its name: another subnet, or
        // another VNI (its veth named for the old one) is another network.
        for again in [
            network(4096, "198.18.7.0/24"),
            network(4097, "198.18.0.0/24"),
        ] {
            assert_eq!(
                judge(&mine, None, None, Some(&again), 1),
                Verdict::NetworkGone,
                "{again:?}"
            );
        }
        // A newer container of the same node at that address has the
        // veth now: the wanted one was disconnected, nothing is lost.
        assert_eq!(
            judge(&mine, Some(&ep("a", "c2")), None, net, 1),
            Verdict::Superseded
        );
        let Verdict::Conflict(c) = judge(&mine, Some(&ep("b", "c9")), None, net, 7) else {
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
        let Verdict::Conflict(c) = judge(&mine, None, Some(&thief), net, 7) else {
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
        let Verdict::Conflict(c) = judge(&mine, Some(&thief), Some(&thief), net, 7) else {
            panic!("a held address is a conflict");
        };
        assert_eq!((c.mac, c.what()), (None, "address"));
        // The same container, connected anew at another address with its
        // MAC while no agent watched, supersedes it.
        let mut again = mine.clone();
        again.ip = thief.ip;
        assert_eq!(
            judge(&mine, None, Some(&again), net, 7),
            Verdict::Superseded
        );
        // A holder of another MAC (or none) leaves it free.
        thief.mac = MacAddr::for_ipv4(thief.ip);
        assert_eq!(judge(&mine, None, Some(&thief), net, 7), Verdict::Restore);
        // A conflict recorded before MACs were judged still reads.
        let old = r#"{"network":"n","ip":"198.18.0.5","name":"c1","netns":"c1","holder_name":"c9","holder":{"kind":"static","vtep":"192.0.2.9"},"at_ms":7}"#;
        let c: AddressConflict = serde_json::from_str(old).unwrap();
        assert_eq!(c.mac, None);
    }
}
