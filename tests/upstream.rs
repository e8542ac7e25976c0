//! The upstream client against the emulator over real sockets: the PAT
//! lifecycle, the data plane, every response class the client tells apart
//! (docs/upstream-api.md, What the client does), and the Entra token source.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde_json::json;
use token_broker::domain::AuthorizationId;
use token_broker::emulator::EmulatorConfig;
use token_broker::upstream::azure_devops::{AzureDevOpsClient, AzureDevOpsConfig};
use token_broker::upstream::entra::{RefreshTokenSource, TokenSource};
use token_broker::upstream::{
    CreatePat, DisplayFilter, ListPats, PatClient, PatToken, PatTokenError, UpdatePat,
    UpstreamError,
};

use common::upstream::{org, Upstream};

fn hours(h: i64) -> chrono::Duration {
    chrono::Duration::hours(h)
}

/// `validTo` comes back rounded (SQL Server `datetime`, 1/300 s), never
/// exactly as sent (docs/upstream-api.md, validTo rounding).
fn assert_close(actual: DateTime<Utc>, expected: DateTime<Utc>) {
    let off = (actual - expected).num_milliseconds().abs();
    assert!(
        off <= 10,
        "validTo {actual} is not {expected} (off by {off} ms)"
    );
}

fn request(name: &str, scope: &str, valid_to: DateTime<Utc>) -> CreatePat {
    CreatePat {
        display_name: name.to_owned(),
        scope: scope.to_owned(),
        valid_to,
    }
}

fn ids(pats: &[PatToken]) -> HashSet<AuthorizationId> {
    pats.iter().map(|p| p.authorization_id).collect()
}

fn active() -> ListPats {
    ListPats {
        display_filter: Some(DisplayFilter::Active),
        top: None,
    }
}

fn filtered(filter: DisplayFilter) -> ListPats {
    ListPats {
        display_filter: Some(filter),
        top: None,
    }
}

async fn create(
    upstream: &Upstream,
    client: &AzureDevOpsClient,
    name: &str,
    scope: &str,
) -> PatToken {
    let valid_to = upstream.now().await + hours(1);
    client
        .create(&org("fabrikam"), &request(name, scope, valid_to))
        .await
        .expect("create succeeds")
}

// ------------------------------------------------------------ lifecycle

#[tokio::test]
async fn a_pat_goes_through_create_get_list_update_revoke_and_each_step_sees_the_last() {
    let upstream = Upstream::start().await;
    let client = upstream.client_with(AzureDevOpsConfig {
        page_size: 2,
        ..upstream.client_config()
    });
    let fabrikam = org("fabrikam");
    let now = upstream.now().await;

    let mut created = Vec::new();
    for i in 0..5 {
        let pat = client
            .create(
                &fabrikam,
                &request(&format!("tb:test:{i}"), "vso.code", now + hours(1)),
            )
            .await
            .unwrap();
        created.push(pat);
    }
    let first = created[0].clone();
    let token = first.token.clone().expect("create returns the secret once");
    assert_eq!(token.expose_secret().len(), 84);
    assert_close(first.valid_to, now + hours(1));
    assert_eq!(first.scope, "vso.code");
    assert_eq!(first.target_accounts.as_ref().map(Vec::len), Some(1));

    let got = client.get(&fabrikam, first.authorization_id).await.unwrap();
    assert_eq!(got.display_name, "tb:test:0");
    assert_eq!(got.valid_to, first.valid_to);
    assert!(got.token.is_none(), "get never returns the secret");

    let lists_before = upstream.calls("list").await;
    let listing = client.list(&fabrikam, &active()).await.unwrap();
    assert!(listing.complete, "every page was read");
    let listed = listing.pats;
    assert_eq!(ids(&listed), ids(&created));
    assert_eq!(listed.len(), 5);
    assert!(listed.iter().all(|p| p.token.is_none()));
    assert_eq!(
        upstream.calls("list").await - lists_before,
        3,
        "5 PATs at 2 a page"
    );

    let updated = client
        .update(
            &fabrikam,
            &UpdatePat {
                authorization_id: first.authorization_id,
                display_name: None,
                scope: None,
                valid_to: Some(now + hours(2)),
            },
        )
        .await
        .unwrap();
    assert_close(updated.valid_to, now + hours(2));
    assert_eq!(updated.display_name, "tb:test:0", "omitted fields are kept");
    assert_eq!(updated.scope, "vso.code");
    let got = client.get(&fabrikam, first.authorization_id).await.unwrap();
    assert_eq!(got.valid_to, updated.valid_to);

    assert_eq!(
        upstream
            .data_plane("fabrikam", "git/repositories", &token)
            .await,
        200
    );
    client
        .revoke(&fabrikam, first.authorization_id)
        .await
        .unwrap();

    let revoked = client
        .list(&fabrikam, &filtered(DisplayFilter::Revoked))
        .await
        .unwrap()
        .pats;
    assert_eq!(ids(&revoked), HashSet::from([first.authorization_id]));
    let still_active = client.list(&fabrikam, &active()).await.unwrap().pats;
    assert_eq!(still_active.len(), 4);
    assert!(!ids(&still_active).contains(&first.authorization_id));
    assert_eq!(
        upstream
            .data_plane("fabrikam", "git/repositories", &token)
            .await,
        401
    );
    let view = upstream.pats().await;
    let row = view
        .iter()
        .find(|p| p["authorizationId"] == json!(first.authorization_id.to_string()))
        .unwrap();
    assert_eq!(row["state"], "revoked");
}

#[tokio::test]
async fn a_pat_works_on_the_data_plane_only_within_its_scope_and_organization() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    let code = create(&upstream, &client, "tb:code", "vso.code").await;
    let code = code.token.unwrap();
    assert_eq!(
        upstream
            .data_plane("fabrikam", "git/repositories", &code)
            .await,
        200
    );
    assert_eq!(
        upstream
            .data_plane("fabrikam", "packaging/feeds", &code)
            .await,
        401
    );
    assert_eq!(
        upstream
            .data_plane("contoso", "git/repositories", &code)
            .await,
        401
    );

    // vso.code_write includes vso.code (docs/upstream-api.md, Scope
    // catalogue and inclusion).
    let write = create(&upstream, &client, "tb:write", "vso.code_write").await;
    let write = write.token.unwrap();
    assert_eq!(
        upstream
            .data_plane("fabrikam", "git/repositories", &write)
            .await,
        200
    );

    let feeds = create(&upstream, &client, "tb:feeds", "vso.packaging").await;
    let feeds = feeds.token.unwrap();
    assert_eq!(
        upstream
            .data_plane("fabrikam", "packaging/feeds", &feeds)
            .await,
        200
    );
    assert_eq!(
        upstream
            .data_plane("fabrikam", "git/repositories", &feeds)
            .await,
        401
    );
}

#[tokio::test]
async fn an_expired_pat_is_refused_by_the_data_plane_listed_as_expired_and_cannot_be_extended() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    let fabrikam = org("fabrikam");
    let pat = create(&upstream, &client, "tb:short", "vso.code").await;
    let token = pat.token.clone().unwrap();
    assert_eq!(
        upstream
            .data_plane("fabrikam", "git/repositories", &token)
            .await,
        200
    );

    upstream.advance_clock(Duration::from_secs(2 * 3600)).await;

    assert_eq!(
        upstream
            .data_plane("fabrikam", "git/repositories", &token)
            .await,
        401
    );
    let expired = client
        .list(&fabrikam, &filtered(DisplayFilter::Expired))
        .await
        .unwrap()
        .pats;
    assert_eq!(ids(&expired), HashSet::from([pat.authorization_id]));
    assert!(client
        .list(&fabrikam, &active())
        .await
        .unwrap()
        .pats
        .is_empty());
    let later = upstream.now().await + hours(1);
    let err = client
        .update(
            &fabrikam,
            &UpdatePat {
                authorization_id: pat.authorization_id,
                display_name: None,
                scope: None,
                valid_to: Some(later),
            },
        )
        .await
        .unwrap_err();
    match err {
        UpstreamError::Refused { error, .. } => {
            assert_eq!(error, PatTokenError::Known("expiredPatCannotBeExtended"))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

// ------------------------------------------------- response classification

#[tokio::test]
async fn a_policy_refusal_answered_with_http_200_is_a_typed_error_and_creates_nothing() {
    let upstream = Upstream::start_with(EmulatorConfig {
        restrict_full_scope: true,
        ..EmulatorConfig::default()
    })
    .await;
    let client = upstream.client();
    let now = upstream.now().await;
    let err = client
        .create(
            &org("fabrikam"),
            &request("tb:full", "app_token", now + hours(1)),
        )
        .await
        .unwrap_err();
    match &err {
        UpstreamError::Refused { error, .. } => {
            assert_eq!(*error, PatTokenError::Known("fullScopePatPolicyViolation"))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        upstream.calls("create").await,
        1,
        "a refusal is not retried"
    );
    assert!(upstream.pats().await.is_empty());
}

#[tokio::test]
async fn an_unknown_pat_is_reported_as_not_found_so_revoke_can_count_it_gone() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    let fabrikam = org("fabrikam");
    let nobody = AuthorizationId::from_uuid(uuid::Uuid::new_v4());
    assert!(client
        .get(&fabrikam, nobody)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(client
        .revoke(&fabrikam, nobody)
        .await
        .unwrap_err()
        .is_not_found());
}

#[tokio::test]
async fn a_203_sign_in_page_is_an_authentication_failure_and_not_retried() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    let pat = create(&upstream, &client, "tb:x", "vso.code").await;
    upstream
        .set_faults(json!([{"operation": "get", "signInPage": true}]))
        .await;
    let err = client
        .get(&org("fabrikam"), pat.authorization_id)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Authentication(_)), "{err:?}");
    assert_eq!(upstream.calls("get").await, 1);
}

#[tokio::test]
async fn a_401_is_retried_once_with_a_fresh_bearer_token() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    let pat = create(&upstream, &client, "tb:x", "vso.code").await;
    let tokens_before = upstream.calls("token").await;
    upstream
        .set_faults(json!([{"operation": "get", "status": 401, "times": 1}]))
        .await;
    let got = client
        .get(&org("fabrikam"), pat.authorization_id)
        .await
        .unwrap();
    assert_eq!(got.authorization_id, pat.authorization_id);
    assert_eq!(upstream.calls("get").await, 2);
    assert_eq!(
        upstream.calls("token").await - tokens_before,
        1,
        "one fresh bearer"
    );
}

#[tokio::test]
async fn a_burst_of_401s_costs_one_refresh() {
    let upstream = Upstream::start().await;
    let client = Arc::new(upstream.client());
    let pat = create(&upstream, &client, "tb:x", "vso.code").await;
    // Four calls in flight with the same bearer are all refused.
    upstream
        .set_faults(json!([{"operation": "get", "status": 401, "latencyMs": 200, "times": 4}]))
        .await;
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let client = client.clone();
            let id = pat.authorization_id;
            tokio::spawn(async move { client.get(&org("fabrikam"), id).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(upstream.calls("get").await, 8);
    assert_eq!(
        upstream.calls("token").await,
        2,
        "the first bearer and one fresh one"
    );
}

#[tokio::test]
async fn a_401_with_a_fresh_bearer_too_is_an_authentication_failure() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    let pat = create(&upstream, &client, "tb:x", "vso.code").await;
    upstream
        .set_faults(json!([{"operation": "get", "status": 401}]))
        .await;
    let err = client
        .get(&org("fabrikam"), pat.authorization_id)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Authentication(_)), "{err:?}");
    assert_eq!(upstream.calls("get").await, 2, "one retry, no more");
}

#[tokio::test]
async fn a_400_bad_request_is_reported_as_a_client_bug_and_not_retried() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    upstream
        .set_faults(json!([{"operation": "create", "status": 400}]))
        .await;
    let now = upstream.now().await;
    let err = client
        .create(
            &org("fabrikam"),
            &request("tb:x", "vso.code", now + hours(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::BadRequest(_)), "{err:?}");
    assert_eq!(upstream.calls("create").await, 1);
}

#[tokio::test]
async fn a_valid_to_the_service_cannot_read_is_a_json_reader_exception_reported_as_bad_request() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    // .NET's DateTime ends at year 9999; chrono writes year 10000 as
    // "+10000-…", which the service's JSON reader cannot read.
    let beyond_dotnet = DateTime::<Utc>::from_timestamp(253_402_300_800, 0).unwrap();
    let err = client
        .create(
            &org("fabrikam"),
            &request("tb:far", "vso.code", beyond_dotnet),
        )
        .await
        .unwrap_err();
    match err {
        UpstreamError::BadRequest(message) => {
            assert!(message.starts_with("JsonReaderException"), "{message}")
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }
    assert_eq!(upstream.calls("create").await, 1);
    assert!(upstream.pats().await.is_empty());
}

#[tokio::test]
async fn a_429_is_waited_out_for_its_retry_after_then_the_call_succeeds() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    create(&upstream, &client, "tb:x", "vso.code").await;
    upstream
        .set_faults(json!([{"operation": "list", "retryAfterSeconds": 1, "times": 1}]))
        .await;
    let listed = client.list(&org("fabrikam"), &active()).await.unwrap().pats;
    assert_eq!(listed.len(), 1);
    assert_eq!(upstream.calls("list").await, 2);
}

#[tokio::test]
async fn a_429_longer_than_the_cap_is_returned_as_rate_limited_and_holds_later_calls_back() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    let pat = create(&upstream, &client, "tb:x", "vso.code").await;
    upstream
        .set_faults(json!([{"operation": "get", "retryAfterSeconds": 120, "times": 1}]))
        .await;
    let err = client
        .get(&org("fabrikam"), pat.authorization_id)
        .await
        .unwrap_err();
    match err {
        UpstreamError::RateLimited { retry_after } => {
            assert_eq!(retry_after, Some(Duration::from_secs(120)))
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(upstream.calls("get").await, 1);
    // Retry-After is honoured for the next call too: it is not sent.
    let err = client.list(&org("fabrikam"), &active()).await.unwrap_err();
    assert!(
        matches!(
            err,
            UpstreamError::RateLimited {
                retry_after: Some(_)
            }
        ),
        "{err:?}"
    );
    assert_eq!(upstream.calls("list").await, 0);
}

#[tokio::test]
async fn a_delayed_200_with_retry_after_is_served_and_holds_the_next_call_back() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    create(&upstream, &client, "tb:x", "vso.code").await;
    // DOC-RATELIMITS: a delayed request "still returns HTTP 200" with
    // Retry-After; here longer than the client's cap (30 s).
    upstream
        .set_faults(
            json!([{"operation": "list", "status": 200, "retryAfterSeconds": 120, "times": 1}]),
        )
        .await;
    assert_eq!(
        client
            .list(&org("fabrikam"), &active())
            .await
            .unwrap()
            .pats
            .len(),
        1
    );
    let err = client.list(&org("fabrikam"), &active()).await.unwrap_err();
    assert!(
        matches!(
            err,
            UpstreamError::RateLimited {
                retry_after: Some(_)
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        upstream.calls("list").await,
        1,
        "the second call was not sent"
    );
}

#[tokio::test]
async fn server_errors_are_retried_for_get_list_update_and_revoke() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    let fabrikam = org("fabrikam");
    let pat = create(&upstream, &client, "tb:x", "vso.code").await;
    upstream
        .set_faults(json!([
            {"operation": "get", "status": 503, "times": 2},
            {"operation": "list", "status": 500, "times": 1},
            {"operation": "update", "status": 502, "times": 1},
            {"operation": "revoke", "status": 500, "times": 1}
        ]))
        .await;
    client.get(&fabrikam, pat.authorization_id).await.unwrap();
    assert_eq!(upstream.calls("get").await, 3);
    assert_eq!(
        client.list(&fabrikam, &active()).await.unwrap().pats.len(),
        1
    );
    assert_eq!(upstream.calls("list").await, 2);
    let later = upstream.now().await + hours(2);
    let updated = client
        .update(
            &fabrikam,
            &UpdatePat {
                authorization_id: pat.authorization_id,
                display_name: None,
                scope: None,
                valid_to: Some(later),
            },
        )
        .await
        .unwrap();
    assert_close(updated.valid_to, later);
    assert_eq!(upstream.calls("update").await, 2);
    client
        .revoke(&fabrikam, pat.authorization_id)
        .await
        .unwrap();
    assert_eq!(upstream.calls("revoke").await, 2);
}

#[tokio::test]
async fn server_errors_that_persist_end_as_unavailable_after_the_retry_budget() {
    let upstream = Upstream::start().await;
    let client = upstream.client_with(AzureDevOpsConfig {
        max_retries: 2,
        ..upstream.client_config()
    });
    let pat = create(&upstream, &client, "tb:x", "vso.code").await;
    upstream
        .set_faults(json!([{"operation": "get", "status": 500}]))
        .await;
    let err = client
        .get(&org("fabrikam"), pat.authorization_id)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Unavailable(_)), "{err:?}");
    assert_eq!(
        upstream.calls("get").await,
        3,
        "first attempt and two retries"
    );
}

#[tokio::test]
async fn create_is_not_retried_after_a_server_error_and_the_pat_can_be_found_by_its_display_name() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    // The PAT is created, then the answer is replaced by a 500.
    upstream
        .set_faults(
            json!([{"operation": "create", "status": 500, "latencyWhen": "after", "times": 1}]),
        )
        .await;
    let now = upstream.now().await;
    let err = client
        .create(
            &org("fabrikam"),
            &request("tb:dep:lease-1", "vso.code", now + hours(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Unavailable(_)), "{err:?}");
    assert_eq!(upstream.calls("create").await, 1, "create is sent once");
    let found: Vec<_> = client
        .list(&org("fabrikam"), &active())
        .await
        .unwrap()
        .pats
        .into_iter()
        .filter(|p| p.display_name == "tb:dep:lease-1")
        .collect();
    assert_eq!(found.len(), 1, "exactly one PAT exists for the lease");
}

#[tokio::test]
async fn create_is_not_retried_after_a_timeout() {
    let upstream = Upstream::start().await;
    let client = upstream.client_with(AzureDevOpsConfig {
        request_timeout: Duration::from_millis(300),
        ..upstream.client_config()
    });
    upstream
        .set_faults(
            json!([{"operation": "create", "latencyMs": 1500, "latencyWhen": "after", "times": 1}]),
        )
        .await;
    let now = upstream.now().await;
    let err = client
        .create(
            &org("fabrikam"),
            &request("tb:slow", "vso.code", now + hours(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Unavailable(_)), "{err:?}");
    assert_eq!(upstream.calls("create").await, 1);
    assert_eq!(upstream.pats().await.len(), 1, "upstream did create it");
}

#[tokio::test]
async fn a_dropped_connection_is_retried_for_get_but_not_for_create() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    let pat = create(&upstream, &client, "tb:x", "vso.code").await;
    upstream
        .set_faults(json!([
            {"operation": "get", "dropConnection": true, "times": 1},
            {"operation": "create", "dropConnection": true, "times": 1}
        ]))
        .await;
    client
        .get(&org("fabrikam"), pat.authorization_id)
        .await
        .unwrap();
    assert_eq!(upstream.calls("get").await, 2);
    let now = upstream.now().await;
    let err = client
        .create(
            &org("fabrikam"),
            &request("tb:y", "vso.code", now + hours(1)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Unavailable(_)), "{err:?}");
    assert_eq!(
        upstream.calls("create").await,
        2,
        "one for tb:x, one for tb:y"
    );
}

#[tokio::test]
async fn a_list_whose_pages_repeat_ends_without_looping_or_duplicates() {
    let upstream = Upstream::start().await;
    let client = upstream.client_with(AzureDevOpsConfig {
        page_size: 2,
        ..upstream.client_config()
    });
    for i in 0..5 {
        create(&upstream, &client, &format!("tb:{i}"), "vso.code").await;
    }
    upstream
        .set_faults(json!([{"operation": "list", "repeatPage": true}]))
        .await;
    let listing = client.list(&org("fabrikam"), &active()).await.unwrap();
    assert!(
        !listing.complete,
        "a repeated page ends the list as incomplete"
    );
    let listed = listing.pats;
    assert_eq!(listed.len(), 2, "the first page, once");
    assert_eq!(ids(&listed).len(), 2);
    assert_eq!(
        upstream.calls("list").await,
        2,
        "the repeat is noticed at once"
    );
}

#[tokio::test]
async fn every_documented_api_version_form_is_accepted_and_a_malformed_one_is_a_bad_request() {
    let upstream = Upstream::start().await;
    for version in [
        "7.1-preview.1",
        "7.1-preview",
        "7.2-preview.1",
        "6.1-preview",
    ] {
        let client = upstream.client_with(AzureDevOpsConfig {
            api_version: version.into(),
            ..upstream.client_config()
        });
        client
            .list(&org("fabrikam"), &active())
            .await
            .unwrap_or_else(|e| panic!("{version}: {e}"));
    }
    let client = upstream.client_with(AzureDevOpsConfig {
        api_version: "4.1.".into(),
        ..upstream.client_config()
    });
    let err = client.list(&org("fabrikam"), &active()).await.unwrap_err();
    match err {
        UpstreamError::BadRequest(message) => {
            assert!(message.contains("Invalid api version"), "{message}")
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }
}

// ------------------------------------------------------------ credentials

#[tokio::test]
async fn a_rotated_refresh_token_reaches_the_sink_and_works_on_its_own() {
    let upstream = Upstream::start().await;
    let (source, sink) = upstream.refresh_source();
    let client = AzureDevOpsClient::new(upstream.client_config(), source).unwrap();
    client.list(&org("fabrikam"), &active()).await.unwrap();
    let saved = sink.saved();
    assert_eq!(saved.len(), 1);
    let rotated = saved[0].clone();
    assert_ne!(
        rotated.expose_secret(),
        token_broker::emulator::DEFAULT_REFRESH_TOKEN
    );

    let next = RefreshTokenSource::new(upstream.entra_config(), rotated, sink.clone()).unwrap();
    let client = AzureDevOpsClient::new(upstream.client_config(), Arc::new(next)).unwrap();
    client.list(&org("fabrikam"), &active()).await.unwrap();
    assert_eq!(sink.saved().len(), 2);
}

#[tokio::test]
async fn a_token_endpoint_outage_is_retried_even_for_create_because_nothing_was_sent() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    upstream
        .set_faults(json!([{"operation": "token", "status": 503, "times": 1}]))
        .await;
    let now = upstream.now().await;
    let pat = client
        .create(
            &org("fabrikam"),
            &request("tb:after-outage", "vso.code", now + hours(1)),
        )
        .await
        .unwrap();
    assert!(pat.token.is_some());
    assert_eq!(upstream.calls("token").await, 2);
    assert_eq!(upstream.calls("create").await, 1);
}

#[tokio::test]
async fn a_throttled_token_endpoint_is_waited_out_and_create_is_still_sent_once() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    upstream
        .set_faults(json!([{"operation": "token", "retryAfterSeconds": 1, "times": 1}]))
        .await;
    let now = upstream.now().await;
    client
        .create(
            &org("fabrikam"),
            &request("tb:after-429", "vso.code", now + hours(1)),
        )
        .await
        .unwrap();
    assert_eq!(upstream.calls("token").await, 2);
    assert_eq!(upstream.calls("create").await, 1);
}

#[tokio::test]
async fn an_access_token_that_expired_upstream_is_replaced_after_one_401() {
    let upstream = Upstream::start().await;
    let client = upstream.client();
    client.list(&org("fabrikam"), &active()).await.unwrap();
    // Upstream's clock passes the access token's hour; ours has not.
    upstream.advance_clock(Duration::from_secs(2 * 3600)).await;
    client.list(&org("fabrikam"), &active()).await.unwrap();
    assert_eq!(upstream.calls("token").await, 2);
    assert_eq!(upstream.calls("list").await, 3, "one 401, then success");
}

#[tokio::test]
async fn the_access_token_is_cached_and_concurrent_callers_share_one_refresh() {
    let upstream = Upstream::start().await;
    let client = Arc::new(upstream.client());
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.list(&org("fabrikam"), &ListPats::default()).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    client.list(&org("fabrikam"), &active()).await.unwrap();
    assert_eq!(upstream.calls("token").await, 1);
}

#[tokio::test]
async fn a_revoked_refresh_token_is_an_authentication_error_naming_the_aadsts_code_not_the_token() {
    let upstream = Upstream::start().await;
    upstream
        .http
        .post(upstream.url("/_emulator/refresh-tokens/revoke"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let (source, sink) = upstream.refresh_source();
    let err = source.bearer().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, UpstreamError::Authentication(_)), "{err:?}");
    assert!(
        text.contains("invalid_grant") && text.contains("AADSTS"),
        "{text}"
    );
    assert!(!text.contains(token_broker::emulator::DEFAULT_REFRESH_TOKEN));
    assert!(sink.saved().is_empty());
}

#[tokio::test]
async fn an_app_only_token_is_refused_by_the_pat_api() {
    let upstream = Upstream::start().await;
    let app = upstream.app_only_token().await;
    let client = upstream.client_with_bearer(app.clone());
    let err = client.list(&org("fabrikam"), &active()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Authentication(_)), "{err:?}");
    // X-TFS-FedAuthRedirect: Suppress was sent: the refusal was a 401
    // (retried once with a fresh bearer), not the sign-in page.
    assert_eq!(upstream.calls("list").await, 2);

    // Without it the service answers with its sign-in page: no retry.
    let client = AzureDevOpsClient::new(
        AzureDevOpsConfig {
            suppress_fed_auth_redirect: false,
            ..upstream.client_config()
        },
        Arc::new(token_broker::upstream::entra::StaticTokenSource::new(app)),
    )
    .unwrap();
    let err = client.list(&org("fabrikam"), &active()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Authentication(_)), "{err:?}");
    assert_eq!(upstream.calls("list").await, 3);
}

#[tokio::test]
async fn a_pat_is_refused_by_the_pat_api_as_bearer_and_as_basic_auth() {
    let upstream = Upstream::start().await;
    let pat = create(&upstream, &upstream.client(), "tb:x", "vso.code")
        .await
        .token
        .unwrap();
    let client = upstream.client_with_bearer(pat.clone());
    let err = client.list(&org("fabrikam"), &active()).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Authentication(_)), "{err:?}");

    let pats_url = upstream.url("/fabrikam/_apis/tokens/pats?api-version=7.1-preview.1");
    let suppressed = upstream
        .http
        .get(&pats_url)
        .basic_auth("", Some(pat.expose_secret()))
        .header("X-TFS-FedAuthRedirect", "Suppress")
        .send()
        .await
        .unwrap();
    assert_eq!(suppressed.status().as_u16(), 401);
    let redirected = upstream
        .http
        .get(&pats_url)
        .basic_auth("", Some(pat.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(redirected.status().as_u16(), 203);
}

// ---------------------------------------------------------------- secrets

#[tokio::test]
async fn no_bearer_pat_or_refresh_token_reaches_the_logs_even_at_trace_level() {
    let captured = common::logs::CapturedLogs::start(tracing::Level::TRACE);

    let upstream = Upstream::start().await;
    let (source, sink) = upstream.refresh_source();
    let client = AzureDevOpsClient::new(upstream.client_config(), source.clone()).unwrap();
    let fabrikam = org("fabrikam");
    let pat = create(&upstream, &client, "tb:secret-check", "vso.code").await;
    upstream
        .set_faults(json!([
            {"operation": "get", "status": 401, "times": 1},
            {"operation": "list", "status": 503, "times": 1}
        ]))
        .await;
    client.get(&fabrikam, pat.authorization_id).await.unwrap();
    client.list(&fabrikam, &active()).await.unwrap();
    client
        .revoke(&fabrikam, pat.authorization_id)
        .await
        .unwrap();
    let bearer = source.bearer().await.unwrap();

    let logs = captured.text();
    assert!(logs.contains("upstream"), "the capture works: {logs}");
    assert!(
        logs.contains(&pat.authorization_id.to_string()),
        "ids are logged"
    );
    let mut secrets = vec![
        pat.token.unwrap().expose_secret().to_owned(),
        bearer.expose_secret().to_owned(),
        token_broker::emulator::DEFAULT_REFRESH_TOKEN.to_owned(),
    ];
    secrets.extend(sink.saved().iter().map(|t| t.expose_secret().to_owned()));
    for secret in secrets {
        assert!(!logs.contains(&secret), "a secret reached the logs");
    }
}

// ------------------------------------------------------ documented examples

/// Replays the five example exchanges of upstream-spec/tokens/*/httpExamples
/// through the client, at the examples' own api-version, and checks that the
/// answers mean what the examples' answers mean (values differ: ids and
/// dates are the emulator's own; the 2020 examples' dates are in the past).
#[tokio::test]
async fn the_documented_example_exchanges_replayed_through_the_client_mean_the_same() {
    let upstream = Upstream::start_with(EmulatorConfig {
        legacy_tokens: true,
        ..EmulatorConfig::default()
    })
    .await;
    let client = upstream.client_with(AzureDevOpsConfig {
        api_version: "6.1-preview".into(),
        ..upstream.client_config()
    });
    let fabrikam = org("fabrikam");
    // The examples send `.319Z` and get `.32Z` back: SQL Server datetime
    // rounding (docs/upstream-api.md, validTo rounding).
    let whole_second =
        |at: DateTime<Utc>| DateTime::<Utc>::from_timestamp(at.timestamp(), 0).unwrap();
    let sent = whole_second(upstream.now().await + chrono::Duration::days(29))
        + chrono::Duration::milliseconds(319);

    // CreatePat: {"displayName":"new_token","scope":"app_token","validTo":"…23.319Z","allOrgs":false}
    let created = client
        .create(&fabrikam, &request("new_token", "app_token", sent))
        .await
        .unwrap();
    assert_eq!(created.display_name, "new_token");
    assert_eq!(created.scope, "app_token");
    assert_eq!(
        created.valid_to,
        whole_second(sent) + chrono::Duration::milliseconds(320)
    );
    assert_eq!(created.target_accounts.as_ref().map(Vec::len), Some(1));
    let token = created.token.clone().unwrap();
    assert_eq!(
        token.expose_secret().len(),
        52,
        "the examples' legacy format"
    );

    // GetPat: the same PAT, `token: null`.
    let got = client
        .get(&fabrikam, created.authorization_id)
        .await
        .unwrap();
    assert_eq!(got.display_name, "new_token");
    assert_eq!(got.valid_to, created.valid_to);
    assert_eq!(got.valid_from, created.valid_from);
    assert_eq!(got.target_accounts, created.target_accounts);
    assert!(got.token.is_none());

    // ListPats: `continuationToken: ""`, every `token: null`.
    let listed = client
        .list(&fabrikam, &ListPats::default())
        .await
        .unwrap()
        .pats;
    assert_eq!(ids(&listed), HashSet::from([created.authorization_id]));
    assert!(listed[0].token.is_none());

    // UpdatePat: new name, scope and validTo (the client never sends
    // `allOrgs: true`: global PATs are retired, section 4.2).
    let updated = client
        .update(
            &fabrikam,
            &UpdatePat {
                authorization_id: created.authorization_id,
                display_name: Some("updated_token".into()),
                scope: Some("vso.analytics".into()),
                valid_to: Some(sent + chrono::Duration::days(1)),
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.display_name, "updated_token");
    assert_eq!(updated.scope, "vso.analytics");
    assert_eq!(
        updated.valid_to,
        whole_second(sent) + chrono::Duration::days(1) + chrono::Duration::milliseconds(320)
    );
    assert_eq!(updated.valid_from, created.valid_from);
    assert!(updated.token.is_none());

    // RevokePat: 204 `{}`.
    client
        .revoke(&fabrikam, created.authorization_id)
        .await
        .unwrap();
    let revoked = client
        .list(&fabrikam, &filtered(DisplayFilter::Revoked))
        .await
        .unwrap()
        .pats;
    assert_eq!(ids(&revoked), HashSet::from([created.authorization_id]));
}
