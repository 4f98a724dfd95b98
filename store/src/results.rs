//! Result files in object storage (layout in `segment_core::manifest`):
//! writing parts and the manifest (compute), reading and verifying them
//! and writing the verdict, `_seal.json` (ingest), reading the verdict back
//! and collecting expired results (the operator).

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use segment_core::api::SegmentKey;
use segment_core::index::{self, IdSet, IdSetWriter, INDEX_FILE};
use segment_core::manifest::{checksum, encode_part, index_checksum, part_file, Manifest, Part, ResultError, MANIFEST_FILE};
use segment_core::naming::results_uri;
use segment_core::seal::{SealFile, SEAL_FILE};
use segment_core::store::{Cause, IndexSource, ResultStore, StoreError};

use crate::objects::{child, locate, Location, ObjectsError};

#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error(transparent)]
    Location(#[from] ObjectsError),
    #[error("{path}: {source}")]
    Io { path: String, source: object_store::Error },
    #[error("{path}: not a valid manifest: {message}")]
    BadManifest { path: String, message: String },
}

impl From<ResultsError> for StoreError {
    fn from(e: ResultsError) -> StoreError {
        StoreError::Unavailable(Cause::new("result files", e))
    }
}

/// Why a version's members could not be had from its files.
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    /// A file could not be read: perhaps only for now.
    #[error(transparent)]
    Unreadable(#[from] ResultsError),
    /// A file is not what the manifest says it is: every read will fail
    /// the same way.
    #[error(transparent)]
    Invalid(#[from] ResultError),
}

fn io(path: &Path) -> impl FnOnce(object_store::Error) -> ResultsError + '_ {
    move |source| ResultsError::Io { path: path.to_string(), source }
}

/// The directory of one version's results.
#[derive(Clone, Debug)]
pub struct ResultDir {
    location: Location,
}

impl ResultDir {
    pub fn open(uri: &str) -> Result<ResultDir, ResultsError> {
        Ok(ResultDir { location: locate(uri)? })
    }

    fn path(&self, file: &str) -> Path {
        child(&self.location.path, file)
    }

    /// Writes part `index` and returns its manifest entry.
    pub async fn write_part<'a>(&self, index: usize, users: impl IntoIterator<Item = &'a str>) -> Result<Part, ResultsError> {
        let bytes = encode_part(users);
        let members = bytes.iter().filter(|b| **b == b'\n').count() as u64;
        let part = Part { file: part_file(index), members, checksum: checksum(&bytes) };
        let path = self.path(&part.file);
        self.location.store.put(&path, PutPayload::from(bytes)).await.map_err(io(&path))?;
        Ok(part)
    }

    /// Writes the members' index file (bytes from
    /// [`segment_core::index::IdSetWriter`]) and returns its manifest entry.
    pub async fn write_index(&self, bytes: Vec<u8>, members: u64) -> Result<Part, ResultsError> {
        let path = self.path(INDEX_FILE);
        let checksum = index_checksum(&bytes)
            .ok_or_else(|| ResultsError::BadManifest { path: path.to_string(), message: "not an index file".into() })?;
        let index = Part { file: INDEX_FILE.to_string(), members, checksum };
        self.location.store.put(&path, PutPayload::from(bytes)).await.map_err(io(&path))?;
        Ok(index)
    }

    /// The raw bytes of the index file; verify them with [`Part::open_index`].
    ///
    /// Read straight into one buffer of the file's size: a replica keeps
    /// this buffer as the version's members, and a read that grows (or is
    /// copied) leaves freed memory of about the same size behind in the
    /// allocator, which counted for 3.5 bytes per membership in the serving
    /// benchmark (docs/benchmarks.md).
    pub async fn read_index(&self, index: &Part) -> Result<Vec<u8>, ResultsError> {
        let path = self.path(&index.file);
        let found = self.location.store.get(&path).await.map_err(io(&path))?;
        let mut bytes = Vec::with_capacity(usize::try_from(found.meta.size).unwrap_or(0));
        let mut chunks = found.into_stream();
        while let Some(chunk) = chunks.try_next().await.map_err(io(&path))? {
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// The version's members as an index: its index file, checked against
    /// the manifest, or for a result written before index files, an index
    /// built from its parts, each checked against the manifest. So a
    /// version computed before an upgrade is served, diffed and compared
    /// with without being computed again.
    pub async fn read_members(&self, manifest: &Manifest) -> Result<IdSet, MembersError> {
        if let Some(index) = &manifest.index {
            let bytes = self.read_index(index).await?;
            return Ok(index.open_index(bytes)?);
        }
        // A part at a time while the ids come in order, as compute writes
        // them, so only one part's text is held; if they do not, every part
        // is read again, whole, and sorted (results of some older writer).
        let mut writer = IdSetWriter::new();
        for part in &manifest.parts {
            let bytes = self.read_part(part).await?;
            for id in part.decode(&bytes)? {
                if writer.push(id).is_err() {
                    return self.members_sorted(manifest).await;
                }
            }
        }
        open_built(writer.finish())
    }

    /// Every part's ids, sorted, as an index.
    async fn members_sorted(&self, manifest: &Manifest) -> Result<IdSet, MembersError> {
        let mut parts = Vec::with_capacity(manifest.parts.len());
        for part in &manifest.parts {
            parts.push((part, self.read_part(part).await?));
        }
        let mut ids = Vec::new();
        for (part, bytes) in &parts {
            ids.extend(part.decode(bytes)?);
        }
        let built = index::build(ids).map_err(|e| ResultError::Manifest(format!("the parts' ids: {e}")))?;
        open_built(built)
    }

    /// Writes the manifest; call it after every part is written.
    pub async fn write_manifest(&self, manifest: &Manifest) -> Result<(), ResultsError> {
        let path = self.path(MANIFEST_FILE);
        let body = serde_json::to_vec_pretty(manifest)
            .map_err(|e| ResultsError::BadManifest { path: path.to_string(), message: e.to_string() })?;
        self.location.store.put(&path, PutPayload::from(body)).await.map_err(io(&path))?;
        Ok(())
    }

    /// The manifest, or `None` when there is none (no result).
    pub async fn read_manifest(&self) -> Result<Option<Manifest>, ResultsError> {
        let path = self.path(MANIFEST_FILE);
        let bytes = match self.location.store.get(&path).await {
            Ok(found) => found.bytes().await.map_err(io(&path))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| ResultsError::BadManifest { path: path.to_string(), message: e.to_string() })?;
        manifest.validate().map_err(|e| ResultsError::BadManifest { path: path.to_string(), message: e.to_string() })?;
        Ok(Some(manifest))
    }

    /// Writes ingest's verdict on the version ([`SEAL_FILE`]); call it last.
    pub async fn write_seal(&self, seal: &SealFile) -> Result<(), ResultsError> {
        let path = self.path(SEAL_FILE);
        self.location.store.put(&path, PutPayload::from(seal.to_bytes())).await.map_err(io(&path))?;
        Ok(())
    }

    /// The bytes of the seal file, `None` when there is none; judge them
    /// with [`segment_core::seal::judge`].
    pub async fn read_seal(&self) -> Result<Option<Vec<u8>>, ResultsError> {
        let path = self.path(SEAL_FILE);
        match self.location.store.get(&path).await {
            Ok(found) => Ok(Some(found.bytes().await.map_err(io(&path))?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The raw bytes of a part; verify them with [`Part::decode`].
    pub async fn read_part(&self, part: &Part) -> Result<Bytes, ResultsError> {
        let path = self.path(&part.file);
        let found = self.location.store.get(&path).await.map_err(io(&path))?;
        found.bytes().await.map_err(io(&path))
    }

    /// Deletes every file of the directory, manifest first so that a
    /// half-deleted result reads as no result at all.
    pub async fn delete(&self) -> Result<(), ResultsError> {
        delete_prefix(&self.location.store, &self.location.path).await
    }
}

/// Opens an index just built from checked parts.
fn open_built(bytes: Vec<u8>) -> Result<IdSet, MembersError> {
    Ok(IdSet::open(bytes).map_err(|e| ResultError::Manifest(format!("the index built from the parts: {e}")))?)
}

async fn delete_prefix(store: &std::sync::Arc<dyn ObjectStore>, prefix: &Path) -> Result<(), ResultsError> {
    let mut paths: Vec<Path> = store.list(Some(prefix)).map_ok(|meta| meta.location).try_collect().await.map_err(io(prefix))?;
    paths.sort_by_key(|p| !p.as_ref().ends_with(MANIFEST_FILE));
    for path in paths {
        match store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    Ok(())
}

/// The results of every segment under one base URI, as the operator's
/// retention sees them.
#[derive(Clone, Debug)]
pub struct ObjectResults {
    base: String,
    /// The store under `base`, opened on first use and then shared:
    /// opening an S3 store builds an HTTP client, which reads the system's
    /// CA certificates from disk, far too costly to do for each Segment.
    opened: Arc<OnceLock<Location>>,
}

impl ObjectResults {
    pub fn new(base: impl Into<String>) -> ObjectResults {
        ObjectResults { base: base.into(), opened: Default::default() }
    }

    fn segment_location(&self, segment: &SegmentKey) -> Result<Location, ResultsError> {
        let base = match self.opened.get() {
            Some(base) => base,
            None => {
                let opened = locate(&self.base)?;
                self.opened.get_or_init(|| opened)
            }
        };
        let path = child(&child(&base.path, &segment.namespace), &segment.name);
        Ok(Location { store: base.store.clone(), path, root: base.root.clone() })
    }

    /// Versions with result files, with the time they were computed (the
    /// manifest's `computedAt`, or the newest file when there is none).
    pub async fn versions(&self, segment: &SegmentKey) -> Result<Vec<(u64, DateTime<Utc>)>, ResultsError> {
        let location = self.segment_location(segment)?;
        let listing = location.store.list_with_delimiter(Some(&location.path)).await.map_err(io(&location.path))?;
        let mut out = Vec::new();
        for prefix in listing.common_prefixes {
            let Some(version) = prefix.filename().and_then(|n| n.strip_prefix('v')).and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let manifest_path = child(&prefix, MANIFEST_FILE);
            let computed_at = match location.store.get(&manifest_path).await {
                Ok(found) => {
                    let bytes = found.bytes().await.map_err(io(&manifest_path))?;
                    serde_json::from_slice::<Manifest>(&bytes).ok().map(|m| m.computed_at)
                }
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => return Err(io(&manifest_path)(e)),
            };
            let computed_at = match computed_at {
                Some(t) => t,
                None => {
                    let newest = location
                        .store
                        .list(Some(&prefix))
                        .map_ok(|m| Some(m.last_modified))
                        .try_fold(None, |a, b| async move { Ok(a.max(b)) })
                        .await
                        .map_err(io(&prefix))?;
                    // A local directory whose files were all deleted stays
                    // behind as an empty directory: no version there.
                    let Some(newest) = newest else { continue };
                    newest
                }
            };
            out.push((version, computed_at));
        }
        out.sort_unstable();
        Ok(out)
    }
}

#[async_trait]
impl ResultStore for ObjectResults {
    async fn collect(&self, segment: &SegmentKey, older_than: DateTime<Utc>, keep: &[u64]) -> Result<usize, StoreError> {
        let location = self.segment_location(segment)?;
        let mut removed = 0;
        for (version, computed_at) in self.versions(segment).await? {
            if keep.contains(&version) || computed_at >= older_than {
                continue;
            }
            delete_prefix(&location.store, &child(&location.path, &format!("v{version}"))).await?;
            removed += 1;
        }
        Ok(removed)
    }

    async fn delete_segment(&self, segment: &SegmentKey) -> Result<(), StoreError> {
        let location = self.segment_location(segment)?;
        Ok(delete_prefix(&location.store, &location.path).await?)
    }

    async fn seal_file(&self, segment: &SegmentKey, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let dir = ResultDir::open(&results_uri(&self.base, segment, version))?;
        Ok(dir.read_seal().await?)
    }
}

/// The index files next to each version's result parts, under the results
/// base the operator writes to (`<base>/<namespace>/<name>/v<version>/`).
/// Readers (serving replicas, the realtime worker) need read access only.
#[derive(Debug, Clone)]
pub struct ResultFiles {
    base: String,
}

impl ResultFiles {
    pub fn new(base: impl Into<String>) -> ResultFiles {
        ResultFiles { base: base.into() }
    }
}

#[async_trait]
impl IndexSource for ResultFiles {
    async fn fetch(&self, segment: &SegmentKey, version: u64) -> Result<IdSet, StoreError> {
        let uri = results_uri(&self.base, segment, version);
        let unreadable = |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("reading {uri}: {e}").into());
        let dir = ResultDir::open(&uri).map_err(|e| StoreError::Other(format!("{uri}: {e}").into()))?;
        let manifest = dir.read_manifest().await.map_err(|e| unreadable(&e))?;
        let manifest = manifest.ok_or_else(|| StoreError::MissingVersion { segment: segment.to_string(), version })?;
        dir.read_members(&manifest).await.map_err(|e| match e {
            MembersError::Unreadable(e) => unreadable(&e),
            MembersError::Invalid(e) => StoreError::Other(format!("{uri}: {e}").into()),
        })
    }
}
