//! Changes that concern a whole node and may touch any number of its
//! endpoints: freeing a dead node's endpoints, removing a node, putting
//! back a returning node's endpoints. Each is split into transactions
//! within etcd's limits, every one of them carrying the guard that makes
//! it safe on its own (the node is still dead; the address is still free).

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{
    ENDPOINTS, EtcdStore, MAX_ATTEMPTS, MAX_TXN_OPS, Range, Snapshot, Written, WrittenKey,
    codec::{
        ALIVE, ConflictsRecord, NODES, alive_key, claim_value_of, claims_of, conflicts_key,
        endpoint_key, holder_of, json, mac_key, name_key, network_key, node_key, parse, port_key,
        ports_prefix, released_key,
    },
};
use crate::{
    model::{Endpoint, Location, ModelError, Network},
    release::{GraceClock, Released, RestoreOutcome, Verdict, fallback_names, judge},
    store::StoreError,
};

/// Compares of one transaction putting endpoints back at most: each
/// endpoint compares its key and release record (plus its network once),
/// the claim of the name it comes back under, one prefix per published
/// port and the claim of the MAC it was given.
const RESTORE_COMPARES: usize = MAX_TXN_OPS - 8;

/// How many of `mine`, from the first, one transaction puts back (at
/// least one). Its operations (the key, the release record's delete, the
/// name's claim, one claim per port, the MAC's claim) are fewer than its
/// compares.
fn restore_batch_len(mine: &[&Endpoint]) -> usize {
    let mut compares = 0;
    let mut n = 0;
    for e in mine {
        let need = 4 + e.ports.len() + usize::from(e.given_mac().is_some());
        if n > 0 && compares + need > RESTORE_COMPARES {
            break;
        }
        compares += need;
        n += 1;
    }
    n
}

impl EtcdStore {
    /// Registered nodes without a live agent.
    pub async fn dead_nodes(&self) -> Result<Vec<String>, StoreError> {
        let snap = self
            .read(&[Range::Prefix(NODES.into()), Range::Prefix(ALIVE.into())])
            .await?;
        let alive: BTreeSet<&str> = snap
            .kvs
            .keys()
            .filter_map(|k| k.strip_prefix(ALIVE))
            .collect();
        Ok(snap
            .kvs
            .keys()
            .filter_map(|k| k.strip_prefix(NODES))
            .filter(|n| !alive.contains(n))
            .map(str::to_owned)
            .collect())
    }

    async fn is_alive(&self, name: &str) -> Result<bool, StoreError> {
        let resp = self
            .repeatable("read liveness", |mut c| {
                let key = alive_key(name);
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(!resp.kvs().is_empty())
    }

    /// Deletes the endpoints of node `name` if it is still not alive.
    pub async fn forget_dead_node(&self, name: &str) -> Result<usize, StoreError> {
        Ok(self.free_endpoints_of(name).await?.unwrap_or(0))
    }

    /// Frees `name`'s endpoints in batches that each check the node is
    /// still dead and each endpoint unchanged since read, holding their
    /// addresses back. `None` when the node is (or came back) alive.
    async fn free_endpoints_of(&self, name: &str) -> Result<Option<usize>, StoreError> {
        if self.is_alive(name).await? {
            return Ok(None);
        }
        let snap = self.read(&[Range::Prefix(ENDPOINTS.into())]).await?;
        let mut theirs: Vec<(String, i64, Endpoint)> = snap
            .kvs
            .iter()
            .filter_map(|(k, (v, rev))| {
                let e: Endpoint = parse(k, v).ok()?;
                (e.node() == Some(name)).then(|| (k.clone(), *rev, e))
            })
            .collect();
        let mut freed = 0;
        while !theirs.is_empty() {
            let rest = theirs.split_off(free_batch(&theirs));
            let mut batch = std::mem::replace(&mut theirs, rest);
            let mut attempts = 0;
            while !batch.is_empty() {
                attempts += 1;
                if attempts > MAX_ATTEMPTS {
                    return Err(StoreError::Contended(MAX_ATTEMPTS));
                }
                let now = GraceClock::now(self.address_grace).now_ms;
                let mut compares = vec![Compare::create_revision(
                    alive_key(name),
                    CompareOp::Equal,
                    0,
                )];
                let mut ops = Vec::new();
                // Each endpoint's key is guarded as of its mod revision:
                // the first one's tells whether a copy committed.
                let mut written = Written {
                    revision: batch.first().map_or(0, |(_, rev, _)| *rev),
                    keys: Vec::new(),
                };
                for (key, rev, e) in &batch {
                    compares.push(Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev));
                    ops.extend(free_ops(key, e, now, &mut written.keys));
                }
                let txn = Txn::new().when(compares).and_then(ops);
                if self.commit(txn, &written).await?.is_some() {
                    freed += batch.len();
                    break;
                }
                if self.is_alive(name).await? {
                    return Ok(None);
                }
                // Someone else (another agent) freed or changed some of
                // them: keep those that are still the dead node's.
                batch = self.still_theirs(name, &batch).await?;
            }
        }
        Ok(Some(freed))
    }

    /// Those of `batch`'s keys that still hold an endpoint of `name`, with
    /// their current mod revisions.
    async fn still_theirs(
        &self,
        name: &str,
        batch: &[(String, i64, Endpoint)],
    ) -> Result<Vec<(String, i64, Endpoint)>, StoreError> {
        let keys: Vec<Range> = batch
            .iter()
            .map(|(k, _, _)| Range::Key(k.clone()))
            .collect();
        let snap = self.read(&keys).await?;
        Ok(snap
            .kvs
            .iter()
            .filter_map(|(k, (v, rev))| {
                let e: Endpoint = parse(k, v).ok()?;
                (e.node() == Some(name)).then(|| (k.clone(), *rev, e))
            })
            .collect())
    }

    /// Removes dead node `name`: its endpoints (batched, each batch only
    /// while the node is dead), then its registration and conflicts.
    pub async fn remove_node(&self, name: &str) -> Result<usize, StoreError> {
        let registered = !self
            .repeatable("read the node", |mut c| {
                let key = node_key(name);
                async move { c.get(key, None).await }
            })
            .await?
            .kvs()
            .is_empty();
        let Some(freed) = self.free_endpoints_of(name).await? else {
            return Err(StoreError::NodeAlive(name.to_owned()));
        };
        if !registered && freed == 0 {
            return Err(ModelError::NoSuchNode(name.to_owned()).into());
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                alive_key(name),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::delete(node_key(name), None),
                TxnOp::delete(conflicts_key(name), None),
            ]);
        // Deletes while the node is dead: a second copy changes nothing.
        let resp = self
            .repeatable("remove the node", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            return Err(StoreError::NodeAlive(name.to_owned()));
        }
        Ok(freed)
    }

    /// Puts back `node`'s endpoints in `wanted` that the store lost, in
    /// batches; an address another endpoint holds now, or a given MAC
    /// another endpoint of the network claims now, is a conflict, recorded
    /// under the node. One whose name another endpoint claims now comes
    /// back under a fallback name, which it claims.
    pub async fn restore_endpoints(
        &self,
        node: &str,
        wanted: &[Endpoint],
    ) -> Result<RestoreOutcome, StoreError> {
        let mine: Vec<&Endpoint> = wanted.iter().filter(|e| e.node() == Some(node)).collect();
        let mut out = RestoreOutcome::default();
        let mut rest = mine.as_slice();
        while !rest.is_empty() {
            let (batch, after) = rest.split_at(restore_batch_len(rest));
            self.restore_batch(batch, &mut out).await?;
            rest = after;
        }
        // The node's own record, written by its agent alone: a second
        // copy changes nothing.
        if out.conflicts.is_empty() {
            self.repeatable("clear conflicts", |mut c| {
                let key = conflicts_key(node);
                async move { c.delete(key, None).await }
            })
            .await?;
        } else {
            let record = json(ConflictsRecord {
                conflicts: out.conflicts.clone(),
            });
            self.repeatable("record conflicts", |mut c| {
                let (key, record) = (conflicts_key(node), record.clone());
                async move { c.put(key, record, None).await }
            })
            .await?;
        }
        Ok(out)
    }

    async fn restore_batch(
        &self,
        batch: &[&Endpoint],
        out: &mut RestoreOutcome,
    ) -> Result<(), StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let networks: BTreeSet<&str> = batch.iter().map(|e| e.network.as_str()).collect();
            let mut ranges: Vec<Range> = networks
                .iter()
                .map(|n| Range::Key(network_key(n)))
                .collect();
            for e in batch {
                ranges.push(Range::Key(endpoint_key(&e.network, e.ip)));
                ranges.push(Range::Key(released_key(&e.network, e.ip)));
                if let Location::Container { node, .. } = &e.location {
                    ranges.extend(e.ports.iter().map(|p| Range::Prefix(ports_prefix(node, p))));
                }
                ranges.extend(e.given_mac().map(|m| Range::Key(mac_key(&e.network, m))));
                ranges.extend(name_claims(e).into_iter().map(Range::Key));
            }
            let mut snap = self.read(&ranges).await?;
            // The endpoints the MAC and name claims point at, at the same
            // revision.
            let holders: BTreeSet<String> = batch
                .iter()
                .flat_map(|e| {
                    let mac = mac_claim_holder(&snap, e);
                    let names = name_claims(e)
                        .into_iter()
                        .filter_map(|claim| claim_holder(&snap, &claim, e));
                    mac.into_iter().chain(names).collect::<Vec<_>>()
                })
                .filter(|k| !snap.kvs.contains_key(k))
                .collect();
            let holders: Vec<Range> = holders.into_iter().map(Range::Key).collect();
            if !holders.is_empty() {
                self.read_into(&holders, &mut snap).await?;
            }
            let now = GraceClock::now(self.address_grace).now_ms;
            let mut verdicts = Vec::new();
            let mut compares = Vec::new();
            let mut ops = Vec::new();
            let mut written = Written {
                revision: snap.revision,
                keys: Vec::new(),
            };
            let mut guarded_networks = BTreeMap::new();
            let mut unpublished = Vec::new();
            // MACs this transaction claims: one claim per key and
            // transaction (etcd refuses a key put twice in one).
            let mut claimed: BTreeMap<String, Endpoint> = BTreeMap::new();
            // Likewise the names it claims.
            let mut named_here: BTreeMap<String, Endpoint> = BTreeMap::new();
            for e in batch {
                let key = endpoint_key(&e.network, e.ip);
                let Ok(holder) = holder_in(&snap, &key) else {
                    // Something unreadable holds the address: leave it.
                    continue;
                };
                let mac_claim = e.given_mac().map(|m| mac_key(&e.network, m));
                let mac_holder = match (&mac_claim, mac_claim_holder(&snap, e)) {
                    (Some(claim), _) if claimed.contains_key(claim) => claimed.get(claim).cloned(),
                    (_, Some(k)) => match holder_in(&snap, &k) {
                        Ok(h) => h,
                        // Unreadable: whose MAC it is cannot be told.
                        Err(()) => continue,
                    },
                    _ => None,
                };
                // Who is called by its name or a fallback: whom each
                // claim points at, or what this transaction claims.
                let mut named = Vec::new();
                let mut unreadable = false;
                for claim in name_claims(e) {
                    if let Some(h) = named_here.get(&claim) {
                        named.push(h.clone());
                    } else if let Some(k) = claim_holder(&snap, &claim, e) {
                        match holder_in(&snap, &k) {
                            Ok(h) => named.extend(h),
                            Err(()) => unreadable = true,
                        }
                    }
                }
                if unreadable {
                    // Whose name it is cannot be told.
                    continue;
                }
                let named: Vec<&Endpoint> = named.iter().collect();
                let net = network_key(&e.network);
                let network = snap.kvs.get(&net).and_then(|(v, _)| {
                    parse::<Network>(&net, v)
                        .map_err(|e| log::error!("{e}"))
                        .ok()
                });
                let verdict = judge(
                    e,
                    holder.as_ref(),
                    mac_holder.as_ref(),
                    &named,
                    network.as_ref(),
                    now,
                );
                let mut e = match &verdict {
                    Verdict::Rename(how) => how.apply(e),
                    _ => (*e).clone(),
                };
                if matches!(verdict, Verdict::Restore | Verdict::Rename(..)) {
                    // The claim of the name it comes back under, as read
                    // (absent, or left pointing at an endpoint not called
                    // so): a connect taking the name meanwhile changed it,
                    // and this commit fails. A name another holds is not
                    // written: its claim stays the holder's.
                    let claim = name_key(&e.network, &e.name);
                    put_as_read(
                        (&mut compares, &mut ops, &mut written),
                        &snap,
                        &claim,
                        claim_value_of(&claim, &e),
                    );
                    named_here.insert(claim, e.clone());
                    // Its MAC's claim, as read (absent, or left pointing at
                    // an endpoint without that MAC): a connect giving the
                    // MAC meanwhile changed it, and this commit fails.
                    if let Some(claim) = mac_claim {
                        put_as_read(
                            (&mut compares, &mut ops, &mut written),
                            &snap,
                            &claim,
                            claim_value_of(&claim, &e),
                        );
                        claimed.insert(claim, e.clone());
                    }
                    // Its published ports, unless another endpoint of the
                    // node publishes one now: claimed again, guarded like a
                    // connect's.
                    let taken = taken_ports(&snap, &key, &e);
                    e.ports.retain(|p| !taken.contains(p));
                    unpublished.extend(taken.into_iter().map(|p| (e.clone(), p)));
                    if let Location::Container { node, .. } = &e.location {
                        for p in &e.ports {
                            let prefix = ports_prefix(node, p);
                            compares.push(
                                Compare::create_revision(
                                    prefix.as_str(),
                                    CompareOp::Less,
                                    snap.revision + 1,
                                )
                                .with_prefix(),
                            );
                            let claim = port_key(node, p);
                            if !snap.kvs.contains_key(&claim) {
                                let value = claim_value_of(&claim, &e);
                                put(&mut ops, &mut written, &snap, &claim, value);
                            }
                        }
                    }
                    compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
                    let rel = released_key(&e.network, e.ip);
                    compares.push(Compare::mod_revision(
                        rel.as_str(),
                        CompareOp::Equal,
                        snap.mod_rev(&rel),
                    ));
                    guarded_networks.entry(net.clone()).or_insert_with(|| {
                        Compare::mod_revision(net.as_str(), CompareOp::Equal, snap.mod_rev(&net))
                    });
                    put(&mut ops, &mut written, &snap, &key, json(&e));
                    if snap.kvs.contains_key(&rel) {
                        ops.push(TxnOp::delete(rel.as_str(), None));
                        written.keys.push((
                            rel.clone(),
                            WrittenKey {
                                value: None,
                                was_present: true,
                            },
                        ));
                    }
                }
                verdicts.push((e, verdict));
            }
            compares.extend(guarded_networks.into_values());
            if !ops.is_empty() {
                let txn = Txn::new().when(compares).and_then(ops);
                if self.commit(txn, &written).await?.is_none() {
                    // Something changed since the read: judge again.
                    continue;
                }
            }
            for (e, verdict) in verdicts {
                match verdict {
                    Verdict::Present => out.present += 1,
                    Verdict::Restore => out.restored.push(e),
                    Verdict::Rename(how) => {
                        out.renamed.push(how);
                        out.restored.push(e);
                    }
                    Verdict::NetworkGone => out.networks_gone.push(e),
                    Verdict::Superseded => {}
                    Verdict::Conflict(c) => out.conflicts.push(c),
                }
            }
            out.unpublished.extend(unpublished);
            return Ok(());
        }
        Err(StoreError::Contended(MAX_ATTEMPTS))
    }
}

/// A put of `value` at `key` (read in `snap`), in `ops` and `written`.
fn put(ops: &mut Vec<TxnOp>, written: &mut Written, snap: &Snapshot, key: &str, value: Vec<u8>) {
    ops.push(TxnOp::put(key, value.clone(), None));
    written.keys.push((
        key.to_owned(),
        WrittenKey {
            value: Some(value),
            was_present: snap.kvs.contains_key(key),
        },
    ));
}

/// [`put`], guarded by `key`'s mod revision as `snap` read it: the
/// commit fails if anyone changed the key since.
fn put_as_read(
    (compares, ops, written): (&mut Vec<Compare>, &mut Vec<TxnOp>, &mut Written),
    snap: &Snapshot,
    key: &str,
    value: Vec<u8>,
) {
    compares.push(Compare::mod_revision(
        key,
        CompareOp::Equal,
        snap.mod_rev(key),
    ));
    put(ops, written, snap, key, value);
}

/// What freeing endpoint `e` (at `key`) at `now_ms` writes: its key
/// deleted, its address held back, and each of its claims deleted if it
/// still names `e` (a name two endpoints hold, which only an older ovl
/// wrote, stays the other's) — a nested transaction each, one operation
/// of the outer one. The keys it surely writes are added to `written`.
fn free_ops(
    key: &str,
    e: &Endpoint,
    now_ms: u64,
    written: &mut Vec<(String, WrittenKey)>,
) -> Vec<TxnOp> {
    let held = released_key(&e.network, e.ip);
    let record = json(Released::of(e, now_ms));
    let mut ops = vec![
        TxnOp::delete(key, None),
        TxnOp::put(held.as_str(), record.clone(), None),
    ];
    written.push((
        key.to_owned(),
        WrittenKey {
            value: None,
            was_present: true,
        },
    ));
    written.push((
        held,
        WrittenKey {
            value: Some(record),
            was_present: false,
        },
    ));
    for claim in claims_of(e) {
        ops.push(TxnOp::txn(
            Txn::new()
                .when([Compare::value(
                    claim.as_str(),
                    CompareOp::Equal,
                    claim_value_of(&claim, e),
                )])
                .and_then([TxnOp::delete(claim.as_str(), None)]),
        ));
    }
    ops
}

/// Operations of the outer transaction freeing endpoints at most: etcd
/// lets each nested transaction have only what the outer one leaves of
/// the limit, and each claim's needs one.
const FREE_OPS: usize = MAX_TXN_OPS - 1;

/// How many of `theirs`, from the first, one transaction frees: as many
/// as fit [`FREE_OPS`], with the node-is-dead compare and one compare per
/// endpoint (at least one: an endpoint whose claims did not fit one
/// transaction could not have been written).
fn free_batch(theirs: &[(String, i64, Endpoint)]) -> usize {
    let mut ops = 0;
    let mut n = 0;
    for (_, _, e) in theirs {
        let need = 2 + claims_of(e).len();
        if n > 0 && (ops + need > FREE_OPS || n + 2 > FREE_OPS) {
            break;
        }
        ops += need;
        n += 1;
    }
    n
}

/// The published ports of endpoint `e` (at `key`) that a claim in `snap`
/// gives another endpoint: the same protocol and host port, on the same
/// address or on every address.
fn taken_ports(snap: &Snapshot, key: &str, e: &Endpoint) -> Vec<crate::ports::PublishedPort> {
    let Location::Container { node, .. } = &e.location else {
        return Vec::new();
    };
    e.ports
        .iter()
        .filter(|p| {
            let prefix = ports_prefix(node, p);
            snap.kvs
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .any(|(k, (v, _))| {
                    // The claim's port: `p`'s, on the address its key names.
                    let claimed = k[prefix.len()..].parse::<std::net::Ipv4Addr>().map(|ip| {
                        crate::ports::PublishedPort {
                            host_ip: Some(ip).filter(|ip| !ip.is_unspecified()),
                            ..**p
                        }
                    });
                    claimed.is_ok_and(|c| c.overlaps(p)) && holder_of(k, v).as_deref() != Some(key)
                })
        })
        .copied()
        .collect()
}

/// The endpoint (its key) that the claim in `snap` of the MAC `e` was
/// given points at, when it is another than `e`.
fn mac_claim_holder(snap: &Snapshot, e: &Endpoint) -> Option<String> {
    claim_holder(snap, &mac_key(&e.network, e.given_mac()?), e)
}

/// The key of the endpoint other than `e` that `claim` points at in
/// `snap`, if any.
fn claim_holder(snap: &Snapshot, claim: &str, e: &Endpoint) -> Option<String> {
    let (value, _) = snap.kvs.get(claim)?;
    holder_of(claim, value).filter(|k| *k != endpoint_key(&e.network, e.ip))
}

/// The claims of `e`'s name and of each name it could be put back under
/// instead ([`fallback_names`]).
fn name_claims(e: &Endpoint) -> Vec<String> {
    std::iter::once(e.name.clone())
        .chain(fallback_names(e))
        .map(|n| name_key(&e.network, &n))
        .collect()
}

/// The endpoint at `key` in `snap`, if any; an error (logged) when the
/// key holds something unreadable.
fn holder_in(snap: &Snapshot, key: &str) -> Result<Option<Endpoint>, ()> {
    let Some((value, _)) = snap.kvs.get(key) else {
        return Ok(None);
    };
    parse::<Endpoint>(key, value)
        .map(Some)
        .map_err(|e| log::error!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec, State};

    #[test]
    fn a_dead_nodes_endpoints_are_freed_with_their_claims_within_the_operation_limit() {
        let mut s = State::default();
        s.create_network(NetworkSpec::new("blue", "198.18.0.0/22".parse().unwrap()))
            .unwrap();
        let mut theirs = Vec::new();
        for i in 0..300 {
            let e = s
                .add_container(ContainerSpec {
                    ports: Vec::new(),
                    attacher: None,
                    network: "blue".into(),
                    node: "dead".into(),
                    netns: format!("c{i}"),
                    name: None,
                    ip: None,
                    owner: None,
                    subnet: None,
                    mac: None,
                })
                .unwrap();
            let e = if i % 7 == 0 {
                s.set_names(
                    "blue",
                    e.ip,
                    None,
                    vec![format!("alias{i}"), format!("x{i}")],
                )
                .unwrap()
            } else {
                e
            };
            theirs.push((endpoint_key("blue", e.ip), 1, e));
        }
        let mut freed = 0;
        let mut batches = 0;
        while !theirs.is_empty() {
            let rest = theirs.split_off(free_batch(&theirs));
            let ops: usize = theirs
                .iter()
                .map(|(k, _, e)| free_ops(k, e, 0, &mut Vec::new()).len())
                .sum();
            assert!(ops <= FREE_OPS, "{ops} operations");
            assert!(theirs.len() < FREE_OPS);
            // Each endpoint: delete, hold back, the claims of its name
            // (its aliases, shared, have none) and its attachment.
            for (k, _, e) in &theirs {
                assert_eq!(free_ops(k, e, 0, &mut Vec::new()).len(), 2 + 1 + 1);
            }
            freed += theirs.len();
            batches += 1;
            theirs = rest;
        }
        assert_eq!(freed, 300);
        assert!(batches <= 11, "{batches} transactions for 300 endpoints");
    }
}
