//! The engine API every front door uses: load verified artifacts, submit runs, observe them
//! through events, cancel them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use manifest_schema::{Explain, Manifest, Metering, Problem, Task};
use python_runtime::{ErrorKind, GuestError, RegisteredTask};
use serde_json::Value;
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::artifact::{CompiledStore, LoadError, check_manifest};
use crate::cancel::Cancel;
use crate::config::{self, TickingEngine};
use crate::environment::Environment;
use crate::events::EventSink;
use crate::journal::{Entered, Journal, JournalError, Position, args_hash};
use crate::loaded::Loaded;
use crate::orchestrator::{Orchestrator, Remote, RunSettings, Scope};
use crate::outcome::Outcome;
use crate::paths::Reserved;
use crate::run::Call;
use crate::sandbox::Program;
use crate::session::{Session, SessionState};
use crate::stamp::FileStamp;
use crate::state::RunState;
use crate::trust::{Trust, signature_path};

/// Artifacts a process keeps loaded (by sha256) for reuse; beyond it the oldest is dropped.
const LOADED_ARTIFACTS: usize = 64;

/// Up to [`LOADED_ARTIFACTS`] values by the sha256 of the file they were loaded from, oldest
/// first.
struct ByHash<T>(Vec<(String, T)>);

impl<T> ByHash<T> {
    fn get(&self, sha256: &str) -> Option<&T> {
        self.0.iter().find(|(hash, _)| hash == sha256).map(|(_, value)| value)
    }

    fn insert(&mut self, sha256: String, value: T) {
        if self.0.len() >= LOADED_ARTIFACTS {
            self.0.remove(0);
        }
        self.0.push((sha256, value));
    }
}

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cannot set up the engine: {0}")]
    Setup(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("no task named `{name}`")]
    NoSuchTask { name: String, tasks: Vec<String> },
    #[error("several tasks and none is called `main`")]
    NoDefaultTask { tasks: Vec<String> },
    #[error("resuming a run needs its journal")]
    ResumeWithoutJournal,
    #[error("run `{run}` ran task `{task}`, which this build no longer has")]
    ResumedTaskMissing { run: String, task: String },
    #[error("a `ram` of {ram} bytes is below the {needed} bytes the image needs")]
    TooLittleMemory { ram: u64, needed: u64 },
    #[error("`{option}`: {}", problem.message)]
    Options { option: &'static str, problem: Problem },
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
}

fn listed(tasks: &[String]) -> String {
    tasks.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ")
}

impl Explain for EngineError {
    fn category(&self) -> manifest_schema::Category {
        use manifest_schema::Category;
        match self {
            Self::Setup(_) => Category::Internal,
            Self::Load(error) => error.category(),
            Self::Journal(error) => error.category(),
            Self::Session(error) => error.category(),
            Self::NoSuchTask { .. }
            | Self::NoDefaultTask { .. }
            | Self::ResumeWithoutJournal
            | Self::ResumedTaskMissing { .. }
            | Self::TooLittleMemory { .. }
            | Self::Options { .. } => Category::Usage,
        }
    }

    fn problems(&self) -> Vec<manifest_schema::Problem> {
        match self {
            Self::Load(error) => error.problems(),
            Self::Journal(error) => error.problems(),
            _ => vec![manifest_schema::Problem { message: self.to_string(), hint: self.hint() }],
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::NoSuchTask { tasks, .. } => Some(format!("the tasks are {}", listed(tasks))),
            Self::NoDefaultTask { tasks } => Some(format!("choose one with <<task>>: {}", listed(tasks))),
            Self::ResumeWithoutJournal => Some("give the journal it was recorded in, <<journal>>".into()),
            Self::ResumedTaskMissing { .. } => Some("start a new run of a task this build has".into()),
            Self::TooLittleMemory { needed, .. } => {
                Some(format!("give it at least {}MiB", needed.div_ceil(1 << 20) + 16))
            }
            Self::Options { problem, .. } => problem.hint.clone(),
            Self::Session(error) => error.hint(),
            Self::Setup(_) | Self::Load(_) | Self::Journal(_) => None,
        }
    }
}

/// What a compiled snapshot registered, for the builder's checks.
pub struct Inspection {
    pub tasks: Vec<RegisteredTask>,
    pub initial_memory_bytes: u64,
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// A new run of `task` (default: `main`, else the only task).
    Task { task: Option<String>, args: Vec<Value>, kwargs: serde_json::Map<String, Value> },
    /// Resume a journaled run: finished calls are replayed, the rest runs.
    Resume { run_id: String },
}

/// What a caller asks of one run, whichever front door it came through (the CLI's flags,
/// the daemon's API and so MCP and the SDK, a cluster worker's message): plain data, which
/// [`Engine::prepare`] turns into the engine's settings, filling in the defaults, in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOrder {
    pub start: Start,
    /// The file the run came from (an entry `.py` or a manifest), as the journal records it
    /// for resuming [default: the manifest's entry, relative to its project].
    pub entry: Option<String>,
    /// Options replacing those of the task the run starts (not of its sub-tasks): what the
    /// interpreter image's calls bring [default: the task's own].
    pub options: Option<manifest_schema::TaskOptions>,
    /// Deadline of an attempt for tasks that set no `timeout` [default: 5 minutes].
    pub default_timeout: Option<Duration>,
    /// The folder `allowed_files` paths are relative to [default: the manifest's project].
    pub files_root: Option<PathBuf>,
    /// How many spawned sub-tasks run at once [default: the number of cores].
    pub workers: Option<usize>,
}

impl RunOrder {
    /// A new run of `task` (default: `main`, else the only task), the rest by default.
    pub fn task(task: Option<String>, args: Vec<Value>, kwargs: serde_json::Map<String, Value>) -> Self {
        Self::starting(Start::Task { task, args, kwargs })
    }

    /// `start`, the rest by default.
    pub fn starting(start: Start) -> Self {
        Self { start, entry: None, options: None, default_timeout: None, files_root: None, workers: None }
    }

    /// The engine's settings for this order: where every default of a run is filled in.
    fn settings(
        &self,
        loaded: &Loaded,
        remote: Option<Remote>,
        environment: Environment,
    ) -> Result<RunSettings, EngineError> {
        if let Some(options) = &self.options {
            options.validate().map_err(|(option, problem)| EngineError::Options { option, problem })?;
        }
        let defaults = RunSettings::default();
        Ok(RunSettings {
            options: self.options.clone(),
            default_timeout: self.default_timeout.unwrap_or(defaults.default_timeout),
            project_root: self
                .files_root
                .clone()
                .or_else(|| loaded.manifest().artifact.project_root.clone().map(Into::into)),
            workers: self.workers.map_or(defaults.workers, |n| n.max(1)),
            remote,
            environment,
        })
    }
}

/// A run to prepare: what was asked, and where it runs (what no request on a wire names).
pub struct RunRequest {
    pub order: RunOrder,
    /// Where the run is recorded, if anywhere.
    pub journal: Option<Arc<Journal>>,
    pub events: Arc<dyn EventSink>,
    pub cancel: Cancel,
    /// Run sub-tasks elsewhere instead of in this process.
    pub remote: Option<Remote>,
    /// Where `env_passthrough` and `secrets` read their values [default: this process's
    /// environment].
    pub environment: Environment,
}

impl RunRequest {
    /// `order`, unjournaled, in this process, its events unseen.
    pub fn new(order: RunOrder) -> Self {
        Self {
            order,
            journal: None,
            events: Arc::new(crate::events::NoEvents),
            cancel: Cancel::default(),
            remote: None,
            environment: Environment::default(),
        }
    }
}

/// A run ready to start: its journal entry exists, nothing has run yet.
pub struct PreparedRun {
    run_id: Option<String>,
    task: String,
    cancel: Cancel,
    body: Body,
}

enum Body {
    /// The journal shows the whole run finished: its result, without running anything.
    Replayed(Outcome),
    /// The top-level call, which also records the run's end in the journal.
    Run { scope: Scope, task: Box<Task>, call: Call },
}

impl PreparedRun {
    /// The run's id in the journal, when it is journaled.
    pub fn run_id(&self) -> Option<&str> {
        self.run_id.as_deref()
    }

    /// The task it runs.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// Runs it to the end in the calling task.
    pub async fn run(self) -> Outcome {
        match self.body {
            Body::Replayed(outcome) => outcome,
            Body::Run { scope, task, call } => scope.run(&task, call, None).await,
        }
    }

    /// Runs it on the current tokio runtime; the handle follows it.
    pub fn spawn(self) -> RunHandle {
        let (run_id, task, cancel) = (self.run_id.clone(), self.task.clone(), self.cancel.clone());
        RunHandle { run_id, task, cancel, join: tokio::spawn(self.run()) }
    }
}

/// A run started with [`PreparedRun::spawn`] or [`Engine::submit`].
pub struct RunHandle {
    run_id: Option<String>,
    task: String,
    cancel: Cancel,
    join: JoinHandle<Outcome>,
}

impl RunHandle {
    /// The run's id in the journal, when it is journaled.
    pub fn run_id(&self) -> Option<&str> {
        self.run_id.as_deref()
    }

    pub fn task(&self) -> &str {
        &self.task
    }

    /// Stops the run and every sub-task under it.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub async fn outcome(self) -> Outcome {
        match self.join.await {
            Ok(outcome) => outcome,
            Err(error) => Outcome::without_attempts(
                &self.task,
                Err(GuestError::new(ErrorKind::Host, format!("the run ended abnormally: {error}"))),
            ),
        }
    }
}

/// The wasmtime engines (one per metering; the time-metered one, with its epoch ticker, made
/// when first needed) and the artifacts loaded on them.
pub struct Engine {
    config: wasmtime::Config,
    fuel_metered: wasmtime::Engine,
    time_metered: OnceLock<TickingEngine>,
    /// Verified artifacts by sha256, oldest first.
    loaded: Mutex<ByHash<Arc<Loaded>>>,
    /// Verified code modules by sha256, oldest first.
    codes: Mutex<ByHash<wasmtime::Module>>,
    /// Manifests read before, by path, with the size and times of the file then: a manifest
    /// unchanged since is not read again.
    manifests: Mutex<HashMap<PathBuf, (FileStamp, Arc<Loaded>)>>,
    call_ids: Arc<AtomicU64>,
    /// This runner's own copies of the compiled files it runs.
    store: CompiledStore,
    /// When set, only manifests one of these keys signed are loaded.
    trust: Option<Trust>,
    /// What no grant of any run may reach, besides each run's own project state.
    reserved: Reserved,
}

impl Engine {
    /// An engine for running artifacts, with room for many runs at once.
    pub fn new() -> Result<Self, EngineError> {
        Self::with_config(&config::config())
    }

    /// An engine for a process that makes one run and exits (`capsule-exec`, `capsule run`
    /// without a daemon): it starts faster than [`Engine::new`]'s, whose pool of sandboxes
    /// pays off only over many runs.
    pub fn for_one_run() -> Result<Self, EngineError> {
        Self::with_config(&config::on_demand(&config::config()))
    }

    /// An engine on `config`, which must be [`config::config`] plus settings that do not
    /// change compiled code (the builder adds its compilation cache).
    pub fn with_config(config: &wasmtime::Config) -> Result<Self, EngineError> {
        // TLS for tasks' HTTP calls; a provider installed earlier by the embedder is kept.
        let _ = rustls::crypto::ring::default_provider().install_default();
        crate::net::trust_roots_from_env();
        let fuel_metered = wasmtime::Engine::new(&config::with_metering(config, Metering::Fuel))
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        Ok(Self {
            config: config.clone(),
            fuel_metered,
            time_metered: OnceLock::new(),
            loaded: Mutex::new(ByHash(Vec::new())),
            codes: Mutex::new(ByHash(Vec::new())),
            manifests: Mutex::default(),
            call_ids: Arc::new(AtomicU64::new(1)),
            store: CompiledStore::of_user(),
            trust: None,
            reserved: Reserved::of_user(),
        })
    }

    /// Keeps every grant of its runs away from `place` too (a daemon's records, a worker's
    /// cache), described to users as `what`.
    pub fn reserving(mut self, place: PathBuf, what: &'static str) -> Self {
        self.reserved.add(place, what);
        self
    }

    /// What the grants of a run of `loaded` (journaled in `journal`, with `settings`) may
    /// not reach: the engine's places, the manifest's folder, the journal and the project's
    /// `.capsule` folder.
    fn reserved_for(&self, loaded: &Loaded, settings: &RunSettings, journal: Option<&Journal>) -> Reserved {
        let mut reserved = self.reserved.clone();
        reserved.add(loaded.dir().to_path_buf(), "the build's manifest and compiled code");
        if let Some(journal) = journal {
            reserved.add(journal.path().to_path_buf(), "the run's journal");
        }
        if let Some(root) = &settings.project_root {
            reserved.add(root.join(manifest_schema::STATE_DIR), "the project's builds and journal");
        }
        reserved
    }

    /// Keeps the compiled files it runs in `dir` instead of the user's cache folder.
    pub fn with_store(mut self, dir: PathBuf) -> Self {
        self.store = CompiledStore::at(dir);
        self
    }

    /// Loads only manifests that one of `trust`'s keys signed.
    pub fn requiring_signatures(mut self, trust: Trust) -> Self {
        self.trust = Some(trust);
        self
    }

    /// The keys this engine requires a signature of, if any.
    pub fn trust(&self) -> Option<&Trust> {
        self.trust.as_ref()
    }

    /// Keeps compiled `bytes` (the builder's output) among the files this runner runs, so
    /// that its first run need not copy them in; gives their sha256.
    pub fn keep_compiled(&self, bytes: &[u8]) -> Result<String, LoadError> {
        let sha256 = crate::artifact::sha256_hex(bytes);
        self.store.keep(&sha256, bytes)?;
        Ok(sha256)
    }

    /// The module of a compiled file this runner keeps, if it keeps it.
    pub fn kept_module(&self, metering: Metering, sha256: &str) -> Result<Option<wasmtime::Module>, LoadError> {
        let engine = self
            .wasmtime(metering)
            .map_err(|e| LoadError::Deserialize { path: PathBuf::from(sha256), message: e.to_string() })?;
        self.store.stored(engine, sha256)
    }

    /// Copies a compiled file this runner keeps to `dest` (read-only), checking its hash.
    pub fn copy_kept(&self, sha256: &str, dest: &Path) -> Result<(), LoadError> {
        self.store.copy_out(sha256, dest)
    }

    /// The wasmtime engine for code compiled with `metering` (the builder compiles with it).
    pub fn wasmtime(&self, metering: Metering) -> Result<&wasmtime::Engine, EngineError> {
        match metering {
            Metering::Fuel => Ok(&self.fuel_metered),
            Metering::Time => match self.time_metered.get() {
                Some(ticking) => Ok(ticking.engine()),
                None => {
                    let ticking = TickingEngine::new(&config::with_metering(&self.config, Metering::Time))
                        .map_err(|e| EngineError::Setup(e.to_string()))?;
                    // Two first uses at once: one engine is kept, the other dropped.
                    let _ = self.time_metered.set(ticking);
                    Ok(self.time_metered.get().expect("set above").engine())
                }
            },
        }
    }

    /// Loads the artifact of the manifest at `path`, verified (and, when the engine requires
    /// signatures, signed by a key it trusts); an artifact with the same hash loaded before
    /// is reused without reading it again, and so is an unsigned manifest that has not
    /// changed since it was read.
    pub fn load(&self, path: &Path) -> Result<Arc<Loaded>, LoadError> {
        match &self.trust {
            Some(_) => self.load_verified(path, None),
            None => self.load_own(path),
        }
    }

    /// Loads the manifest at `path` only if one of `trust`'s keys signed it (besides what the
    /// engine itself requires): a client's own `--trust`.
    pub fn load_signed(&self, path: &Path, trust: &Trust) -> Result<Arc<Loaded>, LoadError> {
        self.load_verified(path, Some(trust))
    }

    /// Loads the manifest at `path` after checking its signature against `extra` and the
    /// engine's own keys.
    fn load_verified(&self, path: &Path, extra: Option<&Trust>) -> Result<Arc<Loaded>, LoadError> {
        let shown = path.display().to_string();
        // Read once: the bytes whose signature is checked are the bytes parsed.
        let bytes = std::fs::read(path)
            .map_err(|source| manifest_schema::ManifestError::Read { path: shown.clone(), source })?;
        let signature_path = signature_path(path);
        let signature = match std::fs::read_to_string(&signature_path) {
            Ok(text) => Some(text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(LoadError::Read { path: signature_path, source }),
        };
        for trust in [extra, self.trust.as_ref()].into_iter().flatten() {
            trust.verify(&shown, &bytes, signature.as_deref(), &signature_path)?;
        }
        let text = String::from_utf8(bytes).map_err(|_| {
            LoadError::Manifest(manifest_schema::ManifestError::Parse {
                path: shown.clone(),
                message: "it is not UTF-8 text".into(),
            })
        })?;
        self.load_manifest(path, check_manifest(&text, &shown)?)
    }

    /// Loads the manifest at `path` without asking for a signature: for what this runner
    /// built itself (the built-in interpreter image, in its own cache folder), and for every
    /// manifest when the engine requires none.
    pub fn load_own(&self, path: &Path) -> Result<Arc<Loaded>, LoadError> {
        let stamp = FileStamp::of(path);
        let remembered = self.manifests.lock().unwrap_or_else(|e| e.into_inner()).get(path).cloned();
        if let (Some(stamp), Some((known, loaded))) = (stamp, remembered)
            && stamp == known
        {
            return Ok(loaded);
        }
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| manifest_schema::ManifestError::Read { path: shown.clone(), source })?;
        let loaded = self.load_manifest(path, check_manifest(&text, &shown)?)?;
        if let Some(stamp) = stamp {
            let mut manifests = self.manifests.lock().unwrap_or_else(|e| e.into_inner());
            if manifests.len() >= LOADED_ARTIFACTS {
                manifests.clear();
            }
            manifests.insert(path.to_path_buf(), (stamp, loaded.clone()));
        }
        Ok(loaded)
    }

    /// The artifact `manifest` (read from `path`) names, from the files beside it.
    fn load_manifest(&self, path: &Path, manifest: Manifest) -> Result<Arc<Loaded>, LoadError> {
        let sha256 = manifest.artifact.sha256.clone();
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = loaded.get(&sha256) {
            return Ok(Arc::new(known.with_manifest(manifest, dir.to_path_buf())));
        }
        let metering = manifest.engine.metering;
        let engine = self
            .wasmtime(metering)
            .map_err(|e| LoadError::Deserialize { path: path.to_path_buf(), message: e.to_string() })?;
        let state = self.store.load(engine, &sha256, &dir.join(&manifest.artifact.file))?;
        let code = self.code(engine, dir, &manifest.artifact.code)?;
        let program = Program::new(engine, &state, &code, metering)
            .map_err(|e| LoadError::Deserialize { path: path.to_path_buf(), message: e.to_string() })?;
        let fresh = Arc::new(Loaded::new(manifest, dir.to_path_buf(), program));
        loaded.insert(sha256, fresh.clone());
        Ok(fresh)
    }

    /// The runtime's code module `compiled`, named in a manifest in `dir`; shared by every
    /// artifact built on the same runtime, so loaded once.
    fn code(
        &self,
        engine: &wasmtime::Engine,
        dir: &Path,
        compiled: &manifest_schema::CompiledFile,
    ) -> Result<wasmtime::Module, LoadError> {
        let mut codes = self.codes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(module) = codes.get(&compiled.sha256) {
            return Ok(module.clone());
        }
        let module = self.store.load(engine, &compiled.sha256, &dir.join(&compiled.file))?;
        codes.insert(compiled.sha256.clone(), module.clone());
        Ok(module)
    }

    /// What the build's state module compiled as `state`, linked to `code` (both by
    /// [`Engine::wasmtime`] of `metering`), registered.
    pub async fn inspect(
        &self,
        state: &[u8],
        code: &wasmtime::Module,
        metering: Metering,
    ) -> Result<Inspection, String> {
        let engine = self.wasmtime(metering).map_err(|e| e.to_string())?;
        // SAFETY: the builder passes bytes this engine's own compiler produced just now.
        let state = unsafe { wasmtime::Module::deserialize(engine, state) }
            .map_err(|e| format!("loading the compiled snapshot failed: {e}"))?;
        let program = Program::new(engine, &state, code, metering).map_err(|e| e.to_string())?;
        Ok(Inspection { tasks: program.describe().await?, initial_memory_bytes: program.initial_memory_bytes() })
    }

    /// A session of `task` (default: `main`, else the only one): one sandbox whose Python state
    /// carries over from call to call; from `state` when given (a saved session).
    pub async fn open_session(
        &self,
        loaded: &Arc<Loaded>,
        task: Option<&str>,
        mut settings: RunSettings,
        events: Arc<dyn EventSink>,
        state: Option<Arc<SessionState>>,
    ) -> Result<Session, EngineError> {
        let task = select_task(loaded.manifest(), task)?;
        if settings.project_root.is_none() {
            settings.project_root = loaded.manifest().artifact.project_root.clone().map(Into::into);
        }
        let task = with_options(task, &settings, loaded)?;
        let orchestrator = Orchestrator::new(
            loaded.program().clone(),
            loaded.manifest().tasks.clone(),
            settings.clone(),
            self.reserved_for(loaded, &settings, None),
            events.clone(),
            Cancel::default(),
            self.call_ids.clone(),
        );
        Ok(Session::open(loaded.clone(), task, settings, events, orchestrator, state).await?)
    }

    /// A saved session's state, checked: it must be whole, and from `loaded`'s image.
    pub fn session_state(&self, loaded: &Loaded, bytes: &[u8]) -> Result<Arc<SessionState>, EngineError> {
        Ok(Arc::new(SessionState::from_bytes(bytes, &loaded.manifest().artifact.sha256)?))
    }

    /// Starts a run on the current tokio runtime.
    pub fn submit(&self, loaded: &Arc<Loaded>, request: RunRequest) -> Result<RunHandle, EngineError> {
        Ok(self.prepare(loaded, request)?.spawn())
    }

    /// Checks a run request and enters it in the journal, without running anything.
    pub fn prepare(&self, loaded: &Arc<Loaded>, request: RunRequest) -> Result<PreparedRun, EngineError> {
        let RunRequest { order, journal, events, cancel, remote, environment } = request;
        let settings = order.settings(loaded, remote, environment)?;
        let RunOrder { start, entry, .. } = order;
        let manifest = loaded.manifest();
        // The run's id and its top-level call's row, when journaled.
        let (task, args, kwargs, journaled) = match (start, &journal) {
            (Start::Resume { run_id }, Some(journal)) => {
                let record = journal.run(&run_id)?;
                let task = manifest.task(&record.task).ok_or_else(|| EngineError::ResumedTaskMissing {
                    run: run_id.clone(),
                    task: record.task.clone(),
                })?;
                journal.reopen_run(&run_id)?;
                let args_hash = args_hash(&record.args, &record.kwargs);
                match journal.enter(&run_id, 0, 0, "task", &task.name, "", &args_hash)? {
                    Entered::Replay { result, .. } => {
                        journal.finish_run(&run_id, RunState::Ok)?;
                        let body = Body::Replayed(Outcome::without_attempts(&task.name, Ok(result)));
                        return Ok(PreparedRun { run_id: Some(run_id), task: task.name.clone(), cancel, body });
                    }
                    Entered::Run { id } => (task, record.args, record.kwargs, Some((run_id, id))),
                }
            }
            (Start::Resume { .. }, None) => return Err(EngineError::ResumeWithoutJournal),
            (Start::Task { task, args, kwargs }, journal) => {
                let task = select_task(manifest, task.as_deref())?;
                let journaled = match journal {
                    Some(journal) => Some(journal.start_run(
                        entry.as_deref().unwrap_or(&manifest.artifact.source),
                        &manifest.artifact.sha256,
                        &task.name,
                        &args,
                        &kwargs,
                    )?),
                    None => None,
                };
                (task, args, kwargs, journaled)
            }
        };
        let task = &with_options(task, &settings, loaded)?;
        let run_id = journaled.as_ref().map(|(run, _)| run.clone());
        let position = journal.as_ref().zip(journaled).map(|(journal, (run, call))| Position {
            journal: journal.clone(),
            run: run.into(),
            call,
        });
        let reserved = self.reserved_for(loaded, &settings, journal.as_deref());
        let orchestrator = Orchestrator::new(
            loaded.program().clone(),
            manifest.tasks.clone(),
            settings,
            reserved,
            events,
            cancel.clone(),
            self.call_ids.clone(),
        );
        let call = orchestrator.call(args, kwargs);
        let scope = orchestrator.root(position);
        let body = Body::Run { scope, task: Box::new(task.clone()), call };
        Ok(PreparedRun { run_id, task: task.name.clone(), cancel, body })
    }
}

/// `task` with the options the run brings, if it brings any.
fn with_options(task: &Task, settings: &RunSettings, loaded: &Loaded) -> Result<Task, EngineError> {
    let Some(options) = &settings.options else { return Ok(task.clone()) };
    let needed = loaded.program().initial_memory_bytes();
    if options.ram.bytes() < needed {
        return Err(EngineError::TooLittleMemory { ram: options.ram.bytes(), needed });
    }
    Ok(Task { options: options.clone(), ..task.clone() })
}

/// The task named `name`, else `main`, else the only one.
pub fn select_task<'m>(manifest: &'m Manifest, name: Option<&str>) -> Result<&'m Task, EngineError> {
    let names = || manifest.tasks.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    match name {
        Some(name) => {
            manifest.task(name).ok_or_else(|| EngineError::NoSuchTask { name: name.to_string(), tasks: names() })
        }
        None => match (manifest.task("main"), manifest.tasks.as_slice()) {
            (Some(main), _) => Ok(main),
            (None, [only]) => Ok(only),
            _ => Err(EngineError::NoDefaultTask { tasks: names() }),
        },
    }
}
