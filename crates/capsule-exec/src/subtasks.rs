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

use crate::run::{Call, Outcome, run_task};
use crate::sandbox::{Program, Streams};

/// How deep sub-tasks may nest (a task calling a task calling a task ...).
pub const MAX_DEPTH: u32 = 8;
/// How many sub-tasks one run may start in all.
pub const MAX_SUBTASKS: u32 = 1_000;

/// Shared by every task of one run.
pub struct Orchestrator {
    program: Program,
    tasks: Vec<Task>,
    streams: Streams,
    default_timeout: Duration,
    project_root: Option<PathBuf>,
    workers: Arc<Semaphore>,
    started: AtomicU32,
}

impl Orchestrator {
    pub fn new(
        program: Program,
        tasks: Vec<Task>,
        streams: Streams,
        default_timeout: Duration,
        project_root: Option<PathBuf>,
        workers: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            program,
            tasks,
            streams,
            default_timeout,
            project_root,
            workers: Arc::new(Semaphore::new(workers.max(1))),
            started: AtomicU32::new(0),
        })
    }
}

/// Where in the tree of a run a task is; passed to each attempt's sandbox.
#[derive(Clone)]
pub struct Scope {
    pub orchestrator: Arc<Orchestrator>,
    pub depth: u32,
    /// The worker permit of a spawned task, given back while it waits for its own children
    /// (so a full pool of waiting parents cannot starve their children).
    permit: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
}

impl Scope {
    pub fn root(orchestrator: Arc<Orchestrator>) -> Self {
        Self { orchestrator, depth: 0, permit: Arc::default() }
    }
}

/// The sub-task state of one attempt: its scope, deadline and spawned handles.
pub struct Subtasks {
    scope: Scope,
    deadline: Instant,
    handles: HashMap<u64, JoinHandle<Outcome>>,
    next_handle: u64,
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
    pub fn new(scope: Scope, deadline: Instant) -> Self {
        Self { scope, deadline, handles: HashMap::new(), next_handle: 1 }
    }

    /// Checks the guards and prepares the call of a sub-task.
    fn prepare(&self, request: &Value) -> Result<(Task, Call, Scope), Value> {
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
        let call = Call {
            args: request.args,
            kwargs: request.kwargs,
            default_timeout: orchestrator.default_timeout,
            project_root: orchestrator.project_root.clone(),
        };
        let child = Scope { orchestrator: orchestrator.clone(), depth: self.scope.depth + 1, permit: Arc::default() };
        Ok((task, call, child))
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// `task.call`: run a sub-task now and wait for it (the caller is blocked meanwhile).
    pub async fn call(&mut self, request: &Value) -> Value {
        let (task, call, child) = match self.prepare(request) {
            Ok(prepared) => prepared,
            Err(reply) => return reply,
        };
        let orchestrator = self.scope.orchestrator.clone();
        let run = Box::pin(run_task(&orchestrator.program, &task, call, orchestrator.streams, Some(child)));
        match tokio::time::timeout(self.remaining(), run).await {
            Ok(outcome) => reply(&outcome),
            Err(_) => refused(ErrorKind::Timeout, format!("the caller's deadline passed while `{}` ran", task.name)),
        }
    }

    /// `task.spawn`: start a sub-task on the worker pool; returns its handle.
    pub fn spawn(&mut self, request: &Value) -> Value {
        let (task, call, child) = match self.prepare(request) {
            Ok(prepared) => prepared,
            Err(reply) => return reply,
        };
        let orchestrator = self.scope.orchestrator.clone();
        let handle = tokio::spawn(async move {
            let permit = orchestrator.workers.clone().acquire_owned().await.expect("the pool is never closed");
            *child.permit.lock().await = Some(permit);
            let permit_slot = child.permit.clone();
            let outcome = run_task(&orchestrator.program, &task, call, orchestrator.streams, Some(child)).await;
            permit_slot.lock().await.take();
            outcome
        });
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

impl Drop for Subtasks {
    /// Sub-tasks nobody waited for end with the attempt that spawned them.
    fn drop(&mut self) {
        for handle in self.handles.values() {
            handle.abort();
        }
    }
}
