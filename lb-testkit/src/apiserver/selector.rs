//! Label and field selectors: parsed from the `labelSelector` and
//! `fieldSelector` query parameters, matched against stored objects.

use serde_json::Value;

/// A parsed `labelSelector`: every requirement must hold (they are ANDed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelRequirement>);

/// One comma-separated term of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value` (also true when the label is absent).
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)` (also true when the label is absent).
    NotIn(String, Vec<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    DoesNotExist(String),
}

impl LabelSelector {
    /// Parses a selector; the empty string selects everything.
    pub fn parse(text: &str) -> Result<Self, String> {
        split_top_level(text)
            .into_iter()
            .map(str::trim)
            .filter(|term| !term.is_empty())
            .map(parse_label_term)
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `object`'s `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let label = |key: &str| {
            object
                .pointer("/metadata/labels")
                .and_then(|labels| labels.get(key))
                .and_then(Value::as_str)
        };
        self.0.iter().all(|requirement| match requirement {
            LabelRequirement::Equals(key, value) => label(key) == Some(value),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value),
            LabelRequirement::In(key, values) => {
                label(key).is_some_and(|v| values.iter().any(|w| w == v))
            }
            LabelRequirement::NotIn(key, values) => {
                label(key).is_none_or(|v| values.iter().all(|w| w != v))
            }
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::DoesNotExist(key) => label(key).is_none(),
        })
    }
}

/// Splits on commas that are not inside parentheses (`a in (x,y),b`).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_label_term(term: &str) -> Result<LabelRequirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelRequirement::DoesNotExist(label_key(key.trim())?));
    }
    if let Some(open) = term.find('(') {
        let close = term
            .strip_suffix(')')
            .ok_or_else(|| format!("unable to parse requirement {term:?}: missing ')'"))?;
        let values = close[open + 1..]
            .split(',')
            .map(|v| label_value(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut words = term[..open].split_whitespace();
        let (key, op) = (words.next(), words.next());
        return match (key, op, words.next()) {
            (Some(key), Some("in"), None) => Ok(LabelRequirement::In(label_key(key)?, values)),
            (Some(key), Some("notin"), None) => {
                Ok(LabelRequirement::NotIn(label_key(key)?, values))
            }
            _ => Err(format!(
                "unable to parse requirement {term:?}: expected `key in (...)` or `key notin (...)`"
            )),
        };
    }
    for (op, negated) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((key, value)) = term.split_once(op) {
            let (key, value) = (label_key(key.trim())?, label_value(value.trim())?);
            return Ok(if negated {
                LabelRequirement::NotEquals(key, value)
            } else {
                LabelRequirement::Equals(key, value)
            });
        }
    }
    Ok(LabelRequirement::Exists(label_key(term)?))
}

/// A label key: an optional DNS prefix and `/`, then a name. Checked for
/// its alphabet and length only, not the full qualified-name grammar.
fn label_key(key: &str) -> Result<String, String> {
    let valid = !key.is_empty()
        && key.len() <= 316
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if valid {
        Ok(key.to_owned())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

/// A label value: empty, or up to 63 characters of `[A-Za-z0-9._-]`.
fn label_value(value: &str) -> Result<String, String> {
    let valid = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

/// A parsed `fieldSelector`. Only `metadata.name` and `metadata.namespace`
/// are supported (the fields every kind supports); any other field is
/// refused, as the API server refuses fields a kind does not index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<FieldRequirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    /// JSON pointer of the field (`/metadata/name`).
    pointer: &'static str,
    value: String,
    negated: bool,
}

impl FieldSelector {
    /// Parses a selector; the empty string selects everything.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, negated) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, false)
            } else {
                return Err(format!("invalid selector: {term:?}; can't understand it"));
            };
            let pointer = match field.trim() {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                other => return Err(format!("field label not supported: {other}")),
            };
            requirements.push(FieldRequirement {
                pointer,
                value: value.trim().to_owned(),
                negated,
            });
        }
        Ok(Self(requirements))
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `object` satisfies every requirement (an absent field reads
    /// as the empty string, as for cluster-scoped objects' namespace).
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|r| {
            let actual = object.pointer(r.pointer).and_then(Value::as_str);
            (actual.unwrap_or("") == r.value) != r.negated
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object() -> Value {
        json!({"metadata": {"name": "web", "namespace": "prod",
                            "labels": {"app": "web", "tier": "front"}}})
    }

    #[test]
    fn label_selectors_match_like_the_api_server() {
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("tier in (back, front)", true),
            ("tier notin (back,front)", false),
            ("missing notin (x)", true),
            ("app in (web),!missing", true),
        ];
        for (text, expected) in cases {
            let selector = LabelSelector::parse(text).unwrap();
            assert_eq!(selector.matches(&object()), expected, "{text:?}");
        }
    }

    #[test]
    fn malformed_label_selectors_are_refused() {
        for text in ["a b", "app in (x", "=x", "app=x y", "app inn (x)"] {
            assert!(LabelSelector::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn field_selectors_support_name_and_namespace_only() {
        let matches = |text: &str| FieldSelector::parse(text).unwrap().matches(&object());
        assert!(matches("metadata.name=web"));
        assert!(matches("metadata.name==web,metadata.namespace=prod"));
        assert!(!matches("metadata.name!=web"));
        assert!(!matches("metadata.namespace=dev"));
        assert!(FieldSelector::parse("spec.clusterIP=1.2.3.4").is_err());
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
