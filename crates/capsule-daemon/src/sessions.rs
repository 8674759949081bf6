//! The daemon's sessions: sandboxes kept from call to call for clients (the Python SDK's
//! `Session`, the MCP server), each with a workspace folder, closed when idle; and the store
//! of saved sessions, each file named by its sha256.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex as SyncMutex;
use std::time::{Duration, Instant};

use capsule_exec::{CallLimits, Cancel, Engine, NoEvents, Outcome, RunSettings, Session, SessionState};
use manifest_schema::{Category, FileGrant, FileMode, TaskOptions};
use tokio::sync::Mutex;

use crate::Workers;
use crate::api::{ApiError, OpenSession, Saved, SessionCall, SessionView};

/// Sessions one daemon holds at once (each holds a sandbox).
const MAX_SESSIONS: usize = 64;
const DEFAULT_IDLE: Duration = Duration::from_secs(600);

struct Held {
    session: Mutex<Session>,
    workspace: PathBuf,
    task: String,
    idle: Duration,
    last_used: SyncMutex<Instant>,
    calls: SyncMutex<u64>,
}

pub struct Sessions {
    engine: Arc<Engine>,
    workers: Workers,
    /// Saved sessions (`<sha256>.session`).
    saved: PathBuf,
    /// Each held session's workspace (`<id>/`).
    workspaces: PathBuf,
    held: SyncMutex<HashMap<String, Arc<Held>>>,
}

fn random_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    let (a, b) = (RandomState::new().hash_one(Instant::now()), RandomState::new().hash_one(std::process::id()));
    format!("{a:016x}{b:08x}")[..20].to_string()
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(Category::Internal, error.to_string())
}

impl Sessions {
    pub(crate) fn new(engine: Arc<Engine>, workers: Workers, saved: PathBuf, workspaces: PathBuf) -> Self {
        Self { engine, workers, saved, workspaces, held: SyncMutex::default() }
    }

    fn get(&self, id: &str) -> Result<Arc<Held>, ApiError> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(id)
            .cloned()
            .ok_or_else(|| ApiError::new(Category::NotFound, format!("no session `{id}` (closed, or idle too long)")))
    }

    fn view(id: &str, held: &Held) -> SessionView {
        SessionView {
            id: id.to_string(),
            workspace: held.workspace.clone(),
            task: held.task.clone(),
            calls: *held.calls.lock().unwrap_or_else(|e| e.into_inner()),
            idle_seconds: held.last_used.lock().unwrap_or_else(|e| e.into_inner()).elapsed().as_secs(),
        }
    }

    fn saved_path(&self, id: &str) -> Result<PathBuf, ApiError> {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::new(Category::Usage, format!("`{id}` is not a saved session's id")));
        }
        Ok(self.saved.join(format!("{id}.session")))
    }

    pub async fn open(&self, request: OpenSession) -> Result<SessionView, ApiError> {
        if self.held.lock().unwrap_or_else(|e| e.into_inner()).len() >= MAX_SESSIONS {
            return Err(ApiError::hinted(
                Category::Busy,
                format!("the daemon holds {MAX_SESSIONS} sessions"),
                "close some",
            ));
        }
        let (manifest, own) = match request.manifest {
            Some(manifest) => (crate::admission::resolved("manifest", &manifest, true)?, false),
            None => (interpreter_image()?, true),
        };
        let id = random_id();
        let workspace = self.workspaces.join(&id);
        std::fs::create_dir_all(&workspace).map_err(internal)?;
        let restore = match &request.restore {
            Some(saved) => Some(
                std::fs::read(self.saved_path(saved)?)
                    .map_err(|_| ApiError::new(Category::NotFound, format!("no saved session `{saved}`")))?,
            ),
            None => None,
        };
        // The engine checks the content against the checksum, which is the id.
        if let (Some(bytes), Some(saved)) = (&restore, &request.restore)
            && SessionState::id_of(bytes) != *saved
        {
            return Err(ApiError::new(Category::Usage, format!("saved session `{saved}` does not match its id")));
        }
        // The workspace is the session's `/`: its files are the caller's to read and write.
        let requested = request.options.clone().map(|o| o.0);
        let mut options = request.options.map_or_else(TaskOptions::for_code, |o| o.0);
        options.allowed_files = vec![FileGrant { path: ".".into(), mode: FileMode::ReadWrite }];
        let settings =
            RunSettings { options: Some(options), project_root: Some(workspace.clone()), ..RunSettings::default() };
        let (engine, task, workspace_for_task) = (self.engine.clone(), request.task.clone(), workspace.clone());
        let session = self
            .workers
            .run(async move {
                // The daemon's own interpreter image needs no signature; a client's manifest does
                // when the daemon requires them.
                let loaded = if own { engine.load_own(&manifest) } else { engine.load(&manifest) }
                    .map_err(|e| ApiError::of(&e))?;
                if let Some(requested) = &requested {
                    let task =
                        capsule_exec::select_task(loaded.manifest(), task.as_deref()).map_err(|e| ApiError::of(&e))?;
                    // Its folder is the session's workspace, whatever the request says.
                    crate::admission::check_options(task, requested, true)?;
                }
                let state = match restore {
                    Some(bytes) => Some(engine.session_state(&loaded, &bytes).map_err(|e| ApiError::of(&e))?),
                    None => None,
                };
                engine
                    .open_session(&loaded, task.as_deref(), settings, Arc::new(NoEvents), state)
                    .await
                    .map_err(|e| ApiError::of(&e))
            })
            .await
            .map_err(internal)?;
        let session = match session {
            Ok(session) => session,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&workspace_for_task);
                return Err(error);
            }
        };
        let held = Arc::new(Held {
            task: session.task().to_string(),
            session: Mutex::new(session),
            workspace,
            idle: request.idle_seconds.map_or(DEFAULT_IDLE, Duration::from_secs),
            last_used: SyncMutex::new(Instant::now()),
            calls: SyncMutex::new(0),
        });
        let view = Self::view(&id, &held);
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(id, held);
        Ok(view)
    }

    pub async fn call(&self, id: &str, call: SessionCall) -> Result<Outcome, ApiError> {
        let held = self.get(id)?;
        let timeout = match &call.timeout {
            Some(text) => Some(
                manifest_schema::parse_duration(text)
                    .map_err(|p| ApiError::new(Category::Usage, format!("`timeout`: {}", p.message)))?,
            ),
            None => None,
        };
        let limits = CallLimits { fuel: call.compute.map(|c| c.fuel()), timeout };
        let outcome = self
            .workers
            .run({
                let held = held.clone();
                async move { held.session.lock().await.call(call.args, limits, &Cancel::default()).await }
            })
            .await
            .map_err(internal)?;
        *held.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        *held.calls.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Ok(outcome)
    }

    pub async fn save(&self, id: &str) -> Result<Saved, ApiError> {
        let held = self.get(id)?;
        let state = self
            .workers
            .run(async move { held.session.lock().await.save().await })
            .await
            .map_err(internal)?
            .map_err(|e| ApiError::of(&e))?;
        let bytes = state.to_bytes();
        let saved = SessionState::id_of(&bytes);
        std::fs::create_dir_all(&self.saved).map_err(internal)?;
        let path = self.saved_path(&saved)?;
        let temporary = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&temporary, &bytes).and_then(|()| std::fs::rename(&temporary, &path)).map_err(internal)?;
        Ok(Saved { id: saved, bytes: bytes.len() as u64, stored_bytes: state.stored_bytes() })
    }

    pub async fn fork(&self, id: &str) -> Result<SessionView, ApiError> {
        let saved = self.save(id).await?;
        let held = self.get(id)?;
        let view = self
            .open(OpenSession {
                restore: Some(saved.id),
                idle_seconds: Some(held.idle.as_secs()),
                ..OpenSession::default()
            })
            .await;
        // A fork starts with a copy of the workspace too.
        if let Ok(view) = &view {
            copy_dir(&held.workspace, &self.workspaces.join(&view.id)).map_err(internal)?;
        }
        view
    }

    pub fn close(&self, id: &str) -> Result<(), ApiError> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        let held = held.ok_or_else(|| ApiError::new(Category::NotFound, format!("no session `{id}`")))?;
        let _ = std::fs::remove_dir_all(&held.workspace);
        Ok(())
    }

    pub fn list(&self) -> Vec<SessionView> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter().map(|(id, held)| Self::view(id, held)).collect()
    }

    /// Closes the sessions idle longer than they may be.
    pub fn close_idle(&self) {
        let idle: Vec<String> = {
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.iter()
                .filter(|(_, h)| h.last_used.lock().unwrap_or_else(|e| e.into_inner()).elapsed() > h.idle)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in idle {
            tracing::info!(session = %id, "closing an idle session");
            let _ = self.close(&id);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// The manifest of the built-in interpreter image (`run_python`, sessions), which clients
/// build with `capsule python --image`.
pub fn interpreter_image() -> Result<std::path::PathBuf, ApiError> {
    capsule_exec::paths::interpreter_dir()
        .map(|dir| dir.join("build/manifest.toml"))
        .filter(|path| path.is_file())
        .ok_or_else(|| {
            ApiError::hinted(
                Category::Load,
                "the interpreter image is not built",
                "build it with `capsule python --image` (clients such as the Python SDK do)",
            )
        })
}
