//! Sessions: one sandbox kept alive from call to call, so that what a call leaves in Python
//! (variables, imports, definitions) is there for the next. Each call has its own fuel and
//! deadline; the session has its memory limit.
//!
//! A call that raises an exception keeps what it did before raising, as a notebook cell does.
//! A call stopped inside the guest (deadline, fuel, memory, cancel) leaves a sandbox that
//! cannot be trusted: the session is rebuilt from its last checkpoint (its last `save`, else
//! the fresh image) by running again, quietly, the calls that ran to their end since, so that
//! it is as it was before the failed call. (Those calls run again: what they fetch or read,
//! they fetch or read again.)
//!
//! A session's state is its linear memory; between calls every mutable global is back at its
//! initial value (the stack pointer). [`Session::save`] keeps the 64 KiB chunks that differ
//! from the image's initial memory, each named by its sha256; [`SessionState::to_bytes`]
//! writes them with a header and a checksum, and [`SessionState::from_bytes`] refuses a file
//! that does not match it or was saved from another image.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use manifest_schema::Task;
use python_runtime::InvokeRequest;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::cancel::Cancel;
use crate::events::{CallId, EventSink, Stream};
use crate::loaded::Loaded;
use crate::orchestrator::{Orchestrator, RunSettings, Scope};
use crate::outcome::{Execution, Outcome, Output, duration_ms};
use crate::output::TeeOutput;
use crate::run::{AttemptHosts, environment_of, limits_of, preopens_of};
use crate::sandbox::{Attempt, Limits, Preopen, Sandbox};

/// The unit of a saved session's memory.
const CHUNK: usize = 64 << 10;
const MAGIC: &[u8] = b"CAPSULE-SESSION\x01";

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("the session's sandbox could not be made: {0}")]
    Sandbox(String),
    #[error("the session file is damaged: {0}")]
    Damaged(String),
    #[error("the session was saved from another image (artifact {saved}, this one is {image})")]
    Foreign { saved: String, image: String },
    #[error("rebuilding the session after a failed call failed at call {call}: {message}")]
    Replay { call: usize, message: String },
}

impl manifest_schema::Explain for SessionError {
    fn category(&self) -> manifest_schema::Category {
        use manifest_schema::Category;
        match self {
            Self::Damaged(_) | Self::Foreign { .. } => Category::Usage,
            Self::Sandbox(_) | Self::Replay { .. } => Category::Internal,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::Damaged(_) => Some("restore from another save; a session file cannot be repaired".into()),
            Self::Foreign { .. } => Some("restore it with the Capsule (and interpreter image) that saved it".into()),
            _ => None,
        }
    }
}

/// A call of a session: its arguments, its own limits, and whether it succeeded.
#[derive(Debug, Clone)]
struct Cell {
    args: Vec<Value>,
    limits: CallLimits,
    succeeded: bool,
}

/// What one session call may use; unset, the session's task options apply.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallLimits {
    pub fuel: Option<u64>,
    pub timeout: Option<Duration>,
}

/// A session's memory as saved: the chunks that differ from its image's initial memory.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionState {
    /// The artifact (sha256) of the image it runs.
    image: String,
    memory_bytes: u64,
    /// Chunk index → the sha256 of its content.
    chunks: BTreeMap<u32, [u8; 32]>,
    /// Contents by sha256 (shared by equal chunks).
    contents: BTreeMap<[u8; 32], Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    image: String,
    memory_bytes: u64,
    /// `[chunk index, hex sha256]`, in index order.
    chunks: Vec<(u32, String)>,
    /// Hex sha256 of each distinct content, in the order the contents follow the header.
    contents: Vec<String>,
}

impl std::fmt::Debug for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionState").field("image", &self.image).field("chunks", &self.chunks.len()).finish()
    }
}

impl SessionState {
    /// The file format: magic, header length (u32 LE), header (JSON), contents, and the
    /// sha256 of everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = Header {
            image: self.image.clone(),
            memory_bytes: self.memory_bytes,
            chunks: self.chunks.iter().map(|(i, h)| (*i, hex::encode(h))).collect(),
            contents: self.contents.keys().map(hex::encode).collect(),
        };
        let header = serde_json::to_vec(&header).expect("headers serialise");
        let mut bytes = Vec::with_capacity(self.contents.len() * CHUNK + header.len() + 64);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header);
        for content in self.contents.values() {
            bytes.extend_from_slice(content);
        }
        let checksum = Sha256::digest(&bytes);
        bytes.extend_from_slice(&checksum);
        bytes
    }

    pub fn from_bytes(bytes: &[u8], image: &str) -> Result<Self, SessionError> {
        let damaged = |why: &str| SessionError::Damaged(why.to_string());
        if bytes.len() < MAGIC.len() + 4 + 32 || !bytes.starts_with(MAGIC) {
            return Err(damaged("it is not a Capsule session"));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != checksum {
            return Err(damaged("its checksum does not match its content"));
        }
        let length = u32::from_le_bytes(body[MAGIC.len()..MAGIC.len() + 4].try_into().expect("4 bytes")) as usize;
        let start = MAGIC.len() + 4;
        let header: Header = body
            .get(start..start + length)
            .and_then(|h| serde_json::from_slice(h).ok())
            .ok_or_else(|| damaged("its header is unreadable"))?;
        if header.image != image {
            return Err(SessionError::Foreign { saved: header.image, image: image.to_string() });
        }
        let mut rest = &body[start + length..];
        let mut contents = BTreeMap::new();
        for hash in &header.contents {
            let hash: [u8; 32] =
                hex::decode(hash).ok().and_then(|h| h.try_into().ok()).ok_or_else(|| damaged("a bad hash"))?;
            if rest.len() < CHUNK {
                return Err(damaged("it is cut short"));
            }
            // The checksum above covers each chunk: hashing them again would only cost time.
            let (content, more) = rest.split_at(CHUNK);
            contents.insert(hash, content.to_vec());
            rest = more;
        }
        let mut chunks = BTreeMap::new();
        for (index, hash) in header.chunks {
            let hash: [u8; 32] =
                hex::decode(hash).ok().and_then(|h| h.try_into().ok()).ok_or_else(|| damaged("a bad hash"))?;
            if !contents.contains_key(&hash) || u64::from(index) * CHUNK as u64 >= header.memory_bytes {
                return Err(damaged("a chunk is missing or out of place"));
            }
            chunks.insert(index, hash);
        }
        Ok(Self { image: header.image, memory_bytes: header.memory_bytes, chunks, contents })
    }

    /// The id of a session file (as `to_bytes` wrote it) in a store of sessions: its
    /// checksum, the sha256 of all before it, so naming a file costs no more hashing.
    /// `from_bytes` checks that the content matches it.
    pub fn id_of(bytes: &[u8]) -> String {
        hex::encode(&bytes[bytes.len().saturating_sub(32)..])
    }

    /// Its bytes beyond what the image already has.
    pub fn stored_bytes(&self) -> u64 {
        (self.contents.len() * CHUNK) as u64
    }
}

/// A live session.
pub struct Session {
    loaded: Arc<Loaded>,
    task: Task,
    dirs: Vec<Preopen>,
    settings: RunSettings,
    scope: Scope,
    events: Arc<dyn EventSink>,
    call: CallId,
    sandbox: Sandbox,
    /// What the session is rebuilt from: its last save (`None`: the fresh image).
    checkpoint: Option<Arc<SessionState>>,
    /// The calls that ran to their end since the checkpoint (raising or not), run again to
    /// rebuild the session.
    since: Vec<Cell>,
}

impl Session {
    /// A new session of `task` of `loaded`, from `state` if given (else the fresh image).
    pub(crate) async fn open(
        loaded: Arc<Loaded>,
        task: Task,
        settings: RunSettings,
        events: Arc<dyn EventSink>,
        orchestrator: Arc<Orchestrator>,
        state: Option<Arc<SessionState>>,
    ) -> Result<Self, SessionError> {
        let dirs = preopens_of(&task, settings.project_root.as_deref(), orchestrator.reserved())
            .map_err(SessionError::Sandbox)?;
        let scope = orchestrator.root(None);
        let call = scope.call();
        let sandbox = new_sandbox(&loaded, &task, &dirs, &events, call)?;
        let mut session = Self {
            loaded,
            task,
            dirs,
            settings,
            scope,
            events,
            call,
            sandbox,
            checkpoint: state.clone(),
            since: Vec::new(),
        };
        if let Some(state) = state {
            session.load(&state).await?;
        }
        Ok(session)
    }

    async fn load(&mut self, state: &SessionState) -> Result<(), SessionError> {
        let sandbox = |e: wasmtime::Error| SessionError::Sandbox(e.to_string());
        self.sandbox.grow_memory_to(state.memory_bytes).await.map_err(sandbox)?;
        let memory = self.sandbox.memory().await.map_err(sandbox)?;
        for (index, hash) in &state.chunks {
            let start = *index as usize * CHUNK;
            memory[start..start + CHUNK].copy_from_slice(&state.contents[hash]);
        }
        Ok(())
    }

    /// The task each call runs.
    pub fn task(&self) -> &str {
        &self.task.name
    }

    /// Runs one call; the session keeps what it leaves.
    pub async fn call(&mut self, args: Vec<Value>, limits: CallLimits, cancel: &Cancel) -> Outcome {
        let mut cell = Cell { args, limits, succeeded: false };
        let outcome = self.call_now(&cell, cancel).await;
        cell.succeeded = outcome.success;
        if !self.sandbox.broken() {
            self.since.push(cell);
        } else if let Err(error) = self.rebuild().await {
            tracing::error!(%error, "a session could not be rebuilt");
        }
        outcome
    }

    async fn call_now(&mut self, cell: &Cell, cancel: &Cancel) -> Outcome {
        let started = std::time::Instant::now();
        let mut limits: Limits = limits_of(&self.task, self.settings.default_timeout);
        limits.fuel = cell.limits.fuel.unwrap_or(limits.fuel);
        limits.timeout = cell.limits.timeout.unwrap_or(limits.timeout);
        let request = InvokeRequest {
            task: self.task.name.clone(),
            args: cell.args.clone(),
            kwargs: serde_json::Map::new(),
            env: environment_of(&self.task, &self.settings.environment),
            attempt: 1,
        };
        let hosts = self.scope.for_attempt(&self.task, started + limits.timeout);
        let Attempt { result, fuel_consumed, peak_memory_bytes, http_calls, duration: _, stdout, stderr } =
            self.sandbox.call(&request, &limits, Some(hosts), cancel).await;
        let (success, result, error) = match result {
            Ok(value) => (true, value, None),
            Err(error) => (false, Value::Null, Some(error)),
        };
        Outcome {
            success,
            result,
            execution: Execution {
                task: self.task.name.clone(),
                duration_ms: duration_ms(started.elapsed()),
                attempts: 1,
                fuel_consumed,
                peak_memory_bytes,
                attempt_errors: error.iter().cloned().collect(),
                host_requests: http_calls,
            },
            error,
            output: Output { stdout, stderr },
        }
    }

    /// A new sandbox from the checkpoint, with the calls since run again (quietly). What the
    /// session wrote stays counted against its file quota, replayed calls or not.
    async fn rebuild(&mut self) -> Result<(), SessionError> {
        let totals = self.sandbox.file_totals();
        self.sandbox = new_sandbox(&self.loaded, &self.task, &self.dirs, &self.events, self.call)?;
        self.sandbox.mute(true);
        if let Some(state) = self.checkpoint.clone() {
            self.load(&state).await?;
        }
        let cells = std::mem::take(&mut self.since);
        for (number, cell) in cells.iter().enumerate() {
            let outcome = self.call_now(cell, &Cancel::default()).await;
            if cell.succeeded && !outcome.success {
                let message = outcome.error.map_or_else(String::new, |e| e.message);
                return Err(SessionError::Replay { call: number + 1, message });
            }
        }
        self.since = cells;
        self.sandbox.set_file_totals(totals);
        self.sandbox.mute(false);
        Ok(())
    }

    /// Its memory as it is now, as chunks that differ from the image; it becomes the
    /// checkpoint a failed call rebuilds from.
    pub async fn save(&mut self) -> Result<Arc<SessionState>, SessionError> {
        let base = self.loaded.initial_memory().await.map_err(SessionError::Sandbox)?;
        let memory = self.sandbox.memory().await.map_err(|e| SessionError::Sandbox(e.to_string()))?;
        let mut state = SessionState {
            image: self.loaded.manifest().artifact.sha256.clone(),
            memory_bytes: memory.len() as u64,
            chunks: BTreeMap::new(),
            contents: BTreeMap::new(),
        };
        for (index, chunk) in memory.chunks(CHUNK).enumerate() {
            let start = index * CHUNK;
            let unchanged = base.get(start..start + chunk.len()).is_some_and(|b| b == chunk);
            if unchanged {
                continue;
            }
            let mut content = chunk.to_vec();
            content.resize(CHUNK, 0);
            let hash: [u8; 32] = Sha256::digest(&content).into();
            state.chunks.insert(index as u32, hash);
            state.contents.entry(hash).or_insert(content);
        }
        let state = Arc::new(state);
        self.checkpoint = Some(state.clone());
        self.since.clear();
        Ok(state)
    }

    /// A second, independent session that starts from this one's state now.
    pub async fn fork(&mut self) -> Result<Session, SessionError> {
        let state = self.save().await?;
        let orchestrator = self.scope.orchestrator().clone();
        Session::open(
            self.loaded.clone(),
            self.task.clone(),
            self.settings.clone(),
            self.events.clone(),
            orchestrator,
            Some(state),
        )
        .await
    }
}

fn outputs(events: &Arc<dyn EventSink>, call: CallId) -> (TeeOutput, TeeOutput) {
    (
        TeeOutput::reporting(Stream::Stdout, events.clone(), call),
        TeeOutput::reporting(Stream::Stderr, events.clone(), call),
    )
}

fn new_sandbox(
    loaded: &Loaded,
    task: &Task,
    dirs: &[Preopen],
    events: &Arc<dyn EventSink>,
    call: CallId,
) -> Result<Sandbox, SessionError> {
    let (stdout, stderr) = outputs(events, call);
    let refuse = Box::new(crate::host::RefuseHostCalls("a session's host calls are given with each call"));
    loaded.program().sandbox(task.options.ram.bytes(), dirs, refuse, stdout, stderr).map_err(SessionError::Sandbox)
}
