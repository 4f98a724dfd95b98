//! The serving API (docs/serving.md): which segments a user is in,
//! membership checks and version listings over HTTP/JSON, answered from
//! the active versions' index files held in memory. Routes, switching
//! versions and failure behaviour: docs/serving.md.
//!
//! The binary (`segment-serving`) is a thin shell around [`Server`] (a
//! thread per core, each with its own store connection); the operator's
//! standalone mode serves the same [`router`] from its embedded store.
//!
//! - `api`: the routes and the OpenAPI document, from one list;
//! - `auth`: bearer tokens scoped to namespaces;
//! - `cache`: the version listings' cache, dropped on notices;
//! - `connection`: one API connection under the header-read and idle timeouts;
//! - `error`: the JSON error body and its reasons;
//! - `indexes`: serving from index files: where they come from, a
//!   version held in memory, the realtime overrides on top;
//! - `metrics`: request and store metrics;
//! - `shard`: which users a replica holds when the users are sharded;
//! - `server`: a thread per core, each with its own runtime and store
//!   connection, under the connection limit; `/metrics` on its own port;
//! - `state`: the shared state: the versions held, the alias map, the
//!   overrides, and the task following the store's notices.

mod api;
mod auth;
mod cache;
mod connection;
mod error;
mod indexes;
mod metrics;
mod server;
mod shard;
mod state;

use std::time::Duration;

pub use api::{max_body_bytes, metrics_router, openapi, router};
pub use auth::{Access, Tokens, TokensError};
pub use error::{ApiError, ErrorBody};
pub use indexes::{holding, IndexOptions, IndexSource, LoadedVersion, ResultFiles};
pub use metrics::Metrics;
pub use server::{connect_redis, ConnectionLimits, ServeError, Server, ServerOptions, THREAD_NAME_PREFIX};
pub use shard::Shard;
pub use state::AppState;

use segment_core::store::{MembershipReader, ReplicaRegistry, RolloverFeed, SegmentStore};

/// What serving needs from a store: reads, version listings, notices and
/// the replicas' load reports. Both `MemoryStore` and `RedisStore` are one.
pub trait ServingStore: SegmentStore + MembershipReader + RolloverFeed + ReplicaRegistry {}

impl<T: SegmentStore + MembershipReader + RolloverFeed + ReplicaRegistry + ?Sized> ServingStore for T {}

/// How a replica serves: where its index files come from, and its
/// tunables. [`ServingConfig::new`] gives what the binary starts with.
#[derive(Debug, Clone)]
pub struct ServingConfig {
    /// Where the versions' index files come from and this replica's name.
    pub index: IndexOptions,
    /// How long a version listing (the versions route) may be served from
    /// cache. Notices drop stale listings sooner.
    pub cache_ttl: Duration,
    /// Version listings cached; 0 turns the cache off.
    pub cache_capacity: u64,
    /// Deadline of every store call; past it a request that needs the
    /// store (the versions route) gets a 503.
    pub store_timeout: Duration,
    /// Deadline of subscribing to notices.
    pub subscribe_timeout: Duration,
    /// How often the aliases and load requests are re-read even without
    /// notices, and the liveness report renewed.
    pub refresh_interval: Duration,
    /// Most (namespace, segment, user) triples one `membership:check` takes.
    pub max_checks: usize,
    /// Bearer tokens and the namespaces each may read; `None` turns auth off.
    pub tokens: Option<Tokens>,
}

impl ServingConfig {
    pub fn new(index: IndexOptions) -> ServingConfig {
        ServingConfig {
            index,
            cache_ttl: Duration::from_secs(2),
            cache_capacity: 10_000,
            store_timeout: Duration::from_millis(250),
            subscribe_timeout: Duration::from_secs(2),
            refresh_interval: Duration::from_secs(5),
            max_checks: 1000,
            tokens: None,
        }
    }
}

pub use segment_core::store::MAX_USER_LEN;
