//! The journal: every run, task call and HTTP call of a workflow, in SQLite (WAL mode),
//! written and committed before a result is handed back to the caller. Resuming a run
//! replays what finished: a call is identified by its position in its caller's sequence of
//! calls, and must have the same name and arguments hash as before, or the workflow has
//! diverged. Request headers and environment values are never stored.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::state::{CallStatus, RunState};

/// The journal's format; a journal written in another is refused rather than misread.
const FORMAT_VERSION: i64 = 4;

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal `{path}`: {source}")]
    Database { path: String, source: rusqlite::Error },
    #[error("cannot create the journal's folder `{path}`: {source}")]
    Folder { path: String, source: std::io::Error },
    #[error("workflow diverged at step {step} of call #{parent}: the journal has {journaled}, this run makes {now}")]
    Diverged { parent: i64, step: u32, journaled: String, now: String },
    #[error("no run `{0}` in the journal")]
    NoSuchRun(String),
    #[error("journal `{path}` is in format {found}, this Capsule reads format {FORMAT_VERSION}")]
    Format { path: String, found: i64 },
    #[error("no journal at `{0}`")]
    Missing(String),
    #[error(
        "the journal's record of step {step} of call #{parent} was changed outside Capsule (its checksum does not match)"
    )]
    Corrupt { parent: i64, step: u32 },
}

impl manifest_schema::Explain for JournalError {
    fn category(&self) -> manifest_schema::Category {
        use manifest_schema::Category;
        match self {
            Self::Database { .. } | Self::Folder { .. } => Category::Internal,
            Self::NoSuchRun(_) | Self::Missing(_) => Category::NotFound,
            Self::Diverged { .. } | Self::Format { .. } | Self::Corrupt { .. } => Category::Usage,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::Diverged { .. } => {
                Some("the code changed since the run started; start a new run instead of resuming".into())
            }
            Self::NoSuchRun(_) => Some("`capsule runs` lists the runs of this project's journal".into()),
            Self::Format { path, .. } => {
                Some(format!("move `{path}` aside (it holds runs of another Capsule version) and run again"))
            }
            Self::Missing(_) => Some(
                "run this in the project folder (where `.capsule/` is), or give the journal with <<journal>>".into(),
            ),
            Self::Corrupt { .. } => {
                Some("a result that cannot be trusted is not replayed; start a new run instead of resuming".into())
            }
            Self::Database { .. } | Self::Folder { .. } => None,
        }
    }
}

/// Run and call states are stored under their names.
macro_rules! stored_by_name {
    ($type:ty) => {
        impl rusqlite::types::FromSql for $type {
            fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                value.as_str()?.parse().map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

stored_by_name!(RunState);
stored_by_name!(CallStatus);

/// A run as stored.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub id: String,
    pub entry: String,
    pub artifact: String,
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: serde_json::Map<String, Value>,
    pub status: RunState,
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

/// A call (a task or an HTTP request) as stored.
#[derive(Debug, Clone, Serialize)]
pub struct CallRecord {
    pub id: i64,
    /// The calling task's call id; 0 for the run's top-level task.
    pub parent: i64,
    pub seq: u32,
    pub kind: String,
    pub name: String,
    pub detail: String,
    pub status: CallStatus,
    pub attempts: Option<u32>,
    pub fuel: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    pub duration_ms: Option<u64>,
    pub error: Option<Value>,
    /// What the call printed, for `capsule logs`.
    pub stdout: String,
    pub stderr: String,
    pub started_at_ms: i64,
}

/// What `enter` found at a call's position.
#[derive(Debug, PartialEq)]
pub enum Entered {
    /// Finished before: hand back this result without running anything.
    Replay { id: i64, result: Value },
    /// Run it for real, then `complete` this call.
    Run { id: i64 },
}

/// One attempt of a task call, as it ended.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub error: Option<Value>,
    pub fuel: u64,
    pub peak_memory_bytes: u64,
    pub duration_ms: u64,
    pub finished_at_ms: i64,
}

impl AttemptRecord {
    pub fn now(error: Option<Value>, fuel: u64, peak_memory_bytes: u64, duration_ms: u64) -> Self {
        Self { error, fuel, peak_memory_bytes, duration_ms, finished_at_ms: now_ms() }
    }
}

/// How a call ended, for `complete`.
pub struct Completion<'a> {
    pub ok: bool,
    pub result: &'a Value,
    pub error: Option<&'a Value>,
    /// A task call's attempts, in order; none for an HTTP call.
    pub attempts: Option<&'a [AttemptRecord]>,
    pub fuel: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    pub duration_ms: u64,
    /// What a task call printed (its last attempt); none for HTTP calls.
    pub output: Option<(&'a str, &'a str)>,
    /// For a run's top-level call: the run, and how it ended.
    pub run_ended: Option<(&'a str, RunState)>,
}

pub struct Journal {
    path: PathBuf,
    connection: Mutex<Connection>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// What a replay trusts of a finished call, and its checksum, stored with the row: a row
/// changed outside Capsule (by hand, by another program, by a damaged disk) is not replayed.
struct CallRow<'a> {
    run: &'a str,
    parent: i64,
    seq: u32,
    kind: &'a str,
    name: &'a str,
    args_hash: &'a str,
    status: &'a str,
    result: &'a str,
}

impl CallRow<'_> {
    fn checksum(&self) -> String {
        let mut hasher = Sha256::new();
        let (parent, seq) = (self.parent.to_string(), self.seq.to_string());
        for field in [self.run, &parent, &seq, self.kind, self.name, self.args_hash, self.status, self.result] {
            hasher.update((field.len() as u64).to_le_bytes());
            hasher.update(field);
        }
        hex::encode(hasher.finalize())
    }
}

/// Format 3 to 4: every finished call gets the checksum of its row as it stands, so runs
/// recorded before checksums existed can still be resumed.
fn add_checksums(c: &Connection) -> rusqlite::Result<()> {
    execute(c, "ALTER TABLE calls ADD COLUMN checksum TEXT", [])?;
    let checksums: Vec<(i64, String)> = {
        let mut statement = c.prepare(
            "SELECT id, run_id, parent, seq, kind, name, args_hash, status, coalesce(result, '') FROM calls WHERE status = 'ok'",
        )?;
        statement
            .query_map([], |r| {
                let text = |i: usize| r.get::<_, String>(i);
                let (run, kind, name, args_hash, status, result) =
                    (text(1)?, text(4)?, text(5)?, text(6)?, text(7)?, text(8)?);
                let row = CallRow {
                    run: &run,
                    parent: r.get(2)?,
                    seq: r.get(3)?,
                    kind: &kind,
                    name: &name,
                    args_hash: &args_hash,
                    status: &status,
                    result: &result,
                };
                Ok((r.get(0)?, row.checksum()))
            })?
            .collect::<rusqlite::Result<_>>()?
    };
    for (id, checksum) in checksums {
        execute(c, "UPDATE calls SET checksum = ?2 WHERE id = ?1", params![id, checksum])?;
    }
    c.pragma_update(None, "user_version", FORMAT_VERSION)
}

/// The start of an arguments hash, as messages show it; a damaged one whole.
fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// A new run's id: its start time in milliseconds and 20 bits, in 16 hex digits (ids sort by
/// start time). The 20 bits start at a random value (two processes sharing a journal rarely
/// meet) and count up within a process, so its ids never repeat however many runs start in one
/// millisecond (a busy daemon starts several).
pub fn new_run_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let millis = now_ms() as u64;
    let candidate = (millis << 20) | (RandomState::new().hash_one(millis) & 0xfffff);
    let next = |last: u64| candidate.max(last + 1);
    let previous = LAST.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(next(last))).unwrap_or_default();
    format!("{:016x}", next(previous))
}

/// What identifies a call's arguments across runs (the journal's and the cluster's records).
pub fn args_hash(args: &[Value], kwargs: &serde_json::Map<String, Value>) -> String {
    hash_json(&serde_json::json!([args, kwargs]))
}

/// sha256 of a canonical JSON value (object keys sorted).
pub fn hash_json(value: &Value) -> String {
    hex::encode(Sha256::digest(value.to_string()))
}

impl Journal {
    /// The journal's database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn open(path: &Path) -> Result<Self, JournalError> {
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder)
                .map_err(|source| JournalError::Folder { path: folder.display().to_string(), source })?;
        }
        let journal =
            Self { path: path.to_path_buf(), connection: Mutex::new(Connection::open(path).map_err(|e| db(path, e))?) };
        let found: i64 = journal.with(|c| c.query_row("PRAGMA user_version", [], |row| row.get(0)))?;
        let fresh: bool = journal.with(|c| {
            query_row(c, "SELECT count(*) = 0 FROM sqlite_master WHERE type = 'table'", [], |row| row.get(0))
        })?;
        if !fresh && found == FORMAT_VERSION - 1 {
            journal.atomically(add_checksums)?;
        } else if !fresh && found != FORMAT_VERSION {
            return Err(JournalError::Format { path: path.display().to_string(), found });
        }
        journal.with(|c| {
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.pragma_update(None, "synchronous", "NORMAL")?;
            c.pragma_update(None, "user_version", FORMAT_VERSION)?;
            c.execute_batch(
                "CREATE TABLE IF NOT EXISTS runs (
                    id TEXT PRIMARY KEY, entry TEXT NOT NULL, artifact TEXT NOT NULL, task TEXT NOT NULL,
                    args TEXT NOT NULL, kwargs TEXT NOT NULL, status TEXT NOT NULL, started_at INTEGER NOT NULL,
                    finished_at INTEGER);
                 CREATE TABLE IF NOT EXISTS calls (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL REFERENCES runs(id),
                    parent INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
                    detail TEXT NOT NULL, args_hash TEXT NOT NULL, status TEXT NOT NULL, result TEXT, error TEXT,
                    attempts INTEGER, fuel INTEGER, peak_memory INTEGER, duration_ms INTEGER,
                    stdout TEXT, stderr TEXT, started_at INTEGER NOT NULL, checksum TEXT,
                    UNIQUE (run_id, parent, seq));
                 CREATE TABLE IF NOT EXISTS attempts (
                    call_id INTEGER NOT NULL REFERENCES calls(id), attempt INTEGER NOT NULL, status TEXT NOT NULL,
                    error TEXT, fuel INTEGER NOT NULL, peak_memory INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
                    finished_at INTEGER NOT NULL);",
            )
        })?;
        Ok(journal)
    }

    /// The journal at `path`, which must exist (for reading and resuming).
    pub fn open_existing(path: &Path) -> Result<Self, JournalError> {
        if !path.is_file() {
            return Err(JournalError::Missing(path.display().to_string()));
        }
        Self::open(path)
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, JournalError> {
        let connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        f(&connection).map_err(|e| db(&self.path, e))
    }

    /// Like `with`, in one transaction: all of `f` is committed, or none of it.
    fn atomically<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, JournalError> {
        let mut connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        let work = |connection: &mut Connection| {
            let transaction = connection.transaction()?;
            let value = f(&transaction)?;
            transaction.commit()?;
            Ok(value)
        };
        work(&mut connection).map_err(|e| db(&self.path, e))
    }

    /// Enters a new run and its top-level task call (to run): the run's id and the call's.
    pub fn start_run(
        &self,
        entry: &str,
        artifact: &str,
        task: &str,
        args: &[Value],
        kwargs: &serde_json::Map<String, Value>,
    ) -> Result<(String, i64), JournalError> {
        let id = new_run_id();
        let args_hash = args_hash(args, kwargs);
        let (args, kwargs) = (Value::from(args).to_string(), Value::from(kwargs.clone()).to_string());
        let call = self.atomically(|c| {
            execute(
                c,
                "INSERT INTO runs (id, entry, artifact, task, args, kwargs, status, started_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7)",
                params![id, entry, artifact, task, args, kwargs, now_ms()],
            )?;
            insert_call(c, &id, 0, 0, "task", task, "", &args_hash)
        })?;
        Ok((id, call))
    }

    /// Records how a run ended (see [`end_run`]).
    pub fn finish_run(&self, id: &str, status: RunState) -> Result<(), JournalError> {
        self.atomically(|c| end_run(c, id, status))
    }

    /// Marks a run as running again (it is being resumed).
    pub fn reopen_run(&self, id: &str) -> Result<(), JournalError> {
        self.with(|c| execute(c, "UPDATE runs SET status = 'running', finished_at = NULL WHERE id = ?1", params![id]))
            .map(drop)
    }

    pub fn run(&self, id: &str) -> Result<RunRecord, JournalError> {
        self.with(|c| {
            query_row(c, "SELECT id, entry, artifact, task, args, kwargs, status, started_at, finished_at FROM runs WHERE id = ?1",
                [id],
                run_record,
            )
            .optional()
        })?
        .ok_or_else(|| JournalError::NoSuchRun(id.to_string()))
    }

    pub fn runs(&self, limit: u32) -> Result<Vec<RunRecord>, JournalError> {
        self.with(|c| {
            let mut statement = c.prepare_cached(
                "SELECT id, entry, artifact, task, args, kwargs, status, started_at, finished_at FROM runs ORDER BY started_at DESC, id DESC LIMIT ?1",
            )?;
            statement.query_map([limit], run_record)?.collect()
        })
    }

    pub fn calls(&self, run: &str) -> Result<Vec<CallRecord>, JournalError> {
        self.with(|c| {
            let mut statement = c.prepare_cached(
                "SELECT id, parent, seq, kind, name, detail, status, attempts, fuel, peak_memory, duration_ms, error,
                        stdout, stderr, started_at
                 FROM calls WHERE run_id = ?1 ORDER BY parent, seq",
            )?;
            statement
                .query_map([run], |row| {
                    Ok(CallRecord {
                        id: row.get(0)?,
                        parent: row.get(1)?,
                        seq: row.get(2)?,
                        kind: row.get(3)?,
                        name: row.get(4)?,
                        detail: row.get(5)?,
                        status: row.get(6)?,
                        attempts: row.get(7)?,
                        fuel: row.get::<_, Option<i64>>(8)?.map(|v| v as u64),
                        peak_memory_bytes: row.get::<_, Option<i64>>(9)?.map(|v| v as u64),
                        duration_ms: row.get::<_, Option<i64>>(10)?.map(|v| v as u64),
                        error: row.get::<_, Option<String>>(11)?.and_then(|e| serde_json::from_str(&e).ok()),
                        stdout: row.get::<_, Option<String>>(12)?.unwrap_or_default(),
                        stderr: row.get::<_, Option<String>>(13)?.unwrap_or_default(),
                        started_at_ms: row.get(14)?,
                    })
                })?
                .collect()
        })
    }

    /// The call at `(run, parent, seq)`: replayed if it finished, run (again) otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn enter(
        &self,
        run: &str,
        parent: i64,
        seq: u32,
        kind: &str,
        name: &str,
        detail: &str,
        args_hash: &str,
    ) -> Result<Entered, JournalError> {
        let existing = self.with(|c| {
            query_row(c, "SELECT id, kind, name, args_hash, status, result, checksum FROM calls WHERE run_id = ?1 AND parent = ?2 AND seq = ?3",
                params![run, parent, seq],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, Option<String>>(5)?,
                        row.get::<_, Option<String>>(6)?,
                    ))
                },
            )
            .optional()
        })?;
        match existing {
            Some((id, old_kind, old_name, old_hash, status, result, checksum)) => {
                if old_kind != kind || old_name != name || old_hash != args_hash {
                    return Err(JournalError::Diverged {
                        parent,
                        step: seq,
                        journaled: format!("{old_kind} `{old_name}` (arguments {})", short_hash(&old_hash)),
                        now: format!("{kind} `{name}` (arguments {})", short_hash(args_hash)),
                    });
                }
                if status == "ok" {
                    let result = result.unwrap_or_default();
                    let row = CallRow { run, parent, seq, kind, name, args_hash, status: &status, result: &result };
                    let parsed = serde_json::from_str(&result).ok();
                    return match parsed.filter(|_| checksum.as_deref() == Some(row.checksum().as_str())) {
                        Some(result) => Ok(Entered::Replay { id, result }),
                        None => Err(JournalError::Corrupt { parent, step: seq }),
                    };
                }
                self.with(|c| {
                    execute(
                        c,
                        "UPDATE calls SET status = 'running', started_at = ?2 WHERE id = ?1",
                        params![id, now_ms()],
                    )
                })?;
                Ok(Entered::Run { id })
            }
            None => {
                let id = self.with(|c| insert_call(c, run, parent, seq, kind, name, detail, args_hash))?;
                Ok(Entered::Run { id })
            }
        }
    }

    /// Records how a call ended, with its attempts, and for a run's top-level call how the
    /// run ended: one transaction, committed before the result goes back to the caller.
    pub fn complete(&self, id: i64, how: &Completion<'_>) -> Result<(), JournalError> {
        let status = if how.ok { "ok" } else { "failed" };
        let result = how.result.to_string();
        self.atomically(|c| {
            let (run, parent, seq, kind, name, args_hash) = query_row(
                c,
                "SELECT run_id, parent, seq, kind, name, args_hash FROM calls WHERE id = ?1",
                params![id],
                |row| Ok((row.get::<_, String>(0)?, row.get(1)?, row.get(2)?, row.get::<_, String>(3)?, row.get::<_, String>(4)?, row.get::<_, String>(5)?)),
            )?;
            let row = CallRow { run: &run, parent, seq, kind: &kind, name: &name, args_hash: &args_hash, status, result: &result };
            execute(
                c,
                "UPDATE calls SET status = ?2, result = ?3, error = ?4, attempts = ?5, fuel = ?6, peak_memory = ?7, duration_ms = ?8,
                 stdout = ?9, stderr = ?10, checksum = ?11 WHERE id = ?1",
                params![
                    id,
                    status,
                    result,
                    how.error.map(Value::to_string),
                    how.attempts.map(|a| a.len() as u32),
                    how.fuel.map(|v| v as i64),
                    how.peak_memory_bytes.map(|v| v as i64),
                    how.duration_ms as i64,
                    how.output.map(|o| o.0),
                    how.output.map(|o| o.1),
                    row.checksum(),
                ],
            )?;
            for (number, attempt) in how.attempts.unwrap_or_default().iter().enumerate() {
                execute(
                    c,
                    "INSERT INTO attempts (call_id, attempt, status, error, fuel, peak_memory, duration_ms, finished_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        id,
                        number as u32 + 1,
                        if attempt.error.is_none() { "ok" } else { "failed" },
                        attempt.error.as_ref().map(Value::to_string),
                        attempt.fuel as i64,
                        attempt.peak_memory_bytes as i64,
                        attempt.duration_ms as i64,
                        attempt.finished_at_ms,
                    ],
                )?;
            }
            if let Some((run, status)) = how.run_ended {
                end_run(c, run, status)?;
            }
            Ok(())
        })
    }
}

/// A task's place in a journaled run: the run and the call row of this task execution.
#[derive(Clone)]
pub struct Position {
    pub journal: Arc<Journal>,
    pub run: Arc<str>,
    pub call: i64,
}

impl Position {
    /// Enters the call at `seq` below this task.
    pub fn enter(
        &self,
        seq: u32,
        kind: &str,
        name: &str,
        detail: &str,
        args_hash: &str,
    ) -> Result<Entered, JournalError> {
        self.journal.enter(&self.run, self.call, seq, kind, name, detail, args_hash)
    }

    /// The same run, at the call `call` (a child of this one).
    pub fn at(&self, call: i64) -> Self {
        Self { call, ..self.clone() }
    }
}

fn db(path: &Path, source: rusqlite::Error) -> JournalError {
    JournalError::Database { path: path.display().to_string(), source }
}

fn run_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: row.get(0)?,
        entry: row.get(1)?,
        artifact: row.get(2)?,
        task: row.get(3)?,
        args: serde_json::from_str(&row.get::<_, String>(4)?).unwrap_or_default(),
        kwargs: serde_json::from_str(&row.get::<_, String>(5)?).unwrap_or_default(),
        status: row.get(6)?,
        started_at_ms: row.get(7)?,
        finished_at_ms: row.get(8)?,
    })
}

/// Records how a run ended. Calls still running then were abandoned with it (spawned
/// sub-tasks nobody waited for, or everything of a stopped run): they are marked so.
fn end_run(c: &Connection, id: &str, status: RunState) -> rusqlite::Result<()> {
    execute(c, "UPDATE runs SET status = ?2, finished_at = ?3 WHERE id = ?1", params![id, status.as_str(), now_ms()])?;
    execute(c, "UPDATE calls SET status = 'aborted' WHERE run_id = ?1 AND status = 'running'", params![id])?;
    Ok(())
}

/// Enters a call as running; its row id.
#[allow(clippy::too_many_arguments)]
fn insert_call(
    c: &Connection,
    run: &str,
    parent: i64,
    seq: u32,
    kind: &str,
    name: &str,
    detail: &str,
    args_hash: &str,
) -> rusqlite::Result<i64> {
    execute(
        c,
        "INSERT INTO calls (run_id, parent, seq, kind, name, detail, args_hash, status, started_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'running', ?8)",
        params![run, parent, seq, kind, name, detail, args_hash, now_ms()],
    )?;
    Ok(c.last_insert_rowid())
}

/// `Connection::execute` through the statement cache: the SQL is compiled once per connection.
fn execute(c: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(params)
}

/// `Connection::query_row` through the statement cache.
fn query_row<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(params, f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn run_ids_never_repeat_and_sort_by_start() {
        let threads: Vec<_> =
            (0..4).map(|_| std::thread::spawn(|| (0..20_000).map(|_| new_run_id()).collect::<Vec<_>>())).collect();
        let mut seen = std::collections::HashSet::new();
        for thread in threads {
            let ids = thread.join().unwrap();
            assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "one thread's ids increase");
            for id in ids {
                assert_eq!(id.len(), 16, "{id}");
                assert!(seen.insert(id.clone()), "{id} was given twice");
            }
        }
    }

    /// A call that succeeded with `result`, with nothing else to record.
    fn succeeded(result: &Value) -> Completion<'_> {
        Completion {
            ok: true,
            result,
            error: None,
            attempts: None,
            fuel: None,
            peak_memory_bytes: None,
            duration_ms: 1,
            output: None,
            run_ended: None,
        }
    }

    /// A journal at `path` with a run whose step 1 (arguments `[1]`) finished with `result`:
    /// the journal, the run, its top-level call, the step's arguments hash and its call.
    fn one_finished_step(path: &Path, result: &Value) -> (Journal, String, i64, String, i64) {
        let journal = Journal::open(path).unwrap();
        let (run, top) = journal.start_run("main.py", "abc", "main", &[], &Default::default()).unwrap();
        let identity = hash_json(&json!([1]));
        let Entered::Run { id } = journal.enter(&run, top, 1, "task", "step", "", &identity).unwrap() else { panic!() };
        journal.complete(id, &succeeded(result)).unwrap();
        (journal, run, top, identity, id)
    }

    /// Fuzz target: a journal row damaged in any column is replayed only if intact, and
    /// otherwise refused with an error, never a panic.
    #[test]
    fn fuzzed_journal_rows_are_refused_or_replayed_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        let (journal, run, top, identity, id) = one_finished_step(&path, &json!({"answer": [42, "text"]}));
        let raw = rusqlite::Connection::open(&path).unwrap();
        let columns = ["result", "args_hash", "kind", "name", "status", "checksum"];
        let original: Vec<String> = columns
            .iter()
            .map(|c| raw.query_row(&format!("SELECT {c} FROM calls WHERE id = ?1"), [id], |row| row.get(0)).unwrap())
            .collect();
        // A panic fails the test; no state is used after one.
        let (journal, raw) = (std::panic::AssertUnwindSafe(&journal), std::panic::AssertUnwindSafe(&raw));
        bolero::check!().with_iterations(fixtures::fuzz_iterations()).for_each(|noise: &[u8]| {
            let which = usize::from(noise.first().copied().unwrap_or(0)) % columns.len();
            let damaged = fixtures::mutate(&original[which], noise);
            let set = format!("UPDATE calls SET {} = ?2 WHERE id = ?1", columns[which]);
            raw.execute(&set, rusqlite::params![id, damaged]).unwrap();
            match journal.enter(&run, top, 1, "task", "step", "", &identity) {
                Ok(Entered::Replay { result, .. }) => {
                    assert_eq!(result, json!({"answer": [42, "text"]}), "only an intact row replays")
                }
                Ok(Entered::Run { .. }) | Err(_) => {}
            }
            raw.execute(&set, rusqlite::params![id, original[which]]).unwrap();
            raw.execute("UPDATE calls SET status = 'ok' WHERE id = ?1", [id]).unwrap();
        });
    }

    #[test]
    fn a_journal_of_the_previous_format_is_upgraded_and_its_runs_still_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        let (journal, run, top, identity, id) = one_finished_step(&path, &json!(7));
        drop(journal);
        // As format 3 left it: no checksum column.
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute_batch("ALTER TABLE calls DROP COLUMN checksum; PRAGMA user_version = 3;").unwrap();
        drop(raw);
        let journal = Journal::open(&path).unwrap();
        assert_eq!(
            journal.enter(&run, top, 1, "task", "step", "", &identity).unwrap(),
            Entered::Replay { id, result: json!(7) }
        );
    }

    /// Found by the fuzz target: a damaged arguments hash cut inside a character.
    #[test]
    fn a_damaged_arguments_hash_is_reported_as_divergence() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("journal.db")).unwrap();
        let (run, top) = journal.start_run("main.py", "abc", "main", &[], &Default::default()).unwrap();
        let damaged = "080a90a9ed4\u{1F600}28559ef602668b4c0f114f1a11c3f6b02a435f0bdc154578e4d7f22d7f22";
        journal.enter(&run, top, 1, "task", "step", "", damaged).unwrap();
        let error = journal.enter(&run, top, 1, "task", "step", "", &hash_json(&json!([1]))).unwrap_err();
        assert!(matches!(error, JournalError::Diverged { .. }), "{error}");
    }

    #[test]
    fn replays_finished_calls_and_detects_divergence() {
        let dir = std::env::temp_dir().join(format!("capsule-journal-{}", std::process::id()));
        let journal = Journal::open(&dir.join("journal.db")).unwrap();
        let (run, top) = journal.start_run("main.py", "abc", "main", &[], &Default::default()).unwrap();
        assert_eq!(
            journal.enter(&run, 0, 0, "task", "main", "", &hash_json(&json!([[], {}]))).unwrap(),
            Entered::Run { id: top },
            "the top-level call is entered with the run"
        );
        let step = journal.enter(&run, top, 1, "task", "step", "", &hash_json(&json!([1]))).unwrap();
        let Entered::Run { id } = step else { panic!() };
        let attempts = [AttemptRecord::now(None, 7, 0, 3)];
        let done = Completion {
            ok: true,
            result: &json!(42),
            error: None,
            attempts: Some(&attempts),
            fuel: Some(7),
            peak_memory_bytes: None,
            duration_ms: 3,
            output: Some(("printed\n", "")),
            run_ended: None,
        };
        journal.complete(id, &done).unwrap();

        // A second pass over the same positions replays the finished call.
        assert_eq!(
            journal.enter(&run, top, 1, "task", "step", "", &hash_json(&json!([1]))).unwrap(),
            Entered::Replay { id, result: json!(42) }
        );
        // Different arguments at the same position: diverged.
        let error = journal.enter(&run, top, 1, "task", "step", "", &hash_json(&json!([2]))).unwrap_err();
        assert!(error.to_string().contains("workflow diverged at step 1"), "{error}");
        let calls = journal.calls(&run).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].stdout, "printed\n");
        // A result changed outside Capsule is refused, not replayed.
        let path = dir.join("journal.db");
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute("UPDATE calls SET result = '43' WHERE id = ?1", [id]).unwrap();
        let error = journal.enter(&run, top, 1, "task", "step", "", &hash_json(&json!([1]))).unwrap_err();
        assert!(matches!(error, JournalError::Corrupt { parent, step: 1 } if parent == top), "{error}");
        raw.execute("UPDATE calls SET result = 'not json' WHERE id = ?1", [id]).unwrap();
        assert!(journal.enter(&run, top, 1, "task", "step", "", &hash_json(&json!([1]))).is_err());
        journal.finish_run(&run, RunState::Ok).unwrap();
        assert_eq!(journal.runs(10).unwrap()[0].status, RunState::Ok);
        assert!(matches!(journal.run("nope"), Err(JournalError::NoSuchRun(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
