//! One run as the daemon holds it: what was asked, its live tree of calls and its log, kept
//! from the engine's events (or, on a cluster, from its workers' reports).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use capsule_exec::{CallStatus, Cancel, Event, EventSink, Outcome, RunState};
use tokio::sync::Notify;

use crate::api::{CallView, Line, RunView, SubmitRun};

/// Event bytes kept per run for streaming and `logs`; a run that prints more keeps the end.
const LOG_BYTES: usize = 4 << 20;

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// One run: what was asked, and what is known of it so far.
pub struct RunEntry {
    pub id: String,
    pub(crate) namespace: String,
    pub(crate) task: String,
    pub(crate) entry: String,
    pub(crate) request: SubmitRun,
    pub(crate) restarted_from: Option<String>,
    /// Recorded in a journal, which says how it ended (not a code string, nor a cluster's run).
    pub(crate) journaled: bool,
    submitted_at_ms: i64,
    pub(crate) cancel: Cancel,
    pub(crate) state: Mutex<RunProgress>,
    log: Mutex<Log>,
    changed: Notify,
}

pub(crate) struct RunProgress {
    pub(crate) status: RunState,
    pub(crate) finished_at_ms: Option<i64>,
    pub(crate) outcome: Option<Outcome>,
    pub(crate) calls: BTreeMap<u64, CallState>,
}

pub(crate) struct CallState {
    pub(crate) view: CallView,
    pub(crate) started: Instant,
}

/// The run's events as NDJSON lines, numbered from 0.
#[derive(Default)]
struct Log {
    lines: VecDeque<Arc<str>>,
    first: u64,
    bytes: usize,
    ended: bool,
}

impl Log {
    fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line.into());
        while self.bytes > LOG_BYTES && self.lines.len() > 1 {
            let dropped = self.lines.pop_front().expect("not empty");
            self.bytes -= dropped.len();
            self.first += 1;
        }
    }
}

impl RunEntry {
    /// A queued run, without its id and task until they are known.
    pub(crate) fn new(
        namespace: String,
        entry: String,
        request: SubmitRun,
        restarted_from: Option<String>,
        cancel: Cancel,
    ) -> Self {
        Self {
            id: String::new(),
            namespace,
            task: String::new(),
            entry,
            request,
            restarted_from,
            journaled: false,
            submitted_at_ms: now_ms(),
            cancel,
            state: Mutex::new(RunProgress {
                status: RunState::Queued,
                finished_at_ms: None,
                outcome: None,
                calls: BTreeMap::new(),
            }),
            log: Mutex::default(),
            changed: Notify::new(),
        }
    }

    pub fn view(&self, with_calls: bool) -> RunView {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let calls = if with_calls {
            state
                .calls
                .values()
                .map(|call| {
                    let mut view = call.view.clone();
                    if view.status == CallStatus::Running {
                        view.elapsed_ms = call.started.elapsed().as_millis() as u64;
                    }
                    view
                })
                .collect()
        } else {
            Vec::new()
        };
        RunView {
            id: self.id.clone(),
            namespace: self.namespace.clone(),
            task: self.task.clone(),
            entry: self.entry.clone(),
            status: state.status,
            submitted_at_ms: self.submitted_at_ms,
            finished_at_ms: state.finished_at_ms,
            restarted_from: self.restarted_from.clone(),
            error: state.outcome.as_ref().and_then(|o| o.error.clone()),
            calls,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).finished_at_ms.is_some()
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).outcome.clone()
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Lines from number `from` on, the number of the next one, and whether the log has ended.
    pub fn lines_from(&self, from: u64) -> (Vec<Arc<str>>, u64, bool) {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let start = from.max(log.first);
        let skip = (start - log.first) as usize;
        let lines: Vec<Arc<str>> = log.lines.iter().skip(skip).cloned().collect();
        (lines, log.first + log.lines.len() as u64, log.ended)
    }

    /// A future that resolves at the run's next change (a new line, its end), registered
    /// now, so that a change between this call and awaiting it is not missed.
    pub fn next_change(&self) -> std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>> {
        let mut notified = Box::pin(self.changed.notified());
        notified.as_mut().enable();
        notified
    }

    fn push_line(&self, line: &Line) {
        self.push_text(serde_json::to_string(line).expect("lines serialise") + "\n");
    }

    fn push_text(&self, line: String) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        self.changed.notify_waiters();
    }

    pub(crate) fn set_status(&self, status: RunState) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).status = status;
        self.changed.notify_waiters();
    }

    pub(crate) fn finish(&self, outcome: Outcome, status: RunState) {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.status = status;
            state.finished_at_ms = Some(now_ms());
            state.outcome = Some(outcome.clone());
            // What still runs when the run ends was abandoned with it.
            for call in state.calls.values_mut().filter(|c| c.view.status == CallStatus::Running) {
                call.view.status = CallStatus::Aborted;
                call.view.elapsed_ms = call.started.elapsed().as_millis() as u64;
            }
        }
        self.push_line(&Line::Outcome { outcome });
        self.log.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
        self.changed.notify_waiters();
    }
}

/// Keeps a run's tree and log from its events.
pub(crate) fn record(entry: &RunEntry, event: &Event<'_>) {
    {
        let mut state = entry.state.lock().unwrap_or_else(|e| e.into_inner());
        let calls = &mut state.calls;
        match event {
            Event::TaskStarted { call, parent, task, .. } => {
                let view = CallView::started(*call, *parent, task);
                calls.insert(*call, CallState { view, started: Instant::now() });
            }
            Event::AttemptFailed { call, attempt, retrying: true, .. } => {
                if let Some(state) = calls.get_mut(call) {
                    state.view.attempt = attempt + 1;
                }
            }
            Event::Http { call, request } => {
                if let Some(state) = calls.get_mut(call) {
                    state.view.http.push(request.clone().into_owned());
                }
            }
            Event::TaskFinished { call, outcome, .. } => {
                if let Some(state) = calls.get_mut(call) {
                    let elapsed_ms = state.started.elapsed().as_millis() as u64;
                    state.view.end(outcome, elapsed_ms);
                }
            }
            _ => {}
        }
    }
    // The top-level outcome is the run's last line; a sub-task's is in the tree.
    if !matches!(event, Event::TaskFinished { depth: 0, .. }) {
        // `Line::Event`, written without first copying the event into an owned one.
        let event = serde_json::to_string(event).expect("events serialise");
        entry.push_text(format!("{{\"kind\":\"event\",\"event\":{event}}}\n"));
    }
}

/// The events of a run, recorded once its entry exists (nothing runs before).
pub(crate) struct Deferred(pub(crate) Arc<OnceLock<Arc<RunEntry>>>);

impl EventSink for Deferred {
    fn event(&self, event: &Event<'_>) {
        if let Some(entry) = self.0.get() {
            record(entry, event);
        }
    }
}
