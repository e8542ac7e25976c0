//! The gRPC server's connections, with the limits tonic's own server lacks
//! (`[grpc]` settings, see [`ConnectionLimits`]).
//!
//! One accept loop hands each connection to its own task: at most
//! `max_connections` at once (one accepted past that is closed at once, so
//! its client fails fast instead of waiting on a starved socket), the TLS
//! handshake and the HTTP/2 preface within `handshake_timeout`, then hyper's
//! HTTP/2 server with a stream limit, a header-list limit and keep-alive
//! PINGs. Each call on a connection is counted until its response body
//! ends, so a connection with no open call for `idle_timeout` is closed
//! with a GOAWAY while a long server stream keeps its connection. Accept
//! errors such as EMFILE back off instead of spinning.
//!
//! Requests carry tonic's [`TcpConnectInfo`] (and [`TlsConnectInfo`] over
//! TLS) as tonic's server would put them, so `Request::remote_addr()` and
//! the verified client chain read as before. What tonic's server did and
//! this one keeps: `TCP_NODELAY`, `grpc-timeout` (an expired call is
//! answered CANCELLED "Timeout expired", as tonic does), HTTP/2 only, and
//! graceful shutdown. There is deliberately no maximum connection age: it
//! would cut long server streams.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{Connected as _, TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tower::ServiceExt as _;

use crate::config::GrpcConfig;

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// At most one log line per this interval for a repeating condition (the
/// connection cap reached, accept failing).
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Wait after a failed accept (EMFILE, ENFILE, ENOBUFS…), doubling up to
/// [`MAX_ACCEPT_BACKOFF`] while failures go on: a full descriptor table
/// does not empty faster for being asked in a tight loop.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between accepts while accepting fails.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Descriptors kept free beyond `grpc.max_connections`: the database pool,
/// upstream connections, the policy file, the admin port.
#[cfg(unix)]
const RESERVED_DESCRIPTORS: u64 = 256;

/// The `[grpc]` limits on connections.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Most connections served at once (`grpc.max_connections`).
    pub max_connections: usize,
    /// Most open calls per connection, advertised in SETTINGS
    /// (`grpc.max_concurrent_streams`).
    pub max_concurrent_streams: u32,
    /// Time from accept to a finished TLS handshake and HTTP/2 preface
    /// (`grpc.handshake_timeout`).
    pub handshake_timeout: Duration,
    /// Time with no open call before a connection is closed
    /// (`grpc.idle_timeout`).
    pub idle_timeout: Duration,
    /// Silence before a PING (`grpc.keepalive_interval`).
    pub keepalive_interval: Duration,
    /// Wait for a PING's acknowledgement, and for a peer to close after a
    /// GOAWAY (`grpc.keepalive_timeout`).
    pub keepalive_timeout: Duration,
    /// Largest request header block, bytes (`grpc.max_header_list_size`).
    pub max_header_list_size: u32,
}

impl From<&GrpcConfig> for ConnectionLimits {
    fn from(grpc: &GrpcConfig) -> Self {
        ConnectionLimits {
            max_connections: grpc.max_connections,
            max_concurrent_streams: grpc.max_concurrent_streams,
            handshake_timeout: grpc.handshake_timeout,
            idle_timeout: grpc.idle_timeout,
            keepalive_interval: grpc.keepalive_interval,
            keepalive_timeout: grpc.keepalive_timeout,
            max_header_list_size: grpc.max_header_list_size,
        }
    }
}

/// What every connection task shares.
struct Shared<S> {
    service: S,
    tls: Option<TlsAcceptor>,
    http2: http2::Builder<TokioExecutor>,
    limits: ConnectionLimits,
}

/// Serves `service` on every connection `listener` accepts (over TLS with
/// `tls`) within `limits`, until `shutdown` resolves; then stops accepting
/// (the listening socket is closed), sends every connection a GOAWAY and
/// returns once their open calls have ended. Dropping the returned future
/// drops every connection.
pub(crate) async fn serve<S>(
    listener: TcpListener,
    service: S,
    tls: Option<Arc<ServerConfig>>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    #[cfg(unix)]
    ensure_descriptors(limits.max_connections);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let shared = Arc::new(Shared {
        service,
        tls: tls.map(TlsAcceptor::from),
        http2,
        limits,
    });
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut refused = Throttled::default();
    let mut failures = Throttled::default();
    let mut backoff = MIN_ACCEPT_BACKOFF;
    let mut shutdown = pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(ended) = connections.join_next() => {
                if let Err(e) = ended {
                    if e.is_panic() {
                        tracing::error!(error = %e, "gRPC connection task panicked");
                    }
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = MIN_ACCEPT_BACKOFF;
                    if let Some(failed) = failures.reset() {
                        tracing::info!(failed, "accepting gRPC connections again");
                    }
                    match slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            connections.spawn(connection(
                                stream,
                                peer,
                                shared.clone(),
                                stopping.clone(),
                                slot,
                            ));
                        }
                        Err(_) => {
                            // Closed at once: the client sees EOF now, not
                            // a socket nobody serves.
                            drop(stream);
                            if let Some(refused) = refused.count() {
                                tracing::warn!(
                                    max_connections = shared.limits.max_connections,
                                    refused,
                                    "grpc.max_connections reached: closing new connections at once"
                                );
                            }
                        }
                    }
                }
                // The peer gave up before we accepted: nothing to wait for.
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    if let Some(failed) = failures.count() {
                        tracing::warn!(
                            error = %e,
                            failed,
                            backoff_ms = backoff.as_millis() as u64,
                            "cannot accept gRPC connections; backing off"
                        );
                    }
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
    }
    drop(listener);
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
}

/// Errors about one connection that ended before it was accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Counts a repeating condition and says when to log it: the first time,
/// then at most once per [`LOG_INTERVAL`], with how often it happened since.
#[derive(Default)]
struct Throttled {
    next_log: Option<Instant>,
    unlogged: u64,
    total: u64,
}

impl Throttled {
    /// One more occurrence; `Some(occurrences since the last log)` when a
    /// log line is due.
    fn count(&mut self) -> Option<u64> {
        self.unlogged += 1;
        self.total += 1;
        let now = Instant::now();
        if self.next_log.is_some_and(|at| now < at) {
            return None;
        }
        self.next_log = Some(now + LOG_INTERVAL);
        Some(std::mem::take(&mut self.unlogged))
    }

    /// The condition is over: `Some(occurrences in all)` if there were any.
    fn reset(&mut self) -> Option<u64> {
        let total = std::mem::take(self).total;
        (total > 0).then_some(total)
    }
}

/// Raises the soft open-file limit (up to the hard one) so that
/// `max_connections` plus [`RESERVED_DESCRIPTORS`] fit, and warns when they
/// cannot: past the limit, accepts and file opens (a policy reload) fail
/// with EMFILE.
#[cfg(unix)]
fn ensure_descriptors(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let wanted = max_connections as u64 + RESERVED_DESCRIPTORS;
    let limit = getrlimit(Resource::Nofile);
    let Some(current) = limit.current else {
        return;
    };
    if current >= wanted {
        return;
    }
    let target = limit.maximum.map_or(wanted, |max| max.min(wanted));
    let raised = target > current
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: limit.maximum,
            },
        )
        .is_ok();
    let now = if raised { target } else { current };
    if now < wanted {
        tracing::warn!(
            max_connections,
            open_files_limit = now,
            "grpc.max_connections plus {RESERVED_DESCRIPTORS} descriptors for the database, upstream and files exceed the open-file limit (RLIMIT_NOFILE): raise the limit or lower grpc.max_connections"
        );
    } else {
        tracing::debug!(open_files_limit = now, "raised the open-file limit");
    }
}

/// The peer as tonic's server would describe it in request extensions.
#[derive(Clone)]
struct PeerInfo {
    tcp: TcpConnectInfo,
    tls: Option<TlsConnectInfo<TcpConnectInfo>>,
}

impl PeerInfo {
    fn insert_into(&self, extensions: &mut http::Extensions) {
        extensions.insert(self.tcp.clone());
        if let Some(tls) = &self.tls {
            extensions.insert(tls.clone());
        }
    }

    fn addr(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr()
    }
}

/// One connection from accept to close; `_slot` is its place under
/// `grpc.max_connections`.
async fn connection<S>(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared<S>>,
    mut stopping: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    // Without it every small answer waits on Nagle's algorithm for the
    // peer's delayed ACK, ~40 ms per exchange.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let tcp = stream.connect_info();
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    match &shared.tls {
        None => {
            let Some(io) = step(
                deadline,
                &mut stopping,
                peer,
                "preface",
                read_preface(stream),
            )
            .await
            else {
                return;
            };
            let info = PeerInfo { tcp, tls: None };
            serve_http2(io, info, &shared, &mut stopping).await;
        }
        Some(acceptor) => {
            let Some(tls) = step(
                deadline,
                &mut stopping,
                peer,
                "TLS handshake",
                tls_accept(acceptor, stream),
            )
            .await
            else {
                return;
            };
            let info = PeerInfo {
                tcp,
                tls: Some(tls.connect_info()),
            };
            let Some(io) = step(deadline, &mut stopping, peer, "preface", read_preface(tls)).await
            else {
                return;
            };
            serve_http2(io, info, &shared, &mut stopping).await;
        }
    }
}

/// Most bytes read, and longest wait, while closing a connection whose TLS
/// handshake was refused (see [`tls_accept`]).
const REFUSED_LINGER_BYTES: usize = 64 * 1024;
const REFUSED_LINGER_TIME: Duration = Duration::from_secs(1);

/// The TLS handshake. When it is refused (no or a wrong client certificate)
/// rustls has written its alert; the client, having sent its Finished, has
/// its HTTP/2 preface and first request in flight. Closing with those unread
/// would send a RST that can discard the alert before the client reads it,
/// so the client would see "connection reset" (retry later) instead of the
/// refusal. So: FIN, then read and drop what arrives until the client
/// closes, bounded by [`REFUSED_LINGER_BYTES`] and [`REFUSED_LINGER_TIME`]
/// (and the handshake deadline).
async fn tls_accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    match acceptor.accept(stream).into_fallible().await {
        Ok(tls) => Ok(tls),
        Err((e, mut stream)) => {
            let _ = stream.shutdown().await;
            let mut buf = [0u8; 4096];
            let mut left = REFUSED_LINGER_BYTES;
            let _ = tokio::time::timeout(REFUSED_LINGER_TIME, async {
                while left > 0 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => left = left.saturating_sub(n),
                    }
                }
            })
            .await;
            Err(e)
        }
    }
}

/// One step of the handshake, within `deadline` and cut short by shutdown;
/// None (and the connection is dropped) when it failed or took too long.
async fn step<T>(
    deadline: Instant,
    stopping: &mut watch::Receiver<bool>,
    peer: SocketAddr,
    what: &'static str,
    step: impl Future<Output = io::Result<T>>,
) -> Option<T> {
    tokio::select! {
        done = tokio::time::timeout_at(deadline, step) => match done {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                tracing::debug!(%peer, step = what, error = %e, "gRPC handshake failed; connection dropped");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, step = what, "gRPC handshake not done within grpc.handshake_timeout; connection dropped");
                None
            }
        },
        _ = stopping.wait_for(|stop| *stop) => None,
    }
}

/// Reads and checks the HTTP/2 client preface, then hands it back in front
/// of the stream for hyper to read again.
async fn read_preface<IO: AsyncRead + Unpin>(mut io: IO) -> io::Result<Rewind<IO>> {
    let mut preface = [0u8; PREFACE.len()];
    io.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP/2 connection preface",
        ));
    }
    Ok(Rewind {
        replay: PREFACE,
        inner: io,
    })
}

/// Serves HTTP/2 on `io` until the connection ends: closed by the peer, a
/// GOAWAY after `idle_timeout` without an open call, or shutdown. After our
/// GOAWAY the peer has `keepalive_timeout` with no open call to close (it
/// must acknowledge the GOAWAY's PING first); then the connection is
/// dropped.
async fn serve_http2<IO, S>(
    io: IO,
    peer: PeerInfo,
    shared: &Shared<S>,
    stopping: &mut watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let addr = peer.addr();
    let (open, mut idle_calls) = watch::channel(0usize);
    let mut closing_calls = idle_calls.clone();
    let service = PerConnection {
        inner: shared.service.clone(),
        peer,
        open: Arc::new(open),
    };
    let mut conn = pin!(shared.http2.serve_connection(TokioIo::new(io), service));
    let mut closing = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(peer = ?addr, error = %e, "gRPC connection ended with an error");
                }
                return;
            }
            () = quiet_for(&mut idle_calls, shared.limits.idle_timeout), if !closing => {
                tracing::debug!(peer = ?addr, "gRPC connection idle for grpc.idle_timeout; sending GOAWAY");
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = stopping.wait_for(|stop| *stop), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = quiet_for(&mut closing_calls, shared.limits.keepalive_timeout), if closing => {
                tracing::debug!(peer = ?addr, "peer did not close after GOAWAY; dropping the connection");
                return;
            }
        }
    }
}

/// Resolves once `calls` (open calls) has stayed 0 for `quiet`.
async fn quiet_for(calls: &mut watch::Receiver<usize>, quiet: Duration) {
    loop {
        let none_open = calls.wait_for(|open| *open == 0).await.is_ok();
        if !none_open {
            // The connection is gone; its own future ends the task.
            return std::future::pending().await;
        }
        match tokio::time::timeout(quiet, calls.changed()).await {
            Err(_) => return,
            Ok(Ok(())) => {}
            Ok(Err(_)) => return std::future::pending().await,
        }
    }
}

/// The per-connection service: puts the peer into each request, applies
/// `grpc-timeout`, and counts the call open until its response body ends.
#[derive(Clone)]
struct PerConnection<S> {
    inner: S,
    peer: PeerInfo,
    open: Arc<watch::Sender<usize>>,
}

impl<S> hyper::service::Service<http::Request<Incoming>> for PerConnection<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let call = OpenCall::new(self.open.clone());
        let mut request = request.map(Body::new);
        self.peer.insert_into(request.extensions_mut());
        let deadline = grpc_timeout(request.headers());
        let response = self.inner.clone().oneshot(request);
        Box::pin(async move {
            let response = match deadline {
                None => response.await,
                Some(deadline) => tokio::time::timeout(deadline, response)
                    .await
                    .unwrap_or_else(|_| Ok(Status::cancelled("Timeout expired").into_http())),
            };
            let Ok(response) = response;
            Ok(response.map(|body| Body::new(CallBody { body, _call: call })))
        })
    }
}

/// One open call on a connection, counted until dropped.
struct OpenCall(Arc<watch::Sender<usize>>);

impl OpenCall {
    fn new(open: Arc<watch::Sender<usize>>) -> Self {
        open.send_modify(|n| *n += 1);
        OpenCall(open)
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A response body that keeps its call counted open until hyper drops it
/// (the body ended or the stream was reset).
struct CallBody {
    body: Body,
    _call: OpenCall,
}

impl http_body::Body for CallBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The call's `grpc-timeout` (gRPC over HTTP/2: at most 8 digits and a
/// unit); None when absent or malformed, as tonic's server does.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `inner` with the checked preface replayed in front of it.
struct Rewind<IO> {
    replay: &'static [u8],
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.replay.is_empty() && buf.remaining() > 0 {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay[..n]);
            self.replay = &self.replay[n..];
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &str) -> Option<Duration> {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&headers)
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_nonsense_is_ignored() {
        assert_eq!(timeout_of("3H"), Some(Duration::from_secs(3 * 3600)));
        assert_eq!(timeout_of("2M"), Some(Duration::from_secs(120)));
        assert_eq!(timeout_of("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout_of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout_of("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            timeout_of("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "123456789S", "10x", "-1S", "+1S", "1.5S"] {
            assert_eq!(timeout_of(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn a_repeating_condition_is_logged_first_then_once_per_interval_with_its_count() {
        let mut t = Throttled::default();
        assert_eq!(t.count(), Some(1));
        assert_eq!(t.count(), None);
        assert_eq!(t.count(), None);
        t.next_log = Some(Instant::now());
        assert_eq!(t.count(), Some(3));
        assert_eq!(t.reset(), Some(4));
        assert_eq!(t.reset(), None);
    }
}
