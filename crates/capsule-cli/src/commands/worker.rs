//! `capsule worker`: runs calls from a cluster's queue (NATS JetStream) on this host.

use std::path::PathBuf;
use std::process::ExitCode;

use capsule_cluster::{Cluster, Worker, WorkerOptions};
use capsule_exec::Engine;
use clap::Args;
use manifest_schema::Problem;

use crate::cluster_args::{ClusterArgs, host_name};
use crate::exit::{Exit, Failure};

/// Run tasks from a cluster's queue: any number of workers on any hosts pull the calls a
/// `capsule daemon --nats` (and the tasks themselves, for their sub-tasks) put there.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule worker --nats nats://10.0.0.5:4222\n  capsule worker --nats nats://queue:4222 --workers 8 --project-root /srv/data --name gpu-1\n  capsule worker --nats tls://queue:4222 --nats-creds worker.creds --nats-tls-ca ca.pem"
)]
pub struct WorkerCommand {
    /// The NATS server (with JetStream), e.g. `nats://127.0.0.1:4222`.
    #[arg(long, value_name = "URL")]
    nats: String,
    /// Calls run at once [default: the number of cores].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// The folder file grants (`allowed_files`) of every task are relative to [default: the current folder].
    #[arg(long, value_name = "DIR")]
    project_root: Option<PathBuf>,
    /// How `capsule list` names this worker [default: `<host>-<pid>`].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

impl WorkerCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let usage = |message: String| Failure::problem(Exit::Usage, Problem::new(message));
        let root = match self.project_root {
            Some(root) => root,
            None => std::env::current_dir().map_err(|e| usage(format!("cannot read the current folder: {e}")))?,
        };
        let project_root =
            std::fs::canonicalize(&root).map_err(|e| usage(format!("`--project-root {}`: {e}", root.display())))?;
        let cache_dir = capsule_exec::cache_dir()
            .ok_or_else(|| usage("no cache folder: set `CAPSULE_CACHE_DIR` or `HOME`".into()))?
            .join("cluster");
        let name = self.name.unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id()));
        let slots = self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let cluster = Cluster::connect(self.cluster.options(&self.nats, name.clone()))
            .await
            .map_err(|e| Failure::new(Exit::Usage, &e))?;
        let engine = Engine::new()?;
        let options = WorkerOptions { name: name.clone(), slots, project_root, cache_dir };
        eprintln!("capsule: worker `{name}` runs up to {slots} calls at once from {}", self.nats);
        let shutdown = async {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        Worker::new(cluster, engine, options).serve(shutdown).await.map_err(|e| Failure::new(Exit::Internal, &e))?;
        Ok(Exit::Success.into())
    }
}
