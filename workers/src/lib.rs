//! `segment-worker`: the Jobs the operator launches. `compute`, `ingest`
//! and `generate-lake` run the [`segment_compute`] library;
//!
//! - [`realtime`]: applies Kafka include/exclude events to the store and
//!   publishes entered/exited events on rollover (the only part that links
//!   librdkafka).

pub mod realtime;
