//! Segment and SegmentSource manifests (and the admin's ComputeClasses and
//! the Namespaces that choose them) read from files, for the commands
//! that work without a cluster (`segment-operator check`, standalone mode,
//! `kubectl segment preview`), and the one rule for the locations in them:
//! `file://./x` means `x` next to the manifests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::{ComputeClass, ComputeClassSpec, Segment, SegmentSource, SegmentSourceSpec, COMPUTE_CLASS_LABEL};

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
    /// they do not say, `Some(Err(name))` when the class named is not in them.
    pub fn class_of(&self, namespace: &str) -> Option<Result<&ComputeClassSpec, &str>> {
        let name = self.namespace_classes.get(namespace)?;
        Some(self.classes.iter().find(|c| c.metadata.name.as_deref() == Some(name)).map(|c| &c.spec).ok_or(name.as_str()))
    }

    /// Makes the `file://./` locations of sources and static lists
    /// absolute, relative to `dir` (the manifest directory).
    pub fn resolve_relative_uris(&mut self, dir: &Path) {
        for source in &mut self.sources {
            source.spec.uri = resolve_relative_uri(&source.spec.uri, dir);
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
}
