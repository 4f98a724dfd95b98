//! Sorts charged for the rows they hold, not for the buffers those rows
//! share.
//!
//! An aggregate emits its groups as one large batch cut into zero-copy
//! slices of `batch_size` rows. A sort charges each batch it buffers to
//! the memory pool by the size of the buffers behind it, so every slice
//! of an aggregate's output costs the whole output: a sort over 822,000
//! groups (a window `ORDER BY` an aggregate), 19 MB of rows whose batches
//! reported 1.3 GB of buffers between them, spilled 17 times
//! (`segment-bench compute --explain top-decile`); with the copy below,
//! none.
//! [`CompactSortInputRule`] puts [`CompactExec`] under every sort: a batch
//! whose buffers are much larger than its rows is copied into buffers of
//! its own, so the sort is charged, and keeps, only what it sorts; any
//! other batch passes through untouched.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::utils::memory::get_record_batch_memory_size;
use datafusion::common::Result;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::{Stream, StreamExt};

/// Buffers this many times larger than the rows they hold are copied.
const SHARED_FACTOR: usize = 2;
/// Batches smaller than this are never worth copying.
const MIN_COPIED_BYTES: usize = 64 * 1024;

/// Puts [`CompactExec`] between every sort and its input.
#[derive(Debug, Default)]
pub struct CompactSortInputRule;

impl PhysicalOptimizerRule for CompactSortInputRule {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(sort) = node.downcast_ref::<SortExec>() else { return Ok(Transformed::no(node)) };
            if sort.input().downcast_ref::<CompactExec>().is_some() {
                return Ok(Transformed::no(node));
            }
            let compact: Arc<dyn ExecutionPlan> = Arc::new(CompactExec { input: Arc::clone(sort.input()) });
            #[expect(deprecated, reason = "replace_children's options are not needed: the input's properties are unchanged")]
            let sort = Arc::clone(&node).with_new_children(vec![compact])?;
            Ok(Transformed::yes(sort))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "CompactSortInput"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Passes its input through, copying the batches whose buffers are
/// mostly rows of other batches (the module's comment).
#[derive(Debug)]
pub struct CompactExec {
    input: Arc<dyn ExecutionPlan>,
}

impl DisplayAs for CompactExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "CompactExec")
    }
}

impl ExecutionPlan for CompactExec {
    fn name(&self) -> &str {
        "CompactExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(self: Arc<Self>, mut children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(CompactExec { input: children.swap_remove(0) }))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        Ok(Box::pin(CompactStream { input: self.input.execute(partition, context)? }))
    }
}

struct CompactStream {
    input: SendableRecordBatchStream,
}

impl Stream for CompactStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.input.poll_next_unpin(cx).map(|next| next.map(|batch| batch.and_then(compacted)))
    }
}

impl RecordBatchStream for CompactStream {
    fn schema(&self) -> SchemaRef {
        self.input.schema()
    }
}

/// `batch`, in buffers of its own when the ones it has are mostly other
/// rows.
fn compacted(batch: RecordBatch) -> Result<RecordBatch> {
    let held = get_record_batch_memory_size(&batch);
    if held < MIN_COPIED_BYTES {
        return Ok(batch);
    }
    let mut used = 0;
    for column in batch.columns() {
        used += column.to_data().get_slice_memory_size()?;
    }
    if held <= used.saturating_mul(SHARED_FACTOR) {
        return Ok(batch);
    }
    let rows = UInt32Array::from_iter_values(0..batch.num_rows() as u32);
    let columns = batch
        .columns()
        .iter()
        .map(|column| -> Result<ArrayRef> {
            let copied = take(column.as_ref(), &rows, None)?;
            Ok(match column.data_type() {
                // A view array's `take` copies the views and keeps the
                // buffers they point into; `gc` then copies what they point
                // to. `gc` alone keeps the views themselves shared when
                // every value is inline (ids of 12 bytes or less).
                DataType::Utf8View => Arc::new(copied.as_string_view().gc()),
                DataType::BinaryView => Arc::new(copied.as_binary_view().gc()),
                _ => copied,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, StringArray, StringViewArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::execution::memory_pool::FairSpillPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::physical_plan::{collect, displayable};
    use datafusion::prelude::{SessionConfig, SessionContext};

    use super::*;

    /// How the test's user ids are held.
    #[derive(Clone, Copy, Debug)]
    enum Ids {
        /// `Utf8`, 13 bytes each.
        Strings,
        /// `Utf8View` (how Parquet is read), 8 bytes each: every value is
        /// inline in its view and the array has no data buffer.
        InlineViews,
    }

    fn context(rule: bool, ids: Ids) -> SessionContext {
        let runtime = RuntimeEnvBuilder::new().with_memory_pool(Arc::new(FairSpillPool::new(64 << 20))).build_arc().unwrap();
        let config = SessionConfig::new().with_target_partitions(2);
        let mut builder = SessionStateBuilder::new().with_config(config).with_runtime_env(runtime).with_default_features();
        if rule {
            builder = builder.with_physical_optimizer_rule(Arc::new(CompactSortInputRule));
        }
        let ctx = SessionContext::new_with_state(builder.build());
        let schema = Arc::new(Schema::new(vec![
            Field::new("user_id", if matches!(ids, Ids::Strings) { DataType::Utf8 } else { DataType::Utf8View }, false),
            Field::new("amount", DataType::Int64, false),
        ]));
        let batches = (0..60)
            .map(|b| {
                let user = |i: usize| (b * 7_919 + i * 104_729) % 400_000;
                let users: ArrayRef = match ids {
                    Ids::Strings => Arc::new((0..10_000).map(|i| Some(format!("user-{:08}", user(i)))).collect::<StringArray>()),
                    Ids::InlineViews => {
                        Arc::new((0..10_000).map(|i| Some(format!("u{:07}", user(i)))).collect::<StringViewArray>())
                    }
                };
                let amounts: Int64Array = (0..10_000).map(|i| Some((i * 31 + b) as i64 % 1000)).collect();
                RecordBatch::try_new(schema.clone(), vec![users, Arc::new(amounts)]).unwrap()
            })
            .collect();
        ctx.register_table("orders", Arc::new(MemTable::try_new(schema, vec![batches]).unwrap())).unwrap();
        ctx
    }

    fn spill_count(plan: &dyn ExecutionPlan) -> usize {
        plan.metrics().and_then(|m| m.spill_count()).unwrap_or(0)
            + plan.children().into_iter().map(|c| spill_count(c.as_ref())).sum::<usize>()
    }

    /// A sort over an aggregate's ~200,000 groups, in a 64 MB pool: charged
    /// for the aggregate's whole output with every slice, it spills; charged
    /// for its rows, it does not. The rows are the same. Both for string ids
    /// and for view ids short enough to be inline, whose views alone are
    /// shared (`gc` alone kept them shared).
    #[tokio::test]
    async fn a_sort_over_an_aggregate_is_charged_for_its_rows() {
        for ids in [Ids::Strings, Ids::InlineViews] {
            a_sort_over_an_aggregate_is_charged_for_its_rows_with(ids).await;
        }
    }

    async fn a_sort_over_an_aggregate_is_charged_for_its_rows_with(ids: Ids) {
        let sql = "SELECT user_id, sum(amount) AS total FROM orders GROUP BY user_id ORDER BY total DESC, user_id";
        let mut results = Vec::new();
        for rule in [false, true] {
            let ctx = context(rule, ids);
            let plan = ctx.sql(sql).await.unwrap().create_physical_plan().await.unwrap();
            let text = displayable(plan.as_ref()).indent(false).to_string();
            assert_eq!(text.contains("CompactExec"), rule, "{text}");
            let batches = collect(plan.clone(), ctx.task_ctx()).await.unwrap();
            results.push((spill_count(plan.as_ref()), batches));
        }
        let ((spills_without, without), (spills_with, with)) = (&results[0], &results[1]);
        assert!(*spills_without > 0, "{ids:?}: the sort spills when charged for shared buffers");
        assert_eq!(*spills_with, 0, "{ids:?}: the sort is charged for its rows alone");
        let rows = |batches: &[RecordBatch]| batches.iter().map(|b| b.num_rows()).sum::<usize>();
        assert!(rows(with) > 150_000, "{ids:?}: {} groups", rows(with));
        assert_eq!(
            datafusion::arrow::compute::concat_batches(&with[0].schema(), with).unwrap(),
            datafusion::arrow::compute::concat_batches(&without[0].schema(), without).unwrap()
        );
    }
}
