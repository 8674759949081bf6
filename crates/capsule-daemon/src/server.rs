//! The HTTP API (axum): routes, error bodies, streams, the token check for TCP.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use manifest_schema::Category;
use serde::Deserialize;

use crate::api::{
    Accepted, ApiError, ErrorBody, Finished, Health, Line, MAX_REQUEST_BYTES, OpenSession, RunOrder, RunPython,
    SessionCall, SessionView, SubmitRun,
};
use crate::runs::{RunEntry, Runs};
use crate::sessions::{Sessions, interpreter_image};

/// How long `stop` waits for the run to end before answering.
const STOP_WAIT: Duration = Duration::from_secs(5);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody { error: self })).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// What the routes serve.
#[derive(Clone)]
pub struct Served {
    pub runs: Arc<Runs>,
    pub sessions: Arc<Sessions>,
}

impl axum::extract::FromRef<Served> for Arc<Runs> {
    fn from_ref(served: &Served) -> Self {
        served.runs.clone()
    }
}

impl axum::extract::FromRef<Served> for Arc<Sessions> {
    fn from_ref(served: &Served) -> Self {
        served.sessions.clone()
    }
}

pub fn router(served: Served, token: Option<Arc<str>>) -> Router {
    let routes = Router::new()
        .route("/v1/health", get(health))
        .route("/v1/python", post(run_python))
        .route("/v1/sessions", post(open_session).get(list_sessions))
        .route("/v1/sessions/{id}", axum::routing::delete(close_session))
        .route("/v1/sessions/{id}/run", post(session_run))
        .route("/v1/sessions/{id}/save", post(session_save))
        .route("/v1/sessions/{id}/fork", post(session_fork))
        .route("/v1/runs", post(submit).get(list))
        .route("/v1/runs/{id}", get(show))
        .route("/v1/runs/{id}/events", get(events))
        .route("/v1/runs/{id}/logs", get(logs))
        .route("/v1/runs/{id}/outcome", get(outcome))
        .route("/v1/runs/{id}/stop", post(stop))
        .route("/v1/runs/{id}/restart", post(restart))
        .fallback(|| async { ApiError::new(Category::NotFound, "no such route; the API is under /v1/") })
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(served);
    match token {
        Some(token) => routes.layer(middleware::from_fn(move |request: Request, next: Next| {
            let token = token.clone();
            async move { authorise(&token, request, next).await }
        })),
        None => routes,
    }
}

/// Refuses requests without `Authorization: Bearer <token>`, comparing in constant time.
async fn authorise(token: &str, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        next.run(request).await
    } else {
        ApiError::hinted(Category::Unauthorized, "missing or wrong token", "send `Authorization: Bearer <token>`")
            .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // The length of the token is not secret; its bytes are.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

async fn health(State(runs): State<Arc<Runs>>) -> Json<Health> {
    let (running, queued) = runs.counts();
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        running,
        queued,
        workers: runs.limits().workers,
        queue: runs.limits().queue,
    })
}

/// A JSON body, with errors that name the problem (and the daemon's own error shape).
fn json_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(Category::TooLarge, format!("the request is larger than {} MiB", MAX_REQUEST_BYTES >> 20))
        } else {
            ApiError::new(Category::Usage, format!("cannot read the request: {rejection}"))
        }
    })?;
    // The error names the field, e.g. `options.ram`, not just where in the text it was.
    let mut reader = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let message = match e.path().to_string().as_str() {
            "." => format!("invalid request body: {}", e.inner()),
            path => format!("invalid request body: `{path}`: {}", e.inner()),
        };
        ApiError::new(Category::Usage, message)
    })
}

async fn submit(State(runs): State<Arc<Runs>>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let request: SubmitRun = json_body(body)?;
    let (wait, stream, stop_on_disconnect) = (request.wait, request.stream, request.stop_on_disconnect);
    if wait && !stream {
        // (A client that goes away is not noticed until the run ends: use `stream` for that.)
        let (run, outcome) = runs.submit_and_wait(request).await?;
        return Ok(Json(Finished { run, outcome }).into_response());
    }
    let entry = runs.submit(request, None).await?;
    if !wait {
        return Ok((StatusCode::ACCEPTED, Json(Accepted { run: entry.view(false) })).into_response());
    }
    let first = serde_json::to_string(&Line::Accepted { run: entry.view(false) }).expect("serialises") + "\n";
    let guard = stop_on_disconnect.then(|| StopOnDrop(Some(entry.clone())));
    Ok(stream_lines(entry, Some(first), true, Filter::All, guard))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    all: bool,
    namespace: Option<String>,
}

async fn list(
    State(runs): State<Arc<Runs>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::new(Category::Usage, e.body_text()))?;
    Ok(Json(runs.list(query.all, query.namespace.as_deref())).into_response())
}

async fn show(State(runs): State<Arc<Runs>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(runs.get(&id)?.view(true)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FollowQuery {
    #[serde(default)]
    follow: bool,
}

fn follow_of(query: Result<Query<FollowQuery>, axum::extract::rejection::QueryRejection>) -> ApiResult<bool> {
    query.map(|Query(q)| q.follow).map_err(|e| ApiError::new(Category::Usage, e.body_text()))
}

async fn events(
    State(runs): State<Arc<Runs>>,
    Path(id): Path<String>,
    query: Result<Query<FollowQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let follow = follow_of(query)?;
    Ok(stream_lines(runs.get(&id)?, None, follow, Filter::All, None))
}

async fn logs(
    State(runs): State<Arc<Runs>>,
    Path(id): Path<String>,
    query: Result<Query<FollowQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let follow = follow_of(query)?;
    Ok(stream_lines(runs.get(&id)?, None, follow, Filter::Output, None))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    #[serde(default)]
    wait: bool,
}

async fn outcome(
    State(runs): State<Arc<Runs>>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::new(Category::Usage, e.body_text()))?;
    let entry = runs.get(&id)?;
    loop {
        let change = entry.next_change();
        if let Some(outcome) = entry.outcome() {
            return Ok(Json(outcome).into_response());
        }
        if !query.wait {
            return Err(ApiError::hinted(
                Category::Conflict,
                format!("run `{id}` has not finished"),
                "add `?wait=true` to wait for it",
            ));
        }
        change.await;
    }
}

async fn stop(State(runs): State<Arc<Runs>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(runs.stop(&id, STOP_WAIT).await?).into_response())
}

async fn restart(State(runs): State<Arc<Runs>>, Path(id): Path<String>) -> ApiResult<Response> {
    let entry = runs.restart(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { run: entry.view(false) })).into_response())
}

async fn run_python(State(runs): State<Arc<Runs>>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let request: RunPython = json_body(body)?;
    let image = interpreter_image()?;
    let order = RunOrder {
        options: Some(request.options.map_or_else(manifest_schema::TaskOptions::for_code, |o| o.0)),
        files_root: request.project.clone(),
        ..RunOrder::task(Some("run_python".into()), vec![serde_json::Value::String(request.code)], Default::default())
    };
    let submit = SubmitRun { project: request.project, ..SubmitRun::of_order(image, order) };
    let (run, outcome) = runs.submit_and_wait(submit).await?;
    Ok(Json(Finished { run, outcome }).into_response())
}

async fn open_session(
    State(sessions): State<Arc<Sessions>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let request: OpenSession = json_body(body)?;
    Ok((StatusCode::CREATED, Json(sessions.open(request).await?)).into_response())
}

async fn list_sessions(State(sessions): State<Arc<Sessions>>) -> Json<Vec<SessionView>> {
    Json(sessions.list())
}

async fn session_run(
    State(sessions): State<Arc<Sessions>>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let call: SessionCall = json_body(body)?;
    Ok(Json(sessions.call(&id, call).await?).into_response())
}

async fn session_save(State(sessions): State<Arc<Sessions>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(sessions.save(&id).await?).into_response())
}

async fn session_fork(State(sessions): State<Arc<Sessions>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok((StatusCode::CREATED, Json(sessions.fork(&id).await?)).into_response())
}

async fn close_session(State(sessions): State<Arc<Sessions>>, Path(id): Path<String>) -> ApiResult<Response> {
    sessions.close(&id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Filter {
    All,
    /// Only what tasks printed.
    Output,
}

/// Stops the run when dropped before the stream ended (the client went away).
struct StopOnDrop(Option<Arc<RunEntry>>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(entry) = self.0.take()
            && !entry.is_finished()
        {
            tracing::info!(run = %entry.id, "the client went away; stopping its run");
            entry.stop();
        }
    }
}

struct Follow {
    entry: Arc<RunEntry>,
    first: Option<String>,
    next: u64,
    follow: bool,
    filter: Filter,
    guard: Option<StopOnDrop>,
    done: bool,
}

/// The run's log as NDJSON, from its start; with `follow`, until the run ends.
fn stream_lines(
    entry: Arc<RunEntry>,
    first: Option<String>,
    follow: bool,
    filter: Filter,
    guard: Option<StopOnDrop>,
) -> Response {
    let state = Follow { entry, first, next: 0, follow, filter, guard, done: false };
    let lines = stream::unfold(state, |mut state| async move {
        if let Some(first) = state.first.take() {
            return Some((Ok::<_, Infallible>(Bytes::from(first)), state));
        }
        loop {
            if state.done {
                return None;
            }
            let entry = state.entry.clone();
            let change = entry.next_change();
            let (lines, next, ended) = entry.lines_from(state.next);
            state.next = next;
            let chunk: String = lines
                .iter()
                .filter(|line| state.filter == Filter::All || is_output(line))
                .map(|line| line.as_ref())
                .collect();
            if ended || !state.follow {
                state.done = true;
                if let Some(guard) = &mut state.guard {
                    guard.0 = None;
                }
            }
            if !chunk.is_empty() {
                return Some((Ok(Bytes::from(chunk)), state));
            }
            if !state.done {
                change.await;
            }
        }
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "application/x-ndjson".parse().expect("a valid header"));
    (headers, Body::from_stream(lines)).into_response()
}

fn is_output(line: &str) -> bool {
    matches!(serde_json::from_str::<Line>(line), Ok(Line::Event { event: capsule_exec::Event::Output { .. } }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz target: the daemon answers any request body with a request or a `usage` error
    /// naming the problem, never a panic.
    #[test]
    fn fuzzed_request_bodies_are_parsed_or_refused_never_a_panic() {
        let seed = serde_json::to_string(&SubmitRun {
            manifest: "/project/.capsule/build/main/manifest.toml".into(),
            task: Some("main".into()),
            args: vec![serde_json::json!([1, "two", {"three": 3.5}])],
            default_timeout: Some(manifest_schema::Timeout(Duration::from_secs(30))),
            options: Some(manifest_schema::TaskOptions::default()),
            wait: true,
            ..SubmitRun::default()
        })
        .unwrap();
        bolero::check!().with_iterations(fixtures::fuzz_iterations()).for_each(|noise: &[u8]| {
            let body = Ok(Bytes::from(fixtures::mutate(&seed, noise)));
            if let Err(error) = json_body::<SubmitRun>(body) {
                assert_eq!(error.kind, Category::Usage);
            }
        });
    }

    #[test]
    fn tokens_compare_by_content_and_length() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secrets"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
