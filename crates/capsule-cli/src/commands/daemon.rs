//! `capsule daemon`: the engine as a service on a Unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capsule_daemon::{Client, DaemonConfig, Listen, Target, Tls, default_socket, default_state_dir};
use capsule_exec::{Engine, Trust};
use clap::Args;
use manifest_schema::{Category, Problem};

use crate::cluster_args::{ClusterArgs, host_name};
use crate::exit::{Exit, Failure};

/// Run the daemon in the foreground: runs are submitted to it over its socket (`capsule run`
/// uses it when it answers), listed, stopped and restarted.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule daemon\n  capsule daemon --detach\n  capsule daemon --socket /run/capsule.sock --workers 8 --journal /var/lib/capsule/journal.db\n  capsule daemon --listen 127.0.0.1:7070 --token-file /etc/capsule/token\n  capsule daemon --listen 0.0.0.0:7443 --token-file token --tls-cert cert.pem --tls-key key.pem\n  capsule daemon --trust release.pub            runs only manifests that key signed\n  capsule daemon --nats nats://submitter:PASSWORD@10.0.0.5:4222 --trust release.pub"
)]
pub struct DaemonCommand {
    /// The socket [default: `$CAPSULE_SOCKET`, else `$XDG_RUNTIME_DIR/capsule/daemon.sock`, else `~/.capsule/daemon.sock`].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also listen on this TCP address; every request must then carry the token of `--token-file`.
    #[arg(long, value_name = "ADDR", requires = "token_file")]
    listen: Option<SocketAddr>,
    /// The file holding the token TCP clients must send (`Authorization: Bearer <token>`);
    /// only its owner may read it.
    #[arg(long, value_name = "FILE", requires = "listen")]
    token_file: Option<PathBuf>,
    /// The TLS certificate chain (PEM) for `--listen`; required on any address but loopback.
    #[arg(long, value_name = "FILE", requires_all = ["listen", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Run only manifests one of these public keys signed (`capsule keygen`, `capsule build
    /// --sign`); repeatable. `CAPSULE_TRUST` adds a colon-separated list.
    #[arg(long, value_name = "KEY.pub")]
    trust: Vec<PathBuf>,
    /// With `--nats` and no key to trust: send unsigned work to the cluster anyway.
    #[arg(long, requires = "nats")]
    allow_unsigned: bool,
    /// Runs that may run at once [default: the number of cores].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Runs that may wait for a worker; beyond them, submissions are refused.
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    queue: usize,
    /// One journal for every run [default: each project's `.capsule/journal.db`].
    #[arg(long, value_name = "PATH")]
    journal: Option<PathBuf>,
    /// Where the daemon keeps its record of runs [default: `$XDG_STATE_HOME/capsule`, else `~/.local/state/capsule`].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Do not resume the runs a previous daemon left unfinished.
    #[arg(long)]
    no_resume: bool,
    /// On SIGTERM, how long running runs may go on before they are stopped (and resumed by the next daemon).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::run_args::parse_duration)]
    grace: Duration,
    /// Shut down when the process PID ends (for a daemon started by one program, e.g. the Python SDK).
    #[arg(long, value_name = "PID")]
    exit_with: Option<u32>,
    /// Start in the background and return once it answers; its log goes to `daemon.log` in the state folder.
    #[arg(long)]
    detach: bool,
    /// Send runs to the workers of a cluster through this NATS server (with JetStream), e.g.
    /// `nats://127.0.0.1:4222`; start workers with `capsule worker --nats URL`.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

impl DaemonCommand {
    pub fn execute(self) -> Result<ExitCode, Failure> {
        let config = self.config()?;
        if self.detach {
            return detach(&config);
        }
        let mut engine = Engine::new()?;
        if let Some(trust) = Trust::from_files_and_env(&self.trust).map_err(|e| Failure::of(&e))? {
            engine = engine.requiring_signatures(trust);
        } else if self.nats.is_some() && !self.allow_unsigned {
            return Err(Failure::problem(
                Category::Usage,
                Problem::hinted(
                    "a daemon with `--nats` sends work that every worker runs as native code: it must be signed",
                    "give the key builds are signed with, `--trust KEY.pub`, or accept unsigned work explicitly with `--allow-unsigned`",
                ),
            ));
        }
        capsule_daemon::serve(config, engine, |config| {
            eprintln!("capsule: daemon {} listening on {}", std::process::id(), config.socket.display());
            if let Some(listen) = &config.listen {
                let tls = if listen.tls.is_some() { "TLS, " } else { "" };
                eprintln!("capsule: and on {} ({tls}token required)", listen.address);
            }
            if let Some(cluster) = &config.cluster {
                eprintln!("capsule: runs go to the workers of the cluster at {}", cluster.shown_url());
            }
        })
        .map_err(|e| Failure::of(&e))?;
        Ok(Exit::Success.into())
    }

    fn config(&self) -> Result<DaemonConfig, Failure> {
        let daemon_failure = |e: capsule_daemon::DaemonError| Failure::of(&e);
        let listen = match (&self.listen, &self.token_file) {
            (Some(address), Some(file)) => {
                let tls = match (&self.tls_cert, &self.tls_key) {
                    (Some(cert), Some(key)) => Some(Tls::from_pem_files(cert, key).map_err(daemon_failure)?),
                    _ => None,
                };
                Some(Listen::new(*address, file, tls).map_err(daemon_failure)?)
            }
            _ => None,
        };
        let socket = match &self.socket {
            Some(socket) => socket.clone(),
            None => default_socket().map_err(daemon_failure)?,
        };
        let state_dir = match &self.state_dir {
            Some(dir) => dir.clone(),
            None => default_state_dir().map_err(daemon_failure)?,
        };
        let absolute = |path: PathBuf| std::path::absolute(&path).unwrap_or(path);
        Ok(DaemonConfig {
            socket: absolute(socket),
            listen,
            workers: self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            queue: self.queue,
            journal: self.journal.clone().map(absolute),
            state_dir: absolute(state_dir),
            resume: !self.no_resume,
            grace: self.grace,
            exit_with: self.exit_with,
            cluster: self
                .nats
                .as_ref()
                .map(|url| self.cluster.options(url, format!("daemon-{}-{}", host_name(), std::process::id()))),
        })
    }
}

/// Starts the same command without `--detach` in a new session, and waits until it answers.
fn detach(config: &DaemonConfig) -> Result<ExitCode, Failure> {
    use std::os::unix::process::CommandExt;
    let internal = |message: String| Failure::problem(Category::Internal, Problem::new(message));
    capsule_exec::paths::private_dir(&config.state_dir)
        .map_err(|e| internal(format!("cannot use `{}`: {e}", config.state_dir.display())))?;
    let log_path = config.state_dir.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| internal(format!("cannot open `{}`: {e}", log_path.display())))?;
    let arguments: Vec<String> = std::env::args().skip(1).filter(|a| a != "--detach").collect();
    let exe = std::env::current_exe().map_err(|e| internal(format!("cannot find this program: {e}")))?;
    let mut child = std::process::Command::new(exe)
        .args(&arguments)
        .arg("--socket")
        .arg(&config.socket)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| internal(e.to_string()))?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| internal(format!("cannot start the daemon: {e}")))?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| internal(e.to_string()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Failure::problem(
                Category::Internal,
                Problem::hinted(
                    format!("the daemon exited at once ({status})"),
                    format!("see `{}`", log_path.display()),
                ),
            ));
        }
        let answered = runtime.block_on(async {
            let mut client = Client::connect(Target::Unix(config.socket.clone())).await.ok()?;
            client.health().await.ok()
        });
        if let Some(health) = answered {
            println!("capsule: daemon {} listening on {}", health.pid, config.socket.display());
            return Ok(Exit::Success.into());
        }
        if std::time::Instant::now() > deadline {
            return Err(internal(format!("the daemon did not answer within 30 s; see `{}`", log_path.display())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
