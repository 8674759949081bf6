//! The runs a daemon holds: submitting (with a bounded queue), each run's live tree and log
//! (kept from its events), stopping, restarting, and resuming what a previous daemon left
//! unfinished. All engine work happens on the engine's runtime, never on the API's. With a
//! cluster, a run's top-level call goes to the cluster's queue instead, and the run's tree is
//! what its workers report.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use capsule_cluster::Cluster;
use capsule_exec::{Cancel, Engine, Journal, Outcome, RemoteCall, RunRequest, RunState, Start};
use manifest_schema::{Category, ProjectFile};
use python_runtime::ErrorKind as GuestKind;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod cluster;
mod entry;

use cluster::on_cluster;
use entry::Deferred;
pub use entry::RunEntry;

use crate::Workers;
use crate::admission;
use crate::api::{ApiError, RunView, SubmitRun};
use crate::registry::{Registered, Registry};

/// How long stopped runs may take to end at shutdown.
const STOPPED_WAIT: Duration = Duration::from_secs(5);
/// Finished runs kept in memory for `list` and `logs`; older ones are in their journals.
const FINISHED_KEPT: usize = 1_000;
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
    engine: Arc<Engine>,
    workers: Workers,
    registry: Registry,
    limits: Limits,
    /// A permit per run running (`--workers`).
    slots: Arc<Semaphore>,
    /// A permit per run queued or running (`--workers` + `--queue`): held from admission to end.
    capacity: Arc<Semaphore>,
    /// Every run's task on the engine's runtime, so that a shutdown can wait for them.
    tasks: TaskTracker,
    /// Set when the daemon shuts down: no new runs, and what is stopped then is interrupted.
    closing: CancellationToken,
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

#[derive(Default)]
struct Held {
    by_id: HashMap<String, Arc<RunEntry>>,
    /// Finished runs, oldest first, for eviction.
    finished: VecDeque<String>,
}

/// Whether `manifest` (resolved) is the built-in interpreter image's.
fn is_interpreter_image(manifest: &Path) -> bool {
    crate::sessions::interpreter_image()
        .ok()
        .and_then(|image| image.canonicalize().ok())
        .is_some_and(|image| image == manifest)
}

impl Runs {
    pub(crate) fn new(
        engine: Arc<Engine>,
        workers: Workers,
        registry: Registry,
        limits: Limits,
        cluster: Option<Cluster>,
    ) -> Self {
        Self {
            cluster,
            engine,
            workers,
            registry,
            slots: Arc::new(Semaphore::new(limits.workers.max(1))),
            capacity: Arc::new(Semaphore::new(limits.workers.max(1) + limits.queue)),
            limits,
            tasks: TaskTracker::new(),
            closing: CancellationToken::new(),
            runs: Mutex::default(),
            journals: Mutex::default(),
        }
    }

    pub fn counts(&self) -> (usize, usize) {
        let running = self.limits.workers.max(1) - self.slots.available_permits();
        let active = self.limits.workers.max(1) + self.limits.queue - self.capacity.available_permits();
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
        let admitted = self.admit()?;
        let (ready, accepted) = tokio::sync::oneshot::channel();
        self.launch(request, restarted_from, None, Some(admitted), Answer::Accepted(ready));
        accepted.await.unwrap_or_else(|_| Err(ApiError::new(Category::Internal, "preparing the run failed")))
    }

    /// Starts a run and answers once it has ended, with its view and outcome: the API's
    /// thread wakes once per run.
    pub async fn submit_and_wait(self: &Arc<Self>, request: SubmitRun) -> Result<(RunView, Outcome), ApiError> {
        let admitted = self.admit()?;
        let (ready, finished) = tokio::sync::oneshot::channel();
        if self.workers.inline {
            let _admitted = admitted;
            self.tasks.track_future(self.prepare_and_execute(request, None, None, Answer::Finished(ready))).await;
        } else {
            self.launch(request, None, None, Some(admitted), Answer::Finished(ready));
        }
        finished.await.unwrap_or_else(|_| Err(ApiError::new(Category::Internal, "the run's task failed")))
    }

    /// Room for a new run, held until it ends; refused while the daemon closes or is full.
    fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if self.closing.is_cancelled() {
            return Err(ApiError::new(Category::Busy, "the daemon is shutting down"));
        }
        self.capacity.clone().try_acquire_owned().map_err(|_| {
            let capacity = self.limits.workers.max(1) + self.limits.queue;
            ApiError::hinted(
                Category::Busy,
                format!("the daemon's queue is full ({capacity} runs queued or running)"),
                "try again when some have finished, or start the daemon with a larger `--queue`",
            )
        })
    }

    /// Prepares and runs a run on the engine's runtime (one hop from the API's thread), on
    /// its own: what submits it may go.
    fn launch(
        self: &Arc<Self>,
        request: SubmitRun,
        restarted_from: Option<String>,
        resume_id: Option<String>,
        admitted: Option<OwnedSemaphorePermit>,
        answer: Answer,
    ) {
        let this = self.clone();
        self.tasks.spawn_on(
            async move {
                let _admitted = admitted;
                this.prepare_and_execute(request, restarted_from, resume_id, answer).await;
            },
            &self.workers.runtime,
        );
    }

    /// Prepares the run, answers its submitter as `answer` asks, and runs it.
    async fn prepare_and_execute(
        self: &Arc<Self>,
        request: SubmitRun,
        restarted_from: Option<String>,
        resume_id: Option<String>,
        answer: Answer,
    ) {
        let (entry, body) = match self.prepare(request, restarted_from, resume_id) {
            Ok(prepared) => prepared,
            Err(error) => {
                match answer {
                    Answer::Accepted(ready) => drop(ready.send(Err(error))),
                    Answer::Finished(ready) => drop(ready.send(Err(error))),
                }
                return;
            }
        };
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).by_id.insert(entry.id.clone(), entry.clone());
        let finished = match answer {
            Answer::Accepted(ready) => {
                let _ = ready.send(Ok(entry.clone()));
                None
            }
            Answer::Finished(ready) => Some(ready),
        };
        let outcome = self.execute(entry.clone(), body).await;
        if let Some(ready) = finished {
            let _ = ready.send(Ok((entry.view(true), outcome)));
        }
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
        // A code string (a run of the interpreter image) has nothing to resume: it is not
        // journaled nor recorded beyond this daemon's life, and makes no `.capsule/` in the
        // caller's folder.
        let journal = if image {
            None
        } else {
            let journal_path = self.journal_path(&request);
            if self.limits.journal.is_none() {
                // A journal the client chose (the daemon's own `--journal` is the operator's).
                admission::check_journal(&journal_path, &self.limits.own_places)?;
            }
            Some(self.journal(&journal_path)?)
        };
        let journaled = journal.is_some();
        let mut order = request.order();
        if let Some(run_id) = resume_id {
            order.start = Start::Resume { run_id };
        }
        let cancel = Cancel::default();
        let shell =
            Arc::new(RunEntry::new(namespace, entry.display().to_string(), request, restarted_from, cancel.clone()));
        // The recorder needs the entry, and the entry its id, which the journal gives: the
        // events go to a slot filled once the entry is complete.
        let slot: Arc<OnceLock<Arc<RunEntry>>> = Arc::default();
        let run_request =
            RunRequest { journal, events: Arc::new(Deferred(slot.clone())), cancel, ..RunRequest::new(order) };
        let prepared = self.engine.prepare(&loaded, run_request).map_err(|e| ApiError::of(&e))?;
        let id = prepared.run_id().map_or_else(capsule_exec::new_run_id, str::to_string);
        let mut shell = Arc::into_inner(shell).expect("not shared yet");
        shell.id = id;
        shell.task = prepared.task().to_string();
        shell.journaled = journaled;
        let entry = Arc::new(shell);
        let _ = slot.set(entry.clone());
        if journaled {
            self.register(&entry)?;
        }
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
        entry.set_status(RunState::Running);
        let outcome = prepared.run().await;
        drop(permit);
        self.finished(&entry, outcome.clone());
        outcome
    }

    fn finished(&self, entry: &Arc<RunEntry>, outcome: Outcome) {
        let interrupted = self.closing.is_cancelled() && outcome.error_kind() == Some(GuestKind::Cancelled);
        let status = match outcome.error_kind() {
            None => RunState::Ok,
            Some(_) if interrupted => RunState::Interrupted,
            Some(GuestKind::Cancelled) => RunState::Cancelled,
            Some(_) => RunState::Failed,
        };
        if interrupted && entry.journaled {
            // Stopped by the daemon's shutdown, not by a user: the next daemon resumes it.
            if let Some(journal) = self.journal_of(entry) {
                let _ = journal.finish_run(&entry.id, RunState::Interrupted);
            }
        }
        // The journal says how the run ended; the registry only learns it when the next
        // daemon looks (one write less per run).
        entry.finish(outcome, status);
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
            // A run left by the last daemon is resumed even beyond the queue's room.
            let admitted = self.capacity.clone().try_acquire_owned().ok();
            let id = run.id.clone();
            let (ready, accepted) = tokio::sync::oneshot::channel();
            self.launch(run.request, run.restarted_from, Some(run.id), admitted, Answer::Accepted(ready));
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
        self.closing.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_ok() {
            return;
        }
        let held: Vec<Arc<RunEntry>> =
            self.runs.lock().unwrap_or_else(|e| e.into_inner()).by_id.values().cloned().collect();
        for entry in held.iter().filter(|e| !e.is_finished()) {
            entry.stop();
        }
        let _ = tokio::time::timeout(STOPPED_WAIT, self.tasks.wait()).await;
    }
}

/// When a launched run answers its submitter.
enum Answer {
    /// As soon as it has an id.
    Accepted(tokio::sync::oneshot::Sender<Result<Arc<RunEntry>, ApiError>>),
    /// When it has ended.
    Finished(tokio::sync::oneshot::Sender<Result<(RunView, Outcome), ApiError>>),
}
