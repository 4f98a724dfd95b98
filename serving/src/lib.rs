//! The serving API (docs/serving.md): which segments a user is in,
//! membership checks and version listings over HTTP/JSON, answered from an
//! in-process cache in front of the store. Routes, caching and failure
//! behaviour: docs/serving.md.
//!
//! The binary (`segment-serving`) is a thin shell around [`Server`] (a
//! thread per core, each with its own store connection); the operator's
//! standalone mode serves the same [`router`] from its embedded store.
//!
//! - `api`: the routes and the OpenAPI document, from one list;
//! - `auth`: bearer tokens scoped to namespaces;
//! - `cache`: the caches in front of the store, dropped on rollover notices;
//! - `connection`: one API connection under the header-read and idle timeouts;
//! - `error`: the JSON error body and its reasons;
//! - `indexes`: serving from index files: where they come from, a
//!   version held in memory, the realtime overrides on top;
//! - `metrics`: request and store metrics;
//! - `server`: a thread per core, each with its own runtime and store
//!   connection, under the connection limit; `/metrics` on its own port;
//! - `state`: the shared state: store, caches, alias map.

mod api;
mod auth;
mod cache;
mod connection;
mod error;
mod indexes;
mod metrics;
mod server;
mod state;

use std::time::Duration;

pub use api::{max_body_bytes, metrics_router, openapi, router};
pub use auth::{Access, Tokens, TokensError};
pub use error::{ApiError, ErrorBody};
pub use indexes::{IndexOptions, IndexSource, LoadedVersion, ResultFiles};
pub use metrics::Metrics;
pub use server::{connect_redis, ConnectionLimits, ServeError, Server, ServerOptions};
pub use state::AppState;

use segment_core::store::{MembershipReader, ReplicaRegistry, RolloverFeed, SegmentStore};

/// What serving needs from a store: reads, version listings, notices and
/// the replicas' load reports. Both `MemoryStore` and `RedisStore` are one.
pub trait ServingStore: SegmentStore + MembershipReader + RolloverFeed + ReplicaRegistry {}

impl<T: SegmentStore + MembershipReader + RolloverFeed + ReplicaRegistry + ?Sized> ServingStore for T {}

/// Tunables of the serving API; [`Default`] is what the binary starts with.
#[derive(Debug, Clone)]
pub struct ServingConfig {
    /// How long a cached answer may be served. Rollover notices drop
    /// stale entries sooner; the TTL bounds what realtime overrides and
    /// missed notices can leave stale.
    pub cache_ttl: Duration,
    /// Entries per cache (users, memberships, version lists); 0 turns
    /// caching off.
    pub cache_capacity: u64,
    /// Deadline of every store call; past it the request is answered from
    /// cache or gets a 503.
    pub store_timeout: Duration,
    /// Deadline of subscribing to rollover notices.
    pub subscribe_timeout: Duration,
    /// How often the alias map is re-read even without notices.
    pub refresh_interval: Duration,
    /// Most (namespace, segment, user) triples one `membership:check` takes.
    pub max_checks: usize,
    /// Bearer tokens and the namespaces each may read; `None` turns auth off.
    pub tokens: Option<Tokens>,
    /// Serve from each active version's index file held in memory
    /// (`None`: from the store's per-membership layout).
    pub index: Option<IndexOptions>,
}

impl Default for ServingConfig {
    fn default() -> Self {
        ServingConfig {
            cache_ttl: Duration::from_secs(2),
            cache_capacity: 100_000,
            store_timeout: Duration::from_millis(250),
            subscribe_timeout: Duration::from_secs(2),
            refresh_interval: Duration::from_secs(5),
            max_checks: 1000,
            tokens: None,
            index: None,
        }
    }
}

pub use segment_core::store::MAX_USER_LEN;
