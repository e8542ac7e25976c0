//! `token-broker git-credential get|store|erase`: a git credential helper
//! (gitcredentials(7), git-credential(1)) that answers Azure Repos' Basic
//! credential with a PAT leased from the broker.
//!
//! Reuse: a lease is kept in a cache file per (broker, caller, organization,
//! scopes), sealed with AES-256-GCM under a key derived from the caller's
//! own broker credential (API key, token file or client key), mode 0600 in a
//! 0700 directory under `$XDG_RUNTIME_DIR` (else `$TMPDIR/token-broker-UID`).
//! The file alone opens nothing; whoever holds the credential could lease a
//! PAT anyway. An exclusive lock on the entry makes concurrent git commands
//! wait for the one lease instead of each making their own.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::grpc::{answer, channel, request, ClientArgs, ClientError, ClientOutput};
use crate::crypto::{Keyring, Sealed};
use crate::domain::Organization;
use crate::proto::v1 as pb;
use crate::proto::v1::lease_service_client::LeaseServiceClient;

/// Hosts served without `--host`.
pub const DEFAULT_HOSTS: [&str; 2] = ["dev.azure.com", "*.visualstudio.com"];

/// The user name answered when git sent none (Azure DevOps ignores it).
pub const DEFAULT_USERNAME: &str = "token-broker";

/// Most bytes read from git on stdin (a credential description is tiny).
const MAX_INPUT_BYTES: u64 = 64 * 1024;

/// A cached lease is answered only while more than this much of it remains:
/// max(5 min, 10 % of its lifetime), at most half its lifetime.
const MIN_REMAINING: Duration = Duration::from_secs(300);

/// Longest wait for a new lease (exit 5 past it).
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for the broker to revoke on `erase` (exit 5 past it): the
/// entry is forgotten by then, and an unrevoked lease ends at its TTL.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What git asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    /// Answer a credential (leasing a PAT, or reusing the cached lease).
    Get,
    /// Git accepted the credential: nothing to do.
    Store,
    /// Git was refused with the credential: revoke and forget the cached
    /// lease when the password is its token.
    Erase,
}

/// `token-broker git-credential` options; the client options are the
/// other client commands'.
#[derive(clap::Args, Debug, Clone)]
pub struct GitCredentialArgs {
    /// What git asks (git appends it to the configured command).
    #[arg(value_enum)]
    pub action: Action,
    /// Scopes of the leased PAT; repeat or comma-separate (`vso.code_write` to push).
    #[arg(long = "scope", value_delimiter = ',', default_value = "vso.code")]
    pub scopes: Vec<String>,
    /// Lifetime asked for each lease, e.g. `15m`, `1h`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub ttl: Duration,
    /// Host served (repeatable): `HOST[:PORT]`, or `*.DOMAIN` whose first
    /// label is the organization. Default: dev.azure.com and
    /// *.visualstudio.com. Plain http is served only for hosts given here.
    #[arg(long = "host", value_name = "HOST", value_parser = parse_host)]
    pub hosts: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub token_file: super::grpc::TokenFileArg,
}

/// Checks one `--host` value: `HOST[:PORT]` or `*.DOMAIN`, as git sends
/// `host=`. A value git can never send (a URL, a path, a blank) would make
/// the helper silently answer nothing forever, so it is a usage error.
fn parse_host(value: &str) -> Result<String, String> {
    if value.contains("://") {
        return Err(
            "a host as git sends it, without the scheme: `dev.azure.com`, \
                    `127.0.0.1:8081` (plain http is served for every --host)"
                .into(),
        );
    }
    let name = value.strip_prefix("*.").unwrap_or(value);
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(
            "expected `HOST[:PORT]` or `*.DOMAIN`, e.g. `dev.azure.com`, `*.visualstudio.com`, \
             `127.0.0.1:8081`"
                .into(),
        )
    }
}

/// Runs the helper: reads git's description from stdin and returns what
/// to print on stdout (nothing when it cannot serve: git goes on to its
/// next helper). A broker that cannot be reached is passed over silently;
/// the broker's refusals are errors with the client commands' exit codes.
pub async fn run(mut args: GitCredentialArgs) -> Result<String, ClientError> {
    if args.client.output != ClientOutput::Text {
        return Err(ClientError::Usage(
            "--output is not an option of git-credential".into(),
        ));
    }
    args.client.token_file = args.token_file.token_file.take();
    let input = read_input(std::io::stdin().lock())
        .map_err(|e| ClientError::Usage(format!("cannot read git's input: {e}")))?;
    if args.action == Action::Store {
        return Ok(String::new());
    }
    let Some(target) = Target::of(&input, &args.hosts) else {
        return Ok(String::new());
    };
    let Ok(organization) = Organization::parse(&target.organization) else {
        return Ok(String::new());
    };
    // Checks the credential flags before anything touches the cache.
    super::grpc::endpoint(&args.client)?;
    let cache = Cache::open(&args, organization.as_str());
    let outcome = match args.action {
        Action::Get => get(&args, &cache, organization.as_str(), &input).await,
        Action::Erase => erase(&args, &cache, &input).await.map(|()| String::new()),
        Action::Store => unreachable!("answered above"),
    };
    match outcome {
        // No broker: the next helper may serve.
        Err(ClientError::Connect { .. }) => Ok(String::new()),
        other => other,
    }
}

/// `get`: the cached lease while enough of it remains, else a new one.
async fn get(
    args: &GitCredentialArgs,
    cache: &Option<Cache>,
    organization: &str,
    input: &HashMap<String, String>,
) -> Result<String, ClientError> {
    let now = unix_now();
    let _lock = cache.as_ref().and_then(Cache::lock);
    let cached = cache.as_ref().and_then(Cache::read);
    let lease = match cached.filter(|l| l.servable_at(now)) {
        Some(lease) => lease,
        None => {
            // Bounded, so a hung broker cannot hold the entry's lock (and
            // every git command waiting on it) for ever.
            let lease = tokio::time::timeout(CREATE_TIMEOUT, create(args, organization))
                .await
                .map_err(|_| {
                    ClientError::Rpc(tonic::Status::deadline_exceeded(format!(
                        "no lease from the broker within {}s",
                        CREATE_TIMEOUT.as_secs()
                    )))
                })??;
            if let Some(cache) = cache {
                cache.write(&lease);
            }
            lease
        }
    };
    let username = input
        .get("username")
        .filter(|u| !u.is_empty())
        .map_or(DEFAULT_USERNAME, String::as_str);
    Ok(format!(
        "username={username}\npassword={}\npassword_expiry_utc={}",
        lease.token.expose_secret(),
        lease.expire_time
    ))
}

/// `erase`: when git's password is the cached lease's token, revokes that
/// lease at the broker and forgets it (also when the revocation fails:
/// git was refused with it, so it is of no more use).
async fn erase(
    args: &GitCredentialArgs,
    cache: &Option<Cache>,
    input: &HashMap<String, String>,
) -> Result<(), ClientError> {
    let (Some(cache), Some(password)) = (cache, input.get("password")) else {
        return Ok(());
    };
    let lock = cache.lock();
    let Some(lease) = cache.read() else {
        return Ok(());
    };
    let same: bool = lease
        .token
        .expose_secret()
        .as_bytes()
        .ct_eq(password.as_bytes())
        .into();
    if !same {
        return Ok(());
    }
    cache.forget();
    // Forgotten: the other git commands need not wait for the broker.
    drop(lock);
    let revoke = async {
        let mut client = LeaseServiceClient::new(channel(&args.client).await?);
        let req = pb::RevokeLeaseRequest { name: lease.name };
        answer(client.revoke_lease(request(req, &args.client)?).await)
    };
    let revoked = tokio::time::timeout(REVOKE_TIMEOUT, revoke)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Rpc(tonic::Status::deadline_exceeded(format!(
                "the broker did not revoke the lease within {}s; it ends at its TTL",
                REVOKE_TIMEOUT.as_secs()
            ))))
        });
    match revoked {
        Ok(_) => Ok(()),
        // Already closed (revoked or expired) at the broker: done.
        Err(ClientError::Rpc(s))
            if matches!(
                s.code(),
                tonic::Code::NotFound | tonic::Code::FailedPrecondition
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Leases a PAT as `args` say.
async fn create(args: &GitCredentialArgs, organization: &str) -> Result<CachedLease, ClientError> {
    let mut client = LeaseServiceClient::new(channel(&args.client).await?);
    let req = pb::CreateLeaseRequest {
        organization: organization.to_owned(),
        scopes: args.scopes.clone(),
        ttl: Some(prost_types::Duration {
            seconds: args.ttl.as_secs() as i64,
            nanos: args.ttl.subsec_nanos() as i32,
        }),
        request_id: String::new(),
    };
    let lease = answer(client.create_lease(request(req, &args.client)?).await)?;
    let seconds = |t: &Option<prost_types::Timestamp>| t.as_ref().map_or(0, |t| t.seconds);
    Ok(CachedLease {
        name: lease.name.clone(),
        token: SecretString::from(lease.token.clone()),
        create_time: seconds(&lease.create_time),
        expire_time: seconds(&lease.expire_time),
    })
}

/// Git's description: `key=value` lines up to a blank line or the end;
/// the last value of a key wins, `key[]` keys (lists) are skipped. Bytes
/// that are not UTF-8 (git percent-decodes the URL's path into `path`)
/// become U+FFFD: such a value names no organization, so nothing is
/// answered, rather than an error for every git command. Reading stops at
/// [`MAX_INPUT_BYTES`]; a line cut there is dropped, never taken as a
/// shorter value (`path=fabrikam-prod/…` is not `fabrikam`).
fn read_input(reader: impl std::io::BufRead) -> std::io::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    let mut reader = reader.take(MAX_INPUT_BYTES);
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        if reader.read_until(b'\n', &mut bytes)? == 0 {
            break;
        }
        match bytes.strip_suffix(b"\n") {
            Some(whole) => bytes.truncate(whole.len()),
            // The last line: whole at the end of the input, cut at the limit.
            None if reader.limit() == 0 => break,
            None => {}
        }
        let line = String::from_utf8_lossy(&bytes);
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        if let Some((key, value)) = line.split_once('=') {
            if !key.ends_with("[]") {
                out.insert(key.to_owned(), value.to_owned());
            }
        }
    }
    Ok(out)
}

/// The organization a description is for, when it is one of ours.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    organization: String,
}

impl Target {
    /// The organization of `input` when its host matches one of `hosts`
    /// (or [`DEFAULT_HOSTS`] when empty) over https, or over http for a
    /// host given: `*.DOMAIN` names it in the host's first label, an exact
    /// host in the path's first segment (`credential.useHttpPath`).
    fn of(input: &HashMap<String, String>, hosts: &[String]) -> Option<Target> {
        let given = !hosts.is_empty();
        let patterns: Vec<String> = if given {
            hosts.iter().map(|h| h.to_ascii_lowercase()).collect()
        } else {
            DEFAULT_HOSTS.iter().map(|h| (*h).to_owned()).collect()
        };
        match input.get("protocol").map(String::as_str) {
            Some("https") => {}
            Some("http") if given => {}
            _ => return None,
        }
        let host = input.get("host")?.to_ascii_lowercase();
        for pattern in &patterns {
            if let Some(domain) = pattern.strip_prefix("*.") {
                let Some(label) = host.strip_suffix(&format!(".{domain}")) else {
                    continue;
                };
                if !label.is_empty() && !label.contains('.') {
                    return Some(Target {
                        organization: label.to_owned(),
                    });
                }
            } else if *pattern == host {
                let path = input.get("path")?;
                let first = path.trim_start_matches('/').split('/').next()?;
                if first.is_empty() {
                    return None;
                }
                return Some(Target {
                    organization: first.to_owned(),
                });
            }
        }
        None
    }
}

/// A lease as the cache keeps it. Times in Unix seconds.
#[derive(serde::Serialize, serde::Deserialize)]
struct CachedLease {
    name: String,
    #[serde(with = "secret_string")]
    token: SecretString,
    create_time: i64,
    expire_time: i64,
}

mod secret_string {
    use secrecy::{ExposeSecret as _, SecretString};
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &SecretString, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.expose_secret())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
        Ok(SecretString::from(String::deserialize(d)?))
    }
}

impl CachedLease {
    /// True while more than max(5 min, 10 % of the lifetime), at most half
    /// the lifetime, remains at `now`.
    fn servable_at(&self, now: i64) -> bool {
        let lifetime = (self.expire_time - self.create_time).max(0);
        let margin = (MIN_REMAINING.as_secs() as i64)
            .max(lifetime / 10)
            .min(lifetime / 2);
        self.expire_time - now > margin
    }
}

/// One cache entry: `<dir>/<key>.lease` (sealed) and `<dir>/<key>.lock`.
struct Cache {
    file: PathBuf,
    lock_file: PathBuf,
    key_name: String,
    keyring: Keyring,
}

impl Cache {
    /// The entry for `args` and `organization`; None (no reuse, said on
    /// stderr) when there is no safe directory, or no secret credential
    /// to seal under.
    fn open(args: &GitCredentialArgs, organization: &str) -> Option<Cache> {
        let (identity, seal_material) = credential_material(&args.client)?;
        let dir = match cache_dir() {
            Ok(dir) => dir,
            Err(message) => {
                eprintln!("token-broker git-credential: not reusing leases: {message}");
                return None;
            }
        };
        let mut scopes = args.scopes.clone();
        scopes.sort();
        scopes.dedup();
        let mut hash = Sha256::new();
        for part in [
            super::grpc::endpoint_url(&args.client.addr).as_bytes(),
            path_bytes(&args.client.ca_file),
            path_bytes(&args.client.client_cert_file),
            identity.as_slice(),
            organization.as_bytes(),
            scopes.join(",").as_bytes(),
        ] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        let key_name = hex::encode(hash.finalize());
        let mut mac = <Hmac<Sha256>>::new_from_slice(b"token-broker git-credential cache v1")
            .expect("HMAC takes any key");
        mac.update(&seal_material);
        let key = Zeroizing::new(<[u8; 32]>::from(mac.finalize().into_bytes()));
        let keyring = Keyring::new(
            "cache",
            [(
                "cache".to_owned(),
                SecretString::from(BASE64.encode(key.as_slice())),
            )],
        )
        .ok()?;
        Some(Cache {
            file: dir.join(format!("{key_name}.lease")),
            lock_file: dir.join(format!("{key_name}.lock")),
            key_name,
            keyring,
        })
    }

    /// Holds the entry's exclusive lock until dropped (None: unlocked, said
    /// on stderr).
    fn lock(&self) -> Option<File> {
        let file = private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock_file)
            .and_then(|f| {
                rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)?;
                Ok(f)
            });
        match file {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!(
                    "token-broker git-credential: cannot lock {}: {e}",
                    self.lock_file.display()
                );
                None
            }
        }
    }

    /// The cached lease, if there is one this credential opens.
    fn read(&self) -> Option<CachedLease> {
        let mut text = Zeroizing::new(String::new());
        File::open(&self.file)
            .ok()?
            .read_to_string(&mut text)
            .ok()?;
        let sealed = Sealed::decode(text.trim()).ok()?;
        let plain = self.keyring.open(&sealed, self.key_name.as_bytes()).ok()?;
        serde_json::from_str(plain.expose_secret()).ok()
    }

    /// Keeps `lease` (temporary file 0600, then renamed over the entry).
    fn write(&self, lease: &CachedLease) {
        let plain = Zeroizing::new(serde_json::to_string(lease).expect("serializable"));
        let sealed = self.keyring.seal(
            &SecretString::from(plain.as_str()),
            self.key_name.as_bytes(),
        );
        let tmp = self
            .file
            .with_extension(format!("tmp{}", std::process::id()));
        let written = private_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(sealed.encode().as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &self.file));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            eprintln!(
                "token-broker git-credential: cannot keep the lease in {}: {e}",
                self.file.display()
            );
        }
    }

    /// Removes the entry.
    fn forget(&self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Options creating files readable by the owner only.
fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
}

fn path_bytes(p: &Option<PathBuf>) -> &[u8] {
    p.as_deref()
        .and_then(Path::to_str)
        .unwrap_or_default()
        .as_bytes()
}

/// What names the caller in the cache key (a digest of the API key or
/// client key, the token file's path: a projected token rotates) and the
/// secret the cache is sealed under (all of the caller's secrets, the
/// token file's current content included). None without any secret.
fn credential_material(client: &ClientArgs) -> Option<(Vec<u8>, Zeroizing<Vec<u8>>)> {
    let read = |p: &Path| std::fs::read(p).ok().map(Zeroizing::new);
    let mut identity = Sha256::new();
    let mut secret = Zeroizing::new(Vec::new());
    let mut any = false;
    let mut add = |label: &[u8], stable: bool, bytes: &[u8]| {
        secret.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        secret.extend_from_slice(label);
        secret.extend_from_slice(bytes);
        if stable {
            identity.update(label);
            identity.update(Sha256::digest(bytes));
        }
        any = true;
    };
    if let Some(key) = client
        .api_key
        .as_ref()
        .filter(|k| !k.expose_secret().is_empty())
    {
        add(b"api-key", true, key.expose_secret().trim().as_bytes());
    }
    if let Some(key) = client.api_key_file.as_deref().and_then(read) {
        add(
            b"api-key",
            true,
            String::from_utf8_lossy(&key).trim().as_bytes(),
        );
    }
    if let Some(key) = client.client_key_file.as_deref().and_then(read) {
        add(b"client-key", true, &key);
    }
    if let Some(path) = &client.token_file {
        let token = read(path)?;
        add(b"token-file", false, &token);
        identity.update(b"token-file");
        identity.update(path_bytes(&Some(path.clone())));
    }
    any.then(|| (identity.finalize().to_vec(), secret))
}

/// The cache directory, created 0700: `$XDG_RUNTIME_DIR/token-broker`, or
/// `$TMPDIR/token-broker-UID` when that is unset or unusable (missing, or
/// another user's after `sudo -u`). Refused (with the reasons) when
/// neither is a directory of ours that only we can enter.
fn cache_dir() -> Result<PathBuf, String> {
    let fallback = std::env::temp_dir().join(format!("token-broker-{}", uid()));
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(runtime) if runtime.is_absolute() => private_dir(runtime.join("token-broker"))
            .or_else(|first| private_dir(fallback).map_err(|second| format!("{first}; {second}"))),
        _ => private_dir(fallback),
    }
}

/// `dir`, created 0700 if missing; refused (with the reason) when it is not
/// a directory of ours that only we can enter.
fn private_dir(dir: PathBuf) -> Result<PathBuf, String> {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    match builder.create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(&dir)
        .map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        if !meta.is_dir() || meta.uid() != uid() || meta.mode() & 0o077 != 0 {
            return Err(format!(
                "{} is not a directory only this user can enter",
                dir.display()
            ));
        }
    }
    #[cfg(not(unix))]
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    Ok(dir)
}

#[cfg(unix)]
fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

#[cfg(not(unix))]
fn uid() -> u32 {
    0
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(text: &str) -> HashMap<String, String> {
        read_input(text.as_bytes()).unwrap()
    }

    fn org_of(text: &str, hosts: &[&str]) -> Option<String> {
        let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        Target::of(&input(text), &hosts).map(|t| t.organization)
    }

    #[test]
    fn input_stops_at_the_blank_line_and_ignores_unknown_and_list_keys() {
        let got = input(
            "protocol=https\nhost=dev.azure.com\nwwwauth[]=Basic realm=\"x\"\nfuture=1\n\npassword=late\n",
        );
        assert_eq!(got["host"], "dev.azure.com");
        assert_eq!(got["future"], "1");
        assert!(!got.contains_key("wwwauth[]"));
        assert!(!got.contains_key("password"));
    }

    #[test]
    fn a_line_cut_by_the_input_limit_is_dropped_not_shortened() {
        let mut text = String::from("protocol=https\nhost=dev.azure.com\njunk=");
        let pad = MAX_INPUT_BYTES as usize - text.len() - "\npath=fabrikam".len();
        text.push_str(&"x".repeat(pad));
        text.push_str("\npath=fabrikam-prod/Fiber/_git/app\n\n");
        let got = input(&text);
        assert_eq!(got["host"], "dev.azure.com");
        assert!(!got.contains_key("path"), "{:?}", got.get("path"));
        // Without a final newline at the end of a short input: kept.
        assert_eq!(input("host=a\npath=o/p")["path"], "o/p");
    }

    #[test]
    fn input_that_is_not_utf8_names_no_organization_and_is_no_error() {
        let got = read_input(
            &b"protocol=http\nhost=127.0.0.1:8081\npath=fabrikam\xff/p/_git/r\r\n\n"[..],
        )
        .unwrap();
        assert_eq!(got["path"], "fabrikam\u{fffd}/p/_git/r");
        let target = Target::of(&got, &["127.0.0.1:8081".to_owned()]).unwrap();
        assert!(Organization::parse(&target.organization).is_err());
    }

    #[test]
    fn the_organization_comes_from_the_path_or_the_visualstudio_host() {
        let d: &[&str] = &[];
        assert_eq!(
            org_of(
                "protocol=https\nhost=dev.azure.com\npath=fabrikam/Fiber/_git/app\n",
                d
            ),
            Some("fabrikam".into())
        );
        assert_eq!(
            org_of(
                "protocol=https\nhost=Fabrikam.VisualStudio.com\npath=Fiber/_git/app\n",
                d
            ),
            Some("fabrikam".into())
        );
        // No path (credential.useHttpPath off): nothing to go on.
        assert_eq!(org_of("protocol=https\nhost=dev.azure.com\n", d), None);
        // Another host, plain http to a default host, a deeper subdomain.
        assert_eq!(
            org_of("protocol=https\nhost=github.com\npath=a/b\n", d),
            None
        );
        assert_eq!(
            org_of("protocol=http\nhost=dev.azure.com\npath=a/b\n", d),
            None
        );
        assert_eq!(
            org_of("protocol=https\nhost=a.b.visualstudio.com\n", d),
            None
        );
        // Plain http only for a host given with --host; the defaults go.
        let given = &["127.0.0.1:8081"];
        assert_eq!(
            org_of(
                "protocol=http\nhost=127.0.0.1:8081\npath=fabrikam/p/_git/r\n",
                given
            ),
            Some("fabrikam".into())
        );
        assert_eq!(
            org_of("protocol=https\nhost=dev.azure.com\npath=f/x\n", given),
            None
        );
        assert_eq!(
            org_of("protocol=http\nhost=127.0.0.1:9999\npath=f/x\n", given),
            None
        );
    }

    #[test]
    fn a_lease_is_reused_while_enough_of_it_remains() {
        let lease = |lifetime: i64| CachedLease {
            name: "leases/x".into(),
            token: SecretString::from("t"),
            create_time: 0,
            expire_time: lifetime,
        };
        // 1 h: served while more than 6 min remain.
        assert!(lease(3600).servable_at(3600 - 361));
        assert!(!lease(3600).servable_at(3600 - 360));
        // 8 h: 10 % (48 min).
        assert!(!lease(28800).servable_at(28800 - 2880));
        // 4 min: half of it.
        assert!(lease(240).servable_at(119));
        assert!(!lease(240).servable_at(120));
    }
}
