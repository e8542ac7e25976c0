//! Azure DevOps PAT scopes and their inclusion table (docs/upstream-api.md,
//! "Scope catalogue and inclusion", from Microsoft's "Available scopes"
//! list).

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

/// The catalogue: every PAT scope with the scopes it directly includes.
///
/// Source: docs/upstream-api.md, "Scope catalogue and inclusion" (Microsoft's
/// "Available scopes" table,
/// learn.microsoft.com .../integrate/get-started/authentication/oauth, its
/// "Includes" column, and the PAT-only scopes `app_token`,
/// `vso.governance`, `vso.tokens`, `vso.tokenadministration`). Left out on purpose: the
/// Entra-only `user_impersonation`, `vso.pats` and `vso.pats_manage`, and the
/// retired `vso.loadtest` scopes. `app_token` includes nothing here: its
/// full access is a rule in [`Scope::covers`], and no row includes it.
static CATALOGUE: &[Row] = &[
    row("app_token", &[]),
    row("vso.advsec", &[]),
    row("vso.advsec_write", &["vso.advsec"]),
    row("vso.advsec_manage", &["vso.advsec_write"]),
    row("vso.agentpools", &[]),
    row("vso.agentpools_manage", &["vso.agentpools"]),
    row("vso.environment_manage", &["vso.agentpools_manage"]),
    row("vso.analytics", &[]),
    row("vso.auditlog", &[]),
    row("vso.auditstreams_manage", &["vso.auditlog"]),
    row("vso.build", &["vso.hooks_write"]),
    row("vso.build_execute", &["vso.build"]),
    row("vso.code", &["vso.hooks_write"]),
    row("vso.code_write", &["vso.code"]),
    row("vso.code_manage", &["vso.code_write"]),
    row("vso.code_full", &["vso.code_manage"]),
    row("vso.code_status", &[]),
    row("vso.connected_server", &[]),
    row("vso.entitlements", &[]),
    row("vso.memberentitlementmanagement", &[]),
    row(
        "vso.memberentitlementmanagement_write",
        &["vso.memberentitlementmanagement"],
    ),
    row("vso.extension", &["vso.profile"]),
    row("vso.extension_manage", &["vso.extension"]),
    row("vso.extension.data", &["vso.profile"]),
    row("vso.extension.data_write", &["vso.extension.data"]),
    row("vso.githubconnections", &[]),
    row("vso.githubconnections_manage", &["vso.githubconnections"]),
    row("vso.governance", &[]),
    row("vso.graph", &[]),
    row("vso.graph_manage", &["vso.graph"]),
    row("vso.identity", &[]),
    row("vso.identity_manage", &["vso.identity"]),
    row("vso.machinegroup_manage", &["vso.agentpools_manage"]),
    row("vso.gallery", &["vso.profile"]),
    row("vso.gallery_acquire", &["vso.gallery"]),
    row("vso.gallery_publish", &["vso.gallery"]),
    row("vso.gallery_manage", &["vso.gallery_publish"]),
    row("vso.notification", &["vso.profile"]),
    row("vso.notification_write", &["vso.notification"]),
    row("vso.notification_manage", &["vso.notification_write"]),
    row("vso.notification_diagnostics", &["vso.notification"]),
    row("vso.packaging", &["vso.profile"]),
    row("vso.packaging_write", &["vso.packaging"]),
    row("vso.packaging_manage", &["vso.packaging_write"]),
    row("vso.pipelineresources_use", &[]),
    row(
        "vso.pipelineresources_manage",
        &["vso.pipelineresources_use"],
    ),
    row("vso.project", &[]),
    row("vso.project_write", &["vso.project"]),
    row("vso.project_manage", &["vso.project_write"]),
    row("vso.release", &["vso.profile"]),
    row("vso.release_execute", &["vso.release"]),
    row("vso.release_manage", &["vso.release_execute"]),
    row("vso.securefiles_read", &[]),
    row("vso.securefiles_write", &["vso.securefiles_read"]),
    row("vso.securefiles_manage", &["vso.securefiles_write"]),
    row("vso.security_manage", &[]),
    row("vso.serviceendpoint", &["vso.profile"]),
    row("vso.serviceendpoint_query", &["vso.serviceendpoint"]),
    row("vso.serviceendpoint_manage", &["vso.serviceendpoint_query"]),
    row("vso.hooks", &["vso.profile"]),
    row("vso.hooks_write", &["vso.hooks"]),
    row("vso.hooks_interact", &["vso.profile"]),
    row("vso.settings", &[]),
    row("vso.settings_write", &["vso.settings"]),
    row("vso.symbols", &["vso.profile"]),
    row("vso.symbols_write", &["vso.symbols"]),
    row("vso.symbols_manage", &["vso.symbols_write"]),
    row("vso.taskgroups_read", &[]),
    row("vso.taskgroups_write", &["vso.taskgroups_read"]),
    row("vso.taskgroups_manage", &["vso.taskgroups_write"]),
    row("vso.dashboards", &[]),
    row("vso.dashboards_manage", &["vso.dashboards"]),
    row("vso.test", &["vso.profile"]),
    row("vso.test_write", &["vso.test"]),
    row("vso.threads_full", &[]),
    row("vso.tokens", &[]),
    row("vso.tokenadministration", &[]),
    row("vso.profile", &[]),
    row("vso.profile_write", &["vso.profile"]),
    row("vso.variablegroups_read", &[]),
    row("vso.variablegroups_write", &["vso.variablegroups_read"]),
    row("vso.variablegroups_manage", &["vso.variablegroups_write"]),
    row("vso.wiki", &[]),
    row("vso.wiki_write", &["vso.wiki"]),
    row("vso.work", &["vso.hooks_write"]),
    row("vso.work_write", &["vso.work"]),
    row("vso.work_full", &["vso.work_write"]),
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

    /// Every scope in the catalogue, in catalogue order.
    pub fn all() -> impl Iterator<Item = Scope> {
        CATALOGUE.iter().map(|r| Scope(r.name))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(name: &str) -> Scope {
        Scope::parse(name).unwrap()
    }

    #[test]
    fn write_covers_read() {
        assert!(scope("vso.code_write").covers(&scope("vso.code")));
        assert!(scope("vso.packaging_write").covers(&scope("vso.packaging")));
        assert!(scope("vso.work_write").covers(&scope("vso.work")));
    }

    #[test]
    fn read_does_not_cover_write() {
        assert!(!scope("vso.code").covers(&scope("vso.code_write")));
        assert!(!scope("vso.packaging").covers(&scope("vso.packaging_write")));
    }

    #[test]
    fn code_read_includes_service_hook_write() {
        // A surprise of the upstream table, kept faithfully.
        assert!(scope("vso.code").covers(&scope("vso.hooks_write")));
        assert!(scope("vso.build").covers(&scope("vso.hooks_write")));
        assert!(scope("vso.work").covers(&scope("vso.hooks_write")));
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
        for r in CATALOGUE {
            assert!(names.insert(r.name), "{} is listed twice", r.name);
        }
        for r in CATALOGUE {
            for inc in r.includes {
                assert!(names.contains(inc), "{} includes unknown {inc}", r.name);
                assert_ne!(*inc, "app_token", "{} must not include app_token", r.name);
                assert_ne!(*inc, r.name, "{} includes itself", r.name);
            }
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
