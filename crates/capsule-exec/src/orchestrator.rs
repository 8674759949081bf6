//! Sub-tasks and the host calls of a run: a task calling another task (`other(x)`,
//! `other.spawn(x)`, `other.map(xs)`) runs it in a fresh sandbox with that task's own limits
//! and retries; HTTP calls go to [`Network`]. With a journal, every call is entered at its
//! position before it runs and completed before its result goes back, so a resumed run
//! replays what finished.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use manifest_schema::Task;
use python_runtime::{ErrorKind, GuestError, HostError, HostReply, HostRequest, HttpErrorKind, HttpRequest, TaskCall};
use serde_json::{Value, json};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::cancel::Cancel;
use crate::environment::Environment;
use crate::events::{CallId, Event, EventSink};
use crate::host::{BoxFuture, HostCalls};
use crate::journal::{AttemptRecord, Completion, Entered, JournalError, Position, args_hash, hash_json};
use crate::net::{Network, without_query};
use crate::outcome::{HttpCall, Outcome};
use crate::paths::Reserved;
use crate::run::{AttemptHosts, Call, TaskContext, run_task};
use crate::sandbox::Program;
use crate::state::RunState;

/// How deep sub-tasks may nest (a task calling a task calling a task ...).
pub const MAX_DEPTH: u32 = 8;
/// How many sub-tasks one run may start in all.
pub const MAX_SUBTASKS: u32 = 1_000;
/// How many sub-tasks of one run may be unfinished at once (running, waiting for their own
/// children, or queued for a worker). Each holds a sandbox while it runs, and the process has
/// `config::MAX_LIVE_SANDBOXES`: one run must not take them all.
pub const MAX_UNFINISHED_SUBTASKS: u32 = 64;

/// How a run's tasks are run.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Options that replace those of the task the run starts (not of its sub-tasks): the
    /// interpreter image's calls bring their own limits.
    pub options: Option<manifest_schema::TaskOptions>,
    /// Deadline of an attempt for tasks that set no `timeout`.
    pub default_timeout: Duration,
    /// The folder `allowed_files` paths are relative to [default: the manifest's].
    pub project_root: Option<PathBuf>,
    /// How many spawned sub-tasks run at once.
    pub workers: usize,
    /// Run sub-tasks elsewhere instead of in this process.
    pub remote: Option<Remote>,
    /// Where `env_passthrough` and `secrets` read their values [default: this process's
    /// environment].
    pub environment: Environment,
}

/// Runs sub-tasks outside this process, e.g. on a cluster's workers.
pub trait Dispatch: Send + Sync + 'static {
    /// Runs `call` somewhere and gives its outcome. A call with the same key as one that
    /// already finished gives that call's outcome without running again.
    fn dispatch(&self, call: RemoteCall) -> BoxFuture<'static, Outcome>;
}

/// A sub-task call handed to a [`Dispatch`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RemoteCall {
    /// `<run>.0` for a run's top-level call, then one `.<position>` per level: the same call
    /// of a re-run parent gets the same key.
    pub key: String,
    /// Sub-task levels above it.
    pub depth: u32,
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: serde_json::Map<String, Value>,
}

/// Where a run's sub-tasks go, and where this run's top-level call sits among them.
#[derive(Clone)]
pub struct Remote {
    pub dispatch: Arc<dyn Dispatch>,
    /// The key of the call this run executes (see [`RemoteCall::key`]).
    pub key: String,
    pub depth: u32,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("key", &self.key).field("depth", &self.depth).finish_non_exhaustive()
    }
}

/// The deadline of an attempt for a task that sets no `timeout`, unless the run says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The cores this process may use, read once: the standard library reads the cgroup's files
/// at every call, and every run's settings start from it.
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            options: None,
            default_timeout: DEFAULT_TIMEOUT,
            project_root: None,
            workers: cores(),
            remote: None,
            environment: Environment::default(),
        }
    }
}

/// Shared by every task of one run.
pub(crate) struct Orchestrator {
    program: Program,
    tasks: Vec<Task>,
    settings: RunSettings,
    /// What no grant of the run may reach.
    reserved: Arc<Reserved>,
    events: Arc<dyn EventSink>,
    cancel: Cancel,
    call_ids: Arc<AtomicU64>,
    workers: Arc<Semaphore>,
    started: AtomicU32,
    unfinished: Arc<Semaphore>,
    /// Why the journal would not replay a call of this run (a changed program or record), once
    /// it has refused one: the run's own failure is then that, not what the task made of it.
    replay_refused: std::sync::OnceLock<String>,
}

/// Where a task call is in its run.
#[derive(Clone)]
pub(crate) struct Scope {
    orchestrator: Arc<Orchestrator>,
    depth: u32,
    call: CallId,
    /// The call's key, when its sub-tasks are dispatched elsewhere.
    remote_key: Option<Arc<str>>,
    /// The call's row, when the run is journaled.
    journal: Option<Position>,
    /// The worker permit of a spawned task, given back while it waits for its own children
    /// (so a full pool of waiting parents cannot starve their children).
    permit: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
}

impl Orchestrator {
    pub fn new(
        program: Program,
        tasks: Vec<Task>,
        settings: RunSettings,
        reserved: Reserved,
        events: Arc<dyn EventSink>,
        cancel: Cancel,
        call_ids: Arc<AtomicU64>,
    ) -> Arc<Self> {
        Arc::new(Self {
            program,
            tasks,
            workers: Arc::new(Semaphore::new(settings.workers.max(1))),
            settings,
            reserved: Arc::new(reserved),
            events,
            cancel,
            call_ids,
            started: AtomicU32::new(0),
            unfinished: Arc::new(Semaphore::new(MAX_UNFINISHED_SUBTASKS as usize)),
            replay_refused: std::sync::OnceLock::new(),
        })
    }

    /// The scope of the run's top-level task.
    pub fn root(self: &Arc<Self>, journal: Option<Position>) -> Scope {
        let remote = self.settings.remote.as_ref();
        Scope {
            orchestrator: self.clone(),
            depth: remote.map_or(0, |r| r.depth),
            call: self.call_ids.fetch_add(1, Ordering::Relaxed),
            remote_key: remote.map(|r| r.key.as_str().into()),
            journal,
            permit: Arc::default(),
        }
    }

    /// How a journal's refusal to let a call through reaches the task: a record that does
    /// not match (changed code, a changed row) is remembered for the run's outcome, as no
    /// retry or resume can get past it; other failures (the database) are the host's.
    fn journal_refusal(&self, error: &JournalError) -> (ErrorKind, String) {
        match error {
            JournalError::Diverged { .. } | JournalError::Corrupt { .. } => {
                let _ = self.replay_refused.set(error.to_string());
                (ErrorKind::Diverged, error.to_string())
            }
            _ => (ErrorKind::Host, error.to_string()),
        }
    }

    pub fn call(&self, args: Vec<Value>, kwargs: serde_json::Map<String, Value>) -> Call {
        Call {
            args,
            kwargs,
            default_timeout: self.settings.default_timeout,
            project_root: self.settings.project_root.clone(),
            reserved: self.reserved.clone(),
            environment: self.settings.environment.clone(),
        }
    }

    pub fn reserved(&self) -> &Reserved {
        &self.reserved
    }
}

impl Scope {
    pub fn call(&self) -> CallId {
        self.call
    }

    pub fn orchestrator(&self) -> &Arc<Orchestrator> {
        &self.orchestrator
    }

    /// Runs `task` here: reports its start and end, and completes its journal row.
    pub async fn run(self, task: &Task, call: Call, parent: Option<CallId>) -> Outcome {
        let orchestrator = self.orchestrator.clone();
        let events = &orchestrator.events;
        events.event(&Event::TaskStarted {
            call: self.call,
            parent,
            task: Cow::Borrowed(&task.name),
            depth: self.depth,
        });
        let context = TaskContext { call: self.call, events, cancel: &orchestrator.cancel, hosts: &self };
        let (mut outcome, attempts) = run_task(&orchestrator.program, task, call, &context).await;
        if let (0, Some(refusal), Some(error)) = (self.depth, orchestrator.replay_refused.get(), outcome.error.as_mut())
        {
            // The task failed because a replay was refused; that is the run's failure.
            error.kind = ErrorKind::Diverged;
            error.message = refusal.clone();
        }
        if let Some(position) = &self.journal
            && let Err(error) = complete_task(position, &outcome, &attempts, self.depth == 0)
        {
            outcome = unrecorded(outcome, &error);
        }
        events.event(&Event::TaskFinished {
            call: self.call,
            depth: self.depth,
            outcome: Box::new(Cow::Borrowed(&outcome)),
        });
        outcome
    }
}

impl AttemptHosts for Scope {
    fn for_attempt(&self, task: &Task, deadline: Instant) -> Box<dyn HostCalls> {
        Box::new(AttemptHost {
            scope: self.clone(),
            deadline,
            network: Network::new(
                task.options.allowed_hosts.clone(),
                task.options.secrets.clone(),
                self.orchestrator.settings.environment.clone(),
                deadline,
            ),
            http_calls: Vec::new(),
            handles: HashMap::new(),
            next_handle: 1,
            sequence: 0,
        })
    }

    fn replay_refused(&self) -> bool {
        self.orchestrator.replay_refused.get().is_some()
    }
}

/// Records how a task call ended, with its attempts (and, for the top-level call, how the run
/// ended), before its result goes anywhere.
fn complete_task(
    position: &Position,
    outcome: &Outcome,
    attempts: &[AttemptRecord],
    top_level: bool,
) -> Result<(), JournalError> {
    let error = outcome.error.as_ref().map(|e| serde_json::to_value(e).expect("errors serialise"));
    let run_status = match outcome.error_kind() {
        None => RunState::Ok,
        Some(ErrorKind::Cancelled) => RunState::Cancelled,
        Some(_) => RunState::Failed,
    };
    let how = Completion {
        ok: outcome.success,
        result: &outcome.result,
        error: error.as_ref(),
        attempts: Some(attempts),
        fuel: Some(outcome.execution.fuel_consumed),
        peak_memory_bytes: Some(outcome.execution.peak_memory_bytes),
        duration_ms: outcome.execution.duration_ms,
        output: Some((&outcome.output.stdout.text, &outcome.output.stderr.text)),
        run_ended: top_level.then_some((&*position.run, run_status)),
    };
    position.journal.complete(position.call, &how)
}

/// Fail closed: a result that could not be journaled is not handed back.
fn unrecorded(mut outcome: Outcome, error: &JournalError) -> Outcome {
    let failure = GuestError::new(ErrorKind::Host, format!("the result could not be recorded in the journal: {error}"));
    outcome.success = false;
    outcome.result = Value::Null;
    outcome.execution.attempt_errors.push(failure.clone());
    outcome.error = Some(failure);
    outcome
}

/// The host calls of one attempt: its HTTP calls and sub-tasks, numbered in one sequence
/// (their positions identify them in the journal).
struct AttemptHost {
    scope: Scope,
    deadline: Instant,
    network: Network,
    http_calls: Vec<HttpCall>,
    handles: HashMap<u64, JoinHandle<Outcome>>,
    next_handle: u64,
    sequence: u32,
}

/// A prepared sub-task call: replayed from the journal, run here, or dispatched elsewhere.
enum Prepared {
    Replay(Value),
    Run { task: Box<Task>, call: Call, child: Scope, slot: OwnedSemaphorePermit },
    Remote { dispatch: Arc<dyn Dispatch>, call: RemoteCall, slot: OwnedSemaphorePermit },
}

fn refused(kind: ErrorKind, message: String) -> HostReply {
    HostReply::task_error(kind, message)
}

fn reply(outcome: &Outcome) -> HostReply {
    match &outcome.error {
        None => HostReply::Ok(outcome.result.clone()),
        Some(error) => HostReply::Err(HostError::Task(error.clone())),
    }
}

impl HostCalls for AttemptHost {
    fn call(&mut self, request: HostRequest) -> BoxFuture<'_, HostReply> {
        Box::pin(async move {
            match request {
                HostRequest::Http { request } => self.http(request).await,
                HostRequest::TaskCall(call) => self.call_task(call).await,
                HostRequest::TaskSpawn(call) => self.spawn(call),
                HostRequest::TaskWait { handle } => self.wait(handle).await,
            }
        })
    }

    fn take_http_calls(&mut self) -> Vec<HttpCall> {
        std::mem::take(&mut self.http_calls)
    }
}

impl AttemptHost {
    fn next_position(&mut self) -> u32 {
        self.sequence += 1;
        self.sequence
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    async fn http(&mut self, request: HttpRequest) -> HostReply {
        let seq = self.next_position();
        let mut row = None;
        if let Some(position) = &self.scope.journal {
            let method = request.method.to_ascii_uppercase();
            // Headers are left out of the identity: they may carry credentials that change.
            let identity = json!([method, request.url, request.body_base64]);
            match position.enter(seq, "http", &method, &without_query(&request.url), &hash_json(&identity)) {
                Ok(Entered::Replay { result, .. }) => return HostReply::Ok(result),
                Ok(Entered::Run { id }) => row = Some(position.at(id)),
                Err(error) => {
                    let (_, message) = self.scope.orchestrator.journal_refusal(&error);
                    return HostReply::http_error(HttpErrorKind::Refused, message);
                }
            }
        }
        let cancel = self.scope.orchestrator.cancel.clone();
        let (reply, record) = tokio::select! {
            done = self.network.request(request) => done,
            () = cancel.cancelled() => return refused(ErrorKind::Cancelled, "the run was stopped".into()),
        };
        self.scope.orchestrator.events.event(&Event::Http { call: self.scope.call, request: Cow::Borrowed(&record) });
        let duration_ms = record.duration_ms;
        self.http_calls.push(record);
        if let Some(row) = row {
            let (ok, result, error) = match &reply {
                HostReply::Ok(value) => (true, value.clone(), None),
                HostReply::Err(error) => (false, Value::Null, Some(serde_json::to_value(error).expect("serialises"))),
            };
            let how = Completion {
                ok,
                result: &result,
                error: error.as_ref(),
                attempts: None,
                fuel: None,
                peak_memory_bytes: None,
                duration_ms,
                output: None,
                run_ended: None,
            };
            if let Err(error) = row.journal.complete(row.call, &how) {
                return refused(ErrorKind::Host, format!("the response could not be recorded in the journal: {error}"));
            }
        }
        reply
    }

    /// Checks the guards, consults the journal, and prepares the call of a sub-task.
    fn prepare(&mut self, request: TaskCall) -> Result<Prepared, HostReply> {
        let seq = self.next_position();
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
            call: orchestrator.call_ids.fetch_add(1, Ordering::Relaxed),
            remote_key: self.scope.remote_key.as_ref().map(|key| format!("{key}.{seq}").into()),
            journal: None,
            permit: Arc::default(),
        };
        if let Some(position) = &self.scope.journal {
            let args_hash = args_hash(&request.args, &request.kwargs);
            match position.enter(seq, "task", &task.name, "", &args_hash) {
                Ok(Entered::Replay { result, .. }) => {
                    let replayed = Event::TaskReplayed {
                        parent: self.scope.call,
                        task: Cow::Borrowed(&task.name),
                        depth: child.depth,
                    };
                    orchestrator.events.event(&replayed);
                    return Ok(Prepared::Replay(result));
                }
                Ok(Entered::Run { id }) => child.journal = Some(position.at(id)),
                Err(error) => {
                    let (kind, message) = orchestrator.journal_refusal(&error);
                    return Err(refused(kind, message));
                }
            }
        }
        if let (Some(remote), Some(key)) = (&orchestrator.settings.remote, child.remote_key.clone()) {
            let call = RemoteCall {
                key: key.to_string(),
                depth: child.depth,
                task: task.name,
                args: request.args,
                kwargs: request.kwargs,
            };
            return Ok(Prepared::Remote { dispatch: remote.dispatch.clone(), call, slot });
        }
        let call = orchestrator.call(request.args, request.kwargs);
        Ok(Prepared::Run { task: Box::new(task), call, child, slot })
    }

    /// `task.call`: run a sub-task now and wait for it (the caller is blocked meanwhile).
    async fn call_task(&mut self, request: TaskCall) -> HostReply {
        let (task, call, child, _slot) = match self.prepare(request) {
            Ok(Prepared::Run { task, call, child, slot }) => (task, call, child, slot),
            Ok(Prepared::Replay(result)) => return HostReply::Ok(result),
            Ok(Prepared::Remote { dispatch, call, slot: _slot }) => {
                let task = call.task.clone();
                let cancel = self.scope.orchestrator.cancel.clone();
                return tokio::select! {
                    done = tokio::time::timeout(self.remaining(), dispatch.dispatch(call)) => match done {
                        Ok(outcome) => reply(&outcome),
                        Err(_) => refused(ErrorKind::Timeout, format!("the caller's deadline passed while `{task}` ran")),
                    },
                    () = cancel.cancelled() => refused(ErrorKind::Cancelled, "the run was stopped".into()),
                };
            }
            Err(reply) => return reply,
        };
        let parent = Some(self.scope.call);
        match tokio::time::timeout(self.remaining(), Box::pin(child.run(&task, call, parent))).await {
            Ok(outcome) => reply(&outcome),
            Err(_) => refused(ErrorKind::Timeout, format!("the caller's deadline passed while `{}` ran", task.name)),
        }
    }

    /// `task.spawn`: start a sub-task on the worker pool; the reply is its handle.
    fn spawn(&mut self, request: TaskCall) -> HostReply {
        let parent = Some(self.scope.call);
        let handle = match self.prepare(request) {
            Ok(Prepared::Run { task, call, child, slot }) => {
                let workers = self.scope.orchestrator.workers.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let permit = workers.acquire_owned().await.expect("the pool is never closed");
                    *child.permit.lock().await = Some(permit);
                    let permit_slot = child.permit.clone();
                    let outcome = child.run(&task, call, parent).await;
                    permit_slot.lock().await.take();
                    outcome
                })
            }
            Ok(Prepared::Replay(result)) => {
                let task = String::new();
                tokio::spawn(async move { Outcome::without_attempts(&task, Ok(result)) })
            }
            Ok(Prepared::Remote { dispatch, call, slot }) => tokio::spawn(async move {
                let _slot = slot;
                dispatch.dispatch(call).await
            }),
            Err(reply) => return reply,
        };
        let id = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(id, handle);
        HostReply::Ok(id.into())
    }

    /// `task.wait`: the result of a spawned sub-task, within the caller's deadline.
    async fn wait(&mut self, handle: u64) -> HostReply {
        let Some(handle) = self.handles.remove(&handle) else {
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

impl Drop for AttemptHost {
    /// Sub-tasks nobody waited for end with the attempt that spawned them.
    fn drop(&mut self) {
        for handle in self.handles.values() {
            handle.abort();
        }
    }
}
