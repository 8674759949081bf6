//! `capsule._native`: Capsule inside the Python process. The SDK (`capsule/_host.py`) sends
//! the daemon's API requests either to an [`Engine`] here, answered by the daemon's own
//! routes with no socket ([`capsule_daemon::Embedded`]), or to a [`Daemon`]; both answer with
//! the API's status and JSON body, so the SDK reads every answer and error one way. Builds
//! ([`build`], [`interpreter_image`]) answer in the same form. Sandboxes run with the GIL
//! released: a blocking call's on the calling thread (within the engine's runtime, no hop
//! between threads), an asyncio call's on the engine's threads, answered through a callback
//! from there, with no Python thread per call.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use capsule_daemon::api::{ApiError, ErrorBody};
use capsule_daemon::{Api, Client, Embedded, Target};
use manifest_schema::{Category, Explain};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// An answer as the API gives it: the HTTP status and the JSON body.
type Answer = (u16, Vec<u8>);

/// What running work gets to finish when an engine closes.
const CLOSING_GRACE: Duration = Duration::from_secs(1);

fn failure(error: ApiError) -> Answer {
    let status = error.kind.http_status();
    (status, serde_json::to_vec(&ErrorBody { error }).expect("errors serialise"))
}

fn explained(error: &dyn Explain) -> Answer {
    failure(ApiError::of(error))
}

fn to_python(py: Python<'_>, (status, body): Answer) -> (u16, Py<PyBytes>) {
    (status, PyBytes::new(py, &body).unbind())
}

/// Calls Python's `done(status, body)` with `answer`, on a thread that may wait for the GIL.
fn deliver(done: Py<PyAny>, answer: Answer) {
    Python::attach(|py| {
        if let Err(error) = done.call1(py, to_python(py, answer)) {
            // The caller's event loop closed before the answer came: nobody waits for it.
            error.print(py);
        }
    });
}

/// A failure's message and hint, as one text for a Python exception.
fn explained_text(error: &dyn Explain) -> String {
    match error.hint() {
        Some(hint) => format!("{error}\n  hint: {hint}"),
        None => error.to_string(),
    }
}

fn os_error(error: impl std::fmt::Display) -> PyErr {
    pyo3::exceptions::PyOSError::new_err(error.to_string())
}

/// Capsule's engine in this process, serving the daemon's API without a socket.
#[pyclass(frozen, module = "capsule._native")]
struct Engine {
    service: Mutex<Option<Embedded>>,
    /// The folder of the service's records (runs, session workspaces), removed with it.
    records: tempfile::TempDir,
}

impl Engine {
    /// The service's routes and its runtime, while it is open.
    fn service(&self) -> Result<(Api, tokio::runtime::Handle), ApiError> {
        let service = self.service.lock().unwrap_or_else(|e| e.into_inner());
        let service = service.as_ref().ok_or_else(|| ApiError::new(Category::Busy, "this engine was closed"))?;
        Ok((service.api(), service.handle().clone()))
    }
}

#[pymethods]
impl Engine {
    #[new]
    fn new() -> PyResult<Self> {
        let records = tempfile::Builder::new().prefix("capsule-").tempdir().map_err(os_error)?;
        let engine = capsule_exec::Engine::new().map_err(os_error)?;
        let service = Embedded::start(engine, records.path().join("state")).map_err(os_error)?;
        Ok(Self { service: Mutex::new(Some(service)), records })
    }

    /// One request of the daemon's API (`"POST"`, `"/v1/runs"`, a JSON body), answered
    /// here: `(status, body)`.
    #[pyo3(signature = (method, route, body=None))]
    fn request(&self, py: Python<'_>, method: &str, route: &str, body: Option<Vec<u8>>) -> (u16, Py<PyBytes>) {
        let answer = py.detach(|| match self.service() {
            Ok((api, runtime)) => runtime.block_on(api.request(method, route, body.unwrap_or_default())),
            Err(error) => failure(error),
        });
        to_python(py, answer)
    }

    /// `request`, answered later by a call of `done(status, body)` from another thread.
    fn request_later(&self, method: String, route: String, body: Option<Vec<u8>>, done: Py<PyAny>) {
        match self.service() {
            Ok((api, runtime)) => {
                runtime.spawn(async move {
                    let answer = api.request(&method, &route, body.unwrap_or_default()).await;
                    // Waiting for the GIL is not for the engine's threads.
                    tokio::task::spawn_blocking(move || deliver(done, answer));
                });
            }
            Err(error) => deliver(done, failure(error)),
        }
    }

    /// Stops what still runs (after a second's grace) and removes the engine's records;
    /// later requests are refused.
    fn close(&self, py: Python<'_>) {
        let service = self.service.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(service) = service {
            py.detach(|| service.close(CLOSING_GRACE));
        }
        let _ = std::fs::remove_dir_all(self.records.path());
    }
}

impl Drop for Engine {
    /// An engine dropped without `close` (the SDK closes its own at exit) shuts its threads
    /// down on a thread of its own: not while holding the GIL, which they may be waiting for.
    fn drop(&mut self) {
        let service = self.service.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(service) = service {
            std::thread::spawn(move || drop(service));
        }
    }
}

/// A client of a daemon (its socket, or `host:port` with a token).
#[pyclass(frozen, module = "capsule._native")]
struct Daemon {
    target: Target,
    /// Connections kept alive between requests: one per request in flight at most.
    idle: Mutex<Vec<Client>>,
}

/// The thread that drives every daemon client's connections, for the life of the process: a
/// runtime dropped while Python holds the GIL would wait for a thread that waits for the GIL
/// (one handing an answer back to asyncio).
fn client_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("capsule-client")
            .enable_all()
            .build()
            .expect("a thread for Capsule's daemon clients")
    })
}

impl Daemon {
    async fn exchange(&self, method: &str, route: &str, body: Option<Vec<u8>>) -> Answer {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        // A kept connection the daemon closed meanwhile is replaced, once.
        let attempts = if idle.is_some() { 2 } else { 1 };
        let mut kept = idle;
        for attempt in 1..=attempts {
            let client = match kept.take() {
                Some(client) => Ok(client),
                None => Client::connect(self.target.clone()).await,
            };
            let mut client = match client {
                Ok(client) => client,
                Err(error) => return explained(&error),
            };
            match client.exchange(method, route, body.clone()).await {
                Ok((status, bytes)) => {
                    self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(client);
                    return (status, bytes.to_vec());
                }
                Err(error) if attempt == attempts => return explained(&error),
                Err(_) => {}
            }
        }
        unreachable!("the last attempt answers")
    }
}

#[pymethods]
impl Daemon {
    /// A client of the daemon at `target`: a socket's path, or `host:port` with `token`;
    /// without one, the user's daemon (`CAPSULE_SOCKET`, else the default socket).
    #[new]
    #[pyo3(signature = (target=None, token=None))]
    fn new(target: Option<String>, token: Option<String>) -> PyResult<Self> {
        let target = match (target, token) {
            (Some(address), Some(token)) => Target::Tcp { address, token },
            (Some(socket), None) => Target::Unix(PathBuf::from(socket)),
            (None, None) => Target::Unix(
                capsule_daemon::default_socket()
                    .map_err(|e| pyo3::exceptions::PyValueError::new_err(explained_text(&e)))?,
            ),
            (None, Some(_)) => {
                return Err(pyo3::exceptions::PyValueError::new_err("a token goes with a daemon's `host:port`"));
            }
        };
        Ok(Self { target, idle: Mutex::new(Vec::new()) })
    }

    /// Where the daemon is: its socket, or its `host:port`.
    #[getter]
    fn target(&self) -> String {
        self.target.to_string()
    }

    /// As `Engine.request`, through the daemon.
    #[pyo3(signature = (method, route, body=None))]
    fn request(&self, py: Python<'_>, method: &str, route: &str, body: Option<Vec<u8>>) -> (u16, Py<PyBytes>) {
        let answer = py.detach(|| client_runtime().block_on(self.exchange(method, route, body)));
        to_python(py, answer)
    }

    /// As `Engine.request_later`, through the daemon.
    fn request_later(slf: Py<Self>, method: String, route: String, body: Option<Vec<u8>>, done: Py<PyAny>) {
        client_runtime().spawn(async move {
            let answer = slf.get().exchange(&method, &route, body).await;
            tokio::task::spawn_blocking(move || deliver(done, answer));
        });
    }
}

/// The engine that compiles builds, made by the first build that needs one.
fn builder() -> Result<&'static capsule_exec::Engine, ApiError> {
    static BUILDER: OnceLock<Result<capsule_exec::Engine, String>> = OnceLock::new();
    BUILDER
        .get_or_init(|| capsule_build::build_engine().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|why| ApiError::new(Category::Internal, why.clone()))
}

/// The base runtime builds start from: `$CAPSULE_RUNTIME`, else `installed` (the wheel's,
/// which the SDK finds), else what `python_runtime::runtime_path` finds.
fn runtime_of(installed: Option<PathBuf>) -> PathBuf {
    match std::env::var_os(python_runtime::RUNTIME_ENV) {
        Some(path) => PathBuf::from(path),
        None => installed.unwrap_or_else(python_runtime::runtime_path),
    }
}

/// Builds as `options` say unless an up-to-date build is there: `{"manifest": path}`.
fn build_with(options: &capsule_build::BuildOptions) -> Answer {
    let built = match capsule_build::up_to_date(options) {
        Some(output) => Ok(output.manifest_path),
        None => builder().map_err(failure).and_then(|engine| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| failure(ApiError::new(Category::Internal, format!("cannot start the builder: {e}"))))?;
            runtime.block_on(capsule_build::build(engine, options)).map(|o| o.manifest_path).map_err(|e| explained(&e))
        }),
    };
    match built {
        Ok(path) => (200, serde_json::to_vec(&serde_json::json!({ "manifest": path })).expect("paths serialise")),
        Err(answer) => answer,
    }
}

/// Builds the Python file `entry` (into `out_dir`, by default `.capsule/build/<stem>/` beside
/// it) unless it is up to date: `(status, body)`, the body `{"manifest": path}` or an error.
#[pyfunction]
#[pyo3(signature = (entry, out_dir=None, force=false, runtime=None))]
fn build(
    py: Python<'_>,
    entry: PathBuf,
    out_dir: Option<PathBuf>,
    force: bool,
    runtime: Option<PathBuf>,
) -> (u16, Py<PyBytes>) {
    let options = capsule_build::BuildOptions { entry, out_dir, runtime: runtime_of(runtime), force };
    let answer = py.detach(|| build_with(&options));
    to_python(py, answer)
}

/// The interpreter image (`run_python`, sessions), built once per runtime: as `build`.
#[pyfunction]
#[pyo3(signature = (runtime=None))]
fn interpreter_image(py: Python<'_>, runtime: Option<PathBuf>) -> (u16, Py<PyBytes>) {
    let answer = py.detach(|| match capsule_build::interpreter_options(runtime_of(runtime)) {
        Ok(options) => build_with(&options),
        Err(error) => explained(&error),
    });
    to_python(py, answer)
}

#[pymodule]
mod _native {
    #[pymodule_export]
    use super::{Daemon, Engine, build, interpreter_image};
}
