//! No secret reaches the logs: with a global tracing subscriber at TRACE
//! for every crate (ours, hyper, h2, reqwest, sqlx, tonic, ...), the whole
//! lease lifecycle runs and the captured output holds neither the PAT, nor
//! its Basic-auth form, nor the refresh token.
//!
//! Its own test binary, because the subscriber is process-global.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::leases::*;
use secrecy::ExposeSecret;
use token_broker::domain::LeaseState;
use token_broker::leases::ListQuery;
use tracing_subscriber::fmt::MakeWriter;

/// Everything the subscriber wrote.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs the process-wide subscriber at TRACE for every target (also
/// bridging the `log` crate) through the broker's own telemetry set-up, so
/// any cap it puts on a leaky target is what is tested.
fn capture_everything() -> Captured {
    // RUST_LOG would override the level under test.
    std::env::remove_var(token_broker::telemetry::RUST_LOG);
    let captured = Captured::default();
    token_broker::telemetry::init_with_writer("trace", false, false, captured.clone())
        .expect("a valid filter");
    captured
}

fn assert_absent(log: &str, what: &str, secret: &str) {
    assert!(!secret.is_empty());
    assert!(
        !log.contains(secret),
        "the captured output contains the {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_lease_lifecycle_at_trace_level_logs_no_secret() {
    let captured = capture_everything();
    let emulator = start_emulator().await;
    let url = emulator.url();
    let db = TestDb::new(Backend::Sqlite).await;
    let broker = start_broker(&db, &url, &TestKeys::new(), BrokerOptions::default()).await;
    let ci = caller("ci");

    let issued = broker
        .leases
        .create(
            &ci,
            request(&["vso.code"], None, Some(uuid::Uuid::new_v4())),
        )
        .await
        .expect("lease created");
    assert_eq!(
        list_repositories(&url, "fabrikam", &issued.token).await,
        200
    );
    broker
        .leases
        .renew(&ci, issued.lease.id, Some(Duration::from_secs(7200)))
        .await
        .expect("renewed");
    broker.leases.get(&ci, issued.lease.id).await.unwrap();
    broker
        .leases
        .list(
            &ci,
            ListQuery {
                page_size: 10,
                ..ListQuery::default()
            },
        )
        .await
        .unwrap();
    let revoked = broker.leases.revoke(&ci, issued.lease.id).await.unwrap();
    assert_eq!(revoked.state, LeaseState::Revoked);
    assert_ne!(
        list_repositories(&url, "fabrikam", &issued.token).await,
        200
    );

    let log = captured.text();
    assert!(
        log.contains("lease issued") && log.lines().count() > 50,
        "the subscriber captured the run at TRACE"
    );
    let token = issued.token.expose_secret();
    assert_absent(&log, "PAT", token);
    assert_absent(
        &log,
        "PAT in Basic-auth form",
        &STANDARD.encode(format!(":{token}")),
    );
    assert_absent(
        &log,
        "refresh token",
        token_broker::emulator::DEFAULT_REFRESH_TOKEN,
    );
    let rotated = broker
        .refresh_tokens
        .latest()
        .expect("the broker redeemed its refresh token");
    assert_absent(&log, "rotated refresh token", rotated.expose_secret());
}
