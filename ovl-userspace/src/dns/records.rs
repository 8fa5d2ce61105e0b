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
    /// Lower-case name or alias → addresses, in address order: several
    /// when endpoints share an alias, or one's name is another's alias
    /// (the server answers them in turns).
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
                // A shared alias: its addresses in a fixed order.
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
    /// Local container namespace (its path) → what it may ask about
    /// (shared too: it changes only with local endpoints and networks).
    scopes: Arc<BTreeMap<String, Scope>>,
}

/// What one local container namespace may ask about.
#[derive(Debug, Default, PartialEq, Eq)]
struct Scope {
    /// The networks it is on, by name order.
    networks: Vec<String>,
    /// Whether names that are not ovl's are forwarded upstream: only when
    /// one of its networks leads out of the overlay. A container on
    /// `--internal` networks only has no way out, and its resolver must
    /// not be one (a question forwarded for it carries data out, and the
    /// answer brings data in: Docker's CVE-2024-29018); such questions
    /// are REFUSED.
    forwards: bool,
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
    /// Not ovl's to answer, and the asker may not reach the world
    /// ([`Scope::forwards`]): REFUSED, charged to `network`.
    Refused { network: String },
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
            let mut scopes: BTreeMap<String, Scope> = BTreeMap::new();
            for ep in &state.endpoints {
                if let Location::Container {
                    node: n, netns: ns, ..
                } = &ep.location
                    && n == node
                {
                    let scope = scopes.entry(namespace_key(ns)).or_default();
                    if !scope.networks.contains(&ep.network) {
                        scope.networks.push(ep.network.clone());
                        scope.networks.sort();
                    }
                    // A network the state does not hold leads nowhere.
                    scope.forwards |= state
                        .networks
                        .get(&ep.network)
                        .is_some_and(|net| !net.internal);
                }
            }
            records.scopes = Arc::new(scopes);
        } else {
            records.scopes = prev.scopes.clone();
        }
        let served: std::collections::BTreeSet<&String> = records
            .scopes
            .values()
            .flat_map(|s| s.networks.iter())
            .collect();
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
        self.scopes.get(ns)?.networks.first().map(String::as_str)
    }

    /// How a question from namespace `ns` that is not ovl's to answer is
    /// answered: forwarded upstream, or REFUSED when none of its networks
    /// leads out of the overlay; `None` when `ns` is no container of this
    /// node (any more).
    pub fn not_ours(&self, ns: &str) -> Option<Resolution> {
        let scope = self.scopes.get(ns)?;
        Some(if scope.forwards {
            Resolution::Forward
        } else {
            Resolution::Refused {
                network: self.home(ns).unwrap_or_default().to_owned(),
            }
        })
    }

    /// How to answer `qtype` for `name` asked from namespace `ns`; `None`
    /// when `ns` is no container of this node (any more).
    ///
    /// A name of an endpoint on one of the asker's networks (or
    /// `NAME.NETWORK`) is answered from the records; so is the reverse
    /// name of an address in one of their subnets. An address question
    /// (A, AAAA, ANY) for any other single-label name gets NXDOMAIN (no
    /// other network's names leak, and no resolver outside has hosts of
    /// one label); everything else is not ovl's ([`Records::not_ours`]):
    /// `NAME.NETWORK` with a NAME the network lacks too, so a network
    /// named like a domain (`dev`, `example.com`) hides none of its names.
    pub fn resolve(&self, ns: &str, name: &Name, qtype: RecordType) -> Option<Resolution> {
        let scope = self.scopes.get(ns)?;
        let in_scope = || {
            scope
                .networks
                .iter()
                .filter_map(|n| Some((n.as_str(), &**self.networks.get(n)?)))
        };
        if let Some(ip) = reverse_ipv4(name)
            && let Some(answer) = self.resolve_reverse(in_scope(), name, qtype, ip)
        {
            return Some(answer);
        }
        let wanted = name.to_ascii().to_ascii_lowercase();
        let wanted = wanted.strip_suffix('.').unwrap_or(&wanted);
        if wanted.is_empty() {
            return self.not_ours(ns);
        }
        for (network, records) in in_scope() {
            if let Some(ips) = records.by_name.get(wanted) {
                return Some(address_answer(network, name, qtype, ips));
            }
        }
        for (network, records) in in_scope() {
            let suffix = format!(".{}", network.to_ascii_lowercase());
            if let Some(ips) = wanted
                .strip_suffix(&suffix)
                .and_then(|host| records.by_name.get(host))
            {
                return Some(address_answer(network, name, qtype, ips));
            }
        }
        if !wanted.contains('.')
            && matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::ANY)
        {
            return Some(nxdomain(self.home(ns).unwrap_or_default()));
        }
        self.not_ours(ns)
    }

    fn resolve_reverse<'a>(
        &self,
        mut scope: impl Iterator<Item = (&'a str, &'a NetworkRecords)>,
        name: &Name,
        qtype: RecordType,
        ip: Ipv4Addr,
    ) -> Option<Resolution> {
        let (network, records) = scope.find(|(_, r)| r.subnets.iter().any(|s| s.contains(ip)))?;
        let Some(host) = records.by_ip.get(&ip) else {
            return Some(nxdomain(network));
        };
        let answers = match (qtype, Name::from_ascii(format!("{host}."))) {
            (RecordType::PTR | RecordType::ANY, Ok(target)) => vec![Record::from_rdata(
                name.clone(),
                RECORD_TTL,
                RData::PTR(PTR(target)),
            )],
            _ => Vec::new(),
        };
        Some(Resolution::Local {
            network: network.to_owned(),
            code: ResponseCode::NoError,
            answers,
        })
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

/// The address of a full `d.c.b.a.in-addr.arpa.` name, written as the
/// address's own reverse name is (no leading zeros: `03.0.18.198` is
/// another name, not ovl's to answer).
fn reverse_ipv4(name: &Name) -> Option<Ipv4Addr> {
    let mut fqdn = name.clone();
    fqdn.set_fqdn(true);
    match fqdn.parse_arpa_name().ok()? {
        ipnet::IpNet::V4(net) if net.prefix_len() == 32 && Name::from(net.addr()) == fqdn => {
            Some(net.addr())
        }
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
        add(&mut s, "blue", ME, "c-client", "client");
        let web = add(&mut s, "blue", "host-b", "c-web", "web");
        add(&mut s, "red", "host-b", "c-db", "db");
        add(&mut s, "red", ME, "c-other", "other");
        s.set_names("blue", web.ip, None, vec!["www".into()])
            .unwrap();
        s.register_node(ME, Ipv4Addr::new(192, 0, 2, 10), None);
        s.register_node("host-b", Ipv4Addr::new(198, 51, 100, 10), None);
        s
    }

    /// Connects container `name` (namespace `ns`, on `node`) to `net`.
    fn add(s: &mut State, net: &str, node: &str, ns: &str, name: &str) -> crate::model::Endpoint {
        s.add_container(ContainerSpec {
            ports: Vec::new(),
            attacher: None,
            network: net.into(),
            node: node.into(),
            netns: ns.into(),
            name: Some(name.into()),
            ip: None,
            owner: None,
            subnet: None,
            mac: None,
        })
        .unwrap()
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
            other => panic!("not answered: {other:?}"),
        }
    }

    fn code(r: &Resolution) -> ResponseCode {
        match r {
            Resolution::Local { code, .. } => *code,
            other => panic!("not answered: {other:?}"),
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
        for q in ["db.", "other.", "nosuch."] {
            let got = r.resolve(&client(), &n(q), RecordType::A).unwrap();
            assert_eq!(code(&got), ResponseCode::NXDomain, "{q}");
        }
        // NAME.NETWORK with a NAME the network lacks is any dotted name:
        // upstream's to answer, and nothing of red's.
        assert_eq!(
            r.resolve(&client(), &n("db.blue."), RecordType::A),
            Some(Resolution::Forward)
        );
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
    fn single_labels_get_nxdomain_for_addresses_only() {
        let r = records(&world());
        for t in [RecordType::A, RecordType::AAAA, RecordType::ANY] {
            let got = r.resolve(&client(), &n("nosuch."), t).unwrap();
            assert_eq!(code(&got), ResponseCode::NXDomain, "{t}");
        }
        // A top-level domain's own records are the world's.
        for (q, t) in [("com.", RecordType::NS), ("dev.", RecordType::DS)] {
            assert_eq!(
                r.resolve(&client(), &n(q), t),
                Some(Resolution::Forward),
                "{q} {t}"
            );
        }
    }

    #[test]
    fn a_network_named_like_a_domain_hides_none_of_its_names() {
        let mut s = State::default();
        s.create_network(NetworkSpec::new("dev", "198.18.2.0/24".parse().unwrap()))
            .unwrap();
        add(&mut s, "dev", ME, "c-dev", "api");
        s.register_node(ME, Ipv4Addr::new(192, 0, 2, 10), None);
        let r = records(&s);
        let ns = namespace_key("c-dev");
        assert_eq!(
            ips(&r.resolve(&ns, &n("api.dev."), RecordType::A).unwrap()),
            vec![Ipv4Addr::new(198, 18, 2, 2)]
        );
        assert_eq!(
            r.resolve(&ns, &n("pkg.go.dev."), RecordType::A),
            Some(Resolution::Forward)
        );
    }

    /// `world()` with a third network, `sealed` (`--internal`), and two
    /// containers of host-a on it: `alone` on it only, `both` on it and
    /// on blue.
    fn with_internal_network() -> State {
        let mut s = world();
        let mut spec = NetworkSpec::new("sealed", "198.18.3.0/24".parse().unwrap());
        spec.internal = true;
        s.create_network(spec).unwrap();
        for (net, ns, name) in [
            ("sealed", "c-alone", "alone"),
            ("sealed", "c-both", "both"),
            ("blue", "c-both", "both-blue"),
        ] {
            add(&mut s, net, ME, ns, name);
        }
        s
    }

    #[test]
    fn containers_on_internal_networks_only_get_nothing_forwarded() {
        let r = records(&with_internal_network());
        let alone = namespace_key("c-alone");
        let refused = Some(Resolution::Refused {
            network: "sealed".into(),
        });
        // Whatever would go upstream: a dotted name, the root, a reverse
        // name outside its subnets, another name of another type.
        for (q, t) in [
            ("data.exfil.example.", RecordType::TXT),
            ("example.com.", RecordType::A),
            (".", RecordType::NS),
            ("1.2.0.192.in-addr.arpa.", RecordType::PTR),
            ("com.", RecordType::NS),
        ] {
            assert_eq!(r.resolve(&alone, &n(q), t), refused, "{q} {t}");
        }
        assert_eq!(r.not_ours(&alone), refused, "another class");
        // Its own network's names still resolve; unknown ones are NXDOMAIN.
        assert_eq!(
            ips(&r.resolve(&alone, &n("both."), RecordType::A).unwrap()),
            vec![Ipv4Addr::new(198, 18, 3, 3)]
        );
        assert_eq!(
            code(&r.resolve(&alone, &n("nosuch."), RecordType::A).unwrap()),
            ResponseCode::NXDomain
        );
        // A container that is on a network with a way out as well is
        // forwarded for, as Docker does.
        let both = namespace_key("c-both");
        assert_eq!(
            r.resolve(&both, &n("example.com."), RecordType::A),
            Some(Resolution::Forward)
        );
        assert_eq!(r.not_ours(&both), Some(Resolution::Forward));
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
            code_of(&r, "3.0.18.198.IN-ADDR.ARPA."),
            ResponseCode::NoError,
            "names are case-insensitive"
        );
        assert_eq!(
            code_of(&r, "99.0.18.198.in-addr.arpa."),
            ResponseCode::NXDomain,
            "a free address of the subnet"
        );
        // Another network's subnet, the world outside, and names that
        // only read as one of the subnet's addresses are forwarded.
        for q in [
            "2.1.18.198.in-addr.arpa.",
            "1.2.0.192.in-addr.arpa.",
            "03.0.18.198.in-addr.arpa.",
            "3.00.18.198.in-addr.arpa.",
        ] {
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
                add(s, "blue", "host-b", "c-cache", "cache");
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
        assert_eq!(
            code(&r.resolve(&client(), &n("web"), RecordType::A).unwrap()),
            ResponseCode::NXDomain
        );
    }
}
