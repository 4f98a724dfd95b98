//! Every check of a Segment spec the operator makes before launching
//! anything, in one place. The CRD's CEL rules reject most of these at
//! `kubectl apply`; objects that never meet the API server (standalone
//! mode, `segment-operator check`) get the same answers from here.

use crate::api::{SegmentSourceSpec, SegmentSpec, SourceFormat};
use crate::definition::{self, DefinitionRefs};
use crate::duration::parse_duration;
use crate::reasons::SpecProblem;
use crate::schedule::CronSchedule;

/// Why a spec cannot be run: the condition reason, the field and the
/// parser's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub reason: SpecProblem,
    pub field: String,
    pub message: String,
}

/// A spec that passed every check.
#[derive(Debug, Clone)]
pub struct Checked {
    pub refs: DefinitionRefs,
    pub schedule: Option<CronSchedule>,
}

/// Checks `spec`; `known_tables` (the SegmentSources of the namespace)
/// turns references to undeclared tables into errors.
pub fn check_spec(spec: &SegmentSpec, known_tables: Option<&[String]>) -> Result<Checked, Invalid> {
    let refs = definition::validate(&spec.definition, known_tables).map_err(|e| Invalid {
        reason: SpecProblem::InvalidDefinition,
        field: e.field,
        message: e.message,
    })?;
    let schedule = spec.schedule.as_ref().map(CronSchedule::parse).transpose().map_err(|e| Invalid {
        reason: SpecProblem::InvalidSchedule,
        field: e.field.to_string(),
        message: e.message,
    })?;
    if let Some(deadline) = spec.schedule.as_ref().and_then(|s| s.starting_deadline_seconds) {
        if deadline < 1 {
            return Err(invalid_spec("spec.schedule.startingDeadlineSeconds", format!("must be at least 1, got {deadline}")));
        }
    }
    if spec.retention.keep_versions < 1 {
        return Err(invalid_spec("spec.retention.keepVersions", "must be at least 1".into()));
    }
    parse_duration(&spec.retention.keep_results_for).map_err(|m| invalid_spec("spec.retention.keepResultsFor", m))?;
    if let Some(ratio) = spec.rollover.max_change_ratio {
        if !(0.0..=1.0).contains(&ratio) {
            return Err(invalid_spec("spec.rollover.maxChangeRatio", format!("must be between 0 and 1, got {ratio}")));
        }
    }
    if spec.pin_version == Some(0) {
        return Err(invalid_spec("spec.pinVersion", "versions start at 1".into()));
    }
    Ok(Checked { refs, schedule })
}

/// Checks a SegmentSource's spec beyond what its schema says: a Delta
/// table's `uri` is its root directory, which holds `_delta_log/`, not a
/// glob or a file; an Iceberg table's is `iceberg://<catalog>/<namespace>/<table>`,
/// and only an Iceberg table's. The CRD's CEL rules refuse the glob and
/// the mismatched scheme at `kubectl apply`.
pub fn check_source(spec: &SegmentSourceSpec) -> Result<(), Invalid> {
    if spec.format == SourceFormat::Delta {
        if spec.uri.contains(['*', '?', '[']) {
            return Err(invalid_spec(
                "spec.uri",
                format!("{}: a delta table is read from its root directory (the one holding _delta_log/), not a glob", spec.uri),
            ));
        }
        if spec.uri.trim_end_matches('/').ends_with("/_delta_log") {
            return Err(invalid_spec(
                "spec.uri",
                format!("{}: name the table's root directory, the one holding _delta_log/, not the log itself", spec.uri),
            ));
        }
    }
    let iceberg_scheme = spec.uri.starts_with(crate::iceberg::SCHEME);
    if spec.format == SourceFormat::Iceberg {
        crate::iceberg::TableRef::parse(&spec.uri).map_err(|message| invalid_spec("spec.uri", message))?;
    } else if iceberg_scheme {
        return Err(invalid_spec(
            "spec.format",
            format!("{}: an iceberg:// table is read with format: iceberg, not {}", spec.uri, spec.format.as_str()),
        ));
    }
    Ok(())
}

fn invalid_spec(field: &str, message: String) -> Invalid {
    Invalid { reason: SpecProblem::InvalidSpec, field: field.to_string(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> SegmentSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn each_kind_of_problem_has_its_reason_and_field() {
        let cases = [
            ("definition: {sql: 'SELECT'}", "InvalidDefinition", "spec.definition.sql"),
            (
                "definition: {sql: 'SELECT user_id FROM t'}\nschedule: {cron: '61 * * * *'}",
                "InvalidSchedule",
                "spec.schedule.cron",
            ),
            (
                "definition: {sql: 'SELECT user_id FROM t'}\nschedule: {cron: '@daily', timeZone: Mars/Olympus}",
                "InvalidSchedule",
                "spec.schedule.timeZone",
            ),
            (
                "definition: {sql: 'SELECT user_id FROM t'}\nretention: {keepVersions: 0}",
                "InvalidSpec",
                "spec.retention.keepVersions",
            ),
            (
                "definition: {sql: 'SELECT user_id FROM t'}\nretention: {keepResultsFor: 7y}",
                "InvalidSpec",
                "spec.retention.keepResultsFor",
            ),
            (
                "definition: {sql: 'SELECT user_id FROM t'}\nrollover: {maxChangeRatio: 1.5}",
                "InvalidSpec",
                "spec.rollover.maxChangeRatio",
            ),
            ("definition: {sql: 'SELECT user_id FROM t'}\npinVersion: 0", "InvalidSpec", "spec.pinVersion"),
        ];
        for (yaml, reason, field) in cases {
            let err = check_spec(&spec(yaml), None).unwrap_err();
            assert_eq!((err.reason.as_str(), err.field.as_str()), (reason, field), "{yaml}: {err}");
        }
    }

    #[test]
    fn a_delta_source_is_a_table_root() {
        let source = |uri: &str, format: &str| -> SegmentSourceSpec {
            serde_yaml::from_str(&format!("{{table: orders, uri: '{uri}', format: {format}}}")).unwrap()
        };
        assert!(check_source(&source("s3://lake/orders/", "delta")).is_ok());
        assert!(check_source(&source("file:///lake/orders", "delta")).is_ok());
        assert!(check_source(&source("s3://lake/orders/*.parquet", "parquet")).is_ok());
        for uri in ["s3://lake/orders/*.parquet", "s3://lake/orders/_delta_log/"] {
            let err = check_source(&source(uri, "delta")).unwrap_err();
            assert_eq!((err.reason, err.field.as_str()), (SpecProblem::InvalidSpec, "spec.uri"), "{uri}: {err}");
            assert!(err.message.contains("root directory"), "{err}");
        }
    }

    #[test]
    fn an_iceberg_source_names_a_catalog_a_namespace_and_a_table() {
        let source = |uri: &str, format: &str| -> SegmentSourceSpec {
            serde_yaml::from_str(&format!("{{table: orders, uri: '{uri}', format: {format}}}")).unwrap()
        };
        assert!(check_source(&source("iceberg://lake/sales/orders", "iceberg")).is_ok());
        for (uri, format, field) in [
            ("s3://lake/sales/orders/", "iceberg", "spec.uri"),
            ("iceberg://lake/orders", "iceberg", "spec.uri"),
            ("iceberg://lake/sales/../orders", "iceberg", "spec.uri"),
            ("iceberg://lake/sales/orders", "parquet", "spec.format"),
        ] {
            let err = check_source(&source(uri, format)).unwrap_err();
            assert_eq!((err.reason, err.field.as_str()), (SpecProblem::InvalidSpec, field), "{uri}: {err}");
        }
    }

    #[test]
    fn a_good_spec_passes_with_its_references() {
        let checked = check_spec(
            &spec("definition: {sql: 'SELECT o.user_id FROM orders o JOIN users u ON u.user_id = o.user_id'}\nschedule: {cron: '*/30 * * * *', timeZone: Europe/Madrid}"),
            Some(&["orders".to_string(), "users".to_string()]),
        )
        .unwrap();
        assert_eq!(checked.refs.tables.len(), 2);
        assert!(checked.schedule.is_some());
    }
}
