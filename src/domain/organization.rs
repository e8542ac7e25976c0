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
