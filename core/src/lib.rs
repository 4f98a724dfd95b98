//! Contracts shared by the segment-operator binaries.
//!
//! - [`api`]: the `Segment` and `SegmentSource` custom resources.
//! - [`definition`], [`rules`], [`schedule`]: checks done before anything is launched.
//! - [`planner`]: the lifecycle as a pure function from what is observed to what to do.
//! - [`store`]: the edges (membership store, result files) behind traits.
//! - [`naming`], [`task`]: names and the task handed to worker Jobs.
//! - [`manifests`]: Segments and SegmentSources read from files.

pub mod api;
pub mod definition;
pub mod duration;
pub mod executor;
pub mod manifest;
pub mod manifests;
pub mod naming;
pub mod planner;
pub mod reasons;
pub mod rules;
pub mod rules_sql;
pub mod schedule;
pub mod store;
pub mod task;
pub mod validation;
