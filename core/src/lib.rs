//! Contracts shared by the segment-operator binaries.
//!
//! - [`api`]: the `Segment`, `SegmentSource` and `ComputeClass` custom resources.
//! - [`reasons`]: condition types, Event reasons, spec problems and run
//!   failure reasons as enums.
//! - [`validation`] (over [`definition`], [`rules`], [`schedule`],
//!   [`duration`]): every check of a spec done before anything is launched;
//!   [`policy`]: what the namespace's ComputeClass allows of it.
//! - [`rules_sql`]: structured rules compiled to one SQL query.
//! - [`planner`]: the lifecycle as a pure function from what is observed to what to do.
//! - [`executor`]: carries a plan out, in the one crash-safe order, over an
//!   [`executor::Effects`] trait the cluster, standalone mode and the tests implement.
//! - [`store`]: the edges (membership store, result files) behind traits,
//!   and the in-memory store of standalone mode and the tests.
//! - [`naming`], [`task`]: names and the task handed to worker Jobs;
//!   [`iceberg`]: Iceberg table names and the catalogs a task may use.
//! - [`manifest`]: the `_manifest.json` of a result; [`index`]: its
//!   members as one immutable, checksummed index file; [`seal`]: ingest's
//!   verdict on it (`_seal.json`), from which the operator seals the
//!   version; [`manifests`]: Segments and SegmentSources read from YAML files.

pub mod api;
pub mod definition;
pub mod duration;
pub mod executor;
pub mod iceberg;
pub mod index;
pub mod manifest;
pub mod manifests;
pub mod naming;
pub mod planner;
pub mod policy;
pub mod reasons;
pub mod rules;
pub mod rules_sql;
pub mod schedule;
pub mod seal;
pub mod store;
pub mod task;
pub mod validation;
