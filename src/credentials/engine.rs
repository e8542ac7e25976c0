//! The rotation engine: mints each version (intent row first, claimed by
//! one replica through the version's primary key), turns the previous one
//! PREVIOUS, revokes it upstream when its overlap ends (retried from its
//! row with the leases' revocation backoff), reconciles versions a crash
//! left PENDING, retires credentials absent from the policy, and sweeps
//! upstream for credential PATs no live version owns.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{CredentialDeps, CredentialError, RevokePrevious};
use crate::audit::{AuditEvent, Outcome};
use crate::domain::{AuthorizationId, Organization, Timestamp, VersionState};
use crate::policy::CredentialSpec;
use crate::store::CredentialVersionRecord;
use crate::upstream::{CreatePat, DisplayFilter, ListPats, UpstreamError};

/// How long a claim on revoking a version lasts (the upstream call's
/// budget); a replica that dies mid-call lets it lapse.
const REVOKE_CLAIM: Duration = Duration::from_secs(60);

/// First delay before minting again after a failed version; doubles per
/// consecutive FAILED version up to [`MAX_MINT_RETRY`].
const MIN_MINT_RETRY: Duration = Duration::from_secs(5);

/// Longest delay between minting attempts while they keep failing.
const MAX_MINT_RETRY: Duration = Duration::from_secs(600);

/// The newest versions of each credential in the policy an engine pass
/// reads besides the live ones: the newest gives the next number and the
/// schedule, and the run of FAILED ones at the top sets the mint backoff,
/// which [`mint_retry_delay`] caps at this many (a unit test holds it).
/// Older closed versions are history the pass never needs.
const RECENT_VERSIONS: u32 = 8;

/// Audit reason of a `credential.mint` row whose version turned FAILED (the
/// upstream's words are in the version's `last_error`, not the trail).
const MINT_FAILED_REASON: &str = "CREDENTIAL_MINT_FAILED";

/// The name of the credential sweep's row in `background_jobs`.
const SWEEP_JOB: &str = "credential_sweep";

/// `Std` duration to chrono, capped at 100 years so `now + d` never
/// overflows.
pub(super) fn chrono(d: Duration) -> chrono::Duration {
    const CAP: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    chrono::Duration::from_std(d.min(CAP)).expect("100 years fit")
}

/// The upstream display name of a credential version:
/// `<prefix>:<deployment id>:credential:<name>:<version>`. The lease sweep
/// touches only `<prefix>:<deployment id>:<lease uuid>`, so it never takes
/// one of these for a lease's.
pub(super) fn display_name(deps: &CredentialDeps, credential: &str, version: i64) -> String {
    format!(
        "{}:{}:credential:{credential}:{version}",
        deps.settings.display_name_prefix, deps.settings.deployment_id
    )
}

/// The (credential, version) named by `display_name`, if it is exactly a
/// credential version's name of this deployment.
fn version_of_display_name(deps: &CredentialDeps, display_name: &str) -> Option<(String, i64)> {
    let prefix = format!(
        "{}:{}:credential:",
        deps.settings.display_name_prefix, deps.settings.deployment_id
    );
    let rest = display_name.strip_prefix(&prefix)?;
    let (name, version) = rest.rsplit_once(':')?;
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let version: i64 = version.parse().ok()?;
    (valid_name && version > 0 && version.to_string() == rest[name.len() + 1..])
        .then(|| (name.to_owned(), version))
}

/// Associated data a version's sealed token is bound to:
/// `credential:<name>:<version>`, so a sealed token copied to another row
/// does not open.
pub(super) fn token_aad(credential: &str, version: i64) -> Vec<u8> {
    crate::store::SecretOwner::CredentialVersion {
        credential: credential.to_owned(),
        version,
    }
    .aad()
}

/// Why a mint did not produce a CURRENT version.
pub(super) enum MintError {
    /// Another replica holds the next version (PENDING) right now.
    Busy,
    /// It failed; counted in the failure metric.
    Failed(CredentialError),
}

/// Mints the next version of `spec` now (after `latest`, the newest row,
/// if any): writes the PENDING intent claimed by this replica, creates the
/// PAT upstream, and makes it CURRENT while the previous CURRENT turns
/// PREVIOUS (revoked `overlap` later, or at once with
/// [`RevokePrevious::Now`]). Returns the new version.
pub(super) async fn mint(
    deps: &CredentialDeps,
    spec: &CredentialSpec,
    latest: Option<i64>,
    scheduled: Option<Timestamp>,
    revoke_previous: RevokePrevious,
) -> Result<CredentialVersionRecord, MintError> {
    let name = spec.name();
    let version = latest.unwrap_or(0) + 1;
    let now = Timestamp::now();
    let period = chrono(spec.rotation_period());
    let overlap = chrono(spec.overlap());
    // tₙ = t₀ + n·P: a version minted on schedule starts its period at the
    // previous one's rotate_time, so a tick's delay does not accumulate. A
    // schedule missed by a whole period (brokers down) starts anew at now.
    let start = scheduled
        .filter(|t| *t <= now && now.as_datetime() - t.as_datetime() < period)
        .unwrap_or(now);
    let wanted_valid_to = start + period + overlap + chrono(deps.settings.valid_to_skew);
    let claimer = deps.settings.replica_id.clone();
    let intent = CredentialVersionRecord {
        credential: name.to_owned(),
        version,
        state: VersionState::Pending,
        organization: spec.organization().clone(),
        scopes: spec.scopes().clone(),
        display_name: display_name(deps, name, version),
        authorization_id: None,
        sealed_token: None,
        create_time: now,
        update_time: now,
        valid_from: now,
        rotate_time: start + period,
        expire_time: wanted_valid_to,
        // While CURRENT: when it would be revoked if the next version came
        // on time; keeps the overlap with the row (retirement reads it).
        revoke_at: Some(start + period + overlap),
        revoke_time: None,
        attempts: 0,
        next_attempt_time: None,
        last_error: None,
        claimed_by: Some(claimer.clone()),
        claimed_until: Some(now + chrono(deps.settings.mint_claim)),
    };
    let store = &deps.store;
    let inserted = store
        .insert_credential_version(&intent)
        .await
        .map_err(|e| MintError::Failed(e.into()))?;
    if !inserted {
        return Err(MintError::Busy);
    }
    let fail = |e: CredentialError| {
        deps.metrics.rotation_failed(name);
        MintError::Failed(e)
    };
    let request = CreatePat {
        display_name: intent.display_name.clone(),
        scope: intent.scopes.to_upstream(),
        valid_to: wanted_valid_to.into(),
    };
    let pat = match deps.upstream.create(&intent.organization, &request).await {
        Ok(pat) => pat,
        Err(e) => {
            tracing::warn!(credential = name, version, error = %e, "minting a credential version failed");
            let ambiguous = matches!(
                e,
                UpstreamError::Unavailable(_) | UpstreamError::Protocol(_)
            );
            if !ambiguous || revoke_named(deps, &intent).await {
                mark_failed(deps, &intent, &claimer, &e.to_string()).await;
            }
            // Else it stays PENDING; the reconciler settles it once the
            // claim lapses.
            return Err(fail(e.into()));
        }
    };
    let Some(token) = pat.token.clone() else {
        let _ = revoke_upstream(deps, &intent.organization, pat.authorization_id).await;
        mark_failed(deps, &intent, &claimer, "create answer carries no token").await;
        return Err(fail(CredentialError::Internal(
            "upstream create answer carries no token".into(),
        )));
    };
    let now = Timestamp::now();
    let sealed = deps.keyring.seal(&token, &token_aad(name, version));
    let current = CredentialVersionRecord {
        state: VersionState::Current,
        authorization_id: Some(pat.authorization_id),
        sealed_token: Some(sealed),
        update_time: now,
        // Upstream rounds and may clamp validTo: keep what it stored.
        expire_time: Timestamp::from(pat.valid_to),
        claimed_by: None,
        claimed_until: None,
        ..intent.clone()
    };
    let previous_revoke_at = match revoke_previous {
        // tₙ₊₁ + O (the new version's period start plus the overlap).
        RevokePrevious::AfterOverlap => start + overlap,
        RevokePrevious::Now => now,
    };
    let activated = store
        .activate_credential_version(
            &current,
            &claimer,
            previous_revoke_at,
            revoke_previous == RevokePrevious::Now,
        )
        .await;
    match activated {
        Ok(true) => {
            tracing::info!(credential = name, version, authorization_id = %pat.authorization_id, "credential version minted");
            audit_system(
                deps,
                crate::audit::CREDENTIAL_MINT,
                &current,
                Outcome::Allowed,
                None,
            )
            .await;
            changed(deps, name).await;
            Ok(current)
        }
        other => {
            // Never leave a PAT live without a live row: revoke it; the row
            // is FAILED (or was settled by the reconciler meanwhile).
            let why = match &other {
                Err(e) => e.to_string(),
                _ => "the intent row was settled meanwhile".to_owned(),
            };
            tracing::error!(credential = name, version, error = %why, "could not record a minted credential version; revoking its PAT");
            let _ = revoke_upstream(deps, &intent.organization, pat.authorization_id).await;
            mark_failed(deps, &intent, &claimer, &why).await;
            Err(fail(match other {
                Err(e) => e.into(),
                _ => CredentialError::Internal("credential version settled meanwhile".into()),
            }))
        }
    }
}

/// Appends a background audit row about `version` (best effort: logged
/// when it cannot be written; the version's row is the record).
async fn audit_system(
    deps: &CredentialDeps,
    action: &str,
    version: &CredentialVersionRecord,
    outcome: Outcome,
    reason: Option<&str>,
) {
    let event = AuditEvent {
        policy_rule: Some(format!("credential:{}", version.credential)),
        caller_detail: Some(format!("version={}", version.version)),
        organization: Some(version.organization.to_string()),
        scopes: Some(version.scopes.to_upstream()),
        reason: reason.map(str::to_owned),
        ..AuditEvent::new(
            Timestamp::now(),
            crate::audit::SYSTEM_IDENTITY,
            action,
            outcome,
        )
    };
    if let Err(e) = deps.audit.append(&event).await {
        tracing::warn!(credential = %version.credential, version = version.version, error = %e, "could not audit a credential change");
    }
}

/// Wakes this process's watchers of `credential` and tells the other
/// replicas (PostgreSQL `NOTIFY`), best effort: they also read the
/// database every tick.
pub(super) async fn changed(deps: &CredentialDeps, credential: &str) {
    deps.notify();
    if let Err(e) = deps.store.notify_credential_change(credential).await {
        tracing::debug!(credential, error = %e, "could not notify other replicas of a credential change");
    }
}

/// Marks the PENDING `intent` (held by `claimer`) FAILED, best effort.
async fn mark_failed(
    deps: &CredentialDeps,
    intent: &CredentialVersionRecord,
    claimer: &str,
    why: &str,
) {
    let failed = CredentialVersionRecord {
        state: VersionState::Failed,
        update_time: Timestamp::now(),
        last_error: Some(why.chars().take(500).collect()),
        claimed_by: None,
        claimed_until: None,
        ..intent.clone()
    };
    match deps
        .store
        .update_credential_version(&failed, VersionState::Pending, Some(claimer))
        .await
    {
        Ok(true) => {
            audit_system(
                deps,
                crate::audit::CREDENTIAL_MINT,
                &failed,
                Outcome::Error,
                Some(MINT_FAILED_REASON),
            )
            .await;
            changed(deps, &intent.credential).await
        }
        Ok(false) => changed(deps, &intent.credential).await,
        Err(e) => {
            tracing::error!(credential = %intent.credential, version = intent.version, error = %e, "could not mark a credential version FAILED")
        }
    }
}

/// Revokes PAT `id` upstream; "not found" counts as revoked.
async fn revoke_upstream(
    deps: &CredentialDeps,
    organization: &Organization,
    id: AuthorizationId,
) -> Result<(), UpstreamError> {
    match deps.upstream.revoke(organization, id).await {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

/// Revokes every active upstream PAT named like `version`; true when the
/// whole listing was read and every one found was revoked (so none is
/// left).
async fn revoke_named(deps: &CredentialDeps, version: &CredentialVersionRecord) -> bool {
    let query = ListPats {
        display_filter: Some(DisplayFilter::Active),
        top: None,
    };
    let list = match deps.upstream.list(&version.organization, &query).await {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(credential = %version.credential, version = version.version, error = %e, "could not list upstream for a credential version's PAT");
            return false;
        }
    };
    let mut clean = list.complete;
    for pat in list
        .pats
        .iter()
        .filter(|p| p.display_name == version.display_name)
    {
        if let Err(e) = revoke_upstream(deps, &version.organization, pat.authorization_id).await {
            tracing::warn!(credential = %version.credential, version = version.version, error = %e, "could not revoke a credential version's PAT found by name");
            clean = false;
        }
    }
    clean
}

/// Revokes `version` upstream if it is PREVIOUS and due, or REVOKING and
/// due for a retry: claims it, moves it to REVOKING (erasing its token),
/// revokes the PAT, and records REVOKED or the failed attempt with its
/// backoff. Returns true if it ended REVOKED.
pub(super) async fn revoke_version(
    deps: &CredentialDeps,
    version: &CredentialVersionRecord,
    now: Timestamp,
) -> Result<bool, CredentialError> {
    let due = match version.state {
        VersionState::Previous => version.revoke_at.is_some_and(|at| at <= now),
        VersionState::Revoking => version.next_attempt_time.is_none_or(|at| at <= now),
        _ => false,
    };
    if !due {
        return Ok(false);
    }
    let claimer = deps.settings.replica_id.as_str();
    let Some(claimed) = deps
        .store
        .claim_credential_version(
            &version.credential,
            version.version,
            version.state,
            claimer,
            now,
            REVOKE_CLAIM,
        )
        .await?
    else {
        return Ok(false);
    };
    let revoking = if claimed.state == VersionState::Previous {
        let revoking = CredentialVersionRecord {
            state: VersionState::Revoking,
            sealed_token: None,
            revoke_time: Some(now),
            update_time: now,
            ..claimed.clone()
        };
        if !deps
            .store
            .update_credential_version(&revoking, VersionState::Previous, Some(claimer))
            .await?
        {
            return Ok(false);
        }
        changed(deps, &revoking.credential).await;
        revoking
    } else {
        claimed
    };
    let result = match revoking.authorization_id {
        Some(id) => revoke_upstream(deps, &revoking.organization, id).await,
        None => Ok(()),
    };
    let now = Timestamp::now();
    let next = match &result {
        Ok(()) => CredentialVersionRecord {
            state: VersionState::Revoked,
            update_time: now,
            next_attempt_time: None,
            last_error: None,
            claimed_by: None,
            claimed_until: None,
            ..revoking.clone()
        },
        Err(e) => {
            let attempts = revoking.attempts.saturating_add(1);
            CredentialVersionRecord {
                update_time: now,
                attempts,
                next_attempt_time: Some(
                    now + chrono(deps.settings.revocation_retry.backoff(attempts)),
                ),
                last_error: Some(format!("upstream revoke failed: {e}")),
                claimed_by: None,
                claimed_until: None,
                ..revoking.clone()
            }
        }
    };
    deps.store
        .update_credential_version(&next, VersionState::Revoking, Some(claimer))
        .await?;
    match result {
        Ok(()) => {
            tracing::info!(credential = %revoking.credential, version = revoking.version, "credential version revoked upstream");
            audit_system(
                deps,
                crate::audit::CREDENTIAL_REVOKE,
                &next,
                Outcome::Allowed,
                None,
            )
            .await;
            changed(deps, &revoking.credential).await;
            Ok(true)
        }
        Err(e) => {
            tracing::warn!(credential = %revoking.credential, version = revoking.version, attempt = next.attempts, error = %e, "revoking a credential version upstream failed; will retry");
            Ok(false)
        }
    }
}

/// Settles a version left PENDING whose minter's claim lapsed (it crashed
/// or hung): claims it, revokes any PAT upstream carrying its display name
/// (the secret is lost with the create answer), and marks it FAILED; if
/// the listing is incomplete it stays PENDING for the next pass.
async fn reconcile_pending(
    deps: &CredentialDeps,
    version: &CredentialVersionRecord,
    now: Timestamp,
) -> Result<(), CredentialError> {
    if version.claimed_until.is_some_and(|until| until > now) {
        return Ok(());
    }
    let claimer = deps.settings.replica_id.as_str();
    let Some(claimed) = deps
        .store
        .claim_credential_version(
            &version.credential,
            version.version,
            VersionState::Pending,
            claimer,
            now,
            REVOKE_CLAIM,
        )
        .await?
    else {
        return Ok(());
    };
    tracing::warn!(credential = %claimed.credential, version = claimed.version, "reconciling a credential version left PENDING");
    if revoke_named(deps, &claimed).await {
        mark_failed(deps, &claimed, claimer, "left PENDING; reconciled").await;
    } else {
        // Give the claim back so the next pass tries again.
        let released = CredentialVersionRecord {
            claimed_by: None,
            claimed_until: None,
            ..claimed.clone()
        };
        let _ = deps
            .store
            .update_credential_version(&released, VersionState::Pending, Some(claimer))
            .await;
    }
    Ok(())
}

/// Delay before minting again after `failed_in_a_row` consecutive FAILED
/// versions: 5 s doubling, at most 10 min.
fn mint_retry_delay(failed_in_a_row: u32) -> Duration {
    let factor = 1u32 << failed_in_a_row.saturating_sub(1).min(10);
    (MIN_MINT_RETRY * factor).min(MAX_MINT_RETRY)
}

/// What one pass of the engine saw, to tell watchers when it changed.
pub(super) type Snapshot = BTreeMap<(String, i64), VersionState>;

/// One pass of background work over every credential: retirement, minting
/// what is due, revoking what is due, reconciling stale PENDING rows, and
/// the valid-until metric. Reads the live versions and the
/// [`RECENT_VERSIONS`] newest of each policy credential, never the whole
/// history. Returns what it saw (those rows' states).
pub(super) async fn run_once(deps: &CredentialDeps) -> Result<Snapshot, CredentialError> {
    let policy = deps.policy.current();
    let now = Timestamp::now();
    let present: Vec<String> = policy
        .credentials()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let managed = deps.store.sync_managed_credentials(&present, now).await?;
    let absent_before = now.saturating_sub(deps.settings.retire_after);
    let mut retired: BTreeMap<String, Timestamp> = BTreeMap::new();
    for m in &managed {
        if let Some(at) = m.retired_time {
            retired.insert(m.name.clone(), at);
            continue;
        }
        let overdue = m.absent_since.is_some_and(|since| since <= absent_before);
        if overdue
            && deps
                .store
                .retire_managed_credential(&m.name, absent_before, now)
                .await?
        {
            tracing::warn!(credential = %m.name, "managed credential absent from the policy too long: retired");
            retired.insert(m.name.clone(), now);
        }
    }
    // Not the whole history: the live versions and each policy
    // credential's newest few (what minting, revocation, reconciliation,
    // retirement and the metric read).
    let versions = deps
        .store
        .list_credential_versions_in_use(&present, RECENT_VERSIONS)
        .await?;
    let mut by_name: BTreeMap<&str, Vec<&CredentialVersionRecord>> = BTreeMap::new();
    for v in &versions {
        by_name.entry(v.credential.as_str()).or_default().push(v);
    }
    // Mint what is due.
    for spec in policy.credentials() {
        let rows = by_name.get(spec.name()).map(Vec::as_slice).unwrap_or(&[]);
        if let Some(reason) = mint_due(rows, now) {
            tracing::debug!(
                credential = spec.name(),
                reason,
                "minting a credential version"
            );
            let scheduled = rows
                .first()
                .filter(|v| v.state == VersionState::Current)
                .map(|v| v.rotate_time);
            match mint(
                deps,
                spec,
                rows.first().map(|v| v.version),
                scheduled,
                RevokePrevious::AfterOverlap,
            )
            .await
            {
                Ok(_) | Err(MintError::Busy) => {}
                Err(MintError::Failed(e)) => {
                    tracing::warn!(credential = spec.name(), error = %e, "credential rotation failed; retrying later")
                }
            }
        }
    }
    // Retired: the CURRENT version turns PREVIOUS, revoked `overlap` after
    // retirement.
    for (name, at) in &retired {
        for v in by_name.get(name.as_str()).into_iter().flatten() {
            if v.state == VersionState::Current {
                let overlap = v
                    .revoke_at
                    .map(|r| r.as_datetime() - v.rotate_time.as_datetime())
                    .unwrap_or_else(chrono::Duration::zero)
                    .max(chrono::Duration::zero());
                let previous = CredentialVersionRecord {
                    state: VersionState::Previous,
                    revoke_at: Some(*at + overlap),
                    update_time: now,
                    ..(*v).clone()
                };
                if deps
                    .store
                    .update_credential_version(&previous, VersionState::Current, None)
                    .await?
                {
                    changed(deps, name).await;
                }
            }
        }
    }
    // Revoke and reconcile.
    for v in &versions {
        let outcome = match v.state {
            VersionState::Previous | VersionState::Revoking => {
                revoke_version(deps, v, now).await.map(|_| ())
            }
            VersionState::Pending => reconcile_pending(deps, v, now).await,
            _ => Ok(()),
        };
        if let Err(e) = outcome {
            tracing::warn!(credential = %v.credential, version = v.version, error = %e, "credential background step failed");
        }
    }
    // What the pass leaves, for watchers and the metric.
    let versions = deps
        .store
        .list_credential_versions_in_use(&present, RECENT_VERSIONS)
        .await?;
    let mut valid_until: BTreeMap<&str, Option<Timestamp>> = BTreeMap::new();
    let mut snapshot = Snapshot::new();
    for v in &versions {
        snapshot.insert((v.credential.clone(), v.version), v.state);
        let entry = valid_until.entry(v.credential.as_str()).or_default();
        if v.state.holds_token() {
            *entry = Some(entry.map_or(v.expire_time, |t| t.max(v.expire_time)));
        }
    }
    for spec in policy.credentials() {
        deps.metrics.declare(spec.name());
        valid_until.entry(spec.name()).or_default();
    }
    for (name, until) in valid_until {
        // In the policy without a valid version: 0, so "validTo is near"
        // alerts fire rather than the series vanishing.
        let until = match until {
            Some(t) => Some(t.as_micros() as f64 / 1e6),
            None => policy.credential(name).map(|_| 0.0),
        };
        deps.metrics.set_valid_until(name, until);
    }
    Ok(snapshot)
}

/// Why `rows` (one credential's versions, newest first) need a new version
/// at `now`, if they do.
fn mint_due(rows: &[&CredentialVersionRecord], now: Timestamp) -> Option<&'static str> {
    let Some(latest) = rows.first() else {
        return Some("first version");
    };
    match latest.state {
        VersionState::Pending => None,
        VersionState::Current => (latest.rotate_time <= now).then_some("rotation due"),
        VersionState::Failed => {
            let failed = rows
                .iter()
                .take_while(|v| v.state == VersionState::Failed)
                .count();
            let delay = mint_retry_delay(u32::try_from(failed).unwrap_or(u32::MAX));
            (latest.update_time + chrono(delay) <= now).then_some("retry after a failed version")
        }
        // No CURRENT (e.g. retired and put back).
        _ => Some("no current version"),
    }
}

/// Sweeps upstream once per `sweep_interval` (one replica, by the
/// `credential_sweep` job claim): in every organization a stored credential
/// version was minted in (retention deletes a version only once its PAT is
/// past its validTo, so every organization that may hold a live one is
/// still listed), revokes each active PAT named like a credential
/// version of this deployment whose row is missing or no longer live
/// (REVOKED, FAILED). Returns how many it revoked.
pub(super) async fn sweep_if_due(deps: &CredentialDeps) -> Result<usize, CredentialError> {
    let now = Timestamp::now();
    let claimer = format!("{}/credential-sweep", deps.settings.replica_id);
    let interval = deps.settings.sweep_interval;
    if !deps
        .store
        .claim_job(SWEEP_JOB, now, &claimer, interval, interval)
        .await?
    {
        return Ok(0);
    }
    let versions = deps.store.list_credential_versions(None).await?;
    let live: BTreeSet<(String, i64)> = versions
        .iter()
        .filter(|v| v.state.is_live())
        .map(|v| (v.credential.clone(), v.version))
        .collect();
    let organizations: BTreeSet<Organization> =
        versions.iter().map(|v| v.organization.clone()).collect();
    let query = ListPats {
        display_filter: Some(DisplayFilter::Active),
        top: None,
    };
    let mut revoked = 0;
    for org in organizations {
        let list = match deps.upstream.list(&org, &query).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(organization = %org, error = %e, "credential sweep could not list upstream");
                continue;
            }
        };
        for pat in list.pats {
            let Some(key) = version_of_display_name(deps, &pat.display_name) else {
                continue;
            };
            // Read again at the PAT: a version minted since the list
            // above was read is live.
            if live.contains(&key) || pat.valid_from >= now.as_datetime() {
                continue;
            }
            match revoke_upstream(deps, &org, pat.authorization_id).await {
                Ok(()) => {
                    tracing::warn!(credential = %key.0, version = key.1, authorization_id = %pat.authorization_id, "revoked an orphan credential PAT");
                    revoked += 1;
                }
                Err(e) => {
                    tracing::warn!(credential = %key.0, version = key.1, error = %e, "could not revoke an orphan credential PAT")
                }
            }
        }
    }
    deps.store.finish_job(SWEEP_JOB, &claimer, now).await?;
    Ok(revoked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_retries_back_off_from_5s_to_10min() {
        assert_eq!(mint_retry_delay(1), Duration::from_secs(5));
        assert_eq!(mint_retry_delay(2), Duration::from_secs(10));
        assert_eq!(mint_retry_delay(30), Duration::from_secs(600));
    }

    #[test]
    fn the_versions_a_pass_reads_cover_the_whole_mint_backoff() {
        let recent = RECENT_VERSIONS;
        assert_eq!(mint_retry_delay(recent), MAX_MINT_RETRY);
        assert!(mint_retry_delay(recent - 1) < MAX_MINT_RETRY);
    }
}
