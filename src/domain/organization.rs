use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::DomainError;

/// An Azure DevOps organization name, stored in lower case (the service
/// matches organization names case-insensitively).
///
/// Rules (Azure DevOps "organization name" validation): 1 to 50 characters,
/// ASCII letters, digits and hyphens, starting and ending with a letter or
/// digit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Organization(String);

impl Organization {
    /// Longest accepted name, in characters.
    pub const MAX_LEN: usize = 50;

    /// Validates and lower-cases `name`.
    pub fn parse(name: &str) -> Result<Self, DomainError> {
        let invalid = |why: &str| DomainError::InvalidOrganization(format!("{name:?}: {why}"));
        if name.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if name.len() > Self::MAX_LEN {
            return Err(invalid("longer than 50 characters"));
        }
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(invalid("only letters, digits and hyphens are allowed"));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(invalid("must start and end with a letter or digit"));
        }
        Ok(Organization(name.to_ascii_lowercase()))
    }

    /// The lower-case name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Organization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Organization {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Organization::parse(s)
    }
}

impl TryFrom<String> for Organization {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Organization::parse(&s)
    }
}

impl From<Organization> for String {
    fn from(o: Organization) -> String {
        o.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_are_accepted_and_lower_cased() {
        assert_eq!(
            Organization::parse("fabrikam").unwrap().as_str(),
            "fabrikam"
        );
        assert_eq!(
            Organization::parse("Fabrikam-Fiber-2").unwrap().as_str(),
            "fabrikam-fiber-2"
        );
        assert_eq!(Organization::parse("a").unwrap().as_str(), "a");
        assert_eq!(
            Organization::parse("FABRIKAM").unwrap(),
            Organization::parse("fabrikam").unwrap()
        );
    }

    #[test]
    fn fifty_characters_is_the_limit() {
        let fifty = "a".repeat(50);
        assert_eq!(Organization::parse(&fifty).unwrap().as_str(), fifty);
        let err = Organization::parse(&"a".repeat(51)).unwrap_err();
        assert!(err.to_string().contains("longer than 50"), "{err}");
    }

    #[test]
    fn invalid_names_are_rejected_with_the_reason() {
        for (name, why) in [
            ("", "must not be empty"),
            ("-fabrikam", "start and end"),
            ("fabrikam-", "start and end"),
            ("fabri_kam", "only letters"),
            ("fabri kam", "only letters"),
            ("fabrikam.com", "only letters"),
            ("fabrikäm", "only letters"),
            ("fabrikam/project", "only letters"),
        ] {
            let err = Organization::parse(name).unwrap_err();
            assert!(
                matches!(err, DomainError::InvalidOrganization(_)),
                "{name:?}"
            );
            assert!(err.to_string().contains(why), "{name:?}: {err}");
        }
    }

    #[test]
    fn serde_validates_and_lower_cases() {
        let org: Organization = serde_json::from_str("\"Fabrikam\"").unwrap();
        assert_eq!(org.as_str(), "fabrikam");
        assert!(serde_json::from_str::<Organization>("\"-x\"").is_err());
    }
}
