//! Request dispatch (lenient path matching, stats, faults) and the accept
//! loop that can drop a connection on request.

use std::future::Future;
use std::io;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

use super::dataplane::{self, Resource};
use super::entra::{self, Bearer};
use super::faults::{LatencyWhen, Operation};
use super::state::Emulator;
use super::wire::{self, Query};
use super::{control, git, pats};
use crate::domain::Organization;

/// Largest request body read, in bytes.
const MAX_BODY_BYTES: usize = 1 << 20;

/// Put in each request's extensions by [`serve_listener`]: notifying it
/// closes the connection without an answer (`dropConnection`).
#[derive(Clone)]
struct ConnectionKill(Arc<Notify>);

/// The emulator as an axum router (every path goes through one dispatcher,
/// so paths match case-insensitively with repeated slashes collapsed).
pub(crate) fn router(emu: Emulator) -> Router {
    Router::new().fallback(dispatch).with_state(emu)
}

/// What a normalised path addresses.
enum Route {
    Token { tenant: String },
    DeviceCode,
    Pats { org: String },
    Data { org: String, resource: Resource },
    Control { rest: Vec<String> },
}

/// Paths are case-insensitive and repeated slashes collapse, as under
/// IIS/ASP.NET ("Host, path and api-version": the examples write `_apis/Tokens/Pats`; the
/// leniency itself is [I]).
fn route(path: &str) -> Option<Route> {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(s).to_lowercase())
        .collect();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let org = |name: &str| {
        Organization::parse(name)
            .ok()
            .map(|o| o.as_str().to_owned())
    };
    match s.as_slice() {
        ["_emulator", rest @ ..] => Some(Route::Control {
            rest: rest.iter().map(|r| (*r).to_owned()).collect(),
        }),
        [tenant, "oauth2", "v2.0", "token"] => Some(Route::Token {
            tenant: (*tenant).to_owned(),
        }),
        [_tenant, "oauth2", "v2.0", "devicecode"] => Some(Route::DeviceCode),
        [o, "_apis", "tokens", "pats"] => org(o).map(|org| Route::Pats { org }),
        [o, "_apis", "git", "repositories"] => org(o).map(|org| Route::Data {
            org,
            resource: Resource::GitRepositories,
        }),
        [o, "_apis", "packaging", "feeds"] => org(o).map(|org| Route::Data {
            org,
            resource: Resource::PackagingFeeds,
        }),
        _ => None,
    }
}

pub(crate) fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_owned())
}

async fn dispatch(State(emu): State<Emulator>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let kill = parts.extensions.get::<ConnectionKill>().cloned();
    // Git's smart HTTP (with --git-root): its bodies stream through `git
    // http-backend`, unbounded, so they are not read here. Counted as
    // data-plane calls; fault rules do not apply to them.
    if let Some(root) = emu.config.git_root.clone() {
        if let Some(git_route) = git::route(parts.uri.path()) {
            emu.lock().count_call(Operation::Dataplane.as_str());
            return git::serve(&emu, &root, git_route, parts, body).await;
        }
    }
    let Some(route) = route(parts.uri.path()) else {
        return wire::not_found(parts.uri.path());
    };
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => return wire::json_reader_error(),
    };
    let query = Query::parse(parts.uri.query());
    let method = parts.method.clone();
    let headers = parts.headers;

    let op = match &route {
        Route::Control { rest } => {
            let answer = control::serve(&emu, &method, rest, &body)
                .unwrap_or_else(|| wire::not_found(parts.uri.path()));
            // The clock and refresh-token revocation change kept state.
            if method != Method::GET {
                emu.persist();
            }
            return answer;
        }
        Route::Token { .. } if method == Method::POST => Operation::Token,
        Route::Token { .. } => return wire::method_not_allowed(),
        // The devicecode endpoint is part of Entra's surface: counted and
        // faulted as `token`.
        Route::DeviceCode if method == Method::POST => Operation::Token,
        Route::DeviceCode => return wire::method_not_allowed(),
        Route::Data { .. } if method == Method::GET => Operation::Dataplane,
        Route::Data { .. } => return wire::method_not_allowed(),
        Route::Pats { .. } => match method {
            Method::POST => Operation::Create,
            Method::GET if query.get("authorizationId").is_some() => Operation::Get,
            Method::GET => Operation::List,
            Method::PUT => Operation::Update,
            Method::DELETE => Operation::Revoke,
            _ => return wire::method_not_allowed(),
        },
    };

    // PAT API calls are counted in flight and logged (`/_emulator/stats`,
    // `/_emulator/requests`) until their answer is handed over.
    let pat_call = matches!(route, Route::Pats { .. }).then(|| {
        let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
        emu.begin_pat_call(op.as_str(), traceparent)
    });
    let answer = serve_operation(&emu, op, route, &method, &query, &headers, &body, &kill).await;
    if let Some(call) = &pat_call {
        call.answered(answer.status().as_u16());
    }
    answer
}

/// Counts, applies the first matching fault rule, and runs `op`.
#[allow(clippy::too_many_arguments)]
async fn serve_operation(
    emu: &Emulator,
    op: Operation,
    route: Route,
    method: &Method,
    query: &Query,
    headers: &axum::http::HeaderMap,
    body: &Bytes,
    kill: &Option<ConnectionKill>,
) -> Response {
    {
        let mut inner = emu.lock();
        inner.count_call(op.as_str());
        if op == Operation::Revoke {
            let id = query.get("authorizationId").unwrap_or("").to_owned();
            *inner.stats.deletes.entry(id).or_default() += 1;
        }
    }
    let fault = emu.take_fault(op);
    let when = fault.as_ref().map(|f| f.latency_when).unwrap_or_default();

    if let Some(answer) = spend_fault(fault.as_ref(), when, LatencyWhen::Before, kill).await {
        return answer;
    }

    let repeat_page = fault.as_ref().is_some_and(|f| f.repeat_page);
    let mut answer = match route {
        Route::Token { tenant } => entra::token(emu, &tenant, headers, body),
        Route::DeviceCode => entra::device_code(emu, headers, body),
        Route::Data { org, resource } => dataplane::serve(emu, &org, resource, headers),
        Route::Pats { org } => pat_api(emu, op, &org, method, query, headers, body, repeat_page),
        Route::Control { .. } => unreachable!("answered above"),
    };
    // Kept as soon as the effect happened, before any "after" latency.
    if matches!(
        op,
        Operation::Create | Operation::Update | Operation::Revoke | Operation::Token
    ) {
        // File I/O and fsync: off the async workers.
        let emu = emu.clone();
        let _ = tokio::task::spawn_blocking(move || emu.persist()).await;
    }

    if let Some(answer) = spend_fault(fault.as_ref(), when, LatencyWhen::After, kill).await {
        return answer;
    }
    if let Some(f) = &fault {
        f.decorate(&mut answer);
    }
    answer
}

#[allow(clippy::too_many_arguments)]
fn pat_api(
    emu: &Emulator,
    op: Operation,
    org: &str,
    method: &Method,
    query: &Query,
    headers: &axum::http::HeaderMap,
    body: &Bytes,
    repeat_page: bool,
) -> Response {
    // Authentication comes first, as the service's front end does it ([I]).
    if let Bearer::Refused = entra::check_bearer(emu, headers) {
        // GET/POST get the sign-in page unless redirects are suppressed;
        // other methods get 401 ("Wrongly authenticated calls" [C]: PATCH got 401).
        if matches!(*method, Method::GET | Method::POST) {
            return wire::authentication_refused(headers);
        }
        return wire::unauthorized("");
    }
    let v = match wire::api_version(query, headers) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    match op {
        Operation::Create => pats::create(emu, org, v, body),
        Operation::Get => pats::get(emu, org, v, query.get("authorizationId").unwrap_or("")),
        Operation::List => pats::list(emu, org, query, repeat_page),
        Operation::Update => pats::update(emu, org, v, body),
        Operation::Revoke => pats::revoke(emu, org, v, query.get("authorizationId")),
        _ => wire::method_not_allowed(),
    }
}

/// The fault's answer; for `dropConnection`, closes the connection.
/// At point `at` of a call whose fault acts `when`: waits the fault's
/// latency, then answers with the fault if it replaces the answer.
async fn spend_fault(
    fault: Option<&super::faults::FaultRule>,
    when: LatencyWhen,
    at: LatencyWhen,
    kill: &Option<ConnectionKill>,
) -> Option<Response> {
    let f = fault.filter(|_| when == at)?;
    if let Some(d) = f.latency() {
        tokio::time::sleep(d).await;
    }
    if f.replaces_answer() {
        return Some(fault_answer(f, kill.clone()).await);
    }
    None
}

async fn fault_answer(f: &super::faults::FaultRule, kill: Option<ConnectionKill>) -> Response {
    if f.drop_connection {
        if let Some(ConnectionKill(notify)) = kill {
            notify.notify_one();
            // The connection task drops this request with the connection.
            std::future::pending::<()>().await;
        }
        // Served by another loop (plain axum::serve): abort the body instead.
        let stream = futures::stream::once(async {
            Err::<Bytes, io::Error>(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "dropped by fault rule",
            ))
        });
        return Response::builder()
            .status(StatusCode::OK)
            .body(Body::from_stream(stream))
            .unwrap_or_default();
    }
    f.answer()
        .unwrap_or_else(|| wire::json_ok(&serde_json::json!({})))
}

/// Serves `router` on `listener` until `shutdown` completes, then closes
/// every connection. Each connection can be dropped by a fault rule.
pub(crate) async fn serve_listener(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // As Azure DevOps' front ends answer: no Nagle delay on
                    // small responses, so the emulator adds no ~40 ms stalls.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "emulator could not set TCP_NODELAY");
                    }
                    stream
                }
                // Transient accept errors (e.g. too many open files): keep going.
                Err(e) => {
                    tracing::warn!(error = %e, "emulator accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let router = router.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let kill = Arc::new(Notify::new());
            let kill_ext = ConnectionKill(kill.clone());
            let service =
                hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(kill_ext.clone());
                    router.clone().oneshot(req.map(Body::new))
                });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            // Returning drops the connection, which closes the socket.
            tokio::select! {
                _ = conn => {}
                _ = kill.notified() => {}
                _ = stop.changed() => {}
            }
        });
    }
    drop(stop_tx);
    Ok(())
}
