//! `segment-compute`: the batch data plane as a library, run by the
//! `segment-worker` Jobs, by standalone mode in-process and by
//! `kubectl segment preview`.
//!
//! - [`compute`]: evaluates a definition over the lake (DataFusion) and
//!   writes the result files; [`sorted_window`]: its executor for
//!   `row_number`, `lag` and `lead` over sorted input; [`sort_input`]:
//!   sorts charged for their rows, not for buffers shared with others;
//! - [`delta`]: Delta Lake tables as of a point in time, from their
//!   transaction log; [`iceberg`]: Apache Iceberg tables as of a point in
//!   time, from their catalog ([`iceberg_catalog`]) and metadata;
//!   [`lake_table`]: what both share;
//! - [`ingest`]: verifies a result and writes its verdict (`_seal.json`),
//!   from which the operator seals the version; it touches no store;
//! - [`lakegen`]: a deterministic example lake, for the examples, tests and
//!   benchmarks;
//! - [`spark`]: the Spark engine's plan, result writer and local engine
//!   (`spark-submit` on the embedded PySpark driver);
//! - [`failure`]: the one-line reasons written to the termination log.

pub mod compute;
pub mod delta;
pub mod failure;
pub mod iceberg;
pub mod iceberg_catalog;
pub mod ingest;
pub mod lake_table;
pub mod lakegen;
pub mod sort_input;
pub mod sorted_window;
pub mod spark;
