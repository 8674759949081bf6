//! Running a task to completion: attempts, retries with backoff, and the result envelope.

use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use manifest_schema::{FileMode, HostPolicy, Task};
use python_runtime::{ErrorKind, GuestError, InvokeRequest};
use serde::Serialize;
use serde_json::Value;

use crate::net::HostRequest;
use crate::output::Captured;
use crate::sandbox::{Access, Attempt, Limits, Preopen, Program, Streams};
use crate::subtasks::Scope;

/// The wall-clock ceiling for a task that sets no `timeout`, unless the runner is given
/// another (`--default-timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Delay before the first retry; it doubles for each further retry, up to [`MAX_BACKOFF`],
/// and a random fraction of up to half of it is added so retries of many tasks spread out.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Failures worth another attempt. Running out of fuel or memory, or bad input, would fail
/// the same way again on a fresh instance of the same snapshot, so they are not retried.
pub fn is_retryable(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Exception | ErrorKind::Timeout | ErrorKind::Host)
}

/// The result envelope printed by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub success: bool,
    pub result: Value,
    pub error: Option<GuestError>,
    pub execution: Execution,
    /// What the last attempt printed.
    pub output: Output,
}

#[derive(Debug, Clone, Serialize)]
pub struct Execution {
    pub task: String,
    pub duration_ms: u64,
    pub attempts: u32,
    /// Fuel used by all attempts together.
    pub fuel_consumed: u64,
    /// The largest linear memory any attempt reached.
    pub peak_memory_bytes: u64,
    /// The error of every failed attempt, in order.
    pub attempt_errors: Vec<GuestError>,
    /// Every HTTP call of every attempt, in order (no headers, no query strings).
    pub host_requests: Vec<HostRequest>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Output {
    pub stdout: Captured,
    pub stderr: Captured,
}

impl Outcome {
    /// An outcome without any attempt: the task was not (or need not be) run.
    fn without_attempts(task: &str, result: Result<Value, GuestError>) -> Self {
        let (success, result, error) = match result {
            Ok(value) => (true, value, None),
            Err(error) => (false, Value::Null, Some(error)),
        };
        Self {
            success,
            result,
            execution: Execution {
                task: task.to_string(),
                duration_ms: 0,
                attempts: 0,
                fuel_consumed: 0,
                peak_memory_bytes: 0,
                attempt_errors: error.iter().cloned().collect(),
                host_requests: Vec::new(),
            },
            error,
            output: Output { stdout: Captured::default(), stderr: Captured::default() },
        }
    }

    /// The outcome of a call the journal shows finished: its result, without running it.
    pub fn replayed(result: Value) -> Self {
        Self::without_attempts("", Ok(result))
    }

    /// A task that could not start, e.g. because a granted folder is missing.
    pub fn not_started(task: &str, error: GuestError) -> Self {
        Self::without_attempts(task, Err(error))
    }
}

/// Arguments of a task call, and the runner's settings for it.
#[derive(Debug, Clone)]
pub struct Call {
    pub args: Vec<Value>,
    pub kwargs: serde_json::Map<String, Value>,
    /// Deadline of an attempt when the task sets no `timeout`.
    pub default_timeout: Duration,
    /// The folder `allowed_files` paths are relative to (the manifest's `project_root`).
    pub project_root: Option<PathBuf>,
}

impl Call {
    pub fn new(args: Vec<Value>) -> Self {
        Self { args, kwargs: serde_json::Map::new(), default_timeout: DEFAULT_TIMEOUT, project_root: None }
    }
}

/// The task's `allowed_files` as folders to preopen, each checked to be a folder inside the
/// project after symbolic links are resolved.
pub fn preopens_of(task: &Task, project_root: Option<&Path>) -> Result<Vec<Preopen>, String> {
    if task.allowed_files.is_empty() {
        return Ok(Vec::new());
    }
    let root = project_root.ok_or("the manifest names no project folder for `allowed_files`")?;
    let root = root.canonicalize().map_err(|e| format!("project folder `{}`: {e}", root.display()))?;
    task.allowed_files
        .iter()
        .map(|grant| {
            let wanted = root.join(&grant.path);
            let host = wanted.canonicalize().map_err(|e| format!("`allowed_files` path `{}`: {e}", grant.path))?;
            if !host.starts_with(&root) {
                return Err(format!(
                    "`allowed_files` path `{}` resolves outside the project, to `{}`",
                    grant.path,
                    host.display()
                ));
            }
            if !host.is_dir() {
                return Err(format!("`allowed_files` path `{}` is not a folder", grant.path));
            }
            Ok(Preopen { host, guest: grant.guest_path(), writable: grant.mode == FileMode::ReadWrite })
        })
        .collect()
}

/// The task's environment: its `env_vars`, plus the `env_passthrough` variables that are
/// set in the runner's own environment now.
pub fn environment_of(task: &Task) -> std::collections::BTreeMap<String, String> {
    let mut env = task.env.clone();
    for name in &task.env_passthrough {
        match std::env::var(name) {
            Ok(value) => {
                env.insert(name.clone(), value);
            }
            Err(_) => tracing::warn!(task = %task.name, variable = %name, "`env_passthrough` variable is not set"),
        }
    }
    env
}

fn duration_ms(duration: Duration) -> u64 {
    duration.as_millis().try_into().unwrap_or(u64::MAX)
}

pub fn limits_of(task: &Task, default_timeout: Duration) -> Limits {
    Limits {
        fuel: task.fuel,
        memory_bytes: task.memory_bytes,
        timeout: task.timeout_ms.map_or(default_timeout, Duration::from_millis),
    }
}

fn backoff(retry: u32) -> Duration {
    let base = FIRST_BACKOFF.saturating_mul(1 << retry.min(16)).min(MAX_BACKOFF);
    let jitter = rand_fraction() * 0.5;
    base.mul_f64(1.0 + jitter)
}

/// A fraction in [0, 1) from the OS's randomness via std's hasher seed; good enough to spread
/// retries without another dependency.
fn rand_fraction() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    (RandomState::new().hash_one(Instant::now()) >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs `task` with retries and reports everything that happened.
/// `scope` places the task in a run's tree so that it may call sub-tasks; without one, calls
/// to other tasks are refused.
pub async fn run_task(program: &Program, task: &Task, call: Call, streams: Streams, scope: Option<Scope>) -> Outcome {
    let started = Instant::now();
    let limits = limits_of(task, call.default_timeout);
    let hosts = HostPolicy::parse(&task.allowed_hosts).expect("validated with the manifest");
    let dirs = match preopens_of(task, call.project_root.as_deref()) {
        Ok(dirs) => dirs,
        Err(message) => {
            let error =
                GuestError { kind: ErrorKind::Host, exc_type: String::new(), message, traceback: String::new() };
            return Outcome::not_started(&task.name, error);
        }
    };
    let access = Access { hosts, dirs, subtasks: scope };
    let mut request = InvokeRequest {
        task: task.name.clone(),
        args: call.args,
        kwargs: call.kwargs,
        env: environment_of(task),
        attempt: 0,
    };
    let mut host_requests = Vec::new();
    let mut attempts = 0;
    let mut fuel_consumed = 0u64;
    let mut peak_memory_bytes = 0;
    let mut attempt_errors = Vec::new();
    loop {
        attempts += 1;
        request.attempt = attempts;
        let Attempt {
            result,
            fuel_consumed: fuel,
            peak_memory_bytes: peak,
            stdout,
            stderr,
            host_requests: calls,
            duration,
        } = program.run(&request, &limits, &access, streams).await;
        host_requests.extend(calls);
        fuel_consumed = fuel_consumed.saturating_add(fuel);
        peak_memory_bytes = peak_memory_bytes.max(peak);
        if let Some(position) = access.subtasks.as_ref().and_then(|scope| scope.journal.as_ref()) {
            let error = result.as_ref().err().map(|e| serde_json::to_value(e).expect("errors serialise"));
            let recorded = position.journal.record_attempt(
                position.call,
                attempts,
                error.as_ref(),
                fuel,
                peak,
                duration_ms(duration),
            );
            if let Err(error) = recorded {
                tracing::error!(%error, "could not record an attempt in the journal");
            }
        }
        let retry = match &result {
            Err(error) => is_retryable(error.kind) && attempts <= task.max_retries,
            Ok(_) => false,
        };
        if let Err(error) = &result {
            attempt_errors.push(error.clone());
        }
        if retry {
            tracing::info!(task = %task.name, attempt = attempts, "attempt failed; retrying");
            tokio::time::sleep(backoff(attempts - 1)).await;
            continue;
        }
        let (success, result, error) = match result {
            Ok(value) => (true, value, None),
            Err(error) => (false, Value::Null, Some(error)),
        };
        return Outcome {
            success,
            result,
            error,
            execution: Execution {
                task: task.name.clone(),
                duration_ms: started.elapsed().as_millis() as u64,
                attempts,
                fuel_consumed,
                peak_memory_bytes,
                attempt_errors,
                host_requests,
            },
            output: Output { stdout, stderr },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) >= FIRST_BACKOFF && backoff(0) <= FIRST_BACKOFF.mul_f64(1.5));
        assert!(backoff(3) >= FIRST_BACKOFF * 8);
        assert!(backoff(30) <= MAX_BACKOFF.mul_f64(1.5));
    }

    #[test]
    fn resource_exhaustion_is_not_retried() {
        assert!(is_retryable(ErrorKind::Exception));
        assert!(!is_retryable(ErrorKind::Fuel));
        assert!(!is_retryable(ErrorKind::Memory));
        assert!(!is_retryable(ErrorKind::InvalidInput));
    }
}
