//! Audits as jobs: one at a time for real, detached from the request that asked.
//!
//! An audit re-reads every event; it runs in a task of its own, which holds the "running"
//! mark and clears it when it ends. A client that disconnects does not stop it and cannot
//! start a second one: later requests wait for the running audit and share its result. A
//! finished result is reused while the log has not grown (up to [`REUSE_MAX`]); once it has,
//! the next audit starts no sooner than [`INTERVAL_MIN`], and twice the last audit's duration,
//! after the last one ended. So a flood of `GET /v1/audit` keeps the node auditing at most a
//! third of the time, and every answer covers the log as it was when it was asked.

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
    /// The last finished plain audit.
    last: Option<Last>,
}

/// A finished audit: when it ended, how long it took, its report.
struct Last {
    at: Instant,
    took: Duration,
    report: Arc<AuditReport>,
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

/// The report of a plain audit that covers at least the log as it is now: the last one if
/// still fresh, the running one if it covers that much, or a new one. Returns the report and
/// whether it was reused.
pub(crate) async fn audit(state: &AppState) -> Result<(Arc<AuditReport>, bool), ApiError> {
    let size = state.node().ledger.tree_size()?;
    loop {
        let mut rx = {
            let mut slot = state.inner.audits.slot();
            let mut delay = Duration::ZERO;
            if let Some(last) = &slot.last {
                let age = last.at.elapsed();
                if last.report.n_events >= size && age < REUSE_MAX {
                    return Ok((last.report.clone(), true));
                }
                // Back to back audits of a growing log would keep the node busy: wait at
                // least INTERVAL_MIN, and twice as long as the last audit took.
                delay = INTERVAL_MIN.max(last.took * 2).saturating_sub(age);
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
        let report = outcome.expect("invariant: waited for a result")?;
        // A running audit begun before the log grew to `size` does not cover it: go again.
        if report.n_events >= size {
            return Ok((report, false));
        }
    }
}

/// Clears the running (or exporting) mark when the job ends, however it ends (a panic in
/// the audit included).
struct Mark {
    state: AppState,
    export: bool,
}

impl Drop for Mark {
    fn drop(&mut self) {
        let mut slot = self.state.inner.audits.slot();
        if self.export {
            slot.exporting = false;
        } else {
            slot.running = None;
        }
    }
}

/// The audit job: runs, records its result, clears the running mark, then tells the waiters.
/// If it panics, the mark is cleared and the dropped sender wakes the waiters with an error.
async fn run(state: AppState, tx: watch::Sender<Outcome>, delay: Duration) {
    let _mark = Mark {
        state: state.clone(),
        export: false,
    };
    tokio::time::sleep(delay).await;
    let started = Instant::now();
    let result = state
        .node()
        .ledger
        .audit(None)
        .await
        .map(Arc::new)
        .map_err(ApiError::from);
    {
        let mut slot = state.inner.audits.slot();
        if let Ok(report) = &result {
            slot.last = Some(Last {
                at: Instant::now(),
                took: started.elapsed(),
                report: report.clone(),
            });
        }
    }
    drop(_mark);
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
        let _mark = Mark {
            state: job.clone(),
            export: true,
        };
        job.node()
            .ledger
            .audit(Some(&dir))
            .await
            .map(Arc::new)
            .map_err(ApiError::from)
    });
    task.await
        .map_err(|e| ApiError::internal(format!("the export task failed: {e}")))?
}
