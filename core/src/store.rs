//! The edges the lifecycle reaches through: the membership store (Redis in
//! production, in-process in standalone mode) and the result files in
//! object storage. The operator needs only the operations here; both stay
//! behind traits so the lifecycle is plain Rust that tests drive directly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::api::SegmentKey;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("version {version} of {segment} is not loaded")]
    MissingVersion { segment: String, version: u64 },
    #[error("store error: {0}")]
    Other(String),
}

/// A fully loaded version as the store records it. Ingest writes this last,
/// so a version the store lists is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub members: u64,
    pub snapshot_time: Option<DateTime<Utc>>,
    pub definition_hash: Option<String>,
}

/// The lifecycle operations on the membership store.
#[async_trait]
pub trait SegmentStore: Send + Sync {
    /// The version readers see now.
    async fn active_version(&self, segment: &SegmentKey) -> Result<Option<u64>, StoreError>;
    /// Every complete version held for the segment.
    async fn versions(&self, segment: &SegmentKey) -> Result<BTreeMap<u64, StoredVersion>, StoreError>;
    /// Users in exactly one of the two versions (entered plus exited).
    async fn change_count(&self, segment: &SegmentKey, from: u64, to: u64) -> Result<u64, StoreError>;
    /// Switches readers to `version` in one atomic step and notifies caches.
    async fn activate(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError>;
    /// Removes a version incrementally; a missing version is not an error.
    async fn delete_version(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError>;
    /// Removes everything the store holds for the segment.
    async fn delete_segment(&self, segment: &SegmentKey) -> Result<(), StoreError>;
}

/// Result files in object storage.
#[async_trait]
pub trait ResultStore: Send + Sync {
    /// Deletes the result files of versions computed before `older_than`,
    /// except those in `keep`. Returns how many versions were removed.
    async fn collect(&self, segment: &SegmentKey, older_than: DateTime<Utc>, keep: &[u64]) -> Result<usize, StoreError>;
    /// Deletes every result file of the segment.
    async fn delete_segment(&self, segment: &SegmentKey) -> Result<(), StoreError>;
}

#[derive(Default, Debug, Clone)]
struct SegmentData {
    active: Option<u64>,
    versions: BTreeMap<u64, (StoredVersion, BTreeSet<String>)>,
}

/// The embedded store: everything in process memory. It backs standalone
/// mode and is the store the lifecycle tests run against.
#[derive(Default, Debug)]
pub struct MemoryStore {
    segments: Mutex<HashMap<SegmentKey, SegmentData>>,
    unavailable: Mutex<bool>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads a complete version (what a successful ingest leaves behind).
    pub fn load_version(
        &self,
        segment: &SegmentKey,
        version: u64,
        members: impl IntoIterator<Item = String>,
        snapshot_time: Option<DateTime<Utc>>,
        definition_hash: Option<String>,
    ) {
        let members: BTreeSet<String> = members.into_iter().collect();
        let meta = StoredVersion { members: members.len() as u64, snapshot_time, definition_hash };
        self.with(|all| all.entry(segment.clone()).or_default().versions.insert(version, (meta, members)));
    }

    /// Members of the active version, as a reader would see them.
    pub fn active_members(&self, segment: &SegmentKey) -> Option<BTreeSet<String>> {
        self.with(|all| {
            let data = all.get(segment)?;
            data.versions.get(&data.active?).map(|(_, m)| m.clone())
        })
    }

    /// Makes every call fail as if the store were down, or brings it back.
    pub fn set_unavailable(&self, down: bool) {
        *self.unavailable.lock().unwrap_or_else(|e| e.into_inner()) = down;
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<SegmentKey, SegmentData>) -> T) -> T {
        f(&mut self.segments.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn check(&self) -> Result<(), StoreError> {
        if *self.unavailable.lock().unwrap_or_else(|e| e.into_inner()) {
            Err(StoreError::Unavailable("embedded store switched off".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl SegmentStore for MemoryStore {
    async fn active_version(&self, segment: &SegmentKey) -> Result<Option<u64>, StoreError> {
        self.check()?;
        Ok(self.with(|all| all.get(segment).and_then(|d| d.active)))
    }

    async fn versions(&self, segment: &SegmentKey) -> Result<BTreeMap<u64, StoredVersion>, StoreError> {
        self.check()?;
        Ok(self.with(|all| {
            all.get(segment).map(|d| d.versions.iter().map(|(v, (meta, _))| (*v, meta.clone())).collect()).unwrap_or_default()
        }))
    }

    async fn change_count(&self, segment: &SegmentKey, from: u64, to: u64) -> Result<u64, StoreError> {
        self.check()?;
        self.with(|all| {
            let data = all.get(segment);
            let get = |v: u64| {
                data.and_then(|d| d.versions.get(&v))
                    .map(|(_, m)| m)
                    .ok_or(StoreError::MissingVersion { segment: segment.to_string(), version: v })
            };
            let (a, b) = (get(from)?, get(to)?);
            Ok(a.symmetric_difference(b).count() as u64)
        })
    }

    async fn activate(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError> {
        self.check()?;
        self.with(|all| {
            let data = all.entry(segment.clone()).or_default();
            if !data.versions.contains_key(&version) {
                return Err(StoreError::MissingVersion { segment: segment.to_string(), version });
            }
            data.active = Some(version);
            Ok(())
        })
    }

    async fn delete_version(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError> {
        self.check()?;
        self.with(|all| {
            if let Some(data) = all.get_mut(segment) {
                data.versions.remove(&version);
                if data.active == Some(version) {
                    data.active = None;
                }
            }
        });
        Ok(())
    }

    async fn delete_segment(&self, segment: &SegmentKey) -> Result<(), StoreError> {
        self.check()?;
        self.with(|all| all.remove(segment));
        Ok(())
    }
}

/// Result files kept in memory: which versions have results and when they
/// were computed. Backs standalone mode's bookkeeping and the tests.
#[derive(Default, Debug)]
pub struct MemoryResults {
    versions: Mutex<HashMap<SegmentKey, BTreeMap<u64, DateTime<Utc>>>>,
}

impl MemoryResults {
    pub fn record(&self, segment: &SegmentKey, version: u64, computed_at: DateTime<Utc>) {
        self.lock().entry(segment.clone()).or_default().insert(version, computed_at);
    }

    pub fn versions(&self, segment: &SegmentKey) -> Vec<u64> {
        self.lock().get(segment).map(|m| m.keys().copied().collect()).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SegmentKey, BTreeMap<u64, DateTime<Utc>>>> {
        self.versions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ResultStore for MemoryResults {
    async fn collect(&self, segment: &SegmentKey, older_than: DateTime<Utc>, keep: &[u64]) -> Result<usize, StoreError> {
        let mut all = self.lock();
        let Some(versions) = all.get_mut(segment) else {
            return Ok(0);
        };
        let before = versions.len();
        versions.retain(|v, computed_at| keep.contains(v) || *computed_at >= older_than);
        Ok(before - versions.len())
    }

    async fn delete_segment(&self, segment: &SegmentKey) -> Result<(), StoreError> {
        self.lock().remove(segment);
        Ok(())
    }
}
