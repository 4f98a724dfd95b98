//! One API connection: HTTP/1.1 served by hyper, under the connection
//! limits' two timeouts.
//!
//! - The idle timeout is hyper's own `header_read_timeout`: hyper starts
//!   that timer whenever it waits for a request (the first, or the next on
//!   a kept-alive connection) and stops it when the headers are in, so it
//!   closes connections that send nothing.
//! - The header-read timeout counts from a request's first byte, which
//!   hyper cannot see: [`HeaderDeadline`] watches the socket's reads for
//!   it, and [`Requests`] tells it when hyper has handed the request over.
//!   A client trickling its headers (a slowloris) is cut off by it long
//!   before the idle timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;
use tracing::debug;

use crate::ConnectionLimits;

/// An accepted API connection, ready to be served.
pub(crate) struct Connection {
    stream: HeaderDeadline<TcpStream>,
    requests: Arc<Requests>,
}

impl Connection {
    pub fn new(stream: TcpStream, header_read_timeout: Duration) -> Connection {
        let requests = Arc::new(Requests::default());
        Connection { stream: HeaderDeadline::new(stream, header_read_timeout, requests.clone()), requests }
    }

    /// Serves `app` until the client closes, a timeout closes the
    /// connection, or `shutdown` (then the request in flight is answered
    /// first). Returns whether a timeout closed it.
    pub async fn serve(self, app: axum::Router, limits: &ConnectionLimits, mut shutdown: watch::Receiver<bool>) -> bool {
        let requests = self.requests;
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            requests.started.fetch_add(1, Ordering::Relaxed);
            let (answer, requests) = (app.clone().oneshot(request), requests.clone());
            async move {
                let response = answer.await;
                requests.finished.fetch_add(1, Ordering::Relaxed);
                response
            }
        });
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.idle_timeout).keep_alive(true);
        let connection = builder.serve_connection(TokioIo::new(self.stream), service);
        tokio::pin!(connection);
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            _ = stopping(&mut shutdown) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        match ended {
            Ok(()) => false,
            Err(e) => {
                debug!(error = %e, "connection ended");
                timed_out(&e)
            }
        }
    }
}

/// Resolves once told to stop, holding no borrow of the flag after.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Whether hyper's error is one of the two timeouts: hyper's own (the idle
/// timeout), or [`HeaderDeadline`]'s, which reaches hyper as an I/O error.
fn timed_out(error: &hyper::Error) -> bool {
    if error.is_timeout() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::TimedOut) {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Requests a connection's service has been handed and has answered: one
/// is in flight while the counts differ.
#[derive(Default)]
struct Requests {
    started: AtomicU64,
    finished: AtomicU64,
}

/// The socket, failing its reads with `TimedOut` once a request's headers
/// have taken longer than the timeout since their first byte. Bytes that
/// arrive while a request is in flight (its body, a pipelined request)
/// start no deadline: the idle timeout bounds those.
struct HeaderDeadline<S> {
    inner: S,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    requests: Arc<Requests>,
    /// `Some(n)`: the deadline runs for the request after the `n` handed
    /// over so far.
    running_for: Option<u64>,
}

impl<S> HeaderDeadline<S> {
    fn new(inner: S, timeout: Duration, requests: Arc<Requests>) -> HeaderDeadline<S> {
        HeaderDeadline { inner, deadline: Box::pin(tokio::time::sleep(timeout)), timeout, requests, running_for: None }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeaderDeadline<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let started = this.requests.started.load(Ordering::Relaxed);
        let in_flight = started != this.requests.finished.load(Ordering::Relaxed);
        if this.running_for.is_some_and(|n| n != started) {
            // hyper has read the headers and handed the request over.
            this.running_for = None;
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before && this.running_for.is_none() && !in_flight => {
                this.deadline.as_mut().reset(Instant::now() + this.timeout);
                this.running_for = Some(started);
            }
            Poll::Pending if this.running_for.is_some() && this.deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "request headers not read in time")));
            }
            _ => {}
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
