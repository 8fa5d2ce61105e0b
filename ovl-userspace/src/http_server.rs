//! The one accept loop of the agent's HTTP servers (local API, Docker
//! plugin, metrics), bounding what clients can hold of the agent.
//!
//! Every connection costs the agent a descriptor, shared with its store,
//! netlink and DNS sockets: a client that connects and sends nothing, or
//! stops half-way through a request, or keeps connections open without
//! end, must neither hold them forever nor use them all up. So connections
//! are bounded in number, must send their request headers (also the next
//! request's, on a kept-alive connection) within a time, must make room
//! for what they are sent within that time too (a client that stops
//! reading its answer is dropped; one that reads a little now and then
//! is bounded by the lifetime), and live at most a time before they are
//! asked to close.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, serve::Listener};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Semaphore,
    time::Sleep,
};

/// What a server does with a connection beyond its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverLimit {
    /// Accept and close it at once (a server reachable from the network).
    Close,
    /// Leave it in the kernel's backlog until a connection ends (a local
    /// socket whose clients, Docker and ovl's own, should wait, not fail).
    Queue,
}

/// The bounds of one server.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Connections served at once.
    pub max_connections: usize,
    pub over_limit: OverLimit,
    /// A client must have sent a request's headers within this, the first
    /// request's from connecting, a later one's from the previous answer;
    /// and no write of an answer may wait longer for it to read.
    pub header_timeout: Duration,
    /// After this a connection is closed once its request in flight is
    /// answered; [`Bounds::header_timeout`] later it is closed anyway.
    pub lifetime: Duration,
}

/// Serves `router` on `listener` within `bounds` until the task is dropped.
/// `what` names the server in log lines.
pub async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    bounds: Bounds,
    what: &'static str,
) {
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    loop {
        let queued = match bounds.over_limit {
            OverLimit::Queue => Some(
                slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed"),
            ),
            OverLimit::Close => None,
        };
        // Errors (out of descriptors, say) are logged and retried by the
        // listener after a pause.
        let (io, _) = listener.accept().await;
        let slot = match queued {
            Some(slot) => slot,
            None => match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    log::debug!(
                        "{what}: {} connections open; closing a new one",
                        bounds.max_connections
                    );
                    continue;
                }
            },
        };
        let io = WriteBounded::new(io, bounds.header_timeout);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(bounds.header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            tokio::pin!(conn);
            let served = match tokio::time::timeout(bounds.lifetime, conn.as_mut()).await {
                Ok(served) => served,
                Err(_) => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(bounds.header_timeout, conn).await {
                        Ok(served) => served,
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = served {
                log::debug!("{what} connection: {e}");
            }
        });
    }
}

/// A connection whose writes may each wait at most `limit` for the peer
/// to make room (reads are bounded by hyper's header timeout and the
/// connection's lifetime).
struct WriteBounded<T> {
    io: T,
    limit: Duration,
    /// Set while a write waits: when it fires, the write fails.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteBounded<T> {
    fn new(io: T, limit: Duration) -> Self {
        WriteBounded {
            io,
            limit,
            stalled: None,
        }
    }

    /// `polled`, the result of a write (or flush) just polled, unless it
    /// has waited `limit` since it first could not go on: then an error.
    fn bound<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing of its answer for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteBounded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteBounded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bound(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.bound(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.bound(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{UnixListener, UnixStream},
    };

    use super::*;

    const BOUNDS: Bounds = Bounds {
        max_connections: 2,
        over_limit: OverLimit::Queue,
        header_timeout: Duration::from_millis(300),
        lifetime: Duration::from_secs(60),
    };

    fn server(tag: &str, bounds: Bounds) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("ovl-http-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind a socket in the temp dir");
        let router = Router::new().route("/", get(|| async { "hello" }));
        tokio::spawn(serve(listener, router, bounds, "test server"));
        path
    }

    /// Reads until the server closes the connection; what it sent.
    async fn until_closed(c: &mut UnixStream) -> Vec<u8> {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
        got
    }

    async fn ask(path: &std::path::Path) -> Vec<u8> {
        let mut c = UnixStream::connect(path).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        until_closed(&mut c).await
    }

    #[tokio::test]
    async fn silent_and_stalled_clients_are_disconnected_and_queued_ones_then_served() {
        let path = server("bounds", BOUNDS);
        // Both slots taken: one client sends nothing, one half its headers.
        let mut silent = UnixStream::connect(&path).await.unwrap();
        let mut stalled = UnixStream::connect(&path).await.unwrap();
        stalled.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // A third waits in the backlog, then gets its answer.
        let answer = ask(&path).await;
        assert!(
            String::from_utf8_lossy(&answer).ends_with("hello"),
            "{answer:?}"
        );
        // The two that held the slots were closed without an answer.
        assert!(until_closed(&mut silent).await.is_empty());
        let partial = until_closed(&mut stalled).await;
        assert!(!partial.starts_with(b"HTTP/1.1 200"), "{partial:?}");
        let _ = std::fs::remove_file(path);
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_its_answer_is_dropped() {
        let path = std::env::temp_dir().join(format!("ovl-http-slow-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind a socket in the temp dir");
        // Far more than the socket buffers hold.
        const BIG: usize = 16 << 20;
        let big = "x".repeat(BIG);
        let router = Router::new().route("/", get(move || async move { big.clone() }));
        let bounds = Bounds {
            max_connections: 1,
            ..BOUNDS
        };
        tokio::spawn(serve(listener, router, bounds, "test server"));
        let mut slow = UnixStream::connect(&path).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // Reads nothing for well beyond the limit; the one slot is then
        // free again for a client that asks for nothing more.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut next = UnixStream::connect(&path).await.unwrap();
        next.write_all(b"GET /none HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = until_closed(&mut next).await;
        assert!(answer.starts_with(b"HTTP/1.1 404"), "{answer:?}");
        // The slow one got a part of its answer, and then its end.
        let got = until_closed(&mut slow).await;
        assert!(got.len() < BIG, "{} bytes", got.len());
        let _ = std::fs::remove_file(path);
    }

    #[tokio::test]
    async fn a_kept_alive_connection_left_idle_is_closed() {
        let path = server("idle", BOUNDS);
        let mut c = UnixStream::connect(&path).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let got = until_closed(&mut c).await;
        assert!(String::from_utf8_lossy(&got).ends_with("hello"), "{got:?}");
        let _ = std::fs::remove_file(path);
    }
}
