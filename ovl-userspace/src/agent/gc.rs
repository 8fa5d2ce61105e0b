//! Collecting endpoints whose container went away without a disconnect: a
//! local endpoint whose network namespace and host veth are both gone for
//! longer than a grace period is deleted from the store (freeing its
//! address), logged and counted. Docker's endpoints are left to the Docker
//! plugin, which reconciles them with dockerd.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use crate::{
    model::{Endpoint, Location, State},
    netlink, netns,
};

/// Tracks how long each local endpoint has looked abandoned.
pub struct Collector {
    grace: Duration,
    gone_since: BTreeMap<(String, Ipv4Addr), Instant>,
}

impl Collector {
    /// A collector that waits `grace` before collecting.
    pub fn new(grace: Duration) -> Collector {
        Collector {
            grace,
            gone_since: BTreeMap::new(),
        }
    }

    /// Looks at `node`'s endpoints in `state` at `now`: returns those
    /// abandoned for longer than the grace, and when to look again (the
    /// earliest moment another one will be due), if any is pending.
    pub fn scan(
        &mut self,
        state: &State,
        node: &str,
        now: Instant,
    ) -> (Vec<Endpoint>, Option<Instant>) {
        let abandoned: BTreeMap<(String, Ipv4Addr), &Endpoint> = state
            .endpoints
            .iter()
            .filter(|e| e.node() == Some(node) && is_abandoned(e))
            .map(|e| ((e.network.clone(), e.ip), e))
            .collect();
        self.gone_since.retain(|k, _| abandoned.contains_key(k));
        let mut due = Vec::new();
        let mut next = None::<Instant>;
        for (key, ep) in abandoned {
            let since = *self.gone_since.entry(key).or_insert(now);
            let at = since + self.grace;
            if at <= now {
                due.push(ep.clone());
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (due, next)
    }
}

/// The container of `e` is gone: its namespace no longer exists and
/// neither does its host veth (a namespace deleted takes its veth along).
fn is_abandoned(e: &Endpoint) -> bool {
    if e.owner.as_deref().is_some_and(|o| o.starts_with("docker:")) {
        return false;
    }
    match &e.location {
        Location::Container {
            netns, host_ifname, ..
        } => !netns::path_of(netns).exists() && netlink::ifindex(host_ifname).is_none(),
        Location::Static { .. } | Location::Reserved { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    #[test]
    fn an_endpoint_is_collected_only_after_its_grace_and_only_while_abandoned() {
        let mut s = State::default();
        s.create_network(NetworkSpec::new("blue", "198.18.0.0/24".parse().unwrap()))
            .unwrap();
        s.add_container(ContainerSpec {
            network: "blue".into(),
            node: "a".into(),
            netns: "/nonexistent/ovl-gc-test".into(),
            ..ContainerSpec::default()
        })
        .unwrap();
        let mut docker = s.endpoints[0].clone();
        docker.ip = Ipv4Addr::new(198, 18, 0, 9);
        docker.owner = Some("docker:abc".into());
        s.endpoints.push(docker);
        let mut gc = Collector::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let (due, next) = gc.scan(&s, "a", t0);
        assert!(due.is_empty());
        assert_eq!(next, Some(t0 + Duration::from_secs(10)));
        let (due, _) = gc.scan(&s, "a", t0 + Duration::from_secs(11));
        assert_eq!(due.len(), 1, "only the non-Docker endpoint");
        assert_eq!(due[0].ip, Ipv4Addr::new(198, 18, 0, 2));
        // Another node's view: nothing of ours.
        assert!(gc.scan(&s, "b", t0).0.is_empty());
    }
}
