//! The Redis store, on one server or a Redis Cluster. It holds only small
//! state: versions' seals, aliases, overrides, change bookkeeping, load
//! requests and replicas' reports; memberships are in the result files.
//! Key layout, the reasons behind it and the commands each operation
//! sends: docs/storage.md.

mod conn;
mod keys;
mod scripts;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{cmd, Cmd, FromRedisValue, ScriptInvocation, Value};
use segment_core::api::SegmentKey;
use segment_core::manifest::SourceRead;
pub use segment_core::store::Rollover;
use segment_core::store::{
    new_incarnation, Cause, ChangesClaim, CountedChange, LoadStatus, MembershipReader, Notice, Override, ReplicaRegistry,
    RolloverFeed, Seal, SegmentStore, StoreEpoch, StoreError, StoredVersion, Transition,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use conn::{parse, within, Batch, Conn};
pub use keys::ROLLOVER_CHANNEL;
use keys::{check_segment, order_key, parse_segment, SegmentKeys, ALIASES, EPOCH_FIELD, LOAD_REQUESTS, REPLICAS};

/// Elements per HSCAN step of a scan of a segment's overrides.
const SCAN_COUNT: usize = 1_000;

/// Deadlines of store calls: nothing waits longer for Redis than these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStoreOptions {
    /// Establishing the connection (and the pub/sub connection).
    pub connect_timeout: Duration,
    /// One read round trip. `None` for a caller that bounds every read
    /// itself (serving, with its `--store-timeout-ms`), so that a read runs
    /// one timer instead of two.
    pub read_timeout: Option<Duration>,
    /// One small write round trip (activate, seal, overrides).
    pub write_timeout: Duration,
    /// One round trip of a bulk operation (a step of a scan of a
    /// segment's overrides).
    pub bulk_timeout: Duration,
}

impl Default for RedisStoreOptions {
    fn default() -> Self {
        RedisStoreOptions {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Some(Duration::from_secs(2)),
            write_timeout: Duration::from_secs(5),
            bulk_timeout: Duration::from_secs(30),
        }
    }
}

/// A connection to one Redis server or a Redis Cluster. Cheap to clone:
/// clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    /// Where notices can be subscribed: the server, or each cluster node in
    /// turn (PUBLISH reaches every node of a cluster).
    pubsub: Vec<redis::Client>,
    options: RedisStoreOptions,
}

/// The metadata of a sealed version as stored (JSON in the meta hash).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VersionMeta {
    /// The count recorded at sealing ([`Seal::members`]), which
    /// [`SegmentStore::versions`] reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    members: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    definition_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    change: Option<CountedChange>,
    /// An order key, compared with override times by the scripts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    overrides_from: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    table_versions: Vec<SourceRead>,
}

enum Target {
    Single(String),
    Cluster(Vec<String>),
}

/// `redis://`, `rediss://` and `unix://` name one server;
/// `redis+cluster://[user:password@]host:port,host:port` the seed nodes of
/// a cluster (database 0 only, as Redis Cluster has no other).
fn parse_url(url: &str) -> Result<Target, StoreError> {
    let Some(rest) = url.strip_prefix("redis+cluster://") else {
        return Ok(Target::Single(url.to_string()));
    };
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    let (hosts, db) = hosts.split_once('/').unwrap_or((hosts, ""));
    if !(db.is_empty() || db == "0") {
        return Err(StoreError::Other(format!("Redis URL: a cluster has only database 0, not {db:?}").into()));
    }
    let nodes: Vec<String> =
        hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(|h| format!("redis://{auth}{h}/")).collect();
    if nodes.is_empty() {
        return Err(StoreError::Other("Redis URL: redis+cluster:// names no host:port".into()));
    }
    Ok(Target::Cluster(nodes))
}

fn bad_url(e: redis::RedisError) -> StoreError {
    StoreError::Other(Cause::new("Redis URL", e))
}

impl RedisStore {
    /// `redis://host:port[/db]` for one server, `redis+cluster://host:port,host:port` for a cluster.
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        RedisStore::connect_with(url, RedisStoreOptions::default()).await
    }

    pub async fn connect_with(url: &str, options: RedisStoreOptions) -> Result<RedisStore, StoreError> {
        let (conn, pubsub) = match parse_url(url)? {
            Target::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(bad_url)?;
                // Every call carries its own deadline (`within`), so the
                // manager gets none: a second timer per command would only
                // cost time on serving's hot path.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(options.connect_timeout))
                    .set_response_timeout(None);
                let manager = within(options.connect_timeout, ConnectionManager::new_with_config(client.clone(), config)).await?;
                (Conn::Single(manager), vec![client])
            }
            Target::Cluster(nodes) => {
                let pubsub = nodes.iter().map(|n| redis::Client::open(n.as_str())).collect::<Result<_, _>>().map_err(bad_url)?;
                let client = ClusterClientBuilder::new(nodes)
                    .connection_timeout(options.connect_timeout)
                    .response_timeout(options.bulk_timeout)
                    .retries(3)
                    .build()
                    .map_err(bad_url)?;
                let connection = within(options.connect_timeout, client.get_async_connection()).await?;
                (Conn::Cluster(connection, Default::default()), pubsub)
            }
        };
        Ok(RedisStore { inner: Arc::new(Inner { conn, pubsub, options }) })
    }

    pub fn options(&self) -> &RedisStoreOptions {
        &self.inner.options
    }

    /// Removes the keys of the former per-membership layout (docs/storage.md,
    /// "Key layout"): a Redis that held versions from before index files
    /// keeps them otherwise, though nothing reads them any more, and they
    /// hold 89-177 bytes per membership. Walks `SCAN` a page at a time (on
    /// every primary of a cluster) and `UNLINK`s, page by page, only the
    /// keys [`keys::is_former_layout`] recognises: Redis is never blocked
    /// for long, memory stays one page, and each round trip has its own
    /// deadline however many keys there are. Idempotent: the operator's
    /// leader runs it when its term starts. Returns how many keys it removed.
    pub async fn remove_former_layout(&self) -> Result<u64, StoreError> {
        let limit = self.inner.options.bulk_timeout;
        let conn = &self.inner.conn;
        let mut removed = 0;
        for target in within(limit, conn.scan_targets()).await? {
            for pattern in keys::FORMER_LAYOUT_PATTERNS {
                let mut cursor = 0;
                loop {
                    let (next, found) = within(limit, conn.scan_page(&target, cursor, pattern)).await?;
                    let mut batch = Batch::new();
                    for key in found.iter().filter(|key| keys::is_former_layout(key)) {
                        batch.add(key, cmd("UNLINK").arg(key).clone());
                    }
                    // A key listed twice is unlinked once: the second reply is 0.
                    for reply in self.run(batch, limit).await? {
                        removed += u64::from_redis_value(reply).unwrap_or(0);
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        Ok(removed)
    }

    /// Notices (rollovers, load requests, overrides) from now on, on a
    /// dedicated pub/sub connection. The stream ends when that connection
    /// drops: subscribe again and treat the gap as "anything may have
    /// changed" (drop the whole cache).
    pub async fn notifications(&self) -> Result<BoxStream<'static, Notice>, StoreError> {
        let mut last = StoreError::Unavailable("no Redis node to subscribe to".into());
        for client in &self.inner.pubsub {
            let subscribed = within(self.inner.options.connect_timeout, async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(ROLLOVER_CHANNEL).await?;
                Ok(pubsub)
            })
            .await;
            match subscribed {
                Ok(pubsub) => {
                    let notices = pubsub.into_on_message().filter_map(|msg| {
                        let notice = std::str::from_utf8(msg.get_payload_bytes()).ok().and_then(Notice::parse);
                        if notice.is_none() {
                            warn!(payload = ?msg.get_payload_bytes(), "ignoring a malformed notice");
                        }
                        futures::future::ready(notice)
                    });
                    return Ok(notices.boxed());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Records an override unless the user's recorded one supersedes it
    /// (one script, one round trip), then announces it.
    async fn record(&self, segment: &SegmentKey, change: &Override) -> Result<bool, StoreError> {
        let keys = SegmentKeys::new(segment);
        let mut record = scripts::RECORD_OVERRIDE.key(keys.overrides());
        record.arg(&change.user).arg(order_key(&change.ts)).arg(offset_arg(change)).arg(&change.id).arg(stored_override(change)?);
        let recorded: u64 = self.script(record, self.write()).await?;
        let recorded = recorded == 1;
        // Only an override that superseded what the user had is news to
        // replicas; a stale one or the same event again changes nothing
        // they hold. Announced last, once every write it stands for is done.
        if recorded {
            self.publish(&Notice::Override { segment: segment.clone(), change: change.clone() }).await?;
        }
        Ok(recorded)
    }

    async fn run(&self, batch: Batch, limit: impl Into<Option<Duration>>) -> Result<Vec<Value>, StoreError> {
        within(limit, self.inner.conn.run(batch)).await
    }

    /// Runs one command. Takes it by reference, so a command built in
    /// place (`cmd("GET").arg(key)`) is sent without being copied.
    async fn query<T: FromRedisValue>(&self, cmd: &Cmd, limit: impl Into<Option<Duration>>) -> Result<T, StoreError> {
        let mut conn = self.inner.conn.clone();
        within(limit, cmd.query_async(&mut conn)).await
    }

    async fn script<T: FromRedisValue>(
        &self,
        invocation: ScriptInvocation<'static>,
        limit: impl Into<Option<Duration>>,
    ) -> Result<T, StoreError> {
        let mut conn = self.inner.conn.clone();
        within(limit, async move { invocation.invoke_async(&mut conn).await }).await
    }

    fn read(&self) -> Option<Duration> {
        self.inner.options.read_timeout
    }

    fn write(&self) -> Duration {
        self.inner.options.write_timeout
    }

    fn bulk(&self) -> Duration {
        self.inner.options.bulk_timeout
    }

    /// Seals a version in one script: refused (nothing written) when the
    /// version is fenced; else its metadata, with the member count as
    /// given, goes into `meta` in one HSET.
    async fn seal(&self, segment: &SegmentKey, version: u64, seal: &Seal) -> Result<StoredVersion, StoreError> {
        check_segment(segment)?;
        let keys = SegmentKeys::new(segment);
        let meta = VersionMeta {
            members: Some(seal.members),
            snapshot_time: seal.snapshot_time.as_ref().map(order_key),
            definition_hash: seal.definition_hash.clone(),
            change: seal.change,
            overrides_from: seal.overrides_from.as_ref().map(order_key),
            table_versions: seal.table_versions.clone(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| StoreError::Other(Cause::new("encoding version metadata", e)))?;
        let mut invocation = scripts::SEAL.key(keys.meta());
        invocation.key(keys.fenced()).arg(version).arg(json);
        let sealed: i64 = self.script(invocation, self.write()).await?;
        if sealed != 1 {
            return Err(StoreError::Fenced { segment: segment.to_string(), version });
        }
        // Sealing never promotes; only an activate does.
        Ok(seal.stored(false))
    }

    /// Publishes a notice in its one wire form ([`Notice::payload`], which
    /// subscribers read back with [`Notice::parse`]).
    async fn publish(&self, notice: &Notice) -> Result<(), StoreError> {
        let publish = cmd("PUBLISH").arg(ROLLOVER_CHANNEL).arg(notice.payload()).clone();
        self.query::<i64>(&publish, self.write()).await.map(drop)
    }

    async fn publish_rollover(&self, segment: &SegmentKey, version: Option<u64>) -> Result<(), StoreError> {
        self.publish(&Notice::Rollover(Rollover { segment: segment.clone(), version })).await
    }

    /// Removes the segment's alias and its load request in one round trip
    /// (withdraw, delete): the segment is no longer served, so nothing is
    /// to be loaded ahead of a rollover. Whether the alias was there.
    async fn clear_alias_and_request(&self, keys: &SegmentKeys) -> Result<bool, StoreError> {
        let mut batch = Batch::new();
        batch.add(ALIASES, cmd("HDEL").arg(ALIASES).arg(&keys.field).clone());
        batch.add(LOAD_REQUESTS, cmd("HDEL").arg(LOAD_REQUESTS).arg(&keys.field).clone());
        let removed: i64 = parse(self.run(batch, self.write()).await?.into_iter().next().unwrap_or_default(), "HDEL")?;
        Ok(removed == 1)
    }
}

/// Stored form of an override: its order key, then its JSON (scripts/mod docs).
fn stored_override(change: &Override) -> Result<String, StoreError> {
    let json = serde_json::to_string(change).map_err(|e| StoreError::Other(Cause::new("encoding an override", e)))?;
    Ok(format!("{}{json}", order_key(&change.ts)))
}

fn parse_stored_override(value: &str) -> Option<Override> {
    serde_json::from_str(value.get(keys::ORDER_KEY_WIDTH..)?).ok()
}

/// The override's offset as the scripts compare it: -1, below every real
/// offset, when it has none.
fn offset_arg(change: &Override) -> i64 {
    change.offset.map_or(-1, |offset| i64::try_from(offset).unwrap_or(i64::MAX))
}

#[async_trait]
impl SegmentStore for RedisStore {
    async fn active_version(&self, segment: &SegmentKey) -> Result<Option<u64>, StoreError> {
        let keys = SegmentKeys::new(segment);
        self.query(cmd("HGET").arg(ALIASES).arg(&keys.field), self.read()).await
    }

    async fn versions(&self, segment: &SegmentKey) -> Result<BTreeMap<u64, StoredVersion>, StoreError> {
        let keys = SegmentKeys::new(segment);
        let mut invocation = scripts::VERSIONS.key(keys.meta());
        invocation.key(keys.promoted());
        let flat: Vec<Value> = self.script(invocation, self.read()).await?;
        let mut out = BTreeMap::new();
        let mut items = flat.into_iter();
        while let (Some(version), Some(json), Some(promoted)) = (items.next(), items.next(), items.next()) {
            let version: u64 = parse(version, "a version number")?;
            let json: String = parse(json, "version metadata")?;
            let promoted: bool = parse::<u8>(promoted, "a promoted flag")? == 1;
            let meta: VersionMeta = serde_json::from_str(&json)
                .map_err(|e| StoreError::Other(Cause::new(format!("metadata of {segment} v{version}"), e)))?;
            let time = |text: Option<String>, what: &str| -> Result<Option<DateTime<Utc>>, StoreError> {
                text.map(|t| {
                    DateTime::parse_from_rfc3339(&t)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| StoreError::Other(Cause::new(format!("{what} of {segment} v{version}"), e)))
                })
                .transpose()
            };
            let stored = StoredVersion {
                // The count recorded at sealing (the seal script always
                // writes one).
                members: meta.members.unwrap_or(0),
                snapshot_time: time(meta.snapshot_time, "snapshot time")?,
                definition_hash: meta.definition_hash,
                change: meta.change,
                promoted,
                overrides_from: time(meta.overrides_from, "overrides-from time")?,
                table_versions: meta.table_versions,
            };
            out.insert(version, stored);
        }
        Ok(out)
    }

    async fn activate(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError> {
        check_segment(segment)?;
        let keys = SegmentKeys::new(segment);
        let sealed: bool = self.query(cmd("HEXISTS").arg(keys.meta()).arg(version), self.read()).await?;
        if !sealed {
            return Err(StoreError::MissingVersion { segment: segment.to_string(), version });
        }
        // Recorded before the alias, so an active version is always a
        // promoted one.
        self.query::<i64>(cmd("SADD").arg(keys.promoted()).arg(version), self.write()).await?;
        // The first activation starts the store's epoch (readers detect a
        // lost state by its absence); later ones leave it as it is.
        self.query::<i64>(cmd("HSETNX").arg(ALIASES).arg(EPOCH_FIELD).arg(new_incarnation()), self.write()).await?;
        // The alias is the only thing readers follow, so this one HSET is
        // the whole rollover. The notice follows it (a cluster routes
        // PUBLISH by channel name, so it cannot share the pipeline): a
        // cache that drops entries on the notice re-reads the new alias.
        self.query::<i64>(cmd("HSET").arg(ALIASES).arg(&keys.field).arg(version), self.write()).await?;
        // The load request this activate satisfies ends with it, never
        // before: only once the alias is written. A request for another
        // version (a newer run's) is left for its own activate.
        let mut request = scripts::HDEL_UNCHANGED.key(LOAD_REQUESTS);
        request.arg(&keys.field).arg(version);
        self.script::<i64>(request, self.write()).await?;
        self.publish_rollover(segment, Some(version)).await
    }

    async fn delete_version(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError> {
        let keys = SegmentKeys::new(segment);
        // Fenced before anything goes, so a seal racing with the delete
        // cannot list the version again; then unlisted, so nothing starts
        // using a half-deleted version. Until the last step below, the
        // version is listed in `loaded` without a seal: unsealed, which the
        // next plan deletes again (an interrupted delete is finished).
        let mut fence = Batch::new();
        fence.add(&keys.meta(), cmd("SADD").arg(keys.fenced()).arg(version).clone());
        fence.add(&keys.meta(), cmd("SADD").arg(keys.loaded()).arg(version).clone());
        fence.add(&keys.meta(), cmd("SREM").arg(keys.promoted()).arg(version).clone());
        fence.add(&keys.meta(), cmd("HDEL").arg(keys.meta()).arg(version).clone());
        self.run(fence, self.write()).await?;
        // The alias goes only if it still points at this version, so a
        // concurrent rollover is not undone.
        let mut clear = scripts::HDEL_UNCHANGED.key(ALIASES);
        clear.arg(&keys.field).arg(version);
        let cleared: i64 = self.script(clear, self.write()).await?;
        if cleared == 1 {
            self.publish_rollover(segment, None).await?;
        }
        self.query::<i64>(cmd("SREM").arg(keys.loaded()).arg(version), self.write()).await.map(drop)
    }

    async fn delete_segment(&self, segment: &SegmentKey) -> Result<(), StoreError> {
        let keys = SegmentKeys::new(segment);
        if self.clear_alias_and_request(&keys).await? {
            self.publish_rollover(segment, None).await?;
        }
        // Every key of the segment is small and in its one slot: one UNLINK.
        let all = [keys.meta(), keys.overrides(), keys.loaded(), keys.changes(), keys.promoted(), keys.fenced(), keys.replicas()];
        self.query::<i64>(cmd("UNLINK").arg(&all), self.write()).await.map(drop)
    }

    async fn withdraw(&self, segment: &SegmentKey) -> Result<(), StoreError> {
        let keys = SegmentKeys::new(segment);
        if self.clear_alias_and_request(&keys).await? {
            self.publish_rollover(segment, None).await?;
        }
        Ok(())
    }

    async fn unsealed_versions(&self, segment: &SegmentKey) -> Result<BTreeSet<u64>, StoreError> {
        let keys = SegmentKeys::new(segment);
        let mut batch = Batch::new();
        batch.add(&keys.meta(), cmd("SMEMBERS").arg(keys.loaded()).clone());
        batch.add(&keys.meta(), cmd("HKEYS").arg(keys.meta()).clone());
        let mut replies = self.run(batch, self.read()).await?.into_iter();
        let (Some(loaded), Some(sealed)) = (replies.next(), replies.next()) else {
            return Err(StoreError::Other(format!("listing the versions of {segment}: short reply").into()));
        };
        let loaded: BTreeSet<u64> = parse(loaded, "a version list")?;
        let sealed: BTreeSet<u64> = parse(sealed, "a version list")?;
        Ok(loaded.difference(&sealed).copied().collect())
    }

    async fn seal_with(&self, segment: &SegmentKey, version: u64, seal: &Seal) -> Result<StoredVersion, StoreError> {
        self.seal(segment, version, seal).await
    }

    async fn is_fenced(&self, segment: &SegmentKey, version: u64) -> Result<bool, StoreError> {
        let keys = SegmentKeys::new(segment);
        self.query(cmd("SISMEMBER").arg(keys.fenced()).arg(version), self.read()).await
    }

    async fn record_override(&self, segment: &SegmentKey, change: &Override) -> Result<bool, StoreError> {
        check_segment(segment)?;
        self.record(segment, change).await
    }

    async fn record_override_if_active(&self, segment: &SegmentKey, change: &Override) -> Result<Option<bool>, StoreError> {
        check_segment(segment)?;
        if self.active_version(segment).await?.is_none() {
            return Ok(None);
        }
        self.record(segment, change).await.map(Some)
    }

    async fn overrides_since(&self, segment: &SegmentKey, since: DateTime<Utc>) -> Result<Vec<Override>, StoreError> {
        let keys = SegmentKeys::new(segment);
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let step = cmd("HSCAN").arg(keys.overrides()).arg(cursor).arg("COUNT").arg(SCAN_COUNT).clone();
            let (next, entries): (u64, Vec<(String, String)>) = self.query(&step, self.bulk()).await?;
            for (user, value) in entries {
                match parse_stored_override(&value) {
                    Some(change) if change.ts > since => out.push(change),
                    Some(_) => {}
                    None => warn!(%segment, %user, "ignoring an unreadable stored override"),
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // HSCAN may return an entry twice while the hash grows.
        out.sort_by(|a, b| a.user.cmp(&b.user));
        out.dedup_by(|a, b| a.user == b.user);
        Ok(out)
    }

    async fn prune_overrides(&self, segment: &SegmentKey, older_than: DateTime<Utc>) -> Result<usize, StoreError> {
        let keys = SegmentKeys::new(segment);
        let mut removed = 0;
        let mut cursor = 0u64;
        loop {
            let step = cmd("HSCAN").arg(keys.overrides()).arg(cursor).arg("COUNT").arg(SCAN_COUNT).clone();
            let (next, entries): (u64, Vec<(String, String)>) = self.query(&step, self.bulk()).await?;
            let old: Vec<&(String, String)> =
                entries.iter().filter(|(_, value)| parse_stored_override(value).is_some_and(|o| o.ts < older_than)).collect();
            if !old.is_empty() {
                let mut prune = scripts::HDEL_UNCHANGED.key(keys.overrides());
                for (user, value) in old {
                    prune.arg(user).arg(value);
                }
                removed += self.script::<usize>(prune, self.bulk()).await?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    async fn claim_changes(
        &self,
        segment: &SegmentKey,
        version: u64,
        holder: &str,
        lease: Duration,
    ) -> Result<ChangesClaim, StoreError> {
        check_segment(segment)?;
        let keys = SegmentKeys::new(segment);
        let now = Utc::now().timestamp_millis();
        let expiry = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let mut claim = scripts::CLAIM_CHANGES.key(keys.changes());
        claim.arg(version).arg(holder).arg(now).arg(expiry).arg(new_incarnation());
        let reply: Vec<Value> = self.script(claim, self.write()).await?;
        let mut reply = reply.into_iter();
        let state: u64 = parse(reply.next().unwrap_or(Value::Nil), "a change claim")?;
        match (state, reply.next(), reply.next(), reply.next()) {
            (0, None, ..) => Ok(ChangesClaim::AlreadyPublished),
            (1, None, ..) => Ok(ChangesClaim::HeldElsewhere),
            (2, Some(published), Some(sequence), Some(incarnation)) => {
                let published: u64 = parse(published, "the version published last")?;
                let transition = Transition {
                    incarnation: parse(incarnation, "the incarnation of a change claim")?,
                    sequence: parse(sequence, "the sequence of a change claim")?,
                };
                Ok(ChangesClaim::Granted { from: (published > 0).then_some(published), transition })
            }
            (other, ..) => Err(StoreError::Other(format!("unexpected reply to a change claim (state {other})").into())),
        }
    }

    async fn finish_changes(&self, segment: &SegmentKey, version: u64, holder: &str) -> Result<bool, StoreError> {
        check_segment(segment)?;
        let keys = SegmentKeys::new(segment);
        let mut finish = scripts::FINISH_CHANGES.key(keys.changes());
        finish.arg(version).arg(holder);
        let done: u64 = self.script(finish, self.write()).await?;
        Ok(done == 1)
    }
}

#[async_trait]
impl RolloverFeed for RedisStore {
    async fn notices(&self) -> Result<BoxStream<'static, Notice>, StoreError> {
        self.notifications().await
    }
}

/// The stored form of the versions a replica holds: `3,4`.
fn held_versions(versions: &[u64]) -> String {
    versions.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn parse_held_versions(text: &str) -> Option<Vec<u64>> {
    text.split(',').map(|v| v.parse().ok()).collect()
}

#[async_trait]
impl ReplicaRegistry for RedisStore {
    async fn request_load(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError> {
        check_segment(segment)?;
        let keys = SegmentKeys::new(segment);
        // Recorded before it is announced, so a replica that subscribes
        // in between finds it in `load_requests`.
        self.query::<i64>(cmd("HSET").arg(LOAD_REQUESTS).arg(&keys.field).arg(version), self.write()).await?;
        self.publish(&Notice::Load { segment: segment.clone(), version }).await
    }

    async fn load_requests(&self) -> Result<BTreeMap<SegmentKey, u64>, StoreError> {
        let all: Vec<(String, String)> = self.query(cmd("HGETALL").arg(LOAD_REQUESTS), self.read()).await?;
        let mut out = BTreeMap::new();
        for (field, version) in all {
            match (parse_segment(&field), version.parse()) {
                (Some(segment), Ok(version)) => {
                    out.insert(segment, version);
                }
                _ => warn!(%field, %version, "ignoring a malformed load request"),
            }
        }
        Ok(out)
    }

    async fn replica_alive(&self, replica: &str, until: DateTime<Utc>) -> Result<(), StoreError> {
        let until = until.timestamp_millis();
        self.query::<i64>(cmd("HSET").arg(REPLICAS).arg(replica).arg(until), self.write()).await.map(drop)
    }

    async fn replica_gone(&self, replica: &str) -> Result<(), StoreError> {
        // Its reports stay in the segments' hashes (they live in as many
        // slots as there are segments); a replica that is not live never
        // counts, so they are ignored until it is live again.
        self.query::<i64>(cmd("HDEL").arg(REPLICAS).arg(replica), self.write()).await.map(drop)
    }

    async fn report_loaded(&self, replica: &str, segment: &SegmentKey, versions: &[u64]) -> Result<(), StoreError> {
        check_segment(segment)?;
        let key = SegmentKeys::new(segment).replicas();
        let report = match versions {
            [] => cmd("HDEL").arg(&key).arg(replica).clone(),
            versions => cmd("HSET").arg(&key).arg(replica).arg(held_versions(versions)).clone(),
        };
        self.query::<i64>(&report, self.write()).await.map(drop)
    }

    async fn load_status(&self, segment: &SegmentKey, version: u64) -> Result<LoadStatus, StoreError> {
        let held = SegmentKeys::new(segment).replicas();
        let mut batch = Batch::new();
        batch.add(REPLICAS, cmd("HGETALL").arg(REPLICAS).clone());
        batch.add(&held, cmd("HGETALL").arg(&held).clone());
        let mut replies = self.run(batch, self.read()).await?.into_iter();
        let (Some(replicas), Some(reports)) = (replies.next(), replies.next()) else {
            return Err(StoreError::Other(format!("the replicas of {segment}: short reply").into()));
        };
        let replicas: Vec<(String, String)> = parse(replicas, "the live replicas")?;
        let reports: Vec<(String, String)> = parse(reports, "the replicas' reports")?;
        // Compared with this process's clock, as the replicas set `until`
        // with theirs (the embedded store does the same).
        let now = Utc::now().timestamp_millis();
        let mut status = LoadStatus::default();
        let mut expired = Vec::new();
        for (replica, until) in replicas {
            match until.parse::<i64>() {
                Ok(until) if until > now => {
                    status.live.insert(replica);
                }
                Ok(_) => expired.push((replica, until)),
                Err(_) => warn!(%replica, %until, "ignoring a malformed replica liveness"),
            }
        }
        for (replica, versions) in reports {
            if !status.live.contains(&replica) {
                continue;
            }
            match parse_held_versions(&versions) {
                Some(versions) if versions.contains(&version) => {
                    status.holding.insert(replica);
                }
                Some(_) => {}
                // Counted as holding nothing: the rollover waits for a
                // report it can read rather than switching on a guess.
                None => warn!(%segment, %replica, %versions, "ignoring a malformed load report"),
            }
        }
        if !expired.is_empty() {
            // Forgets replicas that died without saying so (a pod killed),
            // unless one renewed since it was read. The answer above stands
            // either way, so a failure here is only logged.
            let mut prune = scripts::HDEL_UNCHANGED.key(REPLICAS);
            for (replica, until) in &expired {
                prune.arg(replica).arg(until);
            }
            if let Err(error) = self.script::<i64>(prune, self.write()).await {
                warn!(%error, expired = expired.len(), "could not forget expired replicas");
            }
        }
        Ok(status)
    }
}

#[async_trait]
impl MembershipReader for RedisStore {
    async fn aliases(&self) -> Result<BTreeMap<SegmentKey, u64>, StoreError> {
        Ok(self.aliases_with_epoch().await?.0)
    }

    async fn aliases_with_epoch(&self) -> Result<(BTreeMap<SegmentKey, u64>, StoreEpoch), StoreError> {
        let all: Vec<(String, String)> = self.query(cmd("HGETALL").arg(ALIASES), self.read()).await?;
        let mut out = BTreeMap::new();
        let mut epoch = StoreEpoch::Missing;
        for (field, version) in all {
            if field == EPOCH_FIELD {
                epoch = StoreEpoch::Id(version);
                continue;
            }
            match (parse_segment(&field), version.parse()) {
                (Some(segment), Ok(version)) => {
                    out.insert(segment, version);
                }
                _ => warn!(%field, %version, "ignoring a malformed alias"),
            }
        }
        Ok((out, epoch))
    }
}

#[cfg(test)]
mod tests {
    use segment_core::store::OverrideOp;

    use super::*;

    #[test]
    fn urls() {
        assert!(matches!(parse_url("redis://127.0.0.1:6379/2"), Ok(Target::Single(u)) if u == "redis://127.0.0.1:6379/2"));
        let Ok(Target::Cluster(nodes)) = parse_url("redis+cluster://u:p@a:1,b:2/") else { panic!("a cluster URL") };
        assert_eq!(nodes, ["redis://u:p@a:1/", "redis://u:p@b:2/"]);
        assert!(parse_url("redis+cluster://a:1/3").is_err());
        assert!(parse_url("redis+cluster://").is_err());
    }

    #[test]
    fn notices_round_trip_through_their_one_wire_form() {
        let segment = SegmentKey::new("ns", "a");
        let ts = DateTime::parse_from_rfc3339("2026-11-01T10:00:00.123456789Z").unwrap().with_timezone(&Utc);
        let change = Override { user: "u 1".into(), op: OverrideOp::Exclude, ts, id: "evt-9".into(), offset: Some(1234) };
        let notices = [
            (Notice::Rollover(Rollover { segment: segment.clone(), version: Some(7) }), Some("ns/a 7")),
            (Notice::Rollover(Rollover { segment: segment.clone(), version: None }), Some("ns/a -")),
            (Notice::Load { segment: segment.clone(), version: 8 }, Some("load ns/a 8")),
            (Notice::Override { segment: segment.clone(), change: change.clone() }, None),
            (Notice::Override { segment: segment.clone(), change: Override { offset: None, ..change } }, None),
        ];
        for (notice, wire) in notices {
            let payload = notice.payload();
            if let Some(wire) = wire {
                assert_eq!(payload, wire, "the wire form subscribers read");
            }
            assert_eq!(Notice::parse(&payload), Some(notice), "{payload}");
        }
        let malformed = [
            "garbage",
            "ns/a seven",
            "load ns/a",
            "load ns/a x",
            "override ns/a",
            "override ns/a {}",
            r#"override ns/a {"user":"#,
        ];
        for malformed in malformed {
            assert_eq!(Notice::parse(malformed), None, "{malformed}");
        }
    }

    #[test]
    fn held_versions_round_trip() {
        assert_eq!(parse_held_versions(&held_versions(&[3, 4])), Some(vec![3, 4]));
        assert_eq!(held_versions(&[3, 4]), "3,4");
        assert_eq!(parse_held_versions("3,x"), None);
        assert_eq!(parse_held_versions(""), None, "an empty report is deleted, never stored");
    }
}
