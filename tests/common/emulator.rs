//! Test set-up for the Azure DevOps emulator: spawn it on a random port and
//! talk to it over a real socket with reqwest.

use serde_json::{json, Value};
use token_broker::emulator::{self, EmulatorConfig, RunningEmulator, DEFAULT_REFRESH_TOKEN};

/// api-version the broker's client pins (docs/upstream-api.md, Host, path
/// and api-version).
pub const API_VERSION: &str = "7.1-preview.1";

/// A running emulator plus an HTTP client pointed at it.
pub struct Emu {
    /// Keeps the emulator alive; it stops when dropped.
    pub running: RunningEmulator,
    /// Plain client (no default headers).
    pub http: reqwest::Client,
}

impl Emu {
    /// Starts an emulator with `config`.
    pub async fn start(config: EmulatorConfig) -> Emu {
        let running = emulator::spawn(config).await.expect("spawn emulator");
        Emu {
            running,
            http: reqwest::Client::new(),
        }
    }

    /// Starts an emulator with the default configuration.
    pub async fn start_default() -> Emu {
        Emu::start(EmulatorConfig::default()).await
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.running.url(), path)
    }

    /// The PAT API URL of `org` with `query` appended (no leading `?`).
    pub fn pats_url(&self, org: &str, query: &str) -> String {
        self.url(&format!("/{org}/_apis/tokens/pats?{query}"))
    }

    /// Runs the refresh-token grant with `refresh_token`; returns the answer.
    pub async fn refresh_grant(&self, refresh_token: &str) -> reqwest::Response {
        self.http
            .post(self.url("/organizations/oauth2/v2.0/token"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("client_id", "872cd9fa-d31f-45e0-9eab-6e460a02d1f1"),
                ("refresh_token", refresh_token),
                (
                    "scope",
                    "499b84ac-1321-427f-aa17-267ca6975798/.default offline_access",
                ),
            ])
            .send()
            .await
            .expect("token endpoint")
    }

    /// A user-delegated access token from the seeded refresh token.
    pub async fn user_bearer(&self) -> String {
        let resp = self.refresh_grant(DEFAULT_REFRESH_TOKEN).await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// An app-only access token (client-credentials grant).
    pub async fn app_bearer(&self) -> String {
        let resp = self
            .http
            .post(self.url("/organizations/oauth2/v2.0/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "3c1f0c53-0000-4000-8000-000000000001"),
                ("client_secret", "not-a-real-secret"),
                ("scope", "499b84ac-1321-427f-aa17-267ca6975798/.default"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// `POST` a create body with `bearer`; returns the JSON answer.
    pub async fn create(&self, bearer: &str, org: &str, body: Value) -> Value {
        let resp = self
            .http
            .post(self.pats_url(org, &format!("api-version={API_VERSION}")))
            .bearer_auth(bearer)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "create answered {}", resp.status());
        resp.json().await.unwrap()
    }

    /// Creates a PAT valid for `days` and returns `(authorizationId, token)`.
    pub async fn create_pat(
        &self,
        bearer: &str,
        org: &str,
        name: &str,
        scope: &str,
        days: i64,
    ) -> (String, String) {
        let valid_to = chrono::Utc::now() + chrono::Duration::days(days);
        let body = self
            .create(
                bearer,
                org,
                json!({"displayName": name, "scope": scope, "validTo": valid_to.to_rfc3339(), "allOrgs": false}),
            )
            .await;
        assert_eq!(body["patTokenError"], "none", "{body}");
        (
            body["patToken"]["authorizationId"]
                .as_str()
                .unwrap()
                .to_owned(),
            body["patToken"]["token"].as_str().unwrap().to_owned(),
        )
    }

    /// `GET` a data-plane path (`git/repositories`, `packaging/feeds`) of
    /// `org` with `pat` as Basic auth; returns the status.
    pub async fn use_pat(&self, org: &str, resource: &str, pat: &str) -> u16 {
        self.http
            .get(self.url(&format!("/{org}/_apis/{resource}?api-version=7.1")))
            .basic_auth("", Some(pat))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// `GET /_emulator/pats`.
    pub async fn pats(&self) -> Vec<Value> {
        self.http
            .get(self.url("/_emulator/pats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `GET /_emulator/stats`.
    pub async fn stats(&self) -> Value {
        self.http
            .get(self.url("/_emulator/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `DELETE /_emulator/stats`: counters to zero, request log emptied.
    pub async fn reset_stats(&self) {
        let resp = self
            .http
            .delete(self.url("/_emulator/stats"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
    }

    /// `GET /_emulator/requests`: the PAT API request log, oldest first.
    pub async fn requests(&self) -> Vec<Value> {
        self.http
            .get(self.url("/_emulator/requests"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `PUT /_emulator/faults` with `rules` (a JSON array).
    pub async fn set_faults(&self, rules: Value) {
        let resp = self
            .http
            .put(self.url("/_emulator/faults"))
            .json(&rules)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "{}",
            resp.text().await.unwrap_or_default()
        );
    }

    /// `DELETE /_emulator/faults`.
    pub async fn clear_faults(&self) {
        let resp = self
            .http
            .delete(self.url("/_emulator/faults"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
    }

    /// `POST /_emulator/clock` moving emulator time forward by `secs`.
    pub async fn advance_clock(&self, secs: i64) {
        let resp = self
            .http
            .post(self.url("/_emulator/clock"))
            .json(&json!({"advanceSeconds": secs}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
}
