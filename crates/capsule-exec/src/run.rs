//! Running one task call to completion: its limits and grants, attempts, retries with
//! backoff, and the result envelope.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use manifest_schema::{FileMode, Task};
use python_runtime::{ErrorKind, GuestError, InvokeRequest};
use serde_json::Value;

use crate::cancel::Cancel;
use crate::environment::Environment;
use crate::events::{CallId, Event, EventSink, Stream};
use crate::host::HostCalls;
use crate::journal::AttemptRecord;
use crate::outcome::{Execution, Outcome, Output, duration_ms, is_retryable};
use crate::output::TeeOutput;
use crate::paths::Reserved;
use crate::quota::FileQuota;
use crate::sandbox::{Attempt, AttemptSetup, Limits, Preopen, Program};

/// Delay before the first retry; it doubles for each further retry, up to [`MAX_BACKOFF`],
/// and a random fraction of up to half of it is added so retries of many tasks spread out.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Arguments of a task call, and the runner's settings for it.
#[derive(Debug, Clone)]
pub struct Call {
    pub args: Vec<Value>,
    pub kwargs: serde_json::Map<String, Value>,
    /// Deadline of an attempt when the task sets no `timeout`.
    pub default_timeout: Duration,
    /// The folder `allowed_files` paths are relative to.
    pub project_root: Option<std::path::PathBuf>,
    /// What no grant may reach.
    pub reserved: Arc<Reserved>,
    /// Where `env_passthrough` reads its values.
    pub environment: Environment,
}

/// Makes the host-call handler of each attempt.
pub trait AttemptHosts: Sync {
    fn for_attempt(&self, task: &Task, deadline: Instant) -> Box<dyn HostCalls>;
    /// Whether another attempt would meet the same refusal (the run's journal would not
    /// replay one of its calls), so a failure is not retried.
    fn replay_refused(&self) -> bool;
}

/// Where a task call runs: its id, who hears about it, and what may stop it.
pub struct TaskContext<'a> {
    pub call: CallId,
    pub events: &'a Arc<dyn EventSink>,
    pub cancel: &'a Cancel,
    pub hosts: &'a dyn AttemptHosts,
}

/// The task's `allowed_files` as folders to preopen, each checked, after symbolic links are
/// resolved, to be a folder inside the project, other than the project folder itself (which
/// holds `.capsule/`), that reaches nothing `reserved`.
pub fn preopens_of(task: &Task, project_root: Option<&Path>, reserved: &Reserved) -> Result<Vec<Preopen>, String> {
    let grants = &task.options.allowed_files;
    if grants.is_empty() {
        return Ok(Vec::new());
    }
    let root = project_root.ok_or("the manifest names no project folder for `allowed_files`")?;
    let root = root.canonicalize().map_err(|e| format!("project folder `{}`: {e}", root.display()))?;
    grants
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
            // A grant of the root itself is refused when it is read; a link to it is refused here.
            if host == root && grant.path != "." {
                return Err(format!(
                    "`allowed_files` path `{}` resolves to the project folder itself, which holds `.capsule/`; grant a folder of your data instead",
                    grant.path
                ));
            }
            reserved.check(&grant.path, &host)?;
            Ok(Preopen { host, guest: grant.guest_path(), writable: grant.mode == FileMode::ReadWrite })
        })
        .collect()
}

/// The task's environment: its `env_vars`, plus the `env_passthrough` variables that are
/// set in the runner's `environment` now.
pub(crate) fn environment_of(task: &Task, environment: &Environment) -> BTreeMap<String, String> {
    let mut env = task.options.env_vars.clone();
    for name in &task.options.env_passthrough {
        match environment.get(name) {
            Some(value) => {
                env.insert(name.clone(), value);
            }
            None => tracing::warn!(task = %task.name, variable = %name, "`env_passthrough` variable is not set"),
        }
    }
    env
}

pub fn limits_of(task: &Task, default_timeout: Duration) -> Limits {
    Limits {
        fuel: task.options.compute.fuel(),
        memory_bytes: task.options.ram.bytes(),
        timeout: task.options.timeout.map_or(default_timeout, |t| t.0),
        files: FileQuota { max_written: task.options.max_written.bytes(), max_created: task.options.max_files_created },
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

/// Runs `task` with retries and reports everything that happened, with a record of each
/// attempt for the journal.
pub async fn run_task(
    program: &Program,
    task: &Task,
    call: Call,
    context: &TaskContext<'_>,
) -> (Outcome, Vec<AttemptRecord>) {
    let started = Instant::now();
    let limits = limits_of(task, call.default_timeout);
    let dirs = match preopens_of(task, call.project_root.as_deref(), &call.reserved) {
        Ok(dirs) => dirs,
        Err(message) => {
            return (Outcome::without_attempts(&task.name, Err(GuestError::new(ErrorKind::Host, message))), Vec::new());
        }
    };
    let mut request = InvokeRequest {
        task: task.name.clone(),
        args: call.args,
        kwargs: call.kwargs,
        env: environment_of(task, &call.environment),
        attempt: 0,
    };
    let mut execution = Execution {
        task: task.name.clone(),
        duration_ms: 0,
        attempts: 0,
        fuel_consumed: 0,
        peak_memory_bytes: 0,
        attempt_errors: Vec::new(),
        host_requests: Vec::new(),
    };
    let mut records = Vec::new();
    loop {
        execution.attempts += 1;
        request.attempt = execution.attempts;
        let setup = AttemptSetup {
            limits,
            dirs: &dirs,
            host_calls: context.hosts.for_attempt(task, Instant::now() + limits.timeout),
            stdout: TeeOutput::reporting(Stream::Stdout, context.events.clone(), context.call),
            stderr: TeeOutput::reporting(Stream::Stderr, context.events.clone(), context.call),
            cancel: context.cancel,
        };
        let Attempt { result, fuel_consumed, peak_memory_bytes, http_calls, duration, stdout, stderr } =
            program.run(&request, setup).await;
        execution.host_requests.extend(http_calls);
        execution.fuel_consumed = execution.fuel_consumed.saturating_add(fuel_consumed);
        execution.peak_memory_bytes = execution.peak_memory_bytes.max(peak_memory_bytes);
        let mut result = result;
        let error = result.as_ref().err().map(|e| serde_json::to_value(e).expect("errors serialise"));
        records.push(AttemptRecord::now(error, fuel_consumed, peak_memory_bytes, duration_ms(duration)));
        let mut retrying = false;
        if let Err(error) = &result {
            retrying = is_retryable(error.kind)
                && execution.attempts <= task.options.max_retries
                && !context.hosts.replay_refused();
            context.events.event(&Event::AttemptFailed {
                call: context.call,
                attempt: execution.attempts,
                error: std::borrow::Cow::Borrowed(error),
                retrying,
            });
            execution.attempt_errors.push(error.clone());
        }
        if retrying {
            tracing::info!(task = %task.name, attempt = execution.attempts, "attempt failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(backoff(execution.attempts - 1)) => continue,
                () = context.cancel.cancelled() => {
                    result = Err(GuestError::new(ErrorKind::Cancelled, "the run was stopped"));
                }
            }
        }
        execution.duration_ms = duration_ms(started.elapsed());
        let (success, result, error) = match result {
            Ok(value) => (true, value, None),
            Err(error) => (false, Value::Null, Some(error)),
        };
        return (Outcome { success, result, error, execution, output: Output { stdout, stderr } }, records);
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
        assert!(!is_retryable(ErrorKind::Cancelled));
    }
}
