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
//! `config`, `state`, `outcome`, `events`, `cancel`, `journal`, `net`, `stamp`, `paths`, `trust`, `blas` (leaves); `artifact`, `output`,
//! `host`; `sandbox` (one attempt); `run` (a task call with retries); `orchestrator` (a run's
//! sub-tasks and host calls); `session` (a sandbox kept from call to call); `engine` (the API).

mod artifact;
mod blas;
mod cancel;
mod config;
mod engine;
mod events;
mod host;
mod journal;
mod loaded;
mod net;
mod orchestrator;
mod outcome;
mod output;
mod paths;
mod quota;
mod run;
mod sandbox;
mod session;
mod stamp;
mod state;
mod trust;

pub use artifact::{LoadError, sha256_hex, write_read_only};
pub use cancel::{Cancel, Stopped, until_stopped};
pub use config::{MAX_LIVE_SANDBOXES, MAX_WASM_STACK, WASMTIME_VERSION, config, fingerprint};
pub use engine::{Engine, EngineError, Inspection, PreparedRun, RunHandle, RunRequest, Start, select_task};
pub use events::{CallId, Event, EventSink, NoEvents, Stream};
pub use host::{BoxFuture, HostCalls, RefuseHostCalls, SandboxState, linker};
pub use journal::{CallRecord, Journal, JournalError, RunRecord, args_hash, new_run_id};
pub use loaded::Loaded;
pub use net::trust_http_roots;
pub use orchestrator::{
    DEFAULT_TIMEOUT, Dispatch, MAX_DEPTH, MAX_SUBTASKS, MAX_UNFINISHED_SUBTASKS, Remote, RemoteCall, RunSettings,
};
pub use outcome::{Captured, Execution, HttpCall, Outcome, Output};
pub use output::{CAPTURE_LIMIT, TeeOutput};
pub use paths::{CACHE_DIR_ENV, cache_dir, home, interpreter_dir, private_dir, saved_sessions_dir};
pub use run::{FIRST_BACKOFF, MAX_BACKOFF};
pub use sandbox::Program;
pub use session::{CallLimits, Session, SessionError, SessionState};
pub use stamp::FileStamp;
pub use state::{CallStatus, RunState};
pub use trust::{PublicKey, SigningKey, Trust, TrustError, signature_path};
