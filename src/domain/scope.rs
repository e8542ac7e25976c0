//! Azure DevOps PAT scopes and their inclusion table
//! (ado-pat-api.md section 3.2, from Microsoft's "Available scopes" list).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use super::DomainError;

/// One catalogue row: a scope and the scopes it directly includes.
struct Row {
    name: &'static str,
    includes: &'static [&'static str],
}

const fn row(name: &'static str, includes: &'static [&'static str]) -> Row {
    Row { name, includes }
}

/// The catalogue. TODO(domain helper): complete from ado-pat-api.md 3.2.
static CATALOGUE: &[Row] = &[
    row("app_token", &[]),
    row("vso.hooks_write", &[]),
    row("vso.profile", &[]),
    row("vso.code", &["vso.hooks_write"]),
    row("vso.code_write", &["vso.code"]),
    row("vso.code_manage", &["vso.code_write"]),
    row("vso.code_full", &["vso.code_manage"]),
    row("vso.packaging", &["vso.profile"]),
    row("vso.packaging_write", &["vso.packaging"]),
    row("vso.packaging_manage", &["vso.packaging_write"]),
];

/// One Azure DevOps scope from the catalogue, e.g. `vso.code_write`.
/// `app_token` is full access: it covers every scope but is never implied
/// by any other.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(&'static str);

impl Scope {
    /// Full access (`app_token`).
    pub const APP_TOKEN: Scope = Scope("app_token");

    /// Looks `name` up in the catalogue (exact, lower case).
    pub fn parse(name: &str) -> Result<Self, DomainError> {
        CATALOGUE
            .iter()
            .find(|r| r.name == name)
            .map(|r| Scope(r.name))
            .ok_or_else(|| DomainError::UnknownScope(name.to_owned()))
    }

    /// The scope string as Azure DevOps spells it.
    pub fn as_str(&self) -> &'static str {
        self.0
    }

    /// True if holding `self` grants `other`: equal, `self` is `app_token`,
    /// or `other` is in the transitive closure of `self`'s inclusions.
    pub fn covers(&self, other: &Scope) -> bool {
        if self == other || *self == Scope::APP_TOKEN {
            return true;
        }
        let mut stack = vec![self.0];
        let mut seen = BTreeSet::new();
        while let Some(name) = stack.pop() {
            if !seen.insert(name) {
                continue;
            }
            let Some(row) = CATALOGUE.iter().find(|r| r.name == name) else {
                continue;
            };
            for inc in row.includes {
                if *inc == other.0 {
                    return true;
                }
                stack.push(inc);
            }
        }
        false
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl FromStr for Scope {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::parse(s)
    }
}

/// A non-empty, de-duplicated, sorted set of scopes.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ScopeSet(BTreeSet<Scope>);

impl ScopeSet {
    /// Parses each name; fails on the first unknown one or on none at all.
    pub fn parse<I, S>(names: I) -> Result<Self, DomainError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let set = names
            .into_iter()
            .map(|n| Scope::parse(n.as_ref()))
            .collect::<Result<BTreeSet<_>, _>>()?;
        if set.is_empty() {
            return Err(DomainError::NoScopes);
        }
        Ok(ScopeSet(set))
    }

    /// Parses upstream's space-separated `scope` string.
    pub fn parse_upstream(scope: &str) -> Result<Self, DomainError> {
        Self::parse(scope.split_ascii_whitespace())
    }

    /// True if every scope in `wanted` is covered by some scope here.
    pub fn covers(&self, wanted: &ScopeSet) -> bool {
        wanted
            .0
            .iter()
            .all(|w| self.0.iter().any(|held| held.covers(w)))
    }

    /// True if `scope` is covered by some scope here.
    pub fn covers_scope(&self, scope: &Scope) -> bool {
        self.0.iter().any(|held| held.covers(scope))
    }

    /// The scopes, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    /// Upstream's form: sorted names joined by one space.
    pub fn to_upstream(&self) -> String {
        self.0
            .iter()
            .map(Scope::as_str)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The names, sorted.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.as_str().to_owned()).collect()
    }
}
