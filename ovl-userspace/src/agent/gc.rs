//! Collecting endpoints whose container went away without a disconnect: a
//! local endpoint whose host veth is gone along with its network namespace
//! — or with the attach that registered it, killed before it made the veth
//! or before it moved the container end out of the host's namespace
//! ([`attachment::abandoned_attach`]) — for longer than a grace period is
//! deleted from the store (freeing its address), logged and counted; a
//! pair such an attach left whole goes first. Docker's endpoints are left
//! to the Docker plugin, which reconciles them with dockerd.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use crate::{
    attachment,
    model::{Endpoint, Location, State},
    netns,
};

/// While the same local endpoints lack a veth, their namespaces are looked
/// at again at most this often on store changes (a namespace deleted
/// without a veth sends no notification; one with a veth does, and is
/// looked at at once).
const RECHECK: Duration = Duration::from_secs(1);
/// An endpoint handed out for collection is handed out again this long
/// after, while the state still holds it: its deletion may have failed (a
/// store error), or the store has not yet said that it succeeded.
const RETRY: Duration = Duration::from_secs(5);

/// Tracks how long each local endpoint has looked abandoned.
pub struct Collector {
    grace: Duration,
    gone_since: BTreeMap<(String, Ipv4Addr), Instant>,
    /// Endpoints handed out for collection, and when they are due again.
    retry_at: BTreeMap<(String, Ipv4Addr), Instant>,
    /// Local endpoints without a veth at the last look, when it was, and
    /// when one of them will be due.
    last_candidates: BTreeSet<(String, Ipv4Addr)>,
    last_look: Option<Instant>,
    next: Option<Instant>,
}

impl Collector {
    /// A collector that waits `grace` before collecting.
    pub fn new(grace: Duration) -> Collector {
        Collector {
            grace,
            gone_since: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            last_candidates: BTreeSet::new(),
            last_look: None,
            next: None,
        }
    }

    /// Looks at `node`'s endpoints in `state` at `now` (`ifindex_of`
    /// resolves a host interface): returns those abandoned for longer than
    /// the grace, and when to look again (the earliest moment another one
    /// will be due), if any is pending. Those returned are due again
    /// [`RETRY`] later while `state` still holds them. Only endpoints
    /// without a container's veth (no host end, or the pair still whole in
    /// the host's namespace) can be abandoned; their namespaces are looked
    /// at when that set changed, when one is due, or [`RECHECK`] after the
    /// last look.
    pub fn scan(
        &mut self,
        state: &State,
        node: &str,
        now: Instant,
        ifindex_of: &dyn Fn(&str) -> Option<u32>,
    ) -> (Vec<Endpoint>, Option<Instant>) {
        let candidates: BTreeMap<(&str, Ipv4Addr), &Endpoint> = state
            .endpoints
            .iter()
            .filter(|e| e.node() == Some(node) && lacks_veth(e, ifindex_of))
            .map(|e| ((e.network.as_str(), e.ip), e))
            .collect();
        let unchanged = candidates.len() == self.last_candidates.len()
            && candidates
                .keys()
                .copied()
                .eq(self.last_candidates.iter().map(|(n, ip)| (n.as_str(), *ip)));
        let recent = self.last_look.is_some_and(|t| now < t + RECHECK);
        let due = self.next.is_some_and(|t| t <= now);
        if unchanged && recent && !due {
            return (Vec::new(), self.next);
        }
        if !unchanged {
            self.last_candidates = candidates
                .keys()
                .map(|(n, ip)| ((*n).to_owned(), *ip))
                .collect();
        }
        self.last_look = Some(now);
        // An attach still running when its record came may die without a
        // notification: such candidates are looked at again after a while.
        let mut attach_running = false;
        let abandoned: BTreeMap<(String, Ipv4Addr), &Endpoint> = candidates
            .into_iter()
            .filter(|(_, e)| {
                let gone = abandoned(e, ifindex_of);
                attach_running |= !gone && e.attacher.is_some();
                gone
            })
            .map(|((n, ip), e)| ((n.to_owned(), ip), e))
            .collect();
        self.gone_since.retain(|k, _| abandoned.contains_key(k));
        self.retry_at.retain(|k, _| abandoned.contains_key(k));
        let mut due = Vec::new();
        let mut next = None::<Instant>;
        for (key, ep) in abandoned {
            let since = *self.gone_since.entry(key.clone()).or_insert(now);
            let mut at = self
                .retry_at
                .get(&key)
                .copied()
                .unwrap_or(since + self.grace);
            if at <= now {
                due.push(ep.clone());
                at = now + RETRY;
                self.retry_at.insert(key, at);
            }
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        if attach_running {
            let at = now + RECHECK;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        self.next = next;
        (due, next)
    }
}

/// Whether local endpoint `ep`, without a container's veth, is abandoned:
/// its namespace went, or the attach that registered it died before
/// finishing its veth. A pair left whole by an attach still running is its
/// own to finish or undo, whatever became of its namespace.
pub fn abandoned(ep: &Endpoint, ifindex_of: &dyn Fn(&str) -> Option<u32>) -> bool {
    (lacks_host_end(ep, ifindex_of) && namespace_gone(ep))
        || attachment::abandoned_attach(ep, ifindex_of)
}

/// The store change that collects `ep`, found abandoned by a scan of a
/// state that may be older than the store's: only that very endpoint
/// goes, not a newer one of the same namespace. Returns whether it was
/// there to remove.
pub fn collect(state: &mut State, ep: &Endpoint) -> bool {
    state.remove_exact(ep)
}

/// A container endpoint (not Docker's: its plugin reconciles those with
/// dockerd, and its container end waits in the host's namespace for
/// Docker to move) without a container's veth: its host end does not
/// exist, or the pair is still whole in the host's namespace.
fn lacks_veth(e: &Endpoint, ifindex_of: &dyn Fn(&str) -> Option<u32>) -> bool {
    if e.owner.as_deref().is_some_and(|o| o.starts_with("docker:")) {
        return false;
    }
    match &e.location {
        Location::Container { host_ifname, .. } => {
            ifindex_of(host_ifname).is_none()
                || ifindex_of(&crate::model::unmoved_peer_ifname(host_ifname)).is_some()
        }
        Location::Static { .. } | Location::Reserved { .. } => false,
    }
}

/// A container endpoint whose host end does not exist.
fn lacks_host_end(e: &Endpoint, ifindex_of: &dyn Fn(&str) -> Option<u32>) -> bool {
    match &e.location {
        Location::Container { host_ifname, .. } => ifindex_of(host_ifname).is_none(),
        Location::Static { .. } | Location::Reserved { .. } => false,
    }
}

/// The container of `e` is gone: its namespace no longer exists (a
/// namespace deleted takes its veth along).
pub fn namespace_gone(e: &Endpoint) -> bool {
    match &e.location {
        Location::Container { netns, .. } => !netns::path_of(netns).exists(),
        Location::Static { .. } | Location::Reserved { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    /// Network blue with node a's container in namespace `netns`: the state
    /// and what connected it.
    fn one_container(netns: &str) -> (State, ContainerSpec) {
        let mut s = State::default();
        s.create_network(NetworkSpec::new("blue", "198.18.0.0/24".parse().unwrap()))
            .unwrap();
        let spec = ContainerSpec {
            network: "blue".into(),
            node: "a".into(),
            netns: netns.into(),
            ..ContainerSpec::default()
        };
        s.add_container(spec.clone()).unwrap();
        (s, spec)
    }

    /// Whether `name` is a host end (never the container end a killed
    /// attach left in the host's namespace).
    fn host_ends_only(name: &str) -> bool {
        crate::model::is_host_ifname(name)
    }

    #[test]
    fn an_endpoint_is_collected_only_after_its_grace_and_only_while_abandoned() {
        let (mut s, _) = one_container("/nonexistent/ovl-gc-test");
        let mut docker = s.endpoints[0].clone();
        docker.ip = Ipv4Addr::new(198, 18, 0, 9);
        docker.owner = Some("docker:abc".into());
        s.endpoints.push(docker);
        let mut gc = Collector::new(Duration::from_secs(10));
        let no_veth = |_: &str| None;
        let t0 = Instant::now();
        let (due, next) = gc.scan(&s, "a", t0, &no_veth);
        assert!(due.is_empty());
        assert_eq!(next, Some(t0 + Duration::from_secs(10)));
        let (due, _) = gc.scan(&s, "a", t0 + Duration::from_secs(11), &no_veth);
        assert_eq!(due.len(), 1, "only the non-Docker endpoint");
        assert_eq!(due[0].ip, Ipv4Addr::new(198, 18, 0, 2));
        // An endpoint whose veth exists is never collected.
        let mut other = Collector::new(Duration::from_secs(10));
        let veth = |n: &str| host_ends_only(n).then_some(7);
        other.scan(&s, "a", t0, &veth);
        assert!(
            other
                .scan(&s, "a", t0 + Duration::from_secs(11), &veth)
                .0
                .is_empty()
        );
        // Another node's view: nothing of ours.
        assert!(gc.scan(&s, "b", t0, &no_veth).0.is_empty());
    }

    #[test]
    fn an_endpoint_whose_attach_died_before_its_veth_is_collected_after_its_grace() {
        // The namespace exists: only the attach's death can abandon it.
        let (mut s, _) = one_container("/proc/self/ns/net");
        let me = crate::attachment::attacher::current().unwrap();
        let dead = crate::model::Attacher {
            started: me.started + 1,
            ..me
        };
        s.endpoints[0].attacher = Some(dead);
        let mut gc = Collector::new(Duration::from_secs(10));
        let no_veth = |_: &str| None;
        let t0 = Instant::now();
        // Seen first while its attach ran: looked at again without any
        // notification, and found abandoned once the attach is gone.
        s.endpoints[0].attacher = Some(me);
        let (due, next) = gc.scan(&s, "a", t0, &no_veth);
        assert!(due.is_empty());
        assert_eq!(next, Some(t0 + RECHECK), "a look planned");
        s.endpoints[0].attacher = Some(dead);
        let t0 = t0 + RECHECK;
        assert!(gc.scan(&s, "a", t0, &no_veth).0.is_empty(), "in its grace");
        let later = t0 + Duration::from_secs(11);
        assert_eq!(gc.scan(&s, "a", later, &no_veth).0.len(), 1);
        // An attach in progress (its attacher alive), one with its veth,
        // or one recorded without an attacher: never.
        for (attacher, veth) in [(Some(me), None), (Some(dead), Some(7)), (None, None)] {
            s.endpoints[0].attacher = attacher;
            let mut gc = Collector::new(Duration::from_secs(10));
            let ifindex_of = |n: &str| veth.filter(|_| host_ends_only(n));
            gc.scan(&s, "a", t0, &ifindex_of);
            assert!(
                gc.scan(&s, "a", later, &ifindex_of).0.is_empty(),
                "{attacher:?} {veth:?}"
            );
        }
    }

    #[test]
    fn a_pair_left_whole_in_the_host_by_a_dead_attach_is_collected_after_its_grace() {
        // The container end never moved: both ends are host interfaces.
        let whole = |_: &str| Some(7);
        let me = crate::attachment::attacher::current().unwrap();
        let dead = crate::model::Attacher {
            started: me.started + 1,
            ..me
        };
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(11);
        // Its namespace gone or not: the attach will never finish it.
        for netns in ["/proc/self/ns/net", "/nonexistent/ovl-gc-whole"] {
            let (mut s, _) = one_container(netns);
            s.endpoints[0].attacher = Some(dead);
            let mut gc = Collector::new(Duration::from_secs(10));
            assert!(gc.scan(&s, "a", t0, &whole).0.is_empty(), "in its grace");
            assert_eq!(gc.scan(&s, "a", later, &whole).0.len(), 1, "{netns}");
        }
        // Still being attached, its namespace gone: the attach undoes it.
        let (mut s, _) = one_container("/nonexistent/ovl-gc-whole");
        s.endpoints[0].attacher = Some(me);
        let mut gc = Collector::new(Duration::from_secs(10));
        gc.scan(&s, "a", t0, &whole);
        assert!(gc.scan(&s, "a", later, &whole).0.is_empty());
        // A finished veth (only the host end here) is never collected.
        let (mut s, _) = one_container("/nonexistent/ovl-gc-whole");
        s.endpoints[0].attacher = Some(dead);
        let host_end = |n: &str| host_ends_only(n).then_some(7);
        let mut gc = Collector::new(Duration::from_secs(10));
        gc.scan(&s, "a", t0, &host_end);
        assert!(gc.scan(&s, "a", later, &host_end).0.is_empty());
    }

    #[test]
    fn a_newer_endpoint_of_the_same_namespace_is_not_collected() {
        // Namespace c1 went away without a disconnect; its endpoint A is
        // found abandoned past its grace.
        let netns = "/nonexistent/ovl-gc-reused";
        let (mut s, spec) = one_container(netns);
        let a = s.endpoints[0].clone();
        let mut gc = Collector::new(Duration::ZERO);
        let (due, _) = gc.scan(&s, "a", Instant::now(), &|_| None);
        assert_eq!(due, vec![a.clone()]);
        // Meanwhile the operator recreated c1, disconnected and connected
        // it again: B, at another address, is what the store holds now.
        s.remove_container("blue", "a", netns).unwrap();
        let b = s
            .add_container(ContainerSpec {
                ip: Some(Ipv4Addr::new(198, 18, 0, 3)),
                ..spec
            })
            .unwrap();
        assert!(!collect(&mut s, &a), "A is gone already");
        assert!(s.endpoints.contains(&b), "B was collected in A's place");
    }

    #[test]
    fn an_endpoint_handed_out_is_due_again_after_a_while_until_it_is_gone() {
        let (mut s, _) = one_container("/nonexistent/ovl-gc-retry");
        let mut gc = Collector::new(Duration::from_secs(10));
        let no_veth = |_: &str| None;
        let t0 = Instant::now();
        gc.scan(&s, "a", t0, &no_veth);
        let t1 = t0 + Duration::from_secs(10);
        let (due, next) = gc.scan(&s, "a", t1, &no_veth);
        assert_eq!(due.len(), 1);
        // Its deletion may fail: a look stays planned.
        assert_eq!(next, Some(t1 + RETRY));
        // Not handed out again meanwhile (the store may just not have said
        // yet that it is gone), then again while the state still holds it.
        assert!(gc.scan(&s, "a", t1 + RECHECK, &no_veth).0.is_empty());
        let (due, next) = gc.scan(&s, "a", t1 + RETRY, &no_veth);
        assert_eq!(due.len(), 1);
        assert_eq!(next, Some(t1 + RETRY + RETRY));
        // Gone from the state: nothing more planned.
        s.endpoints.clear();
        assert_eq!(gc.scan(&s, "a", t1 + RETRY, &no_veth), (Vec::new(), None));
    }

    #[test]
    fn unchanged_candidates_are_looked_at_again_only_after_a_while() {
        // A namespace that exists: not abandoned, only a candidate.
        let (s, _) = one_container("/proc/self/ns/net");
        let mut gc = Collector::new(Duration::from_secs(10));
        let t0 = Instant::now();
        gc.scan(&s, "a", t0, &|_| None);
        assert_eq!(gc.last_look, Some(t0));
        // Same candidates soon after: not looked at.
        let t1 = t0 + Duration::from_millis(100);
        gc.scan(&s, "a", t1, &|_| None);
        assert_eq!(gc.last_look, Some(t0));
        // Changed candidates (a veth appeared): looked at at once.
        gc.scan(&s, "a", t1, &|n| host_ends_only(n).then_some(3));
        assert_eq!(gc.last_look, Some(t1));
        // Past RECHECK: looked at again.
        let t2 = t1 + RECHECK;
        gc.scan(&s, "a", t2, &|n| host_ends_only(n).then_some(3));
        assert_eq!(gc.last_look, Some(t2));
    }
}
