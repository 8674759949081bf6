//! What travels through the cluster, each shape defined once: a queued call, a call's state
//! (for `capsule list`), and an outcome fitted to a message.

use capsule_exec::{Outcome, RemoteCall};
use python_runtime::{ErrorKind, GuestError};
use serde::{Deserialize, Serialize};

/// Version of [`CallMessage`]; a worker refuses (and drops) messages of another.
pub const MESSAGE_VERSION: u32 = 1;
/// The largest record (an outcome, a message) the cluster stores: below a server's default
/// maximum message size of 1 MiB.
pub const MAX_RECORD_BYTES: usize = 1_000_000;

/// A queued call.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallMessage {
    pub version: u32,
    /// The project's namespace (its subject).
    pub namespace: String,
    /// The manifest to run it with, by sha256, from the artifact store.
    pub manifest_sha256: String,
    pub call: RemoteCall,
}

impl CallMessage {
    /// Parses and checks a message from the queue: anything a worker could be fed.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let message: Self = serde_json::from_slice(bytes).map_err(|e| format!("not a call message: {e}"))?;
        if message.version != MESSAGE_VERSION {
            return Err(format!("message version {} (this worker reads {MESSAGE_VERSION})", message.version));
        }
        if !is_sha256(&message.manifest_sha256) {
            return Err(format!("`{}` is not a sha256", message.manifest_sha256));
        }
        if !is_call_key(&message.call.key) {
            return Err(format!("`{}` is not a call key", message.call.key));
        }
        Ok(message)
    }

    /// The run the call belongs to.
    pub fn run(&self) -> &str {
        run_of(&self.call.key)
    }
}

pub fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// `<run>.0`, then `.<position>` per level: a run id of letters and digits, then numbers.
pub fn is_call_key(key: &str) -> bool {
    let mut parts = key.split('.');
    let run = parts.next().unwrap_or("");
    let mut levels = 0;
    for part in parts {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        levels += 1;
    }
    !run.is_empty() && run.len() <= 64 && run.bytes().all(|b| b.is_ascii_alphanumeric()) && levels >= 1
}

pub fn run_of(key: &str) -> &str {
    key.split('.').next().unwrap_or(key)
}

/// Where a call is and how it went, as its worker reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallState {
    pub task: String,
    /// The worker running (or that ran) it.
    pub worker: String,
    pub status: capsule_exec::CallStatus,
    /// How many times the queue has delivered it (more than 1 after a worker died).
    pub delivered: u32,
    pub started_at_ms: i64,
    /// Attempts made (retries included), once it has ended.
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub elapsed_ms: Option<u64>,
    #[serde(default)]
    pub fuel: Option<u64>,
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
    #[serde(default)]
    pub error_type: Option<String>,
}

/// A call's outcome as the results bucket holds it, with what the call was: a parent run
/// again that makes another call at the same position must not get this outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    pub task: String,
    /// `capsule_exec::args_hash` of the call's arguments.
    pub args_hash: String,
    pub outcome: Outcome,
}

impl Recorded {
    pub fn of(call: &RemoteCall, outcome: Outcome) -> Self {
        Self { task: call.task.clone(), args_hash: capsule_exec::args_hash(&call.args, &call.kwargs), outcome }
    }

    /// The outcome, if it was recorded for `call`; else why not.
    pub fn outcome_for(self, call: &RemoteCall) -> Result<Outcome, String> {
        if self.task == call.task && self.args_hash == capsule_exec::args_hash(&call.args, &call.kwargs) {
            return Ok(self.outcome);
        }
        Err(format!(
            "the run diverged at `{}`: it first called `{}` there, now `{}` with other arguments; a run resumed on the cluster must make the same calls in the same order",
            call.key, self.task, call.task
        ))
    }

    /// As stored: JSON no larger than [`MAX_RECORD_BYTES`]: captured output is cut from the
    /// start (marked truncated) to fit; a result that cannot fit becomes an error.
    pub fn into_bytes(mut self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec(&self).expect("records serialise");
        // Each stream gives up its share of the excess, from its start; JSON escaping may make
        // a cut short, so a few rounds.
        for _ in 0..4 {
            let output = &mut self.outcome.output;
            let streams_bytes = output.stdout.text.len() + output.stderr.text.len();
            if bytes.len() <= MAX_RECORD_BYTES || streams_bytes == 0 {
                break;
            }
            let excess = bytes.len() - MAX_RECORD_BYTES;
            for captured in [&mut output.stdout, &mut output.stderr] {
                let share = (excess * captured.text.len()).div_ceil(streams_bytes);
                if share > 0 {
                    let mut cut = (share + 64).min(captured.text.len());
                    while !captured.text.is_char_boundary(cut) {
                        cut += 1;
                    }
                    captured.text.replace_range(..cut, "");
                    captured.truncated = true;
                }
            }
            bytes = serde_json::to_vec(&self).expect("records serialise");
        }
        if bytes.len() > MAX_RECORD_BYTES {
            let size = bytes.len();
            let error = GuestError::new(
                ErrorKind::Host,
                format!("the result is {size} bytes; a cluster carries results of at most {MAX_RECORD_BYTES} bytes"),
            );
            let mut too_big = Outcome::not_run(&self.outcome.execution.task, error);
            too_big.execution = self.outcome.execution.clone();
            self.outcome = too_big;
            bytes = serde_json::to_vec(&self).expect("records serialise");
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_keys_are_a_run_then_positions() {
        assert!(is_call_key("0190abc123.0"));
        assert!(is_call_key("0190abc123.0.12.3"));
        for bad in ["", "run", "run.", "run..1", "run.x", "ru-n.0", "run.0.>", "*.0"] {
            assert!(!is_call_key(bad), "{bad}");
        }
        assert_eq!(run_of("0190abc123.0.4"), "0190abc123");
    }

    #[test]
    fn messages_are_checked_before_anything_runs() {
        let good = serde_json::json!({
            "version": 1, "namespace": "demo", "manifest_sha256": "a".repeat(64),
            "call": {"key": "r1.0", "depth": 0, "task": "main", "args": [], "kwargs": {}}
        });
        assert!(CallMessage::parse(good.to_string().as_bytes()).is_ok());
        let mut other = good.clone();
        other["version"] = 2.into();
        assert!(CallMessage::parse(other.to_string().as_bytes()).unwrap_err().contains("version 2"));
        let mut other = good.clone();
        other["manifest_sha256"] = "../../etc/passwd".into();
        assert!(CallMessage::parse(other.to_string().as_bytes()).is_err());
        let mut other = good.clone();
        other["files_root"] = "/".into();
        assert!(CallMessage::parse(other.to_string().as_bytes()).unwrap_err().contains("unknown field"));
        assert!(CallMessage::parse(b"\xff garbage").is_err());
    }

    fn call(task: &str, args: Vec<serde_json::Value>) -> RemoteCall {
        RemoteCall { key: "r1.0.1".into(), depth: 1, task: task.into(), args, kwargs: Default::default() }
    }

    #[test]
    fn outcomes_are_fitted_to_a_message() {
        let mut outcome = Outcome::not_run("main", GuestError::new(ErrorKind::Exception, "boom"));
        outcome.output.stdout.text = "x".repeat(3 * MAX_RECORD_BYTES / 2);
        outcome.output.stderr.text = "é".repeat(MAX_RECORD_BYTES / 4);
        let bytes = Recorded::of(&call("main", vec![]), outcome).into_bytes();
        assert!(bytes.len() <= MAX_RECORD_BYTES, "{}", bytes.len());
        let back: Recorded = serde_json::from_slice(&bytes).unwrap();
        assert!(back.outcome.output.stdout.truncated && back.outcome.output.stdout.text.len() > 1000);
        assert_eq!(back.outcome.error.unwrap().message, "boom");

        let mut huge = Outcome::not_run("main", GuestError::new(ErrorKind::Exception, "x"));
        huge.result = serde_json::Value::String("y".repeat(2 * MAX_RECORD_BYTES));
        let back: Recorded = serde_json::from_slice(&Recorded::of(&call("main", vec![]), huge).into_bytes()).unwrap();
        assert!(back.outcome.error.unwrap().message.contains("at most"));
    }

    #[test]
    fn a_recorded_outcome_answers_only_the_same_call() {
        let ok = Outcome::not_run("step", GuestError::new(ErrorKind::Exception, "x"));
        let recorded = Recorded::of(&call("step", vec![1.into()]), ok);
        assert!(recorded.clone().outcome_for(&call("step", vec![1.into()])).is_ok());
        let diverged = recorded.clone().outcome_for(&call("step", vec![2.into()])).unwrap_err();
        assert!(diverged.contains("diverged at `r1.0.1`"), "{diverged}");
        assert!(recorded.outcome_for(&call("other", vec![1.into()])).is_err());
    }
}
