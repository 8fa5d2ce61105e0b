//! The members of an etcd cluster a store URL names, spoken to one at a
//! time, as etcd's own Go client does: a request that finds its member
//! unreachable, failing or without a leader moves this process on to the
//! next member, where it is asked again when that is safe ([`Patience`],
//! [`unserved`]), and the requests after it go there.
//!
//! etcd-client would balance every request over all the endpoints it is
//! given and keeps a dead one in the balance (tonic connects lazily and
//! reports the connect error to the request it picked the endpoint for;
//! etcdv3/etcd-client#39): with one member of three down, about a third
//! of every request, watch and keep-alive would fail for as long as it
//! stays down.

use std::{
    ops::{Deref, DerefMut},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, ConnectOptions};

use crate::random;

/// Moves from one member to another, by every store of this process (an
/// agent has two: its follower's and its liveness thread's).
static FAIL_OVERS: AtomicU64 = AtomicU64::new(0);

/// How many times this process moved from a member that failed it to
/// another (`ovl_store_failovers_total`).
pub fn fail_overs() -> u64 {
    FAIL_OVERS.load(Ordering::Relaxed)
}

/// The members, and the one this process talks to.
pub struct Members {
    /// `http(s)://HOST:PORT` of each member, in the URL's order.
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// Bound on connecting to a member (a login is a request).
    timeout: Duration,
    current: Mutex<Current>,
    /// A member said it had no leader since [`take_election`](Self::take_election) last looked.
    election: AtomicBool,
    /// When a move to another member was last logged at info.
    said: Mutex<Option<Instant>>,
}

/// Whether nothing was said (`said`) for `quiet`; if so, records now.
fn quiet_since(said: &Mutex<Option<Instant>>, quiet: Duration) -> bool {
    let mut said = said.lock().expect("members lock");
    let now = Instant::now();
    if said.is_some_and(|at| now.duration_since(at) < quiet) {
        return false;
    }
    *said = Some(now);
    true
}

struct Current {
    index: usize,
    client: Client,
}

impl Members {
    /// Connects to one of `endpoints` (`http(s)://HOST:PORT`), starting at
    /// a random one so that the nodes of a cluster spread over its
    /// members, and moving on while a member refuses (a login is the one
    /// request a connect makes). Each attempt is bounded by `timeout`.
    pub async fn connect(
        endpoints: Vec<String>,
        options: ConnectOptions,
        timeout: Duration,
    ) -> Result<Members, etcd_client::Error> {
        let n = endpoints.len();
        let mut pick = [0u8; 8];
        let start = match random::fill(&mut pick) {
            Ok(()) => (u64::from_ne_bytes(pick) % n as u64) as usize,
            Err(_) => 0,
        };
        let mut last = None;
        for step in 0..n {
            let index = (start + step) % n;
            match connect_member(&endpoints[index], &options, timeout).await {
                Ok(client) => {
                    return Ok(Members {
                        endpoints,
                        options,
                        timeout,
                        current: Mutex::new(Current { index, client }),
                        election: AtomicBool::new(false),
                        said: Mutex::new(None),
                    });
                }
                Err(e) if unavailable(&e) || matches!(e, etcd_client::Error::Internal(_)) => {
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| etcd_client::Error::InvalidArgs("no etcd endpoint".into())))
    }

    /// Notes that a member answered it had no leader (see [`electing`]).
    pub fn note_election(&self) {
        self.election.store(true, Ordering::Relaxed);
    }

    /// Whether a member answered it had no leader since the last call.
    pub fn take_election(&self) -> bool {
        self.election.swap(false, Ordering::Relaxed)
    }

    /// How many members the URL names.
    pub fn count(&self) -> usize {
        self.endpoints.len()
    }

    /// `what`, naming member `index` when there are several.
    pub fn naming(&self, index: usize, what: &str) -> String {
        if self.endpoints.len() > 1 {
            format!("{what} at {}", self.endpoint(index))
        } else {
            what.to_owned()
        }
    }

    /// A client of the member in use.
    pub fn client(&self) -> MemberClient {
        let current = self.current.lock().expect("members lock");
        MemberClient {
            member: current.index,
            client: current.client.clone(),
        }
    }

    /// `HOST:PORT` of member `index`.
    pub fn endpoint(&self, index: usize) -> &str {
        let e = &self.endpoints[index];
        e.split_once("://").map_or(e.as_str(), |(_, hp)| hp)
    }

    /// Moves on from member `from`, which failed a request: to the next
    /// member that takes a connection, in the URL's order and round. A
    /// no-op when another request moved on already, or when the URL names
    /// one member.
    pub async fn fail_over(&self, from: usize) {
        if self.current.lock().expect("members lock").index != from {
            return;
        }
        let n = self.endpoints.len();
        for step in 1..n {
            let next = (from + step) % n;
            // Lazy: without a login this makes no connection, and a dead
            // member is found by the request that goes there next.
            let Ok(client) =
                connect_member(&self.endpoints[next], &self.options, self.timeout).await
            else {
                continue;
            };
            let mut current = self.current.lock().expect("members lock");
            if current.index == from {
                // Said once a minute at most: while the cluster has no
                // quorum every member fails in turn, twice a second.
                let level = if quiet_since(&self.said, Duration::from_secs(60)) {
                    log::Level::Info
                } else {
                    log::Level::Debug
                };
                log::log!(
                    level,
                    "etcd member {} failed a request; talking to {} now",
                    self.endpoint(from),
                    self.endpoint(next)
                );
                *current = Current {
                    index: next,
                    client,
                };
                FAIL_OVERS.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    }
}

/// A client of the member at `endpoint`, within `timeout` (a timeout is an
/// `Internal` error, as no request of etcd's failed).
async fn connect_member(
    endpoint: &str,
    options: &ConnectOptions,
    timeout: Duration,
) -> Result<Client, etcd_client::Error> {
    tokio::time::timeout(timeout, Client::connect([endpoint], Some(options.clone())))
        .await
        .unwrap_or_else(|_| Err(etcd_client::Error::Internal("connect timed out".into())))
}

/// A client of one member, which a failed request of it names to
/// [`Members::fail_over`].
pub struct MemberClient {
    pub member: usize,
    client: Client,
}

impl Deref for MemberClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for MemberClient {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// Whether `e` says the member has no leader, or lost it while serving
/// the request: the cluster is electing one (a second or two), or the
/// member is cut off from the others.
pub fn electing(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            m.contains("no leader") || m.contains("leader changed")
        }
        _ => false,
    }
}

/// Whether `e` says the member did not take the request at all, so that a
/// write certainly was not applied: no connection to it could be made (the
/// request was never sent), or etcd refused it before proposing it —
/// "no leader" and "not capable" come from its gRPC interceptor, ahead of
/// the handler, and "raft proposal dropped" from a raft node that had no
/// leader to forward it to (etcd's `api/v3rpc/rpctypes/error.go`,
/// `v3rpc/interceptor.go`). Every other failure of a write leaves it
/// unknown whether it committed: a reset or a timeout after sending,
/// "request timed out", "server stopped", "leader changed" (etcd says it
/// of linearizable reads and lease lookups only, never after proposing).
pub fn unserved(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return false;
    };
    let m = s.message();
    if [
        "etcdserver: no leader",
        "etcdserver: not capable",
        "raft proposal dropped",
    ]
    .iter()
    .any(|said| m.contains(said))
    {
        return true;
    }
    // tonic reports a connection it could not make as Unavailable, with
    // the connect error in the status's source chain.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(c) = cause {
        if c.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// How long a request is tried again on the members while they fail it
/// unserved or elect a leader, counted from its first failure: a round
/// over the members at once, then rounds [`ELECTION_PAUSE`] apart while
/// one of them answered it had no leader, until the members' request
/// timeout has passed. etcd's own client retries reads this way; ovl does
/// so for writes too where trying again is safe (see `EtcdStore::commit`).
///
/// A member that holds a request for the whole request timeout — it took
/// it while it still followed a leader that had just died, and waits for
/// that leader's answer — would use up the rounds' time at once: once
/// per request, the time is counted again from that failure. Bound: two
/// request timeouts and the last attempt.
pub struct Patience {
    deadline: Option<tokio::time::Instant>,
    /// Whether the deadline was moved for a member that held a request.
    extended: bool,
    /// Members not yet tried in this round.
    left: usize,
    electing: bool,
}

/// Pause between two rounds over the members while they elect a leader.
pub const ELECTION_PAUSE: Duration = Duration::from_millis(250);

impl Patience {
    /// The patience of a request not yet failed, to `members`.
    pub fn new(members: &Members) -> Patience {
        Patience {
            deadline: None,
            extended: false,
            left: members.count(),
            electing: false,
        }
    }

    /// The deadline, after a failure of an attempt sent at `sent`.
    fn deadline(&mut self, members: &Members, sent: tokio::time::Instant) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        if now.duration_since(sent) >= members.timeout {
            // Held for a leader that did not answer: as good as told
            // there is none.
            self.electing = true;
            if !self.extended {
                self.extended = true;
                self.deadline = Some(now + members.timeout);
            }
        }
        *self.deadline.get_or_insert(now + members.timeout)
    }

    /// After an attempt sent at `sent` failed: whether the time for
    /// trying again has not run out.
    pub fn in_time(&mut self, members: &Members, sent: tokio::time::Instant) -> bool {
        tokio::time::Instant::now() < self.deadline(members, sent)
    }

    /// After a request to `member`, sent at `sent`, failed (and `call`
    /// moved on from it if it could not serve): whether to try again,
    /// having paused when a whole round of members failed during an
    /// election.
    pub async fn again(
        &mut self,
        members: &Members,
        member: usize,
        sent: tokio::time::Instant,
    ) -> bool {
        self.electing |= members.take_election();
        let deadline = self.deadline(members, sent);
        self.left = self.left.saturating_sub(1);
        let moved = members.client().member != member;
        if self.left > 0 && moved {
            return true;
        }
        if !self.electing || tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(ELECTION_PAUSE).await;
        self.left = members.count();
        self.electing = false;
        true
    }
}

/// Whether `e` says the member could not serve the request — unreachable,
/// its connection broken, no leader, a leader election under way — rather
/// than that the request was wrong or not allowed: worth asking another
/// member.
pub fn unavailable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error;
    use tonic::Code;
    match e {
        Error::TransportError(_) | Error::IoError(_) => true,
        Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
        ),
        // A watch or keep-alive stream closed under its client.
        Error::WatchError(_) | Error::LeaseKeepAliveError(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use etcd_client::Error;
    use tonic::Status;

    use super::*;

    #[test]
    fn only_failures_of_the_member_send_a_request_elsewhere() {
        for e in [
            Error::GRpcStatus(Status::unavailable("etcdserver: no leader")),
            Error::GRpcStatus(Status::unavailable("tcp connect error")),
            Error::GRpcStatus(Status::unknown("h2 protocol error")),
            Error::GRpcStatus(Status::deadline_exceeded("request timed out")),
            Error::WatchError("stream closed".into()),
        ] {
            assert!(unavailable(&e), "{e}");
        }
        assert!(electing(&Error::GRpcStatus(Status::unavailable(
            "etcdserver: no leader"
        ))));
        assert!(electing(&Error::GRpcStatus(Status::unavailable(
            "etcdserver: leader changed"
        ))));
        assert!(!electing(&Error::GRpcStatus(Status::unavailable(
            "tcp connect error"
        ))));
        for e in [
            Error::GRpcStatus(Status::permission_denied("etcdserver: permission denied")),
            Error::GRpcStatus(Status::not_found("etcdserver: requested lease not found")),
            Error::GRpcStatus(Status::invalid_argument("too many operations in txn")),
            Error::GRpcStatus(Status::out_of_range("required revision has been compacted")),
            Error::InvalidArgs("empty endpoints".into()),
        ] {
            assert!(!unavailable(&e), "{e}");
        }
    }

    #[test]
    fn only_requests_a_member_never_took_count_as_surely_not_applied() {
        let refused = Status::from_error(Box::new(tonic::ConnectError(Box::new(
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "tcp connect error"),
        ))));
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        for e in [
            Error::GRpcStatus(Status::unavailable("etcdserver: no leader")),
            Error::GRpcStatus(Status::failed_precondition("etcdserver: not capable")),
            Error::GRpcStatus(Status::unknown("raft proposal dropped")),
            Error::GRpcStatus(refused),
        ] {
            assert!(unserved(&e), "{e}");
        }
        // Sent, and then the member failed: it may have committed.
        for e in [
            Error::GRpcStatus(Status::unavailable("etcdserver: request timed out")),
            Error::GRpcStatus(Status::unavailable(
                "etcdserver: request timed out, possibly due to previous leader failure",
            )),
            Error::GRpcStatus(Status::unavailable("etcdserver: leader changed")),
            Error::GRpcStatus(Status::unavailable("etcdserver: server stopped")),
            Error::GRpcStatus(Status::unknown("h2 protocol error: connection reset")),
            Error::GRpcStatus(Status::cancelled("timeout expired")),
            Error::WatchError("stream closed".into()),
        ] {
            assert!(!unserved(&e), "{e}");
            assert!(unavailable(&e), "{e}");
        }
    }

    #[tokio::test]
    async fn a_lone_member_is_asked_again_only_after_it_held_a_request_for_a_lost_leader() {
        let timeout = Duration::from_secs(1);
        let members = Members::connect(
            vec!["http://192.0.2.1:2379".into()],
            ConnectOptions::new(),
            timeout,
        )
        .await
        .unwrap();
        // Refused at once, no election: nobody else to ask.
        let now = tokio::time::Instant::now();
        assert!(!Patience::new(&members).again(&members, 0, now).await);
        // Held for the whole timeout: a leader was lost; asked again, with
        // the time counted anew, once.
        let mut patience = Patience::new(&members);
        let held = now.checked_sub(timeout).unwrap();
        assert!(patience.again(&members, 0, held).await);
        assert!(patience.in_time(&members, tokio::time::Instant::now()));
        assert!(
            !patience
                .again(&members, 0, tokio::time::Instant::now())
                .await
        );
        // An election said by the member: another round.
        members.note_election();
        assert!(
            patience
                .again(&members, 0, tokio::time::Instant::now())
                .await
        );
    }

    #[tokio::test]
    async fn a_failed_member_is_left_for_the_next_in_turn_once() {
        let endpoints: Vec<String> = ["192.0.2.1:2379", "198.51.100.1:2379", "203.0.113.1:2379"]
            .iter()
            .map(|e| format!("http://{e}"))
            .collect();
        let members = Members::connect(endpoints, ConnectOptions::new(), Duration::from_secs(1))
            .await
            .unwrap();
        let first = members.client().member;
        members.fail_over(first).await;
        let second = members.client().member;
        assert_eq!(second, (first + 1) % 3);
        // A second report of the same failure (another request that went
        // to the first member) does not skip the second.
        members.fail_over(first).await;
        assert_eq!(members.client().member, second);
        assert_eq!(
            members.naming(second, "read"),
            format!("read at {}", members.endpoint(second))
        );
    }
}
