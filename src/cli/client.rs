//! `token-broker lease ...`: a gRPC client of `LeaseService`. It talks to
//! the server only over gRPC; the token is printed only by `lease create`.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat};
use clap::{Args, Subcommand, ValueEnum};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Map, Value};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;

use crate::proto::v1 as pb;
use crate::proto::v1::lease_service_client::LeaseServiceClient;

/// Where the server is and who we are.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// gRPC address of the broker: a URL (`http://…`, `https://…`), or
    /// `HOST:PORT`, taken as `http://HOST:PORT`.
    #[arg(
        long,
        env = "TOKEN_BROKER_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub addr: String,
    /// API key (`tbk_…`), sent as `authorization: Bearer`.
    #[arg(
        long,
        env = "TOKEN_BROKER_API_KEY",
        hide_env_values = true,
        global = true
    )]
    pub api_key: Option<SecretString>,
    /// Output format: text, or the proto3 JSON mapping.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
}

/// Output format of client commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One lease as aligned `field   value` lines; `list` as a table.
    Text,
    /// proto3 JSON mapping: lowerCamelCase names, RFC 3339 timestamps,
    /// enum names; default values omitted.
    Json,
}

/// `token-broker lease ...`.
#[derive(Subcommand, Debug)]
pub enum LeaseCommand {
    /// Lease a PAT; prints the lease and its token (the only time it is shown).
    Create {
        /// Azure DevOps organization, e.g. `fabrikam`.
        #[arg(long = "organization", visible_alias = "org")]
        organization: String,
        /// Scope to grant; repeat or comma-separate (`--scope vso.code,vso.packaging`).
        #[arg(long = "scope", required = true, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Lease lifetime, e.g. `15m`, `1h` (default: the policy's).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Idempotency key (UUID): a retry with it returns the same lease.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Show one lease (never its token).
    Get {
        /// `leases/{uuid}` or the bare uuid.
        name: String,
    },
    /// List your leases, newest first.
    List {
        /// e.g. `state = ACTIVE AND organization = "fabrikam"`.
        #[arg(long, default_value = "")]
        filter: String,
        /// Leases per page (default 50).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        /// `next_page_token` of a previous page.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Extend a lease: new expiry = now + increment, capped at max_expire_time.
    Renew {
        /// `leases/{uuid}` or the bare uuid.
        name: String,
        /// e.g. `30m` (default: the policy's default TTL).
        #[arg(long, value_parser = humantime::parse_duration)]
        increment: Option<Duration>,
    },
    /// Revoke a lease and its PAT.
    Revoke {
        /// `leases/{uuid}` or the bare uuid.
        name: String,
    },
}

/// A failed client command, printed as `error: …`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad `--addr`, or the server cannot be reached.
    #[error("cannot reach the broker at {addr}: {message}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        message: String,
    },
    /// Bad local input.
    #[error("{0}")]
    Usage(String),
    /// The server answered with an error.
    #[error("{}", describe(.0))]
    Rpc(Status),
}

/// `CODE: message [reason REASON] [field F] [retry after Ns]`.
fn describe(status: &Status) -> String {
    let mut out = format!("{:?}: {}", status.code(), status.message());
    let details = status.get_error_details();
    if let Some(info) = details.error_info() {
        out.push_str(&format!(" [reason {}]", info.reason));
    }
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            out.push_str(&format!(" [field {}]", v.field));
        }
    }
    if let Some(delay) = details.retry_info().and_then(|r| r.retry_delay) {
        out.push_str(&format!(
            " [retry after {}]",
            humantime::format_duration(delay)
        ));
    }
    if status.code() == Code::Unauthenticated {
        out.push_str(" (set --api-key or TOKEN_BROKER_API_KEY)");
    }
    out
}

fn lease_name(name: &str) -> String {
    if name.starts_with("leases/") {
        name.to_owned()
    } else {
        format!("leases/{name}")
    }
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// `addr` as a URL: `HOST:PORT` without a scheme gets `http://`.
pub fn endpoint_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// A connected client. `addr` as [`endpoint_url`] takes it.
pub async fn connect(addr: &str) -> Result<LeaseServiceClient<Channel>, ClientError> {
    Ok(LeaseServiceClient::new(channel(addr).await?))
}

/// A channel to the broker at `addr` (as [`endpoint_url`] takes it), shared
/// by every client command.
pub async fn channel(addr: &str) -> Result<Channel, ClientError> {
    let url = endpoint_url(addr);
    let err = |message: String| ClientError::Connect {
        addr: url.clone(),
        message,
    };
    Endpoint::from_shared(url.clone())
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| err(e.to_string()))
}

fn request<T>(msg: T, api_key: Option<&SecretString>) -> Result<Request<T>, ClientError> {
    let mut req = Request::new(msg);
    if let Some(key) = api_key {
        let value =
            MetadataValue::try_from(format!("Bearer {}", key.expose_secret())).map_err(|_| {
                ClientError::Usage("the API key has characters a header cannot carry".into())
            })?;
        req.metadata_mut().insert("authorization", value);
    }
    Ok(req)
}

/// Runs one `lease` subcommand and returns what to print on stdout.
pub async fn run(args: &ClientArgs, command: LeaseCommand) -> Result<String, ClientError> {
    // An empty variable means "no key", not an empty credential.
    let api_key = args
        .api_key
        .clone()
        .filter(|k| !k.expose_secret().is_empty());
    let key = api_key.as_ref();
    let mut client = connect(&args.addr).await?;
    let lease = match command {
        LeaseCommand::Create {
            organization,
            scopes,
            ttl,
            request_id,
        } => client
            .create_lease(request(
                pb::CreateLeaseRequest {
                    organization,
                    scopes,
                    ttl: ttl.map(proto_duration),
                    request_id: request_id.unwrap_or_default(),
                },
                key,
            )?)
            .await
            .map_err(ClientError::Rpc)?
            .into_inner(),
        LeaseCommand::Get { name } => client
            .get_lease(request(
                pb::GetLeaseRequest {
                    name: lease_name(&name),
                },
                key,
            )?)
            .await
            .map_err(ClientError::Rpc)?
            .into_inner(),
        LeaseCommand::Renew { name, increment } => client
            .renew_lease(request(
                pb::RenewLeaseRequest {
                    name: lease_name(&name),
                    increment: increment.map(proto_duration),
                },
                key,
            )?)
            .await
            .map_err(ClientError::Rpc)?
            .into_inner(),
        LeaseCommand::Revoke { name } => client
            .revoke_lease(request(
                pb::RevokeLeaseRequest {
                    name: lease_name(&name),
                },
                key,
            )?)
            .await
            .map_err(ClientError::Rpc)?
            .into_inner(),
        LeaseCommand::List {
            filter,
            page_size,
            page_token,
        } => {
            let page = client
                .list_leases(request(
                    pb::ListLeasesRequest {
                        page_size,
                        page_token,
                        filter,
                    },
                    key,
                )?)
                .await
                .map_err(ClientError::Rpc)?
                .into_inner();
            return Ok(match args.output {
                Output::Json => format!("{:#}", list_json(&page)),
                Output::Text => list_text(&page),
            });
        }
    };
    Ok(match args.output {
        Output::Json => format!("{:#}", lease_json(&lease)),
        Output::Text => lease_text(&lease),
    })
}

fn rfc3339(t: &prost_types::Timestamp) -> String {
    rfc3339_as(t, SecondsFormat::AutoSi)
}

/// `t` in RFC 3339 (UTC, `Z`) with `format`'s fractional digits.
pub(super) fn rfc3339_as(t: &prost_types::Timestamp, format: SecondsFormat) -> String {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .map(|d| d.to_rfc3339_opts(format, true))
        .unwrap_or_default()
}

fn state_name(lease: &pb::Lease) -> &'static str {
    lease.state().as_str_name()
}

/// The proto3 JSON mapping of a `Lease` (default values omitted).
pub fn lease_json(lease: &pb::Lease) -> Value {
    let mut m = Map::new();
    let mut put_str = |k: &str, v: &str| {
        if !v.is_empty() {
            m.insert(k.into(), json!(v));
        }
    };
    put_str("name", &lease.name);
    put_str("organization", &lease.organization);
    put_str("holder", &lease.holder);
    put_str("displayName", &lease.display_name);
    put_str("authorizationId", &lease.authorization_id);
    put_str("token", &lease.token);
    if !lease.scopes.is_empty() {
        m.insert("scopes".into(), json!(lease.scopes));
    }
    if lease.state != 0 {
        m.insert("state".into(), json!(state_name(lease)));
    }
    for (k, t) in [
        ("createTime", &lease.create_time),
        ("expireTime", &lease.expire_time),
        ("maxExpireTime", &lease.max_expire_time),
        ("revokeTime", &lease.revoke_time),
        ("nextAttemptTime", &lease.next_attempt_time),
        ("patExpireTime", &lease.pat_expire_time),
    ] {
        if let Some(t) = t {
            m.insert(k.into(), json!(rfc3339(t)));
        }
    }
    if lease.renewable {
        m.insert("renewable".into(), json!(true));
    }
    if lease.revocation_attempts != 0 {
        m.insert(
            "revocationAttempts".into(),
            json!(lease.revocation_attempts),
        );
    }
    if !lease.last_error.is_empty() {
        m.insert("lastError".into(), json!(lease.last_error));
    }
    Value::Object(m)
}

/// The proto3 JSON mapping of a `ListLeasesResponse`.
pub fn list_json(page: &pb::ListLeasesResponse) -> Value {
    let mut m = Map::new();
    if !page.leases.is_empty() {
        m.insert(
            "leases".into(),
            Value::Array(page.leases.iter().map(lease_json).collect()),
        );
    }
    if !page.next_page_token.is_empty() {
        m.insert("nextPageToken".into(), json!(page.next_page_token));
    }
    Value::Object(m)
}

/// One lease as aligned `field   value` lines (the admin view's fields
/// when set).
pub(super) fn lease_text(lease: &pb::Lease) -> String {
    let ts = |t: &Option<prost_types::Timestamp>| t.as_ref().map(rfc3339).unwrap_or_default();
    let mut rows = vec![
        ("name", lease.name.clone()),
        ("state", state_name(lease).to_owned()),
        ("organization", lease.organization.clone()),
        ("scopes", lease.scopes.join(" ")),
        ("holder", lease.holder.clone()),
        ("create_time", ts(&lease.create_time)),
        ("expire_time", ts(&lease.expire_time)),
        ("max_expire_time", ts(&lease.max_expire_time)),
    ];
    if lease.revoke_time.is_some() {
        rows.push(("revoke_time", ts(&lease.revoke_time)));
    }
    rows.push(("renewable", lease.renewable.to_string()));
    rows.push(("display_name", lease.display_name.clone()));
    rows.push(("authorization_id", lease.authorization_id.clone()));
    if lease.pat_expire_time.is_some() {
        rows.push(("pat_expire_time", ts(&lease.pat_expire_time)));
    }
    if lease.revocation_attempts != 0 {
        rows.push(("revocation_attempts", lease.revocation_attempts.to_string()));
    }
    if lease.next_attempt_time.is_some() {
        rows.push(("next_attempt_time", ts(&lease.next_attempt_time)));
    }
    if !lease.last_error.is_empty() {
        rows.push(("last_error", lease.last_error.clone()));
    }
    if !lease.token.is_empty() {
        rows.push(("token", lease.token.clone()));
    }
    rows.iter()
        .map(|(k, v)| format!("{k:<19} {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn list_text(page: &pb::ListLeasesResponse) -> String {
    let mut out = format!(
        "{:<44} {:<13} {:<14} {:<21} {}",
        "NAME", "STATE", "ORGANIZATION", "EXPIRE_TIME", "SCOPES"
    );
    for l in &page.leases {
        out.push_str(&format!(
            "\n{:<44} {:<13} {:<14} {:<21} {}",
            l.name,
            state_name(l),
            l.organization,
            l.expire_time
                .as_ref()
                .map(|t| rfc3339_as(t, SecondsFormat::Secs))
                .unwrap_or_default(),
            l.scopes.join(" ")
        ));
    }
    if !page.next_page_token.is_empty() {
        out.push_str(&format!(
            "\nnext page: --page-token {}",
            page.next_page_token
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_follows_the_proto3_json_mapping() {
        let lease = pb::Lease {
            name: "leases/0b9c7c1e-4a8e-4b71-9a43-1f0c3c7d9e10".into(),
            organization: "fabrikam".into(),
            scopes: vec!["vso.code".into()],
            holder: "apikey:dev".into(),
            state: pb::lease::State::RevokeFailed as i32,
            create_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            display_name: "token-broker:d:l".into(),
            ..Default::default()
        };
        let v = lease_json(&lease);
        assert_eq!(v["state"], "REVOKE_FAILED");
        assert_eq!(v["createTime"], "2023-11-14T22:13:20Z");
        assert_eq!(v["displayName"], "token-broker:d:l");
        assert!(v.get("token").is_none(), "empty fields are omitted");
        assert!(v.get("renewable").is_none());
        assert!(v.get("revokeTime").is_none());
        let page = pb::ListLeasesResponse {
            leases: vec![lease],
            next_page_token: "abc".into(),
        };
        assert_eq!(list_json(&page)["nextPageToken"], "abc");
    }

    #[test]
    fn an_address_without_a_scheme_is_taken_as_plain_http() {
        assert_eq!(endpoint_url("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(endpoint_url("localhost:1"), "http://localhost:1");
        assert_eq!(endpoint_url("https://b:443"), "https://b:443");
        assert_eq!(endpoint_url("http://b:80"), "http://b:80");
    }

    #[test]
    fn a_bare_uuid_is_taken_as_a_lease_name() {
        assert_eq!(lease_name("x"), "leases/x");
        assert_eq!(lease_name("leases/x"), "leases/x");
    }
}
