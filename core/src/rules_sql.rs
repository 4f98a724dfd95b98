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

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sqlparser::dialect::GenericDialect;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use crate::api::{ComputeEngine, SegmentSourceSpec};
use crate::definition::DefinitionError;
use crate::duration::parse_duration;
use crate::rules::{Comparison, CountBounds, EventRule, Op, PropertyRule, Rule};

/// Name of the table holding another segment's active members.
pub fn segment_table(segment: &str) -> String {
    format!("segment__{}", segment.replace(['-', '.'], "_"))
}

/// The SQL dialect a rule is compiled to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// DataFusion (the compute Job), whose `now()` the worker fixes at the
    /// snapshot time.
    DataFusion,
    /// Spark SQL. Spark's `now()` is the query's start and cannot be
    /// set, so the snapshot time is written in as a literal.
    Spark { snapshot_time: DateTime<Utc> },
}

impl Dialect {
    /// The dialect of `engine`, for a run at `snapshot_time`.
    pub fn of(engine: ComputeEngine, snapshot_time: DateTime<Utc>) -> Dialect {
        match engine {
            ComputeEngine::Datafusion => Dialect::DataFusion,
            ComputeEngine::Spark => Dialect::Spark { snapshot_time },
        }
    }

    /// A quoted identifier; rules accept only `[A-Za-z_][A-Za-z0-9_]*`
    /// names, and quoting keeps case and reserved words intact.
    fn ident(self, name: &str) -> String {
        match self {
            Dialect::DataFusion => format!("\"{}\"", name.replace('"', "\"\"")),
            Dialect::Spark { .. } => format!("`{}`", name.replace('`', "``")),
        }
    }

    /// `CAST(expr AS <text>)`: Spark's `VARCHAR` needs a length.
    fn as_text(self, expr: &str) -> String {
        match self {
            Dialect::DataFusion => format!("CAST({expr} AS VARCHAR)"),
            Dialect::Spark { .. } => format!("CAST({expr} AS STRING)"),
        }
    }

    /// The snapshot time as a zone-less UTC timestamp.
    fn now(self) -> String {
        match self {
            Dialect::DataFusion => "CAST(now() AS TIMESTAMP)".to_string(),
            // The session time zone of the Spark driver is UTC, so the
            // literal's `Z` and the session agree.
            Dialect::Spark { snapshot_time } => format!("CAST({} AS TIMESTAMP)", spark_timestamp(snapshot_time)),
        }
    }

    fn seconds(self, seconds: i64) -> String {
        match self {
            Dialect::DataFusion => format!("INTERVAL '{seconds} seconds'"),
            Dialect::Spark { .. } => format!("INTERVAL {seconds} SECONDS"),
        }
    }

    fn literal(self, v: &Value) -> String {
        match (v, self) {
            (Value::String(s), Dialect::DataFusion) => format!("'{}'", s.replace('\'', "''")),
            // Spark reads backslash escapes in string literals.
            (Value::String(s), Dialect::Spark { .. }) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
            (Value::Number(n), _) => n.to_string(),
            (Value::Bool(b), _) => if *b { "TRUE" } else { "FALSE" }.to_string(),
            _ => "NULL".to_string(),
        }
    }
}

/// Compiles `rule` to a DataFusion query returning one column, `user_id`.
pub fn compile(rule: &Rule, sources: &[SegmentSourceSpec]) -> Result<String, DefinitionError> {
    compile_for(rule, sources, Dialect::DataFusion)
}

/// Compiles `rule` to a query of `dialect` returning one column, `user_id`.
pub fn compile_for(rule: &Rule, sources: &[SegmentSourceSpec], dialect: Dialect) -> Result<String, DefinitionError> {
    rule.validate("spec.definition.rules")?;
    let compiler = Compiler { sources, dialect };
    let body = compiler.rule(rule, "spec.definition.rules")?;
    Ok(format!("SELECT DISTINCT user_id FROM ({body}) AS segment_members"))
}

/// Spark SQL functions that call Java methods by name
/// (`reflect('java.lang.System', 'getenv', 'AWS_SECRET_ACCESS_KEY')`): a
/// tenant could read the driver's credentials into its members. DataFusion
/// has no such function.
const JAVA_CALLS: [&str; 3] = ["reflect", "java_method", "try_reflect"];

/// Refuses Spark SQL that runs code of the tenant's choosing in the driver
/// or executors: a call of a Java method ([`JAVA_CALLS`]), however it is
/// written (qualified `system.builtin.reflect(`, quoted `` `reflect`( ``,
/// comments before the parenthesis), and a script transform
/// (`TRANSFORM (...) USING 'command'`, which runs a command; `USING`
/// followed by a string is nothing else in Spark SQL). The tokens decide,
/// not a parse, so Spark cannot read a call the check missed.
pub fn refuse_code_execution(sql: &str) -> Result<(), DefinitionError> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| DefinitionError::new("spec.definition.sql", format!("SQL syntax: {e}")))?;
    let mut significant = tokens.iter().filter(|t| !matches!(t, Token::Whitespace(_))).peekable();
    while let Some(token) = significant.next() {
        let Token::Word(word) = token else { continue };
        let name = word.value.to_ascii_lowercase();
        let next = significant.peek();
        let refused = if JAVA_CALLS.contains(&name.as_str()) && next == Some(&&Token::LParen) {
            format!("function `{name}` is not allowed: it calls Java methods in the Spark driver")
        } else if word.quote_style.is_none() && name == "using" && next.is_some_and(|t| is_string(t)) {
            "a script transform (`USING '...'`) is not allowed: it runs a command in the Spark driver".to_string()
        } else {
            continue;
        };
        return Err(DefinitionError::new("spec.definition.sql", refused));
    }
    Ok(())
}

/// A string literal as Spark reads it: `'...'`, and `"..."`, which the
/// generic tokenizer takes for a quoted name.
fn is_string(token: &Token) -> bool {
    match token {
        Token::SingleQuotedString(_) | Token::DoubleQuotedString(_) => true,
        Token::Word(word) => word.quote_style == Some('"'),
        _ => false,
    }
}

/// A Spark timestamp literal of `time`, in microseconds (Spark's
/// precision: a snapshot time's nanoseconds are dropped).
pub fn spark_timestamp(time: DateTime<Utc>) -> String {
    format!("TIMESTAMP '{}'", time.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// Spark SQL with the clock functions pinned to `snapshot_time`: `now()`,
/// `current_timestamp[()]`, `localtimestamp[()]`, `current_date[()]`,
/// `curdate()` and `current_time[()]` become literals, so a version
/// recomputed later gives the same members (Spark has no setting for its
/// clock). Only those tokens change; the rest of the text is kept byte for
/// byte, so Spark parses what the author wrote. A column of one of these
/// names must be qualified (`t.now`) or quoted (`` `now` ``) to stay a
/// column, as in Spark itself.
pub fn pin_clock(sql: &str, snapshot_time: DateTime<Utc>) -> Result<String, DefinitionError> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| DefinitionError::new("spec.definition.sql", format!("SQL syntax: {e}")))?;
    let offsets = LineOffsets::new(sql);
    let micros = snapshot_time.to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut out = String::with_capacity(sql.len() + 64);
    let mut copied = 0usize;
    let significant = |from: usize| (from..tokens.len()).find(|&j| !matches!(tokens[j].token, Token::Whitespace(_)));
    let mut i = 0;
    while i < tokens.len() {
        let Token::Word(word) = &tokens[i].token else {
            i += 1;
            continue;
        };
        let previous = (0..i).rev().find(|&j| !matches!(tokens[j].token, Token::Whitespace(_)));
        let qualified = previous.is_some_and(|j| tokens[j].token == Token::Period);
        let name = word.value.to_ascii_lowercase();
        let called = significant(i + 1)
            .filter(|&j| tokens[j].token == Token::LParen)
            .and_then(|open| significant(open + 1).filter(|&close| tokens[close].token == Token::RParen));
        let literal = match name.as_str() {
            _ if word.quote_style.is_some() || qualified => None,
            "now" if called.is_some() => Some(format!("TIMESTAMP '{micros}'")),
            "current_timestamp" | "localtimestamp" => Some(format!("TIMESTAMP '{micros}'")),
            "current_date" => Some(format!("DATE '{}'", snapshot_time.date_naive())),
            "curdate" if called.is_some() => Some(format!("DATE '{}'", snapshot_time.date_naive())),
            "current_time" => Some(format!("TIME '{}'", snapshot_time.format("%H:%M:%S%.6f"))),
            _ => None,
        };
        let Some(literal) = literal else {
            i += 1;
            continue;
        };
        let last = called.unwrap_or(i);
        let start = offsets.byte(sql, &tokens[i]);
        let end = offsets.byte_end(sql, &tokens[last]);
        out.push_str(&sql[copied..start]);
        out.push_str(&literal);
        copied = end;
        i = last + 1;
    }
    out.push_str(&sql[copied..]);
    Ok(out)
}

/// Byte offsets of the tokenizer's (line, column) locations, which count
/// characters from 1.
struct LineOffsets {
    starts: Vec<usize>,
}

impl LineOffsets {
    fn new(text: &str) -> LineOffsets {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineOffsets { starts }
    }

    fn at(&self, text: &str, line: u64, column: u64) -> usize {
        let start = self.starts.get((line.max(1) - 1) as usize).copied().unwrap_or(text.len());
        text[start..].char_indices().nth((column.max(1) - 1) as usize).map(|(i, _)| start + i).unwrap_or(text.len())
    }

    fn byte(&self, text: &str, token: &TokenWithSpan) -> usize {
        self.at(text, token.span.start.line, token.span.start.column)
    }

    fn byte_end(&self, text: &str, token: &TokenWithSpan) -> usize {
        self.at(text, token.span.end.line, token.span.end.column)
    }
}

struct Compiler<'a> {
    sources: &'a [SegmentSourceSpec],
    dialect: Dialect,
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
            .map(|s| {
                format!(
                    "SELECT {} AS user_id FROM {}",
                    self.dialect.as_text(&self.ident(&s.user_id_column)),
                    self.ident(&s.table)
                )
            })
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
            Rule::Segment(s) => {
                Ok(format!("SELECT {} AS user_id FROM {}", self.dialect.as_text("user_id"), self.ident(&segment_table(&s.name))))
            }
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
            "SELECT DISTINCT {} AS user_id FROM {} WHERE {}",
            self.dialect.as_text(&self.ident(&source.user_id_column)),
            self.ident(&source.table),
            self.condition(&p.comparison)
        ))
    }

    fn event(&self, e: &EventRule, path: &str) -> Result<String, DefinitionError> {
        let source = self.source(&e.table, path)?;
        let mut filters: Vec<String> = e.filters.iter().map(|c| self.condition(c)).collect();
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
            let column = format!("CAST({} AS TIMESTAMP)", self.ident(ts));
            let now = self.dialect.now();
            filters.push(format!("{column} > {now} - {}", self.dialect.seconds(seconds)));
            filters.push(format!("{column} <= {now}"));
        }
        let bounds = e.count.clone().unwrap_or(CountBounds { gte: Some(1), ..Default::default() });
        let having = having(&bounds);
        let where_clause = if filters.is_empty() { String::new() } else { format!(" WHERE {}", filters.join(" AND ")) };
        let uid = self.dialect.as_text(&self.ident(&source.user_id_column));
        let counted =
            format!("SELECT {uid} AS user_id, count(*) AS n FROM {}{where_clause} GROUP BY {uid}", self.ident(&source.table));
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

impl Compiler<'_> {
    fn ident(&self, name: &str) -> String {
        self.dialect.ident(name)
    }

    fn condition(&self, c: &Comparison) -> String {
        let column = self.ident(&c.column);
        let value = || c.value.as_ref().map(|v| self.dialect.literal(v)).unwrap_or_else(|| "NULL".to_string());
        let list = || c.values.iter().flatten().map(|v| self.dialect.literal(v)).collect::<Vec<_>>().join(", ");
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

    fn snapshot() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-06-01T08:09:10.123456789Z").unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_datafusion_output_is_unchanged() {
        let sql = compile(&rule("event: {table: orders, count: {gte: 3}, within: 90d}"), &sources()).unwrap();
        assert_eq!(
            sql,
            "SELECT DISTINCT user_id FROM (SELECT user_id FROM (SELECT CAST(\"user_id\" AS VARCHAR) AS user_id, count(*) AS n \
             FROM \"orders\" WHERE CAST(\"created_at\" AS TIMESTAMP) > CAST(now() AS TIMESTAMP) - INTERVAL '7776000 seconds' \
             AND CAST(\"created_at\" AS TIMESTAMP) <= CAST(now() AS TIMESTAMP) GROUP BY CAST(\"user_id\" AS VARCHAR)) AS c \
             WHERE c.n >= 3) AS segment_members"
        );
    }

    #[test]
    fn the_spark_dialect_quotes_casts_and_pins_the_clock() {
        let spark = Dialect::Spark { snapshot_time: snapshot() };
        let r = rule(
            "all:\n- property: {table: users, column: country, op: in, values: [ES, \"IT's\", \"a\\\\b\"]}\n\
             - event: {table: orders, count: {gte: 3}, within: 90d}\n- not: {segment: {name: churn-risk}}\n",
        );
        let sql = compile_for(&r, &sources(), spark).unwrap();
        assert!(sql.contains("CAST(`user_id` AS STRING) AS user_id FROM `users`"), "{sql}");
        assert!(sql.contains("`country` IN ('ES', 'IT\\'s', 'a\\\\b')"), "backslash escapes: {sql}");
        assert!(
            sql.contains(
                "CAST(`created_at` AS TIMESTAMP) > CAST(TIMESTAMP '2025-06-01T08:09:10.123456Z' AS TIMESTAMP) - INTERVAL 7776000 SECONDS"
            ),
            "{sql}"
        );
        assert!(sql.contains("FROM `segment__churn_risk`"), "{sql}");
        for datafusion_only in ["\"", "VARCHAR", "now()"] {
            assert!(!sql.contains(datafusion_only), "{datafusion_only} in {sql}");
        }
    }

    #[test]
    fn spark_sql_that_runs_code_is_refused() {
        for sql in [
            "SELECT reflect('java.lang.System', 'getenv', 'AWS_SECRET_ACCESS_KEY') AS user_id FROM orders",
            "SELECT JAVA_METHOD('java.lang.System', 'getenv', 'X') AS user_id FROM orders",
            "SELECT system.builtin.try_reflect('java.lang.System', 'getenv', 'X') AS user_id FROM orders",
            "SELECT `reflect` /* a comment */ ('java.lang.System', 'getenv', 'X') AS user_id FROM orders",
        ] {
            let error = refuse_code_execution(sql).unwrap_err();
            assert_eq!(error.field, "spec.definition.sql", "{sql}");
            assert!(error.message.contains("calls Java methods"), "{sql}: {error:?}");
        }
        // A column or a string of the same name is not a call.
        refuse_code_execution("SELECT user_id FROM orders WHERE reflect = 'reflect(' AND o.java_method > 1").unwrap();
        // A script transform runs a command; a join's USING is a join.
        for sql in [
            "SELECT TRANSFORM(user_id) USING 'env' AS (user_id) FROM orders",
            "SELECT transform (user_id) using\n\"sh -c 'cat /proc/self/environ'\" FROM orders",
        ] {
            let error = refuse_code_execution(sql).unwrap_err();
            assert!(error.message.contains("runs a command"), "{sql}: {error:?}");
        }
        refuse_code_execution("SELECT o.user_id FROM orders o JOIN users u USING (user_id)").unwrap();
        refuse_code_execution("SELECT transform(tags, t -> upper(t)) AS user_id FROM orders").unwrap();
    }

    #[test]
    fn the_clock_is_pinned_in_spark_sql_and_nothing_else_changes() {
        let pinned = pin_clock(
            "SELECT user_id FROM orders o\nWHERE o.created_at >= now() - INTERVAL '90 days' AND o.now < NOW ( )\n\
             AND d = current_date AND t <= current_timestamp() AND x = 'now()' AND `now` = current_time AND y = now",
            snapshot(),
        )
        .unwrap();
        assert_eq!(
            pinned,
            "SELECT user_id FROM orders o\nWHERE o.created_at >= TIMESTAMP '2025-06-01T08:09:10.123456Z' - INTERVAL '90 days' \
             AND o.now < TIMESTAMP '2025-06-01T08:09:10.123456Z'\nAND d = DATE '2025-06-01' \
             AND t <= TIMESTAMP '2025-06-01T08:09:10.123456Z' AND x = 'now()' AND `now` = TIME '08:09:10.123456' AND y = now"
        );
        // Characters wider than a byte before a pinned call keep the offsets right.
        let pinned = pin_clock("SELECT 'café' AS a, now() AS b", snapshot()).unwrap();
        assert_eq!(pinned, "SELECT 'café' AS a, TIMESTAMP '2025-06-01T08:09:10.123456Z' AS b");
    }
}
