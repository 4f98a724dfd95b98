//! Starts real servers for the integration tests: Redis, a three-node Redis
//! Cluster and an S3-compatible server (moto), each on free loopback ports
//! with its own temporary directory, so tests run in parallel. Servers
//! stop when their handle is dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

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

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_redis(port: u16, dir: &Path, extra: &[&str]) -> Process {
    require("redis-server", "apt-get install redis-server");
    let child = Command::new("redis-server")
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
    _process: Process,
    _dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("a temp dir");
        let port = free_port();
        let process = spawn_redis(port, dir.path(), &[]);
        wait_until("redis-server", Duration::from_secs(10), || {
            redis_command(port, "PING\r\n").is_some_and(|r| r.starts_with("+PONG"))
        });
        RedisServer { port, _process: process, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
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
        let child = Command::new("moto_server")
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

fn http(port: u16, method: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    (!reply.is_empty()).then_some(reply)
}
