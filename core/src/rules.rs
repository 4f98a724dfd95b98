//! The structured rule language of `spec.definition.rules`.
//!
//! A rule is exactly one of `all`, `any`, `not` (groups) or `property`,
//! `event`, `segment` (leaves). Kubernetes CRD schemas cannot be recursive,
//! so the schema below is unrolled to [`MAX_RULE_DEPTH`] levels of groups;
//! [`Rule::validate`] enforces the same limit for objects that reach the
//! operator another way (standalone mode, `kubectl segment preview`).

use schemars::{Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::definition::DefinitionError;
use crate::duration::parse_duration;

/// Levels of `all`/`any`/`not` nesting the CRD schema accepts.
pub const MAX_RULE_DEPTH: usize = 3;
/// Children of one `all`/`any` group.
pub const MAX_GROUP_ITEMS: usize = 16;
/// Values of one `in`/`not_in` comparison.
pub const MAX_VALUES: usize = 1000;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(try_from = "RuleRepr", into = "RuleRepr")]
pub enum Rule {
    All(Vec<Rule>),
    Any(Vec<Rule>),
    Not(Box<Rule>),
    Property(PropertyRule),
    Event(EventRule),
    Segment(SegmentRule),
}

/// The wire form of a rule: an object with exactly one key. Going through
/// it (rather than serde's enum form) reads the same from JSON and YAML and
/// names the keys in the error.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RuleRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    all: Option<Vec<Rule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    any: Option<Vec<Rule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not: Option<Box<Rule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    property: Option<PropertyRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<EventRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    segment: Option<SegmentRule>,
}

impl TryFrom<RuleRepr> for Rule {
    type Error = String;

    fn try_from(r: RuleRepr) -> Result<Rule, String> {
        let mut found: Vec<Rule> = Vec::new();
        found.extend(r.all.map(Rule::All));
        found.extend(r.any.map(Rule::Any));
        found.extend(r.not.map(Rule::Not));
        found.extend(r.property.map(Rule::Property));
        found.extend(r.event.map(Rule::Event));
        found.extend(r.segment.map(Rule::Segment));
        match found.len() {
            1 => Ok(found.remove(0)),
            n => Err(format!("a rule sets exactly one of all, any, not, property, event, segment; this one sets {n}")),
        }
    }
}

impl From<Rule> for RuleRepr {
    fn from(rule: Rule) -> RuleRepr {
        let mut r = RuleRepr::default();
        match rule {
            Rule::All(v) => r.all = Some(v),
            Rule::Any(v) => r.any = Some(v),
            Rule::Not(v) => r.not = Some(v),
            Rule::Property(v) => r.property = Some(v),
            Rule::Event(v) => r.event = Some(v),
            Rule::Segment(v) => r.segment = Some(v),
        }
        r
    }
}

/// Users whose row in `table` satisfies a comparison on `column`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PropertyRule {
    pub table: String,
    #[serde(flatten)]
    pub comparison: Comparison,
}

/// Users with a number of rows (events) in `table`, optionally filtered and
/// restricted to a window ending at the snapshot time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventRule {
    pub table: String,
    /// Bounds on the number of matching events; at least one event when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<CountBounds>,
    /// Window ending at the snapshot time: `30m`, `12h`, `90d`, `2w`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<String>,
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Comparison>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CountBounds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gte: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lte: Option<u64>,
}

/// Members of another segment's active version (same namespace).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SegmentRule {
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Comparison {
    pub column: String,
    pub op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<Value>>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Eq,
    Ne,
    In,
    NotIn,
    Gt,
    Gte,
    Lt,
    Lte,
    Exists,
}

impl Op {
    pub const ALL: [&'static str; 9] = ["eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "exists"];
}

impl Rule {
    /// Checks what serde cannot: nesting depth, group sizes, operator and
    /// value combinations, count bounds and window syntax. `path` is the
    /// field path of this rule, used in the error.
    pub fn validate(&self, path: &str) -> Result<(), DefinitionError> {
        self.validate_at(path, 0)
    }

    fn validate_at(&self, path: &str, depth: usize) -> Result<(), DefinitionError> {
        let group = |key: &str, rules: &[Rule]| -> Result<(), DefinitionError> {
            let here = format!("{path}.{key}");
            if depth >= MAX_RULE_DEPTH {
                return Err(DefinitionError::new(here, format!("rules nest at most {MAX_RULE_DEPTH} groups deep")));
            }
            if rules.is_empty() || rules.len() > MAX_GROUP_ITEMS {
                return Err(DefinitionError::new(
                    here,
                    format!("a group holds 1 to {MAX_GROUP_ITEMS} rules, found {}", rules.len()),
                ));
            }
            for (i, rule) in rules.iter().enumerate() {
                rule.validate_at(&format!("{here}[{i}]"), depth + 1)?;
            }
            Ok(())
        };
        match self {
            Rule::All(rules) => group("all", rules),
            Rule::Any(rules) => group("any", rules),
            Rule::Not(rule) => {
                if depth >= MAX_RULE_DEPTH {
                    return Err(DefinitionError::new(
                        format!("{path}.not"),
                        format!("rules nest at most {MAX_RULE_DEPTH} groups deep"),
                    ));
                }
                rule.validate_at(&format!("{path}.not"), depth + 1)
            }
            Rule::Property(p) => {
                let here = format!("{path}.property");
                check_identifier(&format!("{here}.table"), &p.table)?;
                p.comparison.validate(&here)
            }
            Rule::Event(e) => {
                let here = format!("{path}.event");
                check_identifier(&format!("{here}.table"), &e.table)?;
                if let Some(within) = &e.within {
                    parse_duration(within).map_err(|m| DefinitionError::new(format!("{here}.within"), m))?;
                }
                if let Some(count) = &e.count {
                    count.validate(&format!("{here}.count"))?;
                }
                for (i, f) in e.filters.iter().enumerate() {
                    f.validate(&format!("{here}.where[{i}]"))?;
                }
                Ok(())
            }
            Rule::Segment(s) => {
                if s.name.is_empty() {
                    return Err(DefinitionError::new(format!("{path}.segment.name"), "must not be empty"));
                }
                Ok(())
            }
        }
    }

    /// Tables this rule reads, for checking against the SegmentSources.
    pub fn tables(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.visit(&mut |r| match r {
            Rule::Property(p) => out.push(p.table.as_str()),
            Rule::Event(e) => out.push(e.table.as_str()),
            _ => {}
        });
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Names of the segments this rule refers to.
    pub fn segment_refs(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.visit(&mut |r| {
            if let Rule::Segment(s) = r {
                out.push(s.name.as_str())
            }
        });
        out.sort_unstable();
        out.dedup();
        out
    }

    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Rule)) {
        f(self);
        match self {
            Rule::All(rules) | Rule::Any(rules) => rules.iter().for_each(|r| r.visit(f)),
            Rule::Not(rule) => rule.visit(f),
            _ => {}
        }
    }
}

impl CountBounds {
    fn validate(&self, path: &str) -> Result<(), DefinitionError> {
        if self.eq.is_some() && (self.gt.is_some() || self.gte.is_some() || self.lt.is_some() || self.lte.is_some()) {
            return Err(DefinitionError::new(path, "eq cannot be combined with gt, gte, lt or lte"));
        }
        let low = self.gte.or(self.gt.map(|g| g + 1)).unwrap_or(0);
        let high = self.lte.or(self.lt.map(|l| l.saturating_sub(1)));
        if self.lt == Some(0) {
            return Err(DefinitionError::new(path, "lt 0 can never match"));
        }
        if let Some(high) = high {
            if low > high {
                return Err(DefinitionError::new(path, format!("no count is >= {low} and <= {high}")));
            }
        }
        Ok(())
    }
}

impl Comparison {
    fn validate(&self, path: &str) -> Result<(), DefinitionError> {
        check_identifier(&format!("{path}.column"), &self.column)?;
        let scalar = |field: &str, v: &Value| -> Result<(), DefinitionError> {
            match v {
                Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(()),
                _ => Err(DefinitionError::new(format!("{path}.{field}"), "must be a string, number or boolean")),
            }
        };
        match self.op {
            Op::Exists => {
                if self.value.is_some() || self.values.is_some() {
                    return Err(DefinitionError::new(format!("{path}.op"), "exists takes neither value nor values"));
                }
            }
            Op::In | Op::NotIn => {
                if self.value.is_some() {
                    return Err(DefinitionError::new(format!("{path}.value"), "in and not_in take values (a list), not value"));
                }
                let values = self
                    .values
                    .as_ref()
                    .ok_or_else(|| DefinitionError::new(format!("{path}.values"), "in and not_in need values"))?;
                if values.is_empty() || values.len() > MAX_VALUES {
                    return Err(DefinitionError::new(format!("{path}.values"), format!("must hold 1 to {MAX_VALUES} values")));
                }
                for v in values {
                    scalar("values", v)?;
                }
            }
            _ => {
                if self.values.is_some() {
                    return Err(DefinitionError::new(format!("{path}.values"), "only in and not_in take values; use value"));
                }
                let v =
                    self.value.as_ref().ok_or_else(|| DefinitionError::new(format!("{path}.value"), "this op needs a value"))?;
                scalar("value", v)?;
            }
        }
        Ok(())
    }
}

fn check_identifier(path: &str, s: &str) -> Result<(), DefinitionError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(DefinitionError::new(path, format!("`{s}` is not a valid name (letters, digits and _, starting with a letter)")))
    }
}

/// Schema of `rules`, unrolled to [`MAX_RULE_DEPTH`] levels because CRD
/// schemas may not refer to themselves.
pub fn rule_schema(_: &mut SchemaGenerator) -> Schema {
    let value = rule_schema_at(MAX_RULE_DEPTH);
    Schema::try_from(value).expect("rule schema is an object")
}

fn rule_schema_at(depth: usize) -> Value {
    // Every field carries a description: `kubectl explain` shows nothing
    // for a field without one.
    let any_scalar = |description: &str| json!({"x-kubernetes-preserve-unknown-fields": true, "description": description});
    let comparison_props = json!({
        "column": {"type": "string", "minLength": 1, "description": "The column compared."},
        "op": {"type": "string", "enum": Op::ALL, "description": "The comparison: eq, ne, in, not_in, gt, gte, lt, lte, exists."},
        "value": any_scalar("The value compared with (a string, number or boolean); not with in, not_in or exists."),
        "values": {"type": "array", "maxItems": MAX_VALUES, "items": any_scalar("One value of the list."),
                   "description": "The values of in and not_in."},
    });
    let comparison = json!({"type": "object", "required": ["column", "op"], "properties": comparison_props,
                            "description": "A condition on one column of the event's rows."});
    let mut property_props = comparison_props.clone();
    property_props["table"] = json!({"type": "string", "minLength": 1, "description": "The table (a SegmentSource's spec.table) holding one row per user."});
    let count_props: serde_json::Map<String, Value> = [
        ("eq", "Exactly this many events."),
        ("gt", "More than this many events."),
        ("gte", "At least this many events."),
        ("lt", "Fewer than this many events."),
        ("lte", "At most this many events."),
    ]
    .iter()
    .map(|(k, d)| (k.to_string(), json!({"type": "integer", "minimum": 0, "description": d})))
    .collect();
    let mut props = json!({
        "property": {"type": "object", "required": ["table", "column", "op"], "properties": property_props,
                     "description": "Users whose row in table satisfies the comparison (column op value)."},
        "event": {"type": "object", "required": ["table"], "description": "Users with a number of rows (events) in table, optionally filtered and restricted to a window ending at the snapshot time.", "properties": {
            "table": {"type": "string", "minLength": 1, "description": "The table (a SegmentSource's spec.table) of events."},
            "count": {"type": "object", "properties": count_props, "description": "Bounds on the number of matching events; at least one event when unset."},
            "within": {"type": "string", "pattern": "^[0-9]+(s|m|h|d|w)$", "description": "Window ending at the snapshot time: 30m, 12h, 90d, 2w."},
            "where": {"type": "array", "maxItems": MAX_GROUP_ITEMS, "items": comparison, "description": "Conditions every counted event meets."},
        }},
        "segment": {"type": "object", "required": ["name"], "description": "Members of another Segment of the same namespace (its active version).",
                    "properties": {"name": {"type": "string", "minLength": 1, "description": "The Segment's name."}}},
    });
    let mut keys = vec!["property", "event", "segment"];
    if depth > 0 {
        let child = rule_schema_at(depth - 1);
        props["all"] = json!({"type": "array", "minItems": 1, "maxItems": MAX_GROUP_ITEMS, "items": child,
                              "description": "Users matching every rule of the list."});
        props["any"] = json!({"type": "array", "minItems": 1, "maxItems": MAX_GROUP_ITEMS, "items": child,
                              "description": "Users matching at least one rule of the list."});
        let mut not = child;
        not["description"] = json!("Users not matching this rule.");
        props["not"] = not;
        keys.extend(["all", "any", "not"]);
    }
    let count_expr = keys.iter().map(|k| format!("(has(self.{k}) ? 1 : 0)")).collect::<Vec<_>>().join(" + ");
    json!({
        "type": "object",
        "properties": props,
        "x-kubernetes-validations": [{
            "rule": format!("{count_expr} == 1"),
            "message": format!("a rule sets exactly one of {}", keys.join(", ")),
        }],
    })
}
