//! What a run reports while it happens: tasks starting and finishing, retries, HTTP calls and
//! output, in order, to the [`EventSink`] the front door gave with the run. The CLI prints
//! them, the daemon keeps each run's tree and log from them and streams them to clients,
//! which read them back as `Event<'static>`.

use std::borrow::Cow;

use python_runtime::GuestError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::outcome::{HttpCall, Outcome};

/// A task call within the engine: the run's top-level task or a sub-task. Unique per engine.
pub type CallId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// A task call began: the top-level task (no parent) or a sub-task.
    TaskStarted { call: CallId, parent: Option<CallId>, task: Cow<'a, str>, depth: u32 },
    /// A sub-task call was answered from the journal without running.
    TaskReplayed { parent: CallId, task: Cow<'a, str>, depth: u32 },
    /// An attempt failed; `retrying` says whether another follows.
    AttemptFailed { call: CallId, attempt: u32, error: Cow<'a, GuestError>, retrying: bool },
    /// An HTTP call of a task finished (or was refused).
    Http { call: CallId, request: Cow<'a, HttpCall> },
    /// A task printed something.
    Output {
        call: CallId,
        stream: Stream,
        #[serde(serialize_with = "lossy_text", deserialize_with = "text_bytes")]
        text: Cow<'a, [u8]>,
    },
    /// A task call ended, with its envelope.
    TaskFinished { call: CallId, depth: u32, outcome: Box<Cow<'a, Outcome>> },
}

#[allow(clippy::ptr_arg)] // serde's `serialize_with` passes the field as it is
fn lossy_text<S: Serializer>(bytes: &Cow<'_, [u8]>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&String::from_utf8_lossy(bytes))
}

fn text_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Cow<'static, [u8]>, D::Error> {
    Ok(Cow::Owned(String::deserialize(deserializer)?.into_bytes()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_travel_as_json_and_come_back() {
        let event = Event::Output { call: 3, stream: Stream::Stderr, text: Cow::Borrowed(b"caf\xc3\xa9\n") };
        let line = serde_json::to_string(&event).unwrap();
        assert_eq!(line, r#"{"event":"output","call":3,"stream":"stderr","text":"café\n"}"#);
        let back: Event<'static> = serde_json::from_str(&line).unwrap();
        assert!(matches!(back, Event::Output { call: 3, text, .. } if &*text == "café\n".as_bytes()));
    }
}
