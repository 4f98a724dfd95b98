//! The edges the lifecycle reaches through: the membership store (Redis in
//! production, in-process in standalone mode) and the result files in
//! object storage. The operator needs only the operations here; both stay
//! behind traits so the lifecycle is plain Rust that tests drive directly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::api::SegmentKey;

/// Longest user id accepted (bytes), by the serving API and the realtime
/// worker alike; longer ones are refused before reaching the store.
pub const MAX_USER_LEN: usize = 256;

/// Why a store call failed. `Unavailable` is transient (the caller retries
/// and the previous version keeps serving); the others are not.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Cause),
    #[error("version {version} of {segment} is not loaded")]
    MissingVersion { segment: String, version: u64 },
    /// The version was deleted (its run cancelled or failed, or retention
    /// removed it) and can never be sealed again: a Job still running for
    /// it is too late.
    #[error("version {version} of {segment} was deleted and cannot be sealed")]
    Fenced { segment: String, version: u64 },
    #[error("store error: {0}")]
    Other(#[source] Cause),
}

impl StoreError {
    /// Whether trying again can succeed: the store was unreachable or
    /// overloaded. Every other error (bad data, a missing or deleted
    /// version, a script the server refused) repeats on every attempt.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// What failed, and the error of the library underneath (Redis, object
/// storage) when there is one: kept as the error's `source()` rather than
/// flattened into text. Shared, so [`StoreError`] stays `Clone` (the
/// serving cache hands one error to many waiters).
#[derive(Debug, Clone)]
pub struct Cause {
    context: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Cause {
    pub fn new(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause { context: context.into(), source: Some(Arc::new(source)) }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.context),
            None => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Equal when they read the same: the library errors underneath are not
/// comparable.
impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        self.to_string() == other.to_string()
    }
}

impl From<String> for Cause {
    fn from(context: String) -> Cause {
        Cause { context, source: None }
    }
}

impl From<&str> for Cause {
    fn from(context: &str) -> Cause {
        Cause::from(context.to_string())
    }
}

/// A sealed version as the store records it: the operator seals a version
/// from ingest's verdict ([`Seal`]) once the ingest Job succeeded, so a
/// version the store lists has verified result files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub members: u64,
    pub snapshot_time: Option<DateTime<Utc>>,
    pub definition_hash: Option<String>,
    /// How the version differs from the version that was active when it
    /// was ingested, counted from the two versions' index files.
    pub change: Option<CountedChange>,
    /// Whether readers were ever switched to it. A version the status does
    /// not list is adopted only if so: one that never passed the rollover
    /// guard must not become servable because a status was lost.
    pub promoted: bool,
    /// The version is taken to reflect the events before this time (its
    /// snapshot time minus the lake's lag grace): serving lays the realtime
    /// overrides from then on over its index file. `None`: its snapshot
    /// time (versions sealed before the grace existed).
    pub overrides_from: Option<DateTime<Utc>>,
    /// The lake tables the version was computed from at a table version
    /// (Delta), as its manifest lists them.
    pub table_versions: Vec<crate::manifest::SourceRead>,
}

impl StoredVersion {
    /// Overrides after this time are not in the version's lake data.
    pub fn reflects_events_until(&self) -> Option<DateTime<Utc>> {
        self.overrides_from.or(self.snapshot_time)
    }
}

/// What is recorded with a version when it is sealed: ingest's verdict on
/// it, which ingest writes next to the result files
/// ([`crate::seal::SealFile`]) and the operator hands to
/// [`SegmentStore::seal_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Seal {
    /// The version's member count: its index file's, which ingest checked
    /// against the manifest. The store records it as given.
    pub members: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition_hash: Option<String>,
    /// How the version differs from an earlier one ([`StoredVersion::change`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<CountedChange>,
    /// [`StoredVersion::overrides_from`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides_from: Option<DateTime<Utc>>,
    /// [`StoredVersion::table_versions`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub table_versions: Vec<crate::manifest::SourceRead>,
}

impl Seal {
    /// The version as a store lists it once sealed with this.
    pub fn stored(&self, promoted: bool) -> StoredVersion {
        StoredVersion {
            members: self.members,
            snapshot_time: self.snapshot_time,
            definition_hash: self.definition_hash.clone(),
            change: self.change,
            promoted,
            overrides_from: self.overrides_from,
            table_versions: self.table_versions.clone(),
        }
    }
}

/// Users in exactly one of two versions (entered plus exited), counted by
/// ingest in one merge of the versions' sorted index files, so the
/// rollover guard needs no set operation in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountedChange {
    /// The version compared with.
    pub from: u64,
    pub changed: u64,
}

/// A realtime include or exclude of one user, kept per segment so that
/// readers lay it over every version that does not reflect it yet (see
/// [`SegmentStore::record_override`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    pub user: String,
    pub op: OverrideOp,
    /// When the event happened; the newest override of a user wins.
    pub ts: DateTime<Utc>,
    /// The producer's id: a redelivered message has the same one.
    pub id: String,
    /// The event's offset in the membership topic. One user's events share
    /// a partition (the key is the user id), so of two events with the
    /// same `ts` the one at the later offset was produced later, and a
    /// redelivered message has the same offset. Absent from overrides
    /// recorded before offsets were kept, and from those not read from Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverrideOp {
    Include,
    Exclude,
}

impl Override {
    /// Whether `self` replaces `other` as a user's override: newer time
    /// wins; of equal times, the later offset (none counts as earliest);
    /// the id orders what is left (offsets of different partitions, after
    /// the topic gained partitions) so every replica agrees. The same
    /// event (time and id), redelivered or produced twice, replaces
    /// nothing. The Redis store's scripts compare the same way.
    pub fn supersedes(&self, other: &Override) -> bool {
        let same_event = (self.ts, &self.id) == (other.ts, &other.id);
        !same_event && (self.ts, self.offset, &self.id) > (other.ts, other.offset, &other.id)
    }

    /// Whether `self` is what a user's override becomes when `current` is
    /// the one kept so far: the first one, or one that supersedes it.
    pub fn replaces(&self, current: Option<&Override>) -> bool {
        current.is_none_or(|current| self.supersedes(current))
    }

    /// Whether the override decides membership in a version whose lake
    /// data reflects the events until `reflects_until`
    /// ([`StoredVersion::reflects_events_until`]; `None`: none): only an
    /// event after them does, the lake data answers for older ones. The
    /// one rule serving and the change events apply.
    pub fn counts_for(&self, reflects_until: Option<DateTime<Utc>>) -> bool {
        reflects_until.is_none_or(|until| self.ts > until)
    }

    /// The membership the override sets.
    pub fn includes(&self) -> bool {
        self.op == OverrideOp::Include
    }
}

/// A user who entered or left a segment between two versions, as a page
/// of the merge of their index files lists it ([`crate::index::diff_page`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub user: String,
    pub entered: bool,
}

/// Where publishing one version's entered/exited events stands (see
/// [`SegmentStore::claim_changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangesClaim {
    /// The caller publishes the diff from `from`, the version whose events
    /// were published last (`None`: this is the first version announced,
    /// there is nothing to diff against), then calls
    /// [`SegmentStore::finish_changes`]. `transition` names what it publishes.
    Granted { from: Option<u64>, transition: Transition },
    /// This version's events were all published already.
    AlreadyPublished,
    /// Another worker holds an unexpired claim on this version.
    HeldElsewhere,
}

/// Names one announcement of a segment's changes, so that change-event ids
/// differ between announcements (a rollback and the roll forward after it
/// diff the same two versions; a deleted and re-created Segment numbers its
/// versions from 1 again) and stay the same when a worker that took over a
/// dead one's claim publishes the announcement again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Chosen by the first claim after the segment's change bookkeeping was
    /// created, and deleted with the segment.
    pub incarnation: String,
    /// 1 + the announcements finished before this one in the incarnation.
    pub sequence: u64,
}

/// A new incarnation id: 64 random bits in hex. Only its uniqueness
/// matters; `RandomState` gives fresh random keys without a dependency.
pub fn new_incarnation() -> String {
    use std::hash::{BuildHasher, Hasher};
    format!("{:016x}", std::collections::hash_map::RandomState::new().build_hasher().finish())
}

/// The store as the lifecycle and realtime use it: small state only
/// (versions' seals, aliases, overrides, change bookkeeping). Memberships
/// live in the versions' result files, which serving and the realtime
/// worker read. Every write is idempotent: a retried call changes nothing
/// the second time.
#[async_trait]
pub trait SegmentStore: Send + Sync {
    /// The version readers see now.
    async fn active_version(&self, segment: &SegmentKey) -> Result<Option<u64>, StoreError>;
    /// Every complete (sealed) version held for the segment, with the
    /// member count recorded when it was sealed.
    async fn versions(&self, segment: &SegmentKey) -> Result<BTreeMap<u64, StoredVersion>, StoreError>;
    /// Whether `version` was deleted ([`delete_version`](Self::delete_version)
    /// fences it first): sealing it is refused from then on. The planner
    /// asks about the run in flight before it seals it from ingest's verdict.
    async fn is_fenced(&self, segment: &SegmentKey, version: u64) -> Result<bool, StoreError>;
    /// Versions with state but no seal: left behind by a delete that was
    /// interrupted (the version is unlisted first, and its state goes
    /// after), so that the next plan deletes them again.
    async fn unsealed_versions(&self, segment: &SegmentKey) -> Result<BTreeSet<u64>, StoreError>;
    /// Switches readers to `version` in one atomic step and notifies caches;
    /// the version is recorded as promoted ([`StoredVersion::promoted`]).
    async fn activate(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError>;
    /// Removes a version incrementally; a missing version is not an error.
    /// The version is fenced first: sealing it fails from then on
    /// ([`StoreError::Fenced`]), so a Job of a cancelled run cannot publish
    /// it after the cancel, and an interrupted delete leaves it unsealed,
    /// where [`unsealed_versions`](Self::unsealed_versions) finds it again.
    async fn delete_version(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError>;
    /// Removes everything the store holds for the segment.
    async fn delete_segment(&self, segment: &SegmentKey) -> Result<(), StoreError>;
    /// Stops serving the segment (no active version, readers notified) and
    /// keeps its versions: a deleted Segment with `deletionPolicy: Retain`.
    async fn withdraw(&self, segment: &SegmentKey) -> Result<(), StoreError>;

    /// Marks a version complete with ingest's verdict (the operator calls
    /// it once the ingest Job succeeded, from the seal file) and returns
    /// what is recorded: the member count is `seal.members`, as given; no
    /// member data needs to exist. Refused with [`StoreError::Fenced`] for
    /// a deleted version. Sealing again records the new seal.
    async fn seal_with(&self, segment: &SegmentKey, version: u64, seal: &Seal) -> Result<StoredVersion, StoreError>;

    /// Records a realtime override, the newest per user as
    /// [`Override::supersedes`] orders them, and announces it
    /// ([`Notice::Override`]): serving lays the recorded overrides over the
    /// versions' index files, from each version's
    /// [`StoredVersion::reflects_events_until`] on, so an override reaches
    /// every version that does not reflect it, whenever it is activated.
    /// Returns false when a newer (or the same) override was already
    /// recorded for the user, in which case nothing changes and nothing is
    /// announced.
    async fn record_override(&self, segment: &SegmentKey, change: &Override) -> Result<bool, StoreError>;
    /// [`record_override`](Self::record_override) for a segment that is
    /// served; `None`, with nothing recorded, when it has no active
    /// version (overrides of a segment nobody reads would be kept
    /// forever). Stores that read the alias anyway answer in one go.
    async fn record_override_if_active(&self, segment: &SegmentKey, change: &Override) -> Result<Option<bool>, StoreError> {
        if self.active_version(segment).await?.is_none() {
            return Ok(None);
        }
        self.record_override(segment, change).await.map(Some)
    }
    /// Overrides with a time after `since`: what a version computed at
    /// snapshot time `since` does not know yet.
    async fn overrides_since(&self, segment: &SegmentKey, since: DateTime<Utc>) -> Result<Vec<Override>, StoreError>;
    /// Forgets the overrides with a time before `older_than` (every version
    /// kept reflects them through its lake data); an override recorded for
    /// the same user meanwhile is kept. Returns how many went.
    async fn prune_overrides(&self, segment: &SegmentKey, older_than: DateTime<Utc>) -> Result<usize, StoreError>;

    /// Claims publishing the change events of `version` for `lease`, so
    /// that each version is announced once however many realtime workers
    /// see its rollover. A claim whose holder died expires, and the next
    /// claimant publishes the version again (events carry ids to dedupe).
    async fn claim_changes(
        &self,
        segment: &SegmentKey,
        version: u64,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<ChangesClaim, StoreError>;
    /// Records that every event of `version` was published, if `holder`
    /// still holds the claim; false when the claim was lost meanwhile.
    async fn finish_changes(&self, segment: &SegmentKey, version: u64, holder: &str) -> Result<bool, StoreError>;
}

/// Whether a store still holds the state readers saw in it. A store that
/// can lose its state (a Redis flushed or replaced by an empty one) keeps
/// an epoch: an id written with the first activation, gone with the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEpoch {
    /// The store cannot lose its state behind its readers' backs.
    Untracked,
    /// Nothing was ever activated, or the state was lost.
    Missing,
    Id(String),
}

/// What serving (and the realtime worker) read of the store besides the
/// notices: which version of each segment is active. Memberships are not
/// in the store: readers answer from the active versions' index files.
/// Each call is one round trip to the store.
#[async_trait]
pub trait MembershipReader: Send + Sync {
    /// The active version of every segment.
    async fn aliases(&self) -> Result<BTreeMap<SegmentKey, u64>, StoreError>;
    /// [`aliases`](Self::aliases) and the store's epoch, read together.
    async fn aliases_with_epoch(&self) -> Result<(BTreeMap<SegmentKey, u64>, StoreEpoch), StoreError> {
        Ok((self.aliases().await?, StoreEpoch::Untracked))
    }
}

/// A rollover notice: `segment` now serves `version` (`None`: nothing, the
/// version or segment was deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollover {
    pub segment: SegmentKey,
    pub version: Option<u64>,
}

impl Rollover {
    /// Parses the wire form `ns/name <version>` or `ns/name -` (the payload
    /// the Redis store publishes).
    pub fn parse(payload: &str) -> Option<Rollover> {
        let (segment, version) = payload.rsplit_once(' ')?;
        let version = match version {
            "-" => None,
            v => Some(v.parse().ok()?),
        };
        Some(Rollover { segment: parse_segment(segment)?, version })
    }
}

/// What the store's notice channel carries to serving replicas and
/// workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Readers of the segment switch versions.
    Rollover(Rollover),
    /// Readers are about to be switched to `version`: serving replicas load
    /// its index now and report it ([`ReplicaRegistry::report_loaded`]);
    /// the operator switches once every live replica holds it.
    Load { segment: SegmentKey, version: u64 },
    /// A realtime override that took effect (it superseded what the user
    /// had); replicas answering from index files apply it on top.
    Override { segment: SegmentKey, change: Override },
}

impl Notice {
    /// Parses the wire forms: `ns/name <version|->` (a rollover),
    /// `load ns/name <version>`, `override ns/name <override as JSON>`.
    /// Kubernetes names hold no spaces, so the forms cannot be confused.
    pub fn parse(payload: &str) -> Option<Notice> {
        if let Some(rest) = payload.strip_prefix("load ") {
            let (segment, version) = rest.split_once(' ')?;
            return Some(Notice::Load { segment: parse_segment(segment)?, version: version.parse().ok()? });
        }
        if let Some(rest) = payload.strip_prefix("override ") {
            let (segment, change) = rest.split_once(' ')?;
            return Some(Notice::Override { segment: parse_segment(segment)?, change: serde_json::from_str(change).ok()? });
        }
        Rollover::parse(payload).map(Notice::Rollover)
    }

    /// The wire form [`parse`](Self::parse) reads.
    pub fn payload(&self) -> String {
        match self {
            Notice::Rollover(Rollover { segment, version: Some(version) }) => format!("{segment} {version}"),
            Notice::Rollover(Rollover { segment, version: None }) => format!("{segment} -"),
            Notice::Load { segment, version } => format!("load {segment} {version}"),
            Notice::Override { segment, change } => {
                format!("override {segment} {}", serde_json::to_string(change).expect("an override serializes"))
            }
        }
    }
}

fn parse_segment(text: &str) -> Option<SegmentKey> {
    let (namespace, name) = text.split_once('/')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains(' ')).then(|| SegmentKey::new(namespace, name))
}

/// Where caches and replicas learn about rollovers, load requests and
/// overrides.
#[async_trait]
pub trait RolloverFeed: Send + Sync {
    /// Notices from now on. The stream ends when notices may have been
    /// missed (connection lost, reader too slow): subscribe again and treat
    /// the gap as "anything may have changed".
    async fn notices(&self) -> Result<BoxStream<'static, Notice>, StoreError>;

    /// Only the rollover notices of [`notices`](Self::notices).
    async fn rollovers(&self) -> Result<BoxStream<'static, Rollover>, StoreError> {
        let notices = self.notices().await?;
        Ok(Box::pin(notices.filter_map(|notice| async move {
            match notice {
                Notice::Rollover(rollover) => Some(rollover),
                _ => None,
            }
        })))
    }
}

/// Which serving replicas are live and which versions each holds in
/// memory, so that readers are switched to a version only once every live
/// replica can answer from it (docs/serving.md, "Rollover").
#[async_trait]
pub trait ReplicaRegistry: Send + Sync {
    /// Asks replicas to load `version` of `segment` ahead of the switch:
    /// records the request (a replica that starts or re-subscribes later
    /// finds it in [`load_requests`](Self::load_requests)) and publishes a
    /// [`Notice::Load`].
    async fn request_load(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError>;
    /// The recorded load requests, segment → version. A request ends when
    /// its segment is activated, withdrawn or deleted.
    async fn load_requests(&self) -> Result<BTreeMap<SegmentKey, u64>, StoreError>;
    /// `replica` is live (and ready) until `until`; replicas renew this
    /// well before it runs out.
    async fn replica_alive(&self, replica: &str, until: DateTime<Utc>) -> Result<(), StoreError>;
    /// `replica` is shutting down: it no longer counts.
    async fn replica_gone(&self, replica: &str) -> Result<(), StoreError>;
    /// The versions of `segment` that `replica` holds now (replaces what it
    /// reported before; empty: none).
    async fn report_loaded(&self, replica: &str, segment: &SegmentKey, versions: &[u64]) -> Result<(), StoreError>;
    /// The live replicas, and which of them hold `version` of `segment`.
    async fn load_status(&self, segment: &SegmentKey, version: u64) -> Result<LoadStatus, StoreError>;
}

/// The answer of [`ReplicaRegistry::load_status`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadStatus {
    /// Replicas whose liveness has not run out.
    pub live: BTreeSet<String>,
    /// The live replicas holding the version.
    pub holding: BTreeSet<String>,
}

impl LoadStatus {
    /// The live replicas that do not hold the version yet.
    pub fn missing(&self) -> Vec<&str> {
        self.live.difference(&self.holding).map(String::as_str).collect()
    }
}

/// Whether readers may be switched to a version, as far as the serving
/// replicas go ([`replicas_ready`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicasReady {
    /// Every live replica holds the version; `live` is 0 when none is live
    /// (no index-serving replica deployed, or all gone), and there is
    /// nobody to wait for.
    Ready { live: usize },
    /// These of the `live` replicas do not hold it yet.
    Waiting { live: usize, missing: Vec<String> },
}

/// The one rule of switching readers: asks the serving replicas to load
/// `version` of `segment` (again: a replica that missed the first notice
/// gets another, and one that starts later finds the request), then
/// answers whether every live replica holds it. A replica whose liveness
/// ran out does not count: waiting for a dead one would hold the segment
/// until the timeout. How long to wait, and what to do after, is the
/// caller's: the operator holds the switch; standalone mode, whose serving
/// is in-process, does not ask.
pub async fn replicas_ready(
    registry: &dyn ReplicaRegistry,
    segment: &SegmentKey,
    version: u64,
) -> Result<ReplicasReady, StoreError> {
    registry.request_load(segment, version).await?;
    let status = registry.load_status(segment, version).await?;
    let live = status.live.len();
    let missing: Vec<String> = status.missing().into_iter().map(str::to_string).collect();
    Ok(match missing.is_empty() {
        true => ReplicasReady::Ready { live },
        false => ReplicasReady::Waiting { live, missing },
    })
}

/// Where a version's index file ([`crate::index`]) is read from: serving
/// replicas hold it, the realtime worker diffs two of them.
#[async_trait]
pub trait IndexSource: Send + Sync {
    /// The version's ids, verified (checksum, structure) before anything
    /// is answered from them.
    async fn fetch(&self, segment: &SegmentKey, version: u64) -> Result<crate::index::IdSet, StoreError>;
}

/// Result files in object storage.
#[async_trait]
pub trait ResultStore: Send + Sync {
    /// Deletes the result files of versions computed before `older_than`,
    /// except those in `keep`. Returns how many versions were removed.
    async fn collect(&self, segment: &SegmentKey, older_than: DateTime<Utc>, keep: &[u64]) -> Result<usize, StoreError>;
    /// Deletes every result file of the segment.
    async fn delete_segment(&self, segment: &SegmentKey) -> Result<(), StoreError>;
    /// The bytes of the version's seal file ([`crate::seal::SEAL_FILE`],
    /// ingest's verdict), `None` when there is none. Judged by
    /// [`crate::seal::judge`]; a read that fails is
    /// [`StoreError::Unavailable`] and is tried again.
    async fn seal_file(&self, segment: &SegmentKey, version: u64) -> Result<Option<Vec<u8>>, StoreError>;
}

#[derive(Default, Debug, Clone)]
struct SegmentData {
    active: Option<u64>,
    /// Sealed versions.
    versions: BTreeMap<u64, StoredVersion>,
    /// Versions left with state but no seal ([`MemoryStore::leave_unsealed`]).
    unsealed: BTreeSet<u64>,
    overrides: BTreeMap<String, Override>,
    /// The version whose change events were published last.
    announced: Option<u64>,
    /// (version, holder, expiry) of the claim on publishing change events.
    announcing: Option<(u64, String, DateTime<Utc>)>,
    /// [`Transition::incarnation`], set by the first claim.
    incarnation: Option<String>,
    /// Announcements finished in this incarnation.
    announcements: u64,
    /// Versions readers were ever switched to.
    promoted: BTreeSet<u64>,
    /// Deleted versions, which can no longer be sealed.
    fenced: BTreeSet<u64>,
}

/// What the embedded store broadcasts to its rollover subscribers.
#[derive(Debug, Clone)]
enum FeedEvent {
    Notice(Notice),
    /// The store went down: subscriptions end, as a Redis pub/sub
    /// connection would.
    Lost,
}

/// Notices a slow subscriber may fall behind by before its stream ends.
const FEED_CAPACITY: usize = 1024;

/// The embedded store: everything in process memory. It backs standalone
/// mode and is the store the lifecycle tests run against.
#[derive(Debug)]
pub struct MemoryStore {
    segments: Mutex<HashMap<SegmentKey, SegmentData>>,
    unavailable: Mutex<bool>,
    /// What every call fails with, set by [`MemoryStore::fail_with`].
    failing: Mutex<Option<StoreError>>,
    /// User → what recording an override of them fails with
    /// ([`MemoryStore::fail_overrides_of`]).
    failing_users: Mutex<HashMap<String, StoreError>>,
    feed: broadcast::Sender<FeedEvent>,
    replicas: Mutex<Replicas>,
}

/// The embedded store's [`ReplicaRegistry`] state.
#[derive(Debug, Default)]
struct Replicas {
    /// Replica → until when it is live.
    live: HashMap<String, DateTime<Utc>>,
    /// Segment → replica → the versions it holds.
    loaded: HashMap<SegmentKey, HashMap<String, Vec<u64>>>,
    requests: BTreeMap<SegmentKey, u64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            segments: Default::default(),
            unavailable: Default::default(),
            failing: Default::default(),
            failing_users: Default::default(),
            feed: broadcast::channel(FEED_CAPACITY).0,
            replicas: Default::default(),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn notify(&self, segment: &SegmentKey, version: Option<u64>) {
        self.send(Notice::Rollover(Rollover { segment: segment.clone(), version }));
    }

    fn send(&self, notice: Notice) {
        // No subscribers is not an error: nobody caches anything.
        let _ = self.feed.send(FeedEvent::Notice(notice));
    }

    /// Seals a version with `members` as its count, as the operator does
    /// from ingest's verdict ([`SegmentStore::seal_with`]), fenced or not:
    /// what a successful run leaves behind (its result files are the
    /// caller's).
    pub fn load_version(
        &self,
        segment: &SegmentKey,
        version: u64,
        members: u64,
        snapshot_time: Option<DateTime<Utc>>,
        definition_hash: Option<String>,
    ) {
        let seal = Seal { members, snapshot_time, definition_hash, ..Seal::default() };
        self.with(|all| {
            let data = all.entry(segment.clone()).or_default();
            let meta = seal.stored(data.promoted.contains(&version));
            data.versions.insert(version, meta);
        });
    }

    /// Leaves `version` with state but no seal, as a delete interrupted
    /// between unlisting the version and removing the rest of its state
    /// does in a store that deletes step by step (Redis):
    /// [`SegmentStore::unsealed_versions`] lists it until it is deleted.
    pub fn leave_unsealed(&self, segment: &SegmentKey, version: u64) {
        self.with(|all| {
            let data = all.entry(segment.clone()).or_default();
            data.versions.remove(&version);
            data.unsealed.insert(version);
        });
    }

    /// Makes every call fail as if the store were down, or brings it back.
    /// Going down also ends every rollover subscription.
    pub fn set_unavailable(&self, down: bool) {
        *self.unavailable.lock().unwrap_or_else(|e| e.into_inner()) = down;
        if down {
            let _ = self.feed.send(FeedEvent::Lost);
        }
    }

    /// Makes every call fail with `error` (a permanent one, where
    /// [`set_unavailable`](Self::set_unavailable) is the transient kind),
    /// or with `None` succeed again.
    pub fn fail_with(&self, error: Option<StoreError>) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// Makes recording an override of `user` fail with `error`, or with
    /// `None` succeed again: one message held up while others go through.
    pub fn fail_overrides_of(&self, user: &str, error: Option<StoreError>) {
        let mut failing = self.failing_users.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            Some(error) => failing.insert(user.to_string(), error),
            None => failing.remove(user),
        };
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<SegmentKey, SegmentData>) -> T) -> T {
        f(&mut self.segments.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn ensure_available(&self) -> Result<(), StoreError> {
        if *self.unavailable.lock().unwrap_or_else(|e| e.into_inner()) {
            return Err(StoreError::Unavailable("embedded store switched off".into()));
        }
        match self.failing.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl SegmentStore for MemoryStore {
    async fn active_version(&self, segment: &SegmentKey) -> Result<Option<u64>, StoreError> {
        self.ensure_available()?;
        Ok(self.with(|all| all.get(segment).and_then(|d| d.active)))
    }

    async fn versions(&self, segment: &SegmentKey) -> Result<BTreeMap<u64, StoredVersion>, StoreError> {
        self.ensure_available()?;
        Ok(self.with(|all| {
            let Some(data) = all.get(segment) else { return BTreeMap::new() };
            let stored = |v: u64, meta: &StoredVersion| StoredVersion { promoted: data.promoted.contains(&v), ..meta.clone() };
            data.versions.iter().map(|(v, meta)| (*v, stored(*v, meta))).collect()
        }))
    }

    async fn unsealed_versions(&self, segment: &SegmentKey) -> Result<BTreeSet<u64>, StoreError> {
        self.ensure_available()?;
        Ok(self.with(|all| all.get(segment).map(|d| d.unsealed.clone()).unwrap_or_default()))
    }

    async fn activate(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError> {
        self.ensure_available()?;
        self.with(|all| {
            let data = all.entry(segment.clone()).or_default();
            if !data.versions.contains_key(&version) {
                return Err(StoreError::MissingVersion { segment: segment.to_string(), version });
            }
            data.promoted.insert(version);
            data.active = Some(version);
            Ok(())
        })?;
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        if replicas.requests.get(segment) == Some(&version) {
            replicas.requests.remove(segment);
        }
        drop(replicas);
        self.notify(segment, Some(version));
        Ok(())
    }

    async fn delete_version(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError> {
        self.ensure_available()?;
        let cleared = self.with(|all| {
            let data = all.entry(segment.clone()).or_default();
            data.fenced.insert(version);
            data.promoted.remove(&version);
            data.versions.remove(&version);
            data.unsealed.remove(&version);
            let cleared = data.active == Some(version);
            if cleared {
                data.active = None;
            }
            cleared
        });
        if cleared {
            self.notify(segment, None);
        }
        Ok(())
    }

    async fn delete_segment(&self, segment: &SegmentKey) -> Result<(), StoreError> {
        self.ensure_available()?;
        let removed = self.with(|all| all.remove(segment));
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        replicas.requests.remove(segment);
        // A re-created segment numbers its versions from 1 again: reports
        // of the deleted one's versions must not count for it.
        replicas.loaded.remove(segment);
        drop(replicas);
        if removed.is_some_and(|data| data.active.is_some()) {
            self.notify(segment, None);
        }
        Ok(())
    }

    async fn withdraw(&self, segment: &SegmentKey) -> Result<(), StoreError> {
        self.ensure_available()?;
        let was_active = self.with(|all| all.get_mut(segment).and_then(|data| data.active.take()).is_some());
        self.replicas.lock().unwrap_or_else(|e| e.into_inner()).requests.remove(segment);
        if was_active {
            self.notify(segment, None);
        }
        Ok(())
    }

    async fn seal_with(&self, segment: &SegmentKey, version: u64, seal: &Seal) -> Result<StoredVersion, StoreError> {
        self.ensure_available()?;
        self.with(|all| {
            let data = all.entry(segment.clone()).or_default();
            if data.fenced.contains(&version) {
                return Err(StoreError::Fenced { segment: segment.to_string(), version });
            }
            data.unsealed.remove(&version);
            let meta = seal.stored(data.promoted.contains(&version));
            data.versions.insert(version, meta.clone());
            Ok(meta)
        })
    }

    async fn is_fenced(&self, segment: &SegmentKey, version: u64) -> Result<bool, StoreError> {
        self.ensure_available()?;
        Ok(self.with(|all| all.get(segment).is_some_and(|d| d.fenced.contains(&version))))
    }

    async fn record_override(&self, segment: &SegmentKey, change: &Override) -> Result<bool, StoreError> {
        self.ensure_available()?;
        if let Some(error) = self.failing_users.lock().unwrap_or_else(|e| e.into_inner()).get(&change.user) {
            return Err(error.clone());
        }
        let recorded = self.with(|all| {
            let data = all.entry(segment.clone()).or_default();
            if !change.replaces(data.overrides.get(&change.user)) {
                return false;
            }
            data.overrides.insert(change.user.clone(), change.clone());
            true
        });
        if recorded {
            self.send(Notice::Override { segment: segment.clone(), change: change.clone() });
        }
        Ok(recorded)
    }

    async fn overrides_since(&self, segment: &SegmentKey, since: DateTime<Utc>) -> Result<Vec<Override>, StoreError> {
        self.ensure_available()?;
        Ok(self.with(|all| {
            all.get(segment).map(|d| d.overrides.values().filter(|o| o.ts > since).cloned().collect()).unwrap_or_default()
        }))
    }

    async fn prune_overrides(&self, segment: &SegmentKey, older_than: DateTime<Utc>) -> Result<usize, StoreError> {
        self.ensure_available()?;
        Ok(self.with(|all| {
            let Some(data) = all.get_mut(segment) else { return 0 };
            let before = data.overrides.len();
            data.overrides.retain(|_, change| change.ts >= older_than);
            before - data.overrides.len()
        }))
    }

    async fn claim_changes(
        &self,
        segment: &SegmentKey,
        version: u64,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<ChangesClaim, StoreError> {
        self.ensure_available()?;
        let now = Utc::now();
        let expiry = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        Ok(self.with(|all| {
            let data = all.entry(segment.clone()).or_default();
            if data.announced == Some(version) {
                return ChangesClaim::AlreadyPublished;
            }
            if let Some((claimed, by, until)) = &data.announcing {
                if *claimed == version && by != holder && *until > now {
                    return ChangesClaim::HeldElsewhere;
                }
            }
            data.announcing = Some((version, holder.to_string(), expiry));
            let incarnation = data.incarnation.get_or_insert_with(new_incarnation).clone();
            ChangesClaim::Granted {
                from: data.announced,
                transition: Transition { incarnation, sequence: data.announcements + 1 },
            }
        }))
    }

    async fn finish_changes(&self, segment: &SegmentKey, version: u64, holder: &str) -> Result<bool, StoreError> {
        self.ensure_available()?;
        Ok(self.with(|all| {
            let Some(data) = all.get_mut(segment) else { return false };
            match &data.announcing {
                Some((claimed, by, _)) if *claimed == version && by == holder => {
                    data.announcing = None;
                    data.announced = Some(version);
                    data.announcements += 1;
                    true
                }
                _ => false,
            }
        }))
    }
}

#[async_trait]
impl MembershipReader for MemoryStore {
    async fn aliases(&self) -> Result<BTreeMap<SegmentKey, u64>, StoreError> {
        self.ensure_available()?;
        Ok(self.with(|all| all.iter().filter_map(|(k, d)| d.active.map(|v| (k.clone(), v))).collect()))
    }
}

#[async_trait]
impl RolloverFeed for MemoryStore {
    async fn notices(&self) -> Result<BoxStream<'static, Notice>, StoreError> {
        self.ensure_available()?;
        let receiver = self.feed.subscribe();
        // A lagged receiver has missed notices, which the contract reports
        // by ending the stream, like a lost store connection.
        let stream = futures::stream::unfold(receiver, |mut receiver| async move {
            match receiver.recv().await {
                Ok(FeedEvent::Notice(notice)) => Some((notice, receiver)),
                Ok(FeedEvent::Lost) | Err(_) => None,
            }
        });
        Ok(Box::pin(stream))
    }
}

#[async_trait]
impl ReplicaRegistry for MemoryStore {
    async fn request_load(&self, segment: &SegmentKey, version: u64) -> Result<(), StoreError> {
        self.ensure_available()?;
        self.replicas.lock().unwrap_or_else(|e| e.into_inner()).requests.insert(segment.clone(), version);
        self.send(Notice::Load { segment: segment.clone(), version });
        Ok(())
    }

    async fn load_requests(&self) -> Result<BTreeMap<SegmentKey, u64>, StoreError> {
        self.ensure_available()?;
        Ok(self.replicas.lock().unwrap_or_else(|e| e.into_inner()).requests.clone())
    }

    async fn replica_alive(&self, replica: &str, until: DateTime<Utc>) -> Result<(), StoreError> {
        self.ensure_available()?;
        self.replicas.lock().unwrap_or_else(|e| e.into_inner()).live.insert(replica.to_string(), until);
        Ok(())
    }

    async fn replica_gone(&self, replica: &str) -> Result<(), StoreError> {
        self.ensure_available()?;
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        replicas.live.remove(replica);
        for holders in replicas.loaded.values_mut() {
            holders.remove(replica);
        }
        Ok(())
    }

    async fn report_loaded(&self, replica: &str, segment: &SegmentKey, versions: &[u64]) -> Result<(), StoreError> {
        self.ensure_available()?;
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let holders = replicas.loaded.entry(segment.clone()).or_default();
        if versions.is_empty() {
            holders.remove(replica);
        } else {
            holders.insert(replica.to_string(), versions.to_vec());
        }
        Ok(())
    }

    async fn load_status(&self, segment: &SegmentKey, version: u64) -> Result<LoadStatus, StoreError> {
        self.ensure_available()?;
        let replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let now = Utc::now();
        let live: BTreeSet<String> = replicas.live.iter().filter(|(_, until)| **until > now).map(|(r, _)| r.clone()).collect();
        let holding = replicas
            .loaded
            .get(segment)
            .into_iter()
            .flatten()
            .filter(|(replica, versions)| live.contains(*replica) && versions.contains(&version))
            .map(|(replica, _)| replica.clone())
            .collect();
        Ok(LoadStatus { live, holding })
    }
}

/// Result files kept in memory: which versions have results and when they
/// were computed, and the seal files ingest wrote. Backs the tests.
#[derive(Default, Debug)]
pub struct MemoryResults {
    versions: Mutex<HashMap<SegmentKey, BTreeMap<u64, DateTime<Utc>>>>,
    seals: Mutex<HashMap<(SegmentKey, u64), Vec<u8>>>,
}

impl MemoryResults {
    pub fn record(&self, segment: &SegmentKey, version: u64, computed_at: DateTime<Utc>) {
        self.lock().entry(segment.clone()).or_default().insert(version, computed_at);
    }

    pub fn versions(&self, segment: &SegmentKey) -> Vec<u64> {
        self.lock().get(segment).map(|m| m.keys().copied().collect()).unwrap_or_default()
    }

    /// Writes the version's seal file, as ingest does last; `bytes` need
    /// not be a valid one.
    pub fn put_seal_file(&self, segment: &SegmentKey, version: u64, bytes: Vec<u8>) {
        self.seals().insert((segment.clone(), version), bytes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SegmentKey, BTreeMap<u64, DateTime<Utc>>>> {
        self.versions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn seals(&self) -> std::sync::MutexGuard<'_, HashMap<(SegmentKey, u64), Vec<u8>>> {
        self.seals.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ResultStore for MemoryResults {
    async fn collect(&self, segment: &SegmentKey, older_than: DateTime<Utc>, keep: &[u64]) -> Result<usize, StoreError> {
        let mut all = self.lock();
        let Some(versions) = all.get_mut(segment) else {
            return Ok(0);
        };
        let mut removed = Vec::new();
        versions.retain(|v, computed_at| {
            let kept = keep.contains(v) || *computed_at >= older_than;
            if !kept {
                removed.push(*v);
            }
            kept
        });
        drop(all);
        let mut seals = self.seals();
        for version in &removed {
            seals.remove(&(segment.clone(), *version));
        }
        Ok(removed.len())
    }

    async fn delete_segment(&self, segment: &SegmentKey) -> Result<(), StoreError> {
        self.lock().remove(segment);
        self.seals().retain(|(key, _), _| key != segment);
        Ok(())
    }

    async fn seal_file(&self, segment: &SegmentKey, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.seals().get(&(segment.clone(), version)).cloned())
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_store_error_says_what_failed_and_keeps_its_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let error = StoreError::Unavailable(Cause::new("reading v3", io));
        assert_eq!(error.to_string(), "store unavailable: reading v3: reset by peer");
        let cause = error.source().and_then(|c| c.source()).expect("the I/O error is kept");
        let io = cause.downcast_ref::<std::io::Error>().expect("as itself");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
        assert_eq!(error.clone(), error, "clones compare equal");
        assert!(StoreError::Other("no reply".into()).source().and_then(|c| c.source()).is_none());
    }

    /// Readers switch once every live replica holds the version; a replica
    /// whose liveness ran out does not count, and with none live there is
    /// nobody to wait for. Each look asks for the load again.
    #[tokio::test]
    async fn replicas_are_ready_once_every_live_one_holds_the_version() {
        let store = MemoryStore::new();
        let key = SegmentKey::new("growth", "vip");
        assert_eq!(replicas_ready(&store, &key, 2).await.unwrap(), ReplicasReady::Ready { live: 0 });
        assert_eq!(store.load_requests().await.unwrap().get(&key), Some(&2), "the load was requested");

        let later = Utc::now() + chrono::Duration::hours(1);
        store.replica_alive("a", later).await.unwrap();
        store.replica_alive("b", later).await.unwrap();
        store.replica_alive("dead", Utc::now() - chrono::Duration::seconds(1)).await.unwrap();
        store.report_loaded("a", &key, &[1, 2]).await.unwrap();
        store.report_loaded("b", &key, &[1]).await.unwrap();
        let waiting = ReplicasReady::Waiting { live: 2, missing: vec!["b".to_string()] };
        assert_eq!(replicas_ready(&store, &key, 2).await.unwrap(), waiting);
        store.report_loaded("b", &key, &[2]).await.unwrap();
        assert_eq!(replicas_ready(&store, &key, 2).await.unwrap(), ReplicasReady::Ready { live: 2 });

        store.set_unavailable(true);
        assert!(replicas_ready(&store, &key, 2).await.unwrap_err().is_transient());
    }

    #[test]
    fn only_an_unavailable_store_is_worth_retrying() {
        assert!(StoreError::Unavailable("down".into()).is_transient());
        assert!(!StoreError::Other("a script error".into()).is_transient());
        assert!(!StoreError::MissingVersion { segment: "a/b".into(), version: 3 }.is_transient());
    }

    #[test]
    fn equal_times_go_to_the_later_offset_and_overrides_without_one_still_parse() {
        let ts = DateTime::parse_from_rfc3339("2026-11-01T10:00:00Z").unwrap().with_timezone(&Utc);
        let at =
            |offset: Option<u64>, id: &str| Override { user: "u1".into(), op: OverrideOp::Include, ts, id: id.into(), offset };
        assert!(at(Some(8), "a").supersedes(&at(Some(7), "z")), "the later offset wins, whatever the ids");
        assert!(!at(Some(7), "z").supersedes(&at(Some(8), "a")));
        assert!(!at(Some(7), "e").supersedes(&at(Some(7), "e")), "a redelivery replaces nothing");
        assert!(!at(Some(9), "e").supersedes(&at(Some(7), "e")), "nor does the producer's duplicate of the event");
        assert!(at(Some(0), "a").supersedes(&at(None, "z")), "an override recorded without an offset is the older");
        let newer = Override { ts: ts + chrono::Duration::seconds(1), ..at(Some(1), "a") };
        assert!(newer.supersedes(&at(Some(9), "z")), "time comes first");

        let stored = r#"{"user":"u1","op":"include","ts":"2026-11-01T10:00:00Z","id":"e"}"#;
        let old: Override = serde_json::from_str(stored).expect("an override stored before offsets were kept");
        assert_eq!(old, at(None, "e"));
        assert_eq!(serde_json::to_string(&old).unwrap(), stored, "and it is written back the same");
        assert_eq!(serde_json::to_value(at(Some(7), "e")).unwrap()["offset"], 7);
    }
}
