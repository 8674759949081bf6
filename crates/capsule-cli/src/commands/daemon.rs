//! `capsule daemon`: the engine as a service on a Unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capsule_daemon::{Client, DaemonConfig, Target, default_socket, default_state_dir};
use capsule_exec::Engine;
use clap::Args;
use manifest_schema::Problem;

use crate::cluster_args::{ClusterArgs, host_name};
use crate::exit::{Exit, Failure};

/// Run the daemon in the foreground: runs are submitted to it over its socket (`capsule run`
/// uses it when it answers), listed, stopped and restarted.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule daemon\n  capsule daemon --detach\n  capsule daemon --socket /run/capsule.sock --workers 8 --journal /var/lib/capsule/journal.db\n  capsule daemon --listen 127.0.0.1:7070 --token-file /etc/capsule/token\n  capsule daemon --nats nats://10.0.0.5:4222     runs go to the workers of a cluster"
)]
pub struct DaemonCommand {
    /// The socket [default: `$CAPSULE_SOCKET`, else `$XDG_RUNTIME_DIR/capsule/daemon.sock`, else `~/.capsule/daemon.sock`].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also listen on this TCP address; every request must then carry the token of `--token-file`.
    #[arg(long, value_name = "ADDR", requires = "token_file")]
    listen: Option<SocketAddr>,
    /// The file holding the token TCP clients must send (`Authorization: Bearer <token>`).
    #[arg(long, value_name = "FILE", requires = "listen")]
    token_file: Option<PathBuf>,
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
        let engine = Engine::new()?;
        capsule_daemon::serve(config, engine, |config| {
            eprintln!("capsule: daemon {} listening on {}", std::process::id(), config.socket.display());
            if let Some((address, _)) = &config.listen {
                eprintln!("capsule: and on {address} (token required)");
            }
            if let Some(cluster) = &config.cluster {
                eprintln!("capsule: runs go to the workers of the cluster at {}", cluster.url);
            }
        })
        .map_err(|e| Failure::new(Exit::Internal, &e))?;
        Ok(Exit::Success.into())
    }

    fn config(&self) -> Result<DaemonConfig, Failure> {
        let listen = match (&self.listen, &self.token_file) {
            (Some(address), Some(file)) => {
                let token = std::fs::read_to_string(file).map_err(|e| {
                    Failure::problem(Exit::Usage, Problem::new(format!("cannot read `{}`: {e}", file.display())))
                })?;
                let token = token.trim().to_string();
                if token.len() < 16 {
                    return Err(Failure::problem(
                        Exit::Usage,
                        Problem::hinted(
                            format!("the token in `{}` is too short to protect a TCP listener", file.display()),
                            "use at least 16 random characters, e.g. `head -c 32 /dev/urandom | base64`",
                        ),
                    ));
                }
                Some((*address, token))
            }
            _ => None,
        };
        let absolute = |path: PathBuf| std::path::absolute(&path).unwrap_or(path);
        Ok(DaemonConfig {
            socket: absolute(self.socket.clone().unwrap_or_else(default_socket)),
            listen,
            workers: self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            queue: self.queue,
            journal: self.journal.clone().map(absolute),
            state_dir: absolute(self.state_dir.clone().unwrap_or_else(default_state_dir)),
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
    let internal = |message: String| Failure::problem(Exit::Internal, Problem::new(message));
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| internal(format!("cannot create `{}`: {e}", config.state_dir.display())))?;
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
                Exit::Internal,
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
