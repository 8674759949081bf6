//! The result envelope of a task call, as `--json` prints it and every front door returns it.

use python_runtime::{ErrorKind, GuestError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The result envelope.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub success: bool,
    pub result: Value,
    pub error: Option<GuestError>,
    pub execution: Execution,
    /// What the last attempt printed.
    pub output: Output,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub host_requests: Vec<HttpCall>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Output {
    pub stdout: Captured,
    pub stderr: Captured,
}

/// What a task printed on one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Captured {
    pub text: String,
    /// More was printed than the capture keeps; the rest was streamed but not kept.
    pub truncated: bool,
}

/// One HTTP call, as reported in the envelope: never headers, never the query string.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HttpCall {
    pub method: String,
    pub url: String,
    pub status: Option<u16>,
    pub duration_ms: u64,
    pub bytes: usize,
    pub error: Option<String>,
}

impl Outcome {
    /// The outcome of a call that never ran, failing with `error`.
    pub fn not_run(task: &str, error: GuestError) -> Self {
        Self::without_attempts(task, Err(error))
    }

    /// An outcome without any attempt: the task was not (or need not be) run.
    pub(crate) fn without_attempts(task: &str, result: Result<Value, GuestError>) -> Self {
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
            output: Output::default(),
        }
    }

    /// The error type of a failed call, if it failed.
    pub fn error_kind(&self) -> Option<ErrorKind> {
        self.error.as_ref().map(|e| e.kind)
    }

    /// Whether resuming the run could end differently: not after a deterministic failure
    /// (fuel, memory, bad input), which a fresh instance would repeat.
    pub fn could_succeed_on_resume(&self) -> bool {
        self.error_kind().is_some_and(|kind| is_retryable(kind) || kind == ErrorKind::Cancelled)
    }
}

/// Failures worth another attempt. Running out of fuel or memory, or bad input, would fail
/// the same way again on a fresh instance of the same snapshot; a cancelled run was stopped
/// on purpose.
pub fn is_retryable(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Exception | ErrorKind::Timeout | ErrorKind::Host)
}

pub(crate) fn duration_ms(duration: std::time::Duration) -> u64 {
    duration.as_millis().try_into().unwrap_or(u64::MAX)
}
