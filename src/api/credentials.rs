//! `tokenbroker.v1.CredentialService` (GetCredential, WatchCredential) and
//! the credential calls of `AdminService` (RotateCredential,
//! ListCredentials): validates requests, calls [`CredentialAccess`] (which
//! holds the reader and admin rules and the audit), converts answers.
//!
//! A watch stream proves its caller again before each version it sends
//! ([`super::Reauthenticate`]: an expired service-account token or a
//! removed API key ends it UNAUTHENTICATED) and asks the reader rule again
//! (a caller no longer a reader ends it PERMISSION_DENIED), also at each
//! policy reload, without waiting for a version. Keepalive: the server's
//! HTTP/2 PINGs (`grpc.keepalive_interval`, [`super::transport`]) go to
//! every connection silent that long, whatever calls are open on it, so an
//! idle stream's connection keeps carrying traffic; and an open stream
//! keeps its connection out of `grpc.idle_timeout`.

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use secrecy::ExposeSecret as _;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::convert::{self, at_most, timestamp};
use super::service::{caller_and_message, Reply};
use super::status::{to_status, InvalidField};
use super::Reauthenticate;
use crate::auth::{AuthError, Caller};
use crate::credential_access::{AccessError, CredentialAccess};
use crate::credentials::{CredentialVersion, RevokePrevious, VersionState, VersionStream};
use crate::policy::MAX_CREDENTIAL_NAME_LEN;
use crate::proto::v1 as pb;
use crate::proto::v1::credential_service_server::CredentialService;

/// Full name of the credential service, as health checks and reflection
/// list it.
pub const CREDENTIAL_SERVICE_NAME: &str = "tokenbroker.v1.CredentialService";

/// Prefix of a credential's resource name.
const NAME_PREFIX: &str = "credentials/";

/// The tonic implementation of `CredentialService`.
pub struct CredentialApi {
    access: CredentialAccess,
    stopping: watch::Receiver<bool>,
}

impl CredentialApi {
    /// Serves the reads of `access`; open watch streams end when
    /// `stopping` turns true (the server is shutting down).
    pub fn new(access: CredentialAccess, stopping: watch::Receiver<bool>) -> Self {
        CredentialApi { access, stopping }
    }
}

/// A watch stream ended because the server is shutting down: UNAVAILABLE
/// (`SERVER_SHUTTING_DOWN`), reconnect (to another replica) with
/// `after_version`. Ending the streams lets the shutdown finish at once
/// instead of waiting out its grace period on calls that never end.
#[derive(Debug, thiserror::Error)]
#[error("the server is shutting down; reconnect with after_version")]
pub struct ShuttingDown;

impl crate::error::ServiceError for ShuttingDown {
    fn code(&self) -> crate::error::ErrorCode {
        crate::error::ErrorCode::Unavailable
    }
    fn reason(&self) -> &'static str {
        "SERVER_SHUTTING_DOWN"
    }
    fn retry_after(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(1))
    }
}

impl From<AccessError> for Status {
    fn from(e: AccessError) -> Status {
        to_status(&e)
    }
}

/// The versions a WatchCredential call streams.
pub type VersionsStream = Pin<Box<dyn Stream<Item = Result<pb::CredentialVersion, Status>> + Send>>;

#[tonic::async_trait]
impl CredentialService for CredentialApi {
    async fn get_credential(
        &self,
        request: Request<pb::GetCredentialRequest>,
    ) -> Reply<pb::CredentialVersion> {
        let (caller, req) = caller_and_message(request)?;
        let name = credential_name("name", &req.name)?;
        let token = self.access.get(&caller, &name).await?;
        Ok(Response::new(version(
            &token.version,
            Some(token.token.expose_secret()),
        )))
    }

    type WatchCredentialStream = VersionsStream;

    async fn watch_credential(
        &self,
        request: Request<pb::WatchCredentialRequest>,
    ) -> Reply<Self::WatchCredentialStream> {
        let again = request.extensions().get::<Reauthenticate>().cloned();
        let (caller, req) = caller_and_message(request)?;
        let (name, after_version) = watch_request(req)?;
        let again = again.ok_or_else(|| to_status(&AuthError::Missing))?;
        // Subscribed before the first check, so no reload slips between.
        let reloads = self.access.policy_reloads();
        let versions = self.access.watch(&caller, &name, after_version).await?;
        let watch = Watch {
            access: self.access.clone(),
            caller,
            again,
            name,
            versions,
            reloads: Some(reloads),
            stopping: self.stopping.clone(),
            done: false,
        };
        // The stream keeps the call's span: its log lines name the call.
        let span = tracing::Span::current();
        let stream = futures::stream::unfold(watch, move |w| w.next().instrument(span.clone()));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// One WatchCredential stream's state.
struct Watch {
    access: CredentialAccess,
    /// The caller as authenticated at the start.
    caller: Caller,
    again: Reauthenticate,
    name: String,
    versions: VersionStream,
    /// None once the policy's reload channel has closed.
    reloads: Option<tokio::sync::broadcast::Receiver<crate::policy::ReloadOutcome>>,
    /// True once the server is shutting down.
    stopping: watch::Receiver<bool>,
    done: bool,
}

impl Watch {
    /// The next message: a version, or the status that ends the stream.
    async fn next(mut self) -> Option<(Result<pb::CredentialVersion, Status>, Watch)> {
        if self.done {
            return None;
        }
        loop {
            let reload = async {
                match self.reloads.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            };
            let mut stopping = self.stopping.clone();
            let stopped = async move {
                // Err (the sender gone) also means the server is going away.
                let _ = stopping.wait_for(|s| *s).await;
            };
            tokio::select! {
                () = stopped => {
                    self.done = true;
                    return Some((Err(to_status(&ShuttingDown)), self));
                }
                item = self.versions.next() => {
                    let item = match item {
                        // The credential service's streams end only after
                        // an error item; end quietly if one ever does not.
                        None => return None,
                        Some(Err(e)) => Err(to_status(&AccessError::from(e))),
                        Some(Ok(token)) => match self.admit(&token).await {
                            Ok(()) => {
                                return Some((
                                    Ok(version(&token.version, Some(token.token.expose_secret()))),
                                    self,
                                ))
                            }
                            Err(status) => Err(status),
                        },
                    };
                    self.done = true;
                    return Some((item, self));
                }
                outcome = reload => {
                    match outcome {
                        Ok(o) if !o.is_applied() => continue,
                        // Applied, or several missed: ask again.
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => {
                            self.reloads = None;
                            continue;
                        }
                    }
                    if let Err(e) = self.access.still_reader(&self.caller, &self.name).await {
                        self.done = true;
                        return Some((Err(to_status(&e)), self));
                    }
                }
            }
        }
    }

    /// The caller proves itself again, is still a reader, and the version
    /// is audited: then it may be sent.
    async fn admit(&mut self, token: &crate::credentials::CredentialToken) -> Result<(), Status> {
        let caller = self.again.caller().await.map_err(|e| {
            tracing::info!(
                identity = %self.caller.identity,
                credential = %self.name,
                reason = crate::error::ServiceError::reason(&e),
                "watch stream ended: its caller no longer authenticates"
            );
            to_status(&e)
        })?;
        self.caller = caller;
        self.access.admit_watched(&self.caller, token).await?;
        Ok(())
    }
}

/// Validates a resource name `credentials/{credential}` (field `field`);
/// returns the credential's name.
pub fn credential_name(field: &'static str, name: &str) -> Result<String, InvalidField> {
    at_most(
        field,
        "NAME_INVALID",
        name,
        NAME_PREFIX.len() + MAX_CREDENTIAL_NAME_LEN,
    )?;
    let bare = name.strip_prefix(NAME_PREFIX).unwrap_or("");
    if bare.is_empty()
        || !bare
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(InvalidField::new(
            field,
            "NAME_INVALID",
            format!("{name:?} is not a credential name; expected credentials/{{name}} with a name of a-z, 0-9 and '-'"),
        ));
    }
    Ok(bare.to_owned())
}

/// Validates a WatchCredential request: the name, and `after_version`
/// (None for 0).
pub fn watch_request(
    req: pb::WatchCredentialRequest,
) -> Result<(String, Option<i64>), InvalidField> {
    let name = credential_name("name", &req.name)?;
    if req.after_version < 0 {
        return Err(InvalidField::new(
            "after_version",
            "AFTER_VERSION_INVALID",
            format!(
                "is {}; give the last version received, or 0 for none",
                req.after_version
            ),
        ));
    }
    Ok((name, (req.after_version > 0).then_some(req.after_version)))
}

/// Validates a RotateCredential request.
pub fn rotate_request(
    req: pb::RotateCredentialRequest,
) -> Result<(String, RevokePrevious), InvalidField> {
    use pb::rotate_credential_request::RevokePrevious as P;
    let name = credential_name("name", &req.name)?;
    let revoke = match P::try_from(req.revoke_previous) {
        Ok(P::Unspecified | P::AfterOverlap) => RevokePrevious::AfterOverlap,
        Ok(P::Now) => RevokePrevious::Now,
        Err(_) => {
            return Err(InvalidField::new(
                "revoke_previous",
                "REVOKE_PREVIOUS_INVALID",
                format!(
                    "{} is not AFTER_OVERLAP (1) or NOW (2)",
                    req.revoke_previous
                ),
            ))
        }
    };
    Ok((name, revoke))
}

/// A ListCredentials page: the versions after `page_token`'s, at most
/// `page_size` (0: the default), and the next page's token. The token is
/// the last version's `credentials/{name}/versions/{n}` (not a secret: the
/// listing is an admin's, and forging one only skips versions).
pub fn list_page(
    mut versions: Vec<CredentialVersion>,
    page_size: i32,
    page_token: &str,
) -> Result<pb::ListCredentialsResponse, InvalidField> {
    let page_size = convert::page_size(page_size)? as usize;
    versions.sort_by(|a, b| {
        a.credential
            .cmp(&b.credential)
            .then(b.version.cmp(&a.version))
    });
    let start = if page_token.is_empty() {
        0
    } else {
        let (name, number) = page_cursor(page_token).ok_or_else(|| {
            InvalidField::new(
                "page_token",
                "INVALID_PAGE_TOKEN",
                "is not a next_page_token of ListCredentials",
            )
        })?;
        versions
            .iter()
            .position(|v| {
                v.credential.as_str() > name.as_str()
                    || (v.credential == name && v.version < number)
            })
            .unwrap_or(versions.len())
    };
    let rest = &versions[start..];
    let page = &rest[..rest.len().min(page_size)];
    let next_page_token = match page.last() {
        Some(last) if rest.len() > page.len() => version_name(last),
        _ => String::new(),
    };
    Ok(pb::ListCredentialsResponse {
        versions: page.iter().map(|v| version(v, None)).collect(),
        next_page_token,
    })
}

/// `(credential, version)` out of `credentials/{name}/versions/{n}`.
fn page_cursor(token: &str) -> Option<(String, i64)> {
    let rest = token.strip_prefix(NAME_PREFIX)?;
    let (name, number) = rest.split_once("/versions/")?;
    Some((name.to_owned(), number.parse().ok()?))
}

/// `credentials/{name}/versions/{n}`.
fn version_name(v: &CredentialVersion) -> String {
    format!("{NAME_PREFIX}{}/versions/{}", v.credential, v.version)
}

/// The proto state of a version.
pub fn version_state(s: VersionState) -> pb::credential_version::State {
    use pb::credential_version::State;
    match s {
        VersionState::Pending => State::Pending,
        VersionState::Current => State::Current,
        VersionState::Previous => State::Previous,
        VersionState::Revoking => State::Revoking,
        VersionState::Revoked => State::Revoked,
        VersionState::Failed => State::Failed,
    }
}

/// A version as the API shows it; `token` only in CredentialService
/// answers.
pub fn version(v: &CredentialVersion, token: Option<&str>) -> pb::CredentialVersion {
    pb::CredentialVersion {
        name: version_name(v),
        credential: format!("{NAME_PREFIX}{}", v.credential),
        version: v.version,
        state: version_state(v.state) as i32,
        organization: v.organization.clone(),
        scopes: v.scopes.clone(),
        valid_from: Some(timestamp(v.valid_from)),
        rotate_time: Some(timestamp(v.rotate_time)),
        expire_time: Some(timestamp(v.expire_time)),
        revoke_time: v.revoke_time.map(timestamp),
        authorization_id: v
            .authorization_id
            .map(|a| a.to_string())
            .unwrap_or_default(),
        // AdminService answers (no token) only: readers need not see it.
        last_error: match token {
            None => v.last_error.clone().unwrap_or_default(),
            Some(_) => String::new(),
        },
        token: token.unwrap_or_default().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Timestamp;

    #[test]
    fn credential_names_are_credentials_slash_a_policy_name() {
        assert_eq!(
            credential_name("name", "credentials/mirror-feed").unwrap(),
            "mirror-feed"
        );
        let long = format!("credentials/{}", "a".repeat(MAX_CREDENTIAL_NAME_LEN + 1));
        for bad in [
            "mirror-feed",
            "credentials/",
            "credentials/Mirror",
            "credentials/a/b",
            "leases/x",
            long.as_str(),
        ] {
            let e = credential_name("name", bad).unwrap_err();
            assert_eq!((e.field, e.reason), ("name", "NAME_INVALID"), "{bad}");
        }
    }

    #[test]
    fn a_watch_resumes_after_a_positive_version_and_refuses_a_negative_one() {
        let req = |after_version| pb::WatchCredentialRequest {
            name: "credentials/x".into(),
            after_version,
        };
        assert_eq!(watch_request(req(0)).unwrap(), ("x".into(), None));
        assert_eq!(watch_request(req(7)).unwrap(), ("x".into(), Some(7)));
        let e = watch_request(req(-1)).unwrap_err();
        assert_eq!(
            (e.field, e.reason),
            ("after_version", "AFTER_VERSION_INVALID")
        );
    }

    #[test]
    fn rotation_defaults_to_after_overlap() {
        let req = |revoke_previous| pb::RotateCredentialRequest {
            name: "credentials/x".into(),
            revoke_previous,
        };
        assert_eq!(
            rotate_request(req(0)).unwrap().1,
            RevokePrevious::AfterOverlap
        );
        assert_eq!(
            rotate_request(req(1)).unwrap().1,
            RevokePrevious::AfterOverlap
        );
        assert_eq!(rotate_request(req(2)).unwrap().1, RevokePrevious::Now);
        let e = rotate_request(req(9)).unwrap_err();
        assert_eq!(
            (e.field, e.reason),
            ("revoke_previous", "REVOKE_PREVIOUS_INVALID")
        );
    }

    fn v(credential: &str, version: i64) -> CredentialVersion {
        let t = Timestamp::now();
        CredentialVersion {
            credential: credential.into(),
            version,
            state: VersionState::Current,
            organization: "fabrikam".into(),
            scopes: vec!["vso.packaging".into()],
            authorization_id: None,
            valid_from: t,
            rotate_time: t,
            expire_time: t,
            revoke_time: None,
            last_error: Some("upstream refused".into()),
        }
    }

    #[test]
    fn listings_page_by_name_then_newest_version_without_gaps_or_tokens() {
        let all = vec![v("b", 1), v("a", 1), v("a", 3), v("a", 2), v("c", 1)];
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = list_page(all.clone(), 2, &token).unwrap();
            assert!(page.versions.len() <= 2);
            seen.extend(page.versions.iter().map(|v| v.name.clone()));
            assert!(page.versions.iter().all(|v| v.token.is_empty()));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(
            seen,
            [
                "credentials/a/versions/3",
                "credentials/a/versions/2",
                "credentials/a/versions/1",
                "credentials/b/versions/1",
                "credentials/c/versions/1"
            ]
        );
        let e = list_page(all, 0, "nonsense").unwrap_err();
        assert_eq!((e.field, e.reason), ("page_token", "INVALID_PAGE_TOKEN"));
    }

    #[test]
    fn a_version_shows_its_resource_names_times_and_the_token_only_when_given() {
        let shown = version(&v("mirror-feed", 4), Some("pat"));
        assert_eq!(shown.name, "credentials/mirror-feed/versions/4");
        assert_eq!(shown.credential, "credentials/mirror-feed");
        assert_eq!(shown.state(), pb::credential_version::State::Current);
        assert!(shown.valid_from.is_some() && shown.revoke_time.is_none());
        assert_eq!(shown.token, "pat");
        assert!(!format!("{shown:?}").contains("\"pat\""));
        assert!(version(&v("x", 1), None).token.is_empty());
        // The last error is an admin's: never in a reader's answer.
        assert_eq!(version(&v("x", 1), None).last_error, "upstream refused");
        assert!(version(&v("x", 1), Some("pat")).last_error.is_empty());
    }
}
