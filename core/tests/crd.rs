//! The CRDs as the API server will see them.
//!
//! - The checked-in `crds/segmentation.dev.yaml` is exactly what the types
//!   generate.
//! - Every CEL rule compiles, stays far inside the API server's cost limits,
//!   and accepts and rejects what it should, with the messages, field paths
//!   and reasons we wrote (evaluated with kube-cel).
//! - The schema is structural and uses only what `apiextensions.k8s.io/v1`
//!   accepts, so `kubectl apply -f crds/` cannot fail on it; the enums,
//!   printer columns, short names and subresources are the documented ones.
//! - The fixtures under `tests/fixtures/` go through an emulation of how the
//!   API server admits a custom resource (strict unknown fields, nulls,
//!   defaults, OpenAPI value checks, CEL): valid ones are admitted and
//!   deserialize into the Rust types, invalid ones are rejected with exactly
//!   the errors their `# expect-error:` lines name. kubernetes-validate (run by
//!   `tests/validate_crds.sh`) checks the CRD objects themselves but has no
//!   schema for custom resources, so the fixtures are checked here. The
//!   Segments and SegmentSources under `examples/` must be admitted too.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use kube_cel::cel::{Context, Program, Value as CelValue};
use kube_cel::{
    analyze_rule, apply_defaults, compile_schema, CompiledSchema, ErrorKind, ScopeContext, ValidationError, Validator,
};
use segment_core::api::{crds_yaml, Segment, SegmentSource, CRDS_FILE};
use segment_core::definition;
use segment_core::schedule::CronSchedule;
use serde::Deserialize;
use serde_json::{json, Value};

const REGENERATE: &str = "cargo run -p segment-operator -- crd > crds/segmentation.dev.yaml";

const DEFINITION_MESSAGE: &str = "definition must set exactly one of sql, rules or static";
const RULE_MESSAGE: &str = "a rule sets exactly one of property, event, segment, all, any, not";
const LEAF_RULE_MESSAGE: &str = "a rule sets exactly one of property, event, segment";

/// Limits `apiextensions.k8s.io/v1` validation applies when a CRD is created
/// (`StaticEstimatedCostLimit`, `StaticEstimatedCRDCostLimit`).
const K8S_RULE_COST_LIMIT: u64 = 10_000_000;
const K8S_CRD_COST_LIMIT: u64 = 100_000_000;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("core/ sits in the workspace root").to_path_buf()
}

fn crd_json<K: CustomResourceExt>() -> Value {
    serde_json::to_value(segment_core::api::served_crd::<K>()).expect("a CRD serializes to JSON")
}

fn openapi_schema<K: CustomResourceExt>() -> Value {
    let schema = crd_json::<K>()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    assert!(schema.is_object(), "{} has no openAPIV3Schema", K::crd_name());
    schema
}

// ---------------------------------------------------------------------------
// Drift
// ---------------------------------------------------------------------------

#[test]
fn checked_in_crds_match_the_generated_ones() {
    let path = workspace_root().join(CRDS_FILE);
    let checked_in = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}\nGenerate it with:\n  {REGENERATE}", path.display()));
    let generated = crds_yaml();
    if checked_in != generated {
        let first_difference = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        let line = |text: &str| text.lines().nth(first_difference).unwrap_or("<end of file>").to_string();
        panic!(
            "{CRDS_FILE} is out of date with the API types (first difference at line {}):\n  checked in: {}\n  generated:  {}\nRegenerate it with:\n  {REGENERATE}",
            first_difference + 1,
            line(&checked_in),
            line(&generated),
        );
    }
}

// ---------------------------------------------------------------------------
// CEL rules, evaluated with kube-cel
// ---------------------------------------------------------------------------

fn segment(spec: Value) -> Value {
    json!({
        "apiVersion": "segmentation.dev/v1alpha1",
        "kind": "Segment",
        "metadata": {"name": "lapsed", "namespace": "growth"},
        "spec": spec,
    })
}

fn sql_segment_with(field: &str, value: Value) -> Value {
    let mut spec = json!({"definition": {"sql": "SELECT user_id FROM orders"}});
    spec[field] = value;
    segment(spec)
}

fn rules_segment(rules: Value) -> Value {
    segment(json!({"definition": {"rules": rules}}))
}

fn cel_errors(schema: &Value, object: &Value) -> Vec<ValidationError> {
    match Validator::new().validate(schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.into_vec(),
    }
}

/// `path: message`, with the kind spelled out when a rule did not simply
/// evaluate to false (a rule that errors is a bug in the rule).
fn describe(errors: &[ValidationError]) -> Vec<String> {
    errors
        .iter()
        .map(|e| match e.kind {
            ErrorKind::ValidationFailure => format!("{}: {}", e.field_path, e.message),
            ref kind => format!("{}: {kind:?}: {}", e.field_path, e.message),
        })
        .collect()
}

fn assert_cel_accepts(schema: &Value, object: &Value, what: &str) {
    let errors = describe(&cel_errors(schema, object));
    assert!(errors.is_empty(), "{what} must be accepted, got {errors:#?}");
}

fn assert_cel_rejects(schema: &Value, object: &Value, expected: &[&str], what: &str) -> Vec<ValidationError> {
    let errors = cel_errors(schema, object);
    assert_eq!(describe(&errors), expected, "{what}");
    errors
}

#[test]
fn definition_sets_exactly_one_kind() {
    let schema = openapi_schema::<Segment>();
    let sql = ("sql", json!("SELECT user_id FROM orders"));
    let rules = ("rules", json!({"segment": {"name": "churn-risk"}}));
    let static_list = ("static", json!({"uri": "s3://uploads/vip-list.csv"}));
    let definition =
        |kinds: &[&(&str, Value)]| -> Value { Value::Object(kinds.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()) };

    for kind in [&sql, &rules, &static_list] {
        assert_cel_accepts(&schema, &segment(json!({"definition": definition(&[kind])})), &format!("only {}", kind.0));
    }

    let wrong: [&[&(&str, Value)]; 5] =
        [&[], &[&sql, &rules], &[&sql, &static_list], &[&rules, &static_list], &[&sql, &rules, &static_list]];
    for kinds in wrong {
        let names: Vec<&str> = kinds.iter().map(|k| k.0).collect();
        let errors = assert_cel_rejects(
            &schema,
            &segment(json!({"definition": definition(kinds)})),
            &[&format!("spec.definition: {DEFINITION_MESSAGE}")],
            &format!("definition with {names:?}"),
        );
        assert_eq!(errors[0].reason.as_deref(), Some("FieldValueInvalid"));
    }
}

#[test]
fn retention_keeps_at_least_one_version() {
    let schema = openapi_schema::<Segment>();
    let errors = assert_cel_rejects(
        &schema,
        &sql_segment_with("retention", json!({"keepVersions": 0})),
        &["spec.retention.keepVersions: keepVersions must be at least 1"],
        "keepVersions 0",
    );
    assert_eq!(errors[0].reason.as_deref(), Some("FieldValueInvalid"));

    for retention in [json!({"keepVersions": 1}), json!({"keepVersions": 30, "keepResultsFor": "2w"}), json!({})] {
        assert_cel_accepts(&schema, &sql_segment_with("retention", retention.clone()), &format!("retention {retention}"));
    }
    // Absent: the schema default (keepVersions 3) is what the rule sees.
    assert_cel_accepts(&schema, &segment(json!({"definition": {"sql": "SELECT user_id FROM orders"}})), "no retention");
}

#[test]
fn max_change_ratio_is_between_zero_and_one() {
    let schema = openapi_schema::<Segment>();
    for ratio in [json!(-0.1), json!(1.5), json!(2), json!(-1)] {
        let errors = assert_cel_rejects(
            &schema,
            &sql_segment_with("rollover", json!({"maxChangeRatio": ratio})),
            &["spec.rollover.maxChangeRatio: maxChangeRatio must be between 0 and 1"],
            &format!("maxChangeRatio {ratio}"),
        );
        assert_eq!(errors[0].reason.as_deref(), Some("FieldValueInvalid"));
    }
    // Integers as well as floats: YAML `1` arrives as an integer.
    for ratio in [json!(0), json!(0.0), json!(0.5), json!(1), json!(1.0)] {
        assert_cel_accepts(
            &schema,
            &sql_segment_with("rollover", json!({"maxChangeRatio": ratio})),
            &format!("maxChangeRatio {ratio}"),
        );
    }
    assert_cel_accepts(&schema, &sql_segment_with("rollover", json!({"minMembers": 10})), "rollover without maxChangeRatio");
    assert_cel_accepts(&schema, &sql_segment_with("rollover", json!({})), "empty rollover");
}

#[test]
fn a_rule_sets_exactly_one_key_at_every_level() {
    let schema = openapi_schema::<Segment>();
    let property = json!({"table": "users", "column": "country", "op": "eq", "value": "ES"});
    let event = json!({"table": "orders", "count": {"gte": 3}, "within": "90d"});
    let segment_ref = json!({"name": "churn-risk"});

    // Top level.
    for rule in
        [json!({}), json!({"property": property, "event": event}), json!({"segment": segment_ref, "not": {"event": event}})]
    {
        assert_cel_rejects(
            &schema,
            &rules_segment(rule.clone()),
            &[&format!("spec.definition.rules: {RULE_MESSAGE}")],
            &format!("top-level rule {rule}"),
        );
    }
    for rule in [
        json!({"property": property}),
        json!({"event": event}),
        json!({"segment": segment_ref}),
        json!({"all": [{"segment": segment_ref}]}),
        json!({"any": [{"segment": segment_ref}]}),
        json!({"not": {"segment": segment_ref}}),
    ] {
        assert_cel_accepts(&schema, &rules_segment(rule.clone()), &format!("top-level rule {rule}"));
    }

    // One level down, in each kind of group.
    assert_cel_rejects(
        &schema,
        &rules_segment(json!({"all": [{"segment": segment_ref}, {"property": property, "event": event}]})),
        &[&format!("spec.definition.rules.all[1]: {RULE_MESSAGE}")],
        "all with a two-key rule",
    );
    assert_cel_rejects(
        &schema,
        &rules_segment(json!({"any": [{}]})),
        &[&format!("spec.definition.rules.any[0]: {RULE_MESSAGE}")],
        "any with an empty rule",
    );
    assert_cel_rejects(
        &schema,
        &rules_segment(json!({"not": {"segment": segment_ref, "event": event}})),
        &[&format!("spec.definition.rules.not: {RULE_MESSAGE}")],
        "not with a two-key rule",
    );

    // Two levels down.
    assert_cel_rejects(
        &schema,
        &rules_segment(json!({"any": [{"all": [{"event": event}, {"segment": segment_ref, "any": [{"event": event}]}]}]})),
        &[&format!("spec.definition.rules.any[0].all[1]: {RULE_MESSAGE}")],
        "a two-key rule two levels down",
    );

    // Three levels down: only leaves are allowed there.
    assert_cel_rejects(
        &schema,
        &rules_segment(json!({"all": [{"any": [{"not": {"property": property, "segment": segment_ref}}]}]})),
        &[&format!("spec.definition.rules.all[0].any[0].not: {LEAF_RULE_MESSAGE}")],
        "a two-key leaf three levels down",
    );
    assert_cel_rejects(
        &schema,
        &rules_segment(json!({"all": [{"all": [{"all": [{"all": [{"segment": segment_ref}]}]}]}]})),
        &[&format!("spec.definition.rules.all[0].all[0].all[0]: {LEAF_RULE_MESSAGE}")],
        "a fourth level of groups",
    );

    // Errors at several levels are all reported, each at its own path.
    assert_cel_rejects(
        &schema,
        &rules_segment(json!({"all": [{}, {"not": {}}], "segment": segment_ref})),
        &[
            &format!("spec.definition.rules: {RULE_MESSAGE}"),
            &format!("spec.definition.rules.all[0]: {RULE_MESSAGE}"),
            &format!("spec.definition.rules.all[1].not: {RULE_MESSAGE}"),
        ],
        "errors at three places",
    );

    // The deepest nesting the schema allows, with every kind of rule.
    assert_cel_accepts(
        &schema,
        &rules_segment(json!({"all": [
            {"property": {"table": "users", "column": "country", "op": "in", "values": ["ES", "IT"]}},
            {"any": [
                {"not": {"event": event}},
                {"all": [{"segment": segment_ref}, {"property": property}]},
            ]},
            {"not": {"any": [{"segment": segment_ref}, {"event": event}]}},
        ]})),
        "three levels of groups",
    );
}

/// Every `x-kubernetes-validations` rule in a compiled schema, with its path.
fn compiled_rules<'a>(node: &'a CompiledSchema, path: String, out: &mut Vec<(String, &'a CompiledSchema, usize)>) {
    for index in 0..node.validations.len() {
        out.push((path.clone(), node, index));
    }
    for (name, child) in &node.properties {
        compiled_rules(child, format!("{path}.{name}"), out);
    }
    if let Some(items) = &node.items {
        compiled_rules(items, format!("{path}[*]"), out);
    }
    if let Some(values) = &node.additional_properties {
        compiled_rules(values, format!("{path}[*]"), out);
    }
}

#[test]
fn every_rule_compiles_without_warnings() {
    // 3 on Segment's own fields, and the rule schema unrolled to three levels
    // of groups: 1 + 3 + 9 + 27 nodes. SegmentSource: a delta uri is no
    // glob; an iceberg:// uri goes with format: iceberg.
    for (kind, schema, expected) in
        [("Segment", openapi_schema::<Segment>(), 3 + 40), ("SegmentSource", openapi_schema::<SegmentSource>(), 2)]
    {
        let compiled = compile_schema(&schema);
        let mut rules = Vec::new();
        compiled_rules(&compiled, String::new(), &mut rules);
        assert_eq!(rules.len(), expected, "{kind}: number of CEL rules");
        for (path, node, index) in rules {
            match &node.validations[index] {
                Err(e) => panic!("{kind}{path}: rule does not compile: {e}"),
                Ok(compiled_rule) => {
                    let rule = &compiled_rule.rule.rule;
                    let warnings = analyze_rule(rule, node, ScopeContext::CrdValidation);
                    assert!(warnings.is_empty(), "{kind}{path}: `{rule}`: {warnings:#?}");
                    assert!(!compiled_rule.is_transition_rule, "{kind}{path}: `{rule}` unexpectedly uses oldSelf");
                }
            }
        }
    }
}

/// The API server's static cost check: a rule's cost times the most times it
/// can run (the product of `maxItems`/`maxProperties` above it) must stay
/// under 10M, and the sum over the CRD under 100M. None of our rules iterates
/// or scans strings, so each costs at most one unit per operation, fewer than
/// the characters of its source; that bounds its cost from above.
#[test]
fn rule_costs_stay_within_the_api_server_limits() {
    const ITERATING: [&str; 12] = [
        ".all(",
        ".exists(",
        ".exists_one(",
        ".map(",
        ".filter(",
        ".matches(",
        ".contains(",
        ".startsWith(",
        ".endsWith(",
        ".split(",
        ".join(",
        "size(",
    ];
    fn walk(node: &Value, path: &str, cardinality: Option<u64>, out: &mut Vec<(String, String, Option<u64>)>) {
        for rule in node["x-kubernetes-validations"].as_array().into_iter().flatten() {
            out.push((path.to_string(), rule["rule"].as_str().unwrap_or_default().to_string(), cardinality));
        }
        for (name, child) in node["properties"].as_object().into_iter().flatten() {
            walk(child, &format!("{path}.{name}"), cardinality, out);
        }
        let times = |bound: &Value| cardinality.zip(bound.as_u64()).map(|(c, b)| c.saturating_mul(b));
        if node["items"].is_object() {
            walk(&node["items"], &format!("{path}[*]"), times(&node["maxItems"]), out);
        }
        if node["additionalProperties"].is_object() {
            walk(&node["additionalProperties"], &format!("{path}[*]"), times(&node["maxProperties"]), out);
        }
    }

    let mut rules = Vec::new();
    walk(&openapi_schema::<Segment>(), "", Some(1), &mut rules);
    let mut total = 0u64;
    for (path, rule, cardinality) in &rules {
        assert!(
            !ITERATING.iter().any(|f| rule.contains(f)),
            "{path}: `{rule}` iterates or scans strings; this test's cost bound no longer holds"
        );
        let cardinality =
            cardinality.unwrap_or_else(|| panic!("{path}: an array or map above `{rule}` has no maxItems/maxProperties"));
        let cost = (rule.len() as u64).saturating_mul(cardinality);
        assert!(cost <= K8S_RULE_COST_LIMIT, "{path}: `{rule}` may cost {cost}, over {K8S_RULE_COST_LIMIT}");
        total = total.saturating_add(cost);
    }
    assert!(total <= K8S_CRD_COST_LIMIT, "the Segment rules may cost {total} in total, over {K8S_CRD_COST_LIMIT}");
    // Keep a wide margin: the unrolled rule schema multiplies with every level.
    assert!(total <= K8S_CRD_COST_LIMIT / 10, "the Segment rules may cost {total}; that is close to the CRD limit");
}

// ---------------------------------------------------------------------------
// Structural schema and CRD metadata, as apiextensions.k8s.io/v1 checks them
// ---------------------------------------------------------------------------

const TYPES: [&str; 6] = ["object", "array", "string", "integer", "number", "boolean"];
const SCHEMA_KEYS: [&str; 26] = [
    "description",
    "type",
    "format",
    "title",
    "default",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "multipleOf",
    "enum",
    "maxProperties",
    "minProperties",
    "required",
    "items",
    "properties",
    "additionalProperties",
    "nullable",
    "example",
    "externalDocs",
    "uniqueItems",
];
const VALIDATION_REASONS: [&str; 4] = ["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"];

/// Everything in `schema` the API server would refuse, or that would make it
/// a non-structural schema, as `path: problem`.
fn structural_problems(schema: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    check_node(schema, "openAPIV3Schema", &mut problems);
    problems
}

fn check_node(node: &Value, path: &str, problems: &mut Vec<String>) {
    let mut problem = |p: String| problems.push(format!("{path}: {p}"));
    let Some(map) = node.as_object() else {
        problem("a schema must be an object".into());
        return;
    };
    for key in map.keys() {
        let known = SCHEMA_KEYS.contains(&key.as_str())
            || matches!(
                key.as_str(),
                "x-kubernetes-preserve-unknown-fields"
                    | "x-kubernetes-int-or-string"
                    | "x-kubernetes-embedded-resource"
                    | "x-kubernetes-validations"
                    | "x-kubernetes-list-type"
                    | "x-kubernetes-list-map-keys"
                    | "x-kubernetes-map-type"
            );
        if !known {
            // $ref, definitions, patternProperties, oneOf/anyOf/allOf/not,
            // readOnly, ...: refused, or not structural, or not something we mean to use.
            problem(format!("`{key}` is not allowed here"));
        }
    }
    for flag in ["x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource"] {
        if map.get(flag).is_some_and(|v| v != &Value::Bool(true)) {
            problem(format!("{flag} must be true or absent"));
        }
    }
    let preserve = map.contains_key("x-kubernetes-preserve-unknown-fields");
    let int_or_string = map.contains_key("x-kubernetes-int-or-string");
    let ty = map.get("type").and_then(Value::as_str);
    match (map.get("type"), ty) {
        (None, _) if preserve || int_or_string => {}
        (None, _) => problem("no type (needed unless x-kubernetes-preserve-unknown-fields or x-kubernetes-int-or-string)".into()),
        (Some(_), Some(t)) if TYPES.contains(&t) => {
            if int_or_string {
                problem("x-kubernetes-int-or-string must not have a type".into());
            }
        }
        (Some(t), _) => problem(format!("type {t} is not one of {TYPES:?}")),
    }
    if map.get("uniqueItems") == Some(&Value::Bool(true)) {
        problem("uniqueItems: true is refused".into());
    }
    match map.get("additionalProperties") {
        Some(Value::Bool(false)) => problem("additionalProperties: false is refused".into()),
        Some(_) if map.contains_key("properties") => problem("properties and additionalProperties together".into()),
        Some(Value::Object(_)) if ty != Some("object") => problem("additionalProperties on a non-object".into()),
        _ => {}
    }
    let applies_to = |key: &str, types: &[&str]| map.contains_key(key) && !ty.is_some_and(|t| types.contains(&t));
    for key in ["properties", "required", "maxProperties", "minProperties"] {
        if applies_to(key, &["object"]) {
            problem(format!("{key} on a non-object"));
        }
    }
    for key in ["items", "maxItems", "minItems"] {
        if applies_to(key, &["array"]) {
            problem(format!("{key} on a non-array"));
        }
    }
    for key in ["maxLength", "minLength", "pattern"] {
        if applies_to(key, &["string"]) {
            problem(format!("{key} on a non-string"));
        }
    }
    for key in ["maximum", "minimum", "multipleOf"] {
        if applies_to(key, &["integer", "number"]) {
            problem(format!("{key} on a non-number"));
        }
    }
    if ty == Some("array") && !map.get("items").is_some_and(Value::is_object) {
        problem("an array needs a single items schema".into());
    }
    if let Some(required) = map.get("required") {
        for name in required.as_array().into_iter().flatten() {
            let name = name.as_str().unwrap_or_default();
            if map.get("properties").and_then(|p| p.get(name)).is_none() {
                problem(format!("required `{name}` is not a property"));
            }
        }
    }
    if let Some(pattern) = map.get("pattern").and_then(Value::as_str) {
        if let Err(e) = regex_matches(pattern, "") {
            problem(format!("pattern `{pattern}` does not compile: {e}"));
        }
    }
    if let Some(values) = map.get("enum") {
        let mut errors = Vec::new();
        let scalar_node = Value::Object(map.iter().filter(|(k, _)| *k != "enum").map(|(k, v)| (k.clone(), v.clone())).collect());
        for value in values.as_array().into_iter().flatten() {
            check_value(value, &scalar_node, path, &mut errors);
        }
        for e in errors {
            problem(format!("enum value does not fit the schema: {e}"));
        }
    }
    if let Some(default) = map.get("default") {
        let mut errors = Vec::new();
        let mut pruned = default.clone();
        prune(&mut pruned, node, path, false, &mut errors);
        if pruned != *default {
            errors.push("holds fields or nulls the API server would prune".into());
        }
        check_value(default, node, path, &mut errors);
        for e in errors {
            problem(format!("default {default} is invalid: {e}"));
        }
    }
    for (i, rule) in map.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let at = format!("x-kubernetes-validations[{i}]");
        if rule["rule"].as_str().is_none_or(|r| r.trim().is_empty()) {
            problem(format!("{at}.rule must be a non-empty string"));
        }
        if let Some(message) = rule.get("message") {
            if message.as_str().is_none_or(|m| m.trim().is_empty() || m.contains('\n') || m.contains('\r')) {
                problem(format!("{at}.message must be non-empty and on one line"));
            }
        }
        if let Some(reason) = rule.get("reason") {
            if !reason.as_str().is_some_and(|r| VALIDATION_REASONS.contains(&r)) {
                problem(format!("{at}.reason {reason} is not one of {VALIDATION_REASONS:?}"));
            }
        }
        if let Some(field_path) = rule.get("fieldPath") {
            let field_path = field_path.as_str().unwrap_or_default();
            if let Err(e) = resolve_field_path(field_path, node) {
                problem(format!("{at}.fieldPath {field_path:?}: fieldPath must be a valid path: {e}"));
            }
        }
        for key in rule.as_object().into_iter().flat_map(|r| r.keys()) {
            if !["rule", "message", "messageExpression", "reason", "fieldPath", "optionalOldSelf"].contains(&key.as_str()) {
                problem(format!("{at}.{key} is not a field of a validation rule"));
            }
        }
    }

    for (name, child) in map.get("properties").and_then(Value::as_object).into_iter().flatten() {
        check_node(child, &format!("{path}.properties.{name}"), problems);
    }
    if let Some(items) = map.get("items").filter(|i| i.is_object()) {
        check_node(items, &format!("{path}.items"), problems);
    }
    if let Some(values) = map.get("additionalProperties").filter(|a| a.is_object()) {
        check_node(values, &format!("{path}.additionalProperties"), problems);
    }
}

/// `ValidFieldPath` of apiextensions-apiserver (`schema/cel/validation.go`):
/// `.name` and `['name']` steps through properties or map values.
fn resolve_field_path<'a>(field_path: &str, schema: &'a Value) -> Result<&'a Value, String> {
    if field_path.trim().is_empty() || field_path.contains('\n') || field_path.contains('\r') {
        return Err("fieldPath must be non-empty and on one line".into());
    }
    let mut tokens = Vec::new();
    let mut rest = field_path;
    while !rest.is_empty() {
        let end = if rest.starts_with('\'') {
            let bytes = rest.as_bytes();
            (1..bytes.len()).find(|&i| bytes[i] == b'\'' && bytes[i - 1] != b'\\').map_or(rest.len(), |i| i + 1)
        } else if rest.starts_with(['.', '[', ']']) {
            1
        } else {
            rest.find(['.', '[', ']']).unwrap_or(rest.len())
        };
        tokens.push(&rest[..end]);
        rest = &rest[end..];
    }
    let mut tokens = tokens.into_iter();
    let mut node = schema;
    while let Some(token) = tokens.next() {
        let name = match token {
            "." => tokens.next().ok_or("unexpected end of JSON path")?.to_string(),
            "[" => {
                let quoted = tokens.next().ok_or("unexpected end of JSON path")?;
                if quoted.len() < 2 || !quoted.starts_with('\'') || !quoted.ends_with('\'') {
                    return Err(format!("expected single quoted string but got {quoted}"));
                }
                match tokens.next() {
                    Some("]") => quoted[1..quoted.len() - 1].replace("\\'", "'"),
                    Some(other) => return Err(format!("expected ] but got {other}")),
                    None => return Err("unexpected end of JSON path".into()),
                }
            }
            other => return Err(format!("expected [ or . but got: {other}")),
        };
        node = if let Some(properties) = node.get("properties") {
            properties.get(&name).ok_or("does not refer to a valid field")?
        } else {
            node.get("additionalProperties").filter(|a| a.is_object()).ok_or("does not refer to a valid field")?
        };
    }
    Ok(node)
}

#[test]
fn the_schemas_are_structural_and_acceptable_to_the_api_server() {
    for (kind, schema) in [("Segment", openapi_schema::<Segment>()), ("SegmentSource", openapi_schema::<SegmentSource>())] {
        let problems = structural_problems(&schema);
        assert!(problems.is_empty(), "{kind}: {problems:#?}");
        assert_eq!(schema["type"], "object", "{kind}: the root is an object");
        assert!(schema.get("nullable").is_none(), "{kind}: the root may not be nullable");
        let properties: Vec<&String> = schema["properties"].as_object().map(|p| p.keys().collect()).unwrap_or_default();
        assert!(
            properties.iter().all(|p| ["spec", "status"].contains(&p.as_str())),
            "{kind}: the root declares only spec and status (apiVersion, kind and metadata are the API server's), got {properties:?}"
        );
    }
}

#[test]
fn the_structural_check_catches_what_the_api_server_refuses() {
    let cases = [
        (json!({"type": "object", "properties": {"a": {"description": "no type"}}}), "no type"),
        (json!({"type": "object", "properties": {"a": {"$ref": "#/definitions/a"}}}), "`$ref` is not allowed"),
        (json!({"type": "object", "additionalProperties": false}), "additionalProperties: false"),
        (
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}}),
            "properties and additionalProperties together",
        ),
        (json!({"type": "object", "oneOf": [{"required": ["a"]}]}), "`oneOf` is not allowed"),
        (json!({"type": "array"}), "single items schema"),
        (json!({"type": ["string", "null"]}), "is not one of"),
        (json!({"type": "string", "enum": ["a", 1]}), "enum value does not fit"),
        (json!({"type": "string", "default": 3}), "default 3 is invalid"),
        (json!({"type": "string", "pattern": "("}), "does not compile"),
        (
            json!({"type": "object", "properties": {"a": {"type": "integer"}},
                   "x-kubernetes-validations": [{"rule": "self.a > 0", "fieldPath": "."}]}),
            "unexpected end of JSON path",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "integer"}},
                   "x-kubernetes-validations": [{"rule": "self.a > 0", "fieldPath": ".b"}]}),
            "does not refer to a valid field",
        ),
        (
            json!({"type": "object", "x-kubernetes-validations": [{"rule": "true", "reason": "Invalid"}]}),
            "reason \"Invalid\" is not one of",
        ),
    ];
    for (schema, expected) in cases {
        let problems = structural_problems(&schema);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{schema}: expected a problem containing {expected:?}, got {problems:#?}"
        );
    }
    let object = json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b c": {"type": "integer"}}}}});
    for (path, ok) in [(".a", true), (".a['b c']", true), (".a.x", false), ("a", false), (".a[0]", false), ("", false)] {
        assert_eq!(resolve_field_path(path, &object).is_ok(), ok, "fieldPath {path:?}");
    }
}

fn enum_of(schema: &Value, pointer: &str) -> Vec<String> {
    let node = schema.pointer(pointer).unwrap_or_else(|| panic!("no schema at {pointer}"));
    assert_eq!(node["type"], "string", "{pointer} is a string");
    node["enum"].as_array().unwrap_or_else(|| panic!("{pointer} has no enum")).iter().map(|v| v.to_string()).collect()
}

#[test]
fn enums_are_the_documented_ones() {
    let segment = openapi_schema::<Segment>();
    assert_eq!(
        enum_of(&segment, "/properties/spec/properties/schedule/properties/concurrencyPolicy"),
        [r#""Forbid""#, r#""Replace""#]
    );
    assert_eq!(
        segment.pointer("/properties/spec/properties/schedule/properties/concurrencyPolicy/default"),
        Some(&json!("Forbid"))
    );
    assert_eq!(enum_of(&segment, "/properties/spec/properties/deletionPolicy"), [r#""Delete""#, r#""Retain""#]);
    assert_eq!(segment.pointer("/properties/spec/properties/deletionPolicy/default"), Some(&json!("Delete")));
    let ops = enum_of(&segment, "/properties/spec/properties/definition/properties/rules/properties/property/properties/op");
    assert_eq!(ops, segment_core::rules::Op::ALL.map(|op| format!("{op:?}")));

    let source = openapi_schema::<SegmentSource>();
    assert_eq!(
        enum_of(&source, "/properties/spec/properties/format"),
        [r#""parquet""#, r#""csv""#, r#""ndjson""#, r#""delta""#, r#""iceberg""#]
    );
    assert_eq!(source["properties"]["spec"]["required"], json!(["format", "table", "uri"]));
    assert_eq!(segment["properties"]["spec"]["required"], json!(["definition"]));
}

#[test]
fn crd_names_columns_and_subresources() {
    let crd = crd_json::<Segment>();
    assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(crd["metadata"]["name"], "segments.segmentation.dev");
    assert_eq!(crd["spec"]["group"], "segmentation.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(
        crd["spec"]["names"],
        json!({"kind": "Segment", "plural": "segments", "singular": "segment", "shortNames": ["seg"], "categories": ["segmentation"]})
    );
    let versions = crd["spec"]["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 1);
    let version = &versions[0];
    assert_eq!(
        (version["name"].as_str(), version["served"].as_bool(), version["storage"].as_bool()),
        (Some("v1alpha1"), Some(true), Some(true))
    );
    assert_eq!(version["subresources"], json!({"status": {}}), "Segment has the status subresource");

    let columns: Vec<(&str, &str, &str)> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .map(|c| (c["name"].as_str().unwrap_or(""), c["type"].as_str().unwrap_or(""), c["jsonPath"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        columns,
        [
            ("Ready", "string", r#".status.conditions[?(@.type=="Ready")].status"#),
            ("Active", "integer", ".status.activeVersion"),
            ("Members", "integer", ".status.members"),
            ("Last Run", "date", ".status.lastSuccessfulTime"),
            ("Next Run", "string", ".status.nextScheduleTime"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ]
    );
    check_printer_columns(&crd);

    let crd = crd_json::<SegmentSource>();
    assert_eq!(crd["metadata"]["name"], "segmentsources.segmentation.dev");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["segsrc"]));
    assert_eq!(crd["spec"]["names"]["categories"], json!(["segmentation"]));
    assert!(crd["spec"]["versions"][0].get("subresources").is_none(), "SegmentSource has no status");
    check_printer_columns(&crd);
}

/// Column types and formats the API server accepts, and JSON paths that name
/// a field of the schema (or of metadata).
fn check_printer_columns(crd: &Value) {
    let version = &crd["spec"]["versions"][0];
    let schema = &version["schema"]["openAPIV3Schema"];
    for column in version["additionalPrinterColumns"].as_array().into_iter().flatten() {
        let name = column["name"].as_str().unwrap_or_default();
        assert!(
            ["integer", "number", "string", "boolean", "date"].contains(&column["type"].as_str().unwrap_or("")),
            "{name}: type"
        );
        if let Some(format) = column.get("format") {
            assert!(
                ["int32", "int64", "float", "double", "byte", "date", "date-time", "password"]
                    .contains(&format.as_str().unwrap_or("")),
                "{name}: format {format}"
            );
        }
        let path = column["jsonPath"].as_str().unwrap_or_default();
        if path.starts_with(".metadata.") {
            continue;
        }
        // `.a.b[?(...)].c` names the fields a, b (an array) and c of its items.
        let mut fields = String::new();
        let mut brackets = 0usize;
        for c in path.chars() {
            match c {
                '[' => brackets += 1,
                ']' => brackets = brackets.saturating_sub(1),
                _ if brackets == 0 => fields.push(c),
                _ => {}
            }
        }
        let mut node = schema;
        for field in fields.split('.').filter(|s| !s.is_empty()) {
            if node["type"] == "array" {
                node = &node["items"];
            }
            node = node["properties"].get(field).unwrap_or_else(|| panic!("{name}: {path} names no field `{field}`"));
        }
    }
}

// ---------------------------------------------------------------------------
// Admission of custom resources, and the fixtures
// ---------------------------------------------------------------------------

/// Whether `pattern` matches `text`, with CEL's `matches` (RE2 syntax, as the
/// API server uses for `pattern`).
fn regex_matches(pattern: &str, text: &str) -> Result<bool, String> {
    let program = Program::compile("text.matches(pattern)").map_err(|e| e.to_string())?;
    let mut context = Context::default();
    context.add_variable_from_value("text", text.to_string());
    context.add_variable_from_value("pattern", pattern.to_string());
    match program.execute(&context) {
        Ok(CelValue::Bool(matched)) => Ok(matched),
        Ok(other) => Err(format!("matches returned {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// What the API server does to a custom resource before storing it, as far as
/// the CRD schema decides: strict field validation (as `kubectl apply` asks
/// for), pruning of nulls, defaults, the OpenAPI value checks, then CEL.
/// Returns the object as stored, or every error as the API server words
/// it (`path: message`; a CEL rule with reason FieldValueInvalid as
/// `path: Invalid value: message`, which the e2e suite checks on the real
/// server with the same fixtures).
fn admit(schema: &Value, object: &Value) -> Result<Value, Vec<String>> {
    let mut errors = Vec::new();
    let mut object = object.clone();
    prune(&mut object, schema, "", true, &mut errors);
    let object = apply_defaults(schema, &object);
    check_value(&object, schema, "", &mut errors);
    errors.extend(cel_errors(schema, &without_nulls(&object)).iter().map(|e| match e.kind {
        ErrorKind::ValidationFailure => format!("{}: Invalid value: {}", e.field_path, e.message),
        ref kind => format!("{}: {kind:?}: {}", e.field_path, e.message),
    }));
    if errors.is_empty() {
        Ok(object)
    } else {
        Err(errors)
    }
}

fn child_path(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// CEL sees a null in a nullable field of an object as an absent field (the
/// API server's `unstructuredMap.Find`); kube-cel would see a null value.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), without_nulls(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Unknown fields are errors (field validation Strict); a null in a field
/// that is not nullable is dropped, so its default (if any) applies.
fn prune(value: &mut Value, schema: &Value, path: &str, root: bool, errors: &mut Vec<String>) {
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            let values = schema.get("additionalProperties").filter(|a| a.is_object());
            map.retain(|name, child| {
                let child_schema = properties.and_then(|p| p.get(name)).or(values);
                match child_schema {
                    Some(s) => !(child.is_null() && s["nullable"] != true),
                    None if root && ["apiVersion", "kind", "metadata"].contains(&name.as_str()) => true,
                    None if preserve => true,
                    None => {
                        errors.push(format!("unknown field \"{}\"", child_path(path, name)));
                        false
                    }
                }
            });
            for (name, child) in map.iter_mut() {
                if let Some(child_schema) = properties.and_then(|p| p.get(name)).or(values) {
                    prune(child, child_schema, &child_path(path, name), false, errors);
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for (i, item) in items.iter_mut().enumerate() {
                prune(item, &schema["items"], &format!("{path}[{i}]"), false, errors);
            }
        }
        _ => {}
    }
}

/// The OpenAPI value checks, with the API server's wording.
fn check_value(value: &Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
    let here = if path.is_empty() { "<root>" } else { path };
    let shown = value.to_string();
    if value.is_null() {
        if schema["nullable"] != true && schema["x-kubernetes-preserve-unknown-fields"] != true {
            errors.push(format!("{here}: Invalid value: \"null\": {here} in body must not be null"));
        }
        return;
    }
    let type_ok = match schema["type"].as_str() {
        None if schema["x-kubernetes-int-or-string"] == true => value.is_string() || value.is_i64() || value.is_u64(),
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some(other) => panic!("{here}: unknown type {other}"),
    };
    if !type_ok {
        errors.push(format!(
            "{here}: Invalid value: {shown}: {here} in body must be of type {}",
            schema["type"].as_str().unwrap_or("")
        ));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            let allowed: Vec<String> = allowed.iter().map(Value::to_string).collect();
            errors.push(format!("{here}: Unsupported value: {shown}: supported values: {}", allowed.join(", ")));
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema["minimum"].as_f64() {
            if n < min || (schema["exclusiveMinimum"] == true && n == min) {
                errors.push(format!("{here}: Invalid value: {shown}: {here} in body should be greater than or equal to {min}"));
            }
        }
        if let Some(max) = schema["maximum"].as_f64() {
            if n > max || (schema["exclusiveMaximum"] == true && n == max) {
                errors.push(format!("{here}: Invalid value: {shown}: {here} in body should be less than or equal to {max}"));
            }
        }
    }
    if let Some(text) = value.as_str() {
        let chars = text.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|min| chars < min) {
            errors.push(format!(
                "{here}: Invalid value: {shown}: {here} in body should be at least {} chars long",
                schema["minLength"]
            ));
        }
        if schema["maxLength"].as_u64().is_some_and(|max| chars > max) {
            errors.push(format!("{here}: Too long: may not be more than {} bytes", schema["maxLength"]));
        }
        if let Some(pattern) = schema["pattern"].as_str() {
            if regex_matches(pattern, text) != Ok(true) {
                errors.push(format!("{here}: Invalid value: {shown}: {here} in body should match '{pattern}'"));
            }
        }
    }
    if let Some(items) = value.as_array() {
        let count = items.len() as u64;
        if schema["minItems"].as_u64().is_some_and(|min| count < min) {
            errors.push(format!(
                "{here}: Invalid value: {count}: {here} in body should have at least {} items",
                schema["minItems"]
            ));
        }
        if schema["maxItems"].as_u64().is_some_and(|max| count > max) {
            errors.push(format!("{here}: Too many: {count}: must have at most {} items", schema["maxItems"]));
        }
        if schema["items"].is_object() {
            for (i, item) in items.iter().enumerate() {
                check_value(item, &schema["items"], &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(map) = value.as_object() {
        for name in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !map.contains_key(name) {
                errors.push(format!("{}: Required value", child_path(path, name)));
            }
        }
        let properties = schema["properties"].as_object();
        let values = schema.get("additionalProperties").filter(|a| a.is_object());
        for (name, child) in map {
            if let Some(child_schema) = properties.and_then(|p| p.get(name)).or(values) {
                check_value(child, child_schema, &child_path(path, name), errors);
            }
        }
    }
}

struct Fixture {
    path: PathBuf,
    text: String,
    object: Value,
}

impl Fixture {
    fn kind(&self) -> &str {
        self.object["kind"].as_str().unwrap_or_default()
    }

    /// The `# expect-error: <path>: <message>` lines of an invalid fixture.
    fn expected_errors(&self) -> Vec<String> {
        self.text.lines().filter_map(|l| l.strip_prefix("# expect-error: ")).map(|e| e.trim().to_string()).collect()
    }
}

fn fixtures(dir: &str) -> Vec<Fixture> {
    let dir = workspace_root().join("tests/fixtures").join(dir);
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let object: Value =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{} is not one YAML document: {e}", path.display()));
            assert_eq!(object["apiVersion"], "segmentation.dev/v1alpha1", "{}: apiVersion", path.display());
            Fixture { path, text, object }
        })
        .collect()
}

fn schemas_by_kind() -> BTreeMap<&'static str, Value> {
    BTreeMap::from([("Segment", openapi_schema::<Segment>()), ("SegmentSource", openapi_schema::<SegmentSource>())])
}

#[test]
fn valid_fixtures_are_admitted_and_deserialize() {
    let schemas = schemas_by_kind();
    let fixtures = fixtures("valid");
    let kinds: Vec<&str> = fixtures.iter().map(Fixture::kind).collect();
    assert!(kinds.contains(&"Segment") && kinds.contains(&"SegmentSource"), "valid fixtures cover both kinds: {kinds:?}");
    for fixture in &fixtures {
        let name = fixture.path.display();
        let schema = schemas.get(fixture.kind()).unwrap_or_else(|| panic!("{name}: unknown kind {}", fixture.kind()));
        let stored = admit(schema, &fixture.object).unwrap_or_else(|errors| panic!("{name} is rejected: {errors:#?}"));
        match fixture.kind() {
            "Segment" => {
                let as_sent: Segment = serde_json::from_value(fixture.object.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
                let as_stored: Segment = serde_json::from_value(stored).unwrap_or_else(|e| panic!("{name} as stored: {e}"));
                // The schema defaults and the serde defaults agree.
                assert_eq!(as_sent.spec, as_stored.spec, "{name}: schema defaults differ from serde defaults");
                definition::validate(&as_sent.spec.definition, None).unwrap_or_else(|e| panic!("{name}: {e}"));
                if let Some(schedule) = &as_sent.spec.schedule {
                    CronSchedule::parse(schedule).unwrap_or_else(|e| panic!("{name}: {e}"));
                }
            }
            _ => {
                let as_sent: SegmentSource =
                    serde_json::from_value(fixture.object.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
                let as_stored: SegmentSource = serde_json::from_value(stored).unwrap_or_else(|e| panic!("{name} as stored: {e}"));
                assert_eq!(as_sent.spec, as_stored.spec, "{name}: schema defaults differ from serde defaults");
            }
        }
    }
}

#[test]
fn invalid_fixtures_are_rejected_with_the_expected_errors() {
    let schemas = schemas_by_kind();
    let fixtures = fixtures("invalid");
    assert!(fixtures.len() >= 4, "expected at least 4 invalid fixtures, found {}", fixtures.len());
    for fixture in &fixtures {
        let name = fixture.path.display();
        let mut expected = fixture.expected_errors();
        assert!(!expected.is_empty(), "{name} has no `# expect-error:` line");
        let schema = schemas.get(fixture.kind()).unwrap_or_else(|| panic!("{name}: unknown kind {}", fixture.kind()));
        let mut errors = match admit(schema, &fixture.object) {
            Ok(_) => panic!("{name} is admitted, expected {expected:#?}"),
            Err(errors) => errors,
        };
        errors.sort();
        expected.sort();
        assert_eq!(errors, expected, "{name}");
    }
}

#[test]
fn admission_checks_unknown_fields_nulls_and_openapi_constraints() {
    let schema = openapi_schema::<Segment>();
    let object = segment(json!({
        "definition": {"sql": "SELECT user_id FROM orders", "static": null},
        "schedule": {"cron": "@daily", "concurrencyPolicy": null, "timezone": "UTC"},
        "pinVersion": 0,
        "retention": {"keepResultsFor": "a week"},
        "rollover": null,
    }));
    let mut errors = admit(&schema, &object).expect_err("the object has errors");
    errors.sort();
    assert_eq!(
        errors,
        [
            "spec.pinVersion: Invalid value: 0: spec.pinVersion in body should be greater than or equal to 1",
            r#"spec.retention.keepResultsFor: Invalid value: "a week": spec.retention.keepResultsFor in body should match '^[0-9]+(s|m|h|d|w)$'"#,
            r#"unknown field "spec.schedule.timezone""#,
        ]
    );

    // A null in a non-nullable field with a default gets the default; an
    // explicit null in a nullable field is kept.
    let stored =
        admit(&schema, &segment(json!({"definition": {"static": {"uri": "s3://u/l.csv"}}, "rollover": null}))).expect("admitted");
    assert_eq!(stored["spec"]["rollover"], json!({"minMembers": 0}));
    assert_eq!(stored["spec"]["retention"], json!({"keepVersions": 3, "keepResultsFor": "7d"}));
    assert_eq!(stored["spec"]["deletionPolicy"], "Delete");
}

#[test]
fn examples_are_admitted() {
    let schemas = schemas_by_kind();
    let dir = workspace_root().join("examples");
    let mut admitted = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object = Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let Some(schema) = object["kind"].as_str().and_then(|kind| schemas.get(kind)) else { continue };
            if let Err(errors) = admit(schema, &object) {
                panic!("{} {}: {errors:#?}", path.display(), object["metadata"]["name"]);
            }
            admitted += 1;
        }
    }
    assert!(admitted > 0, "no Segment or SegmentSource under examples/");
}

/// Every property of the served CRDs, spec and status, has a description:
/// `kubectl explain` shows nothing for one without. (The e2e suite checks
/// the same on the API server's published OpenAPI.)
#[test]
fn every_property_of_the_crds_has_a_description() {
    fn walk(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        for (name, property) in schema["properties"].as_object().into_iter().flatten() {
            let at = format!("{path}.{name}");
            if property["description"].as_str().is_none_or(|d| d.trim().is_empty()) {
                out.push(at.clone());
            }
            walk(property, &at, out);
        }
        if schema["items"].is_object() {
            walk(&schema["items"], &format!("{path}[]"), out);
        }
    }
    let mut missing = Vec::new();
    for crd in serde_yaml::Deserializer::from_str(&segment_core::api::crds_yaml()) {
        let crd = serde_json::Value::deserialize(crd).expect("a CRD");
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default().to_string();
        walk(&crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], &kind, &mut missing);
    }
    assert!(missing.is_empty(), "properties without a description: {missing:#?}");
}
