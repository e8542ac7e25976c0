//! token-broker: leases short-lived, least-scope Azure DevOps personal access
//! tokens (PATs) to internal services over gRPC.
//!
//! Module map (docs/architecture.md has the whole picture): `api` (tonic
//! edge) -> `auth` + `policy` -> `leases` (business rules) -> `store`
//! (PostgreSQL, SQLite) and `upstream` (PAT Lifecycle API client).
//! `crypto`, `audit`, `telemetry`, `config`, `domain` and `error` are
//! leaves; `settings` checks and builds the configuration once. `server`
//! wires it all together into a running broker (with `admin_http`, the
//! admin port); `cli` parses arguments and calls in. `emulator` is a
//! separate axum app the broker only reaches over HTTP.

pub mod admin_http;
pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod credential_access;
pub mod credentials;
pub mod crypto;
pub mod domain;
mod duration;
pub mod emulator;
pub mod error;
pub mod keycheck;
pub mod leases;
pub mod policy;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod upstream;

/// Generated protobuf and gRPC code for `proto/tokenbroker/v1`.
pub mod proto {
    /// `tokenbroker.v1`.
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        tonic::include_proto!("tokenbroker.v1");

        /// Encoded `FileDescriptorSet` of every tokenbroker proto, for
        /// gRPC server reflection.
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            include_bytes!(concat!(env!("OUT_DIR"), "/tokenbroker_descriptor.bin"));

        /// What Debug shows for a token: empty, or `[REDACTED]`.
        fn redacted(token: &str) -> &'static str {
            if token.is_empty() {
                ""
            } else {
                "[REDACTED]"
            }
        }

        // Written by hand so the token never reaches a log.
        impl std::fmt::Debug for Lease {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("Lease")
                    .field("name", &self.name)
                    .field("organization", &self.organization)
                    .field("scopes", &self.scopes)
                    .field("holder", &self.holder)
                    .field("state", &self.state())
                    .field("create_time", &self.create_time)
                    .field("expire_time", &self.expire_time)
                    .field("max_expire_time", &self.max_expire_time)
                    .field("revoke_time", &self.revoke_time)
                    .field("renewable", &self.renewable)
                    .field("display_name", &self.display_name)
                    .field("authorization_id", &self.authorization_id)
                    .field("token", &redacted(&self.token))
                    .finish()
            }
        }

        // Written by hand so the token never reaches a log.
        impl std::fmt::Debug for CredentialVersion {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("CredentialVersion")
                    .field("name", &self.name)
                    .field("credential", &self.credential)
                    .field("version", &self.version)
                    .field("state", &self.state())
                    .field("organization", &self.organization)
                    .field("scopes", &self.scopes)
                    .field("valid_from", &self.valid_from)
                    .field("rotate_time", &self.rotate_time)
                    .field("expire_time", &self.expire_time)
                    .field("revoke_time", &self.revoke_time)
                    .field("authorization_id", &self.authorization_id)
                    .field("last_error", &self.last_error)
                    .field("token", &redacted(&self.token))
                    .finish()
            }
        }

        // Written by hand so the token looked up never reaches a log.
        impl std::fmt::Debug for LookupTokenRequest {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("LookupTokenRequest")
                    .field("token", &"[REDACTED]")
                    .finish()
            }
        }
    }
}
