//! The daemon's API served inside another process, with no socket: how the Python SDK's
//! native module runs tasks by default. The routes, checks and answers are the daemon's own
//! (`server::router`); only the transport is gone, so a program sees the same results and
//! errors in process as through a daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, header};
use axum::response::IntoResponse;
use capsule_exec::Engine;
use manifest_schema::Category;
use tower::ServiceExt;

use crate::DaemonError;
use crate::api::{ApiError, ErrorBody};
use crate::runs::{Limits, Runs};
use crate::server::router;

/// Runs queued or running at once in one process: enough that a program's thousand
/// concurrent calls wait their turn instead of being refused.
const QUEUE: usize = 100_000;

/// The service, its engine threads, and the private folder of its records.
pub struct Embedded {
    runtime: tokio::runtime::Runtime,
    api: Api,
    runs: Arc<Runs>,
    state_dir: PathBuf,
}

/// The service's routes, to call: cheap to clone, and holding none of its threads, so that a
/// request in flight never keeps the runtime it runs on.
#[derive(Clone)]
pub struct Api {
    router: axum::Router,
}

impl Embedded {
    /// Starts the service on `engine`, its records in `state_dir` (made private now, and
    /// removed by [`Embedded::close`]).
    pub fn start(engine: Engine, state_dir: PathBuf) -> Result<Self, DaemonError> {
        let runtime = crate::engine_runtime()?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let limits = Limits { workers: cores, queue: QUEUE, journal: None, own_places: vec![state_dir.clone()] };
        let workers = crate::Workers { runtime: runtime.handle().clone(), inline: true };
        let served = crate::assemble(engine, &state_dir, limits, None, workers)?;
        let runs = served.runs.clone();
        runtime.spawn(crate::close_idle_sessions(served.sessions.clone()));
        let api = Api { router: router(served, None) };
        Ok(Self { runtime, api, runs, state_dir })
    }

    /// The threads sandboxes run on; a caller's futures may be spawned there.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// Its routes, to call (within its runtime: [`Embedded::handle`]).
    pub fn api(&self) -> Api {
        self.api.clone()
    }

    /// Stops taking runs, gives running ones `grace` to finish, and removes the records.
    pub fn close(self, grace: Duration) {
        let runs = self.runs.clone();
        self.runtime.block_on(runs.shutdown(grace));
        self.runtime.shutdown_timeout(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

impl Api {
    /// Answers one request of the API (`method` and `route` as over HTTP, e.g. `POST` and
    /// `/v1/runs`): its HTTP status and body.
    pub async fn request(&self, method: &str, route: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let request = Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string()).and_then(|method| {
            Request::builder()
                .method(method)
                .uri(route)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .map_err(|e| e.to_string())
        });
        let response = match request {
            Ok(request) => self.router.clone().oneshot(request).await.unwrap_or_else(|never| match never {}),
            Err(why) => ApiError::new(Category::Usage, format!("not a request: {why}")).into_response(),
        };
        let status = response.status().as_u16();
        match axum::body::to_bytes(response.into_body(), usize::MAX).await {
            Ok(bytes) => (status, bytes.to_vec()),
            Err(error) => {
                let error = ApiError::new(Category::Internal, format!("the answer broke off: {error}"));
                (error.kind.http_status(), serde_json::to_vec(&ErrorBody { error }).expect("errors serialise"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(service: &Embedded, method: &str, route: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, body) = service.handle().block_on(service.api().request(method, route, body.as_bytes().to_vec()));
        (status, serde_json::from_slice(&body).expect("the answer is JSON"))
    }

    #[test]
    fn the_daemons_routes_answer_in_process_with_the_daemons_errors() {
        let records = tempfile::tempdir().unwrap();
        let service = Embedded::start(Engine::new().unwrap(), records.path().join("state")).unwrap();
        let (status, health) = answer(&service, "GET", "/v1/health", "");
        assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
        let (status, error) = answer(&service, "POST", "/v1/runs", "{\"manifest\": 3}");
        assert_eq!((status, error["error"]["kind"].as_str()), (400, Some("usage")));
        assert!(error["error"]["message"].as_str().unwrap().contains("`manifest`"), "{error}");
        let (status, error) = answer(&service, "GET", "/nowhere", "");
        assert_eq!((status, error["error"]["kind"].as_str()), (404, Some("not_found")));
        let (status, error) = answer(&service, "NOT A METHOD", "/v1/health", "");
        assert_eq!((status, error["error"]["kind"].as_str()), (400, Some("usage")));
        service.close(Duration::from_secs(1));
        assert!(!records.path().join("state").exists(), "closing removes the records");
    }
}
