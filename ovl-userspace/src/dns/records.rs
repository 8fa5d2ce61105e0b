//! What the resolver knows, as one immutable value built from the store's
//! state: the names and addresses of the reachable endpoints of every
//! network with a container on this node, and which networks each local
//! container namespace may ask about. Answering a question is a pure
//! function of it.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use hickory_proto::{
    op::ResponseCode,
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, PTR},
    },
};

use crate::{
    ipam::Subnet,
    model::{Location, State, validate_endpoint_name},
    netns,
    store::Dirty,
};

/// TTL of every record answered from ovl's own names: short, so that a
/// client that caches still forgets an endpoint within about the second
/// it takes ovl to stop answering for it.
pub const RECORD_TTL: u32 = 1;

/// Names and addresses of one network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NetworkRecords {
    /// The network's subnets (reverse names of their addresses are ours).
    subnets: Vec<Subnet>,
    /// Lower-case name or alias → addresses (more than one only when a
    /// store written before names were unique holds a name twice).
    by_name: HashMap<String, Vec<Ipv4Addr>>,
    /// Address → the endpoint's name as registered.
    by_ip: HashMap<Ipv4Addr, String>,
}

impl NetworkRecords {
    /// Adds the names of reachable endpoint `ep`. Default names are
    /// namespace names or paths: only those that can be asked for are
    /// answered.
    fn add(&mut self, ep: &crate::model::Endpoint) {
        let mut first = None;
        for name in ep.names().filter(|n| validate_endpoint_name(n).is_ok()) {
            first.get_or_insert(name);
            let ips = self.by_name.entry(name.to_ascii_lowercase()).or_default();
            if !ips.contains(&ep.ip) {
                ips.push(ep.ip);
                // One name held twice (a store from before names were
                // unique): its addresses in a fixed order.
                ips.sort();
            }
        }
        if let Some(name) = first {
            self.by_ip.insert(ep.ip, name.to_owned());
        }
    }

    /// Takes back what [`NetworkRecords::add`] added for `ep` (nothing if
    /// it was not reachable).
    fn remove(&mut self, ep: &crate::model::Endpoint) {
        for name in ep.names().filter(|n| validate_endpoint_name(n).is_ok()) {
            let key = name.to_ascii_lowercase();
            if let Some(ips) = self.by_name.get_mut(&key) {
                ips.retain(|ip| *ip != ep.ip);
                if ips.is_empty() {
                    self.by_name.remove(&key);
                }
            }
        }
        self.by_ip.remove(&ep.ip);
    }
}

/// Everything the resolver answers from.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Records {
    /// Shared with the records built before: a rebuild copies and patches
    /// only the networks whose endpoints changed.
    networks: BTreeMap<String, Arc<NetworkRecords>>,
    /// Local container namespace (its path) → the networks it is on, by
    /// name order (shared too: it changes only with local endpoints).
    scopes: Arc<BTreeMap<String, Vec<String>>>,
}

/// How a question is answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution {
    /// From ovl's records, charged to `network`: `code` with `answers`
    /// (NOERROR with no answers is "the name exists, without that type").
    Local {
        network: String,
        code: ResponseCode,
        answers: Vec<Record>,
    },
    /// Not ovl's to answer: ask the upstream resolvers.
    Forward,
}

impl Records {
    /// The records node `node` serves in `state`. A remote endpoint counts
    /// while its VTEP is known and its node alive (as in the maps); a local
    /// one once `link_exists` says its host veth is there.
    pub fn build(state: &State, node: &str, link_exists: &dyn Fn(&str) -> bool) -> Records {
        Records::rebuild(&Records::default(), state, node, link_exists, &Dirty::All)
    }

    /// As [`Records::build`], starting from `prev` (built from the state
    /// before the changes `dirty` names): networks covered whole are built
    /// again, a changed endpoint's names are taken back and added anew,
    /// the other networks' records are shared with `prev`.
    pub fn rebuild(
        prev: &Records,
        state: &State,
        node: &str,
        link_exists: &dyn Fn(&str) -> bool,
        dirty: &Dirty,
    ) -> Records {
        let mut records = Records::default();
        // Which containers here are on which networks changes only with
        // this node's endpoints.
        let local = |e: &Option<crate::model::Endpoint>| {
            e.as_ref().is_some_and(
                |e| matches!(&e.location, Location::Container { node: n, .. } if n == node),
            )
        };
        let scopes_changed = match dirty {
            Dirty::All => true,
            Dirty::Some {
                networks,
                endpoints,
            } => {
                !networks.is_empty()
                    || endpoints
                        .values()
                        .flatten()
                        .any(|c| local(&c.before) || local(&c.after))
            }
        };
        if scopes_changed {
            let mut scopes: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for ep in &state.endpoints {
                if let Location::Container {
                    node: n, netns: ns, ..
                } = &ep.location
                    && n == node
                {
                    let scope = scopes.entry(namespace_key(ns)).or_default();
                    if !scope.contains(&ep.network) {
                        scope.push(ep.network.clone());
                        scope.sort();
                    }
                }
            }
            records.scopes = Arc::new(scopes);
        } else {
            records.scopes = prev.scopes.clone();
        }
        let served: std::collections::BTreeSet<&String> =
            records.scopes.values().flatten().collect();
        // Which nodes' endpoints are reachable (known and alive), looked up
        // once per node rather than once per endpoint.
        let live_nodes: HashMap<&str, bool> = state
            .nodes
            .keys()
            .map(|n| (n.as_str(), state.is_alive(n)))
            .collect();
        let reachable = |ep: &crate::model::Endpoint| match &ep.location {
            Location::Container {
                node: n,
                host_ifname,
                ..
            } if n == node => link_exists(host_ifname),
            // As `State::vtep_of`: a known node that is alive.
            Location::Container { node: n, .. } => {
                live_nodes.get(n.as_str()).copied().unwrap_or(false)
            }
            Location::Reserved { .. } => false,
            Location::Static { .. } => true,
        };
        let mut fresh: BTreeMap<&str, NetworkRecords> = BTreeMap::new();
        for name in served {
            let Some(net) = state.networks.get(name) else {
                continue;
            };
            match prev.networks.get(name) {
                Some(kept) if !dirty.covers(name) => {
                    let mut kept = kept.clone();
                    let changes = dirty.endpoints_of(name);
                    if !changes.is_empty() {
                        // Copied only if the resolver still holds it.
                        let net = Arc::make_mut(&mut kept);
                        for c in changes {
                            if let Some(before) = &c.before {
                                net.remove(before);
                            }
                            if let Some(after) = c.after.as_ref().filter(|e| reachable(e)) {
                                net.add(after);
                            }
                        }
                    }
                    records.networks.insert(name.clone(), kept);
                }
                _ => {
                    fresh.insert(
                        name,
                        NetworkRecords {
                            subnets: net.subnets.iter().map(|p| p.subnet).collect(),
                            ..NetworkRecords::default()
                        },
                    );
                }
            }
        }
        if fresh.is_empty() {
            return records;
        }
        for ep in &state.endpoints {
            let Some(net) = fresh.get_mut(ep.network.as_str()) else {
                continue;
            };
            if reachable(ep) {
                net.add(ep);
            }
        }
        for (name, net) in fresh {
            records.networks.insert(name.to_owned(), Arc::new(net));
        }
        records
    }

    /// The namespaces (paths) of this node's containers.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.scopes.keys().map(String::as_str)
    }

    /// The network charged with what namespace `ns` asks that no network
    /// answers: the first of its networks by name.
    pub fn home(&self, ns: &str) -> Option<&str> {
        self.scopes.get(ns)?.first().map(String::as_str)
    }

    /// How to answer `qtype` for `name` asked from namespace `ns`; `None`
    /// when `ns` is no container of this node (any more).
    ///
    /// A name of an endpoint on one of the asker's networks (or
    /// `NAME.NETWORK`) is answered from the records; so is the reverse
    /// name of an address in one of their subnets. Any other single-label
    /// name gets NXDOMAIN (no other network's names leak, and no resolver
    /// outside knows single labels); everything else is forwarded.
    pub fn resolve(&self, ns: &str, name: &Name, qtype: RecordType) -> Option<Resolution> {
        let scope = self.scopes.get(ns)?;
        let in_scope = || {
            scope
                .iter()
                .filter_map(|n| Some((n.as_str(), &**self.networks.get(n)?)))
        };
        if let Some(ip) = reverse_ipv4(name) {
            return Some(self.resolve_reverse(in_scope(), name, qtype, ip));
        }
        let wanted = name.to_ascii().to_ascii_lowercase();
        let wanted = wanted.strip_suffix('.').unwrap_or(&wanted);
        if wanted.is_empty() {
            return Some(Resolution::Forward);
        }
        for (network, records) in in_scope() {
            if let Some(ips) = records.by_name.get(wanted) {
                return Some(address_answer(network, name, qtype, ips));
            }
        }
        for (network, records) in in_scope() {
            let suffix = format!(".{}", network.to_ascii_lowercase());
            if let Some(host) = wanted.strip_suffix(&suffix) {
                return Some(match records.by_name.get(host) {
                    Some(ips) => address_answer(network, name, qtype, ips),
                    None => nxdomain(network),
                });
            }
        }
        if !wanted.contains('.') {
            return Some(nxdomain(scope.first().map_or("", String::as_str)));
        }
        Some(Resolution::Forward)
    }

    fn resolve_reverse<'a>(
        &self,
        mut scope: impl Iterator<Item = (&'a str, &'a NetworkRecords)>,
        name: &Name,
        qtype: RecordType,
        ip: Ipv4Addr,
    ) -> Resolution {
        let Some((network, records)) =
            scope.find(|(_, r)| r.subnets.iter().any(|s| s.contains(ip)))
        else {
            return Resolution::Forward;
        };
        let Some(host) = records.by_ip.get(&ip) else {
            return nxdomain(network);
        };
        let answers = match (qtype, Name::from_ascii(format!("{host}."))) {
            (RecordType::PTR | RecordType::ANY, Ok(target)) => vec![Record::from_rdata(
                name.clone(),
                RECORD_TTL,
                RData::PTR(PTR(target)),
            )],
            _ => Vec::new(),
        };
        Resolution::Local {
            network: network.to_owned(),
            code: ResponseCode::NoError,
            answers,
        }
    }
}

/// The key of a container namespace: its path, as `ovl connect` and the
/// front ends name it (a name under /run/netns, or a path).
pub fn namespace_key(netns: &str) -> String {
    netns::path_of(netns).display().to_string()
}

fn address_answer(network: &str, name: &Name, qtype: RecordType, ips: &[Ipv4Addr]) -> Resolution {
    let answers = match qtype {
        RecordType::A | RecordType::ANY => ips
            .iter()
            .map(|ip| Record::from_rdata(name.clone(), RECORD_TTL, RData::A(A(*ip))))
            .collect(),
        // The name exists, without records of that type (NODATA): ovl's
        // networks are IPv4 only.
        _ => Vec::new(),
    };
    Resolution::Local {
        network: network.to_owned(),
        code: ResponseCode::NoError,
        answers,
    }
}

fn nxdomain(network: &str) -> Resolution {
    Resolution::Local {
        network: network.to_owned(),
        code: ResponseCode::NXDomain,
        answers: Vec::new(),
    }
}

/// The address of a full `d.c.b.a.in-addr.arpa.` name.
fn reverse_ipv4(name: &Name) -> Option<Ipv4Addr> {
    let mut fqdn = name.clone();
    fqdn.set_fqdn(true);
    match fqdn.parse_arpa_name().ok()? {
        ipnet::IpNet::V4(net) if net.prefix_len() == 32 => Some(net.addr()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    const ME: &str = "host-a";

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    /// Two networks; `client` (host-a) on blue only, `web` (host-b) on
    /// blue with alias `www`, `db` (host-b) on red, `other` (host-a) on red.
    fn world() -> State {
        let mut s = State::default();
        for (name, subnet) in [("blue", "198.18.0.0/24"), ("red", "198.18.1.0/24")] {
            s.create_network(NetworkSpec::new(name, subnet.parse().unwrap()))
                .unwrap();
        }
        let mut add = |net: &str, node: &str, ns: &str, name: &str| {
            s.add_container(ContainerSpec {
                network: net.into(),
                node: node.into(),
                netns: ns.into(),
                name: Some(name.into()),
                ip: None,
                owner: None,
                subnet: None,
            })
            .unwrap()
        };
        add("blue", ME, "c-client", "client");
        let web = add("blue", "host-b", "c-web", "web");
        add("red", "host-b", "c-db", "db");
        add("red", ME, "c-other", "other");
        s.set_names("blue", web.ip, None, vec!["www".into()])
            .unwrap();
        s.register_node(ME, Ipv4Addr::new(192, 0, 2, 10), None);
        s.register_node("host-b", Ipv4Addr::new(198, 51, 100, 10), None);
        s
    }

    fn records(s: &State) -> Records {
        Records::build(s, ME, &|_| true)
    }

    fn client() -> String {
        namespace_key("c-client")
    }

    fn ips(r: &Resolution) -> Vec<Ipv4Addr> {
        match r {
            Resolution::Local { answers, .. } => answers
                .iter()
                .filter_map(|a| match a.data {
                    RData::A(A(ip)) => Some(ip),
                    _ => None,
                })
                .collect(),
            Resolution::Forward => panic!("forwarded"),
        }
    }

    fn code(r: &Resolution) -> ResponseCode {
        match r {
            Resolution::Local { code, .. } => *code,
            Resolution::Forward => panic!("forwarded"),
        }
    }

    #[test]
    fn names_and_aliases_of_the_askers_networks_resolve_on_any_host() {
        let r = records(&world());
        let web = Ipv4Addr::new(198, 18, 0, 3);
        for q in ["web.", "WEB", "www.", "web.blue.", "Www.Blue"] {
            let got = r.resolve(&client(), &n(q), RecordType::A).unwrap();
            assert_eq!(ips(&got), vec![web], "{q}");
            assert!(matches!(&got, Resolution::Local { network, .. } if network == "blue"));
        }
        let aaaa = r.resolve(&client(), &n("web."), RecordType::AAAA).unwrap();
        assert_eq!(code(&aaaa), ResponseCode::NoError);
        assert!(ips(&aaaa).is_empty(), "NODATA for AAAA");
    }

    #[test]
    fn names_of_other_networks_are_nxdomain_and_never_forwarded() {
        let r = records(&world());
        for q in ["db.", "other.", "nosuch.", "db.blue."] {
            let got = r.resolve(&client(), &n(q), RecordType::A).unwrap();
            assert_eq!(code(&got), ResponseCode::NXDomain, "{q}");
        }
        // From red, db resolves and web does not.
        let other = namespace_key("c-other");
        assert_eq!(
            ips(&r.resolve(&other, &n("db."), RecordType::A).unwrap()),
            vec![Ipv4Addr::new(198, 18, 1, 2)]
        );
        assert_eq!(
            code(&r.resolve(&other, &n("web."), RecordType::A).unwrap()),
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn other_dotted_names_are_forwarded() {
        let r = records(&world());
        for q in ["example.com.", "db.red.", "."] {
            assert_eq!(
                r.resolve(&client(), &n(q), RecordType::A),
                Some(Resolution::Forward),
                "{q}"
            );
        }
    }

    #[test]
    fn reverse_names_of_the_askers_subnets_are_answered() {
        let r = records(&world());
        let ptr = r
            .resolve(&client(), &n("3.0.18.198.in-addr.arpa."), RecordType::PTR)
            .unwrap();
        let Resolution::Local { answers, code, .. } = &ptr else {
            panic!("{ptr:?}")
        };
        assert_eq!(*code, ResponseCode::NoError);
        assert_eq!(answers[0].data, RData::PTR(PTR(n("web."))));
        assert_eq!(
            code_of(&r, "99.0.18.198.in-addr.arpa."),
            ResponseCode::NXDomain,
            "a free address of the subnet"
        );
        // Another network's subnet and the world outside are forwarded.
        for q in ["2.1.18.198.in-addr.arpa.", "1.2.0.192.in-addr.arpa."] {
            assert_eq!(
                r.resolve(&client(), &n(q), RecordType::PTR),
                Some(Resolution::Forward),
                "{q}"
            );
        }
    }

    fn code_of(r: &Records, q: &str) -> ResponseCode {
        code(&r.resolve(&client(), &n(q), RecordType::PTR).unwrap())
    }

    #[test]
    fn unreachable_endpoints_are_not_answered() {
        let mut s = world();
        // host-b's agent is gone (etcd lease expired).
        s.alive = Some(BTreeSet::from([ME.to_owned()]));
        let r = records(&s);
        assert_eq!(
            code(&r.resolve(&client(), &n("web."), RecordType::A).unwrap()),
            ResponseCode::NXDomain
        );
        // A local endpoint answers once its veth exists.
        let s = world();
        let none = Records::build(&s, ME, &|_| false);
        assert_eq!(
            code(
                &none
                    .resolve(&client(), &n("client."), RecordType::A)
                    .unwrap()
            ),
            ResponseCode::NXDomain
        );
        assert_eq!(
            ips(&records(&s)
                .resolve(&client(), &n("client."), RecordType::A)
                .unwrap()),
            vec![Ipv4Addr::new(198, 18, 0, 2)]
        );
    }

    #[test]
    fn only_local_containers_are_served_each_with_its_networks() {
        let r = records(&world());
        let mut ns: Vec<&str> = r.namespaces().collect();
        ns.sort();
        assert_eq!(ns, vec![client(), namespace_key("c-other")]);
        assert_eq!(r.home(&client()), Some("blue"));
        assert!(
            r.resolve(&namespace_key("c-web"), &n("web."), RecordType::A)
                .is_none()
        );
    }

    #[test]
    fn a_rebuild_makes_only_the_changed_networks_and_equals_a_build() {
        let mut s = world();
        let before = records(&s);
        s.set_names("red", s.endpoints[2].ip, None, vec!["database".into()])
            .unwrap();
        let red = Dirty::networks(["red"]);
        let after = Records::rebuild(&before, &s, ME, &|_| true, &red);
        assert_eq!(after, records(&s));
        // Blue's records are the very same, red's are new.
        assert!(Arc::ptr_eq(
            &before.networks["blue"],
            &after.networks["blue"]
        ));
        assert!(!Arc::ptr_eq(
            &before.networks["red"],
            &after.networks["red"]
        ));
        let other = namespace_key("c-other");
        let asked = after
            .resolve(&other, &n("database"), RecordType::A)
            .unwrap();
        assert_eq!(ips(&asked), vec![s.endpoints[2].ip]);
        // The last local container leaves red: red is no longer served.
        s.remove_container("red", ME, "c-other").unwrap();
        let gone = Records::rebuild(&after, &s, ME, &|_| true, &red);
        assert_eq!(gone, records(&s));
        assert!(!gone.networks.contains_key("red"));
    }

    /// The dirty set of endpoint changes from `before` to `after` (what
    /// the follower's change log gives the agent).
    fn endpoint_changes(before: &State, after: &State) -> Dirty {
        let mut endpoints: BTreeMap<String, Vec<crate::store::EndpointChange>> = BTreeMap::new();
        let key = |e: &crate::model::Endpoint| (e.network.clone(), e.ip);
        let keys: BTreeSet<(String, Ipv4Addr)> = before
            .endpoints
            .iter()
            .chain(&after.endpoints)
            .map(key)
            .collect();
        for (network, ip) in keys {
            let find = |s: &State| {
                s.endpoints
                    .iter()
                    .find(|e| e.network == network && e.ip == ip)
                    .cloned()
            };
            let (b, a) = (find(before), find(after));
            if b != a {
                endpoints
                    .entry(network.clone())
                    .or_default()
                    .push(crate::store::EndpointChange {
                        ip,
                        before: b,
                        after: a,
                    });
            }
        }
        Dirty::Some {
            networks: BTreeSet::new(),
            endpoints,
        }
    }

    #[test]
    fn records_follow_endpoint_changes_as_a_build_would() {
        let mut s = world();
        let mut r = records(&s);
        type Step = (&'static str, fn(&mut State));
        let steps: [Step; 4] = [
            ("db renamed", |s| {
                let db = s.endpoints[2].ip;
                s.set_names("red", db, Some("database".into()), vec!["pg".into()])
                    .unwrap();
            }),
            ("a remote endpoint joins blue", |s| {
                s.add_container(ContainerSpec {
                    network: "blue".into(),
                    node: "host-b".into(),
                    netns: "c-cache".into(),
                    name: Some("cache".into()),
                    ip: None,
                    owner: None,
                    subnet: None,
                })
                .map(drop)
                .unwrap();
            }),
            ("web leaves", |s| {
                s.remove_container("blue", "host-b", "c-web")
                    .map(drop)
                    .unwrap();
            }),
            ("the last local container on red leaves", |s| {
                s.remove_container("red", ME, "c-other").map(drop).unwrap();
            }),
        ];
        for (what, step) in steps {
            let before = s.clone();
            step(&mut s);
            let dirty = endpoint_changes(&before, &s);
            let next = Records::rebuild(&r, &s, ME, &|_| true, &dirty);
            assert_eq!(next, records(&s), "after: {what}");
            r = next;
        }
        assert!(!r.networks.contains_key("red"));
        let asked = r.resolve(&client(), &n("cache"), RecordType::A).unwrap();
        assert_eq!(ips(&asked).len(), 1);
        assert_eq!(code_of(&r, "web"), ResponseCode::NXDomain);
    }
}
