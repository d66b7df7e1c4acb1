//! Cancellation that reaches running operators.
//!
//! Aborting a query's task drops its future at the next await point, but DataFusion runs
//! parts of a plan in tasks of their own, and some operators (a nested-loop join whose
//! filter matches nothing) loop for minutes inside one poll. So a timed-out query also sets
//! a [`Cancel`] flag, checked on every poll of every operator ([`CancelExec`] wraps each
//! node of the physical plan), on every guarded function call and on every evaluation of a
//! join filter ([`crate::guard`]); each check turns the flag into an error that ends the
//! operator, and with it the task that runs it.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, RecordBatchStream,
};
use futures::Stream;

/// The cancellation flag of one query, and its budget for scalar values.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cancel(Arc<AtomicBool>, Arc<std::sync::atomic::AtomicU64>);

/// Most bytes of scalar values (constants, folded at planning or computed once per batch)
/// one query may build in total: each is bounded per call, this bounds their sum
/// (`SELECT repeat('a', 60000000), repeat('b', 60000000), …`).
pub(crate) const SCALAR_BYTES_MAX: u64 = 256 << 20;

impl Cancel {
    /// Asks every operator and function of the query to stop.
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Charges a scalar value of `bytes` to the query's budget.
    pub(crate) fn charge_scalar(&self, bytes: u64) -> Result<()> {
        let total = self
            .1
            .fetch_add(bytes, Ordering::AcqRel)
            .saturating_add(bytes);
        if total > SCALAR_BYTES_MAX {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "the query's constant values take {total} bytes, at most {SCALAR_BYTES_MAX} \
                 allowed"
            )));
        }
        Ok(())
    }

    /// An error once the query was cancelled.
    pub(crate) fn check(&self) -> Result<()> {
        if self.0.load(Ordering::Acquire) {
            return Err(DataFusionError::Execution(
                "query cancelled: it ran past its time limit".into(),
            ));
        }
        Ok(())
    }
}

/// Wraps every node of a physical plan in a [`CancelExec`].
pub(crate) fn wrap(
    plan: Arc<dyn ExecutionPlan>,
    cancel: &Cancel,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        Ok(Transformed::yes(Arc::new(CancelExec {
            inner: node,
            cancel: cancel.clone(),
        }) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
}

/// An operator that passes its input through and fails once the query is cancelled.
#[derive(Debug)]
pub(crate) struct CancelExec {
    inner: Arc<dyn ExecutionPlan>,
    cancel: Cancel,
}

impl DisplayAs for CancelExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt_as(t, f)
    }
}

impl ExecutionPlan for CancelExec {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn downcast_delegate(&self) -> Option<&dyn ExecutionPlan> {
        Some(self.inner.as_ref())
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        self.inner.children()
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(CancelExec {
            inner: self.inner.clone().with_new_children(children)?,
            cancel: self.cancel.clone(),
        }))
    }

    fn reset_state(self: Arc<Self>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(CancelExec {
            inner: self.inner.clone().reset_state()?,
            cancel: self.cancel.clone(),
        }))
    }

    // A recursive query hands its work table to the node that reads it through this.
    fn with_new_state(
        &self,
        state: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Option<Arc<dyn ExecutionPlan>> {
        self.inner.with_new_state(state).map(|inner| {
            Arc::new(CancelExec {
                inner,
                cancel: self.cancel.clone(),
            }) as Arc<dyn ExecutionPlan>
        })
    }

    fn metrics(&self) -> Option<datafusion::physical_plan::metrics::MetricsSet> {
        self.inner.metrics()
    }

    fn partition_statistics(
        &self,
        partition: Option<usize>,
    ) -> Result<Arc<datafusion::common::Statistics>> {
        self.inner.partition_statistics(partition)
    }

    fn fetch(&self) -> Option<usize> {
        self.inner.fetch()
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.cancel.check()?;
        Ok(Box::pin(CancelStream {
            inner: self.inner.execute(partition, context)?,
            cancel: self.cancel.clone(),
        }))
    }
}

struct CancelStream {
    inner: SendableRecordBatchStream,
    cancel: Cancel,
}

impl Stream for CancelStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Err(e) = self.cancel.check() {
            return Poll::Ready(Some(Err(e)));
        }
        self.inner.as_mut().poll_next(cx)
    }
}

impl RecordBatchStream for CancelStream {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}
