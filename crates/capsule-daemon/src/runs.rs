//! The runs a daemon holds: submitting (with a bounded queue), each run's live tree and log
//! (kept from its events), stopping, restarting, and resuming what a previous daemon left
//! unfinished. All engine work happens on the engine's runtime, never on the API's. With a
//! cluster, a run's top-level call goes to the cluster's queue instead, and the run's tree is
//! what its workers report.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use capsule_cluster::Cluster;
use capsule_exec::{
    CallStatus, Cancel, Engine, Event, EventSink, Journal, Outcome, RemoteCall, RunRequest, RunSettings, RunState,
    Start,
};
use manifest_schema::{Category, ProjectFile};
use python_runtime::ErrorKind as GuestKind;
use tokio::runtime::Handle;
use tokio::sync::{Notify, Semaphore};

use crate::admission;
use crate::api::{ApiError, CallView, Line, RunView, SubmitRun};
use crate::registry::{Registered, Registry};

/// Finished runs kept in memory for `list` and `logs`; older ones are in their journals.
const FINISHED_KEPT: usize = 1_000;
/// Event bytes kept per run for streaming and `logs`; a run that prints more keeps the end.
const LOG_BYTES: usize = 4 << 20;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// How the daemon runs things.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Runs running at once.
    pub workers: usize,
    /// Runs waiting beyond those; more are refused.
    pub queue: usize,
    /// One journal for every run, instead of each project's own.
    pub journal: Option<PathBuf>,
    /// The daemon's own folders (its records, its socket): no client's journal goes there.
    pub own_places: Vec<PathBuf>,
}

pub struct Runs {
    engine: Engine,
    engine_runtime: Handle,
    registry: Registry,
    limits: Limits,
    slots: Arc<Semaphore>,
    /// Runs queued or running.
    active: AtomicUsize,
    running: AtomicUsize,
    accepting: AtomicBool,
    runs: Mutex<Held>,
    journals: Mutex<HashMap<PathBuf, Arc<Journal>>>,
    /// Where runs go instead of this process's sandboxes, when the daemon has a cluster.
    cluster: Option<Cluster>,
}

/// A run ready to go: here, or on the cluster.
enum Body {
    Here(Box<capsule_exec::PreparedRun>),
    Cluster { manifest: PathBuf, call: RemoteCall },
}

/// How long a stopped run on the cluster may take to report its end before it is taken as
/// stopped (its workers may be gone).
const CLUSTER_STOP_WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Held {
    by_id: HashMap<String, Arc<RunEntry>>,
    /// Finished runs, oldest first, for eviction.
    finished: VecDeque<String>,
}

/// One run: what was asked, and what is known of it so far.
pub struct RunEntry {
    pub id: String,
    namespace: String,
    task: String,
    entry: String,
    request: SubmitRun,
    restarted_from: Option<String>,
    submitted_at_ms: i64,
    cancel: Cancel,
    state: Mutex<RunProgress>,
    log: Mutex<Log>,
    changed: Notify,
}

struct RunProgress {
    status: RunState,
    finished_at_ms: Option<i64>,
    outcome: Option<Outcome>,
    calls: BTreeMap<u64, CallState>,
}

struct CallState {
    view: CallView,
    started: Instant,
}

/// The run's events as NDJSON lines, numbered from 0.
#[derive(Default)]
struct Log {
    lines: VecDeque<Arc<str>>,
    first: u64,
    bytes: usize,
    ended: bool,
}

impl Log {
    fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line.into());
        while self.bytes > LOG_BYTES && self.lines.len() > 1 {
            let dropped = self.lines.pop_front().expect("not empty");
            self.bytes -= dropped.len();
            self.first += 1;
        }
    }
}

impl RunEntry {
    /// A queued run, without its id and task until they are known.
    fn new(
        namespace: String,
        entry: String,
        request: SubmitRun,
        restarted_from: Option<String>,
        cancel: Cancel,
    ) -> Self {
        Self {
            id: String::new(),
            namespace,
            task: String::new(),
            entry,
            request,
            restarted_from,
            submitted_at_ms: now_ms(),
            cancel,
            state: Mutex::new(RunProgress {
                status: RunState::Queued,
                finished_at_ms: None,
                outcome: None,
                calls: BTreeMap::new(),
            }),
            log: Mutex::default(),
            changed: Notify::new(),
        }
    }

    pub fn view(&self, with_calls: bool) -> RunView {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let calls = if with_calls {
            state
                .calls
                .values()
                .map(|call| {
                    let mut view = call.view.clone();
                    if view.status == CallStatus::Running {
                        view.elapsed_ms = call.started.elapsed().as_millis() as u64;
                    }
                    view
                })
                .collect()
        } else {
            Vec::new()
        };
        RunView {
            id: self.id.clone(),
            namespace: self.namespace.clone(),
            task: self.task.clone(),
            entry: self.entry.clone(),
            status: state.status,
            submitted_at_ms: self.submitted_at_ms,
            finished_at_ms: state.finished_at_ms,
            restarted_from: self.restarted_from.clone(),
            error: state.outcome.as_ref().and_then(|o| o.error.clone()),
            calls,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).finished_at_ms.is_some()
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).outcome.clone()
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Lines from number `from` on, the number of the next one, and whether the log has ended.
    pub fn lines_from(&self, from: u64) -> (Vec<Arc<str>>, u64, bool) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let start = from.max(log.first);
        let skip = (start - log.first) as usize;
        let lines: Vec<Arc<str>> = log.lines.iter().skip(skip).cloned().collect();
        (lines, log.first + log.lines.len() as u64, log.ended)
    }

    /// A future that resolves at the run's next change (a new line, its end), registered
    /// now, so that a change between this call and awaiting it is not missed.
    pub fn next_change(&self) -> std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>> {
        let mut notified = Box::pin(self.changed.notified());
        notified.as_mut().enable();
        notified
    }

    fn push_line(&self, line: &Line) {
        self.push_text(serde_json::to_string(line).expect("lines serialise") + "\n");
    }

    fn push_text(&self, line: String) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        self.changed.notify_waiters();
    }

    fn set_status(&self, status: RunState) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).status = status;
        self.changed.notify_waiters();
    }

    fn finish(&self, outcome: Outcome, status: RunState) {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.status = status;
            state.finished_at_ms = Some(now_ms());
            state.outcome = Some(outcome.clone());
            // What still runs when the run ends was abandoned with it.
            for call in state.calls.values_mut().filter(|c| c.view.status == CallStatus::Running) {
                call.view.status = CallStatus::Aborted;
                call.view.elapsed_ms = call.started.elapsed().as_millis() as u64;
            }
        }
        self.push_line(&Line::Outcome { outcome });
        self.log.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
        self.changed.notify_waiters();
    }
}

/// Keeps a run's tree and log from its events.
fn record(entry: &RunEntry, event: &Event<'_>) {
    {
        let mut state = entry.state.lock().unwrap_or_else(|e| e.into_inner());
        let calls = &mut state.calls;
        match event {
            Event::TaskStarted { call, parent, task, .. } => {
                let view = CallView::started(*call, *parent, task);
                calls.insert(*call, CallState { view, started: Instant::now() });
            }
            Event::AttemptFailed { call, attempt, retrying: true, .. } => {
                if let Some(state) = calls.get_mut(call) {
                    state.view.attempt = attempt + 1;
                }
            }
            Event::Http { call, request } => {
                if let Some(state) = calls.get_mut(call) {
                    state.view.http.push(request.clone().into_owned());
                }
            }
            Event::TaskFinished { call, outcome, .. } => {
                if let Some(state) = calls.get_mut(call) {
                    let elapsed_ms = state.started.elapsed().as_millis() as u64;
                    state.view.end(outcome, elapsed_ms);
                }
            }
            _ => {}
        }
    }
    // The top-level outcome is the run's last line; a sub-task's is in the tree.
    if !matches!(event, Event::TaskFinished { depth: 0, .. }) {
        // `Line::Event`, written without first copying the event into an owned one.
        let event = serde_json::to_string(event).expect("events serialise");
        entry.push_text(format!("{{\"kind\":\"event\",\"event\":{event}}}\n"));
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(Category::Usage, message)
}

/// Whether `manifest` (resolved) is the built-in interpreter image's.
fn is_interpreter_image(manifest: &Path) -> bool {
    crate::sessions::interpreter_image()
        .ok()
        .and_then(|image| image.canonicalize().ok())
        .is_some_and(|image| image == manifest)
}

impl Runs {
    pub fn new(
        engine: Engine,
        engine_runtime: Handle,
        registry: Registry,
        limits: Limits,
        cluster: Option<Cluster>,
    ) -> Self {
        Self {
            cluster,
            engine,
            engine_runtime,
            registry,
            slots: Arc::new(Semaphore::new(limits.workers.max(1))),
            limits,
            active: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            runs: Mutex::default(),
            journals: Mutex::default(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Where sandboxes run (and live, for sessions).
    pub fn engine_runtime(&self) -> &Handle {
        &self.engine_runtime
    }

    pub fn counts(&self) -> (usize, usize) {
        let (active, running) = (self.active.load(Ordering::Relaxed), self.running.load(Ordering::Relaxed));
        (running, active.saturating_sub(running))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn journal(&self, path: &Path) -> Result<Arc<Journal>, ApiError> {
        let mut journals = self.journals.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(journal) = journals.get(path) {
            return Ok(journal.clone());
        }
        let journal = Arc::new(Journal::open(path).map_err(|e| ApiError::of(&e))?);
        journals.insert(path.to_path_buf(), journal.clone());
        Ok(journal)
    }

    pub fn get(&self, id: &str) -> Result<Arc<RunEntry>, ApiError> {
        let runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        runs.by_id.get(id).cloned().ok_or_else(|| {
            ApiError::hinted(Category::NotFound, format!("no run `{id}`"), "`capsule list --all` shows the runs")
        })
    }

    /// Runs, newest first: those not finished, and with `all` the finished ones kept too.
    pub fn list(&self, all: bool, namespace: Option<&str>) -> Vec<RunView> {
        let runs: Vec<Arc<RunEntry>> =
            self.runs.lock().unwrap_or_else(|e| e.into_inner()).by_id.values().cloned().collect();
        let mut views: Vec<RunView> = runs
            .iter()
            .filter(|run| namespace.is_none_or(|ns| run.namespace == ns))
            .filter(|run| all || !run.is_finished())
            .map(|run| run.view(true))
            .collect();
        views.sort_by(|a, b| b.submitted_at_ms.cmp(&a.submitted_at_ms).then(b.id.cmp(&a.id)));
        views
    }

    /// Starts a run; it may wait in the queue. Returns as soon as it has an id.
    pub async fn submit(
        self: &Arc<Self>,
        request: SubmitRun,
        restarted_from: Option<String>,
    ) -> Result<Arc<RunEntry>, ApiError> {
        self.admit()?;
        let (ready, accepted) = tokio::sync::oneshot::channel();
        self.launch(request, restarted_from, None, Answer::Accepted(ready));
        accepted.await.unwrap_or_else(|_| Err(ApiError::new(Category::Internal, "preparing the run failed")))
    }

    /// Starts a run and answers once it has ended, with its view and outcome: the API's
    /// thread wakes once per run.
    pub async fn submit_and_wait(self: &Arc<Self>, request: SubmitRun) -> Result<(RunView, Outcome), ApiError> {
        self.admit()?;
        let (ready, finished) = tokio::sync::oneshot::channel();
        self.launch(request, None, None, Answer::Finished(ready));
        finished.await.unwrap_or_else(|_| Err(ApiError::new(Category::Internal, "the run's task failed")))
    }

    /// Counts a new run as active, unless the daemon is closing or full.
    fn admit(&self) -> Result<(), ApiError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(ApiError::new(Category::Busy, "the daemon is shutting down"));
        }
        let capacity = self.limits.workers.max(1) + self.limits.queue;
        if self.active.fetch_add(1, Ordering::SeqCst) >= capacity {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::hinted(
                Category::Busy,
                format!("the daemon's queue is full ({capacity} runs queued or running)"),
                "try again when some have finished, or start the daemon with a larger `--queue`",
            ));
        }
        Ok(())
    }

    /// Prepares and runs a run on the engine's runtime (one hop from the API's thread).
    fn launch(
        self: &Arc<Self>,
        request: SubmitRun,
        restarted_from: Option<String>,
        resume_id: Option<String>,
        answer: Answer,
    ) {
        let this = self.clone();
        self.engine_runtime.spawn(async move {
            match this.prepare(request, restarted_from, resume_id) {
                Ok((entry, body)) => {
                    this.runs.lock().unwrap_or_else(|e| e.into_inner()).by_id.insert(entry.id.clone(), entry.clone());
                    let finished = match answer {
                        Answer::Accepted(ready) => {
                            let _ = ready.send(Ok(entry.clone()));
                            None
                        }
                        Answer::Finished(ready) => Some(ready),
                    };
                    let outcome = this.execute(entry.clone(), body).await;
                    if let Some(ready) = finished {
                        let _ = ready.send(Ok((entry.view(true), outcome)));
                    }
                }
                Err(error) => {
                    this.active.fetch_sub(1, Ordering::SeqCst);
                    match answer {
                        Answer::Accepted(ready) => drop(ready.send(Err(error))),
                        Answer::Finished(ready) => drop(ready.send(Err(error))),
                    }
                }
            }
        });
    }

    /// Loads the manifest, opens the journal and enters the run (file and database work, on
    /// the engine's runtime).
    fn prepare(
        &self,
        mut request: SubmitRun,
        restarted_from: Option<String>,
        resume_id: Option<String>,
    ) -> Result<(Arc<RunEntry>, Body), ApiError> {
        admission::resolve_paths(&mut request)?;
        let manifest_dir = request.manifest.parent().unwrap_or(Path::new("/")).to_path_buf();
        let project = request.project.clone().unwrap_or(manifest_dir);
        let default_timeout = match &request.default_timeout {
            Some(text) => {
                manifest_schema::parse_duration(text).map_err(|p| bad(format!("`default_timeout`: {}", p.message)))?
            }
            None => capsule_exec::limits::DEFAULT_TIMEOUT,
        };
        let namespace = ProjectFile::namespace(&project).map_err(|e| ApiError::of(&e))?;
        let image = is_interpreter_image(&request.manifest);
        let loaded = match (admission::trust(&request.trust)?, image) {
            (Some(trust), _) => self.engine.load_signed(&request.manifest, &trust),
            // The daemon's own build, in its user's cache: trusted like the daemon itself.
            (None, true) => self.engine.load_own(&request.manifest),
            (None, false) => self.engine.load(&request.manifest),
        }
        .map_err(|e| ApiError::of(&e))?;
        if let Some(options) = &request.options {
            let task =
                capsule_exec::select_task(loaded.manifest(), request.task.as_deref()).map_err(|e| ApiError::of(&e))?;
            admission::check_options(task, options, image)?;
        }
        let entry = request.entry.clone().unwrap_or_else(|| request.manifest.clone());
        if self.cluster.is_some() {
            return self.prepare_for_cluster(request, restarted_from, resume_id, namespace, &loaded, entry);
        }
        let journal_path = self.journal_path(&request);
        if self.limits.journal.is_none() {
            // A journal the client chose (the daemon's own `--journal` is the operator's).
            admission::check_journal(&journal_path, &self.limits.own_places)?;
        }
        let journal = self.journal(&journal_path)?;
        let start = match (&resume_id, &request.resume) {
            (Some(id), _) | (None, Some(id)) => Start::Resume { run_id: id.clone() },
            (None, None) => {
                Start::Task { task: request.task.clone(), args: request.args.clone(), kwargs: request.kwargs.clone() }
            }
        };
        let mut settings = RunSettings {
            options: request.options.clone(),
            default_timeout,
            project_root: request.files_root.clone(),
            ..RunSettings::default()
        };
        if let Some(workers) = request.workers {
            settings.workers = workers.max(1);
        }
        let cancel = Cancel::default();
        let shell =
            Arc::new(RunEntry::new(namespace, entry.display().to_string(), request, restarted_from, cancel.clone()));
        // The recorder needs the entry, and the entry its id, which the journal gives: the
        // events go to a slot filled once the entry is complete.
        let slot: Arc<OnceLock<Arc<RunEntry>>> = Arc::default();
        let run_request = RunRequest {
            start,
            entry: Some(shell.entry.clone()),
            settings,
            journal: Some(journal),
            events: Arc::new(Deferred(slot.clone())),
            cancel,
        };
        let prepared = self.engine.prepare(&loaded, run_request).map_err(|e| ApiError::of(&e))?;
        let id = prepared.run_id().expect("daemon runs are journaled").to_string();
        let mut shell = Arc::into_inner(shell).expect("not shared yet");
        shell.id = id;
        shell.task = prepared.task().to_string();
        let entry = Arc::new(shell);
        let _ = slot.set(entry.clone());
        self.register(&entry)?;
        Ok((entry, Body::Here(Box::new(prepared))))
    }

    /// A run whose top-level call goes to the cluster: the manifest was loaded (so its
    /// artifact checked) here; the task is chosen now, and it runs with the manifest's limits.
    fn prepare_for_cluster(
        &self,
        request: SubmitRun,
        restarted_from: Option<String>,
        resume_id: Option<String>,
        namespace: String,
        loaded: &capsule_exec::Loaded,
        entry: PathBuf,
    ) -> Result<(Arc<RunEntry>, Body), ApiError> {
        if request.options.is_some() {
            return Err(ApiError::hinted(
                Category::Usage,
                "this daemon runs tasks on a cluster, where they run with the limits of their manifest",
                "set the limits in `@task(...)`, or run it without the daemon (`--no-daemon`)",
            ));
        }
        let task = capsule_exec::select_task(loaded.manifest(), request.task.as_deref())
            .map_err(|e| ApiError::of(&e))?
            .name
            .clone();
        // Resuming a run on the cluster is waiting for it again: its calls' outcomes are there.
        let id = resume_id.or_else(|| request.resume.clone()).unwrap_or_else(capsule_exec::new_run_id);
        let call = RemoteCall {
            key: format!("{id}.0"),
            depth: 0,
            task: task.clone(),
            args: request.args.clone(),
            kwargs: request.kwargs.clone(),
        };
        let manifest = request.manifest.clone();
        let mut shell =
            RunEntry::new(namespace, entry.display().to_string(), request, restarted_from, Cancel::default());
        shell.task = task;
        shell.id = id;
        let entry = Arc::new(shell);
        self.register(&entry)?;
        Ok((entry, Body::Cluster { manifest, call }))
    }

    fn register(&self, entry: &RunEntry) -> Result<(), ApiError> {
        let registered = Registered {
            id: entry.id.clone(),
            request: entry.request.clone(),
            restarted_from: entry.restarted_from.clone(),
        };
        self.registry.add(&registered).map_err(|e| ApiError::new(Category::Internal, e.to_string()))
    }

    /// Runs a prepared run when a worker is free (or on the cluster); gives its outcome.
    async fn execute(&self, entry: Arc<RunEntry>, body: Body) -> Outcome {
        let prepared = match body {
            Body::Here(prepared) => prepared,
            Body::Cluster { manifest, call } => {
                let cluster = self.cluster.as_ref().expect("cluster runs need a cluster");
                let outcome = on_cluster(cluster, &entry, &manifest, call).await;
                self.finished(&entry, outcome.clone());
                return outcome;
            }
        };
        let permit = tokio::select! {
            permit = self.slots.clone().acquire_owned() => permit.expect("never closed"),
            () = entry.cancel.cancelled() => {
                let stopped = python_runtime::GuestError::new(GuestKind::Cancelled, "the run was stopped before it started");
                let outcome = Outcome::not_run(&entry.task, stopped);
                self.finished(&entry, outcome.clone());
                return outcome;
            }
        };
        self.running.fetch_add(1, Ordering::SeqCst);
        entry.set_status(RunState::Running);
        let outcome = prepared.run().await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        drop(permit);
        self.finished(&entry, outcome.clone());
        outcome
    }

    fn finished(&self, entry: &Arc<RunEntry>, outcome: Outcome) {
        let interrupted = !self.accepting.load(Ordering::SeqCst) && outcome.error_kind() == Some(GuestKind::Cancelled);
        let status = match outcome.error_kind() {
            None => RunState::Ok,
            Some(_) if interrupted => RunState::Interrupted,
            Some(GuestKind::Cancelled) => RunState::Cancelled,
            Some(_) => RunState::Failed,
        };
        if interrupted && self.cluster.is_none() {
            // Stopped by the daemon's shutdown, not by a user: the next daemon resumes it.
            if let Some(journal) = self.journal_of(entry) {
                let _ = journal.finish_run(&entry.id, RunState::Interrupted);
            }
        }
        // The journal says how the run ended; the registry only learns it when the next
        // daemon looks (one write less per run).
        entry.finish(outcome, status);
        self.active.fetch_sub(1, Ordering::SeqCst);
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        runs.finished.push_back(entry.id.clone());
        while runs.finished.len() > FINISHED_KEPT {
            if let Some(old) = runs.finished.pop_front() {
                runs.by_id.remove(&old);
            }
        }
    }

    /// Where a run of `request` is journaled: the daemon's `--journal`, else the request's,
    /// else its project's.
    fn journal_path(&self, request: &SubmitRun) -> PathBuf {
        self.limits.journal.clone().or_else(|| request.journal.clone()).unwrap_or_else(|| {
            let project = request.project.clone().or_else(|| request.manifest.parent().map(Path::to_path_buf));
            project.unwrap_or_default().join(manifest_schema::STATE_DIR).join("journal.db")
        })
    }

    fn journal_of(&self, entry: &RunEntry) -> Option<Arc<Journal>> {
        self.journal(&self.journal_path(&entry.request)).ok()
    }

    /// Stops a run and every sub-task under it; answers once it has ended (or after `wait`).
    pub async fn stop(&self, id: &str, wait: Duration) -> Result<RunView, ApiError> {
        let entry = self.get(id)?;
        if entry.is_finished() {
            let status = entry.view(false).status;
            return Err(ApiError::new(Category::Conflict, format!("run `{id}` has already finished ({status})")));
        }
        entry.stop();
        let deadline = Instant::now() + wait;
        while !entry.is_finished() && Instant::now() < deadline {
            let change = entry.next_change();
            let _ = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), change).await;
        }
        Ok(entry.view(true))
    }

    /// Starts the same task with the same arguments as a new run linked to `id`.
    pub async fn restart(self: &Arc<Self>, id: &str) -> Result<Arc<RunEntry>, ApiError> {
        let request = match self.get(id) {
            Ok(entry) => entry.request.clone(),
            Err(not_held) => {
                self.registry
                    .get(id)
                    .map_err(|e| ApiError::new(Category::Internal, e.to_string()))?
                    .ok_or(not_held)?
                    .request
            }
        };
        let request = SubmitRun { resume: None, wait: false, stop_on_disconnect: false, ..request };
        self.submit(request, Some(id.to_string())).await
    }

    /// Resumes the runs a previous daemon left queued, running or interrupted.
    pub async fn resume_unfinished(self: &Arc<Self>) {
        let unfinished = match self.registry.unfinished() {
            Ok(runs) => runs,
            Err(error) => {
                tracing::error!(%error, "cannot read the unfinished runs");
                return;
            }
        };
        for run in unfinished {
            // A cluster's runs are not in a journal here: they are resumed by waiting for them.
            let journaled = self.cluster.is_none();
            let ended = journaled
                .then(|| self.journal(&self.journal_path(&run.request)).ok().and_then(|j| j.run(&run.id).ok()))
                .flatten();
            if let Some(record) = ended.filter(|r| r.status.is_final()) {
                let _ = self.registry.set_status(&run.id, record.status, true);
                continue;
            }
            self.active.fetch_add(1, Ordering::SeqCst);
            let id = run.id.clone();
            let (ready, accepted) = tokio::sync::oneshot::channel();
            self.launch(run.request, run.restarted_from, Some(run.id), Answer::Accepted(ready));
            let launched =
                accepted.await.unwrap_or_else(|_| Err(ApiError::new(Category::Internal, "preparing failed")));
            match launched {
                Ok(entry) => tracing::info!(run = %entry.id, "resuming a run the previous daemon did not finish"),
                Err(error) => {
                    tracing::error!(run = %id, why = %error.message, "cannot resume a run");
                    let _ = self.registry.set_status(&id, RunState::Failed, true);
                }
            }
        }
    }

    /// Stops taking runs, lets running ones finish within `grace`, then stops them (they are
    /// journaled as interrupted and resumed by the next daemon).
    pub async fn shutdown(&self, grace: Duration) {
        self.accepting.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let held: Vec<Arc<RunEntry>> =
            self.runs.lock().unwrap_or_else(|e| e.into_inner()).by_id.values().cloned().collect();
        for entry in held.iter().filter(|e| !e.is_finished()) {
            entry.stop();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Runs `call` (a run's top-level call) on the cluster: uploads the project, queues the call,
/// follows what the workers report, and stops the run everywhere when asked to.
async fn on_cluster(cluster: &Cluster, entry: &Arc<RunEntry>, manifest: &Path, call: RemoteCall) -> Outcome {
    let task = call.task.clone();
    let failed = |error: capsule_cluster::ClusterError| {
        Outcome::not_run(&task, python_runtime::GuestError::new(GuestKind::Host, error.to_string()))
    };
    let manifest_sha256 = match cluster.publish_project(manifest).await {
        Ok(sha256) => sha256,
        Err(error) => return failed(error),
    };
    entry.set_status(RunState::Running);
    let follower = tokio::spawn(follow_calls(cluster.clone(), entry.clone()));
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
    // The workers report a call's state before its outcome: let the last reports arrive.
    tokio::time::sleep(Duration::from_millis(100)).await;
    follower.abort();
    outcome.unwrap_or_else(failed)
}

/// Keeps the run's tree from the states its calls' workers report.
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
        let mut state = entry.state.lock().unwrap_or_else(|e| e.into_inner());
        state.calls.insert(id, CallState { view, started });
    }
}

/// When a launched run answers its submitter.
enum Answer {
    /// As soon as it has an id.
    Accepted(tokio::sync::oneshot::Sender<Result<Arc<RunEntry>, ApiError>>),
    /// When it has ended.
    Finished(tokio::sync::oneshot::Sender<Result<(RunView, Outcome), ApiError>>),
}

/// The events of a run, recorded once its entry exists (nothing runs before).
struct Deferred(Arc<OnceLock<Arc<RunEntry>>>);

impl EventSink for Deferred {
    fn event(&self, event: &Event<'_>) {
        if let Some(entry) = self.0.get() {
            record(entry, event);
        }
    }
}
