//! The gRPC server under hostile load, over real sockets against the real
//! broker: idle connections are closed with a GOAWAY (an open stream keeps
//! its connection), connections past `grpc.max_connections` are closed at
//! once, half-open ones are dropped after `grpc.handshake_timeout`, the
//! HTTP/2 limits are advertised, a large bearer still reaches the
//! authenticator, and oversized messages are refused (OUT_OF_RANGE, tonic's code
//! for a message over its decoding limit).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use common::broker::{spawn_broker_with_config, BrokerSpec, TestBroker};
use common::db::sqlite_url;
use common::emulator::Emu;
use common::mtls::{ServerTls, TestAuthority};
use common::process::ServeProcess;
use common::wait::poll;
use token_broker::config::GrpcConfig;
use token_broker::proto::v1 as pb;

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame (no changes from the defaults).
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// A broker on SQLite against the emulator, with `[grpc]` as `grpc` sets
/// it; the directory and emulator live as long as it.
struct World {
    broker: TestBroker,
    spec: BrokerSpec,
    _emu: Emu,
    _dir: tempfile::TempDir,
    _tls: Option<ServerTls>,
}

impl World {
    async fn start(grpc: impl FnOnce(&mut GrpcConfig)) -> World {
        Self::start_with_tls(None, grpc).await
    }

    async fn start_with_tls(tls: Option<ServerTls>, grpc: impl FnOnce(&mut GrpcConfig)) -> World {
        let dir = tempfile::tempdir().unwrap();
        let emu = Emu::start_default().await;
        let mut spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
        if let Some(tls) = &tls {
            spec = spec.with_tls(tls.config.clone());
        }
        let mut config = spec.config();
        grpc(&mut config.grpc);
        let broker = spawn_broker_with_config(&spec, config).await;
        World {
            broker,
            spec,
            _emu: emu,
            _dir: dir,
            _tls: tls,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.broker.addr
    }

    async fn stop(self) {
        self.broker.stop().await;
    }
}

/// Raises this process's soft open-file limit toward `wanted` and returns
/// the limit now in force.
fn raise_open_files(wanted: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(current) = limit.current else {
        return u64::MAX;
    };
    if current >= wanted {
        return current;
    }
    let target = limit.maximum.map_or(wanted, |max| max.min(wanted));
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        },
    ) {
        Ok(()) => target,
        Err(_) => current,
    }
}

/// A raw TCP connection that has sent the preface and an empty SETTINGS
/// frame, and then nothing.
async fn raw_http2(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(PREFACE).await.expect("send preface");
    stream
        .write_all(&EMPTY_SETTINGS)
        .await
        .expect("send SETTINGS");
    stream
}

/// The next frame's type and payload; None at EOF or a reset.
async fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some((header[3], payload))
}

/// Reads frames until the server closes; whether a GOAWAY came first.
async fn saw_goaway_before_close(mut stream: TcpStream) -> bool {
    let mut goaway = false;
    while let Some((kind, _)) = read_frame(&mut stream).await {
        goaway |= kind == GOAWAY;
    }
    goaway
}

/// True once the server has closed `stream` (EOF or reset) within
/// `deadline`; false if it sent anything or kept it open.
async fn closed_within(stream: &mut TcpStream, deadline: Duration) -> Result<(), String> {
    let mut buf = [0u8; 64];
    match timeout(deadline, stream.read(&mut buf)).await {
        Err(_) => Err(format!("still open after {deadline:?}")),
        Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
        Ok(Ok(n)) => Err(format!("the server answered {n} bytes")),
    }
}

async fn check_health(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    Ok(HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await?
        .into_inner()
        .status())
}

/// A gRPC request on `path` for the h2 client.
fn grpc_request(addr: SocketAddr, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// A gRPC frame holding an empty `HealthCheckRequest` (service "").
const EMPTY_MESSAGE: [u8; 5] = [0, 0, 0, 0, 0];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_get_a_goaway_and_are_closed_within_the_idle_timeout() {
    // Each connection costs two descriptors here (client and server side).
    let limit = raise_open_files(4096);
    let n = 1000.min(limit.saturating_sub(300) / 2) as usize;
    let idle = Duration::from_secs(1);
    let world = World::start(|g| {
        g.idle_timeout = idle;
        g.keepalive_timeout = Duration::from_secs(1);
        g.keepalive_interval = Duration::from_secs(3600);
        g.max_connections = n + 10;
    })
    .await;

    let mut connections = JoinSet::new();
    for _ in 0..n {
        let stream = raw_http2(world.addr()).await;
        connections.spawn(saw_goaway_before_close(stream));
    }
    // Generous: idle_timeout, then keepalive_timeout for a peer that never
    // acknowledges the GOAWAY's PING, on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut closed = 0;
    let mut with_goaway = 0;
    while let Some(joined) = tokio::time::timeout_at(deadline, connections.join_next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "only {closed} of {n} idle connections were closed within 30 s of grpc.idle_timeout = 1s"
            )
        })
    {
        closed += 1;
        with_goaway += usize::from(joined.unwrap());
    }
    assert_eq!(closed, n);
    assert_eq!(with_goaway, n, "every idle connection is told GOAWAY first");

    // The server serves on.
    assert_eq!(
        check_health(world.broker.channel().await).await.unwrap(),
        ServingStatus::Serving
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_stream_keeps_its_connection_past_the_idle_timeout_and_it_closes_once_the_stream_ends(
) {
    let idle = Duration::from_secs(1);
    let world = World::start(|g| {
        g.idle_timeout = idle;
        g.keepalive_timeout = Duration::from_secs(2);
    })
    .await;
    let addr = world.addr();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();

    // grpc.health.v1.Health/Watch: a server stream that stays open.
    let (response, mut request_body) = client
        .send_request(grpc_request(addr, "/grpc.health.v1.Health/Watch"), false)
        .unwrap();
    request_body
        .send_data(Bytes::from_static(&EMPTY_MESSAGE), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut watch = response.into_body();
    let first = watch.data().await.expect("first status").unwrap();
    assert!(first.len() > 5, "a framed HealthCheckResponse");

    tokio::time::sleep(idle * 4).await;
    assert!(
        !connection.is_finished(),
        "a connection with an open stream is not idle"
    );
    // No GOAWAY came: the same connection still takes a new call.
    let mut client = client
        .ready()
        .await
        .expect("the connection still takes calls");
    let (check, mut check_body) = client
        .send_request(grpc_request(addr, "/grpc.health.v1.Health/Check"), false)
        .unwrap();
    check_body
        .send_data(Bytes::from_static(&EMPTY_MESSAGE), true)
        .unwrap();
    let check = check.await.expect("answered on the same connection");
    assert_eq!(check.status(), 200);
    let mut check = check.into_body();
    while let Some(chunk) = check.data().await {
        chunk.unwrap();
    }
    let trailers = check.trailers().await.unwrap().unwrap_or_default();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");

    // Ending the stream leaves the connection idle: it is closed.
    request_body.send_reset(h2::Reason::CANCEL);
    drop(watch);
    let closed = timeout(idle + Duration::from_secs(20), connection).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "closed after its last stream ended: {closed:?}"
    );
    drop(client);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_connection_is_closed_at_once_and_a_freed_slot_is_used_again() {
    let world = World::start(|g| g.max_connections = 3).await;
    let mut channels = Vec::new();
    for _ in 0..3 {
        let channel = world.broker.channel().await;
        assert_eq!(
            check_health(channel.clone()).await.unwrap(),
            ServingStatus::Serving
        );
        channels.push(channel);
    }

    // The fourth is closed at once: no SETTINGS, just EOF (or a reset).
    let mut fourth = TcpStream::connect(world.addr()).await.unwrap();
    let _ = fourth.write_all(PREFACE).await;
    let _ = fourth.write_all(&EMPTY_SETTINGS).await;
    closed_within(&mut fourth, Duration::from_secs(10))
        .await
        .expect("a connection past grpc.max_connections is closed at once");

    // The first three still work.
    for channel in &channels {
        assert_eq!(
            check_health(channel.clone()).await.unwrap(),
            ServingStatus::Serving
        );
    }

    // Once one closes, a new connection is served.
    drop(channels.pop());
    let url = world.broker.url.clone();
    poll(
        "a freed slot to take a new connection",
        Duration::from_secs(20),
        || {
            let url = url.clone();
            async move {
                let channel = Channel::from_shared(url)
                    .unwrap()
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                check_health(channel).await.map_err(|e| e.to_string())
            }
        },
    )
    .await;
    drop(channels);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_complete_preface_is_dropped_after_the_handshake_timeout() {
    let world = World::start(|g| g.handshake_timeout = Duration::from_secs(1)).await;
    let addr = world.addr();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(&PREFACE[..10]).await.unwrap();
    let mut http1 = TcpStream::connect(addr).await.unwrap();
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: broker\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    for (what, stream) in [
        ("silent", &mut silent),
        ("partial preface", &mut partial),
        ("HTTP/1.1", &mut http1),
    ] {
        closed_within(stream, Duration::from_secs(15))
            .await
            .unwrap_or_else(|e| panic!("{what} connection: {e}"));
    }
    // A whole preface is served.
    let mut whole = raw_http2(addr).await;
    let (kind, _) = read_frame(&mut whole).await.expect("the server's SETTINGS");
    assert_eq!(kind, SETTINGS);
    // Gone before the stop, which would otherwise give this peer (it never
    // acknowledges the GOAWAY's PING) keepalive_timeout to close.
    drop(whole);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_connection_is_dropped_unless_both_handshake_and_preface_finish_in_time() {
    let ca = TestAuthority::new("connections test CA");
    let tls = ServerTls::new(&ca, None, None);
    let world =
        World::start_with_tls(Some(tls), |g| g.handshake_timeout = Duration::from_secs(1)).await;
    let addr = world.addr();

    // No ClientHello at all.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    closed_within(&mut silent, Duration::from_secs(15))
        .await
        .expect("a connection that never starts TLS is dropped");

    // TLS done, then no preface.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(ca.ca_pem()) {
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let mut buf = [0u8; 64];
    let read = timeout(Duration::from_secs(15), tls.read(&mut buf))
        .await
        .expect("a TLS connection without a preface is dropped");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "nothing is served before the preface: {read:?}"
    );

    // With TLS, the API still answers.
    let channel = world
        .broker
        .tls_channel(ca.ca_pem(), None)
        .await
        .expect("TLS channel");
    assert_eq!(check_health(channel).await.unwrap(), ServingStatus::Serving);
    world.stop().await;
}

fn rustls_pemfile_certs(
    pem: &str,
) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_and_header_list_limits_are_advertised_in_the_servers_settings() {
    let world = World::start(|g| g.max_concurrent_streams = 7).await;
    let mut stream = raw_http2(world.addr()).await;
    let (kind, payload) = read_frame(&mut stream).await.expect("SETTINGS");
    assert_eq!(kind, SETTINGS, "the server speaks first with SETTINGS");
    let settings: HashMap<u16, u32> = payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert_eq!(
        settings.get(&SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(&7),
        "{settings:?}"
    );
    assert_eq!(
        settings.get(&SETTINGS_MAX_HEADER_LIST_SIZE),
        Some(&(32 * 1024)),
        "{settings:?}"
    );
    drop(stream);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_kib_bearer_reaches_the_authenticator_and_an_oversized_message_is_refused() {
    let world = World::start(|g| g.max_request_size = 4096).await;
    // The authenticator refuses it with its own answer, not HTTP/2.
    let header = format!("Bearer tbk_{}", "A".repeat(16 * 1024));
    let mut client = world.broker.client_with_header(&header).await;
    let err = client
        .get_lease(pb::GetLeaseRequest {
            name: "leases/00000000-0000-4000-8000-000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let mut client = world.broker.client(&world.spec.key("ci")).await;
    let err = client
        .create_lease(pb::CreateLeaseRequest {
            organization: "a".repeat(5000),
            scopes: vec!["vso.code".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // A message within the limit is judged on its content.
    let err = client
        .create_lease(pb::CreateLeaseRequest {
            organization: "a".repeat(1000),
            scopes: vec!["vso.code".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    world.stop().await;
}

/// User plus system CPU time the process `pid` has used (Linux /proc).
#[cfg(target_os = "linux")]
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name, which sits in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // In USER_HZ, which Linux fixes at 100 for /proc.
    Duration::from_millis(ticks * 10)
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_backs_off_logs_once_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_default().await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    // max_connections stays at its default (1024): far above what 128
    // descriptors allow, so accepting hits EMFILE.
    let mut serve = ServeProcess::spawn_with_open_files(&spec, &[], 128);
    serve.wait_ready().await;
    let addr = serve.grpc_addr();

    let mut clients = Vec::new();
    for _ in 0..200 {
        clients.push(raw_http2(addr).await);
    }
    poll(
        "accept to fail for want of descriptors",
        Duration::from_secs(30),
        || async {
            let log = serve.log();
            if log.contains("cannot accept gRPC connections") {
                Ok(())
            } else {
                Err("no accept error logged yet".to_owned())
            }
        },
    )
    .await;

    // While descriptors stay exhausted the loop waits instead of spinning,
    // and logs once per interval, not per error.
    let window = Duration::from_secs(3);
    let before = cpu_time(serve.pid());
    tokio::time::sleep(window).await;
    let used = cpu_time(serve.pid()) - before;
    assert!(
        used < Duration::from_secs(1),
        "the broker used {used:?} of CPU in {window:?} with its descriptors exhausted:\n{}",
        serve.log_tail()
    );
    let logged = serve
        .log()
        .matches("cannot accept gRPC connections")
        .count();
    assert!(
        logged <= 2,
        "accept errors are logged once per interval, not {logged} times:\n{}",
        serve.log_tail()
    );

    // Descriptors freed: the broker serves again.
    drop(clients);
    let url = format!("http://{addr}");
    poll("the broker to serve again", Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            let channel = Channel::from_shared(url)
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            check_health(channel).await.map_err(|e| e.to_string())
        }
    })
    .await;
    poll(
        "the broker to say it accepts again",
        Duration::from_secs(30),
        || async {
            if serve.log().contains("accepting gRPC connections again") {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        },
    )
    .await;
    serve.sigterm().await;
}
