//! What a change to one endpoint reads ([`Scope::Endpoint`]): a few keys
//! instead of its whole network, so that the bytes a connect moves do not
//! grow with the network or the cluster.
//!
//! The first read takes the network record, its held-back addresses, the
//! claims the change asks about (attachment, names), the endpoint at the
//! address it names and, when it picks an address, the network's taken
//! addresses as bare keys. Then, at the same revision, the closure: the
//! endpoint each claim read points at, and every claim of each endpoint
//! read, until nothing new turns up. So the model sees every holder of a
//! name or attachment it checks, and the commit plan sees every claim of
//! every endpoint it might rewrite or delete: a claim missing from the
//! snapshot is missing from the store.
//!
//! A network written by an ovl that kept no claims has fewer name claims
//! than endpoints: it is read whole instead, and its commits backfill the
//! claims a few at a time.
//!
//! [`Scope::Endpoint`]: crate::store::Scope::Endpoint

use super::{
    Range, Snapshot,
    codec::{
        CLUSTER_KEY, ENDPOINTS, NAMES, RELEASED, attachment_key, claims_of, endpoint_key,
        holder_of, is_index_key, name_key, network_key, node_key, parse, ports_prefix,
    },
};
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{capacity, model::Endpoint, store::Around};

/// Rounds of the closure at most: a claim, its endpoint, that endpoint's
/// other claims (and the endpoints of names held twice, which only an old
/// ovl wrote). Whatever a last round still misses is guarded as absent, so
/// the commit fails rather than overwrite it.
pub const MAX_ROUNDS: usize = 4;

/// How long a count of the store's endpoints stands in for a fresh one.
const TOTAL_FRESH: Duration = Duration::from_secs(1);

/// How far below the endpoint limit a count must be to stand in for a
/// fresh one: the cluster would have to add this many endpoints within
/// [`TOTAL_FRESH`] to cross into the guard band (`capacity::GUARD_MARGIN`)
/// unseen.
const TOTAL_HEADROOM: usize = 4 * capacity::GUARD_MARGIN;

/// The store's endpoint count as a process last read it. Counting a
/// prefix costs etcd a walk of every key under it (3.4 keeps no counts):
/// at 10k endpoints about 2 ms of its CPU, which at 100 connects a second
/// was a fifth of it, and growing with the cluster. A long-lived front end
/// (the Docker plugin in the agent, bench --scale's nodes) reuses a recent
/// count while the cluster is far from the limit; near it, every change
/// counts afresh.
#[derive(Clone, Default)]
pub struct Total(Arc<Mutex<Option<(i64, Instant)>>>);

impl Total {
    /// The last count, if recent and far from the limit.
    pub fn recent(&self) -> Option<i64> {
        let last = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (count, at) = last?;
        let far = usize::try_from(count).is_ok_and(|c| c + TOTAL_HEADROOM <= capacity::ENDPOINTS);
        (far && at.elapsed() < TOTAL_FRESH).then_some(count)
    }

    /// Records a count just read (`None`: the read had none).
    pub fn set(&self, count: Option<i64>) {
        if let Some(c) = count {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((c, Instant::now()));
        }
    }
}

/// What the first read of `a` takes.
pub fn first(a: &Around<'_>) -> Vec<Range> {
    let net = a.network;
    let mut out = vec![
        Range::Key(network_key(net)),
        Range::Prefix(format!("{RELEASED}{net}/")),
        // Capacity: the cluster's endpoints, counted.
        Range::Count(ENDPOINTS.into()),
        Range::Count(format!("{NAMES}{net}/")),
        if a.allocates {
            Range::Keys(format!("{ENDPOINTS}{net}/"))
        } else {
            Range::Count(format!("{ENDPOINTS}{net}/"))
        },
    ];
    if let Some((node, netns)) = a.attachment {
        out.push(Range::Key(attachment_key(net, node, netns)));
        // Every address's claim of each host port: one on every address
        // clashes with one on a single address.
        out.extend(a.ports.iter().map(|p| Range::Prefix(ports_prefix(node, p))));
        // The node's WireGuard port and the cluster's VXLAN port, which
        // no container may publish there.
        if !a.ports.is_empty() {
            out.push(Range::Key(node_key(node)));
            out.push(Range::Key(CLUSTER_KEY.into()));
        }
        // The name a container holds unless given one: a disconnect then
        // finds every claim of a default-named endpoint in its second
        // round, not its third.
        out.push(Range::Key(name_key(net, netns)));
    }
    out.extend(a.names.iter().map(|n| Range::Key(name_key(net, n))));
    if let Some(ip) = a.ip {
        out.push(Range::Key(endpoint_key(net, ip)));
    }
    out
}

/// Whether every endpoint of `network` can have its name claimed in `snap`
/// (read by [`first`]): each endpoint claims at least one name, so fewer
/// name claims than endpoints means an older ovl wrote some of them.
pub fn claims_complete(snap: &Snapshot, network: &str) -> bool {
    let count = |prefix: &str| snap.counts.get(&format!("{prefix}{network}/")).copied();
    match (count(NAMES), count(ENDPOINTS)) {
        (Some(names), Some(endpoints)) => names >= endpoints,
        _ => false,
    }
}

/// The keys `snap` points at but has not looked at: the endpoint of each
/// claim it holds, the claims of each endpoint it holds.
pub fn unread(snap: &Snapshot) -> Vec<Range> {
    let mut wanted = std::collections::BTreeSet::new();
    for (key, (value, _)) in &snap.kvs {
        if is_index_key(key) {
            wanted.extend(holder_of(key, value));
        } else if key.starts_with(ENDPOINTS)
            && let Ok(e) = parse::<Endpoint>(key, value)
        {
            wanted.extend(claims_of(&e));
        }
    }
    wanted
        .into_iter()
        .filter(|k| !snap.kvs.contains_key(k) && !snap.looked.contains(k))
        .map(Range::Key)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec, State};
    use crate::store::etcd::codec::encode;

    /// Container `netns` of `node` on network blue, named `name` if given.
    fn spec(node: &str, netns: &str, name: Option<&str>) -> ContainerSpec {
        ContainerSpec {
            ports: Vec::new(),
            attacher: None,
            network: "blue".into(),
            node: node.into(),
            netns: netns.into(),
            name: name.map(str::to_owned),
            ip: None,
            owner: None,
            subnet: None,
            mac: None,
        }
    }

    /// Network blue with endpoints c0..c{n} on node a, c0 named "web".
    fn blue(n: usize) -> State {
        let mut s = State::default();
        s.create_network(NetworkSpec::new("blue", "198.18.0.0/24".parse().unwrap()))
            .unwrap();
        for i in 0..n {
            s.add_container(spec("a", &format!("c{i}"), (i == 0).then_some("web")))
                .unwrap();
        }
        s
    }

    /// What etcd would answer to `ranges` over the store `state` encodes
    /// (the test's stand-in for [`super::super::EtcdStore::read_into`]).
    fn answer(state: &State, ranges: &[Range], snap: &mut Snapshot) {
        let kvs = encode(state);
        for r in ranges {
            match r {
                Range::Key(k) => {
                    snap.looked.insert(k.clone());
                    if let Some(v) = kvs.get(k) {
                        snap.kvs.insert(k.clone(), (v.clone(), 3));
                    }
                }
                Range::Prefix(p) => {
                    for (k, v) in kvs.range(p.clone()..).take_while(|(k, _)| k.starts_with(p)) {
                        snap.kvs.insert(k.clone(), (v.clone(), 3));
                    }
                }
                Range::Keys(p) | Range::Count(p) => {
                    let under: Vec<&String> =
                        kvs.keys().filter(|k| k.starts_with(p.as_str())).collect();
                    snap.counts.insert(p.clone(), under.len() as i64);
                    if matches!(r, Range::Keys(_)) {
                        snap.bare.extend(under.into_iter().cloned());
                    }
                }
            }
        }
    }

    /// The snapshot `a` ends with over `state`, and the rounds it took.
    fn read(state: &State, a: &Around<'_>) -> (Snapshot, usize) {
        let mut snap = Snapshot::default();
        answer(state, &first(a), &mut snap);
        let mut rounds = 1;
        loop {
            let more = unread(&snap);
            if more.is_empty() {
                return (snap, rounds);
            }
            answer(state, &more, &mut snap);
            rounds += 1;
            assert!(rounds <= MAX_ROUNDS, "the closure did not settle");
        }
    }

    #[test]
    fn a_new_container_reads_its_claims_and_the_taken_addresses_as_bare_keys() {
        let store = blue(50);
        let names = ["c50".to_owned()];
        let a = Around {
            network: "blue",
            attachment: Some(("a", "c50")),
            ip: None,
            names: &names,
            allocates: true,
            ports: &[],
        };
        let (snap, rounds) = read(&store, &a);
        assert_eq!(rounds, 1, "nothing points further");
        assert!(claims_complete(&snap, "blue"));
        let state = snap.state();
        assert!(state.endpoints.is_empty(), "no endpoint value read");
        assert_eq!(state.addresses_elsewhere["blue"].len(), 50);
        // The model hands out the next free address, not a taken one.
        let mut after = state.clone();
        let ep = after.add_container(spec("a", "c50", None)).unwrap();
        assert_eq!(ep.ip, "198.18.0.52".parse::<std::net::Ipv4Addr>().unwrap());
    }

    #[test]
    fn a_name_taken_brings_its_holder_so_the_model_refuses_it() {
        let store = blue(50);
        let names = ["WEB".to_owned()];
        let a = Around {
            network: "blue",
            attachment: Some(("b", "x")),
            ip: None,
            names: &names,
            allocates: true,
            ports: &[],
        };
        let (snap, rounds) = read(&store, &a);
        // The claim, then its endpoint (c0), then c0's other claims.
        assert_eq!(rounds, 3);
        let mut state = snap.state();
        assert_eq!(state.endpoints.len(), 1);
        let err = state
            .add_container(spec("b", "x", Some("WEB")))
            .unwrap_err();
        assert!(err.to_string().contains("web"), "{err}");
    }

    #[test]
    fn a_disconnect_reads_the_endpoint_and_every_claim_it_deletes() {
        let store = blue(50);
        let a = Around::container("blue", "a", "c0");
        let (snap, _) = read(&store, &a);
        let state = snap.state();
        assert_eq!(state.endpoints.len(), 1);
        let claims = claims_of(&state.endpoints[0]);
        assert_eq!(claims.len(), 2, "name web and the attachment");
        assert!(claims.iter().all(|c| snap.kvs.contains_key(c)));
        // Nothing else of the network's 50 endpoints came along.
        assert_eq!(
            snap.kvs.keys().filter(|k| k.starts_with(ENDPOINTS)).count(),
            1
        );
    }

    #[test]
    fn a_publishing_connect_reads_its_nodes_record_and_the_cluster_settings() {
        let names = ["c9".to_owned()];
        let ports = ["4789:1/udp".parse().unwrap()];
        let mut a = Around {
            network: "blue",
            attachment: Some(("a", "c9")),
            ip: None,
            names: &names,
            allocates: true,
            ports: &ports,
        };
        let reads = |a: &Around<'_>, key: &str| {
            first(a)
                .iter()
                .any(|r| matches!(r, Range::Key(k) if k == key))
        };
        assert!(reads(&a, "/ovl/nodes/a") && reads(&a, CLUSTER_KEY));
        a.ports = &[];
        assert!(
            !reads(&a, "/ovl/nodes/a"),
            "a connect without ports reads no more"
        );
    }

    #[test]
    fn a_port_published_on_the_node_brings_its_holder_from_another_network() {
        let mut store = blue(3);
        store
            .create_network(crate::model::NetworkSpec::new(
                "red",
                "198.18.0.0/24".parse().unwrap(),
            ))
            .unwrap();
        store
            .add_container(ContainerSpec {
                network: "red".into(),
                node: "a".into(),
                netns: "web".into(),
                ports: vec!["8080:80".parse().unwrap()],
                ..ContainerSpec::default()
            })
            .unwrap();
        let names = ["c9".to_owned()];
        let ports = ["192.0.2.10:8080:80".parse().unwrap()];
        let a = Around {
            network: "blue",
            attachment: Some(("a", "c9")),
            ip: None,
            names: &names,
            allocates: true,
            ports: &ports,
        };
        let (snap, _) = read(&store, &a);
        let mut state = snap.state();
        let err = state
            .add_container(ContainerSpec {
                ports: ports.to_vec(),
                ..spec("a", "c9", None)
            })
            .unwrap_err();
        assert!(
            matches!(&err, crate::model::ModelError::PortTaken { network, .. } if network == "red"),
            "{err}"
        );
    }

    #[test]
    fn a_count_stands_in_for_a_second_and_only_far_from_the_limit() {
        let total = Total::default();
        assert_eq!(total.recent(), None, "nothing counted yet");
        total.set(Some(10_000));
        assert_eq!(total.recent(), Some(10_000));
        total.set(Some((capacity::ENDPOINTS - TOTAL_HEADROOM + 1) as i64));
        assert_eq!(total.recent(), None, "near the limit: count afresh");
        *total.0.lock().unwrap() = Some((10, Instant::now() - TOTAL_FRESH));
        assert_eq!(total.recent(), None, "too old");
    }

    #[test]
    fn a_default_named_container_is_disconnected_after_two_rounds_of_reads() {
        let store = blue(50);
        let (snap, rounds) = read(&store, &Around::container("blue", "a", "c7"));
        assert_eq!(rounds, 2, "its claims, then its endpoint");
        assert_eq!(snap.state().endpoints.len(), 1);
    }

    #[test]
    fn a_network_an_older_ovl_wrote_without_claims_is_read_whole() {
        let store = blue(5);
        let a = Around::container("blue", "a", "c1");
        let mut snap = Snapshot::default();
        answer(&store, &first(&a), &mut snap);
        assert!(claims_complete(&snap, "blue"));
        // Without claims: five endpoints, no names claimed.
        let name_count = format!("{NAMES}blue/");
        snap.counts.insert(name_count, 0);
        assert!(!claims_complete(&snap, "blue"));
    }
}
