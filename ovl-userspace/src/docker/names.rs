//! Docker containers' names in ovl's DNS: the name and `--network-alias`es
//! a container has on an ovl network become its endpoint's name and
//! aliases. Docker's Join carries neither, so they are learnt from dockerd
//! once the container has started (after Join) and on every reconcile pass.
//!
//! Which names it gets is the policy every front end shares
//! ([`attachment::naming`]), its fallback being its short endpoint ID (the
//! name Join gave it); a clash is said once, and the name is taken as soon
//! as it is free.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{
    Context,
    engine::{DockerContainer, DockerNetwork},
    ipam::owner_of,
    networks::short,
};
use crate::{
    attachment::{
        self,
        naming::{self, Wanted},
    },
    model::{Endpoint, Location, State},
    store::{Scope, Store},
};

/// First look for a joined container's names; doubled up to
/// [`LOOK_EVERY`], for at most [`LOOK_FOR`] (the reconcile loop goes on
/// after that).
const FIRST_LOOK: Duration = Duration::from_millis(50);
const LOOK_EVERY: Duration = Duration::from_secs(1);
const LOOK_FOR: Duration = Duration::from_secs(10);

/// A Docker endpoint on an ovl network, as `docker network inspect` lists
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The ovl network (Docker's network of the same name).
    pub network: String,
    pub endpoint_id: String,
    /// `None` while Docker lists the endpoint in no container (`ep-…`).
    pub container_id: Option<String>,
    pub container_name: String,
}

/// The endpoints Docker lists on network `d` (ovl network `network`).
pub fn seen_in(d: &DockerNetwork, network: &str) -> Vec<Seen> {
    d.containers
        .iter()
        .flatten()
        .map(|(key, ep)| Seen {
            network: network.to_owned(),
            endpoint_id: ep.endpoint_id.clone(),
            container_id: (!key.starts_with("ep-")).then(|| key.clone()),
            container_name: ep.name.clone(),
        })
        .collect()
}

/// What container `c` is called on the network of its endpoint
/// `endpoint_id`: its name, and its aliases there in Docker's order
/// without repeats (Docker adds the short container ID to them).
pub fn wanted(c: &DockerContainer, endpoint_id: &str) -> Wanted {
    let name = c.name().to_owned();
    let mut seen = BTreeSet::from([name.to_ascii_lowercase()]);
    let aliases = c
        .endpoint(endpoint_id)
        .and_then(|e| e.aliases.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|a| seen.insert(a.to_ascii_lowercase()))
        .collect();
    Wanted { name, aliases }
}

/// What was learnt of each Docker endpoint's names, by endpoint ID, and
/// what was said about them (each problem once).
#[derive(Default)]
pub struct Memory {
    learnt: Mutex<HashMap<String, Learnt>>,
    /// Held while deciding on and writing names.
    writing: tokio::sync::Mutex<()>,
}

struct Learnt {
    /// The container's name when learnt: `docker network inspect` shows a
    /// rename, and the names are learnt again.
    container: String,
    wanted: Wanted,
    /// The last problem said about it.
    said: Option<String>,
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Learnt>> {
        self.learnt.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What endpoint `id` of container `container` wants, if learnt.
    fn wanted(&self, id: &str, container: &str) -> Option<Wanted> {
        self.lock()
            .get(id)
            .filter(|l| l.container == container)
            .map(|l| l.wanted.clone())
    }

    /// Learns (again) what endpoint `id` wants. What was said about it is
    /// kept: a Join's look and a reconcile pass may learn at the same time,
    /// and a problem is still said once (a rename changes the problem's
    /// text, which makes it news).
    fn learn(&self, id: &str, container: &str, wanted: Wanted) {
        let mut all = self.lock();
        let said = all.remove(id).and_then(|l| l.said);
        all.insert(
            id.to_owned(),
            Learnt {
                container: container.to_owned(),
                wanted,
                said,
            },
        );
    }

    /// True when `problem` (none: all is well) is news for endpoint `id`,
    /// which is then to be said.
    fn news(&self, id: &str, problem: Option<&str>) -> bool {
        let mut all = self.lock();
        let Some(l) = all.get_mut(id) else {
            return problem.is_some();
        };
        if l.said.as_deref() == problem {
            return false;
        }
        l.said = problem.map(str::to_owned);
        true
    }

    /// Forgets every endpoint but `ids`.
    pub fn keep(&self, ids: &BTreeSet<String>) {
        self.lock().retain(|id, _| ids.contains(id));
    }
}

/// Gives the ovl endpoint of `seen` (attached on this node) the names
/// Docker gives its container, as far as it can have them (`state`: the
/// store's, recently read). Learns them from dockerd the first time (and
/// after a rename); writes to the store only when they change; says a
/// clash once. An error is dockerd's or the store's.
pub async fn settle(
    ctx: &Context,
    store: &Store,
    state: &State,
    seen: &Seen,
) -> Result<(), String> {
    let owner = owner_of(&seen.endpoint_id);
    let Some(ep) = attached(state, &ctx.node, &seen.network, &owner) else {
        return Ok(());
    };
    let wanted = match ctx.names.wanted(&seen.endpoint_id, &seen.container_name) {
        Some(w) => w,
        None => {
            let Some(id) = &seen.container_id else {
                return Ok(());
            };
            let Some(c) = ctx.engine.container(id).await.map_err(|e| e.to_string())? else {
                return Ok(());
            };
            let w = wanted(&c, &seen.endpoint_id);
            ctx.names
                .learn(&seen.endpoint_id, &seen.container_name, w.clone());
            w
        }
    };
    let fallback = short(&seen.endpoint_id);
    let mut n = naming::choose(state, &seen.network, Some(ep), &wanted, fallback);
    let mut failed = None;
    if n.name != ep.name || n.aliases != ep.aliases {
        // One writer at a time (the reconcile pass and a Join's look may
        // meet here), deciding again on what the store holds now: a name
        // is written once, not once by each.
        let _one = ctx.names.writing.lock().await;
        let fresh = store
            .load_in(Scope::Network(&seen.network))
            .await
            .map_err(|e| e.to_string())?;
        let Some(ep) = attached(&fresh, &ctx.node, &seen.network, &owner) else {
            return Ok(());
        };
        n = naming::choose(&fresh, &seen.network, Some(ep), &wanted, fallback);
        if n.name != ep.name || n.aliases != ep.aliases {
            match attachment::set_names(
                store,
                &seen.network,
                ep.ip,
                &owner,
                Some(n.name.clone()),
                n.aliases.clone(),
            )
            .await
            {
                Ok(_) => log::info!(
                    "container {} on {} ({}) resolves as {}",
                    seen.container_name,
                    seen.network,
                    ep.ip,
                    n.names_text()
                ),
                // Taken meanwhile (another host named its container at
                // the same moment): the next pass reads who holds it.
                Err(e) => failed = Some(format!("{e:#}")),
            }
        }
    }
    let problem = match failed {
        Some(e) => Some(format!(
            "container {} on {} (endpoint {}) keeps its names: {e}",
            seen.container_name,
            seen.network,
            short(&seen.endpoint_id)
        )),
        None => (!n.refused.is_empty()).then(|| {
            format!(
                "container {} on {} (endpoint {}) does not get every name it has in Docker: {}; names are unique per ovl network, across hosts. It resolves as {} until then",
                seen.container_name,
                seen.network,
                short(&seen.endpoint_id),
                n.refused.join("; "),
                n.names_text()
            )
        }),
    };
    if ctx.names.news(&seen.endpoint_id, problem.as_deref()) {
        match &problem {
            Some(p) => log::warn!("docker: {p}"),
            None => log::info!(
                "container {} on {} has every name it has in Docker now",
                seen.container_name,
                seen.network
            ),
        }
    }
    Ok(())
}

/// The container endpoint `owner` has on `node` in `network`.
fn attached<'a>(
    state: &'a State,
    node: &str,
    network: &'a str,
    owner: &str,
) -> Option<&'a Endpoint> {
    state.endpoints_of(network).find(|e| {
        e.owner.as_deref() == Some(owner)
            && e.node() == Some(node)
            && matches!(e.location, Location::Container { .. })
    })
}

/// After Join: the container's names as soon as dockerd tells them (it
/// answers once the container has started, after Join), so a container
/// resolves by name a moment after `docker run` returns, not at the next
/// reconcile pass.
pub async fn after_join(
    ctx: Arc<Context>,
    docker_network: String,
    network: String,
    endpoint_id: String,
) {
    let until = Instant::now() + LOOK_FOR;
    let mut wait = FIRST_LOOK;
    loop {
        tokio::time::sleep(wait).await;
        match look(&ctx, &docker_network, &network, &endpoint_id).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => log::debug!("names of endpoint {}: {e}", short(&endpoint_id)),
        }
        if Instant::now() >= until {
            log::debug!(
                "names of endpoint {}: left to the reconcile loop",
                short(&endpoint_id)
            );
            return;
        }
        wait = (wait * 2).min(LOOK_EVERY);
    }
}

/// One look: true once done (named, or nothing left to name).
async fn look(
    ctx: &Context,
    docker_network: &str,
    network: &str,
    endpoint_id: &str,
) -> Result<bool, String> {
    let Some(d) = ctx
        .engine
        .network(docker_network)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(true);
    };
    let Some(seen) = seen_in(&d, network)
        .into_iter()
        .find(|s| s.endpoint_id == endpoint_id && s.container_id.is_some())
    else {
        return Ok(false);
    };
    let store = ctx.store.get().await.map_err(|e| e.message)?;
    let state = store
        .load_in(Scope::Network(network))
        .await
        .map_err(|e| e.to_string())?;
    settle(ctx, &store, &state, &seen).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(json: serde_json::Value) -> DockerContainer {
        serde_json::from_value(json).unwrap()
    }

    fn web() -> DockerContainer {
        container(
            serde_json::json!({"Id": "9c1d", "Name": "/web", "NetworkSettings": {"Networks": {
            "uber-net": {"EndpointID": "e1", "Aliases": ["www", "WEB", "9c1d2e3f4a5b", "www"]},
            "other": {"EndpointID": "e2", "Aliases": null}}}}),
        )
    }

    #[test]
    fn a_container_wants_its_name_and_its_aliases_on_that_network() {
        assert_eq!(
            wanted(&web(), "e1"),
            Wanted {
                name: "web".into(),
                aliases: vec!["www".into(), "9c1d2e3f4a5b".into()],
            },
            "the name repeated as an alias and repeats dropped"
        );
        assert_eq!(wanted(&web(), "e2").aliases, Vec::<String>::new());
        assert_eq!(wanted(&web(), "gone").name, "web");
    }

    #[test]
    fn endpoints_are_seen_with_their_container_unless_in_none() {
        let d: DockerNetwork = serde_json::from_value(serde_json::json!({"Name": "uber-net",
            "Id": "5d1f", "Driver": "ovl", "Containers": {
            "9c1d": {"Name": "web", "EndpointID": "e1"},
            "ep-e2": {"Name": "half", "EndpointID": "e2"}}}))
        .unwrap();
        let seen = seen_in(&d, "uber-net");
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].container_id.as_deref(), Some("9c1d"));
        assert_eq!(seen[1].container_id, None);
        assert_eq!(seen[1].container_name, "half");
    }

    #[test]
    fn each_problem_is_news_once() {
        let m = Memory::default();
        m.learn(
            "e1",
            "web",
            Wanted {
                name: "web".into(),
                aliases: vec![],
            },
        );
        assert!(m.news("e1", Some("web is held")));
        assert!(!m.news("e1", Some("web is held")), "said once");
        // A Join's look and a reconcile pass learning at the same time.
        m.learn(
            "e1",
            "web",
            Wanted {
                name: "web".into(),
                aliases: vec![],
            },
        );
        assert!(
            !m.news("e1", Some("web is held")),
            "learning again: still said once"
        );
        assert!(m.news("e1", None), "then that it is solved");
        assert!(!m.news("e1", None));
        assert!(m.wanted("e1", "web").is_some());
        assert!(
            m.wanted("e1", "renamed").is_none(),
            "a rename is learnt again"
        );
        m.keep(&BTreeSet::new());
        assert!(m.wanted("e1", "web").is_none());
    }
}
