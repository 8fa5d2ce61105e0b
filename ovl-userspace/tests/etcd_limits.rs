//! The etcd store at cluster scale, on a real etcd: a dead node with 300
//! endpoints is freed and 300 endpoints are put back although etcd takes
//! at most 128 operations per transaction; addresses freed from a dead node
//! are held back, and their claims deleted; a change to one network reads
//! only that network; a connect reads a few keys however big its network;
//! the follower's state, built from watch deltas, equals a fresh read; a
//! change whose commit or its answer was lost is made exactly once.
//!
//! The test process talks to an etcd that a lab runs in a namespace of its
//! own, from a thread that entered that namespace.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ovl_tests::{Etcd, Lab, Netns};
use ovl_userspace::{
    attachment::{self, Request},
    model::{ContainerSpec, Endpoint, Location, MacAddr, ModelError, NetworkSpec, State},
    store::{Followed, Registration, Scope, Store, StoreError, catch_up},
};

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Endpoints of the node the scenarios free and restore.
const MANY: usize = 300;

/// A lab with etcd on 127.0.0.1 of a namespace of its own.
fn etcd(tag: &str) -> Result<(Lab, Netns, Etcd)> {
    let lab = Lab::new(tag)?;
    let ns = lab.netns("etcd")?;
    let etcd = Etcd::start(&lab, &ns, LOCALHOST)?;
    Ok((lab, ns, etcd))
}

/// Runs `f` inside `ns` on a runtime of its own.
fn inside<T: Send>(ns: &Netns, f: impl AsyncFnOnce() -> Result<T> + Send) -> Result<T> {
    ns.run_inside(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f())
    })?
}

async fn create_network(store: &Store, name: &str, subnet: &str) -> Result<()> {
    store
        .update_with(Scope::Networks, |s| {
            s.create_network(NetworkSpec::new(
                name,
                subnet.parse().expect("test subnets are valid"),
            ))
            .map(|_| ())
        })
        .await?;
    Ok(())
}

fn container(network: &str, node: &str, netns: &str, ip: Option<Ipv4Addr>) -> ContainerSpec {
    ContainerSpec {
        ports: Vec::new(),
        attacher: None,
        network: network.into(),
        node: node.into(),
        netns: netns.into(),
        name: None,
        ip,
        owner: None,
        subnet: None,
        mac: None,
    }
}

async fn connect(store: &Store, spec: ContainerSpec) -> Result<Endpoint, StoreError> {
    let network = spec.network.clone();
    store
        .update_with(Scope::Network(&network), |s| s.add_container(spec.clone()))
        .await
}

/// Node `node` with `n` container endpoints on `network`.
async fn populate(store: &Store, network: &str, node: &str, n: usize) -> Result<Vec<Endpoint>> {
    let mut eps = Vec::new();
    for i in 0..n {
        eps.push(connect(store, container(network, node, &format!("c{i}"), None)).await?);
    }
    Ok(eps)
}

/// Registers node `name` (VTEP 192.0.2.20) with a lease of a second, so
/// that it dies soon once the registration is dropped.
async fn short_lived_node(store: &Store, name: &str) -> Result<Registration> {
    Ok(store
        .register_node(
            name,
            Ipv4Addr::new(192, 0, 2, 20),
            1500,
            Duration::from_secs(1),
        )
        .await?)
}

/// Lets node `name` die (its registration `reg` dropped), then frees its
/// endpoints as an agent that saw it dead would; returns how many went.
async fn free_when_dead(store: &Store, name: &str, reg: Registration) -> Result<usize> {
    drop(reg);
    wait_dead(store, name).await?;
    Ok(store.forget_dead_node(name).await?)
}

/// Waits until the store lists `node` as dead (its lease lapsed).
async fn wait_dead(store: &Store, node: &str) -> Result<()> {
    for _ in 0..100 {
        if store.dead_nodes().await?.iter().any(|n| n == node) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("node {node} never died")
}

#[test]
fn a_dead_node_with_300_endpoints_is_freed_and_its_addresses_held_back() -> Result<()> {
    let (_lab, ns, etcd) = etcd("st-free")?;
    let url = etcd.url();
    inside(&ns, async || {
        let store = Store::open(&url).await?;
        create_network(&store, "n", "198.18.0.0/22").await?;
        let gone = short_lived_node(&store, "gone").await?;
        let _live = store
            .register_node(
                "live",
                Ipv4Addr::new(192, 0, 2, 21),
                1500,
                Duration::from_secs(30),
            )
            .await?;
        let theirs = populate(&store, "n", "gone", MANY).await?;
        let mine = connect(&store, container("n", "live", "mine", None)).await?;

        // The finding: freeing them as one transaction that checks the node
        // is dead and every endpoint unchanged (1 + 300 compares) is more
        // than etcd takes.
        let mut raw =
            etcd_client::Client::connect([format!("http://{}", etcd.endpoint())], None).await?;
        let mut compares = vec![Compare::create_revision(
            "/ovl/alive/gone",
            CompareOp::Equal,
            0,
        )];
        let mut ops = Vec::new();
        for e in &theirs {
            let key = format!("/ovl/endpoints/n/{}", e.ip);
            compares.push(Compare::mod_revision(key.as_str(), CompareOp::Greater, 0));
            ops.push(TxnOp::delete(key, None));
        }
        let refused = raw.txn(Txn::new().when(compares).and_then(ops)).await;
        let refused = refused
            .err()
            .context("etcd took a 301-compare transaction")?;
        ensure!(
            refused.to_string().contains("too many operations"),
            "etcd refused it for another reason: {refused}"
        );
        eprintln!("one transaction for {MANY} endpoints: {refused}");

        // A live node loses nothing, and cannot be removed.
        ensure!(store.forget_dead_node("live").await? == 0);
        let err = store.remove_node("live").await.unwrap_err();
        ensure!(matches!(err, StoreError::NodeAlive(_)), "{err}");

        drop(gone);
        wait_dead(&store, "gone").await?;
        ensure!(
            store.dead_nodes().await? == ["gone"],
            "dead nodes: {:?}",
            store.dead_nodes().await?
        );
        let t0 = std::time::Instant::now();
        let freed = store.forget_dead_node("gone").await?;
        eprintln!(
            "freed {freed} endpoints of a dead node in {:?}",
            t0.elapsed()
        );
        ensure!(freed == MANY, "freed {freed} of {MANY}");
        let state = store.load().await?;
        ensure!(state.endpoints_of_node("gone").count() == 0);
        ensure!(
            state.endpoints == [mine.clone()],
            "{:?}",
            state.endpoints.len()
        );
        ensure!(
            state.released.len() == MANY,
            "{} released",
            state.released.len()
        );
        // Their name and attachment claims went with them: only mine's
        // are left.
        for prefix in ["/ovl/names/n/", "/ovl/attachments/n/"] {
            let left = raw
                .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
                .await?;
            ensure!(
                left.kvs().len() == 1,
                "{} claims left under {prefix}",
                left.kvs().len()
            );
        }

        // Held back: the next container gets none of them, and asking for
        // one names the grace.
        let freed_ips: BTreeSet<Ipv4Addr> = theirs.iter().map(|e| e.ip).collect();
        let next = connect(&store, container("n", "live", "next", None)).await?;
        ensure!(
            !freed_ips.contains(&next.ip),
            "{} handed out again",
            next.ip
        );
        let asked = connect(&store, container("n", "live", "x", Some(theirs[0].ip))).await;
        ensure!(
            matches!(
                asked,
                Err(StoreError::Rejected(ModelError::AddressHeld { .. }))
            ),
            "{asked:?}"
        );

        // Its registration goes with `node rm`; a second one finds nothing.
        ensure!(store.remove_node("gone").await? == 0);
        ensure!(!store.load().await?.nodes.contains_key("gone"));
        let again = store.remove_node("gone").await.unwrap_err();
        ensure!(
            matches!(again, StoreError::Rejected(ModelError::NoSuchNode(_))),
            "{again}"
        );
        Ok(())
    })
}

#[test]
fn a_returning_node_gets_300_endpoints_back_and_learns_which_address_was_taken() -> Result<()> {
    let (_lab, ns, etcd) = etcd("st-restore")?;
    let url = etcd.url();
    inside(&ns, async || {
        let store = Store::open(&url).await?;
        create_network(&store, "n", "198.18.0.0/22").await?;
        let reg = short_lived_node(&store, "back").await?;
        let mut eps = populate(&store, "n", "back", MANY).await?;
        ensure!(free_when_dead(&store, "back", reg).await? == MANY);
        // Another host takes one of the addresses (its operator set no grace).
        let ungraced = Store::open(&format!("{url}?address-grace=0")).await?;
        let taken = eps[7].ip;
        let thief = connect(&ungraced, container("n", "thief", "t1", Some(taken))).await?;
        // And one endpoint is still there (the node re-registered it).
        let kept = eps.pop().expect("MANY > 0");
        store
            .update_with(Scope::Network("n"), |s| {
                s.restore_endpoint(&kept);
                Ok(())
            })
            .await?;

        // The finding: putting them back in one change, as the agent did,
        // needs more operations than etcd takes, so none comes back.
        let one_change = store
            .update_with(Scope::All, |s| {
                for e in &eps {
                    s.restore_endpoint(e);
                }
                Ok(())
            })
            .await;
        ensure!(
            matches!(one_change, Err(StoreError::TooLarge { .. })),
            "{one_change:?}"
        );
        ensure!(store.load().await?.endpoints_of_node("back").count() == 1);

        eps.push(kept);
        let t0 = std::time::Instant::now();
        let out = store.restore_endpoints("back", &eps).await?;
        eprintln!(
            "restored {} endpoints in {:?}; {} conflict(s)",
            out.restored.len(),
            t0.elapsed(),
            out.conflicts.len()
        );
        ensure!(
            out.restored.len() == MANY - 2,
            "{} restored",
            out.restored.len()
        );
        ensure!(out.present == 1, "{} present", out.present);
        ensure!(out.conflicts.len() == 1, "{:?}", out.conflicts);
        let c = &out.conflicts[0];
        ensure!(
            c.ip == taken
                && c.holder_name == thief.name
                && matches!(&c.holder, Location::Container { node, .. } if node == "thief"),
            "{c:?}"
        );
        let state = store.load().await?;
        ensure!(state.endpoints_of_node("back").count() == MANY - 1);
        ensure!(
            state.conflicts.get("back") == Some(&out.conflicts),
            "{:?}",
            state.conflicts
        );
        ensure!(state.released.is_empty(), "{:?}", state.released);
        // Nothing more to do the second time; the conflict stays recorded
        // until the address is free.
        let again = store.restore_endpoints("back", &eps).await?;
        ensure!(
            again.restored.is_empty() && again.present == MANY - 1 && again.conflicts.len() == 1
        );
        ungraced
            .update_with(Scope::Network("n"), |s| {
                s.remove_container("n", "thief", "t1")
            })
            .await?;
        let healed = store.restore_endpoints("back", &eps).await?;
        ensure!(healed.restored.len() == 1 && healed.conflicts.is_empty());
        ensure!(!store.load().await?.conflicts.contains_key("back"));
        Ok(())
    })
}

#[test]
fn a_returning_node_gets_its_published_ports_back_unless_another_container_took_them() -> Result<()>
{
    let (_lab, ns, etcd) = etcd("st-ports")?;
    let url = etcd.url();
    inside(&ns, async || {
        let store = Store::open(&url).await?;
        create_network(&store, "n", "198.18.0.0/24").await?;
        let reg = short_lived_node(&store, "back").await?;
        let publishing = |netns: &str, port: &str| ContainerSpec {
            ports: vec![port.parse().expect("test ports are valid")],
            ..container("n", "back", netns, None)
        };
        let web = connect(&store, publishing("web", "8080:80")).await?;
        let api = connect(&store, publishing("api", "9090:90")).await?;
        ensure!(free_when_dead(&store, "back", reg).await? == 2);
        // Meanwhile another container of the node publishes web's port.
        let other = connect(&store, publishing("other", "8080:81")).await?;

        let out = store
            .restore_endpoints("back", &[web.clone(), api.clone()])
            .await?;
        ensure!(out.restored.len() == 2, "{out:?}");
        ensure!(
            out.unpublished.len() == 1
                && out.unpublished[0].0.ip == web.ip
                && out.unpublished[0].1 == web.ports[0],
            "{:?}",
            out.unpublished
        );
        let state = store.load().await?;
        let ports_of = |ip| {
            state
                .endpoints
                .iter()
                .find(|e| e.network == "n" && e.ip == ip)
                .map(|e| e.ports.clone())
        };
        ensure!(
            ports_of(web.ip) == Some(vec![]),
            "web: {:?}",
            ports_of(web.ip)
        );
        ensure!(
            ports_of(api.ip) == Some(api.ports.clone()),
            "api: {:?}",
            ports_of(api.ip)
        );
        ensure!(ports_of(other.ip) == Some(other.ports.clone()));
        // api's port is claimed again: nobody else on the node takes it.
        let taken = connect(&store, publishing("late", "9090:91")).await;
        ensure!(
            matches!(
                taken,
                Err(StoreError::Rejected(ModelError::PortTaken { .. }))
            ),
            "{taken:?}"
        );
        Ok(())
    })
}

/// `n` static endpoints on `network` written straight to etcd, 50 per
/// transaction, as the store encodes them (without their name claims,
/// as an older ovl did).
async fn bulk_endpoints(etcd: &Etcd, network: &str, base: Ipv4Addr, n: u32) -> Result<()> {
    bulk(etcd, network, base, n, false).await
}

/// [`bulk_endpoints`], with each endpoint's name claim if `claims`.
async fn bulk(etcd: &Etcd, network: &str, base: Ipv4Addr, n: u32, claims: bool) -> Result<()> {
    let mut raw =
        etcd_client::Client::connect([format!("http://{}", etcd.endpoint())], None).await?;
    let ips: Vec<Ipv4Addr> = (2..2 + n)
        .map(|i| Ipv4Addr::from(u32::from(base) + i))
        .collect();
    for chunk in ips.chunks(50) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .flat_map(|ip| {
                let ep = Endpoint {
                    ports: Vec::new(),
                    attacher: None,
                    network: network.into(),
                    name: format!("s-{ip}"),
                    ip: *ip,
                    mac: MacAddr::for_ipv4(*ip),
                    location: Location::Static {
                        vtep: Ipv4Addr::new(203, 0, 113, 50),
                    },
                    owner: None,
                    aliases: Vec::new(),
                };
                let mut v = serde_json::to_value(&ep).expect("endpoints serialise");
                v["schema"] = 1.into();
                let mut ops = vec![TxnOp::put(
                    format!("/ovl/endpoints/{network}/{ip}"),
                    v.to_string(),
                    None,
                )];
                if claims {
                    ops.push(TxnOp::put(
                        format!("/ovl/names/{network}/s-{ip}"),
                        format!(r#"{{"schema":1,"ip":"{ip}"}}"#),
                        None,
                    ));
                }
                ops
            })
            .collect();
        raw.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// The state with endpoints in a canonical order.
fn sorted(mut s: State) -> State {
    s.endpoints
        .sort_by(|a, b| (&a.network, a.ip).cmp(&(&b.network, b.ip)));
    s.released
        .sort_by(|a, b| (&a.network, a.ip).cmp(&(&b.network, b.ip)));
    s
}

/// Waits until `follower` has seen revision `revision`.
async fn caught_up(
    follower: &mut tokio::sync::watch::Receiver<Followed>,
    revision: u64,
) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(5), async {
        while follower.borrow_and_update().state.revision < revision {
            follower.changed().await?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .context("the follower never caught up")?
}

/// Bytes etcd sent to clients so far.
fn sent_bytes(etcd: &Etcd) -> Result<f64> {
    etcd.metric("etcd_network_client_grpc_sent_bytes_total")
}

/// Changes measured per scope.
const CHANGES: u32 = 10;
/// Endpoints of the big network, whose reading one change must not pay.
const BIG: u32 = 2000;

#[test]
fn a_change_to_one_network_reads_only_that_network_and_followers_apply_deltas() -> Result<()> {
    let (_lab, ns, etcd) = etcd("st-scope")?;
    let url = etcd.url();
    let etcd = &etcd;
    inside(&ns, async || {
        let store = Store::open(&url).await?;
        create_network(&store, "big", "198.18.0.0/20").await?;
        create_network(&store, "small", "198.19.0.0/24").await?;
        bulk_endpoints(etcd, "big", Ipv4Addr::new(198, 18, 0, 0), BIG).await?;
        let mut follower = store.subscribe().await?;

        // Paged reads: the whole store comes back, page after page.
        let all = store.load().await?;
        ensure!(
            all.endpoints.len() == BIG as usize,
            "{} listed",
            all.endpoints.len()
        );

        let per_change = async |scope: Scope<'_>, tag: &str| -> Result<f64> {
            let before = sent_bytes(etcd)?;
            for i in 0..CHANGES {
                let spec = container("small", "a", &format!("{tag}{i}"), None);
                store
                    .update_with(scope, |s| s.add_container(spec.clone()))
                    .await?;
            }
            Ok((sent_bytes(etcd)? - before) / f64::from(CHANGES))
        };
        // The finding: a change that reads the whole store pays for every
        // endpoint of every network.
        let whole = per_change(Scope::All, "w").await?;
        let scoped = per_change(Scope::Network("small"), "s").await?;
        eprintln!(
            "bytes etcd sent per connect with {BIG} endpoints elsewhere: {whole:.0} reading everything, {scoped:.0} reading one network"
        );
        ensure!(whole > 200_000.0, "a whole read sent only {whole:.0} bytes");
        ensure!(scoped < 16_384.0, "a scoped change sent {scoped:.0} bytes");

        // Removals, a network change and a held-back address arrive as
        // deltas; the follower's state equals a fresh read, and a copy
        // taken before catches up by copying the two networks changed.
        let before = store.load().await?;
        caught_up(&mut follower, before.revision).await?;
        let mut copy = Some(follower.borrow().state.clone());
        store
            .update_with(Scope::Network("small"), |s| {
                s.remove_container("small", "a", "w3")
            })
            .await?;
        store
            .update_with(Scope::Network("big"), |s| {
                s.remove_endpoint("big", Ipv4Addr::new(198, 18, 0, 9))
            })
            .await?;
        let fresh = store.load().await?;
        caught_up(&mut follower, fresh.revision).await?;
        let followed = follower.borrow().state.clone();
        let dirty = catch_up(&mut copy, &follower.borrow());
        let removed = |network: &str| {
            let changes = dirty.endpoints_of(network);
            changes.len() == 1 && changes[0].before.is_some() && changes[0].after.is_none()
        };
        ensure!(
            removed("big") && removed("small") && !dirty.covers("big") && !dirty.covers("small"),
            "the copy caught up with {dirty:?}"
        );
        let copy = sorted(copy.expect("caught up"));
        let (followed, fresh) = (sorted(followed), sorted(fresh));
        for (what, s) in [("follower's", &followed), ("caught-up copy's", &copy)] {
            ensure!(
                s.networks == fresh.networks
                    && s.endpoints == fresh.endpoints
                    && s.released == fresh.released
                    && s.alive == fresh.alive,
                "the {what} state differs from a fresh read"
            );
        }
        Ok(())
    })
}

/// What `ovl connect` registers for namespace `netns` of node a.
fn request(network: &str, netns: &str, name: Option<&str>, ip: Option<Ipv4Addr>) -> Request {
    Request {
        ports: Vec::new(),
        network: network.into(),
        node: "a".into(),
        netns: netns.into(),
        ifname: None,
        fallback_name: None,
        name: name.map(str::to_owned),
        aliases: Vec::new(),
        ip,
        subnet: None,
        owner: None,
        mac: None,
    }
}

#[test]
fn a_connect_reads_a_few_keys_however_big_its_network() -> Result<()> {
    let (_lab, ns, etcd) = etcd("st-around")?;
    let url = etcd.url();
    let etcd = &etcd;
    inside(&ns, async || {
        let store = Store::open(&url).await?;
        create_network(&store, "big", "198.18.0.0/20").await?;
        create_network(&store, "old", "198.19.0.0/24").await?;
        let base = Ipv4Addr::new(198, 18, 0, 0);
        bulk(etcd, "big", base, BIG, true).await?;
        bulk_endpoints(etcd, "old", Ipv4Addr::new(198, 19, 0, 0), 20).await?;
        let at = |i: u32| Ipv4Addr::from(u32::from(base) + i);

        // The finding: reading the network, a connect pays for each of its
        // endpoints.
        let before = sent_bytes(etcd)?;
        connect(&store, container("big", "a", "whole", Some(at(3000)))).await?;
        let whole = sent_bytes(etcd)? - before;

        // The connect every front end makes, asking for an address and
        // not: a few keys, and the bare keys of the taken addresses.
        let before = sent_bytes(etcd)?;
        for i in 0..CHANGES {
            attachment::register(
                &store,
                &request("big", &format!("p{i}"), None, Some(at(3001 + i))),
            )
            .await?;
        }
        let asked = (sent_bytes(etcd)? - before) / f64::from(CHANGES);
        let before = sent_bytes(etcd)?;
        let (picked, _, _) = attachment::register(&store, &request("big", "q", None, None)).await?;
        let allocating = sent_bytes(etcd)? - before;
        eprintln!(
            "bytes etcd sent per connect to a network of {BIG}: {whole:.0} reading it whole, {asked:.0} with an address asked for, {allocating:.0} picking one"
        );
        ensure!(whole > 300_000.0, "a whole read sent only {whole:.0} bytes");
        ensure!(asked < 8_192.0, "a connect sent {asked:.0} bytes");
        ensure!(
            allocating < whole / 3.0,
            "picking an address sent {allocating:.0} bytes"
        );
        // The lowest free address, past every taken one it read as a key.
        ensure!(picked.ip == at(2 + BIG), "picked {}", picked.ip);

        // Checks still see what they did not read whole: a taken name (in
        // any case) names its holder; a second attachment is refused.
        let taken = attachment::register(&store, &request("big", "r", Some("S-198.18.0.9"), None))
            .await
            .unwrap_err();
        ensure!(
            matches!(&taken, StoreError::Rejected(ModelError::NameTaken { ip, .. }) if *ip == at(9)),
            "{taken}"
        );
        // With a fallback (as CNI gives the short container ID) the clash
        // is no failure: the fallback's claim is read in the same change,
        // so it is taken only when free and a held one names its holder.
        let mut fell_back = request("big", "r", Some("S-198.18.0.9"), None);
        fell_back.fallback_name = Some("s-198.18.0.10".into());
        let held = attachment::register(&store, &fell_back).await.unwrap_err();
        ensure!(
            matches!(&held, StoreError::Rejected(ModelError::NameTaken { ip, .. }) if *ip == at(10)),
            "{held}"
        );
        fell_back.fallback_name = Some("r-short-id".into());
        let (r, _, _) = attachment::register(&store, &fell_back).await?;
        ensure!(r.name == "r-short-id", "{r:?}");
        let twice = attachment::register(&store, &request("big", "q", Some("other"), None))
            .await
            .unwrap_err();
        ensure!(
            matches!(
                twice,
                StoreError::Rejected(ModelError::AlreadyConnected { .. })
            ),
            "{twice}"
        );
        // A disconnect takes the endpoint and both its claims.
        attachment::unregister(&store, "a", "big", "q").await?;
        let mut raw =
            etcd_client::Client::connect([format!("http://{}", etcd.endpoint())], None).await?;
        for key in ["/ovl/names/big/q", "/ovl/attachments/big/a/q"] {
            ensure!(
                raw.get(key, None).await?.kvs().is_empty(),
                "{key} left behind"
            );
        }
        ensure!(
            !store
                .load()
                .await?
                .endpoints
                .iter()
                .any(|e| e.ip == picked.ip),
            "endpoint left behind"
        );

        // A network an older ovl wrote without claims is read whole: its
        // names are still unique.
        let old = attachment::register(&store, &request("old", "o", Some("s-198.19.0.5"), None))
            .await
            .unwrap_err();
        ensure!(
            matches!(old, StoreError::Rejected(ModelError::NameTaken { .. })),
            "{old}"
        );
        Ok(())
    })
}

#[test]
fn a_read_of_one_network_counts_the_endpoints_of_the_others_for_the_capacity_checks() -> Result<()>
{
    let (_lab, ns, etcd) = etcd("st-count")?;
    let url = etcd.url();
    inside(&ns, async || {
        let store = Store::open(&url).await?;
        create_network(&store, "a", "198.18.0.0/24").await?;
        create_network(&store, "b", "198.18.1.0/24").await?;
        populate(&store, "a", "n1", 3).await?;
        populate(&store, "b", "n1", 5).await?;
        for (scope, read, elsewhere) in [
            (Scope::Network("a"), 3, 5),
            (Scope::Network("b"), 5, 3),
            (Scope::Networks, 0, 8),
            (Scope::All, 8, 0),
        ] {
            let s = store.load_in(scope).await?;
            ensure!(
                (s.endpoints.len(), s.endpoints_elsewhere) == (read, elsewhere),
                "{scope:?}: read {} and counted {} elsewhere, expected {read} and {elsewhere}",
                s.endpoints.len(),
                s.endpoints_elsewhere
            );
        }
        Ok(())
    })
}

/// Rounds of the MAC race: each gives one MAC to two containers at once.
const MAC_RACES: usize = 40;

/// The `i`th MAC a test gives (outside ovl's 02:42 block).
fn given_mac(i: usize) -> MacAddr {
    let [_, _, hi, lo] = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
    MacAddr([0x0a, 0, 0x5e, 0, hi, lo])
}

/// The endpoints of `network` the store holds with `mac`.
async fn holders_of(store: &Store, network: &str, mac: MacAddr) -> Result<Vec<Endpoint>> {
    Ok(store
        .load()
        .await?
        .endpoints
        .into_iter()
        .filter(|e| e.network == network && e.mac == mac)
        .collect())
}

/// The claim of `mac` on `network` as etcd holds it (its value), if any.
async fn mac_claim(etcd: &Etcd, network: &str, mac: MacAddr) -> Result<Option<String>> {
    claim(etcd, &format!("/ovl/macs/{network}/{mac}")).await
}

/// The claim at `key` as etcd holds it (its value), if any.
async fn claim(etcd: &Etcd, key: &str) -> Result<Option<String>> {
    let mut raw =
        etcd_client::Client::connect([format!("http://{}", etcd.endpoint())], None).await?;
    let got = raw.get(key, None).await?;
    Ok(got
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

/// Whether a claim's value (`claim`) points at the endpoint at `ip`.
fn points_at(claim: Option<&str>, ip: Ipv4Addr) -> bool {
    claim.is_some_and(|c| c.contains(&format!("\"{ip}\"")))
}

/// Two hosts (two connections to etcd, as two `ovl connect` on two
/// machines have) connect a container each with one MAC at the same
/// moment, round after round: both read the network before either
/// commits. Exactly one gets the MAC; the other is refused naming it and
/// changes nothing.
#[test]
fn of_two_connects_giving_one_mac_at_once_exactly_one_wins_every_time() -> Result<()> {
    let (_lab, ns, etcd) = etcd("st-mac-race")?;
    let url = etcd.url();
    let etcd = &etcd;
    inside(&ns, async || {
        let host_a = Store::open(&url).await?;
        let host_b = Store::open(&url).await?;
        create_network(&host_a, "n", "198.18.0.0/22").await?;
        let racer = |node: &str, netns: String, mac| Request {
            node: node.into(),
            mac: Some(mac),
            ..request("n", &netns, None, None)
        };
        for round in 0..MAC_RACES {
            let mac = given_mac(round);
            // Each at an address of its own (as `--ip` gives, or another
            // subnet): they collide on nothing but the MAC.
            let at = |subnet: u8| Some(Ipv4Addr::new(198, 18, subnet, 10 + round as u8));
            let (a, b) = (
                Request {
                    ip: at(1),
                    ..racer("a", format!("a{round}"), mac)
                },
                Request {
                    ip: at(2),
                    ..racer("b", format!("b{round}"), mac)
                },
            );
            let (on_a, on_b) = tokio::join!(
                attachment::register(&host_a, &a),
                attachment::register(&host_b, &b)
            );
            let (won, lost) = match (on_a, on_b) {
                (Ok((e, _, _)), Err(err)) | (Err(err), Ok((e, _, _))) => (e, err),
                (Ok((x, _, _)), Ok((y, _, _))) => bail!(
                    "round {round}: both got {mac}: {} at {} and {} at {}",
                    x.name,
                    x.ip,
                    y.name,
                    y.ip
                ),
                (Err(x), Err(y)) => bail!("round {round}: both refused: {x}; {y}"),
            };
            ensure!(
                matches!(&lost, StoreError::Rejected(ModelError::MacTaken { mac: m, holder, .. })
                    if *m == mac && *holder == won.name),
                "round {round}: the loser was refused with {lost}"
            );
            let text = lost.to_string();
            ensure!(
                text.contains(&mac.to_string()) && text.contains("give another MAC"),
                "{text}"
            );
            let holders = holders_of(&host_a, "n", mac).await?;
            ensure!(
                holders.len() == 1 && holders[0].ip == won.ip,
                "round {round}: {mac} held by {holders:?}"
            );
        }
        // The losers changed nothing: one endpoint per round.
        let state = host_b.load().await?;
        ensure!(
            state.endpoints.len() == MAC_RACES,
            "{} endpoints",
            state.endpoints.len()
        );

        // A claim goes with its endpoint — disconnect, endpoint rm, node
        // removal, network removal — and the MAC is free again at once.
        let mac = given_mac(0);
        let holder = holders_of(&host_a, "n", mac).await?.remove(0);
        let Location::Container { node, netns, .. } = &holder.location else {
            bail!("{holder:?} is no container");
        };
        attachment::unregister(&host_a, node, "n", netns).await?;
        ensure!(
            mac_claim(etcd, "n", mac).await?.is_none(),
            "disconnect left the claim"
        );
        let vtep = Ipv4Addr::new(203, 0, 113, 50);
        let ip = Ipv4Addr::new(198, 18, 3, 5);
        host_a
            .update_with(Scope::Network("n"), |s| {
                s.add_static("n", ip, Some(mac), vtep, None)
            })
            .await?;
        ensure!(
            mac_claim(etcd, "n", mac).await?.is_some(),
            "endpoint add claimed nothing"
        );
        let taken = attachment::register(&host_b, &racer("b", "late".into(), mac))
            .await
            .unwrap_err();
        ensure!(
            matches!(&taken, StoreError::Rejected(ModelError::MacTaken { ip: at, .. }) if *at == ip),
            "{taken}"
        );
        host_a
            .update_with(Scope::Network("n"), |s| s.remove_static("n", ip))
            .await?;
        ensure!(
            mac_claim(etcd, "n", mac).await?.is_none(),
            "endpoint rm left the claim"
        );

        let reg = short_lived_node(&host_b, "gone").await?;
        attachment::register(&host_b, &racer("gone", "g".into(), mac)).await?;
        drop(reg);
        wait_dead(&host_a, "gone").await?;
        ensure!(host_a.remove_node("gone").await? == 1);
        ensure!(
            mac_claim(etcd, "n", mac).await?.is_none(),
            "node rm left the claim"
        );

        // Every endpoint gone, the network goes with any claim left over
        // (one a node freed without, say).
        for e in host_a.load().await?.endpoints {
            if let Location::Container { node, netns, .. } = &e.location {
                attachment::unregister(&host_a, node, "n", netns).await?;
            }
        }
        let mut raw =
            etcd_client::Client::connect([format!("http://{}", etcd.endpoint())], None).await?;
        raw.put(
            format!("/ovl/macs/n/{mac}"),
            r#"{"schema":1,"ip":"198.18.0.9"}"#,
            None,
        )
        .await?;
        host_a
            .update_with(Scope::Network("n"), |s| s.remove_network("n").map(|_| ()))
            .await?;
        let left = raw
            .get(
                "/ovl/macs/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await?;
        ensure!(
            left.kvs().is_empty(),
            "{} MAC claims left with the network",
            left.kvs().len()
        );
        Ok(())
    })
}

/// A node back after its lease lapsed finds the MAC one of its containers
/// was given taken by a container of another node (its address is held
/// back, the MAC was free): the endpoint is not put back, the conflict
/// names the MAC and the holder, and one endpoint has the MAC. Once the
/// holder is gone, the next restore puts it back and claims the MAC again.
#[test]
fn a_returning_node_leaves_out_an_endpoint_whose_mac_another_container_took() -> Result<()> {
    let (_lab, ns, etcd) = etcd("st-mac-back")?;
    let url = etcd.url();
    let etcd = &etcd;
    inside(&ns, async || {
        let store = Store::open(&url).await?;
        create_network(&store, "n", "198.18.0.0/24").await?;
        let reg = short_lived_node(&store, "back").await?;
        let mac = given_mac(7);
        let with_mac = |node: &str, netns: &str| ContainerSpec {
            mac: Some(mac),
            ..container("n", node, netns, None)
        };
        let mine = connect(&store, with_mac("back", "c1")).await?;
        let plain = connect(&store, container("n", "back", "c2", None)).await?;
        ensure!(free_when_dead(&store, "back", reg).await? == 2);
        ensure!(
            mac_claim(etcd, "n", mac).await?.is_none(),
            "freeing left the claim"
        );
        // Meanwhile a container of another node is given the MAC.
        let thief = connect(&store, with_mac("other", "t1")).await?;
        ensure!(thief.ip != mine.ip, "{} handed out again", mine.ip);

        let out = store
            .restore_endpoints("back", &[mine.clone(), plain.clone()])
            .await?;
        ensure!(out.restored == [plain.clone()], "{out:?}");
        ensure!(out.conflicts.len() == 1, "{:?}", out.conflicts);
        let c = &out.conflicts[0];
        ensure!(
            c.ip == mine.ip
                && c.holder_name == thief.name
                && c.mac
                    .is_some_and(|m| m.mac == mac && m.holder_ip == thief.ip),
            "{c:?}"
        );
        let text = c.to_string();
        ensure!(
            text.contains(&format!("MAC {mac}")) && text.contains("reconnect it"),
            "{text}"
        );
        let holders = holders_of(&store, "n", mac).await?;
        ensure!(holders == [thief.clone()], "{mac} held by {holders:?}");
        ensure!(
            store.load().await?.conflicts.get("back") == Some(&out.conflicts),
            "the conflict is not recorded under the node"
        );

        // The holder goes: the endpoint comes back, its MAC claimed (a
        // claim left over, pointing at no endpoint, taken over).
        store
            .update_with(Scope::Network("n"), |s| {
                s.remove_container("n", "other", "t1")
            })
            .await?;
        ensure!(
            mac_claim(etcd, "n", mac).await?.is_none(),
            "disconnect left the claim"
        );
        let mut raw =
            etcd_client::Client::connect([format!("http://{}", etcd.endpoint())], None).await?;
        raw.put(
            format!("/ovl/macs/n/{mac}"),
            r#"{"schema":1,"ip":"198.18.0.99"}"#,
            None,
        )
        .await?;
        let healed = store
            .restore_endpoints("back", &[mine.clone(), plain])
            .await?;
        ensure!(
            healed.restored == [mine.clone()] && healed.conflicts.is_empty(),
            "{healed:?}"
        );
        ensure!(!store.load().await?.conflicts.contains_key("back"));
        let claim = mac_claim(etcd, "n", mac).await?;
        ensure!(
            claim
                .as_deref()
                .is_some_and(|c| c.contains(&format!("\"{}\"", mine.ip))),
            "restored with the claim {claim:?}"
        );
        let late = attachment::register(
            &store,
            &Request {
                mac: Some(mac),
                ..request("n", "late", None, None)
            },
        )
        .await
        .unwrap_err();
        ensure!(
            matches!(&late, StoreError::Rejected(ModelError::MacTaken { ip, .. }) if *ip == mine.ip),
            "{late}"
        );
        Ok(())
    })
}

/// A node back after its lease lapsed finds the name of one of its
/// containers taken by a container of another node (its address is held
/// back and its MAC derived from it: both free). The endpoint is put back
/// under its fallback name (its namespace's), which it claims in the
/// restore; the holder keeps the name and its claim, and exactly one
/// endpoint is called so.
#[test]
fn a_returning_node_puts_back_an_endpoint_whose_name_another_took_under_its_fallback() -> Result<()>
{
    let (_lab, ns, etcd) = etcd("st-name-back")?;
    let url = etcd.url();
    let etcd = &etcd;
    inside(&ns, async || {
        let store = Store::open(&url).await?;
        create_network(&store, "n", "198.18.0.0/24").await?;
        let reg = short_lived_node(&store, "back").await?;
        let named = |node: &str, netns: &str, name: &str| ContainerSpec {
            name: Some(name.into()),
            ..container("n", node, netns, None)
        };
        let mine = connect(&store, named("back", "/run/netns/c1", "db")).await?;
        let plain = connect(&store, container("n", "back", "c2", None)).await?;
        ensure!(free_when_dead(&store, "back", reg).await? == 2);
        ensure!(
            claim(etcd, "/ovl/names/n/db").await?.is_none(),
            "freeing left the claim"
        );
        // Meanwhile a container of another node is called DB.
        let holder = connect(&store, named("other", "t1", "DB")).await?;
        ensure!(holder.ip != mine.ip, "{} handed out again", mine.ip);

        let out = store
            .restore_endpoints("back", &[mine.clone(), plain.clone()])
            .await?;
        let back = Endpoint {
            name: "c1".into(),
            ..mine.clone()
        };
        ensure!(
            out.restored == [back.clone(), plain.clone()] && out.conflicts.is_empty(),
            "{out:?}"
        );
        let r = &out.renamed;
        ensure!(
            r.len() == 1
                && (r[0].from.as_str(), r[0].to.as_str(), r[0].holder_ip)
                    == ("db", "c1", holder.ip),
            "{r:?}"
        );
        let state = store.load().await?;
        let called: Vec<Ipv4Addr> = state
            .endpoints
            .iter()
            .filter(|e| e.network == "n" && e.name.eq_ignore_ascii_case("db"))
            .map(|e| e.ip)
            .collect();
        ensure!(called == [holder.ip], "db is the name of {called:?}");
        ensure!(state.endpoints.contains(&back), "{:?}", state.endpoints);
        ensure!(!state.conflicts.contains_key("back"));
        // The claims: the taken name's stays the holder's; the fallback
        // and the other endpoint's own name are claimed by the restore.
        let db = claim(etcd, "/ovl/names/n/db").await?;
        ensure!(points_at(db.as_deref(), holder.ip), "db claimed by {db:?}");
        let c1 = claim(etcd, "/ovl/names/n/c1").await?;
        ensure!(points_at(c1.as_deref(), mine.ip), "c1 claimed by {c1:?}");
        let c2 = claim(etcd, "/ovl/names/n/c2").await?;
        ensure!(points_at(c2.as_deref(), plain.ip), "c2 claimed by {c2:?}");
        let late = attachment::register(&store, &request("n", "late", Some("C1"), None))
            .await
            .unwrap_err();
        ensure!(
            matches!(&late, StoreError::Rejected(ModelError::NameTaken { ip, .. }) if *ip == mine.ip),
            "{late}"
        );
        // Next time both are present: the rename is reported once.
        let again = store.restore_endpoints("back", &[mine, plain]).await?;
        ensure!(
            again.present == 2 && again.restored.is_empty() && again.renamed.is_empty(),
            "{again:?}"
        );
        Ok(())
    })
}

/// What the [`Severing`] proxy does to the next request it sees.
const PASS: u8 = 0;
/// Forwards it to etcd, which serves it, and then closes the client's
/// connection without its answer: a member lost after committing.
const LOSE_ANSWER: u8 = 1;
/// Closes the client's connection without forwarding it: a member lost
/// before the request reached it.
const LOSE_REQUEST: u8 = 2;

/// A TCP proxy in front of etcd that can lose one request's answer, or
/// the request itself, on command ([`LOSE_ANSWER`], [`LOSE_REQUEST`]).
struct Severing {
    addr: std::net::SocketAddr,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
}

impl Severing {
    /// Listens on an ephemeral port of 127.0.0.1, forwarding to `upstream`.
    async fn start(upstream: String) -> Result<Severing> {
        use std::sync::{Arc, atomic::AtomicU8};
        let listener = tokio::net::TcpListener::bind((LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(AtomicU8::new(PASS));
        let shared = mode.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = shared.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(upstream).await {
                        Self::relay(client, server, &mode).await;
                    }
                });
            }
        });
        Ok(Severing { addr, mode })
    }

    /// Relays between `client` and `server` until either closes, or until
    /// the mode severs the connection.
    async fn relay(
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        mode: &std::sync::atomic::AtomicU8,
    ) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        let (mut up, mut down) = ([0u8; 16384], [0u8; 16384]);
        loop {
            tokio::select! {
                n = client_rx.read(&mut up) => {
                    let Ok(n @ 1..) = n else { return };
                    match mode.swap(PASS, Ordering::SeqCst) {
                        LOSE_REQUEST => return,
                        LOSE_ANSWER => {
                            // The request, and whatever of it follows
                            // within a moment, reaches etcd; nothing comes
                            // back.
                            if server_tx.write_all(&up[..n]).await.is_err() {
                                return;
                            }
                            let more = tokio::time::timeout(
                                Duration::from_millis(300),
                                tokio::io::copy(&mut client_rx, &mut server_tx),
                            );
                            let _ = more.await;
                            return;
                        }
                        _ => {
                            if server_tx.write_all(&up[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                n = server_rx.read(&mut down) => {
                    let Ok(n @ 1..) = n else { return };
                    if client_tx.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Arms `mode` for the next request.
    fn arm(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a request met the armed mode.
    fn fired(&self) -> bool {
        self.mode.load(std::sync::atomic::Ordering::SeqCst) == PASS
    }
}

/// A change whose commit etcd served but whose answer was lost, or whose
/// request was lost, is made once: ovl looks the commit up before sending
/// it again, and reports what it made — not "already exists" or
/// "already connected", and not a second endpoint.
#[test]
fn a_change_whose_commit_or_its_answer_was_lost_is_made_exactly_once() -> Result<()> {
    let (_lab, ns, etcd) = etcd("st-lost")?;
    let etcd = &etcd;
    inside(&ns, async || {
        let proxy = Severing::start(etcd.endpoint()).await?;
        let store = Store::open(&format!("etcd://{}", proxy.addr)).await?;
        for (mode, network, netns) in [
            (LOSE_ANSWER, "answered", "c1"),
            (LOSE_REQUEST, "unsent", "c2"),
        ] {
            // The change ran once, the proxy lost what it was armed to,
            // and the commit was looked up once (`looked_up` before it).
            let made_once = |what: &str, runs: u32, looked_up: u64| -> Result<()> {
                ensure!(runs == 1, "{what} ran {runs} times (mode {mode})");
                ensure!(proxy.fired(), "no request met mode {mode}");
                let n = ovl_userspace::store::etcd_commits_looked_up() - looked_up;
                ensure!(n == 1, "{what} looked up {n} times (mode {mode})");
                Ok(())
            };
            // Armed by the change itself: between its read and its commit.
            let looked_up = ovl_userspace::store::etcd_commits_looked_up();
            let mut runs = 0;
            store
                .update_with(Scope::Networks, |s| {
                    runs += 1;
                    proxy.arm(mode);
                    s.create_network(NetworkSpec::new(
                        network,
                        "198.18.0.0/24".parse().expect("a valid subnet"),
                    ))
                    .map(|_| ())
                })
                .await
                .with_context(|| format!("network create, mode {mode}"))?;
            made_once("network create", runs, looked_up)?;
            let looked_up = ovl_userspace::store::etcd_commits_looked_up();
            let mut runs = 0;
            let spec = container(network, "a", netns, None);
            let made = store
                .update_with(Scope::Network(network), |s| {
                    runs += 1;
                    proxy.arm(mode);
                    s.add_container(spec.clone())
                })
                .await
                .with_context(|| format!("connect, mode {mode}"))?;
            made_once("connect", runs, looked_up)?;
            let state = store.load().await?;
            let vnis = etcd.keys("/ovl/vnis/")?;
            ensure!(
                state.networks.contains_key(network) && vnis.len() == state.networks.len(),
                "networks {:?}, VNI claims {vnis:?}",
                state.networks.keys()
            );
            let endpoints: Vec<&Endpoint> = state.endpoints_of(network).collect();
            ensure!(
                endpoints.len() == 1 && endpoints[0].ip == made.ip,
                "connected once at {}, the store holds {endpoints:?}",
                made.ip
            );
            let keys = etcd.keys(&format!("/ovl/endpoints/{network}/"))?;
            ensure!(keys.len() == 1, "endpoint keys {keys:?}");
        }
        Ok(())
    })
}
