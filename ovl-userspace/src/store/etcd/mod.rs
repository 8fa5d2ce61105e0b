//! The etcd v3 store: the state as versioned JSON values under `/ovl/`
//! (schema in `codec`), changed by compare-and-swap transactions that read
//! only the part of the store a change needs (and committed once through a
//! leader election: `commit`), followed by list + watch
//! (`follow`), node liveness as a lease (`liveness`), and the node-wide
//! changes that must be split to fit etcd's limits (`nodes`).

mod access;
mod around;
mod codec;
mod follow;
mod limits;
mod liveness;
mod members;
mod nodes;
mod turns;
mod wireguard;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::Arc,
    time::Duration,
};

pub use codec::KEY_PREFIX;
use codec::{
    ATTACHMENTS, CLUSTER_KEY, ENDPOINTS, MACS, NAMES, NETWORKS, NODES, PORTS, RELEASED, SCHEMA_KEY,
    VNIS, decode, encode, endpoint_key, is_index_key, network_and_ip, network_key, prefix_end,
    released_key,
};
use etcd_client::{Compare, CompareOp, GetOptions, GetResponse, Txn, TxnOp, TxnOpResponse};
pub use liveness::Liveness;
pub use members::fail_overs;

use super::{Scope, StoreError, StoreUrl};
use crate::{
    model::{ModelError, SCHEMA_VERSION, State},
    release::{DEFAULT_ADDRESS_GRACE, GraceClock},
};

/// Bound on every unary request, so an unreachable etcd fails a command
/// instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Conflicting concurrent transactions are retried this often.
const MAX_ATTEMPTS: u32 = 64;
/// Longest pause between two attempts of a contended transaction.
const CONFLICT_MAX_PAUSE: Duration = Duration::from_millis(100);
/// Pause before the liveness thread tries etcd again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// etcd's default `--max-txn-ops`: the most compares, and the most
/// operations, one transaction may carry.
pub const MAX_TXN_OPS: usize = 128;
/// Keys per page when reading a range: a page stays far below gRPC's
/// 4 MiB message limit whatever the cluster's size.
const PAGE: i64 = 512;

/// Commits of this process whose member failed after they were sent,
/// looked up in etcd's history before being sent again.
static LOOKED_UP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many commits this process looked up after their member failed
/// them with their outcome unknown (`ovl_store_commits_looked_up_total`).
pub fn commits_looked_up() -> u64 {
    LOOKED_UP.load(std::sync::atomic::Ordering::Relaxed)
}

/// Keys with their values and mod revisions, as of one etcd revision.
#[derive(Clone, Default)]
struct Snapshot {
    revision: i64,
    kvs: BTreeMap<String, (Vec<u8>, i64)>,
    /// Keys read without their values ([`Range::Keys`]).
    bare: BTreeSet<String>,
    /// Single keys read, present or not ([`Range::Key`]).
    looked: BTreeSet<String>,
    /// How many keys each counted prefix holds ([`Range::Count`],
    /// [`Range::Keys`]).
    counts: BTreeMap<String, i64>,
}

impl Snapshot {
    fn state(&self) -> State {
        let mut state = decode(
            self.revision,
            self.kvs
                .iter()
                .map(|(k, (v, _))| (k.as_str(), v.as_slice())),
            None,
        );
        if let Some(total) = self.counts.get(ENDPOINTS) {
            let read = self.kvs.keys().filter(|k| k.starts_with(ENDPOINTS)).count();
            state.endpoints_elsewhere = usize::try_from(*total).unwrap_or(0).saturating_sub(read);
        }
        for key in self.bare.iter().filter(|k| !self.kvs.contains_key(*k)) {
            if let Some((network, ip)) = key.strip_prefix(ENDPOINTS).and_then(network_and_ip) {
                state
                    .addresses_elsewhere
                    .entry(network.to_owned())
                    .or_default()
                    .insert(ip);
            }
        }
        state
    }

    /// The mod revision of `key` (0: absent).
    fn mod_rev(&self, key: &str) -> i64 {
        self.kvs.get(key).map_or(0, |(_, r)| *r)
    }

    /// The keys (and values) of one page `resp` of `range`.
    fn add(&mut self, range: &Range, resp: &GetResponse) {
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if matches!(range, Range::Keys(_)) {
                self.bare.insert(key);
            } else {
                self.kvs
                    .insert(key, (kv.value().to_vec(), kv.mod_revision()));
            }
        }
    }
}

/// A key, every key under a prefix (with or without their values), or
/// how many keys there are under a prefix (etcd answers the count alone).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Range {
    Key(String),
    Prefix(String),
    /// The keys under a prefix, without values (and counted).
    Keys(String),
    Count(String),
}

impl Range {
    /// What `scope` reads.
    fn of(scope: Scope<'_>) -> Vec<Range> {
        match scope {
            // Every scope but the whole store counts the endpoints it does
            // not read: the cluster's capacity checks need the total.
            Scope::Networks => vec![
                Range::Prefix(NETWORKS.into()),
                Range::Prefix(NODES.into()),
                Range::Key(CLUSTER_KEY.into()),
                Range::Count(ENDPOINTS.into()),
            ],
            // The VNI keys too: removing the network deletes its VNI's,
            // which must have been read to be guarded (one small key per
            // network).
            // Every published port's claim too (they are few, and named
            // by node, not network): an endpoint the change removes, or
            // turns back into a reservation, takes its claims along.
            Scope::Network(n) => vec![
                Range::Key(network_key(n)),
                Range::Prefix(VNIS.into()),
                Range::Prefix(format!("{ENDPOINTS}{n}/")),
                Range::Prefix(format!("{RELEASED}{n}/")),
                Range::Prefix(format!("{NAMES}{n}/")),
                Range::Prefix(format!("{ATTACHMENTS}{n}/")),
                Range::Prefix(format!("{MACS}{n}/")),
                Range::Prefix(PORTS.into()),
                Range::Prefix(NODES.into()),
                Range::Count(ENDPOINTS.into()),
            ],
            Scope::Endpoint(a) => around::first(&a),
            Scope::All => vec![Range::Prefix(KEY_PREFIX.into())],
        }
    }

    /// The request's options, reading at revision `at` if given.
    fn options(&self, at: Option<i64>) -> GetOptions {
        let o = match self {
            Range::Key(_) => GetOptions::new(),
            Range::Prefix(p) => GetOptions::new().with_range(prefix_end(p)).with_limit(PAGE),
            Range::Keys(p) => GetOptions::new()
                .with_range(prefix_end(p))
                .with_limit(PAGE)
                .with_keys_only(),
            Range::Count(p) => GetOptions::new()
                .with_range(prefix_end(p))
                .with_count_only(),
        };
        match at {
            Some(revision) => o.with_revision(revision),
            None => o,
        }
    }

    fn start(&self) -> &str {
        match self {
            Range::Key(k) | Range::Prefix(k) | Range::Keys(k) | Range::Count(k) => k,
        }
    }
}

/// A connection to an etcd cluster holding ovl's state.
#[derive(Clone)]
pub struct EtcdStore {
    /// The cluster's members, shared by the store's clones.
    members: Arc<members::Members>,
    /// The URL (and options) it was opened with.
    url: StoreUrl,
    /// How long freed addresses are held back.
    address_grace: Duration,
    /// This process's changes to one scope, one at a time.
    turns: turns::Turns,
    /// The store's endpoint count as last read, and when.
    endpoints_total: around::Total,
}

impl EtcdStore {
    /// How long a freed address is held back.
    pub fn address_grace(&self) -> Duration {
        self.address_grace
    }

    /// Connects to the cluster `url` names and checks that etcd answers
    /// (and accepts ovl's certificate and login).
    pub async fn connect(url: &StoreUrl) -> Result<EtcdStore, StoreError> {
        let hosts = &url.location;
        for h in hosts.split(',') {
            if !is_host_port(h.trim()) {
                return Err(StoreError::UnsupportedUrl(format!(
                    "{} (endpoint {h:?} is not HOST:PORT)",
                    url.base()
                )));
            }
        }
        let scheme = if url.scheme == "etcds" {
            "https"
        } else {
            "http"
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(|h| format!("{scheme}://{}", h.trim()))
            .collect();
        let options = access::connect_options(url)?;
        let members = members::Members::connect(endpoints, options, REQUEST_TIMEOUT)
            .await
            .map_err(|e| access::store_error(url, "connect", &e))?;
        let store = EtcdStore {
            members: Arc::new(members),
            url: url.clone(),
            address_grace: url.options.address_grace.unwrap_or(DEFAULT_ADDRESS_GRACE),
            turns: turns::Turns::default(),
            endpoints_total: around::Total::default(),
        };
        // Each member that cannot answer moves the store on to the next
        // one: the first that answers serves this process; during an
        // election, rounds over them go on until the request timeout.
        store.ensure_schema().await?;
        Ok(store)
    }

    /// A client of the member this process talks to.
    fn client(&self) -> members::MemberClient {
        self.members.client()
    }

    /// `etcd://host:port,...` (without options).
    pub fn describe(&self) -> String {
        self.url.base()
    }

    /// Awaits `fut`, a request `what` to member `member`, within the
    /// request timeout. A member that could not serve it is left for the
    /// next one (see [`members`]).
    async fn call<T, F>(&self, member: usize, what: &str, fut: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.attempt(member, what, fut).await.map_err(|f| f.error)
    }

    /// [`call`](Self::call), telling how it failed.
    async fn attempt<T, F>(&self, member: usize, what: &str, fut: F) -> Result<T, Failed>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let what = self.members.naming(member, what);
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if members::electing(&e) {
                    self.members.note_election();
                }
                let how = if members::unserved(&e) {
                    Failure::Unserved
                } else if members::unavailable(&e) {
                    Failure::Unknown
                } else {
                    Failure::Refused
                };
                if how != Failure::Refused {
                    self.members.fail_over(member).await;
                }
                Err(Failed {
                    error: access::store_error(&self.url, &what, &e),
                    how,
                })
            }
            Err(_) => {
                self.members.fail_over(member).await;
                Err(Failed {
                    error: StoreError::Etcd {
                        endpoints: self.describe(),
                        detail: format!("{what}: timed out"),
                    },
                    how: Failure::Unknown,
                })
            }
        }
    }

    /// Request `what`, made by `make` of the member in use, made again of
    /// the next members while they fail it (see [`members::Patience`]).
    /// Only for requests that may be repeated whether or not they were
    /// served: reads, and writes whose second application changes nothing
    /// (a put of a value the writer alone writes, a put-if-absent).
    async fn repeatable<T, F, Fut>(&self, what: &str, mut make: F) -> Result<T, StoreError>
    where
        F: FnMut(members::MemberClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut patience = members::Patience::new(&self.members);
        loop {
            let c = self.client();
            let member = c.member;
            let sent = tokio::time::Instant::now();
            match self.attempt(member, what, make(c)).await {
                Ok(v) => return Ok(v),
                Err(f) if f.how == Failure::Refused => return Err(f.error),
                Err(f) => {
                    if !patience.again(&self.members, member, sent).await {
                        return Err(f.error);
                    }
                    log::debug!("{}; asking again", f.error);
                }
            }
        }
    }

    /// Commits `txn`, which writes `written` (see [`Written`]): `Some` of
    /// the revision it committed at, `None` when its compares failed.
    ///
    /// A member that did not take it ([`members::unserved`]) is asked
    /// again, the next one in turn, within [`members::Patience`]. One that
    /// failed while it may have committed (a reset, a timeout, a leader
    /// lost after proposing) leaves that unknown: the members are asked
    /// whether `written` happened ([`Self::committed`]), and only if it
    /// did not is the same transaction sent again. Its compares make it
    /// commit at most once whoever wins: every key it writes is guarded as
    /// read, so once one copy committed, another fails.
    async fn commit(&self, txn: Txn, written: &Written) -> Result<Option<i64>, StoreError> {
        let mut patience = members::Patience::new(&self.members);
        // A copy of the transaction may have committed unseen.
        let mut unknown: Option<StoreError> = None;
        loop {
            let mut c = self.client();
            let member = c.member;
            let sent = tokio::time::Instant::now();
            let failed = match self.attempt(member, "commit", c.txn(txn.clone())).await {
                Ok(resp) if resp.succeeded() => {
                    return Ok(Some(resp.header().map_or(0, |h| h.revision())));
                }
                // Lost to a racer, or to an earlier copy of its own.
                Ok(_) => match unknown {
                    None => return Ok(None),
                    Some(e) => match self.committed(written).await {
                        Ok(Outcome::Committed(revision)) => return Ok(Some(revision)),
                        Ok(Outcome::NotCommitted) => return Ok(None),
                        Ok(Outcome::Unknown(detail)) => return Err(unknown_outcome(e, detail)),
                        Err(why) => return Err(unknown_outcome(e, why.to_string())),
                    },
                },
                Err(f) => f,
            };
            match failed.how {
                Failure::Refused => return Err(failed.error),
                Failure::Unserved => {}
                Failure::Unknown => {
                    LOOKED_UP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    log::info!(
                        "{}; asking whether the change was made before making it again",
                        failed.error
                    );
                    match self.committed(written).await {
                        Ok(Outcome::Committed(revision)) => return Ok(Some(revision)),
                        Ok(Outcome::NotCommitted) => {}
                        Ok(Outcome::Unknown(detail)) => {
                            return Err(unknown_outcome(failed.error, detail));
                        }
                        Err(e) => {
                            return Err(unknown_outcome(failed.error, e.to_string()));
                        }
                    }
                    // The members answered the question: the one in use
                    // serves again, whether or not this process moved on
                    // (one member only, say).
                    if patience.in_time(&self.members, sent) {
                        if self.client().member == member {
                            tokio::time::sleep(members::ELECTION_PAUSE).await;
                        }
                        unknown = Some(failed.error);
                        continue;
                    }
                }
            }
            if !patience.again(&self.members, member, sent).await {
                // A copy sent earlier might still commit.
                return Err(if failed.how == Failure::Unknown || unknown.is_some() {
                    unknown_outcome(failed.error, "it had not when last asked".into())
                } else {
                    failed.error
                });
            }
            if failed.how == Failure::Unknown {
                unknown = Some(failed.error);
            }
        }
    }

    /// Whether a transaction writing `written` committed. Every key it
    /// writes is guarded as read, so if it committed, the first change of
    /// its first key after the read is its own: that change is found in
    /// etcd's history (a watch from the read's revision on), and the
    /// transaction's other keys are read as of the change's revision.
    async fn committed(&self, written: &Written) -> Result<Outcome, StoreError> {
        let Some((key, first)) = written.keys.first() else {
            return Ok(Outcome::Unknown("it writes no single key".into()));
        };
        let now = self
            .repeatable("read", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let rev_now = now.kvs().first().map_or(0, |kv| kv.mod_revision());
        let touched = rev_now > written.revision || (rev_now == 0 && first.was_present);
        if !touched {
            return Ok(Outcome::NotCommitted);
        }
        let event = match self.first_change(key, written.revision).await? {
            Ok(event) => event,
            Err(detail) => return Ok(Outcome::Unknown(detail)),
        };
        let Some((revision, value)) = event else {
            return Ok(Outcome::NotCommitted);
        };
        if value != first.value {
            return Ok(Outcome::NotCommitted);
        }
        let ranges: Vec<Range> = written
            .keys
            .iter()
            .map(|(k, _)| Range::Key(k.clone()))
            .collect();
        let mut at = Snapshot {
            revision,
            ..Snapshot::default()
        };
        self.read_into(&ranges, &mut at).await?;
        let all = written.keys.iter().all(|(k, w)| match &w.value {
            Some(v) => at
                .kvs
                .get(k)
                .is_some_and(|(got, r)| got == v && *r == revision),
            None => !at.kvs.contains_key(k),
        });
        Ok(if all {
            Outcome::Committed(revision)
        } else {
            Outcome::NotCommitted
        })
    }

    /// The first change of `key` after revision `after`: its revision and
    /// the value it left (`None`: deleted); `Ok(None)` when there was none.
    /// The inner `Err` says why etcd's history could not tell (compacted).
    async fn first_change(
        &self,
        key: &str,
        after: i64,
    ) -> Result<Result<Option<(i64, Option<Vec<u8>>)>, String>, StoreError> {
        self.repeatable("read the history of a key", |mut c| {
            let key = key.to_owned();
            async move {
                let opts = etcd_client::WatchOptions::new().with_start_revision(after + 1);
                let mut stream = c.watch(key, Some(opts)).await?;
                while let Some(resp) = stream.message().await? {
                    if resp.compact_revision() > 0 || resp.canceled() {
                        return Ok(Err(format!(
                            "etcd's history of the key is gone (compacted to revision {})",
                            resp.compact_revision()
                        )));
                    }
                    if let Some(event) = resp.events().first() {
                        let Some(kv) = event.kv() else {
                            return Ok(Err("a change without its key".into()));
                        };
                        let value = (event.event_type() == etcd_client::EventType::Put)
                            .then(|| kv.value().to_vec());
                        return Ok(Ok(Some((kv.mod_revision(), value))));
                    }
                }
                Err(etcd_client::Error::WatchError("watch stream ended".into()))
            }
        })
        .await
    }

    /// Checks that the store's schema is one this ovl reads, writing it
    /// into an empty store. Read first: every command checks it, and a
    /// transaction that may write is a raft proposal even when it writes
    /// nothing (one that waits on a dead leader until it times out).
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        let read = self
            .repeatable("read the schema key", |mut c| async move {
                c.get(SCHEMA_KEY, None).await
            })
            .await?;
        if let Some(kv) = read.kvs().first() {
            return schema_readable(kv);
        }
        let txn = Txn::new()
            .when([Compare::create_revision(SCHEMA_KEY, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(SCHEMA_KEY, SCHEMA_VERSION.to_string(), None)])
            .or_else([TxnOp::get(SCHEMA_KEY, None)]);
        // Put only if absent: a second copy changes nothing.
        let resp = self
            .repeatable("write the schema key", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        for r in resp.op_responses() {
            if let TxnOpResponse::Get(g) = r
                && let Some(kv) = g.kvs().first()
            {
                schema_readable(kv)?;
            }
        }
        Ok(())
    }

    /// What `scope` covers, as of one revision. An endpoint's scope is
    /// read in rounds at the revision of the first ([`around`]).
    async fn read_scope(&self, scope: Scope<'_>) -> Result<Snapshot, StoreError> {
        let Scope::Endpoint(a) = scope else {
            return self.read(&Range::of(scope)).await;
        };
        let mut first = Range::of(scope);
        let known = self.endpoints_total.recent();
        if known.is_some() {
            first.retain(|r| *r != Range::Count(ENDPOINTS.into()));
        }
        let mut snap = self.read(&first).await?;
        match known {
            Some(total) => {
                snap.counts.insert(ENDPOINTS.into(), total);
            }
            None => self
                .endpoints_total
                .set(snap.counts.get(ENDPOINTS).copied()),
        }
        if !around::claims_complete(&snap, a.network) {
            // Written by an ovl that kept no claims: read whole (its
            // commits backfill them).
            return self.read(&Range::of(Scope::Network(a.network))).await;
        }
        for _ in 1..around::MAX_ROUNDS {
            let more = around::unread(&snap);
            if more.is_empty() {
                break;
            }
            self.read_into(&more, &mut snap).await?;
        }
        Ok(snap)
    }

    /// Reads `ranges` as of one revision.
    async fn read(&self, ranges: &[Range]) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        self.read_into(ranges, &mut snap).await?;
        Ok(snap)
    }

    /// Adds `ranges` to `snap` as of one revision, `snap`'s if it has one
    /// (else the current one, which it then takes): one transaction of
    /// range reads, then further pages of any range longer than a page.
    async fn read_into(&self, ranges: &[Range], snap: &mut Snapshot) -> Result<(), StoreError> {
        let at = (snap.revision > 0).then_some(snap.revision);
        let ops: Vec<TxnOp> = ranges
            .iter()
            .map(|r| TxnOp::get(r.start(), Some(r.options(at))))
            .collect();
        let txn = Txn::new().and_then(ops);
        let resp = self
            .repeatable("read", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if at.is_none() {
            snap.revision = resp.header().map_or(0, |h| h.revision());
        }
        for (range, r) in ranges.iter().zip(resp.op_responses()) {
            let TxnOpResponse::Get(page) = r else {
                continue;
            };
            match range {
                Range::Count(prefix) => {
                    snap.counts.insert(prefix.clone(), page.count());
                    continue;
                }
                Range::Keys(prefix) => {
                    snap.counts.insert(prefix.clone(), page.count());
                }
                Range::Key(key) => {
                    snap.looked.insert(key.clone());
                }
                Range::Prefix(_) => {}
            }
            snap.add(range, &page);
            if page.more() {
                let last = page.kvs().last().map(|kv| kv.key().to_vec());
                self.read_rest(range, last, snap).await?;
            }
        }
        Ok(())
    }

    /// Reads the pages of `range` after key `after`, at `snap`'s revision.
    async fn read_rest(
        &self,
        range: &Range,
        mut after: Option<Vec<u8>>,
        snap: &mut Snapshot,
    ) -> Result<(), StoreError> {
        while let Some(mut start) = after.take() {
            start.push(0);
            let opts = range.options(Some(snap.revision));
            let page = self
                .repeatable("read a page", |mut c| {
                    let (start, opts) = (start.clone(), opts.clone());
                    async move { c.get(start, Some(opts)).await }
                })
                .await?;
            snap.add(range, &page);
            if page.more() {
                after = page.kvs().last().map(|kv| kv.key().to_vec());
            }
        }
        Ok(())
    }

    /// Checks that etcd answers: one read of the schema key.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.repeatable("read the schema key", |mut c| async move {
            c.get(SCHEMA_KEY, None).await
        })
        .await
        .map(|_| ())
    }

    /// The part of the state `scope` covers.
    pub async fn load(&self, scope: Scope<'_>) -> Result<State, StoreError> {
        Ok(self.read_scope(scope).await?.state())
    }

    /// Optimistic concurrency: read what `scope` covers at revision R,
    /// apply `change`, and commit only if no key the change touches (nor
    /// the network its new endpoints join, nor the endpoints of a network
    /// it removes, nor the release record of an address it hands out)
    /// changed since R; otherwise read again and retry. New keys must not
    /// exist, which is what makes VNIs and addresses unique across racing
    /// hosts, whatever the scope.
    pub async fn update(
        &self,
        scope: Scope<'_>,
        change: &mut (dyn FnMut(&mut State) -> Result<(), ModelError> + Send),
    ) -> Result<State, StoreError> {
        let _turn = self.turns.take(scope).await;
        let mut pauses = conflict_pauses();
        for _ in 0..MAX_ATTEMPTS {
            let snap = self.read_scope(scope).await?;
            let mut before = snap.state();
            before.clock = GraceClock::now(self.address_grace);
            let mut after = before.clone();
            change(&mut after)?;
            let (old, new) = (encode(&before), encode(&after));
            let mut txn = commit_plan(&snap, &old, &new);
            if txn.ops.is_empty() {
                return Ok(after);
            }
            // A key the change writes whose stored value cannot be read
            // was left out of `before`: every attempt would find it
            // changed. Name it instead of retrying in vain.
            if let Some(e) = unreadable_guarded(&snap, &old, &txn.guarded) {
                return Err(e);
            }
            txn.compares
                .extend(limits::guards(snap.revision, &old, &new, &after));
            let size = txn.ops.len().max(txn.compares.len());
            if size > MAX_TXN_OPS {
                return Err(StoreError::TooLarge {
                    ops: size,
                    limit: MAX_TXN_OPS,
                });
            }
            let written = Written {
                revision: snap.revision,
                keys: txn.written,
            };
            let commit = Txn::new().when(txn.compares).and_then(txn.ops);
            if let Some(revision) = self.commit(commit, &written).await? {
                after.revision = revision.max(0) as u64;
                return Ok(after);
            }
            // Lost a race: back off and redo the change against what the
            // winner wrote. The pause is random, so racers that lost
            // together (tasks of one process most of all) come back one by
            // one instead of re-reading and colliding again in lockstep.
            let pause = pauses.next().unwrap_or(CONFLICT_MAX_PAUSE);
            tokio::time::sleep(pause).await;
        }
        Err(StoreError::Contended(MAX_ATTEMPTS))
    }
}

/// Pauses between the attempts of a contended transaction: from 2 ms,
/// doubling up to [`CONFLICT_MAX_PAUSE`], each with random jitter.
fn conflict_pauses() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(2))
        .with_max_delay(CONFLICT_MAX_PAUSE)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The compares and operations of one `update` commit.
#[derive(Default)]
struct CommitPlan {
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
    /// The keys (or prefixes) `compares` look at, in order.
    guarded: Vec<String>,
    /// The single keys `ops` write (not the prefixes they delete).
    written: Vec<(String, WrittenKey)>,
}

/// A request that failed, and whether the member served it.
struct Failed {
    error: StoreError,
    how: Failure,
}

/// How a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// The member did not take it ([`members::unserved`]): a write was
    /// not applied.
    Unserved,
    /// The member could not finish serving it: a write may have been
    /// applied.
    Unknown,
    /// The member refused it: asking again would not change the answer.
    Refused,
}

/// Whether a transaction whose outcome was not seen committed.
enum Outcome {
    Committed(i64),
    NotCommitted,
    /// etcd cannot tell (why).
    Unknown(String),
}

/// What a transaction writes, for telling afterwards whether it committed:
/// the revision its compares were read at, and each key it puts or deletes
/// (each guarded as read: a racer writing one first makes it fail).
struct Written {
    revision: i64,
    keys: Vec<(String, WrittenKey)>,
}

/// One key a transaction writes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct WrittenKey {
    /// What it puts there; `None`: deletes it.
    value: Option<Vec<u8>>,
    /// Whether the key existed when the transaction's compares were read.
    was_present: bool,
}

/// The error of a change etcd may or may not have made.
fn unknown_outcome(cause: StoreError, detail: String) -> StoreError {
    StoreError::EtcdOutcomeUnknown {
        cause: cause.to_string(),
        detail,
    }
}

/// The error of the first key of `guarded` (or under a guarded prefix,
/// ending in `/`: the endpoints of a network the change removes) that
/// `snap` holds with a value decoding skipped (it is not in `old`, the
/// state's encoding), if any.
fn unreadable_guarded(
    snap: &Snapshot,
    old: &BTreeMap<String, Vec<u8>>,
    guarded: &[String],
) -> Option<StoreError> {
    guarded
        .iter()
        .flat_map(|g| {
            let under = g.ends_with('/').then(|| {
                snap.kvs
                    .range::<String, _>(g..)
                    .take_while(move |(k, _)| k.starts_with(g.as_str()))
            });
            let at = snap.kvs.get_key_value(g).filter(|_| under.is_none());
            under.into_iter().flatten().chain(at)
        })
        .filter(|(k, _)| !old.contains_key(*k))
        .find_map(|(k, (v, _))| codec::check(k, v).err())
}

/// Claims a commit writes that an older ovl left out (at most this many
/// per commit, so that a commit stays far inside etcd's operation limit).
const BACKFILL_PER_COMMIT: usize = 16;

/// What to compare and write to turn `old` (read in `snap`) into `new`.
///
/// Each key written is guarded on its own: an existing one must be as it
/// was read, a new endpoint's must not exist. Names, attachments and given
/// MACs are unique through keys of their own (their claims,
/// [`codec::NAMES`], [`codec::ATTACHMENTS`] and [`codec::MACS`]), so two
/// changes to one network collide only when they touch the same endpoint,
/// name, attachment, MAC or held-back address — not, as a guard on the
/// whole network would make them, always.
fn commit_plan(
    snap: &Snapshot,
    old: &BTreeMap<String, Vec<u8>>,
    new: &BTreeMap<String, Vec<u8>>,
) -> CommitPlan {
    let mut plan = CommitPlan::default();
    let guard = |plan: &mut CommitPlan, key: &str, compare: Compare| {
        if !plan.guarded.iter().any(|k| k == key) {
            plan.guarded.push(key.to_owned());
            plan.compares.push(compare);
        }
    };
    let removed_networks: Vec<&str> = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .filter_map(|k| k.strip_prefix(NETWORKS))
        .collect();
    let mut backfill = BACKFILL_PER_COMMIT;
    for (key, value) in new {
        match old.get(key) {
            // A claim the store lacks although the state implies it (the
            // endpoint was written by an older ovl, or restored): written
            // now, a few per commit, as if new.
            Some(v)
                if v == value
                    && is_index_key(key)
                    && !snap.kvs.contains_key(key)
                    && backfill > 0 =>
            {
                backfill -= 1;
                guard(
                    &mut plan,
                    key,
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, 0),
                );
            }
            Some(v) if v == value => continue,
            Some(_) => guard(
                &mut plan,
                key,
                Compare::mod_revision(key.as_str(), CompareOp::Equal, snap.mod_rev(key)),
            ),
            // A claim may be left over from an endpoint freed without one
            // (a dead node's): taken over if still as read, else a racer
            // claimed it since.
            None if is_index_key(key) => guard(
                &mut plan,
                key,
                Compare::mod_revision(key.as_str(), CompareOp::Equal, snap.mod_rev(key)),
            ),
            None => guard(
                &mut plan,
                key,
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            ),
        }
        plan.ops.push(TxnOp::put(key.as_str(), value.clone(), None));
        plan.written.push((
            key.clone(),
            WrittenKey {
                value: Some(value.clone()),
                was_present: snap.kvs.contains_key(key),
            },
        ));
        // A port claimed on every address clashes with the same port
        // claimed on one, under another key: no claim of the port may have
        // been created since the read (which read them all).
        if key.starts_with(PORTS)
            && let Some((port, _)) = key.rsplit_once('/')
        {
            let port = format!("{port}/");
            if !plan.guarded.contains(&port) {
                plan.compares.push(
                    Compare::create_revision(port.as_str(), CompareOp::Less, snap.revision + 1)
                        .with_prefix(),
                );
                plan.guarded.push(port);
            }
        }
        let Some(rest) = key.strip_prefix(ENDPOINTS) else {
            continue;
        };
        let Some((network, ip)) = rest
            .rsplit_once('/')
            .and_then(|(n, ip)| Some((n, ip.parse().ok()?)))
        else {
            continue;
        };
        // The network it joins is the one it was read with.
        let net_key = network_key(network);
        if old.contains_key(&net_key) && new.get(&net_key) == old.get(&net_key) {
            guard(
                &mut plan,
                &net_key,
                Compare::mod_revision(net_key.as_str(), CompareOp::Equal, snap.mod_rev(&net_key)),
            );
        }
        // A new endpoint's address was not freed after the read (the
        // record would hold it back); the change's own edits of the record
        // are guarded above.
        if !old.contains_key(endpoint_key(network, ip).as_str()) {
            let rel = released_key(network, ip);
            let rev = snap.mod_rev(&rel);
            guard(
                &mut plan,
                &rel,
                Compare::mod_revision(rel.as_str(), CompareOp::Equal, rev),
            );
        }
    }
    for key in old.keys().filter(|k| !new.contains_key(*k)) {
        let of_removed_network = [RELEASED, NAMES, ATTACHMENTS, MACS].iter().any(|prefix| {
            key.strip_prefix(prefix)
                .and_then(|rest| rest.split_once('/'))
                .is_some_and(|(n, _)| removed_networks.contains(&n))
        });
        if of_removed_network {
            continue;
        }
        // A claim the store never had needs no deleting.
        if is_index_key(key) && !snap.kvs.contains_key(key) {
            continue;
        }
        guard(
            &mut plan,
            key,
            Compare::mod_revision(key.as_str(), CompareOp::Equal, snap.mod_rev(key)),
        );
        plan.ops.push(TxnOp::delete(key.as_str(), None));
        plan.written.push((
            key.clone(),
            WrittenKey {
                value: None,
                was_present: snap.kvs.contains_key(key),
            },
        ));
    }
    for network in removed_networks {
        // No endpoint may have joined since we saw it empty; its held-back
        // addresses and any claims left over go with it, in one operation
        // each however many.
        let endpoints = format!("{ENDPOINTS}{network}/");
        plan.compares.push(
            Compare::create_revision(endpoints.as_str(), CompareOp::Less, snap.revision + 1)
                .with_prefix(),
        );
        plan.guarded.push(endpoints);
        for prefix in [RELEASED, NAMES, ATTACHMENTS, MACS] {
            let under = format!("{prefix}{network}/");
            plan.ops.push(TxnOp::delete(
                under.as_str(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ));
        }
    }
    plan
}

/// An error if the schema key `kv` names a schema newer than this ovl's.
fn schema_readable(kv: &etcd_client::KeyValue) -> Result<(), StoreError> {
    let found: u32 = kv.value_str().unwrap_or("0").trim().parse().unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::EtcdNewer {
            key: SCHEMA_KEY.into(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// `host:port` with a plausible host and a numeric port.
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_[]:".contains(c))
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerSpec, NetworkSpec};

    #[test]
    fn racers_that_lost_together_retry_at_different_times_within_bounds() {
        let runs: Vec<Vec<Duration>> = (0..8)
            .map(|_| conflict_pauses().take(MAX_ATTEMPTS as usize).collect())
            .collect();
        for pauses in &runs {
            assert!(pauses.iter().all(|p| *p >= Duration::from_millis(2)));
            assert!(pauses.iter().all(|p| *p <= 2 * CONFLICT_MAX_PAUSE));
            // Growing: the late attempts wait longer than the first.
            assert!(pauses[MAX_ATTEMPTS as usize - 1] >= CONFLICT_MAX_PAUSE);
            assert!(pauses[0] < Duration::from_millis(5));
        }
        // Eight tasks that lost the same race do not come back together.
        let fourth: std::collections::BTreeSet<_> = runs.iter().map(|r| r[3]).collect();
        assert!(fourth.len() > 1, "no jitter: {runs:?}");
    }

    #[test]
    fn endpoints_must_be_host_and_port() {
        for good in [
            "192.0.2.1:2379",
            "etcd-1.example:2379",
            "[2001:db8::1]:2379",
        ] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in [
            "not a url",
            "192.0.2.1",
            "192.0.2.1:0",
            ":2379",
            "h:port",
            "h/x:1",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    fn snapshot_of(state: &State) -> Snapshot {
        Snapshot {
            revision: 7,
            kvs: encode(state)
                .into_iter()
                .map(|(k, v)| (k, (v, 5)))
                .collect(),
            ..Snapshot::default()
        }
    }

    fn network() -> State {
        let mut s = State::default();
        s.create_network(NetworkSpec {
            vni: None,
            mtu: None,
            ..NetworkSpec::new("blue", "198.18.0.0/24".parse().unwrap())
        })
        .unwrap();
        s
    }

    /// Connects namespace `ns` of node a to network blue, named after
    /// the namespace unless `name` is given.
    fn connect_as(s: &mut State, ns: &str, name: Option<&str>) {
        s.add_container(ContainerSpec {
            ports: Vec::new(),
            attacher: None,
            network: "blue".into(),
            node: "a".into(),
            netns: ns.into(),
            name: name.map(str::to_owned),
            ip: None,
            owner: None,
            subnet: None,
            mac: None,
        })
        .unwrap();
    }

    fn connect(s: &mut State, ns: &str) {
        connect_as(s, ns, None);
    }

    fn connect_named(s: &mut State, ns: &str, name: &str) {
        connect_as(s, ns, Some(name));
    }

    fn plan_of(before: &State, change: impl FnOnce(&mut State)) -> CommitPlan {
        let mut after = before.clone();
        change(&mut after);
        commit_plan(&snapshot_of(before), &encode(before), &encode(&after))
    }

    #[test]
    fn a_connect_is_guarded_by_its_own_keys_network_and_release_record() {
        let before = network();
        let plan = plan_of(&before, |s| connect(s, "c1"));
        // Endpoint, name claim and attachment claim are new; the network
        // unchanged; the address not released since the read.
        assert_eq!(plan.ops.len(), 3);
        assert!(
            plan.written
                .iter()
                .all(|(_, w)| w.value.is_some() && !w.was_present)
        );
        assert_eq!(plan.written.len(), 3);
        assert_eq!(
            plan.guarded,
            [
                "/ovl/attachments/blue/a/c1",
                "/ovl/endpoints/blue/198.18.0.2",
                "/ovl/networks/blue",
                "/ovl/released/blue/198.18.0.2",
                "/ovl/names/blue/c1",
            ]
        );
        // Two endpoints of one network: the network guarded once.
        let plan = plan_of(&before, |s| {
            connect(s, "c1");
            connect(s, "c2");
        });
        assert_eq!((plan.ops.len(), plan.compares.len()), (6, 9));
    }

    #[test]
    fn connects_of_different_containers_to_one_network_do_not_collide() {
        let before = network();
        let one = plan_of(&before, |s| connect_named(s, "c1", "web"));
        let other = plan_of(&before, |s| {
            // Another address (as a racer that read later would pick).
            s.add_container(ContainerSpec {
                ports: Vec::new(),
                attacher: None,
                network: "blue".into(),
                node: "b".into(),
                netns: "c2".into(),
                name: Some("db".into()),
                ip: Some("198.18.0.9".parse().unwrap()),
                owner: None,
                subnet: None,
                mac: None,
            })
            .unwrap();
        });
        let shared: Vec<&String> = one
            .guarded
            .iter()
            .filter(|k| other.guarded.contains(k))
            .collect();
        // Only the network record, which neither writes: both commit.
        assert_eq!(shared, ["/ovl/networks/blue"]);
    }

    #[test]
    fn racing_claims_of_one_name_in_any_case_collide() {
        let before = network();
        let one = plan_of(&before, |s| connect_named(s, "c1", "Web"));
        let other = plan_of(&before, |s| connect_named(s, "c2", "wEB"));
        assert!(one.guarded.contains(&"/ovl/names/blue/web".to_owned()));
        assert!(other.guarded.contains(&"/ovl/names/blue/web".to_owned()));
    }

    /// Connects namespace `ns` of node `node` to network blue at `ip` (the
    /// next free address if none) with MAC `mac`.
    fn connect_with_mac(s: &mut State, node: &str, ns: &str, ip: Option<&str>, mac: &str) {
        s.add_container(ContainerSpec {
            network: "blue".into(),
            node: node.into(),
            netns: ns.into(),
            ip: ip.map(|ip| ip.parse().unwrap()),
            mac: Some(mac.parse().unwrap()),
            ..ContainerSpec::default()
        })
        .unwrap();
    }

    #[test]
    fn racing_claims_of_one_given_mac_collide_and_go_with_their_endpoint() {
        let before = network();
        let mac = "0a:00:5e:00:00:07";
        let claim = format!("/ovl/macs/blue/{mac}");
        let one = plan_of(&before, |s| connect_with_mac(s, "a", "c1", None, mac));
        // Another container, another address: only the MAC is shared.
        let other = plan_of(&before, |s| {
            connect_with_mac(s, "b", "c2", Some("198.18.0.9"), mac)
        });
        assert!(one.guarded.contains(&claim), "{:?}", one.guarded);
        assert!(other.guarded.contains(&claim), "{:?}", other.guarded);
        // A MAC derived from the address needs no claim.
        let plain = plan_of(&before, |s| connect(s, "c3"));
        assert!(!plain.guarded.iter().any(|k| k.starts_with(MACS)));
        // A disconnect deletes the claim.
        let mut held = network();
        connect_with_mac(&mut held, "a", "c1", None, mac);
        let gone = plan_of(&held, |s| {
            s.remove_container("blue", "a", "c1").unwrap();
        });
        assert!(gone.guarded.contains(&claim), "{:?}", gone.guarded);
    }

    #[test]
    fn racing_publishers_of_one_host_port_on_one_node_collide() {
        let mut before = network();
        before
            .create_network(NetworkSpec::new("red", "198.18.0.0/24".parse().unwrap()))
            .unwrap();
        let publish = |net: &str, ns: &str, port: &str| {
            let (net, ns, port) = (net.to_owned(), ns.to_owned(), port.to_owned());
            move |s: &mut State| {
                s.add_container(ContainerSpec {
                    network: net,
                    node: "a".into(),
                    netns: ns,
                    ports: vec![port.parse().unwrap()],
                    ..ContainerSpec::default()
                })
                .unwrap();
            }
        };
        let one = plan_of(&before, publish("blue", "c1", "8080:80"));
        let other = plan_of(&before, publish("red", "c2", "192.0.2.10:8080:81"));
        // Different claims (every address, one address) under one guard
        // on the claims of tcp port 8080 of node a.
        assert!(
            one.guarded
                .contains(&"/ovl/ports/a/tcp/8080/0.0.0.0".to_owned())
        );
        assert!(
            other
                .guarded
                .contains(&"/ovl/ports/a/tcp/8080/192.0.2.10".to_owned())
        );
        let prefix = "/ovl/ports/a/tcp/8080/".to_owned();
        assert!(one.guarded.contains(&prefix) && other.guarded.contains(&prefix));
    }

    #[test]
    fn claims_an_older_ovl_left_out_are_written_a_few_per_commit() {
        let mut before = network();
        for i in 0..40 {
            connect(&mut before, &format!("c{i}"));
        }
        // The store as an older ovl wrote it: no claims.
        let mut snap = snapshot_of(&before);
        snap.kvs.retain(|k, _| !is_index_key(k));
        let mut after = before.clone();
        connect(&mut after, "new");
        let plan = commit_plan(&snap, &encode(&before), &encode(&after));
        let backfilled = plan
            .guarded
            .iter()
            .filter(|k| is_index_key(k) && !k.ends_with("/new"))
            .count();
        assert_eq!(backfilled, BACKFILL_PER_COMMIT);
        assert_eq!(plan.ops.len(), 3 + BACKFILL_PER_COMMIT);
    }

    #[test]
    fn a_network_whose_endpoint_cannot_be_read_is_not_removed_but_named() {
        let before = network();
        let mut snap = snapshot_of(&before);
        let bad = "/ovl/endpoints/blue/198.18.0.7".to_owned();
        snap.kvs
            .insert(bad.clone(), (br#"{"schema":1}"#.to_vec(), 6));
        let old = encode(&snap.state());
        let mut after = snap.state();
        after.remove_network("blue").unwrap();
        let plan = commit_plan(&snap, &old, &encode(&after));
        let err = unreadable_guarded(&snap, &old, &plan.guarded)
            .expect("the unreadable endpoint is named")
            .to_string();
        assert!(err.contains(&bad), "{err}");
        // A network with only readable endpoints (none) is removed.
        let old = encode(&before);
        let mut after = before.clone();
        after.remove_network("blue").unwrap();
        let plan = commit_plan(&snapshot_of(&before), &old, &encode(&after));
        assert!(unreadable_guarded(&snapshot_of(&before), &old, &plan.guarded).is_none());
    }

    #[test]
    fn removing_a_network_drops_its_held_addresses_in_one_operation() {
        let mut before = network();
        for i in 0..200 {
            connect(&mut before, &format!("c{i}"));
        }
        before.remove_node("a").unwrap();
        assert_eq!(before.released.len(), 200);
        let mut after = before.clone();
        after.remove_network("blue").unwrap();
        let plan = commit_plan(&snapshot_of(&before), &encode(&before), &encode(&after));
        // network and VNI deletes, one prefix delete each of the held-back
        // addresses, name claims, attachment claims and MAC claims
        assert_eq!(plan.ops.len(), 6);
        assert_eq!(plan.compares.len(), 3);
        // The two single keys it deletes tell whether it committed.
        let written: Vec<&str> = plan.written.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(written, ["/ovl/networks/blue", "/ovl/vnis/4096"]);
    }
}
