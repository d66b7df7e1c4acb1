//! Audits as jobs: one at a time for real, detached from the request that asked.
//!
//! An audit re-reads every event; it runs in a task of its own, which holds the "running"
//! mark and clears it when it ends. A client that disconnects does not stop it and cannot
//! start a second one: later requests wait for the running audit and share its result. A
//! finished result is reused while the log has not grown (up to [`REUSE_MAX`]); once it has,
//! the next audit starts no sooner than [`INTERVAL_MIN`] after the last one ended. So a flood
//! of `GET /v1/audit` costs at most one audit per interval, and every answer is fresh.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshnode_ledger::AuditReport;
use tokio::sync::watch;

use super::{ApiError, AppState};

/// A finished audit is reused this long if the log did not grow.
pub(crate) const REUSE_MAX: Duration = Duration::from_secs(300);
/// A new audit starts no sooner than this after the last one ended (requests wait).
pub(crate) const INTERVAL_MIN: Duration = Duration::from_secs(2);

type Outcome = Option<Result<Arc<AuditReport>, ApiError>>;

/// The node's audit state.
#[derive(Default)]
pub(crate) struct Audits(Mutex<Slot>);

#[derive(Default)]
struct Slot {
    /// The audit in progress, if any: its result arrives here.
    running: Option<watch::Receiver<Outcome>>,
    /// An export is running (it writes files; never shared).
    exporting: bool,
    /// The last finished plain audit: when, over how many events, and its report.
    last: Option<(Instant, u64, Arc<AuditReport>)>,
}

impl Audits {
    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.0
            .lock()
            .expect("invariant: audit slot lock is never poisoned")
    }
}

fn busy() -> ApiError {
    ApiError::new(
        http::StatusCode::TOO_MANY_REQUESTS,
        "audit_running",
        "an audit or export is already running; try again when it finished",
    )
    .with_header(http::header::RETRY_AFTER, "5".into())
}

/// The report of a plain audit: the last one if still fresh, the running one, or a new one.
/// Returns the report and whether it was reused.
pub(crate) async fn audit(state: &AppState) -> Result<(Arc<AuditReport>, bool), ApiError> {
    let size = state.node().ledger.tree_size()?;
    let mut rx = {
        let mut slot = state.inner.audits.slot();
        let mut delay = Duration::ZERO;
        if let Some((at, n, report)) = &slot.last {
            let age = at.elapsed();
            if *n == size && age < REUSE_MAX {
                return Ok((report.clone(), true));
            }
            delay = INTERVAL_MIN.saturating_sub(age);
        }
        if slot.exporting {
            return Err(busy());
        }
        match &slot.running {
            Some(rx) => rx.clone(),
            None => {
                let (tx, rx) = watch::channel(None);
                slot.running = Some(rx.clone());
                tokio::spawn(run(state.clone(), tx, delay));
                rx
            }
        }
    };
    let outcome = rx
        .wait_for(Option::is_some)
        .await
        .map_err(|_| ApiError::internal("the audit task ended without a result"))?
        .clone();
    let result = outcome.expect("invariant: waited for a result");
    result.map(|r| (r, false))
}

/// The audit job: runs, records its result, clears the running mark, then tells the waiters.
async fn run(state: AppState, tx: watch::Sender<Outcome>, delay: Duration) {
    tokio::time::sleep(delay).await;
    let result = state
        .node()
        .ledger
        .audit(None)
        .await
        .map(Arc::new)
        .map_err(ApiError::from);
    {
        let mut slot = state.inner.audits.slot();
        slot.running = None;
        if let Ok(report) = &result {
            slot.last = Some((Instant::now(), report.n_events, report.clone()));
        }
    }
    let _ = tx.send(Some(result));
}

/// An export: refused while any audit runs; runs detached, holding the mark until it ends.
pub(crate) async fn export(
    state: &AppState,
    dir: std::path::PathBuf,
) -> Result<Arc<AuditReport>, ApiError> {
    {
        let mut slot = state.inner.audits.slot();
        if slot.exporting || slot.running.is_some() {
            return Err(busy());
        }
        slot.exporting = true;
    }
    let job = state.clone();
    let task = tokio::spawn(async move {
        let result = job.node().ledger.audit(Some(&dir)).await;
        job.inner.audits.slot().exporting = false;
        result.map(Arc::new).map_err(ApiError::from)
    });
    task.await
        .map_err(|e| ApiError::internal(format!("the export task failed: {e}")))?
}
