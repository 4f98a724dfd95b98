//! Compiles structured rules to one SQL query for the compute engine, so
//! rules run as set operations in the engine rather than row by row. The
//! text is also what `kubectl segment preview` shows.
//!
//! Every rule denotes a set of user ids:
//! - `property`: users with a row in `table` whose `column` compares true;
//! - `event`: users whose number of matching rows (after `where` filters and
//!   the `within` window ending at the snapshot time) meets `count`
//!   (at least one when `count` is unset);
//! - `segment`: members of another segment's active version, read from the
//!   table [`segment_table`] the worker registers;
//! - `all` / `any`: intersection / union of the children;
//! - `not`: every known user except the child's. "Every known user" is the
//!   union of the user ids of all declared tables, and the same universe
//!   gives event rules whose count allows zero (`lte: 2`) their users with
//!   no events.

use serde_json::Value;

use crate::api::SegmentSourceSpec;
use crate::definition::DefinitionError;
use crate::duration::parse_duration;
use crate::rules::{Comparison, CountBounds, EventRule, Op, PropertyRule, Rule};

/// Name of the table holding another segment's active members.
pub fn segment_table(segment: &str) -> String {
    format!("segment__{}", segment.replace(['-', '.'], "_"))
}

/// Compiles `rule` to a query returning one column, `user_id`.
pub fn compile(rule: &Rule, sources: &[SegmentSourceSpec]) -> Result<String, DefinitionError> {
    rule.validate("spec.definition.rules")?;
    let compiler = Compiler { sources };
    let body = compiler.rule(rule, "spec.definition.rules")?;
    Ok(format!("SELECT DISTINCT user_id FROM ({body}) AS segment_members"))
}

struct Compiler<'a> {
    sources: &'a [SegmentSourceSpec],
}

impl Compiler<'_> {
    fn source(&self, table: &str, path: &str) -> Result<&SegmentSourceSpec, DefinitionError> {
        self.sources.iter().find(|s| s.table.eq_ignore_ascii_case(table)).ok_or_else(|| {
            DefinitionError::new(format!("{path}.table"), format!("unknown table `{table}`: no SegmentSource declares it"))
        })
    }

    fn universe(&self) -> Result<String, DefinitionError> {
        if self.sources.is_empty() {
            return Err(DefinitionError::new(
                "spec.definition.rules",
                "`not` and zero-count event rules need at least one SegmentSource",
            ));
        }
        let parts: Vec<String> = self
            .sources
            .iter()
            .map(|s| format!("SELECT CAST({} AS VARCHAR) AS user_id FROM {}", ident(&s.user_id_column), ident(&s.table)))
            .collect();
        Ok(parts.join(" UNION "))
    }

    fn rule(&self, rule: &Rule, path: &str) -> Result<String, DefinitionError> {
        match rule {
            Rule::All(rules) => self.group(rules, &format!("{path}.all"), "INTERSECT"),
            Rule::Any(rules) => self.group(rules, &format!("{path}.any"), "UNION"),
            Rule::Not(inner) => {
                let inner = self.rule(inner, &format!("{path}.not"))?;
                Ok(format!("SELECT user_id FROM ({}) AS u EXCEPT SELECT user_id FROM ({inner}) AS n", self.universe()?))
            }
            Rule::Property(p) => self.property(p, &format!("{path}.property")),
            Rule::Event(e) => self.event(e, &format!("{path}.event")),
            Rule::Segment(s) => Ok(format!("SELECT CAST(user_id AS VARCHAR) AS user_id FROM {}", ident(&segment_table(&s.name)))),
        }
    }

    fn group(&self, rules: &[Rule], path: &str, op: &str) -> Result<String, DefinitionError> {
        let parts = rules
            .iter()
            .enumerate()
            .map(|(i, r)| Ok(format!("SELECT user_id FROM ({}) AS g{i}", self.rule(r, &format!("{path}[{i}]"))?)))
            .collect::<Result<Vec<_>, DefinitionError>>()?;
        Ok(parts.join(&format!(" {op} ")))
    }

    fn property(&self, p: &PropertyRule, path: &str) -> Result<String, DefinitionError> {
        let source = self.source(&p.table, path)?;
        Ok(format!(
            "SELECT DISTINCT CAST({} AS VARCHAR) AS user_id FROM {} WHERE {}",
            ident(&source.user_id_column),
            ident(&source.table),
            condition(&p.comparison)
        ))
    }

    fn event(&self, e: &EventRule, path: &str) -> Result<String, DefinitionError> {
        let source = self.source(&e.table, path)?;
        let mut filters: Vec<String> = e.filters.iter().map(condition).collect();
        if let Some(within) = &e.within {
            let ts = source.timestamp_column.as_deref().ok_or_else(|| {
                DefinitionError::new(
                    format!("{path}.within"),
                    format!("table `{}` has no timestampColumn in its SegmentSource, so `within` cannot apply", source.table),
                )
            })?;
            let seconds = parse_duration(within).map_err(|m| DefinitionError::new(format!("{path}.within"), m))?.num_seconds();
            // Both sides as naive UTC timestamps: sources may store the
            // column as text, naive or zoned timestamps.
            let column = format!("CAST({} AS TIMESTAMP)", ident(ts));
            let now = "CAST(now() AS TIMESTAMP)";
            filters.push(format!("{column} > {now} - INTERVAL '{seconds} seconds'"));
            filters.push(format!("{column} <= {now}"));
        }
        let bounds = e.count.clone().unwrap_or(CountBounds { gte: Some(1), ..Default::default() });
        let having = having(&bounds);
        let where_clause = if filters.is_empty() { String::new() } else { format!(" WHERE {}", filters.join(" AND ")) };
        let uid = format!("CAST({} AS VARCHAR)", ident(&source.user_id_column));
        let counted =
            format!("SELECT {uid} AS user_id, count(*) AS n FROM {}{where_clause} GROUP BY {uid}", ident(&source.table));
        if allows_zero(&bounds) {
            // Users with no matching event count as 0: start from everyone.
            Ok(format!(
                "SELECT u.user_id FROM ({}) AS u LEFT JOIN ({counted}) AS c ON u.user_id = c.user_id WHERE {}",
                self.universe()?,
                having.replace("count(*)", "coalesce(c.n, 0)")
            ))
        } else {
            Ok(format!("SELECT user_id FROM ({counted}) AS c WHERE {}", having.replace("count(*)", "c.n")))
        }
    }
}

fn allows_zero(b: &CountBounds) -> bool {
    b.eq == Some(0) || (b.eq.is_none() && b.gt.is_none() && b.gte.unwrap_or(0) == 0)
}

fn having(b: &CountBounds) -> String {
    let mut parts = Vec::new();
    let pairs = [("=", b.eq), (">", b.gt), (">=", b.gte), ("<", b.lt), ("<=", b.lte)];
    for (op, value) in pairs {
        if let Some(v) = value {
            parts.push(format!("count(*) {op} {v}"));
        }
    }
    if parts.is_empty() {
        parts.push("count(*) >= 0".to_string());
    }
    parts.join(" AND ")
}

fn condition(c: &Comparison) -> String {
    let column = ident(&c.column);
    let value = || c.value.as_ref().map(literal).unwrap_or_else(|| "NULL".to_string());
    let list = || c.values.iter().flatten().map(literal).collect::<Vec<_>>().join(", ");
    match c.op {
        Op::Eq => format!("{column} = {}", value()),
        Op::Ne => format!("{column} <> {}", value()),
        Op::Gt => format!("{column} > {}", value()),
        Op::Gte => format!("{column} >= {}", value()),
        Op::Lt => format!("{column} < {}", value()),
        Op::Lte => format!("{column} <= {}", value()),
        Op::In => format!("{column} IN ({})", list()),
        Op::NotIn => format!("{column} NOT IN ({})", list()),
        Op::Exists => format!("{column} IS NOT NULL"),
    }
}

/// A quoted identifier; rules accept only `[A-Za-z_][A-Za-z0-9_]*` names,
/// and quoting keeps case and reserved words intact.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{}'", s.replace('\'', "''")),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => if *b { "TRUE" } else { "FALSE" }.to_string(),
        _ => "NULL".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Definition, SourceFormat};

    fn sources() -> Vec<SegmentSourceSpec> {
        let source = |table: &str, ts: Option<&str>| SegmentSourceSpec {
            table: table.into(),
            uri: format!("s3://lake/{table}/"),
            format: SourceFormat::Parquet,
            user_id_column: "user_id".into(),
            timestamp_column: ts.map(str::to_string),
        };
        vec![source("orders", Some("created_at")), source("users", None)]
    }

    fn rule(yaml: &str) -> Rule {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn compiled_sql_parses_and_reads_the_declared_tables() {
        let r = rule(
            "all:\n- property: {table: users, column: country, op: in, values: [ES, \"IT's\"]}\n\
             - event: {table: orders, count: {gte: 3}, within: 90d, where: [{column: status, op: eq, value: delivered}]}\n\
             - not: {event: {table: orders, within: 30d}}\n- segment: {name: churn-risk}\n",
        );
        let sql = compile(&r, &sources()).unwrap();
        let def = Definition { sql: Some(sql.clone()), rules: None, static_list: None };
        let known = vec!["orders".to_string(), "users".to_string(), segment_table("churn-risk")];
        let refs = crate::definition::validate(&def, Some(&known)).unwrap_or_else(|e| panic!("{e}\n{sql}"));
        assert_eq!(refs.tables.len(), 3, "{sql}");
        assert!(sql.contains("'IT''s'"), "quotes are escaped: {sql}");
        assert!(sql.contains("INTERVAL '7776000 seconds'"), "{sql}");
        assert!(sql.contains(" EXCEPT "), "{sql}");
    }

    #[test]
    fn zero_count_bounds_start_from_every_known_user() {
        let sql = compile(&rule("event: {table: orders, count: {lte: 2}}"), &sources()).unwrap();
        assert!(sql.contains("LEFT JOIN") && sql.contains("coalesce(c.n, 0) <= 2"), "{sql}");
        let sql = compile(&rule("event: {table: orders, count: {gte: 2}}"), &sources()).unwrap();
        assert!(!sql.contains("LEFT JOIN") && sql.contains("c.n >= 2"), "{sql}");
    }

    #[test]
    fn within_needs_a_timestamp_column() {
        let err = compile(&rule("event: {table: users, within: 7d}"), &sources()).unwrap_err();
        assert_eq!(err.field, "spec.definition.rules.event.within");
        let err = compile(&rule("any: [{property: {table: refunds, column: x, op: exists}}]"), &sources()).unwrap_err();
        assert_eq!(err.field, "spec.definition.rules.any[0].property.table");
    }
}
