//! The client CLI (`lease`, `admin`, `audit list`) as a deployment runs it:
//! the compiled binary against a real broker over real sockets, over TLS
//! (`--ca-file`, the system roots through `SSL_CERT_FILE`), mTLS (client
//! certificate files), with an API key file or a Kubernetes projected token
//! file; the documented exit codes from real answers; `--output token`;
//! and `serve` starting with the client variables in its environment.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret as _;
use serde_json::{json, Value};

use common::broker::{spawn_broker_with_config, BrokerSpec, TestBroker};
use common::db::sqlite_url;
use common::emulator::Emu;
use common::k8s::{claims, FakeIssuer, SigningKey};
use common::mtls::{uri, ServerTls, TestAuthority};
use common::process::ServeProcess;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");
const RESTORER: &str = "k8s:system:serviceaccount:build:restorer";
const SPIFFE_RESTORER: &str = "spiffe://example.org/ns/build/sa/restorer";

/// `apikey:ci` as in the other tests, plus a service account and a SPIFFE
/// identity allowed packaging scopes in `fabrikam`.
fn policy() -> String {
    format!(
        r#"
rules:
  - name: ci
    identities: ["apikey:ci"]
    organizations: ["fabrikam"]
    scopes: ["vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
  - name: workloads
    identities: ["{RESTORER}", "{SPIFFE_RESTORER}"]
    organizations: ["fabrikam"]
    scopes: ["vso.packaging"]
    default_ttl: 1h
    max_ttl: 2h
"#
    )
}

/// A broker on SQLite against a fresh emulator, configured by `configure`.
struct World {
    broker: TestBroker,
    spec: BrokerSpec,
    emu: Emu,
    dir: tempfile::TempDir,
}

async fn world(configure: impl FnOnce(BrokerSpec) -> BrokerSpec) -> World {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_default().await;
    let spec =
        configure(BrokerSpec::new(sqlite_url(&dir), emu.running.url()).with_policy(&policy()));
    let mut config = spec.config();
    // An upstream Retry-After above this is answered at once as
    // UNAVAILABLE with RetryInfo (exit 5) instead of waited out.
    config.upstream.azure_devops.max_retry_after = Duration::from_secs(1);
    let broker = spawn_broker_with_config(&spec, config).await;
    World {
        broker,
        spec,
        emu,
        dir,
    }
}

impl World {
    /// Writes `text` to `name` in the test's directory.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A file holding the `ci` API key, with a trailing newline (trimmed).
    fn ci_key_file(&self) -> PathBuf {
        let key = self.spec.key("ci");
        self.file("ci.key", &format!("{}\n", key.expose_secret()))
    }
}

/// What a run of the binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` and `env` (nothing of the test's own
/// `TOKEN_BROKER_*` or `SSL_CERT_*` environment; `env` values of `None`
/// are left unset).
async fn cli(args: &[&str], env: &[(&str, Option<&str>)]) -> Run {
    let mut command = tokio::process::Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOKEN_BROKER_") || name.starts_with("SSL_CERT_") {
            command.env_remove(name);
        }
    }
    for (name, value) in env {
        if let Some(value) = value {
            command.env(name, value);
        }
    }
    let out = command
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run token-broker");
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

const CREATE_PACKAGING: &[&str] = &[
    "lease",
    "create",
    "--organization",
    "fabrikam",
    "--scope",
    "vso.packaging",
];

/// `CREATE_PACKAGING` then `extra`.
fn create<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    CREATE_PACKAGING.iter().chain(extra).copied().collect()
}

fn json_of(run: &Run) -> Value {
    assert_eq!(run.code, 0, "{run:?}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"))
}

// ---- TLS --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_broker_is_reached_with_ca_file_or_ssl_cert_file_and_output_token_prints_the_token_alone(
) {
    let server_ca = TestAuthority::new("client-cli test server CA");
    let tls = ServerTls::new(&server_ca, None, None);
    let config = tls.config.clone();
    let w = world(|s| s.with_tls(config)).await;
    let ca = w.file("ca.pem", server_ca.ca_pem());
    let key_file = w.ci_key_file();
    let addr = w.broker.url.clone();
    assert!(addr.starts_with("https://"), "{addr}");

    let mut args = create(&["--output", "token"]);
    args.extend(["--addr", &addr, "--ca-file", path(&ca)]);
    args.extend(["--api-key-file", path(&key_file)]);
    let run = cli(&args, &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let token = run.stdout.strip_suffix('\n').expect("a newline after it");
    assert!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "the token alone: {:?}",
        run.stdout
    );
    assert_eq!(
        w.emu.use_pat("fabrikam", "packaging/feeds", token).await,
        200,
        "it is the leased PAT"
    );

    // The system roots by default: the test CA is not among them ...
    let list = ["lease", "list", "--addr", &addr, "--output", "json"];
    let key = w.spec.key("ci");
    let with_key = ("TOKEN_BROKER_API_KEY", Some(key.expose_secret()));
    let run = cli(&list, &[with_key]).await;
    assert_eq!(run.code, 3, "an untrusted broker is refused: {run:?}");
    assert!(
        run.stderr.contains("TLS handshake") && run.stderr.contains("certificate"),
        "{run:?}"
    );
    // ... unless SSL_CERT_FILE names it (SSL_CERT_DIR would add to it).
    let run = cli(&list, &[with_key, ("SSL_CERT_FILE", Some(path(&ca)))]).await;
    let page = json_of(&run);
    assert_eq!(page["leases"].as_array().map(Vec::len), Some(1), "{page}");
    // ... or TOKEN_BROKER_CA_FILE does.
    let run = cli(
        &list,
        &[with_key, ("TOKEN_BROKER_CA_FILE", Some(path(&ca)))],
    )
    .await;
    json_of(&run);

    // A CA file without a certificate, or TLS files on a plaintext
    // address, are the caller's mistakes.
    let empty = w.file("empty.pem", "");
    let run = cli(
        &list,
        &[with_key, ("TOKEN_BROKER_CA_FILE", Some(path(&empty)))],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("--ca-file") && run.stderr.contains("empty.pem"),
        "{run:?}"
    );
    let plain = format!("http://{}", w.broker.addr);
    let run = cli(
        &["lease", "list", "--addr", &plain, "--ca-file", path(&ca)],
        &[with_key],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("https://"), "{run:?}");
    w.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_broker_is_reached_with_client_certificate_files_from_flags_or_environment() {
    let server_ca = TestAuthority::new("client-cli test server CA");
    let clients_ca = TestAuthority::new("client-cli test clients CA");
    let tls = ServerTls::new(&server_ca, Some(&clients_ca), None);
    let config = tls.config.clone();
    let w = world(|s| s.with_tls(config)).await;
    let ca = w.file("ca.pem", server_ca.ca_pem());
    let client = clients_ca.client(vec![uri(SPIFFE_RESTORER)]);
    let cert = w.file("client.crt", &client.cert_pem);
    let key = w.file("client.key", &client.key_pem);
    let addr = w.broker.url.clone();

    let mut args = create(&["--output", "json", "--addr", &addr]);
    args.extend(["--ca-file", path(&ca)]);
    args.extend(["--client-cert-file", path(&cert)]);
    args.extend(["--client-key-file", path(&key)]);
    let lease = json_of(&cli(&args, &[]).await);
    assert_eq!(lease["holder"], SPIFFE_RESTORER, "{lease}");
    assert_eq!(lease["state"], "ACTIVE", "{lease}");

    let env = [
        ("TOKEN_BROKER_ADDR", Some(addr.as_str())),
        ("TOKEN_BROKER_CA_FILE", Some(path(&ca))),
        ("TOKEN_BROKER_CLIENT_CERT_FILE", Some(path(&cert))),
        ("TOKEN_BROKER_CLIENT_KEY_FILE", Some(path(&key))),
    ];
    let page = json_of(&cli(&["lease", "list", "--output", "json"], &env).await);
    assert_eq!(page["leases"][0]["name"], lease["name"], "{page}");

    // Without a certificate the broker refuses the connection: always a
    // refusal (3), never "retry later", pointing at the certificate flags.
    for _ in 0..5 {
        let run = cli(&["lease", "list"], &env[..2]).await;
        assert_eq!(run.code, 3, "{run:?}");
        assert!(run.stderr.contains("--client-cert-file"), "{run:?}");
    }
    // A certificate from a CA the broker does not trust: refused too (3).
    let stranger =
        TestAuthority::new("client-cli test stranger CA").client(vec![uri(SPIFFE_RESTORER)]);
    let stranger_cert = w.file("stranger.crt", &stranger.cert_pem);
    let stranger_key = w.file("stranger.key", &stranger.key_pem);
    for _ in 0..3 {
        let run = cli(
            &[
                "lease",
                "list",
                "--client-cert-file",
                path(&stranger_cert),
                "--client-key-file",
                path(&stranger_key),
            ],
            &env[..2],
        )
        .await;
        assert_eq!(run.code, 3, "{run:?}");
        assert!(!run.stderr.contains("PRIVATE KEY"), "{run:?}");
    }
    // One of the pair alone is a usage error.
    let run = cli(&["lease", "list"], &env[..3]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--client-key-file"), "{run:?}");
    // A key file without a key names the flag and file, not its contents.
    let junk = w.file("junk.key", "not a key at all");
    let run = cli(
        &["lease", "list", "--client-key-file", path(&junk)],
        &env[..3],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("--client-key-file") && run.stderr.contains("junk.key"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("not a key at all"), "{run:?}");
    w.broker.stop().await;
}

// ---- credentials from files ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projected_service_account_token_file_and_an_api_key_file_authenticate_the_cli() {
    let signing = SigningKey::es256("cluster-key-1");
    let issuer = FakeIssuer::start(&[&signing]).await;
    let k8s = issuer.config();
    let w = world(|s| s.with_kubernetes(k8s)).await;
    let addr = w.broker.url.clone();
    let token = signing.sign(&claims(&issuer.issuer(), "build", "restorer"));
    let token_file = w.file("token", &token);

    let lease = json_of(
        &cli(
            &create(&[
                "--output",
                "json",
                "--addr",
                &addr,
                "--token-file",
                path(&token_file),
            ]),
            &[],
        )
        .await,
    );
    assert_eq!(lease["holder"], RESTORER, "{lease}");

    // The kubelet rotates the file: the CLI reads it when it calls.
    let rotated = signing.sign(&claims(&issuer.issuer(), "build", "restorer"));
    std::fs::write(&token_file, &rotated).unwrap();
    let env = [
        ("TOKEN_BROKER_ADDR", Some(addr.as_str())),
        ("TOKEN_BROKER_TOKEN_FILE", Some(path(&token_file))),
    ];
    let page = json_of(&cli(&["lease", "list", "--output", "json"], &env).await);
    assert_eq!(page["leases"][0]["name"], lease["name"], "{page}");

    // A token the cluster did not sign: refused (3), and never echoed.
    let forged = SigningKey::es256("cluster-key-1").sign(&claims(&issuer.issuer(), "build", "x"));
    std::fs::write(&token_file, &forged).unwrap();
    let run = cli(&["lease", "list"], &env).await;
    assert_eq!(run.code, 3, "{run:?}");
    for part in forged.split('.') {
        assert!(!run.stderr.contains(part), "token echoed: {run:?}");
    }

    // `admin` subcommands without a PAT file of their own take it too: the
    // caller is known (not an admin here), so refused as such, not as
    // unauthenticated.
    std::fs::write(&token_file, &rotated).unwrap();
    for admin in [
        vec!["admin", "list-credentials"],
        vec!["admin", "rotate-credential", "mirror"],
        vec!["admin", "list"],
    ] {
        let mut line = admin.clone();
        line.extend(["--addr", &addr, "--token-file", path(&token_file)]);
        let run = cli(&line, &[]).await;
        assert_eq!(run.code, 3, "{run:?}");
        assert!(run.stderr.contains("PermissionDenied"), "{run:?}");
    }

    // An API key file works the same way (trimmed) ...
    let key_file = w.ci_key_file();
    let run = cli(
        &create(&[
            "--output",
            "json",
            "--addr",
            &addr,
            "--api-key-file",
            path(&key_file),
        ]),
        &[],
    )
    .await;
    assert_eq!(json_of(&run)["holder"], "apikey:ci");
    // ... a wrong key in it is refused without being shown ...
    let wrong = "tbk_wrong_key_0123456789abcdef0123456789";
    let wrong_file = w.file("wrong.key", wrong);
    let run = cli(
        &[
            "lease",
            "list",
            "--addr",
            &addr,
            "--api-key-file",
            path(&wrong_file),
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        !run.stderr.contains(wrong) && !run.stdout.contains(wrong),
        "{run:?}"
    );
    // ... and one credential at a time; a missing file is named.
    let key = w.spec.key("ci");
    let run = cli(
        &["lease", "list", "--api-key-file", path(&key_file)],
        &[
            ("TOKEN_BROKER_ADDR", Some(addr.as_str())),
            ("TOKEN_BROKER_API_KEY", Some(key.expose_secret())),
        ],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("--api-key") && run.stderr.contains("--api-key-file"),
        "{run:?}"
    );
    assert!(!run.stderr.contains(key.expose_secret()), "{run:?}");
    let missing = w.dir.path().join("no-such-token");
    let run = cli(
        &[
            "lease",
            "list",
            "--addr",
            &addr,
            "--token-file",
            path(&missing),
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("--token-file") && run.stderr.contains("no-such-token"),
        "{run:?}"
    );
    w.broker.stop().await;
}

// ---- exit codes ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_documented_exit_code_comes_from_a_real_answer() {
    let w = world(|s| s).await;
    let addr = w.broker.url.clone();
    let key = w.spec.key("ci");
    let env = [
        ("TOKEN_BROKER_ADDR", Some(addr.as_str())),
        ("TOKEN_BROKER_API_KEY", Some(key.expose_secret())),
    ];

    // 0, and `--output token` is for `lease create` only (2).
    let run = cli(&create(&["--output", "token"]), &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
    for other in [
        &["lease", "list", "--output", "token"][..],
        &["admin", "list", "--output", "token"],
        &["audit", "list", "--output", "token"],
    ] {
        let run = cli(other, &env).await;
        assert_eq!(run.code, 2, "{other:?}: {run:?}");
        assert!(run.stderr.contains("--output token"), "{run:?}");
    }
    // 2: the caller's own mistakes, the server's (INVALID_ARGUMENT) and clap's.
    let run = cli(&create(&["--request-id", "not-a-uuid"]), &env).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("InvalidArgument"), "{run:?}");
    let run = cli(&["lease", "create", "--no-such-flag"], &env).await;
    assert_eq!(run.code, 2, "{run:?}");
    // 3: no credential (UNAUTHENTICATED), no rule (PERMISSION_DENIED).
    let run = cli(&["lease", "list", "--addr", &addr], &[]).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("Unauthenticated"), "{run:?}");
    let run = cli(
        &[
            "lease",
            "create",
            "--org",
            "contoso",
            "--scope",
            "vso.packaging",
        ],
        &env,
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("PermissionDenied"), "{run:?}");
    // 3: `--output token` replaying the request id of a revoked lease gets
    // the lease without its token: an error, never an empty "token" line.
    let replay = create(&[
        "--request-id",
        "6f1c2a3e-0b4d-4c5e-9f60-718293a4b5c6",
        "--output",
        "token",
    ]);
    let first = cli(&replay, &env).await;
    assert_eq!(first.code, 0, "{first:?}");
    let name = json_of(&cli(&["lease", "list", "--output", "json"], &env).await)["leases"][0]
        ["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked = cli(&["lease", "revoke", &name], &env).await;
    assert_eq!(revoked.code, 0, "{revoked:?}");
    let run = cli(&replay, &env).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(
        run.stderr.contains(&name) && run.stderr.contains("REVOKED"),
        "{run:?}"
    );
    // 4: NOT_FOUND.
    let unknown = "leases/00000000-0000-4000-8000-000000000000";
    let run = cli(&["lease", "get", unknown], &env).await;
    assert_eq!(run.code, 4, "{run:?}");
    let run = cli(&["lease", "revoke", unknown], &env).await;
    assert_eq!(run.code, 4, "{run:?}");
    // 5: upstream busy (UNAVAILABLE with RetryInfo) ...
    w.emu
        .set_faults(json!([{"operation": "create", "retryAfterSeconds": 30, "times": 1}]))
        .await;
    let run = cli(CREATE_PACKAGING, &env).await;
    assert_eq!(run.code, 5, "{run:?}");
    assert!(
        run.stderr.contains("Unavailable") && run.stderr.contains("retry after"),
        "{run:?}"
    );
    w.broker.stop().await;
    // ... and a broker that cannot be reached.
    let run = cli(&["lease", "list"], &env).await;
    assert_eq!(run.code, 5, "{run:?}");
    assert!(run.stderr.contains("cannot reach the broker"), "{run:?}");
}

// ---- serve ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_with_the_client_variables_in_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_default().await;
    let spec = BrokerSpec::new(sqlite_url(&dir), emu.running.url());
    // Each `name` becomes TOKEN_BROKER_{NAME}: none is a server setting.
    let mut serve = ServeProcess::start(
        &spec,
        &[
            ("addr", "https://broker.example:443"),
            ("api_key_file", "/var/run/secrets/api-key"),
            ("token_file", "/var/run/secrets/tokens/broker"),
            ("ca_file", "/etc/ssl/broker-ca.pem"),
            ("client_cert_file", "/etc/ssl/client.crt"),
            ("client_key_file", "/etc/ssl/client.key"),
            ("azure_devops_url", "https://dev.azure.com"),
        ],
    )
    .await;
    let mut client = serve.client(&spec.key("ci")).await;
    client
        .list_leases(token_broker::proto::v1::ListLeasesRequest::default())
        .await
        .expect("the broker serves");
    serve.sigterm().await;
}

/// A TCP listener that accepts connections and never answers: a broker
/// that froze (SIGSTOP) or a proxy that black-holes.
async fn hung_broker() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((inbound, _)) = listener.accept().await {
            held.push(inbound);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_is_retry_later_not_a_hang() {
    let (addr, task) = hung_broker().await;
    let addr = format!("http://{addr}");
    let run = cli(
        &["lease", "list", "--addr", &addr],
        &[(
            "TOKEN_BROKER_API_KEY",
            Some("tbk_wrong_key_0123456789abcdef0123456789"),
        )],
    )
    .await;
    task.abort();
    assert_eq!(run.code, 5, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
}
