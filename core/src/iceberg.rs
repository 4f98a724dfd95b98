//! Apache Iceberg sources: how a SegmentSource names a table
//! (`iceberg://<catalog>/<namespace>/<table>`), and what the worker gets
//! from the namespace's ComputeClass to read it ([`IcebergAccess`]).
//!
//! A tenant names a catalog, never a host: the catalog's address and the
//! environment variable holding its credentials are the admin's, resolved
//! by the operator from the class into the task when it launches a
//! compute. A table's metadata and data locations are only known once the
//! catalog is asked, so the worker checks them against the class's
//! allowed locations, which the task carries too.

use serde::{Deserialize, Serialize};

use crate::api::{ComputeClassSpec, IcebergCatalog, SegmentSourceSpec, SourceFormat};
use crate::policy::{check_location, Tenant};
use crate::validation::Invalid;

pub const SCHEME: &str = "iceberg://";

/// A table in a catalog, as a SegmentSource's `uri` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    pub catalog: String,
    /// The namespace's levels, outermost first.
    pub namespace: Vec<String>,
    pub table: String,
}

impl TableRef {
    /// `iceberg://<catalog>/<level>[/<level>...]/<table>`. Segments are
    /// names, not paths: no escapes, globs, `.` or `..`.
    pub fn parse(uri: &str) -> Result<TableRef, String> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| format!("{uri}: an iceberg table is {SCHEME}<catalog>/<namespace>/<table>"))?;
        let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
        if segments.len() < 3 {
            return Err(format!("{uri}: name the catalog, the namespace and the table: {SCHEME}<catalog>/<namespace>/<table>"));
        }
        for segment in &segments {
            let plain = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            if segment.is_empty() || !segment.chars().all(plain) {
                return Err(format!(
                    "{uri}: `{segment}` is not a catalog, namespace or table name (letters, digits, `_` and `-`)"
                ));
            }
        }
        let (catalog, rest) = segments.split_first().expect("three segments");
        let (table, namespace) = rest.split_last().expect("two segments");
        Ok(TableRef {
            catalog: catalog.to_string(),
            namespace: namespace.iter().map(|s| s.to_string()).collect(),
            table: table.to_string(),
        })
    }
}

/// What a compute reading Iceberg tables gets from its namespace's
/// ComputeClass: the catalogs its sources name, and where their tables
/// may be (the class's `allowedSourcePrefixes`, `{namespace}` replaced).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IcebergAccess {
    pub catalogs: Vec<IcebergCatalog>,
    /// The Segment's namespace.
    pub namespace: String,
    /// The operator's results base: other namespaces' results are never read.
    pub results_base: String,
    /// `None`: any `s3://` location.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_prefixes: Option<Vec<String>>,
    #[serde(default)]
    pub allow_local_files: bool,
}

impl IcebergAccess {
    /// The access a compute of `namespace` reading `sources` gets from
    /// `class`; `None` when it reads no Iceberg table.
    pub fn resolve(
        sources: &[SegmentSourceSpec],
        class: &ComputeClassSpec,
        namespace: &str,
        results_base: &str,
    ) -> Option<IcebergAccess> {
        let named: Vec<String> = sources
            .iter()
            .filter(|s| s.format == SourceFormat::Iceberg)
            .filter_map(|s| TableRef::parse(&s.uri).ok())
            .map(|t| t.catalog)
            .collect();
        if named.is_empty() {
            return None;
        }
        Some(IcebergAccess {
            catalogs: class.iceberg_catalogs.iter().filter(|c| named.contains(&c.name)).cloned().collect(),
            namespace: namespace.to_string(),
            results_base: results_base.to_string(),
            allowed_prefixes: class
                .allowed_source_prefixes
                .as_ref()
                .map(|prefixes| prefixes.iter().map(|p| p.replace("{namespace}", namespace)).collect()),
            allow_local_files: class.allow_local_files,
        })
    }

    pub fn catalog(&self, name: &str) -> Option<&IcebergCatalog> {
        self.catalogs.iter().find(|c| c.name == name)
    }

    /// Whether a location a catalog or a metadata file gave may be read:
    /// the same check as a SegmentSource's `uri` ([`check_location`]).
    pub fn check_location(&self, field: &str, uri: &str) -> Result<(), Invalid> {
        let class = ComputeClassSpec {
            allowed_source_prefixes: self.allowed_prefixes.clone(),
            allow_local_files: self.allow_local_files,
            ..Default::default()
        };
        check_location(field, uri, &class, Tenant { namespace: &self.namespace, results_base: &self.results_base })
    }
}

/// The operator's check of an Iceberg source before launch: its catalog
/// is one of the class's.
pub fn check_catalog_declared(field: &str, uri: &str, class: &ComputeClassSpec) -> Result<(), Invalid> {
    let not_allowed =
        |message: String| Invalid { reason: crate::reasons::SpecProblem::NotAllowed, field: field.to_string(), message };
    let table = TableRef::parse(uri).map_err(not_allowed)?;
    if class.iceberg_catalogs.iter().any(|c| c.name == table.catalog) {
        return Ok(());
    }
    let declared: Vec<&str> = class.iceberg_catalogs.iter().map(|c| c.name.as_str()).collect();
    Err(not_allowed(format!(
        "{uri}: catalog `{}` is not one of the ComputeClass's icebergCatalogs ({})",
        table.catalog,
        if declared.is_empty() { "none".to_string() } else { declared.join(", ") }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_refs_name_a_catalog_a_namespace_and_a_table() {
        let t = TableRef::parse("iceberg://lake/sales/orders").unwrap();
        assert_eq!((t.catalog.as_str(), t.namespace.clone(), t.table.as_str()), ("lake", vec!["sales".to_string()], "orders"));
        let nested = TableRef::parse("iceberg://lake/sales/eu/orders/").unwrap();
        assert_eq!(nested.namespace, vec!["sales", "eu"]);
        for uri in [
            "iceberg://lake/orders",
            "iceberg://lake//orders",
            "iceberg://lake/sales/../orders",
            "iceberg://lake/sales/ord*",
            "iceberg://lake/sales/%6frders",
            "s3://lake/sales/orders",
        ] {
            assert!(TableRef::parse(uri).is_err(), "{uri}");
        }
    }

    #[test]
    fn access_carries_the_named_catalogs_and_the_namespaces_prefixes() {
        let class: ComputeClassSpec = serde_yaml::from_str(
            "allowedSourcePrefixes: ['s3://lake/{namespace}/']\nicebergCatalogs:\n- {name: lake, type: sql, uri: 'sqlite:///c.db'}\n- {name: other, type: rest, uri: 'http://c/'}",
        )
        .unwrap();
        let source: SegmentSourceSpec =
            serde_yaml::from_str("{table: orders, uri: 'iceberg://lake/sales/orders', format: iceberg}").unwrap();
        let access = IcebergAccess::resolve(std::slice::from_ref(&source), &class, "growth", "s3://results").unwrap();
        assert_eq!(access.catalogs.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["lake"]);
        assert_eq!(access.allowed_prefixes, Some(vec!["s3://lake/growth/".to_string()]));
        assert!(access.check_location("f", "s3://lake/growth/warehouse/orders/").is_ok());
        assert!(access.check_location("f", "s3://lake/finance/warehouse/orders/").is_err());
        assert!(access.check_location("f", "file:///var/run/secrets/token").is_err());
        let parquet: SegmentSourceSpec = serde_yaml::from_str("{table: t, uri: 's3://lake/t/', format: parquet}").unwrap();
        assert_eq!(IcebergAccess::resolve(&[parquet], &class, "growth", "s3://results"), None);
        assert!(check_catalog_declared("f", &source.uri, &class).is_ok());
        let error = check_catalog_declared("f", "iceberg://elsewhere/sales/orders", &class).unwrap_err();
        assert!(error.message.contains("`elsewhere` is not one of"), "{error}");
    }
}
