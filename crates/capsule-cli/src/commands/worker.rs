//! `capsule worker`: runs calls from a cluster's queue (NATS JetStream) on this host.

use std::path::PathBuf;
use std::process::ExitCode;

use capsule_cluster::{Cluster, Worker, WorkerOptions};
use capsule_exec::{Engine, Trust};
use clap::Args;
use manifest_schema::{Category, Problem};

use crate::cluster_args::{ClusterArgs, host_name};
use crate::exit::{Exit, Failure};

/// Run tasks from a cluster's queue: any number of workers on any hosts pull the calls a
/// `capsule daemon --nats` (and the tasks themselves, for their sub-tasks) put there.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule worker --nats nats://worker:PASSWORD@10.0.0.5:4222 --trust release.pub\n  capsule worker --nats nats://queue:4222 --trust release.pub --workers 8 --project-root /srv/data --name gpu-1\n  capsule worker --nats tls://queue:4222 --nats-creds worker.creds --nats-tls-ca ca.pem --trust release.pub\n  capsule worker --nats nats://127.0.0.1:4222 --allow-unsigned    a trusted network, unsigned builds"
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
    /// Run only manifests one of these public keys signed (`capsule keygen`, `capsule build
    /// --sign`); repeatable. `CAPSULE_TRUST` adds a colon-separated list.
    #[arg(long, value_name = "KEY.pub")]
    trust: Vec<PathBuf>,
    /// Without a key to trust: run unsigned work too, from whoever can write to the queue.
    #[arg(long)]
    allow_unsigned: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
}

impl WorkerCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let usage = |message: String| Failure::problem(Category::Usage, Problem::new(message));
        let trust = Trust::from_files_and_env(&self.trust).map_err(|e| Failure::of(&e))?;
        if trust.is_none() && !self.allow_unsigned {
            return Err(Failure::problem(
                Category::Usage,
                Problem::hinted(
                    "a worker runs, as native code, whatever reaches its queue: it needs the public key builds are signed with",
                    "pass `--trust KEY.pub` (see `capsule keygen` and `capsule build --sign`), or accept unsigned work explicitly with `--allow-unsigned`",
                ),
            ));
        }
        let root = match self.project_root {
            Some(root) => root,
            None => std::env::current_dir().map_err(|e| usage(format!("cannot read the current folder: {e}")))?,
        };
        let project_root =
            std::fs::canonicalize(&root).map_err(|e| usage(format!("`--project-root {}`: {e}", root.display())))?;
        let cache_dir = capsule_exec::paths::cache_dir()
            .ok_or_else(|| usage("no cache folder: set `CAPSULE_CACHE_DIR` or `HOME`".into()))?
            .join("cluster");
        let name = self.name.unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id()));
        let slots = self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let cluster_options = self.cluster.options(&self.nats, name.clone());
        let shown = cluster_options.shown_url();
        let cluster = Cluster::connect(cluster_options).await.map_err(|e| Failure::of(&e))?;
        let mut engine = Engine::new()?;
        if let Some(trust) = trust {
            engine = engine.requiring_signatures(trust);
        }
        let options = WorkerOptions { name: name.clone(), slots, project_root, cache_dir };
        eprintln!("capsule: worker `{name}` runs up to {slots} calls at once from {shown}");
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
        Worker::new(cluster, engine, options).serve(shutdown).await.map_err(|e| Failure::of(&e))?;
        Ok(Exit::Success.into())
    }
}
