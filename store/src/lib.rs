//! The edges of the lifecycle, for real: the Redis store behind
//! `segment_core::store::{SegmentStore, MembershipReader}` and result files
//! in object storage behind `ResultStore`.
//!
//! - [`redis`]: the Redis store (single server or cluster);
//! - [`objects`]: object storage by URI (`s3://`, `file://`);
//! - [`results`]: result parts and manifests, and their retention.

pub mod objects;
pub mod redis;
pub mod results;
