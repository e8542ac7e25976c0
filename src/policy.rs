//! Which identity may lease which organizations, scopes and TTLs, how many
//! leases it may hold at once, and who is an admin.
//!
//! A policy is a YAML file (docs/policy.md), described by the JSON
//! Schema `policy.schema.json` at the repository root:
//!
//! ```yaml
//! admins: ["apikey:ops"]             # exact identities only, never patterns
//! rules:
//!   - name: ci-code                  # required, unique
//!     identities: ["apikey:ci", "k8s:system:serviceaccount:build:*"]
//!     identity_regexes: ["^k8s:system:serviceaccount:ci-[a-z0-9-]+:builder$"]
//!     organizations: ["fabrikam"]    # exact, case-insensitive
//!     scopes: ["vso.code_write", "vso.packaging"]   # grants; inclusion applies
//!     default_ttl: 1h                # humantime
//!     max_ttl: 8h
//!     max_active_leases: 5           # optional cap per identity
//! ```
//!
//! Deny by default. A request is allowed when one rule matches the caller's
//! typed identity and covers the organization, every scope (with inclusion;
//! `app_token` only where a rule names it) and the TTL; the first such rule
//! in file order decides, and its `max_active_leases` caps the caller.
//!
//! [`PolicyHandle`] holds the policy in force and reloads it on file change
//! or SIGHUP.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;

use crate::domain::{DomainError, Identity, Organization, Scope, ScopeSet};
use crate::error::{ErrorCode, ServiceError};

mod check;
mod reload;

pub use check::check;
pub use reload::{PolicyHandle, ReloadOutcome, ReloadTrigger, DEFAULT_POLL_INTERVAL};

/// Longest TTL a rule may grant: one year (365 days), the upstream limit on
/// a PAT's lifetime (docs/upstream-api.md, Maximum lifetime).
pub const MAX_TTL_LIMIT: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The JSON Schema (draft 2020-12) of the policy file, as published in the
/// repository (`policy.schema.json`).
pub const SCHEMA: &str = include_str!("../policy.schema.json");

/// Why a request was refused. `reason()` values are stable API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// No rule matches the caller's identity.
    NoMatchingRule,
    /// A rule matches the identity but not the organization.
    OrganizationNotAllowed,
    /// A rule matches identity and organization but not every scope.
    ScopeNotAllowed,
    /// Everything matches but the TTL is above the rule's max.
    TtlExceedsMax,
}

impl Denial {
    /// `google.rpc.ErrorInfo.reason`: `NO_MATCHING_RULE`,
    /// `ORGANIZATION_NOT_ALLOWED`, `SCOPE_NOT_ALLOWED`, `TTL_EXCEEDS_MAX`.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::NoMatchingRule => "NO_MATCHING_RULE",
            Denial::OrganizationNotAllowed => "ORGANIZATION_NOT_ALLOWED",
            Denial::ScopeNotAllowed => "SCOPE_NOT_ALLOWED",
            Denial::TtlExceedsMax => "TTL_EXCEEDS_MAX",
        }
    }

    /// How far a rule got before failing; the denial reported is the most
    /// specific one among the rules matching the identity.
    fn specificity(&self) -> u8 {
        match self {
            Denial::NoMatchingRule => 0,
            Denial::OrganizationNotAllowed => 1,
            Denial::ScopeNotAllowed => 2,
            Denial::TtlExceedsMax => 3,
        }
    }
}

/// A policy decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the named rule.
    Allow {
        /// The rule's name.
        rule: String,
        /// The requested TTL, or the rule's default when none was asked.
        ttl: Duration,
        /// The rule's maximum TTL (caps renewals: max_expire_time).
        max_ttl: Duration,
    },
    /// Refused.
    Deny {
        /// Why.
        denial: Denial,
        /// The closest rule, if one matched the identity.
        rule: Option<String>,
    },
}

/// One thing wrong with a policy document: the path of the bad field, e.g.
/// `rules[2].scopes[0]`, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `admins[1]`, `rules[0].max_ttl`, ... (indices from 0, file order).
    pub path: String,
    /// What is wrong, quoting the value (never a secret: policy holds none).
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not YAML of the policy's shape (a missing, unknown or mistyped
    /// field); the message carries the path (`rules[0]`) and line.
    #[error("policy is not valid: {0}")]
    Syntax(#[from] serde_norway::Error),
    /// Well-formed, but fields are invalid: every problem found, in file
    /// order, each with the path of its field.
    #[error("policy is not valid: {}", list(.0))]
    Invalid(Vec<Problem>),
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl PolicyError {
    /// Makes [`PolicyError::Read`] of an I/O error on the file at `path`.
    fn read(path: &Path) -> impl FnOnce(std::io::Error) -> PolicyError + '_ {
        |source| PolicyError::Read {
            path: path.to_owned(),
            source,
        }
    }

    /// Each problem as `path: message` lines (one for a read or syntax
    /// error), for `token-broker policy check`.
    pub fn problems(&self) -> Vec<String> {
        match self {
            PolicyError::Invalid(problems) => problems.iter().map(Problem::to_string).collect(),
            PolicyError::Syntax(e) => vec![e.to_string()],
            other => vec![other.to_string()],
        }
    }
}

impl ServiceError for PolicyError {
    /// Always internal: policy comes from the operator, not from callers.
    fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
    fn reason(&self) -> &'static str {
        "POLICY_INVALID"
    }
}

/// The file as written; validated into [`Policy`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    admins: Vec<String>,
    rules: Vec<RuleFile>,
    #[serde(default)]
    credentials: Vec<CredentialFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialFile {
    name: String,
    organization: String,
    scopes: Vec<String>,
    rotation_period: String,
    overlap: String,
    #[serde(default)]
    readers: Vec<String>,
    #[serde(default)]
    reader_regexes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    #[serde(default)]
    identities: Vec<String>,
    #[serde(default)]
    identity_regexes: Vec<String>,
    organizations: Vec<String>,
    scopes: Vec<String>,
    default_ttl: String,
    max_ttl: String,
    #[serde(default)]
    max_active_leases: Option<u32>,
}

/// Text prefixes of the identity kinds, as [`Identity`] prints them.
const KIND_PREFIXES: [(&str, &str); 4] = [
    ("apikey:", "apikey"),
    ("k8s:system:serviceaccount:", "k8s"),
    ("spiffe://", "spiffe"),
    ("x509:", "x509"),
];

const KIND_LIST: &str = "apikey:, k8s:system:serviceaccount:, spiffe:// or x509:";

/// Largest compiled identity regex (bytes); keeps a typo from costing memory.
const REGEX_SIZE_LIMIT: usize = 1 << 16;

/// One identity pattern of a rule:
/// - an exact identity (`identities`);
/// - a glob (`identities` with `*` or `?`): `*` matches any run and `?` any
///   one character except `:` and `/`, so a glob never crosses into another
///   namespace or path segment;
/// - an anchored regex (`identity_regexes`): `^KIND-PREFIX...$`, Rust
///   `regex` syntax (linear time), matched against the part after the kind
///   prefix.
///
/// The kind prefix is always literal and compared by kind: no pattern
/// matches two kinds (an alternation in a regex stays inside its kind).
#[derive(Clone, Debug)]
enum IdentityPattern {
    Exact(Identity),
    Pattern {
        kind: &'static str,
        prefix: &'static str,
        text: String,
        /// Matches the identity's text after `prefix`.
        rest: Regex,
    },
}

impl IdentityPattern {
    fn kind_of(text: &str) -> Result<(&'static str, &'static str), String> {
        KIND_PREFIXES
            .iter()
            .find(|(prefix, _)| text.starts_with(prefix))
            .copied()
            .ok_or_else(|| format!("{text:?} must start with {KIND_LIST}"))
    }

    /// An entry of `identities`: exact or glob.
    fn parse(text: &str) -> Result<Self, String> {
        let (prefix, kind) = Self::kind_of(text)?;
        let rest = &text[prefix.len()..];
        if !rest.contains(['*', '?']) {
            return text
                .parse::<Identity>()
                .map(IdentityPattern::Exact)
                .map_err(|e| e.to_string());
        }
        // A glob has the shape of an identity once its wildcards are filled.
        let filled = format!("{prefix}{}", rest.replace(['*', '?'], "x"));
        if let Err(e) = filled.parse::<Identity>() {
            let why = match &e {
                DomainError::InvalidIdentity(_, why) => why.to_string(),
                other => other.to_string(),
            };
            return Err(format!(
                "{text:?} is not a valid pattern: {why} ('*' and '?' do not match ':' or '/')"
            ));
        }
        let mut re = String::from("^");
        for c in rest.chars() {
            match c {
                '*' => re.push_str("[^:/]*"),
                '?' => re.push_str("[^:/]"),
                c => re.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
            }
        }
        re.push('$');
        Ok(IdentityPattern::Pattern {
            kind,
            prefix,
            text: text.to_owned(),
            rest: Regex::new(&re).map_err(|e| e.to_string())?,
        })
    }

    /// An entry of `identity_regexes`: `^` + a literal kind prefix + a
    /// regex + `$`.
    fn parse_regex(text: &str) -> Result<Self, String> {
        let Some(anchored) = text.strip_prefix('^') else {
            return Err(format!("{text:?} must be anchored: begin with '^'"));
        };
        let (prefix, kind) = Self::kind_of(anchored).map_err(|_| {
            format!("{text:?} must begin with '^' and a literal kind prefix: {KIND_LIST}")
        })?;
        let Some(rest) = anchored[prefix.len()..].strip_suffix('$') else {
            return Err(format!("{text:?} must be anchored: end with '$'"));
        };
        let rest = regex::RegexBuilder::new(&format!("^(?:{rest})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("{text:?} is not a valid regex: {e}"))?;
        Ok(IdentityPattern::Pattern {
            kind,
            prefix,
            text: text.to_owned(),
            rest,
        })
    }

    fn matches(&self, identity: &Identity) -> bool {
        match self {
            IdentityPattern::Exact(exact) => exact == identity,
            IdentityPattern::Pattern {
                kind, prefix, rest, ..
            } => {
                identity.kind() == *kind
                    && identity
                        .to_string()
                        .strip_prefix(prefix)
                        .is_some_and(|r| rest.is_match(r))
            }
        }
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityPattern::Exact(identity) => identity.fmt(f),
            IdentityPattern::Pattern { text, .. } => f.write_str(text),
        }
    }
}

/// One validated rule.
#[derive(Clone, Debug)]
pub struct Rule {
    name: String,
    identities: Vec<IdentityPattern>,
    organizations: BTreeSet<Organization>,
    scopes: ScopeSet,
    default_ttl: Duration,
    max_ttl: Duration,
    max_active_leases: Option<u32>,
}

impl Rule {
    /// The rule's unique name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TTL granted when a request names none.
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// Longest TTL granted, and the cap on renewals.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// Most live (PENDING, ACTIVE, REVOKING) leases an identity may hold
    /// when this rule decides its request; None: no cap.
    pub fn max_active_leases(&self) -> Option<u32> {
        self.max_active_leases
    }

    fn matches_identity(&self, identity: &Identity) -> bool {
        self.identities.iter().any(|p| p.matches(identity))
    }

    /// Allows, or says how far the request got.
    fn check(
        &self,
        organization: &Organization,
        scopes: &ScopeSet,
        ttl: Option<Duration>,
    ) -> Result<Duration, Denial> {
        if !self.organizations.contains(organization) {
            return Err(Denial::OrganizationNotAllowed);
        }
        // ScopeSet::covers grants `app_token` only for `app_token` itself.
        if !self.scopes.covers(scopes) {
            return Err(Denial::ScopeNotAllowed);
        }
        let ttl = ttl.unwrap_or(self.default_ttl);
        if ttl > self.max_ttl {
            return Err(Denial::TtlExceedsMax);
        }
        Ok(ttl)
    }

    /// Validates rule `index`, adding every problem found to `problems`.
    fn validate(index: usize, raw: RuleFile, problems: &mut Vec<Problem>) -> Option<Rule> {
        let before = problems.len();
        let mut fail = |field: &str, message: String| {
            problems.push(Problem {
                path: format!("rules[{index}].{field}"),
                message,
            })
        };
        if raw.name.trim().is_empty() {
            fail("name", "must not be empty".into());
        }
        if raw.identities.is_empty() && raw.identity_regexes.is_empty() {
            fail(
                "identities",
                "must list at least one identity (or identity_regexes one regex)".into(),
            );
        }
        let mut identities = parse_each(
            "identities",
            &raw.identities,
            IdentityPattern::parse,
            &mut fail,
        );
        identities.extend(parse_each(
            "identity_regexes",
            &raw.identity_regexes,
            IdentityPattern::parse_regex,
            &mut fail,
        ));
        if raw.organizations.is_empty() {
            fail(
                "organizations",
                "must list at least one organization".into(),
            );
        }
        let organizations: BTreeSet<_> = parse_each(
            "organizations",
            &raw.organizations,
            |text| Organization::parse(text).map_err(|e| e.to_string()),
            &mut fail,
        )
        .into_iter()
        .collect();
        if raw.scopes.is_empty() {
            fail("scopes", "must list at least one scope".into());
        }
        parse_each(
            "scopes",
            &raw.scopes,
            |text| Scope::parse(text).map_err(|_| format!("unknown scope {text:?}")),
            &mut fail,
        );
        let default_ttl = positive_duration("default_ttl", &raw.default_ttl, &mut fail);
        let max_ttl = positive_duration("max_ttl", &raw.max_ttl, &mut fail);
        if let Some(max) = max_ttl {
            if max > MAX_TTL_LIMIT {
                fail(
                    "max_ttl",
                    format!(
                        "{} is over one year (365d), the upstream PAT lifetime limit",
                        raw.max_ttl
                    ),
                );
            }
        }
        if let (Some(default), Some(max)) = (default_ttl, max_ttl) {
            if default > max {
                fail(
                    "default_ttl",
                    format!("{} is longer than max_ttl {}", raw.default_ttl, raw.max_ttl),
                );
            }
        }
        if raw.max_active_leases == Some(0) {
            fail(
                "max_active_leases",
                "must be at least 1 (to grant nothing, remove the rule)".into(),
            );
        }
        if problems.len() > before {
            return None;
        }
        Some(Rule {
            name: raw.name,
            identities,
            organizations,
            scopes: ScopeSet::parse(&raw.scopes).ok()?,
            default_ttl: default_ttl?,
            max_ttl: max_ttl?,
            max_active_leases: raw.max_active_leases,
        })
    }
}

/// Longest name of a managed credential (it goes into display names and
/// resource names).
pub const MAX_CREDENTIAL_NAME_LEN: usize = 63;

/// One validated entry of `credentials:`: a managed credential, a
/// long-lived PAT the broker rotates every `rotation_period`, the previous
/// version staying valid for `overlap` after the next exists (issue 17;
/// docs/policy.md, "Managed credentials").
#[derive(Clone, Debug)]
pub struct CredentialSpec {
    name: String,
    organization: Organization,
    scopes: ScopeSet,
    rotation_period: Duration,
    overlap: Duration,
    readers: Vec<IdentityPattern>,
}

impl CredentialSpec {
    /// The credential's unique name (`[a-z0-9-]`, 1 to 63 characters).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The organization its PATs are minted in.
    pub fn organization(&self) -> &Organization {
        &self.organization
    }

    /// The scopes its PATs carry.
    pub fn scopes(&self) -> &ScopeSet {
        &self.scopes
    }

    /// How often a new version is minted (P).
    pub fn rotation_period(&self) -> Duration {
        self.rotation_period
    }

    /// How long the previous version stays valid after the next exists
    /// (O, shorter than P).
    pub fn overlap(&self) -> Duration {
        self.overlap
    }

    /// True if `identity` may read the credential: listed in `readers`
    /// (exact or glob) or matched by `reader_regexes`, exactly as a rule's
    /// `identities` and `identity_regexes` match.
    pub fn is_reader(&self, identity: &Identity) -> bool {
        self.readers.iter().any(|p| p.matches(identity))
    }

    /// Validates credential `index`, adding every problem found to `problems`.
    fn validate(index: usize, raw: CredentialFile, problems: &mut Vec<Problem>) -> Option<Self> {
        let before = problems.len();
        let mut fail = |field: &str, message: String| {
            problems.push(Problem {
                path: format!("credentials[{index}].{field}"),
                message,
            })
        };
        if raw.name.is_empty()
            || raw.name.len() > MAX_CREDENTIAL_NAME_LEN
            || !raw
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            fail(
                "name",
                format!(
                    "{:?} must be 1 to {MAX_CREDENTIAL_NAME_LEN} characters of a-z, 0-9 and '-'",
                    raw.name
                ),
            );
        }
        if raw.readers.is_empty() && raw.reader_regexes.is_empty() {
            fail(
                "readers",
                "must list at least one identity (or reader_regexes one regex)".into(),
            );
        }
        let mut readers = parse_each("readers", &raw.readers, IdentityPattern::parse, &mut fail);
        readers.extend(parse_each(
            "reader_regexes",
            &raw.reader_regexes,
            IdentityPattern::parse_regex,
            &mut fail,
        ));
        let organization = match Organization::parse(&raw.organization) {
            Ok(o) => Some(o),
            Err(e) => {
                fail("organization", e.to_string());
                None
            }
        };
        if raw.scopes.is_empty() {
            fail("scopes", "must list at least one scope".into());
        }
        parse_each(
            "scopes",
            &raw.scopes,
            |text| Scope::parse(text).map_err(|_| format!("unknown scope {text:?}")),
            &mut fail,
        );
        let period = positive_duration("rotation_period", &raw.rotation_period, &mut fail);
        let overlap = positive_duration("overlap", &raw.overlap, &mut fail);
        if let (Some(p), Some(o)) = (period, overlap) {
            if o >= p {
                fail(
                    "overlap",
                    format!(
                        "{} must be shorter than rotation_period {}",
                        raw.overlap, raw.rotation_period
                    ),
                );
            } else if p + o > MAX_TTL_LIMIT {
                fail(
                    "rotation_period",
                    format!(
                        "rotation_period + overlap ({} + {}) is over one year (365d), the upstream PAT lifetime limit",
                        raw.rotation_period, raw.overlap
                    ),
                );
            }
        }
        if problems.len() > before {
            return None;
        }
        Some(CredentialSpec {
            name: raw.name,
            organization: organization?,
            scopes: ScopeSet::parse(&raw.scopes).ok()?,
            rotation_period: period?,
            overlap: overlap?,
            readers,
        })
    }
}

/// `text` as a duration longer than zero (humantime: `90s`, `1h 30m`);
/// None, with a problem on `field`, otherwise.
fn positive_duration(
    field: &str,
    text: &str,
    fail: &mut impl FnMut(&str, String),
) -> Option<Duration> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => {
            fail(field, "must be longer than zero".into());
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            fail(field, format!("invalid duration {text:?}: {e}"));
            None
        }
    }
}

/// Parses each entry of the list `field`, reporting a bad one as
/// `field[i]`; the good ones, in order.
fn parse_each<T>(
    field: &str,
    texts: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
    fail: &mut impl FnMut(&str, String),
) -> Vec<T> {
    let mut parsed = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        match parse(text) {
            Ok(value) => parsed.push(value),
            Err(message) => fail(&format!("{field}[{i}]"), message),
        }
    }
    parsed
}

/// A parsed, validated policy. The default policy has no rules and no
/// admins: it denies everything.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    admins: BTreeSet<Identity>,
    credentials: Vec<CredentialSpec>,
}

impl Policy {
    /// Parses and validates a policy document.
    ///
    /// Errors: [`PolicyError::Syntax`] for bad YAML, a missing, unknown or
    /// mistyped field (with its path and line); [`PolicyError::Invalid`]
    /// with every problem and its path: an empty or duplicate rule name, a
    /// bad identity, glob or regex, an admin that is a pattern, a bad
    /// organization, an unknown scope, a bad or zero duration,
    /// `default_ttl` > `max_ttl`, `max_ttl` over one year, a zero
    /// `max_active_leases`.
    pub fn from_yaml(text: &str) -> Result<Policy, PolicyError> {
        let file: PolicyFile = serde_norway::from_str(text)?;
        let mut problems = Vec::new();
        let mut admins = BTreeSet::new();
        for (i, text) in file.admins.iter().enumerate() {
            match parse_admin(text) {
                Ok(identity) => {
                    admins.insert(identity);
                }
                Err(message) => problems.push(Problem {
                    path: format!("admins[{i}]"),
                    message,
                }),
            }
        }
        let mut names = BTreeSet::new();
        let mut rules = Vec::with_capacity(file.rules.len());
        for (index, raw) in file.rules.into_iter().enumerate() {
            if !raw.name.trim().is_empty() && !names.insert(raw.name.clone()) {
                problems.push(Problem {
                    path: format!("rules[{index}].name"),
                    message: format!("another rule is named {:?}", raw.name),
                });
            }
            if let Some(rule) = Rule::validate(index, raw, &mut problems) {
                rules.push(rule);
            }
        }
        let mut credential_names = BTreeSet::new();
        let mut credentials = Vec::with_capacity(file.credentials.len());
        for (index, raw) in file.credentials.into_iter().enumerate() {
            if !raw.name.is_empty() && !credential_names.insert(raw.name.clone()) {
                problems.push(Problem {
                    path: format!("credentials[{index}].name"),
                    message: format!("another credential is named {:?}", raw.name),
                });
            }
            if let Some(spec) = CredentialSpec::validate(index, raw, &mut problems) {
                credentials.push(spec);
            }
        }
        if !problems.is_empty() {
            return Err(PolicyError::Invalid(problems));
        }
        Ok(Policy {
            rules,
            admins,
            credentials,
        })
    }

    /// Reads and validates the policy file at `path`.
    ///
    /// Errors: [`PolicyError::Read`], then as [`Policy::from_yaml`].
    pub fn load(path: impl AsRef<Path>) -> Result<Policy, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(PolicyError::read(path))?;
        Policy::from_yaml(&text)
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule named `name`, if any (e.g. the one a [`Decision`] names).
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// The managed credentials (`credentials:`), in file order.
    pub fn credentials(&self) -> &[CredentialSpec] {
        &self.credentials
    }

    /// The managed credential named `name`, if the policy declares one.
    pub fn credential(&self, name: &str) -> Option<&CredentialSpec> {
        self.credentials.iter().find(|c| c.name == name)
    }

    /// True if `identity` is listed in `admins` (exactly: admin rights are
    /// never granted through a pattern), so it may call AdminService.
    pub fn is_admin(&self, identity: &Identity) -> bool {
        self.admins.contains(identity)
    }

    /// Decides whether `identity` may lease `scopes` in `organization` for
    /// `ttl` (None: the rule's default).
    ///
    /// Allowed by the first rule, in file order, that matches the identity
    /// and covers the organization, every scope and the TTL. Otherwise
    /// denied with the most specific failure among the rules matching the
    /// identity (organization < scope < TTL; the first such rule is named),
    /// or `NoMatchingRule` when none matches it. The active-lease cap of
    /// the deciding rule ([`Rule::max_active_leases`]) is the lease
    /// service's to enforce: it needs the store.
    pub fn decide(
        &self,
        identity: &Identity,
        organization: &Organization,
        scopes: &ScopeSet,
        ttl: Option<Duration>,
    ) -> Decision {
        let mut closest: Option<(Denial, &Rule)> = None;
        for rule in self.rules.iter().filter(|r| r.matches_identity(identity)) {
            match rule.check(organization, scopes, ttl) {
                Ok(ttl) => {
                    return Decision::Allow {
                        rule: rule.name.clone(),
                        ttl,
                        max_ttl: rule.max_ttl,
                    }
                }
                Err(denial) => {
                    if closest
                        .as_ref()
                        .is_none_or(|(best, _)| denial.specificity() > best.specificity())
                    {
                        closest = Some((denial, rule));
                    }
                }
            }
        }
        match closest {
            Some((denial, rule)) => Decision::Deny {
                denial,
                rule: Some(rule.name.clone()),
            },
            None => Decision::Deny {
                denial: Denial::NoMatchingRule,
                rule: None,
            },
        }
    }

    /// The TTL a request without one would get (the deciding rule's
    /// `default_ttl`), or None if such a request is denied. For renewals
    /// without an increment.
    pub fn default_ttl_for(
        &self,
        identity: &Identity,
        organization: &Organization,
        scopes: &ScopeSet,
    ) -> Option<Duration> {
        match self.decide(identity, organization, scopes, None) {
            Decision::Allow { ttl, .. } => Some(ttl),
            Decision::Deny { .. } => None,
        }
    }
}

/// An entry of `admins`: an exact identity; a glob or regex is refused.
fn parse_admin(text: &str) -> Result<Identity, String> {
    if text.starts_with('^') || text.contains(['*', '?']) {
        return Err(format!(
            "{text:?} is a pattern; admin rights go to exact identities only"
        ));
    }
    text.parse::<Identity>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    const POLICY: &str = r#"
rules:
  - name: ci-code
    identities: ["apikey:ci", "k8s:system:serviceaccount:build:*"]
    organizations: ["Fabrikam"]
    scopes: ["vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
  - name: ci-code-long
    identities: ["apikey:ci"]
    organizations: ["fabrikam"]
    scopes: ["vso.code"]
    default_ttl: 2h
    max_ttl: 24h
  - name: ci-other-org
    identities: ["apikey:ci"]
    organizations: ["contoso"]
    scopes: ["vso.work"]
    default_ttl: 30m
    max_ttl: 1h
  - name: admin-full
    identities: ["apikey:admin"]
    organizations: ["fabrikam"]
    scopes: ["app_token"]
    default_ttl: 15m
    max_ttl: 1h
  - name: manage-everything
    identities: ["apikey:manager"]
    organizations: ["fabrikam"]
    scopes: ["vso.code_full", "vso.packaging_manage", "vso.work_full"]
    default_ttl: 15m
    max_ttl: 1h
"#;

    fn policy() -> Policy {
        Policy::from_yaml(POLICY).unwrap()
    }

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    fn org(s: &str) -> Organization {
        Organization::parse(s).unwrap()
    }

    fn scopes(s: &[&str]) -> ScopeSet {
        ScopeSet::parse(s).unwrap()
    }

    fn allow(rule: &str, ttl: Duration, max_ttl: Duration) -> Decision {
        Decision::Allow {
            rule: rule.into(),
            ttl,
            max_ttl,
        }
    }

    fn deny(denial: Denial, rule: Option<&str>) -> Decision {
        Decision::Deny {
            denial,
            rule: rule.map(str::to_owned),
        }
    }

    /// The sample policy's decision on `who` leasing `wanted` in `organization`.
    fn decide(who: &str, organization: &str, wanted: &[&str], ttl: Option<Duration>) -> Decision {
        policy().decide(&id(who), &org(organization), &scopes(wanted), ttl)
    }

    /// `p`'s decision on `who` leasing `vso.code` in fabrikam, without a TTL.
    fn code_for(p: &Policy, who: &Identity) -> Decision {
        p.decide(who, &org("fabrikam"), &scopes(&["vso.code"]), None)
    }

    /// The first problem of an invalid one-rule policy: (rule index,
    /// field path inside the rule, message).
    fn rule_error(yaml: &str) -> (usize, String, String) {
        match Policy::from_yaml(yaml) {
            Err(PolicyError::Invalid(problems)) => {
                let p = &problems[0];
                let rest = p.path.strip_prefix("rules[").expect("a rule path");
                let (index, field) = rest.split_once("].").expect("rules[i].field");
                (index.parse().unwrap(), field.to_owned(), p.message.clone())
            }
            other => panic!("expected a rule error, got {other:?}"),
        }
    }

    fn one_rule(fields: &str) -> String {
        format!("rules:\n  - name: r\n{fields}")
    }

    const GOOD_FIELDS: [(&str, &str); 5] = [
        ("identities", "[\"apikey:ci\"]"),
        ("organizations", "[\"fabrikam\"]"),
        ("scopes", "[\"vso.code\"]"),
        ("default_ttl", "1h"),
        ("max_ttl", "8h"),
    ];

    /// A one-rule policy with `field` set to `value`.
    fn with_field(field: &str, value: &str) -> String {
        let fields: String = GOOD_FIELDS
            .iter()
            .map(|(f, v)| format!("    {f}: {}\n", if *f == field { value } else { v }))
            .collect();
        one_rule(&fields)
    }

    #[test]
    fn a_request_inside_one_rule_is_allowed_and_names_it() {
        let d = decide(
            "apikey:ci",
            "fabrikam",
            &["vso.code_write", "vso.packaging"],
            Some(2 * HOUR),
        );
        assert_eq!(d, allow("ci-code", 2 * HOUR, 8 * HOUR));
    }

    #[test]
    fn without_a_ttl_the_rule_default_applies() {
        let d = decide("apikey:ci", "fabrikam", &["vso.packaging"], None);
        assert_eq!(d, allow("ci-code", HOUR, 8 * HOUR));
        assert_eq!(
            policy().default_ttl_for(&id("apikey:ci"), &org("fabrikam"), &scopes(&["vso.code"])),
            Some(HOUR)
        );
        assert_eq!(
            policy().default_ttl_for(
                &id("apikey:nobody"),
                &org("fabrikam"),
                &scopes(&["vso.code"])
            ),
            None
        );
    }

    #[test]
    fn a_grant_of_code_write_allows_code_read_and_what_it_includes() {
        for wanted in [&["vso.code"][..], &["vso.hooks_write", "vso.profile"]] {
            let d = decide("apikey:ci", "fabrikam", wanted, None);
            assert_eq!(d, allow("ci-code", HOUR, 8 * HOUR), "{wanted:?}");
        }
    }

    #[test]
    fn the_first_allowing_rule_in_file_order_decides() {
        // Both ci-code and ci-code-long allow vso.code for 1h.
        let d = decide("apikey:ci", "fabrikam", &["vso.code"], Some(HOUR));
        assert_eq!(d, allow("ci-code", HOUR, 8 * HOUR));
        // Only ci-code-long allows 12h.
        let d = decide("apikey:ci", "fabrikam", &["vso.code"], Some(12 * HOUR));
        assert_eq!(d, allow("ci-code-long", 12 * HOUR, 24 * HOUR));
    }

    #[test]
    fn an_unknown_identity_is_denied_by_default() {
        let d = decide("apikey:stranger", "fabrikam", &["vso.code"], None);
        assert_eq!(d, deny(Denial::NoMatchingRule, None));
        let d = code_for(&Policy::default(), &id("apikey:ci"));
        assert_eq!(d, deny(Denial::NoMatchingRule, None));
    }

    #[test]
    fn another_organization_is_denied_naming_the_closest_rule() {
        let d = decide(
            "k8s:system:serviceaccount:build:restorer",
            "contoso",
            &["vso.packaging"],
            None,
        );
        assert_eq!(d, deny(Denial::OrganizationNotAllowed, Some("ci-code")));
    }

    #[test]
    fn scopes_no_single_rule_grants_are_denied_naming_the_closest_rule() {
        for (who, wanted, closest) in [
            // Outside every rule.
            ("apikey:ci", &["vso.code_manage"][..], "ci-code"),
            // vso.code_write is in ci-code, vso.work in ci-other-org: no
            // single rule grants both for fabrikam.
            ("apikey:ci", &["vso.code_write", "vso.work"], "ci-code"),
            // app_token is never granted through inclusion.
            ("apikey:manager", &["app_token"], "manage-everything"),
        ] {
            let d = decide(who, "fabrikam", wanted, None);
            assert_eq!(
                d,
                deny(Denial::ScopeNotAllowed, Some(closest)),
                "{wanted:?}"
            );
        }
    }

    #[test]
    fn a_ttl_over_the_max_is_denied_and_beats_less_specific_failures() {
        // ci-code fails on TTL (8h max), ci-code-long on scope, ci-other-org
        // on organization: the TTL failure is the most specific.
        let d = decide("apikey:ci", "fabrikam", &["vso.code_write"], Some(9 * HOUR));
        assert_eq!(d, deny(Denial::TtlExceedsMax, Some("ci-code")));
        // Exactly the max is allowed.
        let d = decide("apikey:ci", "fabrikam", &["vso.code_write"], Some(8 * HOUR));
        assert_eq!(d, allow("ci-code", 8 * HOUR, 8 * HOUR));
    }

    #[test]
    fn app_token_is_granted_where_a_rule_names_it_and_covers_every_scope() {
        for wanted in [
            &["app_token"][..],
            &["vso.code_full", "vso.security_manage"],
        ] {
            let d = decide("apikey:admin", "fabrikam", wanted, None);
            assert_eq!(
                d,
                allow("admin-full", 15 * 60 * Duration::from_secs(1), HOUR)
            );
        }
    }

    #[test]
    fn glob_patterns_match_within_their_kind_only() {
        let p = policy();
        let ask = |who: &str| code_for(&p, &id(who));
        assert!(matches!(
            ask("k8s:system:serviceaccount:build:anything"),
            Decision::Allow { .. }
        ));
        for other in [
            "k8s:system:serviceaccount:deploy:anything",
            "apikey:build",
            "x509:build",
            "spiffe://build/anything",
        ] {
            assert_eq!(ask(other), deny(Denial::NoMatchingRule, None), "{other}");
        }
    }

    #[test]
    fn an_identity_of_another_kind_never_matches() {
        let identities = r#"["k8s:system:serviceaccount:a:b", "x509:*", "spiffe://td/*"]"#;
        let p = Policy::from_yaml(&with_field("identities", identities)).unwrap();
        let ask = |who: &Identity| code_for(&p, who);
        assert!(matches!(
            ask(&id("k8s:system:serviceaccount:a:b")),
            Decision::Allow { .. }
        ));
        for other in [
            Identity::ApiKey("b".into()),
            Identity::ApiKey("a.b".into()),
            Identity::ApiKey("system:serviceaccount:a:b".into()),
            Identity::X509("k8s:system:serviceaccount:a:b".into()),
            Identity::Spiffe("x509:td".into()),
        ] {
            let printed = other.to_string();
            assert_eq!(
                ask(&other),
                deny(Denial::NoMatchingRule, None),
                "{printed} must not match"
            );
        }
        assert!(matches!(
            ask(&id("x509:agent.example.org")),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            ask(&id("spiffe://td/agent")),
            Decision::Allow { .. }
        ));
        assert_eq!(
            ask(&id("spiffe://td/ns/agent")),
            deny(Denial::NoMatchingRule, None),
            "'*' does not cross '/'"
        );
    }

    #[test]
    fn question_marks_match_one_character_and_regex_characters_are_literal() {
        for (pattern, allowed, denied) in [
            (
                "apikey:ci-?",
                "apikey:ci-1",
                &["apikey:ci-12", "apikey:ci-"][..],
            ),
            ("apikey:ci.*", "apikey:ci.prod", &["apikey:ciXprod"]),
        ] {
            let identities = format!("[{pattern:?}]");
            let p = Policy::from_yaml(&with_field("identities", &identities)).unwrap();
            let ask = |who: &str| code_for(&p, &id(who));
            assert!(matches!(ask(allowed), Decision::Allow { .. }), "{pattern}");
            for who in denied {
                assert_eq!(ask(who), deny(Denial::NoMatchingRule, None), "{pattern}");
            }
        }
    }

    #[test]
    fn the_sample_policy_loads_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, POLICY).unwrap();
        let p = Policy::load(&path).unwrap();
        let names: Vec<_> = p.rules().iter().map(Rule::name).collect();
        assert_eq!(
            names,
            [
                "ci-code",
                "ci-code-long",
                "ci-other-org",
                "admin-full",
                "manage-everything"
            ]
        );
        assert_eq!(p.rules()[0].default_ttl(), HOUR);
        assert_eq!(p.rules()[0].max_ttl(), 8 * HOUR);
    }

    #[test]
    fn a_missing_file_is_reported_with_its_path() {
        let err = Policy::load("/nonexistent/policy.yaml").unwrap_err();
        assert!(matches!(err, PolicyError::Read { .. }));
        assert!(
            err.to_string().contains("/nonexistent/policy.yaml"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_scope_is_refused_naming_rule_and_field() {
        let (index, field, message) =
            rule_error(&with_field("scopes", "[\"vso.code\", \"vso.cod_write\"]"));
        assert_eq!((index, field.as_str()), (0, "scopes[1]"));
        assert!(message.contains("vso.cod_write"), "{message}");
    }

    #[test]
    fn bad_ttls_are_refused_naming_the_field_and_saying_why() {
        for (field, value, why) in [
            // Not a duration, or zero.
            ("default_ttl", "soon", "soon"),
            ("max_ttl", "0s", "zero"),
            // A default over the max.
            ("default_ttl", "9h", "max_ttl"),
            // A max over one year, the upstream limit.
            ("max_ttl", "366days", "one year"),
        ] {
            let (_, refused, message) = rule_error(&with_field(field, value));
            assert_eq!(refused, field, "{value}");
            assert!(message.contains(why), "{message}");
        }
        assert!(Policy::from_yaml(&with_field("max_ttl", "365days")).is_ok());
    }

    #[test]
    fn duplicate_rule_names_are_refused() {
        let rule = with_field("max_ttl", "8h");
        let body = rule.strip_prefix("rules:\n").unwrap();
        let err = Policy::from_yaml(&format!("rules:\n{body}{body}")).unwrap_err();
        assert_eq!(err.problems().len(), 1, "{err}");
        assert!(err.to_string().contains("rules[1].name"), "{err}");
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_place() {
        let yaml = format!("{}    max_leases: 3\n", with_field("max_ttl", "8h"));
        let err = Policy::from_yaml(&yaml).unwrap_err();
        assert!(matches!(err, PolicyError::Syntax(_)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("max_leases") && text.contains("rules[0]"),
            "{text}"
        );
        let err = Policy::from_yaml("rules: []\nversion: 2\n").unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
    }

    #[test]
    fn a_missing_field_is_refused_naming_it() {
        let yaml = "rules:\n  - name: r\n    identities: [\"apikey:ci\"]\n";
        let text = Policy::from_yaml(yaml).unwrap_err().to_string();
        assert!(
            text.contains("organizations") && text.contains("rules[0]"),
            "{text}"
        );
    }

    #[test]
    fn bad_identity_patterns_are_refused_naming_the_entry() {
        for pattern in [
            "*",
            "ci",
            "*:ci",
            "apikey:",
            "apikey:a b",
            "k8s:system:serviceaccount:build",
            "k8s:system:serviceaccount:*",
            "k8s:*",
        ] {
            let value = format!("[\"apikey:ok\", \"{pattern}\"]");
            let (_, field, _) = rule_error(&with_field("identities", &value));
            assert_eq!(field, "identities[1]", "{pattern}");
        }
        let (_, field, _) = rule_error(&with_field("identities", "[]"));
        assert_eq!(field, "identities");
    }

    #[test]
    fn bad_organizations_and_names_are_refused() {
        let (_, field, _) = rule_error(&with_field("organizations", "[\"fabrikam\", \"-x\"]"));
        assert_eq!(field, "organizations[1]");
        let (_, field, _) = rule_error(&with_field("organizations", "[]"));
        assert_eq!(field, "organizations");
        let (_, field, _) = rule_error(&with_field("scopes", "[]"));
        assert_eq!(field, "scopes");
        let yaml = with_field("max_ttl", "8h").replace("name: r", "name: \"  \"");
        let (_, field, _) = rule_error(&yaml);
        assert_eq!(field, "name");
    }

    #[test]
    fn an_empty_rule_list_denies_everything() {
        let p = Policy::from_yaml("rules: []\n").unwrap();
        let d = code_for(&p, &id("apikey:ci"));
        assert_eq!(d, deny(Denial::NoMatchingRule, None));
    }

    #[test]
    fn identity_regexes_match_within_their_kind_only() {
        let regexes = r#"    identity_regexes:
      - "^k8s:system:serviceaccount:ci-.*:builder$"
      - "^apikey:svc-[0-9]+|x509:evil$"
"#;
        let p = Policy::from_yaml(&(with_field("identities", "[]") + regexes)).unwrap();
        let ask = |who: &Identity| code_for(&p, who);
        for yes in [
            "k8s:system:serviceaccount:ci-web:builder",
            "k8s:system:serviceaccount:ci-:builder",
            "apikey:svc-42",
        ] {
            assert!(matches!(ask(&id(yes)), Decision::Allow { .. }), "{yes}");
        }
        for no in [
            id("k8s:system:serviceaccount:ci-web:deployer"),
            id("k8s:system:serviceaccount:prod:builder"),
            // The alternation stays inside the apikey kind.
            id("x509:evil"),
            Identity::ApiKey("k8s:system:serviceaccount:ci-web:builder".into()),
            Identity::X509("k8s:system:serviceaccount:ci-web:builder".into()),
            id("apikey:svc-42x"),
        ] {
            let printed = format!("{no:?}");
            assert_eq!(ask(&no), deny(Denial::NoMatchingRule, None), "{printed}");
        }
    }

    #[test]
    fn identity_regexes_must_be_anchored_and_begin_with_a_literal_kind() {
        for bad in [
            "k8s:system:serviceaccount:ci-.*:builder$",
            "^k8s:system:serviceaccount:ci-.*:builder",
            "^.*:builder$",
            "^(apikey|x509):ci$",
            "^k8s:.*$",
            "^apikey:ci[$",
        ] {
            let yaml = with_field("identities", "[\"apikey:ok\"]")
                + &format!(
                    "    identity_regexes: [{}]\n",
                    serde_json::to_string(bad).unwrap()
                );
            let (_, field, _) = rule_error(&yaml);
            assert_eq!(field, "identity_regexes[0]", "{bad}");
        }
    }

    #[test]
    fn a_rule_may_match_by_regex_alone_but_needs_some_identity() {
        let only_regex =
            with_field("identities", "[]") + "    identity_regexes: [\"^apikey:ci$\"]\n";
        let p = Policy::from_yaml(&only_regex).unwrap();
        assert!(matches!(
            code_for(&p, &id("apikey:ci")),
            Decision::Allow { .. }
        ));
        let (_, field, _) = rule_error(&with_field("identities", "[]"));
        assert_eq!(field, "identities");
    }

    #[test]
    fn admins_are_exact_identities_and_nothing_else_is_admin() {
        let p = Policy::from_yaml(
            "admins: [\"apikey:ops\", \"k8s:system:serviceaccount:sec:responder\"]\nrules: []\n",
        )
        .unwrap();
        assert!(p.is_admin(&id("apikey:ops")));
        assert!(p.is_admin(&id("k8s:system:serviceaccount:sec:responder")));
        for no in [
            id("apikey:ops2"),
            id("x509:ops"),
            Identity::ApiKey("k8s:system:serviceaccount:sec:responder".into()),
        ] {
            assert!(!p.is_admin(&no), "{no:?}");
        }
        assert!(!Policy::default().is_admin(&id("apikey:ops")));
    }

    #[test]
    fn an_admin_pattern_is_a_load_error() {
        for pattern in [
            "apikey:ops-*",
            "k8s:system:serviceaccount:sec:*",
            "apikey:op?",
            "^apikey:ops$",
            "ops",
        ] {
            let yaml = format!("admins: [\"apikey:ok\", {pattern:?}]\nrules: []\n");
            match Policy::from_yaml(&yaml) {
                Err(PolicyError::Invalid(problems)) => {
                    assert_eq!(problems.len(), 1, "{pattern}");
                    assert_eq!(problems[0].path, "admins[1]", "{pattern}");
                }
                other => panic!("{pattern}: expected a load error, got {other:?}"),
            }
        }
    }

    #[test]
    fn max_active_leases_is_read_and_must_be_positive() {
        let yaml = with_field("max_ttl", "8h") + "    max_active_leases: 2\n";
        let p = Policy::from_yaml(&yaml).unwrap();
        assert_eq!(p.rule("r").unwrap().max_active_leases(), Some(2));
        assert_eq!(policy().rule("ci-code").unwrap().max_active_leases(), None);
        let (_, field, _) =
            rule_error(&(with_field("max_ttl", "8h") + "    max_active_leases: 0\n"));
        assert_eq!(field, "max_active_leases");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let yaml = r#"
admins: ["apikey:*"]
rules:
  - name: a
    identities: ["apikey:ci", "nobody"]
    organizations: ["fabrikam"]
    scopes: ["vso.code", "vso.kode"]
    default_ttl: 1h
    max_ttl: 2years
"#;
        let err = Policy::from_yaml(yaml).unwrap_err();
        let paths: Vec<_> = match &err {
            PolicyError::Invalid(problems) => problems.iter().map(|p| p.path.as_str()).collect(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            paths,
            [
                "admins[0]",
                "rules[0].identities[1]",
                "rules[0].scopes[1]",
                "rules[0].max_ttl"
            ]
        );
        assert!(
            err.to_string()
                .contains(r#"rules[0].scopes[1]: unknown scope "vso.kode""#),
            "{err}"
        );
    }

    /// A policy with `rules: []` and the credential entries `entries`
    /// (YAML list items at two spaces).
    fn with_credentials(entries: &str) -> String {
        format!("rules: []\ncredentials:\n{entries}")
    }

    fn credential(name: &str, period: &str, overlap: &str) -> String {
        format!(
            "  - name: {name}\n    organization: fabrikam\n    scopes: [\"vso.packaging\"]\n    rotation_period: {period}\n    overlap: {overlap}\n    readers: [\"apikey:mirror\", \"k8s:system:serviceaccount:mirror:*\"]\n    reader_regexes: [\"^apikey:sync-[0-9]+$\"]\n"
        )
    }

    fn problem_paths(yaml: &str) -> Vec<String> {
        match Policy::from_yaml(yaml) {
            Err(PolicyError::Invalid(problems)) => problems.into_iter().map(|p| p.path).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn credentials_load_with_rules_empty_and_readers_match_as_a_rules_identities() {
        let p =
            Policy::from_yaml(&with_credentials(&credential("mirror-feed", "7d", "1d"))).unwrap();
        assert!(p.rules().is_empty());
        let c = p.credential("mirror-feed").expect("declared");
        assert_eq!(c.rotation_period(), Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.overlap(), Duration::from_secs(24 * 3600));
        assert_eq!(c.organization().as_str(), "fabrikam");
        assert!(c.is_reader(&id("apikey:mirror")));
        assert!(c.is_reader(&id("k8s:system:serviceaccount:mirror:sync")));
        assert!(c.is_reader(&id("apikey:sync-12")));
        assert!(!c.is_reader(&id("apikey:sync-x")));
        assert!(!c.is_reader(&id("apikey:other")));
        // A glob never crosses kinds or namespaces.
        assert!(!c.is_reader(&id("k8s:system:serviceaccount:other:sync")));
        assert!(p.credential("other").is_none());
        // Credentials grant no lease.
        assert!(matches!(
            code_for(&p, &id("apikey:mirror")),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn an_overlap_not_shorter_than_the_period_is_refused_naming_overlap() {
        for overlap in ["7d", "8d"] {
            let yaml = with_credentials(&credential("mirror-feed", "7d", overlap));
            assert_eq!(problem_paths(&yaml), ["credentials[0].overlap"]);
        }
        let yaml = with_credentials(&credential("mirror-feed", "20s", "8s"));
        assert!(Policy::from_yaml(&yaml).is_ok());
    }

    #[test]
    fn bad_and_duplicate_credential_names_are_refused() {
        for bad in ["Mirror", "mirror_feed", "\"\"", "a.b"] {
            let yaml = with_credentials(&credential(bad, "7d", "1d"));
            assert_eq!(problem_paths(&yaml), ["credentials[0].name"], "{bad}");
        }
        let yaml = with_credentials(&format!(
            "{}{}",
            credential("mirror-feed", "7d", "1d"),
            credential("mirror-feed", "2d", "1h")
        ));
        let problems = match Policy::from_yaml(&yaml) {
            Err(PolicyError::Invalid(problems)) => problems,
            other => panic!("{other:?}"),
        };
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].path, "credentials[1].name");
        assert!(
            problems[0].message.contains("another credential"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn policy_check_names_credential_fields() {
        let yaml = with_credentials(&credential("mirror-feed", "1d", "1d"));
        let problems = check(&yaml);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "credentials[0].overlap");
        let yaml = with_credentials(&credential("Mirror", "7d", "1d"));
        let problems = check(&yaml);
        assert_eq!(problems[0].path, "credentials[0].name", "{problems:?}");
        let yaml = with_credentials(&format!(
            "{}{}",
            credential("a", "7d", "1d"),
            credential("a", "7d", "1d")
        ));
        let problems = check(&yaml);
        assert_eq!(problems[0].path, "credentials[1].name", "{problems:?}");
        assert!(check(&with_credentials(&credential("a", "20s", "8s"))).is_empty());
        // A credential without readers is refused by the schema.
        let yaml = "rules: []\ncredentials:\n  - name: a\n    organization: fabrikam\n    scopes: [\"vso.code\"]\n    rotation_period: 7d\n    overlap: 1d\n";
        assert!(!check(yaml).is_empty());
    }
}
