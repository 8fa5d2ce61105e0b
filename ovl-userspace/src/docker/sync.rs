//! Keeping this node's dockerd and ovl's store in step, on every store
//! change and every few seconds: ovl networks appear in (and vanish from)
//! `docker network ls`; networks Docker created get their names, and
//! containers' endpoints theirs (see [`names`]); and what
//! Docker no longer has — addresses reserved by a dockerd that died
//! mid-`docker run`, endpoints of containers it forgot — is released.
//! Nothing is released on first sight: only after [`GRACE`] of absence,
//! so a call in flight between Docker and the plugin never loses its
//! address.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{
    Context, DRIVER, Known,
    engine::{DockerNetwork, IpamCreate, NetworkCreate},
    ipam::{OWNER_IPAM, is_docker_owner},
    names::{self, Seen},
    networks::{self, short},
    options::{ENCRYPTED, MIRROR_OF, MTU},
};
use crate::{
    attachment,
    model::{Endpoint, Location, Network, State},
    store::{Followed, Scope, Store},
};

/// How often a pass runs without store changes.
const PERIOD: Duration = Duration::from_secs(2);
/// How long something must be missing from Docker before it is released.
pub const GRACE: Duration = Duration::from_secs(5);

/// What one pass should change, decided from the store and Docker's view.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// ovl networks Docker lacks: mirror them.
    pub create: Vec<Network>,
    /// Docker networks of driver ovl that no ovl network stands behind.
    pub remove: Vec<(String, String)>,
    /// Networks Docker created here, still provisionally named, that dockerd
    /// lists now: (provisional name, Docker ID).
    pub name: Vec<(String, String)>,
    /// Networks Docker created here (CreateNetwork came) that dockerd
    /// does not list.
    pub orphans: Vec<Network>,
    /// Pools this node's dockerd asked for with no CreateNetwork yet: a
    /// network Docker is still creating, one pool after the other, or one
    /// it gave up.
    pub unfinished: Vec<Network>,
}

/// Decides the network side of a pass on `node`.
pub fn plan(state: &State, docker: &[DockerNetwork], node: &str) -> Plan {
    let mut plan = Plan::default();
    let docker_ids: BTreeSet<&str> = docker.iter().map(|d| d.id.as_str()).collect();
    let mut pending_ids = BTreeSet::new();
    for n in state.networks.values() {
        match &n.docker_pending {
            Some(p) => {
                if let Some(id) = &p.network_id {
                    pending_ids.insert(id.as_str());
                }
                if p.node != node {
                    continue;
                }
                match &p.network_id {
                    Some(id) if docker_ids.contains(id.as_str()) => {
                        plan.name.push((n.name.clone(), id.clone()))
                    }
                    Some(_) => plan.orphans.push(n.clone()),
                    None => plan.unfinished.push(n.clone()),
                }
            }
            None => {
                if !docker.iter().any(|d| d.name == n.name) {
                    plan.create.push(n.clone());
                }
            }
        }
    }
    for d in docker {
        if pending_ids.contains(d.id.as_str()) {
            continue;
        }
        let stands_for = state
            .networks
            .get(&d.name)
            .filter(|n| n.docker_pending.is_none())
            .is_some_and(|n| d.subnet() == networks::first_subnet(n).as_deref());
        if !stands_for {
            plan.remove.push((d.name.clone(), d.id.clone()));
        }
    }
    plan
}

/// What a Docker endpoint record of the store is waiting on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Suspect {
    /// (VNI, address, owner) of an endpoint or reservation.
    Endpoint(u32, Ipv4Addr, String),
    /// VNI of a network Docker created here.
    Network(u32),
    /// The pools this node's dockerd asked for with no CreateNetwork yet,
    /// as stored ([`unfinished`]).
    Unfinished(String),
}

/// What the unfinished pools of a pass are waiting on: Docker asks for a
/// network's pools one by one (each with its gateway and auxiliary
/// addresses) and only then calls CreateNetwork, so a creation with many
/// subnets, or on a slow store, takes longer than [`GRACE`] while every
/// step is quick. They are abandoned together, once none was added or
/// changed for [`GRACE`]: any change is a new suspect.
pub fn unfinished(pools: &[Network]) -> Option<Suspect> {
    (!pools.is_empty())
        .then(|| Suspect::Unfinished(serde_json::to_string(pools).expect("networks serialise")))
}

/// This node's Docker endpoints and reservations that Docker does not
/// have (its endpoint IDs are `docker_endpoints`).
pub fn unknown_to_docker<'a>(
    state: &'a State,
    node: &str,
    docker_endpoints: &BTreeSet<String>,
) -> Vec<(Suspect, &'a Endpoint)> {
    let mut out = Vec::new();
    for e in &state.endpoints {
        let Some(owner) = e.owner.as_deref().filter(|o| is_docker_owner(o)) else {
            continue;
        };
        if e.node() != Some(node) {
            continue;
        }
        let known = owner
            .strip_prefix("docker:")
            .is_some_and(|id| docker_endpoints.contains(id));
        if known {
            continue;
        }
        let Some(vni) = state.networks.get(&e.network).map(|n| n.vni.get()) else {
            continue;
        };
        out.push((Suspect::Endpoint(vni, e.ip, owner.to_owned()), e));
    }
    out
}

/// First sightings of things missing from Docker, by suspect.
#[derive(Default)]
struct Suspects(HashMap<Suspect, Instant>);

impl Suspects {
    /// True once `s`, seen missing now, has been missing for [`GRACE`].
    fn overdue(&mut self, s: &Suspect, now: Instant) -> bool {
        now.duration_since(*self.0.entry(s.clone()).or_insert(now)) >= GRACE
    }

    /// Forgets everything not missing any more.
    fn keep(&mut self, missing: &BTreeSet<Suspect>) {
        self.0.retain(|s, _| missing.contains(s));
    }
}

/// The loop: a pass on every store change, nudge, and [`PERIOD`].
pub async fn run(ctx: Arc<Context>) {
    let mut suspects = Suspects::default();
    let mut updates: Option<watch::Receiver<Followed>> = None;
    let mut complaints = Complaints::default();
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = ctx.nudge.notified() => {}
            changed = next_change(updates.as_mut()), if updates.is_some() => {
                if changed.is_err() {
                    updates = None;
                }
            }
        }
        let store = match ctx.store.get().await {
            Ok(s) => s,
            Err(e) => {
                complaints.once("store", &e.message);
                continue;
            }
        };
        if updates.is_none() {
            updates = store.subscribe().await.ok();
        }
        match pass(&ctx, &store, &mut suspects, &mut complaints).await {
            Ok(()) => complaints.clear("pass"),
            Err(e) => complaints.once("pass", &e),
        }
    }
}

async fn next_change(
    rx: Option<&mut watch::Receiver<Followed>>,
) -> Result<(), watch::error::RecvError> {
    rx.expect("only polled with a receiver").changed().await
}

/// Log lines said once until they change, so a dockerd that is down does
/// not fill the log every two seconds.
#[derive(Default)]
struct Complaints(BTreeMap<String, String>);

impl Complaints {
    fn once(&mut self, topic: &str, what: &str) {
        if self.0.get(topic).map(String::as_str) != Some(what) {
            log::warn!("docker: {what}");
            self.0.insert(topic.to_owned(), what.to_owned());
        }
    }

    fn clear(&mut self, topic: &str) {
        self.0.remove(topic);
    }
}

/// One pass. Docker's networks are listed before the store is read: a
/// network Docker lists was created through the plugin, which recorded it
/// in the store before answering, so the read sees it.
async fn pass(
    ctx: &Context,
    store: &Store,
    suspects: &mut Suspects,
    complaints: &mut Complaints,
) -> Result<(), String> {
    let docker: Vec<DockerNetwork> = ctx
        .engine
        .networks()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|d| d.driver == DRIVER)
        .collect();
    let mut state = store.load().await.map_err(|e| e.to_string())?;
    let now = Instant::now();
    let mut missing = BTreeSet::new();

    let first = plan(&state, &docker, &ctx.node);
    if !first.name.is_empty() || !first.orphans.is_empty() || !first.unfinished.is_empty() {
        for (pending, id) in &first.name {
            if let Some(n) = state.networks.get(pending).cloned() {
                match networks::name(ctx, store, &n, id).await {
                    Ok(_) => complaints.clear(&format!("name {id}")),
                    Err(why) => complaints.once(&format!("name {id}"), &why),
                }
            }
        }
        for n in &first.orphans {
            let s = Suspect::Network(n.vni.get());
            // Removed, it is forgotten: a network made next under its VNI
            // starts a grace of its own.
            if !(suspects.overdue(&s, now) && remove_orphan(store, n).await) {
                missing.insert(s);
            }
        }
        if let Some(s) = unfinished(&first.unfinished) {
            if suspects.overdue(&s, now) {
                for n in &first.unfinished {
                    remove_orphan(store, n).await;
                }
            } else {
                missing.insert(s);
            }
        }
        state = store.load().await.map_err(|e| e.to_string())?;
    }
    let plan = plan(&state, &docker, &ctx.node);
    for (name, id) in &plan.remove {
        match ctx.engine.remove_network(id).await {
            Ok(()) => {
                ctx.forget(id);
                log::info!(
                    "removed Docker network {name} ({}): no ovl network behind it",
                    short(id)
                );
            }
            Err(e) => complaints.once(&format!("rm {id}"), &e.to_string()),
        }
    }
    for n in &plan.create {
        match mirror(ctx, n).await {
            Ok(id) => {
                ctx.remember(&id, Known::of(n));
                complaints.clear(&format!("mirror {}", n.name));
                log::info!("ovl network {} appears in Docker as {}", n.name, short(&id));
            }
            Err(e) => complaints.once(&format!("mirror {}", n.name), &e),
        }
    }
    for d in &docker {
        if let Some(n) = state.networks.get(&d.name) {
            ctx.remember(&d.id, Known::of(n));
        }
    }

    let endpoints = docker_endpoints(ctx, &docker).await?;
    let ids: BTreeSet<String> = endpoints.keys().cloned().collect();
    for (suspect, e) in unknown_to_docker(&state, &ctx.node, &ids) {
        missing.insert(suspect.clone());
        if suspects.overdue(&suspect, now) {
            release(store, e).await;
        }
    }
    suspects.keep(&missing);
    warn_unattached(&state, &ctx.node, &endpoints, complaints);
    for seen in endpoints.values() {
        let topic = format!("names {}", seen.endpoint_id);
        match names::settle(ctx, store, &state, seen).await {
            Ok(()) => complaints.clear(&topic),
            Err(e) => complaints.once(&topic, &e),
        }
    }
    ctx.names.keep(&ids);
    Ok(())
}

/// Docker's endpoints on this node's ovl networks, by endpoint ID.
async fn docker_endpoints(
    ctx: &Context,
    docker: &[DockerNetwork],
) -> Result<BTreeMap<String, Seen>, String> {
    let mut out = BTreeMap::new();
    for d in docker {
        let Some(full) = ctx.engine.network(&d.id).await.map_err(|e| e.to_string())? else {
            continue;
        };
        for seen in names::seen_in(&full, &d.name) {
            out.insert(seen.endpoint_id.clone(), seen);
        }
    }
    Ok(out)
}

/// Docker endpoints whose address ovl does not hold: their containers reach
/// nothing beyond this host. Said once each.
fn warn_unattached(
    state: &State,
    node: &str,
    endpoints: &BTreeMap<String, Seen>,
    complaints: &mut Complaints,
) {
    for (id, seen) in endpoints {
        let owner = super::ipam::owner_of(id);
        let held = state
            .endpoints
            .iter()
            .any(|e| e.owner.as_deref() == Some(owner.as_str()) && e.node() == Some(node));
        if held {
            complaints.clear(&format!("ep {id}"));
        } else {
            complaints.once(
                &format!("ep {id}"),
                &format!(
                    "container {} on {} (endpoint {}) has no ovl endpoint: restart it to attach it again",
                    seen.container_name,
                    seen.network,
                    short(id)
                ),
            );
        }
    }
}

/// Creates the Docker network that mirrors `n`; returns its ID.
async fn mirror(ctx: &Context, n: &Network) -> Result<String, String> {
    let spec = NetworkCreate {
        name: &n.name,
        check_duplicate: true,
        driver: DRIVER,
        ipam: IpamCreate {
            driver: DRIVER,
            config: n
                .subnets
                .iter()
                .map(|p| {
                    let mut config = BTreeMap::from([
                        ("Subnet", p.subnet.to_string()),
                        ("Gateway", p.gateway.to_string()),
                    ]);
                    // Shown by `docker network inspect`; ovl's IPAM keeps
                    // it whatever Docker asks. (Auxiliary addresses are
                    // not passed: Docker would ask for them as for a
                    // container's.)
                    if let Some(range) = p.range {
                        config.insert("IPRange", range.to_string());
                    }
                    config
                })
                .collect(),
            options: BTreeMap::from([(MIRROR_OF, n.name.clone())]),
        },
        internal: n.internal,
        options: {
            let mut o = BTreeMap::from([(MIRROR_OF, n.name.clone()), (MTU, n.mtu.to_string())]);
            if n.encrypted {
                o.insert(ENCRYPTED, String::new());
            }
            o
        },
    };
    ctx.engine
        .create_network(&spec)
        .await
        .map_err(|e| format!("ovl network {} cannot appear in Docker: {e}", n.name))
}

/// Removes a network Docker started creating here and never finished;
/// true if it did.
async fn remove_orphan(store: &Store, n: &Network) -> bool {
    let removed = store
        .update_with(Scope::Network(&n.name), |s| {
            let same = s
                .networks
                .get(&n.name)
                .is_some_and(|cur| cur.vni == n.vni && cur.docker_pending == n.docker_pending);
            if same && s.endpoints_of(&n.name).next().is_none() {
                s.remove_network(&n.name).map(|_| true)
            } else {
                Ok(false)
            }
        })
        .await;
    match removed {
        Ok(true) => {
            log::info!("removed {}: dockerd never finished creating it", n.name);
            true
        }
        Ok(false) => false,
        Err(e) => {
            log::warn!("removing {}: {e}", n.name);
            false
        }
    }
}

/// Releases an endpoint or reservation Docker no longer has, if it is still
/// what was seen: its veth (if any), then its address.
async fn release(store: &Store, e: &Endpoint) {
    if let Location::Container { host_ifname, .. } = &e.location
        && let Err(err) = attachment::remove_host_link(host_ifname).await
    {
        log::warn!("releasing {} on {}: {err:#}", e.ip, e.network);
        return;
    }
    let freed = store
        .update_with(Scope::Network(&e.network), |s| {
            let Some(pos) = s.endpoints.iter().position(|x| x == e) else {
                return Ok(false);
            };
            s.endpoints.remove(pos);
            Ok(true)
        })
        .await;
    match freed {
        Ok(true) => log::info!(
            "released {} on {}: Docker has no {} any more",
            e.ip,
            e.network,
            match e.owner.as_deref() {
                Some(OWNER_IPAM) | None => "use for it".to_owned(),
                Some(o) => format!("endpoint {}", short(o.trim_start_matches("docker:"))),
            }
        ),
        Ok(false) => {}
        Err(err) => log::warn!("releasing {} on {}: {err}", e.ip, e.network),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, DockerPending, NetworkSpec};

    fn docker(name: &str, id: &str, subnet: &str) -> DockerNetwork {
        serde_json::from_value(serde_json::json!({"Name": name, "Id": id, "Driver": "ovl",
            "IPAM": {"Driver": "ovl", "Config": [{"Subnet": subnet}]}}))
        .unwrap()
    }

    fn state() -> State {
        let mut s = State::default();
        for (name, subnet) in [("blue", "198.18.0.0/24"), ("red", "198.18.1.0/24")] {
            s.create_network(NetworkSpec::new(name, subnet.parse().unwrap()))
                .unwrap();
        }
        s
    }

    fn pend(s: &mut State, name: &str, subnet: &str, node: &str, id: Option<&str>) {
        s.create_network(NetworkSpec::new(name, subnet.parse().unwrap()))
            .unwrap();
        s.networks.get_mut(name).unwrap().docker_pending = Some(DockerPending {
            node: node.into(),
            network_id: id.map(Into::into),
        });
    }

    #[test]
    fn missing_networks_are_mirrored_and_orphans_removed() {
        let s = state();
        let d = [
            docker("blue", "1", "198.18.0.0/24"),
            docker("gone", "2", "198.18.9.0/24"),
            docker("red", "3", "198.18.7.0/24"), // another network named red
        ];
        let p = plan(&s, &d, "a");
        assert!(p.create.is_empty(), "red exists by name: not created twice");
        assert_eq!(
            p.remove,
            vec![("gone".into(), "2".into()), ("red".into(), "3".into())]
        );
        let p = plan(&s, &[], "a");
        let created: Vec<_> = p.create.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(created, ["blue", "red"]);
    }

    #[test]
    fn networks_being_created_are_named_never_mirrored_nor_removed() {
        let mut s = state();
        pend(
            &mut s,
            "docker-pending-198.18.2.0-24",
            "198.18.2.0/24",
            "a",
            Some("x"),
        );
        pend(
            &mut s,
            "docker-pending-198.18.3.0-24",
            "198.18.3.0/24",
            "a",
            None,
        );
        pend(
            &mut s,
            "docker-pending-198.18.4.0-24",
            "198.18.4.0/24",
            "b",
            Some("y"),
        );
        pend(
            &mut s,
            "docker-pending-198.18.5.0-24",
            "198.18.5.0/24",
            "a",
            Some("gone"),
        );
        pend(
            &mut s,
            "docker-pending-198.18.6.0-24",
            "198.18.6.0/24",
            "b",
            None,
        );
        let d = [
            docker("blue", "1", "198.18.0.0/24"),
            docker("red", "2", "198.18.1.0/24"),
            docker("uber-net", "x", "198.18.2.0/24"),
        ];
        let p = plan(&s, &d, "a");
        assert_eq!(
            p.name,
            vec![("docker-pending-198.18.2.0-24".into(), "x".into())]
        );
        let names = |v: &[Network]| v.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&p.orphans),
            ["docker-pending-198.18.5.0-24"],
            "b's are b's to judge"
        );
        assert_eq!(names(&p.unfinished), ["docker-pending-198.18.3.0-24"]);
        assert!(p.create.is_empty() && p.remove.is_empty(), "{p:?}");
    }

    /// Docker asks for a network's pools one after the other: while it
    /// adds pools (or sets a pool's gateway or auxiliary addresses) the
    /// unfinished pools are a new suspect, whose grace starts again.
    #[test]
    fn unfinished_pools_are_one_suspect_that_any_change_renews() {
        let mut s = State::default();
        assert_eq!(unfinished(&[]), None);
        pend(&mut s, "p1", "198.18.2.0/24", "a", None);
        let one = unfinished(&plan(&s, &[], "a").unfinished);
        assert!(one.is_some());
        assert_eq!(unfinished(&plan(&s, &[], "a").unfinished), one, "stable");
        pend(&mut s, "p2", "198.18.3.0/24", "a", None);
        let two = unfinished(&plan(&s, &[], "a").unfinished);
        assert_ne!(two, one, "a pool more");
        s.networks
            .get_mut("p2")
            .unwrap()
            .aux_addresses
            .insert("198.18.3.9".into(), "198.18.3.9".parse().unwrap());
        let aux = unfinished(&plan(&s, &[], "a").unfinished);
        assert_ne!(aux, two, "an auxiliary address more");
        pend(&mut s, "elsewhere", "198.18.4.0/24", "b", None);
        assert_eq!(
            unfinished(&plan(&s, &[], "a").unfinished),
            aux,
            "another node's pools are its own"
        );
    }

    #[test]
    fn only_this_nodes_docker_records_unknown_to_docker_are_suspects() {
        let mut s = state();
        let mine = s.reserve("blue", "a", None, None, OWNER_IPAM).unwrap();
        s.reserve("blue", "b", None, None, OWNER_IPAM).unwrap();
        s.reserve("blue", "a", None, None, "docker:live").unwrap();
        let mut dead = ContainerSpec {
            ports: Vec::new(),
            attacher: None,
            network: "blue".into(),
            node: "a".into(),
            netns: "/run/docker/netns/1".into(),
            name: None,
            ip: None,
            owner: Some("docker:dead".into()),
            subnet: None,
            mac: None,
        };
        let dead_ep = s.add_container(dead.clone()).unwrap();
        dead.netns = "c9".into();
        dead.owner = Some("cni:c9/eth0".into());
        s.add_container(dead).unwrap();
        let ids = BTreeSet::from(["live".to_owned()]);
        let got: Vec<_> = unknown_to_docker(&s, "a", &ids)
            .into_iter()
            .map(|(_, e)| e.ip)
            .collect();
        assert_eq!(got, vec![mine.ip, dead_ep.ip]);
    }

    #[test]
    fn suspects_are_overdue_only_after_the_grace() {
        let mut s = Suspects::default();
        let k = Suspect::Network(7);
        let t0 = Instant::now();
        assert!(!s.overdue(&k, t0));
        assert!(!s.overdue(&k, t0 + GRACE / 2));
        assert!(s.overdue(&k, t0 + GRACE));
        s.keep(&BTreeSet::new());
        assert!(!s.overdue(&k, t0 + GRACE * 2), "forgotten once seen again");
    }
}
