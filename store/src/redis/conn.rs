//! One connection type for a single server and a cluster, so every store
//! operation is written once, plus batches that become one pipeline on a
//! single server and one pipeline per node on a cluster, and the mapping of
//! Redis failures to [`StoreError`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{cmd, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};
use segment_core::store::{Cause, StoreError};

/// Per-slot pipelines of one cluster batch in flight at once.
const CLUSTER_FANOUT: usize = 64;
/// Slots in a Redis Cluster.
const SLOTS: usize = 16_384;

/// The cluster slot of a key: CRC16 (XMODEM) of its hash tag, the part
/// between the first `{` and the next `}` when that is not empty, else of
/// the whole key.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter().position(|b| *b == b'}').filter(|close| *close > 0).map(|close| &rest[..close])
    });
    let mut crc: u16 = 0;
    for byte in tagged.unwrap_or(key) {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % SLOTS as u16
}

#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection, Arc<SlotTable>),
}

/// Where [`Conn::scan_page`] runs.
pub(crate) enum ScanTarget {
    /// The one server.
    Server,
    /// A cluster primary, by address.
    Node(String, u16),
}

/// Which primary serves each slot, as `CLUSTER SLOTS` last said. Only an
/// optimisation (it lets one pipeline carry many slots of one node): a
/// stale entry costs a MOVED reply and a retry through redis-rs' own
/// routing, never a wrong answer.
#[derive(Default)]
pub(crate) struct SlotTable {
    nodes: RwLock<Option<Arc<Nodes>>>,
}

struct Nodes {
    /// Per slot, an index into `addresses` (`None`: not served).
    owner: Vec<Option<usize>>,
    addresses: Vec<(String, u16)>,
}

impl SlotTable {
    fn current(&self) -> Option<Arc<Nodes>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, nodes: Option<Arc<Nodes>>) {
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = nodes;
    }
}

impl Nodes {
    /// Parses `CLUSTER SLOTS`: `[[start, end, [host, port, ...], replicas...], ...]`.
    fn parse(reply: Value) -> Option<Nodes> {
        let Value::Array(ranges) = reply else { return None };
        let mut nodes = Nodes { owner: vec![None; SLOTS], addresses: Vec::new() };
        for range in ranges {
            let Value::Array(fields) = range else { return None };
            let mut fields = fields.into_iter();
            let start: usize = redis::from_redis_value(fields.next()?).ok()?;
            let end: usize = redis::from_redis_value(fields.next()?).ok()?;
            let Value::Array(primary) = fields.next()? else { return None };
            let mut primary = primary.into_iter();
            let host: String = redis::from_redis_value(primary.next()?).ok()?;
            let port: u16 = redis::from_redis_value(primary.next()?).ok()?;
            let index = match nodes.addresses.iter().position(|a| a.0 == host && a.1 == port) {
                Some(index) => index,
                None => {
                    nodes.addresses.push((host, port));
                    nodes.addresses.len() - 1
                }
            };
            for slot in nodes.owner.get_mut(start..=end)? {
                *slot = Some(index);
            }
        }
        Some(nodes)
    }
}

/// Whether a command's error reply means "not here, not now": it was not
/// executed, and redis-rs' per-slot routing will find where it goes.
fn misrouted(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if matches!(
        e.kind(),
        Some(ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown | ServerErrorKind::MasterDown)
    ))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c, _) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c, _) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c, _) => c.get_db(),
        }
    }
}

/// Commands sent in one round trip, each with the key that routes it.
/// Results come back in the order the commands were added.
#[derive(Default)]
pub(crate) struct Batch {
    cmds: Vec<(u16, Cmd)>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Adds `cmd`, routed like `route_key` (its first key, or for a keyless
    /// command such as PUBLISH, the key of the command it travels with).
    pub fn add(&mut self, route_key: &str, cmd: Cmd) -> &mut Batch {
        self.cmds.push((key_slot(route_key.as_bytes()), cmd));
        self
    }

    pub fn len(&self) -> usize {
        self.cmds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }
}

impl Conn {
    /// Runs a batch: one pipeline on a single server. On a cluster, one
    /// pipeline per node (a node executes each command for its own slot);
    /// whatever comes back misrouted, or from a node that failed, goes
    /// again through per-slot pipelines, which redis-rs redirects and
    /// retries. Every batch the store sends is idempotent, so repeating
    /// part of one is harmless.
    pub async fn run(&self, batch: Batch) -> Result<Vec<Value>, RedisError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Conn::Single(c) => {
                let mut pipe = Pipeline::with_capacity(batch.len());
                for (_, cmd) in batch.cmds {
                    pipe.add_command(cmd);
                }
                pipe.query_async(&mut c.clone()).await
            }
            Conn::Cluster(c, table) => {
                let mut results = vec![Value::Nil; batch.len()];
                let nodes = match table.current() {
                    Some(nodes) => Some(nodes),
                    None => Self::load_slots(c, table).await,
                };
                let retry = match nodes {
                    Some(nodes) => Self::run_by_node(c, &nodes, &batch, &mut results).await,
                    None => (0..batch.len()).collect(),
                };
                if !retry.is_empty() {
                    tracing::debug!(misrouted = retry.len(), of = batch.len(), "slot table stale; retrying per slot");
                    table.set(None);
                    let again = retry.iter().map(|i| batch.cmds[*i].clone()).collect();
                    let values = Self::run_by_slot(c, again).await?;
                    for (i, value) in retry.into_iter().zip(values) {
                        results[i] = value;
                    }
                }
                results.into_iter().map(Value::extract_error).collect()
            }
        }
    }

    /// Where a `SCAN` over every key runs: the server, or each primary of
    /// the cluster (each holds its own slots' keys).
    pub async fn scan_targets(&self) -> Result<Vec<ScanTarget>, RedisError> {
        match self {
            Conn::Single(_) => Ok(vec![ScanTarget::Server]),
            Conn::Cluster(c, table) => {
                let nodes = Self::load_slots(c, table)
                    .await
                    .ok_or_else(|| RedisError::from((ErrorKind::ClusterConnectionNotFound, "CLUSTER SLOTS gave no primaries")))?;
                Ok(nodes.addresses.iter().map(|(host, port)| ScanTarget::Node(host.clone(), *port)).collect())
            }
        }
    }

    /// One page of `SCAN cursor MATCH pattern` on `target`: the next cursor
    /// (0 when done) and the keys found. A key may come on more than one
    /// page (SCAN's guarantee); callers must not mind.
    pub async fn scan_page(&self, target: &ScanTarget, cursor: u64, pattern: &str) -> Result<(u64, Vec<String>), RedisError> {
        let scan = cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).clone();
        match (self, target) {
            (Conn::Single(c), _) => scan.query_async(&mut c.clone()).await,
            (Conn::Cluster(c, _), ScanTarget::Node(host, port)) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port });
                Ok(redis::from_redis_value(c.clone().route_command(scan, route).await?)?)
            }
            (Conn::Cluster(..), ScanTarget::Server) => {
                Err(RedisError::from((ErrorKind::ClusterConnectionNotFound, "a cluster is scanned node by node")))
            }
        }
    }

    async fn load_slots(c: &ClusterConnection, table: &SlotTable) -> Option<Arc<Nodes>> {
        let reply = c
            .clone()
            .route_command(cmd("CLUSTER").arg("SLOTS").clone(), RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
            .await;
        let nodes = reply.ok().and_then(Nodes::parse).map(Arc::new);
        table.set(nodes.clone());
        nodes
    }

    /// Sends one pipeline per node and fills `results`; returns the indexes
    /// that must go again.
    async fn run_by_node(c: &ClusterConnection, nodes: &Nodes, batch: &Batch, results: &mut [Value]) -> Vec<usize> {
        let mut retry = Vec::new();
        let mut groups: HashMap<usize, (Vec<usize>, Pipeline)> = HashMap::new();
        for (i, (slot, cmd)) in batch.cmds.iter().enumerate() {
            match nodes.owner[usize::from(*slot)] {
                Some(node) => {
                    let (indexes, pipe) = groups.entry(node).or_insert_with(|| (Vec::new(), Pipeline::new()));
                    indexes.push(i);
                    pipe.add_command(cmd.clone());
                }
                None => retry.push(i),
            }
        }
        let sends = groups.into_iter().map(|(node, (indexes, pipe))| {
            let (host, port) = nodes.addresses[node].clone();
            let mut conn = c.clone();
            async move {
                let count = pipe.len();
                let route = SingleNodeRoutingInfo::ByAddress { host, port };
                (indexes, conn.route_pipeline(pipe, 0, count, route).await)
            }
        });
        for (indexes, reply) in futures::future::join_all(sends).await {
            match reply {
                Ok(values) if values.len() == indexes.len() => {
                    for (i, value) in indexes.into_iter().zip(values) {
                        if misrouted(&value) {
                            retry.push(i);
                        } else {
                            results[i] = value;
                        }
                    }
                }
                _ => retry.extend(indexes),
            }
        }
        retry
    }

    /// One pipeline per slot (the unit redis-rs routes and redirects).
    async fn run_by_slot(c: &ClusterConnection, cmds: Vec<(u16, Cmd)>) -> Result<Vec<Value>, RedisError> {
        let total = cmds.len();
        let mut groups: HashMap<u16, (Vec<usize>, Pipeline)> = HashMap::new();
        for (i, (slot, cmd)) in cmds.into_iter().enumerate() {
            let (indexes, pipe) = groups.entry(slot).or_insert_with(|| (Vec::new(), Pipeline::new()));
            indexes.push(i);
            pipe.add_command(cmd);
        }
        let mut results = vec![Value::Nil; total];
        let mut replies = futures::stream::iter(groups.into_values())
            .map(|(indexes, pipe)| {
                let mut conn = c.clone();
                async move {
                    let values: Vec<Value> = pipe.query_async(&mut conn).await?;
                    Ok::<_, RedisError>((indexes, values))
                }
            })
            .buffer_unordered(CLUSTER_FANOUT);
        while let Some((indexes, values)) = replies.try_next().await? {
            for (i, value) in indexes.into_iter().zip(values) {
                results[i] = value;
            }
        }
        Ok(results)
    }
}

/// Runs `op` with a deadline; a missed deadline means the store is
/// unavailable (the caller answers from cache or fails fast). No deadline
/// (`None`) is for callers that bound the call themselves.
pub(crate) async fn within<T>(
    limit: impl Into<Option<Duration>>,
    op: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    let Some(limit) = limit.into() else { return op.await.map_err(store_error) };
    match tokio::time::timeout(limit, op).await {
        Ok(result) => result.map_err(store_error),
        Err(_) => Err(StoreError::Unavailable(format!("no answer from Redis within {limit:?}").into())),
    }
}

/// Connection trouble and cluster states that heal by themselves are
/// `Unavailable` (retry later); anything else is a bug or bad data.
pub(crate) fn store_error(e: RedisError) -> StoreError {
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                )
        );
    if transient {
        StoreError::Unavailable(Cause::new("redis", e))
    } else {
        StoreError::Other(Cause::new("redis", e))
    }
}

/// Converts one reply, naming what was expected when it does not fit.
pub(crate) fn parse<T: FromRedisValue>(value: Value, what: &str) -> Result<T, StoreError> {
    redis::from_redis_value(value).map_err(|e| StoreError::Other(Cause::new(format!("unexpected reply for {what}"), e)))
}

#[cfg(test)]
mod tests {
    use super::key_slot;
    use redis::cluster_routing::{Route, SlotAddr};

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"123456789"), 0x31C3, "the CRC16 check value");
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"), "an empty tag hashes the whole key");
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        for key in ["sg:{ns/a}:v1", "sg:u:{user-1}", "sg:aliases", "x{}", "{a}b}"] {
            assert_eq!(
                Route::with_key(key, SlotAddr::Master),
                Route::new(key_slot(key.as_bytes()), SlotAddr::Master),
                "redis-rs routes {key} to the same slot"
            );
        }
    }
}
