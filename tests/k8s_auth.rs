//! Kubernetes service-account callers: projected tokens
//! verified against a JWKS served over a real socket, or through a fake API
//! server's TokenReview. Keys are made by the tests; no cluster is needed.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::json;
use token_broker::auth::kubernetes::{
    KubernetesAuthConfig, KubernetesAuthError, KubernetesVerifier, ServiceAccountCaller,
    TokenReviewConfig,
};
use token_broker::domain::Identity;
use token_broker::error::{ErrorCode, ServiceError};

use common::k8s::{
    authenticated_status, claims, hs256_token, now, token_file, unsigned_token, FakeApiServer,
    FakeIssuer, SigningKey, AUDIENCE,
};

fn verifier(config: &KubernetesAuthConfig) -> KubernetesVerifier {
    KubernetesVerifier::new(config).expect("valid config")
}

fn restorer() -> Identity {
    Identity::ServiceAccount {
        namespace: "build".into(),
        name: "restorer".into(),
    }
}

/// The result is a refusal with `reason` and UNAUTHENTICATED, and neither
/// its message nor its Debug output holds the token or any part of it.
#[track_caller]
fn assert_refused(
    result: Result<ServiceAccountCaller, KubernetesAuthError>,
    reason: &str,
    token: &str,
) -> KubernetesAuthError {
    let err = result.expect_err("token must be refused");
    assert_eq!(err.reason(), reason, "{err}");
    assert_eq!(err.code(), ErrorCode::Unauthenticated, "{err}");
    assert_no_token_in(&err, token);
    err
}

#[track_caller]
fn assert_no_token_in(err: &KubernetesAuthError, token: &str) {
    let shown = format!("{err} {err:?}");
    assert!(
        token.len() < 8 || !shown.contains(token),
        "token leaked: {shown}"
    );
    for part in token.split('.').filter(|p| p.len() >= 8) {
        assert!(!shown.contains(part), "token part leaked: {shown}");
    }
}

#[tokio::test]
async fn a_projected_service_account_token_is_accepted_and_mapped_to_its_service_account() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    let caller = verifier.verify(&token).await.expect("accepted");

    assert_eq!(caller.identity, restorer());
    assert_eq!(
        caller.identity.to_string(),
        "k8s:system:serviceaccount:build:restorer"
    );
    assert_eq!(caller.pod_name.as_deref(), Some("restorer-7d9c5b6f4-x2x9q"));
    assert_eq!(
        caller.pod_uid.as_deref(),
        Some("8f1e5b8a-3c2d-4e6f-9a0b-1c2d3e4f5a6b")
    );
    assert_eq!(
        caller.service_account_uid.as_deref(),
        Some("b1f3c0a2-77e4-4d51-8e9a-2f6d5c4b3a21")
    );
    assert_eq!(
        caller.token_id.as_deref(),
        Some("5a3e1c52-8d0e-4c35-a5bb-1d1b6f7c9a10")
    );
    let as_caller = caller.caller(Some("127.0.0.1:5000".into()));
    assert_eq!(as_caller.identity, restorer());
    assert_eq!(as_caller.peer.as_deref(), Some("127.0.0.1:5000"));
    // Found through discovery, then cached: later calls fetch nothing.
    assert_eq!(issuer.discovery_fetches(), 1);
    assert_eq!(issuer.jwks_fetches(), 1);
    verifier.verify(&token).await.expect("accepted again");
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[tokio::test]
async fn an_rs256_token_is_accepted_with_keys_from_a_configured_jwks_url() {
    let key = SigningKey::rs256("rsa-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&KubernetesAuthConfig {
        jwks_url: Some(issuer.jwks_url().parse().unwrap()),
        ..issuer.config()
    });

    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    let caller = verifier.verify(&token).await.expect("accepted");

    assert_eq!(caller.identity, restorer());
    assert_eq!(issuer.discovery_fetches(), 0, "jwks_url skips discovery");
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[tokio::test]
async fn a_token_not_bound_to_a_pod_still_authenticates_without_pod_claims() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    let mut claims = claims(&issuer.issuer(), "build", "restorer");
    claims["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("pod");
    let caller = verifier.verify(&key.sign(&claims)).await.expect("accepted");

    assert_eq!(caller.identity, restorer());
    assert_eq!(caller.pod_name, None);
    assert_eq!(caller.pod_uid, None);
}

#[tokio::test]
async fn an_expired_token_is_refused_as_expired() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    let mut claims = claims(&issuer.issuer(), "build", "restorer");
    claims["iat"] = json!(now() - 3600);
    claims["nbf"] = json!(now() - 3600);
    claims["exp"] = json!(now() - 120);
    let token = key.sign(&claims);

    assert_refused(verifier.verify(&token).await, "TOKEN_EXPIRED", &token);
}

#[tokio::test]
async fn a_token_expired_within_the_leeway_is_still_accepted() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&KubernetesAuthConfig {
        leeway: Duration::from_secs(300),
        ..issuer.config()
    });

    let mut claims = claims(&issuer.issuer(), "build", "restorer");
    claims["exp"] = json!(now() - 60);
    verifier
        .verify(&key.sign(&claims))
        .await
        .expect("within leeway");
}

#[tokio::test]
async fn a_token_that_is_not_yet_valid_is_refused() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    let mut claims = claims(&issuer.issuer(), "build", "restorer");
    claims["nbf"] = json!(now() + 600);
    claims["exp"] = json!(now() + 1200);
    let token = key.sign(&claims);

    assert_refused(verifier.verify(&token).await, "TOKEN_NOT_YET_VALID", &token);
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    // The API server's own audience: a default token mounted in every pod.
    let mut claims = claims(&issuer.issuer(), "build", "restorer");
    claims["aud"] = json!(["https://kubernetes.default.svc.cluster.local"]);
    let token = key.sign(&claims);
    assert_refused(
        verifier.verify(&token).await,
        "TOKEN_AUDIENCE_MISMATCH",
        &token,
    );

    claims.as_object_mut().unwrap().remove("aud");
    let token = key.sign(&claims);
    assert_refused(
        verifier.verify(&token).await,
        "TOKEN_AUDIENCE_MISMATCH",
        &token,
    );
}

#[tokio::test]
async fn a_token_naming_any_one_of_the_configured_audiences_is_accepted() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&KubernetesAuthConfig {
        audiences: vec![AUDIENCE.into(), "token-broker.prod".into()],
        ..issuer.config()
    });

    let mut claims = claims(&issuer.issuer(), "build", "restorer");
    claims["aud"] = json!(["vault", "token-broker.prod"]);
    verifier.verify(&key.sign(&claims)).await.expect("accepted");
    claims["aud"] = json!(AUDIENCE);
    verifier
        .verify(&key.sign(&claims))
        .await
        .expect("a single string aud is accepted too");
}

#[tokio::test]
async fn a_token_from_another_issuer_is_refused() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    let token = key.sign(&claims(
        "https://other-cluster.example",
        "build",
        "restorer",
    ));
    assert_refused(
        verifier.verify(&token).await,
        "TOKEN_ISSUER_MISMATCH",
        &token,
    );
}

#[tokio::test]
async fn a_token_signed_by_an_unknown_key_is_refused() {
    let known = SigningKey::es256("es-1");
    let stranger = SigningKey::es256("es-stranger");
    let issuer = FakeIssuer::start(&[&known]).await;
    let verifier = verifier(&issuer.config());

    let token = stranger.sign(&claims(&issuer.issuer(), "build", "restorer"));
    let err = assert_refused(verifier.verify(&token).await, "TOKEN_KEY_UNKNOWN", &token);
    assert!(err.to_string().contains("es-stranger"), "{err}");
}

#[tokio::test]
async fn a_forged_token_naming_a_known_kid_is_refused_as_a_bad_signature() {
    let known = SigningKey::es256("es-1");
    let forger = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&known]).await;
    let verifier = verifier(&issuer.config());

    let token = forger.sign(&claims(&issuer.issuer(), "build", "restorer"));
    assert_refused(
        verifier.verify(&token).await,
        "TOKEN_SIGNATURE_INVALID",
        &token,
    );
}

#[tokio::test]
async fn an_unsigned_alg_none_token_is_refused_before_any_key_is_fetched() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    let token = unsigned_token("es-1", &claims(&issuer.issuer(), "build", "restorer"));
    let err = assert_refused(
        verifier.verify(&token).await,
        "TOKEN_ALGORITHM_UNSUPPORTED",
        &token,
    );
    assert!(err.to_string().contains("\"none\""), "{err}");
    assert_eq!(issuer.jwks_fetches(), 0);
}

#[tokio::test]
async fn an_hs256_token_keyed_with_the_public_key_is_refused() {
    let es = SigningKey::es256("es-1");
    let rsa = SigningKey::rs256("rsa-1");
    let issuer = FakeIssuer::start(&[&es, &rsa]).await;
    let verifier = verifier(&issuer.config());
    let claims = claims(&issuer.issuer(), "build", "restorer");

    for (key, secret) in [
        (&es, es.public_bytes.clone()),
        (&rsa, rsa.public_bytes.clone()),
        (&rsa, rsa.jwk().to_string().into_bytes()),
    ] {
        let token = hs256_token(&key.kid, &secret, &claims);
        assert_refused(
            verifier.verify(&token).await,
            "TOKEN_ALGORITHM_UNSUPPORTED",
            &token,
        );
    }
}

#[tokio::test]
async fn a_token_with_a_tampered_signature_is_refused() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(signature).unwrap();
    sig[10] ^= 0x01;
    let tampered = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&sig));

    assert_refused(
        verifier.verify(&tampered).await,
        "TOKEN_SIGNATURE_INVALID",
        &tampered,
    );
}

#[tokio::test]
async fn a_token_whose_claims_were_edited_after_signing_is_refused() {
    let key = SigningKey::rs256("rsa-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    let mut parts = token.split('.');
    let (header, _, signature) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    // Same signature, but the payload now claims the admin service account.
    let forged =
        URL_SAFE_NO_PAD.encode(claims(&issuer.issuer(), "kube-system", "admin").to_string());
    let tampered = format!("{header}.{forged}.{signature}");

    assert_refused(
        verifier.verify(&tampered).await,
        "TOKEN_SIGNATURE_INVALID",
        &tampered,
    );
}

#[tokio::test]
async fn a_token_whose_subject_disagrees_with_its_kubernetes_claim_is_refused() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    let mut claims = claims(&issuer.issuer(), "build", "restorer");
    claims["sub"] = json!("system:serviceaccount:kube-system:admin");
    let token = key.sign(&claims);
    assert_refused(
        verifier.verify(&token).await,
        "TOKEN_SUBJECT_INVALID",
        &token,
    );
}

#[tokio::test]
async fn a_token_of_a_subject_that_is_not_a_service_account_is_refused() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    for sub in [
        "alice",
        "system:node:worker-1",
        "system:serviceaccount:a:b:c",
    ] {
        let mut claims = claims(&issuer.issuer(), "build", "restorer");
        claims["sub"] = json!(sub);
        let token = key.sign(&claims);
        assert_refused(
            verifier.verify(&token).await,
            "TOKEN_SUBJECT_INVALID",
            &token,
        );
    }
}

#[tokio::test]
async fn garbage_in_the_bearer_is_refused_as_malformed() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&issuer.config());

    for garbage in [
        "",
        "tbk_not-a-jwt",
        "a.b.c",
        "e30.e30.",
        "x".repeat(20_000).as_str(),
    ] {
        assert_refused(verifier.verify(garbage).await, "TOKEN_MALFORMED", garbage);
    }
    assert_eq!(issuer.jwks_fetches(), 0);
}

#[tokio::test]
async fn a_rotated_signing_key_is_accepted_after_one_refetch() {
    let old = SigningKey::es256("2026-01");
    let new = SigningKey::rs256("2026-02");
    let issuer = FakeIssuer::start(&[&old]).await;
    // No rate limit, so the rotation is seen at the first token of the new key.
    let verifier = verifier(&KubernetesAuthConfig {
        jwks_refetch_min_interval: Duration::ZERO,
        ..issuer.config()
    });
    verifier
        .verify(&old.sign(&claims(&issuer.issuer(), "build", "restorer")))
        .await
        .expect("old key");
    assert_eq!(issuer.jwks_fetches(), 1);

    issuer.publish(&[&old, &new]);
    let token = new.sign(&claims(&issuer.issuer(), "build", "restorer"));
    let caller = verifier
        .verify(&token)
        .await
        .expect("new key after refetch");

    assert_eq!(caller.identity, restorer());
    assert_eq!(issuer.jwks_fetches(), 2);
    verifier.verify(&token).await.expect("cached now");
    assert_eq!(issuer.jwks_fetches(), 2);
    assert_eq!(issuer.discovery_fetches(), 1, "jwks_uri is remembered");
}

#[tokio::test]
async fn within_the_rate_limit_window_an_unknown_kid_causes_no_refetch() {
    let old = SigningKey::es256("2026-01");
    let new = SigningKey::es256("2026-02");
    let issuer = FakeIssuer::start(&[&old]).await;
    let verifier = verifier(&KubernetesAuthConfig {
        jwks_refetch_min_interval: Duration::from_secs(3600),
        ..issuer.config()
    });
    verifier
        .verify(&old.sign(&claims(&issuer.issuer(), "build", "restorer")))
        .await
        .expect("old key");

    issuer.publish(&[&old, &new]);
    let token = new.sign(&claims(&issuer.issuer(), "build", "restorer"));
    assert_refused(verifier.verify(&token).await, "TOKEN_KEY_UNKNOWN", &token);
    assert_eq!(issuer.jwks_fetches(), 1, "the window is still open");
}

#[tokio::test]
async fn a_burst_of_50_forged_tokens_with_random_kids_causes_at_most_one_jwks_fetch() {
    let key = SigningKey::es256("es-1");
    let forger = SigningKey::es256("forger");
    let issuer = FakeIssuer::start(&[&key]).await;
    // Concurrent misses overlap the one fetch in flight.
    issuer.set_jwks_delay(Duration::from_millis(200));
    let verifier = verifier(&issuer.config());
    let claims = claims(&issuer.issuer(), "kube-system", "admin");

    let burst = (0..50).map(|_| {
        let kid = uuid::Uuid::new_v4().to_string();
        let token = forger.sign_with_kid(Some(&kid), &claims);
        let verifier = verifier.clone();
        tokio::spawn(async move { (verifier.verify(&token).await, token) })
    });
    for outcome in futures::future::join_all(burst).await {
        let (result, token) = outcome.expect("task");
        assert_refused(result, "TOKEN_KEY_UNKNOWN", &token);
    }
    assert_eq!(issuer.jwks_fetches(), 1);

    // A second burst in the same window fetches nothing more, and a real
    // token still gets through.
    for _ in 0..50 {
        let kid = uuid::Uuid::new_v4().to_string();
        let token = forger.sign_with_kid(Some(&kid), &claims);
        assert_refused(verifier.verify(&token).await, "TOKEN_KEY_UNKNOWN", &token);
    }
    assert_eq!(issuer.jwks_fetches(), 1);
    let real = key.sign(&common::k8s::claims(&issuer.issuer(), "build", "restorer"));
    verifier.verify(&real).await.expect("real token");
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[tokio::test]
async fn a_token_without_a_kid_is_checked_against_every_published_key() {
    let first = SigningKey::es256("es-1");
    let second = SigningKey::rs256("rsa-1");
    let issuer = FakeIssuer::start(&[&first, &second]).await;
    let verifier = verifier(&issuer.config());
    let claims = claims(&issuer.issuer(), "build", "restorer");

    verifier
        .verify(&second.sign_with_kid(None, &claims))
        .await
        .expect("found by trying the keys");
    let stranger = SigningKey::es256("x").sign_with_kid(None, &claims);
    assert_refused(
        verifier.verify(&stranger).await,
        "TOKEN_SIGNATURE_INVALID",
        &stranger,
    );
}

#[tokio::test]
async fn keys_of_unknown_kinds_in_the_jwks_are_skipped_not_fatal() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[]).await;
    issuer.publish_raw(json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        {"kty": "RSA", "use": "enc", "kid": "enc", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        "not even an object",
        key.jwk(),
    ]}));
    let verifier = verifier(&issuer.config());

    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    verifier.verify(&token).await.expect("the usable key");
}

#[tokio::test]
async fn an_unreachable_jwks_is_reported_as_unavailable_not_as_a_bad_token() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    issuer.set_failing(true);
    let verifier = verifier(&issuer.config());

    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    let err = verifier.verify(&token).await.unwrap_err();

    assert_eq!(err.reason(), "JWKS_UNAVAILABLE", "{err}");
    assert_eq!(err.code(), ErrorCode::Unavailable);
    assert!(err.to_string().contains("503"), "{err}");
    assert_no_token_in(&err, &token);
}

/// Waits (bounded) for a background JWKS refresh to have been answered.
async fn wait_for_jwks_fetches(issuer: &FakeIssuer, count: usize) {
    for _ in 0..1000 {
        if issuer.jwks_fetches() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the JWKS was fetched {} times, not {count}",
        issuer.jwks_fetches()
    );
}

#[tokio::test]
async fn cached_keys_keep_working_while_the_jwks_is_down() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let verifier = verifier(&KubernetesAuthConfig {
        // Every use starts a refresh, and every refresh fails.
        jwks_max_age: Duration::ZERO,
        jwks_refetch_min_interval: Duration::ZERO,
        ..issuer.config()
    });
    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    verifier.verify(&token).await.expect("first fetch");

    issuer.set_failing(true);
    verifier.verify(&token).await.expect("aged keys are used");
    wait_for_jwks_fetches(&issuer, 2).await;
    verifier
        .verify(&token)
        .await
        .expect("a failed refresh keeps the keys");
}

#[tokio::test]
async fn a_key_removed_from_the_jwks_stops_being_trusted_once_the_cache_has_aged() {
    let retired = SigningKey::es256("2025-12");
    let current = SigningKey::es256("2026-01");
    let issuer = FakeIssuer::start(&[&retired, &current]).await;
    let verifier = verifier(&KubernetesAuthConfig {
        jwks_max_age: Duration::ZERO,
        jwks_refetch_min_interval: Duration::ZERO,
        ..issuer.config()
    });
    let token = retired.sign(&claims(&issuer.issuer(), "build", "restorer"));
    verifier.verify(&token).await.expect("still published");

    issuer.publish(&[&current]);
    // Each use finds the keys aged and refreshes them in the background;
    // the aged keys serve until the refreshed set is in (bounded wait).
    let mut outcome = verifier.verify(&token).await;
    for _ in 0..1000 {
        if outcome.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        outcome = verifier.verify(&token).await;
    }

    assert_refused(outcome, "TOKEN_KEY_UNKNOWN", &token);
    verifier
        .verify(&current.sign(&claims(&issuer.issuer(), "build", "restorer")))
        .await
        .expect("the current key");
}

#[tokio::test]
async fn a_discovery_document_naming_another_issuer_is_not_trusted() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    issuer.claim_issuer("https://evil.example");
    let verifier = verifier(&issuer.config());

    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    let err = verifier.verify(&token).await.unwrap_err();
    assert_eq!(err.reason(), "JWKS_UNAVAILABLE", "{err}");
    assert!(err.to_string().contains("evil.example"), "{err}");
    assert_eq!(issuer.jwks_fetches(), 0);
}

#[tokio::test]
async fn jwks_requests_carry_the_configured_service_account_token() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let (_dir, path) = token_file("broker-own-token\n");
    let verifier = verifier(&KubernetesAuthConfig {
        jwks_token_file: Some(path),
        ..issuer.config()
    });

    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    verifier.verify(&token).await.expect("accepted");
    let seen = issuer.authorizations();
    assert_eq!(seen.len(), 2, "discovery and JWKS");
    for auth in seen {
        assert_eq!(auth.as_deref(), Some("Bearer broker-own-token"));
    }
}

fn review_config(api: &FakeApiServer, token_file: std::path::PathBuf) -> KubernetesAuthConfig {
    KubernetesAuthConfig {
        enabled: true,
        token_review: Some(TokenReviewConfig {
            api_server: api.url().parse().unwrap(),
            ca_file: None,
            token_file,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn token_review_accepts_an_authenticated_service_account_and_maps_its_pod() {
    let api = FakeApiServer::start("broker-sa-token").await;
    let (_dir, path) = token_file("broker-sa-token\n");
    let verifier = verifier(&review_config(&api, path));
    let key = SigningKey::rs256("rsa-1");
    let token = key.sign(&claims(
        "https://kubernetes.default.svc",
        "build",
        "restorer",
    ));
    api.answer(
        &token,
        authenticated_status("build", "restorer", &[AUDIENCE]),
    );

    let caller = verifier.verify(&token).await.expect("accepted");

    assert_eq!(caller.identity, restorer());
    assert_eq!(caller.pod_name.as_deref(), Some("restorer-7d9c5b6f4-x2x9q"));
    assert_eq!(
        caller.pod_uid.as_deref(),
        Some("8f1e5b8a-3c2d-4e6f-9a0b-1c2d3e4f5a6b")
    );
    assert_eq!(
        caller.service_account_uid.as_deref(),
        Some("b1f3c0a2-77e4-4d51-8e9a-2f6d5c4b3a21")
    );
    assert_eq!(
        caller.token_id.as_deref(),
        Some("5a3e1c52-8d0e-4c35-a5bb-1d1b6f7c9a10")
    );
    let requests = api.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(
        request.authorization.as_deref(),
        Some("Bearer broker-sa-token")
    );
    assert_eq!(request.content_type.as_deref(), Some("application/json"));
    assert_eq!(request.body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(request.body["kind"], "TokenReview");
    assert_eq!(request.body["spec"]["token"], token.as_str());
    assert_eq!(request.body["spec"]["audiences"], json!([AUDIENCE]));
}

#[tokio::test]
async fn token_review_refusal_such_as_a_deleted_pod_is_reported_with_the_api_servers_reason() {
    let api = FakeApiServer::start("broker-sa-token").await;
    let (_dir, path) = token_file("broker-sa-token");
    let verifier = verifier(&review_config(&api, path));
    let key = SigningKey::rs256("rsa-1");
    let token = key.sign(&claims(
        "https://kubernetes.default.svc",
        "build",
        "restorer",
    ));
    api.answer(
        &token,
        json!({
            "authenticated": false,
            "error": "[invalid bearer token, service account token has been invalidated]",
            "user": {}
        }),
    );

    let err = assert_refused(
        verifier.verify(&token).await,
        "TOKEN_REVIEW_REFUSED",
        &token,
    );
    assert!(err.to_string().contains("has been invalidated"), "{err}");
}

#[tokio::test]
async fn token_review_never_sends_an_alg_none_token_to_the_api_server() {
    let api = FakeApiServer::start("broker-sa-token").await;
    let (_dir, path) = token_file("broker-sa-token");
    let verifier = verifier(&review_config(&api, path));

    let token = unsigned_token("k", &claims("https://kubernetes.default.svc", "build", "a"));
    assert_refused(
        verifier.verify(&token).await,
        "TOKEN_ALGORITHM_UNSUPPORTED",
        &token,
    );
    assert!(api.requests().is_empty());
}

#[tokio::test]
async fn token_review_of_a_token_valid_only_for_another_audience_is_refused() {
    let api = FakeApiServer::start("broker-sa-token").await;
    let (_dir, path) = token_file("broker-sa-token");
    let verifier = verifier(&review_config(&api, path));
    let key = SigningKey::rs256("rsa-1");
    let token = key.sign(&claims(
        "https://kubernetes.default.svc",
        "build",
        "restorer",
    ));
    // An audience-unaware answer: valid for the API server itself only.
    api.answer(&token, authenticated_status("build", "restorer", &[]));

    assert_refused(
        verifier.verify(&token).await,
        "TOKEN_AUDIENCE_MISMATCH",
        &token,
    );
}

#[tokio::test]
async fn token_review_of_a_user_that_is_not_a_service_account_is_refused() {
    let api = FakeApiServer::start("broker-sa-token").await;
    let (_dir, path) = token_file("broker-sa-token");
    let verifier = verifier(&review_config(&api, path));
    let key = SigningKey::rs256("rsa-1");
    let token = key.sign(&claims(
        "https://kubernetes.default.svc",
        "build",
        "restorer",
    ));
    let mut status = authenticated_status("build", "restorer", &[AUDIENCE]);
    status["user"]["username"] = json!("oidc:alice@example.org");
    api.answer(&token, status);

    assert_refused(
        verifier.verify(&token).await,
        "TOKEN_SUBJECT_INVALID",
        &token,
    );
}

#[tokio::test]
async fn token_review_reads_the_rotated_broker_token_on_each_call() {
    let api = FakeApiServer::start("first-token").await;
    let (_dir, path) = token_file("first-token");
    let verifier = verifier(&review_config(&api, path.clone()));
    let key = SigningKey::rs256("rsa-1");
    let token = key.sign(&claims(
        "https://kubernetes.default.svc",
        "build",
        "restorer",
    ));
    api.answer(
        &token,
        authenticated_status("build", "restorer", &[AUDIENCE]),
    );
    verifier.verify(&token).await.expect("first token");

    // The kubelet rotates the projected token file.
    std::fs::write(&path, "second-token").unwrap();
    api.accept_bearer("second-token");
    verifier.verify(&token).await.expect("rotated token");
    assert_eq!(
        api.requests()[1].authorization.as_deref(),
        Some("Bearer second-token")
    );
}

#[tokio::test]
async fn token_review_forbidden_to_the_broker_is_unavailable_not_a_bad_token() {
    let api = FakeApiServer::start("broker-sa-token").await;
    let (_dir, path) = token_file("broker-sa-token");
    let verifier = verifier(&review_config(&api, path));
    let key = SigningKey::rs256("rsa-1");
    let token = key.sign(&claims(
        "https://kubernetes.default.svc",
        "build",
        "restorer",
    ));
    // The broker's service account lacks `create tokenreviews`.
    api.force_status(StatusCode::FORBIDDEN);

    let err = verifier.verify(&token).await.unwrap_err();
    assert_eq!(err.reason(), "TOKEN_REVIEW_UNAVAILABLE", "{err}");
    assert_eq!(err.code(), ErrorCode::Unavailable);
    assert!(err.to_string().contains("403"), "{err}");
    assert_no_token_in(&err, &token);
}

#[tokio::test]
async fn token_review_error_text_that_echoes_the_token_is_not_repeated() {
    let api = FakeApiServer::start("broker-sa-token").await;
    let (_dir, path) = token_file("broker-sa-token");
    let verifier = verifier(&review_config(&api, path));
    let key = SigningKey::rs256("rsa-1");
    let token = key.sign(&claims(
        "https://kubernetes.default.svc",
        "build",
        "restorer",
    ));
    let signature = token.rsplit('.').next().unwrap();
    api.answer(
        &token,
        json!({"authenticated": false, "error": format!("bad signature {signature}")}),
    );

    let err = assert_refused(
        verifier.verify(&token).await,
        "TOKEN_REVIEW_REFUSED",
        &token,
    );
    assert!(err.to_string().contains("not authenticated"), "{err}");
}

#[tokio::test]
async fn no_service_account_token_reaches_the_logs_even_at_trace_level() {
    let captured = common::logs::CapturedLogs::start(tracing::Level::TRACE);

    // JWKS: an accepted token, a forged one, one refused while the JWKS is down.
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let (_jwks_dir, jwks_token_path) = token_file("jwks-reader-token-0123456789");
    let jwks = verifier(&KubernetesAuthConfig {
        jwks_token_file: Some(jwks_token_path),
        jwks_refetch_min_interval: Duration::ZERO,
        ..issuer.config()
    });
    let accepted = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    jwks.verify(&accepted).await.expect("accepted");
    let forged = SigningKey::es256("forged").sign(&claims(&issuer.issuer(), "build", "x"));
    jwks.verify(&forged).await.unwrap_err();
    issuer.set_failing(true);
    jwks.verify(&forged).await.unwrap_err();

    // TokenReview: accepted and refused.
    let api = FakeApiServer::start("broker-own-token-0123456789").await;
    let (_dir, path) = token_file("broker-own-token-0123456789");
    let review = verifier(&review_config(&api, path));
    let reviewed = SigningKey::rs256("rsa-1").sign(&claims(
        "https://kubernetes.default.svc",
        "build",
        "restorer",
    ));
    api.answer(
        &reviewed,
        authenticated_status("build", "restorer", &[AUDIENCE]),
    );
    review.verify(&reviewed).await.expect("accepted");
    review.verify(&forged).await.unwrap_err();

    let logs = captured.text();
    assert!(
        logs.contains("service-account signing keys"),
        "the capture works: {logs}"
    );
    for secret in [
        accepted.as_str(),
        forged.as_str(),
        reviewed.as_str(),
        "jwks-reader-token-0123456789",
        "broker-own-token-0123456789",
    ] {
        for part in secret.split('.').filter(|p| p.len() >= 8) {
            assert!(!logs.contains(part), "secret part in logs: {part}");
        }
    }
}

#[tokio::test]
async fn keys_are_fetched_over_https_from_an_issuer_signed_by_the_configured_ca() {
    let ca = common::k8s::TestCa::new();
    let (_dir, ca_file) = ca.ca_file();
    let key = SigningKey::rs256("rsa-1");
    let issuer = FakeIssuer::start_https(&[&key], &ca).await;
    assert!(issuer.issuer().starts_with("https://"));
    let verifier = verifier(&KubernetesAuthConfig {
        ca_file: Some(ca_file),
        ..issuer.config()
    });

    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));
    let caller = verifier.verify(&token).await.expect("accepted");
    assert_eq!(caller.identity, restorer());
}

#[tokio::test]
async fn an_issuer_whose_certificate_the_configured_ca_did_not_sign_is_not_trusted() {
    let cluster_ca = common::k8s::TestCa::new();
    let other_ca = common::k8s::TestCa::new();
    let (_dir, other_ca_file) = other_ca.ca_file();
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start_https(&[&key], &cluster_ca).await;
    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));

    for ca_file in [Some(other_ca_file), None] {
        let verifier = verifier(&KubernetesAuthConfig {
            ca_file,
            ..issuer.config()
        });
        let err = verifier.verify(&token).await.unwrap_err();
        assert_eq!(err.reason(), "JWKS_UNAVAILABLE", "{err}");
    }
    assert_eq!(issuer.discovery_fetches(), 0, "no request got through TLS");
}

#[tokio::test]
async fn token_review_reaches_the_api_server_over_https_with_the_cluster_ca() {
    let ca = common::k8s::TestCa::new();
    let (_ca_dir, ca_file) = ca.ca_file();
    let api = FakeApiServer::start_https("broker-sa-token", &ca).await;
    let (_dir, path) = token_file("broker-sa-token");
    let mut config = review_config(&api, path);
    let key = SigningKey::rs256("rsa-1");
    let token = key.sign(&claims(
        "https://kubernetes.default.svc",
        "build",
        "restorer",
    ));
    api.answer(
        &token,
        authenticated_status("build", "restorer", &[AUDIENCE]),
    );

    let without_ca = verifier(&config).verify(&token).await.unwrap_err();
    assert_eq!(without_ca.reason(), "TOKEN_REVIEW_UNAVAILABLE");
    assert!(api.requests().is_empty());

    config.token_review.as_mut().unwrap().ca_file = Some(ca_file);
    let caller = verifier(&config).verify(&token).await.expect("accepted");
    assert_eq!(caller.identity, restorer());
}

#[tokio::test]
async fn a_call_cancelled_during_the_first_jwks_fetch_does_not_lock_out_the_next_caller() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    issuer.set_jwks_delay(Duration::from_secs(3600));
    let verifier = verifier(&issuer.config());
    let token = key.sign(&claims(&issuer.issuer(), "build", "restorer"));

    // The first caller gives up (its gRPC deadline passed) while the JWKS
    // request hangs.
    let first = tokio::spawn({
        let (verifier, token) = (verifier.clone(), token.clone());
        async move { verifier.verify(&token).await }
    });
    wait_for_jwks_fetches(&issuer, 1).await;
    first.abort();
    let _ = first.await;

    issuer.set_jwks_delay(Duration::ZERO);
    let caller = verifier
        .verify(&token)
        .await
        .expect("the next caller fetches");
    assert_eq!(caller.identity, restorer());
    assert_eq!(issuer.jwks_fetches(), 2);
}

#[tokio::test]
async fn keys_prefetched_at_start_up_serve_the_first_caller() {
    let key = SigningKey::es256("es-1");
    let issuer = FakeIssuer::start(&[&key]).await;
    let broker = verifier(&issuer.config());

    broker.prefetch_keys().await.expect("keys fetched");
    assert_eq!(issuer.jwks_fetches(), 1);
    broker
        .verify(&key.sign(&claims(&issuer.issuer(), "build", "restorer")))
        .await
        .expect("accepted");
    assert_eq!(issuer.jwks_fetches(), 1);

    let down = FakeIssuer::start(&[&key]).await;
    down.set_failing(true);
    let err = verifier(&down.config()).prefetch_keys().await.unwrap_err();
    assert_eq!(err.reason(), "JWKS_UNAVAILABLE");
}
