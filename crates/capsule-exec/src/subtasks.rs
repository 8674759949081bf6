//! Sub-tasks: a task calling another task (`other(x)`, `other.spawn(x)`, `other.map(xs)`)
//! runs it in a fresh sandbox with that task's own limits and retries, through
//! `capsule.host_call`. Spawned sub-tasks run concurrently on a bounded pool of workers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use manifest_schema::Task;
use python_runtime::{ErrorKind, GuestError};
use serde_json::{Value, json};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::journal::{Completion, Entered, Journal, hash_json};
use crate::run::{Call, Outcome, run_task};
use crate::sandbox::{Program, Streams};

/// How deep sub-tasks may nest (a task calling a task calling a task ...).
pub const MAX_DEPTH: u32 = 8;
/// How many sub-tasks one run may start in all.
pub const MAX_SUBTASKS: u32 = 1_000;
/// How many sub-tasks of one run may be unfinished at once (running, waiting for their own
/// children, or queued for a worker). Each holds a sandbox while it runs, and the process has
/// `engine::MAX_LIVE_SANDBOXES`: one run must not take them all.
pub const MAX_UNFINISHED_SUBTASKS: u32 = 64;

/// How a run's sub-tasks are run.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub streams: Streams,
    /// Deadline of an attempt for tasks that set no `timeout`.
    pub default_timeout: Duration,
    /// The folder `allowed_files` paths are relative to.
    pub project_root: Option<PathBuf>,
    /// How many spawned sub-tasks run at once.
    pub workers: usize,
    /// Print sub-task events on stderr (`--verbose`).
    pub verbose: bool,
}

/// Shared by every task of one run.
pub struct Orchestrator {
    program: Program,
    tasks: Vec<Task>,
    settings: RunSettings,
    workers: Arc<Semaphore>,
    started: AtomicU32,
    unfinished: Arc<Semaphore>,
}

impl Orchestrator {
    pub fn new(program: Program, tasks: Vec<Task>, settings: RunSettings) -> Arc<Self> {
        Arc::new(Self {
            program,
            tasks,
            workers: Arc::new(Semaphore::new(settings.workers.max(1))),
            settings,
            started: AtomicU32::new(0),
            unfinished: Arc::new(Semaphore::new(MAX_UNFINISHED_SUBTASKS as usize)),
        })
    }

    fn event(&self, depth: u32, task: &str, what: &str) {
        if self.settings.verbose {
            eprintln!("capsule: {}{task} {what}", "  ".repeat(depth as usize));
        }
    }
}

/// A task's place in the journal: the run and the call row of this task execution.
#[derive(Clone)]
pub struct JournalPosition {
    pub journal: Arc<Journal>,
    pub run: Arc<str>,
    pub call: i64,
}

impl JournalPosition {
    /// Enters the call at `seq` below this task; a divergence is refused with its message.
    pub fn enter(&self, seq: u32, kind: &str, name: &str, detail: &str, args_hash: &str) -> Result<Entered, String> {
        self.journal.enter(&self.run, self.call, seq, kind, name, detail, args_hash).map_err(|e| e.to_string())
    }

    pub fn complete(&self, id: i64, outcome: &Outcome) {
        let error = outcome.error.as_ref().map(|e| serde_json::to_value(e).expect("errors serialise"));
        let how = Completion {
            ok: outcome.success,
            result: &outcome.result,
            error: error.as_ref(),
            attempts: Some(outcome.execution.attempts),
            fuel: Some(outcome.execution.fuel_consumed),
            peak_memory_bytes: Some(outcome.execution.peak_memory_bytes),
            duration_ms: outcome.execution.duration_ms,
        };
        if let Err(error) = self.journal.complete(id, &how) {
            tracing::error!(%error, "could not record a call in the journal");
        }
    }
}

/// Where in the tree of a run a task is; passed to each attempt's sandbox.
#[derive(Clone)]
pub struct Scope {
    pub orchestrator: Arc<Orchestrator>,
    pub depth: u32,
    /// Set when the run is journaled.
    pub journal: Option<JournalPosition>,
    /// The worker permit of a spawned task, given back while it waits for its own children
    /// (so a full pool of waiting parents cannot starve their children).
    permit: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
}

impl Scope {
    pub fn root(orchestrator: Arc<Orchestrator>, journal: Option<JournalPosition>) -> Self {
        Self { orchestrator, depth: 0, journal, permit: Arc::default() }
    }
}

/// The sub-task state of one attempt: its scope, deadline and spawned handles.
pub struct Subtasks {
    scope: Scope,
    deadline: Instant,
    handles: HashMap<u64, JoinHandle<Outcome>>,
    next_handle: u64,
    /// Position of the next call in this attempt's sequence (shared with its HTTP calls).
    sequence: Arc<AtomicU32>,
}

/// A prepared sub-task call: either replayed from the journal or to run for real.
enum Prepared {
    Replay(Value),
    Run { task: Box<Task>, call: Call, child: Scope, journal_id: Option<i64>, slot: OwnedSemaphorePermit },
}

#[derive(serde::Deserialize)]
struct CallRequest {
    task: String,
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    kwargs: serde_json::Map<String, Value>,
}

fn refused(kind: ErrorKind, message: String) -> Value {
    json!({"ok": false, "error": GuestError { kind, exc_type: String::new(), message, traceback: String::new() }})
}

fn reply(outcome: &Outcome) -> Value {
    match &outcome.error {
        None => json!({"ok": true, "result": outcome.result}),
        Some(error) => json!({"ok": false, "error": error}),
    }
}

impl Subtasks {
    pub fn new(scope: Scope, deadline: Instant, sequence: Arc<AtomicU32>) -> Self {
        Self { scope, deadline, handles: HashMap::new(), next_handle: 1, sequence }
    }

    /// Checks the guards, consults the journal, and prepares the call of a sub-task.
    fn prepare(&self, request: &Value) -> Result<Prepared, Value> {
        let seq = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        let request: CallRequest = serde_json::from_value(request.clone())
            .map_err(|e| refused(ErrorKind::InvalidInput, format!("malformed sub-task call: {e}")))?;
        let orchestrator = &self.scope.orchestrator;
        let task = orchestrator
            .tasks
            .iter()
            .find(|t| t.name == request.task)
            .cloned()
            .ok_or_else(|| refused(ErrorKind::InvalidInput, format!("no task named `{}`", request.task)))?;
        if self.scope.depth + 1 > MAX_DEPTH {
            return Err(refused(ErrorKind::InvalidInput, format!("sub-tasks may nest {MAX_DEPTH} deep at most")));
        }
        if orchestrator.started.fetch_add(1, Ordering::SeqCst) >= MAX_SUBTASKS {
            return Err(refused(ErrorKind::InvalidInput, format!("a run may start {MAX_SUBTASKS} sub-tasks at most")));
        }
        let slot = orchestrator.unfinished.clone().try_acquire_owned().map_err(|_| {
            refused(
                ErrorKind::InvalidInput,
                format!("a run may have {MAX_UNFINISHED_SUBTASKS} unfinished sub-tasks at most; wait for some before starting more"),
            )
        })?;
        let mut child = Scope {
            orchestrator: orchestrator.clone(),
            depth: self.scope.depth + 1,
            journal: None,
            permit: Arc::default(),
        };
        let mut journal_id = None;
        if let Some(position) = &self.scope.journal {
            let args_hash = hash_json(&json!([request.args, request.kwargs]));
            match position.enter(seq, "task", &task.name, "", &args_hash) {
                Ok(Entered::Replay { result, .. }) => {
                    orchestrator.event(self.scope.depth + 1, &task.name, "replayed from the journal");
                    return Ok(Prepared::Replay(result));
                }
                Ok(Entered::Run { id }) => {
                    journal_id = Some(id);
                    child.journal = Some(JournalPosition { call: id, ..position.clone() });
                }
                Err(message) => return Err(refused(ErrorKind::Host, message)),
            }
        }
        let call = Call {
            args: request.args,
            kwargs: request.kwargs,
            default_timeout: orchestrator.settings.default_timeout,
            project_root: orchestrator.settings.project_root.clone(),
        };
        Ok(Prepared::Run { task: Box::new(task), call, child, journal_id, slot })
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// `task.call`: run a sub-task now and wait for it (the caller is blocked meanwhile).
    pub async fn call(&mut self, request: &Value) -> Value {
        let (task, call, child, journal_id, _slot) = match self.prepare(request) {
            Ok(Prepared::Run { task, call, child, journal_id, slot }) => (task, call, child, journal_id, slot),
            Ok(Prepared::Replay(result)) => return json!({"ok": true, "result": result}),
            Err(reply) => return reply,
        };
        let orchestrator = self.scope.orchestrator.clone();
        let journal = child.journal.clone();
        let run = Box::pin(run_child(orchestrator, (*task).clone(), call, child));
        match tokio::time::timeout(self.remaining(), run).await {
            Ok(outcome) => {
                if let (Some(position), Some(id)) = (journal, journal_id) {
                    position.complete(id, &outcome);
                }
                reply(&outcome)
            }
            Err(_) => refused(ErrorKind::Timeout, format!("the caller's deadline passed while `{}` ran", task.name)),
        }
    }

    /// `task.spawn`: start a sub-task on the worker pool; returns its handle.
    pub fn spawn(&mut self, request: &Value) -> Value {
        let handle = match self.prepare(request) {
            Ok(Prepared::Run { task, call, child, journal_id, slot }) => {
                let orchestrator = self.scope.orchestrator.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let permit = orchestrator.workers.clone().acquire_owned().await.expect("the pool is never closed");
                    *child.permit.lock().await = Some(permit);
                    let (permit_slot, journal) = (child.permit.clone(), child.journal.clone());
                    let outcome = run_child(orchestrator, *task, call, child).await;
                    permit_slot.lock().await.take();
                    if let (Some(position), Some(id)) = (journal, journal_id) {
                        position.complete(id, &outcome);
                    }
                    outcome
                })
            }
            Ok(Prepared::Replay(result)) => tokio::spawn(async move { Outcome::replayed(result) }),
            Err(reply) => return reply,
        };
        let id = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(id, handle);
        json!({"ok": true, "handle": id})
    }

    /// `task.wait`: the result of a spawned sub-task, within the caller's deadline.
    pub async fn wait(&mut self, request: &Value) -> Value {
        let Some(handle) = request.get("handle").and_then(Value::as_u64).and_then(|id| self.handles.remove(&id)) else {
            return refused(ErrorKind::InvalidInput, "no such sub-task handle (each is waited for once)".into());
        };
        // Give the worker back while waiting, so children can run even when every worker is
        // taken by a waiting parent.
        let released = self.scope.permit.lock().await.take().is_some();
        let waited = tokio::time::timeout(self.remaining(), handle).await;
        if released {
            let permit = self.scope.orchestrator.workers.clone().acquire_owned().await.expect("never closed");
            *self.scope.permit.lock().await = Some(permit);
        }
        match waited {
            Ok(Ok(outcome)) => reply(&outcome),
            Ok(Err(join_error)) => refused(ErrorKind::Host, format!("the sub-task's runner failed: {join_error}")),
            Err(_) => refused(ErrorKind::Timeout, "the caller's deadline passed while waiting for a sub-task".into()),
        }
    }
}

/// Runs a sub-task, reporting its start and end when the run is verbose.
async fn run_child(orchestrator: Arc<Orchestrator>, task: Task, call: Call, child: Scope) -> Outcome {
    let depth = child.depth;
    orchestrator.event(depth, &task.name, "started");
    let outcome = run_task(&orchestrator.program, &task, call, orchestrator.settings.streams, Some(child)).await;
    let how = match &outcome.error {
        None => format!("finished in {} ms", outcome.execution.duration_ms),
        Some(error) => format!("failed ({}) after {} attempts", error.kind.as_str(), outcome.execution.attempts),
    };
    orchestrator.event(depth, &task.name, &how);
    outcome
}

impl Drop for Subtasks {
    /// Sub-tasks nobody waited for end with the attempt that spawned them.
    fn drop(&mut self) {
        for handle in self.handles.values() {
            handle.abort();
        }
    }
}
