//! An HTTP/1.1 load generator light enough that its own cost stays under
//! what it measures: latency at a fixed rate (open loop), and the maximum
//! (closed loop).
//!
//! At a rate, requests are due at `start + i / rate`, spread over the
//! connections in turn; each latency runs from when its request was due
//! (not when it was sent), so a server that falls behind is charged for
//! the wait (no coordinated omission). A connection carries one request at
//! a time, as oha and wrk do; a request due while its connection waits for
//! an answer is sent when the answer is in.
//!
//! At a rate, one thread polls every connection with a zero timeout, and
//! yields its core whenever nothing came in: a poller that slept would
//! wake a millisecond late (epoll's resolution), which would count as
//! latency; one that spun without yielding would hold its core through
//! the time slice of any other thread there (the server's, on a small
//! machine). The requests are built as they are sent; the answers are
//! parsed only for their status and length.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// What a run measured.
#[derive(Clone, Copy, Debug)]
pub struct LoadFigures {
    /// Answers per second over the run.
    pub rps: f64,
    /// Latency quantiles from when each request was due, in ms.
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    /// Answers other than 2xx.
    pub failed: u64,
}

struct Connection {
    stream: TcpStream,
    /// When each request this connection owes was due, oldest first; the
    /// first is on the wire when `sent`.
    due: VecDeque<Instant>,
    sent: bool,
    received: Vec<u8>,
}

/// How long a run waits with requests out and no answer before it fails.
const STALLED: Duration = Duration::from_secs(30);

/// How requests are sent.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// This many a second, each due at its time whatever the answers
    /// (open loop): for latency at a rate.
    Rate(u32),
    /// Each connection's next request as soon as its answer is in (closed
    /// loop, as wrk): for the maximum. Latency runs from the send.
    Closed,
}

/// Sends requests at `pace` for `duration` over `connections`
/// connections to `address`, each for the path `path` gives (called once
/// per request, in order), and waits for every answer.
///
/// Panics when a connection fails or an answer is not HTTP/1.1 with a
/// `content-length`: the servers measured send nothing else.
pub fn run(
    address: SocketAddr,
    pace: Pace,
    connections: usize,
    duration: Duration,
    mut path: impl FnMut() -> String,
) -> LoadFigures {
    let mut poll = Poll::new().expect("a poller");
    let mut pool: Vec<Connection> = (0..connections)
        .map(|i| {
            let stream = std::net::TcpStream::connect(address).expect("the server accepts a connection");
            stream.set_nodelay(true).expect("TCP_NODELAY");
            stream.set_nonblocking(true).expect("a non-blocking socket");
            let mut stream = TcpStream::from_std(stream);
            poll.registry().register(&mut stream, Token(i), Interest::READABLE).expect("registered");
            Connection { stream, due: VecDeque::new(), sent: false, received: Vec::with_capacity(1024) }
        })
        .collect();
    let (total, interval) = match pace {
        Pace::Rate(rate) => ((f64::from(rate) * duration.as_secs_f64()) as u64, Duration::from_secs_f64(1.0 / f64::from(rate))),
        Pace::Closed => (0, Duration::ZERO),
    };
    let mut latencies: Vec<u32> = Vec::with_capacity(total.max(1 << 20) as usize);
    let mut failed = 0u64;
    let mut events = Events::with_capacity(connections.max(1));
    let start = Instant::now();
    let mut scheduled = 0u64;
    let mut pending = 0u64;
    if let Pace::Closed = pace {
        for connection in &mut pool {
            connection.due.push_back(start);
            send(connection, &path());
            pending += 1;
        }
    }
    let mut last_answer = start;
    while scheduled < total || pending > 0 {
        let now = Instant::now();
        assert!(
            pending == 0 || now - last_answer < STALLED,
            "no answer for {STALLED:?} with {pending} requests out: the server is stuck"
        );
        while scheduled < total {
            let due = start + interval.mul_f64(scheduled as f64);
            if due > now {
                break;
            }
            let connection = &mut pool[(scheduled % connections as u64) as usize];
            connection.due.push_back(due);
            if !connection.sent {
                send(connection, &path());
            }
            scheduled += 1;
            pending += 1;
        }
        match pace {
            Pace::Rate(_) => {
                poll.poll(&mut events, Some(Duration::ZERO)).expect("poll");
                if events.is_empty() {
                    // Nothing to read: let any other thread of this core
                    // run (the server's, on a small machine) rather than
                    // spin through its time slice.
                    std::thread::yield_now();
                }
            }
            // Answers are always on their way: wait for them.
            Pace::Closed => poll.poll(&mut events, Some(Duration::from_millis(100))).expect("poll"),
        }
        for event in events.iter() {
            let connection = &mut pool[event.token().0];
            read_available(connection);
            while let Some((status, length)) = answer(&connection.received) {
                connection.received.drain(..length);
                let due = connection.due.pop_front().expect("an answer to a request sent");
                last_answer = Instant::now();
                let micros = (last_answer - due).as_micros();
                latencies.push(u32::try_from(micros).unwrap_or(u32::MAX));
                failed += u64::from(!(200..300).contains(&status));
                pending -= 1;
                connection.sent = false;
                if let Pace::Closed = pace {
                    if start.elapsed() < duration {
                        connection.due.push_back(Instant::now());
                        pending += 1;
                    }
                }
                if !connection.due.is_empty() {
                    send(connection, &path());
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let quantile = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).map_or(f64::NAN, |&us| f64::from(us) / 1000.0)
    };
    LoadFigures { rps: latencies.len() as f64 / elapsed, p50: quantile(0.5), p99: quantile(0.99), p999: quantile(0.999), failed }
}

/// Writes a GET for `path`. A connection carries one request at a time,
/// so its send buffer is empty and the write never comes back short.
fn send(connection: &mut Connection, path: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
    let written = connection.stream.write(request.as_bytes()).expect("the request is written");
    assert_eq!(written, request.len(), "a request fits an empty send buffer");
    connection.sent = true;
}

/// Reads what the socket holds (the poller is edge triggered).
fn read_available(connection: &mut Connection) {
    let mut chunk = [0u8; 4096];
    loop {
        match connection.stream.read(&mut chunk) {
            Ok(0) => panic!("the server closed a connection"),
            Ok(n) => connection.received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading an answer: {e}"),
        }
    }
}

/// The status and length of the first whole answer in `bytes`, if it is
/// all there.
fn answer(bytes: &[u8]) -> Option<(u16, usize)> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&bytes[..head_end]).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.strip_prefix("HTTP/1.1 ")).and_then(|l| l.get(..3)).and_then(|c| c.parse().ok());
    let status = status.unwrap_or_else(|| panic!("not an HTTP/1.1 answer: {head:?}"));
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("an answer without content-length: {head:?}"));
    (bytes.len() >= head_end + length).then_some((status, head_end + length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_whole_only_with_its_body() {
        let full = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200";
        assert_eq!(answer(full), Some((404, 47)));
        assert_eq!(answer(&full[..46]), None, "one byte of the body missing");
        assert_eq!(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"), None, "the head not ended");
    }
}
