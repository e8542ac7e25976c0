//! `token-broker policy check`: a policy document against the published
//! JSON Schema (draft 2020-12, [`super::SCHEMA`]) and then the semantic
//! checks of [`Policy::from_yaml`] (what a schema cannot say: duplicate
//! names, TTL order, regex syntax), every problem with its field's path.

use std::sync::LazyLock;

use jsonschema::error::ValidationErrorKind;
use jsonschema::paths::{Location, LocationSegment};
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use super::{Policy, PolicyError, Problem, SCHEMA};

/// The compiled schema; the bundled file is checked by the tests.
static VALIDATOR: LazyLock<Validator> = LazyLock::new(|| {
    let schema: Value = serde_json::from_str(SCHEMA).expect("policy.schema.json is JSON");
    jsonschema::draft202012::new(&schema).expect("policy.schema.json is a valid schema")
});

/// Every problem in the policy document `text`, in document order: first
/// against the schema, then (if the schema is met) the semantic checks.
/// Empty when the document would load. Paths look like
/// `rules[2].scopes[0]`; a problem of the whole document has the path
/// `(document)`.
pub fn check(text: &str) -> Vec<Problem> {
    let document: Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return vec![Problem {
                path: "(document)".into(),
                message: format!("not YAML: {e}"),
            }]
        }
    };
    let problems: Vec<Problem> = VALIDATOR
        .iter_errors(&document)
        .map(|e| Problem {
            path: dotted(e.instance_path()),
            message: describe(&e),
        })
        .collect();
    if !problems.is_empty() {
        return problems;
    }
    match Policy::from_yaml(text) {
        Ok(_) => Vec::new(),
        Err(PolicyError::Invalid(problems)) => problems,
        Err(e) => vec![Problem {
            path: "(document)".into(),
            message: e.to_string(),
        }],
    }
}

/// `/rules/2/scopes/0` as `rules[2].scopes[0]`.
fn dotted(location: &Location) -> String {
    let mut out = String::new();
    for segment in location.segments() {
        match segment {
            LocationSegment::Index(i) => out.push_str(&format!("[{i}]")),
            LocationSegment::Property(p) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&p);
            }
        }
    }
    if out.is_empty() {
        out.push_str("(document)");
    }
    out
}

/// A short message; the validator's own text lists every allowed value of
/// an enum (the whole scope catalogue), which helps nobody.
fn describe(e: &ValidationError<'_>) -> String {
    let value = e.instance();
    match e.kind() {
        ValidationErrorKind::Enum { .. } if is_scope(e.instance_path()) => {
            format!("unknown scope {value}")
        }
        ValidationErrorKind::Enum { .. } => format!("{value} is not an allowed value"),
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let quoted: Vec<String> = unexpected.iter().map(|f| format!("{f:?}")).collect();
            format!("unknown field {}", quoted.join(", "))
        }
        ValidationErrorKind::Pattern { .. } => match list_name(e.instance_path()).as_deref() {
            Some("admins") => format!(
                "{value} is not an exact identity; admin rights go to exact identities only"
            ),
            Some("identities" | "readers") => format!(
                "{value} must be an identity or glob starting with {}",
                super::KIND_LIST
            ),
            Some("identity_regexes" | "reader_regexes") => format!(
                "{value} must be '^', a literal kind prefix ({}), a regex, '$'",
                super::KIND_LIST
            ),
            Some("organizations") => {
                format!("{value} is not an organization name (letters, digits and inner hyphens)")
            }
            _ => e.to_string(),
        },
        // A rule's identities, or a credential's readers.
        ValidationErrorKind::AnyOf { .. } if in_credentials(e.instance_path()) => {
            "must list at least one reader in readers or reader_regexes".into()
        }
        ValidationErrorKind::AnyOf { .. } => {
            "must list at least one identity in identities or identity_regexes".into()
        }
        _ => e.to_string(),
    }
}

/// Whether `location` is inside `credentials:`.
fn in_credentials(location: &Location) -> bool {
    matches!(
        location.segments().next(),
        Some(LocationSegment::Property(p)) if &*p == "credentials"
    )
}

fn is_scope(location: &Location) -> bool {
    list_name(location).as_deref() == Some("scopes")
}

/// `scopes` for `/rules/0/scopes/1`: the list an item belongs to.
fn list_name(location: &Location) -> Option<String> {
    let segments: Vec<_> = location.segments().collect();
    match segments.as_slice() {
        [.., LocationSegment::Property(p), LocationSegment::Index(_)] => Some(p.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
admins: ["apikey:ops"]
rules:
  - name: ci
    identities: ["apikey:ci", "k8s:system:serviceaccount:build:*"]
    identity_regexes: ["^k8s:system:serviceaccount:ci-[a-z0-9-]+:builder$"]
    organizations: ["fabrikam"]
    scopes: ["vso.code_write", "vso.packaging"]
    default_ttl: 1h
    max_ttl: 8h
    max_active_leases: 3
  - name: only-regex
    identity_regexes: ["^spiffe://example\\.org/ns/[a-z]+/sa/builder$"]
    organizations: ["Contoso"]
    scopes: ["app_token"]
    default_ttl: 15m
    max_ttl: 1h 30m
"#;

    fn paths(text: &str) -> Vec<String> {
        check(text).into_iter().map(|p| p.path).collect()
    }

    #[test]
    fn a_good_policy_meets_the_schema_and_loads() {
        assert_eq!(check(GOOD), Vec::new());
        Policy::from_yaml(GOOD).unwrap();
    }

    #[test]
    fn an_unknown_scope_is_named_with_its_path() {
        let bad = GOOD.replace("\"vso.packaging\"", "\"vso.kode\"");
        let problems = check(&bad);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].to_string(),
            r#"rules[0].scopes[1]: unknown scope "vso.kode""#
        );
    }

    #[test]
    fn schema_problems_name_their_fields() {
        let bad = GOOD
            .replace("max_active_leases: 3", "max_active_leases: many")
            .replace("name: only-regex", "name: only-regex\n    colour: red")
            .replace("\"apikey:ops\"", "\"apikey:ops-*\"");
        assert_eq!(
            paths(&bad),
            ["admins[0]", "rules[0].max_active_leases", "rules[1]"]
        );
        let problems = check(&bad);
        assert!(problems[2].message.contains("colour"), "{problems:?}");
    }

    #[test]
    fn a_rule_without_any_identity_is_refused_by_the_schema() {
        let bad = "rules:\n  - name: r\n    organizations: [a]\n    scopes: [vso.code]\n    default_ttl: 1h\n    max_ttl: 1h\n";
        assert_eq!(paths(bad), ["rules[0]"]);
        assert!(check(bad)[0].message.contains("identities"));
    }

    #[test]
    fn a_credential_without_readers_or_with_bad_ones_names_its_reader_fields() {
        let bad = "rules: []\ncredentials:\n  - {name: a, organization: fabrikam, scopes: [vso.packaging], rotation_period: 20s, overlap: 8s, readers: []}\n  - {name: b, organization: fabrikam, scopes: [vso.packaging], rotation_period: 20s, overlap: 8s, readers: [mirror], reader_regexes: [\"apikey:.*\"]}\n";
        let problems = check(bad);
        assert_eq!(
            paths(bad),
            [
                "credentials[0]",
                "credentials[1].reader_regexes[0]",
                "credentials[1].readers[0]"
            ],
            "{problems:?}"
        );
        assert!(
            problems[0].message.contains("readers or reader_regexes"),
            "{problems:?}"
        );
        assert!(
            problems[1].message.contains("a literal kind prefix"),
            "{problems:?}"
        );
        assert!(
            problems[2].message.contains("must be an identity or glob"),
            "{problems:?}"
        );
    }

    #[test]
    fn semantic_problems_follow_once_the_schema_is_met() {
        let bad = GOOD
            .replace("default_ttl: 1h", "default_ttl: 9h")
            .replace("name: only-regex", "name: ci");
        assert_eq!(paths(&bad), ["rules[0].default_ttl", "rules[1].name"]);
    }

    #[test]
    fn a_document_that_is_not_yaml_is_one_problem() {
        assert_eq!(paths("rules: [\n"), ["(document)"]);
        assert_eq!(paths("[]"), ["(document)"]);
    }
}
