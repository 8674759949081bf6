//! A run whose top-level call goes to the cluster's queue: the project uploaded, the call
//! queued, its tree kept from what the workers report, stopped everywhere when asked.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_cluster::Cluster;
use capsule_exec::{CallStatus, Outcome, RemoteCall, RunState};
use python_runtime::ErrorKind as GuestKind;

use super::entry::{CallState, RunEntry, now_ms};
use crate::api::CallView;

/// How long the end of a run's top-level call may take to be reported after its outcome.
const LAST_REPORT_WAIT: Duration = Duration::from_secs(2);

/// How long a stopped run on the cluster may take to report its end before it is taken as
/// stopped (its workers may be gone).
const CLUSTER_STOP_WAIT: Duration = Duration::from_secs(10);

/// Runs `call` (a run's top-level call) on the cluster: uploads the project, queues the call,
/// follows what the workers report, and stops the run everywhere when asked to.
pub(crate) async fn on_cluster(cluster: &Cluster, entry: &Arc<RunEntry>, manifest: &Path, call: RemoteCall) -> Outcome {
    let task = call.task.clone();
    let failed = |error: capsule_cluster::ClusterError| {
        Outcome::not_run(&task, python_runtime::GuestError::new(GuestKind::Host, error.to_string()))
    };
    let manifest_sha256 = match cluster.publish_project(manifest).await {
        Ok(sha256) => sha256,
        Err(error) => return failed(error),
    };
    entry.set_status(RunState::Running);
    let mut follower = tokio::spawn(follow_calls(cluster.clone(), entry.clone()));
    let dispatcher = cluster.dispatcher(&entry.namespace, &manifest_sha256);
    let called = dispatcher.call(call);
    tokio::pin!(called);
    let outcome = tokio::select! {
        outcome = &mut called => outcome,
        () = entry.cancel.cancelled() => {
            if let Err(error) = cluster.stop_run(&entry.id).await {
                tracing::warn!(run = %entry.id, %error, "cannot reach the cluster to stop the run");
            }
            match tokio::time::timeout(CLUSTER_STOP_WAIT, &mut called).await {
                Ok(outcome) => outcome,
                Err(_) => Ok(Outcome::not_run(
                    &task,
                    python_runtime::GuestError::new(GuestKind::Cancelled, "the run was stopped"),
                )),
            }
        }
    };
    // A worker records a call's outcome before it reports the call's end: the tree is complete
    // once the top-level call's end is reported (a run stopped before any worker took it has
    // no such report).
    let _ = tokio::time::timeout(LAST_REPORT_WAIT, &mut follower).await;
    follower.abort();
    outcome.unwrap_or_else(failed)
}

/// Keeps the run's tree from the states its calls' workers report, until the top-level call's
/// end is reported.
async fn follow_calls(cluster: Cluster, entry: Arc<RunEntry>) {
    use futures_util::StreamExt;
    let reports = match cluster.watch_calls(&entry.id).await {
        Ok(reports) => reports,
        Err(error) => {
            tracing::warn!(run = %entry.id, %error, "cannot follow the run's calls");
            return;
        }
    };
    tokio::pin!(reports);
    // Call keys become the tree's numeric ids in the order they are first seen.
    let mut ids: HashMap<String, u64> = HashMap::new();
    let mut id_of = |key: &str| {
        let next = ids.len() as u64;
        *ids.entry(key.to_string()).or_insert(next)
    };
    while let Some((key, reported)) = reports.next().await {
        let id = id_of(&key);
        let parent = key.rsplit_once('.').map(|(parent, _)| parent).filter(|p| p.contains('.')).map(&mut id_of);
        let view = CallView::of_cluster(id, parent, reported.clone());
        let age = Duration::from_millis(now_ms().saturating_sub(reported.started_at_ms).max(0) as u64);
        let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let top_level_ended = key == format!("{}.0", entry.id) && view.status != CallStatus::Running;
        let mut state = entry.state.lock().unwrap_or_else(|e| e.into_inner());
        state.calls.insert(id, CallState { view, started });
        if top_level_ended {
            return;
        }
    }
}
