//! The AIP-160 subset every listing's `filter` takes: comparisons
//! `field OP value` joined by `AND`, where OP is `=`, `>=` or `<` and a
//! value is a bare word (letters, digits, `_ - . : /`) or a quoted string
//! (`"…"` or `'…'`, `\` escapes the next character). Each listing declares
//! which fields it filters on with which operators ([`Field`]); what a
//! value means is the listing's business.

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `>=`
    Ge,
    /// `<`
    Lt,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Lt => "<",
        }
    }
}

/// One comparison a listing accepts, at most once: `name op value`,
/// answered as `key`.
#[derive(Clone, Copy, Debug)]
pub struct Field<K> {
    key: K,
    name: &'static str,
    op: Op,
}

impl<K> Field<K> {
    /// `name op value` in the filter text, answered as `key`.
    pub const fn new(key: K, name: &'static str, op: Op) -> Self {
        Field { key, name, op }
    }
}

/// Parses `filter` against the comparisons `fields` accepts, in the order
/// written; empty (or blank): none. Errors say what is wrong for a human.
pub fn parse<K: Copy>(filter: &str, fields: &[Field<K>]) -> Result<Vec<(K, String)>, String> {
    let mut out = Vec::new();
    let mut seen = vec![false; fields.len()];
    let mut chars = filter.chars().peekable();
    loop {
        skip_ws(&mut chars);
        if chars.peek().is_none() {
            if out.is_empty() {
                return Ok(out);
            }
            return Err("expected a comparison after AND".into());
        }
        let name = word(&mut chars);
        if name.is_empty() {
            return Err(format!(
                "expected a field name, found {:?}",
                chars.peek().copied().unwrap_or_default()
            ));
        }
        skip_ws(&mut chars);
        let op = match (chars.next(), chars.peek()) {
            (Some('='), _) => Op::Eq,
            (Some('>'), Some('=')) => {
                chars.next();
                Op::Ge
            }
            (Some('<'), Some(&c)) if c != '=' => Op::Lt,
            _ => return Err(format!("expected `=`, `>=` or `<` after {name}")),
        };
        skip_ws(&mut chars);
        let value = match chars.peek() {
            Some(&q) if q == '"' || q == '\'' => {
                chars.next();
                quoted(&mut chars, q)?
            }
            _ => {
                let w = word(&mut chars);
                if w.is_empty() {
                    return Err(format!("expected a value after `{name} {}`", op.as_str()));
                }
                w
            }
        };
        let slot = slot(fields, &name, op)?;
        if std::mem::replace(&mut seen[slot], true) {
            return Err(if ops_of(fields, &name).len() == 1 {
                format!("{name} given twice")
            } else {
                format!("{name} {} given twice", op.as_str())
            });
        }
        out.push((fields[slot].key, value));
        skip_ws(&mut chars);
        if chars.peek().is_none() {
            return Ok(out);
        }
        let and = word(&mut chars);
        if and != "AND" {
            return Err(format!("expected AND, found {and:?}"));
        }
    }
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

fn skip_ws(chars: &mut Chars) {
    while chars.next_if(|c| c.is_whitespace()).is_some() {}
}

fn word(chars: &mut Chars) -> String {
    let mut s = String::new();
    while let Some(c) =
        chars.next_if(|&c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/'))
    {
        s.push(c);
    }
    s
}

/// The rest of a string opened by `quote`, unescaped.
fn quoted(chars: &mut Chars, quote: char) -> Result<String, String> {
    let mut s = String::new();
    loop {
        match chars.next() {
            Some(c) if c == quote => return Ok(s),
            Some('\\') => match chars.next() {
                Some(e) => s.push(e),
                None => return Err("unterminated string".into()),
            },
            Some(c) => s.push(c),
            None => return Err("unterminated string".into()),
        }
    }
}

/// Which of `fields` `name op` is, or why none.
fn slot<K>(fields: &[Field<K>], name: &str, op: Op) -> Result<usize, String> {
    if let Some(i) = fields.iter().position(|f| f.name == name && f.op == op) {
        return Ok(i);
    }
    let ops: Vec<String> = ops_of(fields, name)
        .iter()
        .map(|op| format!("`{}`", op.as_str()))
        .collect();
    Err(match ops.as_slice() {
        [] => {
            let mut names: Vec<&str> = Vec::new();
            for f in fields {
                if !names.contains(&f.name) {
                    names.push(f.name);
                }
            }
            format!("unknown field {name:?}; filterable: {}", names.join(", "))
        }
        [only] => format!("{name} takes only {only}"),
        several => format!("{name} takes {}", several.join(" and ")),
    })
}

fn ops_of<K>(fields: &[Field<K>], name: &str) -> Vec<Op> {
    fields
        .iter()
        .filter(|f| f.name == name)
        .map(|f| f.op)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &[Field<&str>] = &[
        Field::new("who", "who", Op::Eq),
        Field::new("from", "time", Op::Ge),
        Field::new("before", "time", Op::Lt),
    ];

    #[test]
    fn comparisons_come_back_in_order_with_their_values_unquoted() {
        assert_eq!(parse("  ", FIELDS).unwrap(), vec![]);
        assert_eq!(
            parse(
                r#"who=k8s:ns/sa AND time >= "a \"b\"" AND time<'c'"#,
                FIELDS
            )
            .unwrap(),
            vec![
                ("who", "k8s:ns/sa".to_owned()),
                ("from", "a \"b\"".to_owned()),
                ("before", "c".to_owned()),
            ]
        );
    }

    #[test]
    fn errors_name_what_the_listing_takes() {
        for (bad, message) in [
            ("what = x", "unknown field \"what\"; filterable: who, time"),
            ("who >= x", "who takes only `=`"),
            ("time = x", "time takes `>=` and `<`"),
            ("who = a AND who = b", "who given twice"),
            ("time < a AND time < b", "time < given twice"),
            ("who = x AND", "expected a comparison after AND"),
            ("who = x OR who = y", "expected AND, found \"OR\""),
            ("who != x", "expected `=`, `>=` or `<` after who"),
            ("who <= x", "expected `=`, `>=` or `<` after who"),
            ("who =", "expected a value after `who =`"),
            ("who = \"x", "unterminated string"),
            ("= x", "expected a field name, found '='"),
        ] {
            assert_eq!(parse(bad, FIELDS).unwrap_err(), message, "{bad}");
        }
    }
}
