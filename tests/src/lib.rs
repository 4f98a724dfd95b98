//! Starts real servers for the integration tests: Redis, a three-node Redis
//! Cluster, an S3-compatible server (moto) and a Kafka-protocol broker
//! (tansu), each on free loopback ports with its own temporary directory,
//! so tests run in parallel. Servers stop when their handle is dropped.
//! Also writes result files the way compute does ([`write_result`]).
//!
//! [`cluster`] starts the local Kubernetes control plane
//! (`e2e/local-cluster`) once per test binary.
//!
//! Also shared by the tests of several crates: [`kube_api`], a fake
//! Kubernetes API server behind kube's mock service, [`examples`], the
//! example Segments evaluated independently of the compute path, and
//! [`table_history`], a lake table's commits as its own writer read them.

pub mod cluster;
pub mod examples;
pub mod kube_api;
pub mod table_history;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Runs a command to completion: (exit code, or -1 when killed by a
/// signal; stdout; stderr).
pub fn run_command(command: &mut Command) -> (i32, String, String) {
    let output = cluster::run(command);
    (output.code, output.stdout, output.stderr)
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

fn require(tool: &str, install: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success());
    assert!(found.unwrap_or(false), "`{tool}` is not installed: {install} (.ci/run installs it)");
}

/// Sends raw RESP and returns what the server answered first.
fn redis_command(port: u16, command: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    stream.write_all(command.as_bytes()).ok()?;
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < timeout, "{what} did not come up within {timeout:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

struct Process {
    child: Child,
}

/// Servers die with the thread that started them, even when it never
/// drops their handle (a panic that aborts, a killed test run), so no test
/// run leaves servers behind. The kernel signals on the spawning thread's
/// exit, not the process's: start long-lived servers from a thread that
/// lives as long as they must.
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_redis(port: u16, dir: &Path, extra: &[&str]) -> Process {
    require("redis-server", "apt-get install redis-server");
    let child = die_with_parent(&mut Command::new("redis-server"))
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    Process { child }
}

/// One Redis server.
pub struct RedisServer {
    pub port: u16,
    process: Process,
    dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        let process = spawn_redis(port, dir.path(), &[]);
        wait_until("redis-server", Duration::from_secs(10), || {
            redis_command(port, "PING\r\n").is_some_and(|r| r.starts_with("+PONG"))
        });
        RedisServer { port, process, dir }
    }

    /// Stops the server: an outage, until [`RedisServer::restart`].
    pub fn stop(&mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
    }

    /// Starts the server again on the same port, empty (it keeps nothing
    /// on disk), as a replaced Redis would come back.
    pub fn restart(&mut self) {
        self.stop();
        self.process = spawn_redis(self.port, self.dir.path(), &[]);
        let port = self.port;
        wait_until("redis-server", Duration::from_secs(10), || {
            redis_command(port, "PING\r\n").is_some_and(|r| r.starts_with("+PONG"))
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's process id (a benchmark reads its CPU time).
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is
    /// answered, until [`RedisServer::resume`].
    pub fn pause(&self) {
        signal(self.process.child.id(), Signal::Stop);
    }

    pub fn resume(&self) {
        signal(self.process.child.id(), Signal::Continue);
    }
}

/// The signals tests send to the processes they started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: a pod being deleted.
    Terminate,
    /// SIGKILL: a node or a container that dies at once.
    Kill,
    /// SIGSTOP: a process frozen without knowing it.
    Stop,
    /// SIGCONT: the frozen process runs on.
    Continue,
}

/// Sends `signal` to the process `pid`; panics if it is not delivered.
pub fn signal(pid: u32, signal: Signal) {
    let number = match signal {
        Signal::Terminate => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
        Signal::Stop => libc::SIGSTOP,
        Signal::Continue => libc::SIGCONT,
    };
    // SAFETY: kill(2) on a pid this test started; no memory is shared.
    let result = unsafe { libc::kill(pid as libc::pid_t, number) };
    assert_eq!(result, 0, "{signal:?} to {pid}: {}", std::io::Error::last_os_error());
}

/// A Redis Cluster of three primaries covering all slots.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _processes: Vec<Process>,
    _dir: TempDir,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        require("redis-cli", "apt-get install redis-tools");
        let dir = tempfile::tempdir().expect("a temp dir");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut processes = Vec::new();
        for port in &ports {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("a node dir");
            processes.push(spawn_redis(
                *port,
                &node_dir,
                &["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"],
            ));
        }
        for port in &ports {
            wait_until("cluster node", Duration::from_secs(10), || {
                redis_command(*port, "PING\r\n").is_some_and(|r| r.starts_with("+PONG"))
            });
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(status.success(), "redis-cli --cluster create failed");
        for port in &ports {
            wait_until("cluster_state:ok", Duration::from_secs(20), || {
                redis_command(*port, "CLUSTER INFO\r\n").is_some_and(|r| r.contains("cluster_state:ok"))
            });
        }
        RedisCluster { ports, _processes: processes, _dir: dir }
    }

    /// Seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}/")).collect()
    }
}

/// An S3-compatible server (moto) with the buckets asked for.
pub struct S3Server {
    pub port: u16,
    _process: Process,
    _dir: TempDir,
}

impl S3Server {
    pub fn start(buckets: &[&str]) -> S3Server {
        require("moto_server", "python3 -m pip install 'moto[server]'");
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        let child = die_with_parent(&mut Command::new("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let process = Process { child };
        wait_until("moto_server", Duration::from_secs(30), || http(port, "GET", "/").is_some());
        for bucket in buckets {
            let reply = http(port, "PUT", &format!("/{bucket}")).unwrap_or_default();
            assert!(reply.starts_with("HTTP/1.1 200"), "creating bucket {bucket}: {reply}");
        }
        S3Server { port, _process: process, _dir: dir }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment an S3 client needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// GET a path on a loopback port: (status, body as text); status 0 when
/// nothing listens.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let _ = stream.write_all(request.as_bytes());
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    let status = reply.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn http(port: u16, method: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    (!reply.is_empty()).then_some(reply)
}

/// One S3 server for the whole test process, with the `AWS_*` environment
/// pointing at it. S3 clients read that environment, which is global to
/// the process, so every test of a binary shares this server (and makes
/// buckets with [`S3Server::create_bucket`]).
pub fn shared_s3() -> &'static S3Server {
    static SERVER: std::sync::OnceLock<S3Server> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        // Children die with the thread that spawned them (see
        // `die_with_parent`), so the process-wide server is started from a
        // thread that lives as long as the process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(S3Server::start(&[]));
            loop {
                std::thread::park();
            }
        });
        let server = rx.recv().expect("the S3 server thread answers");
        for (key, value) in server.env() {
            // Set once, before any client of this process reads it.
            std::env::set_var(key, value);
        }
        server
    })
}

impl S3Server {
    /// Creates a bucket; an existing one is fine.
    pub fn create_bucket(&self, bucket: &str) {
        let reply = http(self.port, "PUT", &format!("/{bucket}")).unwrap_or_default();
        assert!(
            reply.starts_with("HTTP/1.1 200") || reply.contains("BucketAlreadyOwnedByYou"),
            "creating bucket {bucket}: {reply}"
        );
    }
}

/// A reply of the tiny RESP client below ([`redis_call`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The reply as text (simple and bulk strings).
    pub fn text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) => Some(s.clone()),
            Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// The reply as a list of texts (arrays of strings).
    pub fn texts(&self) -> Vec<String> {
        match self {
            Resp::Array(Some(items)) => items.iter().filter_map(Resp::text).collect(),
            _ => Vec::new(),
        }
    }
}

/// Sends one command to the server on `port` and reads its whole reply, so
/// tests can look at Redis directly (INFO, KEYS, ...) without a client
/// library. `None` when the server cannot be reached.
pub fn redis_call(port: u16, args: &[&str]) -> Option<Resp> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request).ok()?;
    read_resp(&mut std::io::BufReader::new(stream))
}

fn read_resp(reader: &mut impl std::io::BufRead) -> Option<Resp> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at_checked(1)?;
    Some(match kind {
        "+" => Resp::Simple(rest.to_string()),
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Int(rest.parse().ok()?),
        "$" => match rest.parse::<i64>().ok()? {
            n if n < 0 => Resp::Bulk(None),
            n => {
                let mut data = vec![0u8; n as usize + 2];
                reader.read_exact(&mut data).ok()?;
                data.truncate(n as usize);
                Resp::Bulk(Some(data))
            }
        },
        "*" => match rest.parse::<i64>().ok()? {
            n if n < 0 => Resp::Array(None),
            n => Resp::Array(Some((0..n).map(|_| read_resp(reader)).collect::<Option<Vec<_>>>()?)),
        },
        _ => return None,
    })
}

/// `used_memory` from `INFO memory` of the server on `port`.
pub fn redis_used_memory(port: u16) -> u64 {
    let info = redis_call(port, &["INFO", "memory"]).and_then(|r| r.text()).unwrap_or_default();
    info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

impl RedisServer {
    /// Bytes the server reports in use.
    pub fn used_memory(&self) -> u64 {
        redis_used_memory(self.port)
    }

    /// Every key matching a glob pattern (KEYS: fine for test data).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        redis_call(self.port, &["KEYS", pattern]).map(|r| r.texts()).unwrap_or_default()
    }
}

impl RedisCluster {
    /// The store URL of this cluster: `redis+cluster://host:port,...`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// Bytes in use over all nodes.
    pub fn used_memory(&self) -> u64 {
        self.ports.iter().map(|p| redis_used_memory(*p)).sum()
    }

    /// Every key matching a glob pattern, over all nodes.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.ports.iter().flat_map(|p| redis_call(*p, &["KEYS", pattern]).map(|r| r.texts()).unwrap_or_default()).collect()
    }
}

impl RedisCluster {
    /// Moves `slots` hash slots, with their keys, from node `from` to node
    /// `to` (indexes into `ports`), as an operator rebalancing would.
    pub fn reshard(&self, from: usize, to: usize, slots: u32) {
        let id = |i: usize| redis_call(self.ports[i], &["CLUSTER", "MYID"]).and_then(|r| r.text()).expect("a node id");
        let status = Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{}", self.ports[from])])
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(status.success(), "redis-cli --cluster reshard failed");
        for port in &self.ports {
            wait_until("cluster_state:ok", Duration::from_secs(20), || {
                redis_command(*port, "CLUSTER INFO\r\n").is_some_and(|r| r.contains("cluster_state:ok"))
            });
        }
    }
}

/// A Kafka-protocol broker: `tansu` with its in-memory storage engine.
pub struct KafkaBroker {
    pub port: u16,
    _process: Process,
    _dir: TempDir,
}

impl KafkaBroker {
    pub fn start() -> KafkaBroker {
        require("tansu", "cargo install tansu --features dynostore");
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).expect("a log file");
        let child = die_with_parent(&mut Command::new("tansu"))
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        let process = Process { child };
        wait_until("tansu", Duration::from_secs(30), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        KafkaBroker { port, _process: process, _dir: dir }
    }

    /// The bootstrap servers setting for clients.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Writes a result the way compute does: parts, then the manifest last.
pub async fn write_result(
    uri: &str,
    segment: &segment_core::api::SegmentKey,
    version: u64,
    snapshot_time: chrono::DateTime<chrono::Utc>,
    parts: &[Vec<String>],
) -> segment_core::manifest::Manifest {
    let dir = segment_store::results::ResultDir::open(uri).expect("a result location");
    let mut written = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        written.push(dir.write_part(i, part.iter().map(String::as_str)).await.expect("a part written"));
    }
    let manifest = segment_core::manifest::Manifest {
        format: segment_core::manifest::FORMAT.to_string(),
        segment: segment.clone(),
        version,
        generation: 1,
        definition_hash: "feedc0de".into(),
        snapshot_time,
        computed_at: snapshot_time + chrono::Duration::minutes(2),
        members: written.iter().map(|p| p.members).sum(),
        parts: written,
        index: None,
        sources: Vec::new(),
    };
    let ids = parts.iter().flatten().map(String::as_str);
    let index = segment_core::index::build(ids).expect("unique ids");
    let manifest = segment_core::manifest::Manifest {
        index: Some(dir.write_index(index, manifest.members).await.expect("the index written")),
        ..manifest
    };
    dir.write_manifest(&manifest).await.expect("the manifest written");
    manifest
}

/// Makes the local (`file://`) result at `uri` one written before index
/// files existed: its manifest lists no index, and the index file is gone.
pub async fn as_before_index_files(uri: &str) {
    let dir = segment_store::results::ResultDir::open(uri).expect("a result location");
    let manifest = dir.read_manifest().await.expect("the manifest read").expect("a manifest");
    dir.write_manifest(&segment_core::manifest::Manifest { index: None, ..manifest }).await.expect("the manifest written");
    let path = Path::new(uri.strip_prefix("file://").expect("a local result")).join(segment_core::index::INDEX_FILE);
    std::fs::remove_file(path).expect("the index file removed");
}

/// A fixed-seed splitmix64: the same numbers on every run, with no
/// dependency; benchmarks and property-style tests draw their data from it.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
