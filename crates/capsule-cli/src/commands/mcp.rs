//! `capsule mcp [FILE | --project DIR]`: the MCP server, over standard input and output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use capsule_daemon::{Client, Target};
use capsule_mcp::{McpConfig, ProjectTasks};
use clap::Args;
use manifest_schema::{Category, Manifest, Problem};

use super::{BuildChoice, Source, entry_from_project, manifest_of};
use crate::exit::{Exit, Failure};
use crate::layout::ProjectLayout;
use crate::sandbox_args::SandboxArgs;

/// Serve MCP on standard input and output, for agents: `run_python`, sessions
/// (`session_create`, `session_run`, `session_close`) and, given a file or project, each of
/// its tasks as a tool whose input schema is the task's signature.
///
/// The limits and grants below apply to every `run_python` and session call; tasks keep their
/// own `@task` options. Calls run in the daemon when one answers, else in one started for this
/// server (which ends with it).
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule mcp\n  capsule mcp tools.py --ram 512MiB --timeout 30s\n  capsule mcp --project ./agent --allow-dir data --allow-host api.example.com\n\nAn MCP client's configuration (e.g. Claude Desktop's `mcpServers`):\n  {\"capsule\": {\"command\": \"capsule\", \"args\": [\"mcp\", \"/path/to/tools.py\"]}}"
)]
pub struct McpCommand {
    /// A Python file whose `@task` functions become tools (built first, cached).
    #[arg(conflicts_with = "project")]
    file: Option<PathBuf>,
    /// A project folder: the tasks of the entrypoint its `capsule.toml` names become tools.
    #[arg(long, value_name = "DIR")]
    project: Option<PathBuf>,
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Use the running daemon only (fail if none answers).
    #[arg(long)]
    daemon: bool,
}

impl McpCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let options = self.sandbox.options()?;
        let entry = match (&self.file, &self.project) {
            (Some(file), _) => Some(file.clone()),
            (None, Some(dir)) => Some(entry_from_project(dir)?),
            (None, None) => None,
        };
        let project = match entry {
            Some(entry) => Some(project_tasks(&entry).await?),
            None => None,
        };
        let (image, _) = super::python::image().await?;
        let here = std::env::current_dir().map_err(|e| internal(format!("cannot read the current folder: {e}")))?;
        let root = match &self.project {
            Some(dir) => std::path::absolute(dir).unwrap_or_else(|_| dir.clone()),
            None => here,
        };
        let (daemon, _private) = match Client::connect_default().await {
            Ok(client) => (client.target().clone(), None),
            Err(error) if self.daemon => return Err(Failure::of(&error)),
            Err(_) => {
                let private = PrivateDaemon::start()?;
                (Target::Unix(private.socket.clone()), Some(private))
            }
        };
        let config = McpConfig { daemon, image: absolute(&image), options, root, project };
        capsule_mcp::serve_stdio(config).await.map_err(|e| Failure::of(&e))?;
        Ok(Exit::Success.into())
    }
}

fn internal(message: String) -> Failure {
    Failure::problem(Category::Internal, Problem::new(message))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `entry` built (cached), with its manifest read for the tools' schemas.
async fn project_tasks(entry: &Path) -> Result<ProjectTasks, Failure> {
    let layout = ProjectLayout::of_file(entry, None);
    let (manifest_path, _) =
        manifest_of(&Source::Python(entry.to_path_buf()), &layout, &BuildChoice::default()).await?;
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|e| internal(format!("cannot read `{}`: {e}", manifest_path.display())))?;
    let manifest = Manifest::from_toml(&text, &manifest_path.display().to_string()).map_err(|e| Failure::of(&e))?;
    if manifest.tasks.is_empty() {
        return Err(Failure::problem(
            Category::Usage,
            Problem::hinted(format!("`{}` has no tasks", entry.display()), "mark the functions to offer with `@task`"),
        ));
    }
    Ok(ProjectTasks { manifest_path: absolute(&manifest_path), manifest, entry: absolute(entry) })
}

/// A daemon started for this server on a socket of its own; it ends with this process.
struct PrivateDaemon {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl PrivateDaemon {
    fn start() -> Result<Self, Failure> {
        let dir = std::env::temp_dir().join(format!("capsule-mcp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| internal(format!("cannot create `{}`: {e}", dir.display())))?;
        let socket = dir.join("daemon.sock");
        let exe = std::env::current_exe().map_err(|e| internal(format!("cannot find this program: {e}")))?;
        let child = Command::new(exe)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--no-resume", "--exit-with", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| internal(format!("cannot start a daemon: {e}")))?;
        let mut daemon = Self { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(internal(format!("the daemon for this server ended at start ({status})")));
            }
            if Instant::now() > deadline {
                return Err(internal("the daemon for this server did not start within 30 s".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
