//! A followed state and what changed in it: a reader that last looked at
//! revision R copies only what changed after R, and learns which endpoints
//! and networks those were (the agent's apply at ten thousand endpoints
//! would otherwise copy and recompute all of them for every connect).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use crate::model::{Endpoint, State};

/// Endpoint keys a log remembers at most; past that its older half is
/// forgotten (a reader that far behind takes the whole state).
const MAX_LOGGED_ENDPOINTS: usize = 16_384;

/// The latest state a subscription saw, with its change log.
#[derive(Clone, Debug, Default)]
pub struct Followed {
    pub state: State,
    pub changes: ChangeLog,
}

impl Followed {
    /// A state read whole at its revision: a reader at any other revision
    /// takes all of it.
    pub fn whole(state: State) -> Followed {
        Followed {
            changes: ChangeLog::since(state.revision),
            state,
        }
    }

    /// A state read whole that replaced one of its own revision or a
    /// later one (the store started its revisions over): every reader
    /// takes it whole, whatever its revision.
    pub fn replacing(state: State) -> Followed {
        Followed {
            changes: ChangeLog::since(state.revision + 1),
            state,
        }
    }
}

/// Which part of the state a key's change touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part<'a> {
    /// A network's record.
    Network(&'a str),
    /// One endpoint of a network.
    Endpoint(&'a str, Ipv4Addr),
    /// Nodes, their liveness or the cluster's settings: what every
    /// network's view depends on.
    Nodes,
    /// Addresses held back, conflicts: no node's maps or names.
    Other,
    /// Nothing decoded (derived keys, unknown keys).
    Nothing,
}

/// Store revision of the last change to each part, complete after
/// `since`.
#[derive(Clone, Debug, Default)]
pub struct ChangeLog {
    /// Changes after this revision are all recorded; a reader at an older
    /// revision must take the whole state.
    pub since: u64,
    /// Network name → revision of its record's last change (also when
    /// deleted).
    pub networks: HashMap<String, u64>,
    /// (network, address) → revision of the endpoint's last change.
    pub endpoints: HashMap<(String, Ipv4Addr), u64>,
    /// Revision of the last change to a [`Part::Nodes`] key.
    pub nodes: u64,
    /// Revision of the last change to a [`Part::Other`] key.
    pub other: u64,
}

impl ChangeLog {
    /// An empty log, complete after `revision`.
    pub fn since(revision: u64) -> ChangeLog {
        ChangeLog {
            since: revision,
            ..ChangeLog::default()
        }
    }

    /// Records that `part` changed at `revision`.
    pub fn touch(&mut self, part: Part<'_>, revision: u64) {
        match part {
            Part::Network(name) => match self.networks.get_mut(name) {
                Some(r) => *r = (*r).max(revision),
                None => {
                    self.networks.insert(name.to_owned(), revision);
                }
            },
            Part::Endpoint(network, ip) => {
                let r = self
                    .endpoints
                    .entry((network.to_owned(), ip))
                    .or_insert(revision);
                *r = (*r).max(revision);
                if self.endpoints.len() > MAX_LOGGED_ENDPOINTS {
                    self.forget_older_half();
                }
            }
            Part::Nodes => self.nodes = self.nodes.max(revision),
            Part::Other => self.other = self.other.max(revision),
            Part::Nothing => {}
        }
    }

    /// Forgets the older half of the endpoint entries (and network entries
    /// as old); the log is then complete only after the newest revision
    /// forgotten.
    fn forget_older_half(&mut self) {
        let mut revisions: Vec<u64> = self.endpoints.values().copied().collect();
        let middle = revisions.len() / 2;
        let (_, cut, _) = revisions.select_nth_unstable(middle);
        let cut = *cut;
        self.endpoints.retain(|_, r| *r > cut);
        self.networks.retain(|_, r| *r > cut);
        self.since = self.since.max(cut);
    }

    /// What a reader whose copy is at `revision` must take to reach `to`
    /// (the followed state's revision).
    pub fn after(&self, revision: u64, to: u64) -> Changed<'_> {
        // Older than the log, or newer than the state (the store's
        // revisions started over): only the whole state is right.
        if revision < self.since || revision > to {
            return Changed::Whole;
        }
        Changed::Parts {
            networks: self
                .networks
                .iter()
                .filter(|(_, r)| **r > revision)
                .map(|(n, _)| n.as_str())
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .filter(|(_, r)| **r > revision)
                .map(|((n, ip), _)| (n.as_str(), *ip))
                .collect(),
            nodes: self.nodes > revision,
            other: self.other > revision,
        }
    }
}

/// What changed after a reader's revision.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed<'a> {
    Whole,
    Parts {
        networks: Vec<&'a str>,
        endpoints: Vec<(&'a str, Ipv4Addr)>,
        nodes: bool,
        other: bool,
    },
}

/// One endpoint as a reader's copy had it and has it now (`None`: absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointChange {
    pub ip: Ipv4Addr,
    pub before: Option<Endpoint>,
    pub after: Option<Endpoint>,
}

/// What changed in a reader's copy: what it must look at again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dirty {
    /// Anything: a whole new state, nodes or their liveness (or, for the
    /// agent, its local links).
    All,
    /// Some networks and endpoints.
    Some {
        /// Networks to look at whole: their records changed, or they went.
        networks: BTreeSet<String>,
        /// Endpoints that changed in other networks, by network.
        endpoints: BTreeMap<String, Vec<EndpointChange>>,
    },
}

impl Dirty {
    /// Nothing but networks `names`, whole.
    pub fn networks<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Dirty {
        Dirty::Some {
            networks: names.into_iter().map(Into::into).collect(),
            endpoints: BTreeMap::new(),
        }
    }

    /// Whether network `name` must be looked at whole.
    pub fn covers(&self, name: &str) -> bool {
        match self {
            Dirty::All => true,
            Dirty::Some { networks, .. } => networks.contains(name),
        }
    }

    /// The endpoints of network `name` that changed (none when the network
    /// is covered whole).
    pub fn endpoints_of(&self, name: &str) -> &[EndpointChange] {
        match self {
            Dirty::All => &[],
            Dirty::Some { endpoints, .. } => endpoints.get(name).map_or(&[], Vec::as_slice),
        }
    }

    /// Names of the networks with changed endpoints.
    pub fn networks_with_endpoint_changes(&self) -> impl Iterator<Item = &str> {
        let names = match self {
            Dirty::All => None,
            Dirty::Some { endpoints, .. } => Some(endpoints.keys().map(String::as_str)),
        };
        names.into_iter().flatten()
    }

    /// Nothing changed that an apply would see.
    pub fn is_empty(&self) -> bool {
        matches!(self, Dirty::Some { networks, endpoints } if networks.is_empty() && endpoints.is_empty())
    }
}

/// Brings `mine` to the followed state, copying what changed after its
/// revision (all of it when there is no copy or the log does not reach
/// back to it), and says what that was. Endpoints copied move to the end
/// of the list: their order carries no meaning.
pub fn catch_up(mine: &mut Option<State>, theirs: &Followed) -> Dirty {
    let to = &theirs.state;
    let Some(copy) = mine.as_mut() else {
        *mine = Some(to.clone());
        return Dirty::All;
    };
    let Changed::Parts {
        networks,
        endpoints,
        nodes,
        other,
    } = theirs.changes.after(copy.revision, to.revision)
    else {
        *copy = to.clone();
        return Dirty::All;
    };
    let whole: BTreeSet<&str> = networks.into_iter().collect();
    let keys: HashSet<(&str, Ipv4Addr)> = endpoints
        .into_iter()
        .filter(|(n, _)| !whole.contains(n))
        .collect();
    // Addresses first, by binary search: this runs over every endpoint
    // (twice), and most are passed over on a number.
    let mut ips: Vec<Ipv4Addr> = keys.iter().map(|(_, ip)| *ip).collect();
    ips.sort_unstable();
    ips.dedup();
    let changed = |e: &Endpoint| {
        (!whole.is_empty() && whole.contains(e.network.as_str()))
            || (ips.binary_search(&e.ip).is_ok() && keys.contains(&(e.network.as_str(), e.ip)))
    };
    for name in &whole {
        match to.networks.get(*name) {
            Some(n) => {
                copy.networks.insert((*name).to_owned(), n.clone());
            }
            None => {
                copy.networks.remove(*name);
            }
        }
    }
    let mut changes: HashMap<(String, Ipv4Addr), EndpointChange> = HashMap::new();
    if !whole.is_empty() || !keys.is_empty() {
        for before in copy.endpoints.extract_if(.., |e| changed(e)) {
            if !whole.contains(before.network.as_str()) {
                changes.insert(
                    (before.network.clone(), before.ip),
                    EndpointChange {
                        ip: before.ip,
                        before: Some(before),
                        after: None,
                    },
                );
            }
        }
        for after in to.endpoints.iter().filter(|e| changed(e)) {
            copy.endpoints.push(after.clone());
            if !whole.contains(after.network.as_str()) {
                changes
                    .entry((after.network.clone(), after.ip))
                    .or_insert_with(|| EndpointChange {
                        ip: after.ip,
                        before: None,
                        after: None,
                    })
                    .after = Some(after.clone());
            }
        }
    }
    if nodes {
        copy.schema = to.schema;
        copy.nodes.clone_from(&to.nodes);
        copy.alive.clone_from(&to.alive);
        copy.cluster = to.cluster;
    }
    if other {
        copy.released.clone_from(&to.released);
        copy.conflicts.clone_from(&to.conflicts);
    }
    copy.revision = to.revision;
    if nodes {
        return Dirty::All;
    }
    let mut endpoints: BTreeMap<String, Vec<EndpointChange>> = BTreeMap::new();
    for ((network, _), change) in changes {
        // Logged but the same before and after (a key written with its
        // own value): nothing to look at.
        if change.before != change.after {
            endpoints.entry(network).or_default().push(change);
        }
    }
    Dirty::Some {
        networks: whole.into_iter().map(str::to_owned).collect(),
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    const IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);

    #[test]
    fn a_reader_takes_what_changed_after_its_revision() {
        let mut log = ChangeLog::since(10);
        log.touch(Part::Network("blue"), 11);
        log.touch(Part::Network("red"), 13);
        log.touch(Part::Endpoint("blue", IP), 12);
        log.touch(Part::Endpoint("red", IP), 14);
        log.touch(Part::Other, 12);
        log.touch(Part::Nothing, 14);
        assert_eq!(
            log.after(11, 14).sorted(),
            Changed::Parts {
                networks: vec!["red"],
                endpoints: vec![("blue", IP), ("red", IP)],
                nodes: false,
                other: true
            }
        );
        log.touch(Part::Nodes, 15);
        assert_eq!(
            log.after(14, 15),
            Changed::Parts {
                networks: vec![],
                endpoints: vec![],
                nodes: true,
                other: false
            }
        );
        assert_eq!(
            log.after(15, 15),
            Changed::Parts {
                networks: vec![],
                endpoints: vec![],
                nodes: false,
                other: false
            }
        );
    }

    impl Changed<'_> {
        fn sorted(self) -> Self {
            match self {
                Changed::Whole => Changed::Whole,
                Changed::Parts {
                    mut networks,
                    mut endpoints,
                    nodes,
                    other,
                } => {
                    networks.sort();
                    endpoints.sort();
                    Changed::Parts {
                        networks,
                        endpoints,
                        nodes,
                        other,
                    }
                }
            }
        }
    }

    #[test]
    fn a_reader_older_than_the_log_or_ahead_of_the_state_takes_it_whole() {
        let log = ChangeLog::since(10);
        assert_eq!(log.after(9, 12), Changed::Whole);
        assert_eq!(log.after(13, 12), Changed::Whole);
        assert_ne!(log.after(10, 12), Changed::Whole);
    }

    #[test]
    fn a_long_log_forgets_its_older_half_and_says_so() {
        let mut log = ChangeLog::since(0);
        for i in 0..=MAX_LOGGED_ENDPOINTS as u32 {
            log.touch(Part::Endpoint("blue", Ipv4Addr::from(i)), u64::from(i) + 1);
        }
        assert!(log.endpoints.len() <= MAX_LOGGED_ENDPOINTS / 2 + 1);
        let since = log.since;
        assert!(since > 0);
        // Whatever it forgot is older than `since`: a reader at or after
        // it misses nothing, one before it takes the whole state.
        assert!(log.endpoints.values().all(|r| *r > since));
        assert_eq!(log.after(since - 1, u64::MAX), Changed::Whole);
        assert_ne!(log.after(since, u64::MAX), Changed::Whole);
    }

    fn world() -> State {
        let mut s = State::default();
        for (name, vni, net) in [
            ("blue", 100, "198.18.0.0/24"),
            ("red", 200, "198.18.1.0/24"),
        ] {
            s.create_network(NetworkSpec {
                vni: Some(vni),
                ..NetworkSpec::new(name, net.parse().unwrap())
            })
            .unwrap();
        }
        s.register_node("a", Ipv4Addr::new(192, 0, 2, 10), None);
        s.register_node("b", Ipv4Addr::new(198, 51, 100, 10), None);
        s.alive = Some(["a".to_owned(), "b".to_owned()].into());
        for (net, node, ns) in [("blue", "a", "c1"), ("blue", "b", "c2"), ("red", "b", "c3")] {
            connect(&mut s, net, node, ns);
        }
        s.revision = 10;
        s
    }

    fn connect(s: &mut State, network: &str, node: &str, netns: &str) -> Endpoint {
        s.add_container(ContainerSpec {
            network: network.into(),
            node: node.into(),
            netns: netns.into(),
            ..ContainerSpec::default()
        })
        .unwrap()
    }

    /// The follower's state after `change` at revision `rev`, logged as
    /// touching what `change` returns.
    fn follow(f: &mut Followed, rev: u64, change: impl FnOnce(&mut State) -> Vec<Part<'static>>) {
        for p in change(&mut f.state) {
            f.changes.touch(p, rev);
        }
        f.state.revision = rev;
    }

    fn sorted(s: &State) -> State {
        let mut s = s.clone();
        s.endpoints
            .sort_by(|a, b| (&a.network, a.ip).cmp(&(&b.network, b.ip)));
        s
    }

    /// Network → (address, before, after) of a dirty set's changes.
    fn changes(d: &Dirty) -> Vec<(String, Ipv4Addr, bool, bool)> {
        let Dirty::Some { endpoints, .. } = d else {
            panic!("{d:?} is all");
        };
        let mut out: Vec<_> = endpoints
            .iter()
            .flat_map(|(n, cs)| {
                cs.iter()
                    .map(|c| (n.clone(), c.ip, c.before.is_some(), c.after.is_some()))
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_copy_takes_the_changed_endpoints_and_says_which_before_and_after() {
        let mut theirs = Followed::whole(world());
        let mut mine = None;
        assert_eq!(catch_up(&mut mine, &theirs), Dirty::All);

        let joined = {
            let mut s = theirs.state.clone();
            connect(&mut s, "red", "a", "c4").ip
        };
        follow(&mut theirs, 11, |s| {
            let e = connect(s, "red", "a", "c4");
            vec![Part::Endpoint("red", e.ip)]
        });
        let left = theirs
            .state
            .endpoints
            .iter()
            .find(|e| e.network == "blue" && e.node() == Some("b"))
            .unwrap()
            .ip;
        follow(&mut theirs, 12, move |s| {
            s.remove_container("blue", "b", "c2").unwrap();
            vec![Part::Endpoint("blue", left)]
        });
        let dirty = catch_up(&mut mine, &theirs);
        assert_eq!(
            changes(&dirty),
            vec![
                ("blue".to_owned(), left, true, false),
                ("red".to_owned(), joined, false, true),
            ]
        );
        assert!(!dirty.covers("blue") && !dirty.endpoints_of("blue").is_empty());
        assert_eq!(sorted(mine.as_ref().unwrap()), sorted(&theirs.state));

        // Nothing new: nothing to look at.
        assert!(catch_up(&mut mine, &theirs).is_empty());

        // A network deleted goes with its endpoints, looked at whole.
        follow(&mut theirs, 13, move |s| {
            s.endpoints.retain(|e| e.network != "red");
            s.networks.remove("red");
            vec![Part::Network("red"), Part::Endpoint("red", joined)]
        });
        let dirty = catch_up(&mut mine, &theirs);
        assert_eq!(dirty, Dirty::networks(["red"]));
        assert_eq!(sorted(mine.as_ref().unwrap()), sorted(&theirs.state));
    }

    #[test]
    fn nodes_or_a_log_that_does_not_reach_back_make_everything_dirty() {
        let mut theirs = Followed::whole(world());
        let mut mine = None;
        catch_up(&mut mine, &theirs);
        follow(&mut theirs, 11, |s| {
            s.alive.as_mut().unwrap().remove("b");
            vec![Part::Nodes]
        });
        assert_eq!(catch_up(&mut mine, &theirs), Dirty::All);
        assert_eq!(mine.as_ref().unwrap().alive, theirs.state.alive);

        // Held back addresses and conflicts are copied, and dirty nothing.
        follow(&mut theirs, 12, |s| {
            s.conflicts.insert("b".into(), Vec::new());
            vec![Part::Other]
        });
        assert!(catch_up(&mut mine, &theirs).is_empty());
        assert_eq!(mine.as_ref().unwrap().conflicts, theirs.state.conflicts);

        // A re-list after the copy's revision: only a whole copy is right.
        let mut relisted = world();
        relisted.revision = 20;
        connect(&mut relisted, "red", "a", "c9");
        let theirs = Followed {
            state: relisted,
            changes: ChangeLog::since(20),
        };
        assert_eq!(catch_up(&mut mine, &theirs), Dirty::All);
        assert_eq!(mine.as_ref().unwrap(), &theirs.state);
    }

    #[test]
    fn a_copy_ahead_of_the_follower_is_replaced_whole() {
        // The store's revisions started over (a restored etcd): the copy's
        // revision is no guide to what it lacks.
        let mut mine = Some(world());
        mine.as_mut().unwrap().revision = 50;
        let theirs = Followed::whole(world());
        assert_eq!(catch_up(&mut mine, &theirs), Dirty::All);
        assert_eq!(mine.as_ref().unwrap(), &theirs.state);
    }
}
