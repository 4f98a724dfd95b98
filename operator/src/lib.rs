//! segment-operator: the Kubernetes side of the Segment lifecycle.
//!
//! The lifecycle itself is [`segment_core::planner`]; this crate observes
//! the cluster for it and carries its plans out:
//! - [`reconcile`]: one Segment — observe, plan, execute (store, status, Jobs, Events);
//! - [`jobs`]: building compute/ingest Jobs and reading them back;
//! - [`leader`]: Lease-based leader election;
//! - [`controller`]: wiring the kube-runtime Controller, metrics and probes;
//! - [`manifests`], [`check`]: manifests read from files, checked without a cluster.

pub mod check;
pub mod config;
pub mod controller;
pub mod http;
pub mod jobs;
pub mod leader;
pub mod metrics;
/// Manifests from files live in the core library, shared with `kubectl segment preview`.
pub use segment_core::manifests;
pub mod reconcile;
pub mod standalone;
pub mod time;
