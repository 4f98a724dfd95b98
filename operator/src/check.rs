//! `segment-operator check`: the checks the operator makes before it
//! launches anything, run on manifest files, for authors and CI pipelines.
//! With the admin's ComputeClasses and labelled Namespaces among the
//! files, each Segment is also checked against its namespace's class
//! (`segment_core::policy::check_allowed`: resources, locations, Spark),
//! and each class's Spark settings and Iceberg catalogs are checked.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use segment_core::api::ComputeEngine;
use segment_core::definition::definition_hash;
use segment_core::policy;
use segment_core::task::sources_read;
use segment_core::validation::{check_spec, Invalid};

use crate::manifests::Manifests;

/// One line per Segment; returns the report and whether every one passed.
pub fn report(manifests: &Manifests, now: DateTime<Utc>) -> (String, bool) {
    let mut out = String::new();
    let mut all_ok = true;
    for class in &manifests.classes {
        let name = class.metadata.name.clone().unwrap_or_default();
        let checked = policy::check_iceberg_catalogs(&class.spec)
            .and_then(|()| class.spec.spark.as_ref().map(policy::check_spark_settings).transpose());
        match checked {
            Err(invalid) => {
                all_ok = false;
                let _ = writeln!(out, "INVALID  ComputeClass {name}: {}: {invalid}", invalid.reason);
            }
            Ok(Some(())) => {
                let _ = writeln!(out, "ok       ComputeClass {name}: Spark enabled");
            }
            Ok(None) => {
                let _ = writeln!(out, "ok       ComputeClass {name}: DataFusion only");
            }
        }
    }
    for segment in &manifests.segments {
        let key = segment.key();
        let tables = manifests.tables_in(&key.namespace);
        match check_spec(&segment.spec, Some(&tables)).and_then(|checked| allowed(manifests, segment).map(|note| (checked, note)))
        {
            Ok((checked, class_note)) => {
                let kind = if segment.spec.definition.sql.is_some() {
                    "sql"
                } else if segment.spec.definition.rules.is_some() {
                    "rules"
                } else {
                    "static"
                };
                let mut reads: Vec<String> = checked.refs.tables.iter().cloned().collect();
                reads.extend(checked.refs.segments.iter().map(|s| format!("segment {s}")));
                let reads = if reads.is_empty() { String::new() } else { format!(" reads {}", reads.join(", ")) };
                let next = match &checked.schedule {
                    Some(schedule) => {
                        let mut times = Vec::new();
                        let mut t = now;
                        for _ in 0..3 {
                            let Some(n) = schedule.next_after(t) else { break };
                            times.push(n.format("%Y-%m-%dT%H:%MZ").to_string());
                            t = n;
                        }
                        format!("; next runs {}", times.join(", "))
                    }
                    None => "; no schedule (runs on creation, definition change and request)".to_string(),
                };
                let _ = writeln!(
                    out,
                    "ok       {key}: {kind}{reads}; definition {}{next}{class_note}",
                    definition_hash(&segment.spec.definition)
                );
            }
            Err(invalid) => {
                all_ok = false;
                let _ = writeln!(out, "INVALID  {key}: {}: {invalid}", invalid.reason);
            }
        }
    }
    let _ = writeln!(out, "{} segments, {} sources checked", manifests.segments.len(), manifests.sources.len());
    (out, all_ok)
}

/// Checks `segment` against its namespace's ComputeClass when the files
/// say which it is; a note for the report line otherwise (a Spark Segment
/// needs a class with Spark settings, which the files do not show).
fn allowed(manifests: &Manifests, segment: &segment_core::api::Segment) -> Result<String, Invalid> {
    let namespace = segment.key().namespace;
    let spark = segment.spec.compute.as_ref().is_some_and(|c| c.engine == ComputeEngine::Spark);
    match manifests.class_of(&namespace) {
        Some(Ok(class)) => {
            let sources = manifests.sources_in(&namespace);
            let read = sources_read(&segment.spec.definition, sources.iter());
            // The results base is the operator's flag, unknown here: the
            // class's own rules are checked.
            let tenant = policy::Tenant { namespace: &namespace, results_base: "" };
            policy::check_allowed(&segment.spec, &read, class, tenant)?;
            Ok(if spark { "; engine spark".to_string() } else { String::new() })
        }
        Some(Err(missing)) => Err(missing),
        None if spark => {
            Ok(format!("; engine spark: needs a ComputeClass with spec.spark for namespace {namespace} (none in these files)"))
        }
        None => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifests(yaml: &str) -> Manifests {
        let dir = tempfile_dir();
        let file = dir.join("manifests.yaml");
        std::fs::write(&file, yaml).unwrap();
        let loaded = segment_core::manifests::load(&[file]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        loaded
    }

    fn tempfile_dir() -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("segment-check-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const FILES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: growth, labels: {segmentation.dev/compute-class: CLASS}}
---
apiVersion: segmentation.dev/v1alpha1
kind: ComputeClass
metadata: {name: plain}
spec: {image: worker:1}
---
apiVersion: segmentation.dev/v1alpha1
kind: ComputeClass
metadata: {name: sparky}
spec: {spark: {image: 'spark:1', sparkVersion: 4.0.1, serviceAccountName: spark, sparkConf: {spark.sql.shuffle.partitions: '8'}}}
---
apiVersion: segmentation.dev/v1alpha1
kind: SegmentSource
metadata: {name: orders, namespace: growth}
spec: {table: orders, uri: 's3://lake/orders/', format: parquet}
---
apiVersion: segmentation.dev/v1alpha1
kind: Segment
metadata: {name: big, namespace: growth}
spec: {definition: {sql: SELECT user_id FROM orders}, compute: {engine: spark}}
"#;

    #[test]
    fn a_spark_segment_is_checked_against_its_namespaces_class() {
        let now = chrono::Utc::now();
        let (text, ok) = super::report(&manifests(&FILES.replace("CLASS", "plain")), now);
        assert!(!ok, "{text}");
        assert!(text.contains("INVALID  growth/big: NotAllowed") && text.contains("spec.compute.engine"), "{text}");
        let (text, ok) = super::report(&manifests(&FILES.replace("CLASS", "sparky")), now);
        assert!(ok, "{text}");
        assert!(text.contains("ok       ComputeClass sparky: Spark enabled"), "{text}");
        assert!(text.contains("ok       growth/big: sql reads orders") && text.contains("; engine spark"), "{text}");
        // A class that sets what its own fields set is refused.
        let reserved =
            FILES.replace("CLASS", "sparky").replace("spark.sql.shuffle.partitions", "spark.kubernetes.container.image");
        let (text, ok) = super::report(&manifests(&reserved), now);
        assert!(!ok && text.contains("INVALID  ComputeClass sparky"), "{text}");
        // So is a catalog with two ways to authenticate.
        let two_ways = FILES.replace("CLASS", "plain").replace(
            "spec: {image: worker:1}",
            "spec: {image: worker:1, icebergCatalogs: [{name: lake, type: rest, uri: 'https://c/', tokenEnv: T, credentialEnv: C}]}",
        );
        let (text, ok) = super::report(&manifests(&two_ways), now);
        assert!(!ok && text.contains("INVALID  ComputeClass plain: NotAllowed"), "{text}");
        assert!(text.contains("spec.icebergCatalogs[0].credentialEnv"), "{text}");
        // No Namespace in the files: not checked against a class, but said.
        let without = FILES.split("---").skip(1).collect::<Vec<_>>().join("---");
        let (text, ok) = super::report(&manifests(&without), now);
        assert!(ok && text.contains("needs a ComputeClass with spec.spark"), "{text}");
    }
}
