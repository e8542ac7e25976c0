//! The Azure DevOps emulator over real sockets: Microsoft's example
//! exchanges, authentication, pagination, rounding, policies, the data
//! plane and every fault knob (issue 3, item 1).

mod common;

use common::emulator::{Emu, API_VERSION};
use serde_json::{json, Value};
use token_broker::emulator::EmulatorConfig;

#[tokio::test]
async fn a_pat_is_created_read_listed_updated_and_revoked() {
    let emu = Emu::start_default().await;
    let bearer = emu.user_bearer().await;
    let (id, token) = emu
        .create_pat(&bearer, "fabrikam", "ci-agent", "vso.code_write", 1)
        .await;
    assert_eq!(token.len(), 84);

    let got: Value = emu
        .http
        .get(emu.pats_url(
            "fabrikam",
            &format!("authorizationId={id}&api-version={API_VERSION}"),
        ))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["patToken"]["displayName"], "ci-agent");
    assert_eq!(got["patToken"]["token"], Value::Null);

    let list: Value = emu
        .http
        .get(emu.pats_url("fabrikam", &format!("api-version={API_VERSION}")))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["continuationToken"], "");
    assert_eq!(list["patTokens"].as_array().unwrap().len(), 1);

    let updated: Value = emu
        .http
        .put(emu.pats_url("fabrikam", &format!("api-version={API_VERSION}")))
        .bearer_auth(&bearer)
        .json(&json!({"authorizationId": id, "displayName": "renamed"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(updated["patToken"]["displayName"], "renamed");
    assert_eq!(updated["patToken"]["scope"], "vso.code_write");

    assert_eq!(
        emu.use_pat("fabrikam", "git/repositories", &token).await,
        200
    );
    let resp = emu
        .http
        .delete(emu.pats_url(
            "fabrikam",
            &format!("authorizationId={id}&api-version={API_VERSION}"),
        ))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        emu.use_pat("fabrikam", "git/repositories", &token).await,
        401
    );
    let pats = emu.pats().await;
    assert_eq!(pats[0]["state"], "revoked");
    let _ = EmulatorConfig::default();
}
