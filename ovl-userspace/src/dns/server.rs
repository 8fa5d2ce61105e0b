//! Answering the questions of one container namespace on its UDP sockets
//! and TCP listeners: the rate limit first (before any parsing), then
//! hickory's parser, then the records or the upstream resolvers; replies
//! are built and sized (truncated for UDP) by hickory's response code.
//! Pending forwards and TCP connections are bounded per namespace, so one
//! container cannot take the resolver from the others.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hickory_net::{
    BufDnsStreamHandle,
    runtime::{TokioRuntimeProvider, iocompat::AsyncIoTokioAsStd},
    tcp::TcpStream,
    udp::UdpStream,
    xfer::Protocol,
};
use hickory_proto::{
    op::{Edns, Header, MessageType, Metadata, OpCode, ResponseCode},
    rr::{DNSClass, Name, Record},
    serialize::binary::{BinDecodable, BinDecoder},
};
use hickory_server::{
    server::{Request, ResponseHandle, ResponseHandler, TimeoutStream},
    zone_handler::{MessageResponseBuilder, Queries},
};
use tokio::{sync::Semaphore, task::JoinSet};

use super::{
    limit::TokenBucket,
    records::{Records, Resolution},
    stats::{Outcome, Stats},
    upstream::{Question, Upstreams},
};

/// Rotates the addresses of a name several endpoints share (an alias, as
/// Docker's `--network-alias` on several containers) by a random number
/// of places: each comes first as often as the others, so clients that
/// take the first spread over them (DNS round robin, as Docker's resolver
/// does it).
fn take_turns(answers: &mut [Record]) {
    if answers.len() < 2 {
        return;
    }
    let mut bytes = [0u8; 4];
    if crate::random::fill(&mut bytes).is_ok() {
        let turn = u32::from_ne_bytes(bytes) as usize % answers.len();
        answers.rotate_left(turn);
    }
}

/// Bounds that keep one container from starving the others.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Questions per second per namespace (bursts of twice that); 0: none.
    pub rate: u32,
    /// Forwarded questions pending at once per namespace; more get SERVFAIL.
    pub forwards: usize,
    /// TCP connections open at once per namespace; more are closed.
    pub connections: usize,
    /// How long a forwarded question may take before SERVFAIL.
    pub forward_budget: Duration,
    /// How long a TCP connection may stay without a complete question.
    pub tcp_idle: Duration,
}

/// What every namespace's tasks share.
pub struct Shared {
    pub records: RwLock<Arc<Records>>,
    /// Replaced whole when the host's resolv.conf changes.
    pub upstreams: RwLock<Arc<Upstreams>>,
    pub stats: Stats,
    pub limits: Limits,
}

impl Shared {
    fn records(&self) -> Arc<Records> {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn upstreams(&self) -> Arc<Upstreams> {
        self.upstreams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts an outcome against the network `ns` is charged to.
    fn count_home(&self, ns: &str, outcome: Outcome) {
        if let Some(home) = self.records().home(ns) {
            self.stats.count(home, outcome);
        }
    }
}

/// One served namespace: its key and its share of the limits.
pub struct Namespace {
    pub key: String,
    bucket: Mutex<TokenBucket>,
    forwards: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

impl Namespace {
    pub fn new(key: String, limits: &Limits) -> Namespace {
        Namespace {
            key,
            bucket: Mutex::new(TokenBucket::new(limits.rate, Instant::now())),
            forwards: Arc::new(Semaphore::new(limits.forwards)),
            connections: Arc::new(Semaphore::new(limits.connections)),
        }
    }

    fn admit(&self) -> bool {
        self.bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(Instant::now())
    }
}

/// A question that goes to the upstream resolvers.
struct Pending {
    request: Request,
    question: Question,
}

/// Serves the UDP socket of `ns` until the task is dropped. Forwards run
/// as tasks of their own (at most `Limits::forwards`), dropped with it.
pub async fn serve_udp(socket: tokio::net::UdpSocket, ns: Arc<Namespace>, shared: Arc<Shared>) {
    // The address is a placeholder: every reply goes to its asker.
    let (mut stream, handle) = UdpStream::<TokioRuntimeProvider>::with_bound(
        socket,
        SocketAddr::from(([127, 255, 255, 254], 0)),
    );
    let mut forwards = JoinSet::new();
    while let Some(message) = stream.next().await {
        while forwards.try_join_next().is_some() {}
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                log::debug!("DNS in {}: receive: {e}", ns.key);
                continue;
            }
        };
        let (bytes, src) = message.into_parts();
        let reply = ResponseHandle::new(src, handle.with_remote_addr(src), Protocol::Udp);
        let Some(pending) = take(&ns, &shared, bytes, src, Protocol::Udp, reply.clone()).await
        else {
            continue;
        };
        forward_in(&mut forwards, &ns, &shared, pending, Protocol::Udp, reply).await;
    }
}

/// Forwards `pending` as a task of `forwards` if the namespace has a
/// forward free (at most `Limits::forwards` over its UDP socket and TCP
/// connections), or answers SERVFAIL.
async fn forward_in(
    forwards: &mut JoinSet<()>,
    ns: &Arc<Namespace>,
    shared: &Arc<Shared>,
    pending: Pending,
    protocol: Protocol,
    reply: ResponseHandle,
) {
    match ns.forwards.clone().try_acquire_owned() {
        Ok(permit) => {
            let (ns, shared) = (ns.clone(), shared.clone());
            forwards.spawn(async move {
                forward(&ns, &shared, pending, protocol, reply).await;
                drop(permit);
            });
        }
        Err(_) => {
            shared.count_home(&ns.key, Outcome::Failed);
            send_error(&pending.request, ResponseCode::ServFail, reply).await;
        }
    }
}

/// Serves the TCP listener of `ns` until the task is dropped; each
/// connection (at most `Limits::connections` at once) closes after
/// `Limits::tcp_idle` without a question. Pipelined questions are
/// answered as their answers come (RFC 7766 6.2.1.1: a name of the
/// overlay is not held up by a slow upstream answer asked before it).
pub async fn serve_tcp(listener: tokio::net::TcpListener, ns: Arc<Namespace>, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                log::debug!("DNS in {}: accept: {e}", ns.key);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = ns.connections.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let (ns, shared) = (ns.clone(), shared.clone());
        connections.spawn(async move {
            serve_connection(stream, src, &ns, &shared).await;
            drop(permit);
        });
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    src: SocketAddr,
    ns: &Arc<Namespace>,
    shared: &Arc<Shared>,
) {
    let (framed, handle): (_, BufDnsStreamHandle) =
        TcpStream::from_stream(AsyncIoTokioAsStd(stream), src);
    let mut messages = TimeoutStream::new(framed, shared.limits.tcp_idle);
    // Answers are sent as the stream is polled: the forwards' too, while
    // the loop waits for the next question.
    let mut forwards = JoinSet::new();
    while let Some(Ok(message)) = messages.next().await {
        while forwards.try_join_next().is_some() {}
        let (bytes, _) = message.into_parts();
        let reply = ResponseHandle::new(src, handle.clone(), Protocol::Tcp);
        if let Some(pending) = take(ns, shared, bytes, src, Protocol::Tcp, reply.clone()).await {
            forward_in(&mut forwards, ns, shared, pending, Protocol::Tcp, reply).await;
        }
    }
    // An asker that closed its side may still wait for its answers: the
    // forwards end within their budget, and one more poll writes what
    // they sent (then reads the end again). An idle connection has
    // none pending: `tcp_idle` is longer than a forward's budget.
    if !forwards.is_empty() {
        while forwards.join_next().await.is_some() {}
        let _ = tokio::time::timeout(shared.limits.tcp_idle, messages.next()).await;
    }
}

/// Admits, parses and answers locally what it can; returns what must be
/// forwarded.
async fn take(
    ns: &Namespace,
    shared: &Shared,
    bytes: Vec<u8>,
    src: SocketAddr,
    protocol: Protocol,
    reply: ResponseHandle,
) -> Option<Pending> {
    if !ns.admit() {
        shared.count_home(&ns.key, Outcome::RateLimited);
        return None;
    }
    let request = match Request::from_bytes(bytes.clone(), src, protocol) {
        Ok(r) => r,
        Err(_) => {
            shared.count_home(&ns.key, Outcome::Malformed);
            // Answer FORMERR when at least the header says it is a query.
            let mut decoder = BinDecoder::new(&bytes);
            if let Ok(header) = Header::read(&mut decoder) {
                let no_queries = Queries::read(&mut BinDecoder::new(&[]), 0);
                if let (MessageType::Query, Ok(queries)) =
                    (header.metadata.message_type, no_queries)
                {
                    let response = MessageResponseBuilder::new(&queries, None)
                        .error_msg(&header.metadata, ResponseCode::FormErr);
                    let _ = reply.clone().send_response(response).await;
                }
            }
            return None;
        }
    };
    if request.metadata.message_type == MessageType::Response {
        // Never answer answers (reflection).
        shared.count_home(&ns.key, Outcome::Malformed);
        return None;
    }
    if request.metadata.op_code != OpCode::Query {
        shared.count_home(&ns.key, Outcome::Failed);
        send_error(&request, ResponseCode::NotImp, reply).await;
        return None;
    }
    if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        // RFC 6891 6.1.3: a version of EDNS this resolver does not
        // implement is answered BADVERS (with its own, 0), never as if
        // it were version 0.
        shared.count_home(&ns.key, Outcome::Failed);
        send_error(&request, ResponseCode::BADVERS, reply).await;
        return None;
    }
    let [query] = request.queries.queries() else {
        shared.count_home(&ns.key, Outcome::Malformed);
        send_error(&request, ResponseCode::FormErr, reply).await;
        return None;
    };
    let records = shared.records();
    let resolution = if query.query_class() == DNSClass::IN {
        let name = Name::from(query.name().clone());
        records.resolve(&ns.key, &name, query.query_type())
    } else {
        records.not_ours(&ns.key)
    };
    match resolution {
        // The namespace left while its question was on the way.
        None => {
            send_error(&request, ResponseCode::Refused, reply).await;
            None
        }
        Some(Resolution::Local {
            network,
            code,
            mut answers,
        }) => {
            take_turns(&mut answers);
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = code;
            metadata.authoritative = true;
            metadata.recursion_available = true;
            send(&request, metadata, &answers, &[], &[], reply).await;
            shared.stats.count(&network, Outcome::Answered);
            None
        }
        Some(Resolution::Refused { network }) => {
            send_error(&request, ResponseCode::Refused, reply).await;
            shared.stats.count(&network, Outcome::Failed);
            None
        }
        Some(Resolution::Forward) => Some(Pending {
            question: Question {
                query: query.original().clone(),
                recursion_desired: request.metadata.recursion_desired,
                dnssec_ok: request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
                checking_disabled: request.metadata.checking_disabled,
                authentic_data: request.metadata.authentic_data,
            },
            request,
        }),
    }
}

/// Asks upstream and relays the answer, or SERVFAIL.
async fn forward(
    ns: &Namespace,
    shared: &Shared,
    pending: Pending,
    protocol: Protocol,
    reply: ResponseHandle,
) {
    let Pending { request, question } = pending;
    let budget = shared.limits.forward_budget;
    match shared
        .upstreams()
        .ask(&question, protocol == Protocol::Tcp, budget)
        .await
    {
        Ok(answer) => {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            let upstream = answer.metadata;
            metadata.response_code = upstream.response_code;
            metadata.authoritative = upstream.authoritative;
            metadata.recursion_available = upstream.recursion_available;
            metadata.authentic_data = upstream.authentic_data;
            metadata.truncation = upstream.truncation;
            send(
                &request,
                metadata,
                &answer.answers,
                &answer.authorities,
                &answer.additionals,
                reply,
            )
            .await;
            shared.count_home(&ns.key, Outcome::Forwarded);
        }
        Err(e) => {
            log::debug!(
                "DNS in {}: {} {}: {e}",
                ns.key,
                question.query.name(),
                question.query.query_type()
            );
            shared.count_home(&ns.key, Outcome::Failed);
            send_error(&request, ResponseCode::ServFail, reply).await;
        }
    }
}

/// The EDNS of a reply: present when the question had it, with the
/// asker's payload size (so a UDP reply is truncated to what it takes).
fn reply_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|asked| {
        let mut edns = Edns::new();
        edns.set_max_payload(asked.max_payload())
            .set_dnssec_ok(asked.flags().dnssec_ok);
        edns
    })
}

async fn send(
    request: &Request,
    metadata: Metadata,
    answers: &[Record],
    authorities: &[Record],
    additionals: &[Record],
    mut reply: ResponseHandle,
) {
    let edns = reply_edns(request);
    let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
        metadata,
        answers.iter(),
        authorities.iter(),
        std::iter::empty(),
        additionals.iter(),
    );
    if let Err(e) = reply.send_response(response).await {
        log::debug!("DNS reply to {}: {e}", request.src());
    }
}

async fn send_error(request: &Request, code: ResponseCode, mut reply: ResponseHandle) {
    let edns = reply_edns(request);
    let response = MessageResponseBuilder::new(&request.queries, edns.as_ref())
        .error_msg(&request.metadata, code);
    if let Err(e) = reply.send_response(response).await {
        log::debug!("DNS reply to {}: {e}", request.src());
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, UdpSocket},
        str::FromStr,
    };

    use hickory_proto::{
        op::{Message, Query},
        rr::{RData, RecordType, rdata::A},
    };

    use super::*;
    use crate::{
        dns::records::namespace_key,
        model::{ContainerSpec, NetworkSpec, State},
    };

    const WEB: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

    #[test]
    fn a_shared_names_addresses_take_turns_in_their_order() {
        let name = Name::from_str("svc.").unwrap();
        let ips: Vec<Ipv4Addr> = (2..5).map(|d| Ipv4Addr::new(198, 18, 0, d)).collect();
        let records: Vec<Record> = ips
            .iter()
            .map(|ip| Record::from_rdata(name.clone(), 1, RData::A(A(*ip))))
            .collect();
        let mut first = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let mut answers = records.clone();
            take_turns(&mut answers);
            let turn = records.iter().position(|r| *r == answers[0]).unwrap();
            let mut expected = records.clone();
            expected.rotate_left(turn);
            assert_eq!(answers, expected, "a rotation, nothing lost");
            first.insert(turn);
        }
        assert_eq!(first.len(), 3, "every address comes first");
        let mut one = records[..1].to_vec();
        take_turns(&mut one);
        assert_eq!(one, records[..1]);
    }

    fn records() -> Records {
        let mut s = State::default();
        s.create_network(NetworkSpec::new("blue", "198.18.0.0/24".parse().unwrap()))
            .unwrap();
        for (ns, name) in [("c-client", "client"), ("c-web", "web")] {
            s.add_container(ContainerSpec {
                ports: Vec::new(),
                attacher: None,
                network: "blue".into(),
                node: "me".into(),
                netns: ns.into(),
                name: Some(name.into()),
                ip: None,
                owner: None,
                subnet: None,
                mac: None,
            })
            .unwrap();
        }
        Records::build(&s, "me", &|_| true)
    }

    /// A resolver for namespace `c-client` on a loopback port, forwarding
    /// to `upstream`; returns its address and counters.
    fn serve(rt: &tokio::runtime::Runtime, upstream: SocketAddr, rate: u32) -> (SocketAddr, Stats) {
        let _in = rt.enter();
        let stats = Stats::default();
        let limits = Limits {
            rate,
            forwards: 4,
            connections: 2,
            forward_budget: Duration::from_millis(300),
            tcp_idle: Duration::from_secs(1),
        };
        let shared = Arc::new(Shared {
            records: RwLock::new(Arc::new(records())),
            upstreams: RwLock::new(Arc::new(Upstreams::new(&[upstream], limits.forward_budget))),
            stats: stats.clone(),
            limits,
        });
        let ns = Arc::new(Namespace::new(namespace_key("c-client"), &limits));
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
        rt.spawn(serve_udp(socket, ns, shared));
        (addr, stats)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn client() -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c
    }

    fn question(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
        m.metadata.recursion_desired = true;
        m
    }

    fn ask(c: &UdpSocket, server: SocketAddr, bytes: &[u8]) -> Option<Message> {
        c.send_to(bytes, server).unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = c.recv_from(&mut buf).ok()?;
        Some(Message::from_vec(&buf[..n]).unwrap())
    }

    /// An upstream that answers every A question with `count` addresses.
    fn fake_upstream(count: u8) -> SocketAddr {
        recording_upstream(count).0
    }

    /// [`fake_upstream`], also handing each question it got to the
    /// returned receiver.
    fn recording_upstream(count: u8) -> (SocketAddr, std::sync::mpsc::Receiver<Message>) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut r = Message::response(q.metadata.id, OpCode::Query);
                r.metadata.recursion_available = true;
                r.add_queries(q.queries.clone());
                let name = q.queries[0].name().clone();
                for i in 0..count {
                    r.add_answer(Record::from_rdata(
                        name.clone(),
                        60,
                        RData::A(A(Ipv4Addr::new(203, 0, 113, i))),
                    ));
                }
                let _ = s.send_to(&r.to_vec().unwrap(), from);
                // Nobody may be listening (fake_upstream).
                let _ = tx.send(q);
            }
        });
        (addr, rx)
    }

    #[test]
    fn the_askers_dnssec_flags_go_upstream() {
        let rt = runtime();
        let (upstream, asked) = recording_upstream(1);
        let (server, _) = serve(&rt, upstream, 0);
        let c = client();
        for (cd, ad) in [(true, true), (false, false), (true, false), (false, true)] {
            let mut q = question("signed.example.", RecordType::A);
            q.metadata.checking_disabled = cd;
            q.metadata.authentic_data = ad;
            let r = ask(&c, server, &q.to_vec().unwrap()).unwrap();
            assert_eq!(r.answers.len(), 1);
            let got = asked.recv_timeout(Duration::from_secs(2)).unwrap();
            assert_eq!(
                (got.metadata.checking_disabled, got.metadata.authentic_data),
                (cd, ad),
                "asked with CD {cd}, AD {ad}"
            );
        }
    }

    fn nowhere() -> SocketAddr {
        // A port nothing listens on: the upstream is down.
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    }

    #[test]
    fn answers_own_names_and_errors_from_the_records() {
        let rt = runtime();
        let (server, stats) = serve(&rt, nowhere(), 0);
        let c = client();
        let q = question("web.", RecordType::A);
        let r = ask(&c, server, &q.to_vec().unwrap()).unwrap();
        assert_eq!(r.metadata.id, q.metadata.id);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative && r.metadata.recursion_available);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(WEB)));
        assert_eq!(r.answers[0].ttl, super::super::records::RECORD_TTL);
        let r = ask(
            &c,
            server,
            &question("web.", RecordType::AAAA).to_vec().unwrap(),
        )
        .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        let r = ask(
            &c,
            server,
            &question("nosuch.", RecordType::A).to_vec().unwrap(),
        )
        .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(stats.of("blue").answered, 3);
    }

    #[test]
    fn malformed_and_unsupported_questions_get_errors_or_nothing() {
        let rt = runtime();
        let (server, stats) = serve(&rt, nowhere(), 0);
        let c = client();
        // Another operation: NOTIMP.
        let mut status = question("web.", RecordType::A);
        status.metadata.op_code = OpCode::Status;
        let r = ask(&c, server, &status.to_vec().unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
        // Two questions: FORMERR.
        let mut two = question("web.", RecordType::A);
        two.add_query(Query::query(Name::from_str("x.").unwrap(), RecordType::A));
        let r = ask(&c, server, &two.to_vec().unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        // A header announcing a question that is cut off: FORMERR.
        let good = question("web.", RecordType::A).to_vec().unwrap();
        let r = ask(&c, server, &good[..good.len() - 3]).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        // Too short for a header, or an answer: no reply at all.
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(ask(&c, server, &good[..5]).is_none());
        let mut answer = question("web.", RecordType::A);
        answer.metadata.message_type = MessageType::Response;
        assert!(ask(&c, server, &answer.to_vec().unwrap()).is_none());
        let s = stats.of("blue");
        assert_eq!((s.failed, s.malformed, s.answered), (1, 4, 0), "{s:?}");
    }

    #[test]
    fn an_edns_version_other_than_0_is_badvers_and_not_forwarded() {
        let rt = runtime();
        let (server, stats) = serve(&rt, fake_upstream(1), 0);
        let c = client();
        for name in ["web.", "outside.example."] {
            let mut q = question(name, RecordType::A);
            q.set_edns(Edns::new().set_version(1).clone());
            let r = ask(&c, server, &q.to_vec().unwrap()).unwrap();
            // 16 is BADVERS in a response's header and OPT (BADSIG in a TSIG).
            assert_eq!(
                u16::from(r.metadata.response_code),
                u16::from(ResponseCode::BADVERS),
                "{name}"
            );
            assert!(r.answers.is_empty(), "{name}: {:?}", r.answers);
            let edns = r.edns.expect("BADVERS comes with the resolver's EDNS");
            assert_eq!(edns.version(), 0, "{name}");
        }
        let s = stats.of("blue");
        assert_eq!((s.failed, s.answered, s.forwarded), (2, 0, 0), "{s:?}");
        // Version 0 is answered as before.
        let mut q = question("web.", RecordType::A);
        q.set_edns(Edns::new());
        let r = ask(&c, server, &q.to_vec().unwrap()).unwrap();
        assert_eq!(r.answers.len(), 1);
    }

    #[test]
    fn other_names_are_relayed_and_truncated_for_small_buffers() {
        let rt = runtime();
        let (server, stats) = serve(&rt, fake_upstream(40), 0);
        let c = client();
        // With EDNS (4096): the whole answer.
        let mut big = question("many.example.", RecordType::A);
        big.set_edns(Edns::new().set_max_payload(4096).clone());
        let r = ask(&c, server, &big.to_vec().unwrap()).unwrap();
        assert_eq!(r.answers.len(), 40);
        assert!(!r.metadata.truncation);
        assert!(r.edns.is_some(), "EDNS answered with EDNS");
        // Without EDNS: at most 512 bytes, truncated (the asker retries
        // over TCP).
        let q = question("many.example.", RecordType::A);
        c.send_to(&q.to_vec().unwrap(), server).unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert!(n <= 512, "{n} bytes");
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert!(r.metadata.truncation);
        assert_eq!(stats.of("blue").forwarded, 2);
    }

    #[test]
    fn a_dead_upstream_is_servfail_within_the_budget() {
        let rt = runtime();
        let (server, stats) = serve(&rt, nowhere(), 0);
        let c = client();
        let asked = Instant::now();
        let r = ask(
            &c,
            server,
            &question("a.example.", RecordType::A).to_vec().unwrap(),
        )
        .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        assert_eq!(stats.of("blue").failed, 1);
    }

    #[test]
    fn the_rate_limit_drops_unread_beyond_the_burst() {
        let rt = runtime();
        let (server, stats) = serve(&rt, nowhere(), 10);
        let c = client();
        let q = question("web.", RecordType::A).to_vec().unwrap();
        for _ in 0..100 {
            c.send_to(&q, server).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        let s = stats.of("blue");
        // A burst of 20, plus what 0.3 s refills.
        assert!((20..=25).contains(&s.answered), "{s:?}");
        assert_eq!(s.answered + s.rate_limited, 100, "{s:?}");
    }
}
