//! PLACEHOLDER (replaced by the devicecode branch).
use super::entra::EntraConfig;
use secrecy::SecretString;
use std::time::Duration;
pub struct DevicePrompt {
    pub user_code: String,
    pub verification_uri: String,
    pub message: String,
    pub expires_in: Duration,
    pub interval: Duration,
}
pub struct SignedIn {
    pub refresh_token: SecretString,
    pub access_token: SecretString,
    pub account: Option<String>,
}
#[derive(Debug, thiserror::Error)]
pub enum DeviceCodeError {
    #[error("declined")]
    Declined,
    #[error("expired")]
    Expired,
    #[error("refused {0}")]
    Refused(String),
    #[error("no rt")]
    NoRefreshToken,
    #[error("unavailable {0}")]
    Unavailable(String),
    #[error("protocol {0}")]
    Protocol(String),
}
pub async fn sign_in(
    _config: &EntraConfig,
    _on_prompt: impl FnOnce(&DevicePrompt) + Send,
) -> Result<SignedIn, DeviceCodeError> {
    Err(DeviceCodeError::Unavailable("placeholder".into()))
}
