//! `token-broker admin ...`: a gRPC client of `AdminService` (bulk revoke,
//! leases across holders, revocations the broker gave up on and forcing
//! them closed, the lease a PAT belongs to; managed credentials: rotate
//! one now, list their versions). Same `--addr`, `--api-key`,
//! `--output` as `lease`; the API key must belong to an identity the
//! policy names as an admin. A PAT to look up is read from stdin or a
//! file, never from an argument (which `ps` and shell history would show).

use std::io::{IsTerminal as _, Read};
use std::path::{Path, PathBuf};

use chrono::SecondsFormat;
use clap::Subcommand;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Map, Value};
use tonic::transport::Channel;

use super::credential::{credential_name, version_json, version_text};
use super::grpc::{
    answer, channel, lease_json, lease_name, lease_text, list_json, page_text, request, rfc3339,
    table, ClientArgs, ClientError, Column, Paging, TokenFileArg, NAME_COLUMN, ORGANIZATION_COLUMN,
    SCOPES_COLUMN, STATE_COLUMN,
};
use crate::proto::v1 as pb;
use crate::proto::v1::admin_service_client::AdminServiceClient;

/// `token-broker admin ...`.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Revoke every live lease matching all the given criteria, upstream
    /// (incident response). At least one criterion is required; or, with
    /// --token-file, the lease of a PAT.
    Revoke {
        /// Revoke the lease this PAT belongs to instead (the file holds the
        /// token; surrounding whitespace is ignored): `lookup-token`, then
        /// revoke that lease. Not with the other criteria.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with_all = ["holder", "organization", "scope", "names"]
        )]
        token_file: Option<PathBuf>,
        /// Only leases held by this identity, e.g. `apikey:ci`.
        #[arg(long)]
        holder: Option<String>,
        /// Only leases in this organization.
        #[arg(long = "organization", visible_alias = "org")]
        organization: Option<String>,
        /// Only leases whose scopes grant this scope, e.g. `vso.code_write`.
        #[arg(long)]
        scope: Option<String>,
        /// Only these leases: `leases/{uuid}` or bare uuids.
        names: Vec<String>,
    },
    /// List leases of every holder, newest first.
    List {
        /// e.g. `holder = "apikey:ci" AND state = ACTIVE`.
        #[arg(long, default_value = "")]
        filter: String,
        #[command(flatten)]
        paging: Paging,
        #[command(flatten)]
        caller: TokenFileArg,
    },
    /// List every REVOKE_FAILED lease (all pages): revocations the broker
    /// gave up on after its retry budget, whose PAT may still be live
    /// upstream; with attempts, last error and next retry.
    ListFailed {
        #[command(flatten)]
        caller: TokenFileArg,
    },
    /// Find the lease a PAT belongs to ("whose token is this?") and print
    /// it (holder, organization, scopes, state, times). The token is read
    /// from stdin (typed at a terminal: not echoed) or from --token-file,
    /// never from an argument. Not found: exit status 4.
    LookupToken {
        /// Read the token from this file instead of stdin.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Close a REVOKE_FAILED lease WITHOUT revoking its PAT upstream: the
    /// broker stops retrying and the PAT stays valid until its validTo
    /// (unless the orphan sweep, which keeps trying, revokes it).
    /// Audited as `lease.force_revoke`.
    ForceRevoke {
        /// `leases/{uuid}` or the bare uuid.
        name: String,
        /// Why (ticket, incident); recorded in the audit trail. At most 512
        /// characters, one line.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        caller: TokenFileArg,
    },
    /// Mint the next version of a managed credential now and print it (not
    /// its token); watchers get it at once. `--revoke-previous now` (a
    /// leaked token) revokes the older versions upstream at once; the
    /// default `after-overlap` keeps the previous one valid for the
    /// credential's overlap. Audited as `credential.rotate`.
    RotateCredential {
        /// The credential: `NAME` or `credentials/NAME`.
        name: String,
        /// What happens to the versions the new one supersedes.
        #[arg(long, value_enum, default_value_t = RevokePrevious::AfterOverlap)]
        revoke_previous: RevokePrevious,
        #[command(flatten)]
        caller: TokenFileArg,
    },
    /// List every managed credential's versions (all pages) with their
    /// states and times; never a token.
    ListCredentials {
        #[command(flatten)]
        caller: TokenFileArg,
    },
}

impl AdminCommand {
    /// The caller's service-account token file: `--token-file` (or
    /// `TOKEN_BROKER_TOKEN_FILE`) where the subcommand has no `--token-file`
    /// of its own; only the variable for `revoke` and `lookup-token`, whose
    /// `--token-file` names the PAT to look up.
    pub fn caller_token_file(&self) -> Option<PathBuf> {
        match self {
            AdminCommand::List { caller, .. }
            | AdminCommand::ListFailed { caller }
            | AdminCommand::ForceRevoke { caller, .. }
            | AdminCommand::RotateCredential { caller, .. }
            | AdminCommand::ListCredentials { caller } => caller.token_file.clone(),
            AdminCommand::Revoke { .. } | AdminCommand::LookupToken { .. } => {
                super::grpc::token_file_from_env()
            }
        }
    }
}

/// `--revoke-previous` of `admin rotate-credential`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RevokePrevious {
    /// The previous version stays valid for the overlap (routine).
    AfterOverlap,
    /// Every older version is revoked upstream now (a leak).
    Now,
}

/// A connected `AdminService` client, as `args` say (see
/// [`super::grpc::endpoint`]).
pub async fn connect(args: &ClientArgs) -> Result<AdminServiceClient<Channel>, ClientError> {
    Ok(AdminServiceClient::new(channel(args).await?))
}

/// Runs one `admin` subcommand and returns what to print on stdout.
pub async fn run(args: &ClientArgs, command: AdminCommand) -> Result<String, ClientError> {
    let output = args.output("admin")?;
    match command {
        AdminCommand::Revoke {
            token_file: Some(path),
            ..
        } => {
            let token = read_token(Some(&path))?;
            let mut client = connect(args).await?;
            let lease = lookup(&mut client, args, token).await?;
            eprintln!(
                "{} belongs to {} (holder {}, organization {}, {})",
                path.display(),
                lease.name,
                lease.holder,
                lease.organization,
                lease.state().as_str_name()
            );
            let req = pb::RevokeLeasesRequest {
                names: vec![lease.name],
                ..Default::default()
            };
            let done = answer(client.revoke_leases(request(req, args)?).await)?;
            Ok(output.show(&done, revoke_json, revoke_text))
        }
        AdminCommand::LookupToken { token_file } => {
            let token = read_token(token_file.as_deref())?;
            let mut client = connect(args).await?;
            let lease = lookup(&mut client, args, token).await?;
            Ok(output.show(&lease, lease_json, lease_text))
        }
        AdminCommand::Revoke {
            token_file: None,
            holder,
            organization,
            scope,
            names,
        } => {
            let req = pb::RevokeLeasesRequest {
                holder: holder.unwrap_or_default(),
                organization: organization.unwrap_or_default(),
                scope: scope.unwrap_or_default(),
                names: names.iter().map(|n| lease_name(n)).collect(),
            };
            if req.holder.is_empty()
                && req.organization.is_empty()
                && req.scope.is_empty()
                && req.names.is_empty()
            {
                return Err(ClientError::Usage(
                    "give --holder, --organization, --scope or lease names (never everything)"
                        .into(),
                ));
            }
            let mut client = connect(args).await?;
            let done = answer(client.revoke_leases(request(req, args)?).await)?;
            Ok(output.show(&done, revoke_json, revoke_text))
        }
        AdminCommand::List { filter, paging, .. } => {
            let mut client = connect(args).await?;
            let req = pb::AdminListLeasesRequest {
                page_size: paging.page_size,
                page_token: paging.page_token,
                filter,
            };
            let page = answer(client.list_leases(request(req, args)?).await)?;
            Ok(output.show(&page, list_json, list_text))
        }
        AdminCommand::ListFailed { .. } => {
            let mut client = connect(args).await?;
            let mut all = pb::ListLeasesResponse::default();
            loop {
                let req = pb::AdminListLeasesRequest {
                    // The server's largest page: fewest round trips.
                    page_size: crate::api::convert::MAX_PAGE_SIZE as i32,
                    page_token: all.next_page_token,
                    filter: "state = REVOKE_FAILED".into(),
                };
                let page = answer(client.list_leases(request(req, args)?).await)?;
                all.leases.extend(page.leases);
                all.next_page_token = page.next_page_token;
                if all.next_page_token.is_empty() {
                    break;
                }
            }
            Ok(output.show(&all, list_json, |all| failed_text(&all.leases)))
        }
        AdminCommand::RotateCredential {
            name,
            revoke_previous,
            ..
        } => {
            use pb::rotate_credential_request::RevokePrevious as P;
            let mut client = connect(args).await?;
            let req = pb::RotateCredentialRequest {
                name: credential_name(&name),
                revoke_previous: match revoke_previous {
                    RevokePrevious::AfterOverlap => P::AfterOverlap,
                    RevokePrevious::Now => P::Now,
                } as i32,
            };
            let version = answer(client.rotate_credential(request(req, args)?).await)?;
            if revoke_previous == RevokePrevious::Now {
                // A leak is cut off only once Azure DevOps confirmed each
                // revocation: say which versions are still valid (stderr,
                // so `--output json` stays one document).
                let mut page_token = String::new();
                loop {
                    let req = pb::ListCredentialsRequest {
                        page_size: crate::api::convert::MAX_PAGE_SIZE as i32,
                        page_token,
                    };
                    let page = answer(client.list_credentials(request(req, args)?).await)?;
                    for v in &page.versions {
                        if v.credential == version.credential && still_valid_after_now(v) {
                            eprintln!(
                                "warning: {} version {} is {}: Azure DevOps did not confirm its \
                                 revocation yet, so its token may still work; the broker keeps \
                                 retrying (admin list-credentials shows when it is REVOKED)",
                                v.credential,
                                v.version,
                                v.state().as_str_name()
                            );
                        }
                    }
                    page_token = page.next_page_token;
                    if page_token.is_empty() {
                        break;
                    }
                }
            }
            Ok(output.show(&version, version_json, version_text))
        }
        AdminCommand::ListCredentials { .. } => {
            let mut client = connect(args).await?;
            let mut all = pb::ListCredentialsResponse::default();
            loop {
                let req = pb::ListCredentialsRequest {
                    page_size: crate::api::convert::MAX_PAGE_SIZE as i32,
                    page_token: all.next_page_token,
                };
                let page = answer(client.list_credentials(request(req, args)?).await)?;
                all.versions.extend(page.versions);
                all.next_page_token = page.next_page_token;
                if all.next_page_token.is_empty() {
                    break;
                }
            }
            Ok(output.show(&all, credentials_json, credentials_text))
        }
        AdminCommand::ForceRevoke { name, reason, .. } => {
            let mut client = connect(args).await?;
            let req = pb::ForceRevokeLeaseRequest {
                name: lease_name(&name),
                reason: reason.unwrap_or_default(),
            };
            let lease = answer(client.force_revoke_lease(request(req, args)?).await)?;
            // On stderr, so `--output json` stays one parseable document.
            eprintln!("{}", left_live_warning(&lease));
            Ok(output.show(&lease, lease_json, lease_text))
        }
    }
}

/// The lease `token` belongs to (AdminService.LookupToken); NOT_FOUND and
/// other refusals as [`ClientError::Rpc`].
async fn lookup(
    client: &mut AdminServiceClient<Channel>,
    args: &ClientArgs,
    token: SecretString,
) -> Result<pb::Lease, ClientError> {
    let req = pb::LookupTokenRequest {
        token: token.expose_secret().to_owned(),
    };
    let reply = client.lookup_token(request(req, args)?).await;
    answer(reply).map_err(|e| match e {
        ClientError::Rpc(status) if status.code() == tonic::Code::NotFound => {
            ClientError::Rpc(tonic::Status::not_found(format!(
                "no lease of this broker has that token (NOT_FOUND: {}): it was not issued here, \
                 or its lease was deleted",
                status.message()
            )))
        }
        other => other,
    })
}

/// Reads a PAT from `file`, or else from stdin (a terminal: one line, not
/// echoed), without surrounding whitespace (a trailing newline or CRLF).
/// Refused: empty, not UTF-8, or longer than the broker takes. Errors never
/// quote the token.
pub fn read_token(file: Option<&Path>) -> Result<SecretString, ClientError> {
    const MAX: usize = crate::api::admin::MAX_LOOKUP_TOKEN_BYTES;
    let source = match file {
        Some(path) => path.display().to_string(),
        None => "stdin".to_owned(),
    };
    let unreadable = |e: std::io::Error| ClientError::Usage(format!("cannot read {source}: {e}"));
    // Read at most a little past the limit: a huge file is refused unread.
    let limit = (MAX + 4096) as u64;
    let mut bytes = Zeroizing::new(Vec::new());
    match file {
        Some(path) => {
            std::fs::File::open(path)
                .and_then(|f| f.take(limit).read_to_end(&mut bytes))
                .map_err(unreadable)?;
        }
        None if std::io::stdin().is_terminal() => {
            let typed = Zeroizing::new(
                rpassword::prompt_password("PAT to look up (not echoed): ").map_err(unreadable)?,
            );
            bytes.extend_from_slice(typed.as_bytes());
        }
        None => {
            std::io::stdin()
                .lock()
                .take(limit)
                .read_to_end(&mut bytes)
                .map_err(unreadable)?;
        }
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ClientError::Usage(format!("{source} does not hold UTF-8 text")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ClientError::Usage(format!(
            "no token in {source} (the token is read from stdin or --token-file, never from an argument)"
        )));
    }
    if token.len() > MAX {
        return Err(ClientError::Usage(format!(
            "the token in {source} is longer than {MAX} bytes"
        )));
    }
    Ok(SecretString::from(token.to_owned()))
}

/// The warning `force-revoke` prints: the PAT was not revoked upstream and
/// stays valid until its validTo.
fn left_live_warning(lease: &pb::Lease) -> String {
    let until = lease
        .pat_expire_time
        .as_ref()
        .map(|t| rfc3339(t, SecondsFormat::Secs))
        .unwrap_or_else(|| "its validTo (unknown)".into());
    let pat = if lease.authorization_id.is_empty() {
        "its PAT".to_owned()
    } else {
        format!("its PAT (authorizationId {})", lease.authorization_id)
    };
    format!(
        "WARNING: {} is closed ({}), but {pat} was NOT revoked upstream: \
         it stays valid in Azure DevOps until {until} (the orphan sweep still \
         tries to revoke it once per leases.sweep_interval). Revoke it there by \
         hand if it must stop working sooner.",
        lease.name,
        lease.state().as_str_name()
    )
}

/// `list-failed` as a table, one REVOKE_FAILED lease a row; the last error
/// (free text) last.
fn failed_text(leases: &[pb::Lease]) -> String {
    if leases.is_empty() {
        return "no REVOKE_FAILED leases".to_owned();
    }
    let columns = [
        NAME_COLUMN,
        Column::left("HOLDER", 24, |l| l.holder.clone()),
        ORGANIZATION_COLUMN,
        Column::left("AUTHORIZATION_ID", 36, |l| l.authorization_id.clone()),
        Column::right("ATTEMPTS", 8, |l| l.revocation_attempts.to_string()),
        Column::left("NEXT_ATTEMPT_TIME", 20, |l| {
            secs_or_dash(&l.next_attempt_time)
        }),
        Column::left("REVOKE_TIME", 20, |l| secs_or_dash(&l.revoke_time)),
        Column::left("PAT_EXPIRE_TIME", 20, |l| secs_or_dash(&l.pat_expire_time)),
        Column::last("LAST_ERROR", |l| l.last_error.clone()),
    ];
    let mut out = table(&columns, leases);
    out.push_str(&format!(
        "\n{} REVOKE_FAILED lease(s); their PATs may be live upstream. \
         `token-broker admin force-revoke NAME` closes one and stops its retries (the orphan sweep still tries).",
        leases.len()
    ));
    out
}

/// `t` to the second, or `-` when not set.
fn secs_or_dash(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .map(|t| rfc3339(t, SecondsFormat::Secs))
        .unwrap_or_else(|| "-".into())
}

/// The proto3 JSON mapping of a `RevokeLeasesResponse` (int64 as strings,
/// default values omitted).
pub fn revoke_json(r: &pb::RevokeLeasesResponse) -> Value {
    let mut m = Map::new();
    for (k, v) in [
        ("matchedCount", r.matched_count),
        ("revokedCount", r.revoked_count),
        ("revokingCount", r.revoking_count),
        ("pendingCount", r.pending_count),
        ("failedCount", r.failed_count),
    ] {
        if v != 0 {
            m.insert(k.into(), json!(v.to_string()));
        }
    }
    if !r.not_found_names.is_empty() {
        m.insert("notFoundNames".into(), json!(r.not_found_names));
    }
    Value::Object(m)
}

fn revoke_text(r: &pb::RevokeLeasesResponse) -> String {
    let mut out = format!(
        "matched   {}\nrevoked   {}\nrevoking  {}\npending   {}\nfailed    {}",
        r.matched_count, r.revoked_count, r.revoking_count, r.pending_count, r.failed_count
    );
    for name in &r.not_found_names {
        out.push_str(&format!("\nnot found {name}"));
    }
    if r.pending_count > 0 || r.failed_count > 0 {
        out.push_str("\nsome leases were not revoked yet: run the same command again");
    }
    out
}

/// The proto3 JSON mapping of every version listed (never a token).
/// Whether `v` may still hold a working token after a rotation with
/// `--revoke-previous now` (its revocation not confirmed).
fn still_valid_after_now(v: &pb::CredentialVersion) -> bool {
    use pb::credential_version::State;
    matches!(v.state(), State::Previous | State::Revoking)
}

fn credentials_json(all: &pb::ListCredentialsResponse) -> Value {
    let versions = all
        .versions
        .iter()
        .map(|v| {
            version_json(&pb::CredentialVersion {
                token: String::new(),
                ..v.clone()
            })
        })
        .collect();
    super::grpc::page_json("versions", versions, "")
}

/// Every credential's versions, one a row (never a token).
fn credentials_text(all: &pb::ListCredentialsResponse) -> String {
    if all.versions.is_empty() {
        return "no managed credential versions".to_owned();
    }
    let columns: [Column<pb::CredentialVersion>; 9] = [
        Column::left("CREDENTIAL", 30, |v| {
            v.credential
                .strip_prefix("credentials/")
                .unwrap_or(&v.credential)
                .to_owned()
        }),
        Column::right("VERSION", 7, |v| v.version.to_string()),
        Column::left("STATE", 8, |v| v.state().as_str_name().to_owned()),
        Column::left("VALID_FROM", 20, |v| secs_or_dash(&v.valid_from)),
        Column::left("ROTATE_TIME", 20, |v| secs_or_dash(&v.rotate_time)),
        Column::left("EXPIRE_TIME", 20, |v| secs_or_dash(&v.expire_time)),
        Column::left("REVOKE_TIME", 20, |v| secs_or_dash(&v.revoke_time)),
        Column::left("AUTHORIZATION_ID", 36, |v| {
            dash_if_empty(&v.authorization_id)
        }),
        Column::last("LAST_ERROR", |v| dash_if_empty(&v.last_error)),
    ];
    table(&columns, &all.versions)
}

/// `s`, or `-` when empty (a table cell).
fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// Every holder's leases, one a row.
fn list_text(page: &pb::ListLeasesResponse) -> String {
    let columns = [
        NAME_COLUMN,
        STATE_COLUMN,
        Column::left("HOLDER", 30, |l| l.holder.clone()),
        ORGANIZATION_COLUMN,
        SCOPES_COLUMN,
    ];
    page_text(&columns, &page.leases, &page.next_page_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed_lease() -> pb::Lease {
        pb::Lease {
            name: "leases/0b9c7c1e-4a8e-4b71-9a43-1f0c3c7d9e10".into(),
            holder: "apikey:ci".into(),
            organization: "fabrikam".into(),
            state: pb::lease::State::Revoked as i32,
            authorization_id: "8d5c2a0e-1f3b-4c6d-9e7f-0a1b2c3d4e5f".into(),
            revocation_attempts: 10,
            last_error: "upstream revoke failed: 503".into(),
            pat_expire_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_force_revoke_warning_names_the_pat_and_its_valid_to() {
        let w = left_live_warning(&failed_lease());
        assert!(w.starts_with("WARNING: leases/0b9c7c1e"), "{w}");
        assert!(
            w.contains("8d5c2a0e-1f3b-4c6d-9e7f-0a1b2c3d4e5f")
                && w.contains("NOT revoked upstream")
                && w.contains("until 2023-11-14T22:13:20Z"),
            "{w}"
        );
    }

    #[test]
    fn list_failed_prints_attempts_and_the_last_error_and_json_keeps_them() {
        let text = failed_text(&[failed_lease()]);
        let row = text.lines().nth(1).unwrap();
        assert!(
            row.contains("apikey:ci") && row.contains(" 10 ") && row.ends_with("failed: 503"),
            "{row}"
        );
        assert_eq!(failed_text(&[]), "no REVOKE_FAILED leases");
        let v = lease_json(&failed_lease());
        assert_eq!(v["revocationAttempts"], 10);
        assert_eq!(v["lastError"], "upstream revoke failed: 503");
        assert_eq!(v["patExpireTime"], "2023-11-14T22:13:20Z");
        assert!(v.get("nextAttemptTime").is_none());
    }

    #[test]
    fn revoke_counts_print_as_proto3_json() {
        let v = revoke_json(&pb::RevokeLeasesResponse {
            matched_count: 25,
            revoked_count: 25,
            ..Default::default()
        });
        assert_eq!(v["matchedCount"], "25");
        assert_eq!(v["revokedCount"], "25");
        assert!(v.get("pendingCount").is_none());
    }
}
