//! The calling side: a call is published to the queue (once per key) and its outcome awaited
//! from the results bucket. The daemon dispatches a run's top-level call this way, and a
//! worker its running call's sub-tasks.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use capsule_exec::{BoxFuture, Dispatch, Outcome, RemoteCall};
use futures_util::StreamExt;
use python_runtime::{ErrorKind, GuestError};

use crate::message::{CallMessage, MESSAGE_VERSION, Recorded};
use crate::{CALLS_SUBJECT, CONSUMER, Cluster, ClusterError, DONE_SUBJECT, nats, subject_token};

/// How often a waiting caller looks at the results bucket even without a wake-up (which is
/// best effort: a core NATS message).
const RECHECK: Duration = Duration::from_secs(2);
/// After this long without an outcome, a caller checks that some worker is taking calls.
const NO_WORKER_AFTER: Duration = Duration::from_secs(30);
/// The longest pause between two attempts to queue a call while the queue is full.
const MAX_FULL_BACKOFF: Duration = Duration::from_secs(2);

/// Dispatches calls of one project to the cluster.
#[derive(Clone)]
pub struct Dispatcher {
    cluster: Cluster,
    namespace: String,
    manifest_sha256: String,
}

impl Dispatcher {
    pub(crate) fn new(cluster: Cluster, namespace: &str, manifest_sha256: &str) -> Self {
        Self { cluster, namespace: namespace.into(), manifest_sha256: manifest_sha256.into() }
    }

    /// Runs `call` on some worker (or replays its recorded outcome) and gives the outcome.
    pub async fn call(&self, call: RemoteCall) -> Result<Outcome, ClusterError> {
        let key = call.key.clone();
        // Listen before looking, so that an outcome recorded in between still wakes us.
        let mut done =
            self.cluster.client.subscribe(format!("{DONE_SUBJECT}.{key}")).await.map_err(|e| nats("subscribe")(&e))?;
        if let Some(recorded) = self.cluster.result(&key).await? {
            return Ok(replayed(recorded, &call));
        }
        self.enqueue(call.clone()).await?;
        let queued = std::time::Instant::now();
        let mut warned = false;
        loop {
            let _ = tokio::time::timeout(RECHECK, done.next()).await;
            if let Some(recorded) = self.cluster.result(&key).await? {
                return Ok(replayed(recorded, &call));
            }
            // Waiting for a worker is normal (back-pressure, a late worker); waiting with no
            // worker at all deserves a word in the log.
            if !warned && queued.elapsed() >= NO_WORKER_AFTER && !self.cluster.has_workers().await {
                tracing::warn!(
                    %key,
                    task = %call.task,
                    "the call has waited {}s and no worker is taking calls: start `capsule worker --nats <url>`",
                    queued.elapsed().as_secs()
                );
                warned = true;
            }
        }
    }

    /// Publishes the call with its key as message id (queued once however often it is
    /// published); waits while the queue is full.
    async fn enqueue(&self, call: RemoteCall) -> Result<(), ClusterError> {
        let key = call.key.clone();
        let message = CallMessage {
            version: MESSAGE_VERSION,
            namespace: self.namespace.clone(),
            manifest_sha256: self.manifest_sha256.clone(),
            call,
        };
        let payload: bytes::Bytes = serde_json::to_vec(&message).expect("messages serialise").into();
        let subject = format!("{CALLS_SUBJECT}.{}", subject_token(&self.namespace));
        let mut pause = Duration::from_millis(20);
        loop {
            let publish = PublishMessage::build().payload(payload.clone()).message_id(&key);
            let acked = match self.cluster.jetstream.send_publish(subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(error) => return Err(nats("publish")(&error)),
            };
            match acked {
                Ok(_) => return Ok(()),
                // The stream is bounded and refuses new messages when full: back-pressure.
                Err(error) if error.to_string().contains("maximum messages") => {
                    tracing::debug!(%key, "the queue is full; waiting");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_FULL_BACKOFF);
                }
                Err(error) => return Err(nats("publish")(&error)),
            }
        }
    }
}

/// The recorded outcome, or an error if it was recorded for another call at this key.
fn replayed(recorded: Recorded, call: &RemoteCall) -> Outcome {
    recorded.outcome_for(call).unwrap_or_else(|why| Outcome::not_run(&call.task, GuestError::new(ErrorKind::Host, why)))
}

impl Dispatch for Dispatcher {
    fn dispatch(&self, call: RemoteCall) -> BoxFuture<'static, Outcome> {
        let this = self.clone();
        Box::pin(async move {
            let task = call.task.clone();
            this.call(call).await.unwrap_or_else(|error| {
                Outcome::not_run(
                    &task,
                    GuestError::new(ErrorKind::Host, format!("running `{task}` on the cluster: {error}")),
                )
            })
        })
    }
}

impl Cluster {
    /// Whether some worker is waiting for calls or holding one (false when none ever came).
    async fn has_workers(&self) -> bool {
        match self.calls_stream.consumer_info(CONSUMER).await {
            Ok(info) => info.num_waiting > 0 || info.num_ack_pending > 0,
            Err(_) => false,
        }
    }

    /// What was recorded for call `key`, if anything.
    pub(crate) async fn result(&self, key: &str) -> Result<Option<Recorded>, ClusterError> {
        let Some(bytes) = self.results.get(key).await.map_err(|e| nats("results")(&e))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| ClusterError::Nats {
            what: "results",
            message: format!("the outcome of `{key}` is damaged: {e}"),
        })
    }
}
