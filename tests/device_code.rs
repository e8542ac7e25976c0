//! The broker's device-code sign-in (`upstream::device_code::sign_in`)
//! against the emulator over a real socket, with a spawned task playing
//! the operator in the browser through `/_emulator/device-codes/*`.

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::emulator::Emu;
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use token_broker::emulator::EmulatorConfig;
use token_broker::upstream::device_code::{
    login_scope, sign_in, DeviceCodeError, DevicePrompt, SignedIn,
};
use token_broker::upstream::entra::EntraConfig;

const CLIENT_ID: &str = "872cd9fa-d31f-45e0-9eab-6e460a02d1f1";

/// An emulator whose device codes ask for 1 s between polls.
async fn emulator() -> Emu {
    Emu::start(EmulatorConfig {
        device_code_interval: Duration::from_secs(1),
        ..EmulatorConfig::default()
    })
    .await
}

fn config(emu: &Emu) -> EntraConfig {
    EntraConfig {
        authority: url::Url::parse(&emu.running.url()).unwrap(),
        tenant: "organizations".into(),
        client_id: CLIENT_ID.into(),
        request_timeout: Duration::from_secs(5),
        ..EntraConfig::default()
    }
}

/// The operator at the browser: the emulator's test-only endpoints.
#[derive(Clone)]
struct Browser {
    http: reqwest::Client,
    base: String,
}

impl Browser {
    async fn post(&self, path: &str, body: Value) -> u16 {
        self.http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn approve(&self, prompt: &DevicePrompt, account: &str) {
        let body = json!({"userCode": prompt.user_code, "account": account});
        assert_eq!(
            self.post("/_emulator/device-codes/approve", body).await,
            200
        );
    }

    async fn decline(&self, prompt: &DevicePrompt) {
        let body = json!({"userCode": prompt.user_code});
        assert_eq!(
            self.post("/_emulator/device-codes/decline", body).await,
            200
        );
    }

    async fn slow_down(&self, prompt: &DevicePrompt) {
        let body = json!({"userCode": prompt.user_code});
        assert_eq!(
            self.post("/_emulator/device-codes/slow-down", body).await,
            200
        );
    }

    async fn advance_clock(&self, secs: i64) {
        let body = json!({"advanceSeconds": secs});
        assert_eq!(self.post("/_emulator/clock", body).await, 200);
    }

    async fn faults(&self, rules: Value) {
        let resp = self
            .http
            .put(format!("{}/_emulator/faults", self.base))
            .json(&rules)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
}

/// Runs `sign_in`; once the prompt is shown, `operator` acts in a spawned
/// task. Returns the outcome and the prompt.
async fn sign_in_while<F, Fut>(
    emu: &Emu,
    config: &EntraConfig,
    operator: F,
) -> (Result<SignedIn, DeviceCodeError>, DevicePrompt)
where
    F: FnOnce(Browser, DevicePrompt) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DevicePrompt>();
    let browser = Browser {
        http: emu.http.clone(),
        base: emu.running.url(),
    };
    let task = tokio::spawn(async move {
        let prompt = rx.recv().await.expect("the prompt was shown");
        operator(browser, prompt.clone()).await;
        prompt
    });
    let result = sign_in(config, move |prompt| {
        let _ = tx.send(prompt.clone());
    })
    .await;
    (result, task.await.expect("operator task"))
}

#[tokio::test]
async fn an_approved_sign_in_yields_a_refresh_token_and_the_account() {
    let emu = emulator().await;
    let config = config(&emu);
    let (result, prompt) = sign_in_while(&emu, &config, |browser, prompt| async move {
        browser.approve(&prompt, "ops@contoso.com").await;
    })
    .await;
    let signed_in = result.expect("signed in");
    assert_eq!(signed_in.account.as_deref(), Some("ops@contoso.com"));
    assert!(prompt.message.contains(&prompt.user_code));
    assert_eq!(prompt.verification_uri, "https://microsoft.com/devicelogin");
    assert_eq!(prompt.expires_in, Duration::from_secs(900));
    assert_eq!(prompt.interval, Duration::from_secs(1));
    let debug = format!("{signed_in:?}");
    assert!(!debug.contains(signed_in.refresh_token.expose_secret()));
    assert!(!debug.contains(signed_in.access_token.expose_secret()));

    // The refresh token is the account's, and works with the broker's scope.
    let resp = emu
        .http
        .post(emu.url("/organizations/oauth2/v2.0/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT_ID),
            ("refresh_token", signed_in.refresh_token.expose_secret()),
            ("scope", login_scope(&config).as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let id_token = body["id_token"].as_str().unwrap();
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(id_token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["preferred_username"], "ops@contoso.com");
}

#[tokio::test]
async fn a_declined_sign_in_says_so() {
    let emu = emulator().await;
    let (result, _) = sign_in_while(&emu, &config(&emu), |browser, prompt| async move {
        browser.decline(&prompt).await;
    })
    .await;
    let err = result.unwrap_err();
    assert!(matches!(err, DeviceCodeError::Declined), "{err:?}");
    assert_eq!(err.to_string(), "the sign-in was declined in the browser");
}

#[tokio::test]
async fn an_expired_code_says_to_run_the_command_again() {
    let emu = emulator().await;
    let (result, _) = sign_in_while(&emu, &config(&emu), |browser, _| async move {
        browser.advance_clock(901).await;
    })
    .await;
    let err = result.unwrap_err();
    assert!(matches!(err, DeviceCodeError::Expired), "{err:?}");
    assert!(err.to_string().contains("run the command again"), "{err}");
}

#[tokio::test]
async fn slow_down_widens_the_interval_for_later_polls() {
    let emu = emulator().await;
    let started = Instant::now();
    let (result, _) = sign_in_while(&emu, &config(&emu), |browser, prompt| async move {
        // The first poll (after 1 s) gets slow_down; approval waits for
        // the second, which must come 1 + 5 s later.
        browser.slow_down(&prompt).await;
        browser.approve(&prompt, "ops@contoso.com").await;
    })
    .await;
    result.expect("signed in");
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
    // devicecode + two polls: no poll in between, none refused as too fast.
    assert_eq!(emu.stats().await["calls"]["token"], 3);
}

#[tokio::test]
async fn a_failing_poll_is_retried_at_the_interval() {
    let emu = emulator().await;
    let (result, _) = sign_in_while(&emu, &config(&emu), |browser, prompt| async move {
        browser
            .faults(json!([{"operation": "token", "status": 503, "times": 1}]))
            .await;
        browser.approve(&prompt, "ops@contoso.com").await;
    })
    .await;
    assert_eq!(
        result.expect("signed in after the 503").account.as_deref(),
        Some("ops@contoso.com")
    );
    assert_eq!(emu.stats().await["calls"]["token"], 3);
}

#[tokio::test]
async fn a_sign_in_that_cannot_start_is_explained() {
    // The devicecode endpoint answers 503: nothing to poll.
    let emu = emulator().await;
    let resp = emu
        .http
        .put(emu.url("/_emulator/faults"))
        .json(&json!([{"operation": "token", "status": 503, "times": 1}]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let err = sign_in(&config(&emu), |_| panic!("no prompt without a code"))
        .await
        .unwrap_err();
    assert!(matches!(err, DeviceCodeError::Unavailable(_)), "{err:?}");

    // No client id: refused before any request.
    let err = sign_in(
        &EntraConfig {
            client_id: String::new(),
            ..config(&emu)
        },
        |_| panic!("no prompt"),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("client_id"), "{err}");

    // Nothing listening: unavailable, in words.
    let addr = emu.running.addr();
    drop(emu);
    let err = sign_in(
        &EntraConfig {
            authority: url::Url::parse(&format!("http://{addr}")).unwrap(),
            tenant: "organizations".into(),
            client_id: CLIENT_ID.into(),
            request_timeout: Duration::from_secs(2),
            ..EntraConfig::default()
        },
        |_| panic!("no prompt"),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DeviceCodeError::Unavailable(_)), "{err:?}");
}
