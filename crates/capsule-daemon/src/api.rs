//! The daemon's HTTP API, version 1: what travels on the wire, for the server and every
//! client (the CLI here, the Python SDK in Python). `docs/src/reference/api.md` describes
//! each route.

use std::path::PathBuf;

/// What a run request asks, as every front door states it ([`SubmitRun::of_order`]).
pub use capsule_exec::RunOrder;
use capsule_exec::{CallRecord, CallStatus, Event, HttpCall, Outcome, RunState, Start};
use manifest_schema::problem::FrontDoor;
use manifest_schema::{Category, Explain, Problem};
use python_runtime::GuestError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The prefix of every route.
pub const PREFIX: &str = "/v1";

/// Largest request body the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// `POST /v1/runs`: start a run of a built manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRun {
    /// The `manifest.toml` written by `capsule build` (absolute path).
    pub manifest: PathBuf,
    /// The file the run came from (its `.py`, or the manifest), recorded for resuming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<PathBuf>,
    /// The project folder (absolute): its namespace (`[workflow] name` of its capsule.toml,
    /// else the folder's name) and its journal [default: the manifest's project, else the
    /// manifest's folder].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<PathBuf>,
    /// The task [default: `main`, else the only one].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<Value>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub kwargs: serde_json::Map<String, Value>,
    /// Resume this journaled run instead of starting a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
    /// The journal (absolute) [default: the daemon's `--journal`, else
    /// `.capsule/journal.db` in the project].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<PathBuf>,
    /// The folder `allowed_files` are relative to, inside the project [default: the
    /// manifest's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_root: Option<PathBuf>,
    /// Deadline of an attempt for tasks without `timeout`, e.g. `"30s"` [default: 5 minutes].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_timeout: Option<manifest_schema::Timeout>,
    /// How many of the run's spawned sub-tasks run at once [default: the number of cores].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Options replacing those of the task (its `@task` options, as in the manifest): what the
    /// interpreter image's calls bring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<manifest_schema::TaskOptions>,
    /// Public keys (the text of `.pub` files): run the manifest only if one of them signed
    /// it, besides what the daemon's own `--trust` requires.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust: Vec<String>,
    /// Answer once the run has ended, instead of at once with the run.
    #[serde(default)]
    pub wait: bool,
    /// With `wait`: stream the run's events as they happen, ending with its outcome
    /// (NDJSON, the default), or answer with the run and its outcome only (one JSON object).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub stream: bool,
    /// With `wait`: stop the run if the client goes away before it ends.
    #[serde(default)]
    pub stop_on_disconnect: bool,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

impl Default for SubmitRun {
    fn default() -> Self {
        Self {
            manifest: PathBuf::new(),
            entry: None,
            project: None,
            task: None,
            args: Vec::new(),
            kwargs: serde_json::Map::new(),
            resume: None,
            journal: None,
            files_root: None,
            default_timeout: None,
            workers: None,
            options: None,
            trust: Vec::new(),
            wait: false,
            stream: true,
            stop_on_disconnect: false,
        }
    }
}

impl SubmitRun {
    /// The request that asks `order` of `manifest`: a [`RunOrder`] in the API's form.
    pub fn of_order(manifest: PathBuf, order: RunOrder) -> Self {
        let RunOrder { start, entry, options, default_timeout, files_root, workers } = order;
        let (task, args, kwargs, resume) = match start {
            Start::Task { task, args, kwargs } => (task, args, kwargs, None),
            Start::Resume { run_id } => (None, Vec::new(), serde_json::Map::new(), Some(run_id)),
        };
        Self {
            manifest,
            entry: entry.map(PathBuf::from),
            task,
            args,
            kwargs,
            resume,
            options,
            default_timeout: default_timeout.map(manifest_schema::Timeout),
            files_root,
            workers,
            ..Self::default()
        }
    }

    /// What this request asks of the engine (its paths already checked by the daemon).
    pub fn order(&self) -> RunOrder {
        let start = match &self.resume {
            Some(run_id) => Start::Resume { run_id: run_id.clone() },
            None => Start::Task { task: self.task.clone(), args: self.args.clone(), kwargs: self.kwargs.clone() },
        };
        RunOrder {
            start,
            entry: Some(self.entry.as_ref().unwrap_or(&self.manifest).display().to_string()),
            options: self.options.clone(),
            default_timeout: self.default_timeout.map(|timeout| timeout.0),
            files_root: self.files_root.clone(),
            workers: self.workers,
        }
    }
}

/// Options of a code string or a session, in the manifest's form, any of them left out: what
/// is left out is `TaskOptions::for_code`'s.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeOptions(pub manifest_schema::TaskOptions);

impl Serialize for CodeOptions {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CodeOptions {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let given = serde_json::Map::deserialize(deserializer)?;
        manifest_schema::TaskOptions::code_options(given).map(Self).map_err(serde::de::Error::custom)
    }
}

/// A run as the daemon shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub id: String,
    pub namespace: String,
    pub task: String,
    pub entry: String,
    pub status: RunState,
    pub submitted_at_ms: i64,
    #[serde(default)]
    pub finished_at_ms: Option<i64>,
    /// The run this one restarted, if it is a restart.
    #[serde(default)]
    pub restarted_from: Option<String>,
    #[serde(default)]
    pub error: Option<GuestError>,
    /// Its task calls, the top-level one first; each names its parent.
    #[serde(default)]
    pub calls: Vec<CallView>,
}

/// A task call in a run's tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallView {
    pub id: u64,
    pub parent: Option<u64>,
    pub task: String,
    pub status: CallStatus,
    /// The attempt running now, or the number made.
    pub attempt: u32,
    pub elapsed_ms: u64,
    #[serde(default)]
    pub fuel: Option<u64>,
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
    #[serde(default)]
    pub error_type: Option<String>,
    #[serde(default)]
    pub http: Vec<HttpCall>,
    /// The cluster worker that runs (or ran) it; none for calls run by the daemon itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

impl CallView {
    /// A call that has just started.
    pub fn started(id: u64, parent: Option<u64>, task: &str) -> Self {
        Self {
            id,
            parent,
            task: task.to_string(),
            status: CallStatus::Running,
            attempt: 1,
            elapsed_ms: 0,
            fuel: None,
            peak_memory_bytes: None,
            error_type: None,
            http: Vec::new(),
            worker: None,
        }
    }

    /// The call ended with `outcome`, after `elapsed_ms`.
    pub fn end(&mut self, outcome: &Outcome, elapsed_ms: u64) {
        self.status = CallStatus::ended(outcome.success);
        self.attempt = outcome.execution.attempts;
        self.elapsed_ms = elapsed_ms;
        self.fuel = Some(outcome.execution.fuel_consumed);
        self.peak_memory_bytes = Some(outcome.execution.peak_memory_bytes);
        self.error_type = outcome.error.as_ref().map(|e| e.kind.as_str().to_string());
    }

    /// A task call as a journal recorded it (`now_ms` for one still running).
    pub fn of_journal(call: &CallRecord, now_ms: i64) -> Self {
        Self {
            attempt: call.attempts.unwrap_or(1),
            elapsed_ms: call.duration_ms.unwrap_or_else(|| now_ms.saturating_sub(call.started_at_ms) as u64),
            fuel: call.fuel,
            peak_memory_bytes: call.peak_memory_bytes,
            error_type: call.error.as_ref().and_then(|e| e["type"].as_str()).map(str::to_string),
            status: call.status,
            ..Self::started(call.id as u64, (call.parent != 0).then_some(call.parent as u64), &call.name)
        }
    }

    /// A call as its cluster worker reported it.
    pub fn of_cluster(id: u64, parent: Option<u64>, reported: capsule_cluster::CallState) -> Self {
        Self {
            status: reported.status,
            attempt: reported.attempts.unwrap_or(1),
            elapsed_ms: reported.elapsed_ms.unwrap_or(0),
            fuel: reported.fuel,
            peak_memory_bytes: reported.peak_memory_bytes,
            error_type: reported.error_type,
            worker: Some(reported.worker),
            ..Self::started(id, parent, &reported.task)
        }
    }
}

/// One line of a stream (`POST /v1/runs` with `wait`, `/events`, `/logs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    /// The run was accepted (first line of `POST /v1/runs` with `wait`).
    Accepted { run: RunView },
    /// Something happened in the run.
    Event { event: Event<'static> },
    /// The run ended (last line).
    Outcome { outcome: Outcome },
}

/// Every error the API returns: its category (which gives the HTTP status), the first
/// problem's message and hint as a person reads them, and every problem as data, whose hints
/// name what a caller can give as `<<name>>` for each client to spell its own way (see
/// `manifest_schema::problem::FrontDoor`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: Category,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Every problem, each with its hint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

impl ApiError {
    pub fn new(kind: Category, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), hint: None, problems: Vec::new() }
    }

    pub fn hinted(kind: Category, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self { kind, message: message.into(), hint: Some(hint.into()), problems: Vec::new() }
    }

    /// A library error as the API answers it: its category and its problems.
    pub fn of(error: &dyn Explain) -> Self {
        let problems = error.problems();
        let first = problems.first().cloned().unwrap_or_else(|| Problem::new(error.to_string()));
        let first = first.spelled(FrontDoor::Api);
        Self { kind: error.category(), message: first.message, hint: first.hint, problems }
    }

    /// Its problems, as a client shows them.
    pub fn problems(&self) -> Vec<Problem> {
        match self.problems.is_empty() {
            true => vec![Problem { message: self.message.clone(), hint: self.hint.clone() }],
            false => self.problems.clone(),
        }
    }
}

impl Explain for ApiError {
    fn category(&self) -> Category {
        self.kind
    }

    fn problems(&self) -> Vec<Problem> {
        ApiError::problems(self)
    }
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub pid: u32,
    pub running: usize,
    pub queued: usize,
    /// Runs that may run at once.
    pub workers: usize,
    /// Runs that may wait beyond those.
    pub queue: usize,
}

/// `POST /v1/runs/{id}/restart` and `POST /v1/runs` without `wait`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accepted {
    pub run: RunView,
}

/// `POST /v1/runs` with `wait` and without `stream`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finished {
    pub run: RunView,
    pub outcome: Outcome,
}

/// `POST /v1/sessions`: a session (one sandbox kept from call to call) of a task of a built
/// manifest, by default the interpreter image's `run_python`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenSession {
    /// The manifest [default: the interpreter image, built by a client into the cache folder].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The session's options (its memory limit; the default fuel and deadline of its calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<CodeOptions>,
    /// Continue a saved session (its id, as `save` gave it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// Close it after this many seconds without a call [default: 600].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub id: String,
    /// A folder of its own, the session's `/` (files written there are the host's to read).
    pub workspace: PathBuf,
    pub task: String,
    pub calls: u64,
    pub idle_seconds: u64,
}

/// `POST /v1/sessions/{id}/run`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionCall {
    /// The task's arguments: for `run_python`, `[code]`.
    #[serde(default)]
    pub args: Vec<Value>,
    /// This call's CPU budget [default: the session's `compute`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<manifest_schema::Compute>,
    /// This call's deadline, e.g. `"30s"` [default: the session's `timeout`, else 5 minutes].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// `POST /v1/sessions/{id}/save`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Saved {
    /// The saved state's id (the sha256 checksum its file ends with): what `restore` takes.
    pub id: String,
    /// The size of its file, and of its memory beyond the image's.
    pub bytes: u64,
    pub stored_bytes: u64,
}

/// `POST /v1/python`: run a code string in the interpreter image, once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunPython {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<CodeOptions>,
    /// The folder `allowed_files` are relative to (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_run_order_crosses_the_api_unchanged() {
        let new_run = RunOrder {
            entry: Some("/project/main.py".into()),
            options: Some(manifest_schema::TaskOptions::for_code()),
            default_timeout: Some(Duration::from_millis(1500)),
            files_root: Some("/project/data".into()),
            workers: Some(3),
            ..RunOrder::task(Some("main".into()), vec![serde_json::json!([1, "two"])], serde_json::Map::new())
        };
        let resumed = RunOrder {
            entry: Some("/project/main.py".into()),
            ..RunOrder::starting(Start::Resume { run_id: "r1".into() })
        };
        for order in [new_run, resumed] {
            let sent = SubmitRun::of_order("/project/.capsule/build/main/manifest.toml".into(), order.clone());
            let received: SubmitRun = serde_json::from_str(&serde_json::to_string(&sent).unwrap()).unwrap();
            assert_eq!(received.order(), order);
        }
    }

    #[test]
    fn a_request_without_an_entry_records_its_manifest() {
        let request = SubmitRun { manifest: "/p/manifest.toml".into(), ..SubmitRun::default() };
        assert_eq!(request.order().entry.as_deref(), Some("/p/manifest.toml"));
    }
}
