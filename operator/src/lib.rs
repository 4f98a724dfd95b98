//! segment-operator: the Kubernetes side of the Segment lifecycle.
//!
//! The lifecycle itself is [`segment_core::planner`]; this crate observes
//! the cluster for it and carries its plans out:
//! - [`reconcile`]: one Segment — observe, plan, execute (through
//!   `segment_core::executor`), the typed reconcile error;
//! - [`jobs`]: building compute/ingest Jobs and reading them back;
//! - [`spark`]: a Spark run's `SparkApplication` in place of its compute Job;
//! - [`leader`]: Lease-based leader election;
//! - [`controller`]: wiring the kube-runtime Controller, metrics and probes;
//! - [`config`]: the command line (flags with environment fallbacks);
//! - [`metrics`], [`http`]: the Prometheus metrics and what the probes answer;
//! - [`api_requests`]: the operator's own API requests, counted by verb and resource;
//! - [`events`]: the Kubernetes Events it publishes on Segments;
//! - [`time`]: Kubernetes timestamps to chrono;
//! - [`manifests`], [`check`]: manifests read from files, checked without a cluster;
//! - `standalone` (feature `standalone`, on by default, off in the
//!   operator image): the whole lifecycle on one machine.

pub mod api_requests;
pub mod check;
pub mod config;
pub mod controller;
pub mod events;
pub mod http;
pub mod jobs;
pub mod leader;
pub mod metrics;
/// Manifests from files live in the core library, shared with `kubectl segment preview`.
pub use segment_core::manifests;
pub mod reconcile;
pub mod spark;
#[cfg(feature = "standalone")]
pub mod standalone;
pub mod time;
