//! Checks a Segment definition before anything is launched, and names it
//! with a stable hash so the operator can tell a definition change from a
//! schedule change.
//!
//! SQL is parsed with sqlparser's generic dialect, the one DataFusion (the
//! compute engine) uses by default, so what passes here is what the compute
//! Job will parse.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sha2::{Digest, Sha256};
use sqlparser::ast::{ObjectName, ObjectNamePart, Query, SelectItem, SetExpr, Statement, Visit, Visitor};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

use crate::api::Definition;

/// Bad input, with the field it is about and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DefinitionError {
    pub field: String,
    pub message: String,
}

impl DefinitionError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        DefinitionError { field: field.into(), message: message.into() }
    }
}

/// What a valid definition reads: lake tables and other segments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DefinitionRefs {
    pub tables: BTreeSet<String>,
    pub segments: BTreeSet<String>,
}

/// Validates `definition`. When `known_tables` is given (the `table` of
/// every SegmentSource in the namespace), a reference to any other table is
/// an error too.
pub fn validate(definition: &Definition, known_tables: Option<&[String]>) -> Result<DefinitionRefs, DefinitionError> {
    let kinds = [definition.sql.is_some(), definition.rules.is_some(), definition.static_list.is_some()];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(DefinitionError::new("spec.definition", "must set exactly one of sql, rules or static"));
    }
    let refs = if let Some(sql) = &definition.sql {
        DefinitionRefs { tables: sql_tables(sql)?, segments: BTreeSet::new() }
    } else if let Some(rules) = &definition.rules {
        rules.validate("spec.definition.rules")?;
        DefinitionRefs {
            tables: rules.tables().into_iter().map(str::to_string).collect(),
            segments: rules.segment_refs().into_iter().map(str::to_string).collect(),
        }
    } else {
        let uri = definition.static_list.as_ref().map(|s| s.uri.as_str()).unwrap_or_default();
        if !(uri.starts_with("s3://") || uri.starts_with("file://")) || uri.len() < 8 {
            return Err(DefinitionError::new("spec.definition.static.uri", format!("`{uri}` is not an s3:// or file:// URI")));
        }
        DefinitionRefs::default()
    };
    if let Some(known) = known_tables {
        if let Some(unknown) = refs.tables.iter().find(|t| !known.iter().any(|k| k.eq_ignore_ascii_case(t))) {
            let field = if definition.sql.is_some() { "spec.definition.sql" } else { "spec.definition.rules" };
            let mut known: Vec<&str> = known.iter().map(String::as_str).collect();
            known.sort_unstable();
            let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            return Err(DefinitionError::new(
                field,
                format!("unknown table `{unknown}`: no SegmentSource in this namespace declares it (known: {known})"),
            ));
        }
    }
    Ok(refs)
}

/// A stable hash of the definition: the same text gives the same hash, on
/// every operator version, so a restart does not look like a change.
pub fn definition_hash(definition: &Definition) -> String {
    // serde_json writes struct fields in declaration order and map keys
    // sorted (no preserve_order feature), so the text is canonical.
    let text = serde_json::to_string(definition).unwrap_or_default();
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Parses SQL and returns the lake tables it reads (names of CTEs excluded).
fn sql_tables(sql: &str) -> Result<BTreeSet<String>, DefinitionError> {
    const FIELD: &str = "spec.definition.sql";
    let statements =
        Parser::parse_sql(&GenericDialect {}, sql).map_err(|e| DefinitionError::new(FIELD, format!("does not parse: {e}")))?;
    let statement = match statements.as_slice() {
        [one] => one,
        [] => return Err(DefinitionError::new(FIELD, "is empty")),
        many => return Err(DefinitionError::new(FIELD, format!("must be one query, found {} statements", many.len()))),
    };
    let Statement::Query(query) = statement else {
        return Err(DefinitionError::new(FIELD, "must be a query (SELECT ...), not another kind of statement"));
    };
    if let Some(n) = projected_columns(&query.body) {
        if n != 1 {
            return Err(DefinitionError::new(FIELD, format!("must return one column of user ids, it returns {n}")));
        }
    }
    let mut refs = RelationCollector::default();
    let _ = statement.visit(&mut refs);
    Ok(refs.relations.difference(&refs.ctes).cloned().collect())
}

/// Number of columns the query returns, when it can be told without the
/// tables' schemas (no wildcard).
fn projected_columns(body: &SetExpr) -> Option<usize> {
    match body {
        SetExpr::Select(select) => {
            let wildcard =
                select.projection.iter().any(|item| matches!(item, SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)));
            (!wildcard).then_some(select.projection.len())
        }
        SetExpr::Query(query) => projected_columns(&query.body),
        SetExpr::SetOperation { left, .. } => projected_columns(left),
        _ => None,
    }
}

#[derive(Default)]
struct RelationCollector {
    relations: BTreeSet<String>,
    ctes: BTreeSet<String>,
}

impl Visitor for RelationCollector {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(cte.alias.name.value.to_lowercase());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if let Some(ObjectNamePart::Identifier(ident)) = relation.0.last() {
            self.relations.insert(ident.value.to_lowercase());
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StaticList;

    fn sql(text: &str) -> Definition {
        Definition { sql: Some(text.to_string()), rules: None, static_list: None }
    }

    #[test]
    fn sql_tables_exclude_ctes_and_include_subqueries() {
        let refs = validate(
            &sql("WITH big AS (SELECT user_id FROM orders WHERE amount > 10) \
                  SELECT user_id FROM big WHERE NOT EXISTS (SELECT 1 FROM refunds r WHERE r.user_id = big.user_id)"),
            None,
        )
        .unwrap();
        assert_eq!(refs.tables, BTreeSet::from(["orders".to_string(), "refunds".to_string()]));
    }

    #[test]
    fn bad_sql_names_the_field_and_the_parser_message() {
        let err = validate(&sql("SELEC user_id FROM orders"), None).unwrap_err();
        assert_eq!(err.field, "spec.definition.sql");
        assert!(err.message.starts_with("does not parse:"), "{err}");
        let err = validate(&sql("DELETE FROM orders"), None).unwrap_err();
        assert!(err.message.contains("must be a query"), "{err}");
        let err = validate(&sql("SELECT 1; SELECT 2"), None).unwrap_err();
        assert!(err.message.contains("2 statements"), "{err}");
        let err = validate(&sql("SELECT user_id, country FROM users"), None).unwrap_err();
        assert!(err.message.contains("one column"), "{err}");
    }

    #[test]
    fn unknown_tables_are_reported_with_the_known_ones() {
        let known = vec!["orders".to_string(), "users".to_string()];
        assert!(validate(&sql("SELECT user_id FROM Orders"), Some(&known)).is_ok());
        let err = validate(&sql("SELECT user_id FROM order_lines"), Some(&known)).unwrap_err();
        assert!(err.message.contains("`order_lines`") && err.message.contains("orders, users"), "{err}");
    }

    #[test]
    fn static_needs_an_object_uri() {
        let def = Definition { sql: None, rules: None, static_list: Some(StaticList { uri: "http://x/y".into() }) };
        assert_eq!(validate(&def, None).unwrap_err().field, "spec.definition.static.uri");
    }

    #[test]
    fn two_kinds_are_rejected() {
        let mut def = sql("SELECT user_id FROM orders");
        def.static_list = Some(StaticList { uri: "s3://b/k.csv".into() });
        assert_eq!(validate(&def, None).unwrap_err().field, "spec.definition");
    }

    #[test]
    fn hash_follows_the_text_only() {
        let a = definition_hash(&sql("SELECT user_id FROM orders"));
        assert_eq!(a, definition_hash(&sql("SELECT user_id FROM orders")));
        assert_ne!(a, definition_hash(&sql("SELECT user_id FROM users")));
        assert_eq!(a.len(), 16);
    }
}
