use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::DomainError;

/// Who called the broker, typed by how it was proven. Kinds never collide:
/// an API key named like a service account is still an `ApiKey`.
///
/// Text forms (also how policy names them):
/// - `apikey:NAME`: an API key from the broker's configuration;
/// - `k8s:system:serviceaccount:NAMESPACE:NAME`: a Kubernetes service account;
/// - `spiffe://TRUST-DOMAIN/PATH`: an mTLS client certificate's URI SAN;
/// - `x509:DNS-NAME`: an mTLS client certificate's DNS SAN.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Identity {
    /// `apikey:NAME`.
    ApiKey(String),
    /// `k8s:system:serviceaccount:NAMESPACE:NAME`.
    ServiceAccount {
        /// Kubernetes namespace.
        namespace: String,
        /// Service account name.
        name: String,
    },
    /// `spiffe://...`, the whole SPIFFE ID.
    Spiffe(String),
    /// `x509:DNS-NAME`.
    X509(String),
}

impl Identity {
    /// The kind prefix as written in policy: `apikey`, `k8s`, `spiffe`, `x509`.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::ApiKey(_) => "apikey",
            Identity::ServiceAccount { .. } => "k8s",
            Identity::Spiffe(_) => "spiffe",
            Identity::X509(_) => "x509",
        }
    }
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl FromStr for Identity {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| DomainError::InvalidIdentity(s.to_owned(), why);
        if let Some(name) = s.strip_prefix("apikey:") {
            return if valid_part(name) {
                Ok(Identity::ApiKey(name.to_owned()))
            } else {
                Err(bad("API key names use letters, digits, '-', '_' and '.'"))
            };
        }
        if let Some(rest) = s.strip_prefix("k8s:system:serviceaccount:") {
            let mut parts = rest.split(':');
            return match (parts.next(), parts.next(), parts.next()) {
                (Some(ns), Some(name), None) if valid_part(ns) && valid_part(name) => {
                    Ok(Identity::ServiceAccount {
                        namespace: ns.to_owned(),
                        name: name.to_owned(),
                    })
                }
                _ => Err(bad("expected k8s:system:serviceaccount:NAMESPACE:NAME")),
            };
        }
        if let Some(rest) = s.strip_prefix("spiffe://") {
            return if !rest.is_empty() && !rest.chars().any(char::is_whitespace) {
                Ok(Identity::Spiffe(s.to_owned()))
            } else {
                Err(bad("expected spiffe://TRUST-DOMAIN/PATH"))
            };
        }
        if let Some(dns) = s.strip_prefix("x509:") {
            return if valid_part(dns) {
                Ok(Identity::X509(dns.to_owned()))
            } else {
                Err(bad("expected x509:DNS-NAME"))
            };
        }
        Err(bad(
            "unknown kind; expected apikey:, k8s:, spiffe:// or x509:",
        ))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::ApiKey(name) => write!(f, "apikey:{name}"),
            Identity::ServiceAccount { namespace, name } => {
                write!(f, "k8s:system:serviceaccount:{namespace}:{name}")
            }
            Identity::Spiffe(id) => f.write_str(id),
            Identity::X509(dns) => write!(f, "x509:{dns}"),
        }
    }
}

impl TryFrom<String> for Identity {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Identity> for String {
    fn from(i: Identity) -> String {
        i.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_text_form() {
        for (text, kind) in [
            ("apikey:ci-runner_1.prod", "apikey"),
            ("k8s:system:serviceaccount:build:restorer", "k8s"),
            ("spiffe://example.org/ns/build/sa/restorer", "spiffe"),
            ("x509:agent-1.build.example.org", "x509"),
        ] {
            let id: Identity = text.parse().unwrap();
            assert_eq!(id.kind(), kind);
            assert_eq!(id.to_string(), text);
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), id);
        }
    }

    #[test]
    fn a_service_account_parses_into_its_parts() {
        let id: Identity = "k8s:system:serviceaccount:build:restorer".parse().unwrap();
        assert_eq!(
            id,
            Identity::ServiceAccount {
                namespace: "build".into(),
                name: "restorer".into()
            }
        );
    }

    #[test]
    fn an_api_key_named_like_a_service_account_is_not_one() {
        let parsed = "apikey:system:serviceaccount:a:b".parse::<Identity>();
        assert!(
            !matches!(parsed, Ok(Identity::ServiceAccount { .. })),
            "{parsed:?}"
        );
        assert!(parsed.is_err());
        let parsed = "x509:k8s:system:serviceaccount:a:b".parse::<Identity>();
        assert!(parsed.is_err());
    }

    #[test]
    fn garbage_is_rejected() {
        for text in [
            "",
            "ci",
            "apikey:",
            "apikey:has space",
            "APIKEY:ci",
            "k8s:system:serviceaccount:build",
            "k8s:system:serviceaccount:build:",
            "k8s:system:serviceaccount:a:b:c",
            "k8s:build:restorer",
            "spiffe://",
            "spiffe://example.org/has space",
            "x509:",
            "x509:a/b",
            "jwt:someone",
        ] {
            let err = text.parse::<Identity>().unwrap_err();
            assert!(
                matches!(err, DomainError::InvalidIdentity(ref t, _) if t == text),
                "{text:?}: {err:?}"
            );
        }
    }
}
