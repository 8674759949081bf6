//! Capsule beyond one machine, on NATS JetStream.
//!
//! - Calls (a run's top-level call and every sub-task call) are messages on one work-queue
//!   stream, a subject per project (`capsule.calls.<namespace>`), each with the call's key as
//!   its message id, so publishing the same call twice within the duplicate window queues it
//!   once. Workers pull them from one durable consumer with explicit acks: a worker that dies
//!   mid-call leaves its message unacknowledged, and it is delivered to another worker after
//!   the ack wait. A running call sends "in progress" acks so that it is not redelivered.
//! - Results go to a key-value bucket under the call's key, created once: the first outcome
//!   recorded stands, and a call whose result exists is never run again (a redelivered
//!   message, or the same sub-task of a parent run again after its worker died, replays it).
//! - Artifacts and manifests travel through an object store, named by their sha256; a worker
//!   fetches what it lacks, checks the hash, and caches it. It runs a call only with the
//!   limits of the manifest and with file grants inside its own project root.
//!
//! `message` holds the wire shapes, `store` the artifacts, `dispatch` the calling side (the
//! daemon's runs and a worker's sub-tasks), `worker` the running side.

mod dispatch;
mod message;
mod store;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};

pub use dispatch::Dispatcher;
pub use message::CallState;
pub use worker::{Worker, WorkerOptions};

/// The stream of queued calls.
const STREAM: &str = "CAPSULE_CALLS";
/// Subjects of queued calls: one per project (namespace).
const CALLS_SUBJECT: &str = "capsule.calls";
/// The consumer every worker pulls from.
const CONSUMER: &str = "capsule-workers";
/// Outcomes, by call key.
const RESULTS_BUCKET: &str = "capsule-results";
/// Who runs which call, by call key (for `capsule list`).
const CALLS_BUCKET: &str = "capsule-calls";
/// Runs that were stopped, by run id.
const STOPPED_BUCKET: &str = "capsule-stopped";
/// Manifests and artifacts, by sha256.
const ARTIFACTS_BUCKET: &str = "capsule-artifacts";
/// A call's outcome was recorded: `capsule.done.<key>` (core NATS, a wake-up only).
const DONE_SUBJECT: &str = "capsule.done";
/// Stop a run's calls wherever they run: `capsule.stop.<run>` (core NATS).
const STOP_SUBJECT: &str = "capsule.stop";
/// How long results and call states are kept.
const KEEP_RESULTS: Duration = Duration::from_secs(7 * 24 * 3600);
/// A message published again within this window is queued once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(30 * 60);

/// How to reach the cluster, and how its queue behaves.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `nats://host:4222` (several, comma-separated, for a NATS cluster).
    pub url: String,
    /// A NATS credentials file (JWT and NKey).
    pub credentials: Option<PathBuf>,
    /// Root certificates to trust for TLS (PEM).
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key for TLS (PEM).
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Refuse a connection without TLS.
    pub require_tls: bool,
    /// How long a worker may hold a call without a sign of life before it is delivered to
    /// another worker (running calls send one every third of it).
    pub ack_wait: Duration,
    /// How many calls may wait in the queue; beyond, callers wait (back-pressure).
    pub queue_limit: i64,
    /// This client's name, as the server and `capsule list` show it.
    pub name: String,
}

impl ClusterOptions {
    /// The URL without any password in it, for messages and logs.
    pub fn shown_url(&self) -> String {
        self.url
            .split(',')
            .map(|server| match (server.split_once("://"), server.rsplit_once('@')) {
                (Some((scheme, rest)), Some((credentials, host))) if rest.contains('@') => {
                    let user = credentials.rsplit_once("://").map_or(credentials, |(_, c)| c);
                    let user = user.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}@{host}")
                }
                _ => server.to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            credentials: None,
            tls_ca: None,
            tls_client: None,
            require_tls: false,
            ack_wait: Duration::from_secs(30),
            queue_limit: 100_000,
            name: name.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at `{url}`: {message}")]
    Connect { url: String, message: String },
    #[error("cannot set up JetStream's {what}: {message}")]
    Setup { what: &'static str, message: String },
    #[error("the cluster's {what} failed: {message}")]
    Nats { what: &'static str, message: String },
    #[error("`{sha256}` in the cluster's artifact store has sha256 {actual}: refusing to run it")]
    Tampered { sha256: String, actual: String },
    #[error("the cluster's artifact store has no `{0}`")]
    MissingArtifact(String),
    #[error("the manifest `{sha256}` from the cluster's store is not valid: {message}")]
    BadManifest { sha256: String, message: String },
    #[error("cannot use `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl manifest_schema::Explain for ClusterError {
    fn category(&self) -> manifest_schema::Category {
        use manifest_schema::Category;
        match self {
            Self::Connect { .. } => Category::Usage,
            Self::Tampered { .. } | Self::MissingArtifact(_) | Self::BadManifest { .. } => Category::Load,
            Self::Setup { .. } | Self::Nats { .. } | Self::Io { .. } => Category::Internal,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::Connect { .. } => Some(
                "start one with `nats-server -js`, or check the URL, credentials and TLS options (`--nats-creds`, `--nats-tls-ca`)"
                    .into(),
            ),
            Self::Setup { .. } => Some("the server must have JetStream enabled (`nats-server -js`)".into()),
            Self::Tampered { .. } => {
                Some("the stored artifact was changed or corrupted; rebuild and submit the project again".into())
            }
            Self::MissingArtifact(_) => Some("submit the run again through a daemon: it uploads the artifact".into()),
            _ => None,
        }
    }
}

fn nats(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> ClusterError {
    move |error| ClusterError::Nats { what, message: error.to_string() }
}

fn setup(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> ClusterError {
    move |error| ClusterError::Setup { what, message: error.to_string() }
}

/// A connection to the cluster, with its stream and stores set up. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    calls_stream: stream::Stream,
    results: kv::Store,
    call_states: kv::Store,
    stopped: kv::Store,
    artifacts: object_store::ObjectStore,
    options: std::sync::Arc<ClusterOptions>,
}

impl Cluster {
    /// Connects, and creates the stream and stores if this is the cluster's first client.
    pub async fn connect(options: ClusterOptions) -> Result<Self, ClusterError> {
        let connect_error = |message: String| ClusterError::Connect { url: options.shown_url(), message };
        let mut connect = async_nats::ConnectOptions::new()
            .name(&options.name)
            .require_tls(options.require_tls)
            .connection_timeout(Duration::from_secs(5));
        // A user and password in the URL (`nats://worker:PASSWORD@host:4222`), for a server
        // whose configuration lists users.
        let first = options.url.split(',').next().unwrap_or_default().trim();
        if let Ok(server) = first.parse::<async_nats::ServerAddr>()
            && let (Some(user), Some(password)) = (server.username(), server.password())
        {
            connect = connect.user_and_password(user.to_string(), password.to_string());
        }
        if let Some(file) = &options.credentials {
            connect = connect
                .credentials_file(file)
                .await
                .map_err(|e| connect_error(format!("cannot read the credentials `{}`: {e}", file.display())))?;
        }
        if let Some(ca) = &options.tls_ca {
            connect = connect.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &options.tls_client {
            connect = connect.add_client_certificate(cert.clone(), key.clone());
        }
        let client = connect.connect(options.url.as_str()).await.map_err(|e| connect_error(e.to_string()))?;
        let jetstream = jetstream::new(client.clone());
        let calls = stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{CALLS_SUBJECT}.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages: options.queue_limit,
            discard: stream::DiscardPolicy::New,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        let calls_stream = stream_of(&jetstream, calls, "call stream").await?;
        let results = key_value(&jetstream, RESULTS_BUCKET).await?;
        let call_states = key_value(&jetstream, CALLS_BUCKET).await?;
        let stopped = key_value(&jetstream, STOPPED_BUCKET).await?;
        let artifacts = match jetstream.get_object_store(ARTIFACTS_BUCKET).await {
            Ok(store) => store,
            Err(_) => {
                let config = object_store::Config { bucket: ARTIFACTS_BUCKET.into(), ..Default::default() };
                match jetstream.create_object_store(config).await {
                    Ok(store) => store,
                    // A daemon and a worker starting together: the other one made it first.
                    Err(error) => jetstream
                        .get_object_store(ARTIFACTS_BUCKET)
                        .await
                        .map_err(|_| setup("artifact store")(&error))?,
                }
            }
        };
        Ok(Self {
            client,
            jetstream,
            calls_stream,
            results,
            call_states,
            stopped,
            artifacts,
            options: std::sync::Arc::new(options),
        })
    }

    /// Puts the manifest at `path` and its artifact in the cluster's store (unless there
    /// already); returns the manifest's sha256, which calls name.
    pub async fn publish_project(&self, manifest: &std::path::Path) -> Result<String, ClusterError> {
        store::publish_project(&self.artifacts, manifest).await
    }

    /// A dispatcher for calls of the project whose manifest has `manifest_sha256`.
    pub fn dispatcher(&self, namespace: &str, manifest_sha256: &str) -> Dispatcher {
        Dispatcher::new(self.clone(), namespace, manifest_sha256)
    }

    /// Stops every call of `run`, running or queued, on every worker.
    pub async fn stop_run(&self, run: &str) -> Result<(), ClusterError> {
        self.stopped.put(run, bytes::Bytes::from_static(b"stopped")).await.map_err(|e| nats("stop record")(&e))?;
        self.client
            .publish(format!("{STOP_SUBJECT}.{run}"), bytes::Bytes::new())
            .await
            .map_err(|e| nats("stop message")(&e))?;
        self.client.flush().await.map_err(|e| nats("stop message")(&e))
    }

    /// The states of `run`'s calls as workers report them (those recorded so far first), by
    /// call key, until the stream is dropped.
    pub async fn watch_calls(
        &self,
        run: &str,
    ) -> Result<impl futures_util::Stream<Item = (String, CallState)> + use<>, ClusterError> {
        use futures_util::StreamExt;
        let watch =
            self.call_states.watch_with_history(format!("{run}.>")).await.map_err(|e| nats("call states")(&e))?;
        Ok(watch.filter_map(|entry| async move {
            let entry = entry.ok()?;
            Some((entry.key.clone(), serde_json::from_slice::<CallState>(&entry.value).ok()?))
        }))
    }
}

/// The key-value bucket `bucket`, created if missing. The bucket's stream is created here,
/// as the key-value API lays it out, because the client's own bucket creation first reads
/// account limits in a shape only newer servers answer (nats-server 2.9 is Debian's).
async fn key_value(jetstream: &jetstream::Context, bucket: &str) -> Result<kv::Store, ClusterError> {
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: KEEP_RESULTS,
        max_message_size: message::MAX_RECORD_BYTES as i32,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    stream_of(jetstream, config, "key-value store").await?;
    jetstream.get_key_value(bucket).await.map_err(|e| setup("key-value store")(&e))
}

/// The stream `config` names, created if missing. A daemon and a worker starting together may
/// both find it missing: the one whose creation fails looks again.
async fn stream_of(
    jetstream: &jetstream::Context,
    config: stream::Config,
    what: &'static str,
) -> Result<jetstream::stream::Stream, ClusterError> {
    match jetstream.get_or_create_stream(config.clone()).await {
        Ok(stream) => Ok(stream),
        Err(error) => jetstream.get_stream(&config.name).await.map_err(|_| setup(what)(&error)),
    }
}

/// The subject token of a namespace: NATS subjects take no spaces, dots or wildcards.
fn subject_token(namespace: &str) -> String {
    let token: String =
        namespace.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if token.is_empty() { "_".into() } else { token }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_become_single_subject_tokens() {
        assert_eq!(subject_token("my-project"), "my-project");
        assert_eq!(subject_token("a.b *>c"), "a_b___c");
        assert_eq!(subject_token(""), "_");
    }

    #[test]
    fn passwords_are_never_shown() {
        let options = ClusterOptions::new("nats://worker:s3cret@10.0.0.5:4222,nats://10.0.0.6:4222", "w");
        assert_eq!(options.shown_url(), "nats://worker@10.0.0.5:4222,nats://10.0.0.6:4222");
    }
}
