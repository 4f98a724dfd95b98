//! The Redis store. Key layout and memory cost: docs/storage.md.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use segment_core::api::SegmentKey;
use segment_core::store::{DiffPage, MembershipReader, Override, SegmentStore, StoreError, StoredVersion};

/// A connection to one Redis server or a Redis Cluster.
#[derive(Clone)]
pub struct RedisStore {
    _private: (),
}

impl RedisStore {
    /// `redis://host:port[/db]` for one server, `redis+cluster://host:port,host:port` for a cluster.
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        Err(StoreError::Unavailable(format!("{url}: the Redis store is being written")))
    }
}

#[async_trait]
impl SegmentStore for RedisStore {
    async fn active_version(&self, _: &SegmentKey) -> Result<Option<u64>, StoreError> {
        unimplemented!()
    }
    async fn versions(&self, _: &SegmentKey) -> Result<BTreeMap<u64, StoredVersion>, StoreError> {
        unimplemented!()
    }
    async fn change_count(&self, _: &SegmentKey, _: u64, _: u64) -> Result<u64, StoreError> {
        unimplemented!()
    }
    async fn activate(&self, _: &SegmentKey, _: u64) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn delete_version(&self, _: &SegmentKey, _: u64) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn delete_segment(&self, _: &SegmentKey) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn load_members(&self, _: &SegmentKey, _: u64, _: &[String]) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn seal_version(
        &self,
        _: &SegmentKey,
        _: u64,
        _: Option<DateTime<Utc>>,
        _: Option<&str>,
    ) -> Result<StoredVersion, StoreError> {
        unimplemented!()
    }
    async fn record_override(&self, _: &SegmentKey, _: &Override) -> Result<bool, StoreError> {
        unimplemented!()
    }
    async fn overrides_since(&self, _: &SegmentKey, _: DateTime<Utc>) -> Result<Vec<Override>, StoreError> {
        unimplemented!()
    }
    async fn apply_overrides(&self, _: &SegmentKey, _: u64, _: &[Override]) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn diff_page(&self, _: &SegmentKey, _: u64, _: u64, _: Option<&str>, _: usize) -> Result<DiffPage, StoreError> {
        unimplemented!()
    }
}

#[async_trait]
impl MembershipReader for RedisStore {
    async fn aliases(&self) -> Result<BTreeMap<SegmentKey, u64>, StoreError> {
        unimplemented!()
    }
    async fn user_versions(&self, _: &str) -> Result<Vec<(SegmentKey, u64)>, StoreError> {
        unimplemented!()
    }
    async fn is_member(&self, _: &SegmentKey, _: u64, _: &str) -> Result<bool, StoreError> {
        unimplemented!()
    }
    async fn check(&self, _: &[(SegmentKey, u64, String)]) -> Result<Vec<bool>, StoreError> {
        unimplemented!()
    }
}
