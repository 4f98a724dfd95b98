//! Runs the API the way `segment-serving` does: a thread per core, each
//! with its own single-threaded Tokio runtime and its own store
//! connection, all accepting on one listening socket.
//!
//! Why not one multi-threaded runtime: a request's work is a socket read,
//! a cache lookup or one store round trip, and a socket write. On a shared
//! runtime the request task, the Redis connection's driver task and the
//! workers that steal between them wake each other across threads, and
//! those wake-ups (futexes, context switches) cost more than the request
//! itself; profiles of the benchmark showed them next to the socket I/O
//! (docs/benchmarks.md). Here a connection, its requests and the store
//! round trips they make stay on the thread that accepted it. Commands of
//! concurrent requests still share the thread's one Redis connection, so
//! they leave in one write (redis-rs pipelines what is queued).
//!
//! What threads share: the caches, the alias map and its follower task,
//! the metrics ([`AppState::with_store`]), and the permits of the
//! connection limit. `/metrics` has its own listener, served by the first
//! thread to connect.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use segment_core::store::StoreError;
use segment_store::redis::{RedisStore, RedisStoreOptions};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use crate::connection::Connection;
use crate::{metrics_router, router, AppState, ServingConfig, ServingStore};

const FIRST_RETRY: Duration = Duration::from_millis(200);
const LAST_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listening on {address}: {source}")]
    Listen { address: SocketAddr, source: std::io::Error },
    #[error("starting serving thread {thread}: {source}")]
    Thread { thread: usize, source: std::io::Error },
    #[error("serving thread {thread}: {source}")]
    Serve { thread: usize, source: std::io::Error },
    #[error("serving thread {thread} panicked")]
    Panicked { thread: usize },
}

/// Serving's threads are named this, then their number (`serving-0`): what
/// `top -H`, `perf` and the serving benchmark's CPU accounting see.
pub const THREAD_NAME_PREFIX: &str = "serving-";

/// Where and how the API listens.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The API's address (port 0 picks one: see [`Server::address`]).
    pub listen: SocketAddr,
    /// The address of `/metrics` ([`metrics_router`]), apart from the API.
    pub metrics_listen: SocketAddr,
    /// Serving threads; 0: one per CPU the process may use, its cgroup CPU
    /// limit included.
    pub threads: usize,
    pub limits: ConnectionLimits,
}

/// What one client connection may hold of the API, so that clients that
/// are slow, idle or too many cannot starve the others.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Most API connections open at once, over every thread. Past it the
    /// server stops accepting, and new connections wait in the kernel's
    /// listen backlog until one closes.
    pub max_connections: usize,
    /// How long a request's headers may take to arrive, from their first
    /// byte: a client sending them a byte at a time (a slowloris) is cut off.
    pub header_read_timeout: Duration,
    /// How long a connection may wait for its next request, or for its
    /// first; past it the connection is closed. Keep it above the idle
    /// timeout of the load balancer in front, so that the balancer, not
    /// the server, closes the connections it pools.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
        }
    }
}

/// The API serving on its threads until [`shutdown`](Server::shutdown).
pub struct Server {
    address: SocketAddr,
    metrics_address: SocketAddr,
    shutdown: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<Result<(), ServeError>>>,
    /// A thread's index once it has stopped, for [`stopped`](Server::stopped).
    stopped: mpsc::UnboundedReceiver<usize>,
}

impl Server {
    /// Listens on `options.listen` and `options.metrics_listen` and starts
    /// the serving threads. Each opens its store connection with
    /// `connect`, retrying with backoff for as long as the store is
    /// unreachable (a pod starting before Redis): until then its
    /// connections wait in the listen backlog or go to a thread that is
    /// connected. The first connected thread loads the alias map and
    /// serves the metrics.
    pub fn start<C, F>(options: ServerOptions, config: ServingConfig, connect: C) -> Result<Server, ServeError>
    where
        C: Fn() -> F + Send + Sync + 'static,
        F: Future<Output = Result<Arc<dyn ServingStore>, StoreError>>,
    {
        let listener = bind(options.listen)?;
        let metrics_listener = bind(options.metrics_listen)?;
        let address = listener.local_addr().map_err(|source| ServeError::Listen { address: options.listen, source })?;
        let metrics_address =
            metrics_listener.local_addr().map_err(|source| ServeError::Listen { address: options.metrics_listen, source })?;
        let connect = Arc::new(connect);
        let (shutdown, _) = watch::channel(false);
        // The state every thread shares, made by whichever connects first.
        let (shared_tx, shared_rx) = watch::channel(None::<AppState>);
        let (stopped_tx, stopped) = mpsc::unbounded_channel();
        let connections = Arc::new(Connections::new(options.limits));
        let mut metrics_listener = Some(metrics_listener);
        let mut handles = Vec::new();
        let threads = match options.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        for thread in 0..threads {
            let listener = listener.try_clone().map_err(|source| ServeError::Thread { thread, source })?;
            let metrics_listener = match &metrics_listener {
                Some(metrics) => Some(metrics.try_clone().map_err(|source| ServeError::Thread { thread, source })?),
                None => None,
            };
            let (connect, config, shutdown, shared_tx, shared_rx, stopped_tx, connections) = (
                connect.clone(),
                config.clone(),
                shutdown.subscribe(),
                shared_tx.clone(),
                shared_rx.clone(),
                stopped_tx.clone(),
                connections.clone(),
            );
            let listeners = Listeners { api: listener, metrics: metrics_listener };
            let handle = std::thread::Builder::new()
                .name(format!("{THREAD_NAME_PREFIX}{thread}"))
                .spawn(move || {
                    let served = serve_thread(thread, listeners, connections, config, &*connect, shutdown, shared_tx, shared_rx);
                    let _ = stopped_tx.send(thread);
                    served
                })
                .map_err(|source| ServeError::Thread { thread, source })?;
            handles.push(handle);
        }
        metrics_listener.take();
        Ok(Server { address, metrics_address, shutdown, threads: handles, stopped })
    }

    /// Where the API listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Where `/metrics` is served.
    pub fn metrics_address(&self) -> SocketAddr {
        self.metrics_address
    }

    /// How many serving threads run.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Resolves when a serving thread has stopped on its own (it failed):
    /// a process should then shut down rather than serve on fewer threads.
    pub async fn stopped(&mut self) {
        if self.stopped.recv().await.is_none() {
            std::future::pending::<()>().await
        }
    }

    /// Stops accepting, lets in-flight requests finish, and returns the
    /// first thread's error if any failed.
    pub fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.shutdown.send(true);
        let mut first_error = Ok(());
        for (thread, handle) in self.threads.into_iter().enumerate() {
            let result = handle.join().unwrap_or(Err(ServeError::Panicked { thread }));
            if first_error.is_ok() {
                first_error = result;
            }
        }
        first_error
    }
}

fn bind(address: SocketAddr) -> Result<std::net::TcpListener, ServeError> {
    let listen_error = |source| ServeError::Listen { address, source };
    let listener = std::net::TcpListener::bind(address).map_err(listen_error)?;
    listener.set_nonblocking(true).map_err(listen_error)?;
    Ok(listener)
}

/// A thread's copies of the listening sockets. Every thread accepts API
/// connections; the metrics socket is served by the one thread that makes
/// the shared state (each holds a copy until then).
struct Listeners {
    api: std::net::TcpListener,
    metrics: Option<std::net::TcpListener>,
}

/// The API connections of every thread: the permits of
/// [`ConnectionLimits::max_connections`], and the limits each connection
/// is served with.
struct Connections {
    permits: Arc<Semaphore>,
    limits: ConnectionLimits,
}

impl Connections {
    fn new(limits: ConnectionLimits) -> Connections {
        let permits = Arc::new(Semaphore::new(Connections::count(&limits) as usize));
        Connections { permits, limits }
    }

    /// The permits: at least one, and few enough to take all at once.
    fn count(limits: &ConnectionLimits) -> u32 {
        u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX)
    }
}

/// One serving thread: its runtime, its store connection, its share of
/// the accepted connections.
#[allow(clippy::too_many_arguments)]
fn serve_thread<F: Future<Output = Result<Arc<dyn ServingStore>, StoreError>>>(
    thread: usize,
    listeners: Listeners,
    connections: Arc<Connections>,
    config: ServingConfig,
    connect: &dyn Fn() -> F,
    mut shutdown: watch::Receiver<bool>,
    shared_tx: watch::Sender<Option<AppState>>,
    mut shared_rx: watch::Receiver<Option<AppState>>,
) -> Result<(), ServeError> {
    let failed = |source| ServeError::Serve { thread, source };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(failed)?;
    runtime.block_on(async {
        let Some(store) = connect_until_shutdown(thread, connect, &mut shutdown).await else { return Ok(()) };
        // The first thread to connect makes the shared state (and with it
        // the alias map's follower task, on its runtime); the others join it.
        let mut made = None;
        shared_tx.send_if_modified(|shared| {
            if shared.is_none() {
                *shared = Some(AppState::new(store.clone(), config));
                made = shared.clone();
                return true;
            }
            false
        });
        let state = match made {
            Some(state) => {
                if let Some(metrics) = listeners.metrics {
                    let metrics = tokio::net::TcpListener::from_std(metrics).map_err(failed)?;
                    let (app, mut stop) = (metrics_router(state.clone()), shutdown.clone());
                    let stopped = async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    };
                    tokio::spawn(async move {
                        if let Err(e) = axum::serve(metrics, app).with_graceful_shutdown(stopped).await {
                            warn!(error = %e, "serving /metrics stopped");
                        }
                    });
                }
                state
            }
            None => {
                drop(listeners.metrics);
                let Ok(shared) = shared_rx.wait_for(Option::is_some).await else { return Ok(()) };
                let Some(state) = shared.as_ref().map(|shared| shared.with_store(store)) else { return Ok(()) };
                state
            }
        };
        drop((shared_tx, shared_rx));
        let listener = tokio::net::TcpListener::from_std(listeners.api).map_err(failed)?;
        debug!(thread, "store connected; accepting");
        accept_until_shutdown(listener, router(state.clone()), state, &connections, shutdown).await;
        Ok(())
    })
}

/// Accepts API connections while a permit is free, serves each on this
/// thread under the limits, and on shutdown waits for the connections of
/// every thread to finish what they are answering.
async fn accept_until_shutdown(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    state: AppState,
    connections: &Connections,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = &connections.limits;
    loop {
        let permit = tokio::select! {
            permit = connections.permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: the listener
                    // itself is fine, so wait a little rather than spin.
                    debug!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        // No Nagle delay on a reply written in more than one segment (the
        // OpenAPI document, a large batch check).
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY not set");
        }
        let connection = Connection::new(stream, limits.header_read_timeout);
        let (app, state, limits, shutdown) = (app.clone(), state.clone(), limits.clone(), shutdown.clone());
        tokio::spawn(async move {
            state.metrics().connection(true);
            if connection.serve(app, &limits, shutdown).await {
                state.metrics().connection_timeout();
            }
            state.metrics().connection(false);
            drop(permit);
        });
    }
    // Every permit back: no connection of any thread is left.
    let _ = connections.permits.acquire_many(Connections::count(limits)).await;
}
/// A serving thread's connection to Redis (`redis://` or
/// `redis+cluster://`), as the binary opens it. The store puts no deadline
/// of its own on reads: every read serving makes is already bounded by
/// [`ServingConfig::store_timeout`], and one timer per read is enough.
pub async fn connect_redis(url: &str) -> Result<Arc<dyn ServingStore>, StoreError> {
    let options = RedisStoreOptions { read_timeout: None, ..RedisStoreOptions::default() };
    Ok(Arc::new(RedisStore::connect_with(url, options).await?))
}

/// Connects, retrying with backoff; `None` when told to stop first.
async fn connect_until_shutdown<F: Future<Output = Result<Arc<dyn ServingStore>, StoreError>>>(
    thread: usize,
    connect: &dyn Fn() -> F,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Arc<dyn ServingStore>> {
    let mut backoff = FIRST_RETRY;
    loop {
        tokio::select! {
            connected = connect() => match connected {
                Ok(store) => return Some(store),
                Err(e) => warn!(thread, error = %e, retry_in = ?backoff, "connecting to the store failed"),
            },
            _ = shutdown.wait_for(|stop| *stop) => return None,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|stop| *stop) => return None,
        }
        backoff = (backoff * 2).min(LAST_RETRY);
    }
}
