//! A deterministic example lake: the same `LakeSpec` always gives the same
//! rows and the same files, so examples, tests and benchmarks agree on what
//! a segment should contain.
//!
//! ```text
//! <out>/users/users.csv                    user_id,country,signup_at,plan
//! <out>/users-delta/                       the same users as a Delta Lake
//!                                          table: part-00000.parquet and
//!                                          _delta_log/00000000000000000000.json
//! <out>/orders/part-00000.parquet ...      order_id,user_id,amount,status,created_at
//! <out>/app_events/events-00000.ndjson ... {"user_id","event","ts"}
//! <out>/lists/vip.csv                      user_id,account_manager
//! ```
//!
//! Rows are produced user by user ([`rows`]) and written as they come, so a
//! lake of millions of users and tens of millions of events is written in
//! bounded memory. Tests evaluate segments over the same rows in plain Rust.
//! Every timestamp is a whole second in UTC, at or before `spec.now`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Duration, SecondsFormat, TimeZone, Utc};
use datafusion::arrow::array::{ArrayRef, Float64Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::Compression;
use datafusion::parquet::file::properties::WriterProperties;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

pub const COUNTRIES: [&str; 6] = ["ES", "IT", "FR", "DE", "PT", "US"];
pub const PLANS: [&str; 3] = ["free", "plus", "pro"];
pub const ORDER_STATUSES: [&str; 3] = ["delivered", "cancelled", "returned"];
pub const EVENTS: [&str; 5] = ["app_open", "search", "view_item", "add_to_cart", "checkout"];
pub const ACCOUNT_MANAGERS: [&str; 4] = ["ana", "marco", "lea", "jonas"];

/// Days of history before `now` that orders and events fall in.
pub const HISTORY_DAYS: i64 = 180;
/// Users on the VIP list (fewer when the lake has fewer users).
pub const VIP_USERS: u64 = 300;

const ORDERS_PER_FILE: usize = 1_000_000;
const EVENTS_PER_FILE: usize = 2_000_000;
const ORDER_BATCH: usize = 65_536;
const ROW_GROUP: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct LakeSpec {
    pub users: u64,
    pub seed: u64,
    /// The reference time: all activity happens in the `HISTORY_DAYS` before it.
    pub now: DateTime<Utc>,
    /// Mean orders per user (uniform between 0 and twice this).
    pub orders_per_user: u32,
    /// Mean app events per user (uniform between 0 and twice this).
    pub events_per_user: u32,
}

impl LakeSpec {
    /// `users` users with the default activity, seen from [`LakeSpec::reference_now`].
    pub fn new(users: u64, seed: u64) -> LakeSpec {
        LakeSpec { users, seed, now: Self::reference_now(), orders_per_user: 3, events_per_user: 10 }
    }

    /// The fixed reference time of [`LakeSpec::new`].
    pub fn reference_now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).single().unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub user_id: String,
    pub country: &'static str,
    pub signup_at: DateTime<Utc>,
    pub plan: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub order_id: i64,
    pub user_id: String,
    pub amount: f64,
    pub status: &'static str,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AppEvent {
    pub user_id: String,
    pub event: &'static str,
    pub ts: DateTime<Utc>,
}

/// One user and everything they did.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRows {
    pub user: User,
    pub orders: Vec<Order>,
    pub events: Vec<AppEvent>,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LakeSummary {
    pub users: u64,
    pub orders: u64,
    pub events: u64,
    pub vip: u64,
    pub files: Vec<PathBuf>,
}

/// The id of user number `index`.
pub fn user_id(index: u64) -> String {
    format!("u{index:07}")
}

/// The lake's rows, user by user, in the order [`generate`] writes them.
pub fn rows(spec: &LakeSpec) -> impl Iterator<Item = UserRows> + '_ {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut next_order_id = 1_i64;
    let history = HISTORY_DAYS * 86_400;
    (0..spec.users).map(move |index| {
        let id = user_id(index);
        // Each user stops being active at some point in the window, so
        // "lapsed" and "churning" users exist in every lake.
        let recency = rng.random_range(0..history);
        let active_from = spec.now - Duration::seconds(history);
        let active_span = history - recency;
        let signup_at = active_from - Duration::seconds(rng.random_range(0..720 * 86_400));
        let user = User {
            user_id: id.clone(),
            country: COUNTRIES[rng.random_range(0..COUNTRIES.len())],
            signup_at,
            plan: PLANS[rng.random_range(0..PLANS.len())],
        };
        let instant = |rng: &mut StdRng| active_from + Duration::seconds(rng.random_range(0..=active_span));
        let order_count = rng.random_range(0..=2 * spec.orders_per_user);
        let mut orders = Vec::with_capacity(order_count as usize);
        for _ in 0..order_count {
            let status = match rng.random_range(0..100) {
                0..80 => ORDER_STATUSES[0],
                80..92 => ORDER_STATUSES[1],
                _ => ORDER_STATUSES[2],
            };
            let amount = f64::from(rng.random_range(500_u32..30_000)) / 100.0;
            orders.push(Order { order_id: next_order_id, user_id: id.clone(), amount, status, created_at: instant(&mut rng) });
            next_order_id += 1;
        }
        let event_count = rng.random_range(0..=2 * spec.events_per_user);
        let events = (0..event_count)
            .map(|_| AppEvent { user_id: id.clone(), event: EVENTS[rng.random_range(0..EVENTS.len())], ts: instant(&mut rng) })
            .collect();
        UserRows { user, orders, events }
    })
}

/// The users on `lists/vip.csv`, with their account manager, sorted by id.
pub fn vip_list(spec: &LakeSpec) -> Vec<(String, &'static str)> {
    // A stream of its own, so the list does not shift the other tables.
    let mut rng = StdRng::seed_from_u64(spec.seed ^ 0x5649_505f_4c49_5354);
    let amount = VIP_USERS.min(spec.users) as usize;
    let mut picked: Vec<u64> =
        rand::seq::index::sample(&mut rng, spec.users as usize, amount).into_iter().map(|i| i as u64).collect();
    picked.sort_unstable();
    picked.into_iter().map(|i| (user_id(i), ACCOUNT_MANAGERS[rng.random_range(0..ACCOUNT_MANAGERS.len())])).collect()
}

/// RFC 3339 in UTC with a `Z`, as the CSV and NDJSON files hold timestamps.
pub fn timestamp_text(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The schema of the orders Parquet files; `tz` is the timestamp's zone
/// (`Some("UTC")` in generated lakes, `None` for naive timestamps).
pub fn orders_schema(tz: Option<&str>) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("order_id", DataType::Int64, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("amount", DataType::Float64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("created_at", DataType::Timestamp(TimeUnit::Microsecond, tz.map(Arc::from)), false),
    ]))
}

/// Orders as one Arrow batch of [`orders_schema`].
pub fn orders_batch(orders: &[Order], tz: Option<&str>) -> std::io::Result<RecordBatch> {
    let mut ids = Int64Builder::with_capacity(orders.len());
    let mut users = StringBuilder::new();
    let mut amounts = Float64Builder::with_capacity(orders.len());
    let mut statuses = StringBuilder::new();
    let mut created = TimestampMicrosecondBuilder::with_capacity(orders.len()).with_timezone_opt(tz.map(Arc::<str>::from));
    for order in orders {
        ids.append_value(order.order_id);
        users.append_value(&order.user_id);
        amounts.append_value(order.amount);
        statuses.append_value(order.status);
        created.append_value(order.created_at.timestamp_micros());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(users.finish()),
        Arc::new(amounts.finish()),
        Arc::new(statuses.finish()),
        Arc::new(created.finish()),
    ];
    RecordBatch::try_new(orders_schema(tz), columns).map_err(std::io::Error::other)
}

/// Writes orders to one Parquet file.
pub fn write_orders_parquet(path: &Path, orders: &[Order], tz: Option<&str>) -> std::io::Result<()> {
    let mut writer = OrdersWriter::create(path, tz)?;
    for chunk in orders.chunks(ORDER_BATCH) {
        writer.write(&orders_batch(chunk, tz)?)?;
    }
    writer.close()
}

struct OrdersWriter {
    inner: ArrowWriter<File>,
}

impl OrdersWriter {
    fn create(path: &Path, tz: Option<&str>) -> std::io::Result<OrdersWriter> {
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP))
            // The default names the writer's version; a fixed value keeps
            // the files byte-identical across builds.
            .set_created_by("segment-worker lakegen".to_string())
            .build();
        let file = File::create(path)?;
        let inner = ArrowWriter::try_new(file, orders_schema(tz), Some(props)).map_err(std::io::Error::other)?;
        Ok(OrdersWriter { inner })
    }

    fn write(&mut self, batch: &RecordBatch) -> std::io::Result<()> {
        self.inner.write(batch).map_err(std::io::Error::other)
    }

    fn close(self) -> std::io::Result<()> {
        self.inner.close().map(|_| ()).map_err(std::io::Error::other)
    }
}

/// Writes the lake under `out` and returns what it wrote. Files a previous
/// run left in the lake's directories are replaced.
pub fn generate(out: &Path, spec: &LakeSpec) -> std::io::Result<LakeSummary> {
    let users_dir = out.join("users");
    let users_delta_dir = out.join("users-delta");
    let orders_dir = out.join("orders");
    let events_dir = out.join("app_events");
    let lists_dir = out.join("lists");
    for dir in [&users_dir, &users_delta_dir, &orders_dir, &events_dir, &lists_dir] {
        std::fs::create_dir_all(dir)?;
    }
    // A smaller lake written over a bigger one must not keep its extra parts.
    remove_generated(&orders_dir, "part-", ".parquet")?;
    remove_generated(&events_dir, "events-", ".ndjson")?;

    let mut files = Vec::new();
    let users_path = users_dir.join("users.csv");
    let mut users_csv = BufWriter::with_capacity(1 << 20, File::create(&users_path)?);
    writeln!(users_csv, "user_id,country,signup_at,plan")?;
    files.push(users_path);
    let mut users_delta = UsersDelta::create(&users_delta_dir)?;

    let mut orders =
        RotatingOrders { dir: orders_dir, writer: None, in_file: 0, files: 0, pending: Vec::new(), written: Vec::new() };
    let mut events = RotatingEvents { dir: events_dir, writer: None, in_file: 0, files: 0, written: Vec::new() };
    let mut summary = LakeSummary { users: 0, orders: 0, events: 0, vip: 0, files: Vec::new() };
    let mut line = String::with_capacity(128);
    for rows in rows(spec) {
        let user = &rows.user;
        writeln!(users_csv, "{},{},{},{}", user.user_id, user.country, timestamp_text(&user.signup_at), user.plan)?;
        users_delta.push(user)?;
        summary.users += 1;
        summary.orders += rows.orders.len() as u64;
        summary.events += rows.events.len() as u64;
        for order in rows.orders {
            orders.push(order)?;
        }
        for event in &rows.events {
            line.clear();
            line.push_str("{\"user_id\":\"");
            line.push_str(&event.user_id);
            line.push_str("\",\"event\":\"");
            line.push_str(event.event);
            line.push_str("\",\"ts\":\"");
            line.push_str(&timestamp_text(&event.ts));
            line.push_str("\"}\n");
            events.write_line(&line)?;
        }
    }
    users_csv.flush()?;
    files.extend(users_delta.finish(spec.now)?);
    files.extend(orders.finish()?);
    files.extend(events.finish()?);

    let vip_path = lists_dir.join("vip.csv");
    let mut vip = BufWriter::new(File::create(&vip_path)?);
    writeln!(vip, "user_id,account_manager")?;
    for (id, manager) in vip_list(spec) {
        writeln!(vip, "{id},{manager}")?;
        summary.vip += 1;
    }
    vip.flush()?;
    files.push(vip_path);
    summary.files = files;
    Ok(summary)
}

/// The users as a Delta Lake table of one commit: a Parquet file and the
/// log entry that adds it, as a Delta writer leaves them, so examples read
/// a Delta source. The commit carries an in-commit timestamp (writer
/// feature `inCommitTimestamp`; no reader feature): the lake's `now`, not
/// the time the files were written, so a run at `now` reads it whenever
/// the lake was generated.
struct UsersDelta {
    dir: PathBuf,
    writer: ArrowWriter<File>,
    pending: Vec<User>,
}

const USERS_DELTA_FILE: &str = "part-00000.parquet";

impl UsersDelta {
    fn create(dir: &Path) -> std::io::Result<UsersDelta> {
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by("segment-worker lakegen".to_string())
            .build();
        let file = File::create(dir.join(USERS_DELTA_FILE))?;
        let writer = ArrowWriter::try_new(file, users_schema(), Some(props)).map_err(std::io::Error::other)?;
        Ok(UsersDelta { dir: dir.to_path_buf(), writer, pending: Vec::new() })
    }

    fn push(&mut self, user: &User) -> std::io::Result<()> {
        self.pending.push(user.clone());
        if self.pending.len() == ORDER_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut ids = StringBuilder::new();
        let mut countries = StringBuilder::new();
        let mut signups = TimestampMicrosecondBuilder::with_capacity(self.pending.len()).with_timezone("UTC");
        let mut plans = StringBuilder::new();
        for user in self.pending.drain(..) {
            ids.append_value(&user.user_id);
            countries.append_value(user.country);
            signups.append_value(user.signup_at.timestamp_micros());
            plans.append_value(user.plan);
        }
        let columns: Vec<ArrayRef> =
            vec![Arc::new(ids.finish()), Arc::new(countries.finish()), Arc::new(signups.finish()), Arc::new(plans.finish())];
        let batch = RecordBatch::try_new(users_schema(), columns).map_err(std::io::Error::other)?;
        self.writer.write(&batch).map_err(std::io::Error::other)
    }

    /// Closes the data file and commits it as version 0 at `now`.
    fn finish(mut self, now: DateTime<Utc>) -> std::io::Result<Vec<PathBuf>> {
        if !self.pending.is_empty() {
            self.flush()?;
        }
        self.writer.close().map_err(std::io::Error::other)?;
        let data = self.dir.join(USERS_DELTA_FILE);
        let columns = [("user_id", "string"), ("country", "string"), ("signup_at", "timestamp"), ("plan", "string")];
        let commit = write_delta_commit(&self.dir, "users", std::slice::from_ref(&data), &columns, now)?;
        Ok(vec![data, commit])
    }
}

/// Makes the Parquet `files` under `dir` a Delta Lake table: writes its
/// first commit, `_delta_log/00000000000000000000.json` (protocol, table
/// metadata with `columns` as Delta types, one `add` per file), with an
/// in-commit timestamp at `now` (writer feature `inCommitTimestamp`, no
/// reader feature), so the table's time is the lake's, not the files'.
/// Returns the commit file.
pub fn write_delta_commit(
    dir: &Path,
    name: &str,
    files: &[PathBuf],
    columns: &[(&str, &str)],
    now: DateTime<Utc>,
) -> std::io::Result<PathBuf> {
    let log = dir.join("_delta_log");
    if log.exists() {
        std::fs::remove_dir_all(&log)?;
    }
    std::fs::create_dir_all(&log)?;
    let millis = now.timestamp_millis();
    let fields: Vec<serde_json::Value> = columns
        .iter()
        .map(|(column, kind)| serde_json::json!({"name": column, "type": kind, "nullable": false, "metadata": {}}))
        .collect();
    let schema = serde_json::json!({"type": "struct", "fields": fields});
    let mut actions = vec![
        // First, as the feature requires.
        serde_json::json!({"commitInfo": {"inCommitTimestamp": millis, "timestamp": millis, "operation": "WRITE",
            "operationParameters": {"mode": "Overwrite"}, "engineInfo": "segment-worker lakegen"}}),
        serde_json::json!({"protocol": {"minReaderVersion": 1, "minWriterVersion": 7, "writerFeatures": ["inCommitTimestamp"]}}),
        serde_json::json!({"metaData": {"id": format!("lakegen-{name}"), "name": name,
            "format": {"provider": "parquet", "options": {}}, "schemaString": schema.to_string(),
            "partitionColumns": [], "configuration": {"delta.enableInCommitTimestamps": "true"}, "createdTime": millis}}),
    ];
    for file in files {
        let relative = file
            .strip_prefix(dir)
            .map_err(|_| std::io::Error::other(format!("{} is not under {}", file.display(), dir.display())))?;
        let size = std::fs::metadata(file)?.len();
        actions.push(serde_json::json!({"add": {"path": relative.to_string_lossy(), "partitionValues": {}, "size": size,
            "modificationTime": millis, "dataChange": true}}));
    }
    let commit = log.join("00000000000000000000.json");
    let mut out = BufWriter::new(File::create(&commit)?);
    for action in actions {
        writeln!(out, "{action}")?;
    }
    out.flush()?;
    Ok(commit)
}

/// The users table's columns, as the Delta copy stores them.
pub fn users_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("country", DataType::Utf8, false),
        Field::new("signup_at", DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from("UTC"))), false),
        Field::new("plan", DataType::Utf8, false),
    ]))
}

fn remove_generated(dir: &Path, prefix: &str, suffix: &str) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(prefix) && name.ends_with(suffix) {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

struct RotatingOrders {
    dir: PathBuf,
    writer: Option<OrdersWriter>,
    in_file: usize,
    files: usize,
    pending: Vec<Order>,
    written: Vec<PathBuf>,
}

impl RotatingOrders {
    fn push(&mut self, order: Order) -> std::io::Result<()> {
        self.pending.push(order);
        if self.pending.len() >= ORDER_BATCH || self.in_file + self.pending.len() >= ORDERS_PER_FILE {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.writer.is_none() {
            let path = self.dir.join(format!("part-{:05}.parquet", self.files));
            self.writer = Some(OrdersWriter::create(&path, Some("UTC"))?);
            self.written.push(path);
            self.files += 1;
            self.in_file = 0;
        }
        let batch = orders_batch(&self.pending, Some("UTC"))?;
        self.in_file += self.pending.len();
        self.pending.clear();
        if let Some(writer) = self.writer.as_mut() {
            writer.write(&batch)?;
        }
        if self.in_file >= ORDERS_PER_FILE {
            if let Some(writer) = self.writer.take() {
                writer.close()?;
            }
        }
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<Vec<PathBuf>> {
        self.flush()?;
        if let Some(writer) = self.writer.take() {
            writer.close()?;
        }
        // A lake without orders still has an orders table (with its schema).
        if self.written.is_empty() {
            let path = self.dir.join("part-00000.parquet");
            OrdersWriter::create(&path, Some("UTC"))?.close()?;
            self.written.push(path);
        }
        Ok(self.written)
    }
}

struct RotatingEvents {
    dir: PathBuf,
    writer: Option<BufWriter<File>>,
    in_file: usize,
    files: usize,
    written: Vec<PathBuf>,
}

impl RotatingEvents {
    fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        if self.in_file >= EVENTS_PER_FILE {
            if let Some(mut writer) = self.writer.take() {
                writer.flush()?;
            }
        }
        let writer = match &mut self.writer {
            Some(writer) => writer,
            None => {
                let path = self.dir.join(format!("events-{:05}.ndjson", self.files));
                self.files += 1;
                self.in_file = 0;
                self.written.push(path.clone());
                self.writer.insert(BufWriter::with_capacity(1 << 20, File::create(path)?))
            }
        };
        writer.write_all(line.as_bytes())?;
        self.in_file += 1;
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<Vec<PathBuf>> {
        if let Some(mut writer) = self.writer.take() {
            writer.flush()?;
        }
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_deterministic_and_inside_the_window() {
        let spec = LakeSpec::new(200, 7);
        let a: Vec<UserRows> = rows(&spec).collect();
        let b: Vec<UserRows> = rows(&spec).collect();
        assert_eq!(a, b);
        let other: Vec<UserRows> = rows(&LakeSpec::new(200, 8)).collect();
        assert_ne!(a, other);
        let earliest = spec.now - Duration::days(HISTORY_DAYS);
        for r in &a {
            for o in &r.orders {
                assert!(o.created_at <= spec.now && o.created_at >= earliest);
                assert_eq!(o.created_at.timestamp_subsec_nanos(), 0);
            }
            for e in &r.events {
                assert!(e.ts <= spec.now && e.ts >= earliest);
            }
            assert!(r.user.signup_at <= earliest);
        }
        let ids: Vec<i64> = a.iter().flat_map(|r| r.orders.iter().map(|o| o.order_id)).collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "order ids are sequential");
        let vip = vip_list(&spec);
        assert_eq!(vip.len(), 200);
        assert_eq!(vip, vip_list(&spec));
    }
}
