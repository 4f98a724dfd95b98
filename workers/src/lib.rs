//! `segment-worker`: the Jobs the operator launches.
//!
//! - [`compute`]: evaluates a definition over the lake (DataFusion) and
//!   writes the result files;
//! - [`ingest`]: loads a result into the store as a new, invisible version;
//! - [`lakegen`]: a deterministic example lake, for the examples, tests and
//!   benchmarks;
//! - [`realtime`]: applies Kafka include/exclude events to the store and
//!   publishes entered/exited events on rollover;
//! - [`failure`]: the one-line reasons written to the termination log.

pub mod compute;
pub mod failure;
pub mod ingest;
pub mod lakegen;
pub mod realtime;
