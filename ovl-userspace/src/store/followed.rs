//! A followed state and what changed in it: a reader that last looked at
//! revision R copies only the parts changed after R (the agent's apply at
//! ten thousand endpoints would otherwise copy and recompute all of them
//! for every connect).

use std::collections::{BTreeSet, HashMap};

use crate::model::State;

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
}

/// Which part of the state a key's change touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part<'a> {
    /// A network's record or one of its endpoints.
    Network(&'a str),
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
    /// Network name → revision of its last change (also when deleted).
    pub networks: HashMap<String, u64>,
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
            Part::Nodes => self.nodes = self.nodes.max(revision),
            Part::Other => self.other = self.other.max(revision),
            Part::Nothing => {}
        }
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
        nodes: bool,
        other: bool,
    },
}

/// What changed in a reader's copy: what it must look at again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dirty {
    /// Anything: a whole new state, nodes or their liveness (or, for the
    /// agent, its local links).
    All,
    /// Only these networks (their records or endpoints).
    Networks(BTreeSet<String>),
}

impl Dirty {
    /// Whether network `name` must be looked at again.
    pub fn covers(&self, name: &str) -> bool {
        match self {
            Dirty::All => true,
            Dirty::Networks(n) => n.contains(name),
        }
    }

    /// Nothing changed that an apply would see.
    pub fn is_empty(&self) -> bool {
        matches!(self, Dirty::Networks(n) if n.is_empty())
    }
}

/// Brings `mine` to the followed state, copying what changed after its
/// revision (all of it when there is no copy or the log does not reach
/// back to it). Endpoints of a changed network move to the end of the
/// list: their order carries no meaning.
pub fn catch_up(mine: &mut Option<State>, theirs: &Followed) -> Dirty {
    let to = &theirs.state;
    let Some(copy) = mine.as_mut() else {
        *mine = Some(to.clone());
        return Dirty::All;
    };
    let Changed::Parts {
        networks,
        nodes,
        other,
    } = theirs.changes.after(copy.revision, to.revision)
    else {
        *copy = to.clone();
        return Dirty::All;
    };
    let networks: BTreeSet<&str> = networks.into_iter().collect();
    if !networks.is_empty() {
        for name in &networks {
            match to.networks.get(*name) {
                Some(n) => {
                    copy.networks.insert((*name).to_owned(), n.clone());
                }
                None => {
                    copy.networks.remove(*name);
                }
            }
        }
        copy.endpoints
            .retain(|e| !networks.contains(e.network.as_str()));
        copy.endpoints.extend(
            to.endpoints
                .iter()
                .filter(|e| networks.contains(e.network.as_str()))
                .cloned(),
        );
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
        Dirty::All
    } else {
        Dirty::Networks(networks.into_iter().map(str::to_owned).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    #[test]
    fn a_reader_takes_what_changed_after_its_revision() {
        let mut log = ChangeLog::since(10);
        log.touch(Part::Network("blue"), 11);
        log.touch(Part::Network("red"), 13);
        log.touch(Part::Other, 12);
        log.touch(Part::Nothing, 14);
        let Changed::Parts {
            mut networks,
            nodes,
            other,
        } = log.after(11, 14)
        else {
            panic!("within the log");
        };
        networks.sort();
        assert_eq!((networks, nodes, other), (vec!["red"], false, true));
        log.touch(Part::Nodes, 15);
        assert_eq!(
            log.after(14, 15),
            Changed::Parts {
                networks: vec![],
                nodes: true,
                other: false
            }
        );
        assert_eq!(
            log.after(15, 15),
            Changed::Parts {
                networks: vec![],
                nodes: false,
                other: false
            }
        );
    }

    #[test]
    fn a_reader_older_than_the_log_or_ahead_of_the_state_takes_it_whole() {
        let log = ChangeLog::since(10);
        assert_eq!(log.after(9, 12), Changed::Whole);
        assert_eq!(log.after(13, 12), Changed::Whole);
        assert_ne!(log.after(10, 12), Changed::Whole);
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

    fn connect(s: &mut State, network: &str, node: &str, netns: &str) {
        s.add_container(ContainerSpec {
            network: network.into(),
            node: node.into(),
            netns: netns.into(),
            ..ContainerSpec::default()
        })
        .unwrap();
    }

    /// The follower's state after `change` at revision `rev`, logged as
    /// touching `parts`.
    fn follow(f: &mut Followed, rev: u64, parts: &[Part<'_>], change: impl FnOnce(&mut State)) {
        change(&mut f.state);
        f.state.revision = rev;
        for p in parts {
            f.changes.touch(*p, rev);
        }
    }

    fn sorted(s: &State) -> State {
        let mut s = s.clone();
        s.endpoints
            .sort_by(|a, b| (&a.network, a.ip).cmp(&(&b.network, b.ip)));
        s
    }

    #[test]
    fn a_copy_takes_the_changed_networks_and_says_which() {
        let mut theirs = Followed::whole(world());
        let mut mine = None;
        assert_eq!(catch_up(&mut mine, &theirs), Dirty::All);

        follow(&mut theirs, 11, &[Part::Network("red")], |s| {
            connect(s, "red", "a", "c4")
        });
        follow(&mut theirs, 12, &[Part::Network("blue")], |s| {
            s.remove_container("blue", "b", "c2").unwrap();
        });
        let dirty = catch_up(&mut mine, &theirs);
        assert_eq!(
            dirty,
            Dirty::Networks(["blue".to_owned(), "red".to_owned()].into())
        );
        assert_eq!(sorted(mine.as_ref().unwrap()), sorted(&theirs.state));

        // Nothing new: nothing to look at.
        assert!(catch_up(&mut mine, &theirs).is_empty());

        // A network deleted goes with its endpoints.
        follow(&mut theirs, 13, &[Part::Network("red")], |s| {
            s.endpoints.retain(|e| e.network != "red");
            s.networks.remove("red");
        });
        assert_eq!(
            catch_up(&mut mine, &theirs),
            Dirty::Networks(["red".to_owned()].into())
        );
        assert_eq!(sorted(mine.as_ref().unwrap()), sorted(&theirs.state));
    }

    #[test]
    fn nodes_or_a_log_that_does_not_reach_back_make_everything_dirty() {
        let mut theirs = Followed::whole(world());
        let mut mine = None;
        catch_up(&mut mine, &theirs);
        follow(&mut theirs, 11, &[Part::Nodes], |s| {
            s.alive.as_mut().unwrap().remove("b");
        });
        assert_eq!(catch_up(&mut mine, &theirs), Dirty::All);
        assert_eq!(mine.as_ref().unwrap().alive, theirs.state.alive);

        // Held back addresses are copied, and dirty nothing.
        follow(&mut theirs, 12, &[Part::Other], |s| {
            s.conflicts.insert("b".into(), Vec::new());
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
