//! `row_number`, `lag` and `lead` over input sorted by their window's
//! `PARTITION BY` and `ORDER BY`, computed a batch at a time.
//!
//! DataFusion runs these windows in `BoundedWindowAggExec`, which keeps
//! state per window partition: on a lake's user-keyed windows (a few
//! orders a user, a million users) most of the time goes to creating and
//! updating that state, a million small partitions one at a time
//! (`segment-bench compute --explain`). These three functions need no
//! frame and no peers, only a row's place in its partition, and the input
//! arrives sorted: where a partition starts is one comparison of each
//! row's keys with the previous row's, and each function is then an index
//! computation and a `take` over the whole batch.
//!
//! [`SortedWindowRule`] puts [`SortedWindowExec`] in place of a
//! `BoundedWindowAggExec` in sorted mode whose every function is one of the
//! three, with a literal non-negative offset and a literal default, and
//! without `IGNORE NULLS`; any other window keeps DataFusion's executor.
//! The replacement keeps the original's properties and input
//! requirements, so the plan around it is the one DataFusion chose.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Scalar, UInt32Array, UInt64Array};
use datafusion::arrow::compute::kernels::cmp::distinct;
use datafusion::arrow::compute::kernels::zip::zip;
use datafusion::arrow::compute::{cast, concat_batches, take};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, ScalarValue};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::expressions::Literal;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr_common::sort_expr::OrderingRequirements;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::distribution_requirements::InputDistributionRequirements;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::windows::{BoundedWindowAggExec, StandardWindowExpr, WindowExpr, WindowUDFExpr};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, InputOrderMode, PlanProperties};
use futures::{Stream, StreamExt};

/// Replaces the windows [`SortedWindowExec`] computes; runs after
/// DataFusion's own rules, once sorts and distribution are settled.
#[derive(Debug, Default)]
pub struct SortedWindowRule;

impl PhysicalOptimizerRule for SortedWindowRule {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let replaced = node
                .downcast_ref::<BoundedWindowAggExec>()
                .and_then(|window| SortedWindowExec::replacing(Arc::new(window.clone())));
            Ok(match replaced {
                Some(exec) => Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>),
                None => Transformed::no(node),
            })
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "SortedWindow"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// One window function the executor computes.
#[derive(Debug, Clone)]
enum RowFunction {
    RowNumber,
    /// `lag` (`lead: false`) or `lead` by `offset` rows within the
    /// partition, `default` where that row is outside it; typed as the
    /// output column.
    Shift {
        value: Arc<dyn PhysicalExpr>,
        offset: usize,
        lead: bool,
        default: ScalarValue,
        output: DataType,
    },
}

impl RowFunction {
    /// The function `expr` is, when this executor computes it exactly as
    /// DataFusion would; `output` is its column's type.
    fn of(expr: &Arc<dyn WindowExpr>, output: &DataType) -> Option<RowFunction> {
        let standard = expr.as_any().downcast_ref::<StandardWindowExpr>()?;
        let udwf = standard.get_standard_func_expr().as_any().downcast_ref::<WindowUDFExpr>()?;
        let function = udwf.fun().name();
        // A window DataFusion reversed (to reuse a sort the other way) has
        // `lag` and `lead` swapped under the original name; `IGNORE NULLS`
        // shows only in the name.
        let name = expr.name();
        if !name.starts_with(&format!("{function}(")) || name.contains("IGNORE NULLS") {
            return None;
        }
        let args = udwf.args();
        match function {
            "row_number" if args.is_empty() => Some(RowFunction::RowNumber),
            "lag" | "lead" => {
                let value = args.first()?.clone();
                let offset = match args.get(1) {
                    None => 1,
                    Some(offset) => usize::try_from(literal(offset)?.cast_to(&DataType::Int64).ok().and_then(|v| match v {
                        ScalarValue::Int64(Some(n)) => Some(n),
                        _ => None,
                    })?)
                    .ok()?,
                };
                let default = match args.get(2) {
                    None => ScalarValue::try_from(output).ok()?,
                    Some(default) => literal(default)?.cast_to(output).ok()?,
                };
                if args.len() > 3 {
                    return None;
                }
                Some(RowFunction::Shift { value, offset, lead: function == "lead", default, output: output.clone() })
            }
            _ => None,
        }
    }
}

fn literal(expr: &Arc<dyn PhysicalExpr>) -> Option<ScalarValue> {
    expr.downcast_ref::<Literal>().map(|l| l.value().clone())
}

/// A `BoundedWindowAggExec` in sorted mode, computed a batch at a time
/// (the module's comment). It answers for the plan with the original's
/// properties and requirements.
#[derive(Debug)]
pub struct SortedWindowExec {
    original: Arc<BoundedWindowAggExec>,
    functions: Vec<RowFunction>,
    metrics: ExecutionPlanMetricsSet,
}

impl SortedWindowExec {
    /// The executor for `window`, when it computes every function of it.
    fn replacing(window: Arc<BoundedWindowAggExec>) -> Option<SortedWindowExec> {
        if window.input_order_mode != InputOrderMode::Sorted {
            return None;
        }
        let schema = window.schema();
        let first_output = window.input().schema().fields().len();
        let functions = window
            .window_expr()
            .iter()
            .enumerate()
            .map(|(i, expr)| RowFunction::of(expr, schema.field(first_output + i).data_type()))
            .collect::<Option<Vec<_>>>()?;
        Some(SortedWindowExec { original: window, functions, metrics: ExecutionPlanMetricsSet::new() })
    }

    fn rewrap(replaced: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
        let window = replaced.downcast_ref::<BoundedWindowAggExec>().cloned();
        match window.and_then(|w| SortedWindowExec::replacing(Arc::new(w))) {
            Some(exec) => Arc::new(exec),
            None => replaced,
        }
    }
}

impl DisplayAs for SortedWindowExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = self.original.window_expr().iter().map(|e| e.name()).collect();
        write!(f, "SortedWindowExec: wdw=[{}]", names.join(", "))
    }
}

impl ExecutionPlan for SortedWindowExec {
    fn name(&self) -> &str {
        "SortedWindowExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.original.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![self.original.input()]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.original.apply_expressions(f)
    }

    fn input_distribution_requirements(&self) -> InputDistributionRequirements {
        self.original.input_distribution_requirements()
    }

    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        self.original.required_input_ordering()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        self.original.maintains_input_order()
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        self.original.benefits_from_input_partitioning()
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let original: Arc<dyn ExecutionPlan> = self.original.clone();
        Ok(SortedWindowExec::rewrap(original.replace_children(children, options)?))
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(children, ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let input = self.original.input().execute(partition, context)?;
        // A row's `lag`s read back, its `lead`s ahead, at most this far.
        let largest_offset = |leads: bool| {
            self.functions
                .iter()
                .filter_map(|f| match f {
                    RowFunction::Shift { offset, lead, .. } if *lead == leads => Some(*offset),
                    _ => None,
                })
                .max()
                .unwrap_or(0)
        };
        let (lookback, lookahead) = (largest_offset(false).max(1), largest_offset(true));
        Ok(Box::pin(SortedWindowStream {
            input,
            schema: self.original.schema(),
            partition_keys: self.original.partition_keys(),
            functions: self.functions.clone(),
            lookback,
            lookahead,
            history: None,
            history_first_row_number: 1,
            pending: None,
            finished: false,
            baseline: BaselineMetrics::new(&self.metrics, partition),
        }))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// One partition's rows, in order. Rows are emitted once every row a
/// `lead` of them may read has arrived; the last rows emitted stay as
/// history for the `lag`s and partition starts of the rows after them.
struct SortedWindowStream {
    input: SendableRecordBatchStream,
    schema: SchemaRef,
    partition_keys: Vec<Arc<dyn PhysicalExpr>>,
    functions: Vec<RowFunction>,
    /// Rows kept after they are emitted: the largest `lag` offset, at
    /// least one (the previous row's keys tell where a partition starts).
    lookback: usize,
    /// Rows held back until the rows after them arrive: the largest `lead`
    /// offset.
    lookahead: usize,
    history: Option<RecordBatch>,
    /// The row number of the history's first row.
    history_first_row_number: u64,
    pending: Option<RecordBatch>,
    finished: bool,
    baseline: BaselineMetrics,
}

impl SortedWindowStream {
    /// Takes `batch` in (`None` at the end of the input) and gives the rows
    /// now complete, if any.
    fn process(&mut self, batch: Option<RecordBatch>, last: bool) -> Result<Option<RecordBatch>> {
        let input_schema = self.input.schema();
        let parts: Vec<&RecordBatch> =
            [self.history.as_ref(), self.pending.as_ref(), batch.as_ref()].into_iter().flatten().collect();
        let work = concat_batches(&input_schema, parts)?;
        let n = work.num_rows();
        let emitted = self.history.as_ref().map_or(0, RecordBatch::num_rows);
        let end = if last { n } else { n.saturating_sub(self.lookahead).max(emitted) };

        // Where partitions start: the keys differ from the previous row's.
        // The first row starts one only when it is the input's first.
        let mut starts = vec![false; n];
        if n > 0 {
            starts[0] = emitted == 0;
        }
        if n > 1 {
            for key in &self.partition_keys {
                let keys = key.evaluate(&work)?.into_array(n)?;
                let changed = distinct(&keys.slice(1, n - 1), &keys.slice(0, n - 1))?;
                for (i, start) in starts.iter_mut().skip(1).enumerate() {
                    *start |= changed.value(i);
                }
            }
        }
        let mut row_numbers = vec![0u64; n];
        for i in 0..n {
            row_numbers[i] = match (i, starts[i]) {
                (_, true) => 1,
                (0, false) => self.history_first_row_number,
                (_, false) => row_numbers[i - 1] + 1,
            };
        }

        // Rows left in each row's partition after it, for the `lead`s.
        let leads = self.functions.iter().any(|f| matches!(f, RowFunction::Shift { lead: true, .. }));
        let remaining = if leads && end > emitted { rows_after_in_partition(&starts) } else { Vec::new() };

        let mut output = None;
        if end > emitted {
            let mut columns: Vec<ArrayRef> = work.columns().iter().map(|c| c.slice(emitted, end - emitted)).collect();
            for function in &self.functions {
                columns.push(match function {
                    RowFunction::RowNumber => Arc::new(UInt64Array::from(row_numbers[emitted..end].to_vec())),
                    RowFunction::Shift { value, offset, lead, default, output } => {
                        let values = value.evaluate(&work)?.into_array(n)?;
                        let indices: UInt32Array = (emitted..end)
                            .map(|i| match lead {
                                false => (row_numbers[i] > *offset as u64).then(|| (i - offset) as u32),
                                true => (remaining[i] >= *offset).then(|| (i + offset) as u32),
                            })
                            .collect();
                        let shifted = take(values.as_ref(), &indices, None)?;
                        let shifted = match default.is_null() {
                            true => shifted,
                            false => {
                                let inside = BooleanArray::from_iter(indices.iter().map(|index| Some(index.is_some())));
                                let default = default.cast_to(shifted.data_type())?.to_array()?;
                                zip(&inside, &shifted, &Scalar::new(default))?
                            }
                        };
                        match shifted.data_type() == output {
                            true => shifted,
                            false => cast(&shifted, output)?,
                        }
                    }
                });
            }
            output = Some(RecordBatch::try_new(Arc::clone(&self.schema), columns)?);
        }

        let kept = self.lookback.min(end);
        self.history = (kept > 0).then(|| work.slice(end - kept, kept));
        if kept > 0 {
            self.history_first_row_number = row_numbers[end - kept];
        }
        self.pending = (n > end).then(|| work.slice(end, n - end));
        Ok(output)
    }
}

/// For each row, how many rows after it are in its partition (within
/// these rows).
fn rows_after_in_partition(starts: &[bool]) -> Vec<usize> {
    let mut remaining = vec![0usize; starts.len()];
    for i in (0..starts.len().saturating_sub(1)).rev() {
        remaining[i] = if starts[i + 1] { 0 } else { remaining[i + 1] + 1 };
    }
    remaining
}

impl Stream for SortedWindowStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            let (batch, last) = match self.input.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(batch))) if batch.num_rows() == 0 => continue,
                Poll::Ready(Some(Ok(batch))) => (Some(batch), false),
                Poll::Ready(None) => {
                    self.finished = true;
                    if self.pending.is_none() {
                        return Poll::Ready(None);
                    }
                    (None, true)
                }
            };
            let elapsed = self.baseline.elapsed_compute().clone();
            let timer = elapsed.timer();
            let result = self.process(batch, last);
            timer.done();
            match result {
                Ok(None) => continue,
                Ok(Some(out)) => return self.baseline.record_poll(Poll::Ready(Some(Ok(out)))),
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

impl RecordBatchStream for SortedWindowStream {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::MemTable;
    use datafusion::execution::session_state::SessionStateBuilder;
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::{SessionConfig, SessionContext};

    use super::*;

    /// Rows of (user, grp, ts, v, id) in batches of 1 to 9 rows: few users
    /// (some null), clashing timestamps, null values; `id` makes every
    /// ORDER BY total, so both executors must give the same rows.
    fn table(seed: u64, rows: usize) -> MemTable {
        let mut state = seed | 1;
        let mut next = move |below: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % below
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("user", DataType::Utf8, true),
            Field::new("grp", DataType::Int64, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("v", DataType::Int64, true),
            Field::new("id", DataType::Int64, false),
        ]));
        let users = (rows / 3).max(2) as u64;
        let mut batches = Vec::new();
        let mut id = 0i64;
        while (id as usize) < rows {
            let size = (1 + next(9) as usize).min(rows - id as usize);
            let user: StringArray = (0..size).map(|_| (next(10) > 0).then(|| format!("u{}", next(users)))).collect();
            let grp: Int64Array = (0..size).map(|_| Some(next(2) as i64)).collect();
            let ts: Int64Array = (0..size).map(|_| Some(next(20) as i64)).collect();
            let v: Int64Array = (0..size).map(|_| (next(5) > 0).then(|| next(1000) as i64)).collect();
            let ids: Int64Array = (id..id + size as i64).map(Some).collect();
            id += size as i64;
            let columns: Vec<ArrayRef> = vec![Arc::new(user), Arc::new(grp), Arc::new(ts), Arc::new(v), Arc::new(ids)];
            batches.push(RecordBatch::try_new(schema.clone(), columns).unwrap());
        }
        MemTable::try_new(schema, vec![batches]).unwrap()
    }

    fn context(rule: bool, partitions: usize, batch_size: usize, seed: u64) -> SessionContext {
        let config = SessionConfig::new().with_target_partitions(partitions).with_batch_size(batch_size);
        let mut builder = SessionStateBuilder::new().with_config(config).with_default_features();
        if rule {
            builder = builder.with_physical_optimizer_rule(Arc::new(SortedWindowRule));
        }
        let ctx = SessionContext::new_with_state(builder.build());
        ctx.register_table("t", Arc::new(table(seed, 400))).unwrap();
        ctx
    }

    /// The rows of `sql`, sorted, and its physical plan.
    async fn run(ctx: &SessionContext, sql: &str) -> (Vec<String>, String) {
        let frame = ctx.sql(sql).await.unwrap();
        let plan = frame.clone().create_physical_plan().await.unwrap();
        let text = displayable(plan.as_ref()).indent(false).to_string();
        let batches = frame.collect().await.unwrap();
        let mut rows: Vec<String> = pretty_format_batches(&batches).unwrap().to_string().lines().map(str::to_string).collect();
        rows.sort();
        (rows, text)
    }

    const COMPUTED: &[&str] = &[
        "SELECT user, ts, v, row_number() OVER (PARTITION BY user ORDER BY ts, id) AS n FROM t",
        "SELECT user, ts, lag(v) OVER (PARTITION BY user ORDER BY ts, id) AS p, \
         lead(v, 2) OVER (PARTITION BY user ORDER BY ts, id) AS q FROM t",
        "SELECT user, id, lag(v, 3, -1) OVER (PARTITION BY user, grp ORDER BY ts, id) AS p, \
         lead(ts, 1, 0) OVER (PARTITION BY user, grp ORDER BY ts, id) AS q, \
         row_number() OVER (PARTITION BY user, grp ORDER BY ts, id) AS n FROM t",
        "SELECT id, lag(v, 0) OVER (PARTITION BY user ORDER BY id) AS z, lead(user, 5) OVER (PARTITION BY user ORDER BY id) AS w FROM t",
        "SELECT id, lag(user, 2, 'none') OVER (ORDER BY id) AS p, lead(v, 7) OVER (ORDER BY id) AS q FROM t",
        "SELECT DISTINCT user FROM (SELECT user, ts, lag(ts) OVER (PARTITION BY user ORDER BY ts, id) AS prev FROM t) AS o \
         WHERE prev IS NOT NULL AND ts <= prev + 3",
        "SELECT user FROM (SELECT user, ts, row_number() OVER (PARTITION BY user ORDER BY ts DESC, id) AS n FROM t) AS o \
         WHERE n = 1 AND ts >= 10",
    ];

    /// Every window here is computed by [`SortedWindowExec`] and gives the
    /// rows DataFusion's executor gives, whatever the batch sizes (rows of
    /// one partition split across batches, lead offsets past a batch) and
    /// the number of partitions.
    #[tokio::test]
    async fn row_functions_give_what_datafusion_gives() {
        for seed in [7, 99, 2024] {
            for (partitions, batch_size) in [(1, 1), (1, 3), (2, 5), (3, 64), (2, 8192)] {
                let ours = context(true, partitions, batch_size, seed);
                let theirs = context(false, partitions, batch_size, seed);
                for sql in COMPUTED {
                    let (rows, plan) = run(&ours, sql).await;
                    assert!(plan.contains("SortedWindowExec") && !plan.contains("BoundedWindowAggExec"), "{sql}\n{plan}");
                    let (expected, their_plan) = run(&theirs, sql).await;
                    assert!(their_plan.contains("BoundedWindowAggExec"), "{their_plan}");
                    assert!(expected.len() > 5, "{sql}: {expected:?}");
                    assert_eq!(rows, expected, "{sql} (seed {seed}, {partitions} partitions, batches of {batch_size})");
                }
            }
        }
    }

    /// Windows it does not compute keep DataFusion's executor.
    #[tokio::test]
    async fn other_windows_keep_datafusions_executor() {
        let ctx = context(true, 2, 5, 7);
        for sql in [
            "SELECT id, lag(v) IGNORE NULLS OVER (PARTITION BY user ORDER BY ts, id) FROM t",
            "SELECT id, lag(v, -1) OVER (PARTITION BY user ORDER BY ts, id) FROM t",
            "SELECT id, sum(v) OVER (PARTITION BY user ORDER BY ts, id) FROM t",
            "SELECT id, rank() OVER (PARTITION BY user ORDER BY ts) FROM t",
            "SELECT id, row_number() OVER (PARTITION BY user ORDER BY ts, id), sum(v) OVER (PARTITION BY user ORDER BY ts, id) FROM t",
        ] {
            let (_, plan) = run(&ctx, sql).await;
            assert!(!plan.contains("SortedWindowExec"), "{sql}\n{plan}");
        }
    }
}
