//! Azure DevOps PAT scopes and their inclusion table
//! (docs/upstream-api.md, Scope catalogue and inclusion, from Microsoft's
//! "Available scopes" list).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use super::DomainError;

/// The catalogue as ladders `(base, scopes)`: each scope directly includes
/// the one before it in its ladder, and the first includes `base` (none
/// when empty); read in order, they list every PAT scope.
///
/// Source: docs/upstream-api.md, Scope catalogue and inclusion (Microsoft's
/// "Available scopes" table, learn.microsoft.com
/// .../integrate/get-started/authentication/oauth, its "Includes" column)
/// and Special scopes (`app_token`, `vso.governance`, `vso.tokens`,
/// `vso.tokenadministration`). Left out on purpose: the Entra-only
/// `user_impersonation`, `vso.pats` and `vso.pats_manage`, and the retired
/// `vso.loadtest` scopes. `app_token` includes nothing here: its full
/// access is a rule in [`Scope::covers`], and no scope includes it.
// One ladder a line, as the documented table groups them.
#[rustfmt::skip]
static LADDERS: &[(&str, &[&str])] = &[
    ("", &["app_token"]),
    ("", &["vso.advsec", "vso.advsec_write", "vso.advsec_manage"]),
    ("", &["vso.agentpools", "vso.agentpools_manage", "vso.environment_manage"]),
    ("", &["vso.analytics"]),
    ("", &["vso.auditlog", "vso.auditstreams_manage"]),
    ("vso.hooks_write", &["vso.build", "vso.build_execute"]),
    ("vso.hooks_write", &["vso.code", "vso.code_write", "vso.code_manage", "vso.code_full"]),
    ("", &["vso.code_status"]),
    ("", &["vso.connected_server"]),
    ("", &["vso.entitlements"]),
    ("", &["vso.memberentitlementmanagement", "vso.memberentitlementmanagement_write"]),
    ("vso.profile", &["vso.extension", "vso.extension_manage"]),
    ("vso.profile", &["vso.extension.data", "vso.extension.data_write"]),
    ("", &["vso.githubconnections", "vso.githubconnections_manage"]),
    ("", &["vso.governance"]),
    ("", &["vso.graph", "vso.graph_manage"]),
    ("", &["vso.identity", "vso.identity_manage"]),
    ("vso.agentpools_manage", &["vso.machinegroup_manage"]),
    ("vso.profile", &["vso.gallery", "vso.gallery_acquire"]),
    ("vso.gallery", &["vso.gallery_publish", "vso.gallery_manage"]),
    ("vso.profile", &["vso.notification", "vso.notification_write", "vso.notification_manage"]),
    ("vso.notification", &["vso.notification_diagnostics"]),
    ("vso.profile", &["vso.packaging", "vso.packaging_write", "vso.packaging_manage"]),
    ("", &["vso.pipelineresources_use", "vso.pipelineresources_manage"]),
    ("", &["vso.project", "vso.project_write", "vso.project_manage"]),
    ("vso.profile", &["vso.release", "vso.release_execute", "vso.release_manage"]),
    ("", &["vso.securefiles_read", "vso.securefiles_write", "vso.securefiles_manage"]),
    ("", &["vso.security_manage"]),
    ("vso.profile", &["vso.serviceendpoint", "vso.serviceendpoint_query", "vso.serviceendpoint_manage"]),
    ("vso.profile", &["vso.hooks", "vso.hooks_write"]),
    ("vso.profile", &["vso.hooks_interact"]),
    ("", &["vso.settings", "vso.settings_write"]),
    ("vso.profile", &["vso.symbols", "vso.symbols_write", "vso.symbols_manage"]),
    ("", &["vso.taskgroups_read", "vso.taskgroups_write", "vso.taskgroups_manage"]),
    ("", &["vso.dashboards", "vso.dashboards_manage"]),
    ("vso.profile", &["vso.test", "vso.test_write"]),
    ("", &["vso.threads_full"]),
    ("", &["vso.tokens"]),
    ("", &["vso.tokenadministration"]),
    ("", &["vso.profile", "vso.profile_write"]),
    ("", &["vso.variablegroups_read", "vso.variablegroups_write", "vso.variablegroups_manage"]),
    ("", &["vso.wiki", "vso.wiki_write"]),
    ("vso.hooks_write", &["vso.work", "vso.work_write", "vso.work_full"]),
];

/// Every scope and the one it directly includes, in catalogue order.
fn catalogue() -> impl Iterator<Item = (&'static str, Option<&'static str>)> {
    LADDERS.iter().flat_map(|&(base, ladder)| {
        let below = std::iter::once(base).chain(ladder.iter().copied());
        ladder
            .iter()
            .copied()
            .zip(below)
            .map(|(name, below)| (name, Some(below).filter(|b| !b.is_empty())))
    })
}

/// The scope `name` directly includes, if any.
fn includes(name: &str) -> Option<&'static str> {
    catalogue().find(|(n, _)| *n == name)?.1
}

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
        catalogue()
            .find(|(n, _)| *n == name)
            .map(|(n, _)| Scope(n))
            .ok_or_else(|| DomainError::UnknownScope(name.to_owned()))
    }

    /// Every scope in the catalogue, in catalogue order.
    pub fn all() -> impl Iterator<Item = Scope> {
        catalogue().map(|(n, _)| Scope(n))
    }

    /// The scope string as Azure DevOps spells it.
    pub fn as_str(&self) -> &'static str {
        self.0
    }

    /// True if holding `self` grants `other`: equal, `self` is `app_token`,
    /// or `other` is below `self` in the chain of inclusions.
    pub fn covers(&self, other: &Scope) -> bool {
        if self == other || *self == Scope::APP_TOKEN {
            return true;
        }
        // A scope includes at most one other, so inclusion is a chain.
        let mut below = includes(self.0);
        while let Some(name) = below {
            if name == other.0 {
                return true;
            }
            below = includes(name);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(name: &str) -> Scope {
        Scope::parse(name).unwrap()
    }

    #[test]
    fn write_covers_read() {
        for (write, read) in [
            ("vso.code_write", "vso.code"),
            ("vso.packaging_write", "vso.packaging"),
            ("vso.work_write", "vso.work"),
        ] {
            assert!(scope(write).covers(&scope(read)), "{write}");
        }
    }

    #[test]
    fn read_does_not_cover_write() {
        for (read, write) in [
            ("vso.code", "vso.code_write"),
            ("vso.packaging", "vso.packaging_write"),
        ] {
            assert!(!scope(read).covers(&scope(write)), "{read}");
        }
    }

    #[test]
    fn code_read_includes_service_hook_write() {
        // A surprise of the upstream table, kept faithfully.
        for read in ["vso.code", "vso.build", "vso.work"] {
            assert!(scope(read).covers(&scope("vso.hooks_write")), "{read}");
        }
    }

    #[test]
    fn inclusion_is_transitive() {
        assert!(scope("vso.code_full").covers(&scope("vso.code")));
        assert!(scope("vso.code_full").covers(&scope("vso.hooks")));
        assert!(scope("vso.code_full").covers(&scope("vso.profile")));
        assert!(scope("vso.environment_manage").covers(&scope("vso.agentpools")));
        assert!(!scope("vso.code_full").covers(&scope("vso.packaging")));
    }

    #[test]
    fn app_token_covers_every_scope() {
        for s in Scope::all() {
            assert!(Scope::APP_TOKEN.covers(&s), "app_token should cover {s}");
        }
    }

    #[test]
    fn nothing_but_app_token_covers_app_token() {
        for s in Scope::all().filter(|s| *s != Scope::APP_TOKEN) {
            assert!(!s.covers(&Scope::APP_TOKEN), "{s} must not cover app_token");
        }
        assert!(Scope::APP_TOKEN.covers(&Scope::APP_TOKEN));
    }

    #[test]
    fn unknown_scope_is_an_error_naming_it() {
        let err = Scope::parse("vso.code_writ").unwrap_err();
        assert_eq!(err, DomainError::UnknownScope("vso.code_writ".into()));
        assert!(err.to_string().contains("vso.code_writ"));
        // Entra-only and retired scopes are not PAT scopes.
        for name in [
            "user_impersonation",
            "vso.pats",
            "vso.pats_manage",
            "vso.loadtest",
            "vso.loadtest_write",
            "VSO.CODE",
            "",
        ] {
            assert!(Scope::parse(name).is_err(), "{name:?} should be unknown");
        }
    }

    #[test]
    fn every_included_scope_is_in_the_catalogue() {
        let mut names = BTreeSet::new();
        for (name, _) in catalogue() {
            assert!(names.insert(name), "{name} is listed twice");
        }
        for (name, inc) in catalogue().filter_map(|(n, inc)| Some((n, inc?))) {
            assert!(names.contains(inc), "{name} includes unknown {inc}");
            assert_ne!(inc, "app_token", "{name} must not include app_token");
            assert_ne!(inc, name, "{name} includes itself");
        }
    }

    #[test]
    fn catalogue_holds_the_documented_families() {
        for name in [
            "vso.advsec_manage",
            "vso.extension.data_write",
            "vso.gallery_acquire",
            "vso.notification_diagnostics",
            "vso.memberentitlementmanagement_write",
            "vso.githubconnections_manage",
            "vso.pipelineresources_manage",
            "vso.securefiles_manage",
            "vso.taskgroups_manage",
            "vso.variablegroups_manage",
            "vso.hooks_interact",
            "vso.governance",
            "vso.tokens",
            "vso.tokenadministration",
        ] {
            assert!(Scope::parse(name).is_ok(), "{name} missing");
        }
    }

    #[test]
    fn scope_set_is_sorted_and_deduplicated() {
        let set = ScopeSet::parse(["vso.packaging", "vso.code_write", "vso.packaging"]).unwrap();
        assert_eq!(set.to_strings(), ["vso.code_write", "vso.packaging"]);
        assert_eq!(set.to_upstream(), "vso.code_write vso.packaging");
        let same = ScopeSet::parse_upstream("  vso.packaging\tvso.code_write  ").unwrap();
        assert_eq!(set, same);
    }

    #[test]
    fn scope_set_needs_at_least_one_known_scope() {
        assert_eq!(
            ScopeSet::parse(Vec::<String>::new()),
            Err(DomainError::NoScopes)
        );
        assert_eq!(ScopeSet::parse_upstream("   "), Err(DomainError::NoScopes));
        assert_eq!(
            ScopeSet::parse(["vso.code", "vso.nope"]),
            Err(DomainError::UnknownScope("vso.nope".into()))
        );
    }

    #[test]
    fn scope_set_covers_with_inclusion() {
        let held = ScopeSet::parse(["vso.code_write", "vso.packaging"]).unwrap();
        let wanted = ScopeSet::parse(["vso.code", "vso.profile"]).unwrap();
        assert!(held.covers(&wanted));
        assert!(held.covers_scope(&scope("vso.hooks_write")));
        let more = ScopeSet::parse(["vso.code", "vso.packaging_write"]).unwrap();
        assert!(!held.covers(&more));
        let full = ScopeSet::parse(["app_token"]).unwrap();
        assert!(full.covers(&more));
        assert!(!held.covers(&full));
    }
}
