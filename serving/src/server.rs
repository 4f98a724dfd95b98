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
//! and the metrics ([`AppState::with_store`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use segment_core::store::StoreError;
use segment_store::redis::{RedisStore, RedisStoreOptions};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::{router, AppState, ServingConfig, ServingStore};

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

/// The API serving on its threads until [`shutdown`](Server::shutdown).
pub struct Server {
    address: SocketAddr,
    shutdown: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<Result<(), ServeError>>>,
    /// A thread's index once it has stopped, for [`stopped`](Server::stopped).
    stopped: mpsc::UnboundedReceiver<usize>,
}

impl Server {
    /// Listens on `listen` (port 0 picks one: see [`address`](Self::address))
    /// and starts `threads` serving threads (0: one per CPU the process may
    /// use, its cgroup CPU limit included). Each opens its
    /// store connection with `connect`, retrying with backoff for as long
    /// as the store is unreachable (a pod starting before Redis): until
    /// then its connections wait in the listen backlog or go to a thread
    /// that is connected. The first connected thread loads the alias map.
    pub fn start<C, F>(listen: SocketAddr, threads: usize, config: ServingConfig, connect: C) -> Result<Server, ServeError>
    where
        C: Fn() -> F + Send + Sync + 'static,
        F: Future<Output = Result<Arc<dyn ServingStore>, StoreError>>,
    {
        let listen_error = |source| ServeError::Listen { address: listen, source };
        let listener = std::net::TcpListener::bind(listen).map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        let address = listener.local_addr().map_err(listen_error)?;
        let connect = Arc::new(connect);
        let (shutdown, _) = watch::channel(false);
        // The state every thread shares, made by whichever connects first.
        let (shared_tx, shared_rx) = watch::channel(None::<AppState>);
        let (stopped_tx, stopped) = mpsc::unbounded_channel();
        let mut handles = Vec::new();
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        for thread in 0..threads {
            let listener = listener.try_clone().map_err(|source| ServeError::Thread { thread, source })?;
            let (connect, config, shutdown, shared_tx, shared_rx, stopped_tx) =
                (connect.clone(), config.clone(), shutdown.subscribe(), shared_tx.clone(), shared_rx.clone(), stopped_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("serving-{thread}"))
                .spawn(move || {
                    let served = serve_thread(thread, listener, config, &*connect, shutdown, shared_tx, shared_rx);
                    let _ = stopped_tx.send(thread);
                    served
                })
                .map_err(|source| ServeError::Thread { thread, source })?;
            handles.push(handle);
        }
        Ok(Server { address, shutdown, threads: handles, stopped })
    }

    /// Where the API listens.
    pub fn address(&self) -> SocketAddr {
        self.address
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

/// One serving thread: its runtime, its store connection, its share of
/// the accepted connections.
fn serve_thread<F: Future<Output = Result<Arc<dyn ServingStore>, StoreError>>>(
    thread: usize,
    listener: std::net::TcpListener,
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
            Some(state) => state,
            None => {
                let Ok(shared) = shared_rx.wait_for(Option::is_some).await else { return Ok(()) };
                let Some(state) = shared.as_ref().map(|shared| shared.with_store(store)) else { return Ok(()) };
                state
            }
        };
        drop((shared_tx, shared_rx));
        let listener = tokio::net::TcpListener::from_std(listener).map_err(failed)?;
        debug!(thread, "store connected; accepting");
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        // No Nagle delay on a reply written in more than one segment (the
        // OpenAPI document, a large batch check).
        let listener = listener.tap_io(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        axum::serve(listener, router(state)).with_graceful_shutdown(stop).await.map_err(failed)
    })
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
