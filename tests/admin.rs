//! AdminService and the chained audit trail, over real sockets: bulk revoke
//! for incident response (every PAT revoked upstream), admin-only access,
//! the audit trail as an admin reads it (fingerprints, never tokens), fail
//! closed grants, retried revocation audits, `token-broker audit verify`
//! as an operator runs it, and revocations that keep failing (REVOKE_FAILED
//! listed, counted on /metrics, forced closed).

#[macro_use]
mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use sqlx::{Connection as _, PgConnection, SqliteConnection};
use tonic::Code;
use tonic_types::StatusExt as _;

use common::admin::{admin_setup, admin_setup_with, AdminClient, AdminSetup, Store};
use common::audit::AuditDb;
use common::broker::{spawn_broker, spawn_broker_with_config, BrokerSpec, Client};
use common::leases::eventually;
use common::wait::poll;
use token_broker::audit::{self, ChainKey, ChainKeys};
use token_broker::crypto::TokenFingerprinter;
use token_broker::proto::v1 as pb;
use token_broker::proto::v1::admin_service_client::AdminServiceClient;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

on_both_stores!(
    postgres = super::Store::Postgres,
    sqlite = super::Store::Sqlite;
    bulk_revoke_of_a_compromised_holder_revokes_every_pat_upstream_and_counts_them,
    audit_verify_passes_on_a_brokers_database_and_names_a_row_edited_by_sql,
    a_grant_is_refused_when_its_audit_row_cannot_be_written_and_a_revocation_still_goes_ahead,
    a_revocation_that_keeps_failing_is_listed_counted_and_force_closed_leaving_the_pat_to_its_valid_to,
    a_time_filter_finds_todays_events_behind_a_long_trail_of_older_ones,
    audit_verify_checks_each_row_with_its_own_chain_key_across_a_rotation,
    lookup_token_finds_a_lease_by_its_pat_and_admin_revoke_token_file_revokes_it,
);

async fn create(client: &mut Client, organization: &str, scopes: &[&str]) -> pb::Lease {
    client
        .create_lease(pb::CreateLeaseRequest {
            organization: organization.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl: None,
            request_id: String::new(),
        })
        .await
        .expect("lease created")
        .into_inner()
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// Display names of the PATs the emulator holds live.
async fn live_display_names(setup: &AdminSetup) -> HashSet<String> {
    setup
        .emulator_pats()
        .await
        .iter()
        .filter(|p| p["state"] == "active")
        .map(|p| p["displayName"].as_str().unwrap().to_owned())
        .collect()
}

async fn all_audit_events(admin: &mut AdminClient, filter: &str) -> Vec<pb::AuditEvent> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size: 1000,
                page_token,
                filter: filter.into(),
            })
            .await
            .expect("admin lists audit events")
            .into_inner();
        events.extend(page.audit_events);
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

async fn bulk_revoke_of_a_compromised_holder_revokes_every_pat_upstream_and_counts_them(
    store: Store,
) {
    let setup = admin_setup(store).await;
    let mut ci = setup.lease_client("ci").await;
    let mut other = setup.lease_client("other").await;
    let mut compromised = Vec::new();
    for _ in 0..25 {
        compromised.push(create(&mut ci, "fabrikam", &["vso.code_write"]).await);
    }
    let bystanders = [
        create(&mut other, "fabrikam", &["vso.code_write"]).await,
        create(&mut other, "contoso", &["vso.packaging"]).await,
    ];
    let live = live_display_names(&setup).await;
    assert!(compromised.iter().all(|l| live.contains(&l.display_name)));

    let mut admin = setup.admin_client(Some("ops")).await;
    let done = admin
        .revoke_leases(pb::RevokeLeasesRequest {
            holder: "apikey:ci".into(),
            ..Default::default()
        })
        .await
        .expect("bulk revoke")
        .into_inner();
    assert_eq!(
        (
            done.matched_count,
            done.revoked_count,
            done.revoking_count,
            done.pending_count,
            done.failed_count
        ),
        (25, 25, 0, 0, 0)
    );

    // Upstream holds none of the holder's PATs live; the others' are untouched.
    let live = live_display_names(&setup).await;
    for lease in &compromised {
        assert!(
            !live.contains(&lease.display_name),
            "{} still live upstream",
            lease.name
        );
    }
    for lease in &bystanders {
        assert!(live.contains(&lease.display_name));
    }

    // Every one of them is REVOKED, as an admin listing across holders shows.
    let page = admin
        .list_leases(pb::AdminListLeasesRequest {
            page_size: 100,
            page_token: String::new(),
            filter: r#"holder = "apikey:ci""#.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.leases.len(), 25);
    assert!(page
        .leases
        .iter()
        .all(|l| l.state() == pb::lease::State::Revoked && l.token.is_empty()));
    let everyone = admin
        .list_leases(pb::AdminListLeasesRequest {
            page_size: 100,
            filter: "state = ACTIVE".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: HashSet<_> = everyone.leases.iter().map(|l| l.name.clone()).collect();
    assert_eq!(
        names,
        bystanders
            .iter()
            .map(|l| l.name.clone())
            .collect::<HashSet<_>>()
    );

    // The bulk revoke is audited once, with who asked and the counts; each
    // lease's revocation is audited as the admin's.
    let bulk = all_audit_events(&mut admin, "action = admin.revoke_leases").await;
    assert_eq!(bulk.len(), 1);
    assert_eq!(bulk[0].identity, "apikey:ops");
    assert_eq!(bulk[0].outcome(), pb::audit_event::Outcome::Allowed);
    assert!(
        bulk[0].reason.contains("holder=apikey:ci") && bulk[0].reason.contains("revoked=25"),
        "{}",
        bulk[0].reason
    );
    let revokes = all_audit_events(
        &mut admin,
        r#"action = lease.revoke AND identity = "apikey:ops""#,
    )
    .await;
    assert_eq!(revokes.len(), 25);

    // A second call finds nothing live left.
    let again = admin
        .revoke_leases(pb::RevokeLeasesRequest {
            holder: "apikey:ci".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.matched_count, again.revoked_count), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_revoke_by_organization_scope_or_names_takes_only_matching_leases() {
    let setup = admin_setup(Store::Sqlite).await;
    let mut ci = setup.lease_client("ci").await;
    let mut other = setup.lease_client("other").await;
    let code_write = create(&mut ci, "fabrikam", &["vso.code_write"]).await;
    let packaging = create(&mut ci, "fabrikam", &["vso.packaging"]).await;
    let in_contoso = create(&mut other, "contoso", &["vso.packaging"]).await;
    let mut admin = setup.admin_client(Some("ops")).await;

    // vso.code_write grants vso.code: a lease that can read code matches.
    let by_scope = admin
        .revoke_leases(pb::RevokeLeasesRequest {
            scope: "vso.code".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((by_scope.matched_count, by_scope.revoked_count), (1, 1));
    let live = live_display_names(&setup).await;
    assert!(!live.contains(&code_write.display_name));
    assert!(live.contains(&packaging.display_name) && live.contains(&in_contoso.display_name));

    let by_org = admin
        .revoke_leases(pb::RevokeLeasesRequest {
            organization: "contoso".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((by_org.matched_count, by_org.revoked_count), (1, 1));
    assert!(!live_display_names(&setup)
        .await
        .contains(&in_contoso.display_name));

    let missing = format!("leases/{}", uuid::Uuid::new_v4());
    let by_name = admin
        .revoke_leases(pb::RevokeLeasesRequest {
            names: vec![packaging.name.clone(), missing.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((by_name.matched_count, by_name.revoked_count), (1, 1));
    assert_eq!(by_name.not_found_names, vec![missing]);
    assert!(live_display_names(&setup).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_revoke_with_an_empty_filter_is_refused_and_revokes_nothing() {
    let setup = admin_setup(Store::Sqlite).await;
    let mut ci = setup.lease_client("ci").await;
    let lease = create(&mut ci, "fabrikam", &["vso.code_write"]).await;
    let mut admin = setup.admin_client(Some("ops")).await;
    let err = admin
        .revoke_leases(pb::RevokeLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "FILTER_EMPTY");
    assert!(err.message().contains("holder"), "{}", err.message());
    assert!(live_display_names(&setup)
        .await
        .contains(&lease.display_name));
    // Bad values name their field.
    let err = admin
        .revoke_leases(pb::RevokeLeasesRequest {
            scope: "vso.kode".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let field = err
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()));
    assert_eq!(field.as_deref(), Some("scope"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_admin_calling_admin_service_is_permission_denied_and_audited() {
    let setup = admin_setup(Store::Sqlite).await;
    let mut ci = setup.lease_client("ci").await;
    let lease = create(&mut ci, "fabrikam", &["vso.code_write"]).await;

    let mut not_admin = setup.admin_client(Some("ci")).await;
    let errors = [
        not_admin
            .revoke_leases(pb::RevokeLeasesRequest {
                holder: "apikey:ci".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        not_admin
            .list_leases(pb::AdminListLeasesRequest::default())
            .await
            .unwrap_err(),
        not_admin
            .list_audit_events(pb::ListAuditEventsRequest::default())
            .await
            .unwrap_err(),
    ];
    for err in &errors {
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert_eq!(reason(err), "ADMIN_REQUIRED");
    }
    assert!(live_display_names(&setup)
        .await
        .contains(&lease.display_name));

    let mut anonymous = setup.admin_client(None).await;
    let err = anonymous
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut admin = setup.admin_client(Some("ops")).await;
    let refused = all_audit_events(&mut admin, r#"identity = "apikey:ci""#).await;
    let refused: Vec<_> = refused
        .iter()
        .filter(|e| e.action.starts_with("admin."))
        .collect();
    assert_eq!(refused.len(), 3);
    assert!(refused
        .iter()
        .all(|e| e.outcome() == pb::audit_event::Outcome::Denied && e.reason == "ADMIN_REQUIRED"));
    // The admin's own reads are audited too.
    let reads = all_audit_events(&mut admin, "action = admin.list_audit_events").await;
    assert!(reads
        .iter()
        .any(|e| e.identity == "apikey:ops" && e.outcome() == pb::audit_event::Outcome::Allowed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_show_allowed_and_denied_decisions_with_the_token_fingerprint_never_the_token()
{
    let setup = admin_setup(Store::Postgres).await;
    let mut ci = setup.lease_client("ci").await;
    let lease = create(&mut ci, "fabrikam", &["vso.code_write"]).await;
    let token = lease.token.clone();
    assert!(!token.is_empty());
    let refused = ci
        .create_lease(pb::CreateLeaseRequest {
            organization: "northwind".into(),
            scopes: vec!["vso.code".into()],
            ttl: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    ci.revoke_lease(pb::RevokeLeaseRequest {
        name: lease.name.clone(),
    })
    .await
    .unwrap();

    let mut admin = setup.admin_client(Some("ops")).await;
    let events = all_audit_events(&mut admin, r#"identity = "apikey:ci""#).await;
    let fingerprint = TokenFingerprinter::new(setup.spec.fingerprint_key.clone())
        .unwrap()
        .fingerprint(&SecretString::from(token.clone()));
    let allowed = events
        .iter()
        .find(|e| e.action == "lease.create" && e.outcome() == pb::audit_event::Outcome::Allowed)
        .expect("the grant is audited");
    assert_eq!(allowed.lease, lease.name);
    assert_eq!(allowed.token_fingerprint, fingerprint);
    assert_eq!(allowed.organization, "fabrikam");
    assert_eq!(allowed.policy_rule, "ci");
    let denied = events
        .iter()
        .find(|e| e.action == "lease.create" && e.outcome() == pb::audit_event::Outcome::Denied)
        .expect("the refusal is audited");
    assert_eq!(denied.reason, "ORGANIZATION_NOT_ALLOWED");
    assert_eq!(denied.organization, "northwind");
    assert!(events.iter().any(|e| e.action == "lease.revoke"
        && e.lease == lease.name
        && e.token_fingerprint == fingerprint));
    for e in &events {
        assert!(!format!("{e:?}").contains(&token), "token in {e:?}");
    }

    // Filters: by lease, by action, by time; paging one at a time walks
    // the same events, and a tampered page token is refused.
    let of_lease = all_audit_events(&mut admin, &format!("lease = \"{}\"", lease.name)).await;
    assert!(of_lease.iter().all(|e| e.lease == lease.name));
    assert!(of_lease.len() >= 2);
    let future = all_audit_events(&mut admin, r#"time >= "2999-01-01T00:00:00Z""#).await;
    assert!(future.is_empty());
    let mut paged = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size: 1,
                page_token,
                filter: r#"identity = "apikey:ci""#.into(),
            })
            .await
            .unwrap()
            .into_inner();
        paged.extend(page.audit_events);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(
        paged.iter().map(|e| e.id).collect::<Vec<_>>(),
        events.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    let first = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1,
            page_token: String::new(),
            filter: r#"identity = "apikey:ci""#.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let err = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1,
            page_token: first.next_page_token,
            filter: r#"identity = "apikey:other""#.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "INVALID_PAGE_TOKEN");
}

/// Runs `token-broker audit verify` against the broker's configuration.
fn audit_verify(
    setup_dir: &std::path::Path,
    spec: &BrokerSpec,
    head: Option<&str>,
) -> (bool, String, String) {
    let chain = format!(
        "audit_chain = \"{}\"\n",
        spec.audit_chain_key.expose_secret()
    );
    audit_verify_with(setup_dir, spec, &chain, head)
}

/// [`audit_verify`] with the chain key settings `chain` (TOML inside
/// `[keys]`, before `[keys.sealing]`).
fn audit_verify_with(
    setup_dir: &std::path::Path,
    spec: &BrokerSpec,
    chain: &str,
    head: Option<&str>,
) -> (bool, String, String) {
    let mut args = vec!["verify"];
    if let Some(head) = head {
        args.extend(["--expected-head", head]);
    }
    audit_command(setup_dir, spec, chain, &args)
}

/// Runs `token-broker audit ARGS --config FILE` against the broker's
/// configuration with the chain key settings `chain`: success, stdout,
/// stderr.
fn audit_command(
    setup_dir: &std::path::Path,
    spec: &BrokerSpec,
    chain: &str,
    args: &[&str],
) -> (bool, String, String) {
    let config = setup_dir.join("verify.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nactive = \"test\"\nfingerprint = \"{}\"\n{chain}[keys.sealing]\ntest = \"{}\"\n[log]\nfilter = \"warn\"\n",
            spec.store_url,
            spec.fingerprint_key.expose_secret(),
            spec.sealing_key.expose_secret(),
        ),
    )
    .unwrap();
    let mut command = Command::new(BIN);
    command.arg("audit").args(args).arg("--config").arg(&config);
    for (key, _) in std::env::vars() {
        if key.starts_with("TOKEN_BROKER_") {
            command.env_remove(key);
        }
    }
    let out = command.output().expect("run token-broker audit verify");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn raw_sql(url: &str, sql: &str) {
    if url.starts_with("postgres") {
        let mut conn = PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    } else {
        let mut conn = SqliteConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    }
}

async fn audit_verify_passes_on_a_brokers_database_and_names_a_row_edited_by_sql(store: Store) {
    let setup = admin_setup(store).await;
    let mut ci = setup.lease_client("ci").await;
    for _ in 0..3 {
        let lease = create(&mut ci, "fabrikam", &["vso.code_write"]).await;
        ci.revoke_lease(pb::RevokeLeaseRequest { name: lease.name })
            .await
            .unwrap();
    }
    let _ = ci
        .create_lease(pb::CreateLeaseRequest {
            organization: "northwind".into(),
            scopes: vec!["vso.code".into()],
            ttl: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    // A refused authentication is counted in memory; its aggregated row is
    // written at the next `audit.auth_failure_interval` (10 s), not yet.
    let anonymous = setup
        .broker
        .anonymous_client()
        .await
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let dir = tempfile::tempdir().unwrap();

    let (ok, stdout, stderr) = audit_verify(dir.path(), &setup.spec, None);
    assert!(
        ok,
        "verify failed on an untouched database: {stdout}{stderr}"
    );
    assert!(
        // Seven, after the start's `upstream.adopt_configured` row.
        stdout.contains("audit chain intact: 8 chained rows"),
        "{stdout}"
    );
    let head = stdout
        .trim()
        .rsplit_once("head ")
        .map(|(_, h)| h.to_owned())
        .expect("the report names the head");
    let (ok, _, _) = audit_verify(dir.path(), &setup.spec, Some(&head));
    assert!(ok);

    // `audit head` prints the same head; several heads are each checked,
    // given as repeated flags, a comma list or a file.
    let chain = format!(
        "audit_chain = \"{}\"\n",
        setup.spec.audit_chain_key.expose_secret()
    );
    let (ok, stdout, stderr) = audit_command(dir.path(), &setup.spec, &chain, &["head"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), head);
    let store = token_broker::store::open(setup.store_url()).await.unwrap();
    let heads: Vec<String> = store
        .list_audit_chain(0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| [2, 5].contains(&r.id))
        .map(|r| format!("{}:{}", r.id, r.mac.unwrap()))
        .collect();
    let list = format!("{},{}", heads[0], heads[1]);
    let args = ["verify", "--expected-head", &list, "--expected-head", &head];
    let (ok, stdout, stderr) = audit_command(dir.path(), &setup.spec, &chain, &args);
    assert!(ok, "{stdout}{stderr}");
    let file = dir.path().join("heads.txt");
    std::fs::write(&file, format!("# published\n{}\n\n{head}\n", heads[0])).unwrap();
    let file_arg = file.to_str().unwrap();
    let args = ["verify", "--expected-heads-file", file_arg];
    let (ok, stdout, stderr) = audit_command(dir.path(), &setup.spec, &chain, &args);
    assert!(ok, "{stdout}{stderr}");
    let wrong = format!("5:{}", "0".repeat(64));
    let list = format!("{head},{wrong}");
    let args = [
        "verify",
        "--expected-heads-file",
        file_arg,
        "--expected-head",
        &list,
    ];
    let (ok, stdout, stderr) = audit_command(dir.path(), &setup.spec, &chain, &args);
    assert!(!ok, "a wrong head among several passed: {stdout}");
    assert!(
        stderr.contains("audit chain broken at row 5: MAC differs from the expected chain head"),
        "{stderr}"
    );
    std::fs::write(&file, "5:nothex\n").unwrap();
    let (ok, _, stderr) = audit_command(dir.path(), &setup.spec, &chain, &args);
    assert!(!ok);
    assert!(stderr.contains("line 1"), "{stderr}");

    // Someone with write access to the database rewrites who did row 3.
    raw_sql(
        setup.store_url(),
        "UPDATE audit_events SET identity = 'apikey:someone-else' WHERE id = 3",
    )
    .await;
    let (ok, stdout, stderr) = audit_verify(dir.path(), &setup.spec, None);
    assert!(!ok, "verify passed on an edited row: {stdout}");
    assert!(
        stderr.contains("audit chain broken at row 3"),
        "{stdout}{stderr}"
    );
}

async fn a_grant_is_refused_when_its_audit_row_cannot_be_written_and_a_revocation_still_goes_ahead(
    store: Store,
) {
    let db = match store {
        Store::Postgres => AuditDb::postgres().await,
        Store::Sqlite => AuditDb::sqlite().await,
    };
    let emulator = token_broker::emulator::spawn(Default::default())
        .await
        .unwrap();
    let spec = BrokerSpec::new(db.url.clone(), emulator.url());
    let broker = spawn_broker(&spec).await;
    let mut ci = broker.client(&spec.key("ci")).await;
    let lease = create(&mut ci, "fabrikam", &["vso.code_write"]).await;

    db.refuse_appends(true).await;
    // No grant without its audit row: the create fails and leaves no live PAT.
    let err = ci
        .create_lease(pb::CreateLeaseRequest {
            organization: "fabrikam".into(),
            scopes: vec!["vso.packaging".into()],
            ttl: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    let pats: Vec<serde_json::Value> = reqwest::get(format!("{}/_emulator/pats", emulator.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let live: Vec<_> = pats.iter().filter(|p| p["state"] == "active").collect();
    assert_eq!(
        live.len(),
        1,
        "only the first lease's PAT is live: {pats:?}"
    );
    assert_eq!(live[0]["displayName"], lease.display_name.as_str());

    // A revocation goes ahead; its audit row is retried until it lands.
    let revoked = ci
        .revoke_lease(pb::RevokeLeaseRequest {
            name: lease.name.clone(),
        })
        .await
        .expect("revocation does not wait for the audit trail")
        .into_inner();
    assert_eq!(revoked.state(), pb::lease::State::Revoked);
    db.refuse_appends(false).await;
    let id = token_broker::domain::LeaseId::from_name(&lease.name).unwrap();
    let mut landed = false;
    for _ in 0..600 {
        let events = db.store.list_audit(0, 1000).await.unwrap();
        if events
            .iter()
            .any(|e| e.action == "lease.revoke" && e.lease_id == Some(id))
        {
            landed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(landed, "the revocation's audit row never landed");

    // Every row went through the chain.
    let key = ChainKeys::from(ChainKey::new(&spec.audit_chain_key).unwrap());
    audit::verify(db.store.as_ref(), &key, None)
        .await
        .expect("the chain is intact: no row lacks its MAC");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reloads_are_audited_whether_applied_or_refused() {
    use token_broker::policy::{PolicyHandle, ReloadTrigger};
    use token_broker::proto::v1::admin_service_client::AdminServiceClient;
    use token_broker::server::Broker;

    let emulator = token_broker::emulator::spawn(Default::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = BrokerSpec::new(common::db::sqlite_url(&dir), emulator.url()).with_key("ops");
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, common::admin::ADMIN_POLICY).unwrap();
    let policy = PolicyHandle::from_file(&policy_file).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker = Broker::start(spec.settings(), policy.clone(), listener)
        .await
        .unwrap();

    // An edit that grants less is applied; a broken edit is refused.
    // Edits land atomically (rename), as a ConfigMap update does, so the
    // file watcher never reads half a file.
    let edit = |text: String| {
        let tmp = dir.path().join("policy.yaml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &policy_file).unwrap();
    };
    edit(common::admin::ADMIN_POLICY.replace(r#", "contoso""#, ""));
    assert!(policy
        .reload(ReloadTrigger::Signal)
        .await
        .unwrap()
        .is_applied());
    edit(common::admin::ADMIN_POLICY.replace("vso.packaging", "vso.kode"));
    assert!(!policy
        .reload(ReloadTrigger::Signal)
        .await
        .unwrap()
        .is_applied());

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", broker.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let key = spec.key("ops");
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", key.expose_secret()).parse().unwrap();
    let mut admin =
        AdminServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
    // The outcomes are audited by a task of their own (the file watcher may
    // report the same edits too): wait for an applied and a refused row.
    let allowed = |e: &pb::AuditEvent| e.outcome() == pb::audit_event::Outcome::Allowed;
    let mut reloads = Vec::new();
    for _ in 0..300 {
        reloads = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                filter: "action = policy.reload".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .audit_events;
        if reloads.iter().any(allowed) && reloads.iter().any(|e| !allowed(e)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let applied = reloads
        .iter()
        .find(|e| allowed(e))
        .expect("applied reload audited");
    assert_eq!(applied.identity, "system:token-broker");
    assert!(applied.reason.contains("sha256="), "{}", applied.reason);
    let refused = reloads
        .iter()
        .find(|e| e.outcome() == pb::audit_event::Outcome::Denied)
        .expect("refused reload audited");
    assert!(
        refused.reason.starts_with("POLICY_INVALID")
            && refused.reason.contains("rules[0].scopes[1]"),
        "{}",
        refused.reason
    );
    broker.stop().await.unwrap();
}

/// Runs the real binary with `args`, as an operator would, against the
/// broker at `addr` with `key`.
fn cli(addr: &str, key: &SecretString, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOKEN_BROKER_") {
            command.env_remove(name);
        }
    }
    let out = command
        .args(args)
        .env("TOKEN_BROKER_ADDR", addr)
        .env("TOKEN_BROKER_API_KEY", key.expose_secret())
        .output()
        .expect("run token-broker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_revokes_a_holders_leases_and_reads_the_audit_trail() {
    let setup = admin_setup(Store::Sqlite).await;
    let mut ci = setup.lease_client("ci").await;
    for _ in 0..3 {
        create(&mut ci, "fabrikam", &["vso.code_write"]).await;
    }
    let ops = setup.spec.key("ops");
    let addr = setup.broker.url.clone();

    let (ok, stdout, stderr) = cli(&addr, &ops, &["admin", "revoke"]);
    assert!(!ok && stderr.contains("--holder"), "{stdout}{stderr}");

    let (ok, stdout, stderr) = cli(
        &addr,
        &ops,
        &[
            "admin",
            "revoke",
            "--holder",
            "apikey:ci",
            "--output",
            "json",
        ],
    );
    assert!(ok, "{stderr}");
    let counts: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(counts["matchedCount"], "3");
    assert_eq!(counts["revokedCount"], "3");
    assert!(live_display_names(&setup).await.is_empty());

    let (ok, stdout, stderr) = cli(
        &addr,
        &ops,
        &[
            "admin",
            "list",
            "--filter",
            r#"holder = "apikey:ci" AND state = REVOKED"#,
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.contains("REVOKED")).count(), 3);

    let (ok, stdout, stderr) = cli(
        &addr,
        &ops,
        &["audit", "list", "--filter", "action = admin.revoke_leases"],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("apikey:ops") && stdout.contains("revoked=3"),
        "{stdout}"
    );

    // A non-admin key is refused with the reason.
    let (ok, _, stderr) = cli(&addr, &setup.spec.key("ci"), &["audit", "list"]);
    assert!(!ok);
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("ADMIN_REQUIRED"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_revoke_during_an_upstream_outage_counts_leases_still_revoking_and_a_rerun_finishes_them(
) {
    let setup = admin_setup(Store::Sqlite).await;
    let mut ci = setup.lease_client("ci").await;
    let leases = [
        create(&mut ci, "fabrikam", &["vso.code_write"]).await,
        create(&mut ci, "fabrikam", &["vso.packaging"]).await,
    ];
    let http = reqwest::Client::new();
    let faults = format!("{}/_emulator/faults", setup.emulator.url());
    let resp = http
        .put(&faults)
        .json(&serde_json::json!([{ "operation": "revoke", "status": 503 }]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let mut admin = setup.admin_client(Some("ops")).await;
    let selector = pb::RevokeLeasesRequest {
        holder: "apikey:ci".into(),
        ..Default::default()
    };
    let during = admin
        .revoke_leases(selector.clone())
        .await
        .expect("answered with counts, not an error")
        .into_inner();
    assert_eq!(
        (
            during.matched_count,
            during.revoked_count,
            during.revoking_count
        ),
        (2, 0, 2)
    );
    let live = live_display_names(&setup).await;
    assert!(leases.iter().all(|l| live.contains(&l.display_name)));

    assert_eq!(http.delete(&faults).send().await.unwrap().status(), 204);
    let after = admin.revoke_leases(selector).await.unwrap().into_inner();
    assert_eq!((after.matched_count, after.revoked_count), (2, 2));
    assert!(live_display_names(&setup).await.is_empty());
}

/// The value of the unlabelled sample `name` on the broker's /metrics.
async fn metric(setup: &AdminSetup, name: &str) -> String {
    let text = reqwest::get(setup.broker.admin_url("/metrics"))
        .await
        .expect("the admin port answers")
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

async fn admin_lease(admin: &mut AdminClient, filter: &str) -> Vec<pb::Lease> {
    admin
        .list_leases(pb::AdminListLeasesRequest {
            page_size: 100,
            filter: filter.into(),
            ..Default::default()
        })
        .await
        .expect("admin lists leases")
        .into_inner()
        .leases
}

async fn a_revocation_that_keeps_failing_is_listed_counted_and_force_closed_leaving_the_pat_to_its_valid_to(
    store: Store,
) {
    // Two failed attempts spend the budget; a REVOKE_FAILED lease is then
    // retried every second (so the force races real background retries).
    let setup = admin_setup_with(store, |mut spec| {
        spec.reaper_interval = Duration::from_millis(200);
        spec.with_admin_port()
            .with_upstream_max_retries(0)
            .with_revocation_retry(
                Duration::from_millis(100),
                Duration::from_millis(200),
                2,
                Duration::from_secs(1),
            )
    })
    .await;
    let emulator_url = setup.emulator.url();
    let ops = setup.spec.key("ops");
    let addr = setup.broker.url.clone();
    let mut ci = setup.lease_client("ci").await;
    let mut admin = setup.admin_client(Some("ops")).await;
    let lease = create(&mut ci, "fabrikam", &["vso.code_write"]).await;
    let token = SecretString::from(lease.token.clone());
    assert_eq!(
        metric(&setup, "token_broker_leases_revoke_failed").await,
        "0"
    );

    // Upstream refuses every revoke: the holder's revoke answers REVOKING,
    // and the background retry gives up.
    let http = reqwest::Client::new();
    let faults = format!("{emulator_url}/_emulator/faults");
    let resp = http
        .put(&faults)
        .json(&serde_json::json!([{ "operation": "revoke", "status": 503 }]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let revoking = ci
        .revoke_lease(pb::RevokeLeaseRequest {
            name: lease.name.clone(),
        })
        .await
        .expect("answered with the state, not an error")
        .into_inner();
    assert_eq!(revoking.state(), pb::lease::State::Revoking);

    // AdminService lists it with what the operator needs.
    let failed = poll(
        "the lease to become REVOKE_FAILED",
        Duration::from_secs(60),
        || {
            let mut admin = admin.clone();
            async move {
                let mut found = admin_lease(&mut admin, "state = REVOKE_FAILED").await;
                if found.is_empty() {
                    Err("none yet".to_owned())
                } else {
                    Ok(found.remove(0))
                }
            }
        },
    )
    .await;
    assert_eq!(failed.name, lease.name);
    assert_eq!(failed.holder, "apikey:ci");
    assert_eq!(failed.organization, "fabrikam");
    assert_eq!(failed.authorization_id, lease.authorization_id);
    assert!(failed.revocation_attempts >= 2, "{failed:?}");
    assert!(
        failed.last_error.starts_with("upstream revoke failed"),
        "{}",
        failed.last_error
    );
    let revoke_time = failed.revoke_time.expect("revoke_time is set");
    let next = failed.next_attempt_time.expect("a retry is scheduled");
    assert!(next.seconds >= revoke_time.seconds, "{failed:?}");
    let valid_to = failed.pat_expire_time.expect("the PAT's validTo");
    let valid_to_text = chrono::DateTime::from_timestamp(valid_to.seconds, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert!(failed.token.is_empty());
    // The holder sees the state, not the operator's view.
    let own = ci
        .get_lease(pb::GetLeaseRequest {
            name: lease.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.state(), pb::lease::State::RevokeFailed);
    assert!(own.last_error.is_empty() && own.revocation_attempts == 0);

    // Counted on /metrics.
    assert_eq!(
        metric(&setup, "token_broker_leases_revoke_failed").await,
        "1"
    );

    // The CLI lists it, as text and as proto3 JSON.
    let mut outputs = Vec::new();
    let (ok, stdout, stderr) = cli(&addr, &ops, &["admin", "list-failed"]);
    assert!(ok, "{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&lease.name))
        .unwrap_or_else(|| panic!("no row for {} in {stdout}", lease.name));
    assert!(
        row.contains("apikey:ci")
            && row.contains(&lease.authorization_id)
            && row.contains("upstream revoke failed")
            && row.contains(&valid_to_text),
        "{row}"
    );
    outputs.push(stdout + &stderr);
    let (ok, stdout, stderr) = cli(&addr, &ops, &["admin", "list-failed", "--output", "json"]);
    assert!(ok, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let listed = listed["leases"].as_array().expect("leases");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], lease.name.as_str());
    assert!(listed[0]["revocationAttempts"].as_i64().unwrap() >= 2);
    assert!(listed[0]["nextAttemptTime"].is_string());
    outputs.push(stdout + &stderr);

    // Only an admin may force, only a REVOKE_FAILED lease, only one that
    // exists.
    let mut not_admin = setup.admin_client(Some("ci")).await;
    let err = not_admin
        .force_revoke_lease(pb::ForceRevokeLeaseRequest {
            name: lease.name.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason(&err), "ADMIN_REQUIRED");
    let active = create(&mut ci, "fabrikam", &["vso.packaging"]).await;
    let err = admin
        .force_revoke_lease(pb::ForceRevokeLeaseRequest {
            name: active.name.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "LEASE_NOT_REVOKE_FAILED");
    assert!(err.message().contains("ACTIVE"), "{}", err.message());
    let err = admin
        .force_revoke_lease(pb::ForceRevokeLeaseRequest {
            name: format!("leases/{}", uuid::Uuid::new_v4()),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin
        .force_revoke_lease(pb::ForceRevokeLeaseRequest {
            name: lease.name.clone(),
            reason: "x".repeat(513),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "REASON_INVALID");
    assert_eq!(
        admin_lease(&mut admin, "state = REVOKE_FAILED").await.len(),
        1,
        "refused calls change nothing"
    );

    // The operator forces it: closed, with a warning that the PAT lives on.
    let (ok, stdout, stderr) = cli(
        &addr,
        &ops,
        &[
            "admin",
            "force-revoke",
            &lease.name,
            "--reason",
            "INC-7: organization deleted upstream",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("WARNING")
            && stderr.contains("NOT revoked upstream")
            && stderr.contains(&lease.authorization_id)
            && stderr.contains(&valid_to_text),
        "{stderr}"
    );
    let state_line = stdout.lines().find(|l| l.starts_with("state ")).unwrap();
    assert!(state_line.ends_with("REVOKED"), "{stdout}");
    outputs.push(stdout + &stderr);

    let closed = admin_lease(&mut admin, "state = REVOKED").await;
    let closed = closed
        .iter()
        .find(|l| l.name == lease.name)
        .expect("REVOKED");
    assert!(closed.next_attempt_time.is_none(), "{closed:?}");
    assert!(
        closed.last_error.starts_with(&format!(
            "force-closed by apikey:ops: upstream PAT {} left live until its validTo {valid_to_text}",
            lease.authorization_id
        )),
        "{}",
        closed.last_error
    );
    let (ok, stdout, _) = cli(&addr, &ops, &["admin", "list-failed"]);
    assert!(ok && stdout.trim() == "no REVOKE_FAILED leases", "{stdout}");
    assert_eq!(
        metric(&setup, "token_broker_leases_revoke_failed").await,
        "0"
    );

    // Audited as a force-revoke by the admin, with the reason and validTo;
    // the refusals too.
    let events = all_audit_events(&mut admin, "action = lease.force_revoke").await;
    let forced: Vec<_> = events
        .iter()
        .filter(|e| e.outcome() == pb::audit_event::Outcome::Allowed)
        .collect();
    assert_eq!(forced.len(), 1, "{events:?}");
    assert_eq!(forced[0].identity, "apikey:ops");
    assert_eq!(forced[0].lease, lease.name);
    assert!(
        forced[0]
            .reason
            .contains("INC-7: organization deleted upstream")
            && forced[0].reason.contains("left live until its validTo")
            && forced[0].reason.contains(&valid_to_text),
        "{}",
        forced[0].reason
    );
    // The sealed token was erased when the lease left ACTIVE, so the
    // force-close row carries no fingerprint (the grant's row, same lease,
    // does).
    assert!(forced[0].token_fingerprint.is_empty());
    let denied: Vec<_> = events
        .iter()
        .filter(|e| e.outcome() == pb::audit_event::Outcome::Denied)
        .map(|e| (e.identity.as_str(), e.reason.as_str()))
        .collect();
    assert!(
        denied.contains(&("apikey:ci", "ADMIN_REQUIRED"))
            && denied.contains(&("apikey:ops", "LEASE_NOT_REVOKE_FAILED: lease is ACTIVE")),
        "{denied:?}"
    );

    // Upstream recovers; the broker never retries the forced lease: after a
    // later lease's expiry (a whole background pass, run more than the
    // 1 s failed_interval after the force) its PAT is still live, and the
    // token still works until its validTo.
    assert_eq!(http.delete(&faults).send().await.unwrap().status(), 204);
    for _ in 0..2 {
        let short = ci
            .create_lease(pb::CreateLeaseRequest {
                organization: "fabrikam".into(),
                scopes: vec!["vso.packaging".into()],
                ttl: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        eventually("a short lease to expire", || {
            let mut admin = admin.clone();
            let name = short.name.clone();
            async move {
                admin_lease(&mut admin, "state = EXPIRED")
                    .await
                    .iter()
                    .any(|l| l.name == name)
            }
        })
        .await;
    }
    assert!(live_display_names(&setup)
        .await
        .contains(&lease.display_name));
    assert_eq!(
        common::leases::list_repositories(&emulator_url, "fabrikam", &token).await,
        200,
        "the PAT works upstream until its validTo"
    );
    let still = admin_lease(&mut admin, "state = REVOKED").await;
    assert!(still
        .iter()
        .any(|l| l.name == lease.name && l.last_error.starts_with("force-closed")));

    // No token in any output: not the PAT, its Basic form, nor the admin key.
    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!(":{}", token.expose_secret()));
    let audit = format!("{:?}", all_audit_events(&mut admin, "").await);
    for text in outputs.iter().chain([&audit]) {
        for secret in [token.expose_secret(), basic.as_str(), ops.expose_secret()] {
            assert!(!text.contains(secret), "a secret in: {text}");
        }
    }
}

/// 25,000 older rows (more than any bounded scan would read) stand before
/// today's: a time-filtered listing still answers them on its first page,
/// and pages through a filter over the whole trail without gaps.
async fn a_time_filter_finds_todays_events_behind_a_long_trail_of_older_ones(store: Store) {
    const OLD_ROWS: i64 = 25_000;
    let setup = admin_setup(store).await;
    let old_time = "2020-01-02T03:04:05.000000Z";
    let fill = if setup.store_url().starts_with("postgres") {
        format!(
            "INSERT INTO audit_events (id, time, identity, action, outcome) OVERRIDING SYSTEM VALUE \
             SELECT (SELECT COALESCE(MAX(id), 0) FROM audit_events) + g, '{old_time}', \
             'apikey:old', 'lease.get', 'allowed' FROM generate_series(1, {OLD_ROWS}) AS g"
        )
    } else {
        format!(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {OLD_ROWS}) \
             INSERT INTO audit_events (time, identity, action, outcome) \
             SELECT '{old_time}', 'apikey:old', 'lease.get', 'allowed' FROM g"
        )
    };
    raw_sql(setup.store_url(), &fill).await;

    let since = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut ci = setup.lease_client("ci").await;
    let lease = create(&mut ci, "fabrikam", &["vso.code_write"]).await;

    let mut admin = setup.admin_client(Some("ops")).await;
    let filter = format!(
        "time >= \"{}\"",
        since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    );
    let page = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 10,
            page_token: String::new(),
            filter: filter.clone(),
        })
        .await
        .expect("admin lists audit events")
        .into_inner();
    assert!(
        page.audit_events
            .iter()
            .any(|e| e.action == "lease.create" && e.lease == lease.name),
        "the first page holds today's grant: {:?}",
        page.audit_events
    );
    assert!(
        page.audit_events.iter().all(|e| e.identity != "apikey:old"),
        "no old row passes the time filter"
    );

    let old = all_audit_events(&mut admin, "identity = \"apikey:old\"").await;
    assert_eq!(old.len(), OLD_ROWS as usize);
    let ids: Vec<i64> = old.iter().map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "oldest first, no repeats"
    );
}

/// Issue 14: a broker on the single-string chain key (key id `default`),
/// then one with `audit_chain_active = "a2"` and both keys in
/// `[audit_chain_keys]`: its first append records the switch, and
/// `audit verify` checks every row under its own key.
async fn audit_verify_checks_each_row_with_its_own_chain_key_across_a_rotation(store: Store) {
    let setup = admin_setup(store).await;
    let mut ci = setup.lease_client("ci").await;
    let lease = create(&mut ci, "fabrikam", &["vso.code_write"]).await;
    ci.revoke_lease(pb::RevokeLeaseRequest { name: lease.name })
        .await
        .unwrap();
    drop(ci);
    let spec = setup.spec.clone();
    setup.broker.stop().await;

    let k1 = spec.audit_chain_key.expose_secret().to_owned();
    let k2 = token_broker::crypto::Keyring::generate_key()
        .expose_secret()
        .to_owned();
    let mut config = spec.config();
    config.keys.audit_chain = None;
    config.keys.audit_chain_active = Some("a2".into());
    config.keys.audit_chain_keys = [
        ("default".to_owned(), SecretString::from(k1.clone())),
        ("a2".to_owned(), SecretString::from(k2.clone())),
    ]
    .into();
    let broker = spawn_broker_with_config(&spec, config).await;
    let mut ci = broker.client(&spec.key("ci")).await;
    create(&mut ci, "fabrikam", &["vso.code_write"]).await;
    drop(ci);
    broker.stop().await;

    let db = token_broker::store::open(&spec.store_url).await.unwrap();
    let rows = db.list_audit_chain(0, 100).await.unwrap();
    let switch = rows
        .iter()
        .position(|r| r.event.as_ref().unwrap().action == audit::CHAIN_KEY_ROTATE)
        .expect("a switch row");
    assert_eq!(
        rows[switch]
            .event
            .as_ref()
            .unwrap()
            .caller_detail
            .as_deref(),
        Some("from=default to=a2")
    );
    assert!(rows[..switch]
        .iter()
        .all(|r| r.key_ids.chain.as_deref() == Some("default")));
    assert!(rows[switch..]
        .iter()
        .all(|r| r.key_ids.chain.as_deref() == Some("a2")));
    assert!(switch + 1 < rows.len(), "rows after the switch");
    let (before, after) = (rows[switch - 1].id, rows[switch + 1].id);
    let n = rows.len();
    drop(db);

    let dir = tempfile::tempdir().unwrap();
    let both = format!(
        "audit_chain_active = \"a2\"\n[keys.audit_chain_keys]\ndefault = \"{k1}\"\na2 = \"{k2}\"\n"
    );
    let (ok, stdout, stderr) = audit_verify_with(dir.path(), &spec, &both, None);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("audit chain intact: {n} chained rows")),
        "{stdout}"
    );

    // The old configuration lacks a2: the rows after the switch cannot be
    // proved, and verify says which key they need, not "broken".
    let (ok, stdout, stderr) = audit_verify(dir.path(), &spec, None);
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains(&format!(
            "cannot be verified from row {}: needs chain key \"a2\", not configured",
            rows[switch].id
        )) && !stderr.contains("broken"),
        "{stderr}"
    );
    let only_a2 = format!("audit_chain_active = \"a2\"\n[keys.audit_chain_keys]\na2 = \"{k2}\"\n");
    let (ok, _, stderr) = audit_verify_with(dir.path(), &spec, &only_a2, None);
    assert!(!ok);
    assert!(
        stderr.contains("from row 1: needs chain key \"default\", not configured"),
        "{stderr}"
    );

    // A row edited before the switch, then one after it, each named.
    for id in [before, after] {
        raw_sql(
            &spec.store_url,
            &format!("UPDATE audit_events SET outcome = 'error' WHERE id = {id}"),
        )
        .await;
        let (ok, stdout, stderr) = audit_verify_with(dir.path(), &spec, &both, None);
        assert!(!ok, "{stdout}");
        assert!(
            stderr.contains(&format!(
                "audit chain broken at row {id}: MAC does not match"
            )),
            "{stderr}"
        );
        let outcome = rows
            .iter()
            .find(|r| r.id == id)
            .unwrap()
            .event
            .as_ref()
            .unwrap()
            .outcome
            .as_str();
        raw_sql(
            &spec.store_url,
            &format!("UPDATE audit_events SET outcome = '{outcome}' WHERE id = {id}"),
        )
        .await;
    }
    let (ok, stdout, stderr) = audit_verify_with(dir.path(), &spec, &both, None);
    assert!(ok, "{stdout}{stderr}");
}

/// Runs the real binary with `args` against the broker at `addr` with
/// `key`, `stdin` piped in.
fn cli_with_stdin(
    addr: &str,
    key: &SecretString,
    args: &[&str],
    stdin: &[u8],
) -> (bool, String, String) {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOKEN_BROKER_") {
            command.env_remove(name);
        }
    }
    let mut child = command
        .args(args)
        .env("TOKEN_BROKER_ADDR", addr)
        .env("TOKEN_BROKER_API_KEY", key.expose_secret())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run token-broker");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().expect("token-broker ends");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn lookup(admin: &mut AdminClient, token: &str) -> Result<pb::Lease, tonic::Status> {
    admin
        .lookup_token(pb::LookupTokenRequest {
            token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn lookup_token_finds_a_lease_by_its_pat_and_admin_revoke_token_file_revokes_it(
    store: Store,
) {
    let setup = admin_setup(store).await;
    let mut ci = setup.lease_client("ci").await;
    let lease = create(&mut ci, "fabrikam", &["vso.code_write", "vso.packaging"]).await;
    let bystander = create(&mut ci, "fabrikam", &["vso.code_write"]).await;
    let token = lease.token.clone();
    let unknown = format!("pat{}", uuid::Uuid::new_v4().simple());
    let mut admin = setup.admin_client(Some("ops")).await;

    // The API: the lease (admin view), never a token.
    let found = lookup(&mut admin, &format!("  {token}\r\n")).await.unwrap();
    assert_eq!(found.name, lease.name);
    assert_eq!(found.holder, "apikey:ci");
    assert_eq!(found.organization, "fabrikam");
    assert_eq!(found.scopes, lease.scopes);
    assert_eq!(found.state(), pb::lease::State::Active);
    let stored = ci
        .get_lease(pb::GetLeaseRequest {
            name: lease.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.create_time, stored.create_time);
    assert_eq!(found.expire_time, stored.expire_time);
    assert!(found.token.is_empty());

    // Refusals: unknown, not an admin, empty or over-long.
    let e = lookup(&mut admin, &unknown).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::NotFound, "LEASE_NOT_FOUND".into())
    );
    let mut not_admin = setup.admin_client(Some("ci")).await;
    let e = lookup(&mut not_admin, &token).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::PermissionDenied, "ADMIN_REQUIRED".into())
    );
    for bad in [String::new(), " \r\n".into(), "p".repeat(16 * 1024 + 1)] {
        let e = lookup(&mut admin, &bad).await.unwrap_err();
        assert_eq!(
            (e.code(), reason(&e)),
            (Code::InvalidArgument, "TOKEN_INVALID".into())
        );
    }

    // The CLI: from stdin (CRLF), from a file, as JSON.
    let ops = setup.spec.key("ops");
    let addr = setup.broker.url.clone();
    let (ok, stdout, stderr) = cli_with_stdin(
        &addr,
        &ops,
        &["admin", "lookup-token"],
        format!("{token}\r\n").as_bytes(),
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&lease.name) && stdout.contains("apikey:ci") && stdout.contains("ACTIVE"),
        "{stdout}"
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("leaked.txt");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let file_arg = token_file.to_str().unwrap();
    let (ok, stdout, stderr) = cli(
        &addr,
        &ops,
        &[
            "admin",
            "lookup-token",
            "--token-file",
            file_arg,
            "--output",
            "json",
        ],
    );
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["name"], lease.name.as_str());
    assert_eq!(json["holder"], "apikey:ci");
    assert_eq!(json["organization"], "fabrikam");
    assert_eq!(json["state"], "ACTIVE");
    assert!(json.get("token").is_none(), "{json}");

    let (ok, stdout, stderr) =
        cli_with_stdin(&addr, &ops, &["admin", "lookup-token"], unknown.as_bytes());
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("NOT_FOUND") && stderr.contains("no lease"),
        "{stderr}"
    );
    let (ok, _, stderr) = cli_with_stdin(&addr, &ops, &["admin", "lookup-token"], b"\r\n");
    assert!(!ok && stderr.contains("no token in stdin"), "{stderr}");
    let (ok, _, stderr) = cli_with_stdin(
        &addr,
        &setup.spec.key("ci"),
        &["admin", "lookup-token"],
        token.as_bytes(),
    );
    assert!(!ok && stderr.contains("PermissionDenied"), "{stderr}");
    let (ok, _, stderr) = cli(&addr, &ops, &["admin", "lookup-token", &token]);
    assert!(!ok && stderr.contains("unexpected argument"), "{stderr}");

    // Revoke by the token in a file: that lease only, its PAT revoked upstream.
    let (ok, stdout, stderr) = cli(
        &addr,
        &ops,
        &[
            "admin",
            "revoke",
            "--token-file",
            file_arg,
            "--output",
            "json",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stderr.contains(&lease.name), "{stderr}");
    let counts: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(counts["matchedCount"], "1");
    assert_eq!(counts["revokedCount"], "1");
    let live = live_display_names(&setup).await;
    assert!(
        !live.contains(&lease.display_name),
        "PAT still live upstream"
    );
    assert!(live.contains(&bystander.display_name));
    let after = lookup(&mut admin, &token).await.unwrap();
    assert_eq!(after.state(), pb::lease::State::Revoked);
    let (ok, _, stderr) = cli(
        &addr,
        &ops,
        &[
            "admin",
            "revoke",
            "--token-file",
            file_arg,
            "--holder",
            "apikey:ci",
        ],
    );
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");

    // Audited with the fingerprint, never the token.
    let fingerprint = TokenFingerprinter::new(setup.spec.fingerprint_key.clone())
        .unwrap()
        .fingerprint(&SecretString::from(token.clone()));
    let rows = all_audit_events(&mut admin, "action = admin.lookup_token").await;
    let outcomes: Vec<_> = rows
        .iter()
        .map(|r| (r.outcome(), r.reason.as_str(), r.lease.as_str()))
        .collect();
    use pb::audit_event::Outcome as O;
    assert!(outcomes.contains(&(O::Allowed, "lease is ACTIVE", lease.name.as_str())));
    assert!(outcomes.contains(&(O::Allowed, "lease is REVOKED", lease.name.as_str())));
    assert!(outcomes.contains(&(O::Denied, "LEASE_NOT_FOUND", "")));
    assert!(outcomes.contains(&(O::Denied, "ADMIN_REQUIRED", "")));
    for row in rows.iter().filter(|r| r.lease == lease.name) {
        assert_eq!(row.token_fingerprint, fingerprint);
        assert_eq!(row.identity, "apikey:ops");
    }
    assert!(rows.iter().all(|r| r.token_fingerprint.len() == 64));
    let revokes = all_audit_events(&mut admin, &format!("lease = \"{}\"", lease.name)).await;
    assert!(revokes
        .iter()
        .any(|r| r.action == "lease.revoke" && r.identity == "apikey:ops"));
    let everything = format!("{:?}", all_audit_events(&mut admin, "").await);
    for secret in [&token, &unknown] {
        assert!(
            !everything.contains(secret.as_str()),
            "a token in the audit trail"
        );
    }
}

/// A PAT fingerprinted under a key since rotated out of the active slot is
/// still found (that key stays in the keyring while audit rows need it),
/// as is one fingerprinted under the new active key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_token_tries_every_fingerprint_key_in_the_keyring() {
    let setup = admin_setup(Store::Sqlite).await;
    let mut ci = setup.lease_client("ci").await;
    let old = create(&mut ci, "fabrikam", &["vso.code_write"]).await;
    drop(ci);
    let spec = setup.spec.clone();
    setup.broker.stop().await;

    let k2 = token_broker::crypto::Keyring::generate_key();
    let mut config = spec.config();
    config.keys.fingerprint = None;
    config.keys.fingerprint_active = Some("f2".into());
    config.keys.fingerprint_keys = [
        ("default".to_owned(), spec.fingerprint_key.clone()),
        ("f2".to_owned(), k2.clone()),
    ]
    .into();
    let broker = spawn_broker_with_config(&spec, config).await;
    let mut ci = broker.client(&spec.key("ci")).await;
    let new = create(&mut ci, "fabrikam", &["vso.code_write"]).await;
    let mut admin = AdminServiceClient::with_interceptor(
        broker.channel().await,
        common::admin::AdminBearer::new(&spec.key("ops")),
    );
    for lease in [&old, &new] {
        let found = lookup(&mut admin, &lease.token).await.unwrap();
        assert_eq!(found.name, lease.name);
    }
    drop((ci, admin));
    broker.stop().await;
}
