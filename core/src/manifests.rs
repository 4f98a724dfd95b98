//! Segment and SegmentSource manifests (and the admin's ComputeClasses and
//! the Namespaces that choose them) read from files, for the commands
//! that work without a cluster (`segment-operator check`, standalone mode,
//! `kubectl segment preview`), and the one rule for the locations in them:
//! `file://./x` means `x` next to the manifests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::{
    ComputeClass, ComputeClassSpec, IcebergCatalogType, Segment, SegmentSource, SegmentSourceSpec, COMPUTE_CLASS_LABEL,
};
use crate::reasons::SpecProblem;
use crate::task::ComputeTask;
use crate::validation::Invalid;

#[derive(Debug, Default)]
pub struct Manifests {
    pub segments: Vec<Segment>,
    pub sources: Vec<SegmentSource>,
    /// ComputeClasses, for `segment-operator check`.
    pub classes: Vec<ComputeClass>,
    /// The class each Namespace of the files names with its
    /// `segmentation.dev/compute-class` label.
    pub namespace_classes: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: document {index}: {message}")]
    Parse { path: PathBuf, index: usize, message: String },
}

/// Namespace given to manifests that name none, as kubectl does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Reads every `.yaml`/`.yml` file under `paths` (directories are walked,
/// sorted by name). Documents of other kinds are skipped; a Segment or
/// SegmentSource that does not parse, or a SegmentSource that fails
/// [`check_source`](crate::validation::check_source), is an error naming
/// file, document and field.
pub fn load(paths: &[PathBuf]) -> Result<Manifests, ManifestError> {
    let mut files = Vec::new();
    for path in paths {
        collect_files(path, &mut files)?;
    }
    let mut out = Manifests::default();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Read { path: file.clone(), source })?;
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let parse_err = |message: String| ManifestError::Parse { path: file.clone(), index: index + 1, message };
            let value = serde_yaml::Value::deserialize(document).map_err(|e| parse_err(e.to_string()))?;
            match value.get("kind").and_then(|k| k.as_str()) {
                Some("Segment") => {
                    let mut segment: Segment = serde_yaml::from_value(value).map_err(|e| parse_err(e.to_string()))?;
                    segment.metadata.namespace.get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
                    out.segments.push(segment);
                }
                Some("SegmentSource") => {
                    let mut source: SegmentSource = serde_yaml::from_value(value).map_err(|e| parse_err(e.to_string()))?;
                    crate::validation::check_source(&source.spec).map_err(|e| parse_err(e.to_string()))?;
                    source.metadata.namespace.get_or_insert_with(|| DEFAULT_NAMESPACE.to_string());
                    out.sources.push(source);
                }
                Some("ComputeClass") => {
                    out.classes.push(serde_yaml::from_value(value).map_err(|e| parse_err(e.to_string()))?);
                }
                Some("Namespace") => {
                    let name = value["metadata"]["name"].as_str().map(str::to_string);
                    let class = value["metadata"]["labels"][COMPUTE_CLASS_LABEL].as_str().map(str::to_string);
                    if let (Some(name), Some(class)) = (name, class) {
                        out.namespace_classes.insert(name, class);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let read_err = |source| ManifestError::Read { path: path.to_path_buf(), source };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(path).map_err(read_err)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for entry in entries {
            if entry.is_dir() || entry.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                collect_files(&entry, out)?;
            }
        }
    } else {
        std::fs::metadata(path).map_err(read_err)?;
        out.push(path.to_path_buf());
    }
    Ok(())
}

impl Manifests {
    /// `table` of every SegmentSource in `namespace`.
    pub fn tables_in(&self, namespace: &str) -> Vec<String> {
        self.sources_in(namespace).into_iter().map(|s| s.table).collect()
    }

    /// The SegmentSources of `namespace`, as a compute task takes them.
    pub fn sources_in(&self, namespace: &str) -> Vec<SegmentSourceSpec> {
        self.sources.iter().filter(|s| s.metadata.namespace.as_deref() == Some(namespace)).map(|s| s.spec.clone()).collect()
    }

    /// The ComputeClass `namespace` uses, when the files hold both its
    /// Namespace (with the label naming it) and the class: `None` when
    /// they do not say, `Some(Err(_))` when the class named is not in them.
    pub fn class_of(&self, namespace: &str) -> Option<Result<&ComputeClassSpec, Invalid>> {
        let name = self.namespace_classes.get(namespace)?;
        Some(self.classes.iter().find(|c| c.metadata.name.as_deref() == Some(name)).map(|c| &c.spec).ok_or_else(|| Invalid {
            reason: SpecProblem::NotAllowed,
            field: "metadata.namespace".to_string(),
            message: format!("ComputeClass `{name}` (the namespace's label) is not in these files"),
        }))
    }

    /// The class standalone mode and `kubectl segment preview` run
    /// `namespace`'s computes with: the one the files name for it, else
    /// an empty one (as the operator's without `--default-compute-class`).
    pub fn compute_class(&self, namespace: &str) -> Result<ComputeClassSpec, Invalid> {
        self.class_of(namespace).map_or_else(|| Ok(ComputeClassSpec::default()), |class| class.cloned())
    }

    /// `task` with what its Iceberg sources need of its namespace's class
    /// ([`ComputeTask::with_iceberg_access`]): the catalogs come from the
    /// files as they come from the cluster's ComputeClass, so a table
    /// that runs here runs there. A task without Iceberg sources needs
    /// no class.
    pub fn with_iceberg_access(&self, task: ComputeTask, results_base: &str) -> Result<ComputeTask, Invalid> {
        if !task.sources.iter().any(|s| s.format == crate::api::SourceFormat::Iceberg) {
            return Ok(task);
        }
        let class = self.compute_class(&task.segment.namespace)?;
        Ok(task.with_iceberg_access(&class, results_base))
    }

    /// Makes the `file://./` locations of sources and static lists, the
    /// `sqlite://./` files of SQL Iceberg catalogs and the classes'
    /// `file://./` allowed prefixes absolute, relative to `dir` (the
    /// manifest directory).
    pub fn resolve_relative_uris(&mut self, dir: &Path) {
        for source in &mut self.sources {
            source.spec.uri = resolve_relative_uri(&source.spec.uri, dir);
        }
        for class in &mut self.classes {
            for catalog in class.spec.iceberg_catalogs.iter_mut().filter(|c| c.type_ == IcebergCatalogType::Sql) {
                if let Some(rest) = catalog.uri.strip_prefix("sqlite://./") {
                    catalog.uri = format!("sqlite://{}/{rest}", dir.display());
                }
            }
            for prefix in class.spec.allowed_source_prefixes.iter_mut().flatten() {
                *prefix = resolve_relative_uri(prefix, dir);
            }
        }
        for segment in &mut self.segments {
            if let Some(list) = segment.spec.definition.static_list.as_mut() {
                list.uri = resolve_relative_uri(&list.uri, dir);
            }
        }
    }
}

/// `file://./x` in a manifest means `x` next to the manifest directory
/// `dir`; other locations are left as they are.
pub fn resolve_relative_uri(uri: &str, dir: &Path) -> String {
    match uri.strip_prefix("file://./") {
        Some(rest) => format!("file://{}/{rest}", dir.display()),
        None => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_file_locations_are_resolved_against_the_manifest_directory() {
        let dir = Path::new("/srv/segments");
        assert_eq!(resolve_relative_uri("file://./lake/orders/", dir), "file:///srv/segments/lake/orders/");
        assert_eq!(resolve_relative_uri("file:///data/orders/", dir), "file:///data/orders/");
        assert_eq!(resolve_relative_uri("s3://lake/orders/", dir), "s3://lake/orders/");
    }

    fn loaded(yaml: &str) -> Manifests {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.yaml"), yaml).unwrap();
        let mut manifests = load(&[dir.path().to_path_buf()]).unwrap();
        manifests.resolve_relative_uris(Path::new("/srv/segments"));
        manifests
    }

    const CLASS: &str = "apiVersion: segmentation.dev/v1alpha1\nkind: ComputeClass\nmetadata: {name: lake-readers}\nspec:\n  allowLocalFiles: true\n  allowedSourcePrefixes: ['file://./warehouse/{namespace}/']\n  icebergCatalogs:\n  - {name: lake, type: sql, uri: 'sqlite://./catalog.db'}\n  - {name: other, type: rest, uri: 'http://catalog/'}\n---\napiVersion: segmentation.dev/v1alpha1\nkind: SegmentSource\nmetadata: {name: orders, namespace: growth}\nspec: {table: orders, uri: 'iceberg://lake/sales/orders', format: iceberg}\n";

    /// Standalone mode and previews take a namespace's Iceberg catalogs
    /// from the class its Namespace's label names in the files, as the
    /// operator takes them from the cluster's.
    #[test]
    fn iceberg_catalogs_come_from_the_class_the_files_give_the_namespace() {
        let labelled = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: growth, labels: {segmentation.dev/compute-class: lake-readers}}\n";
        let manifests = loaded(&format!("{CLASS}{labelled}"));
        let task = |namespace: &str, sources: Vec<SegmentSourceSpec>| ComputeTask {
            segment: crate::api::SegmentKey::new(namespace, "s"),
            version: 1,
            generation: 1,
            definition_hash: "h".into(),
            snapshot_time: chrono::Utc::now(),
            definition: serde_json::from_value(serde_json::json!({"sql": "SELECT user_id FROM orders"})).unwrap(),
            sources,
            segment_inputs: Vec::new(),
            results_uri: "file:///r/".into(),
            engine: Default::default(),
            iceberg: None,
        };
        let with_access = manifests.with_iceberg_access(task("growth", manifests.sources_in("growth")), "file:///r").unwrap();
        let access = with_access.iceberg.expect("the Iceberg access");
        assert_eq!(access.catalogs.len(), 1);
        assert_eq!(access.catalogs[0].uri, "sqlite:///srv/segments/catalog.db");
        assert_eq!(access.allowed_prefixes, Some(vec!["file:///srv/segments/warehouse/growth/".to_string()]));
        assert!(access.allow_local_files);

        // No Iceberg source: no class needed, none asked for.
        assert_eq!(manifests.with_iceberg_access(task("other", Vec::new()), "file:///r").unwrap().iceberg, None);
        // No class for the namespace: the operator's empty one, no catalogs.
        let unlabelled = manifests.with_iceberg_access(task("other", manifests.sources_in("growth")), "file:///r").unwrap();
        assert_eq!(unlabelled.iceberg.map(|a| a.catalogs), Some(Vec::new()));

        // A class the label names but the files lack is an error, not an empty class.
        let missing =
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: growth, labels: {segmentation.dev/compute-class: gone}}\n";
        let manifests = loaded(&format!("{CLASS}{missing}"));
        let error = manifests.with_iceberg_access(task("growth", manifests.sources_in("growth")), "file:///r").unwrap_err();
        assert_eq!((error.reason, error.field.as_str()), (SpecProblem::NotAllowed, "metadata.namespace"));
        assert!(error.message.contains("ComputeClass `gone`"), "{error}");
    }
}
