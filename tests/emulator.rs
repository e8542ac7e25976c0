//! The Azure DevOps emulator over real sockets: Microsoft's example
//! exchanges, authentication, pagination, rounding, policies, the data
//! plane and every fault knob.

mod common;

use chrono::{Duration, Utc};
use common::emulator::{Emu, API_VERSION};
use reqwest::Method;
use serde_json::{json, Value};
use token_broker::emulator::{EmulatorConfig, LifespanMode, DEFAULT_REFRESH_TOKEN};

// ------------------------------------------------------------ helpers

const SPEC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/upstream-spec");

/// A spec or example file; Microsoft's files may begin with a UTF-8 BOM.
fn spec_file(relative: &str) -> Value {
    let text = std::fs::read_to_string(format!("{SPEC_DIR}/{relative}")).unwrap();
    serde_json::from_str(text.trim_start_matches('\u{feff}')).unwrap()
}

fn example(version: &str, name: &str) -> Value {
    spec_file(&format!("tokens/{version}/httpExamples/Pats/{name}.json"))
}

/// The example's path and query, host removed.
fn example_target(ex: &Value) -> String {
    let url = ex["x-ms-vss-request-url"].as_str().unwrap();
    url.strip_prefix("https://vssps.dev.azure.com")
        .unwrap()
        .to_owned()
}

fn example_answer(ex: &Value) -> (u16, Value) {
    let (status, answer) = ex["responses"].as_object().unwrap().iter().next().unwrap();
    (status.parse().unwrap(), answer["body"].clone())
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

/// Every `patTokenError` value of SPEC-7.2, from the spec file itself.
fn spec_error_values() -> Vec<String> {
    let spec = spec_file("tokens/7.2/tokens.json");
    spec["definitions"]["PatTokenResult"]["properties"]["patTokenError"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// Sends `method target` with an optional bearer and JSON body.
async fn send(
    emu: &Emu,
    method: Method,
    target: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = emu.http.request(method, emu.url(target));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.unwrap()
}

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

fn pats_target(org: &str, query: &str) -> String {
    format!("/{org}/_apis/tokens/pats?api-version={API_VERSION}{query}")
}

/// Tomorrow (emulator and wall clock agree unless a test moved it) at the
/// example's time of day.
fn tomorrow_at(time_of_day: &str) -> (String, String) {
    let date = (Utc::now() + Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    (date.clone(), format!("{date}T{time_of_day}"))
}

fn pre_rn270() -> EmulatorConfig {
    // Microsoft's examples date from 2020, before global PATs were retired.
    EmulatorConfig {
        block_global_creation: false,
        ..EmulatorConfig::default()
    }
}

// ------------------------------------------------- Microsoft's examples

#[tokio::test]
async fn microsofts_create_example_is_answered_in_the_same_shape() {
    for version in ["7.1", "7.2"] {
        for legacy in [false, true] {
            let emu = Emu::start(EmulatorConfig {
                legacy_tokens: legacy,
                ..EmulatorConfig::default()
            })
            .await;
            let bearer = emu.user_bearer().await;
            let ex = example(version, "CreatePat");
            let mut body = ex["parameters"]["body"].clone();
            // The example's 2020 date is past; keep its time of day and its .319.
            let (date, valid_to) = tomorrow_at("23:46:23.319Z");
            body["validTo"] = json!(valid_to);
            let (status, got) = json_of(
                send(
                    &emu,
                    Method::POST,
                    &example_target(&ex),
                    Some(&bearer),
                    Some(body.clone()),
                )
                .await,
            )
            .await;
            let (want_status, want) = example_answer(&ex);
            assert_eq!(status, want_status);
            assert_eq!(keys(&got), keys(&want));
            assert_eq!(keys(&got["patToken"]), keys(&want["patToken"]));
            assert_eq!(got["patTokenError"], want["patTokenError"]);
            for field in ["displayName", "scope", "targetAccounts"] {
                assert_eq!(got["patToken"][field], want["patToken"][field], "{field}");
            }
            // .319 is stored with datetime precision and comes back .32, as in the example.
            assert_eq!(
                got["patToken"]["validTo"],
                json!(format!("{date}T23:46:23.32Z"))
            );
            let token = got["patToken"]["token"].as_str().unwrap();
            let example_token = want["patToken"]["token"].as_str().unwrap();
            if legacy {
                assert_eq!(
                    token.len(),
                    example_token.len(),
                    "legacy tokens are 52 characters like the example's"
                );
                assert!(token
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
            } else {
                assert_eq!(token.len(), 84);
                assert_eq!(&token[76..80], "AZDO");
            }
        }
    }
}

#[tokio::test]
async fn microsofts_get_example_is_answered_for_the_id_asked_for() {
    for version in ["7.1", "7.2"] {
        let emu = Emu::start_default().await;
        let bearer = emu.user_bearer().await;
        let ex = example(version, "GetPat");
        let (_, want) = example_answer(&ex);
        let (id, _) = emu
            .create_pat(&bearer, "fabrikam", "analytics_token", "vso.analytics", 30)
            .await;
        // The example asks for cf42cc9f-… and answers 3d3aca0c-… (docs/
        // upstream-api.md, Documentation defects): the emulator answers the
        // id asked for.
        let asked = ex["parameters"]["authorizationId"].as_str().unwrap();
        assert_ne!(asked, want["patToken"]["authorizationId"].as_str().unwrap());
        let target = example_target(&ex).replace(asked, &id);
        let (status, got) =
            json_of(send(&emu, Method::GET, &target, Some(&bearer), None).await).await;
        assert_eq!(status, 200);
        assert_eq!(keys(&got), keys(&want));
        assert_eq!(keys(&got["patToken"]), keys(&want["patToken"]));
        assert_eq!(got["patToken"]["authorizationId"], json!(id));
        assert_eq!(got["patToken"]["token"], Value::Null);
        for field in ["displayName", "scope", "targetAccounts", "patTokenError"] {
            let (g, w) = if field == "patTokenError" {
                (&got[field], &want[field])
            } else {
                (&got["patToken"][field], &want["patToken"][field])
            };
            assert_eq!(g, w, "{field}");
        }
        // Asking for the example's id itself: not this user's PAT.
        let (status, missing) =
            json_of(send(&emu, Method::GET, &example_target(&ex), Some(&bearer), None).await).await;
        assert_eq!(status, 200);
        assert_eq!(missing["patToken"], Value::Null);
        assert_eq!(missing["patTokenError"], "authorizationNotFound");
    }
}

#[tokio::test]
async fn microsofts_list_example_is_answered_in_the_same_shape() {
    for version in ["7.1", "7.2"] {
        let emu = Emu::start(pre_rn270()).await;
        let bearer = emu.user_bearer().await;
        let ex = example(version, "ListPats");
        let (want_status, want) = example_answer(&ex);
        for item in want["patTokens"].as_array().unwrap() {
            let body = json!({
                "displayName": item["displayName"], "scope": item["scope"],
                "validTo": (Utc::now() + Duration::days(20)).to_rfc3339(),
                "allOrgs": item["targetAccounts"].is_null(),
            });
            let created = emu.create(&bearer, "fabrikam", body).await;
            assert_eq!(created["patTokenError"], "none", "{created}");
        }
        let (status, got) =
            json_of(send(&emu, Method::GET, &example_target(&ex), Some(&bearer), None).await).await;
        assert_eq!(status, want_status);
        assert_eq!(keys(&got), keys(&want));
        assert_eq!(got["continuationToken"], "");
        let got_items = got["patTokens"].as_array().unwrap();
        assert_eq!(got_items.len(), want["patTokens"].as_array().unwrap().len());
        for item in got_items {
            assert_eq!(keys(item), keys(&want["patTokens"][0]));
            assert_eq!(item["token"], Value::Null);
        }
        let globals = |items: &[Value]| {
            items
                .iter()
                .filter(|i| i["targetAccounts"].is_null())
                .count()
        };
        assert_eq!(
            globals(got_items),
            globals(want["patTokens"].as_array().unwrap())
        );
        let mut got_names: Vec<&str> = got_items
            .iter()
            .map(|i| i["displayName"].as_str().unwrap())
            .collect();
        let mut want_names: Vec<&str> = want["patTokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["displayName"].as_str().unwrap())
            .collect();
        got_names.sort();
        want_names.sort();
        assert_eq!(got_names, want_names);
    }
}

#[tokio::test]
async fn microsofts_update_example_is_answered_in_the_same_shape() {
    for version in ["7.1", "7.2"] {
        let emu = Emu::start(pre_rn270()).await;
        let bearer = emu.user_bearer().await;
        let ex = example(version, "UpdatePat");
        let (want_status, want) = example_answer(&ex);
        let (id, _) = emu
            .create_pat(&bearer, "fabrikam", "analytics_token", "vso.analytics", 5)
            .await;
        let before = emu.pats().await;
        let mut body = ex["parameters"]["body"].clone();
        body["authorizationId"] = json!(id);
        let (date, valid_to) = tomorrow_at("23:46:23.319Z");
        body["validTo"] = json!(valid_to);
        let (status, got) = json_of(
            send(
                &emu,
                Method::PUT,
                &example_target(&ex),
                Some(&bearer),
                Some(body),
            )
            .await,
        )
        .await;
        assert_eq!(status, want_status);
        assert_eq!(keys(&got), keys(&want));
        assert_eq!(keys(&got["patToken"]), keys(&want["patToken"]));
        for field in ["displayName", "scope", "targetAccounts", "token"] {
            assert_eq!(got["patToken"][field], want["patToken"][field], "{field}");
        }
        assert_eq!(got["patTokenError"], "none");
        assert_eq!(
            got["patToken"]["validTo"],
            json!(format!("{date}T23:46:23.32Z"))
        );
        // validFrom is the creation time, unchanged by an update.
        assert_eq!(got["patToken"]["validFrom"], before[0]["validFrom"]);
    }
}

#[tokio::test]
async fn microsofts_revoke_example_is_answered_204() {
    for version in ["7.1", "7.2"] {
        let emu = Emu::start_default().await;
        let bearer = emu.user_bearer().await;
        let ex = example(version, "RevokePat");
        let (want_status, want) = example_answer(&ex);
        let (id, _) = emu
            .create_pat(&bearer, "fabrikam", "to-revoke", "vso.code", 5)
            .await;
        let asked = ex["parameters"]["authorizationId"].as_str().unwrap();
        let target = example_target(&ex).replace(asked, &id);
        let resp = send(&emu, Method::DELETE, &target, Some(&bearer), None).await;
        assert_eq!(resp.status().as_u16(), want_status);
        // The example shows `{}`; a 204 cannot carry a body, so it arrives empty.
        assert_eq!(want, json!({}));
        assert!(resp.text().await.unwrap().is_empty());
        assert_eq!(emu.pats().await[0]["state"], "revoked");
    }
}

#[tokio::test]
async fn every_refusal_the_emulator_gives_is_a_value_of_the_spec_enum() {
    let emu = Emu::start(EmulatorConfig {
        restrict_full_scope: true,
        max_lifespan_days: Some(7),
        lifespan_mode: LifespanMode::Reject,
        ..EmulatorConfig::default()
    })
    .await;
    let bearer = emu.user_bearer().await;
    let allowed = spec_error_values();
    let future = (Utc::now() + Duration::days(2)).to_rfc3339();
    let bodies = [
        json!({"scope": "vso.code", "validTo": future}),
        json!({"displayName": "x", "scope": "vso.nonsense", "validTo": future}),
        json!({"displayName": "x", "scope": "app_token", "validTo": future}),
        json!({"displayName": "x", "scope": "vso.code", "validTo": future, "allOrgs": true}),
        json!({"displayName": "x", "scope": "vso.code", "validTo": "2001-01-01T00:00:00Z"}),
        json!({"displayName": "x", "scope": "vso.code", "validTo": (Utc::now() + Duration::days(30)).to_rfc3339()}),
    ];
    for body in bodies {
        let got = emu.create(&bearer, "fabrikam", body.clone()).await;
        let error = got["patTokenError"].as_str().unwrap();
        assert_ne!(error, "none", "{body}");
        assert!(
            allowed.iter().any(|a| a == error),
            "{error} is not in the spec"
        );
        assert_eq!(got["patToken"], Value::Null);
    }
}

// --------------------------------------------------------- lifecycle

#[tokio::test]
async fn each_step_of_a_pats_life_sees_the_ones_before() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let (id, token) = emu
        .create_pat(&bearer, "fabrikam", "ci-agent", "vso.code_write", 1)
        .await;

    let (_, got) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", &format!("&authorizationId={id}")),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(got["patToken"]["displayName"], "ci-agent");
    assert_eq!(got["patToken"]["token"], Value::Null);

    let new_valid_to = (Utc::now() + Duration::days(3))
        .format("%Y-%m-%dT%H:%M:%S.5Z")
        .to_string();
    let (_, updated) = json_of(
        send(
            &emu,
            Method::PUT,
            &pats_target("fabrikam", ""),
            Some(&bearer),
            Some(json!({"authorizationId": id, "validTo": new_valid_to})),
        )
        .await,
    )
    .await;
    // Omitted fields are kept.
    assert_eq!(updated["patToken"]["displayName"], "ci-agent");
    assert_eq!(updated["patToken"]["scope"], "vso.code_write");
    let (_, got) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", &format!("&authorizationId={id}")),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(got["patToken"]["validTo"], json!(new_valid_to));

    assert_eq!(
        emu.use_pat("fabrikam", "git/repositories", &token).await,
        200
    );
    let resp = send(
        &emu,
        Method::DELETE,
        &pats_target("fabrikam", &format!("&authorizationId={id}")),
        Some(&bearer),
        None,
    )
    .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(
        emu.use_pat("fabrikam", "git/repositories", &token).await,
        401
    );
    let (_, revoked) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", "&displayFilterOption=revoked"),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(revoked["patTokens"][0]["authorizationId"], json!(id));
    let pats = emu.pats().await;
    assert_eq!(pats[0]["state"], "revoked");
    assert!(
        !serde_json::to_string(&pats).unwrap().contains(&token),
        "/_emulator/pats never shows a secret"
    );
    // Revoking again still succeeds.
    let resp = send(
        &emu,
        Method::DELETE,
        &pats_target("fabrikam", &format!("&authorizationId={id}")),
        Some(&bearer),
        None,
    )
    .await;
    assert_eq!(resp.status(), 204);
    // A revoked PAT cannot be updated.
    let (_, refused) = json_of(
        send(
            &emu,
            Method::PUT,
            &pats_target("fabrikam", ""),
            Some(&bearer),
            Some(json!({"authorizationId": id, "displayName": "again"})),
        )
        .await,
    )
    .await;
    assert_eq!(refused["patToken"], Value::Null);
    assert_ne!(refused["patTokenError"], "none");
}

#[tokio::test]
async fn unknown_ids_are_answered_authorization_not_found() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let (status, got) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", &format!("&authorizationId={unknown}")),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, got["patTokenError"].as_str()),
        (200, Some("authorizationNotFound"))
    );
    let (status, got) = json_of(
        send(
            &emu,
            Method::PUT,
            &pats_target("fabrikam", ""),
            Some(&bearer),
            Some(json!({"authorizationId": unknown, "displayName": "x"})),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, got["patTokenError"].as_str()),
        (200, Some("authorizationNotFound"))
    );
    let (status, got) = json_of(
        send(
            &emu,
            Method::DELETE,
            &pats_target("fabrikam", &format!("&authorizationId={unknown}")),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, got["patTokenError"].as_str()),
        (200, Some("authorizationNotFound"))
    );
    // A PAT of another organization is not found here either.
    let (id, _) = emu
        .create_pat(&bearer, "contoso", "other-org", "vso.code", 1)
        .await;
    let (_, got) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", &format!("&authorizationId={id}")),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(got["patTokenError"], "authorizationNotFound");
}

#[tokio::test]
async fn bad_create_requests_get_the_documented_refusals() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let future = (Utc::now() + Duration::days(2)).to_rfc3339();
    let cases = [
        (
            json!({"displayName": "", "scope": "vso.code", "validTo": future}),
            "displayNameRequired",
        ),
        (
            json!({"displayName": "x", "scope": "vso.code vso.bogus", "validTo": future}),
            "invalidScope",
        ),
        (
            json!({"displayName": "x", "scope": "", "validTo": future}),
            "invalidScope",
        ),
        (
            json!({"displayName": "x", "scope": "vso.code", "validTo": "2020-01-01T00:00:00Z"}),
            "invalidValidTo",
        ),
        (
            json!({"displayName": "x", "scope": "vso.code", "validTo": future, "allOrgs": true}),
            "globalPATCreationBlocked",
        ),
    ];
    for (body, want) in cases {
        let got = emu.create(&bearer, "fabrikam", body.clone()).await;
        assert_eq!(got["patTokenError"], want, "{body}");
        assert_eq!(got["patToken"], Value::Null);
    }
    // A body the JSON reader cannot read: 400 JsonReaderException.
    let resp = emu
        .http
        .post(emu.url(&pats_target("fabrikam", "")))
        .bearer_auth(&bearer)
        .header("content-type", "application/json")
        .body("{\"displayName\": ")
        .send()
        .await
        .unwrap();
    let (status, envelope) = json_of(resp).await;
    assert_eq!(status, 400);
    assert_eq!(envelope["typeKey"], "JsonReaderException");
    assert!(envelope["message"]
        .as_str()
        .unwrap()
        .starts_with("TF400898"));
    let (status, envelope) = json_of(
        send(
            &emu,
            Method::POST,
            &pats_target("fabrikam", ""),
            Some(&bearer),
            Some(json!({"displayName": "x", "scope": "vso.code", "validTo": "soon"})),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, envelope["typeKey"].as_str()),
        (400, Some("JsonReaderException"))
    );
    // Field names bind case-insensitively, as the service's JSON reader does.
    let got = emu
        .create(
            &bearer,
            "fabrikam",
            json!({"DisplayName": "x", "SCOPE": "vso.code", "validto": future}),
        )
        .await;
    assert_eq!(got["patTokenError"], "none");
}

#[tokio::test]
async fn api_72_answers_carry_an_error_message_and_older_ones_do_not() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let body = json!({"displayName": "", "scope": "vso.code"});
    let (_, v72) = json_of(
        send(
            &emu,
            Method::POST,
            "/fabrikam/_apis/tokens/pats?api-version=7.2-preview.1",
            Some(&bearer),
            Some(body.clone()),
        )
        .await,
    )
    .await;
    assert!(v72["patTokenErrorMessage"].is_string());
    let (_, v71) = json_of(
        send(
            &emu,
            Method::POST,
            "/fabrikam/_apis/tokens/pats?api-version=7.1-preview.1",
            Some(&bearer),
            Some(body),
        )
        .await,
    )
    .await;
    assert!(v71.get("patTokenErrorMessage").is_none());
}

#[tokio::test]
async fn an_expired_pat_cannot_be_extended_and_is_listed_as_expired() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let (id, _) = emu
        .create_pat(&bearer, "fabrikam", "short", "vso.code", 1)
        .await;
    emu.advance_clock(2 * 86_400).await;
    let bearer = emu.user_bearer().await; // the old access token expired with the clock
    let far = (Utc::now() + Duration::days(10)).to_rfc3339();
    let (_, got) = json_of(
        send(
            &emu,
            Method::PUT,
            &pats_target("fabrikam", ""),
            Some(&bearer),
            Some(json!({"authorizationId": id, "validTo": far})),
        )
        .await,
    )
    .await;
    assert_eq!(got["patTokenError"], "expiredPatCannotBeExtended");
    let (_, list) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", "&displayFilterOption=expired"),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(list["patTokens"][0]["authorizationId"], json!(id));
    let (_, list) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", "&displayFilterOption=active"),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(list["patTokens"].as_array().unwrap().len(), 0);
    assert_eq!(emu.pats().await[0]["state"], "expired");
}

// -------------------------------------------------- paths and versions

#[tokio::test]
async fn paths_match_case_insensitively_with_repeated_slashes_collapsed() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    for path in [
        "/fabrikam/_apis/tokens/pats",
        "/FabriKam/_APIS/Tokens/Pats",
        "//fabrikam///_apis//tokens/pats/",
    ] {
        let resp = send(
            &emu,
            Method::GET,
            &format!("{path}?api-version={API_VERSION}"),
            Some(&bearer),
            None,
        )
        .await;
        assert_eq!(resp.status(), 200, "{path}");
    }
    // Organizations are one whatever their case.
    emu.create_pat(&bearer, "Fabrikam", "mixed-case", "vso.code", 1)
        .await;
    let (_, list) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("FABRIKAM", ""),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(list["patTokens"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn every_documented_api_version_form_is_accepted() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    for v in [
        "6.1-preview",
        "6.1-preview.1",
        "7.0-preview.1",
        "7.1-preview",
        "7.1-preview.1",
        "7.1",
        "7.2-preview.1",
    ] {
        let resp = send(
            &emu,
            Method::GET,
            &format!("/fabrikam/_apis/tokens/pats?api-version={v}"),
            Some(&bearer),
            None,
        )
        .await;
        assert_eq!(resp.status(), 200, "{v}");
    }
    // Also through the Accept header.
    let resp = emu
        .http
        .get(emu.url("/fabrikam/_apis/tokens/pats"))
        .bearer_auth(&bearer)
        .header("accept", "application/json;api-version=7.1-preview.1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_malformed_api_version_gets_the_services_error() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let (status, envelope) = json_of(
        send(
            &emu,
            Method::GET,
            "/fabrikam/_apis/tokens/pats?api-version=4.1.",
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        envelope["message"],
        "Invalid api version string: \"4.1.\". Api version string must be in the format: {Major}.{Minor}[-preview[.{ResourceVersion}]]."
    );
    for key in [
        "$id",
        "innerException",
        "message",
        "typeName",
        "typeKey",
        "errorCode",
        "eventId",
    ] {
        assert!(envelope.get(key).is_some(), "envelope lacks {key}");
    }
    let (status, _) = json_of(
        send(
            &emu,
            Method::GET,
            "/fabrikam/_apis/tokens/pats",
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "api-version is required");
    let (status, _) = json_of(
        send(
            &emu,
            Method::GET,
            "/fabrikam/_apis/tokens/pats?api-version=5.0",
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "the API did not exist in 5.0");
}

// ------------------------------------------------------ authentication

/// Adds one kind of credential to a request.
type Authenticate = Box<dyn Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder>;

#[tokio::test]
async fn the_pat_api_refuses_app_only_tokens_pats_and_anonymous_callers() {
    let emu = Emu::start_default().await;
    let user = emu.user_bearer().await;
    let (_, pat) = emu
        .create_pat(&user, "fabrikam", "a-pat", "vso.code", 1)
        .await;
    let app = emu.app_bearer().await;
    let target = pats_target("fabrikam", "");
    let callers: Vec<(&str, Authenticate)> = vec![
        ("app-only token", Box::new(move |r| r.bearer_auth(&app))),
        (
            "PAT as Basic",
            Box::new({
                let pat = pat.clone();
                move |r| r.basic_auth("", Some(&pat))
            }),
        ),
        (
            "PAT as Bearer",
            Box::new({
                let pat = pat.clone();
                move |r| r.bearer_auth(&pat)
            }),
        ),
        (
            "unknown bearer",
            Box::new(|r| r.bearer_auth("eyJ0eXAiOiJKV1QifQ.e30.forged")),
        ),
        ("nobody", Box::new(|r| r)),
    ];
    for (who, auth) in &callers {
        // Without Suppress: 203 with the HTML sign-in page.
        let resp = auth(emu.http.get(emu.url(&target))).send().await.unwrap();
        assert_eq!(resp.status(), 203, "{who}");
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{who}"
        );
        // With Suppress: 401 JSON TF400813.
        let resp = auth(
            emu.http
                .get(emu.url(&target))
                .header("X-TFS-FedAuthRedirect", "Suppress"),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(resp.status(), 401, "{who}");
        assert!(resp.headers().contains_key("x-tfs-serviceerror"));
        let (_, envelope) = json_of(resp).await;
        assert_eq!(envelope["typeKey"], "UnauthorizedRequestException", "{who}");
        assert!(
            envelope["message"]
                .as_str()
                .unwrap()
                .starts_with("TF400813"),
            "{who}"
        );
    }
    // Nothing was created by refused callers.
    let resp = emu
        .http
        .post(emu.url(&target))
        .json(&json!({"displayName": "x", "scope": "vso.code"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 203);
    assert_eq!(emu.pats().await.len(), 1);
}

#[tokio::test]
async fn an_expired_access_token_is_refused() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    emu.advance_clock(3600).await;
    let resp = emu
        .http
        .get(emu.url(&pats_target("fabrikam", "")))
        .bearer_auth(&bearer)
        .header("X-TFS-FedAuthRedirect", "Suppress")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn every_refresh_grant_rotates_the_refresh_token_and_old_ones_stay_valid() {
    let emu = Emu::start_default().await;
    let first: Value = emu
        .refresh_grant(DEFAULT_REFRESH_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 3599);
    let rotated = first["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rotated, DEFAULT_REFRESH_TOKEN);
    let second: Value = emu.refresh_grant(&rotated).await.json().await.unwrap();
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert_ne!(second["access_token"], first["access_token"]);
    // The old ones are still good, as in Entra.
    assert_eq!(emu.refresh_grant(DEFAULT_REFRESH_TOKEN).await.status(), 200);
    assert_eq!(emu.refresh_grant(&rotated).await.status(), 200);
    assert_eq!(emu.stats().await["calls"]["token"], 4);
}

#[tokio::test]
async fn a_revoked_refresh_token_gets_invalid_grant() {
    let emu = Emu::start_default().await;
    let first: Value = emu
        .refresh_grant(DEFAULT_REFRESH_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    let rotated = first["refresh_token"].as_str().unwrap().to_owned();
    let resp = emu
        .http
        .post(emu.url("/_emulator/refresh-tokens/revoke"))
        .json(&json!({"refreshToken": rotated}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap()["revoked"], 1);
    let (status, body) = json_of(emu.refresh_grant(&rotated).await).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .starts_with("AADSTS"));
    assert!(body["error_codes"].is_array());
    assert!(
        !body.to_string().contains(&rotated),
        "the error never echoes the token"
    );
    // Others are untouched until every session is revoked.
    assert_eq!(emu.refresh_grant(DEFAULT_REFRESH_TOKEN).await.status(), 200);
    emu.http
        .post(emu.url("/_emulator/refresh-tokens/revoke"))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(emu.refresh_grant(DEFAULT_REFRESH_TOKEN).await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    // An unknown one is refused the same way.
    let (status, body) = json_of(emu.refresh_grant("never-issued").await).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
}

#[tokio::test]
async fn the_token_endpoint_refuses_malformed_requests() {
    let emu = Emu::start_default().await;
    let token_url = emu.url("/common/oauth2/v2.0/token");
    let (status, body) = json_of(
        emu.http
            .post(&token_url)
            .form(&[("grant_type", "password"), ("client_id", "x")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let (status, body) = json_of(
        emu.http
            .post(&token_url)
            .form(&[("grant_type", "refresh_token"), ("client_id", "x")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = json_of(
        emu.http
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "x"),
                ("client_secret", "s"),
                ("scope", "vso.pats"),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope"))
    );
}

#[tokio::test]
async fn the_seed_refresh_token_is_configurable() {
    let emu = Emu::start(EmulatorConfig {
        refresh_token: "my-seed".into(),
        ..EmulatorConfig::default()
    })
    .await;
    assert_eq!(emu.refresh_grant("my-seed").await.status(), 200);
    assert_eq!(emu.refresh_grant(DEFAULT_REFRESH_TOKEN).await.status(), 400);
}

// ------------------------------------------------------------ listing

async fn list_page(emu: &Emu, bearer: &str, query: &str) -> Value {
    let (status, page) = json_of(
        send(
            emu,
            Method::GET,
            &pats_target("fabrikam", query),
            Some(bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    page
}

#[tokio::test]
async fn a_long_list_comes_in_pages_with_the_token_in_the_body() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    for i in 0..7 {
        emu.create_pat(&bearer, "fabrikam", &format!("pat-{i}"), "vso.code", 1)
            .await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list_page(
            &emu,
            &bearer,
            &format!("&$top=3&continuationToken={}", urlencode(&token)),
        )
        .await;
        pages += 1;
        for item in page["patTokens"].as_array().unwrap() {
            seen.push(item["displayName"].as_str().unwrap().to_owned());
        }
        token = page["continuationToken"].as_str().unwrap().to_owned();
        if token.is_empty() {
            break;
        }
        assert!(pages < 10);
    }
    assert_eq!(pages, 3);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 7);
    // Default order is by creation, ascending.
    assert_eq!(seen, (0..7).map(|i| format!("pat-{i}")).collect::<Vec<_>>());
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn top_is_capped_at_100() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    for i in 0..101 {
        emu.create_pat(&bearer, "fabrikam", &format!("p{i:03}"), "vso.code", 1)
            .await;
    }
    let page = list_page(&emu, &bearer, "&$top=500").await;
    assert_eq!(page["patTokens"].as_array().unwrap().len(), 100);
    assert_ne!(page["continuationToken"], "");
    let rest = list_page(
        &emu,
        &bearer,
        &format!(
            "&$top=500&continuationToken={}",
            urlencode(page["continuationToken"].as_str().unwrap())
        ),
    )
    .await;
    assert_eq!(rest["patTokens"].as_array().unwrap().len(), 1);
    assert_eq!(rest["continuationToken"], "");
    let (status, _) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", "&$top=0"),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn lists_filter_and_sort_as_asked() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let (b, _) = emu
        .create_pat(&bearer, "fabrikam", "bravo", "vso.code", 1)
        .await;
    emu.create_pat(&bearer, "fabrikam", "alpha", "vso.code", 1)
        .await;
    emu.create_pat(&bearer, "fabrikam", "Charlie", "vso.code", 1)
        .await;
    send(
        &emu,
        Method::DELETE,
        &pats_target("fabrikam", &format!("&authorizationId={b}")),
        Some(&bearer),
        None,
    )
    .await;
    let names = |page: &Value| {
        page["patTokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["displayName"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let page = list_page(
        &emu,
        &bearer,
        "&displayFilterOption=all&sortByOption=displayName&isSortAscending=false",
    )
    .await;
    assert_eq!(names(&page), ["Charlie", "bravo", "alpha"]);
    let page = list_page(
        &emu,
        &bearer,
        "&displayFilterOption=active&sortByOption=displayName&isSortAscending=true",
    )
    .await;
    assert_eq!(names(&page), ["alpha", "Charlie"]);
    let page = list_page(&emu, &bearer, "&displayFilterOption=revoked").await;
    assert_eq!(names(&page), ["bravo"]);
    let page = list_page(
        &emu,
        &bearer,
        "&displayFilterOption=all&sortByOption=status",
    )
    .await;
    assert_eq!(names(&page).last().unwrap(), "bravo");
    // Another organization's list is its own.
    let (_, other) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("contoso", "&displayFilterOption=all"),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(other["patTokens"].as_array().unwrap().len(), 0);
    let (status, _) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", "&displayFilterOption=someday"),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_continuation_token_only_works_with_the_options_it_came_from() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    for i in 0..3 {
        emu.create_pat(&bearer, "fabrikam", &format!("p{i}"), "vso.code", 1)
            .await;
    }
    let page = list_page(&emu, &bearer, "&$top=1&displayFilterOption=active").await;
    let token = urlencode(page["continuationToken"].as_str().unwrap());
    let (status, _) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target(
                "fabrikam",
                &format!("&$top=1&displayFilterOption=all&continuationToken={token}"),
            ),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", "&continuationToken=garbage"),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 400);
}

// ---------------------------------------------------- time and policy

#[tokio::test]
async fn valid_to_is_rounded_like_sql_server_datetime_whatever_its_form() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let (date, _) = tomorrow_at("");
    let cases = [
        (
            format!("{date}T10:00:00.319Z"),
            format!("{date}T10:00:00.32Z"),
        ),
        (
            format!("{date}T10:00:00.5233333Z"),
            format!("{date}T10:00:00.5233333Z"),
        ),
        (
            format!("{date}T10:00:00.001999999999Z"),
            format!("{date}T10:00:00.0033333Z"),
        ),
        (
            format!("{date}T12:00:00.1+02:00"),
            format!("{date}T10:00:00.1Z"),
        ),
        (format!("{date}T10:00:00"), format!("{date}T10:00:00Z")),
        (format!("{date}T10:00:00.000Z"), format!("{date}T10:00:00Z")),
    ];
    for (sent, want) in cases {
        let got = emu
            .create(
                &bearer,
                "fabrikam",
                json!({"displayName": "r", "scope": "vso.code", "validTo": sent}),
            )
            .await;
        assert_eq!(got["patToken"]["validTo"], json!(want), "sent {sent}");
    }
}

#[tokio::test]
async fn the_max_lifespan_policy_clamps_valid_to() {
    let emu = Emu::start(EmulatorConfig {
        max_lifespan_days: Some(7),
        ..EmulatorConfig::default()
    })
    .await;
    let bearer = emu.user_bearer().await;
    let got = emu.create(&bearer, "fabrikam", json!({"displayName": "long", "scope": "vso.code", "validTo": (Utc::now() + Duration::days(30)).to_rfc3339()})).await;
    assert_eq!(got["patTokenError"], "none");
    let from = chrono::DateTime::parse_from_rfc3339(got["patToken"]["validFrom"].as_str().unwrap())
        .unwrap();
    let to =
        chrono::DateTime::parse_from_rfc3339(got["patToken"]["validTo"].as_str().unwrap()).unwrap();
    assert!(
        (to - from - Duration::days(7)).num_milliseconds().abs() <= 5,
        "clamped to validFrom + 7 days"
    );
    // Update clamps to the creation date + max.
    let id = got["patToken"]["authorizationId"].clone();
    let (_, updated) = json_of(send(&emu, Method::PUT, &pats_target("fabrikam", ""), Some(&bearer), Some(json!({"authorizationId": id, "validTo": (Utc::now() + Duration::days(60)).to_rfc3339()}))).await).await;
    assert_eq!(updated["patToken"]["validTo"], got["patToken"]["validTo"]);
}

#[tokio::test]
async fn the_max_lifespan_policy_can_reject_instead() {
    let emu = Emu::start(EmulatorConfig {
        max_lifespan_days: Some(7),
        lifespan_mode: LifespanMode::Reject,
        ..EmulatorConfig::default()
    })
    .await;
    let bearer = emu.user_bearer().await;
    let got = emu.create(&bearer, "fabrikam", json!({"displayName": "long", "scope": "vso.code", "validTo": (Utc::now() + Duration::days(30)).to_rfc3339()})).await;
    assert_eq!(got["patTokenError"], "patLifespanPolicyViolation");
    assert_eq!(got["patToken"], Value::Null);
    let ok = emu.create(&bearer, "fabrikam", json!({"displayName": "short", "scope": "vso.code", "validTo": (Utc::now() + Duration::days(6)).to_rfc3339()})).await;
    assert_eq!(ok["patTokenError"], "none");
}

#[tokio::test]
async fn full_scope_and_global_pats_are_refused_when_restricted() {
    let emu = Emu::start(EmulatorConfig {
        restrict_full_scope: true,
        restrict_global: true,
        block_global_creation: false,
        ..EmulatorConfig::default()
    })
    .await;
    let bearer = emu.user_bearer().await;
    let future = (Utc::now() + Duration::days(2)).to_rfc3339();
    let got = emu
        .create(
            &bearer,
            "fabrikam",
            json!({"displayName": "all", "scope": "app_token", "validTo": future}),
        )
        .await;
    assert_eq!(got["patTokenError"], "fullScopePatPolicyViolation");
    let got = emu.create(&bearer, "fabrikam", json!({"displayName": "global", "scope": "vso.code", "validTo": future, "allOrgs": true})).await;
    assert_eq!(got["patTokenError"], "globalPatPolicyViolation");
    // Updating a PAT to full scope is refused too.
    let (id, _) = emu
        .create_pat(&bearer, "fabrikam", "narrow", "vso.code", 1)
        .await;
    let (_, got) = json_of(
        send(
            &emu,
            Method::PUT,
            &pats_target("fabrikam", ""),
            Some(&bearer),
            Some(json!({"authorizationId": id, "scope": "app_token"})),
        )
        .await,
    )
    .await;
    assert_eq!(got["patTokenError"], "fullScopePatPolicyViolation");
}

#[tokio::test]
async fn global_pats_are_blocked_since_their_retirement() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let got = emu.create(&bearer, "fabrikam", json!({"displayName": "global", "scope": "vso.code", "validTo": (Utc::now() + Duration::days(2)).to_rfc3339(), "allOrgs": true})).await;
    assert_eq!(got["patTokenError"], "globalPATCreationBlocked");
}

// ---------------------------------------------------------- data plane

#[tokio::test]
async fn the_data_plane_accepts_a_pat_only_within_its_scope_and_organization() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let (_, code) = emu
        .create_pat(&bearer, "fabrikam", "code", "vso.code_write", 1)
        .await;
    let (_, packaging) = emu
        .create_pat(&bearer, "fabrikam", "feeds", "vso.packaging_write", 1)
        .await;
    let (_, full) = emu
        .create_pat(&bearer, "fabrikam", "full", "app_token", 1)
        .await;
    assert_eq!(
        emu.use_pat("fabrikam", "git/repositories", &code).await,
        200
    );
    assert_eq!(
        emu.use_pat("FABRIKAM", "git/repositories", &code).await,
        200
    );
    assert_eq!(
        emu.use_pat("fabrikam", "packaging/feeds", &code).await,
        401,
        "code PAT on feeds"
    );
    assert_eq!(
        emu.use_pat("fabrikam", "packaging/feeds", &packaging).await,
        200
    );
    assert_eq!(
        emu.use_pat("fabrikam", "git/repositories", &packaging)
            .await,
        401,
        "packaging PAT on repos"
    );
    assert_eq!(
        emu.use_pat("fabrikam", "git/repositories", &full).await,
        200
    );
    assert_eq!(emu.use_pat("fabrikam", "packaging/feeds", &full).await, 200);
    assert_eq!(
        emu.use_pat("contoso", "git/repositories", &code).await,
        401,
        "other organization"
    );
    // A user name is allowed; the PAT is the password.
    let resp = emu
        .http
        .get(emu.url("/fabrikam/_apis/git/repositories"))
        .basic_auth("kiro", Some(&code))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["count"], 1);
    // A stray '=' breaks the Basic value.
    let raw = format!("Basic {}=", base64_of(&format!(":{code}")));
    let resp = emu
        .http
        .get(emu.url("/fabrikam/_apis/git/repositories"))
        .header("authorization", raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // No credential: the sign-in page, or 401 with Suppress.
    let resp = emu
        .http
        .get(emu.url("/fabrikam/_apis/git/repositories"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 203);
    let resp = emu
        .http
        .get(emu.url("/fabrikam/_apis/git/repositories"))
        .header("X-TFS-FedAuthRedirect", "Suppress")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(emu.stats().await["calls"]["dataplane"], 12);
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn an_expired_pat_is_refused_with_the_documented_envelope() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let (_, pat) = emu
        .create_pat(&bearer, "fabrikam", "short", "vso.code", 1)
        .await;
    assert_eq!(emu.use_pat("fabrikam", "git/repositories", &pat).await, 200);
    emu.advance_clock(86_400 + 60).await;
    let resp = emu
        .http
        .get(emu.url("/fabrikam/_apis/git/repositories"))
        .basic_auth("", Some(&pat))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["x-tfs-serviceerror"],
        "Access%20Denied%3A%20The%20Personal%20Access%20Token%20used%20has%20expired."
    );
    let (_, envelope) = json_of(resp).await;
    assert_eq!(envelope["typeKey"], "AccessCheckException");
    assert_eq!(
        envelope["message"],
        "Access Denied: The Personal Access Token used has expired."
    );
}

// -------------------------------------------------------------- faults

#[tokio::test]
async fn a_status_fault_answers_instead_of_the_operation_and_lapses_after_its_times() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    emu.set_faults(json!([{"operation": "create", "status": 503, "times": 1}]))
        .await;
    let body = json!({"displayName": "x", "scope": "vso.code", "validTo": (Utc::now() + Duration::days(1)).to_rfc3339()});
    let (status, envelope) = json_of(
        send(
            &emu,
            Method::POST,
            &pats_target("fabrikam", ""),
            Some(&bearer),
            Some(body.clone()),
        )
        .await,
    )
    .await;
    assert_eq!(status, 503);
    assert!(envelope["typeKey"].is_string());
    assert!(
        emu.pats().await.is_empty(),
        "the faulted create took no effect"
    );
    let got = emu.create(&bearer, "fabrikam", body).await;
    assert_eq!(got["patTokenError"], "none");
    assert_eq!(emu.stats().await["calls"]["create"], 2);
}

#[tokio::test]
async fn a_fault_after_the_effect_creates_the_pat_but_fails_the_answer() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    emu.set_faults(json!([{"operation": "create", "latencyMs": 20, "latencyWhen": "after", "status": 500, "times": 1}])).await;
    let body = json!({"displayName": "orphan-to-be", "scope": "vso.code", "validTo": (Utc::now() + Duration::days(1)).to_rfc3339()});
    let (status, _) = json_of(
        send(
            &emu,
            Method::POST,
            &pats_target("fabrikam", ""),
            Some(&bearer),
            Some(body),
        )
        .await,
    )
    .await;
    assert_eq!(status, 500);
    let pats = emu.pats().await;
    assert_eq!(pats.len(), 1);
    assert_eq!(pats[0]["displayName"], "orphan-to-be");
    assert_eq!(pats[0]["state"], "active");
}

#[tokio::test]
async fn latency_alone_delays_but_does_not_change_the_answer() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    emu.set_faults(json!([{"operation": "list", "latencyMs": 30}]))
        .await;
    let page = list_page(&emu, &bearer, "").await;
    assert_eq!(page["continuationToken"], "");
}

#[tokio::test]
async fn a_throttling_fault_answers_429_with_retry_after() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    emu.set_faults(json!([{"operation": "get", "retryAfterSeconds": 7}]))
        .await;
    let id = uuid::Uuid::new_v4();
    let resp = send(
        &emu,
        Method::GET,
        &pats_target("fabrikam", &format!("&authorizationId={id}")),
        Some(&bearer),
        None,
    )
    .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
    let (_, envelope) = json_of(resp).await;
    assert!(envelope["message"]
        .as_str()
        .unwrap()
        .starts_with("TF400733"));
    // Other operations are untouched.
    assert_eq!(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", ""),
            Some(&bearer),
            None
        )
        .await
        .status(),
        200
    );
    emu.clear_faults().await;
    let (status, _) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", &format!("&authorizationId={id}")),
            Some(&bearer),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_sign_in_page_fault_answers_203_html_even_to_a_good_bearer() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    emu.set_faults(json!([{"operation": "update", "signInPage": true, "times": 1}]))
        .await;
    let resp = send(
        &emu,
        Method::PUT,
        &pats_target("fabrikam", ""),
        Some(&bearer),
        Some(json!({"authorizationId": uuid::Uuid::new_v4()})),
    )
    .await;
    assert_eq!(resp.status(), 203);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
}

#[tokio::test]
async fn a_drop_fault_closes_the_connection_without_an_answer() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    emu.set_faults(json!([{"operation": "revoke", "dropConnection": true, "times": 1}]))
        .await;
    let target = pats_target(
        "fabrikam",
        &format!("&authorizationId={}", uuid::Uuid::new_v4()),
    );
    let err = emu
        .http
        .delete(emu.url(&target))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap_err();
    assert!(err.is_request() || err.is_connect(), "{err}");
    assert_eq!(emu.stats().await["calls"]["revoke"], 1);
    // The rule lapsed: the next call is answered.
    let resp = emu
        .http
        .delete(emu.url(&target))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_repeat_page_fault_points_the_caller_back_at_the_same_page() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    for i in 0..4 {
        emu.create_pat(&bearer, "fabrikam", &format!("p{i}"), "vso.code", 1)
            .await;
    }
    let first = list_page(&emu, &bearer, "&$top=2").await;
    let token = first["continuationToken"].as_str().unwrap().to_owned();
    emu.set_faults(json!([{"operation": "list", "repeatPage": true}]))
        .await;
    let second = list_page(
        &emu,
        &bearer,
        &format!("&$top=2&continuationToken={}", urlencode(&token)),
    )
    .await;
    assert_eq!(second["continuationToken"], json!(token));
    let third = list_page(
        &emu,
        &bearer,
        &format!("&$top=2&continuationToken={}", urlencode(&token)),
    )
    .await;
    assert_eq!(third["patTokens"], second["patTokens"]);
}

#[tokio::test]
async fn a_wildcard_fault_hits_the_token_endpoint_and_the_data_plane_too() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let (_, pat) = emu
        .create_pat(&bearer, "fabrikam", "p", "vso.code", 1)
        .await;
    emu.set_faults(json!([{"operation": "*", "status": 502, "times": 2}]))
        .await;
    assert_eq!(emu.refresh_grant(DEFAULT_REFRESH_TOKEN).await.status(), 502);
    assert_eq!(emu.use_pat("fabrikam", "git/repositories", &pat).await, 502);
    assert_eq!(emu.refresh_grant(DEFAULT_REFRESH_TOKEN).await.status(), 200);
}

#[tokio::test]
async fn fault_rules_with_unknown_fields_are_refused() {
    let emu = Emu::start_default().await;
    let resp = emu
        .http
        .put(emu.url("/_emulator/faults"))
        .json(&json!([{"operation": "create", "stauts": 500}]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = emu
        .http
        .put(emu.url("/_emulator/faults"))
        .json(&json!([{"operation": "explode"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn stats_count_calls_per_operation_and_deletes_per_authorization_id() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let (id, _) = emu
        .create_pat(&bearer, "fabrikam", "p", "vso.code", 1)
        .await;
    for _ in 0..3 {
        send(
            &emu,
            Method::DELETE,
            &pats_target("fabrikam", &format!("&authorizationId={id}")),
            Some(&bearer),
            None,
        )
        .await;
    }
    send(
        &emu,
        Method::GET,
        &pats_target("fabrikam", &format!("&authorizationId={id}")),
        Some(&bearer),
        None,
    )
    .await;
    send(
        &emu,
        Method::GET,
        &pats_target("fabrikam", ""),
        Some(&bearer),
        None,
    )
    .await;
    send(
        &emu,
        Method::PUT,
        &pats_target("fabrikam", ""),
        Some(&bearer),
        Some(json!({"authorizationId": id})),
    )
    .await;
    let stats = emu.stats().await;
    assert_eq!(stats["calls"]["create"], 1);
    assert_eq!(stats["calls"]["revoke"], 3);
    assert_eq!(stats["calls"]["get"], 1);
    assert_eq!(stats["calls"]["list"], 1);
    assert_eq!(stats["calls"]["update"], 1);
    assert_eq!(stats["calls"]["token"], 1);
    assert_eq!(stats["deletes"][&id], 3);
}

#[tokio::test]
async fn stats_tell_the_most_pat_calls_in_flight_and_the_request_log_times_each_answer() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let stats = emu.stats().await;
    assert_eq!(
        (stats["inFlight"].clone(), stats["maxInFlight"].clone()),
        (json!(0), json!(0))
    );

    // Four lists held 1 s each, sent together: all four are in flight at once.
    emu.set_faults(json!([{"operation": "list", "latencyMs": 1000}]))
        .await;
    let list_target = pats_target("fabrikam", "");
    let lists = (0..4).map(|_| send(&emu, Method::GET, &list_target, Some(&bearer), None));
    for resp in futures::future::join_all(lists).await {
        assert_eq!(resp.status(), 200);
    }
    let stats = emu.stats().await;
    assert_eq!(stats["maxInFlight"], 4, "{stats}");
    assert_eq!(stats["inFlight"], 0, "{stats}");

    // A 429 and a dropped connection are logged with their times.
    emu.set_faults(json!([
        {"operation": "create", "retryAfterSeconds": 2, "times": 1},
        {"operation": "revoke", "dropConnection": true, "times": 1}
    ]))
    .await;
    let resp = send(
        &emu,
        Method::POST,
        &pats_target("fabrikam", ""),
        Some(&bearer),
        Some(json!({"displayName": "x", "scope": "vso.code", "validTo": "2099-01-01T00:00:00Z", "allOrgs": false})),
    )
    .await;
    assert_eq!(resp.status(), 429);
    let dropped = emu
        .http
        .delete(emu.pats_url(
            "fabrikam",
            &format!(
                "api-version={API_VERSION}&authorizationId={}",
                uuid::Uuid::new_v4()
            ),
        ))
        .bearer_auth(&bearer)
        .send()
        .await;
    assert!(dropped.is_err(), "the connection was dropped");
    let log = emu.requests().await;
    let ops: Vec<&str> = log
        .iter()
        .map(|r| r["operation"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["list", "list", "list", "list", "create", "revoke"]);
    for r in &log[..4] {
        assert_eq!(r["status"], 200);
        let held = r["answeredMicros"].as_u64().unwrap() - r["arrivedMicros"].as_u64().unwrap();
        assert!(held >= 1_000_000, "held {held} µs: {r}");
    }
    assert_eq!(log[4]["status"], 429);
    assert!(log[4]["answeredMicros"].as_u64() >= log[4]["arrivedMicros"].as_u64());
    assert_eq!(
        log[5]["status"],
        Value::Null,
        "no answer to a dropped connection"
    );
    let seqs: Vec<u64> = log.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // Control endpoints and the token endpoint are not PAT API calls.
    emu.user_bearer().await;
    assert_eq!(emu.requests().await.len(), 6);

    // A reset forgets counters and the log.
    emu.reset_stats().await;
    let stats = emu.stats().await;
    assert_eq!(stats["calls"]["list"], 0);
    assert_eq!(stats["maxInFlight"], 0);
    assert_eq!(stats["deletes"], json!({}));
    assert!(emu.requests().await.is_empty());
}

#[tokio::test]
async fn a_delayed_but_served_call_carries_retry_after_and_rate_limit_headers() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    emu.set_faults(json!([{"operation": "list", "status": 200, "retryAfterSeconds": 2, "latencyMs": 10, "times": 1}])).await;
    let resp = send(
        &emu,
        Method::GET,
        &pats_target("fabrikam", ""),
        Some(&bearer),
        None,
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["retry-after"], "2");
    assert_eq!(resp.headers()["x-ratelimit-delay"], "0.010");
    for h in [
        "x-ratelimit-resource",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(resp.headers().contains_key(h), "{h}");
    }
    let (_, page) = json_of(resp).await;
    assert_eq!(
        page["continuationToken"], "",
        "the real answer came through"
    );
}

#[tokio::test]
async fn the_restrict_creation_policy_refuses_all_but_packaging_when_allowed() {
    let emu = Emu::start(EmulatorConfig {
        restrict_creation: true,
        allow_packaging_only: true,
        ..EmulatorConfig::default()
    })
    .await;
    let bearer = emu.user_bearer().await;
    let future = (Utc::now() + Duration::days(2)).to_rfc3339();
    let got = emu
        .create(
            &bearer,
            "fabrikam",
            json!({"displayName": "code", "scope": "vso.code", "validTo": future}),
        )
        .await;
    assert_eq!(got["patTokenError"], "disablePatCreationPolicyViolation");
    let got = emu
        .create(
            &bearer,
            "fabrikam",
            json!({"displayName": "feeds", "scope": "vso.packaging_write", "validTo": future}),
        )
        .await;
    assert_eq!(got["patTokenError"], "none");
}

// ------------------------------------------------------------- secrets

/// Collects everything every tracing event writes, at TRACE.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_pat_access_token_or_refresh_token_reaches_the_logs_even_at_trace() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Other tests of this binary may log into it too: that only adds text.
    let _ = tracing::subscriber::set_global_default(subscriber);

    let emu = Emu::start_default().await;
    let first: Value = emu
        .refresh_grant(DEFAULT_REFRESH_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    let bearer = first["access_token"].as_str().unwrap().to_owned();
    let refresh = first["refresh_token"].as_str().unwrap().to_owned();
    emu.refresh_grant(&refresh).await;
    let (id, pat) = emu
        .create_pat(&bearer, "fabrikam", "secret-check", "vso.code", 1)
        .await;
    emu.use_pat("fabrikam", "git/repositories", &pat).await;
    send(
        &emu,
        Method::DELETE,
        &pats_target("fabrikam", &format!("&authorizationId={id}")),
        Some(&bearer),
        None,
    )
    .await;
    emu.use_pat("fabrikam", "git/repositories", &pat).await;
    emu.http
        .post(emu.url("/_emulator/refresh-tokens/revoke"))
        .json(&json!({"refreshToken": refresh}))
        .send()
        .await
        .unwrap();
    emu.refresh_grant(&refresh).await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("emulator created a PAT"),
        "the emulator's own events were captured"
    );
    for (what, secret) in [
        ("PAT", pat.clone()),
        ("Basic value", base64_of(&format!(":{pat}"))),
        ("access token", bearer),
        ("refresh token", refresh),
        ("seed refresh token", DEFAULT_REFRESH_TOKEN.to_owned()),
    ] {
        assert!(!text.contains(&secret), "the {what} was logged");
    }
}

// ------------------------------------------ device authorization grant

const DEVICE_CLIENT: &str = "872cd9fa-d31f-45e0-9eab-6e460a02d1f1";
const LOGIN_SCOPE: &str =
    "499b84ac-1321-427f-aa17-267ca6975798/.default openid profile offline_access";

/// An emulator whose device codes ask for 1 s between polls.
async fn device_emu() -> Emu {
    Emu::start(EmulatorConfig {
        device_code_interval: std::time::Duration::from_secs(1),
        ..EmulatorConfig::default()
    })
    .await
}

async fn request_device_code(emu: &Emu, form: &[(&str, &str)]) -> (u16, Value) {
    json_of(
        emu.http
            .post(emu.url("/organizations/oauth2/v2.0/devicecode"))
            .form(form)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// A device code for `scope`: `(device_code, user_code)`.
async fn device_code_for(emu: &Emu, scope: &str) -> (String, String) {
    let (status, body) =
        request_device_code(emu, &[("client_id", DEVICE_CLIENT), ("scope", scope)]).await;
    assert_eq!(status, 200, "{body}");
    (
        body["device_code"].as_str().unwrap().to_owned(),
        body["user_code"].as_str().unwrap().to_owned(),
    )
}

async fn poll_device_code(emu: &Emu, device_code: &str) -> (u16, Value) {
    json_of(
        emu.http
            .post(emu.url("/organizations/oauth2/v2.0/token"))
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("client_id", DEVICE_CLIENT),
                ("device_code", device_code),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// `POST /_emulator/device-codes/{action}` with `body`; the status.
async fn device_code_control(emu: &Emu, action: &str, body: Value) -> u16 {
    emu.http
        .post(emu.url(&format!("/_emulator/device-codes/{action}")))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The OAuth error and its AADSTS code of a refusal.
fn oauth_error(body: &Value) -> (&str, u64) {
    (
        body["error"].as_str().unwrap(),
        body["error_codes"][0].as_u64().unwrap(),
    )
}

/// The claims of a JWT-shaped token.
fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

async fn refresh_with_scope(emu: &Emu, refresh_token: &str, scope: &str) -> Value {
    let (status, body) = json_of(
        emu.http
            .post(emu.url("/organizations/oauth2/v2.0/token"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("client_id", DEVICE_CLIENT),
                ("refresh_token", refresh_token),
                ("scope", scope),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn a_device_code_is_issued_in_entras_shape() {
    let emu = device_emu().await;
    let (status, body) = request_device_code(
        &emu,
        &[("client_id", DEVICE_CLIENT), ("scope", LOGIN_SCOPE)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        keys(&body),
        [
            "device_code",
            "expires_in",
            "interval",
            "message",
            "user_code",
            "verification_uri"
        ]
    );
    let user_code = body["user_code"].as_str().unwrap();
    assert_eq!(user_code.len(), 9);
    assert!(user_code
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()));
    assert!(body["device_code"].as_str().unwrap().len() >= 100);
    assert_eq!(
        body["verification_uri"],
        "https://microsoft.com/devicelogin"
    );
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["interval"], 1);
    assert_eq!(
        body["message"],
        format!("To sign in, use a web browser to open the page https://microsoft.com/devicelogin and enter the code {user_code} to authenticate.")
    );
    // Each request gets its own codes.
    let (other_device, other_user) = device_code_for(&emu, LOGIN_SCOPE).await;
    assert_ne!(other_device, body["device_code"].as_str().unwrap());
    assert_ne!(other_user, user_code);

    // client_id and scope are required, as the token endpoint requires its fields.
    for form in [
        vec![("scope", LOGIN_SCOPE)],
        vec![("client_id", DEVICE_CLIENT)],
    ] {
        let (status, body) = request_device_code(&emu, &form).await;
        assert_eq!(status, 400);
        assert_eq!(oauth_error(&body), ("invalid_request", 900144));
    }
    // The default interval is RFC 8628's 5 s.
    let emu = Emu::start_default().await;
    let (_, body) = request_device_code(
        &emu,
        &[("client_id", DEVICE_CLIENT), ("scope", LOGIN_SCOPE)],
    )
    .await;
    assert_eq!(body["interval"], 5);
}

#[tokio::test]
async fn an_approved_device_code_signs_the_account_in_once() {
    let emu = device_emu().await;
    let (device_code, user_code) = device_code_for(&emu, LOGIN_SCOPE).await;
    let (status, body) = poll_device_code(&emu, &device_code).await;
    assert_eq!(status, 400);
    assert_eq!(oauth_error(&body), ("authorization_pending", 70016));
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .starts_with("AADSTS70016:"));

    assert_eq!(
        device_code_control(
            &emu,
            "approve",
            json!({"userCode": user_code.to_lowercase(), "account": "ops@contoso.com"})
        )
        .await,
        200
    );
    // An approved code is redeemed at once (slow_down is for pending codes).
    let (status, body) = poll_device_code(&emu, &device_code).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(
        body["scope"],
        "499b84ac-1321-427f-aa17-267ca6975798/.default"
    );
    let access = body["access_token"].as_str().unwrap().to_owned();
    let refresh = body["refresh_token"].as_str().unwrap().to_owned();
    let id = jwt_claims(body["id_token"].as_str().unwrap());
    assert_eq!(id["preferred_username"], "ops@contoso.com");
    assert_eq!(id["name"], "Ops");
    assert_eq!(id["aud"], DEVICE_CLIENT);
    assert_eq!(id["tid"], "organizations");
    assert!(id["oid"].is_string());
    let claims = jwt_claims(&access);
    assert_eq!(claims["upn"], "ops@contoso.com");
    assert_eq!(claims["preferred_username"], "ops@contoso.com");
    assert_eq!(claims["oid"], id["oid"]);
    // The access token is a user-delegated one the PAT API accepts.
    let (status, _) = json_of(
        send(
            &emu,
            Method::GET,
            &pats_target("fabrikam", ""),
            Some(&access),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 200);

    // Redeemed once: Entra forgets the code.
    let (status, body) = poll_device_code(&emu, &device_code).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "bad_verification_code");
    assert_eq!(
        device_code_control(&emu, "approve", json!({"userCode": user_code})).await,
        404
    );

    // The refresh token keeps the account; openid profile adds an id_token.
    let refreshed = refresh_with_scope(&emu, &refresh, LOGIN_SCOPE).await;
    let id = jwt_claims(refreshed["id_token"].as_str().unwrap());
    assert_eq!(id["preferred_username"], "ops@contoso.com");
    assert_eq!(
        jwt_claims(refreshed["access_token"].as_str().unwrap())["upn"],
        "ops@contoso.com"
    );
    // And so does the one it rotated to.
    let rotated = refreshed["refresh_token"].as_str().unwrap();
    let again = refresh_with_scope(&emu, rotated, LOGIN_SCOPE).await;
    assert_eq!(
        jwt_claims(again["id_token"].as_str().unwrap())["preferred_username"],
        "ops@contoso.com"
    );
    // The seeded refresh token stays the emulated user's; no openid, no id_token.
    let seeded = refresh_with_scope(&emu, DEFAULT_REFRESH_TOKEN, LOGIN_SCOPE).await;
    assert_eq!(
        jwt_claims(seeded["id_token"].as_str().unwrap())["preferred_username"],
        "emulated.user@fabrikam.example"
    );
    let plain: Value = emu
        .refresh_grant(DEFAULT_REFRESH_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    assert!(plain.get("id_token").is_none(), "{plain}");
    assert_eq!(
        jwt_claims(plain["access_token"].as_str().unwrap())["upn"],
        "emulated.user@fabrikam.example"
    );
}

#[tokio::test]
async fn a_device_sign_in_without_offline_access_or_openid_gets_neither_token() {
    let emu = device_emu().await;
    let (device_code, user_code) =
        device_code_for(&emu, "499b84ac-1321-427f-aa17-267ca6975798/.default").await;
    assert_eq!(
        device_code_control(&emu, "approve", json!({"userCode": user_code})).await,
        200
    );
    let (status, body) = poll_device_code(&emu, &device_code).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].is_string());
    assert!(body.get("refresh_token").is_none(), "{body}");
    assert!(body.get("id_token").is_none(), "{body}");
    // Approved without an account: the seeded one.
    assert_eq!(
        jwt_claims(body["access_token"].as_str().unwrap())["upn"],
        "emulated.user@fabrikam.example"
    );
    // openid without profile: an id_token without preferred_username.
    let (device_code, user_code) = device_code_for(&emu, "a/.default openid offline_access").await;
    device_code_control(
        &emu,
        "approve",
        json!({"userCode": user_code, "account": "ops@contoso.com"}),
    )
    .await;
    let (_, body) = poll_device_code(&emu, &device_code).await;
    let id = jwt_claims(body["id_token"].as_str().unwrap());
    assert!(id.get("preferred_username").is_none(), "{id}");
    assert_eq!(id["aud"], DEVICE_CLIENT);
}

#[tokio::test]
async fn a_declined_device_code_answers_authorization_declined() {
    let emu = device_emu().await;
    let (device_code, user_code) = device_code_for(&emu, LOGIN_SCOPE).await;
    assert_eq!(
        device_code_control(&emu, "decline", json!({"userCode": user_code})).await,
        200
    );
    for _ in 0..2 {
        let (status, body) = poll_device_code(&emu, &device_code).await;
        assert_eq!(status, 400);
        assert_eq!(oauth_error(&body), ("authorization_declined", 70000));
    }
}

#[tokio::test]
async fn a_device_code_expires_after_15_minutes_of_emulator_time() {
    let emu = device_emu().await;
    let (device_code, user_code) = device_code_for(&emu, LOGIN_SCOPE).await;
    emu.advance_clock(899).await;
    let (_, body) = poll_device_code(&emu, &device_code).await;
    assert_eq!(body["error"], "authorization_pending");
    emu.advance_clock(2).await;
    // Even approved, an expired code signs nobody in.
    device_code_control(&emu, "approve", json!({"userCode": user_code})).await;
    let (status, body) = poll_device_code(&emu, &device_code).await;
    assert_eq!(status, 400);
    assert_eq!(oauth_error(&body), ("expired_token", 70020));
}

#[tokio::test]
async fn slow_down_comes_on_request_and_for_polling_too_fast_and_widens_the_interval() {
    let emu = device_emu().await;
    // Polling again at once, under the 1 s interval: slow_down.
    let (device_code, _) = device_code_for(&emu, LOGIN_SCOPE).await;
    let (_, body) = poll_device_code(&emu, &device_code).await;
    assert_eq!(body["error"], "authorization_pending");
    let (status, body) = poll_device_code(&emu, &device_code).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "slow_down");

    // On request: the next poll only, even when it keeps the interval.
    let (device_code, user_code) = device_code_for(&emu, LOGIN_SCOPE).await;
    assert_eq!(
        device_code_control(&emu, "slow-down", json!({"userCode": user_code})).await,
        200
    );
    let (_, body) = poll_device_code(&emu, &device_code).await;
    assert_eq!(body["error"], "slow_down");
    // The interval is now 6 s: a poll 1.2 s later is still too fast.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let (_, body) = poll_device_code(&emu, &device_code).await;
    assert_eq!(body["error"], "slow_down");
    // An approved code is redeemed whatever the pace.
    device_code_control(&emu, "approve", json!({"userCode": user_code})).await;
    let (status, _) = poll_device_code(&emu, &device_code).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn unknown_device_and_user_codes_are_refused() {
    let emu = device_emu().await;
    let (status, body) = poll_device_code(&emu, "DAQABIQEAAAnever-issued").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "bad_verification_code");
    assert!(!body.to_string().contains("never-issued"));
    for action in ["approve", "decline", "slow-down"] {
        assert_eq!(
            device_code_control(&emu, action, json!({"userCode": "NOSUCHCOD"})).await,
            404,
            "{action}"
        );
        assert_eq!(
            device_code_control(&emu, action, json!({"user": "x"})).await,
            400,
            "{action}"
        );
    }
    // A device code is only good for the client that asked for it.
    let (device_code, _) = device_code_for(&emu, LOGIN_SCOPE).await;
    let (_, body) = json_of(
        emu.http
            .post(emu.url("/organizations/oauth2/v2.0/token"))
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("client_id", "another-client"),
                ("device_code", device_code.as_str()),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["error"], "bad_verification_code");
    // Without device_code: invalid_request.
    let (status, body) = json_of(
        emu.http
            .post(emu.url("/organizations/oauth2/v2.0/token"))
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("client_id", DEVICE_CLIENT),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(oauth_error(&body), ("invalid_request", 900144));
}

#[tokio::test]
async fn a_state_file_keeps_the_account_of_refresh_tokens_and_old_files_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("emulator.json");
    let config = || EmulatorConfig {
        state_file: Some(state_file.clone()),
        device_code_interval: std::time::Duration::from_secs(1),
        ..EmulatorConfig::default()
    };
    let emu = Emu::start(config()).await;
    let (device_code, user_code) = device_code_for(&emu, LOGIN_SCOPE).await;
    device_code_control(
        &emu,
        "approve",
        json!({"userCode": user_code, "account": "ops@contoso.com"}),
    )
    .await;
    let (_, body) = poll_device_code(&emu, &device_code).await;
    let refresh = body["refresh_token"].as_str().unwrap().to_owned();
    drop(emu);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = std::fs::read_to_string(&state_file).unwrap();
    assert!(!text.contains(&refresh));
    let emu = Emu::start(config()).await;
    let refreshed = refresh_with_scope(&emu, &refresh, LOGIN_SCOPE).await;
    assert_eq!(
        jwt_claims(refreshed["id_token"].as_str().unwrap())["preferred_username"],
        "ops@contoso.com"
    );
    drop(emu);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    // A file written before accounts existed: its refresh tokens are the
    // emulated user's.
    use sha2::Digest;
    let old = json!({
        "version": 1, "clockOffsetMs": 0, "organizations": {}, "pats": [],
        "accessTokens": [],
        "refreshTokens": [{
            "digest": hex::encode(sha2::Sha256::digest(b"old-refresh-token")),
            "expiresAt": (Utc::now() + Duration::days(1)).to_rfc3339(),
            "revoked": false
        }]
    });
    std::fs::write(&state_file, old.to_string()).unwrap();
    let emu = Emu::start(config()).await;
    let refreshed = refresh_with_scope(&emu, "old-refresh-token", LOGIN_SCOPE).await;
    assert_eq!(
        jwt_claims(refreshed["id_token"].as_str().unwrap())["preferred_username"],
        "emulated.user@fabrikam.example"
    );
}
