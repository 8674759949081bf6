//! Capsule's engine: it loads artifacts that `capsule build` compiled, after checking their
//! hash, and runs tasks in fresh sandboxes with fuel, memory and deadline limits, sub-tasks,
//! HTTP under rules, and a journal. It contains no compiler: everything it runs was compiled
//! ahead of time.
//!
//! Every front door (the CLI, the daemon, the SDK's and MCP's servers) drives it through the
//! same API: [`Engine::load`] a manifest, [`Engine::submit`] a [`RunRequest`], follow the
//! run's [`Event`]s, [`RunHandle::cancel`] it, and take its [`Outcome`] envelope.
//!
//! The modules form layers, each using only those above it:
//! `config`, `state`, `environment`, `outcome`, `events`, `cancel`, `journal`, `net`, `stamp`, `paths`, `trust`, `blas` (leaves); `artifact`, `output`,
//! `host`; `sandbox` (one attempt); `run` (a task call with retries); `orchestrator` (a run's
//! sub-tasks and host calls); `session` (a sandbox kept from call to call); `engine` (the API).

mod artifact;
mod blas;
mod cancel;
mod config;
mod engine;
mod environment;
mod events;
mod host;
mod journal;
mod loaded;
mod net;
mod orchestrator;
mod outcome;
mod output;
pub mod paths;
mod quota;
mod run;
mod sandbox;
mod session;
mod stamp;
mod state;
pub mod trust;

pub use artifact::LoadError;
pub use cancel::Cancel;
pub use engine::{Engine, EngineError, PreparedRun, RunHandle, RunOrder, RunRequest, Start, select_task};
pub use environment::Environment;
pub use events::{Event, EventSink, NoEvents};
pub use host::BoxFuture;
pub use journal::{CallRecord, Journal, JournalError, RunRecord, args_hash, new_run_id};
pub use loaded::Loaded;
pub use net::trust_http_roots;
pub use orchestrator::{Dispatch, Remote, RemoteCall, RunSettings};
pub use outcome::{HttpCall, Outcome};
pub use session::{CallLimits, Session, SessionError, SessionState};
pub use state::{CallStatus, RunState};
pub use trust::Trust;

/// The engine's fixed limits and defaults.
pub mod limits {
    pub use crate::config::{MAX_LIVE_SANDBOXES, MAX_WASM_STACK};
    pub use crate::orchestrator::{DEFAULT_TIMEOUT, MAX_DEPTH, MAX_SUBTASKS, MAX_UNFINISHED_SUBTASKS};
    pub use crate::output::CAPTURE_LIMIT;
    pub use crate::run::{FIRST_BACKOFF, MAX_BACKOFF};
}

/// The engine's pieces below its API, for the builder (`capsule-build`), which snapshots a
/// project in a sandbox of its own making, and for tests of the sandbox itself. Front doors
/// never need them.
pub mod for_builder {
    pub use crate::artifact::{sha256_hex, write_read_only};
    pub use crate::cancel::{Stopped, until_stopped};
    pub use crate::config::{WASMTIME_VERSION, fingerprint};
    pub use crate::events::Stream;
    pub use crate::host::{RefuseHostCalls, SandboxState, linker};
    pub use crate::output::TeeOutput;
    pub use crate::sandbox::Program;
    pub use crate::stamp::FileStamp;
}
