//! `token-broker lease ...`: a gRPC client of `LeaseService`. It talks to
//! the server only over gRPC; the token is printed only by `lease create`.

use std::time::Duration;

use chrono::SecondsFormat;
use clap::Subcommand;
use tonic::transport::Channel;

pub use super::grpc::ClientArgs;
use super::grpc::{
    answer, channel, lease_json, lease_name, lease_text, list_json, page_text, request, rfc3339,
    ClientError, ClientOutput, Column, Output, Paging, NAME_COLUMN, ORGANIZATION_COLUMN,
    SCOPES_COLUMN, STATE_COLUMN,
};
use crate::proto::v1 as pb;
use crate::proto::v1::lease_service_client::LeaseServiceClient;

/// `token-broker lease ...`.
#[derive(Subcommand, Debug)]
pub enum LeaseCommand {
    /// Lease a PAT; prints the lease and its token (the only time it is
    /// shown); with `--output token`, the token alone.
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
        #[arg(value_parser = api_name)]
        name: String,
    },
    /// List your leases, newest first.
    List {
        /// e.g. `state = ACTIVE AND organization = "fabrikam"`.
        #[arg(long, default_value = "")]
        filter: String,
        #[command(flatten)]
        paging: Paging,
    },
    /// Extend a lease: new expiry = now + increment, capped at max_expire_time.
    Renew {
        /// `leases/{uuid}` or the bare uuid.
        #[arg(value_parser = api_name)]
        name: String,
        /// e.g. `30m` (default: the policy's default TTL).
        #[arg(long, value_parser = humantime::parse_duration)]
        increment: Option<Duration>,
    },
    /// Revoke a lease and its PAT.
    Revoke {
        /// `leases/{uuid}` or the bare uuid.
        #[arg(value_parser = api_name)]
        name: String,
    },
}

/// A lease name argument as the API takes it (see [`lease_name`]).
fn api_name(name: &str) -> Result<String, std::convert::Infallible> {
    Ok(lease_name(name))
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A connected client, as `args` say (see [`super::grpc::endpoint`]).
pub async fn connect(args: &ClientArgs) -> Result<LeaseServiceClient<Channel>, ClientError> {
    Ok(LeaseServiceClient::new(channel(args).await?))
}

/// Runs one `lease` subcommand and returns what to print on stdout:
/// `--output token` prints a created lease's token alone.
pub async fn run(args: &ClientArgs, command: LeaseCommand) -> Result<String, ClientError> {
    let token_only = args.output == ClientOutput::Token;
    let output = match command {
        LeaseCommand::Create { .. } if token_only => Output::Text,
        _ => args.output(command.name())?,
    };
    let mut client = connect(args).await?;
    let lease = match command {
        LeaseCommand::Create {
            organization,
            scopes,
            ttl,
            request_id,
        } => {
            let req = pb::CreateLeaseRequest {
                organization,
                scopes,
                ttl: ttl.map(proto_duration),
                request_id: request_id.unwrap_or_default(),
            };
            let lease = answer(client.create_lease(request(req, args)?).await)?;
            if token_only {
                // Never an empty line for `PAT=$(…)` to take as a token.
                if lease.token.is_empty() {
                    return Err(ClientError::NoToken {
                        state: lease.state().as_str_name().to_owned(),
                        name: lease.name,
                    });
                }
                return Ok(lease.token);
            }
            lease
        }
        LeaseCommand::Get { name } => {
            let req = pb::GetLeaseRequest { name };
            answer(client.get_lease(request(req, args)?).await)?
        }
        LeaseCommand::Renew { name, increment } => {
            let increment = increment.map(proto_duration);
            let req = pb::RenewLeaseRequest { name, increment };
            answer(client.renew_lease(request(req, args)?).await)?
        }
        LeaseCommand::Revoke { name } => {
            let req = pb::RevokeLeaseRequest { name };
            answer(client.revoke_lease(request(req, args)?).await)?
        }
        LeaseCommand::List { filter, paging } => {
            let req = pb::ListLeasesRequest {
                page_size: paging.page_size,
                page_token: paging.page_token,
                filter,
            };
            let page = answer(client.list_leases(request(req, args)?).await)?;
            return Ok(output.show(&page, list_json, list_text));
        }
    };
    Ok(output.show(&lease, lease_json, lease_text))
}

impl LeaseCommand {
    /// `lease SUBCOMMAND`, for messages.
    fn name(&self) -> &'static str {
        match self {
            LeaseCommand::Create { .. } => "lease create",
            LeaseCommand::Get { .. } => "lease get",
            LeaseCommand::List { .. } => "lease list",
            LeaseCommand::Renew { .. } => "lease renew",
            LeaseCommand::Revoke { .. } => "lease revoke",
        }
    }
}

/// Your leases, one a row.
fn list_text(page: &pb::ListLeasesResponse) -> String {
    let expire_time = Column::left("EXPIRE_TIME", 21, |l: &pb::Lease| {
        l.expire_time
            .as_ref()
            .map(|t| rfc3339(t, SecondsFormat::Secs))
            .unwrap_or_default()
    });
    let columns = [
        NAME_COLUMN,
        STATE_COLUMN,
        ORGANIZATION_COLUMN,
        expire_time,
        SCOPES_COLUMN,
    ];
    page_text(&columns, &page.leases, &page.next_page_token)
}
