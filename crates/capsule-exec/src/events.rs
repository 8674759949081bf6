//! What a run reports while it happens: tasks starting and finishing, retries, HTTP calls and
//! output, in order, to the [`EventSink`] the front door gave with the run. The CLI prints
//! them, the daemon keeps each run's tree and log from them.

use python_runtime::GuestError;
use serde::{Serialize, Serializer};

use crate::outcome::{HttpCall, Outcome};

/// A task call within the engine: the run's top-level task or a sub-task. Unique per engine.
pub type CallId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// A task call began: the top-level task (no parent) or a sub-task.
    TaskStarted { call: CallId, parent: Option<CallId>, task: &'a str, depth: u32 },
    /// A sub-task call was answered from the journal without running.
    TaskReplayed { parent: CallId, task: &'a str, depth: u32 },
    /// An attempt failed; `retrying` says whether another follows.
    AttemptFailed { call: CallId, attempt: u32, error: &'a GuestError, retrying: bool },
    /// An HTTP call of a task finished (or was refused).
    Http { call: CallId, request: &'a HttpCall },
    /// A task printed something.
    Output {
        call: CallId,
        stream: Stream,
        #[serde(serialize_with = "lossy_text")]
        text: &'a [u8],
    },
    /// A task call ended, with its envelope.
    TaskFinished { call: CallId, depth: u32, outcome: &'a Outcome },
}

fn lossy_text<S: Serializer>(bytes: &&[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&String::from_utf8_lossy(bytes))
}

/// Receives a run's events. Called on the engine's threads: keep it quick.
pub trait EventSink: Send + Sync {
    fn event(&self, event: &Event<'_>);
}

/// Drops every event; output is still captured in the envelope.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn event(&self, _: &Event<'_>) {}
}
