//! The running side: `capsule worker` pulls calls from the queue, at most `slots` at once,
//! runs each in a fresh sandbox with its manifest's limits (its sub-tasks go back to the
//! queue), records the outcome once, and only then acknowledges the message.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use capsule_exec::{CallStatus, Cancel, Engine, Outcome, Remote, RunOrder, RunRequest};
use futures_util::StreamExt;
use python_runtime::{ErrorKind, GuestError};
use tokio::sync::Semaphore;

use crate::message::{CallMessage, CallState, Recorded, run_of};
use crate::{CALLS_SUBJECT, CONSUMER, Cluster, ClusterError, DONE_SUBJECT, STOP_SUBJECT, nats, setup, store};

/// After this many deliveries of one call (each ended by its worker dying), it is recorded
/// as failed instead of being run again: a call that kills its worker must not take the
/// cluster down one worker at a time.
const MAX_DELIVERIES: i64 = 5;
/// How long a worker waits for a message before asking again (and looking at its shutdown).
const PULL_EXPIRES: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Shown in `capsule list` next to the calls it runs.
    pub name: String,
    /// Calls run at once.
    pub slots: usize,
    /// The folder every task's `allowed_files` are relative to, whatever the message says.
    pub project_root: PathBuf,
    /// Where fetched manifests and artifacts are kept.
    pub cache_dir: PathBuf,
}

pub struct Worker {
    cluster: Cluster,
    engine: Engine,
    options: WorkerOptions,
    /// The calls running here, by key, so a stop of their run reaches them.
    running: Mutex<HashMap<String, Cancel>>,
    /// One download at a time: calls of a project new here wait for its first fetch.
    fetching: tokio::sync::Mutex<()>,
}

impl Worker {
    pub fn new(cluster: Cluster, engine: Engine, options: WorkerOptions) -> Arc<Self> {
        Arc::new(Self { cluster, engine, options, running: Mutex::default(), fetching: tokio::sync::Mutex::default() })
    }

    /// Pulls and runs calls until `shutdown` resolves, then lets the running ones finish.
    pub async fn serve(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) -> Result<(), ClusterError> {
        let consumer = self.consumer().await?;
        let stops =
            self.cluster.client.subscribe(format!("{STOP_SUBJECT}.*")).await.map_err(|e| nats("subscribe")(&e))?;
        let listener = tokio::spawn(self.clone().listen_for_stops(stops));
        let slots = Arc::new(Semaphore::new(self.options.slots.max(1)));
        tokio::pin!(shutdown);
        'pulling: loop {
            // One pull request for as many messages as there are free slots; it waits up to
            // `PULL_EXPIRES` for them, and each message starts as soon as it arrives.
            let mut permits = tokio::select! {
                permit = slots.clone().acquire_owned() => vec![permit.expect("never closed")],
                () = &mut shutdown => break,
            };
            while let Ok(permit) = slots.clone().try_acquire_owned() {
                permits.push(permit);
            }
            let mut batch = match consumer.batch().max_messages(permits.len()).expires(PULL_EXPIRES).messages().await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(%error, "pulling from the queue failed; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while !permits.is_empty() {
                let next = tokio::select! {
                    next = batch.next() => next,
                    () = &mut shutdown => break 'pulling,
                };
                match next {
                    Some(Ok(message)) => {
                        let (this, permit) = (self.clone(), permits.pop());
                        tokio::spawn(async move {
                            this.handle(message).await;
                            drop(permit);
                        });
                    }
                    Some(Err(error)) => tracing::debug!(%error, "no message"),
                    None => break,
                }
            }
        }
        tracing::info!("shutting down: finishing the calls running here");
        let _ = slots.acquire_many(self.options.slots.max(1) as u32).await;
        listener.abort();
        Ok(())
    }

    async fn consumer(&self) -> Result<jetstream::consumer::Consumer<pull::Config>, ClusterError> {
        let config = pull::Config {
            durable_name: Some(CONSUMER.into()),
            filter_subject: format!("{CALLS_SUBJECT}.>"),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.cluster.options.ack_wait,
            // Unbounded here: the worker itself stops a call delivered too often.
            max_deliver: -1,
            ..Default::default()
        };
        self.cluster.calls_stream.get_or_create_consumer(CONSUMER, config).await.map_err(|e| setup("consumer")(&e))
    }

    async fn listen_for_stops(self: Arc<Self>, mut stops: async_nats::Subscriber) {
        while let Some(message) = stops.next().await {
            let run = message.subject.as_str().rsplit('.').next().unwrap_or("");
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            for (_, cancel) in running.iter().filter(|(key, _)| run_of(key) == run) {
                cancel.cancel();
            }
        }
    }

    /// One message: checked, run unless its outcome exists, recorded, acknowledged. Nothing
    /// in the message can stop the worker.
    async fn handle(&self, message: jetstream::Message) {
        let call = match CallMessage::parse(&message.payload) {
            Ok(call) => call,
            Err(why) => {
                tracing::warn!(subject = %message.subject, %why, "dropping a message that is not a call");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let key = call.call.key.clone();
        match self.cluster.result(&key).await {
            // Delivered again after it finished (its worker died before acknowledging).
            Ok(Some(_)) => {
                self.wake_callers(&key).await;
                let _ = message.double_ack().await;
                return;
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%key, %error, "cannot read the results; the call will be delivered again");
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return;
            }
        }
        let delivered = message.info().map_or(1, |info| info.delivered);
        let cancel = Cancel::default();
        self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), cancel.clone());
        if self.cluster.stopped.get(call.run()).await.ok().flatten().is_some() {
            cancel.cancel();
        }
        let started_at_ms = now_ms();
        let mut state = CallState {
            task: call.call.task.clone(),
            worker: self.options.name.clone(),
            status: CallStatus::Running,
            delivered: delivered as u32,
            started_at_ms,
            attempts: None,
            elapsed_ms: None,
            fuel: None,
            peak_memory_bytes: None,
            error_type: None,
        };
        self.report(&key, &state).await;

        let started = Instant::now();
        let outcome = if delivered > MAX_DELIVERIES {
            let why = format!("the call was delivered {delivered} times and its worker stopped each time");
            Outcome::not_run(&call.call.task, GuestError::new(ErrorKind::Host, why))
        } else {
            // Keep the message ours while the call runs.
            let heartbeat = async {
                let period = self.cluster.options.ack_wait / 3;
                loop {
                    tokio::time::sleep(period).await;
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            };
            tokio::select! {
                outcome = self.execute(&call, cancel.clone()) => outcome,
                () = heartbeat => unreachable!("the heartbeat never ends"),
            }
        };
        self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);

        // The outcome is recorded before the message is acknowledged: a worker dying in
        // between leaves a message whose next delivery finds the outcome.
        let record = Recorded::of(&call.call, outcome.clone()).into_bytes();
        let recorded = self.cluster.results.create(&key, record.into()).await;
        match recorded {
            Ok(_) => {}
            Err(error) if error.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                tracing::info!(%key, "another worker recorded this call's outcome first; it stands");
            }
            Err(error) => {
                tracing::warn!(%key, %error, "cannot record the outcome; the call will be delivered again");
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return;
            }
        }
        state.status = CallStatus::ended(outcome.success);
        state.attempts = Some(outcome.execution.attempts);
        state.elapsed_ms = Some(started.elapsed().as_millis() as u64);
        state.fuel = Some(outcome.execution.fuel_consumed);
        state.peak_memory_bytes = Some(outcome.execution.peak_memory_bytes);
        state.error_type = outcome.error.as_ref().map(|e| e.kind.as_str().to_string());
        self.report(&key, &state).await;
        self.wake_callers(&key).await;
        if let Err(error) = message.double_ack().await {
            tracing::warn!(%key, %error, "the acknowledgement failed; a redelivery will replay the outcome");
        }
    }

    /// Fetches the project, then runs the call in this process with the manifest's limits.
    async fn execute(&self, call: &CallMessage, cancel: Cancel) -> Outcome {
        let task = &call.call.task;
        let failed = |kind, message: String| Outcome::not_run(task, GuestError::new(kind, message));
        let fetched = {
            let _one_at_a_time = self.fetching.lock().await;
            store::fetch_project(
                &self.cluster.artifacts,
                &self.options.cache_dir,
                &call.manifest_sha256,
                self.engine.trust().is_some(),
            )
            .await
        };
        let manifest = match fetched {
            Ok(path) => path,
            Err(error) => return failed(ErrorKind::Host, format!("worker `{}`: {error}", self.options.name)),
        };
        let loaded = match tokio::task::block_in_place(|| self.engine.load(&manifest)) {
            Ok(loaded) => loaded,
            Err(error) => return failed(ErrorKind::Host, format!("worker `{}`: {error}", self.options.name)),
        };
        let remote = Remote {
            dispatch: Arc::new(self.cluster.dispatcher(&call.namespace, &call.manifest_sha256)),
            key: call.call.key.clone(),
            depth: call.call.depth,
        };
        let order = RunOrder {
            // Grants are always under this worker's root: nothing in a message moves them.
            files_root: Some(self.options.project_root.clone()),
            ..RunOrder::task(Some(task.clone()), call.call.args.clone(), call.call.kwargs.clone())
        };
        let request = RunRequest { cancel, remote: Some(remote), ..RunRequest::new(order) };
        match self.engine.prepare(&loaded, request) {
            Ok(prepared) => prepared.run().await,
            Err(error) => failed(ErrorKind::InvalidInput, error.to_string()),
        }
    }

    async fn report(&self, key: &str, state: &CallState) {
        let bytes = serde_json::to_vec(state).expect("states serialise");
        if let Err(error) = self.cluster.call_states.put(key, bytes.into()).await {
            tracing::debug!(%key, %error, "cannot report the call's state");
        }
    }

    async fn wake_callers(&self, key: &str) {
        let _ = self.cluster.client.publish(format!("{DONE_SUBJECT}.{key}"), bytes::Bytes::new()).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
