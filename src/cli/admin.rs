//! `token-broker admin ...`: a gRPC client of `AdminService` (bulk revoke,
//! leases across holders). Same `--addr`, `--api-key`, `--output` as
//! `lease`; the API key must belong to an identity the policy names as an
//! admin.

use clap::Subcommand;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Map, Value};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Request;

use super::client::{list_json, ClientArgs, ClientError, Output};
use crate::proto::v1 as pb;
use crate::proto::v1::admin_service_client::AdminServiceClient;

/// `token-broker admin ...`.
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Revoke every live lease matching all the given criteria, upstream
    /// (incident response). At least one criterion is required.
    Revoke {
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
        /// Leases per page (default 50).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        /// `next_page_token` of a previous page.
        #[arg(long, default_value = "")]
        page_token: String,
    },
}

/// A connected `AdminService` client for `addr`.
pub async fn connect(addr: &str) -> Result<AdminServiceClient<Channel>, ClientError> {
    Ok(AdminServiceClient::new(super::client::channel(addr).await?))
}

/// `msg` with `authorization: Bearer <key>` when a non-empty key is given.
pub fn request<T>(msg: T, args: &ClientArgs) -> Result<Request<T>, ClientError> {
    let mut req = Request::new(msg);
    if let Some(key) = args
        .api_key
        .as_ref()
        .filter(|k| !k.expose_secret().is_empty())
    {
        req.metadata_mut().insert("authorization", bearer(key)?);
    }
    Ok(req)
}

fn bearer(key: &SecretString) -> Result<MetadataValue<tonic::metadata::Ascii>, ClientError> {
    MetadataValue::try_from(format!("Bearer {}", key.expose_secret()))
        .map_err(|_| ClientError::Usage("the API key has characters a header cannot carry".into()))
}

fn lease_name(name: &str) -> String {
    if name.starts_with("leases/") {
        name.to_owned()
    } else {
        format!("leases/{name}")
    }
}

/// Runs one `admin` subcommand and returns what to print on stdout.
pub async fn run(args: &ClientArgs, command: AdminCommand) -> Result<String, ClientError> {
    match command {
        AdminCommand::Revoke {
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
            let mut client = connect(&args.addr).await?;
            let done = client
                .revoke_leases(request(req, args)?)
                .await
                .map_err(ClientError::Rpc)?
                .into_inner();
            Ok(match args.output {
                Output::Json => format!("{:#}", revoke_json(&done)),
                Output::Text => revoke_text(&done),
            })
        }
        AdminCommand::List {
            filter,
            page_size,
            page_token,
        } => {
            let mut client = connect(&args.addr).await?;
            let page = client
                .list_leases(request(
                    pb::AdminListLeasesRequest {
                        page_size,
                        page_token,
                        filter,
                    },
                    args,
                )?)
                .await
                .map_err(ClientError::Rpc)?
                .into_inner();
            Ok(match args.output {
                Output::Json => format!("{:#}", list_json(&page)),
                Output::Text => list_text(&page),
            })
        }
    }
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

fn list_text(page: &pb::ListLeasesResponse) -> String {
    let mut out = format!(
        "{:<44} {:<13} {:<30} {:<14} {}",
        "NAME", "STATE", "HOLDER", "ORGANIZATION", "SCOPES"
    );
    for l in &page.leases {
        out.push_str(&format!(
            "\n{:<44} {:<13} {:<30} {:<14} {}",
            l.name,
            l.state().as_str_name(),
            l.holder,
            l.organization,
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
