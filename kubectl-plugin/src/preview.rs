//! `kubectl segment preview`: a Segment's definition run on this machine
//! over a lake or a sample of it, before it goes to the cluster.
//!
//! It goes the way a run in the cluster goes: the operator's checks
//! ([`check_spec`], so errors read as the `Ready` condition would), then
//! the compute Job's task ([`compute_task`], [`segment_inputs`]) run by
//! the worker library ([`compute::run`]), into a temporary results
//! directory that is read back like ingest reads it. Segments a rules
//! definition refers to are computed first, from their manifests, at the
//! same snapshot time, as standalone mode does.
//!
//! Locations: `file://./x` is relative to the manifest's directory (as in
//! standalone mode); `--lake ROOT` replaces the bucket of `s3://bucket/…`
//! and the first directory of `file://…` locations with ROOT, so sources
//! declared as `s3://lake/orders/` or `file://./lake/orders/` read
//! `ROOT/orders/`; `iceberg://` tables stay where their catalog says.
//!
//! Iceberg catalogs come from the ComputeClass the files give the
//! Segment's namespace (a `Namespace` labelled
//! `segmentation.dev/compute-class`, and that class), as the operator's
//! come from the cluster; a catalog's `tokenEnv` is read from this
//! machine's environment.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use segment_compute::compute;
use segment_compute::failure::WorkerError;
use segment_core::api::{Segment, SegmentKey, SegmentSource, SegmentSourceSpec, SourceFormat};
use segment_core::definition::definition_hash;
use segment_core::manifests::{self, Manifests};
use segment_core::naming::{job_name, JobKind};
use segment_core::planner::Launch;
use segment_core::reasons::SpecProblem;
use segment_core::rules_sql::{self, Dialect};
use segment_core::task::{compute_task, segment_inputs};
use segment_core::validation::{check_spec, Invalid};
use segment_store::results::ResultDir;

use crate::cli::PreviewArgs;
use crate::table::time;
use crate::{Output, PluginError};

/// The version number a preview's results are written as.
const PREVIEW_VERSION: u64 = 1;

/// One Segment previewed.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    pub segment: SegmentKey,
    /// `sql`, `rules` or `static`.
    pub kind: &'static str,
    pub snapshot_time: DateTime<Utc>,
    /// What the definition reads: `table orders (s3://…)`, `static list …`.
    pub reads: Vec<String>,
    /// The query a `rules` definition compiles to.
    pub compiled_sql: Option<String>,
    /// Segments the definition refers to, computed first, with their members.
    pub referenced: Vec<(String, u64)>,
    pub members: u64,
    /// The first member ids, in the order results keep them (sorted).
    pub sample: Vec<String>,
}

/// Why one Segment could not be previewed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreviewError {
    /// The operator's checks: the message its `Ready` condition would carry.
    #[error("{}: {}", .0.reason, .0)]
    Invalid(Invalid),
    /// The compute failed, with the reason a compute Job would report.
    #[error(transparent)]
    Compute(WorkerError),
    /// A referenced segment is missing, failed, or the references loop.
    #[error("{0}")]
    Reference(String),
    #[error("reading the result: {0}")]
    Result(String),
}

/// Every previewed Segment of the file, in file order.
pub type Previews = Vec<(SegmentKey, Result<Preview, PreviewError>)>;

/// `kubectl segment preview`: previews and renders.
pub async fn run(args: &PreviewArgs, now: DateTime<Utc>) -> Result<Output, PluginError> {
    Ok(render(&preview(args, now).await?))
}

/// Previews the Segments of `args.file` (or the one named). Fails as a
/// whole only when the manifests cannot be read; each Segment has its own
/// result otherwise.
pub async fn preview(args: &PreviewArgs, now: DateTime<Utc>) -> Result<Previews, PluginError> {
    let inputs = Inputs::load(args)?;
    let results = tempfile::tempdir().map_err(|e| PluginError::Input(format!("creating a temporary results directory: {e}")))?;
    let mut run = Run {
        inputs: &inputs,
        snapshot_time: args.snapshot_time.unwrap_or(now),
        results_base: format!("file://{}", results.path().display()),
        computed: HashMap::new(),
    };
    let mut out = Vec::new();
    for target in &inputs.targets {
        let key = target.key();
        let result = run.preview(target, args.limit).await;
        out.push((key, result));
    }
    Ok(out)
}

/// The manifests a preview reads, with locations resolved.
struct Inputs {
    /// The Segments to preview.
    targets: Vec<Segment>,
    /// Every Segment read, for references.
    segments: BTreeMap<SegmentKey, Segment>,
    sources: Manifests,
    /// Where Segments were looked for, for messages.
    searched: String,
}

impl Inputs {
    fn load(args: &PreviewArgs) -> Result<Inputs, PluginError> {
        let file_dir = directory_of(&args.file)?;
        let sources_path = args.sources.clone().unwrap_or_else(|| file_dir.clone());
        let sources_dir = directory_of(&sources_path)?;
        let lake = args.lake.as_deref().map(lake_root).transpose()?;
        let mut own = manifests::load(std::slice::from_ref(&args.file))?;
        let mut context = manifests::load(std::slice::from_ref(&sources_path))?;
        for (loaded, dir) in [(&mut own, &file_dir), (&mut context, &sources_dir)] {
            if let Some(lake) = &lake {
                point_at_lake(loaded, lake);
            }
            loaded.resolve_relative_uris(dir);
        }

        let file = args.file.display();
        let targets: Vec<Segment> = match &args.name {
            Some(name) => own.segments.iter().filter(|s| s.metadata.name.as_deref() == Some(name)).cloned().collect(),
            None => own.segments.clone(),
        };
        if targets.is_empty() {
            let names: Vec<&str> = own.segments.iter().filter_map(|s| s.metadata.name.as_deref()).collect();
            return Err(PluginError::Input(match &args.name {
                Some(name) if !names.is_empty() => {
                    format!("{file} has no Segment named \"{name}\" (it has: {})", names.join(", "))
                }
                _ => format!("{file} has no Segment (a document with kind: Segment)"),
            }));
        }

        // The file's own manifests win over what --sources holds.
        let mut segments = BTreeMap::new();
        for segment in context.segments.into_iter().chain(own.segments) {
            segments.insert(segment.key(), segment);
        }
        let mut sources: BTreeMap<(Option<String>, Option<String>), SegmentSource> = BTreeMap::new();
        for source in context.sources.into_iter().chain(own.sources) {
            sources.insert((source.metadata.namespace.clone(), source.metadata.name.clone()), source);
        }
        // ComputeClasses and Namespace labels: where Iceberg catalogs come from.
        let mut classes = BTreeMap::new();
        for class in context.classes.into_iter().chain(own.classes) {
            classes.insert(class.metadata.name.clone(), class);
        }
        let mut namespace_classes = context.namespace_classes;
        namespace_classes.extend(own.namespace_classes);
        let sources = Manifests {
            sources: sources.into_values().collect(),
            classes: classes.into_values().collect(),
            namespace_classes,
            ..Default::default()
        };
        Ok(Inputs { targets, segments, sources, searched: format!("{file} and {}", sources_path.display()) })
    }
}

/// The directory of a manifest file, or the directory itself.
fn directory_of(path: &Path) -> Result<PathBuf, PluginError> {
    let absolute = path.canonicalize().map_err(|e| PluginError::Input(format!("{}: {e}", path.display())))?;
    if absolute.is_dir() {
        return Ok(absolute);
    }
    Ok(absolute.parent().map(Path::to_path_buf).unwrap_or(absolute))
}

/// `--lake` as a URI prefix: kept when it is one, `file://<absolute>` for
/// a local directory.
pub fn lake_root(lake: &str) -> Result<String, PluginError> {
    if lake.contains("://") {
        return Ok(lake.trim_end_matches('/').to_string());
    }
    let path = Path::new(lake).canonicalize().map_err(|e| PluginError::Input(format!("--lake {lake}: {e}")))?;
    if !path.is_dir() {
        return Err(PluginError::Input(format!("--lake {lake}: not a directory")));
    }
    Ok(format!("file://{}", path.display()))
}

/// `uri` moved under the lake root: its bucket (`s3://bucket/…`) or first
/// directory (`file://./lake/…`, `file:///data/…`) becomes `root`.
pub fn rebase_on_lake(uri: &str, root: &str) -> String {
    let rest = uri.split_once("://").map(|(_, rest)| rest).unwrap_or(uri);
    let rest = rest.strip_prefix("./").or_else(|| rest.strip_prefix('/')).unwrap_or(rest);
    let below_top = rest.split_once('/').map(|(_, below)| below).unwrap_or("");
    format!("{}/{below_top}", root.trim_end_matches('/'))
}

fn point_at_lake(loaded: &mut Manifests, root: &str) {
    // An Iceberg table is wherever its catalog says, not under the lake.
    for source in loaded.sources.iter_mut().filter(|s| s.spec.format != SourceFormat::Iceberg) {
        source.spec.uri = rebase_on_lake(&source.spec.uri, root);
    }
    for segment in &mut loaded.segments {
        if let Some(list) = segment.spec.definition.static_list.as_mut() {
            list.uri = rebase_on_lake(&list.uri, root);
        }
    }
}

/// A computed Segment: where its result is and what it took.
#[derive(Debug, Clone)]
struct Computed {
    members: u64,
    results_uri: String,
    reads: Vec<String>,
    compiled_sql: Option<String>,
}

/// One preview invocation: every Segment is computed at most once.
struct Run<'a> {
    inputs: &'a Inputs,
    snapshot_time: DateTime<Utc>,
    results_base: String,
    computed: HashMap<SegmentKey, Result<Computed, PreviewError>>,
}

impl Run<'_> {
    async fn preview(&mut self, target: &Segment, limit: usize) -> Result<Preview, PreviewError> {
        let key = target.key();
        let sources = self.inputs.sources.sources_in(&key.namespace);
        // The target's own problems first: a broken definition is reported
        // as the operator reports it, whatever it refers to.
        check(target, &sources, self.snapshot_time)?;
        for dependency in self.order(&key)? {
            if !self.computed.contains_key(&dependency) {
                let result = self.compute(&self.inputs.segments[&dependency]).await;
                self.computed.insert(dependency, result);
            }
        }
        let computed = self.computed[&key].clone()?;
        let referenced = references(target)
            .into_iter()
            .map(|name| {
                let members = self.computed.get(&SegmentKey::new(&key.namespace, &name)).and_then(|r| r.as_ref().ok());
                (name, members.map(|c| c.members).unwrap_or(0))
            })
            .collect();
        Ok(Preview {
            kind: kind(target),
            segment: key,
            snapshot_time: self.snapshot_time,
            reads: computed.reads,
            compiled_sql: computed.compiled_sql,
            referenced,
            members: computed.members,
            sample: read_sample(&computed.results_uri, limit).await?,
        })
    }

    /// The Segments to compute for `target`, referenced ones first.
    fn order(&self, target: &SegmentKey) -> Result<Vec<SegmentKey>, PreviewError> {
        let mut order = Vec::new();
        self.visit(target, &mut Vec::new(), &mut order)?;
        Ok(order)
    }

    fn visit(&self, key: &SegmentKey, path: &mut Vec<SegmentKey>, order: &mut Vec<SegmentKey>) -> Result<(), PreviewError> {
        if order.contains(key) {
            return Ok(());
        }
        if let Some(start) = path.iter().position(|k| k == key) {
            let cycle: Vec<&str> = path[start..].iter().chain([key]).map(|k| k.name.as_str()).collect();
            return Err(PreviewError::Reference(format!("segments refer to each other in a cycle: {}", cycle.join(" → "))));
        }
        let segment = match self.inputs.segments.get(key) {
            Some(segment) => segment,
            None => {
                let referrer = path.last().map(|k| k.name.as_str()).unwrap_or_default();
                return Err(PreviewError::Reference(format!(
                    "segment \"{referrer}\" refers to segment \"{}\", which is not among the Segment manifests in {} \
                     (namespace {}); preview computes referenced segments from their manifests",
                    key.name, self.inputs.searched, key.namespace
                )));
            }
        };
        path.push(key.clone());
        for name in references(segment) {
            self.visit(&SegmentKey::new(&key.namespace, name), path, order)?;
        }
        path.pop();
        order.push(key.clone());
        Ok(())
    }

    /// Checks and computes one Segment whose references are computed.
    async fn compute(&self, segment: &Segment) -> Result<Computed, PreviewError> {
        let key = segment.key();
        for name in references(segment) {
            if let Some(Err(e)) = self.computed.get(&SegmentKey::new(&key.namespace, &name)) {
                return Err(PreviewError::Reference(format!(
                    "segment \"{}\" refers to segment \"{name}\", which failed: {e}",
                    key.name
                )));
            }
        }
        let sources = self.inputs.sources.sources_in(&key.namespace);
        let (reads, compiled_sql) = check(segment, &sources, self.snapshot_time)?;
        let launch = Launch {
            kind: JobKind::Compute,
            version: PREVIEW_VERSION,
            job_name: job_name(&key.name, PREVIEW_VERSION, JobKind::Compute),
            snapshot_time: self.snapshot_time,
            definition_hash: definition_hash(&segment.spec.definition),
            generation: segment.metadata.generation.unwrap_or(1),
        };
        let active_of = |name: &str| {
            let computed = self.computed.get(&SegmentKey::new(&key.namespace, name));
            computed.is_some_and(|r| r.is_ok()).then_some(PREVIEW_VERSION)
        };
        let inputs = segment_inputs(segment, &self.results_base, active_of);
        let task = compute_task(segment, &launch, sources, inputs, &self.results_base);
        let task = self.inputs.sources.with_iceberg_access(task, &self.results_base).map_err(PreviewError::Invalid)?;
        let report = compute::run(&task).await.map_err(PreviewError::Compute)?;
        Ok(Computed { members: report.members, results_uri: task.results_uri, reads, compiled_sql })
    }
}

/// The operator's checks, and what the definition reads; for rules, the
/// query they compile to, in the SQL of the Segment's engine (Spark's has
/// the snapshot time written in).
fn check(
    segment: &Segment,
    sources: &[SegmentSourceSpec],
    snapshot_time: DateTime<Utc>,
) -> Result<(Vec<String>, Option<String>), PreviewError> {
    let tables: Vec<String> = sources.iter().map(|s| s.table.clone()).collect();
    let checked = check_spec(&segment.spec, Some(&tables)).map_err(PreviewError::Invalid)?;
    let definition = &segment.spec.definition;
    let engine = segment.spec.compute.as_ref().map(|c| c.engine).unwrap_or_default();
    let compiled_sql = match &definition.rules {
        Some(rule) => Some(rules_sql::compile_for(rule, sources, Dialect::of(engine, snapshot_time)).map_err(|e| {
            PreviewError::Invalid(Invalid { reason: SpecProblem::InvalidDefinition, field: e.field, message: e.message })
        })?),
        None => None,
    };
    let mut reads: Vec<String> = checked
        .refs
        .tables
        .iter()
        .map(|table| match sources.iter().find(|s| s.table.eq_ignore_ascii_case(table)) {
            Some(source) => format!("table {} ({})", source.table, source.uri),
            None => format!("table {table}"),
        })
        .collect();
    if let Some(list) = &definition.static_list {
        reads.push(format!("static list {}", list.uri));
    }
    Ok((reads, compiled_sql))
}

/// Names of the segments a definition refers to, sorted.
fn references(segment: &Segment) -> Vec<String> {
    segment.spec.definition.rules.iter().flat_map(|r| r.segment_refs()).map(str::to_string).collect()
}

fn kind(segment: &Segment) -> &'static str {
    let definition = &segment.spec.definition;
    if definition.sql.is_some() {
        "sql"
    } else if definition.rules.is_some() {
        "rules"
    } else {
        "static"
    }
}

/// The first `limit` ids of a result, each part verified as ingest does.
async fn read_sample(results_uri: &str, limit: usize) -> Result<Vec<String>, PreviewError> {
    let failed = |e: &dyn std::fmt::Display| PreviewError::Result(format!("{results_uri}: {e}"));
    let dir = ResultDir::open(results_uri).map_err(|e| failed(&e))?;
    let manifest = dir.read_manifest().await.map_err(|e| failed(&e))?.ok_or_else(|| failed(&"no manifest"))?;
    let mut sample = Vec::new();
    for part in &manifest.parts {
        if sample.len() >= limit {
            break;
        }
        let bytes = dir.read_part(part).await.map_err(|e| failed(&e))?;
        let ids = part.decode(&bytes).map_err(|e| failed(&e))?;
        let wanted = limit - sample.len();
        sample.extend(ids.into_iter().take(wanted).map(str::to_string));
    }
    Ok(sample)
}

/// Previews on stdout, one block per Segment; failures on stderr.
pub fn render(previews: &Previews) -> Output {
    let mut out = Output { success: true, ..Default::default() };
    for (key, result) in previews {
        match result {
            Ok(preview) => {
                if !out.stdout.is_empty() {
                    out.stdout.push('\n');
                }
                out.stdout.push_str(&render_one(preview));
            }
            Err(e) => {
                out.success = false;
                let _ = writeln!(out.stderr, "error: {key}: {e}");
            }
        }
    }
    out
}

fn render_one(p: &Preview) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "segment {}: {}, snapshot time {}", p.segment, p.kind, time(p.snapshot_time));
    if !p.reads.is_empty() {
        let _ = writeln!(out, "reads {}", p.reads.join(", "));
    }
    if !p.referenced.is_empty() {
        let named: Vec<String> = p.referenced.iter().map(|(name, members)| format!("{name} ({members} members)")).collect();
        let _ = writeln!(out, "refers to segments {} (computed first, same snapshot time)", named.join(", "));
    }
    if let Some(sql) = &p.compiled_sql {
        let _ = writeln!(out, "compiled SQL:\n  {sql}");
    }
    let _ = writeln!(out, "members: {}", p.members);
    if !p.sample.is_empty() {
        let which = if p.sample.len() as u64 == p.members { "all" } else { "first" };
        let _ = writeln!(out, "{which} {}:", p.sample.len());
        for id in &p.sample {
            let _ = writeln!(out, "  {id}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lake_replaces_the_bucket_or_the_top_directory() {
        let root = "file:///tmp/sample";
        assert_eq!(rebase_on_lake("s3://lake/orders/", root), "file:///tmp/sample/orders/");
        assert_eq!(rebase_on_lake("file://./lake/orders/", root), "file:///tmp/sample/orders/");
        assert_eq!(rebase_on_lake("file://./lake/lists/vip.csv", root), "file:///tmp/sample/lists/vip.csv");
        assert_eq!(
            rebase_on_lake("file:///data/events/2025-*/part-*.ndjson", root),
            "file:///tmp/sample/events/2025-*/part-*.ndjson"
        );
        assert_eq!(rebase_on_lake("s3://uploads/vip.csv", "s3://sample/v1/"), "s3://sample/v1/vip.csv");
        assert_eq!(lake_root("s3://sample/v1/").unwrap(), "s3://sample/v1");
        let missing = lake_root("/no/such/lake").unwrap_err().to_string();
        assert!(missing.starts_with("--lake /no/such/lake: "), "{missing}");
    }
}
