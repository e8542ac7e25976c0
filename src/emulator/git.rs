//! Azure Repos over git's smart HTTP protocol (`token-broker emulator
//! --git-root DIR`): `/{organization}/{project}/_git/{repo}` serves the bare
//! repository `DIR/{organization}/{project}/{repo}.git` by running `git
//! http-backend` as a CGI program (git-http-backend(1)), behind the data
//! plane's authentication (docs/upstream-api.md, "Data plane: using a PAT"):
//! fetching needs a PAT whose scope covers `vso.code`, pushing one covering
//! `vso.code_write`.
//!
//! Every refusal is `401` with `WWW-Authenticate: Basic realm=…`, as Azure
//! Repos answers git ([C]: git asks its credential helpers only after such
//! a 401; curl picks Basic only when the server offers it).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use axum::body::{Body, Bytes};
use axum::http::request::Parts;
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse as _, Response};
use futures::StreamExt as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use super::dataplane::{self, Refusal};
use super::state::Emulator;
use super::wire;
use crate::domain::Organization;

/// Largest CGI header block read from `git http-backend`, in bytes.
const MAX_CGI_HEADER_BYTES: usize = 64 * 1024;

/// One of the three smart-HTTP endpoints of a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    /// `GET …/info/refs?service=…`: the ref advertisement.
    InfoRefs,
    /// `POST …/git-upload-pack`: a fetch.
    UploadPack,
    /// `POST …/git-receive-pack`: a push.
    ReceivePack,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::InfoRefs => "info/refs",
            Endpoint::UploadPack => "git-upload-pack",
            Endpoint::ReceivePack => "git-receive-pack",
        }
    }
}

/// A request for `/{organization}/{project}/_git/{repo}/{endpoint}`, with
/// the names as sent (percent-decoded, case kept).
#[derive(Debug)]
pub(crate) struct GitRoute {
    organization: String,
    project: String,
    repo: String,
    endpoint: Endpoint,
}

/// The git route `path` names, if any. `_git` and the endpoint match
/// case-insensitively, as the service's other paths do ([I]).
pub(crate) fn route(path: &str) -> Option<GitRoute> {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(super::server::percent_decode)
        .collect();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (org, project, repo, tail) = match s.as_slice() {
        [org, project, git, repo, tail @ ..] if git.eq_ignore_ascii_case("_git") => {
            (*org, *project, *repo, tail)
        }
        _ => return None,
    };
    let tail = tail.join("/").to_ascii_lowercase();
    let endpoint = [
        Endpoint::InfoRefs,
        Endpoint::UploadPack,
        Endpoint::ReceivePack,
    ]
    .into_iter()
    .find(|e| e.path() == tail)?;
    Some(GitRoute {
        organization: org.to_owned(),
        project: project.to_owned(),
        repo: repo.to_owned(),
        endpoint,
    })
}

/// Serves one smart-HTTP request from the repositories under `root`:
/// authenticates (memory only), then finds the repository and runs `git
/// http-backend`, streaming the request body to it and its answer back.
pub(crate) async fn serve(
    emu: &Emulator,
    root: &Path,
    route: GitRoute,
    parts: Parts,
    body: Body,
) -> Response {
    let Ok(org) = Organization::parse(&route.organization) else {
        return wire::not_found(parts.uri.path());
    };
    let query = parts.uri.query().unwrap_or("");
    let service = wire::Query::parse(parts.uri.query())
        .get("service")
        .map(str::to_owned);
    let (method, needs) = match route.endpoint {
        Endpoint::InfoRefs => match service.as_deref() {
            Some("git-upload-pack") => (Method::GET, "vso.code"),
            Some("git-receive-pack") => (Method::GET, "vso.code_write"),
            // The dumb protocol is not served.
            _ => return wire::not_found(parts.uri.path()),
        },
        Endpoint::UploadPack => (Method::POST, "vso.code"),
        Endpoint::ReceivePack => (Method::POST, "vso.code_write"),
    };
    if parts.method != method {
        return wire::method_not_allowed();
    }
    let accepted = match dataplane::authorize(emu, org.as_str(), needs, &parts.headers) {
        Ok(a) => a,
        Err(refusal) => return refused(refusal),
    };
    let Some(repo_dir) = find_repository(root, org.as_str(), &route) else {
        return repository_not_found(&route.repo);
    };
    let Ok(relative) = repo_dir.strip_prefix(root) else {
        return repository_not_found(&route.repo);
    };
    let path_info = format!("/{}/{}", relative.display(), route.endpoint.path());
    let header = |name: &HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut command = Command::new("git");
    command
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        // Pushing is off unless configured; the emulator serves trusted
        // local directories, whoever owns them.
        .env("GIT_CONFIG_COUNT", "2")
        .env("GIT_CONFIG_KEY_0", "http.receivepack")
        .env("GIT_CONFIG_VALUE_0", "true")
        .env("GIT_CONFIG_KEY_1", "safe.directory")
        .env("GIT_CONFIG_VALUE_1", "*")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", method.as_str())
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", format!("pat-{}", accepted.authorization_id))
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, var) in [
        (header::CONTENT_TYPE, "CONTENT_TYPE"),
        (header::CONTENT_LENGTH, "CONTENT_LENGTH"),
        // http-backend inflates a gzip request body itself.
        (header::CONTENT_ENCODING, "HTTP_CONTENT_ENCODING"),
        (HeaderName::from_static("git-protocol"), "HTTP_GIT_PROTOCOL"),
    ] {
        if let Some(value) = header(&name) {
            command.env(var, value);
        }
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "emulator cannot run git http-backend");
            return backend_failed("cannot run git http-backend");
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        tokio::spawn(async move {
            let mut frames = body.into_data_stream();
            while let Some(Ok(chunk)) = frames.next().await {
                if stdin.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            // Dropping stdin closes it: the end of the request body.
        });
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(%line, "git http-backend");
            }
        });
    }
    let Some(stdout) = child.stdout.take() else {
        return backend_failed("git http-backend has no output");
    };
    let mut stdout = BufReader::new(stdout);
    let (status, headers) = match read_cgi_headers(&mut stdout).await {
        Ok(h) => h,
        Err(message) => {
            tracing::warn!(%message, "git http-backend answered badly");
            return backend_failed(&message);
        }
    };
    let mut response = Response::new(Body::from_stream(body_stream(stdout, child)));
    *response.status_mut() = status;
    response.headers_mut().extend(headers);
    response
}

/// The CGI answer's header block: `Status:` as the status (200 without
/// one), the other fields as response headers.
async fn read_cgi_headers(
    stdout: &mut BufReader<ChildStdout>,
) -> Result<(StatusCode, axum::http::HeaderMap), String> {
    let mut status = StatusCode::OK;
    let mut headers = axum::http::HeaderMap::new();
    let mut read = 0usize;
    loop {
        let mut line = String::new();
        let n = stdout
            .read_line(&mut line)
            .await
            .map_err(|e| format!("reading its headers: {e}"))?;
        read += n;
        if n == 0 {
            return Err("it ended before its headers did".into());
        }
        if read > MAX_CGI_HEADER_BYTES {
            return Err("its headers are too long".into());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Ok((status, headers));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("a header line without a colon: {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("");
            status = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| format!("a bad Status: {value:?}"))?;
        } else if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
}

/// The rest of the CGI output as a body; the child is killed if the
/// client goes away first, and reaped at the end.
fn body_stream(
    stdout: BufReader<ChildStdout>,
    child: Child,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send {
    futures::stream::unfold(Some((stdout, child)), |state| async move {
        let (mut stdout, mut child) = state?;
        let mut buf = vec![0u8; 64 * 1024];
        match stdout.read(&mut buf).await {
            Ok(0) => {
                let _ = child.wait().await;
                None
            }
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some((stdout, child))))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// The repository directory of `route` under `root`: each name matched
/// exactly, else case-insensitively (the service's names are). None when
/// a name could leave `root` or nothing matches.
fn find_repository(root: &Path, org: &str, route: &GitRoute) -> Option<PathBuf> {
    let org_dir = child_dir(root, org)?;
    let project_dir = child_dir(&org_dir, &route.project)?;
    child_dir(&project_dir, &format!("{}.git", route.repo))
}

/// The directory `name` in `parent`, matched exactly or ignoring ASCII case.
fn child_dir(parent: &Path, name: &str) -> Option<PathBuf> {
    let safe = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0']);
    if !safe {
        return None;
    }
    let exact = parent.join(name);
    if exact.is_dir() {
        return Some(exact);
    }
    std::fs::read_dir(parent)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().eq_ignore_ascii_case(name))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
}

/// 401 for git: the data plane's refusal with `WWW-Authenticate: Basic`
/// always (an expired PAT's `AccessCheckException` carries it too, so git
/// asks its helpers again).
fn refused(refusal: Refusal) -> Response {
    match refusal {
        Refusal::Expired => {
            let mut resp = wire::pat_expired();
            resp.headers_mut()
                .append(header::WWW_AUTHENTICATE, HeaderValue::from_static(BASIC));
            resp
        }
        Refusal::OutOfScope => wire::unauthorized(dataplane::OUT_OF_SCOPE_USER),
        Refusal::NoCredential | Refusal::Unknown | Refusal::WrongOrganization => {
            wire::unauthorized("")
        }
    }
}

/// The Basic challenge of [`wire::unauthorized`].
const BASIC: &str = wire::BASIC_CHALLENGE;

/// 404 `GitRepositoryNotFoundException` TF401019 ([I]: the service's words
/// for a repository that does not exist or that the caller cannot see).
fn repository_not_found(repo: &str) -> Response {
    wire::envelope(
        StatusCode::NOT_FOUND,
        "GitRepositoryNotFoundException",
        "Microsoft.TeamFoundation.Git.Server.GitRepositoryNotFoundException, Microsoft.TeamFoundation.Git.Server",
        &format!(
            "TF401019: The Git repository with name or identifier {repo} does not exist or you do not have permissions for the operation you are attempting."
        ),
        3000,
    )
}

/// 500 when `git http-backend` could not serve.
fn backend_failed(message: &str) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("emulator: {message}\n"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_paths_name_organization_project_repository_and_endpoint() {
        let r = route("/Fabrikam/Fiber/_GIT/Web%20App/info/refs").unwrap();
        assert_eq!(
            (r.organization.as_str(), r.project.as_str(), r.repo.as_str()),
            ("Fabrikam", "Fiber", "Web App")
        );
        assert_eq!(r.endpoint, Endpoint::InfoRefs);
        assert_eq!(
            route("/fabrikam/fiber/_git/app/git-receive-pack")
                .unwrap()
                .endpoint,
            Endpoint::ReceivePack
        );
        assert!(route("/fabrikam/fiber/_git/app/objects/info/packs").is_none());
        assert!(route("/fabrikam/_apis/git/repositories").is_none());
    }

    #[test]
    fn names_that_could_leave_the_root_find_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("fabrikam/Fiber/app.git")).unwrap();
        let found = |project: &str, repo: &str| {
            let r = GitRoute {
                organization: "fabrikam".into(),
                project: project.into(),
                repo: repo.into(),
                endpoint: Endpoint::InfoRefs,
            };
            find_repository(dir.path(), "fabrikam", &r)
        };
        assert_eq!(
            found("fiber", "APP"),
            Some(dir.path().join("fabrikam/Fiber/app.git"))
        );
        assert_eq!(found("..", "app"), None);
        assert_eq!(found("Fiber", "../Fiber/app"), None);
        assert_eq!(found("Fiber", "other"), None);
    }
}
