//! The daemon's own record of the runs it took: where each one's journal and manifest are,
//! what was asked, and how far it got. After a crash or a kill, the next daemon finds here
//! the runs that never finished and resumes them from their journals.

use std::path::Path;
use std::sync::Mutex;

use capsule_exec::RunState;
use rusqlite::{Connection, params};

use crate::api::SubmitRun;

/// A run as registered.
#[derive(Debug, Clone)]
pub struct Registered {
    pub id: String,
    pub request: SubmitRun,
    pub restarted_from: Option<String>,
}

pub struct Registry {
    connection: Mutex<Connection>,
}

#[derive(Debug, thiserror::Error)]
#[error("the daemon's registry `{path}`: {source}")]
pub struct RegistryError {
    path: String,
    source: rusqlite::Error,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Registry {
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let error = |source| RegistryError { path: path.display().to_string(), source };
        let connection = Connection::open(path).map_err(error)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
                 CREATE TABLE IF NOT EXISTS runs (
                    id TEXT PRIMARY KEY, request TEXT NOT NULL, status TEXT NOT NULL,
                    restarted_from TEXT, submitted_at INTEGER NOT NULL, finished_at INTEGER);",
            )
            .map_err(error)?;
        // Runs known to have ended a month ago are of no more use.
        let month_ago = now_ms() - 30 * 24 * 3600 * 1000;
        execute(&connection, "DELETE FROM runs WHERE finished_at < ?1", params![month_ago]).map_err(error)?;
        Ok(Self { connection: Mutex::new(connection) })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, rusqlite::Error> {
        f(&self.connection.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn add(&self, run: &Registered) -> Result<(), rusqlite::Error> {
        let request = serde_json::to_string(&run.request).expect("requests serialise");
        self.with(|c| {
            execute(
                c,
                "INSERT OR REPLACE INTO runs (id, request, status, restarted_from, submitted_at) VALUES (?1, ?2, 'queued', ?3, ?4)",
                params![run.id, request, run.restarted_from, now_ms()],
            )
        })
        .map(drop)
    }

    pub fn set_status(&self, id: &str, status: RunState, finished: bool) -> Result<(), rusqlite::Error> {
        let finished_at = finished.then(now_ms);
        self.with(|c| {
            let status = status.as_str();
            execute(c, "UPDATE runs SET status = ?2, finished_at = ?3 WHERE id = ?1", params![id, status, finished_at])
        })
        .map(drop)
    }

    /// Runs that were queued or running when the last daemon stopped.
    pub fn unfinished(&self) -> Result<Vec<Registered>, rusqlite::Error> {
        self.with(|c| {
            let mut statement = c.prepare_cached(
                "SELECT id, request, restarted_from FROM runs
                 WHERE status IN ('queued', 'running', 'interrupted') ORDER BY submitted_at",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, Option<String>>(2)?))
            })?;
            let mut runs = Vec::new();
            for row in rows {
                let (id, request, restarted_from) = row?;
                match serde_json::from_str(&request) {
                    Ok(request) => runs.push(Registered { id, request, restarted_from }),
                    Err(error) => tracing::warn!(%id, %error, "skipping an unreadable registered run"),
                }
            }
            Ok(runs)
        })
    }

    /// A registered run by id (for restarting runs this daemon no longer holds in memory).
    pub fn get(&self, id: &str) -> Result<Option<Registered>, rusqlite::Error> {
        use rusqlite::OptionalExtension;
        let row = self.with(|c| {
            query_row(c, "SELECT request, restarted_from FROM runs WHERE id = ?1", [id], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?))
            })
            .optional()
        })?;
        Ok(row.and_then(|(request, restarted_from)| {
            serde_json::from_str(&request).ok().map(|request| Registered {
                id: id.to_string(),
                request,
                restarted_from,
            })
        }))
    }
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

    #[test]
    fn unfinished_runs_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.db");
        let registry = Registry::open(&path).unwrap();
        let request =
            SubmitRun { manifest: "/p/manifest.toml".into(), task: Some("main".into()), ..SubmitRun::default() };
        for id in ["a", "b", "c"] {
            registry.add(&Registered { id: id.into(), request: request.clone(), restarted_from: None }).unwrap();
        }
        registry.set_status("a", RunState::Running, false).unwrap();
        registry.set_status("b", RunState::Ok, true).unwrap();
        drop(registry);
        let registry = Registry::open(&path).unwrap();
        let ids: Vec<String> = registry.unfinished().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(registry.get("b").unwrap().unwrap().request, request);
    }
}
