//! Label selectors in the Kubernetes style: which agents a rollout targets.
//!
//! The text form is a comma-separated list of requirements that must all hold:
//! `site=lyon`, `site==lyon`, `site!=paris`, `hw in (orin, xavier)`, `hw notin (nano)`,
//! `gpu` (the label exists) and `!gpu` (it does not). As in Kubernetes, `!=` and `notin` also
//! match agents that lack the label, and the empty selector matches every agent.
//!
//! The JSON form is either that string or an object
//! `{"match_labels": {"site": "lyon"}, "match_expressions": [{"key": "hw", "operator": "in",
//! "values": ["orin"]}]}`. Both serialise back as the canonical string.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest label name (the part after an optional `prefix/`) and longest value.
const MAX_NAME_LEN: usize = 63;

/// Longest key prefix (a DNS subdomain).
const MAX_PREFIX_LEN: usize = 253;

/// A conjunction of label requirements.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// One condition on one label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// What the label's value must satisfy.
    pub operator: Operator,
}

/// What a requirement asks of a label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    /// The label is present with this value.
    Equals(String),
    /// The label is absent or has another value.
    NotEquals(String),
    /// The label is present with one of these values.
    In(BTreeSet<String>),
    /// The label is absent or has none of these values.
    NotIn(BTreeSet<String>),
    /// The label is present, with any value.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl Requirement {
    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::Equals(v) => value == Some(v),
            Operator::NotEquals(v) => value != Some(v),
            Operator::In(set) => value.is_some_and(|v| set.contains(v)),
            Operator::NotIn(set) => !value.is_some_and(|v| set.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl Selector {
    /// The selector that matches every agent.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Builds a selector from requirements, checking every key and value.
    pub fn from_requirements(requirements: Vec<Requirement>) -> Result<Self, SelectorError> {
        let selector = Self { requirements };
        let text = selector.to_string();
        for requirement in &selector.requirements {
            check_label_key(&requirement.key).map_err(|reason| SelectorError::ParseKey {
                selector: text.clone(),
                key: requirement.key.clone(),
                reason,
            })?;
            let values: Vec<&String> = match &requirement.operator {
                Operator::Equals(v) | Operator::NotEquals(v) => vec![v],
                Operator::In(set) | Operator::NotIn(set) => {
                    if set.is_empty() {
                        return Err(SelectorError::ParseSet {
                            selector: text,
                            key: requirement.key.clone(),
                            reason: "the set of values is empty",
                        });
                    }
                    set.iter().collect()
                }
                Operator::Exists | Operator::DoesNotExist => Vec::new(),
            };
            for value in values {
                check_label_value(value).map_err(|reason| SelectorError::ParseValue {
                    selector: text.clone(),
                    value: value.clone(),
                    reason,
                })?;
            }
        }
        Ok(selector)
    }

    /// The requirements, all of which must hold.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{requirement}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.key;
        let join = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(",");
        match &self.operator {
            Operator::Equals(v) => write!(f, "{key}={v}"),
            Operator::NotEquals(v) => write!(f, "{key}!={v}"),
            Operator::In(set) => write!(f, "{key} in ({})", join(set)),
            Operator::NotIn(set) => write!(f, "{key} notin ({})", join(set)),
            Operator::Exists => write!(f, "{key}"),
            Operator::DoesNotExist => write!(f, "!{key}"),
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Parser::new(s).selector()
    }
}

/// Why a selector is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The text does not follow the grammar.
    #[error("parse selector {selector:?} at byte {at}: expected {expected}, found {found}")]
    ParseSyntax {
        /// The selector as given.
        selector: String,
        /// Byte offset of the problem.
        at: usize,
        /// What the grammar allows there.
        expected: &'static str,
        /// What is there instead.
        found: String,
    },
    /// A label key is malformed.
    #[error("parse selector {selector:?}: label key {key:?}: {reason}")]
    ParseKey {
        /// The selector as given.
        selector: String,
        /// The offending key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A label value is malformed.
    #[error("parse selector {selector:?}: label value {value:?}: {reason}")]
    ParseValue {
        /// The selector as given.
        selector: String,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value set is malformed.
    #[error("parse selector {selector:?}: values of {key:?}: {reason}")]
    ParseSet {
        /// The selector as given.
        selector: String,
        /// The key the set belongs to.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A structured requirement names an unknown operator or misuses `values`.
    #[error("parse selector expression on {key:?}: {reason}")]
    ParseExpression {
        /// The key of the expression.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters of `[A-Za-z0-9._-]` that starts and ends alphanumeric.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let valid_prefix = !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX_LEN
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !valid_prefix {
            return Err(format!(
                "prefix {prefix:?} must be a lowercase DNS subdomain of at most {MAX_PREFIX_LEN} characters"
            ));
        }
    }
    if name.is_empty() {
        return Err("name must not be empty".to_owned());
    }
    check_name(name)
}

/// Checks a label value: empty, or at most 63 characters of `[A-Za-z0-9._-]` that start and
/// end alphanumeric.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(value)
}

fn check_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let alnum_ends = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.len() > MAX_NAME_LEN || !valid_chars || !alnum_ends {
        return Err(format!(
            "must be at most {MAX_NAME_LEN} characters of [A-Za-z0-9._-], \
             starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// Characters that may appear in a key or value token; validation happens afterwards.
fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

/// A recursive-descent parser over the selector text.
struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, at: 0 }
    }

    fn selector(mut self) -> Result<Selector, SelectorError> {
        let mut requirements = Vec::new();
        self.skip_spaces();
        if self.peek().is_none() {
            return Ok(Selector::default());
        }
        loop {
            requirements.push(self.requirement()?);
            self.skip_spaces();
            match self.peek() {
                None => break,
                Some(',') => self.bump(),
                Some(_) => return Err(self.unexpected("`,` or the end")),
            }
        }
        Ok(Selector { requirements })
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        self.skip_spaces();
        if self.peek() == Some('!') {
            self.bump();
            self.skip_spaces();
            let key = self.key()?;
            return Ok(Requirement {
                key,
                operator: Operator::DoesNotExist,
            });
        }

        let key = self.key()?;
        self.skip_spaces();
        let operator = match self.peek() {
            None | Some(',') => Operator::Exists,
            Some('=') => {
                self.bump();
                if self.peek() == Some('=') {
                    self.bump();
                }
                Operator::Equals(self.value()?)
            }
            Some('!') => {
                self.bump();
                if self.peek() != Some('=') {
                    return Err(self.unexpected("`=` after `!`"));
                }
                self.bump();
                Operator::NotEquals(self.value()?)
            }
            Some(_) => {
                let start = self.at;
                let word = self.word();
                match word {
                    "in" => Operator::In(self.set(&key)?),
                    "notin" => Operator::NotIn(self.set(&key)?),
                    _ => {
                        self.at = start;
                        return Err(
                            self.unexpected("`=`, `==`, `!=`, `in`, `notin`, `,` or the end")
                        );
                    }
                }
            }
        };
        Ok(Requirement { key, operator })
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        let start = self.at;
        let key = self.word();
        if key.is_empty() {
            self.at = start;
            return Err(self.unexpected("a label key"));
        }
        check_label_key(key).map_err(|reason| SelectorError::ParseKey {
            selector: self.text.to_owned(),
            key: key.to_owned(),
            reason,
        })?;
        Ok(key.to_owned())
    }

    fn value(&mut self) -> Result<String, SelectorError> {
        self.skip_spaces();
        let value = self.word();
        check_label_value(value).map_err(|reason| SelectorError::ParseValue {
            selector: self.text.to_owned(),
            value: value.to_owned(),
            reason,
        })?;
        Ok(value.to_owned())
    }

    fn set(&mut self, key: &str) -> Result<BTreeSet<String>, SelectorError> {
        self.skip_spaces();
        if self.peek() != Some('(') {
            return Err(self.unexpected("`(` opening the set of values"));
        }
        self.bump();

        let mut values = BTreeSet::new();
        loop {
            self.skip_spaces();
            if values.is_empty() && self.peek() == Some(')') {
                return Err(SelectorError::ParseSet {
                    selector: self.text.to_owned(),
                    key: key.to_owned(),
                    reason: "the set of values is empty",
                });
            }
            let value = self.value()?;
            if value.is_empty() {
                return Err(self.unexpected("a value"));
            }
            values.insert(value);
            self.skip_spaces();
            match self.peek() {
                Some(',') => self.bump(),
                Some(')') => {
                    self.bump();
                    return Ok(values);
                }
                None => {
                    return Err(SelectorError::ParseSet {
                        selector: self.text.to_owned(),
                        key: key.to_owned(),
                        reason: "the set of values is not closed with `)`",
                    });
                }
                Some(_) => return Err(self.unexpected("`,` or `)` in the set of values")),
            }
        }
    }

    fn word(&mut self) -> &'a str {
        let rest = &self.text[self.at..];
        let len = rest.find(|c: char| !is_word_char(c)).unwrap_or(rest.len());
        self.at += len;
        &rest[..len]
    }

    fn skip_spaces(&mut self) {
        let rest = &self.text[self.at..];
        self.at += rest.len() - rest.trim_start().len();
    }

    fn peek(&self) -> Option<char> {
        self.text[self.at..].chars().next()
    }

    fn bump(&mut self) {
        if let Some(c) = self.peek() {
            self.at += c.len_utf8();
        }
    }

    fn unexpected(&self, expected: &'static str) -> SelectorError {
        let found = match self.peek() {
            None => "the end".to_owned(),
            Some(c) => format!("{c:?}"),
        };
        SelectorError::ParseSyntax {
            selector: self.text.to_owned(),
            at: self.at,
            expected,
            found,
        }
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The structured JSON form of a selector.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StructuredSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<Expression>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expression {
    key: String,
    operator: ExpressionOperator,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ExpressionOperator {
    #[serde(alias = "In")]
    In,
    #[serde(alias = "NotIn")]
    NotIn,
    #[serde(alias = "Exists")]
    Exists,
    #[serde(alias = "DoesNotExist")]
    DoesNotExist,
}

impl StructuredSelector {
    fn into_selector(self) -> Result<Selector, SelectorError> {
        let mut requirements: Vec<Requirement> = self
            .match_labels
            .into_iter()
            .map(|(key, value)| Requirement {
                key,
                operator: Operator::Equals(value),
            })
            .collect();
        for expression in self.match_expressions {
            let has_values = !expression.values.is_empty();
            let set: BTreeSet<String> = expression.values.into_iter().collect();
            let operator = match expression.operator {
                ExpressionOperator::In => Operator::In(set),
                ExpressionOperator::NotIn => Operator::NotIn(set),
                ExpressionOperator::Exists | ExpressionOperator::DoesNotExist if has_values => {
                    return Err(SelectorError::ParseExpression {
                        key: expression.key,
                        reason: "exists and does_not_exist take no values",
                    });
                }
                ExpressionOperator::Exists => Operator::Exists,
                ExpressionOperator::DoesNotExist => Operator::DoesNotExist,
            };
            requirements.push(Requirement {
                key: expression.key,
                operator,
            });
        }
        Selector::from_requirements(requirements)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SelectorVisitor;

        impl<'de> Visitor<'de> for SelectorVisitor {
            type Value = Selector;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a label selector string or {match_labels, match_expressions}")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Selector, E> {
                text.parse().map_err(E::custom)
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Selector, M::Error> {
                let structured =
                    StructuredSelector::deserialize(de::value::MapAccessDeserializer::new(map))?;
                structured.into_selector().map_err(de::Error::custom)
            }
        }

        deserializer.deserialize_any(SelectorVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn parse(text: &str) -> Selector {
        text.parse()
            .unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
    }

    #[test]
    fn equality_and_inequality_match_like_kubernetes() {
        let lyon = labels(&[("site", "lyon")]);
        let paris = labels(&[("site", "paris")]);
        let none = labels(&[]);

        assert!(parse("site=lyon").matches(&lyon));
        assert!(parse("site==lyon").matches(&lyon));
        assert!(!parse("site=lyon").matches(&paris));
        assert!(!parse("site=lyon").matches(&none));

        assert!(parse("site!=paris").matches(&lyon));
        assert!(!parse("site!=paris").matches(&paris));
        assert!(
            parse("site!=paris").matches(&none),
            "absent label satisfies !="
        );
    }

    #[test]
    fn set_expressions_match_and_notin_accepts_absent_labels() {
        let orin = labels(&[("hw", "orin")]);
        let nano = labels(&[("hw", "nano")]);
        let none = labels(&[]);
        let set = parse("hw in (orin, xavier)");
        assert!(set.matches(&orin));
        assert!(!set.matches(&nano));
        assert!(!set.matches(&none));

        let notin = parse("hw notin (orin,xavier)");
        assert!(!notin.matches(&orin));
        assert!(notin.matches(&nano));
        assert!(notin.matches(&none));
    }

    #[test]
    fn existence_and_absence_match_on_the_key_alone() {
        let gpu = labels(&[("gpu", "")]);
        let none = labels(&[("site", "lyon")]);
        assert!(parse("gpu").matches(&gpu));
        assert!(!parse("gpu").matches(&none));
        assert!(parse("!gpu").matches(&none));
        assert!(!parse("! gpu").matches(&gpu));
    }

    #[test]
    fn commas_are_a_conjunction_outside_value_sets() {
        let selector = parse(" site = lyon , hw in (orin, xavier), !canary,region");
        assert_eq!(selector.requirements().len(), 4);
        let yes = labels(&[("site", "lyon"), ("hw", "xavier"), ("region", "eu")]);
        assert!(selector.matches(&yes));
        let canary = labels(&[
            ("site", "lyon"),
            ("hw", "xavier"),
            ("region", "eu"),
            ("canary", "1"),
        ]);
        assert!(!selector.matches(&canary));
        let no_region = labels(&[("site", "lyon"), ("hw", "xavier")]);
        assert!(!selector.matches(&no_region));
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert_eq!(parse(""), Selector::everything());
        assert_eq!(parse("   "), Selector::everything());
        assert!(parse("").matches(&labels(&[("a", "b")])));
        assert!(parse("").matches(&labels(&[])));
    }

    #[test]
    fn prefixed_keys_and_empty_values_are_accepted() {
        let selector = parse("flotilla.dev/tier=,example.com/hw in (a.b-c_d)");
        assert!(selector.matches(&labels(&[
            ("flotilla.dev/tier", ""),
            ("example.com/hw", "a.b-c_d")
        ])));
    }

    #[test]
    fn display_is_canonical_and_parses_back_to_the_same_selector() {
        let selector = parse("site == lyon, hw in (xavier,orin), !gpu, zone, x notin (b, a), y!=z");
        let text = selector.to_string();
        assert_eq!(
            text,
            "site=lyon,hw in (orin,xavier),!gpu,zone,x notin (a,b),y!=z"
        );
        assert_eq!(parse(&text), selector);
    }

    #[test]
    fn syntax_errors_name_the_position_and_what_was_expected() {
        let cases = [
            ("site=lyon,", 10, "a label key"),
            (",site=lyon", 0, "a label key"),
            ("site=lyon,,hw", 10, "a label key"),
            (
                "site lyon",
                5,
                "`=`, `==`, `!=`, `in`, `notin`, `,` or the end",
            ),
            ("site!lyon", 5, "`=` after `!`"),
            ("hw in orin", 6, "`(` opening the set of values"),
            ("hw in (orin xavier)", 12, "`,` or `)` in the set of values"),
            ("hw in (orin,)", 12, "a value"),
            ("site=lyon paris", 10, "`,` or the end"),
            ("=lyon", 0, "a label key"),
            ("site=ly%on", 7, "`,` or the end"),
        ];
        for (text, at_expected, expected_expected) in cases {
            match text.parse::<Selector>() {
                Err(SelectorError::ParseSyntax {
                    at,
                    expected,
                    selector,
                    ..
                }) => {
                    assert_eq!((at, expected), (at_expected, expected_expected), "{text:?}");
                    assert_eq!(selector, text);
                }
                other => panic!("{text:?}: expected a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_keys_values_and_sets_are_refused_with_the_offender() {
        assert!(matches!(
            "-site=lyon".parse::<Selector>(),
            Err(SelectorError::ParseKey { key, .. }) if key == "-site"
        ));
        assert!(matches!(
            "Bad_Prefix/site=lyon".parse::<Selector>(),
            Err(SelectorError::ParseKey { key, .. }) if key == "Bad_Prefix/site"
        ));
        assert!(matches!(
            "flotilla.dev/=x".parse::<Selector>(),
            Err(SelectorError::ParseKey { .. })
        ));
        let long = "a".repeat(64);
        assert!(matches!(
            format!("site={long}").parse::<Selector>(),
            Err(SelectorError::ParseValue { value, .. }) if value == long
        ));
        assert!(matches!(
            "site=lyon-".parse::<Selector>(),
            Err(SelectorError::ParseValue { value, .. }) if value == "lyon-"
        ));
        assert!(matches!(
            "hw in ()".parse::<Selector>(),
            Err(SelectorError::ParseSet { key, .. }) if key == "hw"
        ));
        assert!(matches!(
            "hw in (orin".parse::<Selector>(),
            Err(SelectorError::ParseSet { reason, .. }) if reason.contains("not closed")
        ));
    }

    #[test]
    fn json_accepts_the_string_and_the_structured_form() {
        let from_string: Selector = serde_json::from_str(r#""site=lyon,hw in (orin)""#).unwrap();
        let from_object: Selector = serde_json::from_str(
            r#"{"match_labels": {"site": "lyon"},
                "match_expressions": [{"key": "hw", "operator": "In", "values": ["orin"]}]}"#,
        )
        .unwrap();
        assert_eq!(from_string, from_object);
        assert_eq!(
            serde_json::to_string(&from_object).unwrap(),
            r#""site=lyon,hw in (orin)""#
        );

        let exists: Selector = serde_json::from_str(
            r#"{"match_expressions": [{"key": "gpu", "operator": "exists"},
                                      {"key": "canary", "operator": "does_not_exist"}]}"#,
        )
        .unwrap();
        assert_eq!(exists.to_string(), "gpu,!canary");
    }

    #[test]
    fn json_structured_form_refuses_bad_expressions() {
        let with_values = serde_json::from_str::<Selector>(
            r#"{"match_expressions": [{"key": "gpu", "operator": "exists", "values": ["x"]}]}"#,
        );
        assert!(with_values
            .unwrap_err()
            .to_string()
            .contains("take no values"));

        let empty_set = serde_json::from_str::<Selector>(
            r#"{"match_expressions": [{"key": "hw", "operator": "not_in"}]}"#,
        );
        assert!(empty_set.unwrap_err().to_string().contains("empty"));

        let unknown = serde_json::from_str::<Selector>(r#"{"match_label": {"a": "b"}}"#);
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));

        let bad_key = serde_json::from_str::<Selector>(r#"{"match_labels": {"a b": "c"}}"#);
        assert!(bad_key.unwrap_err().to_string().contains("label key"));
    }
}
