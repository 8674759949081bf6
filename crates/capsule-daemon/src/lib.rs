//! Capsule's daemon: the engine as a long-lived service. It loads verified artifacts (kept by
//! sha256), runs them with the engine's sandbox pools warm, journals every run, and answers an
//! HTTP API on a Unix socket (and, with a token, on TCP). It never compiles: clients build
//! (`capsule run FILE` does, cached) and submit the manifest, so a production host can run it
//! from a `capsule` built without the `build` feature.
//!
//! `server` holds the routes, `embedded` serves them inside another process (the Python
//! SDK's native module) without a socket, `runs` the runs and their queue, `registry` what survives a
//! crash, `socket` where the socket is and who owns it, `client` the other end.

mod admission;
pub mod api;
mod client;
mod embedded;
mod registry;
mod runs;
mod server;
mod sessions;
mod socket;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use capsule_exec::Engine;

pub use client::{Client, ClientError, Target};
pub use embedded::{Api, Embedded};
pub use socket::{SOCKET_ENV, default_socket, default_state_dir};
pub use tls::{Listen, Tls};

/// How a daemon is set up (`capsule daemon`'s options).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    /// A TCP address to listen on too, with the token every request must carry.
    pub listen: Option<Listen>,
    /// Runs running at once.
    pub workers: usize,
    /// Runs waiting beyond those.
    pub queue: usize,
    /// One journal for every run instead of each project's.
    pub journal: Option<PathBuf>,
    /// Where the daemon keeps its registry of runs.
    pub state_dir: PathBuf,
    /// Resume the runs a previous daemon left unfinished.
    pub resume: bool,
    /// How long a shutdown lets running runs finish before stopping them.
    pub grace: Duration,
    /// Shut down when this process is gone (a daemon started for one client process).
    pub exit_with: Option<u32>,
    /// Run tasks on a cluster's workers (NATS JetStream) instead of in this process.
    pub cluster: Option<capsule_cluster::ClusterOptions>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another daemon is already using `{0}`")]
    AlreadyRunning(PathBuf),
    #[error("cannot set up `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error("the daemon's runtime failed: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Cluster(#[from] capsule_cluster::ClusterError),
    #[error("no folder for the daemon's {0}: HOME is not set")]
    NoHome(&'static str),
    #[error("cannot use the token file `{}`: {why}", path.display())]
    Token { path: PathBuf, why: String },
    #[error(
        "`--listen {0}` is not a loopback address, and the token and every request would cross the network in clear"
    )]
    ListenWithoutTls(SocketAddr),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

impl manifest_schema::Explain for DaemonError {
    fn category(&self) -> manifest_schema::Category {
        use manifest_schema::Category;
        match self {
            Self::AlreadyRunning(_) => Category::Busy,
            Self::Cluster(error) => error.category(),
            Self::NoHome(_) | Self::Token { .. } | Self::ListenWithoutTls(_) | Self::Tls(_) => Category::Usage,
            Self::Io { .. } | Self::Registry(_) | Self::Runtime(_) => Category::Internal,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::AlreadyRunning(_) => Some(
                "stop it first, or start this one on another socket with `--socket PATH` (clients: `CAPSULE_SOCKET`)"
                    .into(),
            ),
            Self::Cluster(error) => error.hint(),
            Self::NoHome(_) => Some(
                "set HOME, or `CAPSULE_SOCKET` and `XDG_STATE_HOME` (the daemon: `--socket` and `--state-dir`)".into(),
            ),
            Self::Token { .. } => Some("keep the token in a file only its owner can read: `chmod 600 FILE`".into()),
            Self::ListenWithoutTls(_) => Some(
                "give it a certificate with `--tls-cert FILE --tls-key FILE`, or listen on 127.0.0.1 behind your own proxy".into(),
            ),
            _ => None,
        }
    }
}

/// The threads sandboxes run on.
fn engine_runtime() -> Result<tokio::runtime::Runtime, DaemonError> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name("capsule-engine")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)
}

/// Where a service's sandboxes run, and so what waits for them.
#[derive(Clone)]
pub(crate) struct Workers {
    /// The engine's runtime: its threads, timers and output drivers.
    pub(crate) runtime: tokio::runtime::Handle,
    /// Run on the thread awaiting the work (within the engine's runtime), not on one of its
    /// workers: an embedded service, whose callers each wait on a thread of their own, saves
    /// two hops between threads per call. A daemon hops, so that its API thread stays free.
    pub(crate) inline: bool,
}

impl Workers {
    /// `work`'s output, where this service runs its sandboxes.
    pub(crate) async fn run<F>(&self, work: F) -> Result<F::Output, tokio::task::JoinError>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if self.inline { Ok(work.await) } else { self.runtime.spawn(work).await }
    }
}

/// The runs and sessions of a service keeping its records in `state_dir` (made private
/// here), its sandboxes where `workers` says: a daemon's, or one embedded in a process.
fn assemble(
    engine: Engine,
    state_dir: &Path,
    limits: runs::Limits,
    cluster: Option<capsule_cluster::Cluster>,
    workers: Workers,
) -> Result<server::Served, DaemonError> {
    capsule_exec::paths::private_dir(state_dir)
        .map_err(|why| DaemonError::Io { path: state_dir.to_path_buf(), source: std::io::Error::other(why) })?;
    let registry_path = state_dir.join("daemon.db");
    let registry = registry::Registry::open(&registry_path)?;
    let engine = Arc::new(engine.reserving(registry_path, "the daemon's record of runs"));
    let runs = Arc::new(runs::Runs::new(engine.clone(), workers.clone(), registry, limits, cluster));
    let saved_sessions = capsule_exec::paths::saved_sessions_dir().unwrap_or_else(|| state_dir.join("saved-sessions"));
    let sessions = Arc::new(sessions::Sessions::new(engine, workers, saved_sessions, state_dir.join("sessions")));
    Ok(server::Served { runs, sessions })
}

/// Closes idle sessions every ten seconds, for the service's life.
async fn close_idle_sessions(sessions: Arc<sessions::Sessions>) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        sessions.close_idle();
    }
}

/// Resolves when process `pid` no longer exists (never, without one).
async fn gone(pid: Option<u32>) {
    let Some(pid) = pid else { return std::future::pending().await };
    let process = PathBuf::from(format!("/proc/{pid}"));
    while process.exists() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A server running until the daemon shuts down.
type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>;

/// Runs a daemon in the foreground until SIGTERM or SIGINT; `ready` is called once it answers.
pub fn serve(config: DaemonConfig, engine: Engine, ready: impl FnOnce(&DaemonConfig)) -> Result<(), DaemonError> {
    let socket = socket::Bound::claim(&config.socket)?;
    let engine_runtime = engine_runtime()?;
    // The API has a thread of its own: however busy the sandboxes are, it answers.
    let api_runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DaemonError::Runtime)?;
    let own_places = [Some(config.state_dir.clone()), config.socket.parent().map(Path::to_path_buf)];
    let limits = runs::Limits {
        workers: config.workers,
        queue: config.queue,
        journal: config.journal.clone(),
        own_places: own_places.into_iter().flatten().collect(),
    };
    let cluster = match &config.cluster {
        Some(options) => Some(engine_runtime.block_on(capsule_cluster::Cluster::connect(options.clone()))?),
        None => None,
    };
    let engine = engine.reserving(config.socket.clone(), "the daemon's socket");
    let workers = Workers { runtime: engine_runtime.handle().clone(), inline: false };
    let served = assemble(engine, &config.state_dir, limits, cluster, workers)?;
    let (runs, sessions) = (served.runs.clone(), served.sessions.clone());
    api_runtime.block_on(async {
        let unix = socket.listener().map_err(|source| DaemonError::Io { path: config.socket.clone(), source })?;
        let tcp = match &config.listen {
            Some(listen) => Some(
                tokio::net::TcpListener::bind(listen.address)
                    .await
                    .map_err(|source| DaemonError::Io { path: listen.address.to_string().into(), source })?,
            ),
            None => None,
        };
        if config.resume {
            runs.resume_unfinished().await;
        }
        let (stop_sender, stop) = tokio::sync::watch::channel(false);
        let shutdown = move |mut stop: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        };
        tokio::spawn(close_idle_sessions(sessions));
        let unix_server =
            axum::serve(unix, server::router(served.clone(), None)).with_graceful_shutdown(shutdown(stop.clone()));
        let tcp_server: Option<Serving> = match (tcp, &config.listen) {
            (Some(listener), Some(listen)) => {
                let router = server::router(served, Some(listen.token.as_str().into()));
                Some(match &listen.tls {
                    Some(tls) => {
                        let listener = tls::TlsListener::new(listener, tls)
                            .map_err(|source| DaemonError::Io { path: listen.address.to_string().into(), source })?;
                        Box::pin(
                            axum::serve(listener, router).with_graceful_shutdown(shutdown(stop.clone())).into_future(),
                        )
                    }
                    None => Box::pin(
                        axum::serve(listener, router).with_graceful_shutdown(shutdown(stop.clone())).into_future(),
                    ),
                })
            }
            _ => None,
        };
        ready(&config);
        let signals = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(DaemonError::Runtime)?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
                () = gone(config.exit_with) => tracing::info!("the process this daemon served is gone"),
            }
            tracing::info!("shutting down: no new runs; running ones get {:?}", config.grace);
            runs.shutdown(config.grace).await;
            let _ = stop_sender.send(true);
            Ok::<_, DaemonError>(())
        };
        let servers = async {
            match tcp_server {
                Some(tcp) => {
                    let (a, b) = tokio::join!(unix_server.into_future(), tcp);
                    a.and(b)
                }
                None => unix_server.await,
            }
        };
        let (signalled, served) = tokio::join!(signals, servers);
        signalled?;
        served.map_err(DaemonError::Runtime)
    })?;
    engine_runtime.shutdown_timeout(Duration::from_secs(1));
    drop(socket);
    Ok(())
}
